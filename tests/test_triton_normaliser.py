"""A chunked state's normalised read-out in the Triton kernels (mLSTM's ``h``).

``(q @ C) / max(|q @ n|, floor)`` with ``n`` the matrix state's column of ones
(:class:`recdsl.plan.Normaliser`): the plan that finds it (and where it must not), the
kernels against a torch loop (read-outs, final values, every gradient, both sides of the
maximum), whole cells against the sequential reference (mLSTM; a normalised linear
attention with unscaled values and a literal floor), and the fallbacks (infinite queries,
non-finite keys) that scan both states.  Run in Triton's interpreter.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl import ir
from recdsl.plan import Form
from recdsl.testing import Example, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
MLSTM = dict(dk=20, dv=12)

# A normalised linear attention: values not scaled, the floor a literal, the gate a sigmoid.
NORMALISED_ATTENTION = """
cell NormalisedAttention(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input a: []
    state S: [dk, dv] = 0
    state z: [dk] = 0
    f = sigmoid(a)
    S = f * S + outer(k, v)
    z = f * z + k
    out (q @ S) / max(1.0, abs(q @ z))
}
"""


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _chunk_step(module):
    (step,) = [step for step in module.plan.steps if step.chunk is not None]
    return step


def test_mlstm_plan_carries_its_normaliser_and_folds_the_key_scale():
    """mLSTM on Triton: C's read-out is the division, n has no kernel of its own (Form.NORMALISER),
    and k / sqrt(dk) became the values' scale (k read in place)."""
    module = recdsl.compile(EXAMPLES / "mlstm.rec", backend="triton", **MLSTM)
    chunk = _chunk_step(module).chunk
    assert chunk.normaliser is not None and chunk.normaliser.state == "n"
    assert isinstance(chunk.readouts[0], ir.Op) and chunk.readouts[0].op == "div"
    assert module.plan.step("n").form is Form.NORMALISER and module.plan.step("n").fallback is Form.LINEAR_SCAN
    (term,) = chunk.inputs
    assert term.row == ir.Ref(ir.RefKind.INPUT, "k", term.row.type)
    assert isinstance(term.coefficient, ir.Op) and term.coefficient.op == "div"
    text = module.plan.format()
    assert "n: the normaliser of a chunked state's read-out" in text and "with C, by C's chunked kernels" in text
    assert "divided by max(|q @ n|, exp(-m)) in the kernels" in text
    assert "def forward_n" not in module.plan.kernel_source  # no scan kernel generated for n
    # The scan and chunked backends keep their own forms (the normaliser is the Triton kernels').
    chunked = recdsl.compile(EXAMPLES / "mlstm.rec", backend="chunked", **MLSTM)
    assert _chunk_step(chunked).chunk.normaliser is None and chunked.plan.step("n").form is Form.LINEAR_SCAN


@pytest.mark.parametrize(
    "change, reason",
    [
        ("out q @ n", "another output reads n"),
        ("n = f_gate * n + ks", "n's input is not C's term with ones for values"),
        ("n = f_gate * f_gate * n + i_gate * ks", "n decays otherwise"),
    ],
)
def test_normaliser_is_not_carried_when_it_is_not_the_states_column_of_ones(change, reason):
    """The plan scans n itself (a generated kernel) unless n is exactly C's column of ones, read
    only by the division."""
    source = (EXAMPLES / "mlstm.rec").read_text()
    if change.startswith("out"):
        source = source.replace("    out (q @ C)", f"    {change}\n    out (q @ C)")
    else:
        source = source.replace("    n = f_gate * n + i_gate * ks", f"    {change}")
    module = recdsl.compile(source, backend="triton", **MLSTM)
    assert _chunk_step(module).chunk.normaliser is None, reason
    assert module.plan.step("n").form is Form.TRITON_SCAN, reason


