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
matrix affine, block diagonal; a        ``block_affine_scan`` of each block's ``m x m`` matrix,
coupled group with an affine joint      found by applying the transition to ``m`` probe
update                                  states (one per position inside a block)
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
import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from recdsl import ir
from recdsl.errors import BackendError
from recdsl.analysis import Analysis, BlockAxes, JointAffine, MatrixAffine, NoRecurrence, SemiringAffine, Side, StateAnalysis, Structure
from recdsl.ir import RefKind
from recdsl.plan import (  # noqa: F401 (ChunkPlan, RankOneTerm and chunk_plan are re-exported for compatibility)
    MAX_MATRIX_STATE,
    ChunkKind,
    ChunkPlan,
    ExecutionPlan,
    Form,
    RankOneTerm,
    SkipTerm,
    StepPlan,
    Unsupported,
    chunk_plan,
    parallel_steps,
    scalar_times_vector,
)

from . import chunk_kernels, convolution
from .scans import (
    block_affine_scan,
    linear_scan,
    matrix_affine_scan,
    prefix_scan,
    semiring_diagonal_scan,
    semiring_matmul,
    semiring_matrix_scan,
    semiring_product_scan,
    segmented,
)
from .segments import ChunkLayout, ChunkRows, Segments
from .torch_ops import ELEMENTWISE, REDUCTIONS, Evaluator, Numerics, align, combine_carries

DEFAULT_CHUNK = 64


def unsupported(analysis: Analysis) -> str | None:
    """Why the time-parallel backends cannot run this cell, or None when they can."""
    steps = parallel_steps(analysis, chunked=False)
    return steps.reason if isinstance(steps, Unsupported) else None


def _product(sizes: list[int]) -> int:
    """The product of static sizes, in a loop torch.compile traces (it cannot trace math.prod of a generator)."""
    total = 1
    for size in sizes:
        total *= size
    return total


def _matrix_size(state: StateAnalysis) -> int:
    size = 1
    for n in state.type.shape:
        size *= n
    return size


# ---- evaluation over whole sequences -----------------------------------------------------


