"""The abstract syntax tree: what the user wrote, with source spans, and nothing checked yet.

Nodes are frozen dataclasses.  Each carries a ``span`` that is excluded from equality
and repr, so two parses of the same program compare equal whatever their layout
(the round-trip tests rely on this).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from .errors import Span


def _span() -> Span | None:
    return field(default=None, compare=False, repr=False)  # type: ignore[return-value]


# ---- expressions ------------------------------------------------------------


@dataclass(frozen=True)
class Number:
    """A numeric literal: int, float or imaginary (``1j``)."""

    value: int | float | complex
    span: Span | None = _span()


@dataclass(frozen=True)
class Name:
    """A reference to a declared name, a dim, or a built-in constant (``inf``, ``pi``)."""

    id: str
    span: Span | None = _span()


@dataclass(frozen=True)
class Unary:
    """``-x`` or ``+x``."""

    op: str
    operand: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Binary:
    """``a OP b`` for OP in ``+ - * / // @ **`` and the comparisons."""

    op: str
    left: "Expr"
    right: "Expr"
    span: Span | None = _span()


@dataclass(frozen=True)
class Call:
    """``func(args...)``: a built-in function or an initializer."""

    func: str
    args: tuple["Expr", ...]
    span: Span | None = _span()
    func_span: Span | None = _span()


@dataclass(frozen=True)
class Slice:
    """``start:stop`` inside an index; either bound may be missing."""

    start: "Expr | None"
    stop: "Expr | None"
    span: Span | None = _span()


@dataclass(frozen=True)
class NewAxis:
    """``None`` inside an index: insert an axis of size 1."""

    span: Span | None = _span()


@dataclass(frozen=True)
class EllipsisIndex:
    """``...`` inside an index: all remaining axes."""

    span: Span | None = _span()


IndexItem = Union["Expr", Slice, NewAxis, EllipsisIndex]


@dataclass(frozen=True)
class Index:
    """``value[items]``: numpy basic indexing (integers, slices, None, ...)."""

    value: "Expr"
    items: tuple[IndexItem, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Field:
    """``value.name``: a carry of a scan result, or of a combine operand."""

    value: "Expr"
    name: str
    span: Span | None = _span()


Expr = Union[Number, Name, Unary, Binary, Call, Index, Field]


# ---- declarations and statements -------------------------------------------


@dataclass(frozen=True)
class TypeSpec:
    """``[d, n]`` or ``complex[d]``: a per-step shape and whether values are complex."""

    is_complex: bool
    dims: tuple[Expr, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class DimParam:
    """A cell or monoid parameter ``d`` or ``gamma = 0.9``, bound at compile time."""

    name: str
    default: Expr | None
    span: Span | None = _span()


@dataclass(frozen=True)
class InputDecl:
    name: str
    type: TypeSpec
    span: Span | None = _span()


@dataclass(frozen=True)
class ParamDecl:
    name: str
    type: TypeSpec
    init: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class ConstDecl:
    name: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class StateDecl:
    name: str
    type: TypeSpec
    init: Expr
    span: Span | None = _span()
    reverse: bool = False  # `state ... = init reverse`: runs from the last step to the first


@dataclass(frozen=True)
class Binding:
    """``name = expr``: a value of this step, or the update of a state of the same name."""

    name: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Lift:
    """``carry = expr`` inside ``scan M(...) from (...)``: one step's element of the monoid."""

    carry: str
    value: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class ScanBinding:
    """``name = scan Monoid(args) from (carry = expr, ...)``: an inclusive prefix scan."""

    name: str
    monoid: str
    args: tuple[Expr, ...]
    lifts: tuple[Lift, ...]
    span: Span | None = _span()
    reverse: bool = False  # `scan reverse M(...)`: the suffix combine


@dataclass(frozen=True)
class Output:
    """``out expr`` or ``out name = expr``."""

    name: str | None
    value: Expr
    span: Span | None = _span()


CellStatement = Union[InputDecl, ParamDecl, ConstDecl, StateDecl, Binding, ScanBinding, Output]


@dataclass(frozen=True)
class Cell:
    name: str
    dims: tuple[DimParam, ...]
    body: tuple[CellStatement, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class CarryDecl:
    name: str
    type: TypeSpec
    identity: Expr
    span: Span | None = _span()


@dataclass(frozen=True)
class Combine:
    """``combine(a, b) { ... }``: the monoid's operation, ``a`` the earlier element."""

    left: str
    right: str
    body: tuple[Binding, ...]
    span: Span | None = _span()


MonoidStatement = Union[CarryDecl, ConstDecl, Combine]


@dataclass(frozen=True)
class Monoid:
    name: str
    dims: tuple[DimParam, ...]
    body: tuple[MonoidStatement, ...]
    span: Span | None = _span()


@dataclass(frozen=True)
class Program:
    """A whole source file: monoids and cells in the order written."""

    items: tuple[Cell | Monoid, ...]

    def cells(self) -> tuple[Cell, ...]:
        return tuple(item for item in self.items if isinstance(item, Cell))

    def monoids(self) -> tuple[Monoid, ...]:
        return tuple(item for item in self.items if isinstance(item, Monoid))
