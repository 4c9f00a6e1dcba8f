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


def _sequential() -> Backend:
    from . import sequential

    return Backend("sequential", "a loop over time: the definition every other backend is checked against", lambda analysis: None, sequential.run)


# Preference order for `auto`: the first backend that supports a cell wins.
_FACTORIES: dict[str, Callable[[], Backend]] = {"sequential": _sequential}
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
        reasons = []
        for candidate in BACKENDS:
            backend = get_backend(candidate)
            why_not = backend.unsupported(analysis)
            if why_not is None:
                if candidate == "sequential":
                    return backend, "the sequential loop is the only backend available for this cell" + (
                        f" ({'; '.join(reasons)})" if reasons else ""
                    )
                return backend, f"{candidate} is the fastest backend that supports this cell"
            reasons.append(f"{candidate}: {why_not}")
        raise BackendError("no backend can run this cell: " + "; ".join(reasons))
    backend = get_backend(name)
    why_not = backend.unsupported(analysis)
    if why_not is not None:
        raise BackendError(f"backend '{name}' cannot run cell {analysis.cell.name}: {why_not}", expected="backend='sequential' or 'auto'")
    return backend, f"backend '{name}' was requested"
