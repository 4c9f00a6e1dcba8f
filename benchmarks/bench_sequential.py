"""The step-by-step forms: how the sequential backend scales with T, and the fused form against torch's RNNs.

    python benchmarks/bench_sequential.py                # both tables (CPU: a few minutes)
    python benchmarks/bench_sequential.py --quick        # small sizes, one repeat: a smoke test
    python benchmarks/bench_sequential.py --threads 1    # torch's intra-op threads (the fused loop uses one)

Table 1, scaling: minGRU (examples/mingru.rec) on the sequential backend, B = 4,
d_in = d = 256, forward+backward at T = 512 ... 4096, with the time per step and the ratio
to T = 512 (linear growth gives 8x at T = 4096).

Table 2, cells that stay sequential: examples/gru.rec and examples/lstm.rec at B = 4,
T = 2048, d_in = d = 128 on the ``fused`` backend (and, with --sequential, the sequential
backend) against torch.nn.GRU / torch.nn.LSTM with the same sizes, forward (with autograd
recording, as in training) and forward+backward; the ratio column is fused / torch.

Each time is the best of --repeat runs after a warm-up (the first fused call compiles
its C loop; that is not timed).  Quote ratios from one run: the machine may be shared.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# The clock the tables use: wall time, or (--cpu-time) the process's CPU time, steadier on
# a machine shared with other jobs (a process waiting for a core accrues none).
clock = time.perf_counter


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """The fastest of ``repeat`` calls of ``fn`` after one warm-up call, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def forward_backward(module: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        out = module(x)
        out = out[0] if isinstance(out, tuple) else out
        out.sum().backward()

    return run


def scaling_table(lengths: list[int], batch: int, width: int, repeat: int) -> list[str]:
    module = recdsl.compile(EXAMPLES / "mingru.rec", backend="sequential", d_in=width, d=width)
    lines = [f"## sequential backend, minGRU, B = {batch}, d_in = d = {width}: forward+backward", "", "| T | ms | ms per step | vs first T |", "|---|---|---|---|"]
    first = None
    for length in lengths:
        x = torch.randn(batch, length, width, requires_grad=True)
        seconds = best_time(forward_backward(module, x), repeat)
        first = first or seconds
        lines.append(f"| {length} | {seconds * 1e3:.0f} | {seconds * 1e3 / length:.3f} | {seconds / first:.1f}x |")
    return lines


def cells_table(length: int, batch: int, width: int, repeat: int, sequential: bool) -> list[str]:
    lines = [
        f"## cells that stay sequential, B = {batch}, T = {length}, d_in = d = {width}",
        "",
        "| cell | form | forward ms | forward+backward ms | forward vs torch | fwd+bwd vs torch |",
        "|---|---|---|---|---|---|",
    ]
    torch_layers = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}
    for name, layer in torch_layers.items():
        reference = layer(width, width, batch_first=True)
        x = torch.randn(batch, length, width)
        x_grad = x.clone().requires_grad_(True)
        rows: list[tuple[str, float, float]] = []
        rows.append((f"torch.nn.{name.upper()}", best_time(lambda: reference(x), repeat), best_time(forward_backward(reference, x_grad), repeat)))
        backends = ["fused"] + (["sequential"] if sequential else [])
        for backend in backends:
            module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, d_in=width, d=width)
            runs = repeat if backend == "fused" else 1
            rows.append((f"recdsl {backend}", best_time(lambda: module(x), runs), best_time(forward_backward(module, x_grad), runs)))
        base_forward, base_backward = rows[0][1], rows[0][2]
        for form, forward, both in rows:
            lines.append(f"| {name} | {form} | {forward * 1e3:.0f} | {both * 1e3:.0f} | {forward / base_forward:.2f}x | {both / base_backward:.2f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--sequential", action="store_true", help="also time the sequential backend on GRU and LSTM (slow)")
    parser.add_argument("--only", choices=["scaling", "cells"], default=None)
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time (with --threads 1 on a shared machine)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global clock
        clock = time.process_time
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; best of {1 if args.quick else args.repeat}; {'CPU time' if args.cpu_time else 'wall time'}")
    repeat = 1 if args.quick else args.repeat
    if args.only in (None, "scaling"):
        lengths = [16, 64] if args.quick else [512, 1024, 2048, 4096]
        print("\n".join(["", *scaling_table(lengths, 4, 16 if args.quick else 256, repeat)]))
    if args.only in (None, "cells"):
        print("\n".join(["", *cells_table(64 if args.quick else 2048, 4, 16 if args.quick else 128, repeat, args.sequential)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
