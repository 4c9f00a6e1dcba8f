"""The fused sequential Triton kernel (FlashRNN's form) in Triton's interpreter, against the sequential definition.

Nonlinear and coupled cells (GRU, LSTM, ParaGRU, ParaLSTM, random cells that use every
elementwise op the kernel differentiates) run on ``backend="triton"`` through the generated
forward and adjoint kernels; outputs, final states and the gradients with respect to inputs,
params and initial state are compared in float64 (recdsl.testing's tolerances) and float32
(1e-4 of the largest value), at T = 1 and lengths that are not powers of two, with rows
spread over several programs and state sizes past one chunk of the matmul.  (The examples at
B = 2, heads = (2,), T = 1 and 37 are also in tests/test_triton.py.)
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import recdsl
from recdsl.plan import BackendKind, Form
from recdsl.testing import Example, check_equivalence, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)
from test_fused import OPS_CELL, SCALAR_CELL, _run_float32  # noqa: E402

STEP_BY_STEP = ["gru", "lstm", "paragru", "paralstm"]


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


@pytest.mark.parametrize("name", STEP_BY_STEP)
def test_nonlinear_cells_plan_the_fused_kernel(name):
    planned = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", d_in=3, d=4).plan
    assert planned.backend is BackendKind.TRITON
    assert {step.form for step in planned.steps} == {Form.TRITON_FUSED}
    assert "def fused_forward(" in planned.kernel_source and "def fused_backward(" in planned.kernel_source
    text = planned.format()
    assert "step by step in one generated Triton kernel" in text and "kernel: one program per 16 rows" in text


def test_linear_cells_keep_their_scan_kernels():
    planned = recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", d_in=3, d=4).plan
    assert {step.form for step in planned.steps} == {Form.TRITON_SCAN}


def test_cells_neither_kernel_runs_say_why_for_both():
    source = """
cell M(d) {
    input k: [d]
    input v: [d]
    state S: [d, d] = 0
    S = tanh(S + outer(k, v))
    out S @ k
}
"""
    with pytest.raises(recdsl.BackendError, match=r"state 'S' is nonlinear.*the fused sequential kernel cannot run it either: state 'S' has shape \[3, 3\]"):
        recdsl.compile(source, backend="triton", d=3)


def test_backend_fused_runs_the_kernel_on_cuda_tensors():
    """backend='fused' keeps the C loop on the CPU; its plan's GPU alternative is the Triton kernel, shown by explain --plan."""
    planned = recdsl.compile(EXAMPLES / "gru.rec", backend="fused", d_in=3, d=4).plan
    assert planned.backend is BackendKind.FUSED and planned.gpu is not None
    assert planned.gpu.backend is BackendKind.TRITON and {s.form for s in planned.gpu.steps} == {Form.TRITON_FUSED}
    assert planned.for_device("cuda") is planned.gpu and planned.for_device("cpu") is planned
    text = planned.format()
    assert "on CUDA tensors: backend triton" in text and "tiles of 16 rows of weights" in text


def test_emit_prints_the_generated_kernels(tmp_path):
    from recdsl.cli import main

    path = tmp_path / "emitted.txt"
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["emit", str(EXAMPLES / "lstm.rec"), "--dim", "d_in=3", "--dim", "d=4"]) == 0
    source = printed.getvalue()
    path.write_text(source)
    assert "def fused_forward(" in source and "tl.dot(b_a" in source and "for i in range(T):" in source
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["emit", str(EXAMPLES / "lstm.rec"), "--backend", "fused", "--dim", "d_in=3", "--dim", "d=4"]) == 0
    assert printed.getvalue() == source  # backend 'fused' on CUDA tensors runs the same kernels


