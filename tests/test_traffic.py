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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_scan_only_layers_take_projected_inputs_and_run_in_one_kernel_forward(monkeypatch):
    """The scan-only rows (the recurrence given its projected inputs): each cell runs on the
    Triton scan kernels, its minimum is its per-element inputs and its state, and at a batch
    too small to fill the machine each pass is one look-back kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    scan_only = [layer for layer in traffic.LAYERS if layer.scan_only]
    assert {layer.example for layer in scan_only} == set(traffic.SCAN_CELLS)
    for layer in scan_only:
        row = traffic.measure(layer, "triton", batch=1, length=256)  # 256 steps: T split
        assert row.label.startswith("scan:")
        assert list(row.forward.kernel_names) == ["forward_h_look_back"], row.label
        assert list(row.backward.kernel_names) == ["backward_h_look_back"], row.label
        assert row.forward.total >= row.ideal_forward and row.backward.total >= row.ideal_backward
    mingru = traffic.measure(traffic.Layer("mingru", dict(d=16), scan_only=True), "triton", batch=1, length=100)
    assert mingru.ideal_forward == (2 + 1) * 100 * 16 * 4  # z_pre and hc read, h written
