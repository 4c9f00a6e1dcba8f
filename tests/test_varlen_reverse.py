"""Packed variable-length batches (``cu_seqlens``) of cells with reverse states and delays.

A reverse state starts from its initial value (or its sequence's row of ``state=``) at each
sequence's last step and runs to its first; its returned state is its value there.  A delay
never reads across a boundary, in either direction.  As in ``test_varlen.py``, the
reference is the sequential backend called once per sequence; outputs, returned states
(forward and reverse) and every gradient are compared in float64.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.errors import BackendError
from recdsl.plan import VarlenForm

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)
from test_reverse import AFFINE_SCAN, CHAIN, MIXED, TOKEN_SHIFT  # noqa: E402
from test_varlen import CELLS, assert_packed_matches_one_by_one  # noqa: E402


def reversed_source(text: str) -> str:
    """``text`` with every state declared ``reverse`` and every monoid scan a ``scan reverse`` (comments dropped from those lines)."""
    lines = []
    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("state ") or re.match(r"\w+ = scan ", stripped):
            line = line.partition("#")[0].rstrip()
            line = line + " reverse" if stripped.startswith("state ") else line.replace("= scan ", "= scan reverse ", 1)
        lines.append(line)
    return "\n".join(lines)


# Cells with reverse recurrences: the examples, cells of test_reverse.py, and every form of
# recurrence run backwards (the examples and test_varlen.py's cells with their states reversed).
SOURCES: dict[str, tuple[str, str | None, dict[str, int]]] = {
    "lion": ((EXAMPLES / "lion.rec").read_text(), None, DIMS["lion"]),
    "crf_marginals": ((EXAMPLES / "crf_marginals.rec").read_text(), None, DIMS["crf_marginals"]),
    "bigru": ((EXAMPLES / "bigru.rec").read_text(), None, DIMS["bigru"]),
    "token_shift": (TOKEN_SHIFT, None, {"d": 3}),
    "mixed": (MIXED, None, {"d": 3}),
    "chain": (CHAIN, None, {"d": 3}),
    "suffix": (AFFINE_SCAN, "Suffix", {"d": 3}),
}
for _name in ["mingru", "gla", "deltanet", "gated_deltanet", "rwkv6", "mlstm", "aaren", "crf", "state_tracking_lrnn", "titans", "s4d"]:
    SOURCES[f"reverse_{_name}"] = (reversed_source((EXAMPLES / f"{_name}.rec").read_text()), None, DIMS[_name])
for _name, _text in CELLS.items():
    SOURCES[f"reverse_{_name}"] = (reversed_source(_text), None, {"d": 3} if "(d)" in _text else {"n": 3})

PARALLEL = sorted(name for name in SOURCES if name != "bigru")
SEQUENTIAL = ["lion", "crf_marginals", "bigru", "token_shift", "mixed", "chain", "suffix", "reverse_delay", "reverse_aaren", "reverse_dense", "reverse_titans"]

# Lengths 1 and chunk edges (4, 8 with chunks of 4) and the steps around them.
LENGTHS = st.lists(st.sampled_from([1, 1, 2, 3, 4, 5, 8, 9]), min_size=1, max_size=5)


def _compile(name: str, backend: str, **options) -> recdsl.CompiledCell:
    source, cell, dims = SOURCES[name]
    return recdsl.compile(source, cell=cell, backend=backend, **dims, **options).double()


def test_reversed_sources_declare_reverse_recurrences():
    for name in SOURCES:
        module = _compile(name, "sequential")
        assert module.cell.reversed_recurrences or module.analysis.delays, name


@pytest.mark.parametrize("backend", ["scan", "chunked"])
@pytest.mark.parametrize("name", PARALLEL)
@settings(max_examples=4, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_parallel_backends_reset_reverse_states_at_every_boundary(name, backend, lengths, with_state):
    """Reverse scans, chunk kernels (chunks of 4), block and joint scans, semirings, monoids and delays on the flipped packed batch."""
    options = {"chunk_size": 4} if backend == "chunked" else {}
    module = _compile(name, backend, **options)
    assert module.plan.varlen is VarlenForm.SEGMENT_RESETS
    assert_packed_matches_one_by_one(module, lengths, seed=len(lengths), with_state=with_state)


@pytest.mark.parametrize("name", SEQUENTIAL)
@settings(max_examples=3, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_sequential_loop_runs_reverse_states_from_each_last_step(name, lengths, with_state):
    """Rows aligned at their ends: reverse states start at the last step (every row's own) and return their value at the row's first."""
    module = _compile(name, "sequential")
    assert module.plan.varlen is VarlenForm.END_ALIGNED_RESETS
    assert_packed_matches_one_by_one(module, lengths, seed=sum(lengths), with_state=with_state)


@pytest.mark.parametrize("backend", ["newton", "fused"])
@pytest.mark.parametrize("name", ["bigru", "mixed", "token_shift"])
@settings(max_examples=2, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=LENGTHS, with_state=st.booleans())
def test_property_split_backends_run_packed_reverse_states_in_groups_of_equal_length(name, backend, lengths, with_state):
    """newton and fused run a reverse cell as forward sub-cells; packed, they run it grouped by length (no padding to start a reverse state inside)."""
    from recdsl.backends import fused_sequential

    if backend == "fused" and fused_sequential.compiler() is None:
        pytest.skip("no C compiler (the fused backend compiles C)")
    module = _compile(name, backend)
    assert_packed_matches_one_by_one(module, lengths, seed=len(lengths) + 7, with_state=with_state)


def test_lion_chunked_across_chunk_boundaries_at_the_default_chunk_size():
    """Sequences of 65, 1, 64, 130 and 63 steps with chunks of 64, both halves chunked."""
    module = _compile("lion", "chunked")
    assert {step.name for step in module.plan.steps if step.chunk is not None} == {"Sf", "Sb"}
    assert_packed_matches_one_by_one(module, [65, 1, 64, 130, 63], heads=(), seed=3)


def test_sequences_do_not_leak_into_each_other_backwards():
    """A reverse state of one sequence does not depend on the sequences after it (values and gradients)."""
    module = _compile("lion", "chunked", chunk_size=4)
    offsets = torch.tensor([0, 5, 12])
    generator = torch.Generator().manual_seed(0)
    inputs = {i.name: torch.randn((1, 12, *i.type.shape), generator=generator, dtype=torch.float64, requires_grad=True) for i in module.cell.inputs}
    out, final = module(**inputs, cu_seqlens=offsets, return_state=True)
    (out[:, :5].sum() + final["Sb"][0].sum() + final["zb"][0].sum()).backward()
    for name, value in inputs.items():
        assert value.grad[:, 5:].abs().max() == 0, f"gradient of input {name} leaks from sequence 1 into sequence 0"


def test_padded_rows_refuse_reverse_states_and_such_plans_run_grouped():
    """Rows padded at their ends would start a reverse state in the padding: those plans group equal lengths instead."""
    from recdsl.backends import parallel

    module = _compile("mixed", "scan")
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    a = torch.randn(2, 4, dtype=torch.float64)
    state = module.initial_state(2, dtype=torch.float64)
    with pytest.raises(BackendError, match="batch rows padded at their ends cannot start at each row's last step"):
        parallel.run(module.plan, {"x": x, "a": a}, dict(module.named_parameters()), {}, state, module._numerics({"x": x})[0], last_steps=torch.tensor([3, 1]))
    if importlib.util.find_spec("triton") is not None:
        assert _compile("mixed", "triton").plan.varlen is VarlenForm.GROUPED_BY_LENGTH
        assert _compile("token_shift", "triton").plan.varlen is VarlenForm.START_ALIGNED  # a forward delay pads fine


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", ["lion", "mixed", "suffix", "token_shift"])
def test_triton_in_the_interpreter(name, monkeypatch, tmp_path_factory):
    """Reverse cells run equal-length groups on the Triton kernels; a forward delay runs on padded rows."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))
    module = _compile(name, "triton")
    assert_packed_matches_one_by_one(module, [3, 1, 3, 2], heads=(), seed=2)
