"""The newton backend (Newton's method over the whole sequence) against step-by-step forms.

    python benchmarks/bench_newton.py            # the full run (2-core CPU: several minutes)
    python benchmarks/bench_newton.py --quick    # small sizes, a smoke test

Three parts:

1. Time, ParaGRU (examples/paragru.rec, diagonal recurrence), B = 2, T = 8192,
   d = d_in = 64: forward and forward+backward of the newton backend, of the sequential
   backend, and of a plain torch loop of the same cell (``unbind`` once, then one step per
   iteration: what a user would write by hand).  Best of ``--repeat`` runs after a warm-up.
2. Iterations to converge, ParaGRU, float32 and float64, T = 256 ... 65536 (forward).
3. Iterations to converge, GRU (examples/gru.rec, dense Jacobian) with
   ``jacobian="diagonal"`` (quasi-Newton) and with the full Jacobian, float32 and float64,
   at a smaller width (``--gru-width``): the diagonal of a dense block costs one
   forward-mode product per element, so a wide GRU is slow to linearise.

The newton backend's ``mod.last_solve`` reports the iterations, the final residual and
whether any suffix had to be finished sequentially.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def paragru_loop(x: torch.Tensor, mod) -> torch.Tensor:
    """ParaGRU as a hand-written torch loop: projections for all steps, then one step per iteration."""
    pz, pr, ph = (x @ mod.W_z + mod.b_z).unbind(1), (x @ mod.W_r + mod.b_r).unbind(1), (x @ mod.W_h + mod.b_h).unbind(1)
    h = x.new_zeros(x.shape[0], mod.a_z.shape[0])
    states = []
    for t in range(x.shape[1]):
        z = torch.sigmoid(pz[t] + mod.a_z * h)
        r = torch.sigmoid(pr[t] + mod.a_r * h)
        n = torch.tanh(ph[t] + mod.a_h * (r * h))
        h = (1 - z) * h + z * n
        states.append(h)
    return torch.stack(states, 1)


def best_of(repeat: int, run) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def forward_backward(function, x: torch.Tensor):
    def run():
        leaf = x.detach().requires_grad_()
        function(leaf).square().mean().backward()

    return run


def forward(function, x: torch.Tensor):
    def run():
        with torch.no_grad():
            function(x)

    return run


def timing(args) -> None:
    d, steps = args.width, args.length
    torch.manual_seed(0)
    newton = recdsl.compile(EXAMPLES / "paragru.rec", backend="newton", d_in=d, d=d)
    sequential = recdsl.compile(EXAMPLES / "paragru.rec", backend="sequential", d_in=d, d=d)
    sequential.load_state_dict(newton.state_dict())
    x = torch.randn(args.batch, steps, d)
    forward(newton, x[:, :64])()  # warm-up: torch.func's first forward-mode product
    forms = {
        "newton": lambda v: newton(v),
        "sequential backend": lambda v: sequential(v),
        "torch loop (unbind once)": lambda v: paragru_loop(v, newton),
    }
    print(f"ParaGRU, B = {args.batch}, T = {steps}, d = d_in = {d}, float32, {torch.get_num_threads()} threads; best of {args.repeat} (seconds)")
    results = {}
    for name, function in forms.items():
        fwd = best_of(args.repeat, forward(function, x))
        if name == "sequential backend" and steps > args.max_sequential_backward:
            fb = float("nan")
        else:
            fb = best_of(args.repeat if name != "sequential backend" else 1, forward_backward(function, x))
        results[name] = (fwd, fb)
        print(f"  {name:26s} forward {fwd:8.3f}   forward+backward {fb:8.3f}", flush=True)
    solve = newton.last_solve
    print(f"  newton: {solve.iterations} iterations, residual {solve.residual:.1e} (tolerance {solve.tolerance:.1e}), sequential steps {solve.sequential_steps}")
    nf, nb = results["newton"]
    for name in ("sequential backend", "torch loop (unbind once)"):
        fwd, fb = results[name]
        print(f"  speed-up of newton over the {name}: forward {fwd / nf:.2f}x, forward+backward {fb / nb:.2f}x")


def iterations(name: str, dims: dict, lengths: list[int], options: dict, batch: int) -> None:
    label = f"{name} {options or ''}".strip()
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="newton", backend_options=options or None, **dims).to(dtype)
        row = []
        for steps in lengths:
            x = torch.randn(batch, steps, dims["d_in"], dtype=dtype)
            if name == "slstm":
                x = 0.5 * x  # unit-scale gates
            start = time.perf_counter()
            with torch.no_grad():
                module(x)
            elapsed = time.perf_counter() - start
            solve = module.last_solve
            note = "" if solve.converged else f" (+{solve.sequential_steps} sequential)"
            row.append(f"T={steps}: {solve.iterations}{note} [{elapsed:.2f}s]")
        print(f"  {label:28s} {str(dtype).replace('torch.', ''):8s} " + ", ".join(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--gru-width", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable timings on a shared machine)")
    parser.add_argument("--max-sequential-backward", type=int, default=8192, help="skip the sequential backend's backward above this T")
    parser.add_argument("--iterations-only", action="store_true", help="only the tables of iterations to converge")
    parser.add_argument("--gru-max-length", type=int, default=16384, help="the longest T of the GRU rows (65536 takes minutes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lengths = [256, 1024, 4096, 16384, 65536]
    gru_lengths = [t for t in lengths if t <= args.gru_max_length]
    if args.quick:
        args.length, args.width, args.repeat, args.gru_width = 256, 8, 1, 4
        lengths, gru_lengths = [64, 256], [64, 256]
    if not args.iterations_only:
        timing(args)
    print(f"\nNewton iterations to converge (tolerance 16 eps of the dtype), B = {args.batch}; [forward seconds]")
    iterations("paragru", dict(d_in=args.width, d=args.width), lengths, {}, args.batch)
    gru = dict(d_in=args.gru_width, d=args.gru_width)
    iterations("gru", gru, gru_lengths, {"jacobian": "diagonal"}, args.batch)
    iterations("gru", gru, gru_lengths, {"jacobian": "full"}, args.batch)
    slstm = dict(d_in=args.gru_width, heads=4, dh=max(1, args.gru_width // 4))
    iterations("slstm", slstm, [t for t in gru_lengths if t <= 4096], {}, args.batch)


if __name__ == "__main__":
    main()
