"""Does the plan stage's cost model rank the forms as the clock does?

For every example cell (examples/ttt_linear.rec included: a TTT memory written from the right, the cell that once made
`auto` pick a dense matrix scan 95x slower than the loop), at benchmark dims, this times the
forward pass of every CPU backend that can run the cell at the cost model's nominal
workload, and prints, per cell, the model's prediction beside the measurement, which
backend `auto` picked, whether it was the fastest, and `auto`'s time against `sequential`.

    python benchmarks/bench_cost_model.py            # B = 4, T = 1024, best of 3
    python benchmarks/bench_cost_model.py --quick    # tiny sizes: checks that it runs
    python benchmarks/bench_cost_model.py --only gru,lstm --cpu-time --threads 1
                                                     # some cells; CPU time of the process
                                                     # (steadier than the clock on a loaded machine)

Ratios are measured within one run; on a shared machine, run it alone.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import recdsl
from recdsl.plan import BackendKind, PlanOptions, Workload

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

TTT = EXAMPLES / "ttt_linear.rec"  # a memory written from the right (W @ k)

# Benchmark dims: the sizes a model would use, scaled so the loop finishes on 2 cores.
CELLS: list[tuple[str, str | Path, dict]] = [
    ("mingru", EXAMPLES / "mingru.rec", dict(d_in=64, d=128)),
    ("minlstm", EXAMPLES / "minlstm.rec", dict(d_in=64, d=128)),
    ("lru", EXAMPLES / "lru.rec", dict(d=64, n=64)),
    ("hgrn", EXAMPLES / "hgrn.rec", dict(d_in=64, d=128)),
    ("rglru", EXAMPLES / "rglru.rec", dict(d=128)),
    ("s6", EXAMPLES / "s6.rec", dict(d=32, n=16)),
    ("mamba2", EXAMPLES / "mamba2.rec", dict(p=32, n=32)),
    ("gla", EXAMPLES / "gla.rec", dict(dk=64, dv=64)),
    ("retnet", EXAMPLES / "retnet.rec", dict(dk=64, dv=64)),
    ("mlstm", EXAMPLES / "mlstm.rec", dict(dk=32, dv=32)),
    ("deltanet", EXAMPLES / "deltanet.rec", dict(dk=32, dv=32)),
    ("aaren", EXAMPLES / "aaren.rec", dict(d=64)),
    ("crf", EXAMPLES / "crf.rec", dict(n=8)),
    ("gru", EXAMPLES / "gru.rec", dict(d_in=64, d=64)),
    ("lstm", EXAMPLES / "lstm.rec", dict(d_in=64, d=64)),
    ("paragru", EXAMPLES / "paragru.rec", dict(d_in=64, d=64)),
    ("paralstm", EXAMPLES / "paralstm.rec", dict(d_in=64, d=64)),
    ("slstm", EXAMPLES / "slstm.rec", dict(d_in=64, heads=4, dh=16)),
    ("ttt_linear (right)", TTT, dict(dk=16, dv=16)),
    ("gated_deltanet", EXAMPLES / "gated_deltanet.rec", dict(dk=32, dv=32)),
    ("rwkv6", EXAMPLES / "rwkv6.rec", dict(dk=64, dv=64)),
    ("hgrn2", EXAMPLES / "hgrn2.rec", dict(d_in=64, dk=64, dv=64)),
    ("s4d", EXAMPLES / "s4d.rec", dict(d=64, N=64)),
    ("lion", EXAMPLES / "lion.rec", dict(dk=64, dv=64)),
    ("bigru", EXAMPLES / "bigru.rec", dict(d_in=64, d=64)),
    ("crf_marginals", EXAMPLES / "crf_marginals.rec", dict(n=8)),
    ("state_tracking_lrnn", EXAMPLES / "state_tracking_lrnn.rec", dict(d=64, n=64)),
    ("titans", EXAMPLES / "titans.rec", dict(dk=16, dv=16)),
]


def _inputs(module: recdsl.CompiledCell, batch: int, length: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tensors = []
    for declared in module.cell.inputs:
        shape = (batch, length, *declared.type.shape)
        value = torch.randn(shape, generator=generator) * 0.5
        if declared.type.kind.value == "complex":
            value = torch.complex(value, torch.randn(shape, generator=generator) * 0.5)
        tensors.append(value)
    return tensors


# A form whose first (warm-up) call takes longer than this is timed by that call alone.
SLOW_SECONDS = 5.0
clock = time.perf_counter


def _best_seconds(module: recdsl.CompiledCell, inputs: list[torch.Tensor], repeat: int) -> float:
    best = float("inf")
    with torch.no_grad():
        start = clock()
        module(*inputs)  # the fused form compiles its C here (cached on disk afterwards)
        first = clock() - start
        if first > SLOW_SECONDS and module.plan.backend is not BackendKind.FUSED:
            return first  # slow enough that one call is the measurement (newton on a dense LSTM)
        start = clock()
        module(*inputs)
        best = clock() - start
        if best > SLOW_SECONDS:
            return best
        for _ in range(repeat - 1):
            start = clock()
            module(*inputs)
            best = min(best, clock() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke test")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", help="comma-separated cell labels (default: all)")
    parser.add_argument("--cpu-time", action="store_true", help="time with the process's CPU time instead of the clock")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    args = parser.parse_args()
    global clock
    if args.cpu_time:
        clock = time.process_time
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, length, repeat = (2, 64, 1) if args.quick else (4, 1024, args.repeat)
    options = PlanOptions(workload=Workload(batch=batch, length=length))
    timer = "CPU time" if args.cpu_time else "the clock"
    print(f"cost model against {timer}: forward, B = {batch}, T = {length}, best of {repeat}, {torch.get_num_threads()} threads\n")
    header = f"{'cell':<12} {'backend':<10} {'predicted ms':>13} {'measured ms':>12}"
    print(header)
    print("-" * len(header))
    picked_fastest = 0
    rows = []
    chosen_cells = set(args.only.split(",")) if args.only else None
    for label, source, dims in CELLS:
        if chosen_cells is not None and label not in chosen_cells:
            continue
        if args.quick:
            dims = {k: (min(v, 8) if isinstance(v, int) else v) for k, v in dims.items()}
        auto = recdsl.compile(source, **dims)
        planned = recdsl.plan.plan(auto.analysis, "auto", options)
        predicted = {c.backend: c.seconds for c in planned.costs}
        considered = {c.backend for c in planned.costs if c.candidate}
        measured = {}
        for kind in (BackendKind.SEQUENTIAL, BackendKind.SCAN, BackendKind.CHUNKED, BackendKind.FUSED, BackendKind.NEWTON):
            if kind in considered and predicted.get(kind) is None:
                continue
            if kind not in considered:
                # Not a candidate of auto (the cell has scan forms): the fused loop is still
                # timed, so that the table shows what auto leaves on the table.
                if kind is not BackendKind.FUSED or isinstance(recdsl.plan.plan_backend(auto.analysis, kind, options), recdsl.plan.Unsupported):
                    continue
            module = recdsl.compile(source, backend=kind.value, **dims)
            measured[kind] = _best_seconds(module, _inputs(module, batch, length), repeat)
            shown = f"{predicted[kind] * 1e3:>13.2f}" if kind in considered else f"{'(not auto)':>13}"
            print(f"{label:<12} {kind.value:<10} {shown} {measured[kind] * 1e3:>12.2f}", flush=True)
        candidates = {k: v for k, v in measured.items() if k in considered}
        fastest = min(candidates, key=candidates.__getitem__)
        overall = min(measured, key=measured.__getitem__)
        chosen = planned.backend
        picked_fastest += chosen is fastest
        rows.append((label, chosen, fastest, measured[chosen] / measured[fastest], measured[BackendKind.SEQUENTIAL] / measured[chosen], overall, measured[chosen] / measured[overall]))
    print()
    print(f"{'cell':<12} {'auto picks':<11} {'fastest':<11} {'auto / fastest':>15} {'sequential / auto':>18}   {'fastest of all':<15} {'auto / it':>9}")
    for label, chosen, fastest, slower, speedup, overall, behind in rows:
        print(f"{label:<12} {chosen.value:<11} {fastest.value:<11} {slower:>15.2f} {speedup:>18.2f}   {overall.value:<15} {behind:>9.2f}")
    print(f"\nauto picks the measured fastest of its candidates for {picked_fastest} of {len(rows)} cells")
    print("(fastest of all: including the fused loop where auto does not consider it, on cells with scan forms)")

    if chosen_cells is not None and "ttt (right)" not in chosen_cells:
        return
    # The cell that once made auto run a dense matrix scan 95x slower than the loop.
    ttt_length = 64 if args.quick else 256
    auto = recdsl.compile(TTT, dk=16, dv=16)
    sequential = recdsl.compile(TTT, backend="sequential", dk=16, dv=16)
    inputs = _inputs(auto, batch, ttt_length)
    auto_seconds, sequential_seconds = _best_seconds(auto, inputs, repeat), _best_seconds(sequential, inputs, repeat)
    print(
        f"\nTTT memory written from the right (dk = dv = 16, B = {batch}, T = {ttt_length}): auto runs {auto.backend} "
        f"({auto.plan.step('W').form.name}) in {auto_seconds * 1e3:.1f} ms, sequential {sequential_seconds * 1e3:.1f} ms "
        f"({sequential_seconds / auto_seconds:.2f}x)"
    )


if __name__ == "__main__":
    main()
