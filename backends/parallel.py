"""The time-parallel backends, ``scan`` and ``chunked``, driven entirely by the analysis.

Both compute everything that reads no state for all steps at once, then solve the
recurrences in the order of :attr:`recdsl.analysis.Analysis.schedule`, each over the whole
sequence, by the form its class allows:

======================================  =====================================================
class                                   form
======================================  =====================================================
diagonal affine, matrix affine with a   ``linear_scan`` of ``(decay, input)``
scalar or row/column decay
matrix affine, identity plus low rank   ``matrix_affine_scan`` of ``(M_t, B_t)``, ``M_t`` built
                                        from the rank-one terms
matrix affine, dense                    ``matrix_affine_scan``, ``M_t`` found by applying the
                                        transition to the basis of the state
semiring affine (max-plus, log)         the same scans over the semiring
declared monoid                         ``prefix_scan`` with the monoid's combine
======================================  =====================================================

Then outputs are evaluated over the whole sequence.  The ``chunked`` backend differs in
one thing: a matrix state that outputs only read linearly (``q @ S``) is never
materialised per step; its read-outs come from :mod:`.chunk_kernels`, and only states at
chunk boundaries are kept.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from recdsl import ir
from recdsl.analysis import (
    Analysis,
    DiagonalAffine,
    MatrixAffine,
    NoRecurrence,
    Nonlinear,
    SemiringAffine,
    StateAnalysis,
    log_of_positive,
)
from recdsl.ir import Kind, Op, Ref, RefKind

from . import chunk_kernels
from .scans import (
    linear_scan,
    matrix_affine_scan,
    prefix_scan,
    semiring_diagonal_scan,
    semiring_matrix_scan,
    semiring_matmul,
    semiring_product_scan,
)
from .torch_ops import ELEMENTWISE, REDUCTIONS, Evaluator, Numerics, align, combine_carries

# The largest state (in elements) whose transition is scanned as an explicit matrix.
MAX_MATRIX_STATE = 256
DEFAULT_CHUNK = 64


# ---- what each backend can run ---------------------------------------------------------


def _matrix_size(state: StateAnalysis) -> int:
    size = 1
    for n in state.type.shape:
        size *= n
    return size


def _needs_explicit_matrix(state: StateAnalysis) -> bool:
    """Whether the transition is scanned as a matrix over the whole flattened state."""
    recurrence = state.recurrence
    if isinstance(recurrence, MatrixAffine):
        return recurrence.structure == "dense" or (bool(recurrence.low_rank) and not _left_matrix(state))
    return isinstance(recurrence, SemiringAffine) and recurrence.structure == "matrix"


def unsupported(analysis: Analysis) -> str | None:
    """Why the time-parallel backends cannot run this cell, or None when they can."""
    for group in analysis.coupled_groups:
        return f"states {', '.join(group)} are coupled (each reads the other), so they can only run step by step"
    for state in analysis.states:
        recurrence = state.recurrence
        if isinstance(recurrence, Nonlinear):
            return f"state '{state.state}' is nonlinear: {recurrence.reason}"
        if _needs_explicit_matrix(state) and _matrix_size(state) > MAX_MATRIX_STATE:
            return f"state '{state.state}' has a {recurrence.structure} transition and {_matrix_size(state)} elements (more than {MAX_MATRIX_STATE} to scan as a matrix)"
    return None


# ---- chunked plans -------------------------------------------------------------------------


@dataclass(frozen=True)
class RankOneTerm:
    """A term ``coefficient * outer(row, column)`` of a matrix state's input."""

    row: ir.Expr
    column: ir.Expr
    coefficient: ir.Expr | None


@dataclass(frozen=True)
class ChunkPlan:
    """How the chunked backend produces a matrix state's read-outs without storing it per step.

    ``transposed`` is set when the read-outs contract the state's second axis (``S @ q``);
    the kernels then see ``S^T``.  ``queries[i]`` is the vector of ``readouts[i]``.
    """

    state: str
    kind: str  # "decayed outer products" | "delta rule"
    transposed: bool
    readouts: tuple[ir.Expr, ...]  # nodes inside analysis.expanded_outputs
    queries: tuple[ir.Expr, ...]
    inputs: tuple[RankOneTerm, ...]
    log_decay: ir.Expr | None = None


