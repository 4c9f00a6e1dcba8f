"""What kind of recurrence a cell is: the analysis every backend and ``recdsl explain`` read.

Four questions, answered from the IR alone:

1. Which bindings and outputs depend on no state or scan?  They are *time-parallel*:
   computed for all steps at once before the recurrence.
2. How does each state's update depend on the state's previous value?  The update is
   expanded through the state-dependent bindings it reads and matched against the
   algebra of the tables in :mod:`recdsl.ops`:

   - sum-product linear: ``S_t = A_t(S_{t-1}) + B_t``.  When ``A_t`` multiplies
     elementwise the recurrence is *diagonal affine* (or, for a matrix state whose decay is
     shared along an axis, *matrix affine* with a scalar or row/column-diagonal
     transition); when it involves products with ``S`` it is *matrix affine* with an
     identity-plus-low-rank or dense transition;
   - affine over a tropical semiring: ``m = max(m + a, b)`` (max-plus) or
     ``logaddexp(m + a, b)``/``logsumexp(m[:, None] + T, 0)`` (log);
   - a declared monoid (``scan``);
   - nonlinear: anything else.
3. In which order can states be computed?  States form a graph by the other states
   their updates read; strongly connected groups are *coupled* and run jointly.
4. Which outputs read a state only linearly (``q @ S``)?  A chunked form can then
   produce them without storing the state of every step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Iterable, Union

from . import ir
from .errors import DeclarationError
from .ir import Kind, Literal, Op, Ref, RefKind, Type
from .ops import BILINEAR, LINEAR_UNARY, OPS, TROPICAL_SEMIRINGS, Category, Law, Semiring
from .shapes import broadcast_shapes, fold_constant, make, reduction_axes

ONE = Literal(1, Type(()))

# ---- the recurrence classes ---------------------------------------------------


class Structure(Enum):
    """The structure of a recurrence's transition ``A`` in ``S_t = A_t(S_{t-1}) + B_t``; the value is its name in prose."""

    SCALAR = "scalar"  # one decay for the whole state
    ELEMENTWISE = "elementwise"  # one decay per element
    ROWS = "diagonal over rows"  # a matrix state's decay is shared along each row: diag(d) S
    COLUMNS = "diagonal over columns"  # ... along each column: S diag(d)
    AXES = "diagonal over some axes"  # a higher-rank state's decay varies along some axes only
    LOW_RANK = "low rank"  # sum of rank-one maps, no identity part
    IDENTITY_PLUS_LOW_RANK = "identity plus low rank"  # (I + sum c u v^T) S: the delta rule
    SCALED_IDENTITY_PLUS_LOW_RANK = "scaled identity plus low rank"  # (a I + sum c u v^T) S: gated delta rule
    DIAGONAL_PLUS_LOW_RANK = "diagonal plus low rank"
    DENSE = "dense"  # any other linear map
    # Independent small dense blocks along some axes of the state (2 x 2 rotations of a [n, 2]
    # state): the map keeps those axes, mixing only the elements inside each block.
    BLOCK_DIAGONAL = "block diagonal"
    DIAGONAL = "diagonal"  # semirings: S (x) decay elementwise
    MATRIX = "matrix"  # semirings: a semiring matrix product

    def __str__(self) -> str:
        return self.value

    def transposed(self) -> "Structure":
        """The structure of the same recurrence written for the transposed state."""
        return {Structure.ROWS: Structure.COLUMNS, Structure.COLUMNS: Structure.ROWS}.get(self, self)

    @property
    def is_low_rank(self) -> bool:
        return self in (Structure.LOW_RANK, Structure.IDENTITY_PLUS_LOW_RANK, Structure.SCALED_IDENTITY_PLUS_LOW_RANK, Structure.DIAGONAL_PLUS_LOW_RANK)

    @property
    def shares_decay(self) -> bool:
        """A matrix state with one decay per state, row or column (the chunked forms' decayed outer products)."""
        return self in (Structure.SCALAR, Structure.ROWS, Structure.COLUMNS)


class Side(Enum):
    """Which side a rank-one map multiplies a matrix state from."""

    LEFT = "left"  # c * outer(u, v @ S) = c (u v^T) S
    RIGHT = "right"  # c * outer(S @ u, v) = c S (u v^T)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class NoRecurrence:
    """The new value does not read the previous one: the state is time-parallel."""

    value: ir.Expr
    name = "no recurrence"


@dataclass(frozen=True)
class Delay(NoRecurrence):
    """A state whose update reads no recurrent value at all (only inputs, params, consts,
    time-parallel bindings and other delays): ``xp = x`` carries ``x`` one step.

    Its value at every step is time-parallel, and its previous value is that sequence
    shifted one step (from ``init``): a token shift (RWKV), a decay carried one step (the
    backward half of LION), never a recurrence.  ``direction`` is the state's: a REVERSE
    delay's previous value is the value of the step after.
    """

    direction: ir.Direction = ir.Direction.FORWARD
    name = "delay"


@dataclass(frozen=True)
class DiagonalAffine:
    """``h = decay * h + input``: independent scalar recurrences, one per element.

    ``structure`` is :attr:`Structure.SCALAR` (one decay for all elements) or
    :attr:`Structure.ELEMENTWISE`.
    """

    decay: ir.Expr
    input: ir.Expr | None
    structure: Structure
    name = "diagonal affine"


@dataclass(frozen=True)
class LowRankTerm:
    """A rank-one map of a matrix state: ``coefficient * (left right^T) S`` (side LEFT, spelled
    ``outer(left, right @ S)``) or ``coefficient * S (left right^T)`` (side RIGHT, spelled
    ``outer(S @ left, right)``, ``S @ outer(left, right)`` or ``(S @ left)[:, None] * right``)."""

    coefficient: ir.Expr
    left: ir.Expr
    right: ir.Expr
    side: Side = Side.LEFT


@dataclass(frozen=True)
class BlockAxes:
    """The axes of a state along which a linear map is block diagonal.

    Element ``i`` along each of ``axes`` of the new value reads only elements with the same
    ``i`` along that axis of the previous value, so the map is ``prod(sizes of axes)``
    independent dense blocks over the remaining axes.  ``shared`` is set when no value the
    map multiplies by varies along those axes: every block is then the same matrix (Titans'
    memory, whose columns are updated alike).
    """

    axes: tuple[int, ...]
    shared: bool


@dataclass(frozen=True)
class MatrixAffine:
    """``S = A(S) + input`` with ``A`` linear in ``S`` and more than elementwise per element.

    ``structure`` names the transition: SCALAR, ROWS, COLUMNS and AXES (then ``decay`` is
    the factor, shaped to broadcast against ``S``, and ``decay_axes`` the axes it varies
    along); the low-rank structures (then ``decay`` is the diagonal part or None,
    ``low_rank`` the rank-one terms, all multiplying from ``side``); DENSE.
    ``transition`` is ``A(S)`` written with the state's previous value.
    """

    transition: ir.Expr
    input: ir.Expr | None
    structure: Structure
    decay: ir.Expr | None = None
    low_rank: tuple[LowRankTerm, ...] = ()
    decay_axes: tuple[int, ...] = ()
    side: Side | None = None
    blocks: "BlockAxes | None" = None  # for BLOCK_DIAGONAL: the axes that index the blocks
    name = "matrix affine"


