"""recdsl: a compiler for recurrences.

Write an RNN or state-space cell in a few lines; ``recdsl.compile`` parses it, works out
what kind of recurrence it is, and returns a ``torch.nn.Module`` that runs it.

>>> import recdsl
>>> program = recdsl.parse("cell Id(d) {\\n input x: [d]\\n out x\\n}\\n")
>>> [cell.name for cell in program.cells()]
['Id']
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    BackendError,
    DeclarationError,
    DimensionError,
    InputError,
    NameResolutionError,
    ParseError,
    RecDSLError,
    ShapeError,
    TypeCheckError,
)
from .frontend import load
from .parser import parse, parse_file

if TYPE_CHECKING:  # pragma: no cover
    from .module import CompiledCell, compile

__version__ = "0.1.0"

__all__ = [
    "compile",
    "CompiledCell",
    "analyze",
    "explain",
    "load",
    "parse",
    "parse_file",
    "RecDSLError",
    "ParseError",
    "NameResolutionError",
    "ShapeError",
    "TypeCheckError",
    "DeclarationError",
    "DimensionError",
    "InputError",
    "BackendError",
]


def __getattr__(name: str) -> Any:
    # torch is imported only when a module is compiled, so that parsing, checking and
    # `recdsl explain` stay fast and torch-free.
    if name in ("compile", "CompiledCell"):
        from . import module

        return getattr(module, name)
    if name == "analyze":
        from .analysis import analyze

        return analyze
    if name == "explain":
        from .explainer import explain

        return explain
    raise AttributeError(f"module 'recdsl' has no attribute '{name}'")
