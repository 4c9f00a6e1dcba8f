"""The chunked Triton kernels of the delta rule and gated delta rule (DeltaNet, Gated DeltaNet,
TTT-linear) in Triton's interpreter: the kernels against the torch chunked form (float64 to
1e-10: several key and value blocks, ragged chunks, T = 1, initial states, a left vector other
than the right), float32 against float64, Hypothesis over the sizes; the compiled cells
against the sequential reference with every gradient, heads and initial states; the plan's
statements; the matmul precision each launch asks for; and flash-linear-attention's naive
chunked gated delta rule as an outside oracle when it is installed."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import recdsl
from recdsl.plan import Form
from recdsl.testing import Example, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_dims import EXAMPLES  # noqa: E402
from test_delta_chunked import GATED_DELTA_TRANSPOSED  # noqa: E402  (S [dv, dk] read out as S @ q: the kernels see S^T)


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _problem(keys: int, values: int, steps: int, gated: bool, dtype=torch.float64, seed: int = 11, rows: int = 2, same_sides: bool = False):
    """A delta rule ``S_t = d_t S_{t-1} + a_t l_t (r_t^T S_{t-1}) + l_t w_t^T`` with unit-norm
    keys, ``a`` in (-2, 0) (transitions with eigenvalues in (-1, 1]) and decays in (e^-2, 1)."""
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    left = F.normalize(draw(rows, steps, keys), dim=-1)
    right = left if same_sides else F.normalize(draw(rows, steps, keys), dim=-1)
    coefficient = -2 * torch.rand(rows, steps, generator=generator, dtype=dtype)
    w = draw(rows, steps, values)
    q = draw(rows, steps, keys)
    log_decay = -2 * torch.rand(rows, steps, generator=generator, dtype=dtype) if gated else None
    initial = draw(rows, keys, values)
    return q, left, right, coefficient, w, initial, log_decay


def _both(problem, chunk: int = 64):
    from recdsl.backends import chunk_kernels, triton_delta

    q, left, right, coefficient, w, initial, log_decay = problem
    (out,), final = triton_delta.forward([q], left, right, coefficient, [w], initial, chunk, log_decay)
    (expected,), expected_final = chunk_kernels.delta_rule([q], left, right, coefficient, [w], initial, chunk, log_decay=log_decay)
    return out, final, expected, expected_final


@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
@pytest.mark.parametrize("keys, values, steps, chunk", [(36, 40, 40, 32), (128, 20, 1, 64), (5, 3, 33, 64)], ids=["several blocks, ragged", "dk=128, T=1", "small, one ragged chunk"])
def test_kernels_match_the_torch_chunked_form(gated, keys, values, steps, chunk):
    """dk = 36, dv = 40: three key blocks of 16, the last ragged, and two value blocks of 32,
    the second ragged; 40 steps: two chunks of 32, the second ragged; a left vector other
    than the right."""
    out, final, expected, expected_final = _both(_problem(keys, values, steps, gated), chunk)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg="read-outs q_t @ S_t")
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10, msg="final state S_T")


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
def test_float32_kernels_agree_with_float64(gated):
    problem = _problem(32, 16, 70, gated, dtype=torch.float64, same_sides=True)
    *_, expected, expected_final = _both(problem, 32)
    single = tuple(None if t is None else t.float() for t in problem)
    out, final, *_ = _both(single, 32)
    assert out.dtype == final.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg="float32 read-outs against float64")
    torch.testing.assert_close(final.double(), expected_final, rtol=1e-4, atol=1e-4, msg="float32 final state against float64")


def test_half_precision_keys_and_queries_accumulate_in_float32():
    """Keys and queries in float16 enter the kernels' products as they are; the result is the
    float64 form of the same (rounded) values to float32 accuracy.  (bfloat16 takes the same
    path; Triton's interpreter multiplies bfloat16 tiles as their raw bits, so it is checked
    by compiling, tests/test_triton_compile.py.)"""
    from recdsl.backends import chunk_kernels, triton_delta

    q, left, right, coefficient, w, initial, log_decay = _problem(32, 16, 40, True, dtype=torch.float64, same_sides=True)
    low = [t.to(torch.float16) for t in (q, left)]
    (out,), final = triton_delta.forward([low[0]], low[1], low[1], coefficient.float(), [w.float()], initial.float(), 32, log_decay.float())
    rounded = [t.double() for t in low]
    (expected,), expected_final = chunk_kernels.delta_rule([rounded[0]], rounded[1], rounded[1], coefficient, [w], initial, 64, log_decay=log_decay)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4, msg="read-outs")
    torch.testing.assert_close(final.double(), expected_final, rtol=1e-4, atol=1e-4, msg="final state")


@pytest.mark.slow
def test_hypothesis_over_sizes_and_chunks():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=5, deadline=None, derandomize=True)
    @hypothesis.given(
        keys=st.integers(1, 36), values=st.integers(1, 36), steps=st.integers(1, 50),
        gated=st.booleans(), chunk=st.sampled_from([16, 32, 64]), seed=st.integers(0, 1000),
    )
    def agree(keys, values, steps, gated, chunk, seed):
        out, final, expected, expected_final = _both(_problem(keys, values, steps, gated, seed=seed, rows=1), chunk)
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg=f"read-outs, dk={keys} dv={values} T={steps} chunk={chunk}")
        torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10, msg=f"final state, dk={keys} dv={values} T={steps} chunk={chunk}")

    agree()




def _cell(name: str, backend: str | None = None, **dims):
    source = GATED_DELTA_TRANSPOSED if name == "transposed" else EXAMPLES / f"{name}.rec"
    return recdsl.compile(source, **({"backend": backend} if backend else {}), **dims)


# DeltaNet and TTT-linear also run by default in tests/test_triton.py (T = 1 and 37, one chunk).
@pytest.mark.parametrize("name", [
    pytest.param("deltanet", marks=pytest.mark.slow), "gated_deltanet", pytest.param("ttt_linear", marks=pytest.mark.slow), "transposed",
])
def test_cells_match_sequential_across_chunks_with_gradients(name):
    """40 steps in chunks of 16 (three chunks, the last ragged), two heads, an initial state:
    outputs, final states and the gradients of inputs, params and the initial state."""
    dims = dict(dk=20, dv=12)
    planned = _cell(name, "triton", **dims).plan
    assert [s.form for s in planned.steps if s.chunk is not None] == [Form.TRITON_CHUNKED]
    torch.manual_seed(0)
    module = _cell(name, **dims).double()
    inputs, state = random_inputs(module, Example(batch=2, length=40, heads=(2,), seed=3, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3, chunk_size=16)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_float32_cell_against_sequential():
    torch.manual_seed(0)
    module = _cell("gated_deltanet", dk=16, dv=8)
    inputs, _ = random_inputs(module, Example(batch=1, length=90, heads=(), seed=5, with_state=False))
    inputs = {n: v.float() for n, v in inputs.items()}
    mismatches = compare_backends(module.double(), ["triton"], inputs, None, rtol=1e-5, atol=1e-6)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_plan_names_the_kernels_and_refuses_what_they_do_not_take():
    from recdsl.backends import triton_backend

    source = triton_backend.emit(_cell("gated_deltanet", "triton", dk=8, dv=8).plan)
    assert "triton_delta.py (delta_chunks: the gated delta rule's UT transform inside the walk over the chunks)" in source
    with pytest.raises(recdsl.BackendError, match="129 key rows; the Triton delta-rule kernels hold at most 128"):
        _cell("deltanet", "triton", dk=129, dv=4)
    before_and_after = """
    cell BeforeAfter(dk, dv) {
        input q: [dk]
        input p: [dk]
        input k: [dk]
        input v: [dv]
        input b: []
        state S: [dk, dv] = 0
        out p @ S
        S = S - sigmoid(b) * outer(k, k @ S) + outer(k, v)
        out q @ S
    }
    """
    with pytest.raises(recdsl.BackendError, match="reads its previous value, which the Triton delta-rule kernels do not read out"):
        recdsl.compile(before_and_after, backend="triton", dk=4, dv=4)


@pytest.mark.parametrize("dtype, allow_tf32, precision", [
    (torch.float32, False, "ieee"),
    (torch.float32, True, "tf32"),
    (torch.float64, True, "ieee"),
])
def test_matmuls_are_exact_unless_tf32_is_asked_for(dtype, allow_tf32, precision):
    from recdsl.backends import triton_delta
    from recdsl.backends.triton_aot import record_launches

    q, left, right, coefficient, w, initial, log_decay = _problem(16, 16, 16, True, dtype=dtype)
    launches = record_launches(lambda: triton_delta.forward([q], left, right, coefficient, [w], initial, 64, log_decay, allow_tf32=allow_tf32))
    assert [launch.name for launch in launches] == ["delta_chunks"]  # the UT transform inside the walk over the chunks
    assert {launch.meta["PRECISION"] for launch in launches} == {precision}
    assert all({"num_warps", "num_stages"} <= set(launch.meta) for launch in launches)


def test_allow_tf32_reaches_the_delta_kernels():
    from recdsl.backends.triton_aot import record_launches

    module = recdsl.compile(EXAMPLES / "deltanet.rec", backend="triton", allow_tf32=True, dk=16, dv=16)
    inputs = [torch.randn(1, 20, *i.type.shape) for i in module.cell.inputs]
    launches = record_launches(lambda: module(*inputs))
    assert {launch.meta["PRECISION"] for launch in launches if launch.name.startswith("delta_")} == {"tf32"}
    # DeltaNet's k is both sides of its map (I - beta k k^T): the kernel reads it once.
    assert [launch.meta["SAME_SIDES"] for launch in launches if launch.name == "delta_chunks"] == [True]


def _fla_naive_gated_delta_rule():
    """flash-linear-attention's naive chunked gated delta rule, loaded on its own (importing the
    ``fla`` package loads its Triton kernels, which fail under the interpreter)."""
    spec = importlib.util.find_spec("fla")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("flash-linear-attention is not installed (an optional test oracle)")
    if importlib.util.find_spec("einops") is None:
        pytest.skip("einops is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / "ops/gated_delta_rule/naive.py"
    module_spec = importlib.util.spec_from_file_location("fla_naive_gated_delta_rule", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_gated_deltanet_agrees_with_fla_naive_chunked_form():
    naive = _fla_naive_gated_delta_rule()
    dk, dv, H, B, T = 16, 8, 2, 2, 70
    module = _cell("gated_deltanet", "triton", dk=dk, dv=dv)
    torch.manual_seed(0)
    q, k, v = torch.randn(B, T, H, dk), F.normalize(torch.randn(B, T, H, dk), dim=-1), torch.randn(B, T, H, dv)
    a, b = torch.randn(B, T, H), torch.randn(B, T, H)
    initial = torch.randn(B, H, dk, dv)
    g = -module.A_log.exp() * F.softplus(a + module.dt_bias)
    with torch.no_grad():
        ours, state = module(q=q * dk**-0.5, k=k, v=v, a=a, b=b, state={"S": initial}, return_state=True)
        theirs, final = naive.naive_chunk_gated_delta_rule(q, k, v, g, torch.sigmoid(b), chunk_size=16, initial_state=initial, output_final_state=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg="read-outs against fla's naive chunked form")
    torch.testing.assert_close(state["S"], final, rtol=1e-4, atol=1e-4, msg="final state against fla's naive chunked form")


def test_packed_sequences_match_one_call_per_sequence():
    """cu_seqlens on the Triton plan: the delta-rule kernels run each group of equal-length
    sequences as one batch; the result is one call per sequence, final states included."""
    torch.manual_seed(0)
    module = _cell("gated_deltanet", "triton", dk=8, dv=4).double()
    offsets = torch.tensor([0, 5, 6, 11, 20])
    inputs = {i.name: 0.5 * torch.randn(1, 20, *i.type.shape, dtype=torch.float64) for i in module.cell.inputs}
    inputs["k"] = F.normalize(inputs["k"], dim=-1)
    out, state = module(**inputs, cu_seqlens=offsets, return_state=True)
    for n in range(4):
        a, b = int(offsets[n]), int(offsets[n + 1])
        piece, last = module(**{name: value[:, a:b] for name, value in inputs.items()}, return_state=True)
        torch.testing.assert_close(out[:, a:b], piece, rtol=1e-10, atol=1e-10, msg=f"read-outs of sequence {n}")
        torch.testing.assert_close(state["S"][n : n + 1], last["S"], rtol=1e-10, atol=1e-10, msg=f"final state of sequence {n}")


# ---- the backward kernels (delta_adjoint_chunks, delta_gradients) ----------------------------

_GRADIENT_NAMES = ("q", "left", "right", "coefficient", "w", "initial", "log_decay")


def _gradients(problem, chunk: int, triton: bool, readouts: int = 1, seed: int = 1):
    """Every input's gradient of ``sum(dO * O) + sum(dS * S_T)`` with random ``dO``, ``dS``,
    by the Triton delta rule (its backward kernels) or the torch chunked form."""
    from recdsl.backends import chunk_kernels, triton_delta

    q, left, right, coefficient, w, initial, log_decay = problem
    same_sides = right is left
    leaves = {n: None if t is None else t.detach().clone().requires_grad_() for n, t in zip(_GRADIENT_NAMES, problem)}
    if same_sides:
        leaves["right"] = leaves["left"]
    run = triton_delta.delta_rule if triton else chunk_kernels.delta_rule
    qs = [leaves["q"] * (i + 1) for i in range(readouts)]
    outputs, final = run(qs, leaves["left"], leaves["right"], leaves["coefficient"], [leaves["w"]], leaves["initial"], chunk, log_decay=leaves["log_decay"])
    generator = torch.Generator().manual_seed(seed)
    adjoints = [torch.randn(o.shape, generator=generator, dtype=torch.float64).to(o.dtype) for o in [*outputs, final]]
    torch.autograd.backward([*outputs, final], adjoints)
    return {n: t.grad for n, t in leaves.items() if t is not None and not (same_sides and n == "right")}


def _assert_gradients_match(found, expected, tolerance, context):
    assert found.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(found[name], expected[name], rtol=tolerance, atol=tolerance, msg=lambda m, n=name: f"d{n} ({context}): {m}")


@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
@pytest.mark.parametrize("keys, values, steps, chunk, same_sides", [
    (20, 40, 40, 16, False), (5, 3, 1, 64, True), (18, 6, 33, 32, True),
], ids=["two key blocks, two value blocks, three chunks, ragged", "T=1", "one side, ragged second chunk"])
def test_backward_kernels_match_the_torch_chunked_form(gated, keys, values, steps, chunk, same_sides):
    """Every gradient (q, both sides of the map, the coefficient beta, the input term, the
    initial state, the log decays) by the backward kernels against autograd through the torch
    chunked form, float64 to 1e-10: key and value blocks of 16 with ragged last blocks,
    ragged last chunks, T = 1, DeltaNet's one vector on both sides."""
    problem = _problem(keys, values, steps, gated, same_sides=same_sides)
    found = _gradients(problem, chunk, triton=True)
    expected = _gradients(problem, chunk, triton=False)
    _assert_gradients_match(found, expected, 1e-10, f"dk={keys} dv={values} T={steps} chunk={chunk}")


