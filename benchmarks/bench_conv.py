"""The convolution form of time-invariant recurrences (S4D) against the scan and the loop.

S4D (examples/s4d.rec) at d = 256 channels and N = 64 complex modes per channel: the scan
stores the [B, T, d, N] state of every step, the convolution (the chunked backend's form for
a state whose transition reads only params) builds the [T, d] kernel K_l = 2 Re(sum_n C dB
dA^l) and convolves it with the input by FFT.  Forward and forward+backward, best of
``--repeat``, and the peak resident memory a fresh process adds running one forward and backward of
each form (its ``VmHWM`` after a warm-up, less its size before the call; Linux).

    python benchmarks/bench_conv.py                 # B = 2, T = 4096, d = 256, N = 64
    python benchmarks/bench_conv.py --quick         # tiny sizes: checks that it runs
    python benchmarks/bench_conv.py --cpu-time --threads 1
                                                    # CPU time of the process (steadier than
                                                    # the clock on a shared machine)

Ratios are measured within one run; on a shared machine, run it alone.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import recdsl

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "s4d.rec"
clock = time.perf_counter


def _time(module: recdsl.CompiledCell, x: torch.Tensor, repeat: int, backward: bool) -> float:
    best = float("inf")
    for _ in range(repeat + 1):  # the first call warms up
        start = clock()
        if backward:
            module(x).sum().backward()
        else:
            with torch.no_grad():
                module(x)
        elapsed = clock() - start
        best = min(best, elapsed)
    return best


def _peak_bytes(backend: str, batch: int, length: int, d: int, n: int) -> int:
    """Peak resident memory added by one forward and backward, measured in a fresh process.

    Linux: the process's high-water mark (``VmHWM``) is reset to its current size after a
    warm-up (``/proc/self/clear_refs``), so the figure is what the call itself adds.  (Not
    ``ru_maxrss``: it carries the parent's peak across ``exec``.)
    """
    code = (
        "import torch, recdsl, json\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        f"m = recdsl.compile({str(EXAMPLE)!r}, backend={backend!r}, d={d}, N={n})\n"
        f"x = torch.randn({batch}, {length}, {d})\n"
        "m(x[:, :2]).sum().backward()\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status('VmRSS')\n"
        "m(x).sum().backward()\n"
        "print(json.dumps(status('VmHWM') - before))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    return int(json.loads(result.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--d", type=int, default=256)
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sequential", action="store_true", help="also time the loop (slow at these sizes)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time instead of the clock")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    global clock
    if args.cpu_time:
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.batch, args.length, args.d, args.n, args.repeat = 2, 128, 8, 4, 1
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.d)
    backends = (["sequential"] if args.sequential or args.quick else []) + ["scan", "chunked"]
    state_bytes = args.batch * args.length * args.d * args.n * 8  # complex64 states, every step
    print(f"S4D, B = {args.batch}, T = {args.length}, d = {args.d}, N = {args.n} (float32, complex64 state); "
          f"the state sequence is {state_bytes / 2**20:.0f} MiB; {torch.get_num_threads()} threads")
    auto = recdsl.compile(EXAMPLE, d=args.d, N=args.n)
    print(f"auto picks: {auto.backend} ({auto.plan.step('h').form.name.lower()})")
    rows = []
    for backend in backends:
        module = recdsl.compile(EXAMPLE, backend=backend, d=args.d, N=args.n)
        form = module.plan.step("h").form.name.lower()
        forward = _time(module, x, args.repeat, backward=False)
        both = _time(module, x, args.repeat, backward=True)
        peak = _peak_bytes(backend, args.batch, args.length, args.d, args.n)
        rows.append((backend, form, forward, both, peak))
    scan = next(r for r in rows if r[0] == "scan")
    print()
    print("| backend | form | forward | vs scan | forward+backward | vs scan | peak memory (fwd+bwd) | vs state sequence |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, form, forward, both, peak in rows:
        print(f"| {backend} | {form} | {forward * 1e3:.1f} ms | {scan[2] / forward:.2f}x | {both * 1e3:.1f} ms | "
              f"{scan[3] / both:.2f}x | {peak / 2**20:.0f} MiB | {peak / state_bytes:.2f} |")


if __name__ == "__main__":
    main()
