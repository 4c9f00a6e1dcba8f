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
from dataclasses import dataclass, field
from typing import Iterable, Union

from . import ir
from .errors import DeclarationError
from .ir import Kind, Literal, Op, Ref, RefKind, Type
from .ops import BILINEAR, LINEAR_UNARY, OPS, TROPICAL_SEMIRINGS, Semiring

ONE = Literal(1, Type(()))

# ---- the recurrence classes ---------------------------------------------------


@dataclass(frozen=True)
class NoRecurrence:
    """The new value does not read the previous one: the state is time-parallel."""

    value: ir.Expr
    name = "no recurrence"


@dataclass(frozen=True)
class DiagonalAffine:
    """``h = decay * h + input``: independent scalar recurrences, one per element.

    ``structure`` is ``scalar`` (one decay for all elements) or ``elementwise``.
    """

    decay: ir.Expr
    input: ir.Expr | None
    structure: str
    name = "diagonal affine"


@dataclass(frozen=True)
class LowRankTerm:
    """``coefficient * outer(left, right @ S)``: a rank-one map applied from the left."""

    coefficient: ir.Expr
    left: ir.Expr
    right: ir.Expr


@dataclass(frozen=True)
class MatrixAffine:
    """``S = A(S) + input`` with ``A`` linear in ``S`` and more than elementwise per element.

    ``structure`` names the transition: ``scalar``, ``diagonal over rows``, ``diagonal
    over columns`` and ``diagonal over axes (...)`` (then ``decay`` is the factor, shaped
    to broadcast against ``S``); ``identity plus low rank``, ``diagonal plus low rank``
    (then ``decay`` is the diagonal part, ``low_rank`` the rank-one terms); ``dense``.
    ``transition`` is ``A(S)`` written with the state's previous value.
    """

    transition: ir.Expr
    input: ir.Expr | None
    structure: str
    decay: ir.Expr | None = None
    low_rank: tuple[LowRankTerm, ...] = ()
    name = "matrix affine"


@dataclass(frozen=True)
class SemiringAffine:
    """``S = A(S) (+) input`` over a tropical semiring (max-plus or log).

    ``structure`` is ``diagonal`` (``A(S) = S (*) decay`` elementwise) or ``matrix`` (a
    semiring matrix product, as in a CRF's forward algorithm).  ``decay`` is set for the
    diagonal structure; ``input`` is None when the update has no free term (the
    semiring's zero).  ``transition`` is ``A(S)`` without the input term.
    """

    semiring: Semiring
    transition: ir.Expr
    input: ir.Expr | None
    structure: str
    decay: ir.Expr | None = None

    @property
    def name(self) -> str:
        return f"affine over the {self.semiring.name} semiring"


@dataclass(frozen=True)
class Nonlinear:
    """Anything else: the previous value enters through ``reason``."""

    reason: str
    name = "nonlinear"


Recurrence = Union[NoRecurrence, DiagonalAffine, MatrixAffine, SemiringAffine, Nonlinear]


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

    def state(self, name: str) -> StateAnalysis:
        for analysis in self.states:
            if analysis.state == name:
                return analysis
        raise KeyError(name)

    @property
    def coupled_groups(self) -> tuple[tuple[str, ...], ...]:
        return tuple(group for group in self.schedule if len(group) > 1)


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


# (id(expr), id(variable)) -> (expr, variable, answer); the nodes are kept so ids stay unique.
_CONTAINS: dict[tuple[int, int], tuple[ir.Expr, Ref, bool]] = {}


def _contains(expr: ir.Expr, variable: Ref) -> bool:
    """Whether ``expr`` reads ``variable``, memoised over shared subexpressions."""
    key = (id(expr), id(variable))
    hit = _CONTAINS.get(key)
    if hit is not None and hit[0] is expr and hit[1] is variable:
        return hit[2]
    if isinstance(expr, Op):
        answer = any(_contains(arg, variable) for arg in expr.args)
    else:
        answer = expr == variable
    _CONTAINS[key] = (expr, variable, answer)
    return answer


# ---- sum-product linearity ------------------------------------------------------


def _op(op: str, *args: ir.Expr, type: Type | None = None) -> ir.Expr:
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
    if type is None:
        shapes = [a.type.shape for a in args]
        from .checker import broadcast_shapes

        shape = broadcast_shapes(*shapes) or shapes[0]
        kind = Kind.COMPLEX if any(a.type.kind is Kind.COMPLEX for a in args) else Kind.REAL
        type = Type(shape, kind)
    return Op(op, tuple(args), type)


@dataclass(frozen=True)
class _Linear:
    """An expression split as ``sum(terms) + bias``: each term linear in the variable."""

    terms: tuple[ir.Expr, ...]
    bias: ir.Expr | None


