"""The checked, typed IR: small immutable nodes that every later stage reads.

A cell lowers to a :class:`CellIR`: its declarations and a body of statements in
source order.  Expressions are trees of :class:`Literal`, :class:`Ref` and :class:`Op`,
each carrying its :class:`Type` (per-step shape and element kind).  Nodes are hashable
and compare structurally; spans are kept for messages and for comments in generated
code but do not take part in equality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Iterator, Union

from .errors import Span


class Kind(str, Enum):
    """What a value's elements are."""

    REAL = "real"
    COMPLEX = "complex"
    BOOL = "bool"


@dataclass(frozen=True)
class Type:
    """A per-step value's shape (without batch, time or head dims) and element kind."""

    shape: tuple[int, ...]
    kind: Kind = Kind.REAL

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        prefix = "complex" if self.kind is Kind.COMPLEX else ("bool" if self.kind is Kind.BOOL else "")
        return f"{prefix}[{', '.join(str(s) for s in self.shape)}]"


@dataclass(frozen=True)
class StructType:
    """The type of a scan result: one named field per carry of the monoid."""

    fields: tuple[tuple[str, Type], ...]

    def field_type(self, name: str) -> Type | None:
        return dict(self.fields).get(name)

    def __str__(self) -> str:
        return "{" + ", ".join(f"{n}: {t}" for n, t in self.fields) + "}"


class RefKind(str, Enum):
    """Where a referenced value comes from."""

    INPUT = "input"  # one step of an input
    PARAM = "param"  # a learned parameter (no time or batch dims)
    CONST = "const"  # a compile-time constant (no time or batch dims)
    STATE_PREV = "state_prev"  # a state's value before this step's update
    STATE_NEW = "state_new"  # a state's value after this step's update
    BINDING = "binding"  # a value bound earlier in this step
    SCAN = "scan"  # one carry of a scan result at this step
    CARRY_LEFT = "carry_left"  # inside combine: a carry (field) of the earlier operand (name)
    CARRY_RIGHT = "carry_right"  # inside combine: a carry (field) of the later operand (name)
    LOCAL = "local"  # inside combine: a value bound earlier in the combine


@dataclass(frozen=True)
class Literal:
    """A scalar number (``inf`` and ``pi`` included).

    ``label`` is the dim or constant it came from (``dk``), kept for printing only.
    """

    value: int | float | complex
    type: Type
    label: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Ref:
    """A named value.  ``field`` names the carry for SCAN references."""

    kind: RefKind
    name: str
    type: Type
    field: str | None = None

    @property
    def label(self) -> str:
        return f"{self.name}.{self.field}" if self.field else self.name


@dataclass(frozen=True)
class Op:
    """An operation from :data:`recdsl.ops.OPS` applied to ``args``.

    ``attrs`` holds static operands: the axis of a reduction, the index of an
    indexing, the size of ``arange``.  They are plain hashable Python values.
    """

    op: str
    args: tuple["Expr", ...]
    type: Type
    attrs: tuple = ()


Expr = Union[Literal, Ref, Op]


# Indexing items, stored in Op("index").attrs.
@dataclass(frozen=True)
class SliceItem:
    start: int | None
    stop: int | None


NEW_AXIS = "newaxis"
ELLIPSIS = "ellipsis"


def walk(expr: Expr) -> Iterator[Expr]:
    """Every node of ``expr``, parents before children."""
    stack = [expr]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, Op):
            stack.extend(reversed(node.args))


def refs(expr: Expr) -> Iterator[Ref]:
    """Every reference inside ``expr``."""
    return (node for node in walk(expr) if isinstance(node, Ref))


# ---- declarations -----------------------------------------------------------


@dataclass(frozen=True)
class Input:
    name: str
    type: Type
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Init:
    """How a parameter starts: a named scheme with static arguments, or an expression."""

    scheme: str  # zeros | ones | glorot | normal | uniform | expr
    args: tuple[float, ...] = ()
    expr: Expr | None = None


@dataclass(frozen=True)
class Param:
    name: str
    type: Type
    init: Init
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Const:
    name: str
    value: Expr
    span: Span | None = field(default=None, compare=False, repr=False)


class Direction(Enum):
    """Which way a recurrence runs through time; the value is its name in prose."""

    FORWARD = "forward"  # from the first step to the last: the previous value is the one at t - 1
    REVERSE = "reverse"  # from the last step to the first: the previous value is the one at t + 1

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class State:
    """A recurrent state; ``init`` uses only literals, consts and params.

    A REVERSE state runs from the last step to the first: in its update its previous value
    is its value at step t + 1, ``init`` is its value after the last step, and the value a
    module returns for it is its value at the first step.
    """

    name: str
    type: Type
    init: Expr
    span: Span | None = field(default=None, compare=False, repr=False)
    direction: Direction = Direction.FORWARD

    @property
    def reverse(self) -> bool:
        return self.direction is Direction.REVERSE


# ---- statements -------------------------------------------------------------


