"""Packed variable-length batches (``cu_seqlens``) against running the sequences one by one.

The reference is the sequential backend called once per sequence (``[1, L_n, ...]`` from
row ``n`` of the initial state); every backend's packed run must give the same outputs,
final states ``[N, ...]`` and gradients (inputs, initial state, params), in float64.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.errors import InputError
from recdsl.plan import VarlenForm

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

PARALLEL = ["mingru", "minlstm", "lru", "s4d", "hgrn", "rglru", "s6", "mamba2", "gla", "retnet", "mlstm", "deltanet", "aaren", "crf", "gated_deltanet", "rwkv6", "ttt_linear", "hgrn2", "state_tracking_lrnn", "titans"]
NONLINEAR = ["gru", "lstm", "paragru", "paralstm"]
TOLERANCE = dict(rtol=1e-9, atol=1e-10)

# Cells that exercise forms the examples do not: an output of the previous state, a delay
# (an update that reads no state), a tropical semiring with no input term, a dense matrix state.
CELLS = {
    "previous": """
cell Previous(d) {
    input x: [d]
    input a: [d]
    state h: [d] = 0.5
    out y = h * x
    h = sigmoid(a) * h + x
    out h
}""",
    "delay": """
cell Delay(d) {
    input x: [d]
    state xp: [d] = 1
    out xp - x
    xp = x
}""",
    "viterbi": """
cell Viterbi(n) {
    input x: [n]
    param trans: [n, n] = normal(0.3)
    state h: [n] = 0
    h = amax(h[:, None] + trans, 0)
    out h + x
}""",
    "logplus": """
cell LogPlus(d) {
    input x: [d]
    input a: [d]
    state m: [d] = 0
    state l: [d] = 0
    m = max(m + logsigmoid(a), x)
    l = logaddexp(l + logsigmoid(a), x)
    out m + l
}""",
    "dense": """