def linear_split(expr: ir.Expr, variable: Ref) -> _Linear | None:
    """Split ``expr`` into terms linear in ``variable`` plus a free part, or None if nonlinear."""
    if not _contains(expr, variable):
        return _Linear((), expr)
    if expr == variable:
        return _Linear((expr,), None)
    if not isinstance(expr, Op):
        return None
    op, args = expr.op, expr.args
    if op in ("add", "sub"):
        left, right = linear_split(args[0], variable), linear_split(args[1], variable)
        if left is None or right is None:
            return None
        if op == "add":
            bias = left.bias if right.bias is None else (right.bias if left.bias is None else Op("add", (left.bias, right.bias), expr.type))
            return _Linear(left.terms + right.terms, bias)
        negated = tuple(Op("neg", (t,), t.type) for t in right.terms)
        if right.bias is None:
            bias = left.bias
        elif left.bias is None:
            bias = Op("neg", (right.bias,), right.bias.type)
        else:
            bias = Op("sub", (left.bias, right.bias), expr.type)
        return _Linear(left.terms + negated, bias)
    if op == "neg" or op in LINEAR_UNARY - {"conj", "real", "imag"}:
        inner = linear_split(args[0], variable)
        if inner is None or (op != "neg" and not _keeps_shape(inner, args[0].type)):
            return None
        rebuild = lambda x: Op(op, (x,), Type(expr.type.shape, x.type.kind if op != "neg" else x.type.kind), expr.attrs)  # noqa: E731
        return _Linear(tuple(rebuild(t) for t in inner.terms), None if inner.bias is None else rebuild(inner.bias))
    if op in BILINEAR or op == "div":
        dependent = [i for i, a in enumerate(args) if _contains(a, variable)]
        if len(dependent) != 1 or (op == "div" and dependent[0] != 0):
            return None
        position = dependent[0]
        inner = linear_split(args[position], variable)
        if inner is None or (op in ("matmul", "outer") and not _keeps_shape(inner, args[position].type)):
            return None

        def rebuild(x: ir.Expr) -> ir.Expr:
            new_args = list(args)
            new_args[position] = x
            from .checker import broadcast_shapes, matmul_shape

            shapes = [a.type.shape for a in new_args]
            if op == "matmul":
                shape = matmul_shape(*shapes)
            elif op == "outer":
                shape = (shapes[0][0], shapes[1][0])
            else:
                shape = broadcast_shapes(*shapes)
            kind = Kind.COMPLEX if any(a.type.kind is Kind.COMPLEX for a in new_args) else Kind.REAL
            return Op(op, tuple(new_args), Type(shape, kind), expr.attrs)  # type: ignore[arg-type]

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


def _term_shape(term: ir.Expr, variable: Ref) -> _Scale | LowRankTerm | None:
    """Recognise ``c * S`` and ``c * outer(u, w @ S)``; None for any other linear term."""
    if term == variable:
        return _Scale(ONE)
    if not isinstance(term, Op):
        return None
    if term.op == "neg":
        inner = _term_shape(term.args[0], variable)
        if isinstance(inner, _Scale):
            return _Scale(_op("neg", inner.coefficient))
        if isinstance(inner, LowRankTerm):
            return LowRankTerm(_op("neg", inner.coefficient), inner.left, inner.right)
        return None
    if term.op in ("mul", "div"):
        dependent = 0 if _contains(term.args[0], variable) else 1
        factor = term.args[1 - dependent]
        inner = _term_shape(term.args[dependent], variable)
        combine = (lambda c: _op("mul", factor, c)) if term.op == "mul" else (lambda c: _op("div", c, factor))
        if isinstance(inner, _Scale):
            return _Scale(combine(inner.coefficient))
        if isinstance(inner, LowRankTerm) and factor.type.rank == 0:
            return LowRankTerm(combine(inner.coefficient), inner.left, inner.right)
        return None
    if term.op == "outer" and not _contains(term.args[0], variable):
        # outer(u, w @ S) = (u w^T) S: a rank-one map from the left.
        projection = term.args[1]
        if isinstance(projection, Op) and projection.op == "matmul" and not _contains(projection.args[0], variable):
            inner = _term_shape(projection.args[1], variable)
            if isinstance(inner, _Scale) and inner.coefficient.type.rank == 0 and projection.args[0].type.rank == 1 and variable.type.rank == 2:
                return LowRankTerm(inner.coefficient, term.args[0], projection.args[0])
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