@pytest.mark.parametrize("name", ["gru", "lstm"])
@pytest.mark.parametrize("length", [1, 3])
def test_wide_states_and_many_rows(name, length):
    """d = 18: two chunks of 16 columns in every matmul, blocks of 32; 3 x 7 = 21 rows: two programs,
    whose sums of the constant leaves' adjoints (the biases') are added by torch."""
    torch.manual_seed(1)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", d_in=5, d=18).double()
    inputs, state = random_inputs(module, Example(batch=3, length=length, heads=(7,), seed=length, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_wide_states_without_a_matmul_take_fewer_rows_per_program():
    """ParaGRU at d = 300 (blocks of 512): 4 rows per program, so 3 x 2 rows take two programs."""
    from recdsl.backends.triton_fused import FusedKernelPlan

    torch.manual_seed(3)
    module = recdsl.compile(EXAMPLES / "paragru.rec", d_in=3, d=300).double()
    kernel_plan = recdsl.compile(EXAMPLES / "paragru.rec", backend="triton", d_in=3, d=300).plan.solver
    assert isinstance(kernel_plan, FusedKernelPlan) and kernel_plan.block_rows == 4
    inputs, state = random_inputs(module, Example(batch=3, length=4, heads=(2,), seed=3, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("source", [OPS_CELL, SCALAR_CELL], ids=["ops", "scalar-state"])
def test_random_ops_cells(source):
    """One example each (T = 3, a given initial state), in the default run; Hypothesis below."""
    dims = {"d_in": 3, "d": 4} if "Ops" in source else {"d": 3}
    torch.manual_seed(0)
    module = recdsl.compile(source, **dims).double()
    inputs, state = random_inputs(module, Example(batch=2, length=3, heads=(), seed=3, with_state=True), scale=0.7)
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.slow
@pytest.mark.parametrize("source", [OPS_CELL, SCALAR_CELL], ids=["ops", "scalar-state"])
def test_property_random_ops_agree_with_sequential(source):
    """Every elementwise op the kernel differentiates, scalar states, W @ h, a matmul of a
    state-dependent binding, outputs that are not states (Hypothesis: B, T, heads, state)."""
    dims = {"d_in": 3, "d": 4} if "Ops" in source else {"d": 3}
    report = check_equivalence(source, dims=dims, backends=["triton"], max_examples=4, max_length=9, hypothesis_seed=5, input_scale=0.7)
    assert report.ok and report.examples > 0, str(report)


@pytest.mark.slow
@pytest.mark.parametrize("name", STEP_BY_STEP)
def test_property_examples_agree_with_sequential(name):
    report = check_equivalence(EXAMPLES / f"{name}.rec", dims={"d_in": 3, "d": 5}, backends=["triton"], max_examples=4, max_length=11, hypothesis_seed=2)
    assert report.ok and report.examples > 0, str(report)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_float32_agrees_with_sequential(name):
    torch.manual_seed(2)
    kernel = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", d_in=5, d=6)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", d_in=5, d=6)
    sequential.load_state_dict(kernel.state_dict())
    inputs, state = random_inputs(kernel, Example(2, 5, (3,), 4, True), scale=1.0)
    inputs = {k: v.float() for k, v in inputs.items()}
    state = {k: v.float() for k, v in state.items()}
    expected, actual = _run_float32(sequential, inputs, state), _run_float32(kernel, inputs, state)
    assert set(expected) == set(actual)
    for quantity, reference in expected.items():
        assert actual[quantity].dtype == torch.float32, quantity
        tolerance = 1e-4 * max(1.0, reference.abs().max().item())
        error = (actual[quantity] - reference).abs().max().item()
        assert error <= tolerance, f"{name} {quantity}: max error {error:.3g} > {tolerance:.3g}"


def test_launches_at_d_128_are_tiled_and_exact():
    """Cheap (kernels recorded, not run): one program per 16 rows, 8 warps, no pipelining, exact float32 products."""
    from pathlib import Path

    from recdsl.backends import triton_aot

    launches = triton_aot.layer_launches(Path(EXAMPLES), triton_aot.Layer("lstm", (("d_in", 128), ("d", 128)), length=64), batch=20)
    assert [launch.name for launch in launches] == ["fused_forward", "fused_backward"]
    for launch in launches:
        assert launch.grid == (2,)
        assert launch.meta["BB"] == 16 and launch.meta["BK"] == 16 and launch.meta["PRECISION"] == "ieee"
        assert launch.meta["num_warps"] == 8 and launch.meta["num_stages"] == 1
