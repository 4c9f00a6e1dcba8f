"""Forward and forward+backward time of recdsl's backends against hand-written torch forms.

    python benchmarks/bench_parallel.py                 # the full table (CPU: a few minutes)
    python benchmarks/bench_parallel.py --quick         # small sizes, a smoke test
    python benchmarks/bench_parallel.py --device cuda   # on a GPU
    python benchmarks/bench_parallel.py --plot out.png  # also time against T, log-log (needs matplotlib)

Cells: minGRU, S6 (Mamba's selective SSM), GLA and DeltaNet from examples/, at
T in {256, 1024, 4096, 16384}.  Each row times one form; the columns are milliseconds
(median of --repeat runs after a warm-up).  The comparisons a user would otherwise write:

- minGRU: the log-space parallel scan of the minGRU paper (``cumsum`` of log decays and
  ``logcumsumexp``), with the candidate split into positive and negative parts so that
  the plain (not log-space) cell is computed exactly;
- GLA: a hand-written chunked form (decay masks inside chunks, states between chunks);
- torch.nn.GRU at the same width, for scale.

Peers that are installed are timed too (``pip install --no-deps accelerated-scan
flash-linear-attention==0.6.0 fla-core==0.6.0 einops``): accelerated-scan's reference
scan and flash-linear-attention's naive recurrent GLA and delta rule.  The sequential
backend is skipped above ``--max-sequential-length`` (a Python loop over 16384 steps takes
long and says nothing new), and the scan backend where it would store more than
``--max-scan-elements`` state values (GLA's and DeltaNet's 64 x 64 states at long T:
that is what the chunked form avoids).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# ---- hand-written forms ----------------------------------------------------------------


def mingru_log_space(z: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """minGRU by the paper's log-space scan: h_t = sum_s (prod_{r=s+1..t} (1 - z_r)) z_s h~_s."""
    log_decay = torch.log1p(-z)
    a_star = log_decay.cumsum(1)
    value = z * candidate
    positive = torch.logcumsumexp(torch.log(value.clamp(min=0)) - a_star, 1)
    negative = torch.logcumsumexp(torch.log((-value).clamp(min=0)) - a_star, 1)
    return torch.exp(a_star + positive) - torch.exp(a_star + negative)


def gla_chunked(q, k, v, log_alpha, chunk: int = 64) -> torch.Tensor:
    """Gated linear attention, chunk by chunk: [B, T, K] x3 and log decays [B, T, K] -> [B, T, V]."""
    batch, steps, keys = q.shape
    values = v.shape[-1]
    n = steps // chunk
    q, k, v, g = (x.reshape(batch, n, chunk, -1) for x in (q, k, v, log_alpha))
    cumulative = g.cumsum(2)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    state = q.new_zeros(batch, keys, values)
    outputs = []
    for c in range(n):
        G = cumulative[:, c]
        difference = (G[:, :, None] - G[:, None, :]).masked_fill(~mask[None, :, :, None], float("-inf")).exp()
        scores = torch.einsum("btk,bsk,btsk->bts", q[:, c], k[:, c], difference)
        outputs.append(scores @ v[:, c] + (q[:, c] * G.exp()) @ state)
        last = G[:, -1:]
        state = last.exp().transpose(1, 2) * state + (k[:, c] * (last - G).exp()).transpose(1, 2) @ v[:, c]
    return torch.cat(outputs, 1)


# ---- timing ----------------------------------------------------------------------------------


def measure(fn: Callable[[], torch.Tensor], backward: bool, repeat: int, device: str) -> float:
    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        if backward:
            out = fn()
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
        else:
            with torch.no_grad():
                fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()
    return statistics.median(once() for _ in range(repeat)) * 1e3


