"""The backends on a CUDA device, compiled (no interpreter), against the sequential reference on the CPU.

Skipped on machines without a GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``.  Every example on every backend that can run it:
the generated Triton kernels (scan, chunked and fused sequential), and the torch forms
(scan, chunked, newton) on CUDA tensors, float64 exact and float32 to 1e-4 of scale, with
gradients; bfloat16 inputs accumulate in float32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import recdsl
from recdsl.plan import BackendKind, PlanOptions, Unsupported, plan_backend
from recdsl.testing import Example, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

KINDS = [BackendKind.TRITON, BackendKind.SCAN, BackendKind.CHUNKED, BackendKind.NEWTON]


def _backends(module: recdsl.CompiledCell) -> list[str]:
    runnable = []
    for kind in KINDS:
        if kind is BackendKind.TRITON and importlib.util.find_spec("triton") is None:
            continue
        if not isinstance(plan_backend(module.analysis, kind, PlanOptions()), Unsupported):
            runnable.append(kind.value)
    return runnable


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


@pytest.mark.parametrize("name", sorted(DIMS))
@pytest.mark.parametrize("length", [1, 37, 130])
def test_float64_on_cuda_matches_sequential(name, length):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    backends = _backends(module)
    if not backends:
        pytest.skip("no backend but the sequential loop runs this cell")
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(2,), seed=length, with_state=True))
    mismatches = compare_backends(module, backends, inputs, state, seed=length, device="cuda")
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", sorted(DIMS))
def test_float32_on_cuda_matches_sequential(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    backends = _backends(module)
    if not backends:
        pytest.skip("no backend but the sequential loop runs this cell")
    inputs, _ = random_inputs(module, Example(batch=3, length=300, heads=(), seed=5, with_state=False))
    inputs = {n: v.to(torch.complex64 if v.is_complex() else torch.float32) for n, v in inputs.items()}
    mismatches = compare_backends(module, backends, inputs, None, seed=5, device="cuda", rtol=1e-4, atol=1e-5)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", ["mingru", "gla", "gru"])
def test_bfloat16_inputs_accumulate_in_float32_on_cuda(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **DIMS[name]).cuda()
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name])
    reference.load_state_dict(module.state_dict())
    inputs, _ = random_inputs(reference, Example(batch=2, length=200, heads=(), seed=1, with_state=False))
    low = {n: v.to(torch.bfloat16) for n, v in inputs.items()}
    got = module(**{n: v.cuda() for n, v in low.items()})
    got = got[0] if isinstance(got, tuple) else got
    expected = reference(**{n: v.float() for n, v in low.items()})
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), expected.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("n", [16, 64])
def test_fused_selective_scan_on_cuda_at_layer_width(n):
    """S6's fused selective scan (backends/triton_selective.py) compiled, at d = 96 (several blocks
    of channels) and Mamba's n = 16 or n = 64, over 300 steps (several checkpoints, the states
    between them recomputed), float64 with every gradient against the sequential reference."""
    from recdsl.plan import Form

    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "s6.rec", d=96, n=n).double()
    assert recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=96, n=n).plan.steps[0].form is Form.TRITON_SELECTIVE_SCAN
    inputs, state = random_inputs(module, Example(batch=2, length=300, heads=(), seed=3, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3, device="cuda")
    assert not mismatches, "\n".join(map(str, mismatches))
