"""benchmarks/traffic.py counts bytes as its docstring says: broadcast dims once, views free,
kernel launches by their pointers' footprints, never less than the minimum."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import traffic  # noqa: E402


def test_broadcast_dims_count_once():
    row = torch.randn(1, 8)
    assert traffic.footprint(row.expand(100, 8)) == 8 * 4
    assert traffic.footprint(torch.randn(3, 8).t()) == 24 * 4


def test_views_are_free_and_ops_read_their_arguments_and_write_their_results():
    a, b = torch.randn(16, 4), torch.randn(4)
    counted = traffic.Traffic()
    with traffic.CountingMode(counted):
        a.view(4, 16).t()
        c = a + b  # reads 64 + 4 floats, writes 64
        c.add_(1.0)  # reads and writes 64
        c.copy_(a)  # reads 64 (a), writes 64 (c)
    assert counted.ops == 3
    assert counted.read == (64 + 4 + 64 + 64) * 4
    assert counted.written == 3 * 64 * 4


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_a_layer_moves_at_least_its_minimum_and_the_triton_backend_launches_its_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    layer = traffic.Layer("mingru", dict(d_in=8, d=16))
    row = traffic.measure(layer, "triton", batch=2, length=40)
    assert (row.forward.kernels, row.backward.kernels) == (1, 1)
    assert row.forward.kernel_bytes > 0
    assert row.forward.total >= row.ideal_forward and row.backward.total >= row.ideal_backward
    scan = traffic.measure(layer, "scan", batch=2, length=40)
    assert scan.forward.kernels == 0 and scan.forward.total >= scan.ideal_forward