def _normalisers(k, c, log_decay, n_initial):
    """The normaliser n_t = exp(log_decay_t) n_(t-1) + c_t k_t after every step, [N, T, K]."""
    n, values = n_initial, []
    for t in range(k.shape[1]):
        n = log_decay[:, t].exp()[:, None] * n + c[:, t, None] * k[:, t]
        values.append(n)
    return torch.stack(values, 1)


def _loop(q, k, v, c, log_decay, initial, n_initial, floor):
    """The normalised read-out step by step: [N, T, V] read-outs, final S and n."""
    S, numerators = initial, []
    for t in range(q.shape[1]):
        S = log_decay[:, t].exp()[:, None, None] * S + c[:, t, None, None] * k[:, t, :, None] * v[:, t, None, :]
        numerators.append(torch.einsum("nk,nkv->nv", q[:, t], S))
    n = _normalisers(k, c, log_decay, n_initial)
    divisors = torch.maximum((q * n).sum(-1).abs(), floor)
    return torch.stack(numerators, 1) / divisors[..., None], S, n[:, -1]


def _problem(steps: int) -> tuple[tuple[torch.Tensor, ...], torch.Generator]:
    """q, k, v, the values' scale, log decays, the initial state and normaliser and the floor
    (float64, gradients wanted) of 3 rows of 20 keys and 12 values, and the generator that drew
    them.  The floors are about the denominators' size: some steps take the floor, some |q . n|."""
    generator = torch.Generator().manual_seed(steps)
    N, K, V = 3, 20, 12

    def rand(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    q, k, v = rand(N, steps, K), rand(N, steps, K), rand(N, steps, V)
    c = (0.5 * torch.rand(N, steps, generator=generator, dtype=torch.float64) + 0.1).requires_grad_()
    log_decay = (-0.3 * torch.rand(N, steps, generator=generator, dtype=torch.float64)).requires_grad_()
    initial, n_initial = rand(N, K, V), rand(N, K)
    floor = (3.0 * torch.rand(N, steps, generator=generator, dtype=torch.float64)).requires_grad_()
    return (q, k, v, c, log_decay, initial, n_initial, floor), generator


@pytest.mark.parametrize("steps", [1, 45, 130])
def test_normalised_kernels_match_a_loop_with_every_gradient(steps):
    """Forward and backward kernels against autograd of a float64 loop: the read-outs, the final
    state and normaliser, and the gradients of q, k, v, the values' scale, the log decays, both
    initial values and the floor (some steps floor-bound, some not: see the next test), with
    gradients given for the final state and the final normaliser too.  20 keys (two key blocks
    of 16, one ragged), 12 values, chunks of 64 walked in blocks of 32 (the last ragged)."""
    from recdsl.backends import chunk_kernels, triton_chunk

    leaves, generator = _problem(steps)
    q, k, v, c, log_decay, initial, n_initial, floor = leaves
    expected, expected_final, expected_n = _loop(*leaves)
    ran = triton_chunk.decayed_outer_products(
        [q], [chunk_kernels.RankOneInput(k, v)], log_decay[..., None, None], initial, 64,
        value_scales=[c], normalisation=triton_chunk.Normalisation(n_initial, floor),
    )
    assert ran is not None
    (got,), (final, n_final) = ran
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"read-outs: {m}")
    torch.testing.assert_close(final, expected_final, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(n_final, expected_n, rtol=1e-9, atol=1e-9)

    weights = [torch.randn(x.shape, generator=generator, dtype=torch.float64) for x in (expected, expected_final, expected_n)]
    loss = lambda out, S, n: sum((w * x).sum() for w, x in zip(weights, (out, S, n)))  # noqa: E731
    expected_grads = torch.autograd.grad(loss(expected, expected_final, expected_n), leaves)
    got_grads = torch.autograd.grad(loss(got, final, n_final), leaves)
    names = ["q", "k", "v", "value scale", "log decay", "initial state", "initial normaliser", "floor"]
    for name, want, have in zip(names, expected_grads, got_grads):
        torch.testing.assert_close(have, want, rtol=1e-8, atol=1e-8, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("steps", [45, 130])
def test_both_sides_of_the_maximum_are_taken(steps):
    """The test above is only as good as its floors: with them, some steps divide by the floor
    and some by |q . n|, so both branches of the maximum's gradient ran."""
    (q, k, _, c, log_decay, _, n_initial, floor), _ = _problem(steps)
    with torch.no_grad():
        bound = (q * _normalisers(k, c, log_decay, n_initial)).sum(-1).abs() < floor
    assert bound.any() and not bound.all()


@pytest.mark.parametrize("name", ["mlstm", "attention"])
@pytest.mark.parametrize("length, heads, with_state", [(1, (), True), (70, (2,), True), (130, (), False)], ids=["T=1", "T=70, heads, state", "T=130"])
def test_cells_with_a_normalised_read_out_match_sequential(name, length, heads, with_state):
    """mLSTM (scaled values, floor exp(-m)) and a normalised linear attention (unscaled values,
    floor 1) on the Triton backend against the sequential loop in float64: outputs, final states
    (n's from the kernels) and every gradient, including n's initial state."""
    source = EXAMPLES / "mlstm.rec" if name == "mlstm" else NORMALISED_ATTENTION
    module = recdsl.compile(source, **MLSTM).double()
    triton_module = recdsl.compile(source, backend="triton", **MLSTM)
    assert _chunk_step(triton_module).chunk.normaliser is not None
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=heads, seed=length, with_state=with_state))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_normalised_walk_without_a_gradient_matches_the_kept_walk():
    """Under no_grad the walk keeps no chunk-start states (two reused slots, walk blocks of the
    chunk); the outputs and final states are those of the walk that keeps them."""
    module = recdsl.compile(EXAMPLES / "mlstm.rec", backend="triton", **MLSTM).double()
    inputs, state = random_inputs(module, Example(batch=2, length=150, heads=(2,), seed=4, with_state=True))
    kept, kept_state = module(*[x.requires_grad_() for x in inputs.values()], state=state, return_state=True)
    with torch.no_grad():
        reused, reused_state = module(*inputs.values(), state=state, return_state=True)
    torch.testing.assert_close(reused, kept.detach(), rtol=1e-12, atol=1e-12)
    for key in kept_state:
        torch.testing.assert_close(reused_state[key], kept_state[key].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("poison", ["infinite query", "nan key"])
def test_calls_the_kernels_refuse_scan_both_states(poison):
    """An infinite query (the walk's denominators cannot reproduce the loop's infinities) or a NaN
    key (a non-finite final state): C and n both take the plan's fallback scan, and the outputs
    and final states are the loop's, NaN and infinity included."""
    module = recdsl.compile(EXAMPLES / "mlstm.rec", backend="sequential", **MLSTM).double()
    triton_module = recdsl.compile(EXAMPLES / "mlstm.rec", backend="triton", **MLSTM).double()
    triton_module.load_state_dict(module.state_dict())
    inputs, state = random_inputs(module, Example(batch=2, length=40, heads=(), seed=9, with_state=True))
    if poison == "infinite query":
        inputs["q"][1, 7, 3] = float("inf")
    else:
        inputs["k"][0, 12, 5] = float("nan")
    expected, expected_state = module(*inputs.values(), state=state, return_state=True)
    got, got_state = triton_module(*inputs.values(), state=state, return_state=True)
    assert torch.equal(torch.isnan(got), torch.isnan(expected)) and torch.equal(torch.isinf(got), torch.isinf(expected))
    finite = torch.isfinite(expected)
    assert not finite.all()
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-9, atol=1e-9)
    for key in expected_state:
        torch.testing.assert_close(got_state[key], expected_state[key], rtol=1e-9, atol=1e-9, equal_nan=True)
