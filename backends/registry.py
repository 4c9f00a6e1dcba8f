"""The registry of backends: their names, what each can run, and how ``auto`` chooses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from recdsl.analysis import Analysis
from recdsl.errors import BackendError


class Runner(Protocol):
    def __call__(self, analysis: Analysis, inputs, params, consts, state, numerics): ...


@dataclass(frozen=True)
class Backend:
    """A way of running a cell.

    ``unsupported(analysis)`` returns None when the backend can run the cell, else the
    reason it cannot, in words; ``run`` has the signature of
    :func:`recdsl.backends.sequential.run`.
    """

    name: str
    description: str
    unsupported: Callable[[Analysis], str | None]
    run: Runner


def _runs_every_cell(analysis: Analysis) -> None:
    """The sequential backend's ``unsupported``: it runs every cell.

    A module-level function, not a lambda, so that modules holding the backend pickle.
    """
    return None


def _sequential() -> Backend:
    from . import sequential

    return Backend("sequential", "a loop over time: the definition every other backend is checked against", _runs_every_cell, sequential.run)


def _scan() -> Backend:
    from . import parallel

    return Backend("scan", "log-depth associative scans over the whole sequence, one per recurrence", parallel.unsupported, parallel.run)


def _chunked() -> Backend:
    import functools

    from . import parallel

    return Backend(
        "chunked",
        "matrix states read out linearly are computed chunk by chunk without storing them per step; other recurrences are scanned",
        parallel.unsupported,
        functools.partial(parallel.run, chunked=True),
    )


def _triton() -> Backend:
    from . import triton_backend

    return Backend(
        "triton",
        "generated Triton scan kernels with the gate math fused in, forward and backward (GPU, or TRITON_INTERPRET=1 on a CPU)",
        triton_backend.unsupported,
        triton_backend.run,
    )


def _fused() -> Backend:
    from . import fused_sequential

    return Backend(
        "fused",
        "the sequential loop as generated C (matmuls sharing a state merged, gate math in tight loops, a generated adjoint loop), on CPU",
        fused_sequential.unsupported,
        fused_sequential.run,
    )


_FACTORIES: dict[str, Callable[[], Backend]] = {"sequential": _sequential, "scan": _scan, "chunked": _chunked, "triton": _triton, "fused": _fused}
BACKENDS: tuple[str, ...] = tuple(_FACTORIES)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; a :class:`BackendError` lists the others."""
    factory = _FACTORIES.get(name)
    if factory is None:
        raise BackendError(f"unknown backend '{name}'", expected="one of: auto, " + ", ".join(BACKENDS))
    return factory()


def choose_backend(name: str, analysis: Analysis) -> tuple[Backend, str]:
    """The backend to run ``analysis``'s cell with, and why it was chosen.

    ``name`` is a backend name or ``auto``.
    """
    if name == "auto":
        return _choose_auto(analysis)
    backend = get_backend(name)
    why_not = backend.unsupported(analysis)
    if why_not is not None:
        raise BackendError(f"backend '{name}' cannot run cell {analysis.cell.name}: {why_not}", expected="backend='sequential' or 'auto'")
    return backend, f"backend '{name}' was requested"


def _choose_auto(analysis: Analysis) -> tuple[Backend, str]:
    """The fastest correct form for the cell's classification.

    Nonlinear or coupled recurrences only run step by step.  Matrix states that outputs
    read linearly are cheapest in the chunked form (no per-step state is stored, and the
    work is matmuls); everything else is a log-depth scan.
    """
    from . import parallel

    why_not = parallel.unsupported(analysis)
    if why_not is not None:
        return get_backend("sequential"), f"no time-parallel form: {why_not}"
    chunked = []
    for state in analysis.states:
        plan = parallel.chunk_plan(analysis, state)
        if isinstance(plan, parallel.ChunkPlan):
            chunked.append(f"{state.state} ({plan.kind})")
    gpu = "; on a GPU, the generated Triton kernels" if get_backend("triton").unsupported(analysis) is None else ""
    if chunked:
        return get_backend("chunked"), (
            f"matrix state {', '.join(chunked)} is read out linearly, so chunks of {parallel.DEFAULT_CHUNK} steps "
            "compute it with matmuls without storing it per step; the other recurrences are scanned" + gpu
        )
    return get_backend("scan"), "every recurrence is associative (affine, semiring-affine or a declared monoid), so each is one log-depth scan" + gpu