@dataclass(frozen=True)
class SemiringAffine:
    """``S = A(S) (+) input`` over a tropical semiring (max-plus or log).

    ``structure`` is DIAGONAL (``A(S) = S (*) decay`` elementwise) or MATRIX (a
    semiring matrix product, as in a CRF's forward algorithm).  ``decay`` is set for the
    diagonal structure; ``input`` is None when the update has no free term (the
    semiring's zero).  ``transition`` is ``A(S)`` without the input term.
    """

    semiring: Semiring
    transition: ir.Expr
    input: ir.Expr | None
    structure: Structure
    decay: ir.Expr | None = None

    @property
    def name(self) -> str:
        return f"affine over the {self.semiring.name} semiring"


@dataclass(frozen=True)
class Nonlinear:
    """Anything else: the previous value enters through ``reason``."""

    reason: str
    name = "nonlinear"


@dataclass(frozen=True)
class JointAffine:
    """A coupled group whose update is affine in all its members' previous values at once.

    ``X_t = A_t(X_{t-1}) + B_t`` with ``X`` the members stacked (Titans with momentum: the
    momentum ``M`` and the memory ``W``, ``W`` reading the new ``M``).  ``transitions[i]``
    and ``inputs[i]`` are member ``i``'s linear part and free part, written with the
    members' previous values only (a member's new value read by a later one is replaced by
    its update).  ``structure`` is BLOCK_DIAGONAL (``blocks`` set: axes every member shares)
    or DENSE.
    """

    states: tuple[str, ...]
    transitions: tuple[ir.Expr, ...]
    inputs: tuple[ir.Expr | None, ...]
    structure: Structure
    blocks: BlockAxes | None = None
    name = "joint affine"


Recurrence = Union[NoRecurrence, Delay, DiagonalAffine, MatrixAffine, SemiringAffine, Nonlinear]


@dataclass(frozen=True)
class GroupAnalysis:
    """A coupled group of the schedule and its joint recurrence."""

    states: tuple[str, ...]
    recurrence: Union[JointAffine, Nonlinear]


@dataclass(frozen=True)
class StateAnalysis:
    state: str
    type: Type
    update: ir.Expr  # the update expanded through state-dependent bindings
    recurrence: Recurrence
    reads: tuple[str, ...]  # other states (or scans) its update reads


@dataclass(frozen=True)
class Readout:
    """A subexpression of an output that is linear in one state and reads nothing else recurrent."""

    output: int
    state: str
    expr: ir.Expr
    reduces: bool  # the read-out is smaller than the state (so storing it is cheaper)


@dataclass(frozen=True)
class Analysis:
    cell: ir.CellIR
    time_parallel: frozenset[str]  # bindings that read no state or scan
    parallel_outputs: frozenset[int]  # outputs that read no state or scan
    states: tuple[StateAnalysis, ...]
    schedule: tuple[tuple[str, ...], ...]  # states and scans in computable order; >1 = coupled
    readouts: tuple[Readout, ...]
    expanded_outputs: tuple[ir.Expr, ...]  # each output with state-dependent bindings expanded; readouts point into these
    # Subexpressions of state-dependent statements that read inputs but no state (GRU's
    # x @ W_ir + b_ir): a step-by-step backend computes them for all steps at once.
    hoisted: tuple[ir.Expr, ...] = ()
    dependencies: dict[str, frozenset[str]] = field(compare=False, repr=False, default_factory=dict)
    # States classified as Delay: time-parallel values shifted one step, solved before any recurrence.
    delays: frozenset[str] = frozenset()
    groups: tuple[GroupAnalysis, ...] = ()  # the joint recurrence of each coupled group

    def group(self, names: tuple[str, ...]) -> GroupAnalysis | None:
        """The joint analysis of the coupled group ``names``, None if it has none (it holds a scan)."""
        return next((g for g in self.groups if g.states == names), None)

    def state(self, name: str) -> StateAnalysis:
        for analysis in self.states:
            if analysis.state == name:
                return analysis
        raise KeyError(name)

    @property
    def coupled_groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(group for group in self.schedule if len(group) > 1)

    def direction(self, group: tuple[str, ...] | str) -> ir.Direction:
        """The direction a schedule entry runs in (every member of a group shares it)."""
        name = group if isinstance(group, str) else group[0]
        return self.cell.direction_of(name)


# ---- dependencies ----------------------------------------------------------------


def recurrent_sources(expr: ir.Expr, binding_sources: dict[str, frozenset[str]]) -> frozenset[str]:
    """The states and scans ``expr`` reads, directly or through bindings."""
    found: set[str] = set()
    for ref in ir.refs(expr):
        if ref.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW, RefKind.SCAN):
            found.add(ref.name)
        elif ref.kind is RefKind.BINDING:
            found |= binding_sources.get(ref.name, frozenset())
    return frozenset(found)


def binding_dependencies(cell: ir.CellIR) -> dict[str, frozenset[str]]:
    """For each binding, scan and named output, the states and scans it reads."""
    sources: dict[str, frozenset[str]] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign):
            sources[statement.name] = recurrent_sources(statement.value, sources)
        elif isinstance(statement, ir.Emit) and statement.name is not None:
            sources[statement.name] = recurrent_sources(statement.value, sources)
    return sources


def inline(expr: ir.Expr, cell: ir.CellIR, keep: frozenset[str]) -> ir.Expr:
    """``expr`` with every binding not in ``keep`` replaced by its definition."""
    definitions = {s.name: s.value for s in cell.body if isinstance(s, (ir.Assign,)) and s.name not in keep}
    definitions.update({s.name: s.value for s in cell.body if isinstance(s, ir.Emit) and s.name and s.name not in keep})
    cache: dict[str, ir.Expr] = {}

    def go(node: ir.Expr) -> ir.Expr:
        if isinstance(node, Ref) and node.kind is RefKind.BINDING and node.name in definitions:
            if node.name not in cache:
                cache[node.name] = go(definitions[node.name])
            return cache[node.name]
        if isinstance(node, Op):
            args = tuple(go(a) for a in node.args)
            return node if args == node.args else Op(node.op, args, node.type, node.attrs)
        return node

    return go(expr)


class _Probe:
    """The variable a classification asks about, with a memo of which subexpressions read it.

    Expanded updates share subexpressions heavily (a binding read twice is one node), so
    the memo (by node identity, nodes kept alive by the expression being classified) turns
    repeated walks into one.  It lives only as long as one classification.
    """

    def __init__(self, variable: Ref, others: tuple[Ref, ...] = ()) -> None:
        self.variable = variable
        # A coupled group's joint update is split in all its members' previous values at once.
        self.variables = (variable,) + tuple(others)
        self._memo: dict[int, tuple[ir.Expr, bool]] = {}

    def is_variable(self, expr: ir.Expr) -> bool:
        return isinstance(expr, Ref) and expr in self.variables

    def contains(self, expr: ir.Expr) -> bool:
        """Whether ``expr`` reads the variable."""
        hit = self._memo.get(id(expr))
        if hit is not None and hit[0] is expr:
            return hit[1]
        if isinstance(expr, Op):
            answer = any(self.contains(arg) for arg in expr.args)
        else:
            answer = self.is_variable(expr)
        self._memo[id(expr)] = (expr, answer)
        return answer


def _as_probe(variable: Ref | _Probe) -> _Probe:
    return variable if isinstance(variable, _Probe) else _Probe(variable)


# ---- sum-product linearity ------------------------------------------------------


