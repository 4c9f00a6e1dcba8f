"""Block-diagonal transitions and coupled affine groups: the block scan against the loop and the dense scan.

    python benchmarks/bench_blocks.py            # the table of benchmarks/RESULTS_BLOCKS.md
    python benchmarks/bench_blocks.py --quick    # small sizes, a smoke test

Cells: ``examples/state_tracking_lrnn.rec`` (n = 64 blocks of 2 x 2, d = 64) and
``examples/titans.rec`` (Titans with momentum, dk = dv = 16: the momentum and the memory
stacked, 16 columns sharing one 32 x 32 transition).  Each is timed on the sequential
backend and on the scan backend as planned now (``block``: one ``m x m`` matrix per block);
the block-diagonal cell also on the scan backend forced to the form it had before blocks
were detected (``dense``: the transition applied to a basis of the whole 128-element state,
a scan of 128 x 128 matrices; run once, without a warm-up, since one run takes seconds).
Milliseconds, best of ``--repeat`` runs after a warm-up, float32; forward, and forward plus
the backward pass of a loss of the outputs (gradients of every input and parameter).
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


def best_of(run, repeat: int, warm_up: bool = True) -> float:
    if warm_up:
        run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def forced_dense(mod: torch.nn.Module) -> torch.nn.Module:
    """The module with its block scan replaced by the dense matrix scan (the form before blocks were detected)."""
    steps = tuple(replace(s, form=Form.DENSE_MATRIX_SCAN) if s.form is Form.BLOCK_MATRIX_SCAN else s for s in mod.plan.steps)
    mod.plan = replace(mod.plan, steps=steps)
    return mod


def time_forms(path: Path, dims: dict, shapes: dict, batch: int, length: int, repeat: int, forms: dict) -> dict:
    """``forms``: name -> (backend, forced dense, with backward). Returns name -> (forward ms, forward + backward ms or None)."""
    torch.manual_seed(0)
    reference = recdsl.compile(path, backend="sequential", **dims)
    inputs = {name: torch.randn(batch, length, *shape) for name, shape in shapes.items()}
    if "k" in inputs:
        inputs["k"] = torch.nn.functional.normalize(inputs["k"], dim=-1)
    times = {}
    for name, (backend, dense, backward) in forms.items():
        mod = recdsl.compile(path, backend=backend, **dims)
        mod.load_state_dict(reference.state_dict())
        if dense:
            mod = forced_dense(mod)
        runs = 1 if dense else repeat
        with torch.no_grad():
            forward = best_of(lambda: mod(**inputs), runs, warm_up=not dense)
        both = None
        if backward:
            leaves = {n: v.clone().requires_grad_() for n, v in inputs.items()}

            def forward_backward():
                mod(**leaves).square().mean().backward()

            both = best_of(forward_backward, runs, warm_up=not dense)
        times[name] = (forward, both)
    return times


def table(label: str, size: str, times: dict) -> list[str]:
    lines = []
    for name, (forward, both) in times.items():
        ratios = []
        for other in ("sequential", "dense"):
            if other in times and other != name:
                f_other, b_other = times[other]
                text = f"{f_other / forward:.1f}x"
                if both is not None and b_other is not None:
                    text += f" / {b_other / both:.1f}x"
                ratios.append(f"{text} vs {other}")
        both_text = f"{both:.1f}" if both is not None else "-"
        lines.append(f"| {label} | {size} | {name} | {forward:.1f} | {both_text} | {'; '.join(ratios)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the machines have 2 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32, best of {args.repeat}\n")
    print("| cell | size | form | forward (ms) | forward + backward (ms) | speed-up of this form (forward / forward + backward) |")
    print("|---|---|---|---|---|---|")
    long = 256 if args.quick else 4096
    short = 128 if args.quick else 1024
    block_cell = EXAMPLES / "state_tracking_lrnn.rec"
    block_dims, block_shapes = dict(d=64, n=64), {"x": (64,)}
    label = "state tracking LRNN, 64 blocks of 2 x 2"
    with_dense = {"sequential": ("sequential", False, True), "block": ("scan", False, True), "dense": ("scan", True, False)}
    for line in table(label, f"B=1, T={long}", time_forms(block_cell, block_dims, block_shapes, 1, long, args.repeat, with_dense)):
        print(line, flush=True)
    dense_backward = {"sequential": ("sequential", False, True), "block": ("scan", False, True), "dense": ("scan", True, True)}
    for line in table(label, f"B=1, T={short}", time_forms(block_cell, block_dims, block_shapes, 1, short, args.repeat, dense_backward)):
        print(line, flush=True)
    plain = {"sequential": ("sequential", False, True), "block": ("scan", False, True)}
    for line in table(label, f"B=4, T={long}", time_forms(block_cell, block_dims, block_shapes, 4, long, args.repeat, plain)):
        print(line, flush=True)
    titans_shapes = {"q": (16,), "k": (16,), "v": (16,), "a": (), "e": (), "g": ()}
    label = "Titans with momentum, dk = dv = 16"
    for line in table(label, f"B=4, T={short}", time_forms(EXAMPLES / "titans.rec", dict(dk=16, dv=16), titans_shapes, 4, short, args.repeat, plain)):
        print(line, flush=True)


if __name__ == "__main__":
    main()
