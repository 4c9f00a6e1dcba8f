"""The Triton backend in Triton's interpreter (TRITON_INTERPRET=1): every supported example,
outputs, final states and gradients against the sequential reference, T = 1 and lengths that
are not multiples of the block; the generated source; the cache."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.plan import Form
from recdsl.testing import Example, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import DIMS as ALL_DIMS  # noqa: E402  (tests/ is on sys.path)
from example_dims import EXAMPLES  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden"
UNSUPPORTED_NAMES = ("crf", "state_tracking_lrnn", "titans", "crf_marginals")  # gru, lstm, paragru, paralstm, bigru: the fused sequential kernel (tests/test_triton_fused.py)
DIMS = {name: dims for name, dims in ALL_DIMS.items() if name not in UNSUPPORTED_NAMES}
UNSUPPORTED = {name: ALL_DIMS[name] for name in UNSUPPORTED_NAMES}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def test_every_example_is_either_supported_or_refused():
    assert set(DIMS) | set(UNSUPPORTED) == {p.stem for p in EXAMPLES.glob("*.rec")}


@pytest.mark.parametrize("name", sorted(DIMS))
@pytest.mark.parametrize("length", [1, 37])  # 37: two blocks of 32 steps, the second ragged
def test_matches_sequential_with_gradients(name, length):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(2,), seed=length, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", ["gla", "retnet", "mlstm", "mamba2"])
def test_matrix_states_run_in_the_chunked_kernels_across_chunks(name):
    """70 steps: two chunks of 64, the second ragged; the state is never stored per step."""
    from recdsl.backends import triton_backend

    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    planned = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **DIMS[name]).plan
    assert {s.name for s in planned.steps if s.form is Form.TRITON_CHUNKED} == {"C" if name == "mlstm" else ("h" if name == "mamba2" else "S")}
    inputs, state = random_inputs(module, Example(batch=1, length=70, heads=(), seed=7, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=7)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", ["mingru", "lru", "mlstm"])
def test_float32_and_default_initial_state(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
    inputs, _ = random_inputs(module, Example(batch=1, length=40, heads=(), seed=3, with_state=False))
    inputs = {n: v.float() if not v.is_complex() else v.to(torch.complex64) for n, v in inputs.items()}
    mismatches = compare_backends(module.double(), ["triton"], inputs, None, rtol=1e-5, atol=1e-6)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_bfloat16_inputs_accumulate_in_float32():
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", d_in=4, d=4)
    x = torch.randn(1, 40, 4).to(torch.bfloat16)
    out, state = module(x, return_state=True)
    assert out.dtype == torch.bfloat16 and state["h"].dtype == torch.float32
    reference = recdsl.compile(EXAMPLES / "mingru.rec", backend="sequential", d_in=4, d=4)
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(out.float(), reference(x).float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_cells_say_why(name):
    with pytest.raises(recdsl.BackendError, match="backend 'triton' cannot run"):
        recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **UNSUPPORTED[name])


def test_cpu_tensors_without_the_interpreter_are_a_clear_error(monkeypatch):
    module = recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", d_in=3, d=4)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(recdsl.BackendError, match="TRITON_INTERPRET=1"):
        module(torch.randn(1, 3, 3))


def test_generated_source_matches_the_golden_file():
    """A change in generated code shows in review: regenerate with `recdsl emit --backend triton examples/mingru.rec --dim d_in=4 --dim d=8 > tests/golden/mingru_triton.py`."""
    from recdsl.backends import triton_backend

    analysis = recdsl.analyze(recdsl.load(EXAMPLES / "mingru.rec", dims={"d_in": 4, "d": 8}))
    assert triton_backend.emit(analysis, "examples/mingru.rec") == (GOLDEN / "mingru_triton.py").read_text()


def test_emit_command_prints_kernels_with_source_lines(capsys):
    from recdsl.cli import main

    assert main(["emit", "--backend", "triton", str(EXAMPLES / "mlstm.rec"), "--dim", "dk=4", "--dim", "dv=4"]) == 0
    text = capsys.readouterr().out
    assert "def forward_m(" in text and "def backward_m(" in text and "max-plus" in text
    assert "# C: a matrix state read out linearly; it runs in the chunked kernels" in text
    # n is C's column of ones, carried in C's walk: no scan kernel of its own.
    assert "# n: the normaliser of C's read-out, carried in C's walk" in text and "def forward_n(" not in text
    assert "# line 36: m = max(logf + m, i_pre)" in text
    compile(text, "<emitted>", "exec")  # valid Python


def test_kernels_are_loaded_from_a_content_hashed_file(tmp_path, monkeypatch):
    from recdsl.backends import triton_backend

    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    analysis = recdsl.analyze(recdsl.load(EXAMPLES / "hgrn.rec", dims={"d_in": 3, "d": 5}))
    module = triton_backend.load_generated(triton_backend.emit(analysis))
    files = list(tmp_path.glob("recdsl_*.py"))
    assert len(files) == 1 and Path(module.__file__) == files[0]
    assert files[0].read_text() == triton_backend.emit(analysis)
    assert triton_backend.load_generated(triton_backend.emit(analysis)) is module


DIAGONAL = ["mingru", "minlstm", "hgrn", "rglru", "lru"]


@pytest.mark.parametrize("name", DIAGONAL)
def test_float32_gradients_with_heads(name):
    """The backward kernels' leaf gradients (gate math differentiated in the kernel) in float32, with heads."""
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
    inputs, state = random_inputs(module.double(), Example(batch=2, length=37, heads=(2,), seed=5, with_state=True))
    inputs = {n: v.float() if not v.is_complex() else v.to(torch.complex64) for n, v in inputs.items()}
    state = {n: v.float() if not v.is_complex() else v.to(torch.complex64) for n, v in state.items()}
    mismatches = compare_backends(module.double(), ["triton"], inputs, state, seed=5, rtol=1e-4, atol=1e-5)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", ["mingru", "minlstm", "rglru"])