def _op(op: str, *args: ir.Expr) -> ir.Expr:
    """Build ``op(args)`` with a few identities (x * 1 = x, x + 0 = x) so printed forms stay short."""
    if op == "mul":
        a, b = args
        if isinstance(a, Literal) and a.value == 1:
            return b
        if isinstance(b, Literal) and b.value == 1:
            return a
    if op == "add":
        a, b = args
        if a is None:
            return b
        if b is None:
            return a
    if op == "neg" and isinstance(args[0], Op) and args[0].op == "neg":
        return args[0].args[0]
    return make(op, *args)


@dataclass(frozen=True)
class _Linear:
    """An expression split as ``sum(terms) + bias``: each term linear in the variable."""

    terms: tuple[ir.Expr, ...]
    bias: ir.Expr | None


def linear_split(expr: ir.Expr, variable: Ref | _Probe) -> _Linear | None:
    """Split ``expr`` into terms linear in ``variable`` plus a free part, or None if nonlinear.

    It follows the registry's laws: sums split, ``Law.LINEAR`` ops (negation, indexing,
    sums, ``diag``) map each piece, and ``Law.BILINEAR`` ops (``*``, ``@``, ``outer``) and
    division by a free value map the one operand that reads the variable.
    """
    probe = _as_probe(variable)
    variable = probe.variable
    if not probe.contains(expr):
        return _Linear((), expr)
    if probe.is_variable(expr):
        return _Linear((expr,), None)
    if not isinstance(expr, Op):
        return None
    op, args = expr.op, expr.args
    if op in ("add", "sub"):
        left, right = linear_split(args[0], probe), linear_split(args[1], probe)
        if left is None or right is None:
            return None
        if op == "add":
            bias = left.bias if right.bias is None else (right.bias if left.bias is None else make("add", left.bias, right.bias))
            return _Linear(left.terms + right.terms, bias)
        negated = tuple(make("neg", t) for t in right.terms)
        if right.bias is None:
            bias = left.bias
        elif left.bias is None:
            bias = make("neg", right.bias)
        else:
            bias = make("sub", left.bias, right.bias)
        return _Linear(left.terms + negated, bias)
    # real, imag and conj are linear over the reals only: a complex decay would not pass through them.
    if op in LINEAR_UNARY - {"conj", "real", "imag"}:
        inner = linear_split(args[0], probe)
        if inner is None or (op != "neg" and not _keeps_shape(inner, args[0].type)):
            return None

        def rebuild_unary(x: ir.Expr) -> ir.Expr:
            return make(op, x, attrs=expr.attrs)

        return _Linear(tuple(rebuild_unary(t) for t in inner.terms), None if inner.bias is None else rebuild_unary(inner.bias))
    if op in BILINEAR or op == "div":
        dependent = [i for i, a in enumerate(args) if probe.contains(a)]
        if len(dependent) != 1 or (op == "div" and dependent[0] != 0):
            return None
        position = dependent[0]
        inner = linear_split(args[position], probe)
        if inner is None or (op in ("matmul", "outer") and not _keeps_shape(inner, args[position].type)):
            return None

        def rebuild(x: ir.Expr) -> ir.Expr:
            new_args = list(args)
            new_args[position] = x
            return make(op, *new_args, attrs=expr.attrs)

        return _Linear(tuple(rebuild(t) for t in inner.terms), None if inner.bias is None else rebuild(inner.bias))
    return None


def _keeps_shape(split: _Linear, declared: Type) -> bool:
    """Whether every piece of ``split`` has the shape of the value it splits.

    A piece that only broadcasts to it (the scalar 1 of ``1 + S[:, 0]``) cannot be pushed
    through an indexing, a reduction, ``@`` or ``outer`` on its own; such updates are left
    unclassified (nonlinear) rather than rewritten wrongly.
    """
    pieces = split.terms + ((split.bias,) if split.bias is not None else ())
    return all(piece.type.shape == declared.shape for piece in pieces)


@dataclass(frozen=True)
class _Scale:
    """A term equal to ``coefficient * S`` elementwise."""

    coefficient: ir.Expr


def as_axis_vector(expr: ir.Expr, axis: int) -> ir.Expr | None:
    """For ``u[:, None]`` (axis 0) or ``u[None, :]`` (axis 1) the vector ``u``; a plain vector counts as a row (axis 1)."""
    if axis == 1 and expr.type.rank == 1:
        return expr
    if not (isinstance(expr, Op) and expr.op == "index" and expr.type.rank == 2 and expr.args[0].type.rank == 1):
        return None
    wanted = (ir.SliceItem(None, None), ir.NEW_AXIS) if axis == 0 else (ir.NEW_AXIS, ir.SliceItem(None, None))
    return expr.args[0] if tuple(expr.attrs) == wanted else None


def _as_vector(expr: ir.Expr, axis: int) -> ir.Expr | None:
    """A [m, 1] (axis 0) or [1, n] / [n] (axis 1) value as the vector it broadcasts."""
    exact = as_axis_vector(expr, axis)
    if exact is not None:
        return exact
    if expr.type.rank == 2 and expr.type.shape[1 - axis] == 1:  # (a * u[:, None])[:, 0]
        whole = ir.SliceItem(None, None)
        return make("index", expr, attrs=(whole, 0) if axis == 0 else (0, whole))
    return None


def as_outer(expr: ir.Expr) -> tuple[ir.Expr, ir.Expr] | None:
    """``expr`` as ``outer(u, v)``: spelled so, or as a product of a column ``[m, 1]`` and a row ``[n]``/``[1, n]``."""
    if not isinstance(expr, Op) or expr.type.rank != 2:
        return None
    if expr.op == "outer":
        return expr.args[0], expr.args[1]
    if expr.op == "mul":
        for column, row in ((expr.args[0], expr.args[1]), (expr.args[1], expr.args[0])):
            if column.type.rank == 2 and column.type.shape[1] == 1 and row.type.shape[:-1] in ((), (1,)):
                u, v = _as_vector(column, 0), _as_vector(row, 1)
                if u is not None and v is not None:
                    return u, v
    return None


def _scaled_variable(expr: ir.Expr, probe: _Probe) -> ir.Expr | None:
    """For ``c * S`` with a scalar ``c`` (free of ``S``) the coefficient ``c``; else None."""
    shape = _term_shape(expr, probe)
    if isinstance(shape, _Scale) and shape.coefficient.type.rank == 0:
        return shape.coefficient
    return None


def _only_reshapes(node: Op) -> bool:
    """Whether an index only adds or drops unit dims (``u[:, None]``, ``c[:, 0]`` of a column)."""
    shape = node.args[0].type.shape
    axis = 0
    for item in node.attrs:
        if item == ir.NEW_AXIS:
            continue
        if isinstance(item, ir.SliceItem):
            if item != ir.SliceItem(None, None):
                return False
        elif shape[axis] != 1:
            return False
        axis += 1
    return True


def _state_product(expr: ir.Expr, probe: _Probe) -> tuple[Side, ir.Expr, ir.Expr] | None:
    """``expr`` as ``c * (S @ u)`` (RIGHT) or ``c * (u @ S)`` (LEFT), up to unit dims: ``(side, c, u)``."""
    if not isinstance(expr, Op):
        return None
    if expr.op == "matmul":
        left, right = expr.args
        for target, vector, side in ((left, right, Side.RIGHT), (right, left, Side.LEFT)):
            if not probe.contains(vector) and vector.type.rank == 1:
                coefficient = _scaled_variable(target, probe)
                if coefficient is not None:
                    return side, coefficient, vector
        return None
    if expr.op == "neg":
        inner = _state_product(expr.args[0], probe)
        return None if inner is None else (inner[0], _op("neg", inner[1]), inner[2])
    if expr.op == "index" and _only_reshapes(expr):
        return _state_product(expr.args[0], probe)
    if expr.op in ("mul", "div"):
        dependent = 0 if probe.contains(expr.args[0]) else 1
        factor = expr.args[1 - dependent]
        if factor.type.rank != 0 or (expr.op == "div" and dependent != 0):
            return None
        inner = _state_product(expr.args[dependent], probe)
        if inner is None:
            return None
        scaled = _op("mul", factor, inner[1]) if expr.op == "mul" else _op("div", inner[1], factor)
        return inner[0], scaled, inner[2]
    return None