cell Dense(d) {
    input x: [d]
    param W: [d, d] = normal(0.3)
    state h: [d] = 0
    h = h @ W + x
    out h
}""",
}


def _compile(name: str, backend: str = "auto", **options) -> recdsl.CompiledCell:
    if name in CELLS:
        dims = {"d": 3} if "(d)" in CELLS[name] else {"n": 3}
        return recdsl.compile(CELLS[name], backend=backend, **dims, **options).double()
    return recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **DIMS[name], **options).double()


def _draw(module: recdsl.CompiledCell, lengths: list[int], heads: tuple[int, ...], seed: int, with_state: bool):
    generator = torch.Generator().manual_seed(seed)
    total = sum(lengths)

    def draw(shape, like_complex: bool) -> torch.Tensor:
        real = 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        return torch.complex(real, 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)) if like_complex else real

    inputs = {i.name: draw((1, total, *heads, *i.type.shape), i.type.kind is recdsl.ir.Kind.COMPLEX) for i in module.cell.inputs}
    state = None
    if with_state:
        start = module.initial_state(len(lengths), *heads, dtype=torch.float64)
        state = {}
        for name, value in start.items():
            noise = draw(tuple(value.shape), value.is_complex())
            state[name] = noise if value.is_complex() else torch.where(torch.isinf(value), value, noise)
    offsets = torch.tensor([0] + [sum(lengths[: i + 1]) for i in range(len(lengths))], dtype=torch.int64)
    return inputs, state, offsets


def _leaves(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _loss(outputs: list[torch.Tensor], final: dict[str, torch.Tensor], seed: int) -> torch.Tensor:
    """A random linear functional of every output and final state, so every gradient path is checked."""
    generator = torch.Generator().manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64)
    for value in outputs + [final[k] for k in sorted(final)]:
        weight = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        finite = torch.isfinite(value) if not value.is_complex() else torch.ones_like(weight, dtype=torch.bool)
        term = value.real if value.is_complex() else value
        total = total + (term.where(finite, torch.zeros_like(term)) * weight).sum()
    return total


def assert_packed_matches_one_by_one(module: recdsl.CompiledCell, lengths: list[int], heads=(2,), seed=0, with_state=True) -> None:
    """``module`` on the packed batch against the sequential backend on each sequence; values and gradients."""
    reference = recdsl.CompiledCell(module.analysis, "sequential").double()
    reference.load_state_dict(module.state_dict())
    inputs, state, offsets = _draw(module, lengths, heads, seed, with_state)

    def leaves():
        x = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
        s = {k: v.clone().requires_grad_(True) for k, v in state.items()} if state is not None else None
        return x, s

    x, s = leaves()
    outputs, final = module(**x, state=s, return_state=True, cu_seqlens=offsets)
    outputs = _leaves(outputs)
    assert all(o.shape[:2] == (1, sum(lengths)) for o in outputs)
    assert all(v.shape[0] == len(lengths) for v in final.values())
    params = dict(module.named_parameters())
    wrt = list(x.values()) + (list(s.values()) if s else []) + list(params.values())
    packed_grads = torch.autograd.grad(_loss(outputs, final, seed), wrt, allow_unused=True)

    rx, rs = leaves()
    pieces: list[list[torch.Tensor]] = []
    finals: list[dict[str, torch.Tensor]] = []
    for n in range(len(lengths)):
        a, b = int(offsets[n]), int(offsets[n + 1])
        row = {k: v[n : n + 1] for k, v in rs.items()} if rs is not None else None
        out, fin = reference(**{k: v[:, a:b] for k, v in rx.items()}, state=row, return_state=True)
        pieces.append(_leaves(out))
        finals.append(fin)
    expected_outputs = [torch.cat([p[i] for p in pieces], 1) for i in range(len(pieces[0]))]
    expected_final = {k: torch.cat([f[k] for f in finals], 0) for k in finals[0]}
    ref_wrt = list(rx.values()) + (list(rs.values()) if rs else []) + list(reference.parameters())
    expected_grads = torch.autograd.grad(_loss(expected_outputs, expected_final, seed), ref_wrt, allow_unused=True)

    where = f"{module.cell.name} on {module.backend}, lengths {lengths}"
    for i, (got, want) in enumerate(zip(outputs, expected_outputs)):
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{where}: output {i}: {m}")
    assert set(final) == set(expected_final)
    for name in final:
        torch.testing.assert_close(final[name], expected_final[name], **TOLERANCE, msg=lambda m: f"{where}: final state {name}: {m}")
    names = list(x) + (list(s) if s else []) + list(params)
    for name, got, want in zip(names, packed_grads, expected_grads):
        if want is None:
            assert got is None or not bool(got.abs().max() > 0), f"{where}: gradient of {name} should be zero"
            continue
        assert got is not None, f"{where}: no gradient of {name}"
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda m: f"{where}: gradient of {name}: {m}")


LENGTHS = st.lists(st.sampled_from([1, 1, 2, 3, 5, 8, 9, 13]), min_size=1, max_size=5)


@pytest.mark.parametrize("backend", ["scan", "chunked"])
@pytest.mark.parametrize("name", PARALLEL + sorted(CELLS))
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_parallel_backends_reset_at_every_boundary(name, backend, lengths, with_state):
    """Hypothesis over the boundaries (length-1 sequences included); chunk size 4, so sequences span chunks."""
    options = {"chunk_size": 4} if backend == "chunked" else {}
    module = _compile(name, backend, **options)
    assert module.plan.varlen is VarlenForm.SEGMENT_RESETS
    assert_packed_matches_one_by_one(module, lengths, seed=len(lengths), with_state=with_state)


@pytest.mark.parametrize("name", ["mingru", "gru", "lstm", "crf", "aaren", "deltanet", "previous", "delay"])
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_sequential_loop_resets_at_every_boundary(name, lengths, with_state):
    """The loop runs the sequences as batch rows aligned at their ends, each reset at its first step."""
    module = _compile(name, "sequential")
    assert module.plan.varlen is VarlenForm.END_ALIGNED_RESETS
    assert_packed_matches_one_by_one(module, lengths, seed=sum(lengths), with_state=with_state)


@pytest.mark.parametrize("name", ["gla", "deltanet", "mamba2"])
def test_chunked_kernels_across_chunk_boundaries_at_the_default_chunk_size(name):
    """Sequences of 1, 63, 64, 65 and 130 steps with chunks of 64: each sequence starts a chunk of its own."""
    module = _compile(name, "chunked")
    assert any(step.chunk is not None for step in module.plan.steps)
    assert_packed_matches_one_by_one(module, [65, 1, 64, 130, 63], heads=(), seed=3)


@pytest.mark.parametrize("name", ["gru", "mingru", "previous"])
def test_newton_reads_each_final_state_at_its_last_step(name):
    """Newton's solver on rows padded at their ends: lengths 3 and 1 twice each, 5 and 7 once."""
    module = _compile(name, "newton")
    assert module.plan.varlen is VarlenForm.START_ALIGNED
    assert_packed_matches_one_by_one(module, [3, 1, 5, 3, 1, 7], seed=5)


