"""Sequence parallelism: one sequence's time axis sharded over a ``torch.distributed`` group.

Each rank holds a contiguous slice ``[B, T_r, ...]`` of the inputs (slices may differ in
length; a slice of one step is fine) and gets back the same slice of the outputs that a
single-process run over the whole sequence gives.  Nothing here is written per cell: the
plan of the compiled module says, for each recurrence, the algebra its slice reduces to.

A slice of ``T_r`` steps acts on its initial state as one element of that algebra, its
*summary*:

==============================  =============================================================
class (plan form)               summary of a slice
==============================  =============================================================
diagonal / row / scalar decay   ``(prod_t a_t, F)``: the decays' product (a scalar, a vector
(linear scan, chunked decayed   or a row of the state, in the decay's own shape; accumulated
outer products)                 in log space where the decay is provably positive) and the
                                final state ``F`` of the slice run from zero
delta rule (chunked)            ``(Phi, F)``: ``Phi`` the ``dk x dk`` product of the slice's
                                ``I - beta_t k_t k_t^T``
max-plus / log semiring         the same pair over the semiring (the decays' semiring
                                product; for a matrix transition the ``n x n`` semiring
                                product of the steps' matrices)
low-rank or dense transition    ``(M, F)``: the ordered product of the step matrices
(matrix scans)
block-diagonal transition       ``(M, F)``: per block, the ordered product of the slice's
(block matrix scans)            ``m x m`` block matrices (one for all when they are equal)
declared monoid                 the slice's carry (the fold of its elements by ``combine``)
coupled group, jointly affine   ``(M, F)``: per joint block, the ordered product of the
(joint block matrix scan)       slice's block matrices over the stacked states (Titans)
gated delta rule, ``S @ q``,    as the delta rule, ``Phi`` with the decays folded in (on
previous-state read-outs,       ``S^T`` for ``S @ q``); RWKV-6's decays as GLA's; for a
convolution (S4D)               convolution its length stands for ``decay^T_r``: see
                                :mod:`recdsl.distributed_native`
time-parallel state, delay      its last value (a delay's first step reads it: a one-step halo)
==============================  =============================================================

The summaries are exchanged with one all-gather (LASP-2's single collective, derived for
every class; recurrences that do not read each other share one), or, where a summary's
transition is larger than its state, along a ring (LASP's) that carries only states.
Each rank folds the summaries of the ranks before it (an exclusive prefix:
``S_in(r) = A_{r-1}(S_in(r-1)) + F_{r-1}``) to get its true initial state, and corrects
its local pass: a state stored per step adds ``P_t * S_in``
(``P_t`` the decays' product up to ``t``), a matrix state read out linearly adds
``q_t (D_t * S_in)`` to its read-outs, the delta rule adds ``(q_t Phi_t) S_in`` with
``q_t Phi_t`` read out of the same chunked pass run on the widened state ``[S | Phi]``, a
monoid combines the received carry into its prefix; a semiring matrix transition (CRF)
and the matrix and block scans rerun their local pass from the received state.  Rank 0 runs from the true initial state
(the ``state=`` it was given, or the cell's) and needs no correction.  The whole-sequence
final state is the fold of all summaries, on every rank.

Backward: the all-gather is an autograd function whose backward is the reverse exchange:
an all-to-all of the gradients of the gathered summaries (a reduce-scatter), so each rank
receives the adjoints of its own summary from every later rank and carries them through
its local pass; on the ring the adjoint of ``S_in`` travels back rank to rank.  Parameter
gradients are partial per rank; their sum over ranks (what ``DistributedDataParallel`` and
FSDP reduce) is the single-process gradient.  The exchange uses
its own process group, so that its collectives never interleave with those of DDP.

Reverse states and scans have the same summaries, of their slice in reversed time (the
local pass runs in a time-reversed view of the slice, as the parallel backend solves
them); their summaries travel the other way: an exclusive *suffix* over the ranks gives
each rank its state at its slice's last step, the last rank starting from the initial
state.  Packed sequences (``cu_seqlens``): a slice holding a sequence's first step (in
the recurrence's own time) sends a summary whose transition is the zero (a reset) and
runs its local pass with the sequences' resets (see :meth:`_SlicedRun._packed_task`);
a declared monoid's carry has no zero, so every fold restarts at such a slice's summary
(each rank knows which slices those are from the offsets and the slices' lengths).

A module compiled with ``backend="newton"`` runs Newton's iterations with each linear
solve sharded by the same kind of exchange (:mod:`recdsl.distributed_newton`).  Otherwise
cells whose recurrences the parallel backends cannot run (nonlinear or coupled states,
e.g. GRU, LSTM and BiGRU) are refused with a :class:`SequenceParallelError` that says why.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass, replace
from enum import Enum
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import ir
from .analysis import Analysis, DiagonalAffine, JointAffine, MatrixAffine, SemiringAffine, Side, StateAnalysis, log_of_positive
from .errors import BackendError
from .ir import Kind, RefKind
from .plan import BackendKind, ChunkKind, ExecutionPlan, Form, PlanOptions, StepPlan
from .plan import plan as make_plan
from .backends.parallel import Solver, _follow, _run_chunk_plan, _Sequences, _shift, _time_reversed


class SequenceParallelError(BackendError):
    """A cell, group or call that cannot run sequence-parallel."""

    kind = "sequence-parallel error"


# ---- the exchange, planned once per module ---------------------------------------------------


class Exchange(Enum):
    """How the ranks exchange one recurrence's summaries; the value is its name in prose."""

    ALL_GATHER = "all-gather of every rank's summary, exclusive prefix on each rank"
    RING = "ring: each rank receives its initial state from the previous rank and sends its final state to the next (P - 1 hops)"

    def __str__(self) -> str:
        return self.value


class Correction(Enum):
    """How a rank turns its local pass into the true one once its initial state is known."""

    NONE = "none needed: it reads no previous value except at the slice's first step"
    DECAY_PRODUCT = "local scan from zero, plus the decays' running product times the received state"
    DECAYED_READOUT = "local chunked pass from zero, plus q_t (D_t * S_in) added to each read-out (D_t the running decay)"
    TRANSITION_READOUT = "local chunked pass on [S | Phi] from [0 | I], plus (q_t Phi_t) S_in added to each read-out"
    SEMIRING_DECAY = "local scan from the semiring zero, (+)-combined with the received state (x) the running decay"
    MONOID_FOLD = "the received carry combined into the local prefix"
    RECOMPUTE = "the local pass rerun from the received state"
    # Summarised in recdsl.distributed_native:
    PREVIOUS_DECAYED_READOUT = "local chunked pass from zero, plus q_t (D_{t-1} * S_in) added to each read-out of the previous state (D_0 = 1)"
    PREVIOUS_TRANSITION_READOUT = "local chunked pass on [S | Phi] from [0 | I], plus (q_t Phi_{t-1}) S_in added to each read-out of the previous state (Phi_0 = I)"
    CONVOLUTION_READOUT = "local convolution from zero, plus R(decay^(t+1) * S_in) added to each read-out R, in blocks of lags (no state stored per step)"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SummaryPart:
    """One tensor of a slice's summary: its role, shape (per batch row and head) and kind."""

    role: str  # "transition" or "state" or a monoid carry's name
    shape: tuple[int, ...]
    is_complex: bool

    @property
    def elements(self) -> int:
        """Real numbers sent for it per batch row and head."""
        return math.prod(self.shape) * (2 if self.is_complex else 1)


@dataclass(frozen=True)
class StepExchange:
    """The exchange planned for one entry of the local plan."""

    names: tuple[str, ...]
    form: Form
    summary: tuple[SummaryPart, ...]
    exchange: Exchange
    correction: Correction
    description: str
    state_count: int = 1  # the summary's last parts are the slice's final state
    # REVERSE: the summaries travel from the last rank to the first (an exclusive suffix).
    direction: ir.Direction = ir.Direction.FORWARD

    @property
    def summary_elements(self) -> int:
        """Real numbers in one slice's summary, per batch row and head."""
        return sum(part.elements for part in self.summary)

    @property
    def state_elements(self) -> int:
        return sum(part.elements for part in self.summary[-self.state_count :])

    @property
    def elements(self) -> int:
        """Real numbers one rank contributes per batch row and head: its summary (all-gather) or its outgoing state (ring)."""
        return self.state_elements if self.exchange is Exchange.RING else self.summary_elements


def _numel(shape: Sequence[int]) -> int:
    return math.prod(shape)


def _decay_shape(decay: ir.Expr, state: ir.Type) -> tuple[int, ...]:
    """The shape a decay broadcasts to against ``state``, without the dims it is constant along."""
    shape = (1,) * (state.rank - decay.type.rank) + tuple(decay.type.shape)
    return tuple(shape)


def _is_complex(t: ir.Type) -> bool:
    return t.kind is Kind.COMPLEX


def plan_exchanges(local: ExecutionPlan, exchange: Exchange | None = None) -> tuple[StepExchange, ...]:
    """For each step of the local plan, the summary its slice reduces to, how it is exchanged and used.

    The exchange is ``exchange`` when given; otherwise by size: an all-gather (one
    collective, every rank receives every summary) unless the summary's transition is
    larger than its state (a CRF's ``n x n`` semiring matrix for an ``n``-vector, a dense
    transition, a delta rule with ``dk > dv``), where a ring sends one state per rank
    instead, at the price of ``P - 1`` hops one after the other.
    Raises :class:`SequenceParallelError` for a form with no sequence-parallel summary.
    """
    return tuple(_with_exchange(step, exchange) for step in _summaries(local))


def _with_exchange(step: StepExchange, exchange: Exchange | None) -> StepExchange:
    if exchange is None:
        transition = step.summary_elements - step.state_elements
        exchange = Exchange.RING if transition > step.state_elements else Exchange.ALL_GATHER
    return replace(step, exchange=exchange)


def _summaries(local: ExecutionPlan) -> tuple[StepExchange, ...]:
    # A reverse recurrence's summary is the forward one of its slice in reversed time; only
    # the direction the summaries travel differs (see _SlicedRun._reverse_view).
    return tuple(replace(s, direction=local.analysis.direction(s.names)) for s in _forward_summaries(local))


