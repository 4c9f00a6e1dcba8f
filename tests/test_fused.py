"""The fused backend (the sequential loop as generated C) against the sequential definition.

Hypothesis draws B, T (1 and odd lengths included), head dims, inputs and whether an
initial state is given; outputs, final states and the gradients with respect to inputs,
params and initial state are compared (float64: recdsl.testing's tolerances; float32:
1e-4 relative to the largest value).  Random cells exercise every elementwise op the form
differentiates, scalar states, ``W @ h``, a matmul of a state-dependent binding and outputs
that are not states.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.backends import fused_sequential, get_backend
from recdsl.backends.fused_program import build_program
from recdsl.testing import Example, available_backends, check_equivalence, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.skipif(fused_sequential.compiler() is None, reason="no C compiler")

# The examples whose step is vectors and scalars (the others have matrix or complex states, or scans).
FUSED = ["mingru", "minlstm", "hgrn", "rglru", "gru", "lstm", "paragru", "paralstm", "slstm", "bigru"]

# Every elementwise op the fused form runs, in cells whose states feed them.
OPS_CELL = """
cell Ops(d_in, d) {
    input x: [d_in]
    input s: []
    param W: [d_in, d] = glorot
    param U: [d, d] = glorot
    param V: [d, d] = glorot
    param b: [d] = normal(0.5)
    param c: [] = normal(0.5)
    state h: [d] = 0
    state m: [] = 0
    a = x @ W
    p = sigmoid(a + h @ U) * tanh(a - U @ h) + silu(h) * c
    q = where(h > 0, softplus(h), logsigmoid(h)) + relu(a - h) - abs(h) * 0.5
    r = max(p, q) - min(p, h + b) + logaddexp(h, a)
    w = exp(-abs(h)) / (1 + h ** 2) + sqrt(1 + h * h) + log(2 + sin(h)) + cos(h) * log1p(abs(q)) + expm1(-abs(p))
    h = tanh((r * w) @ V + h * m + s)
    m = sigmoid(m + s - c) * 0.9 + 0.1 * tanh(m * s)
    out h
    out y = r * sigmoid(m)
    out a + s
}
"""

SCALAR_CELL = """
cell Scalars(d) {
    input x: [d]
    param k: [d] = normal(1.0)
    state n: [] = 1
    state h: [d] = 0
    n = n + sum(x * k) ** 2
    h = h * sigmoid(n - 3) + x / n
    out h
}
"""


def _fused_backends(module) -> tuple[str, ...]:
    return ("fused",) if "fused" in available_backends(module) else ()


@pytest.mark.parametrize("name", sorted(DIMS))
def test_fused_applies_to_cells_of_vectors_and_scalars(name):
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
    reason = get_backend("fused").unsupported(module.analysis)
    assert (reason is None) == (name in FUSED), f"{name}: {reason}"


def test_matmuls_sharing_a_state_become_one_group():
    """GRU's three h @ W_h* are one matmul against [W_hr | W_hz | W_hn], found at compile time."""
    program = build_program(recdsl.compile(EXAMPLES / "gru.rec", d_in=3, d=4).analysis)
    assert len(program.groups) == 1, program.describe()
    (group,) = program.groups
    assert sorted(w.expr.name for w in group.weights) == ["W_hn", "W_hr", "W_hz"] and group.outer == 12
    lstm = build_program(recdsl.compile(EXAMPLES / "lstm.rec", d_in=3, d=4).analysis)
    assert len(lstm.groups) == 1 and lstm.groups[0].outer == 16, lstm.describe()
    # the input projections are computed for all steps before the loop
    assert len(program.varying) == 3 and len(lstm.varying) == 4


def test_unsupported_says_why():
    reason = get_backend("fused").unsupported(recdsl.compile(EXAMPLES / "gla.rec", dk=4, dv=3).analysis)
    assert reason is not None and "shape [4, 3]" in reason
    reason = get_backend("fused").unsupported(recdsl.compile(EXAMPLES / "lru.rec", d=3, n=4).analysis)
    assert reason is not None and "complex" in reason
    with pytest.raises(recdsl.RecDSLError, match="cannot run cell GLA"):
        recdsl.compile(EXAMPLES / "gla.rec", backend="fused", dk=4, dv=3)


