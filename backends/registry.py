"""The registry of backends: for each :class:`~recdsl.plan.BackendKind`, the function that runs its plans.

Choosing a backend is the plan stage's job (:func:`recdsl.plan.plan`); a backend here only
interprets an :class:`~recdsl.plan.ExecutionPlan`.  Runners are imported when first used,
so that the Triton backend (and triton) is loaded only by cells that run on it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Mapping, Protocol

from recdsl.analysis import Analysis
from recdsl.plan import BackendKind, ExecutionPlan, PlanOptions, Unsupported, backend_kind, plan, plan_backend


class Runner(Protocol):
    def __call__(self, plan: ExecutionPlan, inputs: Mapping, params: Mapping, consts: Mapping, state: Mapping, numerics) -> tuple[list, dict]: ...


@dataclass(frozen=True)
class Backend:
    """A way of running a cell: ``module.run(plan, inputs, params, consts, state, numerics)``."""

    kind: BackendKind
    description: str
    module: str  # the module (under recdsl.backends) whose ``entry`` interprets the plan
    entry: str = "run"

    @property
    def name(self) -> str:
        return self.kind.value

    @property
    def run(self) -> Runner:
        return getattr(importlib.import_module(f"recdsl.backends.{self.module}"), self.entry)

    def unsupported(self, analysis: Analysis) -> str | None:
        """Why this backend cannot run ``analysis``'s cell (None when it can)."""
        planned = plan_backend(analysis, self.kind, PlanOptions())
        return planned.reason if isinstance(planned, Unsupported) else None


_BACKENDS: dict[BackendKind, Backend] = {
    backend.kind: backend
    for backend in (
        Backend(BackendKind.SEQUENTIAL, "a loop over time: the definition every other backend is checked against", "sequential"),
        Backend(BackendKind.SCAN, "scans over the whole sequence, one per recurrence", "parallel"),
        Backend(
            BackendKind.CHUNKED,
            "matrix states read out linearly are computed chunk by chunk without storing them per step; other recurrences are scanned",
            "parallel",
        ),
        Backend(
            BackendKind.TRITON,
            "generated Triton scan kernels with the gate math fused in, forward and backward; nonlinear and coupled cells in one fused sequential kernel (GPU, or TRITON_INTERPRET=1 on a CPU)",
            "triton_backend",
        ),
        Backend(
            BackendKind.NEWTON,
            "Newton's method over the whole trajectory, each iteration a parallel scan of the linearised steps; gradients by implicit differentiation",
            "newton",
            "run_plan",
        ),
        Backend(
            BackendKind.FUSED,
            "the loop over time compiled to C on the CPU (shared matmuls merged, gate math fused, a hand-derived adjoint loop)",
            "fused_sequential",
            "run_plan",
        ),
    )
}
BACKENDS: tuple[str, ...] = tuple(kind.value for kind in _BACKENDS)


def get_backend(name: str | BackendKind) -> Backend:
    """The backend called ``name``; a :class:`~recdsl.errors.BackendError` lists the others."""
    return _BACKENDS[backend_kind(name)]


def choose_backend(name: str, analysis: Analysis) -> tuple[Backend, str]:
    """The backend the plan stage picks for ``analysis``'s cell (``name`` or ``auto``), and why."""
    planned = plan(analysis, name)
    return _BACKENDS[planned.backend], planned.reason


def runner(kind: BackendKind) -> Runner:
    """The function that interprets plans of backend ``kind`` (its module imported now)."""
    return _BACKENDS[kind].run