def test_backward_runs_the_kernels_and_falls_back_for_several_readouts():
    """One read-out: the backward is the two kernels (no torch recompute of the chunked form);
    two read-outs of one state take the torch form, recomputed, and are still exact."""
    from recdsl.backends.triton_aot import record_launches

    problem = _problem(8, 4, 20, True)
    launches = record_launches(lambda: _gradients(problem, 16, triton=True))
    assert [launch.name for launch in launches] == ["delta_chunks", "delta_adjoint_chunks", "delta_gradients"]
    assert [launch.meta["KEEP"] for launch in launches if launch.name == "delta_chunks"] == [True]
    _assert_gradients_match(_gradients(problem, 16, True, readouts=2), _gradients(problem, 16, False, readouts=2), 1e-10, "two read-outs")


def test_forward_alone_keeps_nothing_for_the_backward():
    from recdsl.backends import triton_delta
    from recdsl.backends.triton_aot import record_launches

    q, left, right, coefficient, w, initial, log_decay = _problem(8, 4, 20, True)
    with torch.no_grad():
        launches = record_launches(lambda: triton_delta.delta_rule([q], left, right, coefficient, [w], initial, 16, log_decay))
    assert [launch.meta["KEEP"] for launch in launches if launch.name == "delta_chunks"] == [False]


