"""LION-S (bidirectional linear attention, examples/lion.rec) on the CPU backends.

The target of issue 10: at dk = dv = 64, 4 heads, T = 4096, the chunked form at least 2x
faster than the sequential loop, and within 1.5x of two chunked passes of the same-size
causal cell (LION's forward half alone, below), since a bidirectional cell is two causal
ones plus the shift of the delayed decay.

    python benchmarks/bench_lion.py            # B = 1, T = 4096, best of 3
    python benchmarks/bench_lion.py --quick    # tiny sizes: checks that it runs

Ratios are measured within one run; on a shared machine, run it under
`flock /tmp/recdsl-bench.lock`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# LION-S's forward half: the causal cell of the same size.
CAUSAL = """
cell LIONCausal(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input a: []
    state Sf: [dk, dv] = 0
    state zf: [dk] = 0
    lam = sigmoid(a)
    qf = softplus(q)
    kf = softplus(k)
    Sf = lam * Sf + outer(kf, v)
    zf = lam * zf + kf
    out y = (qf @ Sf) / (qf @ zf)
}
"""


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    batch, length, heads, dk, dv, repeats = args.batch, args.length, 4, 64, 64, args.repeats
    if args.quick:
        batch, length, heads, dk, dv, repeats = 1, 100, 2, 8, 8, 1
    torch.manual_seed(0)
    q, k = torch.randn(batch, length, heads, dk), torch.randn(batch, length, heads, dk)
    v, a = torch.randn(batch, length, heads, dv), torch.randn(batch, length, heads) + 2.0
    inputs = (q, k, v, a)

    def timed(module) -> tuple[float, float]:
        def forward():
            with torch.no_grad():
                module(*inputs)

        leaves = [x.detach().requires_grad_() for x in inputs]

        def forward_backward():
            module(*leaves).sum().backward()

        forward()  # warm-up
        return best_of(repeats, forward), best_of(repeats, forward_backward)

    # (The scan form stores every step's [dk, dv] states, gigabytes at these sizes: not timed.)
    lion = {backend: recdsl.compile(EXAMPLES / "lion.rec", dk=dk, dv=dv, backend=backend) for backend in ("sequential", "chunked")}
    causal = recdsl.compile(CAUSAL, dk=dk, dv=dv, backend="chunked")
    auto = recdsl.compile(EXAMPLES / "lion.rec", dk=dk, dv=dv)
    print(f"LION-S, B = {batch}, T = {length}, {heads} heads, dk = dv = {dk}, float32, best of {repeats}; auto picks {auto.backend}")
    results = {name: timed(module) for name, module in lion.items()}
    results["causal chunked (x2)"] = tuple(2 * t for t in timed(causal))
    print(f"{'form':<22} {'forward':>10} {'fwd+bwd':>10}")
    for name, (forward, both) in results.items():
        print(f"{name:<22} {forward * 1e3:>8.1f}ms {both * 1e3:>8.1f}ms")
    chunked, sequential, twice = results["chunked"], results["sequential"], results["causal chunked (x2)"]
    print(f"chunked vs sequential: {sequential[0] / chunked[0]:.2f}x faster (forward), {sequential[1] / chunked[1]:.2f}x (fwd+bwd)")
    print(f"chunked vs two causal chunked passes: {chunked[0] / twice[0]:.2f}x the time (forward), {chunked[1] / twice[1]:.2f}x (fwd+bwd)")


if __name__ == "__main__":
    main()
