"""The chunked gated delta rule (issue 10.6) and chunked read-outs of the previous state (10.7).

Differential tests against the sequential backend (Hypothesis through
``check_equivalence``: T = 1, lengths around chunk boundaries, initial states, gradients),
the kernels against a plain loop, the numerics of tiny decays, the plan's statements,
and, when flash-linear-attention is installed, its naive forms as an outside oracle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.backends import chunk_kernels
from recdsl.plan import BackendKind, ChunkKind, Form, plan
from recdsl.testing import check_equivalence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_dims import DIMS, EXAMPLES  # noqa: E402

# Gated DeltaNet in the paper's (and flash-linear-attention's) layout: S is [dv, dk], the
# rank-one map multiplies from the right and the read-out is S @ q.
GATED_DELTA_TRANSPOSED = """
cell GatedDeltaT(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input g: []
    input b: []
    state S: [dv, dk] = 0
    alpha = exp(logsigmoid(g))
    beta = sigmoid(b)
    S = alpha * (S - beta * outer(S @ k, k)) + beta * outer(v, k)
    out S @ q
}
"""

# Both read-outs at once: the state before and after the update, of a gated delta rule.
BEFORE_AND_AFTER = """
cell BeforeAfter(dk, dv) {
    input q: [dk]
    input p: [dk]
    input k: [dk]
    input v: [dv]
    input g: []
    input b: []
    state S: [dk, dv] = 0
    out p @ S
    S = sigmoid(g) * (S - sigmoid(b) * outer(k, k @ S)) + outer(k, v)
    out q @ S
}
"""


def _chunked_step(source, **dims):
    module = recdsl.compile(source, backend="chunked", **dims)
    (step,) = [s for s in module.plan.steps if s.chunk is not None]
    return module, step


@pytest.mark.parametrize(
    "source, dims, kind, previous",
    [
        (EXAMPLES / "gated_deltanet.rec", DIMS["gated_deltanet"], ChunkKind.GATED_DELTA_RULE, ()),
        (EXAMPLES / "ttt_linear.rec", DIMS["ttt_linear"], ChunkKind.GATED_DELTA_RULE, ()),
        (GATED_DELTA_TRANSPOSED, {"dk": 4, "dv": 3}, ChunkKind.GATED_DELTA_RULE, ()),
        (BEFORE_AND_AFTER, {"dk": 4, "dv": 3}, ChunkKind.GATED_DELTA_RULE, (True, False)),
        (EXAMPLES / "rwkv6.rec", DIMS["rwkv6"], ChunkKind.DECAYED_OUTER_PRODUCTS, (True,)),
    ],
    ids=["gated-deltanet", "ttt-right", "gated-delta-transposed", "before-and-after", "rwkv6"],
)
def test_chunked_forms_agree_with_sequential(source, dims, kind, previous):
    """Hypothesis: outputs, final states and gradients, T = 1 and lengths around the chunk size."""
    _, step = _chunked_step(source, **dims)
    assert step.form is Form.CHUNKED and step.chunk.kind is kind and step.chunk.previous == previous
    report = check_equivalence(source, dims=dims, backends=["chunked"], max_examples=10, chunk_size=4, hypothesis_seed=3)
    assert report.ok, str(report)


def test_auto_chunks_gated_deltanet_at_model_sizes():
    module = recdsl.compile(EXAMPLES / "gated_deltanet.rec", dk=64, dv=64)
    assert module.plan.backend is BackendKind.CHUNKED and module.plan.step("S").chunk.kind is ChunkKind.GATED_DELTA_RULE
    assert "S (gated delta rule)" in module.plan.reason


def test_a_map_on_the_read_out_side_says_why_it_is_not_chunked():
    source = GATED_DELTA_TRANSPOSED.replace("out S @ q", "out q @ S").replace("input q: [dk]", "input q: [dv]")
    module = recdsl.compile(source, backend="chunked", dk=4, dv=3)
    step = module.plan.step("S")
    assert step.form is Form.LOW_RANK_MATRIX_SCAN
    reason = "its rank-one map multiplies from the right but it is read out as q @ S"
    assert any(reason in r.reason for r in step.rejected)
    # The request for 'chunked' names the state and the reason in the plan (no silent scan).
    assert module.plan.not_chunked() == (("S", next(r.reason for r in step.rejected if reason in r.reason)),)
    assert "nothing in this cell is chunked, so it runs as backend 'scan' would (not chunked: S: " + reason in module.plan.reason
    assert reason in recdsl.explain(source, plan=True, backend="chunked", dk=4, dv=3)


def test_the_chunked_backend_names_what_it_scans_instead():
    mlstm = recdsl.compile(EXAMPLES / "mlstm.rec", backend="chunked", **DIMS["mlstm"]).plan
    assert mlstm.step("C").form is Form.CHUNKED
    assert [name for name, _ in mlstm.not_chunked()] == ["m", "n"] or [name for name, _ in mlstm.not_chunked()] == ["n", "m"]
    assert "; not chunked, scanned instead: " in mlstm.reason and "not a matrix state" in mlstm.reason
    mingru = recdsl.compile(EXAMPLES / "mingru.rec", backend="chunked", **DIMS["mingru"]).plan
    assert "nothing in this cell is chunked" in mingru.reason and "h: not a matrix state" in mingru.reason
    gla = recdsl.compile(EXAMPLES / "gla.rec", backend="chunked", **DIMS["gla"]).plan
    assert gla.reason == "backend 'chunked' was requested" and gla.not_chunked() == ()


def test_triton_does_not_take_read_outs_of_the_previous_state():
    pytest.importorskip("triton")
    module = recdsl.compile(EXAMPLES / "rwkv6.rec", backend="triton", **DIMS["rwkv6"])
    step = module.plan.step("S")
    assert step.form is Form.TRITON_SCAN
    assert any("reads its previous value" in r.reason for r in step.rejected)


# ---- the kernels against a plain loop ------------------------------------------------------


def _loop(queries, exclusive, step, initial, length):
    """Read-outs of S_t (or S_{t-1}) and the final state, where ``step(t, S)`` is S_t."""
    state, outputs = initial, [[] for _ in queries]
    for t in range(length):
        previous, state = state, step(t, state)
        for i, (q, before) in enumerate(zip(queries, exclusive)):
            outputs[i].append(torch.einsum("nk,nkv->nv", q[:, t], previous if before else state))
    return [torch.stack(o, 1) for o in outputs], state


@pytest.mark.parametrize("length", [1, 5, 16, 37])
@pytest.mark.parametrize("decays", ["none", "uniform", "zero", "tiny"])
def test_delta_rule_kernel_matches_the_loop(length, decays):
    torch.manual_seed(length)
    N, K, V, dtype = 3, 5, 4, torch.float64
    q, p = torch.randn(N, length, K, dtype=dtype), torch.randn(N, length, K, dtype=dtype)
    left = F.normalize(torch.randn(N, length, K, dtype=dtype), dim=-1)
    right = torch.randn(N, length, K, dtype=dtype)
    coefficient = -torch.rand(N, length, dtype=dtype)
    w = torch.randn(N, length, V, dtype=dtype)
    initial = torch.randn(N, K, V, dtype=dtype)
    log_decay = {
        "none": None,
        "uniform": torch.rand(N, length, dtype=dtype).log(),
        "zero": torch.where(torch.rand(N, length) < 0.3, float("-inf"), -0.1).to(dtype),  # some decays exactly 0
        "tiny": torch.full((N, length), -57.5, dtype=dtype),  # about 1e-25 per step
    }[decays]

    def step(t, S):
        decay = 1.0 if log_decay is None else log_decay[:, t].exp()[:, None, None]
        u = coefficient[:, t, None] * torch.einsum("nk,nkv->nv", right[:, t], S) + w[:, t]
        return decay * S + left[:, t, :, None] * u[:, None, :]

    expected, final = _loop([q, p], (False, True), step, initial, length)
    for chunk in (1, 4, 16):
        got, got_final = chunk_kernels.delta_rule([q, p], left, right, coefficient, [w], initial, chunk, log_decay=log_decay, exclusive=(False, True))
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_final, final, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", ["rows", "columns"])
def test_exclusive_decayed_outer_products_with_tiny_and_mixed_decays(shape):
    torch.manual_seed(1)
    N, T, K, V, dtype = 2, 45, 4, 3, torch.float64
    q, k, v = (torch.randn(N, T, n, dtype=dtype) for n in (K, K, V))
    initial = torch.randn(N, K, V, dtype=dtype)
    size = (N, T, K, 1) if shape == "rows" else (N, T, 1, V)
    # Decays of about 1e-25 mixed with decays near 1: the factorised form is unsafe for some dims.
    log_decay = torch.where(torch.rand(size) < 0.5, -57.5, -0.01).to(dtype)

    def step(t, S):
        return log_decay[:, t].exp() * S + k[:, t, :, None] * v[:, t, None, :]

    expected, final = _loop([q, q], (True, False), step, initial, T)
    for chunk in (16, 64):  # 64: most dims decay past e^-60, so the kernel re-chunks by 16
        got, got_final = chunk_kernels.decayed_outer_products([q, q], [chunk_kernels.RankOneInput(k, v)], log_decay, initial, chunk, exclusive=(True, False))
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_final, final, rtol=1e-10, atol=1e-12)


# ---- numerics ------------------------------------------------------------------------------


def _rwkv_inputs(batch, length, dk, dv, log_w, dtype):
    torch.manual_seed(0)
    # w = exp(-exp(d)) = exp(log_w): d = log(-log_w)
    d = torch.full((batch, length, dk), float(torch.tensor(-log_w).log()), dtype=dtype)
    d[..., ::2] = -3.0  # half the key dims keep memory (w ~ 0.95): decays of both kinds in one chunk
    return dict(r=torch.randn(batch, length, dk, dtype=dtype), k=torch.randn(batch, length, dk, dtype=dtype), v=torch.randn(batch, length, dv, dtype=dtype), d=d)


def test_rwkv6_with_decays_near_1e_minus_25_is_exact_in_float64_and_finite_in_float32():
    dims = {"dk": 8, "dv": 4}
    inputs = _rwkv_inputs(2, 200, 8, 4, -57.5, torch.float64)
    sequential = recdsl.compile(EXAMPLES / "rwkv6.rec", backend="sequential", **dims).double()
    chunked = recdsl.compile(EXAMPLES / "rwkv6.rec", backend="chunked", **dims).double()
    chunked.load_state_dict(sequential.state_dict())
    expected = sequential(**inputs)
    torch.testing.assert_close(chunked(**inputs), expected, rtol=1e-10, atol=1e-10)
    single = {n: x.float().requires_grad_() for n, x in inputs.items()}
    out = chunked.float()(**single)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in single.values())
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_gated_delta_rule_in_float32_with_decays_near_zero_has_no_nan():
    module = recdsl.compile(EXAMPLES / "gated_deltanet.rec", backend="chunked", dk=8, dv=8)
    reference = recdsl.compile(EXAMPLES / "gated_deltanet.rec", backend="sequential", dk=8, dv=8).double()
    torch.manual_seed(0)
    B, T = 2, 150
    inputs = dict(q=torch.randn(B, T, 8), k=F.normalize(torch.randn(B, T, 8), dim=-1), v=torch.randn(B, T, 8), a=torch.randn(B, T) * 30, b=torch.randn(B, T))
    leaves = {n: x.requires_grad_() for n, x in inputs.items()}
    out = module(**leaves)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in leaves.values())
    torch.testing.assert_close(out.double(), reference(**{n: x.detach().double() for n, x in inputs.items()}), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_gated_delta_rule_at_t_65536_matches_the_scan():
    dims = {"dk": 4, "dv": 4}
    chunked = recdsl.compile(EXAMPLES / "gated_deltanet.rec", backend="chunked", **dims).double()
    scan = recdsl.compile(EXAMPLES / "gated_deltanet.rec", backend="scan", **dims).double()
    torch.manual_seed(0)
    B, T = 1, 65536
    inputs = dict(q=torch.randn(B, T, 4), k=F.normalize(torch.randn(B, T, 4), dim=-1), v=torch.randn(B, T, 4), a=torch.randn(B, T) * 4 - 6, b=torch.randn(B, T))
    inputs = {n: x.double() for n, x in inputs.items()}
    got = chunked(**inputs)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, scan(**inputs), rtol=1e-8, atol=1e-8)


# ---- flash-linear-attention's naive forms as an outside oracle (optional) -----------------


def _fla_naive(relative: str):
    """A naive-form file of flash-linear-attention, loaded on its own: importing the ``fla``
    package loads its Triton kernels, which fail under the Triton interpreter the tests use."""
    import importlib.util

    spec = importlib.util.find_spec("fla")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("flash-linear-attention is not installed (an optional test oracle)")
    if "naive" in relative and importlib.util.find_spec("einops") is None:
        pytest.skip("einops is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    module_spec = importlib.util.spec_from_file_location(f"fla_naive_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_gated_deltanet_agrees_with_fla_naive_forms():
    naive = _fla_naive("ops/gated_delta_rule/naive.py")
    dk, dv, H, B, T = 8, 6, 2, 2, 70
    module = recdsl.compile(EXAMPLES / "gated_deltanet.rec", dk=dk, dv=dv)
    assert module.plan.step("S").chunk is not None
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, H, dk), F.normalize(torch.randn(B, T, H, dk), dim=-1), torch.randn(B, T, H, dv)
    a, b = torch.randn(B, T, H), torch.randn(B, T, H)
    g = -module.A_log.exp() * F.softplus(a + module.dt_bias)
    with torch.no_grad():
        ours = module(q=q * dk**-0.5, k=k, v=v, a=a, b=b)
        chunk = naive.naive_chunk_gated_delta_rule(q, k, v, g, torch.sigmoid(b), chunk_size=16)[0]
        loop = naive.naive_recurrent_gated_delta_rule(q, k, v, torch.sigmoid(b), g)[0]
    torch.testing.assert_close(ours, chunk, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours, loop, rtol=1e-4, atol=1e-4)


def test_rwkv6_agrees_with_fla_naive_recurrent_form():
    naive = _fla_naive("ops/rwkv6/recurrent_naive.py")
    dk, dv, H, B, T = 8, 6, 2, 2, 70
    module = recdsl.compile(EXAMPLES / "rwkv6.rec", dk=dk, dv=dv)
    with torch.no_grad():
        module.u.copy_(torch.randn(dk))
    torch.manual_seed(0)
    r, k, v, d = torch.randn(B, T, H, dk), torch.randn(B, T, H, dk), torch.randn(B, T, H, dv), torch.randn(B, T, H, dk)
    to_heads = lambda x: x.transpose(1, 2)  # noqa: E731  fla's naive RWKV-6 takes [B, H, T, K]
    with torch.no_grad():
        ours = module(r=r * dk**-0.5, k=k, v=v, d=d)
        theirs = naive.naive_recurrent_rwkv6(to_heads(r), to_heads(k), to_heads(v), to_heads(-d.exp()), module.u.expand(H, dk))[0]
    torch.testing.assert_close(ours, to_heads(theirs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, query", [("rwkv6", "r"), ("gated_deltanet", "q")])
def test_an_infinite_query_gives_the_loops_infinities(name, query):
    """``with_infinite_readouts`` passes each direction read-out its read-out's exclusive flag."""
    torch.manual_seed(0)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name]).double()
    chunked = recdsl.compile(EXAMPLES / f"{name}.rec", backend="chunked", chunk_size=4, **DIMS[name]).double()
    chunked.load_state_dict(sequential.state_dict())
    inputs = {i.name: 0.5 * torch.randn(2, 11, *i.type.shape, dtype=torch.float64) for i in sequential.cell.inputs}
    inputs[query][0, 5, 1] = float("inf")
    expected, got = sequential(**inputs), chunked(**inputs)
    assert torch.equal(torch.isinf(expected), torch.isinf(got)) and torch.equal(torch.isnan(expected), torch.isnan(got))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-12)
