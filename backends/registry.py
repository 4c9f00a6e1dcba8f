"""The registry of backends: their names, what each can run, and how ``auto`` chooses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

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
    options: tuple[str, ...] = ()  # the keyword options ``run`` accepts from ``compile(backend_options=...)``
    reports: bool = False  # ``run`` takes a ``report`` callback (the module keeps the last report)
    explain: Callable[[Analysis], str] | None = None  # what the backend does with a cell, for ``recdsl explain``
    prepare: Callable[[Analysis], dict[str, Any]] | None = None  # options for ``run`` made once per module (a plan)

    def check_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` if ``run`` accepts every one of them; else a :class:`BackendError`."""
        for key in options:
            if key not in self.options:
                accepted = ", ".join(self.options) if self.options else "none"
                raise BackendError(f"backend '{self.name}' has no option '{key}'", expected=f"options of backend '{self.name}': {accepted}")
        return dict(options)


def _sequential() -> Backend:
    from . import sequential

    return Backend("sequential", "a loop over time: the definition every other backend is checked against", lambda analysis: None, sequential.run)


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


def _newton() -> Backend:
    from . import newton

    return Backend(
        "newton",
        "Newton's method over the whole trajectory, each iteration a parallel scan of the linearised steps; gradients by implicit differentiation",
        newton.unsupported,
        newton.run,
        options=newton.OPTIONS,
        reports=True,
        explain=newton.explain,
        prepare=newton.prepare,
    )


_FACTORIES: dict[str, Callable[[], Backend]] = {"sequential": _sequential, "scan": _scan, "chunked": _chunked, "triton": _triton, "newton": _newton}
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
