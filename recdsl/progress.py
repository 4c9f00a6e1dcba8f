"""Progress bars for long work (``recdsl check``, ``recdsl bench``, benchmarks, training).

A thin, shared default over tqdm: the bar goes to stderr, disappears when done, and is
silent when stderr is not a terminal (tqdm's ``disable=None``), so that logs, pipes and
the test suite see only the results.  ``RECDSL_PROGRESS=0`` turns bars off, ``=1`` forces
them on.
"""

from __future__ import annotations

import os
import sys
from typing import Iterable, TypeVar

from tqdm import tqdm

T = TypeVar("T")


def _disable() -> bool | None:
    setting = os.environ.get("RECDSL_PROGRESS", "").strip()
    if setting == "0":
        return True
    if setting == "1":
        return False
    return None  # tqdm: off unless the stream is a terminal


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None, unit: str = "it", leave: bool = False) -> tqdm:
    """A tqdm bar over ``iterable`` (or a manual one of ``total`` steps), quiet off a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, disable=_disable(), dynamic_ncols=True)