def _rank_one_terms(expr: ir.Expr | None) -> list[RankOneTerm] | None:
    """``expr`` as a sum of ``c * outer(u, v)`` (or ``u[:, None] * v[None, :]``) terms, or None."""
    if expr is None:
        return []
    if isinstance(expr, Op):
        if expr.op == "add":
            left, right = _rank_one_terms(expr.args[0]), _rank_one_terms(expr.args[1])
            return None if left is None or right is None else left + right
        if expr.op == "outer":
            return [RankOneTerm(expr.args[0], expr.args[1], None)]
        if expr.op == "mul":
            for scalar, rest in ((expr.args[0], expr.args[1]), (expr.args[1], expr.args[0])):
                if scalar.type.rank == 0:
                    inner = _rank_one_terms(rest)
                    if inner is not None:
                        return [RankOneTerm(t.row, t.column, scalar if t.coefficient is None else Op("mul", (scalar, t.coefficient), scalar.type)) for t in inner]
            column_vector = _as_axis_vector(expr.args[0], 0), _as_axis_vector(expr.args[1], 1)
            if None not in column_vector:
                return [RankOneTerm(column_vector[0], column_vector[1], None)]  # type: ignore[arg-type]
            row_first = _as_axis_vector(expr.args[1], 0), _as_axis_vector(expr.args[0], 1)
            if None not in row_first:
                return [RankOneTerm(row_first[0], row_first[1], None)]  # type: ignore[arg-type]
    return None


def _as_axis_vector(expr: ir.Expr, axis: int) -> ir.Expr | None:
    """For ``u[:, None]`` (axis 0) or ``u[None, :]`` (axis 1) the vector ``u``."""
    if not (isinstance(expr, Op) and expr.op == "index" and expr.type.rank == 2 and expr.args[0].type.rank == 1):
        return None
    wanted = (ir.SliceItem(None, None), ir.NEW_AXIS) if axis == 0 else (ir.NEW_AXIS, ir.SliceItem(None, None))
    return expr.args[0] if tuple(expr.attrs) == wanted else None


def _readout_query(readout: ir.Expr, state: str) -> tuple[ir.Expr, bool] | None:
    """For ``q @ S`` the pair ``(q, False)``; for ``S @ q`` ``(q, True)``; else None."""
    if not (isinstance(readout, Op) and readout.op == "matmul"):
        return None
    left, right = readout.args
    is_state = lambda e: isinstance(e, Ref) and e.kind is RefKind.STATE_NEW and e.name == state  # noqa: E731
    if is_state(right) and left.type.rank == 1:
        return left, False
    if is_state(left) and right.type.rank == 1:
        return right, True
    return None


def _mentions(expr: ir.Expr, state: str, exclude: set[int]) -> bool:
    stack = [expr]
    while stack:
        node = stack.pop()
        if id(node) in exclude:
            continue
        if isinstance(node, Ref) and node.name == state and node.kind in (RefKind.STATE_NEW, RefKind.STATE_PREV):
            return True
        if isinstance(node, Op):
            stack.extend(node.args)
    return False