def _rank_one(column: ir.Expr, row: ir.Expr, probe: _Probe) -> LowRankTerm | None:
    """``outer(column, row)`` as a rank-one map of the (matrix) variable, from either side."""
    if probe.variable.type.rank != 2:
        return None
    if not probe.contains(column):
        product = _state_product(row, probe)  # outer(u, c * (v @ S)) = c (u v^T) S
        if product is not None and product[0] is Side.LEFT:
            return LowRankTerm(product[1], column, product[2], Side.LEFT)
    if not probe.contains(row):
        product = _state_product(column, probe)  # outer(c * (S @ u), v) = c S (u v^T)
        if product is not None and product[0] is Side.RIGHT:
            return LowRankTerm(product[1], product[2], row, Side.RIGHT)
    return None


def _scaled_term(inner: _Scale | LowRankTerm | None, scale) -> _Scale | LowRankTerm | None:
    if isinstance(inner, _Scale):
        return _Scale(scale(inner.coefficient))
    if isinstance(inner, LowRankTerm):
        return LowRankTerm(scale(inner.coefficient), inner.left, inner.right, inner.side)
    return None


def _term_shape(term: ir.Expr, probe: _Probe) -> _Scale | LowRankTerm | None:
    """Recognise ``c * S`` and rank-one maps ``c * (u v^T) S`` / ``c * S (u v^T)``; None for any other linear term.

    Rank-one maps are recognised however they are spelled: ``outer(u, v @ S)``,
    ``outer(u, v) @ S``, ``u[:, None] * (v @ S)`` and, from the right, ``outer(S @ u, v)``,
    ``S @ outer(u, v)``, ``(S @ u)[:, None] * v``.
    """
    variable = probe.variable
    if term == variable:
        return _Scale(ONE)
    if not isinstance(term, Op):
        return None
    if term.op == "neg":
        return _scaled_term(_term_shape(term.args[0], probe), lambda c: _op("neg", c))
    outer = as_outer(term)
    if outer is not None:
        return _rank_one(outer[0], outer[1], probe)
    if term.op in ("mul", "div"):
        dependent = 0 if probe.contains(term.args[0]) else 1
        factor = term.args[1 - dependent]
        inner = _term_shape(term.args[dependent], probe)
        if isinstance(inner, LowRankTerm) and factor.type.rank != 0:
            return None
        if term.op == "mul":
            return _scaled_term(inner, lambda c: _op("mul", factor, c))
        return _scaled_term(inner, lambda c: _op("div", c, factor))
    if term.op == "matmul" and variable.type.rank == 2:
        left, right = term.args
        if not probe.contains(left) and as_outer(left) is not None:  # outer(u, v) @ S = (u v^T) S
            coefficient = _scaled_variable(right, probe)
            u, v = as_outer(left)  # type: ignore[misc]
            return None if coefficient is None else LowRankTerm(coefficient, u, v, Side.LEFT)
        if not probe.contains(right) and as_outer(right) is not None:  # S @ outer(u, v) = S (u v^T)
            coefficient = _scaled_variable(left, probe)
            u, v = as_outer(right)  # type: ignore[misc]
            return None if coefficient is None else LowRankTerm(coefficient, u, v, Side.RIGHT)
    return None


def _varying_axes(coefficient: ir.Expr, state: Type) -> tuple[int, ...]:
    """The axes of ``state`` along which a broadcast ``coefficient`` takes different values."""
    shape = coefficient.type.shape
    offset = state.rank - len(shape)
    return tuple(axis for axis in range(state.rank) if axis >= offset and shape[axis - offset] == state.shape[axis] and state.shape[axis] > 1)


def _sum(exprs: Iterable[ir.Expr]) -> ir.Expr | None:
    """The sum of ``exprs`` as a balanced tree (its depth grows as the log of the count)."""
    items = list(exprs)
    if not items:
        return None
    while len(items) > 1:
        paired = [_op("add", items[i], items[i + 1]) for i in range(0, len(items) - 1, 2)]
        items = paired + ([items[-1]] if len(items) % 2 else [])
    return items[0]


def _low_rank_decay_fits(decay: ir.Expr | None, state: Type, side: Side) -> bool:
    """Whether the diagonal part of a low-rank transition multiplies from ``side`` (so the whole map is one matrix there)."""
    if decay is None:
        return True
    axes = _varying_axes(decay, state)
    return not axes or axes == ((0,) if side is Side.LEFT else (1,))


def _classify_linear(split: _Linear, probe: _Probe, transition: ir.Expr) -> Recurrence:
    shapes = [_term_shape(t, probe) for t in split.terms]
    state = probe.variable.type
    if any(s is None for s in shapes):
        return _dense_or_blocks(transition, split.bias, probe)
    scales = [s.coefficient for s in shapes if isinstance(s, _Scale)]
    low_rank = tuple(s for s in shapes if isinstance(s, LowRankTerm))
    decay = _sum(scales)
    if not low_rank:
        assert decay is not None
        axes = _varying_axes(decay, state)
        if state.rank <= 1:
            return DiagonalAffine(decay, split.bias, Structure.ELEMENTWISE if axes else Structure.SCALAR)
        if len(axes) == state.rank:
            return DiagonalAffine(decay, split.bias, Structure.ELEMENTWISE)
        if not axes:
            structure = Structure.SCALAR
        elif state.rank == 2:
            structure = Structure.ROWS if axes == (0,) else Structure.COLUMNS
        else:
            structure = Structure.AXES
        return MatrixAffine(transition, split.bias, structure, decay=decay, decay_axes=axes)
    sides = {term.side for term in low_rank}
    if len(sides) != 1:  # maps from both sides do not compose into one small matrix
        return _dense_or_blocks(transition, split.bias, probe)
    (side,) = sides
    if decay is None:
        structure = Structure.LOW_RANK
    elif isinstance(decay, Literal) and decay.value == 1:
        structure = Structure.IDENTITY_PLUS_LOW_RANK
    elif not _varying_axes(decay, state):
        structure = Structure.SCALED_IDENTITY_PLUS_LOW_RANK
    else:
        structure = Structure.DIAGONAL_PLUS_LOW_RANK
    return MatrixAffine(transition, split.bias, structure, decay=decay, low_rank=low_rank, decay_axes=() if decay is None else _varying_axes(decay, state), side=side)


# ---- block-diagonal transitions -------------------------------------------------------
#
# A linear map of a state is block diagonal along axis ``a`` when element ``i`` along ``a``
# of its value reads only elements with index ``i`` along ``a`` of the state.  That is a
# property of how each operation moves axes, found by one walk: elementwise ops keep an
# axis where the operand is not broadcast along it; ``@`` keeps its batch axes, the rows
# of its left and the columns of its right operand; ``outer`` puts ``u``'s axis first and
# ``v``'s second; a reduction drops its axis; whole slices and ``None`` keep or insert
# axes.  Any other operation (an integer index, a partial slice, ``diag``) keeps nothing.


