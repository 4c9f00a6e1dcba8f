"""BiGRU (examples/bigru.rec, a reverse state) on the step-by-step backends, CPU, one thread.

    flock /tmp/recdsl-bench.lock python benchmarks/bench_bigru.py [--batch 4 --length 1024 --d 128]

Times the forward and the forward+backward of ``sequential`` (the loop of torch ops),
``fused`` (two compiled C loops, the reverse one over the flipped sequence) and ``newton``
(one Newton solve per direction), with ``torch.nn.GRU(bidirectional=True)`` as a yardstick;
best of ``--repeats`` runs each, and every ratio against ``sequential`` from the same run.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def best_of(repeats: int, run) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="sequential,fused,newton")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.d)
    reference = recdsl.compile(EXAMPLES / "bigru.rec", backend="sequential", d_in=args.d, d=args.d)
    rows = []
    for name in args.backends.split(","):
        module = recdsl.compile(EXAMPLES / "bigru.rec", backend=name, d_in=args.d, d=args.d)
        module.load_state_dict(reference.state_dict())
        inputs = x.clone().requires_grad_(True)

        def forward(module=module):
            with torch.no_grad():
                module(x)

        def training(module=module, inputs=inputs):
            h, g = module(inputs)
            (h.sum() + g.sum()).backward()

        forward()  # compiles the C loop, warms the caches
        rows.append((name, best_of(args.repeats, forward), best_of(args.repeats, training)))
    gru = torch.nn.GRU(args.d, args.d, batch_first=True, bidirectional=True)
    inputs = x.clone().requires_grad_(True)

    def torch_forward():
        with torch.no_grad():
            gru(x)

    def torch_training():
        out, _ = gru(inputs)
        out.sum().backward()

    torch_forward()
    rows.append(("torch.nn.GRU (bidirectional)", best_of(args.repeats, torch_forward), best_of(args.repeats, torch_training)))
    base = dict((name, (f, t)) for name, f, t in rows).get("sequential")
    print(f"BiGRU, B = {args.batch}, T = {args.length}, d_in = d = {args.d}, float32, 1 thread, best of {args.repeats}")
    print("| backend | forward (s) | vs sequential | forward+backward (s) | vs sequential |")
    print("|---|---|---|---|---|")
    for name, f, t in rows:
        ratio_f = f"{base[0] / f:.1f}x" if base else "-"
        ratio_t = f"{base[1] / t:.1f}x" if base else "-"
        print(f"| {name} | {f:.3f} | {ratio_f} | {t:.3f} | {ratio_t} |")


if __name__ == "__main__":
    main()
