"""Packed variable-length batches (``cu_seqlens``) against the two ways a user would do without them.

For a few example cells and backends, N sequences of random lengths (1 to 2 x mean) are run
three ways, forward and backward:

- ``packed``: one call, ``mod(x, cu_seqlens=offsets)`` (states reset at each boundary);
- ``one by one``: a Python loop of N calls, one per sequence;
- ``padded``: one call on a ``[N, max_len, ...]`` batch padded at the end (gives the
  outputs, but not the final states, which the padding runs on past each sequence's end;
  for a cell with reverse states, LION and BiGRU, not the outputs either: the reverse
  states start in the padding, so that column is a time only).

Then the cost of ``mod.step`` (decoding): one call per step against the sequential
loop's time per step over a whole sequence, forward only.

    python benchmarks/bench_varlen.py            # N = 64 sequences of mean length 64, best of 3, one thread
    python benchmarks/bench_varlen.py --quick    # tiny sizes: checks that it runs

Ratios are measured within one run; on a shared machine, run it alone (under
``flock /tmp/recdsl-bench.lock``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

CASES = [
    ("mingru", "scan", dict(d_in=64, d=64)),
    ("mingru", "sequential", dict(d_in=64, d=64)),
    ("gla", "chunked", dict(dk=64, dv=64)),
    ("deltanet", "chunked", dict(dk=32, dv=32)),
    ("gru", "sequential", dict(d_in=64, d=64)),
    ("gru", "fused", dict(d_in=64, d=64)),
    ("lion", "chunked", dict(dk=64, dv=64)),  # reverse states: packed flips the batch for Sb, zb
    ("bigru", "sequential", dict(d_in=64, d=64)),
]


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--mean-length", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)")
    parser.add_argument("--cells", nargs="*", help="only these example cells (default: all of them)")
    args = parser.parse_args()
    if args.quick:
        args.sequences, args.mean_length, args.heads, args.repeats = 4, 5, 1, 1
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    lengths = torch.randint(1, 2 * args.mean_length, (args.sequences,)).tolist()
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int64)
    total, longest = int(offsets[-1]), max(lengths)
    print(f"N = {args.sequences} sequences, total T = {total}, longest {longest}, {args.heads} heads; forward + backward, best of {args.repeats}, {args.threads} thread(s)")
    print(f"{'cell':10s} {'backend':11s} {'packed':>9s} {'one by one':>11s} {'padded':>9s}   packed vs one by one, vs padded")
    for name, backend, dims in CASES:
        if args.cells and name not in args.cells:
            continue
        if args.quick:
            dims = {k: min(v, 4) for k, v in dims.items()}
        module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **dims)
        packed = {i.name: torch.randn(1, total, args.heads, *i.type.shape, requires_grad=True) for i in module.cell.inputs}
        padded = {n: torch.zeros(args.sequences, longest, *v.shape[2:]) for n, v in packed.items()}
        for n, v in packed.items():
            for s, length in enumerate(lengths):
                padded[n][s, :length] = v[0, int(offsets[s]) : int(offsets[s]) + length].detach()
            padded[n].requires_grad_(True)

        def run_packed():
            out = module(**packed, cu_seqlens=offsets)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        def run_one_by_one():
            for s in range(args.sequences):
                a, b = int(offsets[s]), int(offsets[s + 1])
                out = module(**{n: v[:, a:b] for n, v in packed.items()})
                (out[0] if isinstance(out, tuple) else out).sum().backward()

        def run_padded():
            out = module(**padded)
            (out[0] if isinstance(out, tuple) else out).sum().backward()

        times = [_best(fn, args.repeats) for fn in (run_packed, run_one_by_one, run_padded)]
        print(
            f"{name:10s} {backend:11s} {times[0] * 1e3:8.1f}ms {times[1] * 1e3:10.1f}ms {times[2] * 1e3:8.1f}ms"
            f"   {times[1] / times[0]:5.1f}x faster, {times[2] / times[0]:5.2f}x",
            flush=True,
        )

    print(f"\nmod.step(), B = 4, {args.heads} heads, forward only: time per call against the sequential loop's time per step")
    for name, dims in [("gru", dict(d_in=64, d=64)), ("gla", dict(dk=64, dv=64))]:
        if args.cells and name not in args.cells:
            continue
        if args.quick:
            dims = {k: min(v, 4) for k, v in dims.items()}
        module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **dims)
        steps = 16 if args.quick else 256
        x = {i.name: torch.randn(4, steps, args.heads, *i.type.shape) for i in module.cell.inputs}

        def stepping():
            state = None
            for t in range(steps):
                _, state = module.step(**{n: v[:, t] for n, v in x.items()}, state=state)

        with torch.no_grad():
            per_call = _best(stepping, args.repeats) / steps
            per_step = _best(lambda: module(**x), args.repeats) / steps
        print(f"{name:10s} step() {per_call * 1e6:8.0f} us   loop {per_step * 1e6:8.0f} us/step   ratio {per_call / per_step:5.2f}", flush=True)


if __name__ == "__main__":
    main()
