"""T split across programs (backends/triton_codegen.py: TimeSplit): the three launches (fold
each chunk, carry across chunks, rescan each chunk from its carry), forward and backward,
and the affine scans' one pass with a look-back over blocks of steps (forward and backward), in Triton's
interpreter against the sequential reference, float64, with the split forced by a tiny
``split_programs`` target and short chunks: ragged last chunks, chunks of one step."""

from __future__ import annotations

import importlib.util

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

import recdsl
from recdsl.backends.triton_codegen import TimeSplit
from recdsl.testing import Example, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import DIMS as ALL_DIMS  # noqa: E402  (tests/ is on sys.path)
from example_dims import EXAMPLES  # noqa: E402

# The examples the Triton backend runs with its scan kernels (the fused sequential kernel and
# the chunked kernels have no time split; their cells' other scans do).
SCANNED = ("mingru", "minlstm", "lru", "hgrn", "rglru", "mlstm", "aaren", "lion", "rwkv6", "s4d")  # GLA, RetNet, Mamba-2: only chunked kernels; S6: the fused selective scan

LOG_SEMIRING = """
cell LogScan(d) {
    input x: [d]
    input g: [d]
    state h: [d] = 0
    h = logaddexp(x, h - softplus(g))
    out h
}
"""


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _compare_split(module, length: int, min_steps: int, heads=(2,), batch: int = 2) -> set[str]:
    """Compare the split Triton backend with the sequential one; the names of the kernels it launched."""
    from recdsl.backends.triton_launch import observe_launches

    inputs, state = random_inputs(module, Example(batch=batch, length=length, heads=heads, seed=length, with_state=True))
    with observe_launches() as launches:
        mismatches = compare_backends(module, ["triton"], inputs, state, seed=length, backend_options={"split_programs": 1000, "split_min_steps": min_steps})
    assert not mismatches, "\n".join(map(str, mismatches))
    return {launch.name for launch in launches}


def test_chunk_steps_fill_the_machine_only_when_rows_are_few():
    split = TimeSplit()  # 528 programs, chunks of at least 128 steps
    # B = 8, d = 1024: 8 rows x 16 blocks of 64 = 128 programs, a quarter of the target.
    assert split.chunk_steps(128, 1024, 32) == 224  # 5 chunks of 7 blocks (the last of 4): 640 programs
    assert split.chunk_steps(128, 4096, 32) == 832  # 5 chunks of 26 blocks
    assert split.chunk_steps(128, 16384, 32) == 3296
    assert split.chunk_steps(128, 300, 32) == 128  # three chunks, the last of 44 steps
    assert split.chunk_steps(128, 128, 32) is None  # one chunk of at least 128 steps would be all of T
    assert split.chunk_steps(528, 1 << 16, 32) is None  # enough programs: one pass
    assert split.chunk_steps(1, 1, 32) is None
    assert TimeSplit(target_programs=0).chunk_steps(1, 1 << 16, 32) is None
    assert TimeSplit(target_programs=100, min_chunk_steps=1).chunk_steps(4, 37, 32) == 2  # short chunks stay unrounded
    assert TimeSplit(target_programs=100, min_chunk_steps=1).chunk_steps(4, 2, 32) == 1


@pytest.mark.parametrize("name", SCANNED)
def test_split_matches_sequential_with_gradients(name):
    """37 steps in chunks of 5: eight chunks, the last of 2 steps."""
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **ALL_DIMS[name]).double()
    launched = _compare_split(module, 37, 5)
    assert {n for n in launched if n.startswith("summarize_") or n.endswith("_look_back")}, launched
    assert not {n for n in launched if n.startswith(("forward_", "backward_")) and not n.endswith(("_chunks", "_look_back"))}, launched


@pytest.mark.parametrize("name", ["mingru", "lru", "mlstm", "aaren"])  # real, complex, max-plus semiring, monoid
@pytest.mark.parametrize("length,min_steps", [(2, 1), (33, 32), (70, 32), (1, 1)], ids=["chunks of 1 step", "last chunk of 1 step", "chunks of whole blocks", "T = 1 (one pass)"])
def test_split_edges(name, length, min_steps):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **ALL_DIMS[name]).double()
    launched = _compare_split(module, length, min_steps, heads=(), batch=1)
    assert any(n.startswith("summarize_") or n.endswith("_look_back") for n in launched) == (length > 1), launched


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # log(0) = -inf, where both terms are -inf
def test_log_semiring_split_matches_sequential():
    torch.manual_seed(0)
    module = recdsl.compile(LOG_SEMIRING, d=5).double()
    launched = _compare_split(module, 37, 4, heads=())
    assert {"summarize_h", "carries_h", "forward_h_chunks", "summarize_backward_h", "carries_backward_h", "backward_h_chunks"} <= launched


def test_split_options_are_checked():
    with pytest.raises(recdsl.BackendError, match="split_programs"):
        recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", backend_options={"split_programs": -1}, **ALL_DIMS["mingru"])
    with pytest.raises(recdsl.BackendError, match="split_min_steps"):
        recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", backend_options={"split_min_steps": 0}, **ALL_DIMS["mingru"])


def test_default_plan_splits_a_small_batch_and_not_a_large_one():
    """Recorded, not run: B = 8, d = 1024 is 128 programs, so T = 1024 runs in 5 chunks; B = 64 is 1024 programs: one pass."""
    from recdsl.backends.triton_launch import observe_launches

    module = recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", d_in=2, d=1024)
    # Split, minGRU's affine scan runs forward in one pass: a program per (row, block of 64 elements, block of 32 steps).
    for batch, length, expected, grid in ((8, 1024, "forward_h_look_back", (8 * 16 * 32,)), (64, 256, "forward_h", (64, 16))):
        x = torch.randn(batch, length, 2)
        with torch.no_grad(), observe_launches(run_kernels=False) as launches:
            module(x)
        scans = [launch for launch in launches if launch.name.startswith("forward_h")]
        assert [(launch.name, launch.grid) for launch in scans] == [(expected, grid)]


AFFINE = """
cell Affine(d) {
    input a: [d]
    input b: [d]
    state h: [d] = 0
    h = a * h + b
    out h
}
"""


@settings(max_examples=6, deadline=None)
@given(length=st.integers(1, 70), min_steps=st.integers(1, 40), batch=st.integers(1, 3), width=st.integers(1, 5))
def test_any_split_of_an_affine_scan_matches_sequential(length, min_steps, batch, width):
    module = recdsl.compile(AFFINE, d=width).double()
    inputs, state = random_inputs(module, Example(batch=batch, length=length, heads=(), seed=length, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length, backend_options={"split_programs": 1000, "split_min_steps": min_steps})
    assert not mismatches, "\n".join(map(str, mismatches))


def test_every_example_with_a_scan_kernel_is_split_tested():
    from recdsl.plan import Form

    scanned = set()
    for name, dims in ALL_DIMS.items():
        try:
            planned = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **dims).plan
        except recdsl.BackendError:
            continue
        if any(step.form is Form.TRITON_SCAN for step in planned.steps):
            scanned.add(name)
    assert scanned == set(SCANNED)
