"""One door for every Triton kernel launch of the backend, so that tools can watch launches.

:func:`launch` is ``kernel[grid](*args, **meta)``; while :func:`observe_launches` is
active it also records each launch as a :class:`KernelLaunch`.  Two tools read those
records: the ahead-of-time compile test (:mod:`.triton_aot` compiles each recorded
kernel, with the argument types and specialisation of the launch, for sm_80 and sm_90)
and ``benchmarks/traffic.py`` (the bytes each launch's pointers address).  Nothing here
imports triton.
"""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

# The launch options Triton takes beside a kernel's own arguments; the rest of ``meta`` are constexprs.
LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg"})


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch: the kernel, its grid, positional arguments and keyword ``meta``.

    ``meta`` holds the constexpr arguments (block sizes, the accumulator type) and the launch
    options (``num_warps``, ``num_stages``).
    """

    kernel: Any  # a triton JITFunction, or an InterpretedFunction under TRITON_INTERPRET=1
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: Mapping[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.python_function.__name__

    @property
    def python_function(self):
        """The undecorated Python function of the kernel (both Triton wrappers keep it as ``fn``)."""
        return getattr(self.kernel, "fn", self.kernel)

    @property
    def constexprs(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k not in LAUNCH_OPTIONS}

    @property
    def options(self) -> dict[str, Any]:
        return {k: v for k, v in self.meta.items() if k in LAUNCH_OPTIONS}

    def arguments(self) -> dict[str, Any]:
        """Every argument by name: the positional ones, then the constexprs."""
        import inspect

        names = list(inspect.signature(self.python_function).parameters)
        named = dict(zip(names, self.args))
        named.update(self.constexprs)
        return named


_RECORDS: list[list[KernelLaunch]] = []
_DRY_RUNS: list[bool] = []


@contextmanager
def observe_launches(run_kernels: bool = True) -> Iterator[list[KernelLaunch]]:
    """Record every launch made inside the ``with`` block, in order, into the list it yields.

    With ``run_kernels=False`` the kernels are recorded but not run (their outputs keep
    whatever ``torch.empty`` gave): enough to learn, at full size and without a GPU or the
    interpreter's cost, which kernels a layer launches and with which arguments.
    """
    records: list[KernelLaunch] = []
    _RECORDS.append(records)
    _DRY_RUNS.append(not run_kernels)
    try:
        yield records
    finally:
        _RECORDS.remove(records)
        _DRY_RUNS.pop()


def kernels_run() -> bool:
    """False inside ``observe_launches(run_kernels=False)``: the kernels' outputs are then
    meaningless, and checks on their values (the chunked kernels' finite final state) pass."""
    return not any(_DRY_RUNS)


# Triton's interpreter patches triton.language for the duration of each launch, so two
# threads interpreting kernels at once break each other ("Did you forget to add
# @triton.jit?"); compiled launches need no lock.
_INTERPRETER_LOCK = threading.Lock()


def launch(kernel, grid: tuple[int, ...], *args: Any, **meta: Any) -> None:
    """``kernel[grid](*args, **meta)``, recorded by any active :func:`observe_launches`.

    Under ``TRITON_INTERPRET=1`` launches run one at a time across threads.
    """
    if _RECORDS:
        record = KernelLaunch(kernel, tuple(grid), args, dict(meta))
        for records in _RECORDS:
            records.append(record)
        if any(_DRY_RUNS):
            return
    if os.environ.get("TRITON_INTERPRET") == "1":
        with _INTERPRETER_LOCK:
            kernel[tuple(grid)](*args, **meta)
        return
    kernel[tuple(grid)](*args, **meta)