@dataclass(frozen=True)
class _Alignment:
    """How a subexpression reading the state moves the state's axes.

    ``axes[a] = p``: element ``i`` along axis ``p`` of the value reads only the state's
    elements with ``i`` along axis ``a``.  ``varying``: state axes along which a value that
    multiplies the state (free of it) takes different values.
    """

    axes: dict[int, int]
    varying: frozenset[int]


def _elementwise_alignment(node: Op, parts: list[_Alignment | None]) -> _Alignment:
    shape, rank = node.type.shape, node.type.rank
    kept: dict[int, int] | None = None
    varying: set[int] = set()
    for arg, part in zip(node.args, parts):
        if part is None:
            continue
        offset = rank - arg.type.rank
        moved = {a: p + offset for a, p in part.axes.items() if arg.type.shape[p] == shape[p + offset]}
        kept = moved if kept is None else {a: p for a, p in kept.items() if moved.get(a) == p}
        varying |= part.varying
    assert kept is not None
    for arg, part in zip(node.args, parts):  # free operands that vary along a kept axis
        if part is None:
            offset = rank - arg.type.rank
            varying |= {a for a, p in kept.items() if p >= offset and arg.type.shape[p - offset] > 1}
    return _Alignment(kept, frozenset(varying))


def _matmul_alignment(node: Op, parts: list[_Alignment | None]) -> _Alignment:
    """numpy matmul: batch axes broadcast, the left's rows and the right's columns are kept."""
    rank = node.type.rank
    kept: dict[int, int] = {}
    varying: set[int] = set()
    for position, (arg, part) in enumerate(zip(node.args, parts)):
        if part is None:
            continue
        varying |= part.varying
        k = arg.type.rank
        if k == 1:
            continue  # a vector operand is contracted
        other = node.args[1 - position]
        for a, p in part.axes.items():
            if p < k - 2:  # a batch axis
                # [..., m, k] @ [k] drops the last axis, [k] @ [..., k, n] the second last.
                target = p if other.type.rank == 1 else p + rank - k
                if node.type.shape[target] == arg.type.shape[p]:
                    kept[a] = target
            elif position == 0 and p == k - 2:  # the left operand's rows
                kept[a] = rank - 2 if other.type.rank > 1 else rank - 1
            elif position == 1 and p == k - 1:  # the right operand's columns
                kept[a] = rank - 1
        # The free operand multiplies every kept axis: does it vary along them?
        if parts[1 - position] is None:
            other_rank = other.type.rank
            for a, p in kept.items():
                if other_rank >= 2 and p < rank - 2:
                    q = p - (rank - other_rank)
                    if 0 <= q < other_rank - 2 and other.type.shape[q] > 1:
                        varying.add(a)
    return _Alignment(kept, frozenset(varying))


def _index_alignment(node: Op, part: _Alignment) -> _Alignment:
    items = list(node.attrs)
    source_rank = node.args[0].type.rank
    if ir.ELLIPSIS in items:
        at = items.index(ir.ELLIPSIS)
        used = sum(1 for item in items if item not in (ir.NEW_AXIS, ir.ELLIPSIS))
        items[at : at + 1] = [ir.SliceItem(None, None)] * (source_rank - used)
    source, target, moved = 0, 0, {}
    for item in items:
        if item == ir.NEW_AXIS:
            target += 1
            continue
        if item == ir.SliceItem(None, None):
            moved[source] = target
            target += 1
        elif isinstance(item, ir.SliceItem):
            target += 1  # a partial slice shifts indices: the axis is not kept
        source += 1
    for rest in range(source, source_rank):  # axes left at the end are kept whole
        moved[rest] = target
        target += 1
    return _Alignment({a: moved[p] for a, p in part.axes.items() if p in moved}, part.varying)


def _alignment(expr: ir.Expr, probe: _Probe, memo: dict[int, tuple[ir.Expr, _Alignment | None]]) -> _Alignment | None:
    """How ``expr`` moves the axes of the probe's variables; None when it reads none of them."""
    hit = memo.get(id(expr))
    if hit is not None and hit[0] is expr:
        return hit[1]
    result: _Alignment | None
    if not probe.contains(expr):
        result = None
    elif probe.is_variable(expr):
        result = _Alignment({a: a for a in range(expr.type.rank)}, frozenset())
    else:
        assert isinstance(expr, Op)
        parts = [_alignment(arg, probe, memo) for arg in expr.args]
        spec = OPS.get(expr.op)
        category = spec.category if spec is not None else None
        if spec is not None and spec.has(Law.POINTWISE):
            result = _elementwise_alignment(expr, parts)
        elif expr.op == "matmul":
            result = _matmul_alignment(expr, parts)
        elif expr.op == "outer":
            axes: dict[int, int] = {}
            varying: set[int] = set()
            for position, part in enumerate(parts):
                if part is not None:
                    axes.update({a: position for a in part.axes})
                    varying |= part.varying
            result = _Alignment(axes, frozenset(varying))
        elif expr.op == "index":
            result = _index_alignment(expr, parts[0]) if parts[0] is not None else None
        elif category is Category.REDUCTION and expr.attrs and expr.attrs[0] is not None and parts[0] is not None:
            (axis,) = expr.attrs[:1]
            axes = {a: p - (p > axis) for a, p in parts[0].axes.items() if p != axis}
            result = _Alignment(axes, parts[0].varying)
        else:  # diag, full reductions and anything unknown keep no axis
            varying = set()
            for part in parts:
                if part is not None:
                    varying |= part.varying
            result = _Alignment({}, frozenset(varying))
    memo[id(expr)] = (expr, result)
    return result


def block_axes(transitions: Iterable[tuple[ir.Expr, Type]], probe: _Probe) -> BlockAxes | None:
    """The axes along which the linear maps ``transitions`` (each with the type of the state
    it updates; every state the same rank) are block diagonal, or None if there are none."""
    memo: dict[int, tuple[ir.Expr, _Alignment | None]] = {}
    common: set[int] | None = None
    varying: set[int] = set()
    for transition, state in transitions:
        part = _alignment(transition, probe, memo)
        if part is None:
            continue
        offset = state.rank - transition.type.rank
        kept = {a for a, p in part.axes.items() if p + offset == a and transition.type.shape[p] == state.shape[a] and state.shape[a] > 1}
        common = kept if common is None else common & kept
        varying |= part.varying
    if not common:
        return None
    axes = tuple(sorted(common))
    return BlockAxes(axes, shared=not (varying & common))


def _dense_or_blocks(transition: ir.Expr, bias: ir.Expr | None, probe: _Probe) -> MatrixAffine:
    """A linear map with no cheaper structure: block diagonal when some axes are kept, else dense."""
    state = probe.variable.type
    blocks = block_axes([(transition, state)], probe)
    if blocks is not None and len(blocks.axes) < state.rank:
        return MatrixAffine(transition, bias, Structure.BLOCK_DIAGONAL, blocks=blocks)
    return MatrixAffine(transition, bias, Structure.DENSE)


