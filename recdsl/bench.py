"""``recdsl bench FILE``: time one cell on every backend that can run it, across sequence lengths.

For each batch size and length T, each backend is timed forward (under ``no_grad``) and
forward+backward (the gradient of the mean square of the outputs with respect to inputs
and params), as the median of ``repeat`` runs after one warm-up.  The result prints as a
table and plots as time against T on log-log axes, one line per backend
(:func:`recdsl.plotting.plot_times`).  Nothing here asserts a timing: numbers are for
people to read.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .errors import BackendError, RecDSLError
from .module import CompiledCell, compile


class BenchError(RecDSLError):
    """``recdsl bench`` was given sizes it cannot time."""

    kind = "bench error"


class Pass(Enum):
    FORWARD = "forward"
    FORWARD_BACKWARD = "forward+backward"


@dataclass(frozen=True)
class Timing:
    """One measurement: milliseconds, or None with the reason it was skipped."""

    backend: str
    batch: int
    length: int
    pass_: Pass
    milliseconds: float | None
    skipped: str | None = None


@dataclass
class BenchResult:
    cell: str
    dims: tuple[tuple[str, int | float], ...]
    device: str
    backends: tuple[str, ...]
    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    heads: tuple[int, ...]
    timings: list[Timing] = field(default_factory=list)

    def time(self, backend: str, batch: int, length: int, pass_: Pass) -> Timing | None:
        for timing in self.timings:
            if (timing.backend, timing.batch, timing.length, timing.pass_) == (backend, batch, length, pass_):
                return timing
        return None


def runnable_backends(module: CompiledCell, device: str) -> tuple[str, ...]:
    """Every registered backend that can run the cell here (``triton`` only on a CUDA device)."""
    from .backends import BACKENDS, get_backend

    found = []
    for name in BACKENDS:
        if name == "triton" and not device.startswith("cuda"):
            continue  # on a CPU, Triton runs only in its interpreter: no timing to read
        if get_backend(name).unsupported(module.analysis) is None:
            found.append(name)
    return tuple(found)


def _inputs(module: CompiledCell, batch: int, length: int, heads: tuple[int, ...], device: str, grad: bool) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for declared in module.cell.inputs:
        shape = (batch, length, *heads, *declared.type.shape)
        value = 0.5 * torch.randn(shape, generator=generator)
        if declared.type.kind.value == "complex":
            value = torch.complex(value, 0.5 * torch.randn(shape, generator=generator))
        inputs[declared.name] = value.to(device).requires_grad_(grad)
    return inputs


def _measure(module: CompiledCell, inputs: Mapping[str, torch.Tensor], pass_: Pass, repeat: int, device: str) -> float:
    def once() -> float:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        if pass_ is Pass.FORWARD:
            with torch.no_grad():
                module(**inputs)
        else:
            outputs = module(**inputs)
            outputs = outputs if isinstance(outputs, tuple) else (outputs,)
            loss = sum((o.abs() if o.is_complex() else o).float().square().mean() for o in outputs)
            loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start

    once()  # warm-up: first-call planning, kernel compilation, allocator
    return statistics.median(once() for _ in range(repeat)) * 1e3


def run_bench(
    source_or_path: str | Path,
    *,
    cell: str | None = None,
    dims: Mapping[str, int | float] | None = None,
    lengths: Sequence[int] = (64, 256, 1024, 4096),
    batches: Sequence[int] = (4,),
    heads: Sequence[int] = (),
    backends: Sequence[str] | None = None,
    passes: Sequence[Pass] = (Pass.FORWARD, Pass.FORWARD_BACKWARD),
    repeat: int = 3,
    device: str = "cpu",
    max_sequential_length: int | None = 4096,
    show_progress: bool = True,
) -> BenchResult:
    """Time the cell on ``backends`` (default: all that run here) at every batch size and length.

    The sequential backend is skipped above ``max_sequential_length`` (a Python loop over
    each step says nothing new there).  Backends share the same parameters.
    """
    from .progress import progress

    for what, values in (("length", lengths), ("batch size", batches), ("repeat", (repeat,))):
        if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
            raise BenchError(f"every {what} must be a positive integer, got {list(values)}", expected=f"e.g. --{'lengths 256 1024' if what == 'length' else 'batch 4' if what == 'batch size' else 'repeat 3'}")
    torch.manual_seed(0)
    reference = compile(source_or_path, cell=cell, **dict(dims or {})).to(device)
    chosen = tuple(backends) if backends else runnable_backends(reference, device)
    for name in chosen:
        from .backends import get_backend

        why_not = get_backend(name).unsupported(reference.analysis)
        if why_not is not None:
            raise BackendError(f"backend '{name}' cannot run cell {reference.cell.name}: {why_not}", expected="one of: " + ", ".join(runnable_backends(reference, device)))
    modules = {}
    for name in chosen:
        module = CompiledCell(reference.analysis, name)
        module.load_state_dict(reference.state_dict())
        modules[name] = module.to(device)
    result = BenchResult(reference.cell.name, reference.cell.dims, device, chosen, tuple(batches), tuple(lengths), tuple(heads))
    work = [(b, n, name, p) for b in batches for n in lengths for name in chosen for p in passes]
    bar = progress(total=len(work), desc=f"bench {reference.cell.name}", unit="timing") if show_progress else None
    try:
        for batch, length, name, pass_ in work:
            if bar is not None:
                bar.set_postfix_str(f"{name} B={batch} T={length} {pass_.value}")
            if name == "sequential" and max_sequential_length is not None and length > max_sequential_length:
                result.timings.append(Timing(name, batch, length, pass_, None, f"T > --max-sequential-length {max_sequential_length}"))
            else:
                inputs = _inputs(modules[name], batch, length, tuple(heads), device, pass_ is Pass.FORWARD_BACKWARD)
                milliseconds = _measure(modules[name], inputs, pass_, repeat, device)
                result.timings.append(Timing(name, batch, length, pass_, milliseconds))
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return result


def format_table(result: BenchResult) -> str:
    """The timings as a markdown table: one row per backend, pass and batch size; a column per T."""
    dims = ", ".join(f"{n}={v}" for n, v in result.dims)
    heads = f", heads {list(result.heads)}" if result.heads else ""
    lines = [
        f"cell {result.cell}({dims}) on {result.device}{heads}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        "milliseconds, median after a warm-up",
        "",
        "| backend | pass | B | " + " | ".join(f"T={n}" for n in result.lengths) + " |",
        "|---|---|---|" + "---:|" * len(result.lengths),
    ]
    passes = [p for p in Pass if any(t.pass_ is p for t in result.timings)]
    for pass_ in passes:
        for batch in result.batches:
            for name in result.backends:
                cells = []
                for length in result.lengths:
                    timing = result.time(name, batch, length, pass_)
                    cells.append("—" if timing is None or timing.milliseconds is None else f"{timing.milliseconds:.2f}")
                lines.append(f"| {name} | {pass_.value} | {batch} | " + " | ".join(cells) + " |")
    skipped = sorted({t.skipped for t in result.timings if t.skipped})
    if skipped:
        lines.append("")
        lines.extend(f"—: skipped, {reason}" for reason in skipped)
    return "\n".join(lines) + "\n"


def plot_result(result: BenchResult, path: str | Path) -> Path:
    """Time against T, log-log, one line per backend (and batch size when several), a panel per pass."""
    from .plotting import plot_times

    series: dict[str, dict[str, dict[int, float]]] = {}
    for timing in result.timings:
        if timing.milliseconds is None:
            continue
        label = timing.backend if len(result.batches) == 1 else f"{timing.backend}, B={timing.batch}"
        series.setdefault(timing.pass_.value, {}).setdefault(label, {})[timing.length] = timing.milliseconds
    dims = ", ".join(f"{n}={v}" for n, v in result.dims)
    batch = f", B={result.batches[0]}" if len(result.batches) == 1 else ""
    return plot_times(series, path, f"cell {result.cell}({dims}) on {result.device}{batch}")
