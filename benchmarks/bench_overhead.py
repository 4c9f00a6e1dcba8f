"""Host (Python and CPU) overhead of one call of a Triton-backend layer, kernels recorded, not run.

    python benchmarks/bench_overhead.py                       # the table (Markdown) on stdout
    python benchmarks/bench_overhead.py --layers scan mingru  # some of the layers
    python benchmarks/bench_overhead.py --quick               # tiny sizes, one round: a smoke test
    flock /tmp/recdsl-bench.lock python benchmarks/bench_overhead.py   # numbers to quote (shared machine)

What is measured, per layer: the microseconds of one call on the host, forward
under ``torch.no_grad()`` and forward+backward (``torch.autograd.grad`` of every output
with respect to every input and parameter, with a fixed output gradient: no ``.grad``
accumulation), inside :func:`recdsl.backends.triton_launch.observe_launches` with
``run_kernels=False``: every Triton launch is recorded with its arguments but the kernel
never runs.  What is left is the host's work: recdsl's Python around the kernels (input
checks, plan interpretation, layouts, autograd glue) and the torch ops it dispatches
(projections, casts, views, allocations).  The sizes are small (``--batch``, ``--length``:
by default B = 2, T = 16) so that those torch ops' arithmetic on the CPU stays small beside
their dispatch, and torch runs on one CPU thread (``--threads``; waking a thread pool for a
tiny op costs milliseconds of noise on a shared machine); recdsl's own per-call work does
not depend on the sizes.  Each time is the
best of ``--repeat`` short rounds of ``--calls`` calls (mean within a round; short rounds so that some run while a shared machine is quiet), after a warm-up
that loads the kernels.  The clock (``--clock``) is by default the CPU time of the calling
thread (``time.thread_time``: torch's ops and the autograd engine's CPU work run on it with
one thread), which time spent descheduled on a shared machine does not inflate;
``--clock wall`` measures elapsed time.

Also per call: Python function calls (``sys.setprofile`` 'call' events: functions written
in Python, torch's and Triton's included; C functions not counted) and kernel launches.

On a GPU a layer's time per call is at least the larger of this host time and the device
time of its kernels; the two overlap (the host queues kernels asynchronously) only where
the host is ahead of the kernels, so for short sequences or small batches the host time
is what a call costs.  Under ``TRITON_INTERPRET=1`` (set here when it is unset) CPU
tensors pass the backend's device check; ``--device cuda`` measures CUDA tensors.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

import recdsl
from bench_triton import SCAN_CELL  # the first-order scan h = a * h + b (benchmarks/ is the script's directory)
from recdsl.backends.triton_launch import observe_launches

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@dataclass(frozen=True)
class Layer:
    """One benchmarked layer: a cell (source text or example file), its dims and head dims."""

    name: str
    source: str | Path
    dims: dict = field(default_factory=dict)
    heads: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        heads = f", heads={'x'.join(map(str, self.heads))}" if self.heads else ""
        return f"{self.name}({dims}{heads})"


LAYERS = (
    Layer("scan", SCAN_CELL, dict(d=64)),
    Layer("mingru", EXAMPLES / "mingru.rec", dict(d_in=4, d=1024)),
    Layer("mingru", EXAMPLES / "mingru.rec", dict(d_in=4, d=64), heads=(16,)),
    Layer("lru", EXAMPLES / "lru.rec", dict(d=16, n=256)),
    Layer("s6", EXAMPLES / "s6.rec", dict(d=64, n=16)),
    Layer("gla", EXAMPLES / "gla.rec", dict(dk=64, dv=64), heads=(4,)),
    Layer("deltanet", EXAMPLES / "deltanet.rec", dict(dk=64, dv=64), heads=(4,)),
    Layer("gru", EXAMPLES / "gru.rec", dict(d_in=16, d=64)),
)

QUICK = dict(scan=dict(d=4), mingru=dict(d_in=3, d=8), lru=dict(d=3, n=4), s6=dict(d=3, n=4), gla=dict(dk=4, dv=3), deltanet=dict(dk=4, dv=3), gru=dict(d_in=3, d=4))


@dataclass(frozen=True)
class Measurement:
    label: str
    forward_us: float
    backward_us: float  # forward and backward together
    forward_calls: float  # Python function calls per call
    backward_calls: float
    forward_launches: float
    backward_launches: float


def _inputs(module, layer: Layer, batch: int, length: int, device: str) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    values = []
    for declared in module.cell.inputs:
        shape = (batch, length, *layer.heads, *declared.type.shape)
        value = 0.5 * torch.randn(shape, generator=generator)
        if declared.type.kind.name == "COMPLEX":
            value = torch.complex(value, 0.5 * torch.randn(shape, generator=generator))
        if declared.name == "k" and layer.name == "deltanet":  # the delta rule expects unit keys
            value = torch.nn.functional.normalize(value, dim=-1)
        values.append(value.to(device))
    return values


CLOCKS = {"thread": time.thread_time, "wall": time.perf_counter}


def _best(call: Callable[[], object], calls: int, repeat: int, launches: list, clock: Callable[[], float] = time.thread_time) -> float:
    """The best over ``repeat`` rounds of the mean microseconds of ``calls`` calls on ``clock``
    (the recorded ``launches``, which hold their tensors, dropped after each round)."""
    best = float("inf")
    for _ in range(repeat):
        start = clock()
        for _ in range(calls):
            call()
        best = min(best, (clock() - start) / calls * 1e6)
        launches.clear()
    return best


def _python_calls(call: Callable[[], object], calls: int) -> float:
    """Python function calls per ``call()`` (``sys.setprofile`` 'call' events)."""
    counted = [0]

    def profile(frame, event, argument):
        if event == "call":
            counted[0] += 1

    sys.setprofile(profile)
    try:
        for _ in range(calls):
            call()
    finally:
        sys.setprofile(None)
    return counted[0] / calls


def measure(layer: Layer, batch: int = 2, length: int = 16, calls: int = 10, repeat: int = 40, device: str = "cpu", clock: str = "thread") -> Measurement:
    """One layer's host time, Python calls and launches per call, forward and forward+backward."""
    torch.manual_seed(0)
    module = recdsl.compile(layer.source, backend="triton", **layer.dims).to(device)
    inputs = _inputs(module, layer, batch, length, device)
    leaves = [x.requires_grad_() for x in (v.clone() for v in inputs)] + [p for p in module.parameters() if p.requires_grad]
    gradients: list[torch.Tensor] = []

    def forward():
        return module(*inputs)

    def forward_backward():
        outputs = module(*leaves[: len(inputs)])
        outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
        if not gradients:
            gradients.extend(torch.ones_like(o) for o in outputs)
        return torch.autograd.grad(outputs, leaves, gradients, allow_unused=True)

    def launches_microseconds_calls(call, launches) -> tuple[int, float, float]:
        for _ in range(3):  # warm: compiled plans, caches, allocator
            call()
        start = len(launches)
        call()
        return len(launches) - start, _best(call, calls, repeat, launches, CLOCKS[clock]), _python_calls(call, 2)

    with observe_launches(run_kernels=False) as launches:
        with torch.no_grad():
            forward_launches, forward_us, forward_calls = launches_microseconds_calls(forward, launches)
        backward_launches, backward_us, backward_calls = launches_microseconds_calls(forward_backward, launches)
        launches.clear()
    return Measurement(layer.label, forward_us, backward_us, forward_calls, backward_calls, forward_launches, backward_launches)