def joint_affine(group: tuple[str, ...], updates: dict[str, ir.Expr], types: dict[str, Type]) -> JointAffine | Nonlinear:
    """The joint recurrence of a coupled group, from each member's update written in the
    members' previous values (see :class:`JointAffine`)."""
    variables = tuple(Ref(RefKind.STATE_PREV, name, types[name]) for name in group)
    probe = _Probe(variables[0], variables[1:])
    transitions, inputs = [], []
    for name in group:
        split = linear_split(updates[name], probe)
        if split is None:
            return Nonlinear(f"the update of '{name}' is not linear in the group's previous values ({_nonlinear_reason(updates[name], probe)})")
        if not split.terms:
            return Nonlinear(f"the update of '{name}' reads no previous value of the group")
        transition = _sum(split.terms)
        assert transition is not None
        transitions.append(transition)
        inputs.append(split.bias)
    blocks = None
    if len({types[name].rank for name in group}) == 1:
        blocks = block_axes(zip(transitions, (types[n] for n in group)), probe)
        if blocks is not None:
            sizes = {tuple(types[n].shape[a] for a in blocks.axes) for n in group}
            if len(sizes) != 1:
                blocks = None
    structure = Structure.BLOCK_DIAGONAL if blocks is not None else Structure.DENSE
    return JointAffine(group, tuple(transitions), tuple(inputs), structure, blocks)


# ---- tropical semirings -----------------------------------------------------------


def _semiring_split(expr: ir.Expr, probe: _Probe, semiring: Semiring) -> tuple[list[ir.Expr], ir.Expr | None, bool] | None:
    """Split ``expr`` as ``(+)_i term_i (+) bias`` with terms semiring-linear in the variable.

    Returns the terms, the free part, and whether a reduction (a semiring matrix product)
    was involved; None when ``expr`` is not of that form.
    """
    if not probe.contains(expr):
        return [], expr, False
    if expr == probe.variable:
        return [expr], None, False
    if not isinstance(expr, Op):
        return None
    if expr.op == semiring.plus:
        left = _semiring_split(expr.args[0], probe, semiring)
        right = _semiring_split(expr.args[1], probe, semiring)
        if left is None or right is None:
            return None
        if left[1] is None or right[1] is None:
            bias = left[1] if right[1] is None else right[1]
        else:
            bias = make(semiring.plus, left[1], right[1])
        return left[0] + right[0], bias, left[2] or right[2]
    if expr.op in ("add", "sub"):  # the semiring's times: c (x) (a (+) b) = (c (x) a) (+) (c (x) b)
        dependent = [i for i, a in enumerate(expr.args) if probe.contains(a)]
        if len(dependent) != 1 or (expr.op == "sub" and dependent[0] != 0):
            return None
        inner = _semiring_split(expr.args[dependent[0]], probe, semiring)
        if inner is None:
            return None
        terms, bias, reduced = inner
        other = expr.args[1 - dependent[0]]

        def rebuild_times(x: ir.Expr) -> ir.Expr:
            return make(expr.op, *((x, other) if dependent[0] == 0 else (other, x)))

        return [rebuild_times(t) for t in terms], None if bias is None else rebuild_times(bias), reduced
    if expr.op == "index" or expr.op == semiring.reduce:
        inner = _semiring_split(expr.args[0], probe, semiring)
        if inner is None:
            return None
        terms, bias, reduced = inner

        def rebuild(x: ir.Expr) -> ir.Expr:
            return make(expr.op, x, attrs=expr.attrs)

        return [rebuild(t) for t in terms], None if bias is None else rebuild(bias), reduced or expr.op == semiring.reduce
    return None


def _semiring_decay(term: ir.Expr, probe: _Probe) -> ir.Expr | None:
    """For a term ``S + c1 - c2 ...`` the free part ``c1 - c2 ...``; None otherwise."""
    if term == probe.variable:
        return Literal(0, Type(()))
    if isinstance(term, Op) and term.op in ("add", "sub"):
        dependent = 0 if probe.contains(term.args[0]) else 1
        inner = _semiring_decay(term.args[dependent], probe)
        if inner is None:
            return None
        other = term.args[1 - dependent]
        if isinstance(inner, Literal) and inner.value == 0:
            return other if term.op == "add" else make("neg", other)
        return make(term.op, *((inner, other) if dependent == 0 else (other, inner)))
    return None


def _classify_semiring(expr: ir.Expr, probe: _Probe) -> SemiringAffine | None:
    if probe.variable.type.kind is not Kind.REAL:
        return None
    for semiring in TROPICAL_SEMIRINGS:
        split = _semiring_split(expr, probe, semiring)
        if split is None:
            continue
        terms, bias, reduced = split
        if not terms:
            continue
        transition = terms[0]
        for term in terms[1:]:
            transition = make(semiring.plus, transition, term)
        if reduced:
            return SemiringAffine(semiring, transition, bias, Structure.MATRIX)
        decays = [_semiring_decay(t, probe) for t in terms]
        if any(d is None for d in decays):
            return SemiringAffine(semiring, transition, bias, Structure.MATRIX)
        decay = decays[0]
        for other in decays[1:]:
            decay = make(semiring.plus, decay, other)  # type: ignore[arg-type]
        return SemiringAffine(semiring, transition, bias, Structure.DIAGONAL, decay=decay)
    return None


def _nonlinear_reason(expr: ir.Expr, probe: _Probe) -> str:
    """The innermost operation through which the previous value enters nonlinearly."""
    for node in ir.walk(expr):
        if isinstance(node, Op) and probe.contains(node) and linear_split(node, probe) is None:
            if all(linear_split(a, probe) is not None for a in node.args):
                spec = OPS[node.op]
                return f"'{spec.surface}' applied to a value that depends on it"
    return "it enters nonlinearly"


def classify(update: ir.Expr, variable: Ref) -> Recurrence:
    """Classify ``new = update(variable)`` where ``variable`` is the state's previous value."""
    probe = _Probe(variable)
    if not probe.contains(update):
        return NoRecurrence(update)
    split = linear_split(update, probe)
    if split is not None:
        transition = _sum(split.terms)
        assert transition is not None
        return _classify_linear(split, probe, transition)
    semiring = _classify_semiring(update, probe)
    if semiring is not None:
        return semiring
    return Nonlinear(_nonlinear_reason(update, probe))


# ---- signs ------------------------------------------------------------------------