class _LazyValues(dict):
    """Values by ``(RefKind, label)``; a time-parallel binding (an expression) or a state's
    previous values (a function of nothing) is computed when first read."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[tuple[RefKind, str], ir.Expr | Callable[[], torch.Tensor]] = {}
        self._evaluator: weakref.ReferenceType[Evaluator] | None = None

    # The evaluator holds these values, so they hold it weakly: a cycle would keep every
    # memoised tensor of a run (whole state sequences) alive until the garbage collector
    # happened to run, long after the call returned.
    @property
    def evaluator(self) -> Evaluator | None:
        return self._evaluator() if self._evaluator is not None else None

    @evaluator.setter
    def evaluator(self, evaluator: Evaluator | None) -> None:
        self._evaluator = weakref.ref(evaluator) if evaluator is not None else None

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
        self.native: dict[tuple[RefKind, str], torch.Tensor] = {}  # low-precision inputs and params, see keep_native

    def evaluate(self, expr: ir.Expr, known: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        return self.evaluator.evaluate(expr, known)

    def keep_native(self) -> None:
        """Hold the bfloat16/float16 inputs and params (a plan's :attr:`LowPrecisionInputs.NATIVE`)
        in their own dtype for the kernels (:meth:`operand`); torch code reads a float32 copy,
        made when first read, as it would have read the cast inputs."""
        low = (torch.bfloat16, torch.float16)
        for key in [k for k, v in self.values.items() if k[0] in (RefKind.INPUT, RefKind.PARAM) and v.dtype in low and v.dtype != self.numerics.real]:
            value = self.values.pop(key)
            self.native[key] = value
            self.values.pending[key] = functools.partial(value.to, self.numerics.real)

    def operand(self, expr: ir.Expr) -> torch.Tensor:
        """``expr``'s value for a kernel that converts its operands as it loads them: an input or
        param kept in its own dtype (:meth:`keep_native`) as it is, anything else evaluated."""
        if isinstance(expr, ir.Ref) and (expr.kind, expr.label) in self.native:
            return self.native[(expr.kind, expr.label)]
        return self.evaluate(expr)

    def full(self, value: torch.Tensor, declared: ir.Type, target: ir.Type) -> torch.Tensor:
        """``value`` as ``[B, T, *heads, *s]`` where ``s`` broadcasts against ``target``'s shape."""
        rank = target.rank
        if value.dim() == declared.rank:  # no leading dims: params and consts only
            value = value.reshape((1,) * (rank - declared.rank) + tuple(value.shape))
            return value.expand(self.lead + tuple(value.shape))
        value = align(value, declared.rank, rank)
        lead = self.lead
        if value.shape[: len(lead)] == lead:  # already full along the leading dims: no view op (an autograd node)
            return value
        return value.expand(lead + tuple(value.shape[len(lead):]))

    def time_first(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(0, 1)

    def batch_first(self, value: torch.Tensor) -> torch.Tensor:
        return value.transpose(0, 1)


class _ProbeValues(dict):
    """The values of an evaluation at probe states: the probes' own entries; everything else
    (time-parallel bindings, other states) read from the run's values, computed there once."""

    def __init__(self, base: _LazyValues) -> None:
        super().__init__()
        self.base = base

    def __missing__(self, key):
        return self.base[key]


def _shift(sequence: torch.Tensor, initial: torch.Tensor, direction: ir.Direction = ir.Direction.FORWARD) -> torch.Tensor:
    """The previous values: ``[S_0, S_1, ..., S_{T-1}]`` from ``[S_1, ..., S_T]`` (for a
    reverse recurrence ``[S_2, ..., S_T, S_{T+1}]``, the value of the step after)."""
    if direction is ir.Direction.REVERSE:
        return torch.cat([sequence[:, 1:], initial.unsqueeze(1)], 1)
    return torch.cat([initial.unsqueeze(1), sequence[:, :-1]], 1)


def _declared_ranks(cell: ir.CellIR) -> dict[tuple[RefKind, str], int]:
    """The per-step rank of every value that may carry time (inputs, bindings, states, scan carries)."""
    ranks: dict[tuple[RefKind, str], int] = {(RefKind.INPUT, i.name): i.type.rank for i in cell.inputs}
    for statement in cell.body:
        if isinstance(statement, (ir.Assign, ir.Emit)) and statement.name is not None:
            ranks[(RefKind.BINDING, statement.name)] = statement.value.type.rank
        elif isinstance(statement, ir.ScanAssign):
            ranks.update({(RefKind.SCAN, f"{statement.name}.{c.name}"): c.type.rank for c in statement.monoid.carries})
    for state in cell.states:
        ranks[(RefKind.STATE_NEW, state.name)] = ranks[(RefKind.STATE_PREV, state.name)] = state.type.rank
    return ranks


def _time_reversed(seq: _Sequences, cell: ir.CellIR) -> _Sequences:
    """A view of ``seq`` with time running backwards, where a reverse recurrence is a forward one.

    Every value (computed or pending) is flipped on first read; params, consts and values
    that read only them have no time dim and are left alone.  Solving a reverse state in
    this view and flipping its sequence back gives its values in the cell's time.
    """
    ranks = _declared_ranks(cell)
    flipped = _Sequences(seq.numerics, seq.lead)

    def read(key: tuple[RefKind, str]) -> torch.Tensor:
        value = seq.values[key]
        rank = ranks.get(key)
        return value.flip(1) if rank is not None and value.dim() > rank else value

    flipped.read_source = read  # type: ignore[attr-defined]
    _follow(flipped, seq)
    return flipped


def _follow(flipped: _Sequences, seq: _Sequences) -> None:
    """Give ``flipped`` (a :func:`_time_reversed` view) the values ``seq`` gained since (states solved meanwhile)."""
    known = flipped.values.keys() | flipped.values.pending.keys()
    for key in list(seq.values) + list(seq.values.pending):
        if key not in known:
            flipped.values.pending[key] = functools.partial(flipped.read_source, key)  # type: ignore[attr-defined]


class Solver:
    """Solves each recurrence of one call over the whole sequence, in the form its plan step names."""

    def __init__(self, plan: ExecutionPlan, sequences: _Sequences, initial: Mapping[str, torch.Tensor], segments: Segments | None = None) -> None:
        self.plan = plan
        self.analysis = plan.analysis
        self.seq = sequences
        self.initial = initial
        self.segments = segments  # a packed variable-length batch: initial values are [N, *heads, *shape]

    def _carry_in(self, transition: torch.Tensor, value: torch.Tensor, h0: torch.Tensor, enter: Callable, reset: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The scan's elements with the initial state carried into the first step: ``v_0 = enter(T_0, h0, v_0)``.

        The scans start from the zero state, so the initial state enters through the first
        step's input term; in a packed batch, through each sequence's first step, whose
        transition is then ``reset`` (see :meth:`.segments.Segments.carry_in`).
        """
        if self.segments is not None:
            return self.segments.carry_in(transition, value, h0, enter, reset)
        first = enter(transition[:, :1], h0.unsqueeze(1), value[:, :1])
        return transition, torch.cat([first, value[:, 1:]], 1)

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
        decay, value = self._carry_in(decay, value, h0, lambda a, h, v: a * h + v, 0.0)
        return self.seq.batch_first(linear_scan(self.seq.time_first(decay), self.seq.time_first(value)))

    def low_rank(self, state: StateAnalysis) -> torch.Tensor:
        """A (scaled identity or diagonal plus) low-rank transition as one small matrix ``M_t``.

        From the left, ``S_t = M_t S_{t-1} + B_t``; from the right, ``S_t = S_{t-1} M_t + B_t``,
        scanned as the transposed recurrence ``S_t^T = M_t^T S_{t-1}^T + B_t^T``.
        """
        recurrence = state.recurrence
        assert isinstance(recurrence, MatrixAffine)
        right = recurrence.side is Side.RIGHT
        rows = state.type.shape[1 if right else 0]
        matrix_type = ir.Type((rows, rows))
        if recurrence.decay is None:
            matrix = torch.zeros(self.seq.lead + (rows, rows), dtype=self.seq.numerics.real, device=self.seq.numerics.device)
        elif recurrence.decay_axes:  # a decay per row (left) or per column (right): diag(decay)
            decay = self.seq.evaluate(recurrence.decay)
            if recurrence.decay.type.rank == 2:  # [m, 1] from the left, [1, n] from the right
                decay = decay[..., 0, :] if right else decay[..., 0]
            matrix = torch.diag_embed(self.seq.full(decay, ir.Type((rows,)), ir.Type((rows,))))
        else:
            identity = torch.eye(rows, dtype=self.seq.numerics.real, device=self.seq.numerics.device)
            matrix = self.seq.full(self.seq.evaluate(recurrence.decay), recurrence.decay.type, matrix_type) * identity
        for term in recurrence.low_rank:
            coefficient = self.seq.full(self.seq.evaluate(term.coefficient), term.coefficient.type, ir.Type((1, 1)))
            left = self.seq.full(self.seq.evaluate(term.left), term.left.type, ir.Type((rows,)))
            right_vector = self.seq.full(self.seq.evaluate(term.right), term.right.type, ir.Type((rows,)))
            if right:  # S (u v^T) = ((v u^T) S^T)^T
                left, right_vector = right_vector, left
            matrix = matrix + coefficient * left.unsqueeze(-1) * right_vector.unsqueeze(-2)
        return self._matrix_scan(state, matrix, transposed=right)

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

    def _matrix_scan(self, state: StateAnalysis, matrix: torch.Tensor, flat: bool = False, transposed: bool = False) -> torch.Tensor:
        h0 = self.initial[state.state]
        recurrence = state.recurrence
        value = self._input(recurrence, state.type)
        full_shape = self.seq.lead + state.type.shape
        value = torch.zeros(full_shape, dtype=h0.dtype, device=h0.device) if value is None else value.expand(full_shape).to(h0.dtype)
        if transposed:
            result = self._matrix_scan_of(matrix, value.transpose(-1, -2), h0.transpose(-1, -2))
            return result.transpose(-1, -2)
        if flat:  # a map on the flattened state, applied to column vectors
            value = value.reshape(self.seq.lead + (-1, 1))
            start = h0.reshape(h0.shape[: len(self.seq.lead) - 1] + (-1, 1))
        else:
            start = h0
        return self._matrix_scan_of(matrix, value, start).reshape(full_shape)

    def _matrix_scan_of(self, matrix: torch.Tensor, value: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        """``S_t = M_t S_{t-1} + B_t`` from ``S_0 = start``, batch first."""
        matrix = matrix.to(value.dtype)
        matrix, value = self._carry_in(matrix, value, start, lambda m, s, v: m @ s + v, 0.0)
        return self.seq.batch_first(matrix_affine_scan(self.seq.time_first(matrix), self.seq.time_first(value)))

    def blocks(self, names: tuple[str, ...], transitions: tuple[ir.Expr, ...], inputs: tuple[ir.Expr | None, ...], blocks: BlockAxes | None) -> dict[str, torch.Tensor]:
        """States whose (joint) transition is block diagonal along ``blocks.axes``, scanned block by block.

        Each block holds, for every state of ``names``, its elements at one index of the
        block axes: ``m`` elements in all.  Applying the transitions to probe ``j`` (a one at
        position ``j`` of every block, zeros elsewhere) gives column ``j`` of every block's
        matrix at once, since blocks do not mix; ``m`` probes, evaluated together, give the
        ``[B, T, *heads, blocks, m, m]`` matrices.  When no value the transition multiplies
        by varies along the block axes (``blocks.shared``) the probes have those axes of
        size 1 and one matrix serves every block.  No block axes: one block, the dense map.
        """
        seq = self.seq
        lead = seq.lead
        types = [self.analysis.state(name).type for name in names]
        rank = types[0].rank
        axes = blocks.axes if blocks is not None else ()
        shared = blocks is not None and blocks.shared
        inner = tuple(a for a in range(rank) if a not in axes)
        order = axes + inner  # block axes first, then the axes inside a block
        inverse = tuple(order.index(a) for a in range(rank))
        block_shape = tuple(types[0].shape[a] for a in axes)
        sizes = [_product([t.shape[a] for a in inner]) for t in types]
        m = sum(sizes)
        dtype = seq.numerics.dtype_of(types[0].kind)
        device = seq.numerics.device

        def to_blocks(value: torch.Tensor, kept: int, declared: ir.Type) -> torch.Tensor:
            """``[*kept dims, *declared shape]`` -> ``[*kept dims, *block dims, size inside]``."""
            moved = value.permute(tuple(range(kept)) + tuple(kept + a for a in order))
            return moved.reshape(moved.shape[: kept + len(axes)] + (-1,))

        # The probes: [m, *lead ones, *shape] per state, block axes of size 1 when shared.
        probe_shape = tuple(1 if shared else n for n in block_shape)
        identity = torch.eye(m, dtype=dtype, device=device)
        values = _ProbeValues(seq.values)
        offset = 0
        for name, state_type, size in zip(names, types, sizes):
            inner_shape = tuple(state_type.shape[a] for a in inner)
            piece = identity[:, offset : offset + size].reshape((m,) + (1,) * len(axes) + inner_shape)
            piece = piece.expand((m,) + probe_shape + inner_shape).permute((0,) + tuple(1 + a for a in inverse))
            values[(RefKind.STATE_PREV, name)] = piece.reshape((m,) + (1,) * len(lead) + tuple(piece.shape[1:]))
            offset += size
        evaluator = Evaluator(seq.numerics, values)
        columns = []
        for transition, state_type in zip(transitions, types):
            result = evaluator.evaluate(transition)
            if result.dim() > transition.type.rank:
                result = align(result, transition.type.rank, rank)
            else:
                result = result.reshape((1,) * (1 + len(lead) + rank - result.dim()) + tuple(result.shape))
            target = tuple(1 if shared and a in axes else n for a, n in enumerate(state_type.shape))
            result = result.expand((m,) + lead + target).to(dtype)
            columns.append(to_blocks(result, 1 + len(lead), state_type))
        matrix = torch.cat(columns, -1).movedim(0, -1)  # [B, T, *heads, *blocks, m (row), m (column)]
        matrix = matrix.reshape(matrix.shape[: len(lead)] + (-1, m, m))

        pieces, starts = [], []
        for name, state_type, expr in zip(names, types, inputs):
            full = lead + state_type.shape
            if expr is None:
                value = torch.zeros(full, dtype=dtype, device=device)
            else:
                value = seq.full(seq.evaluate(expr), expr.type, state_type).expand(full).to(dtype)
            pieces.append(to_blocks(value, len(lead), state_type))
            h0 = self.initial[name]
            start = h0.expand((h0.shape[0],) + lead[2:] + state_type.shape).to(dtype)  # [B or, packed, N, *heads, *shape]
            starts.append(to_blocks(start, len(lead) - 1, state_type))
        value = torch.cat(pieces, -1).reshape(lead + (-1, m))
        start = torch.cat(starts, -1).reshape((starts[0].shape[0],) + lead[2:] + (-1, m))
        matrix, value = self._carry_in(matrix, value, start, lambda m_t, h, v: (m_t @ h.unsqueeze(-1)).squeeze(-1) + v, 0.0)
        solved = seq.batch_first(block_affine_scan(seq.time_first(matrix), seq.time_first(value)))  # [B, T, *heads, blocks, m]
        solved = solved.reshape(lead + block_shape + (m,))
        results, offset = {}, 0
        for name, state_type, size in zip(names, types, sizes):
            inner_shape = tuple(state_type.shape[a] for a in inner)
            piece = solved[..., offset : offset + size].reshape(lead + block_shape + inner_shape)
            results[name] = piece.permute(tuple(range(len(lead))) + tuple(len(lead) + a for a in inverse))
            offset += size
        return results

    def joint(self, step: StepPlan) -> dict[str, torch.Tensor]:
        """A coupled group whose joint update is affine: one block scan of the states stacked."""
        group = self.analysis.group(step.names)
        assert group is not None and isinstance(group.recurrence, JointAffine)
        joint = group.recurrence
        return self.blocks(joint.states, joint.transitions, joint.inputs, joint.blocks)

    def semiring(self, state: StateAnalysis) -> torch.Tensor:
        recurrence = state.recurrence
        assert isinstance(recurrence, SemiringAffine)
        semiring = recurrence.semiring
        plus, reduce = ELEMENTWISE[semiring.plus], REDUCTIONS[semiring.reduce]
        h0 = self.initial[state.state]
        value = self._input(recurrence, state.type)
        full_shape = self.seq.lead + state.type.shape
        if recurrence.structure is Structure.DIAGONAL:
            decay = self.seq.full(self.seq.evaluate(recurrence.decay), recurrence.decay.type, state.type)
            if value is None and self.segments is None:
                return h0.unsqueeze(1) + decay.expand(full_shape).cumsum(1)
            if value is None:  # a sum of decays restarting at each sequence (a zero input's logaddexp has a NaN gradient)
                flags = self.segments.start_flags(full_shape[1])
                sums = prefix_scan((self.seq.time_first(decay.expand(full_shape)), flags), segmented(lambda e, l: (e[0] + l[0],)))[0]
                return self.seq.batch_first(sums) + self.segments.per_step(h0)
            value = value.expand(full_shape)
            decay, value = self._carry_in(decay, value, h0, lambda a, h, v: plus(a + h, v), semiring.zero)
            return self.seq.batch_first(semiring_diagonal_scan(self.seq.time_first(decay), self.seq.time_first(value), plus))
        size = _matrix_size(state)
        # The semiring's zero annihilates (zero (x) w = zero for every weight w), but in IEEE
        # arithmetic -inf + inf is NaN: a +inf weight (a +inf input) would make every row of its
        # column NaN, where the loop, whose state is finite, gives +inf.  The basis therefore
        # uses the most negative finite number for the zero, and entries that stay near it
        # are the zero.  (A column holding +inf then reads +inf in every row: the loop's state
        # in that column is +inf, or NaN, whichever row it comes from.)
        dtype = self.seq.numerics.real
        standin = torch.finfo(dtype).min if semiring.zero == float("-inf") else semiring.zero
        basis = torch.full((size, size), standin, dtype=dtype, device=self.seq.numerics.device)
        basis.fill_diagonal_(semiring.one)
        rows = self._apply_to_basis(state, recurrence.transition, basis)  # rows[j, ..., i] = T[j, i]
        if standin != semiring.zero:
            rows = rows.masked_fill(rows < standin / 2, semiring.zero)
        matrix = rows.movedim(0, -2)  # [B, T, *heads, size(j), size(i)]
        start = h0.reshape(h0.shape[: len(self.seq.lead) - 1] + (1, size))
        reduce_fn = lambda x, dim: reduce(x, (dim,))  # noqa: E731
        if value is None:
            if self.segments is None:
                products = self.seq.batch_first(semiring_product_scan(self.seq.time_first(matrix), reduce_fn))
                return semiring_matmul(start.unsqueeze(1), products, reduce_fn).reshape(full_shape)
            flags = self.segments.start_flags(full_shape[1])  # products restarting at each sequence, from its initial state
            products = self.seq.batch_first(semiring_product_scan(self.seq.time_first(matrix), reduce_fn, flags))
            return semiring_matmul(self.segments.per_step(start), products, reduce_fn).reshape(full_shape)
        value = value.expand(full_shape).reshape(self.seq.lead + (size,))
        enter = lambda m, s, v: plus(semiring_matmul(s, m, reduce_fn).squeeze(-2), v)  # noqa: E731
        if self.segments is None:
            matrix, value = self._carry_in(matrix, value, start, enter, semiring.zero)
            result = semiring_matrix_scan(self.seq.time_first(matrix), self.seq.time_first(value), plus, reduce_fn)
        else:  # each sequence's first value takes in its initial state; the scan restarts there
            first = enter(self.segments.at_starts(matrix), start.unsqueeze(0), self.segments.at_starts(value))
            value = value.index_copy(1, self.segments.starts, first.expand((1, self.segments.count) + tuple(value.shape[2:])).to(value.dtype))
            flags = self.segments.start_flags(value.shape[1])
            result = semiring_matrix_scan(self.seq.time_first(matrix), self.seq.time_first(value), plus, reduce_fn, flags)
        return self.seq.batch_first(result).reshape(full_shape)

    def solve(self, step: StepPlan, state: StateAnalysis) -> torch.Tensor:
        """The state's value at every step, ``[B, T, *heads, *shape]``, by the step's form."""
        match step.form:
            case Form.TIME_PARALLEL:
                assert isinstance(state.recurrence, NoRecurrence)
                value = state.recurrence.value
                return self.seq.full(self.seq.evaluate(value), value.type, state.type).expand(self.seq.lead + state.type.shape)
            case Form.LINEAR_SCAN:
                return self.diagonal(state)
            case Form.LOW_RANK_MATRIX_SCAN:
                return self.low_rank(state)
            case Form.DENSE_MATRIX_SCAN:
                return self.dense(state)
            case Form.BLOCK_MATRIX_SCAN:
                recurrence = state.recurrence
                return self.blocks((state.state,), (recurrence.transition,), (recurrence.input,), recurrence.blocks)[state.state]
            case Form.SEMIRING_DIAGONAL_SCAN | Form.SEMIRING_MATRIX_SCAN:
                return self.semiring(state)
            case Form.TRITON_SCAN:
                return self.kernel_recurrence(step, state)
        raise AssertionError(f"the {type(self).__name__} cannot run the form {step.form.name}")  # pragma: no cover - the planner rules this out

    def kernel_recurrence(self, step: StepPlan, state: StateAnalysis) -> torch.Tensor:
        raise AssertionError("generated kernels run in the Triton backend's solver")  # pragma: no cover

    def kernel_scan(self, step: StepPlan, scan: ir.ScanAssign) -> dict[str, torch.Tensor]:
        raise AssertionError("generated kernels run in the Triton backend's solver")  # pragma: no cover

    def scan(self, scan: ir.ScanAssign) -> dict[str, torch.Tensor]:
        monoid = scan.monoid
        numerics = self.seq.numerics
        elements = []
        for carry, lift in zip(monoid.carries, scan.lifts):
            value = self.seq.full(self.seq.evaluate(lift), lift.type, carry.type).expand(self.seq.lead + carry.type.shape)
            elements.append(self.seq.time_first(value.to(numerics.dtype_of(carry.type.kind))))
        names = [c.name for c in monoid.carries]

        def combine(earlier, later):
            if scan.reverse:  # solved in reversed time: the element met later is the earlier one in the cell's time
                earlier, later = later, earlier
            result = combine_carries(monoid, dict(zip(names, earlier)), dict(zip(names, later)), numerics)
            return tuple(result[n] for n in names)

        if self.segments is not None:
            # Each sequence's initial carry folded into its first element, then a segmented scan.
            starts = self.segments.starts
            entered = combine(tuple(self.initial[f"{scan.name}.{n}"].unsqueeze(1) for n in names), tuple(e.index_select(0, starts) for e in elements))
            elements = [e.index_copy(0, starts, x.expand((x.shape[0],) + e.shape[1:]).to(e.dtype)) for e, x in zip(elements, entered)]
            flags = self.segments.start_flags(elements[0].shape[0])
            folded = prefix_scan(tuple(elements) + (flags,), segmented(combine))[:-1]
            return {n: self.seq.batch_first(v) for n, v in zip(names, folded)}
        scanned = prefix_scan(tuple(elements), combine)
        initial = tuple(self.initial[f"{scan.name}.{n}"].unsqueeze(0) for n in names)
        folded = combine(initial, scanned)
        return {n: self.seq.batch_first(v) for n, v in zip(names, folded)}


def _chunkable(log_decay: torch.Tensor | None, *pieces: torch.Tensor) -> bool:
    """Whether a chunk kernel gives the loop's values for these pieces: all finite (a log decay may be -inf).

    The chunked forms split the state into terms per step and per chunk; an infinite key,
    value or decay in one term meets the others as ``inf - inf`` (NaN) where the loop's sum
    is +-inf or finite.  Such a sequence runs the scan instead (infinite queries are
    handled by :func:`chunk_kernels.with_infinite_readouts`).  A trace (torch.compile)
    takes the chunked form without looking.
    """
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    if log_decay is not None and log_decay.numel() and not bool(log_decay.amax() < float("inf")):  # NaN (amax propagates it) or +inf
        return False
    # One reduction per piece: a finite sum means every element is finite; only a sum that
    # is not (an overflow of finite values, or a real inf or NaN) needs the elementwise test.
    # A piece given twice (the delta rule's k is its map's both sides and its input's row) is checked once.
    pieces = tuple({id(piece): piece for piece in pieces}.values())
    return all(bool(torch.isfinite(piece.sum())) or bool(torch.isfinite(piece).all()) for piece in pieces)


def _finite_final(final: torch.Tensor) -> bool:
    """Whether a chunk kernel's final state is finite: the check that replaces :func:`_chunkable`
    where the kernel runs first (one read of ``[N, K, V]``, not of every piece).

    A non-finite key, value, log decay (NaN or +inf) or initial state always reaches the final
    state: every piece enters it through a product (``inf * 0`` and ``NaN * x`` are NaN, and the
    state is carried by multiplying it by its decay, which never turns NaN or inf back into a
    number; the kernels' floor of the log decays at -60 keeps NaN), so a finite final state
    means finite pieces.  A final state that overflowed from
    finite pieces also runs the scan, which is exact, only slower.  A trace (torch.compile)
    takes the chunked form without looking.
    """
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    from .triton_launch import kernels_run

    return bool(torch.isfinite(final).all()) or not kernels_run()  # recorded, not run (benchmarks/traffic.py): values are meaningless


def _logsigmoid_gate(log_decay: ir.Expr) -> tuple[ir.Expr, float] | None:
    """A per-row log decay ``(logsigmoid(x) / c)[:, None]`` (or ``c * logsigmoid(x)``, GLA's gate) as
    ``(x, 1 / c)`` (``(x, c)``): the Triton chunk kernels evaluate it as they read ``x``
    (:class:`.triton_chunk.LogSigmoidGate`).  None for any other log decay."""
    if not (isinstance(log_decay, ir.Op) and log_decay.op == "index" and log_decay.attrs == (ir.SliceItem(None, None), ir.NEW_AXIS)):
        return None
    inner = log_decay.args[0]
    if not (isinstance(inner, ir.Op) and len(inner.args) == 2 and inner.type.rank == 1):
        return None
    first, second = inner.args
    is_logsigmoid = lambda e: isinstance(e, ir.Op) and e.op == "logsigmoid" and e.type == inner.type  # noqa: E731
    is_number = lambda e: isinstance(e, ir.Literal) and isinstance(e.value, (int, float)) and e.value != 0  # noqa: E731
    if inner.op == "div" and is_logsigmoid(first) and is_number(second):
        return first.args[0], 1.0 / float(second.value)
    if inner.op == "mul" and is_number(first) and is_logsigmoid(second):
        return second.args[0], float(first.value)
    if inner.op == "mul" and is_logsigmoid(first) and is_number(second):
        return first.args[0], float(second.value)
    return None


def with_skip_term(chunk: ChunkPlan, outputs: tuple[ir.Expr, ...]) -> ChunkPlan:
    """``chunk`` with a read-out's skip term (:class:`~recdsl.plan.SkipTerm`) when an output adds
    ``s * column`` to it (Mamba-2's ``C @ h + D * x``: ``s`` a scalar, ``column`` the values of
    the plan's one input term before their scalar coefficient), for the Triton chunked kernels,
    which add it as they write the read-out: that read-out first, its node the sum's.  Else
    ``chunk`` unchanged."""
    if chunk.kind is not ChunkKind.DECAYED_OUTER_PRODUCTS or len(chunk.inputs) != 1 or chunk.transposed or chunk.reads_previous or chunk.skip is not None:
        return chunk
    term = chunk.inputs[0]
    column = term.column if term.coefficient is not None else scalar_times_vector(term.column)[0]
    readouts = {id(r): i for i, r in enumerate(chunk.readouts)}

    def scaled_column(expr: ir.Expr) -> ir.Expr | None:
        """``s`` when ``expr`` is ``s * column`` or ``column * s`` with a scalar ``s``."""
        if isinstance(expr, ir.Op) and expr.op == "mul" and len(expr.args) == 2 and expr.type == column.type:
            for scale, vector in (expr.args, expr.args[::-1]):
                if scale.type.rank == 0 and scale.type.kind is column.type.kind and vector == column:
                    return scale
        return None

    def find(expr: ir.Expr) -> ChunkPlan | None:
        if not isinstance(expr, ir.Op):
            return None
        if expr.op == "add" and len(expr.args) == 2 and expr.type == expr.args[0].type == expr.args[1].type:
            for readout, other in (expr.args, expr.args[::-1]):
                scale = scaled_column(other) if id(readout) in readouts else None
                if scale is not None:
                    i = readouts[id(readout)]
                    order = [i] + [j for j in range(len(chunk.readouts)) if j != i]
                    return replace(
                        chunk,
                        readouts=tuple(expr if j == i else chunk.readouts[j] for j in order),
                        queries=tuple(chunk.queries[j] for j in order),
                        skip=SkipTerm(scale, column),
                    )
        for arg in expr.args:
            found = find(arg)
            if found is not None:
                return found
        return None

    for output in outputs:
        found = find(output)
        if found is not None:
            return found
    return chunk


def with_row_scale_folded(chunk: ChunkPlan, cell: ir.CellIR) -> ChunkPlan:
    """``chunk`` with a scalar that divides or multiplies its one input term's row moved into the
    term's coefficient, ``(k / s) (c v)^T = k ((c / s) v)^T`` (mLSTM's ``k / sqrt(dk)``): the
    Triton chunked kernels then read ``k`` in place and scale the values by a scalar per step
    as they read them, where a scaled copy of the keys would be written and read back.  Else
    ``chunk`` unchanged.  The row may be a binding's name (``ks = k / sqrt(dk)``)."""
    if chunk.kind is not ChunkKind.DECAYED_OUTER_PRODUCTS or len(chunk.inputs) != 1:
        return chunk
    term = chunk.inputs[0]
    definitions = {s.name: s.value for s in cell.body if isinstance(s, ir.Assign)}
    row = term.row
    while isinstance(row, ir.Ref) and row.kind is RefKind.BINDING and row.name in definitions:
        row = definitions[row.name]
    if isinstance(row, ir.Op) and row.op == "div" and len(row.args) == 2 and row.args[1].type.rank == 0 and row.args[0].type == row.type:
        vector, scale = row.args
    else:
        vector, scale = scalar_times_vector(row)
        if scale is None:
            return chunk
    column, coefficient = (term.column, term.coefficient) if term.coefficient is not None else scalar_times_vector(term.column)
    if coefficient is None:
        coefficient = ir.Op("div", (ir.Literal(1.0, scale.type), scale), scale.type) if row.op == "div" else scale
    else:
        coefficient = ir.Op(row.op, (coefficient, scale), scale.type)
    return replace(chunk, inputs=(RankOneTerm(vector, column, coefficient),))


def _run_chunk_plan(
    seq: _Sequences, plan: ChunkPlan, state: StateAnalysis, h0: torch.Tensor, chunk: int, decayed=None, segments: Segments | None = None, delta=None, native: bool = False,
    normaliser_start: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor] | tuple[list[torch.Tensor], torch.Tensor, torch.Tensor] | None:
    """Evaluate a chunk plan's pieces, flatten batch and heads into one dim, and run its kernel.

    None when the pieces are not finite (see :func:`_chunkable`): the caller scans the state.
    A plan with a :class:`~recdsl.plan.Normaliser` (the Triton kernels', one sequence per row)
    takes the normaliser's initial value, ``normaliser_start``, and returns its final value
    third; its first read-out is the division.  None also when the kernels do not take such
    a call (queries that are not finite: the caller scans both states).
    With ``segments`` each sequence is laid out on whole chunks (:class:`.segments.ChunkLayout`)
    and the kernel restarts at each sequence's first chunk from its row of ``h0``.
    ``native``: the vectors are given to Triton kernels, which take low-precision inputs as
    they are (:meth:`_Sequences.operand`).
    """
    lead = seq.lead
    batch_dims = (lead[0],) + lead[2:]
    # Packed sequences: on whole chunks of one row for the decayed products (a scan over chunk
    # states), in rows of their own for the delta rule (a loop over chunks).
    layout: ChunkLayout | ChunkRows | None = None
    if segments is not None:
        layout = ChunkRows.of(segments, chunk) if plan.kind in (ChunkKind.DELTA_RULE, ChunkKind.GATED_DELTA_RULE) else ChunkLayout.of(segments, chunk)
    place = layout.spread if layout is not None else (lambda x: x)
    # The Triton kernels (``decayed`` / ``delta`` given) take batch, head and step strides: they get
    # each [B, T, *heads, d] piece as a [B, H, T, d] view, read in place, and write their read-outs
    # laid out [B, T, H, d]; the torch kernels and packed layouts take [B H, T, d] copies.
    triton_kernel = decayed if plan.kind is ChunkKind.DECAYED_OUTER_PRODUCTS else delta
    heads_axis = layout is None and triton_kernel is not None and not (plan.kind is ChunkKind.DECAYED_OUTER_PRODUCTS and plan.reads_previous)
    heads = _product(list(lead[2:]))

    def rows_of(value: torch.Tensor, item_dims: int) -> torch.Tensor:
        """``value`` ``[B, T, *heads, *item]`` with its rows (batch and heads) first, then T."""
        value = value.movedim(1, -1 - item_dims)  # [B, *heads, T, *item]
        if heads_axis:
            return value.reshape((lead[0], heads) + tuple(value.shape[-1 - item_dims :]))  # a view when the heads merge
        return place(value.reshape((-1,) + tuple(value.shape[-1 - item_dims :])))

    flattened: list[tuple[ir.Expr, int, torch.Tensor]] = []  # one copy per distinct vector (the delta rule's k is its map's both sides and its input's row)

    def flat_vector(expr: ir.Expr, length: int) -> torch.Tensor:
        for seen, seen_length, value in flattened:
            if seen_length == length and seen == expr:
                return value
        value = rows_of(seq.full(seq.operand(expr) if native else seq.evaluate(expr), expr.type, ir.Type((length,))).expand(lead + (length,)), 1)
        flattened.append((expr, length, value))
        return value

    def flat_scalar(expr: ir.Expr) -> torch.Tensor:
        return rows_of(seq.full(seq.evaluate(expr), expr.type, ir.Type(())).expand(lead), 0)

    rows, columns = state.type.shape[::-1] if plan.transposed else state.type.shape
    start = h0.transpose(-1, -2) if plan.transposed else h0
    # [N', K, V] for N' = batch x heads; in a packed batch [N', sequences, K, V].
    start = start.reshape((-1, rows, columns)) if layout is None else start.reshape((segments.count, -1, rows, columns)).transpose(0, 1)
    extra = (layout,) if isinstance(layout, ChunkLayout) else ()
    if isinstance(layout, ChunkRows):
        start = start.reshape((-1, rows, columns))  # [N' * sequences, K, V], as the rows
    queries = [flat_vector(q, rows) for q in plan.queries]
    # Each input term's row, column and scalar coefficient (or None).  The Triton kernels take
    # the coefficient (DeltaNet's beta in beta v, mLSTM's input gate; a column that is a scalar
    # times a vector, Mamba-2's dt x, is split so) and scale the column as they read it;
    # the torch kernels get the scaled column.
    terms = []
    for term in plan.inputs:
        column, coefficient = term.column, term.coefficient
        if triton_kernel is not None and coefficient is None:
            column, coefficient = scalar_times_vector(column)
        terms.append((flat_vector(term.row, rows), flat_vector(column, columns), None if coefficient is None else flat_scalar(coefficient)))
    scaled_columns = [(row, column if scale is None else column * scale.unsqueeze(-1)) for row, column, scale in terms] if triton_kernel is None else []
    if plan.kind is ChunkKind.DECAYED_OUTER_PRODUCTS:
        assert plan.log_decay is not None
        decay_type = plan.log_decay.type
        # GLA's gate, for the Triton kernels (one input term: they take it): its pre-activation.
        gated = _logsigmoid_gate(plan.log_decay) if decayed is not None and not plan.reads_previous and len(terms) == 1 and not plan.transposed else None
        if gated is not None:
            log_decay = seq.full(seq.evaluate(gated[0]).unsqueeze(-1), decay_type, state.type)  # x[:, None]
        else:
            log_decay = seq.full(seq.evaluate(plan.log_decay), decay_type, state.type)
        if plan.transposed:
            log_decay = log_decay.transpose(-1, -2)
        shape = tuple(log_decay.shape[-2:])
        log_decay = rows_of(log_decay.expand(lead + shape), 2)  # padding: log decay 0, the state carried unchanged
        # The Triton kernels' own cases (one input term, a decay shared by the state or per row) check
        # their final state afterwards; the torch form's, every piece first.
        checks_final = triton_kernel is not None and not plan.reads_previous and len(terms) == 1 and log_decay.shape[-1] == 1
        if plan.normaliser is not None and not checks_final:
            return None  # (only the Triton kernels carry a normaliser: the caller scans both states)
        if triton_kernel is not None and not checks_final:  # the Triton wrapper hands these to the torch form
            scaled_columns = [(row, column if scale is None else column * scale.unsqueeze(-1)) for row, column, scale in terms]
        if not checks_final and not _chunkable(log_decay, start, *(t for pair in scaled_columns for t in pair)):
            return None
        if plan.reads_previous:  # only the torch kernel reads out the previous state (the planner keeps it off Triton)
            inputs = [chunk_kernels.RankOneInput(k, v) for k, v in scaled_columns]
            results, final = chunk_kernels.with_infinite_readouts(
                chunk_kernels.decayed_outer_products, queries, inputs, log_decay, start, chunk, *extra, exclusive=plan.previous
            )
        elif checks_final:  # the Triton kernels, which scale the values as they read them
            inputs = [chunk_kernels.RankOneInput(k, v) for k, v, _ in terms]
            kernel = functools.partial(decayed, value_scales=[scale for _, _, scale in terms])
            if gated is not None:
                from .triton_chunk import LogSigmoidGate

                kernel = functools.partial(kernel, gate=LogSigmoidGate(gated[1]))
            # The kernels add the skip term and look for infinite queries themselves (the walk sums them).
            skip = None if plan.skip is None else flat_scalar(plan.skip.scale)
            if plan.normaliser is not None:
                from .triton_chunk import Normalisation

                assert layout is None and normaliser_start is not None
                carried = Normalisation(normaliser_start.reshape((-1, rows)), flat_scalar(plan.normaliser.floor))
                ran = kernel(queries, inputs, log_decay, start, chunk, normalisation=carried)
                if ran is None:  # queries that are not finite: the caller scans
                    return None
                results, (final, normaliser_final) = ran
            else:
                results, final = kernel(queries, inputs, log_decay, start, chunk, *extra, skip=skip, infinite_readouts=True)
        else:
            inputs = [chunk_kernels.RankOneInput(k, v) for k, v in scaled_columns]
            results, final = chunk_kernels.with_infinite_readouts(decayed or chunk_kernels.decayed_outer_products, queries, inputs, log_decay, start, chunk, *extra)
        if plan.skip is not None and not checks_final:  # (a Triton plan's packed sequences run here, in torch)
            results[0] = results[0] + flat_scalar(plan.skip.scale).unsqueeze(-1) * flat_vector(plan.skip.column, columns)
    else:
        transition = plan.transition
        assert transition is not None and transition.coefficient is not None
        left, right = flat_vector(transition.row, rows), flat_vector(transition.column, rows)
        coefficient = flat_scalar(transition.coefficient)
        log_decay = None
        if plan.log_decay is not None:  # the gated delta rule: a scalar decay per step
            log_decay = flat_scalar(plan.log_decay)
        checks_final = False
        if triton_kernel is not None:  # the Triton kernels' own cases check their final state afterwards
            from . import triton_delta

            checks_final = not any(plan.previous or ()) and triton_delta.supports(rows)
        # (The torch form's pieces are the scaled columns; the Triton wrapper's, each column and its scale.)
        pieces = [t for pair in scaled_columns for t in pair] if triton_kernel is None else [t for term in terms for t in term if t is not None]
        if not checks_final and not _chunkable(log_decay, start, left, right, coefficient, *pieces):
            return None
        if triton_kernel is not None:
            kernel, columns_in = functools.partial(delta, log_decay=log_decay, input_scales=[scale for _, _, scale in terms]), [column for _, column, _ in terms]
            # The Triton delta rule handles infinite read-outs itself: its kernels note them as they read.
            readouts_checked = lambda kernel, *arguments, exclusive=None: kernel(*arguments, exclusive=exclusive)  # noqa: E731
        else:
            kernel, columns_in = functools.partial(chunk_kernels.delta_rule, log_decay=log_decay), [column for _, column in scaled_columns]
            readouts_checked = chunk_kernels.with_infinite_readouts
        results, final = readouts_checked(
            kernel,
            queries,
            left,
            right,
            coefficient,
            columns_in,
            start,
            chunk,
            exclusive=plan.previous or None,
        )
    # The Triton kernels ran without a look at their pieces: a non-finite one reaches the final state.
    if checks_final and not _finite_final(final):
        return None
    if layout is not None:
        results = [layout.gather(r) for r in results]
        final = final.reshape((-1, segments.count) + tuple(final.shape[-2:])).transpose(0, 1)  # [sequences, N', K, V]
    unflatten = lambda x: x.reshape(batch_dims + x.shape[-2:]).movedim(-2, 1)  # noqa: E731
    outputs = [unflatten(r) for r in results]
    final = final.reshape((batch_dims if layout is None else (segments.count,) + lead[2:]) + final.shape[-2:])
    if plan.transposed:
        final = final.transpose(-1, -2)
    if plan.normaliser is not None:
        return outputs, final, normaliser_final.reshape(batch_dims + normaliser_final.shape[-1:])
    return outputs, final


def run(
    plan: ExecutionPlan,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    *,
    solver: type | None = None,
    decayed_outer_products=None,
    segments: Segments | None = None,
    delta_rule=None,
    last_steps: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``plan`` over the whole sequence at once; the signature of :func:`.sequential.run`.

    Each step of the plan is solved in its form, in schedule order.  ``solver`` replaces
    :class:`Solver` and ``decayed_outer_products`` the torch chunk kernel of that name
    (the Triton backend brings kernels for both); ``delta_rule`` likewise replaces
    :func:`.chunk_kernels.delta_rule`.  ``segments``: a packed
    variable-length batch (B = 1, ``state`` and the final state ``[N, *heads, *shape]``),
    each scan reset at every sequence's first step (:mod:`.segments`).  ``last_steps``
    (``[B]`` int64): batch row ``b``'s final state is its value after step
    ``last_steps[b]`` (rows padded at their ends, :class:`.segments.StartAligned`); not
    for chunked states, whose kernels keep only the state after the last step.
    """
    if segments is not None and (solver is not None or decayed_outer_products is not None or delta_rule is not None):
        raise AssertionError("packed sequences run on the torch solver and chunk kernels")  # pragma: no cover - segments.run_packed routes the others
    analysis = plan.analysis
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])
    seq = _Sequences(numerics, lead)
    seq.values.update({(RefKind.PARAM, n): v for n, v in params.items()})
    seq.values.update({(RefKind.CONST, n): v for n, v in consts.items()})
    seq.values.update({(RefKind.INPUT, n): v for n, v in inputs.items()})
    seq.keep_native()
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            seq.values.pending[(RefKind.BINDING, statement.name)] = statement.value

    if last_steps is not None and cell.reversed_recurrences:
        # Rows padded at their ends would start a reverse state in the padding; packed batches
        # of such cells run equal-length groups instead (ExecutionPlan.varlen).
        raise BackendError(
            f"cell {cell.name} has states that run backwards in time, which batch rows padded at their ends cannot start at each row's last step",
            expected="cu_seqlens (each sequence's reverse states start at its own last step) or one call per sequence",
        )
    solver_kind = solver or Solver
    solver = solver_kind(plan, seq, state, segments)
    if segments is not None:
        last_of = segments.finals
    elif last_steps is not None:
        last_of = lambda sequence: sequence[torch.arange(sequence.shape[0], device=sequence.device), last_steps]  # noqa: E731
    else:
        last_of = lambda sequence: sequence.select(1, -1)  # noqa: E731  (sequence[:, -1], one dispatch cheaper)
    scans = {s.name: s for s in cell.scans}
    final: dict[str, torch.Tensor] = {}
    substitutions: dict[int, torch.Tensor] = {}
    reversed_frame: _Sequences | None = None
    reversed_solver = None
    # A packed batch in reversed time: the sequences flipped and in the opposite order, so
    # the rows of the initial state are read flipped (Segments.reversed).
    packed_reverse = segments is not None and bool(cell.reversed_recurrences)
    reversed_segments = segments.reversed() if packed_reverse else None
    reversed_state = {key: value.flip(0) for key, value in state.items()} if packed_reverse else state

    def record(name: str, state_analysis: StateAnalysis, sequence: torch.Tensor, restore: Callable, shift: Callable, last: Callable) -> None:
        """State ``name``'s values at every step (``[B, T, ...]`` in the frame's time), its previous
        values (built only if an output or a later state reads them; most read h_t) and its final value."""
        full_shape = lead + state_analysis.type.shape
        sequence = restore(sequence if sequence.shape == full_shape else sequence.expand(full_shape))
        seq.values[(RefKind.STATE_NEW, name)] = sequence
        seq.values.pending[(RefKind.STATE_PREV, name)] = functools.partial(shift, sequence, state[name])
        final[name] = last(sequence)

    for step in plan.steps:
        direction = analysis.direction(step.names[0])
        # A reverse recurrence is solved forward in reversed time, its results flipped back.
        reverse = direction is ir.Direction.REVERSE
        if reverse and reversed_frame is None:
            # One reversed view for every reverse group, so that the values they share are flipped once.
            reversed_frame = _time_reversed(seq, cell)
            reversed_solver = solver_kind(plan, reversed_frame, reversed_state, reversed_segments)
        elif reverse:
            _follow(reversed_frame, seq)
        frame = reversed_frame if reverse else seq
        frame_solver = reversed_solver if reverse else solver
        frame_state, frame_segments = (reversed_state, reversed_segments) if reverse else (state, segments)
        restore = (lambda x: x.flip(1)) if reverse else (lambda x: x)  # noqa: E731
        # A chunk kernel's final states of a packed batch come in the frame's order of sequences.
        restore_rows = (lambda x: x.flip(0)) if reverse and segments is not None else (lambda x: x)  # noqa: E731
        # The value a module returns: after the last step it runs (step 0, or each sequence's
        # first step, for a reverse recurrence).
        if reverse:
            last = segments.firsts if segments is not None else (lambda x: x[:, 0])  # noqa: E731
        else:
            last = last_of
        shift = functools.partial(segments.shift, direction=direction) if segments is not None else functools.partial(_shift, direction=direction)
        if step.form is Form.JOINT_MATRIX_SCAN:
            for name, sequence in Solver.joint(frame_solver, step).items():
                record(name, analysis.state(name), sequence, restore, shift, last)
            continue
        if step.form is Form.NORMALISER:
            continue  # with the chunked state whose read-out it normalises (at that state's step)
        (name,) = step.names
        if name in scans:
            carries = frame_solver.kernel_scan(step, scans[name]) if step.form is Form.TRITON_SCAN else frame_solver.scan(scans[name])
            for carry, value in carries.items():
                value = restore(value)
                seq.values[(RefKind.SCAN, f"{name}.{carry}")] = value
                final[f"{name}.{carry}"] = last(value)
            continue
        state_analysis = analysis.state(name)
        chunked_run = None
        if step.form is Form.CONVOLUTION:
            assert step.conv is not None and step.fallback is not None
            convolved = None
            if segments is None and last_steps is None:  # packed or padded rows: the scan resets per sequence
                convolved = convolution.run(frame, step.conv, state_analysis, state[name])
            if convolved is not None:
                readouts, final[name] = convolved
                for node, value in zip(step.conv.readouts, readouts):
                    substitutions[id(node)] = restore(value)
                continue
            # Packed sequences, an unstable decay or non-finite pieces: the plan's fallback scan.
            sequence = Solver(plan, frame, frame_state, frame_segments).solve(replace(step, form=step.fallback), state_analysis)
        elif step.form is Form.TRITON_SELECTIVE_SCAN:
            # The fused selective scan writes the outputs that read the state whole (never the
            # state per step); packed or padded rows take the plan's fallback scan.
            assert step.fallback is not None and not reverse
            if segments is None and last_steps is None:
                produced, final[name] = frame_solver.selective_scan(step, frame_state[name])
                substitutions.update(produced)
                continue
            sequence = Solver(plan, frame, frame_state, frame_segments).solve(replace(step, form=step.fallback), state_analysis)
        elif step.form is Form.CHUNKED or step.form is Form.TRITON_CHUNKED:
            assert step.chunk is not None and last_steps is None
            kernel = decayed_outer_products if step.form is Form.TRITON_CHUNKED else None
            delta_kernel = delta_rule if step.form is Form.TRITON_CHUNKED else None
            normaliser = step.chunk.normaliser
            normaliser_start = None if normaliser is None else frame_state[normaliser.state]
            chunked_run = _run_chunk_plan(frame, step.chunk, state_analysis, frame_state[name], plan.chunk_size, kernel, frame_segments, delta=delta_kernel, native=step.form is Form.TRITON_CHUNKED, normaliser_start=normaliser_start)
            if chunked_run is not None:
                readouts, chunk_final, *carried = chunked_run
                final[name] = restore_rows(chunk_final)
                if normaliser is not None:
                    final[normaliser.state] = restore_rows(carried[0])
                for node, value in zip(step.chunk.readouts, readouts):
                    substitutions[id(node)] = restore(value)
                continue
            # The chunk kernels refused non-finite pieces: the plan's fallback scan, in torch
            # (a backend's own solver, Triton's, may have no kernel for a state it chunks), and
            # the same for the normaliser it carries.
            assert step.fallback is not None
            sequence = Solver(plan, frame, frame_state, frame_segments).solve(replace(step, form=step.fallback), state_analysis)
            if normaliser is not None:
                carried_step = plan.step(normaliser.state)
                assert carried_step.fallback is not None
                carried_analysis = analysis.state(normaliser.state)
                carried_sequence = Solver(plan, frame, frame_state, frame_segments).solve(replace(carried_step, form=carried_step.fallback), carried_analysis)
                record(normaliser.state, carried_analysis, carried_sequence, restore, shift, last)
        else:
            sequence = frame_solver.solve(step, state_analysis)
        record(name, state_analysis, sequence, restore, shift, last)

    outputs = []
    for emit, expanded in zip(cell.outputs, analysis.expanded_outputs):
        value = seq.full(seq.evaluate(expanded, substitutions), emit.value.type, emit.value.type)
        full_shape = lead + emit.value.type.shape
        outputs.append(value if value.shape == full_shape else value.expand(full_shape))
    return outputs, final