def _classify_linear(split: _Linear, variable: Ref, transition: ir.Expr) -> Recurrence:
    shapes = [_term_shape(t, variable) for t in split.terms]
    state = variable.type
    if any(s is None for s in shapes):
        return MatrixAffine(transition, split.bias, "dense")
    scales = [s.coefficient for s in shapes if isinstance(s, _Scale)]
    low_rank = tuple(s for s in shapes if isinstance(s, LowRankTerm))
    decay = _sum(scales)
    if not low_rank:
        assert decay is not None
        axes = _varying_axes(decay, state)
        if state.rank <= 1:
            return DiagonalAffine(decay, split.bias, "scalar" if not axes else "elementwise")
        if len(axes) == state.rank:
            return DiagonalAffine(decay, split.bias, "elementwise")
        if not axes:
            structure = "scalar"
        elif state.rank == 2:
            structure = "diagonal over rows" if axes == (0,) else "diagonal over columns"
        else:
            structure = f"diagonal over axes {axes}"
        return MatrixAffine(transition, split.bias, structure, decay=decay)
    if decay is None:
        structure = "low rank"
    elif isinstance(decay, Literal) and decay.value == 1:
        structure = "identity plus low rank"
    elif not _varying_axes(decay, state):
        structure = "scaled identity plus low rank"
    else:
        structure = "diagonal plus low rank"
    return MatrixAffine(transition, split.bias, structure, decay=decay, low_rank=low_rank)


# ---- tropical semirings -----------------------------------------------------------


def _semiring_split(expr: ir.Expr, variable: Ref, semiring: Semiring) -> tuple[list[ir.Expr], ir.Expr | None, bool] | None:
    """Split ``expr`` as ``(+)_i term_i (+) bias`` with terms semiring-linear in ``variable``.

    Returns the terms, the free part, and whether a reduction (a semiring matrix product)
    was involved; None when ``expr`` is not of that form.
    """
    if not _contains(expr, variable):
        return [], expr, False
    if expr == variable:
        return [expr], None, False
    if not isinstance(expr, Op):
        return None
    if expr.op == semiring.plus:
        left = _semiring_split(expr.args[0], variable, semiring)
        right = _semiring_split(expr.args[1], variable, semiring)
        if left is None or right is None:
            return None
        if left[1] is None or right[1] is None:
            bias = left[1] if right[1] is None else right[1]
        else:
            bias = Op(semiring.plus, (left[1], right[1]), expr.type)
        return left[0] + right[0], bias, left[2] or right[2]
    if expr.op in ("add", "sub"):  # the semiring's times: c (x) (a (+) b) = (c (x) a) (+) (c (x) b)
        dependent = [i for i, a in enumerate(expr.args) if _contains(a, variable)]
        if len(dependent) != 1 or (expr.op == "sub" and dependent[0] != 0):
            return None
        inner = _semiring_split(expr.args[dependent[0]], variable, semiring)
        if inner is None:
            return None
        terms, bias, reduced = inner
        other = expr.args[1 - dependent[0]]
        rebuild = lambda x: Op(expr.op, (x, other) if dependent[0] == 0 else (other, x), Type(_bshape(x, other), Kind.REAL))  # noqa: E731
        return [rebuild(t) for t in terms], None if bias is None else rebuild(bias), reduced
    if expr.op == "index":
        inner = _semiring_split(expr.args[0], variable, semiring)
        if inner is None:
            return None
        terms, bias, reduced = inner
        rebuild = lambda x: Op("index", (x,), Type(expr.type.shape, Kind.REAL), expr.attrs)  # noqa: E731
        return [rebuild(t) for t in terms], None if bias is None else rebuild(bias), reduced
    if expr.op == semiring.reduce:
        inner = _semiring_split(expr.args[0], variable, semiring)
        if inner is None:
            return None
        terms, bias, _ = inner
        rebuild = lambda x: Op(expr.op, (x,), Type(expr.type.shape, Kind.REAL), expr.attrs)  # noqa: E731
        return [rebuild(t) for t in terms], None if bias is None else rebuild(bias), True
    return None


def _bshape(a: ir.Expr, b: ir.Expr) -> tuple[int, ...]:
    from .checker import broadcast_shapes

    return broadcast_shapes(a.type.shape, b.type.shape) or a.type.shape


def _semiring_decay(term: ir.Expr, variable: Ref) -> ir.Expr | None:
    """For a term ``S + c1 - c2 ...`` the free part ``c1 - c2 ...``; None otherwise."""
    if term == variable:
        return Literal(0, Type(()))
    if isinstance(term, Op) and term.op in ("add", "sub"):
        dependent = 0 if _contains(term.args[0], variable) else 1
        inner = _semiring_decay(term.args[dependent], variable)
        if inner is None:
            return None
        other = term.args[1 - dependent]
        if isinstance(inner, Literal) and inner.value == 0:
            return other if term.op == "add" else Op("neg", (other,), other.type)
        return Op(term.op, (inner, other) if dependent == 0 else (other, inner), Type(_bshape(inner, other)))
    return None