def log_of_positive(expr: ir.Expr, cell: ir.CellIR) -> ir.Expr | None:
    """``log(expr)`` as an expression, when ``expr`` is provably positive; else None.

    Chunked forms accumulate decays in log space; this finds the logarithm exactly where
    the decay is written as one (``exp(x)`` gives ``x``, ``sigmoid(x)`` gives
    ``logsigmoid(x)``, a sum of positive terms the ``logaddexp`` of their logs) rather than
    taking the log of a rounded value.
    """
    if expr.type.kind is not Kind.REAL:
        return None
    constant = fold_constant(expr)
    if isinstance(constant, (int, float)) and not isinstance(constant, bool):
        return Literal(math.log(constant), Type(())) if constant > 0 else None
    if isinstance(expr, Ref):
        if expr.kind is RefKind.BINDING:
            binding = cell.binding(expr.name)
            return log_of_positive(binding.value, cell) if binding is not None else None
        if expr.kind is RefKind.CONST:
            const = next((c for c in cell.consts if c.name == expr.name), None)
            return log_of_positive(const.value, cell) if const is not None else None
        if expr.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW) and _is_positive_delay(expr.name, cell):
            # A delay's values are its update's values shifted one step, and its initial value:
            # positive when both are.  The log is taken of the carried value (log space needs no
            # more: the value was rounded once, as the loop rounds it).
            return Op("log", (expr,), expr.type)
        return None
    op, args = expr.op, expr.args
    if op == "exp":
        return args[0]
    if op == "sigmoid":
        return Op("logsigmoid", args, expr.type)
    if op == "softmax":
        return _log_softmax(expr)
    if op == "index":
        inner = log_of_positive(args[0], cell)
        return None if inner is None else Op("index", (inner,), expr.type, expr.attrs)
    if op in ("mul", "div"):
        left, right = log_of_positive(args[0], cell), log_of_positive(args[1], cell)
        if left is None or right is None:
            return None
        if isinstance(right, Literal) and right.value == 0:  # a factor of exactly 1
            return left if left.type.shape == expr.type.shape else Op("add", (left, right), expr.type)
        if isinstance(left, Literal) and left.value == 0 and op == "mul":
            return right if right.type.shape == expr.type.shape else Op("add", (left, right), expr.type)
        return Op("add" if op == "mul" else "sub", (left, right), expr.type)
    if op == "add":
        # log(a + b) = logaddexp(log a, log b) for positive a and b: the gate with a floor,
        # lower + (1 - lower) * sigmoid(z) (HGRN), is positive when lower is.
        for zero, other in ((args[0], args[1]), (args[1], args[0])):
            if fold_constant(zero) == 0:  # lower = 0: the gate is the other term alone
                return log_of_positive(other, cell)
        left, right = log_of_positive(args[0], cell), log_of_positive(args[1], cell)
        return None if left is None or right is None else make("logaddexp", left, right)
    if op == "pow":
        base = log_of_positive(args[0], cell)
        return None if base is None or args[1].type.kind is not Kind.REAL else Op("mul", (args[1], base), expr.type)
    if op == "sub" and isinstance(args[0], Literal) and args[0].value == 1:
        # 1 - sigmoid(x) = sigmoid(-x)
        inner = args[1]
        while isinstance(inner, Ref) and inner.kind is RefKind.BINDING and cell.binding(inner.name) is not None:
            inner = cell.binding(inner.name).value
        if isinstance(inner, Op) and inner.op == "sigmoid":
            return Op("logsigmoid", (Op("neg", inner.args, inner.args[0].type),), expr.type)
    return None


def _log_softmax(expr: Op) -> ir.Expr:
    """log(softmax(x, axes)) = x - logsumexp(x, axes), the sum broadcast back over the axes."""
    (value,) = expr.args
    (axis,) = expr.attrs
    axes = reduction_axes(value.type.rank, axis)
    if not axes:  # the softmax of a scalar is 1
        return Literal(0, Type(()))
    total = make("logsumexp", value, attrs=expr.attrs)
    spread = make("index", total, attrs=tuple(ir.NEW_AXIS if position in axes else ir.SliceItem(None, None) for position in range(value.type.rank)))
    return make("sub", value, spread)


def _is_positive_delay(name: str, cell: ir.CellIR, seen: frozenset[str] = frozenset()) -> bool:
    """Whether state ``name`` is a delay (its update reads no state except other delays)
    whose update and initial value are provably positive."""
    if name in seen:
        return False
    try:
        state, update = cell.state(name), cell.update(name)
    except KeyError:
        return False
    if not _reads_only_delays(update.value, cell, seen | {name}):
        return False
    init = fold_constant(state.init)
    init_positive = (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0) or log_of_positive(state.init, cell) is not None
    return init_positive and log_of_positive(update.value, cell) is not None


def _reads_only_delays(expr: ir.Expr, cell: ir.CellIR, seen: frozenset[str]) -> bool:
    for ref in ir.refs(expr):
        if ref.kind is RefKind.SCAN:
            return False
        if ref.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW):
            if ref.name in seen:
                return False
            if not _reads_only_delays(cell.update(ref.name).value, cell, seen | {ref.name}):
                return False
        elif ref.kind is RefKind.BINDING:
            binding = cell.binding(ref.name)
            if binding is not None and not _reads_only_delays(binding.value, cell, seen):
                return False
    return True


# ---- order of states --------------------------------------------------------------


def _strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; components come out in reverse topological order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in nodes:
        if node not in index:
            visit(node)
    return components


def _schedule(order: list[str], reads: dict[str, set[str]]) -> tuple[tuple[str, ...], ...]:
    """Groups of mutually dependent recurrences, each after the groups it reads."""
    # An edge x -> y means "x's update reads y", so y's component must come first:
    # Tarjan emits a component only after every component reachable from it.
    components = _strongly_connected(order, {k: set(v) for k, v in reads.items()})
    position = {name: i for i, name in enumerate(order)}
    return tuple(tuple(sorted(c, key=position.__getitem__)) for c in components)


# ---- read-outs ---------------------------------------------------------------------


def _readouts(output: int, expr: ir.Expr, state_types: dict[str, Type]) -> list[Readout]:
    found: list[Readout] = []

    def recurrent(node: ir.Expr) -> set[tuple[RefKind, str]]:
        return {(r.kind, r.name) for r in ir.refs(node) if r.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW, RefKind.SCAN)}

    def go(node: ir.Expr) -> None:
        sources = recurrent(node)
        if not sources:
            return
        if len(sources) == 1:
            kind, name = next(iter(sources))
            if kind is not RefKind.SCAN:
                variable = next(r for r in ir.refs(node) if r.kind is kind and r.name == name)
                split = linear_split(node, variable)
                if split is not None and split.bias is None and node != variable:
                    reduces = node.type.rank < state_types[name].rank or _numel(node.type) < _numel(state_types[name])
                    found.append(Readout(output, name, node, reduces))
                    return
        if isinstance(node, Op):
            for arg in node.args:
                go(arg)

    go(expr)
    return found


def _numel(t: Type) -> int:
    total = 1
    for size in t.shape:
        total *= size
    return total


# ---- hoisting -------------------------------------------------------------------------


def _hoistable(cell: ir.CellIR, time_parallel: frozenset[str], sources: dict[str, frozenset[str]]) -> tuple[ir.Expr, ...]:
    """Maximal state-free operations inside statements that run step by step.

    They read at least one input (or time-parallel binding), so they change with time;
    ones that read only params and consts are left alone (they are cheap and would only
    be broadcast over time).
    """
    found: dict[int, ir.Expr] = {}

    def varying_size(node: ir.Expr) -> int:
        """The largest per-step value among the time-varying refs ``node`` reads (0 if none)."""
        sizes = [_numel(r.type) for r in ir.refs(node) if r.kind is RefKind.INPUT or (r.kind is RefKind.BINDING and r.name in time_parallel)]
        return max(sizes, default=0)

    def visit(node: ir.Expr) -> None:
        if not isinstance(node, Op):
            return
        if not recurrent_sources(node, sources):
            size = varying_size(node)
            # Not when it would store much more per step than the inputs it reads (outer products).
            if size and _numel(node.type) <= 4 * size and node.op not in ("index", "neg", "real", "imag", "conj"):
                found[id(node)] = node
            return
        for arg in node.args:
            visit(arg)

    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in time_parallel:
            continue
        if isinstance(statement, ir.ScanAssign):
            for lift in statement.lifts:
                visit(lift)
        elif isinstance(statement, (ir.Assign, ir.Update, ir.Emit)):
            visit(statement.value)
    return tuple(found.values())


# ---- coupled groups -------------------------------------------------------------------


def _substitute_new_values(expr: ir.Expr, written: dict[str, ir.Expr], memo: dict[int, tuple[ir.Expr, ir.Expr]]) -> ir.Expr:
    """``expr`` with each new value of a state in ``written`` replaced by its update."""
    hit = memo.get(id(expr))
    if hit is not None and hit[0] is expr:
        return hit[1]
    if isinstance(expr, Ref):
        result = written.get(expr.name, expr) if expr.kind is RefKind.STATE_NEW else expr
    elif isinstance(expr, Op):
        args = tuple(_substitute_new_values(a, written, memo) for a in expr.args)
        result = expr if all(a is b for a, b in zip(args, expr.args)) else Op(expr.op, args, expr.type, expr.attrs)
    else:
        result = expr
    memo[id(expr)] = (expr, result)
    return result