def table(rows: list[Measurement], batch: int, length: int) -> str:
    lines = [
        f"| layer (B = {batch}, T = {length}) | forward (us) | fwd+bwd (us) | Python calls fwd | Python calls fwd+bwd | launches fwd | launches fwd+bwd |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.label} | {row.forward_us:.0f} | {row.backward_us:.0f} | {row.forward_calls:.0f} | {row.backward_calls:.0f} | {row.forward_launches:.0f} | {row.backward_launches:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="*", default=None, help="names among: " + ", ".join(dict.fromkeys(layer.name for layer in LAYERS)))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--calls", type=int, default=10, help="calls per timed round")
    parser.add_argument("--repeat", type=int, default=40, help="rounds; the best is kept (many short rounds: the machine may be shared)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="thread", help="thread: CPU time of the calling thread (default; steady on a shared machine); wall: elapsed time")
    parser.add_argument("--threads", type=int, default=1, help="torch's CPU threads (default 1: a tiny op's wake-up of a thread pool on a shared machine costs milliseconds of noise)")
    parser.add_argument("--quick", action="store_true", help="tiny dims, few calls, one round")
    args = parser.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel module loads: CPU tensors pass the device check
    if args.quick:
        args.calls, args.repeat, args.length = 2, 1, 4
    torch.set_num_threads(args.threads)
    chosen = [layer for layer in LAYERS if args.layers is None or layer.name in args.layers]
    if args.layers is not None and not chosen:
        parser.error(f"no layer named {' '.join(args.layers)}")
    rows = []
    for layer in chosen:
        if args.quick:
            layer = replace(layer, dims=QUICK[layer.name])
        rows.append(measure(layer, args.batch, args.length, args.calls, args.repeat, args.device, args.clock))
    print(table(rows, args.batch, args.length))
    return 0


if __name__ == "__main__":
    sys.exit(main())