def _forward_summaries(local: ExecutionPlan) -> tuple[StepExchange, ...]:
    analysis = local.analysis
    scans = {s.name: s for s in analysis.cell.scans}
    steps = []
    for step in local.steps:
        if len(step.names) > 1:
            steps.append(_joint_summary(analysis, step))
            continue
        (name,) = step.names
        if name in scans:
            carries = tuple(SummaryPart(c.name, tuple(c.type.shape), _is_complex(c.type)) for c in scans[name].monoid.carries)
            steps.append(StepExchange(step.names, step.form, carries, Exchange.ALL_GATHER, Correction.MONOID_FOLD, f"the carry of the monoid {scans[name].monoid.name}", len(carries)))
            continue
        state = analysis.state(name)
        if _has_native_summary(step):  # the gated / S @ q / previous-state delta rules, RWKV-6's read-outs, the convolution
            from .distributed_native import native_exchange

            steps.append(native_exchange(step, state))
            continue
        recurrence = state.recurrence
        final = SummaryPart("state", tuple(state.type.shape), _is_complex(state.type))
        match step.form:
            case Form.TIME_PARALLEL:
                steps.append(StepExchange(step.names, step.form, (final,), Exchange.ALL_GATHER, Correction.NONE, "its last value"))
            case Form.LINEAR_SCAN:
                assert isinstance(recurrence, (DiagonalAffine, MatrixAffine)) and recurrence.decay is not None
                decay = SummaryPart("transition", _decay_shape(recurrence.decay, state.type), _is_complex(recurrence.decay.type))
                steps.append(StepExchange(step.names, step.form, (decay, final), Exchange.ALL_GATHER, Correction.DECAY_PRODUCT, f"the product of its decays ({recurrence.structure}) and its final state from zero"))
            case Form.CHUNKED:
                assert step.chunk is not None
                if step.chunk.kind is ChunkKind.DECAYED_OUTER_PRODUCTS:
                    assert step.chunk.log_decay is not None
                    decay = SummaryPart("transition", _decay_shape(step.chunk.log_decay, state.type), False)
                    steps.append(StepExchange(step.names, step.form, (decay, final), Exchange.ALL_GATHER, Correction.DECAYED_READOUT, f"the product of its decays ({recurrence.structure}) and its final state from zero"))
                else:
                    rows = state.type.shape[0]
                    transition = SummaryPart("transition", (rows, rows), False)
                    steps.append(StepExchange(step.names, step.form, (transition, final), Exchange.ALL_GATHER, Correction.TRANSITION_READOUT, f"its total transition ({rows} x {rows}, the product of the identity-plus-rank-one steps) and its final state from zero"))
            case Form.BLOCK_MATRIX_SCAN:
                assert isinstance(recurrence, MatrixAffine)
                blocks, size = _block_layout(recurrence, state.type)
                transition = SummaryPart("transition", (blocks, size, size), _is_complex(state.type))
                steps.append(StepExchange(step.names, step.form, (transition, final), Exchange.ALL_GATHER, Correction.RECOMPUTE, f"the products of its {blocks} block{'s' if blocks != 1 else ''} of {size} x {size} step matrices and its final state from zero"))
            case Form.SEMIRING_DIAGONAL_SCAN:
                assert isinstance(recurrence, SemiringAffine) and recurrence.decay is not None
                decay = SummaryPart("transition", _decay_shape(recurrence.decay, state.type), False)
                steps.append(StepExchange(step.names, step.form, (decay, final), Exchange.ALL_GATHER, Correction.SEMIRING_DECAY, f"the {recurrence.semiring.name} product of its decays and its final state from the semiring zero"))
            case Form.SEMIRING_MATRIX_SCAN:
                assert isinstance(recurrence, SemiringAffine)
                size = _numel(state.type.shape)
                transition = SummaryPart("transition", (size, size), False)
                steps.append(StepExchange(step.names, step.form, (transition, final), Exchange.ALL_GATHER, Correction.RECOMPUTE, f"the {recurrence.semiring.name} product of its {size} x {size} step matrices and its final state from the semiring zero (rank 0: from the initial state)"))
            case Form.LOW_RANK_MATRIX_SCAN | Form.DENSE_MATRIX_SCAN:
                assert isinstance(recurrence, MatrixAffine)
                if step.form is Form.DENSE_MATRIX_SCAN:
                    rows = _numel(state.type.shape)
                else:
                    rows = state.type.shape[1 if recurrence.side is Side.RIGHT else 0]
                transition = SummaryPart("transition", (rows, rows), _is_complex(state.type))
                steps.append(StepExchange(step.names, step.form, (transition, final), Exchange.ALL_GATHER, Correction.RECOMPUTE, f"the product of its {rows} x {rows} step matrices ({recurrence.structure}) and its final state from zero"))
            case _:
                raise SequenceParallelError(
                    f"state '{name}' runs as a {step.form.name.lower().replace('_', ' ')}, which has no sequence-parallel summary yet",
                    expected="cells whose states are diagonal, row/column/scalar-decay or delta-rule affine, semiring affine, or declared monoids",
                )
    return tuple(steps)


def _joint_summary(analysis: Analysis, step: StepPlan) -> StepExchange:
    """A coupled group scanned jointly (Titans' ``M`` and ``W``): its slice acts on the stacked
    states as the ordered product of the joint block matrices the block scan multiplies."""
    group = analysis.group(step.names)
    if step.form is not Form.JOINT_MATRIX_SCAN or group is None or not isinstance(group.recurrence, JointAffine):
        raise SequenceParallelError(
            f"states {', '.join(repr(n) for n in step.names)} are coupled and run as a {step.form.name.lower().replace('_', ' ')}, which has no sequence-parallel summary",
            expected="coupled states whose joint update is affine (scanned jointly)",
        )
    blocks, size, _ = _joint_layout(analysis, group.recurrence)
    types = [analysis.state(n).type for n in step.names]
    transition = SummaryPart("transition", (blocks, size, size), any(_is_complex(t) for t in types))
    finals = tuple(SummaryPart("state", tuple(t.shape), _is_complex(t)) for t in types)
    described = f"the products of the {blocks} joint block{'s' if blocks != 1 else ''} of {size} x {size} step matrices of the stacked states ({', '.join(step.names)}) and their final states from zero"
    return StepExchange(step.names, step.form, (transition,) + finals, Exchange.ALL_GATHER, Correction.RECOMPUTE, described, len(finals))


def _joint_layout(analysis: Analysis, joint: JointAffine) -> tuple[int, int, tuple[int, ...]]:
    """``(blocks, m, order)`` of a joint block scan as :meth:`Solver.blocks` lays it out: one block
    per index of the shared block axes (one for all when shared), ``m`` the members' elements
    inside a block, stacked in member order; ``order`` the axes, block axes first."""
    types = [analysis.state(n).type for n in joint.states]
    axes = joint.blocks.axes if joint.blocks is not None else ()
    shared = joint.blocks is not None and joint.blocks.shared
    blocks = 1 if shared else _numel([types[0].shape[a] for a in axes])
    inner = tuple(a for a in range(types[0].rank) if a not in axes)
    size = sum(_numel([t.shape[a] for a in inner]) for t in types)
    return blocks, size, axes + inner


def _block_layout(recurrence: MatrixAffine, state: ir.Type) -> tuple[int, int]:
    """``(blocks, m)`` of a block-diagonal transition as the block scan builds it: one block per
    index of the block axes (one for all when every block is the same matrix), ``m`` elements inside."""
    axes = recurrence.blocks.axes if recurrence.blocks is not None else ()
    shared = recurrence.blocks is not None and recurrence.blocks.shared
    blocks = 1 if shared else _numel([state.shape[a] for a in axes])
    return blocks, _numel([n for a, n in enumerate(state.shape) if a not in axes])


def exchange_groups(analysis: Analysis, chunk_size: int = 64) -> list[tuple[str, ...]]:
    """The recurrences whose summaries travel together, in order (one collective per group and exchange kind)."""
    local = local_plan(analysis, chunk_size)
    return [tuple(name for step, _ in level for name in step.names) for level in _levels(local, plan_exchanges(local))]


def local_plan(analysis: Analysis, chunk_size: int = 64) -> ExecutionPlan:
    """The plan each rank runs its slice with: the ``chunked`` backend's forms for the cell.

    A :class:`SequenceParallelError` says why a cell cannot run sequence-parallel.
    """
    try:
        planned = make_plan(analysis, "chunked", PlanOptions(chunk_size=chunk_size))
    except BackendError as error:
        reason = error.summary.split(": ", 1)[-1] if ": " in error.summary else error.summary
        raise SequenceParallelError(
            f"cell {analysis.cell.name} cannot run sequence-parallel: {reason}",
            expected="a cell whose recurrences the scan/chunked backends run; a nonlinear or coupled cell compiled with backend='newton' runs Newton's iterations with each linear solve sharded",
        ) from None
    # Forms whose slice summary is not derived run the scan the plan keeps as their fallback
    # (none today: the convolution, the gated delta rule, S @ q and previous-state read-outs
    # are summarised in recdsl.distributed_native).
    steps = tuple(replace(step, form=step.fallback, conv=None, chunk=None) if _scanned_on_slices(step) else step for step in planned.steps)
    return replace(planned, steps=steps)


def _scanned_on_slices(step: StepPlan) -> bool:
    """Whether a step of the chunked plan runs its fallback scan on each rank's slice."""
    if step.fallback is None or _has_native_summary(step):
        return False
    if step.form is Form.CONVOLUTION:
        return True
    chunk = step.chunk
    if step.form is not Form.CHUNKED or chunk is None:
        return False
    if chunk.reads_previous:
        return True
    return chunk.kind is ChunkKind.GATED_DELTA_RULE or (chunk.kind is ChunkKind.DELTA_RULE and chunk.transposed)


def _has_native_summary(step: StepPlan) -> bool:
    from .distributed_native import has_native_summary

    return has_native_summary(step)


def describe_exchanges(analysis: Analysis, world_size: int, batch: int = 1, heads: int = 1, itemsize: int = 4, chunk_size: int = 64) -> str:
    """What :class:`SequenceParallel` exchanges for this cell over ``world_size`` ranks, in words.

    Per recurrence: the local form, the summary and its size, the exchange and the
    correction; then the bytes one rank sends per call (``batch`` rows, ``heads`` heads,
    ``itemsize`` bytes per number).  Needs no process group (``recdsl explain
    --sequence-parallel P`` prints it).
    """
    exchanges = plan_exchanges(local_plan(analysis, chunk_size))
    lines = [f"sequence parallel over {world_size} rank{'s' if world_size != 1 else ''}: cell {analysis.cell.name}, each slice run in the chunked backend's forms"]
    for step in exchanges:
        reverse = " (reverse: the summaries travel from the last rank to the first, an exclusive suffix)" if step.direction is ir.Direction.REVERSE else ""
        lines.append(f"  {', '.join(step.names)}: {step.form}{reverse}")
        lines.append(f"      summary: {step.description}: " + " + ".join(f"{p.role} {list(p.shape)}{' complex' if p.is_complex else ''}" for p in step.summary) + f" = {step.summary_elements} numbers per batch row and head")
        lines.append(f"      exchange: {step.exchange}")
        lines.append(f"      correction: {step.correction}")
    forward = backward = 0
    for step in exchanges:
        sent = communication_bytes(step.elements * batch * heads * itemsize, world_size, step.exchange)
        forward, backward = forward + sent.forward, backward + sent.backward
    lines.append(f"  bytes sent per rank per call (B = {batch}, heads = {heads}, {itemsize} bytes a number): forward {forward}, backward {backward}")
    groups = exchange_groups(analysis, chunk_size)
    lines.append(f"  exchanges per call: {len(groups)} (" + "; ".join(", ".join(names) for names in groups) + "): recurrences that do not read each other share one")
    return "\n".join(lines) + "\n"


# ---- collectives with their reverse exchange as backward --------------------------------------


@dataclass
class CollectiveTime:
    """Seconds this rank spent inside the exchange's collectives (including waiting for the other ranks)."""

    forward: float = 0.0
    backward: float = 0.0