def chunk_plan(analysis: Analysis, state: StateAnalysis) -> ChunkPlan | str:
    """The plan for ``state`` in the chunked form, or why it must be materialised per step."""
    recurrence = state.recurrence
    name = state.state
    if state.type.rank != 2:
        return "not a matrix state"
    if state.type.kind is not Kind.REAL:
        return "complex state"
    readouts = [r for r in analysis.readouts if r.state == name]
    if not readouts:
        return "no linear read-out"
    queries = [_readout_query(r.expr, name) for r in readouts]
    if any(q is None for q in queries) or len({q[1] for q in queries}) != 1:  # type: ignore[index]
        return "its read-outs are not all of the form q @ S (or all S @ q)"
    transposed = queries[0][1]  # type: ignore[index]
    readout_ids = {id(r.expr) for r in readouts}
    if any(_mentions(e, name, readout_ids) for e in analysis.expanded_outputs):
        return "an output reads it other than through its linear read-outs"
    if any(other.state != name and name in other.reads for other in analysis.states):
        return "another state's update reads it"
    terms = _rank_one_terms(recurrence.input if isinstance(recurrence, (DiagonalAffine, MatrixAffine)) else None)
    if terms is None:
        return "its input term is not a sum of outer products"
    if transposed:
        terms = [RankOneTerm(t.column, t.row, t.coefficient) for t in terms]
    base = dict(state=name, transposed=transposed, readouts=tuple(r.expr for r in readouts), queries=tuple(q[0] for q in queries), inputs=tuple(terms))  # type: ignore[index]
    if isinstance(recurrence, DiagonalAffine) and recurrence.structure == "elementwise":
        # S6: a decay per element makes every chunk's decay tensor as large as the states
        # of its steps, so chunking saves nothing over the scan.
        return "its decay differs for every element of the state (chunks would be as large as the per-step states)"
    if isinstance(recurrence, (DiagonalAffine, MatrixAffine)) and not getattr(recurrence, "low_rank", ()) and recurrence.structure in ("scalar", "diagonal over rows", "diagonal over columns"):
        log_decay = log_of_positive(recurrence.decay, analysis.cell)
        if log_decay is None:
            return "its decay is not provably positive (chunked forms accumulate decays in log space)"
        return ChunkPlan(kind="decayed outer products", log_decay=log_decay, **base)
    if isinstance(recurrence, MatrixAffine) and recurrence.structure == "identity plus low rank" and len(recurrence.low_rank) == 1 and not transposed:
        term = recurrence.low_rank[0]
        if any(t.row != term.left for t in terms):
            return "its input term does not share the rank-one update's left vector"
        return ChunkPlan(kind="delta rule", **base)
    return f"no chunked form for a {recurrence.name} recurrence with a {getattr(recurrence, 'structure', '')} transition"


_PLANS: dict[tuple[int, str], tuple[Analysis, ChunkPlan | str]] = {}


def _cached_chunk_plan(analysis: Analysis, state: StateAnalysis) -> ChunkPlan | str:
    """:func:`chunk_plan`, computed once per analysis (its IR nodes then live as long as the analysis)."""
    key = (id(analysis), state.state)
    cached = _PLANS.get(key)
    if cached is None or cached[0] is not analysis:
        cached = (analysis, chunk_plan(analysis, state))
        _PLANS[key] = cached
    return cached[1]


# ---- evaluation over whole sequences -----------------------------------------------------