@pytest.mark.parametrize("name", ["lstm", "rglru", "gru", "previous"])
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_fused_reads_each_final_state_at_its_last_step(name, lengths, with_state):
    """The C loop on rows padded at their ends; each row's final state read at its sequence's last step."""
    from recdsl.backends import fused_sequential

    if fused_sequential.compiler() is None:
        pytest.skip("no C compiler")
    module = _compile(name, "fused")
    assert module.plan.varlen is VarlenForm.START_ALIGNED
    assert_packed_matches_one_by_one(module, lengths, seed=len(lengths), with_state=with_state)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name,form", [("mingru", VarlenForm.START_ALIGNED), ("aaren", VarlenForm.START_ALIGNED), ("gla", VarlenForm.GROUPED_BY_LENGTH), ("mamba2", VarlenForm.GROUPED_BY_LENGTH)])
def test_triton_in_the_interpreter(name, form, monkeypatch, tmp_path_factory):
    """Scan kernels keep every step's state (rows padded at their ends); a chunk kernel only the last (equal-length groups)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))
    module = _compile(name, "triton")
    assert module.plan.varlen is form
    assert_packed_matches_one_by_one(module, [3, 1, 3, 2], heads=(), seed=2)


def test_plan_says_how_packed_batches_run():
    assert "variable-length batches (cu_seqlens): natively, one pass over the packed sequence" in _compile("gla", "chunked").plan.format()
    assert "variable-length batches (cu_seqlens): natively, the sequences as batch rows aligned" in _compile("gru", "sequential").plan.format()
    assert "variable-length batches (cu_seqlens): natively, the sequences as batch rows padded" in _compile("gru", "newton").plan.format()
    assert "cu_seqlens" in recdsl.explain(EXAMPLES / "mingru.rec", plan=True, **DIMS["mingru"])
    if importlib.util.find_spec("triton") is not None:
        assert "variable-length batches (cu_seqlens): grouped" in _compile("gla", "triton").plan.format()


def test_default_state_and_float32():
    """No state given: each sequence starts from the declared initial state; float32 inputs."""
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])
    x = torch.randn(1, 9, 3)
    offsets = torch.tensor([0, 4, 5, 9])
    out, final = module(x, cu_seqlens=offsets, return_state=True)
    assert out.dtype == torch.float32 and final["h"].shape == (3, 4)
    for n in range(3):
        a, b = int(offsets[n]), int(offsets[n + 1])
        piece, last = module(x[:, a:b], return_state=True)
        torch.testing.assert_close(out[:, a:b], piece)
        torch.testing.assert_close(final["h"][n : n + 1], last["h"])


# ---- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offsets,message",
    [
        ([0, 4, 9], None),
        (torch.tensor([0.0, 9.0]), "cu_seqlens has dtype torch.float32"),
        (torch.tensor([[0, 9]]), "cu_seqlens has shape [1, 2]"),
        (torch.tensor([9]), "cu_seqlens has shape [1]"),
        (torch.tensor([1, 9]), "cu_seqlens starts at 1"),
        (torch.tensor([0, 4, 8]), "cu_seqlens ends at 8 but input 'x' has 9 time steps"),
        (torch.tensor([0, 5, 4, 9]), "cu_seqlens is not increasing: sequence 1 runs from 5 to 4"),
        (torch.tensor([0, 4, 4, 9]), "cu_seqlens is not increasing: sequence 1 runs from 4 to 4"),
    ],
)
def test_offsets_are_validated(offsets, message):
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])
    with pytest.raises(InputError) as caught:
        module(torch.randn(1, 9, 3), cu_seqlens=offsets)
    text = str(caught.value)
    assert text.startswith("input error: ")
    assert (message or "cu_seqlens is a list, not a torch.Tensor") in text
    assert "expected cu_seqlens: an int64 tensor [N + 1] rising from 0 to total_T = 9" in text


def test_packed_inputs_need_batch_one_and_states_per_sequence():
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])
    with pytest.raises(InputError, match=r"input 'x' has batch size 2 with cu_seqlens\n  expected the sequences packed along time into one batch row: \[1, total_T, \*heads, \*shape\]"):
        module(torch.randn(2, 9, 3), cu_seqlens=torch.tensor([0, 9]))
    with pytest.raises(InputError, match=r"state 'h' has shape \[1, 4\]\n  expected \[2, 4\]"):
        module(torch.randn(1, 9, 3), cu_seqlens=torch.tensor([0, 4, 9]), state={"h": torch.zeros(1, 4)})


def test_int32_offsets_and_a_state_shared_by_every_sequence():
    """int32 offsets (as flash-linear-attention's kernels take them) and a state given as ``[*shape]``, broadcast to each sequence."""
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"]).double()
    x = torch.randn(1, 7, 3, dtype=torch.float64)
    shared = torch.randn(4, dtype=torch.float64)
    out, final = module(x, cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), state={"h": shared}, return_state=True)
    expected, last = module(x[:, 3:], state={"h": shared}, return_state=True)
    torch.testing.assert_close(out[:, 3:], expected)
    torch.testing.assert_close(final["h"][1:], last["h"])