@pytest.mark.parametrize("name", FUSED)
def test_property_fused_agrees_with_sequential(name):
    report = check_equivalence(EXAMPLES / f"{name}.rec", dims=DIMS[name], backends=["fused"], max_examples=10, hypothesis_seed=2)
    assert report.ok and report.examples > 0, str(report)


@pytest.mark.parametrize("source", [OPS_CELL, SCALAR_CELL], ids=["ops", "scalar-state"])
def test_property_random_ops_agree_with_sequential(source):
    dims = {"d_in": 3, "d": 4} if "Ops" in source else {"d": 3}
    # The sequential reference of a 76-node step is slow in Python: few, short examples.
    report = check_equivalence(source, dims=dims, backends=["fused"], max_examples=5, max_length=12, hypothesis_seed=3, input_scale=0.7)
    assert report.ok and report.examples > 0, str(report)


def _run_float32(module, inputs, state):
    inputs = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    state = None if state is None else {k: v.detach().clone().requires_grad_(True) for k, v in state.items()}
    module.zero_grad(set_to_none=True)
    outputs, final = module(**inputs, state=state, return_state=True)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    generator = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=generator)).sum() for o in outputs + [final[k] for k in sorted(final)])
    loss.backward()
    named = {f"output {i}": o.detach() for i, o in enumerate(outputs)}
    named.update({f"final state {k}": v.detach() for k, v in final.items()})
    named.update({f"gradient of input {k}": v.grad for k, v in inputs.items()})
    named.update({f"gradient of param {k}": p.grad.clone() for k, p in module.named_parameters()})
    if state is not None:
        named.update({f"gradient of initial state {k}": v.grad for k, v in state.items()})
    return named


_FLOAT32_MODULES: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}


def _float32_pair(name: str, seed: int):
    """A fused and a sequential module sharing params drawn from ``seed`` (compiled once per cell)."""
    if name not in _FLOAT32_MODULES:
        fused = recdsl.compile(EXAMPLES / f"{name}.rec", backend="fused", d_in=5, d=6)
        _FLOAT32_MODULES[name] = (fused, recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", d_in=5, d=6))
    fused, sequential = _FLOAT32_MODULES[name]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in fused.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    sequential.load_state_dict(fused.state_dict())
    return fused, sequential


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(["gru", "lstm"]),
    batch=st.integers(1, 3),
    length=st.sampled_from([1, 2, 7, 33]),
    heads=st.sampled_from([(), (2,)]),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_float32_agrees_with_sequential(name, batch, length, heads, with_state, seed):
    """float32 end to end (the fused form's float exp/tanh are its own): 1e-4 of the largest value."""
    fused, sequential = _float32_pair(name, seed)
    inputs, state = random_inputs(fused, Example(batch, length, heads, seed, with_state), scale=1.0)
    inputs = {k: v.float() for k, v in inputs.items()}
    state = None if state is None else {k: v.float() for k, v in state.items()}
    expected, actual = _run_float32(sequential, inputs, state), _run_float32(fused, inputs, state)
    assert set(expected) == set(actual)
    for quantity, reference in expected.items():
        assert actual[quantity].dtype == torch.float32, quantity
        tolerance = 1e-4 * max(1.0, reference.abs().max().item())
        error = (actual[quantity] - reference).abs().max().item()
        assert error <= tolerance, f"{name} {quantity}: max error {error:.3g} > {tolerance:.3g} (B={batch}, T={length}, heads={heads})"


def test_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(0)
    fused = recdsl.compile(EXAMPLES / "lstm.rec", backend="fused", d_in=5, d=6)
    sequential = recdsl.compile(EXAMPLES / "lstm.rec", backend="sequential", d_in=5, d=6)
    sequential.load_state_dict(fused.state_dict())
    x = torch.randn(2, 40, 5).bfloat16()
    out, final = fused(x, return_state=True)
    expected, expected_final = sequential(x, return_state=True)
    assert out.dtype == torch.bfloat16 and final["c"].dtype == torch.float32
    assert torch.allclose(out.float(), expected.float(), atol=1e-2, rtol=0)
    assert torch.allclose(final["c"], expected_final["c"], atol=1e-5, rtol=1e-4)


def test_gru_and_lstm_match_torch_layers_in_float32():
    """The fused GRU/LSTM against torch.nn.GRU/LSTM with the weights copied in (forward and input gradient)."""
    torch.manual_seed(0)
    for name, layer, gates in [("gru", torch.nn.GRU, "rzn"), ("lstm", torch.nn.LSTM, "ifgo")]:
        module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="fused", d_in=5, d=6)
        reference = layer(5, 6, batch_first=True)
        with torch.no_grad():
            for number, gate in enumerate(gates):
                rows = slice(6 * number, 6 * (number + 1))
                getattr(module, f"W_i{gate}").copy_(reference.weight_ih_l0[rows].t())
                getattr(module, f"W_h{gate}").copy_(reference.weight_hh_l0[rows].t())
                getattr(module, f"b_i{gate}").copy_(reference.bias_ih_l0[rows])
                getattr(module, f"b_h{gate}").copy_(reference.bias_hh_l0[rows])
        x = torch.randn(3, 50, 5, requires_grad=True)
        ours = module(x)
        (grad_ours,) = torch.autograd.grad(ours.sum(), x)
        theirs = reference(x)[0]
        (grad_theirs,) = torch.autograd.grad(theirs.sum(), x)
        assert torch.allclose(ours, theirs, atol=1e-5), f"{name}: outputs differ by {(ours - theirs).abs().max():.3g}"
        assert torch.allclose(grad_ours, grad_theirs, atol=1e-4), f"{name}: input gradients differ by {(grad_ours - grad_theirs).abs().max():.3g}"