class _LazyValues(dict):
    """Values by ``(RefKind, label)``; a time-parallel binding (an expression) or a state's
    previous values (a function of nothing) is computed when first read."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[tuple[RefKind, str], ir.Expr | Callable[[], torch.Tensor]] = {}
        self.evaluator: Evaluator | None = None

    def __missing__(self, key):
        expr = self.pending.pop(key, None)
        if callable(expr):
            value = expr()
            self[key] = value
            return value
        if expr is None or self.evaluator is None:
            raise KeyError(key)
        value = self.evaluator.evaluate(expr)
        self[key] = value
        return value


class _Sequences:
    """Values over the whole sequence, ``[B, T, *heads, *shape]``, and helpers to shape them."""

    def __init__(self, numerics: Numerics, lead: tuple[int, ...]) -> None:
        self.numerics = numerics
        self.lead = lead  # (B, T, *heads)
        self.values = _LazyValues()
        # One memo for the whole run: refs only ever gain values (a state's sequence once it
        # is solved), so no memoised value goes stale.  Basis evaluations use their own.
        self.evaluator = Evaluator(numerics, self.values, shared=True)
        self.values.evaluator = self.evaluator

    def evaluate(self, expr: ir.Expr, known: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        return self.evaluator.evaluate(expr, known)

    def full(self, value: torch.Tensor, declared: ir.Type, target: ir.Type) -> torch.Tensor:
        """``value`` as ``[B, T, *heads, *s]`` where ``s`` broadcasts against ``target``'s shape."""
        rank = target.rank
        if value.dim() == declared.rank:  # no leading dims: params and consts only
            value = value.reshape((1,) * (rank - declared.rank) + tuple(value.shape))
            return value.expand(self.lead + tuple(value.shape))
        value = align(value, declared.rank, rank)
        return value.expand(self.lead + tuple(value.shape[len(self.lead):]))

    def time_first(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(0, 1)

    def batch_first(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(0, 1)


def _shift(sequence: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """The previous values: ``[S_0, S_1, ..., S_{T-1}]`` from ``[S_1, ..., S_T]``."""
    return torch.cat([initial.unsqueeze(1), sequence[:, :-1]], 1)


def _left_matrix(state: StateAnalysis) -> bool:
    """Whether a (diagonal plus) low-rank transition is a left multiplication ``M @ S`` we can build."""
    recurrence = state.recurrence
    if not isinstance(recurrence, MatrixAffine) or not recurrence.low_rank:
        return False
    if recurrence.decay is None:
        return True
    decay_rank = recurrence.decay.type.rank
    if decay_rank == 0:
        return True
    shape = recurrence.decay.type.shape
    return state.type.rank == 2 and len(shape) == 2 and shape[1] == 1


class _Solver:
    """Solves each recurrence of one call over the whole sequence."""

    def __init__(self, analysis: Analysis, sequences: _Sequences, initial: Mapping[str, torch.Tensor]) -> None:
        self.analysis = analysis
        self.seq = sequences
        self.initial = initial

    def _input(self, recurrence, state_type: ir.Type) -> torch.Tensor | None:
        if recurrence.input is None:
            return None
        return self.seq.full(self.seq.evaluate(recurrence.input), recurrence.input.type, state_type)

    def diagonal(self, state: StateAnalysis) -> torch.Tensor:
        recurrence = state.recurrence
        h0 = self.initial[state.state]
        decay = self.seq.full(self.seq.evaluate(recurrence.decay), recurrence.decay.type, state.type)
        value = self._input(recurrence, state.type)
        full_shape = self.seq.lead + state.type.shape
        value = torch.zeros(full_shape, dtype=h0.dtype, device=h0.device) if value is None else value.expand(full_shape)
        if value.dtype != h0.dtype:
            value = value.to(h0.dtype)
        value = torch.cat([(decay[:, :1] * h0.unsqueeze(1) + value[:, :1]), value[:, 1:]], 1)
        return self.seq.batch_first(linear_scan(self.seq.time_first(decay), self.seq.time_first(value)))

    def low_rank(self, state: StateAnalysis) -> torch.Tensor:
        recurrence = state.recurrence
        assert isinstance(recurrence, MatrixAffine)
        rows = state.type.shape[0]
        matrix_type = ir.Type((rows, rows))
        if recurrence.decay is None:
            matrix = torch.zeros(self.seq.lead + (rows, rows), dtype=self.seq.numerics.real, device=self.seq.numerics.device)
        elif recurrence.decay.type.rank == 2:  # a decay per row: diag(decay[:, 0])
            decay = self.seq.evaluate(recurrence.decay)[..., 0]
            matrix = torch.diag_embed(self.seq.full(decay, ir.Type((rows,)), ir.Type((rows,))))
        else:
            identity = torch.eye(rows, dtype=self.seq.numerics.real, device=self.seq.numerics.device)
            matrix = self.seq.full(self.seq.evaluate(recurrence.decay), recurrence.decay.type, matrix_type) * identity
        for term in recurrence.low_rank:
            coefficient = self.seq.full(self.seq.evaluate(term.coefficient), term.coefficient.type, ir.Type((1, 1)))
            left = self.seq.full(self.seq.evaluate(term.left), term.left.type, ir.Type((rows,)))
            right = self.seq.full(self.seq.evaluate(term.right), term.right.type, ir.Type((rows,)))
            matrix = matrix + coefficient * left.unsqueeze(-1) * right.unsqueeze(-2)
        return self._matrix_scan(state, matrix)

    def dense(self, state: StateAnalysis) -> torch.Tensor:
        size = _matrix_size(state)
        basis = torch.eye(size, dtype=self.seq.numerics.dtype_of(state.type.kind), device=self.seq.numerics.device)
        columns = self._apply_to_basis(state, state.recurrence.transition, basis)  # [size(j), B, T, *heads, size(i)]
        return self._matrix_scan(state, columns.movedim(0, -1), flat=True)

    def _apply_to_basis(self, state: StateAnalysis, transition: ir.Expr, basis: torch.Tensor) -> torch.Tensor:
        """``transition`` applied to each basis element: ``[size, B, T, *heads, size]``."""
        size = basis.shape[0]
        lead_ones = (1,) * len(self.seq.lead)
        previous = basis.reshape((size,) + lead_ones + state.type.shape)
        # A private memo: the state's previous value is the basis here, not its sequence.
        values = _LazyValues()
        values.update(self.seq.values)
        values.pending = dict(self.seq.values.pending)
        values[(RefKind.STATE_PREV, state.state)] = previous
        evaluator = Evaluator(self.seq.numerics, values)
        values.evaluator = evaluator
        result = evaluator.evaluate(transition)
        result = align(result, transition.type.rank, state.type.rank) if result.dim() > transition.type.rank else result
        result = result.expand((size,) + self.seq.lead + state.type.shape)
        return result.reshape((size,) + self.seq.lead + (size,))

    def _matrix_scan(self, state: StateAnalysis, matrix: torch.Tensor, flat: bool = False) -> torch.Tensor:
        h0 = self.initial[state.state]
        recurrence = state.recurrence
        value = self._input(recurrence, state.type)
        full_shape = self.seq.lead + state.type.shape
        value = torch.zeros(full_shape, dtype=h0.dtype, device=h0.device) if value is None else value.expand(full_shape).to(h0.dtype)
        if flat:  # a map on the flattened state, applied to column vectors
            value = value.reshape(self.seq.lead + (-1, 1))
            start = h0.reshape(h0.shape[: len(self.seq.lead) - 1] + (-1, 1))
        else:
            start = h0
        matrix = matrix.to(value.dtype)
        first = matrix[:, 0] @ start + value[:, 0]
        value = torch.cat([first.unsqueeze(1), value[:, 1:]], 1)
        result = self.seq.batch_first(matrix_affine_scan(self.seq.time_first(matrix), self.seq.time_first(value)))
        return result.reshape(full_shape)

    def semiring(self, state: StateAnalysis) -> torch.Tensor:
        recurrence = state.recurrence
        assert isinstance(recurrence, SemiringAffine)
        semiring = recurrence.semiring
        plus, reduce = ELEMENTWISE[semiring.plus], REDUCTIONS[semiring.reduce]
        h0 = self.initial[state.state]
        value = self._input(recurrence, state.type)
        full_shape = self.seq.lead + state.type.shape
        if recurrence.structure == "diagonal":
            decay = self.seq.full(self.seq.evaluate(recurrence.decay), recurrence.decay.type, state.type)
            if value is None:
                return h0.unsqueeze(1) + decay.expand(full_shape).cumsum(1)
            value = value.expand(full_shape)
            value = torch.cat([plus(decay[:, :1] + h0.unsqueeze(1), value[:, :1]), value[:, 1:]], 1)
            return self.seq.batch_first(semiring_diagonal_scan(self.seq.time_first(decay), self.seq.time_first(value), plus))
        size = _matrix_size(state)
        basis = torch.full((size, size), semiring.zero, dtype=self.seq.numerics.real, device=self.seq.numerics.device)
        basis.fill_diagonal_(semiring.one)
        rows = self._apply_to_basis(state, recurrence.transition, basis)  # rows[j, ..., i] = T[j, i]
        matrix = rows.movedim(0, -2)  # [B, T, *heads, size(j), size(i)]
        start = h0.reshape(h0.shape[: len(self.seq.lead) - 1] + (1, size))
        reduce_fn = lambda x, dim: reduce(x, (dim,))  # noqa: E731
        if value is None:
            products = self.seq.batch_first(semiring_product_scan(self.seq.time_first(matrix), reduce_fn))
            return semiring_matmul(start.unsqueeze(1), products, reduce_fn).reshape(full_shape)
        value = value.expand(full_shape).reshape(self.seq.lead + (size,))
        first = plus(semiring_matmul(start, matrix[:, 0], reduce_fn).squeeze(-2), value[:, 0])
        value = torch.cat([first.unsqueeze(1), value[:, 1:]], 1)
        result = semiring_matrix_scan(self.seq.time_first(matrix), self.seq.time_first(value), plus, reduce_fn)
        return self.seq.batch_first(result).reshape(full_shape)

    def solve(self, state: StateAnalysis) -> torch.Tensor:
        recurrence = state.recurrence
        if isinstance(recurrence, NoRecurrence):
            return self.seq.full(self.seq.evaluate(recurrence.value), recurrence.value.type, state.type).expand(self.seq.lead + state.type.shape)
        if isinstance(recurrence, DiagonalAffine) or (isinstance(recurrence, MatrixAffine) and not recurrence.low_rank and recurrence.decay is not None):
            return self.diagonal(state)
        if isinstance(recurrence, MatrixAffine) and _left_matrix(state):
            return self.low_rank(state)
        if isinstance(recurrence, MatrixAffine):
            return self.dense(state)
        if isinstance(recurrence, SemiringAffine):
            return self.semiring(state)
        raise AssertionError(f"no parallel form for {recurrence}")  # unsupported() rules this out

    def scan(self, scan: ir.ScanAssign) -> dict[str, torch.Tensor]:
        monoid = scan.monoid
        numerics = self.seq.numerics
        elements = []
        for carry, lift in zip(monoid.carries, scan.lifts):
            value = self.seq.full(self.seq.evaluate(lift), lift.type, carry.type).expand(self.seq.lead + carry.type.shape)
            elements.append(self.seq.time_first(value.to(numerics.dtype_of(carry.type.kind))))
        names = [c.name for c in monoid.carries]

        def combine(earlier, later):
            result = combine_carries(monoid, dict(zip(names, earlier)), dict(zip(names, later)), numerics)
            return tuple(result[n] for n in names)

        scanned = prefix_scan(tuple(elements), combine)
        initial = tuple(self.initial[f"{scan.name}.{n}"].unsqueeze(0) for n in names)
        folded = combine(initial, scanned)
        return {n: self.seq.batch_first(v) for n, v in zip(names, folded)}


def _run_chunk_plan(seq: _Sequences, plan: ChunkPlan, state: StateAnalysis, h0: torch.Tensor, chunk: int, decayed=None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Evaluate a chunk plan's pieces, flatten batch and heads into one dim, and run its kernel."""
    lead = seq.lead
    batch_dims = (lead[0],) + lead[2:]

    def flat_vector(expr: ir.Expr, length: int) -> torch.Tensor:
        value = seq.full(seq.evaluate(expr), expr.type, ir.Type((length,))).expand(lead + (length,))
        return value.movedim(1, -2).reshape((-1, lead[1], length))

    def flat_scalar(expr: ir.Expr) -> torch.Tensor:
        value = seq.full(seq.evaluate(expr), expr.type, ir.Type(())).expand(lead)
        return value.movedim(1, -1).reshape((-1, lead[1]))

    rows, columns = state.type.shape[::-1] if plan.transposed else state.type.shape
    start = (h0.transpose(-1, -2) if plan.transposed else h0).reshape((-1, rows, columns))
    queries = [flat_vector(q, rows) for q in plan.queries]
    scaled_columns = []
    for term in plan.inputs:
        column = flat_vector(term.column, columns)
        if term.coefficient is not None:
            column = column * flat_scalar(term.coefficient).unsqueeze(-1)
        scaled_columns.append((flat_vector(term.row, rows), column))
    if plan.kind == "decayed outer products":
        assert plan.log_decay is not None
        decay_type = plan.log_decay.type
        log_decay = seq.full(seq.evaluate(plan.log_decay), decay_type, state.type)
        if plan.transposed:
            log_decay = log_decay.transpose(-1, -2)
        shape = tuple(log_decay.shape[-2:])
        log_decay = log_decay.expand(lead + shape).movedim(1, -3).reshape((-1, lead[1]) + shape)
        results, final = (decayed or chunk_kernels.decayed_outer_products)(
            queries, [chunk_kernels.RankOneInput(k, v) for k, v in scaled_columns], log_decay, start, chunk
        )
    else:
        recurrence = state.recurrence
        assert isinstance(recurrence, MatrixAffine)
        term = recurrence.low_rank[0]
        left, right = flat_vector(term.left, rows), flat_vector(term.right, rows)
        coefficient = flat_scalar(term.coefficient)
        results, final = chunk_kernels.delta_rule(queries, left, right, coefficient, [v for _, v in scaled_columns], start, chunk)
    unflatten = lambda x: x.reshape(batch_dims + x.shape[1:]).movedim(-2, 1)  # noqa: E731
    outputs = [unflatten(r) for r in results]
    final = final.reshape(batch_dims + final.shape[1:])
    if plan.transposed:
        final = final.transpose(-1, -2)
    return outputs, final


def run(
    analysis: Analysis,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    *,
    chunked: bool | frozenset[str] = False,
    chunk_size: int = DEFAULT_CHUNK,
    solver: type | None = None,
    decayed_outer_products=None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the cell over the whole sequence at once; the signature of :func:`.sequential.run`.

    ``chunked`` is True (every state that has a chunk plan) or the set of states to chunk;
    ``solver`` replaces :class:`_Solver` and ``decayed_outer_products`` the torch chunk
    kernel of that name (the Triton backend brings kernels for both).
    """
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])
    seq = _Sequences(numerics, lead)
    seq.values.update({(RefKind.PARAM, n): v for n, v in params.items()})
    seq.values.update({(RefKind.CONST, n): v for n, v in consts.items()})
    seq.values.update({(RefKind.INPUT, n): v for n, v in inputs.items()})
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            seq.values.pending[(RefKind.BINDING, statement.name)] = statement.value

    solver = (solver or _Solver)(analysis, seq, state)
    scans = {s.name: s for s in cell.scans}
    final: dict[str, torch.Tensor] = {}
    substitutions: dict[int, torch.Tensor] = {}
    for group in analysis.schedule:
        (name,) = group
        if name in scans:
            carries = solver.scan(scans[name])
            for carry, value in carries.items():
                seq.values[(RefKind.SCAN, f"{name}.{carry}")] = value
                final[f"{name}.{carry}"] = value[:, -1]
            continue
        state_analysis = analysis.state(name)
        wanted = chunked if isinstance(chunked, bool) else name in chunked
        plan = _cached_chunk_plan(analysis, state_analysis) if wanted else None
        if isinstance(plan, ChunkPlan):
            readouts, final[name] = _run_chunk_plan(seq, plan, state_analysis, state[name], chunk_size, decayed_outer_products)
            for node, value in zip(plan.readouts, readouts):
                substitutions[id(node)] = value
            continue
        sequence = solver.solve(state_analysis)
        sequence = sequence.expand(lead + state_analysis.type.shape)
        seq.values[(RefKind.STATE_NEW, name)] = sequence
        # h_{t-1}, built only if an output or a later state reads it (most read h_t).
        seq.values.pending[(RefKind.STATE_PREV, name)] = functools.partial(_shift, sequence, state[name])
        final[name] = sequence[:, -1]

    outputs = []
    for emit, expanded in zip(cell.outputs, analysis.expanded_outputs):
        value = seq.evaluate(expanded, substitutions)
        outputs.append(seq.full(value, emit.value.type, emit.value.type).expand(lead + emit.value.type.shape))
    return outputs, final