def test_backward_runs_no_gate_math_in_torch(name):
    """The gate math is differentiated inside the backward kernel: torch's backward only runs the
    projections' matmuls and sums (no sigmoid, exp, mul, ..., no op-by-op autograd)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **DIMS[name]).double()
    x = torch.randn(2, 9, 2, module.cell.inputs[0].type.shape[0], dtype=torch.float64, requires_grad=True)
    y = module(x)
    with Recorder() as recorder:
        y.sum().backward()
    gate_math = {"sigmoid", "exp", "log", "softplus", "mul", "div", "sub", "neg", "pow", "sqrt", "tanh", "where", "rsub"}
    assert not recorder.names & gate_math, f"torch ran gate math in the backward: {sorted(recorder.names & gate_math)}"
    assert not {n for n in recorder.names if n.endswith("_backward")}, sorted(recorder.names)


BROADCAST_TWICE = """
cell SelectiveSum(d, n) {
    input x: [d]
    input delta: [d]
    param A_log: [d, n] = 0.0
    state h: [d, n] = 0
    h = exp(-delta[:, None] * exp(A_log)) * h + delta[:, None] * x[:, None]
    out sum(h, -1)
}
"""


def test_leaves_are_deduplicated_by_structure():
    """``delta[:, None]`` in the decay and in the input, two IR nodes: one leaf, loaded once.
    (S6 itself now runs the fused selective scan; read out by a sum, this cell is scanned.)"""
    from recdsl.printer import format_expr

    plan = recdsl.compile(BROADCAST_TWICE, backend="triton", d=3, n=4).plan
    (spec,) = [step.kernel for step in plan.steps if step.kernel is not None]
    leaves = [format_expr(leaf.expr) for leaf in spec.leaves]
    assert leaves.count("delta[:, None]") == 1, leaves


def test_a_nan_survives_maximum_as_in_torch(monkeypatch):
    """``max`` keeps a NaN, as torch.maximum does, in the max-plus scan's combine (mLSTM's
    stabiliser ``m = max(logf + m, i)``) and as an op (``relu``, ``max``): tl.maximum alone, like
    fmax, returns the other operand.  One NaN gate: the outputs and final state have the
    sequential loop's NaNs, and its values elsewhere."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    source = """
    cell Stabiliser() {
        input i_pre: []
        input f_pre: []
        state m: [] = -inf
        m = max(logsigmoid(f_pre) + m, i_pre)
        out relu(max(m, f_pre))
    }
    """
    sequential = recdsl.compile(source, backend="sequential").double()
    triton_module = recdsl.compile(source, backend="triton").double()
    generator = torch.Generator().manual_seed(0)
    i_pre, f_pre = (torch.randn(2, 40, generator=generator, dtype=torch.float64) for _ in range(2))
    f_pre[0, 12] = float("nan")
    expected, expected_state = sequential(i_pre, f_pre, return_state=True)
    got, got_state = triton_module(i_pre, f_pre, return_state=True)
    assert torch.isnan(expected[0, 12:]).all() and not torch.isnan(expected[1]).any()
    torch.testing.assert_close(got, expected, equal_nan=True)
    torch.testing.assert_close(got_state["m"], expected_state["m"], equal_nan=True)