class _AllGather(torch.autograd.Function):
    """All-gather of one flat summary per rank -> ``[P, n]``; backward sums each rank's adjoints over the ranks.

    ``order`` is the previous exchange's output (or None): tying it in makes every rank's
    autograd run the exchanges' backwards in the same (reverse) order, so the
    collectives of the backward pass match across ranks.
    """

    @staticmethod
    def forward(ctx, flat: torch.Tensor, order: torch.Tensor | None, group: Any, rank: int, world: int, clock: "CollectiveTime") -> torch.Tensor:
        import torch.distributed as dist

        gathered = [torch.empty_like(flat) for _ in range(world)]
        started = time.perf_counter()
        dist.all_gather(gathered, flat.contiguous(), group=group)
        clock.forward += time.perf_counter() - started
        ctx.group, ctx.rank, ctx.has_order, ctx.clock = group, rank, order is not None, clock
        if ctx.has_order:
            ctx.order_shape = order.shape
        return torch.stack(gathered)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        # Rank j holds the adjoints of every rank's summary from its own slice's use of them;
        # an all-to-all sends each rank its row (a reduce-scatter, (P - 1) summaries per rank).
        received = torch.empty_like(grad)
        started = time.perf_counter()
        dist.all_to_all_single(received, grad.contiguous(), group=ctx.group)
        ctx.clock.backward += time.perf_counter() - started
        order_grad = grad.new_zeros(ctx.order_shape) if ctx.has_order else None
        return received.sum(0), order_grad, None, None, None, None


@dataclass(frozen=True)
class _RingSpec:
    """What :class:`_RingPrefix` needs besides tensors."""

    apply: Any  # (summary parts, state parts) -> state parts
    parts: int
    state_count: int  # the summary's last parts are the slice's final state
    group: Any
    rank: int
    world: int
    lead: tuple[int, ...]
    real: torch.dtype
    need_final: bool  # the whole-sequence final state is wanted on every rank: the last rank broadcasts it
    clock: "CollectiveTime"
    # Reverse recurrences: ``rank`` counts from the group's last rank, which the ring starts from.
    reverse: bool = False

    def global_rank(self, rank: int) -> int:
        import torch.distributed as dist

        if self.reverse:
            rank = self.world - 1 - rank
        return dist.get_global_rank(self.group, rank) if self.group is not None else rank


class _RingPrefix(torch.autograd.Function):
    """The exclusive prefix passed along the ranks: rank r receives ``S_in(r)`` from r - 1 and
    sends ``A_r(S_in(r)) + F_r`` to r + 1 (LASP's ring, for any summary).

    Each rank sends one state forward; backward the adjoint of ``S_in`` travels the other way,
    rank r + 1 to r, each rank applying the transpose of its own summary (the
    vector-Jacobian product of ``apply``).  Returns ``(*S_in parts, *final parts, token)``;
    the token orders the exchanges' backwards as :class:`_AllGather`'s output does.
    """

    @staticmethod
    def forward(ctx, spec: _RingSpec, order: torch.Tensor, *parts: torch.Tensor):
        import torch.distributed as dist

        summary = [p.detach() for p in parts]
        templates = summary[-spec.state_count :]
        started = time.perf_counter()
        if spec.rank == 0:
            received = None
            outgoing = templates
        else:
            buffer = torch.empty_like(_pack(templates, spec.lead, spec.real))
            dist.recv(buffer, src=spec.global_rank(spec.rank - 1), group=spec.group)
            received = _unpack(buffer, templates, spec.lead)
            outgoing = spec.apply(summary, received)
        if spec.rank < spec.world - 1:
            dist.send(_pack(outgoing, spec.lead, spec.real), dst=spec.global_rank(spec.rank + 1), group=spec.group)
        if spec.need_final:
            final_buffer = _pack(outgoing, spec.lead, spec.real).clone() if spec.rank == spec.world - 1 else torch.empty_like(_pack(templates, spec.lead, spec.real))
            dist.broadcast(final_buffer, src=spec.global_rank(spec.world - 1), group=spec.group)
            final = _unpack(final_buffer, templates, spec.lead)
        else:  # not asked for: the last rank's own value stands in (its gradient is not used)
            final = [t.clone() for t in outgoing] if spec.rank == spec.world - 1 else [torch.zeros_like(t) for t in templates]
        spec.clock.forward += time.perf_counter() - started
        ctx.spec = spec
        ctx.save_for_backward(*summary, *(received if received is not None else []))
        ctx.order_shape = order.shape
        incoming = received if received is not None else [torch.zeros_like(t) for t in templates]
        token = torch.zeros((), dtype=spec.real, device=templates[0].device)
        return (*incoming, *final, token)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        import torch.distributed as dist

        spec = ctx.spec
        saved = ctx.saved_tensors
        summary = list(saved[: spec.parts])
        received = list(saved[spec.parts :]) or None
        templates = summary[-spec.state_count :]
        grad_received = grads[: spec.state_count]
        grad_final = grads[spec.state_count : 2 * spec.state_count]
        started = time.perf_counter()
        # The adjoint of this rank's outgoing state: from the next rank, or (last rank) the
        # adjoint of the broadcast final state summed over the ranks.
        if spec.need_final:
            total = _pack([g if g is not None else torch.zeros_like(t) for g, t in zip(grad_final, templates)], spec.lead, spec.real).clone()
            dist.all_reduce(total, group=spec.group)
        if spec.rank < spec.world - 1:
            buffer = torch.empty_like(_pack(templates, spec.lead, spec.real))
            dist.recv(buffer, src=spec.global_rank(spec.rank + 1), group=spec.group)
            grad_outgoing = _unpack(buffer, templates, spec.lead)
        elif spec.need_final:
            grad_outgoing = _unpack(total, templates, spec.lead)
        else:
            grad_outgoing = [torch.zeros_like(t) for t in templates]
        spec.clock.backward += time.perf_counter() - started
        if received is None:  # rank 0: its outgoing state is its summary's state part
            grad_summary = [torch.zeros_like(p) for p in summary[: -spec.state_count]] + grad_outgoing
        else:
            with torch.enable_grad():
                leaves = [p.detach().requires_grad_(True) for p in summary]
                incoming = [r.detach().requires_grad_(True) for r in received]
                outgoing = spec.apply(leaves, incoming)
                grads_in = torch.autograd.grad(outgoing, leaves + incoming, grad_outgoing, allow_unused=True)
            grad_summary = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads_in[: spec.parts], summary)]
            grad_incoming = [
                (g if g is not None else torch.zeros_like(r)) + (l if l is not None else torch.zeros_like(r))
                for g, l, r in zip(grads_in[spec.parts :], grad_received, received)
            ]
            started = time.perf_counter()
            dist.send(_pack(grad_incoming, spec.lead, spec.real), dst=spec.global_rank(spec.rank - 1), group=spec.group)
            spec.clock.backward += time.perf_counter() - started
        return (None, torch.zeros(ctx.order_shape, dtype=spec.real, device=templates[0].device), *grad_summary)


class _Tie(torch.autograd.Function):
    """``value`` unchanged, with ``others`` in its graph (zero gradient), so that their backward runs on every rank."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, *others: torch.Tensor) -> torch.Tensor:
        ctx.shapes = [(o.shape, o.dtype) for o in others]
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad,) + tuple(torch.zeros(shape, dtype=dtype, device=grad.device) for shape, dtype in ctx.shapes)


def _pack(parts: Sequence[torch.Tensor], lead: tuple[int, ...], real: torch.dtype) -> torch.Tensor:
    pieces = []
    for part in parts:
        part = part.expand(lead + tuple(part.shape[len(lead):])) if part.dim() >= len(lead) else part
        if part.is_complex():  # stacked, not a real view: see _unpack
            part = torch.stack((part.real, part.imag), -1)
        pieces.append(part.to(real).reshape(-1))
    return torch.cat(pieces)


def _unpack(flat: torch.Tensor, templates: Sequence[torch.Tensor], lead: tuple[int, ...]) -> list[torch.Tensor]:
    parts, offset = [], 0
    for template in templates:
        shape = lead + tuple(template.shape[len(lead):])
        count = _numel(shape) * (2 if template.is_complex() else 1)
        piece = flat[offset : offset + count]
        offset += count
        if template.is_complex():
            # torch.complex, not view_as_complex: a complex view (and its backward) needs an
            # even storage offset, which an odd count of real numbers before the piece breaks.
            pair = piece.reshape(shape + (2,))
            piece = torch.complex(pair[..., 0], pair[..., 1])
        else:
            piece = piece.reshape(shape).to(template.dtype)
        parts.append(piece)
    return parts


# ---- the module ---------------------------------------------------------------------------


class SequenceParallel(nn.Module):
    """A compiled module run with its time axis sharded over a ``torch.distributed`` group.

    Call it on every rank of ``group`` with that rank's contiguous slice of every input,
    ``[B, T_r, *heads, *shape]`` (rank 0 holds the first steps; ``T_r`` may differ between
    ranks and may be 1).  It returns that rank's slice of the outputs, equal to the same
    slice of ``module`` run over the whole sequence in one process; with
    ``return_state=True`` also the state after the whole sequence, on every rank.
    ``state=`` (the initial state of the whole sequence) is read where each recurrence
    begins: a forward one's entry on rank 0, a reverse one's on the last rank.

    ``cu_seqlens=``: packed sequences (inputs ``[1, T_r, ...]``); every rank passes the same
    global offsets ``[N + 1]`` (from 0 to the whole packed length), ``state=`` and the
    returned state are ``[N, *heads, *shape]`` on every rank.

    ``group`` defaults to a new group of all ranks (every rank must construct the module,
    as for any ``new_group``); pass your own to shard within a subgroup, but not the group
    ``DistributedDataParallel`` reduces over.  ``exchanges`` lists, per recurrence, the
    summary exchanged and the correction; :meth:`describe` prints them.
    """

    def __init__(self, module: nn.Module, group: Any = None, exchange: Exchange | None = None) -> None:
        super().__init__()
        import torch.distributed as dist

        from .module import CompiledCell

        if not isinstance(module, CompiledCell):
            raise SequenceParallelError(f"SequenceParallel wraps a module made by recdsl.compile, got {type(module).__name__}", expected="SequenceParallel(recdsl.compile(...))")
        self.module = module
        # A module compiled with backend="newton" runs Newton's iterations with each linear
        # solve sharded (recdsl.distributed_newton); the others the chunked forms on slices.
        self.newton = module.plan.backend is BackendKind.NEWTON
        self.plan: ExecutionPlan = module.plan if self.newton else local_plan(module.analysis, module.plan.chunk_size)
        if exchange is not None and not isinstance(exchange, Exchange):
            raise SequenceParallelError(f"exchange must be an Exchange, got {exchange!r}", expected="None (chosen by size), Exchange.ALL_GATHER or Exchange.RING")
        self.exchanges: tuple[StepExchange, ...] = () if self.newton else plan_exchanges(self.plan, exchange)
        # Set: every recurrence uses it (tests compare both on one cell); None: each its planned one.
        self.exchange_override = exchange
        if not dist.is_available() or not dist.is_initialized():
            raise SequenceParallelError("torch.distributed is not initialised", expected="torch.distributed.init_process_group(...) on every rank first (torchrun does the rendezvous)")
        self.group = group if group is not None else dist.new_group(list(range(dist.get_world_size())))
        self.rank = dist.get_rank(self.group)
        self.world_size = dist.get_world_size(self.group)
        # What the last call sent, per exchange: (names, elements per rank, bytes per rank).
        self.last_exchange: list[tuple[tuple[str, ...], int, int]] = []
        # Seconds spent in the exchange's collectives, accumulated over calls (reset it to measure).
        self.collective_time = CollectiveTime()

    def describe(self, batch: int = 1, heads: int = 1, dtype: torch.dtype = torch.float32) -> str:
        """The exchange of each recurrence (summary, its size, correction) and the bytes one rank sends per call."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        if self.newton:
            from .distributed_newton import describe_newton

            return describe_newton(self.plan, self.world_size, batch, heads, itemsize)
        return describe_exchanges(self.plan.analysis, self.world_size, batch, heads, itemsize, self.plan.chunk_size)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, world_size={self.world_size}"

    def _packed(self, cu_seqlens: Any, batch: int, steps: int, device: torch.device) -> "_Packed":
        """The global offsets of a packed batch and where this rank's slice starts in it.

        Every rank passes the same global ``cu_seqlens`` (offsets into the whole packed
        sequence) and its own slice ``[1, T_r, ...]``; the slices' lengths are all-gathered
        (``P`` integers) so that each rank knows where its slice starts.
        """
        import torch.distributed as dist

        gathered = [torch.zeros(1, dtype=torch.long) for _ in range(self.world_size)]
        dist.all_gather(gathered, torch.tensor([steps], dtype=torch.long), group=self.group)
        lengths = [int(v) for v in torch.cat(gathered).tolist()]
        total = sum(lengths)
        # The module's own checks of the offsets, against the whole packed length.
        segments = self.module._check_offsets(cu_seqlens, batch, total, device)
        return _Packed(segments.offsets, sum(lengths[: self.rank]), steps, tuple(lengths))

    def _read_here(self, state: Any) -> Any:
        """The entries of a given ``state=`` this rank reads: those of forward recurrences on rank 0,
        of reverse ones (whose given value is the one after the last step) on the last rank."""
        if not isinstance(state, Mapping):
            return state  # the module's own check says what is wrong
        cell = self.module.cell
        reverse = set(cell.reversed_recurrences)
        here = {}
        for name, value in state.items():
            backwards = name.split(".")[0] in reverse
            if (backwards and self.rank == self.world_size - 1) or (not backwards and self.rank == 0):
                here[name] = value
        return here

    # ---- calling
    def forward(self, *args: torch.Tensor, state: Mapping[str, torch.Tensor] | None = None, return_state: bool = False, cu_seqlens: torch.Tensor | None = None, **kwargs: torch.Tensor):
        module = self.module
        inputs = module._bind_inputs(args, kwargs)
        batch, steps, heads = module._check_inputs(inputs)
        packed = None
        if cu_seqlens is not None:
            packed = self._packed(cu_seqlens, batch, steps, next(iter(inputs.values())).device)
            batch = len(packed.offsets) - 1  # states are per sequence
        numerics, output_dtype = module._numerics(inputs)
        module._check_param_devices(numerics.device)
        lead = (batch, *heads)
        defaults = module._initial_state(numerics, lead)
        carried = defaults
        if state is not None:
            # Packed: every rank reads the rows of the sequences that begin in its slice.
            carried = module._given_state(self._read_here(state) if packed is None else state, dict(carried), lead, numerics)
        cast_inputs, params, consts = module._cast(inputs, numerics)
        if self.newton:
            from .distributed_newton import run_sharded

            outputs, final = run_sharded(self, cast_inputs, params, consts, carried, numerics, need_final=return_state, packed=packed)
        else:
            runner = _SlicedRun(self, cast_inputs, params, consts, carried, numerics, need_final=return_state and packed is None, defaults=defaults)
            runner.packed = packed
            outputs, final = runner.run()
        if output_dtype is not None:
            outputs = [o if o.is_complex() else o.to(output_dtype) for o in outputs]
        result = outputs[0] if len(outputs) == 1 else tuple(outputs)
        if return_state:
            return result, final
        return result


