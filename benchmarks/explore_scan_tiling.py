"""Exploration of the diagonal scan kernels' tiling on a GPU (not a benchmark of the project).

For ``h = a * h + b`` at ``B x T x d`` float32, the one-pass and look-back forms under
``BLOCK_T`` in {32, 64, 128} and ``BC`` capped at {16, 32, 64}: forward and forward+backward
milliseconds (best of 7) and the largest difference from the default one-pass output and
gradients.  The tiling is patched into ``recdsl.backends.triton_backend`` for this process
only: the backend itself takes no tiling options.

    python benchmarks/explore_scan_tiling.py 8 4096 1024        # on a CUDA machine
    TRITON_INTERPRET=1 python benchmarks/explore_scan_tiling.py  # anywhere, tiny sizes

The table of one H200 run is in benchmarks/RESULTS_GPU.md.
"""

import os
import sys
import time

import torch

import recdsl
from recdsl.backends import triton_backend as tb
from bench_triton import SCAN_CELL  # h = a * h + b (benchmarks/ is the script's directory)

interpret = os.environ.get("TRITON_INTERPRET") == "1"
device = "cpu" if interpret else "cuda"
B, T, D = (1, 200, 16) if interpret else (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
repeat = 1 if interpret else 7
original_block_c = tb._block_c

def timed(fn):
    def once():
        if device == "cuda": torch.cuda.synchronize()
        t = time.perf_counter(); fn()
        if device == "cuda": torch.cuda.synchronize()
        return time.perf_counter() - t
    once()
    return min(once() for _ in range(repeat)) * 1e3

torch.manual_seed(0)
a = torch.rand(B, T, D, device=device) * 0.2 + 0.8
b = torch.randn(B, T, D, device=device)
dy = torch.randn(B, T, D, device=device)
base = recdsl.compile(SCAN_CELL, backend="triton", backend_options={"split_programs": 0}, d=D).to(device)
with torch.no_grad():
    expected = base(a, b).double()
ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
base(ag, bg).backward(dy)
expected_grads = (ag.grad.double(), bg.grad.double())
scale = expected.abs().max().item()
copy = torch.empty_like(a)
copy_ms = timed(lambda: copy.copy_(a))
print(f"B={B} T={T} d={D}: copy {copy_ms:.4f} ms ({2 * a.numel() * 4 / copy_ms / 1e6:.0f} GB/s); 12 B/element at copy speed = {1.5 * copy_ms:.4f} ms")
print("| BT | BC | form | fwd ms | fraction of copy-speed bound | fwd+bwd ms | max rel err fwd | max rel err grads |")
print("|---|---|---|---|---|---|---|---|")
for bt in (32, 64, 128):
    for cap in (16, 32, 64):
        tb.BLOCK_T = bt
        tb._block_c = lambda channels, cap=cap: min(original_block_c(channels), cap)
        for label, target in (("one pass", 0), ("look-back", 10**6)):
            try:
                m = recdsl.compile(SCAN_CELL, backend="triton", backend_options={"split_programs": target, "split_min_steps": bt}, d=D).to(device)
                with torch.no_grad():
                    got = m(a, b).double()
                    fwd = timed(lambda: m(a, b))
                err = ((got - expected).abs().max() / scale).item()
                ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
                m(ag, bg).backward(dy)
                gerr = max(((g.grad.double() - e).abs().max() / e.abs().max()).item() for g, e in ((ag, expected_grads[0]), (bg, expected_grads[1])))
                def both():
                    x, y = a.clone().requires_grad_(), b.clone().requires_grad_()
                    m(x, y).backward(dy)
                fb = timed(both)
                print(f"| {bt} | {cap} | {label} | {fwd:.4f} | {1.5 * copy_ms / fwd:.0%} | {fb:.4f} | {err:.1e} | {gerr:.1e} |", flush=True)
            except Exception as error:
                print(f"| {bt} | {cap} | {label} | {type(error).__name__}: {str(error)[:120]} |", flush=True)
tb.BLOCK_T, tb._block_c = 32, original_block_c