@dataclass(frozen=True)
class Assign:
    """``name = value``: a binding of this step (or, in a combine, a local or a carry)."""

    name: str
    value: Expr
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Update:
    """``state = value``: the state's new value; ``value`` reads its previous value."""

    state: str
    value: Expr
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Carry:
    name: str
    type: Type
    identity: Expr
    span: Span | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class MonoidIR:
    """A declared monoid instantiated with concrete dims.

    ``combine`` computes, from the earlier element (CARRY_LEFT refs) and the later one
    (CARRY_RIGHT refs), the combined carries: ``results[i]`` is the expression of
    ``carries[i]`` after the body's local bindings (LOCAL refs) are in scope.
    """

    name: str
    dims: tuple[tuple[str, int | float], ...]
    carries: tuple[Carry, ...]
    body: tuple[Assign, ...]
    results: tuple[Expr, ...]
    operands: tuple[str, str] = ("a", "b")  # the names of combine's two operands
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def struct_type(self) -> StructType:
        return StructType(tuple((c.name, c.type) for c in self.carries))


@dataclass(frozen=True)
class ScanAssign:
    """``name = scan Monoid(...) from (carry = lift, ...)``: the inclusive prefix combine."""

    name: str
    monoid: MonoidIR
    lifts: tuple[Expr, ...]  # one per carry, in the monoid's carry order
    span: Span | None = field(default=None, compare=False, repr=False)
    # REVERSE: the suffix combine, x_t (+) x_{t+1} (+) ... (+) x_T (+) identity (earlier operand on the left).
    direction: Direction = Direction.FORWARD

    @property
    def reverse(self) -> bool:
        return self.direction is Direction.REVERSE


@dataclass(frozen=True)
class Emit:
    """An ``out`` line: ``value`` is the ``index``-th output of each step."""

    index: int
    name: str | None
    value: Expr
    span: Span | None = field(default=None, compare=False, repr=False)


Statement = Union[Assign, Update, ScanAssign, Emit]


@dataclass(frozen=True)
class CellIR:
    """A checked cell with its dims bound: the input of analysis and of every backend."""

    name: str
    dims: tuple[tuple[str, int | float], ...]
    inputs: tuple[Input, ...]
    params: tuple[Param, ...]
    consts: tuple[Const, ...]
    states: tuple[State, ...]
    body: tuple[Statement, ...]
    span: Span | None = field(default=None, compare=False, repr=False)

    @property
    def outputs(self) -> tuple[Emit, ...]:
        return tuple(s for s in self.body if isinstance(s, Emit))

    @property
    def scans(self) -> tuple[ScanAssign, ...]:
        return tuple(s for s in self.body if isinstance(s, ScanAssign))

    def binding(self, name: str) -> Assign | None:
        for statement in self.body:
            if isinstance(statement, Assign) and statement.name == name:
                return statement
        return None

    def update(self, state: str) -> Update:
        for statement in self.body:
            if isinstance(statement, Update) and statement.state == state:
                return statement
        raise KeyError(state)

    def state(self, name: str) -> State:
        for state in self.states:
            if state.name == name:
                return state
        raise KeyError(name)

    def direction_of(self, name: str) -> Direction:
        """The direction of the state or scan called ``name``."""
        for state in self.states:
            if state.name == name:
                return state.direction
        for scan in self.scans:
            if scan.name == name:
                return scan.direction
        raise KeyError(name)

    @property
    def reversed_recurrences(self) -> tuple[str, ...]:
        """The states and scans that run from the last step to the first (empty for a causal cell)."""
        return tuple(s.name for s in self.states if s.reverse) + tuple(s.name for s in self.scans if s.reverse)

    def carried_state_names(self) -> tuple[str, ...]:
        """The keys of the state dict a module returns: states, then scan carries."""
        names = [s.name for s in self.states]
        for scan in self.scans:
            names.extend(f"{scan.name}.{c.name}" for c in scan.monoid.carries)
        return tuple(names)

    def expressions(self) -> Iterator[Expr]:
        """Every expression a run of the cell evaluates, except the values of consts.

        Param initializers, states' initial values, scan lifts and identities, and the body.
        """
        for param in self.params:
            if param.init.expr is not None:
                yield param.init.expr
        for state in self.states:
            yield state.init
        for statement in self.body:
            if isinstance(statement, ScanAssign):
                yield from statement.lifts
                yield from (carry.identity for carry in statement.monoid.carries)
            else:
                yield statement.value

    def used_consts(self) -> tuple[Const, ...]:
        """The consts some expression of the cell reads, directly or through other consts.

        Declaration order; a const nothing reads is left out (so it is never evaluated).
        """
        by_name = {const.name: const for const in self.consts}
        used: set[str] = set()
        pending = [ref.name for expr in self.expressions() for ref in refs(expr) if ref.kind is RefKind.CONST]
        while pending:
            name = pending.pop()
            if name in used or name not in by_name:
                continue
            used.add(name)
            pending.extend(ref.name for ref in refs(by_name[name].value) if ref.kind is RefKind.CONST)
        return tuple(const for const in self.consts if const.name in used)