@dataclass(frozen=True)
class CommunicationBytes:
    """Bytes one rank sends for one call: the all-gather forward, the all-to-all of adjoints backward."""

    forward: int
    backward: int


def communication_bytes(contributed_bytes: int, world_size: int, exchange: Exchange = Exchange.ALL_GATHER) -> CommunicationBytes:
    """What one rank sends for one exchange in which it contributes ``contributed_bytes``.

    All-gather (of summaries): forward, each rank's summary reaches ``P - 1`` others (a
    ring all-gather forwards ``P - 1`` summaries per rank); backward, an all-to-all of the
    ``[P, n]`` adjoints, each rank sending the ``P - 1`` rows that belong to the others.
    Ring (of states): one state forward, one adjoint backward, whatever ``P`` (plus one
    broadcast of the final state when ``return_state`` asks for it on every rank).
    """
    if world_size == 1:
        return CommunicationBytes(0, 0)
    if exchange is Exchange.RING:
        return CommunicationBytes(contributed_bytes, contributed_bytes)
    forward = (world_size - 1) * contributed_bytes
    backward = (world_size - 1) * contributed_bytes
    return CommunicationBytes(forward, backward)


# ---- one call -----------------------------------------------------------------------------


class _SlicedRun:
    """One call on one rank: the local plan's steps in schedule order, each exchanged and corrected."""

    def __init__(self, owner: SequenceParallel, inputs, params, consts, initial, numerics, need_final: bool = True, defaults: Mapping[str, torch.Tensor] | None = None) -> None:
        self.owner = owner
        self.need_final = need_final
        self.defaults = dict(defaults or {})  # the cell's own initial values (params may define them)
        self.plan = owner.plan
        self.analysis = self.plan.analysis
        self.cell = self.analysis.cell
        self.rank, self.world = owner.rank, owner.world_size
        self.numerics = numerics
        self.initial = initial
        first = next(iter(inputs.values()))
        self.lead = tuple(first.shape[: first.dim() - self.cell.inputs[0].type.rank])  # (B, T_r, *heads)
        self.state_lead = (self.lead[0],) + self.lead[2:]
        seq = _Sequences(numerics, self.lead)
        seq.values.update({(RefKind.PARAM, n): v for n, v in params.items()})
        seq.values.update({(RefKind.CONST, n): v for n, v in consts.items()})
        seq.values.update({(RefKind.INPUT, n): v for n, v in inputs.items()})
        for statement in self.cell.body:
            if isinstance(statement, ir.Assign) and statement.name in self.analysis.time_parallel:
                seq.values.pending[(RefKind.BINDING, statement.name)] = statement.value
        self.seq = seq
        self.order: torch.Tensor | None = None  # the last exchange's output (see _AllGather)
        self._reversed_view: "_SlicedRun | None" = None  # this run in reversed time (see _reverse_view)
        self.rows: dict[str, dict[int, torch.Tensor]] = {}  # packed: the final-state rows of the sequences this slice ends
        owner.last_exchange = []

    # -- the exchange
    def exchange(self, names: tuple[str, ...], parts: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """All ranks' summaries, ``[rank][part]``, gathered (differentiably) from this rank's ``parts``."""
        flat = _pack(parts, self.state_lead, self.numerics.real)
        gathered = _AllGather.apply(flat, self.order, self.owner.group, self.rank, self.world, self.owner.collective_time)
        self.order = gathered
        self.owner.last_exchange.append((names, flat.numel(), flat.numel() * flat.element_size()))
        return [_unpack(gathered[r], parts, self.state_lead) for r in range(self.world)]

    # -- helpers
    def full_state(self, state: StateAnalysis, fill: float) -> torch.Tensor:
        return torch.full(self.state_lead + tuple(state.type.shape), fill, dtype=self.numerics.dtype_of(state.type.kind), device=self.numerics.device)

    def evaluate_full(self, expr: ir.Expr, target: ir.Type) -> torch.Tensor:
        return self.seq.full(self.seq.evaluate(expr), expr.type, target)

    def exchange_level(self, requests: list["_Request"]) -> list[tuple]:
        """The exchanges of recurrences that do not read each other, batched: one collective per kind.

        Returns, per request, ``(S_in parts (None on rank 0), whole-sequence final parts)``.
        """
        answers: list[tuple | None] = [None] * len(requests)
        by_kind: dict[tuple[Exchange, bool], list[int]] = {}
        for i, request in enumerate(requests):
            # A ring runs one way: forward and reverse recurrences of a level take a ring each.
            kind = self.owner.exchange_override or request.planned.exchange
            by_kind.setdefault((kind, request.reverse and kind is Exchange.RING), []).append(i)
        for (kind, reverse), indices in by_kind.items():
            batch = [requests[i] for i in indices]
            names = tuple(name for r in batch for name in r.planned.names)
            if kind is Exchange.RING:
                # The ring carries the concatenated states; each summary keeps its transition parts in front.
                transitions = [r.parts[: len(r.parts) - r.state_count] for r in batch]
                states = [r.parts[len(r.parts) - r.state_count :] for r in batch]
                counts = [r.state_count for r in batch]

                position = self.world - 1 - self.rank if reverse else self.rank

                def apply_all(summary, state, transitions=transitions, counts=counts, batch=batch, position=position):
                    # summary = every request's transition parts, then every request's state parts.
                    out, t_at, s_at = [], 0, 0
                    tail = sum(len(t) for t in transitions)
                    for request, own, count in zip(batch, transitions, counts):
                        own_summary = list(summary[t_at : t_at + len(own)]) + list(summary[tail + s_at : tail + s_at + count])
                        if position in request.resets:  # this slice starts a sequence (packed): nothing received crosses it
                            out += own_summary[len(own_summary) - count :]
                        else:
                            out += request.apply(own_summary, list(state[s_at : s_at + count]))
                        t_at, s_at = t_at + len(own), s_at + count
                    return out

                received, whole = self.ring(names, [p for t in transitions for p in t] + [p for st in states for p in st], apply_all, sum(counts), reverse)
                at = 0
                for i, count in zip(indices, counts):
                    answers[i] = (None if received is None else received[at : at + count], whole[at : at + count])
                    at += count
                continue
            gathered = self.exchange(names, [p for r in batch for p in r.parts])
            at = 0
            for i, request in zip(indices, batch):
                own = [g[at : at + len(request.parts)] for g in gathered]
                at += len(request.parts)
                position = self.rank
                if request.reverse:  # an exclusive suffix: fold from the last rank back
                    own, position = own[::-1], self.world - 1 - self.rank

                def fold(upto: int, own=own, request=request) -> list[torch.Tensor]:
                    value = own[0][-request.state_count :]
                    for r in range(1, upto):
                        # A summary that starts a sequence (packed) drops what the fold holds.
                        value = own[r][-request.state_count :] if r in request.resets else request.apply(own[r], value)
                    return value

                answers[i] = (None if position == 0 else fold(position), fold(self.world))
        return answers

    def ring(self, names: tuple[str, ...], parts: list[torch.Tensor], apply, state_count: int, reverse: bool = False) -> tuple[list[torch.Tensor] | None, list[torch.Tensor]]:
        """The exclusive prefix passed rank to rank: each sends only its outgoing state (``reverse``: from the last rank back)."""
        position = self.world - 1 - self.rank if reverse else self.rank
        spec = _RingSpec(apply, len(parts), state_count, self.owner.group, position, self.world, self.state_lead, self.numerics.real, self.need_final, self.owner.collective_time, reverse=reverse)
        order = self.order if self.order is not None else parts[0].new_zeros(())
        results = _RingPrefix.apply(spec, order, *parts)
        received, whole, token = list(results[:state_count]), list(results[state_count : 2 * state_count]), results[-1]
        self.order = token
        sent = _pack(parts[-state_count:], self.state_lead, self.numerics.real)
        self.owner.last_exchange.append((names, sent.numel(), sent.numel() * sent.element_size()))
        return (None if position == 0 else received), whole

    def run(self) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        scans = {s.name: s for s in self.cell.scans}
        final: dict[str, torch.Tensor] = {}
        substitutions: dict[int, torch.Tensor] = {}
        for level in _levels(self.plan, self.owner.exchanges):
            # Each recurrence of a level runs its local pass up to its exchange; the level's
            # exchanges go out together; then each applies its correction.
            running = [(step, self._task(step, planned, final, substitutions)) for step, planned in level]
            requests = [next(task) for _, task in running]
            answers = self.exchange_level(requests)
            for (step, task), request, (received, whole) in zip(running, requests, answers):
                if request.single:
                    received, whole = (None if received is None else received[0]), whole[0]
                try:
                    task.send((received, whole))
                except StopIteration as done:
                    result = done.value
                else:  # pragma: no cover - each task yields once
                    raise AssertionError("a recurrence asked for two exchanges")
                if isinstance(result, _SegmentedResult):  # a packed slice with sequence boundaries
                    for name, sequence in result.sequences.items():
                        self.seq.values[(RefKind.STATE_NEW, name)] = sequence.expand(self.lead + self.analysis.state(name).type.shape)
                        self.seq.values[(RefKind.STATE_PREV, name)] = result.previous[name]
                    continue
                if len(step.names) > 1:  # a coupled group: per member
                    self._store_group(step, result, final)
                    continue
                (name,) = step.names
                if name in scans:
                    for carry, value in result.items():
                        self.seq.values[(RefKind.SCAN, f"{name}.{carry}")] = value
                    continue
                state = self.analysis.state(name)
                sequence, start, last = result
                final[name] = last
                if sequence is not None:
                    sequence = sequence.expand(self.lead + state.type.shape)
                    self.seq.values[(RefKind.STATE_NEW, name)] = sequence
                    self.seq.values.pending[(RefKind.STATE_PREV, name)] = functools.partial(_shift, sequence, start, self.analysis.direction(name))
        if self.packed is not None:
            final = self._packed_finals()
        outputs = []
        for emit, expanded in zip(self.cell.outputs, self.analysis.expanded_outputs):
            value = self.seq.evaluate(expanded, substitutions)
            outputs.append(self.seq.full(value, emit.value.type, emit.value.type).expand(self.lead + emit.value.type.shape))
        if self.order is not None and torch.is_grad_enabled() and self.order.requires_grad:
            # Every rank's backward must reach every exchange, whichever outputs or final states
            # its loss reads (the exchanges are chained, so reaching the last reaches all), and
            # the cell's initial values are used on every rank (zero gradient where a given state
            # or a later slice replaces them) so that DDP and FSDP see the same params on all ranks.
            extra = [v for v in [*self.defaults.values(), *self.initial.values()] if v.requires_grad]
            outputs = [_Tie.apply(o, self.order, *(extra if i == 0 else [])) for i, o in enumerate(outputs)]
            final = {k: _Tie.apply(v, self.order) for k, v in final.items()}
        return outputs, final

    # -- one recurrence
    def solve(self, step, planned: StepExchange, state: StateAnalysis, substitutions: dict) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(sequence or None, true initial state, whole-sequence final state)`` of one state on this slice."""
        name = state.state
        recurrence = state.recurrence
        first = self.rank == 0
        if _has_native_summary(step):
            from .distributed_native import solve_native

            return (yield from solve_native(self, step, planned, state, substitutions))
        match planned.correction:
            case Correction.NONE:
                sequence = Solver(self.plan, self.seq, self.initial).solve(step, state).expand(self.lead + state.type.shape)
                received, whole = yield _Request.single_state(planned, [sequence[:, -1]], lambda summary, s: summary[0])
                return sequence, self.initial[name] if first else received, whole
            case Correction.DECAY_PRODUCT:
                zero = self.initial[name] if first else self.full_state(state, 0.0)
                sequence = Solver(self.plan, self.seq, {name: zero}).solve(step, state).expand(self.lead + state.type.shape)
                # Rank 0's transition is never applied (the prefix starts from its final state): a stand-in.
                running = self._running_decay(recurrence.decay, state) if not first else None
                total = running[:, -1] if not first else self._stand_in(recurrence.decay, state, 1.0)
                received, whole = yield _Request.single_state(planned, [total, sequence[:, -1]], lambda summary, s: summary[0] * s + summary[1])
                start = self.initial[name] if first else received
                if not first:
                    sequence = sequence + running * start.unsqueeze(1)
                return sequence, start, whole
            case Correction.SEMIRING_DECAY:
                from .backends.scans import _tropical_times
                from .backends.torch_ops import ELEMENTWISE

                plus = ELEMENTWISE[recurrence.semiring.plus]
                zero = self.initial[name] if first else self.full_state(state, recurrence.semiring.zero)
                sequence = Solver(self.plan, self.seq, {name: zero}).solve(step, state).expand(self.lead + state.type.shape)
                running = self.evaluate_full(recurrence.decay, state.type).cumsum(1) if not first else None
                total = running[:, -1] if not first else self._stand_in(recurrence.decay, state, 0.0)
                received, whole = yield _Request.single_state(planned, [total, sequence[:, -1]], lambda summary, s: plus(_tropical_times(s, summary[0]), summary[1]))
                start = self.initial[name] if first else received
                if not first:
                    sequence = plus(_tropical_times(start.unsqueeze(1), running), sequence)
                return sequence, start, whole
            case Correction.RECOMPUTE if step.form is Form.SEMIRING_MATRIX_SCAN:
                return (yield from self._semiring_matrix(step, planned, state))
            case Correction.RECOMPUTE if step.form is Form.BLOCK_MATRIX_SCAN:
                return (yield from self._block_scan(step, planned, state))
            case Correction.RECOMPUTE:
                return (yield from self._matrix_scan(step, planned, state))
            case Correction.DECAYED_READOUT | Correction.TRANSITION_READOUT:
                return (yield from self._chunked(step, planned, state, substitutions))
        raise AssertionError(planned.correction)  # pragma: no cover - plan_exchanges rules this out

    def _stand_in(self, decay: ir.Expr, state: StateAnalysis, fill: float) -> torch.Tensor:
        """A constant in the shape of a decay's total over the slice (rank 0 sends it in place of its transition)."""
        shape = self.state_lead + (1,) * (state.type.rank - decay.type.rank) + tuple(decay.type.shape)
        dtype = self.numerics.dtype_of(decay.type.kind)
        return torch.full(shape, fill, dtype=dtype, device=self.numerics.device)

    def _running_decay(self, decay: ir.Expr, state: StateAnalysis) -> torch.Tensor:
        """``P_t = a_1 ... a_t`` over the slice, ``[B, T_r, *heads, *decay shape]``; in log space when the decay is provably positive."""
        log_decay = log_of_positive(decay, self.cell)
        if log_decay is not None:
            return self.evaluate_full(log_decay, state.type).cumsum(1).exp()
        return self.evaluate_full(decay, state.type).cumprod(1)

    def _semiring_matrix(self, step, planned: StepExchange, state: StateAnalysis):
        """A semiring matrix transition (CRF): the product of the slice's matrices, then the pass from the received state."""
        from .backends.scans import semiring_matmul
        from .backends.torch_ops import ELEMENTWISE, REDUCTIONS

        name = state.state
        recurrence = state.recurrence
        assert isinstance(recurrence, SemiringAffine)
        semiring = recurrence.semiring
        plus, reduce = ELEMENTWISE[semiring.plus], REDUCTIONS[semiring.reduce]
        reduce_fn = lambda x, dim: reduce(x, (dim,))  # noqa: E731
        size = _numel(state.type.shape)
        solver = Solver(self.plan, self.seq, self.initial)
        dtype = self.numerics.real
        standin = torch.finfo(dtype).min if semiring.zero == float("-inf") else semiring.zero
        basis = torch.full((size, size), standin, dtype=dtype, device=self.numerics.device)
        basis.fill_diagonal_(semiring.one)
        rows = solver._apply_to_basis(state, recurrence.transition, basis)
        if standin != semiring.zero:
            rows = rows.masked_fill(rows < standin / 2, semiring.zero)
        matrices = rows.movedim(0, -2).movedim(1, 0)  # [T_r, B, *heads, size, size]
        while matrices.shape[0] > 1:  # the ordered product, pairwise: log depth
            pairs = matrices.shape[0] // 2
            product = semiring_matmul(matrices[0 : 2 * pairs : 2], matrices[1 : 2 * pairs : 2], reduce_fn)
            matrices = torch.cat([product, matrices[2 * pairs :]], 0)
        transition = matrices[0]
        first = self.rank == 0
        if first:
            sequence = solver.solve(step, state).expand(self.lead + state.type.shape)
            last = sequence[:, -1]
        elif recurrence.input is not None:
            # The local final state from the semiring zero; with no input term it stays the zero.
            sequence = None
            last = Solver(self.plan, self.seq, {name: self.full_state(state, semiring.zero)}).solve(step, state)[:, -1]
        else:
            sequence, last = None, self.full_state(state, semiring.zero)
        flat_shape = self.state_lead + (size,)

        def apply(summary, s):
            moved = semiring_matmul(s.reshape(flat_shape).unsqueeze(-2), summary[0], reduce_fn).squeeze(-2).reshape(s.shape)
            return plus(moved, summary[1])

        received, whole = yield _Request.single_state(planned, [transition, last], apply)
        start = self.initial[name] if first else received
        if not first:
            sequence = Solver(self.plan, self.seq, {name: start}).solve(step, state).expand(self.lead + state.type.shape)
        return sequence, start, whole

    def _matrix_scan(self, step, planned: StepExchange, state: StateAnalysis):
        """A low-rank or dense transition scanned as explicit matrices: their ordered product, then the pass from the received state."""
        name = state.state
        first = self.rank == 0
        solver = _CapturingSolver(self.plan, self.seq, {name: self.initial[name] if first else self.full_state(state, 0.0)})
        sequence = solver.solve(step, state).expand(self.lead + state.type.shape)
        matrices, flat, transposed = solver.captured
        matrices = matrices.to(sequence.dtype).movedim(1, 0)  # [T_r, B, *heads, K, K]
        while matrices.shape[0] > 1:  # M_T ... M_1, pairwise: log depth
            pairs = matrices.shape[0] // 2
            product = matrices[1 : 2 * pairs : 2] @ matrices[0 : 2 * pairs : 2]
            matrices = torch.cat([product, matrices[2 * pairs :]], 0)

        def apply(summary, s):
            if transposed:  # S_t^T = M_t S_{t-1}^T + B_t^T
                moved = (summary[0] @ s.transpose(-1, -2)).transpose(-1, -2)
            elif flat:  # a map on the flattened state
                moved = (summary[0] @ s.reshape(self.state_lead + (-1, 1))).reshape(s.shape)
            else:
                moved = summary[0] @ s
            return moved + summary[1]

        received, whole = yield _Request.single_state(planned, [matrices[0], sequence[:, -1]], apply)
        start = self.initial[name] if first else received
        if not first:
            sequence = Solver(self.plan, self.seq, {name: start}).solve(step, state).expand(self.lead + state.type.shape)
        return sequence, start, whole

    def _block_scan(self, step, planned: StepExchange, state: StateAnalysis):
        """A block-diagonal transition: the products of the slice's block matrices, then the pass from the received state."""
        name = state.state
        recurrence = state.recurrence
        assert isinstance(recurrence, MatrixAffine)
        first = self.rank == 0
        solver = _CapturingSolver(self.plan, self.seq, {name: self.initial[name] if first else self.full_state(state, 0.0)})
        sequence = solver.solve(step, state).expand(self.lead + state.type.shape)
        assert solver.captured_blocks is not None
        matrices = solver.captured_blocks.to(sequence.dtype).movedim(1, 0)  # [T_r, B, *heads, blocks, m, m]
        while matrices.shape[0] > 1:  # M_T ... M_1, pairwise: log depth
            pairs = matrices.shape[0] // 2
            product = matrices[1 : 2 * pairs : 2] @ matrices[0 : 2 * pairs : 2]
            matrices = torch.cat([product, matrices[2 * pairs :]], 0)
        # The state's layout in blocks, as Solver.blocks lays it out: block axes first, then the rest.
        axes = recurrence.blocks.axes if recurrence.blocks is not None else ()
        rank = state.type.rank
        order = axes + tuple(a for a in range(rank) if a not in axes)
        inverse = tuple(order.index(a) for a in range(rank))
        kept = len(self.state_lead)
        size = planned.summary[0].shape[-1]

        def apply(summary, s):
            moved = s.permute(tuple(range(kept)) + tuple(kept + a for a in order))
            blocked = moved.reshape(moved.shape[: kept] + (-1, size, 1))
            mapped = (summary[0] @ blocked).reshape(moved.shape)
            return mapped.permute(tuple(range(kept)) + tuple(kept + a for a in inverse)) + summary[1]

        received, whole = yield _Request.single_state(planned, [matrices[0], sequence[:, -1]], apply)
        start = self.initial[name] if first else received
        if not first:
            sequence = Solver(self.plan, self.seq, {name: start}).solve(step, state).expand(self.lead + state.type.shape)
        return sequence, start, whole

    def _chunked(self, step, planned: StepExchange, state: StateAnalysis, substitutions: dict):
        """A matrix state read out linearly: chunked pass from zero, summary, read-outs corrected."""
        name = state.state
        chunk = step.chunk
        assert chunk is not None
        first = self.rank == 0
        zero = self.initial[name] if first else self.full_state(state, 0.0)
        if planned.correction is Correction.DECAYED_READOUT:
            ran = _run_chunk_plan(self.seq, chunk, state, zero, self.plan.chunk_size)
            if ran is None:
                raise SequenceParallelError(
                    f"state '{name}': the chunked pass met non-finite keys, values or decays on rank {self.rank}",
                    expected="finite inputs (the sequence-parallel chunked form has no scan fallback)",
                )
            readouts, last = ran
            running_log = self.evaluate_full(chunk.log_decay, state.type).cumsum(1) if not first else None  # [B, T_r, *heads, r or 1, c or 1]
            total = running_log[:, -1].exp() if not first else self._stand_in(chunk.log_decay, state, 1.0)
            received, whole = yield _Request.single_state(planned, [total, last], lambda summary, s: summary[0] * s + summary[1])
            start = self.initial[name] if first else received
            if not first:
                running = running_log.exp()
                readouts = [r + self._decayed_readout(q, running, start, chunk.transposed) for r, q in zip(readouts, chunk.queries)]
        else:
            readouts, last, transition_readouts, transition = self._delta_rule(chunk, state, zero)
            received, whole = yield _Request.single_state(planned, [transition, last], lambda summary, s: summary[0] @ s + summary[1])
            start = self.initial[name] if first else received
            if not first:
                readouts = [r + (p.unsqueeze(-2) @ start.unsqueeze(1)).squeeze(-2) for r, p in zip(readouts, transition_readouts)]
        for node, value in zip(chunk.readouts, readouts):
            substitutions[id(node)] = value
        return None, start, whole

    def _decayed_readout(self, query: ir.Expr, running: torch.Tensor, start: torch.Tensor, transposed: bool) -> torch.Tensor:
        """``q_t (D_t * S_in)`` (or ``(D_t * S_in) q_t``) without forming ``D_t * S_in`` per step."""
        rows, columns = start.shape[-2:]
        along_rows = running.shape[-2] != 1
        along_columns = running.shape[-1] != 1
        s_in = start.unsqueeze(1)  # [B, 1, *heads, r, c]
        if not transposed:  # q @ S: q runs along the rows
            q = self.evaluate_full(query, ir.Type((rows,))).expand(self.lead + (rows,))
            if along_rows:
                return ((q * running[..., 0]).unsqueeze(-2) @ s_in).squeeze(-2)
            return (q.unsqueeze(-2) @ s_in).squeeze(-2) * running[..., 0, :]
        q = self.evaluate_full(query, ir.Type((columns,))).expand(self.lead + (columns,))
        if along_columns:
            return (s_in @ (q * running[..., 0, :]).unsqueeze(-1)).squeeze(-1)
        return (s_in @ q.unsqueeze(-1)).squeeze(-1) * running[..., 0]

    def _delta_rule(self, chunk, state: StateAnalysis, start: torch.Tensor):
        """The chunked delta rule on the widened state ``[S | Phi]`` from ``[start | I]``.

        ``Phi_t`` is the product of the transitions ``I - beta k k^T`` so far (the pass with
        no input from the identity); its read-outs ``q_t Phi_t`` give each step's
        correction ``(q_t Phi_t) S_in`` and its last value the slice's transition.
        """
        from .backends import chunk_kernels

        recurrence = state.recurrence
        assert isinstance(recurrence, MatrixAffine)
        lead, seq = self.lead, self.seq
        batch_dims = (lead[0],) + lead[2:]
        rows, columns = state.type.shape

        def flat_vector(expr: ir.Expr, length: int) -> torch.Tensor:
            value = seq.full(seq.evaluate(expr), expr.type, ir.Type((length,))).expand(lead + (length,))
            return value.movedim(1, -2).reshape((-1, lead[1], length))

        def flat_scalar(expr: ir.Expr) -> torch.Tensor:
            value = seq.full(seq.evaluate(expr), expr.type, ir.Type(())).expand(lead)
            return value.movedim(1, -1).reshape((-1, lead[1]))

        term = recurrence.low_rank[0]
        left, right = flat_vector(term.left, rows), flat_vector(term.right, rows)
        coefficient = flat_scalar(term.coefficient)
        values = []
        for input_term in chunk.inputs:
            column = flat_vector(input_term.column, columns)
            if input_term.coefficient is not None:
                column = column * flat_scalar(input_term.coefficient).unsqueeze(-1)
            values.append(torch.cat([column, column.new_zeros(column.shape[:-1] + (rows,))], -1))
        flat_start = start.reshape((-1, rows, columns))
        eye = torch.eye(rows, dtype=flat_start.dtype, device=flat_start.device).expand(flat_start.shape[0], rows, rows)
        widened = torch.cat([flat_start, eye], -1)
        queries = [flat_vector(q, rows) for q in chunk.queries]
        results, final = chunk_kernels.delta_rule(queries, left, right, coefficient, values, widened, self.plan.chunk_size)
        unflatten = lambda x: x.reshape(batch_dims + x.shape[1:]).movedim(-2, 1)  # noqa: E731
        readouts = [unflatten(r[..., :columns]) for r in results]
        transition_readouts = [unflatten(r[..., columns:]) for r in results]
        final = final.reshape(batch_dims + final.shape[1:])
        return readouts, final[..., :columns], transition_readouts, final[..., columns:]

    # -- a declared monoid
    def monoid(self, scan: ir.ScanAssign, final: dict) -> dict[str, torch.Tensor]:
        from .backends.torch_ops import combine_carries

        names = [c.name for c in scan.monoid.carries]
        keys = [f"{scan.name}.{n}" for n in names]
        if self.rank == 0:
            local = Solver(self.plan, self.seq, self.initial).scan(scan)
        else:
            identity = {k: self.initial_identity(scan, n) for k, n in zip(keys, names)}
            local = Solver(self.plan, self.seq, identity).scan(scan)
        planned = next(e for e in self.owner.exchanges if e.names == (scan.name,))
        received, whole = yield _Request(planned, [local[n][:, -1] for n in names], self.monoid_apply(scan), len(names))
        if self.rank > 0:
            carried = {n: v.unsqueeze(1) for n, v in zip(names, received)}
            combined = combine_carries(scan.monoid, *((local, carried) if scan.reverse else (carried, local)), self.numerics)
            local = {n: combined[n] for n in names}
        for key, value in zip(keys, whole):
            final[key] = value
        return local

    def monoid_apply(self, scan: ir.ScanAssign):
        """How a carry crosses a slice's summary (its carry): ``combine(carry, summary)``."""
        from .backends.torch_ops import combine_carries

        names = [c.name for c in scan.monoid.carries]

        def apply(summary, carry):
            # A reverse scan (run here in reversed time) folds this slice before the later carry.
            earlier, later = (summary, carry) if scan.reverse else (carry, summary)
            combined = combine_carries(scan.monoid, dict(zip(names, earlier)), dict(zip(names, later)), self.numerics)
            return [combined[n] for n in names]

        return apply

    def initial_identity(self, scan: ir.ScanAssign, carry: str) -> torch.Tensor:
        """The monoid's identity for ``carry``, the carry a slice other than the first starts from."""
        from .backends.torch_ops import Evaluator

        declared = next(c for c in scan.monoid.carries if c.name == carry)
        value = Evaluator(self.numerics, {}).evaluate(declared.identity).to(self.numerics.dtype_of(declared.type.kind))
        return value.expand(self.state_lead + declared.type.shape)


    # -- dispatch, reverse time and coupled groups
    def _task(self, step, planned: StepExchange, final: dict, substitutions: dict):
        """The generator of one plan step: local pass, one exchange request, correction."""
        if self.packed is not None:
            return self._packed_task(step, planned, substitutions)
        if planned.direction is ir.Direction.REVERSE:
            return self._in_reverse(step, planned, final, substitutions)
        return self._local(step, planned, final, substitutions)

    def _local(self, step, planned: StepExchange, final: dict, substitutions: dict):
        if len(step.names) > 1:
            return self._joint(step, planned)
        (name,) = step.names
        scan = next((s for s in self.cell.scans if s.name == name), None)
        if scan is not None:
            return self.monoid(scan, final)
        return self.solve(step, planned, self.analysis.state(name), substitutions)

    def _reverse_view(self) -> "_SlicedRun":
        """This run with time reversed, where a reverse recurrence is a forward one.

        Its values are this run's flipped on read (as the parallel backend solves reverse
        groups) and its rank counts from the last: rank ``P - 1`` starts from the initial
        (or given) state and each rank's initial state is the exclusive suffix of the later
        ranks' summaries.  Every form's local pass, summary and correction apply unchanged.
        """
        view = self._reversed_view
        if view is None:
            view = copy.copy(self)
            view.seq = _time_reversed(self.seq, self.cell)
            view.rank = self.world - 1 - self.rank
            self._reversed_view = view
        else:  # the values this run gained since (states of earlier levels)
            _follow(view.seq, self.seq)
        return view

    def _in_reverse(self, step, planned: StepExchange, final: dict, substitutions: dict):
        """A reverse recurrence: its local pass in the reversed view, its request folded from the last rank, its values flipped back."""
        flipped: dict[int, torch.Tensor] = {}
        task = self._reverse_view()._local(step, planned, final, flipped)
        request = next(task)
        answer = yield replace(request, reverse=True)
        try:
            task.send(answer)
        except StopIteration as done:
            result = done.value
        else:  # pragma: no cover - each task yields once
            raise AssertionError("a recurrence asked for two exchanges")
        back = lambda x: x.flip(1)  # noqa: E731
        substitutions.update({key: back(value) for key, value in flipped.items()})
        if len(step.names) > 1:
            sequences, starts, wholes = result
            return {n: back(v) for n, v in sequences.items()}, starts, wholes
        if any(s.name == step.names[0] for s in self.cell.scans):
            return {carry: back(value) for carry, value in result.items()}
        sequence, start, whole = result
        return (None if sequence is None else back(sequence)), start, whole

    def _joint(self, step, planned: StepExchange):
        """A coupled group scanned jointly: the products of its slice's joint block matrices, then the pass from the received states."""
        group = self.analysis.group(step.names)
        assert group is not None and isinstance(group.recurrence, JointAffine)
        joint = group.recurrence
        names = step.names
        states = [self.analysis.state(n) for n in names]
        first = self.rank == 0
        solver = _CapturingSolver(self.plan, self.seq, {n: self.initial[n] if first else self.full_state(s, 0.0) for n, s in zip(names, states)})
        sequences = Solver.joint(solver, step)
        assert solver.captured_blocks is not None
        matrices = solver.captured_blocks.to(sequences[names[0]].dtype).movedim(1, 0)  # [T_r, B, *heads, blocks, m, m]
        while matrices.shape[0] > 1:  # M_T ... M_1, pairwise: log depth
            pairs = matrices.shape[0] // 2
            product = matrices[1 : 2 * pairs : 2] @ matrices[0 : 2 * pairs : 2]
            matrices = torch.cat([product, matrices[2 * pairs :]], 0)
        _, _, order = _joint_layout(self.analysis, joint)
        inverse = tuple(order.index(a) for a in range(len(order)))
        axes = joint.blocks.axes if joint.blocks is not None else ()
        kept = len(self.state_lead)
        block_shape = tuple(states[0].type.shape[a] for a in axes)
        sizes = [_numel([s.type.shape[a] for a in order[len(axes):]]) for s in states]

        def apply(summary, values):
            stacked = []
            for value, size in zip(values, sizes):  # each member in the block layout: [*lead, blocks, its elements]
                moved = value.permute(tuple(range(kept)) + tuple(kept + a for a in order))
                stacked.append(moved.reshape(moved.shape[:kept] + (-1, size)))
            mapped = (summary[0] @ torch.cat(stacked, -1).unsqueeze(-1)).squeeze(-1)
            out, at = [], 0
            for value, state, size, final in zip(values, states, sizes, summary[1:]):
                inner = tuple(state.type.shape[a] for a in order[len(axes):])
                piece = mapped[..., at : at + size].reshape(mapped.shape[:kept] + block_shape + inner)
                out.append(piece.permute(tuple(range(kept)) + tuple(kept + a for a in inverse)) + final)
                at += size
            return out

        lasts = [sequences[n].expand(self.lead + s.type.shape)[:, -1] for n, s in zip(names, states)]
        received, whole = yield _Request(planned, [matrices[0], *lasts], apply, len(names))
        starts = dict(zip(names, [self.initial[n] for n in names] if first else received))
        if not first:
            sequences = Solver.joint(Solver(self.plan, self.seq, starts), step)
        return sequences, starts, dict(zip(names, whole))

    def _store_group(self, step, result, final: dict) -> None:
        """A coupled group's corrected sequences, initial and whole-sequence final states, per member."""
        sequences, starts, wholes = result
        direction = self.analysis.direction(step.names)
        for name in step.names:
            state = self.analysis.state(name)
            final[name] = wholes[name]
            sequence = sequences[name].expand(self.lead + state.type.shape)
            self.seq.values[(RefKind.STATE_NEW, name)] = sequence
            self.seq.values.pending[(RefKind.STATE_PREV, name)] = functools.partial(_shift, sequence, starts[name], direction)

    # -- packed sequences (cu_seqlens)
    packed: "_Packed | None" = None

    def _packed_task(self, step, planned: StepExchange, substitutions: dict):
        """One recurrence of a packed batch: the slice's summary is cut by a sequence boundary inside it.

        In the recurrence's own time (reversed for a reverse one), a slice that holds no
        sequence's first step runs as any slice does.  One that holds one has a summary
        whose transition is the semiring's zero (a reset: nothing received crosses the
        boundary) and whose state is its value at the slice's end; its local pass runs with
        the sequences' resets (the scan backend's segments), and again from the received
        state when its first steps continue a sequence of the earlier ranks.  A declared
        monoid has no zero: its summary is its carry, and the folds restart at the slices
        holding a first step (:attr:`_Request.resets`, set here for every recurrence).
        """
        reverse = planned.direction is ir.Direction.REVERSE
        run = self._reverse_view() if reverse else self
        frame = _FrameSlice.of(self.packed, reverse)
        flipped: dict[int, torch.Tensor] = {}
        scan = next((s for s in self.cell.scans if s.name == step.names[0]), None)
        if frame.has_start and scan is not None:
            result = yield from run._segmented_monoid(scan, planned, frame, reverse)
        elif frame.has_start:
            result = yield from run._segmented(step, planned, frame, flipped, reverse)
        else:
            result = yield from run._continuing(step, planned, frame, flipped, reverse)
        back = (lambda x: x.flip(1)) if reverse else (lambda x: x)  # noqa: E731
        substitutions.update({key: back(value) for key, value in flipped.items()})
        if isinstance(result, _SegmentedResult):
            return _SegmentedResult({n: back(v) for n, v in result.sequences.items()}, {n: back(v) for n, v in result.previous.items()})
        if scan is not None:  # a monoid's carries
            return {carry: back(value) for carry, value in result.items()}
        if len(step.names) > 1:
            sequences, starts, wholes = result
            return {n: back(v) for n, v in sequences.items()}, starts, wholes
        sequence, start, whole = result
        return (None if sequence is None else back(sequence)), start, whole

    def _continuing(self, step, planned: StepExchange, frame: "_FrameSlice", substitutions: dict, reverse: bool):
        """A slice inside one sequence: the usual pass; its end value, if it ends the sequence, is a row of the final state."""
        task = self._local(step, planned, {}, substitutions)
        request = next(task)
        answer = yield replace(request, reverse=reverse, resets=self._starting_positions(reverse))
        try:
            task.send(answer)
        except StopIteration as done:
            result = done.value
        else:  # pragma: no cover - each task yields once
            raise AssertionError("a recurrence asked for two exchanges")
        if frame.ends[0]:
            received = [answer[0]] if request.single else answer[0]
            scan = next((s for s in self.cell.scans if s.name == step.names[0]), None)
            keys = step.names if scan is None else [f"{scan.name}.{c.name}" for c in scan.monoid.carries]
            for name, value in zip(keys, request.apply(request.parts, received)):
                self.rows.setdefault(name, {})[frame.sequences[0]] = value[0]
        return result

    def _segmented(self, step, planned: StepExchange, frame: "_FrameSlice", substitutions: dict, reverse: bool):
        """A slice that holds a sequence's first step: reset summary, segmented local pass (see :meth:`_packed_task`).

        Up to three local passes: the form's own (for its combine), the segmented one, and
        the segmented one again from the received state when the first steps continue a
        sequence.  Deriving each form's combine without its pass would save the first.
        """
        from .backends.segments import Segments

        names = step.names
        states = [self.analysis.state(n) for n in names]
        # The form's own request, from a slice that is not the first, gives its combine (how a
        # state crosses a summary), which every rank's fold applies to every summary.
        probe = copy.copy(self)
        probe.rank = max(1, self.rank)
        task = probe._local(step, planned, {}, {})
        request = next(task)
        task.close()
        segments = Segments.of(frame.offsets, self.numerics.device)
        if step.form not in _SEGMENTED_FORMS and step.fallback is None:
            raise SequenceParallelError(
                f"{', '.join(repr(n) for n in names)} run{'s' if len(names) == 1 else ''} as a {step.form.name.lower().replace('_', ' ')}, which has no pass with sequence resets for cu_seqlens",
                expected="cu_seqlens with cells whose recurrences have scan or chunked forms",
            )
        form_step = step if step.form in _SEGMENTED_FORMS else replace(step, form=step.fallback, conv=None, chunk=None)

        def initial_rows(carry: list[torch.Tensor] | None) -> dict[str, torch.Tensor]:
            rows = {}
            for i, (name, state) in enumerate(zip(names, states)):
                pieces = []
                for j, sequence in enumerate(frame.sequences):
                    if j == 0 and frame.continues:
                        pieces.append(carry[i] if carry is not None else self.full_state(state, 0.0))
                    else:
                        pieces.append(self.initial[name][sequence : sequence + 1])
                rows[name] = torch.cat([p.to(self.numerics.dtype_of(state.type.kind)) for p in pieces], 0)
            return rows

        def local_pass(carry):
            starts = initial_rows(carry)
            if len(names) > 1:
                sequences = Solver(self.plan, self.seq, starts, segments).joint(form_step)
                return sequences, None, {n: segments.finals(v) for n, v in sequences.items()}, starts
            (name,), (state,) = names, states
            if form_step.form is Form.CHUNKED:
                assert form_step.chunk is not None
                ran = _run_chunk_plan(self.seq, form_step.chunk, state, starts[name], self.plan.chunk_size, None, segments)
                if ran is None:
                    raise SequenceParallelError(
                        f"state '{name}': the chunked pass met non-finite keys, values or decays",
                        expected="finite inputs (the sequence-parallel chunked form has no scan fallback)",
                    )
                return None, ran[0], {name: ran[1]}, starts
            sequence = Solver(self.plan, self.seq, starts, segments).solve(form_step, state).expand(self.lead + state.type.shape)
            return {name: sequence}, None, {name: segments.finals(sequence)}, starts

        sequences, readouts, lasts, starts = local_pass(None)
        resets = []
        for part in planned.summary[: len(planned.summary) - planned.state_count]:
            recurrence = states[0].recurrence
            dtype = self.numerics.complex if part.is_complex else self.numerics.real
            # The semiring's zero; the most negative finite number stands in for -inf, whose
            # logsumexp has a NaN gradient (its effect on every finite state is the zero's).
            fill = torch.finfo(self.numerics.real).min if isinstance(recurrence, SemiringAffine) and recurrence.semiring.zero == float("-inf") else 0.0
            resets.append(torch.full(self.state_lead + part.shape, fill, dtype=dtype, device=self.numerics.device))
        parts = resets + [lasts[n][-1:].reshape(self.state_lead + s.type.shape) for n, s in zip(names, states)]
        answer = yield replace(request, parts=parts, reverse=reverse, resets=self._starting_positions(reverse))
        received = answer[0]
        if frame.continues:  # its first steps continue a sequence: again from the received state
            sequences, readouts, lasts, starts = local_pass([received] if request.single else received)
        for j, (sequence, ends) in enumerate(zip(frame.sequences, frame.ends)):
            if ends:
                for name in names:
                    self.rows.setdefault(name, {})[sequence] = lasts[name][j]
        if readouts is not None:
            for node, value in zip(step.chunk.readouts, readouts):
                substitutions[id(node)] = value
            return _SegmentedResult({}, {})
        return _SegmentedResult(sequences, {n: segments.shift(sequences[n], starts[n]) for n in names})

    def _segmented_monoid(self, scan: ir.ScanAssign, planned: StepExchange, frame: "_FrameSlice", reverse: bool):
        """A slice that holds a sequence's first step, for a declared monoid.

        One segmented scan of the slice (each sequence from its row of the initial carries;
        the first from the identity when it continues a sequence of the earlier ranks).  Its
        carry at the slice's end is its summary, which starts a sequence: the folds drop
        what comes before it (:attr:`_Request.resets`).  The received carry is combined
        into the first segment's steps only.
        """
        from .backends.segments import Segments
        from .backends.torch_ops import combine_carries

        names = [c.name for c in scan.monoid.carries]
        starts = {}
        for carry in scan.monoid.carries:
            key = f"{scan.name}.{carry.name}"
            rows = [self.initial_identity(scan, carry.name)[:1] if j == 0 and frame.continues else self.initial[key][sequence : sequence + 1] for j, sequence in enumerate(frame.sequences)]
            starts[key] = torch.cat([r.to(self.numerics.dtype_of(carry.type.kind)) for r in rows], 0)
        local = Solver(self.plan, self.seq, starts, Segments.of(frame.offsets, self.numerics.device)).scan(scan)
        request = _Request(planned, [local[n][:, -1] for n in names], self.monoid_apply(scan), len(names), reverse=reverse, resets=self._starting_positions(reverse))
        received, _ = yield request
        if frame.continues:
            head = frame.offsets[1]
            first = {n: local[n][:, :head] for n in names}
            carried = {n: v.unsqueeze(1) for n, v in zip(names, received)}
            combined = combine_carries(scan.monoid, *((first, carried) if scan.reverse else (carried, first)), self.numerics)
            local = {n: torch.cat([combined[n].expand(first[n].shape), local[n][:, head:]], 1) for n in names}
        for j, (sequence, ends) in enumerate(zip(frame.sequences, frame.ends)):
            if ends:
                for name in names:
                    self.rows.setdefault(f"{scan.name}.{name}", {})[sequence] = local[name][0, frame.offsets[j + 1] - 1]
        return local

    def _starting_positions(self, reverse: bool) -> frozenset[int]:
        """The positions (in the fold's order: from the last rank for a reverse recurrence) of the slices that hold a sequence's first step."""
        positions, begin = set(), 0
        for rank, length in enumerate(self.packed.lengths):
            if _FrameSlice.of(replace(self.packed, begin=begin, length=length), reverse).has_start:
                positions.add(self.world - 1 - rank if reverse else rank)
            begin += length
        return frozenset(positions)

    def _packed_finals(self) -> dict[str, torch.Tensor]:
        """Each sequence's final state ``[N, *heads, *shape]`` (and monoid carry) on every rank: the rows each rank holds, summed over the ranks."""
        count = len(self.packed.offsets) - 1
        carried = self.owner.module._carried_types()
        names = list(carried)
        finals = []
        for name in names:
            declared = carried[name]
            zero = torch.zeros(self.state_lead[1:] + declared.shape, dtype=self.numerics.dtype_of(declared.kind), device=self.numerics.device)
            held = self.rows.get(name, {})
            finals.append(torch.stack([held[n].reshape(zero.shape).to(zero.dtype) if n in held else zero for n in range(count)]))
        lead = (count,) + self.state_lead[1:]
        flat = _pack(finals, lead, self.numerics.real)
        order = self.order if self.order is not None else flat.new_zeros(())
        summed = _AllReduceSum.apply(flat, order, self.owner.group, self.owner.collective_time)
        self.order = summed
        self.owner.last_exchange.append((tuple(names), flat.numel(), flat.numel() * flat.element_size()))
        return dict(zip(names, _unpack(summed, finals, lead)))


@dataclass(frozen=True)
class _Packed:
    """A packed batch as one rank sees it: the global offsets and its slice of the packed time axis."""

    offsets: tuple[int, ...]
    begin: int  # the slice's first step in the packed sequence
    length: int
    lengths: tuple[int, ...] = ()  # every rank's slice length, in rank order


@dataclass(frozen=True)
class _FrameSlice:
    """A rank's slice of a packed batch in one recurrence's time (reversed for a reverse one).

    ``offsets`` cut the slice into local segments at the sequences' first steps (in that
    time: a reverse recurrence's sequences begin at their last steps); ``sequences`` is
    each segment's sequence, ``ends`` whether the segment ends it, and ``continues``
    whether the first segment continues a sequence from the ranks before.
    """

    offsets: tuple[int, ...]
    sequences: tuple[int, ...]
    ends: tuple[bool, ...]
    continues: bool

    @property
    def has_start(self) -> bool:
        return not self.continues or len(self.offsets) > 2

    @staticmethod
    def of(packed: _Packed, reverse: bool) -> "_FrameSlice":
        import bisect

        total = packed.offsets[-1]
        count = len(packed.offsets) - 1
        if reverse:  # sequence k of reversed time is sequence count - 1 - k
            bounds = [total - o for o in reversed(packed.offsets)]
            ids = list(range(count - 1, -1, -1))
            begin = total - packed.begin - packed.length
        else:
            bounds, ids, begin = list(packed.offsets), list(range(count)), packed.begin
        end = begin + packed.length
        starts = [o - begin for o in bounds[:-1] if begin <= o < end]
        local = sorted(set([0, packed.length] + starts))
        sequences = tuple(ids[bisect.bisect_right(bounds, begin + a) - 1] for a in local[:-1])
        ends = tuple(begin + b in bounds for b in local[1:])
        return _FrameSlice(tuple(local), sequences, ends, 0 not in starts)


@dataclass(frozen=True)
class _SegmentedResult:
    """A recurrence's values on a slice with sequence boundaries: its sequences and previous values (none when chunked)."""

    sequences: dict
    previous: dict


# The forms whose segmented pass runs as planned; others (a convolution) run their fallback scan.
_SEGMENTED_FORMS = frozenset({Form.TIME_PARALLEL, Form.LINEAR_SCAN, Form.LOW_RANK_MATRIX_SCAN, Form.DENSE_MATRIX_SCAN, Form.BLOCK_MATRIX_SCAN, Form.SEMIRING_DIAGONAL_SCAN, Form.SEMIRING_MATRIX_SCAN, Form.CHUNKED, Form.JOINT_MATRIX_SCAN})


class _AllReduceSum(torch.autograd.Function):
    """The sum over the ranks of one flat tensor per rank (each sequence's final state is held by one rank); backward, the same sum of the adjoints."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, order: torch.Tensor, group: Any, clock: "CollectiveTime") -> torch.Tensor:
        import torch.distributed as dist

        summed = flat.detach().clone()
        started = time.perf_counter()
        dist.all_reduce(summed, group=group)
        clock.forward += time.perf_counter() - started
        ctx.group, ctx.clock, ctx.order_shape = group, clock, order.shape
        return summed

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed as dist

        summed = grad.contiguous().clone()
        started = time.perf_counter()
        dist.all_reduce(summed, group=ctx.group)
        ctx.clock.backward += time.perf_counter() - started
        return summed, grad.new_zeros(ctx.order_shape), None, None


@dataclass(frozen=True)
class _Request:
    """What a recurrence's local pass asks of the exchange: its summary and how a state crosses it."""

    planned: StepExchange
    parts: list
    apply: Any  # (summary parts, state parts) -> state parts
    state_count: int = 1
    single: bool = False  # a single-tensor state: the answer is unwrapped
    reverse: bool = False  # a reverse recurrence: its summaries are folded from the last rank back
    # Packed: the positions in the fold's order whose summary starts a sequence, so that the
    # fold (and a ring's apply there) drops what came before instead of combining it in.
    resets: frozenset[int] = frozenset()

    @staticmethod
    def single_state(planned: StepExchange, parts: list, apply) -> "_Request":
        return _Request(planned, parts, lambda summary, state: [apply(summary, state[0])], 1, True)


def _recurrences_read(exprs: list[ir.Expr], cell: ir.CellIR) -> set[str]:
    """The states and scans these expressions read (through bindings too)."""
    found: set[str] = set()
    seen: set[str] = set()
    stack = list(exprs)
    while stack:
        node = stack.pop()
        if isinstance(node, ir.Ref):
            if node.kind in (RefKind.STATE_NEW, RefKind.STATE_PREV):
                found.add(node.name)
            elif node.kind is RefKind.SCAN:
                found.add(node.name.split(".")[0])
            elif node.kind is RefKind.BINDING and node.name not in seen:
                seen.add(node.name)
                stack.append(cell.binding(node.name).value)
        elif isinstance(node, ir.Op):
            stack.extend(node.args)
    return found


def _levels(plan: ExecutionPlan, exchanges: tuple[StepExchange, ...]) -> list[list[tuple]]:
    """The plan's steps grouped so that no step reads a recurrence of its own or a later group."""
    analysis = plan.analysis
    scans = {s.name: s for s in analysis.cell.scans}
    level_of: dict[str, int] = {}
    levels: list[list[tuple]] = []
    for step, planned in zip(plan.steps, exchanges):
        exprs = []
        for name in step.names:  # a coupled group: every member's update
            if name in scans:
                exprs += list(scans[name].lifts)
            else:
                exprs += [analysis.state(name).update] + (list(step.chunk.queries) if step.chunk is not None else [])
        reads = _recurrences_read(exprs, analysis.cell) - set(step.names)
        level = 1 + max((level_of[r] for r in reads if r in level_of), default=-1)
        level_of.update({name: level for name in step.names})
        while len(levels) <= level:
            levels.append([])
        levels[level].append((step, planned))
    return levels


class _CapturingSolver(Solver):
    """The parallel backend's solver, keeping the step matrices of the last matrix scan it ran."""

    captured: tuple[torch.Tensor, bool, bool] | None = None
    captured_blocks: torch.Tensor | None = None  # [B, T, *heads, blocks, m, m] of the last block scan
    _in_blocks = False

    def blocks(self, names, transitions, inputs, blocks):
        self._in_blocks = True
        try:
            return super().blocks(names, transitions, inputs, blocks)
        finally:
            self._in_blocks = False

    def _carry_in(self, transition, value, h0, enter, reset):
        if self._in_blocks:
            self.captured_blocks = transition
        return super()._carry_in(transition, value, h0, enter, reset)

    def _matrix_scan(self, state, matrix, flat=False, transposed=False):
        self.captured = (matrix, flat, transposed)
        return super()._matrix_scan(state, matrix, flat=flat, transposed=transposed)