def _group_analyses(cell: ir.CellIR, schedule: tuple[tuple[str, ...], ...], states: list[StateAnalysis]) -> tuple[GroupAnalysis, ...]:
    """The joint recurrence of every coupled group of states (groups holding a scan have none)."""
    by_name = {s.state: s for s in states}
    found = []
    for group in schedule:
        if len(group) < 2 or any(name not in by_name for name in group):
            continue
        written: dict[str, ir.Expr] = {}
        memo: dict[int, tuple[ir.Expr, ir.Expr]] = {}
        for name in group:  # in the order of the body: a member reads the new values of earlier ones
            written[name] = _substitute_new_values(by_name[name].update, written, memo)
        unresolved = next(
            (r.name for e in written.values() for r in ir.refs(e) if r.kind is RefKind.STATE_NEW and r.name in by_name and r.name in group), None
        )
        if unresolved is not None:
            recurrence: JointAffine | Nonlinear = Nonlinear(f"a member reads the new value of '{unresolved}' before its update")
        else:
            recurrence = joint_affine(group, written, {name: by_name[name].type for name in group})
        found.append(GroupAnalysis(group, recurrence))
    return tuple(found)


# ---- the whole analysis ---------------------------------------------------------------


def analyze(cell: ir.CellIR) -> Analysis:
    """Answer the four questions of this module's docstring for ``cell``.

    Raises :class:`~recdsl.errors.DeclarationError` when expanding the state-dependent
    bindings builds expressions too deep to analyse (chains of hundreds of bindings).
    """
    try:
        return _analyze(cell)
    except RecursionError:
        raise DeclarationError(
            f"cell {cell.name}: its state-dependent bindings form a chain too long to analyse",
            cell.span,
            expected="fewer than a few hundred bindings between a state's previous value and its update",
        ) from None


# Expanding bindings that read each other twice doubles an expression at each step
# (y_k = y_{k-1} + y_{k-1}); the classifier walks expressions as trees, so it stops here.
MAX_EXPANDED_NODES = 100_000


def _tree_size(expr: ir.Expr, sizes: dict[int, int]) -> int:
    """The number of nodes of ``expr`` read as a tree, counted over the shared DAG."""
    stack = [(expr, False)]
    while stack:
        node, ready = stack.pop()
        if id(node) in sizes:
            continue
        children = node.args if isinstance(node, Op) else ()
        if ready or not children:
            sizes[id(node)] = 1 + sum(sizes[id(c)] for c in children)
        else:
            stack.append((node, True))
            stack.extend((c, False) for c in children if id(c) not in sizes)
    return sizes[id(expr)]


def _check_size(expr: ir.Expr, what: str, cell: ir.CellIR, span) -> None:
    size = _tree_size(expr, {})
    if size > MAX_EXPANDED_NODES:
        raise DeclarationError(
            f"{what} grows to {size} operations when the state-dependent bindings it reads are expanded",
            span or cell.span,
            expected=f"at most {MAX_EXPANDED_NODES} (bindings that each read the previous one twice double at every line)",
        )


def _analyze(cell: ir.CellIR) -> Analysis:
    sources = binding_dependencies(cell)
    time_parallel = frozenset(name for name, deps in sources.items() if not deps)
    parallel_outputs = frozenset(e.index for e in cell.outputs if not recurrent_sources(e.value, sources))

    states: list[StateAnalysis] = []
    reads: dict[str, set[str]] = {}
    order: list[str] = []
    for statement in cell.body:
        if isinstance(statement, ir.Update):
            state_type = cell.state(statement.state).type
            variable = Ref(RefKind.STATE_PREV, statement.state, state_type)
            expanded = inline(statement.value, cell, time_parallel)
            _check_size(expanded, f"the update of state '{statement.state}'", cell, statement.span)
            others = recurrent_sources(statement.value, sources) - {statement.state}
            recurrence = classify(expanded, variable)
            states.append(StateAnalysis(statement.state, state_type, expanded, recurrence, tuple(sorted(others))))
            reads[statement.state] = set(others)
            order.append(statement.state)
        elif isinstance(statement, ir.ScanAssign):
            lifted: set[str] = set()
            for lift in statement.lifts:
                lifted |= recurrent_sources(lift, sources)
            reads[statement.name] = lifted
            order.append(statement.name)

    delays = _delays(cell, states, sources)
    states = [replace(s, recurrence=Delay(s.recurrence.value, cell.state(s.state).direction)) if s.state in delays else s for s in states]
    schedule = _schedule(order, reads)
    _check_directions(cell, schedule)

    readouts: list[Readout] = []
    state_types = {s.name: s.type for s in cell.states}
    expanded_outputs = tuple(inline(emit.value, cell, time_parallel) for emit in cell.outputs)
    for emit, expanded in zip(cell.outputs, expanded_outputs):
        _check_size(expanded, f"output {emit.name or emit.index}", cell, emit.span)
    for emit, expanded in zip(cell.outputs, expanded_outputs):
        if emit.index not in parallel_outputs:
            readouts.extend(_readouts(emit.index, expanded, state_types))

    return Analysis(
        cell=cell,
        time_parallel=time_parallel,
        parallel_outputs=parallel_outputs,
        states=tuple(states),
        schedule=schedule,
        readouts=tuple(readouts),
        expanded_outputs=expanded_outputs,
        hoisted=_hoistable(cell, time_parallel, sources),
        dependencies=sources,
        groups=_group_analyses(cell, schedule, states),
        delays=frozenset(delays),
    )


def _delays(cell: ir.CellIR, states: list[StateAnalysis], sources: dict[str, frozenset[str]]) -> set[str]:
    """The states whose update reads nothing recurrent except other delays (and not itself).

    Found in rounds, each delay after those it reads, so delays never read each other in a circle.
    """
    delays: set[str] = set()
    candidates = [s.state for s in states if isinstance(s.recurrence, NoRecurrence)]
    changed = True
    while changed:
        changed = False
        for name in candidates:
            if name in delays:
                continue
            read = recurrent_sources(cell.update(name).value, sources)
            if name not in read and read <= delays:
                delays.add(name)
                changed = True
    return delays


def _check_directions(cell: ir.CellIR, schedule: tuple[tuple[str, ...], ...]) -> None:
    """A group of recurrences that read each other must run one way: a forward state needs the
    past of a reverse one and the reverse one its future, which no order of steps gives."""
    for group in schedule:
        directions = {cell.direction_of(name) for name in group}
        if len(directions) > 1:
            forward = [n for n in group if cell.direction_of(n) is ir.Direction.FORWARD]
            backward = [n for n in group if cell.direction_of(n) is ir.Direction.REVERSE]
            span = next((s.span for s in cell.states if s.name == backward[0]), None) or cell.span
            raise DeclarationError(
                f"forward {_plural(forward)} and reverse {_plural(backward)} read each other, so neither can run first",
                span,
                expected="no cycle between forward and reverse recurrences (a forward state may read a reverse one, or the other way, not both)",
            )


def _plural(names: list[str]) -> str:
    quoted = ", ".join(f"'{n}'" for n in names)
    return f"state {quoted}" if len(names) == 1 else f"states {quoted}"
