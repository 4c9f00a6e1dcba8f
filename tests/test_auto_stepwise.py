"""`auto` on cells with no scan form: the fused loop, Newton's method or the Python loop, by the cost model.

Without a C compiler the fused form is unavailable and `auto` falls back (and says so);
on CUDA tensors a plan that picked the fused loop (CPU only) runs its `gpu` alternative.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import recdsl
from recdsl.backends.fused_sequential import compiler
from recdsl.plan import BackendKind, Form, PlanOptions, Workload, plan
from recdsl.testing import Example, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

STEPWISE = ["gru", "lstm", "paragru", "paralstm", "slstm"]  # no scan form
NEEDS_CC = pytest.mark.skipif(compiler() is None, reason="no C compiler")


def _module(name: str) -> recdsl.CompiledCell:
    torch.manual_seed(0)
    return recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])


@NEEDS_CC
@pytest.mark.parametrize("name", STEPWISE)
def test_auto_runs_the_fused_loop_and_agrees_with_sequential(name):
    module = _module(name).double()
    assert module.backend == "fused", module.plan.format()
    text = module.plan.format()
    assert "the loop compiled to C is predicted fastest" in text
    for backend in ("sequential", "fused", "newton"):
        assert f"      {backend}: " in text and " ms" in text
    assert " ms (Jacobian " in text  # newton's prediction says which structure it assumed
    inputs, state = random_inputs(module, Example(batch=2, length=7, heads=(), seed=1, with_state=False))
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name]).double()
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(module(**inputs), reference(**inputs), rtol=1e-10, atol=1e-10)


@NEEDS_CC
@pytest.mark.parametrize("name", STEPWISE)
def test_cuda_tensors_run_the_fused_triton_kernel_or_else_newton_or_the_loop(name, monkeypatch):
    planned = _module(name).plan
    on_gpu = planned.for_device("cuda")
    if importlib.util.find_spec("triton") is not None:
        assert on_gpu.backend is BackendKind.TRITON and all(step.form is Form.TRITON_FUSED for step in on_gpu.steps)
        assert "on a GPU, the fused sequential Triton kernel" in planned.reason
    # Without triton: after the fused loop (CPU only), the faster of newton and the loop.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None if name == "triton" else real_find_spec(name, *a, **k))
    planned = _module(name).plan
    on_gpu = planned.for_device("cuda")
    assert on_gpu.backend in (BackendKind.NEWTON, BackendKind.SEQUENTIAL)
    costs = {c.backend: c.seconds for c in planned.costs}
    other = BackendKind.NEWTON if on_gpu.backend is BackendKind.SEQUENTIAL else BackendKind.SEQUENTIAL
    assert costs[on_gpu.backend] <= costs[other]
    assert f"on CUDA tensors: backend {on_gpu.backend}" in planned.format()


@pytest.mark.parametrize("name", STEPWISE)
def test_without_a_c_compiler_auto_falls_back_and_says_so(name, monkeypatch):
    monkeypatch.setenv("CC", "recdsl-test-no-such-compiler")
    module = _module(name)
    assert module.backend in ("newton", "sequential")
    assert "unavailable: fused: no C compiler found" in module.backend_reason
    assert "fused: cannot run (no C compiler found" in module.plan.format()
    if importlib.util.find_spec("triton") is None:
        assert module.plan.gpu is None  # newton and the loop both run on CUDA tensors themselves
    else:  # the fused Triton kernel needs no C compiler
        assert module.plan.gpu is not None and module.plan.gpu.backend is BackendKind.TRITON
    costs = {c.backend: c.seconds for c in module.plan.costs}
    assert costs[module.plan.backend] == min(costs[k] for k in (BackendKind.SEQUENTIAL, BackendKind.NEWTON))
    module = module.double()
    inputs, state = random_inputs(module, Example(batch=2, length=5, heads=(), seed=2, with_state=True))
    if name == "slstm":
        state["n"] = state["n"].abs() + 0.5  # a normaliser any run reaches
    assert not compare_backends(module, [module.backend], inputs, state, seed=2, atol=1e-10, rtol=1e-10)


def test_without_a_c_compiler_paragru_runs_newton(monkeypatch):
    """ParaGRU's diagonal Jacobian makes Newton cheap: the model predicts it well ahead of the loop."""
    monkeypatch.setenv("CC", "recdsl-test-no-such-compiler")
    module = recdsl.compile(EXAMPLES / "paragru.rec", d_in=16, d=32)
    assert module.backend == "newton", module.plan.format()
    assert "Jacobian diagonal (32 independent elements)" in module.backend_reason


def test_a_dense_lstm_stays_off_newton():
    """LSTM's Jacobian (h and c through four dense matrices) is one dense block: Newton is predicted slower than the loop."""
    module = recdsl.compile(EXAMPLES / "lstm.rec", d_in=64, d=64)
    costs = {c.backend: c.seconds for c in module.plan.costs}
    assert costs[BackendKind.NEWTON] > costs[BackendKind.SEQUENTIAL]


@pytest.mark.parametrize("name", ["mingru", "gla", "crf"])
def test_cells_with_scan_forms_do_not_consider_the_stepwise_forms(name):
    module = _module(name)
    assert module.backend in ("sequential", "scan", "chunked")
    skipped = {c.backend: c for c in module.plan.costs if not c.candidate}
    assert set(skipped) == {BackendKind.FUSED, BackendKind.NEWTON}
    assert all("every recurrence has a scan form" in c.reason for c in skipped.values())
    assert "fused: not a candidate (every recurrence has a scan form" in module.plan.format()


def test_the_workload_moves_the_choice_and_the_explanation_follows():
    """A longer nominal sequence scales every form; the choice stays the one predicted fastest."""
    analysis = _module("paragru").analysis
    for length in (64, 4096):
        planned = plan(analysis, "auto", PlanOptions(workload=Workload(batch=2, length=length)))
        costs = {c.backend: c.seconds for c in planned.costs if c.seconds is not None}
        assert planned.backend is min(costs, key=costs.__getitem__)
        assert f"T = {length}" in planned.format()


def test_newton_is_not_analysed_when_even_a_diagonal_jacobian_loses():
    """A large LSTM: the lower bound (a diagonal Jacobian) already exceeds the loop, so the
    structure (seconds of pattern propagation for 512 state elements) is never computed."""
    module = recdsl.compile(EXAMPLES / "lstm.rec", d_in=256, d=256)
    (newton,) = [c for c in module.plan.costs if c.backend is BackendKind.NEWTON]
    sequential = next(c for c in module.plan.costs if c.backend is BackendKind.SEQUENTIAL)
    assert newton.seconds > sequential.seconds and newton.reason.startswith("at least")
    assert "newton: " in module.plan.format() and "its structure was not analysed" in module.plan.format()
