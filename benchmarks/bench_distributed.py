"""Sequence parallelism (recdsl.distributed): bytes exchanged, gloo wall time, a cost model.

Three parts, each printed as markdown (results in benchmarks/RESULTS_DISTRIBUTED.md):

1. ``--bytes``: for every example the parallel backends run, at sizes of published
   models, the numbers one slice's summary holds and the bytes one rank sends per layer
   forward and backward as a function of P, next to LASP-2's formula (one ``dk x dv``
   memory state per head per device, all-gathered forward and backward) and a generic
   summary whose transition is a dense matrix over the state's rows (what an associative
   scan of ``(A, b)`` pairs would send without knowing the structure).
2. ``--time``: measured on gloo, 1, 2 and 4 ranks spawned on this machine, one sequence
   of T steps sharded over them, forward+backward: wall time per rank split into time in
   the exchange's collectives (waiting for the other ranks included) and the rest
   (compute); also the module alone in one process.  On a 2-core machine 4 ranks share 2
   cores: the wall time cannot scale, and is reported as measured.
3. ``--model``: time per layer against P and T for a cluster,
   ``t(P, T) = W(T / P) / F + 2 (P - 1) (alpha + s / beta)`` (local pass, then the
   all-gather forward and the all-to-all backward), with ``W`` the flops of the local
   pass, ``F`` the device's flop rate, ``s`` the summary's bytes, ``alpha`` the latency and
   ``beta`` the bandwidth per link.  ``F`` for this CPU comes from the measured
   single-device run; ``alpha`` and ``beta`` of gloo from measured all-gathers; the GPU
   cluster's values are parameters (``--flops``, ``--bandwidth``, ``--latency``).  Plotted
   to ``--plot``.

    flock /tmp/recdsl-bench.lock python benchmarks/bench_distributed.py --bytes --time --model
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

# Sizes of published layers, per head (one head of the cell per head of the model).
SIZES = {
    "gla": dict(dk=128, dv=256),  # GLA 1.3B: d = 2048, 4 heads, dk = d/2 per head split, dv = d per head split
    "retnet": dict(dk=256, dv=512),  # RetNet 1.3B: d = 2048, 8 heads: dk = 256, dv = 512 (double v)
    "mlstm": dict(dk=256, dv=512),  # xLSTM mLSTM blocks, 4 heads of a 2048 projection (qk factor 0.5)
    "deltanet": dict(dk=128, dv=128),  # DeltaNet 1.3B: d = 2048, 16 heads of 128
    "mamba2": dict(p=64, n=128),  # Mamba-2 2.7B: head dim 64, state 128
    "s6": dict(d=2048, n=16),  # Mamba 1.4B: d_inner = 4096, split in blocks of 2048 channels, state 16
    "mingru": dict(d_in=2048, d=2048),
    "minlstm": dict(d_in=2048, d=2048),
    "hgrn": dict(d_in=2048, d=2048),
    "rglru": dict(d=2560),  # Griffin/Hawk 2.7B-ish recurrence width
    "lru": dict(d=1024, n=1024),
    "aaren": dict(d=512),
    "crf": dict(n=64),
    # Reverse states and a coupled joint group.
    "lion": dict(dk=64, dv=64),  # LION-S, BERT/ViT-base: d = 768 in 12 heads of 64; a forward and a reverse dk x dv state
    "crf_marginals": dict(n=64),  # forward and backward variables, each an n x n log-semiring matrix per slice
    "titans": dict(dk=64, dv=64),  # heads of 64: the joint block of M and W is 128 x 128, shared by the columns
    "gated_deltanet": dict(dk=128, dv=128),  # Qwen3-Next's Gated DeltaNet heads: 128 keys, 128 values
    "ttt_linear": dict(dk=64, dv=64),  # TTT-Linear 1.3B: d = 2048, 32 heads of 64
    "rwkv6": dict(dk=64, dv=64),  # RWKV-6: head size 64
    "s4d": dict(d=1024, N=64),  # S4D: 1024 channels, 64 complex modes each (the example's default N)
}
# The cells LASP-2 writes a summary for: (key dim, value dim) of their dk x dv memory.
LASP2_CELLS = {"gla": ("dk", "dv"), "retnet": ("dk", "dv"), "mlstm": ("dk", "dv"), "deltanet": ("dk", "dv"), "mamba2": ("n", "p"), "gated_deltanet": ("dk", "dv"), "ttt_linear": ("dk", "dv"), "rwkv6": ("dk", "dv")}
WORLDS = (2, 4, 8, 16, 64)
ITEMSIZE = 4  # fp32 summaries (states are accumulated in fp32 even for bf16 models)


def _analysis(name: str):
    import recdsl

    return recdsl.compile(str(EXAMPLES / f"{name}.rec"), **SIZES[name]).analysis


def dense_transition_elements(analysis) -> int:
    """Numbers in a summary ``(A, S)`` with ``A`` dense over the rows of each state (a vector state: over its elements; a coupled group: over its members' rows together)."""
    total = 0
    # A coupled group scanned jointly (Titans) is one state stacked from its members: its rows add up.
    groups = [g.states for g in analysis.groups if len(g.states) > 1]
    grouped = {name for group in groups for name in group}
    for members in [(s.state,) for s in analysis.states if s.state not in grouped] + groups:
        states = [analysis.state(name) for name in members]
        rows = sum(s.type.shape[0] if len(s.type.shape) == 2 else math.prod(s.type.shape) for s in states)
        factor = 2 if states[0].type.kind.name == "COMPLEX" else 1
        total += factor * (sum(math.prod(s.type.shape) for s in states) + rows * rows)
    for scan in analysis.cell.scans:
        total += sum(math.prod(c.type.shape) for c in scan.monoid.carries)
    return total


def bytes_table() -> str:
    from recdsl.distributed import Exchange, communication_bytes, exchange_groups, local_plan, plan_exchanges

    lines = [
        "| cell | sizes (per head) | exchange (collectives per call) | recdsl summary (numbers) | LASP-2 formula | dense-transition summary | recdsl / LASP-2 | recdsl / dense | forward bytes per rank, P = " + ", ".join(map(str, WORLDS)) + " | backward |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---|",
    ]
    for name in SIZES:
        analysis = _analysis(name)
        exchanges = plan_exchanges(local_plan(analysis))
        elements = sum(e.summary_elements for e in exchanges)
        dense = dense_transition_elements(analysis)
        lasp = ratio = "-"
        if name in LASP2_CELLS:
            key, value = LASP2_CELLS[name]
            lasp_elements = SIZES[name][key] * SIZES[name][value]
            lasp, ratio = str(lasp_elements), f"{elements / lasp_elements:.4f}"

        def sent(world: int):
            parts = [communication_bytes(e.elements * ITEMSIZE, world, e.exchange) for e in exchanges]
            return sum(x.forward for x in parts), sum(x.backward for x in parts)

        forward = ", ".join(_kib(sent(p)[0]) for p in WORLDS)
        backward = ", ".join(_kib(sent(p)[1]) for p in WORLDS)
        kinds = ", ".join(sorted({"ring" if e.exchange is Exchange.RING else "all-gather" for e in exchanges}))
        sizes = ", ".join(f"{k}={v}" for k, v in SIZES[name].items())
        lines.append(f"| {name} | {sizes} | {kinds} ({len(exchange_groups(analysis))}) | {elements} | {lasp} | {dense} | {ratio} | {elements / dense:.4f} | {forward} | {backward} |")
    return "\n".join(lines) + "\n"


# Nonlinear cells compiled with backend="newton": one exchange per Newton iteration.
# (the newton backend analyses states of up to 1024 elements per batch row)
NEWTON_SIZES = {
    "paragru": dict(d_in=1024, d=1024),  # ParaRNN's diagonal GRU
    "paralstm": dict(d_in=512, d=512),  # ParaRNN's LSTM: 2 x 2 blocks (c_i, h_i)
    "lstm": dict(d_in=256, d=256),  # 2 x 2 blocks as well
    "gru": dict(d_in=256, d=256),  # a dense 256 x 256 Jacobian
    "slstm": dict(d_in=256, heads=4, dh=64),  # blocks of 4 dh = 256 > 64: auto solves with their diagonal
    "bigru": dict(d_in=256, d=256),  # reverse states: one solve per part (h forward, g from the last rank), each GRU's
}


def newton_table() -> str:
    """Numbers and bytes one rank sends per Newton iteration (forward) and once backward."""
    import recdsl
    from recdsl.backends import newton as nt
    from recdsl.distributed_newton import _product_elements, adjoint_on_ring, backward_bytes

    lines = [
        "| cell (backend newton) | sizes | Jacobian, as solved | summary per iteration (numbers) | state (numbers) | forward bytes per rank per iteration, P = " + ", ".join(map(str, WORLDS)) + " | backward bytes per rank, same P |",
        "|---|---|---|---:|---:|---|---|",
    ]
    solves = []
    for name, dims in NEWTON_SIZES.items():
        executed = recdsl.compile(str(EXAMPLES / f"{name}.rec"), backend="newton", **dims).plan
        if executed.directed is not None and executed.analysis.cell.reversed_recurrences:
            # Sharded in the parts of its directed split: each part's own exchanges, per its own iteration.
            solves += [(f"{name}: {', '.join(part.names)} ({part.direction})", dims, part.plan) for part in executed.directed.parts]
        else:
            solves.append((name, dims, executed))
    for name, dims, executed in solves:
        plan = executed.solver
        mode = plan.mode(nt.JacobianMode.AUTO)
        product = _product_elements(plan, mode)
        summary = product + 2 * plan.size
        forward = ", ".join(_kib((p - 1) * (summary + 2) * ITEMSIZE) for p in WORLDS)
        backward = ", ".join(_kib(backward_bytes(plan, mode, p, itemsize=ITEMSIZE)) for p in WORLDS)
        if adjoint_on_ring(plan, mode):  # quasi-Newton: the exact adjoint passed along a ring
            full = _product_elements(plan, nt.JacobianMode.FULL) + 2 * plan.size
            backward += f" (adjoint on a ring, {plan.size} numbers a hop, P - 1 hops in series; the dense product's all-gather would send {full} numbers per rank per peer)"
        sizes = ", ".join(f"{k}={v}" for k, v in dims.items())
        lines.append(f"| {name} | {sizes} | {plan.describe()}, {mode.value} | {summary} | {plan.size} | {forward} | {backward} |")
    return "\n".join(lines) + "\n"


def _kib(count: int) -> str:
    return f"{count / 1024:.1f} KiB" if count < 1024 * 1024 else f"{count / 1024 / 1024:.2f} MiB"


# ---- gloo timing ---------------------------------------------------------------------------

TIMED = {"gla": dict(dk=64, dv=64), "mingru": dict(d_in=256, d=256)}


def _timed_inputs(module, batch: int, length: int):
    generator = torch.Generator().manual_seed(0)
    inputs = {i.name: 0.5 * torch.randn((batch, length, *i.type.shape), generator=generator) for i in module.cell.inputs}
    return inputs


def _time_worker(rank: int, world: int, store: str, length: int, repeat: int, out: str) -> None:
    import torch.distributed as dist

    import recdsl
    from recdsl.distributed import CollectiveTime, SequenceParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    results = {}
    for name, dims in TIMED.items():
        torch.manual_seed(0)
        module = recdsl.compile(str(EXAMPLES / f"{name}.rec"), **dims)
        inputs = _timed_inputs(module, 1, length)
        bounds = [round(r * length / world) for r in range(world + 1)]
        mine = {n: v[:, bounds[rank] : bounds[rank + 1]].clone().requires_grad_(True) for n, v in inputs.items()}
        parallel = SequenceParallel(module)
        best = None
        for _ in range(repeat + 1):  # the first is a warm-up
            dist.barrier()
            parallel.collective_time = CollectiveTime()
            started = time.perf_counter()
            out_value = parallel(**mine)
            forward_done = time.perf_counter()
            out_value.square().mean().backward()
            finished = time.perf_counter()
            sample = dict(forward=forward_done - started, total=finished - started, comm_forward=parallel.collective_time.forward, comm_backward=parallel.collective_time.backward)
            if _ > 0 and (best is None or sample["total"] < best["total"]):
                best = sample
        results[name] = best
    # gloo's latency and bandwidth on this machine: all-gathers of 8 bytes and of 4 MiB.
    if world > 1:
        for label, count in (("small", 1), ("large", 1 << 20)):
            flat = torch.zeros(count)
            gathered = [torch.empty_like(flat) for _ in range(world)]
            times = []
            for _ in range(5):
                dist.barrier()
                started = time.perf_counter()
                dist.all_gather(gathered, flat)
                times.append(time.perf_counter() - started)
            results[f"all_gather_{label}"] = min(times)
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def measure(length: int, repeat: int) -> dict:
    import torch.multiprocessing as mp

    import recdsl

    measured = {}
    # The module alone, one process.
    torch.set_num_threads(1)
    single = {}
    for name, dims in TIMED.items():
        torch.manual_seed(0)
        module = recdsl.compile(str(EXAMPLES / f"{name}.rec"), **dims)
        inputs = {n: v.requires_grad_(True) for n, v in _timed_inputs(module, 1, length).items()}
        best = None
        for i in range(repeat + 1):
            started = time.perf_counter()
            module(**inputs).square().mean().backward()
            elapsed = time.perf_counter() - started
            if i > 0:
                best = elapsed if best is None else min(best, elapsed)
        single[name] = best
    measured["single"] = single
    for world in (1, 2, 4):
        with tempfile.TemporaryDirectory() as tmp:
            context = mp.start_processes(_time_worker, args=(world, str(Path(tmp) / "store"), length, repeat, tmp), nprocs=world, join=True, start_method="spawn")
            del context
            measured[world] = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
    return measured


def timing_table(measured: dict, length: int) -> str:
    lines = [
        f"| cell | ranks | wall per rank, fwd+bwd (ms, slowest rank) | in collectives (ms, fwd + bwd) | rest: compute (ms) | module alone, one process (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name in TIMED:
        for world in (1, 2, 4):
            ranks = measured[world] if world in measured else measured[str(world)]
            slowest = max(ranks, key=lambda r: r[name]["total"])[name]
            comm = slowest["comm_forward"] + slowest["comm_backward"]
            lines.append(f"| {name} {TIMED[name]} | {world} | {slowest['total'] * 1e3:.1f} | {comm * 1e3:.1f} | {(slowest['total'] - comm) * 1e3:.1f} | {measured['single'][name] * 1e3:.1f} |")
    return f"T = {length}, B = 1, float32, torch.set_num_threads(1) per rank, best of the repeats:\n\n" + "\n".join(lines) + "\n"


# ---- the cost model --------------------------------------------------------------------------


def gla_flops_per_token(dk: int, dv: int, chunk: int = 64) -> float:
    """Forward+backward flops per token of chunked GLA: in-chunk attention and the inter-chunk state (backward ~ 2x forward)."""
    forward = 2 * chunk * (dk + dv) + 4 * dk * dv
    return 3 * forward


def model_time(length: int, world: int, flops_per_token: float, flop_rate: float, summary_bytes: float, latency: float, bandwidth: float) -> float:
    """Seconds per layer, forward+backward: local pass on T / P tokens, all-gather forward, all-to-all backward."""
    compute = flops_per_token * length / world / flop_rate
    exchange = 0.0 if world == 1 else 2 * (world - 1) * (latency + summary_bytes / bandwidth)
    return compute + exchange


def model_section(measured: dict | None, length_measured: int, plot: Path | None, flop_rate: float, bandwidth: float, latency: float) -> str:
    from recdsl.distributed import local_plan, plan_exchanges

    dk, dv, heads, width = 128, 256, 4, 2048  # GLA 1.3B, one layer, batch 1
    mixer = gla_flops_per_token(dk, dv) * heads
    # A whole block adds its projections and MLP: about 12 d^2 weights, 6 flops per weight and token forward+backward.
    block = mixer + 72 * width * width
    summary = sum(e.summary_elements for e in plan_exchanges(local_plan(_analysis("gla")))) * heads * ITEMSIZE
    lines = [
        f"GLA 1.3B layer: 4 heads, dk = 128, dv = 256, B = 1; the recdsl summary of a slice is {summary} bytes per rank (fp32).",
        f"Flops per token forward+backward: the recurrence alone {mixer / 1e6:.1f} M (chunked, chunk 64); the whole block {block / 1e6:.0f} M (with 12 d^2 of projections and MLP, d = {width}).",
    ]
    scenarios = []
    if measured is not None:
        dims = TIMED["gla"]
        cpu_rate = gla_flops_per_token(dims["dk"], dims["dv"]) * length_measured / measured["single"]["gla"]
        ranks2 = measured[2] if 2 in measured else measured["2"]
        small = max(r["all_gather_small"] for r in ranks2)
        large = max(r["all_gather_large"] for r in ranks2)
        gloo_bandwidth = (1 << 22) / max(large - small, 1e-9)  # bytes of the 4 MiB gather per second
        lines.append(f"Measured here: chunked GLA forward+backward runs at {cpu_rate / 1e9:.2f} GFLOP/s on one core (module alone, T = {length_measured}); gloo all-gather latency {small * 1e6:.0f} us, bandwidth {gloo_bandwidth / 1e9:.2f} GB/s (2 ranks, 4 MiB).")
        scenarios.append(("this CPU and gloo (measured rates), the recurrence alone", cpu_rate, gloo_bandwidth, small, mixer))
    scenarios.append((f"GPU cluster ({flop_rate / 1e12:.0f} TFLOP/s, {bandwidth / 1e9:.0f} GB/s, {latency * 1e6:.0f} us), the recurrence alone", flop_rate, bandwidth, latency, mixer))
    scenarios.append((f"GPU cluster ({flop_rate / 1e12:.0f} TFLOP/s, {bandwidth / 1e9:.0f} GB/s, {latency * 1e6:.0f} us), the whole block", flop_rate, bandwidth, latency, block))
    lengths = (32768, 262144, 2097152)
    worlds = (1, 2, 4, 8, 16, 32, 64, 128)
    series = {}
    for label, rate, beta, alpha, per_token in scenarios:
        lines += ["", f"{label}: predicted ms per layer, forward+backward", ""]
        lines.append("| T | " + " | ".join(f"P = {p}" for p in worlds) + " | speed-up at P = 64 | exchange share at P = 64 |")
        lines.append("|---|" + "---:|" * (len(worlds) + 2))
        for length in lengths:
            times = [model_time(length, p, per_token, rate, summary, alpha, beta) for p in worlds]
            exchange = model_time(length, 64, 0.0, rate, summary, alpha, beta)
            at64 = model_time(length, 64, per_token, rate, summary, alpha, beta)
            lines.append(f"| {length} | " + " | ".join(f"{t * 1e3:.3g}" for t in times) + f" | {times[0] / at64:.1f}x | {exchange / at64:.1%} |")
            series.setdefault(label, {})[f"T = {length}"] = {p: t * 1e3 for p, t in zip(worlds, times)}
    if plot is not None:
        from recdsl.plotting import plot_times

        plot_times(series, plot, "sequence-parallel GLA layer (recdsl summaries): predicted time per layer, forward+backward, against ranks P", x_label="ranks P")
        lines += ["", f"Plot: `{plot.relative_to(ROOT) if plot.is_relative_to(ROOT) else plot}`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", action="store_true", help="the bytes table (no processes spawned)")
    parser.add_argument("--time", action="store_true", help="spawn 1, 2 and 4 gloo ranks and time them")
    parser.add_argument("--model", action="store_true", help="the cost model (with --time: this CPU's measured rates too)")
    parser.add_argument("--length", type=int, default=16384, help="T of the timed runs")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--flops", type=float, default=300e12, help="cluster device flop rate (FLOP/s) for the model")
    parser.add_argument("--bandwidth", type=float, default=50e9, help="cluster link bandwidth (bytes/s) for the model")
    parser.add_argument("--latency", type=float, default=10e-6, help="cluster collective latency per hop (s) for the model")
    parser.add_argument("--plot", type=Path, default=ROOT / "benchmarks" / "distributed_model.png")
    parser.add_argument("--json", type=Path, help="write the timing measurements here")
    args = parser.parse_args(argv)
    if not (args.bytes or args.time or args.model):
        args.bytes = args.time = args.model = True
    if args.bytes:
        print("## Bytes per rank per layer\n")
        print(bytes_table())
        print("## Newton's method, sharded: bytes per iteration\n")
        print(newton_table())
    measured = None
    if args.time:
        measured = measure(args.length, args.repeat)
        if args.json:
            args.json.write_text(json.dumps(measured, indent=1))
        print("## Wall time on gloo, this machine\n")
        print(timing_table(measured, args.length))
    if args.model:
        print("## Cost model\n")
        print(model_section(measured, args.length, args.plot, args.flops, args.bandwidth, args.latency))
    return 0


if __name__ == "__main__":
    sys.exit(main())
