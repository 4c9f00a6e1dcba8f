"""Block-diagonal transitions and coupled affine groups: the block scan against the loop and the dense scan.

    python benchmarks/bench_blocks.py            # the table of benchmarks/RESULTS_BLOCKS.md
    python benchmarks/bench_blocks.py --quick    # small sizes, a smoke test

Cells: ``examples/state_tracking_lrnn.rec`` (n = 64 blocks of 2 x 2, d = 64) and
``examples/titans.rec`` (Titans with momentum, dk = dv = 16: the momentum and memory
stacked, 16 columns sharing one 32 x 32 transition).  Each is timed on the sequential
backend, on the scan backend as planned now (``block``: one ``m x m`` matrix per block) and,
for the block-diagonal cell, on the scan backend forced to the form it had before blocks
were detected (``dense``: the transition applied to a basis of the whole 128-element state,
a scan of 128 x 128 matrices).  Milliseconds, best of ``--repeat`` runs after a warm-up,
float32, forward and forward + backward (gradients of every input and parameter).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

import recdsl
from recdsl.plan import Form

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def best_of(run, repeat: int) -> float:
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def forced_dense(mod: torch.nn.Module) -> torch.nn.Module:
    """The module with its block scan replaced by the dense matrix scan (the form before this change)."""
    steps = tuple(replace(s, form=Form.DENSE_MATRIX_SCAN) if s.form is Form.BLOCK_MATRIX_SCAN else s for s in mod.plan.steps)
    mod.plan = replace(mod.plan, steps=steps)
    return mod


def time_cell(label: str, path: Path, dims: dict, shapes: dict, batch: int, length: int, repeat: int, dense: bool) -> list[str]:
    torch.manual_seed(0)
    sequential = recdsl.compile(path, backend="sequential", **dims)
    modules = {"sequential": sequential, "block": recdsl.compile(path, backend="scan", **dims)}
    if dense:
        modules["dense"] = forced_dense(recdsl.compile(path, backend="scan", **dims))
    for mod in modules.values():
        mod.load_state_dict(sequential.state_dict())
    inputs = {name: torch.randn(batch, length, *shape) for name, shape in shapes.items()}
    if "k" in inputs:
        inputs["k"] = torch.nn.functional.normalize(inputs["k"], dim=-1)
    rows = []
    for name, mod in modules.items():
        with torch.no_grad():
            forward = best_of(lambda: mod(**inputs), repeat)
        leaves = {n: v.clone().requires_grad_() for n, v in inputs.items()}

        def forward_backward():
            mod(**leaves).square().mean().backward()

        both = best_of(forward_backward, repeat)
        rows.append((name, forward, both))
    base = {name: (f, b) for name, f, b in rows}
    lines = []
    for name, forward, both in rows:
        ratios = []
        for other in ("sequential", "dense"):
            if other in base and other != name:
                ratios.append(f"{base[other][0] / forward:.1f}x / {base[other][1] / both:.1f}x vs {other}")
        lines.append(f"| {label} | B={batch}, T={length} | {name} | {forward:.1f} | {both:.1f} | {'; '.join(ratios)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    length = 256 if args.quick else 4096
    print("| cell | size | form | forward (ms) | forward + backward (ms) | speed-up (forward / forward + backward) |")
    print("|---|---|---|---|---|---|")
    block = dict(d=64, n=64)
    for line in time_cell("block-diagonal LRNN, 64 blocks of 2 x 2", EXAMPLES / "state_tracking_lrnn.rec", block, {"x": (64,)}, 1, length, args.repeat, dense=True):
        print(line, flush=True)
    for line in time_cell("block-diagonal LRNN, 64 blocks of 2 x 2", EXAMPLES / "state_tracking_lrnn.rec", block, {"x": (64,)}, 4, length, args.repeat, dense=False):
        print(line, flush=True)
    titans = dict(dk=16, dv=16)
    shapes = {"q": (16,), "k": (16,), "v": (16,), "a": (), "e": (), "g": ()}
    for line in time_cell("Titans with momentum, dk = dv = 16", EXAMPLES / "titans.rec", titans, shapes, 4, 1024 if not args.quick else 128, args.repeat, dense=False):
        print(line, flush=True)


if __name__ == "__main__":
    main()