def _graph_size(output: torch.Tensor) -> int:
    seen, stack = set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


def test_backward_graph_does_not_grow_with_T():
    """The loop is one autograd node: its backward is the generated adjoint loop, not a graph per step."""
    module = recdsl.compile(EXAMPLES / "lstm.rec", backend="fused", d_in=5, d=6)
    sizes = {length: _graph_size(module(torch.randn(2, length, 5, requires_grad=True))) for length in (2, 50)}
    assert sizes[2] == sizes[50], sizes


def test_compiled_loop_is_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    fused_sequential._KERNELS.clear()
    module = recdsl.compile(EXAMPLES / "mingru.rec", backend="fused", d_in=3, d=4)
    module(torch.randn(1, 3, 3))
    libraries = list((tmp_path / "fused").glob("*.so"))
    assert len(libraries) == 1 and (tmp_path / "fused" / (libraries[0].stem + ".c")).exists()


def test_mingru_uses_fused_in_compare_backends():
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"]).double()
    assert "fused" in available_backends(module)
    inputs, state = random_inputs(module, Example(batch=2, length=9, heads=(2,), seed=4, with_state=True))
    assert not compare_backends(module, ["fused"], inputs, state, seed=4)


def test_second_derivatives_raise_rather_than_return_zeros():
    module = recdsl.compile(EXAMPLES / "gru.rec", backend="fused", d_in=5, d=6)
    x = torch.randn(2, 4, 5, requires_grad=True)
    (gradient,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|not have been used|does not require grad"):
        torch.autograd.grad(gradient.sum(), x)


def test_generated_source_matches_the_golden_file():
    """A change in generated code shows in review.  Regenerate with
    ``python -c "import recdsl; from recdsl.backends.fused_program import build_program;
    from recdsl.backends.fused_codegen import generate; m = recdsl.compile('examples/gru.rec', d_in=4, d=8);
    open('tests/golden/gru_fused.c', 'w').write(generate(build_program(m.analysis), 'float'))"``.
    """
    from pathlib import Path

    from recdsl.backends.fused_codegen import generate

    program = build_program(recdsl.compile(EXAMPLES / "gru.rec", d_in=4, d=8).analysis)
    golden = Path(__file__).resolve().parent / "golden" / "gru_fused.c"
    assert generate(program, "float") == golden.read_text()