def inputs_for(module, batch: int, length: int, heads: tuple[int, ...], device: str, requires_grad: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for declared in module.cell.inputs:
        value = torch.randn(batch, length, *heads, *declared.type.shape, generator=generator)
        if declared.name == "k":
            value = F.normalize(value, dim=-1)
        if declared.name == "g":
            value = value + 4.0
        inputs[declared.name] = value.to(device).requires_grad_(requires_grad)
    return inputs


CELLS = {
    "minGRU": ("mingru.rec", dict(d_in=64, d=64), ()),
    "S6": ("s6.rec", dict(d=64, n=16), ()),
    "GLA": ("gla.rec", dict(dk=64, dv=64), (2,)),
    "DeltaNet": ("deltanet.rec", dict(dk=64, dv=64), (2,)),
}


def rows_for(name: str, length: int, args) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    file, dims, heads = CELLS[name]
    rows = []
    modules = {}
    for backend in ("sequential", "scan", "chunked"):
        if backend == "sequential" and length > args.max_sequential_length:
            continue
        torch.manual_seed(0)
        module = recdsl.compile(EXAMPLES / file, backend=backend, **dims).to(args.device)
        stored = max(_numel(s.type.shape) for s in module.cell.states) * args.batch * length * _numel(heads)
        if backend == "scan" and stored > args.max_scan_elements:
            continue  # the scan stores every step's state: at this size, gigabytes
        modules[backend] = module
    for backend, module in modules.items():
        inputs = inputs_for(module, args.batch, length, heads, args.device, True)
        rows.append((f"recdsl {backend}", lambda m=module, i=inputs: m(**i)))
    reference = modules["chunked"]
    inputs = inputs_for(reference, args.batch, length, heads, args.device, True)
    if name == "minGRU":
        def log_space(m=reference, i=inputs):
            z = torch.sigmoid(i["x"] @ m.W_z + m.b_z)
            return mingru_log_space(z, i["x"] @ m.W_h + m.b_h)

        rows.append(("hand-written log-space scan", log_space))
        gru = torch.nn.GRU(dims["d_in"], dims["d"], batch_first=True).to(args.device)
        rows.append(("torch.nn.GRU (for scale)", lambda i=inputs: gru(i["x"])[0]))
    if name == "GLA" and length % 64 == 0:
        def flat(x):
            return x.transpose(1, 2).reshape(-1, length, x.shape[-1])

        rows.append(("hand-written chunked GLA", lambda i=inputs: gla_chunked(flat(i["q"]), flat(i["k"]), flat(i["v"]), F.logsigmoid(flat(i["g"])) / 16)))
        try:
            from fla.ops.gla.naive import naive_recurrent_gla

            if length <= args.max_sequential_length:
                rows.append(("fla naive_recurrent_gla", lambda i=inputs: naive_recurrent_gla(i["q"], i["k"], i["v"], F.logsigmoid(i["g"]) / 16)[0]))
        except Exception:
            pass
    if name == "minGRU":
        try:
            from accelerated_scan.ref import scan as reference_scan

            def accelerated(m=reference, i=inputs):
                z = torch.sigmoid(i["x"] @ m.W_z + m.b_z)
                return reference_scan((1 - z).transpose(1, 2).contiguous(), (z * (i["x"] @ m.W_h + m.b_h)).transpose(1, 2).contiguous())

            rows.append(("accelerated-scan ref.scan", accelerated))
        except Exception:
            pass
    return rows


def _numel(shape) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--lengths", type=int, nargs="*", default=[256, 1024, 4096, 16384])
    parser.add_argument("--cells", nargs="*", default=list(CELLS))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-sequential-length", type=int, default=4096)
    parser.add_argument("--max-scan-elements", type=int, default=2**24, help="skip the scan backend when it would store more state elements than this")
    parser.add_argument("--quick", action="store_true", help="T in {64, 256}, one repeat: a smoke test")
    parser.add_argument("--plot", type=Path, metavar="FILE.png", help="write time against T (log-log, one line per form); FILE-<cell>.png when several cells")
    args = parser.parse_args(argv)
    if args.quick:
        args.lengths, args.repeat = [64, 256], 1
    if args.plot is not None:
        from recdsl.plotting import pyplot

        pyplot()  # a missing matplotlib is reported before the timing, not after
    from recdsl.progress import progress
    print(f"# recdsl backends, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads, B={args.batch}")
    for name in args.cells:
        file, dims, heads = CELLS[name]
        print(f"\n## {name} ({file}, {', '.join(f'{k}={v}' for k, v in dims.items())}{', heads=' + str(heads[0]) if heads else ''})\n")
        header = "| form | pass | " + " | ".join(f"T={n}" for n in args.lengths) + " |"
        print(header)
        print("|" + "---|" * (2 + len(args.lengths)))
        table: dict[tuple[str, str], dict[int, float]] = {}
        for length in progress(args.lengths, desc=f"{name}", unit="T"):
            for label, fn in rows_for(name, length, args):
                for backward in (False, True):
                    key = (label, "fwd+bwd" if backward else "fwd")
                    try:
                        table.setdefault(key, {})[length] = measure(fn, backward, args.repeat, args.device)
                    except Exception as error:  # a peer that does not run here
                        print(f"<!-- {label} T={length}: {type(error).__name__}: {error} -->", file=sys.stderr)
        for (label, kind), times in table.items():
            cells = [f"{times[n]:.1f}" if n in times else "—" for n in args.lengths]
            print(f"| {label} | {kind} | " + " | ".join(cells) + " |")
        sys.stdout.flush()
        if args.plot is not None:
            from recdsl.plotting import plot_times

            path = args.plot if len(args.cells) == 1 else args.plot.with_name(f"{args.plot.stem}-{name}{args.plot.suffix}")
            series = {"forward": {}, "forward+backward": {}}
            for (label, kind), times in table.items():
                series["forward" if kind == "fwd" else "forward+backward"][label] = times
            plot_times(series, path, f"{name} ({file}) on {args.device}, B={args.batch}")
            print(f"\nplot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
