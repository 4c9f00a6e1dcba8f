"""The element budget: how large a tensor a cell may declare before anything is allocated.

Dims are bound at compile time, so the size of every param, const, state, scan carry,
per-step input, binding and output is known before ``compile`` allocates anything.  A
typo such as ``d_in=10**9`` would otherwise try to allocate many gigabytes for a param,
or overflow torch's size computation (``d=2**62``).  ``compile`` refuses, with the
declaration located in the source, any of them with more elements than the budget.

The budget is :data:`DEFAULT_MAX_ELEMENTS` elements per tensor (per step and per batch
element for inputs, states and bindings), overridden by ``compile(..., max_elements=N)``
or by the environment variable ``RECDSL_MAX_ELEMENTS``.
"""

from __future__ import annotations

import math
import os
from typing import Iterator

from . import ir
from .errors import DimensionError, Span

# 2 ** 28 elements is 1 GiB in float32: larger than any layer of a recurrent cell we know
# of (an embedding table of 50k x 4096 is 2 ** 27.6), small enough to fail before a swap.
DEFAULT_MAX_ELEMENTS = 2**28
MAX_ELEMENTS_VARIABLE = "RECDSL_MAX_ELEMENTS"


def element_budget(max_elements: object = None) -> int:
    """The budget in elements: ``max_elements`` if given, else ``$RECDSL_MAX_ELEMENTS``, else the default."""
    if max_elements is None:
        text = os.environ.get(MAX_ELEMENTS_VARIABLE, "").strip()
        if not text:
            return DEFAULT_MAX_ELEMENTS
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise DimensionError(
                f"the environment variable {MAX_ELEMENTS_VARIABLE} is {text!r}",
                expected=f"a positive integer number of elements (the default is {DEFAULT_MAX_ELEMENTS:_})",
            )
        return value
    if isinstance(max_elements, bool) or not isinstance(max_elements, int) or max_elements < 1:
        raise DimensionError(f"max_elements must be a positive int, got {max_elements!r}", expected=f"e.g. max_elements={DEFAULT_MAX_ELEMENTS:_}")
    return max_elements


def _sized(cell: ir.CellIR) -> Iterator[tuple[str, ir.Type, Span | None]]:
    """Every declared or bound tensor of the cell: a description, its type, where it is written."""
    for declared in cell.inputs:
        yield f"input '{declared.name}' (one step)", declared.type, declared.span
    for param in cell.params:
        yield f"param '{param.name}'", param.type, param.span
    for const in cell.consts:
        if isinstance(const.value.type, ir.Type):
            yield f"const '{const.name}'", const.value.type, const.span
    for state in cell.states:
        yield f"state '{state.name}' (per batch element)", state.type, state.span
    for statement in cell.body:
        if isinstance(statement, ir.ScanAssign):
            for carry in statement.monoid.carries:
                yield f"carry '{statement.name}.{carry.name}' (per batch element)", carry.type, statement.span
        elif isinstance(statement, ir.Assign) and isinstance(statement.value.type, ir.Type):
            yield f"binding '{statement.name}' (one step)", statement.value.type, statement.span
        elif isinstance(statement, ir.Emit) and isinstance(statement.value.type, ir.Type):
            label = statement.name or str(statement.index)
            yield f"output {label} (one step)", statement.value.type, statement.span


def check_sizes(cell: ir.CellIR, budget: int) -> None:
    """Raise a located :class:`DimensionError` for the first tensor of ``cell`` above ``budget`` elements."""
    for what, declared, span in _sized(cell):
        elements = math.prod(declared.shape)
        if elements > budget:
            shape = ", ".join(str(s) for s in declared.shape)
            raise DimensionError(
                f"{what} has shape [{shape}]: {elements:_} elements, more than the budget of {budget:_}",
                span,
                expected=f"smaller dims, or a larger budget: compile(..., max_elements=N) or {MAX_ELEMENTS_VARIABLE}=N",
            )
