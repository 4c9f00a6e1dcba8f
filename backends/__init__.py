"""Execution forms of a compiled cell: interpreters of the plan made at compile time.

The folder lives at the top of the repository but is installed as ``recdsl.backends``
(see ``pyproject.toml``); importing it under any other name would duplicate the
registry, so it refuses.
"""

from __future__ import annotations

if __name__ != "recdsl.backends":  # pragma: no cover - a packaging mistake, not a user error
    raise ImportError(
        f"the backends package must be imported as 'recdsl.backends', not '{__name__}'; "
        "install recdsl (pip install -e .) instead of putting the repository root on sys.path"
    )

from .registry import BACKENDS, Backend, choose_backend, get_backend, runner  # noqa: E402

__all__ = ["BACKENDS", "Backend", "choose_backend", "get_backend", "runner"]
