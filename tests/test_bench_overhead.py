"""benchmarks/bench_overhead.py at tiny sizes (no timing asserted), and the per-call shortcuts
of the Triton call path it measures: the generated source hashed once, constant initial
states evaluated once per dtype and device, no autograd.Function without a gradient."""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
import sys
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.backends.kernel_cache import GeneratedSource

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_overhead  # noqa: E402

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCAN = bench_overhead.SCAN_CELL


@needs_triton
def test_the_benchmark_prints_a_row_per_layer_with_calls_and_launches(monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert bench_overhead.main(["--quick", "--layers", "scan", "mingru", "gru"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| layer")]
    assert [r[0] for r in rows] == ["scan(d=4)", "mingru(d_in=3, d=8)", "mingru(d_in=3, d=8, heads=16)", "gru(d_in=3, d=4)"]
    for row in rows:
        forward_us, both_us, forward_calls, both_calls, forward_launches, both_launches = (float(c) for c in row[1:])
        assert forward_us > 0 and both_us > 0
        assert 0 < forward_calls < both_calls  # the backward's Python calls come on top
        assert forward_launches >= 1 and both_launches > forward_launches  # a backward kernel too


def test_generated_source_carries_its_digest_through_pickle():
    text = "def f():\n    return 1\n"
    source = GeneratedSource(text)
    assert source == text and isinstance(source, str)
    assert source.digest == hashlib.sha256(text.encode("utf-8")).hexdigest()
    copied = pickle.loads(pickle.dumps(source))
    assert isinstance(copied, GeneratedSource) and copied == text and copied.digest == source.digest


@needs_triton
def test_a_triton_plan_holds_its_source_hashed(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = recdsl.compile(SCAN, backend="triton", d=4)
    source = module.plan.kernel_source
    assert isinstance(source, GeneratedSource)
    assert source.digest == hashlib.sha256(str(source).encode("utf-8")).hexdigest()


@needs_triton
def test_no_grad_calls_and_grad_calls_agree_and_the_constant_initial_state_follows_the_dtype(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    module = recdsl.compile(SCAN, backend="triton", d=4)
    reference = recdsl.compile(SCAN, backend="sequential", d=4)
    a, b = torch.rand(2, 5, 4), torch.randn(2, 5, 4)
    with torch.no_grad():
        quiet, quiet_state = module(a, b, return_state=True)
    traced = module(a.requires_grad_(), b.requires_grad_())
    assert not quiet.requires_grad and traced.requires_grad
    torch.testing.assert_close(quiet, traced.detach())
    torch.testing.assert_close(quiet, reference(a.detach(), b.detach()))
    # The initial value (0) was evaluated once in float32; a float64 call gets float64 states.
    wide, wide_state = module.double()(a.detach().double(), b.detach().double(), return_state=True)
    assert wide.dtype == torch.float64 and wide_state["h"].dtype == torch.float64
    torch.testing.assert_close(wide, quiet.double())
    assert "_initial_values" not in pickle.loads(pickle.dumps(module)).__dict__


def test_an_initial_state_that_reads_a_param_follows_the_param():
    source = "cell C(d) {\n input x: [d]\n param h0: [d] = zeros\n state h: [d] = h0\n h = 0.5 * h + x\n out h\n}\n"
    module = recdsl.compile(source, backend="scan", d=3)
    x = torch.zeros(1, 1, 3)
    assert torch.equal(module(x), torch.zeros(1, 1, 3))
    with torch.no_grad():
        module.h0.fill_(2.0)
    torch.testing.assert_close(module(x), torch.full((1, 1, 3), 1.0))
