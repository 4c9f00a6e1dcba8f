"""GPU benchmark of the Triton backend: achieved bandwidth of the diagonal scan, and time against peers.

    python benchmarks/bench_triton.py                  # on a CUDA machine
    python benchmarks/bench_triton.py --interpret      # anywhere: Triton's interpreter, tiny sizes

1. Bandwidth.  A cell ``h = a * h + b`` with ``a`` and ``b`` given as inputs reads two
   tensors and writes one; the kernel's achieved bandwidth is ``3 * bytes / time``, shown as
   a fraction of the device's copy bandwidth (``y.copy_(x)`` moves ``2 * bytes``).  The goal
   is at least 80%.  Each size runs once per ``--split-targets`` value (the backend option
   ``split_programs``: 0 is the one-pass kernel, one program per row and block of 64
   channels; otherwise T is split across programs when the call has fewer than that many:
   fold each chunk, carry, rescan), and the table says which form ran, with how many
   programs.  Split, the kernels move 20 bytes per element, not 12 (the rescan reads ``a``
   and ``b`` again), so the bandwidth column counts the 12 useful bytes.
2. Forward and forward+backward milliseconds of recdsl's Triton kernels beside the peers
   that are installed: accelerated-scan's Triton and CUDA first-order scans against recdsl's
   scan kernel alone, flash-linear-attention's
   ``chunk_gla`` and ``chunk_delta_rule``, mamba's ``selective_scan_fn``, and cuDNN's
   ``torch.nn.GRU``/``LSTM`` for scale.  A peer that is not installed, or does not run on
   this device, is left out of the table (the reason goes to stderr).
3. Nonlinear cells (GRU, LSTM, ParaGRU at ``--rnn-width``, default 128): the fused sequential
   Triton kernel (``backend="triton"``, FlashRNN's form) against cuDNN's ``torch.nn.GRU``/
   ``LSTM`` of the same size, the sequential backend (a Python loop of torch ops per step,
   only up to ``--sequential-max-length`` steps) and, for ParaGRU, the ``newton`` backend.
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

SCAN_CELL = """
cell Scan(d) {
    input a: [d]
    input b: [d]
    state h: [d] = 0
    h = a * h + b
    out h
}
"""


def timed(fn: Callable, backward: bool, repeat: int, cuda: bool) -> float:
    import torch

    def once() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if backward:
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeat)) * 1e3


def bandwidth(args, device: str) -> None:
    import torch

    import recdsl

    from recdsl.backends.triton_launch import observe_launches

    print("\n## Diagonal scan bandwidth (h = a * h + b, float32)\n")
    print("| B | T | d | form | recdsl triton (ms) | GB/s | copy GB/s | fraction of copy | fwd+bwd (ms) |")
    print("|---|---|---|---|---|---|---|---|---|")
    modules = [recdsl.compile(SCAN_CELL, backend="triton", backend_options={"split_programs": target, "split_min_steps": args.split_min_steps}, d=args.width).to(device) for target in args.split_targets]
    for length in args.lengths:
        a = torch.rand(args.batch, length, args.width, device=device)
        b = torch.randn(args.batch, length, args.width, device=device)
        target = torch.empty_like(a)
        copy_ms = timed(lambda: target.copy_(a), False, args.repeat, device == "cuda")
        copy_rate = 2 * a.numel() * a.element_size() / copy_ms / 1e6
        moved = 3 * a.numel() * a.element_size()
        for module in modules:
            with torch.no_grad(), observe_launches() as launches:
                module(a, b)
            form = _scan_form(launches)
            with torch.no_grad():
                milliseconds = timed(lambda: module(a, b), False, args.repeat, device == "cuda")
            a_grad, b_grad = a.clone().requires_grad_(), b.clone().requires_grad_()
            both_ms = timed(lambda: module(a_grad, b_grad), True, args.repeat, device == "cuda")
            rate = moved / milliseconds / 1e6
            print(f"| {args.batch} | {length} | {args.width} | {form} | {milliseconds:.3f} | {rate:.1f} | {copy_rate:.1f} | {rate / copy_rate:.0%} | {both_ms:.3f} |", flush=True)


def _scan_form(launches) -> str:
    """Which form of the scan kernel a forward call launched, and how many programs it ran."""
    for launch in launches:
        if launch.name.endswith("_look_back"):
            return f"T split: one pass with look-back, {launch.grid[0]} programs"
        if launch.name.endswith("_chunks"):
            rows, blocks, chunks = launch.grid
            return f"T split: {chunks} chunks, {rows * blocks * chunks} programs"
    for launch in launches:
        if launch.name.startswith("forward_"):
            programs = 1
            for size in launch.grid:
                programs *= size
            return f"one pass, {programs} programs"
    return "no scan kernel"


def peers(args, device: str) -> None:
    import torch
    import torch.nn.functional as F

    import recdsl

    cuda = device == "cuda"
    rows: list[tuple[str, str, Callable]] = []
    B, H, D, K = args.batch, args.heads, args.width, args.key_dim
    for length in args.lengths:
        def make(*shape):
            return torch.randn(*shape, device=device, requires_grad=True)

        # first-order scan: minGRU's recurrence
        mingru = recdsl.compile(EXAMPLES / "mingru.rec", backend="triton", d_in=D, d=D).to(device)
        x = make(B, length, D)
        rows.append((f"minGRU T={length}", "recdsl triton", lambda m=mingru, x=x: m(x)))
        # the first-order scan alone, h = a * h + b, each form in its own layout
        scan = recdsl.compile(SCAN_CELL, backend="triton", d=D).to(device)
        a, b = torch.rand(B, length, D, device=device).requires_grad_(), make(B, length, D)
        rows.append((f"scan only T={length}", "recdsl triton ([B, T, d])", lambda m=scan, a=a, b=b: m(a, b)))
        for variant in args.accelerated_scan:
            try:
                # scalar: its Triton kernels; warp: its CUDA kernels, built by nvcc at import
                peer = importlib.import_module(f"accelerated_scan.{variant}").scan
                gates = torch.rand(B, D, length, device=device).requires_grad_()
                tokens = make(B, D, length)
                rows.append((f"scan only T={length}", f"accelerated-scan {variant} ([B, d, T])", lambda f=peer, g=gates, t=tokens: f(g, t)))
            except Exception as error:
                print(f"accelerated-scan {variant}: {type(error).__name__}: {error}", file=sys.stderr)
        gru = torch.nn.GRU(D, D, batch_first=True).to(device)
        rows.append((f"minGRU T={length}", "torch.nn.GRU (cuDNN, for scale)", lambda g=gru, x=x: g(x)[0]))
        lstm = torch.nn.LSTM(D, D, batch_first=True).to(device)
        rows.append((f"minGRU T={length}", "torch.nn.LSTM (cuDNN, for scale)", lambda l=lstm, x=x: l(x)[0]))

        # selective scan (S6)
        s6 = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=D, n=16).to(device)
        s6_inputs = dict(x=make(B, length, D), delta=make(B, length, D), B=make(B, length, 16), C=make(B, length, 16))
        rows.append((f"S6 T={length}", "recdsl triton", lambda m=s6, i=s6_inputs: m(**i)))
        try:
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            A = -torch.exp(s6.A_log.detach()).requires_grad_()
            rows.append(
                (
                    f"S6 T={length}",
                    "mamba selective_scan_fn",
                    lambda i=s6_inputs, A=A, m=s6: selective_scan_fn(
                        i["x"].transpose(1, 2), i["delta"].transpose(1, 2), A, i["B"].transpose(1, 2), i["C"].transpose(1, 2), m.D, delta_softplus=True
                    ),
                )
            )
        except Exception as error:
            print(f"mamba-ssm: {type(error).__name__}: {error}", file=sys.stderr)

        # gated linear attention and the delta rule
        gla = recdsl.compile(EXAMPLES / "gla.rec", backend="triton", dk=K, dv=K).to(device)
        q, k, v, g = (make(B, length, H, K) for _ in range(4))
        rows.append((f"GLA T={length}", "recdsl triton", lambda m=gla, q=q, k=k, v=v, g=g: m(q, k, v, g)))
        chunked_gla = recdsl.compile(EXAMPLES / "gla.rec", backend="chunked", dk=K, dv=K).to(device)
        rows.append((f"GLA T={length}", "recdsl chunked (torch)", lambda m=chunked_gla, q=q, k=k, v=v, g=g: m(q, k, v, g)))
        try:
            from fla.ops.gla import chunk_gla

            rows.append((f"GLA T={length}", "fla chunk_gla", lambda q=q, k=k, v=v, g=g: chunk_gla(q, k, v, F.logsigmoid(g) / 16)[0]))
        except Exception as error:
            print(f"fla chunk_gla: {type(error).__name__}: {error}", file=sys.stderr)
        beta_logits = make(B, length, H)
        for backend, label in (("triton", "recdsl triton"), ("chunked", "recdsl chunked (torch)")):
            delta = recdsl.compile(EXAMPLES / "deltanet.rec", backend=backend, dk=K, dv=K).to(device)
            rows.append((f"DeltaNet T={length}", label, lambda m=delta, q=q, k=k, v=v, b=beta_logits: m(q, F.normalize(k, dim=-1), v, b)))
        try:
            from fla.ops.delta_rule import chunk_delta_rule

            rows.append(
                (
                    f"DeltaNet T={length}",
                    "fla chunk_delta_rule",
                    lambda q=q, k=k, v=v, b=beta_logits: chunk_delta_rule(q, F.normalize(k, dim=-1), v, 2 * torch.sigmoid(b))[0],
                )
            )
        except Exception as error:
            print(f"fla chunk_delta_rule: {type(error).__name__}: {error}", file=sys.stderr)

    print(f"\n## Time against peers (B={B}, heads={H}, d={D}, dk=dv={K}; ms, median of {args.repeat})\n")
    print("| case | form | fwd | fwd+bwd |")
    print("|---|---|---|---|")
    from recdsl.progress import progress

    for case, label, fn in progress(rows, desc="peers", unit="form"):
        try:
            with torch.no_grad():
                forward = timed(fn, False, args.repeat, cuda)
            both = timed(fn, True, args.repeat, cuda)
            print(f"| {case} | {label} | {forward:.3f} | {both:.3f} |")
        except Exception as error:
            print(f"{case} {label}: {type(error).__name__}: {error}", file=sys.stderr)
        sys.stdout.flush()


def nonlinear(args, device: str) -> None:
    import torch

    import recdsl

    cuda = device == "cuda"
    B, D = args.batch, args.rnn_width
    rows: list[tuple[str, str, Callable]] = []
    for length in args.lengths:
        x = torch.randn(B, length, D, device=device, requires_grad=True)
        for name, layer in (("gru", torch.nn.GRU), ("lstm", torch.nn.LSTM), ("paragru", None)):
            case = f"{name} T={length}"
            backends = ["triton"] + (["newton"] if name == "paragru" else []) + (["sequential"] if length <= args.sequential_max_length else [])
            for backend in backends:
                try:
                    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, d_in=D, d=D).to(device)
                except recdsl.RecDSLError as error:
                    print(f"{case} {backend}: {error}", file=sys.stderr)
                    continue
                label = "recdsl triton (fused sequential kernel)" if backend == "triton" else f"recdsl {backend}"
                rows.append((case, label, lambda m=module, x=x: m(x)))
            if layer is not None:
                reference = layer(D, D, batch_first=True).to(device)
                rows.append((case, f"torch.nn.{layer.__name__} (cuDNN)" if cuda else f"torch.nn.{layer.__name__}", lambda r=reference, x=x: r(x)[0]))
    print(f"\n## Nonlinear cells (B={B}, d=d_in={D}, float32; ms, median of {args.repeat})\n")
    print("| case | form | fwd | fwd+bwd |")
    print("|---|---|---|---|")
    for case, label, fn in rows:
        try:
            with torch.no_grad():
                forward = timed(fn, False, args.repeat, cuda)
            both = timed(fn, True, args.repeat, cuda)
            print(f"| {case} | {label} | {forward:.3f} | {both:.3f} |")
        except Exception as error:
            print(f"{case} {label}: {type(error).__name__}: {error}", file=sys.stderr)
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interpret", action="store_true", help="run in Triton's interpreter on the CPU with tiny sizes")
    parser.add_argument("--lengths", type=int, nargs="*", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--key-dim", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--split-targets", type=int, nargs="*", default=[0, 528, 1056, 2112], help="bandwidth: the backend option split_programs, one row each (0: one pass)")
    parser.add_argument("--split-min-steps", type=int, default=128, help="bandwidth: the backend option split_min_steps (the shortest chunk of T)")
    parser.add_argument("--rnn-width", type=int, default=128, help="d = d_in of the nonlinear cells (GRU, LSTM, ParaGRU)")
    parser.add_argument("--sequential-max-length", type=int, default=1024, help="the sequential backend runs only up to this T")
    parser.add_argument("--accelerated-scan", nargs="*", default=["scalar", "warp"], choices=["scalar", "warp"], help="accelerated-scan's kernels to time, where installed (warp is compiled by nvcc on first import)")
    parser.add_argument("--only", choices=["bandwidth", "peers", "nonlinear"], nargs="*", help="run only these sections")
    args = parser.parse_args(argv)
    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"
        args.lengths, args.batch, args.heads, args.width, args.key_dim, args.repeat = [40], 1, 1, 8, 4, 1
        args.split_targets, args.split_min_steps = [0, 1000], 8
        args.rnn_width = 8
    import torch

    device = "cuda" if torch.cuda.is_available() and not args.interpret else "cpu"
    if device == "cpu" and not args.interpret:
        print("no CUDA device: run with --interpret to exercise the kernels in Triton's interpreter", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (Triton interpreter: timings say nothing about speed)"
    print(f"# recdsl Triton backend on {name}, torch {torch.__version__}")
    sections = args.only or ["bandwidth", "peers", "nonlinear"]
    if "bandwidth" in sections:
        bandwidth(args, device)
    if "peers" in sections:
        peers(args, device)
    if "nonlinear" in sections:
        nonlinear(args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
