"""The compiled module: calling conventions, params, dtypes, heads, state passing, gradients."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.checker import broadcast_shapes, matmul_shape

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

EMA = """
cell Ema(d, decay = 0.9) {
    input x: [d]
    state h: [d] = 0
    h = decay * h + (1 - decay) * x
    out h
}
"""

TWO_OUTPUTS = """
cell Two(d) {
    input x: [d]
    input y: []
    param w: [d] = ones
    state s: [] = 0
    s = s + y
    out total = s * w + x
    out s
}
"""


def test_positional_and_keyword_inputs_agree():
    mod = recdsl.compile(TWO_OUTPUTS, d=3)
    x, y = torch.randn(2, 5, 3), torch.randn(2, 5)
    by_position = mod(x, y)
    by_name = mod(y=y, x=x)
    assert isinstance(by_position, tuple) and len(by_position) == 2
    for a, b in zip(by_position, by_name):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(by_position[1], torch.cumsum(y, dim=1))


def test_params_are_named_parameters_initialised_as_declared():
    mod = recdsl.compile(EXAMPLES / "s6.rec", d=4, n=3)
    names = dict(mod.named_parameters())
    assert set(names) == {"A_log", "D"}
    torch.testing.assert_close(mod.A_log.detach(), torch.log(1 + torch.arange(3.0)).expand(4, 3))
    torch.testing.assert_close(mod.D.detach(), torch.ones(4))
    assert isinstance(mod.D, torch.nn.Parameter)


def test_glorot_and_normal_initializers_have_the_declared_spread():
    mod = recdsl.compile(
        "cell C(d) {\n input x: [d]\n param W: [d, d] = glorot\n param V: [d, d] = normal(0.5)\n param U: [d] = uniform(2, 3)\n out x @ W @ V + U\n}\n",
        d=256,
    )
    bound = (6 / 512) ** 0.5
    assert mod.W.abs().max() <= bound and mod.W.std().item() == pytest.approx(bound / 3**0.5, rel=0.05)
    assert mod.V.std().item() == pytest.approx(0.5, rel=0.05)
    assert 2 <= mod.U.min() and mod.U.max() <= 3


def test_complex_param():
    mod = recdsl.compile("cell C(d) {\n input x: [d]\n param W: complex[d, d] = glorot\n out real(x @ W)\n}\n", d=3)
    assert mod.W.is_complex()
    x = torch.randn(1, 2, 3)
    torch.testing.assert_close(mod(x), (x.to(torch.complex64) @ mod.W).real)


def test_splitting_a_sequence_gives_the_same_result():
    mod = recdsl.compile(EXAMPLES / "aaren.rec", d=3).double()
    score, v = torch.randn(2, 9, dtype=torch.float64), torch.randn(2, 9, 3, dtype=torch.float64)
    whole, final = mod(score, v, return_state=True)
    first, middle = mod(score[:, :4], v[:, :4], return_state=True)
    assert set(middle) == {"acc.m", "acc.s", "acc.n"}
    second, final2 = mod(score[:, 4:], v[:, 4:], state=middle, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole)
    for key in final:
        torch.testing.assert_close(final2[key], final[key])


def test_extra_head_dims_are_batch_like():
    mod = recdsl.compile(EXAMPLES / "gla.rec", dk=3, dv=2)
    inputs = {n: torch.randn(2, 6, 4, 5, s) for n, s in (("q", 3), ("k", 3), ("v", 2), ("g", 3))}
    out = mod(**inputs)
    assert out.shape == (2, 6, 4, 5, 2)
    one = mod(**{n: t[:, :, 1, 2] for n, t in inputs.items()})
    torch.testing.assert_close(out[:, :, 1, 2], one)


def test_low_precision_inputs_accumulate_in_float32():
    mod = recdsl.compile(EMA, d=8, decay=0.999)
    x = torch.randn(1, 512, 8).to(torch.bfloat16)
    out, state = mod(x, return_state=True)
    assert out.dtype == torch.bfloat16
    assert state["h"].dtype == torch.float32
    exact = mod(x.double())
    # Rounding once at the end (bf16 has 8 bits of mantissa), not at every step.
    assert (out.double() - exact).abs().max() <= 2 ** -8 * exact.abs().max() + 1e-6


def test_float64_inputs_compute_in_float64():
    mod = recdsl.compile(EMA, d=2)
    out = mod(torch.randn(1, 3, 2, dtype=torch.float64))
    assert out.dtype == torch.float64


def test_gradients_reach_inputs_params_and_initial_state():
    mod = recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    out = mod(x, state={"h": h0})
    out.square().sum().backward()
    assert x.grad is not None and h0.grad is not None and mod.W_z.grad is not None
    assert torch.autograd.gradcheck(lambda x, h0: mod(x, state={"h": h0}), (x.detach().requires_grad_(), h0.detach().requires_grad_()))


def test_learnable_initial_state_gets_gradients():
    mod = recdsl.compile(EXAMPLES / "crf.rec", n=3)
    _, logz = mod(torch.randn(2, 4, 3))
    logz[:, -1].sum().backward()
    assert mod.start.grad is not None and mod.start.grad.abs().sum() > 0


def test_initial_state_method():
    mod = recdsl.compile(EXAMPLES / "mlstm.rec", dk=3, dv=2)
    state = mod.initial_state(2, 4)
    assert state["C"].shape == (2, 4, 3, 2) and torch.all(state["m"] == float("-inf"))


def test_param_names_may_not_shadow_module_attributes():
    with pytest.raises(recdsl.DeclarationError, match="clashes with an attribute"):
        recdsl.compile("cell C(d) {\n input x: [d]\n param eval: [d] = ones\n out x * eval\n}\n", d=2)


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(recdsl.BackendError, match="unknown backend 'fast'"):
        recdsl.compile(EMA, backend="fast", d=2)


def test_compile_reads_a_path_given_as_string():
    mod = recdsl.compile(str(EXAMPLES / "retnet.rec"), dk=64, dv=64)
    assert mod.cell.name == "RetNet" and mod.backend == "chunked"


def test_several_cells_need_a_choice():
    source = EMA + EMA.replace("Ema", "Other")
    assert recdsl.compile(source, cell="Other", d=2).cell.name == "Other"


def test_output_reading_only_params_is_broadcast_over_batch_and_time():
    mod = recdsl.compile("cell C(d) {\n input x: [d]\n param w: [d] = ones\n out x\n out 2 * w\n}\n", d=3)
    _, constant = mod(torch.randn(2, 4, 3))
    assert constant.shape == (2, 4, 3)
    torch.testing.assert_close(constant, torch.full((2, 4, 3), 2.0))


# ---- the checker's shape rules agree with numpy ---------------------------------------

shapes = st.lists(st.sampled_from([1, 2, 3]), min_size=0, max_size=3).map(tuple)


@settings(max_examples=200, deadline=None)
@given(shapes, shapes)
def test_broadcast_rule_matches_numpy(a, b):
    try:
        expected = np.broadcast_shapes(a, b)
    except ValueError:
        expected = None
    assert broadcast_shapes(a, b) == expected


@settings(max_examples=200, deadline=None)
@given(shapes, shapes)
def test_matmul_rule_matches_numpy(a, b):
    try:
        expected = np.matmul(np.zeros(a), np.zeros(b)).shape
    except ValueError:
        expected = None
    got = matmul_shape(a, b)
    assert (None if isinstance(got, str) else got) == expected


@settings(max_examples=60, deadline=None)
@given(shapes, shapes)
def test_matmul_with_leading_dims_matches_numpy(a, b):
    if isinstance(matmul_shape(a, b), str):
        return
    source = f"cell C() {{\n input x: [{', '.join(map(str, a))}]\n input y: [{', '.join(map(str, b))}]\n out x @ y\n}}\n"
    mod = recdsl.compile(source).double()
    x = torch.randn(2, 3, *a, dtype=torch.float64)
    y = torch.randn(2, 3, *b, dtype=torch.float64)
    out = mod(x, y)
    expected = np.stack([np.stack([np.matmul(x[i, t].numpy(), y[i, t].numpy()) for t in range(3)]) for i in range(2)])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-12, atol=1e-12)