@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
def test_float32_backward_agrees_with_float64(gated):
    problem = _problem(24, 12, 45, gated, same_sides=True)
    expected = _gradients(problem, 16, triton=False)
    single = tuple(None if t is None else t.float() for t in problem)
    single = (single[0], single[1], single[1], *single[3:])
    found = _gradients(single, 16, triton=True)
    assert all(g.dtype == torch.float32 for g in found.values())
    _assert_gradients_match({n: g.double() for n, g in found.items()}, expected, 1e-4, "float32 against float64")


@pytest.mark.slow
def test_hypothesis_backward_over_sizes_and_chunks():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    @hypothesis.settings(max_examples=4, deadline=None, derandomize=True)
    @hypothesis.given(
        keys=st.integers(1, 24), values=st.integers(1, 24), steps=st.integers(1, 40),
        gated=st.booleans(), same_sides=st.booleans(), chunk=st.sampled_from([16, 32]), seed=st.integers(0, 1000),
    )
    def agree(keys, values, steps, gated, same_sides, chunk, seed):
        problem = _problem(keys, values, steps, gated, seed=seed, rows=1, same_sides=same_sides)
        _assert_gradients_match(_gradients(problem, chunk, True), _gradients(problem, chunk, False), 1e-10, f"dk={keys} dv={values} T={steps} chunk={chunk}")

    agree()


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_an_infinite_query_found_by_the_kernel_gives_the_loops_infinities(name):
    """The forward kernel notes infinite read-out entries as it reads them (no separate pass
    over q): such a query is split and run again, and gives the loop's +-inf, NaN and values."""
    torch.manual_seed(0)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", dk=6, dv=5).double()
    triton = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", dk=6, dv=5).double()
    triton.load_state_dict(sequential.state_dict())
    inputs = {i.name: 0.5 * torch.randn(2, 11, *i.type.shape, dtype=torch.float64) for i in sequential.cell.inputs}
    inputs["q"][0, 5, 1] = float("inf")
    inputs["q"][1, 9, 0] = -float("inf")
    expected, got = sequential(**inputs), triton(**inputs)
    assert torch.isinf(expected).any()
    assert torch.equal(torch.isinf(expected), torch.isinf(got)) and torch.equal(torch.isnan(expected), torch.isnan(got))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-12)
    assert torch.equal(torch.sign(expected[torch.isinf(expected)]), torch.sign(got[torch.isinf(expected)]))


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_forward_is_one_kernel_and_no_torch_pass_reads_the_sequences(name):
    """The layer's forward with gradients wanted: one launch (the UT transform inside the walk
    over the chunks), which keeps only the chunk start states and U for the backward, and no
    aten op reads or writes a tensor the size of q, k, v or the output (no layout copy, no
    finiteness check of the queries, no U_w / W_r)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from recdsl.backends.triton_aot import record_launches

    module = _cell(name, "triton", dk=16, dv=16)
    B, T, H = 2, 40, 3
    inputs = {i.name: torch.randn(B, T, H, *i.type.shape, requires_grad=True) for i in module.cell.inputs}
    sequence_size = B * T * H * 16
    touched = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            tensors = [a for a in (*args, *(result if isinstance(result, (tuple, list)) else (result,))) if isinstance(a, torch.Tensor)]
            if func.overloadpacket not in (torch.ops.aten.empty, torch.ops.aten.empty_strided) and any(t.numel() >= sequence_size for t in tensors):
                touched.append(str(func))
            return result

    def forward():
        with Sizes():
            module(**inputs)

    launches = record_launches(forward)
    assert [launch.name for launch in launches] == ["delta_chunks"]
    assert [launch.meta["KEEP"] for launch in launches] == [True]
    views = {"aten.transpose.int", "aten.view.default", "aten.expand.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.alias.default", "aten.permute.default", "aten.select.int", "aten.slice.Tensor", "aten.detach.default"}
    assert [op for op in touched if op not in views] == []


def test_initial_state_read_through_its_strides():
    """A broadcast or transposed initial state is read where it lies (no copy): the same
    read-outs and final state as its contiguous copy."""
    from recdsl.backends import triton_delta

    q, left, right, coefficient, w, initial, log_decay = _problem(20, 12, 30, True, rows=3)
    for given in (initial[:1].expand(3, 20, 12), initial.transpose(-1, -2).contiguous().transpose(-1, -2)):
        (out,), final = triton_delta.forward([q], left, right, coefficient, [w], given, 16, log_decay)
        (expected,), expected_final = triton_delta.forward([q], left, right, coefficient, [w], given.contiguous(), 16, log_decay)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        torch.testing.assert_close(final, expected_final, rtol=0, atol=0)