def _classify_semiring(expr: ir.Expr, variable: Ref) -> SemiringAffine | None:
    if variable.type.kind is not Kind.REAL:
        return None
    for semiring in TROPICAL_SEMIRINGS:
        split = _semiring_split(expr, variable, semiring)
        if split is None:
            continue
        terms, bias, reduced = split
        if not terms:
            continue
        transition = terms[0]
        for term in terms[1:]:
            transition = Op(semiring.plus, (transition, term), Type(_bshape(transition, term)))
        if reduced:
            return SemiringAffine(semiring, transition, bias, "matrix")
        decays = [_semiring_decay(t, variable) for t in terms]
        if any(d is None for d in decays):
            return SemiringAffine(semiring, transition, bias, "matrix")
        decay = decays[0]
        for other in decays[1:]:
            decay = Op(semiring.plus, (decay, other), Type(_bshape(decay, other)))  # type: ignore[arg-type]
        return SemiringAffine(semiring, transition, bias, "diagonal", decay=decay)
    return None


def _nonlinear_reason(expr: ir.Expr, variable: Ref) -> str:
    """The innermost operation through which the previous value enters nonlinearly."""
    for node in ir.walk(expr):
        if isinstance(node, Op) and _contains(node, variable) and linear_split(node, variable) is None:
            if all(linear_split(a, variable) is not None for a in node.args):
                spec = OPS[node.op]
                return f"'{spec.surface}' applied to a value that depends on it"
    return "it enters nonlinearly"


def classify(update: ir.Expr, variable: Ref) -> Recurrence:
    """Classify ``new = update(variable)`` where ``variable`` is the state's previous value."""
    if not _contains(update, variable):
        return NoRecurrence(update)
    split = linear_split(update, variable)
    if split is not None:
        transition = _sum(split.terms)
        assert transition is not None
        return _classify_linear(split, variable, transition)
    semiring = _classify_semiring(update, variable)
    if semiring is not None:
        return semiring
    return Nonlinear(_nonlinear_reason(update, variable))


# ---- signs ------------------------------------------------------------------------


def log_of_positive(expr: ir.Expr, cell: ir.CellIR) -> ir.Expr | None:
    """``log(expr)`` as an expression, when ``expr`` is provably positive; else None.

    Chunked forms accumulate decays in log space; this finds the logarithm exactly where
    the decay is written as one (``exp(x)`` gives ``x``, ``sigmoid(x)`` gives
    ``logsigmoid(x)``) rather than taking the log of a rounded value.
    """
    if expr.type.kind is not Kind.REAL:
        return None
    if isinstance(expr, Literal):
        return Literal(math.log(expr.value), expr.type) if expr.value > 0 else None
    if isinstance(expr, Ref):
        if expr.kind is RefKind.BINDING:
            binding = cell.binding(expr.name)
            return log_of_positive(binding.value, cell) if binding is not None else None
        if expr.kind is RefKind.CONST:
            const = next((c for c in cell.consts if c.name == expr.name), None)
            return log_of_positive(const.value, cell) if const is not None else None
        return None
    op, args = expr.op, expr.args
    if op == "exp":
        return args[0]
    if op == "sigmoid":
        return Op("logsigmoid", args, expr.type)
    if op == "index":
        inner = log_of_positive(args[0], cell)
        return None if inner is None else Op("index", (inner,), expr.type, expr.attrs)
    if op in ("mul", "div"):
        left, right = log_of_positive(args[0], cell), log_of_positive(args[1], cell)
        if left is None or right is None:
            return None
        return Op("add" if op == "mul" else "sub", (left, right), expr.type)
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


# ---- the whole analysis ---------------------------------------------------------------


def analyze(cell: ir.CellIR) -> Analysis:
    """Answer the four questions of this module's docstring for ``cell``.

    Raises :class:`~recdsl.errors.DeclarationError` when expanding the state-dependent
    bindings builds expressions too deep to analyse (chains of hundreds of bindings).
    """
    _CONTAINS.clear()
    try:
        return _analyze(cell)
    except RecursionError:
        raise DeclarationError(
            f"cell {cell.name}: its state-dependent bindings form a chain too long to analyse",
            cell.span,
            expected="fewer than a few hundred bindings between a state's previous value and its update",
        ) from None
    finally:
        _CONTAINS.clear()


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
        schedule=_schedule(order, reads),
        readouts=tuple(readouts),
        expanded_outputs=expanded_outputs,
        hoisted=_hoistable(cell, time_parallel, sources),
        dependencies=sources,
    )
