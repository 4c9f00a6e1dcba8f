"""Gated DeltaNet, RWKV-6 and a TTT memory: recdsl's chunked forms against the sequential
loop and against flash-linear-attention's hand-written torch chunk form.

The target (issue 10, item 6): Gated DeltaNet with dk = dv = 64, 4 heads, B = 4, T = 4096,
``auto`` within 1.5x of fla's ``naive_chunk_gated_delta_rule``, forward and
forward+backward, on CPU.  fla is an optional benchmark dependency, never a runtime one:

    pip install --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops

Both sides compute the same function from the same inputs (checked before timing): fla
takes the log decay ``g`` and ``beta`` directly, recdsl's cell computes them from ``a`` and
``b`` (one elementwise pass each), and fla scales the queries by ``dk**-0.5`` (the inputs
given to recdsl carry that factor).  Times are the best of ``--repeat`` runs, in float32.

    flock /tmp/recdsl-bench.lock python benchmarks/bench_delta.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def forward_backward(fn, leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        out = fn()
        out.sum().backward()

    return run


def gated_deltanet(batch: int, length: int, heads: int, dk: int, repeat: int, sequential: bool) -> list[tuple[str, float, float | None]]:
    """Rows (name, forward seconds, forward+backward seconds)."""
    torch.manual_seed(0)
    q = torch.randn(batch, length, heads, dk)
    k = F.normalize(torch.randn(batch, length, heads, dk), dim=-1)
    v = torch.randn(batch, length, heads, dk)
    a = torch.randn(batch, length, heads)
    b = torch.randn(batch, length, heads)
    leaves = [x.requires_grad_() for x in (q, k, v, a, b)]
    auto = recdsl.compile(EXAMPLES / "gated_deltanet.rec", dk=dk, dv=dk)
    scale = dk**-0.5
    rows = []
    ours = lambda module=auto: module(q=q * scale, k=k, v=v, a=a, b=b)  # noqa: E731
    rows.append((f"recdsl auto ({auto.backend})", best_of(ours, repeat), best_of(forward_backward(ours, leaves), repeat)))
    if sequential:
        loop = recdsl.compile(EXAMPLES / "gated_deltanet.rec", backend="sequential", dk=dk, dv=dk)
        run_loop = lambda: loop(q=q * scale, k=k, v=v, a=a, b=b)  # noqa: E731
        rows.append(("recdsl sequential", best_of(run_loop, 1), best_of(forward_backward(run_loop, leaves), 1)))
    try:
        from fla.ops.gated_delta_rule.naive import naive_chunk_gated_delta_rule
    except ImportError as error:
        print(f"fla not installed ({error}); pip install --no-deps flash-linear-attention==0.6.0 fla-core==0.6.0 einops", file=sys.stderr)
        return rows

    def fla():
        g = -auto.A_log.exp() * F.softplus(a + auto.dt_bias)  # the cell's log decay
        return naive_chunk_gated_delta_rule(q, k, v, g, torch.sigmoid(b), chunk_size=64)[0]

    with torch.no_grad():
        error = (fla() - ours()).abs().max().item()
    print(f"gated deltanet: max |fla - recdsl| = {error:.2e} (float32)")
    rows.append(("fla naive_chunk_gated_delta_rule", best_of(fla, repeat), best_of(forward_backward(fla, leaves), repeat)))
    return rows


def against_sequential(name: str, dims: dict, inputs: dict, repeat: int) -> list[tuple[str, float, float | None]]:
    auto = recdsl.compile(EXAMPLES / f"{name}.rec", **dims)
    loop = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **dims)
    leaves = [x.requires_grad_() for x in inputs.values()]
    rows = []
    for label, module, times in ((f"recdsl auto ({auto.backend})", auto, repeat), ("recdsl sequential", loop, 1)):
        run = lambda module=module: module(**inputs)  # noqa: E731
        rows.append((label, best_of(run, times), best_of(forward_backward(run, leaves), times)))
    return rows


def table(title: str, rows) -> str:
    reference = rows[-1]
    lines = [f"\n{title}", "| form | forward | fwd+bwd | forward vs last row | fwd+bwd vs last row |", "|---|---:|---:|---:|---:|"]
    for name, forward, both in rows:
        lines.append(f"| {name} | {forward * 1e3:.1f} ms | {both * 1e3:.1f} ms | {forward / reference[1]:.2f}x | {both / reference[2]:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--sequential", action="store_true", help="also time the sequential loop on the Gated DeltaNet target (slow)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, length, heads, dk = (2, 256, 2, 16) if args.quick else (4, 4096, 4, 64)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(table(f"Gated DeltaNet, dk = dv = {dk}, {heads} heads, B = {batch}, T = {length}", gated_deltanet(batch, length, heads, dk, args.repeat, args.sequential)))
    T2 = 256 if args.quick else 1024
    torch.manual_seed(0)
    d = 16 if args.quick else 64
    # Decay logits as RWKV-6 initialises them (-6 to -1 across the key dims: w from 0.69 to 0.9975), with noise.
    decay_logits = torch.linspace(-6, -1, d) + 0.5 * torch.randn(batch, T2, heads, d)
    rwkv = dict(r=torch.randn(batch, T2, heads, d), k=torch.randn(batch, T2, heads, d) * d**-0.5, v=torch.randn(batch, T2, heads, d), d=decay_logits)
    print(table(f"RWKV-6, dk = dv = {d}, {heads} heads, B = {batch}, T = {T2}", against_sequential("rwkv6", dict(dk=d, dv=d), rwkv, args.repeat)))
    ttt = dict(k=F.normalize(torch.randn(batch, T2, heads, 16), dim=-1), v=torch.randn(batch, T2, heads, 16), q=torch.randn(batch, T2, heads, 16), a_pre=torch.randn(batch, T2, heads), lr_pre=torch.randn(batch, T2, heads))
    print(table(f"TTT memory (ttt_linear.rec), dk = dv = 16, {heads} heads, B = {batch}, T = {T2}", against_sequential("ttt_linear", dict(dk=16, dv=16), ttt, args.repeat)))


if __name__ == "__main__":
    main()
