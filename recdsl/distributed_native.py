"""Sequence-parallel summaries of the chunked forms that used to scan every slice.

:mod:`recdsl.distributed` reduces each rank's slice of a recurrence to a summary and
corrects the local pass once the rank's true initial state ``S_in`` is known.  Four forms
of the ``chunked`` backend get their summary and correction here, in the form's own
terms, so that a slice is run by the same chunked kernel as on one device (no state
stored per step):

=========================================  ===============================================
form (examples)                            summary, correction
=========================================  ===============================================
gated delta rule (Gated DeltaNet), the     ``(Phi, F)``: ``Phi = prod_t d_t (I + a_t l_t
delta rules read out as ``S @ q`` (TTT:    r_t^T)``, the slice's ``K x K`` transition
the kernel runs ``S^T``), and delta-rule   (``K`` the kernel's rows; the scalar decays
read-outs of the previous state            folded in), and ``F`` the final state from zero.
                                           ``Phi_t`` is the chunked pass with no input from
                                           ``I``, run as the widened state ``[S | Phi]``
                                           from ``[0 | I]``; its read-outs ``q_t Phi_t``
                                           (``q_t Phi_{t-1}`` for a previous-state read-out)
                                           give each read-out's correction ``(q_t Phi_t)
                                           S_in`` (``S_in^T`` for ``S @ q``)
decayed outer products read out before     ``(prod_t exp(g_t), F)`` in the decay's shape, as
the update (RWKV-6)                        for GLA; the correction shifts by one step:
                                           ``q_t (D_{t-1} * S_in)`` with ``D_0 = 1``
the convolution of a time-invariant        ``(T_r, F)``: the slice's length alone stands for
diagonal state (S4D)                       its transition ``decay^T_r`` (the decay is a
                                           param, the same on every rank, so each rank
                                           raises it itself); the correction
                                           ``R(decay^(t+1) * S_in)`` of each read-out ``R``
                                           is built in blocks of lags, as the convolution
                                           builds its kernel
=========================================  ===============================================

For the delta rules the transition travels as the dense ``K x K`` product rather than its
WY factors (``2 T_r K`` numbers, varying with the slice's length): the all-gather needs one
size on every rank, and ``K x K`` is the size of the state at ``K = V``; where ``K > V``
the plan's size rule sends states along the ring instead, one ``K x V`` state per rank.
Backward is autograd through the same exchange (the adjoint all-to-all or the ring's
reverse hops): every correction above is differentiable in ``S_in`` and in the summary.
"""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from . import ir
from .analysis import StateAnalysis
from .plan import ChunkKind, Form, StepPlan

if TYPE_CHECKING:  # the runner and the exchange types live in .distributed, which imports this module lazily
    from .distributed import StepExchange, _SlicedRun


def has_native_summary(step: StepPlan) -> bool:
    """Whether a step of the chunked plan is summarised here (else :mod:`.distributed` does it)."""
    if step.form is Form.CONVOLUTION:
        return step.conv is not None
    chunk = step.chunk
    if step.form is not Form.CHUNKED or chunk is None:
        return False
    if chunk.kind is ChunkKind.DECAYED_OUTER_PRODUCTS:
        return chunk.reads_previous
    # The plain delta rule read out as q @ S_t keeps distributed's own path.
    return chunk.kind is ChunkKind.GATED_DELTA_RULE or chunk.transposed or chunk.reads_previous


def native_exchange(step: StepPlan, state: StateAnalysis) -> "StepExchange":
    """The summary, exchange and correction of a step for which :func:`has_native_summary` holds."""
    from .distributed import Correction, Exchange, StepExchange, SummaryPart, _decay_shape, _is_complex

    final = SummaryPart("state", tuple(state.type.shape), _is_complex(state.type))
    if step.form is Form.CONVOLUTION:
        length = SummaryPart("length", (1,), False)
        return StepExchange(
            step.names, step.form, (length, final), Exchange.ALL_GATHER, Correction.CONVOLUTION_READOUT,
            "the slice's length (its transition is decay^length, a param every rank raises itself) and its final state from zero",
        )
    chunk = step.chunk
    assert chunk is not None
    if chunk.kind is ChunkKind.DECAYED_OUTER_PRODUCTS:
        assert chunk.log_decay is not None
        decay = SummaryPart("transition", _decay_shape(chunk.log_decay, state.type), False)
        return StepExchange(
            step.names, step.form, (decay, final), Exchange.ALL_GATHER, Correction.PREVIOUS_DECAYED_READOUT,
            f"the product of its decays ({state.recurrence.structure}) and its final state from zero",
        )
    rows = state.type.shape[1 if chunk.transposed else 0]
    transition = SummaryPart("transition", (rows, rows), False)
    gated = " times the decays" if chunk.kind is ChunkKind.GATED_DELTA_RULE else ""
    side = ", acting on the transposed state (read out as S @ q)" if chunk.transposed else ""
    correction = Correction.PREVIOUS_TRANSITION_READOUT if chunk.reads_previous else Correction.TRANSITION_READOUT
    return StepExchange(
        step.names, step.form, (transition, final), Exchange.ALL_GATHER, correction,
        f"its total transition ({rows} x {rows}, the product of the identity-plus-rank-one steps{gated}{side}) and its final state from zero",
    )


def solve_native(run: "_SlicedRun", step: StepPlan, planned: "StepExchange", state: StateAnalysis, substitutions: dict):
    """One recurrence's local pass, exchange (one ``yield``) and correction; as ``_SlicedRun.solve``."""
    if step.form is Form.CONVOLUTION:
        return (yield from _convolution(run, step, planned, state, substitutions))
    assert step.chunk is not None
    if step.chunk.kind is ChunkKind.DECAYED_OUTER_PRODUCTS:
        return (yield from _previous_decayed(run, step, planned, state, substitutions))
    return (yield from _delta_rule(run, step, planned, state, substitutions))


def _refuse_non_finite(run: "_SlicedRun", name: str, form: str):
    from .distributed import SequenceParallelError

    return SequenceParallelError(
        f"state '{name}': the {form} met non-finite inputs on rank {run.rank}",
        expected=f"finite inputs (the sequence-parallel {form} has no scan fallback)",
    )


# ---- decayed outer products read out before the update (RWKV-6) ------------------------------


def _previous_decayed(run: "_SlicedRun", step: StepPlan, planned: "StepExchange", state: StateAnalysis, substitutions: dict):
    from .backends.parallel import _run_chunk_plan
    from .distributed import _Request

    name = state.state
    chunk = step.chunk
    assert chunk is not None and chunk.log_decay is not None
    first = run.rank == 0
    zero = run.initial[name] if first else run.full_state(state, 0.0)
    ran = _run_chunk_plan(run.seq, chunk, state, zero, run.plan.chunk_size)
    if ran is None:
        raise _refuse_non_finite(run, name, "chunked pass")
    readouts, last = ran
    running_log = run.evaluate_full(chunk.log_decay, state.type).cumsum(1) if not first else None  # [B, T_r, *heads, r or 1, c or 1]
    total = running_log[:, -1].exp() if not first else run._stand_in(chunk.log_decay, state, 1.0)
    received, whole = yield _Request.single_state(planned, [total, last], lambda summary, s: summary[0] * s + summary[1])
    start = run.initial[name] if first else received
    if not first:
        # D_t multiplies S_in in S_t; a read-out of S_{t-1} sees D_{t-1}, with D_0 = 1.
        inclusive = running_log.exp()
        exclusive = torch.cat([torch.zeros_like(running_log[:, :1]), running_log[:, :-1]], 1).exp()
        readouts = [
            r + run._decayed_readout(q, exclusive if before else inclusive, start, chunk.transposed)
            for r, q, before in zip(readouts, chunk.queries, chunk.previous or (False,) * len(readouts))
        ]
    for node, value in zip(chunk.readouts, readouts):
        substitutions[id(node)] = value
    return None, start, whole


# ---- the delta rules: gated, read out as S @ q, read out before the update --------------------


def _delta_rule(run: "_SlicedRun", step: StepPlan, planned: "StepExchange", state: StateAnalysis, substitutions: dict):
    """The chunked delta rule on the widened state ``[S | Phi]`` from ``[0 | I]`` (rank 0: the plain pass from its initial state)."""
    from .backends import chunk_kernels
    from .backends.parallel import _chunkable, _run_chunk_plan
    from .distributed import _Request

    name = state.state
    chunk = step.chunk
    assert chunk is not None and chunk.transition is not None and chunk.transition.coefficient is not None
    first = run.rank == 0
    rows, columns = state.type.shape[::-1] if chunk.transposed else state.type.shape  # the kernel's state: S^T for S @ q
    lead, seq = run.lead, run.seq
    batch_dims = run.state_lead
    unflatten = lambda x: x.reshape(batch_dims + x.shape[1:]).movedim(-2, 1)  # noqa: E731

    if first:
        ran = _run_chunk_plan(seq, chunk, state, run.initial[name], run.plan.chunk_size)
        if ran is None:
            raise _refuse_non_finite(run, name, "chunked pass")
        readouts, last = ran
        # Rank 0's transition is never applied (the prefix starts from its final state): a stand-in.
        transition = torch.zeros(batch_dims + (rows, rows), dtype=last.dtype, device=last.device)
        corrections = None
    else:

        def flat_vector(expr: ir.Expr, length: int) -> torch.Tensor:
            value = seq.full(seq.evaluate(expr), expr.type, ir.Type((length,))).expand(lead + (length,))
            return value.movedim(1, -2).reshape((-1, lead[1], length))

        def flat_scalar(expr: ir.Expr) -> torch.Tensor:
            value = seq.full(seq.evaluate(expr), expr.type, ir.Type(())).expand(lead)
            return value.movedim(1, -1).reshape((-1, lead[1]))

        term = chunk.transition
        left, right = flat_vector(term.row, rows), flat_vector(term.column, rows)
        coefficient = flat_scalar(term.coefficient)
        log_decay = flat_scalar(chunk.log_decay) if chunk.log_decay is not None else None
        values = []
        for input_term in chunk.inputs:
            column = flat_vector(input_term.column, columns)
            if input_term.coefficient is not None:
                column = column * flat_scalar(input_term.coefficient).unsqueeze(-1)
            values.append(column)
        if not _chunkable(log_decay, left, right, coefficient, *values):
            raise _refuse_non_finite(run, name, "chunked pass")
        # Phi has no input: its columns of the widened inputs are zero.
        values = [torch.cat([v, v.new_zeros(v.shape[:-1] + (rows,))], -1) for v in values]
        dtype = run.numerics.dtype_of(state.type.kind)
        count = left.shape[0]
        widened = torch.cat(
            [torch.zeros((count, rows, columns), dtype=dtype, device=left.device), torch.eye(rows, dtype=dtype, device=left.device).expand(count, rows, rows)], -1
        )
        queries = [flat_vector(q, rows) for q in chunk.queries]
        results, final = chunk_kernels.with_infinite_readouts(
            functools.partial(chunk_kernels.delta_rule, log_decay=log_decay),
            queries, left, right, coefficient, values, widened, run.plan.chunk_size,
            exclusive=chunk.previous or None,
        )
        readouts = [unflatten(r[..., :columns]) for r in results]
        corrections = [unflatten(r[..., columns:]) for r in results]  # q_t Phi_t, or q_t Phi_{t-1}
        final = final.reshape(batch_dims + final.shape[1:])
        last = final[..., :columns].transpose(-1, -2) if chunk.transposed else final[..., :columns]
        transition = final[..., columns:]

    if chunk.transposed:  # S^T_out = Phi S^T_in + F^T
        apply = lambda summary, s: s @ summary[0].transpose(-1, -2) + summary[1]  # noqa: E731
    else:
        apply = lambda summary, s: summary[0] @ s + summary[1]  # noqa: E731
    received, whole = yield _Request.single_state(planned, [transition, last], apply)
    start = run.initial[name] if first else received
    if corrections is not None:
        start_kernel = (start.transpose(-1, -2) if chunk.transposed else start).unsqueeze(1)  # [B, 1, *heads, K, V]
        readouts = [r + (p.unsqueeze(-2) @ start_kernel).squeeze(-2) for r, p in zip(readouts, corrections)]
    for node, value in zip(chunk.readouts, readouts):
        substitutions[id(node)] = value
    return None, start, whole


# ---- the convolution of a time-invariant diagonal state (S4D) ---------------------------------


def _steps(length: torch.Tensor) -> int:
    """A slice's length, sent as a number beside its final state."""
    return int(round(float(length.detach().reshape(-1)[0]))) if length.numel() else 0


def _powered(decay: torch.Tensor, steps: int, state: torch.Tensor) -> torch.Tensor:
    """``decay^steps * state``, the transition of a slice of ``steps`` steps applied to a state.

    A slice has at least one step, so a length of 0 is a reset summary (a slice holding a
    packed sequence's first step sends zeros, :meth:`recdsl.distributed._SlicedRun._segmented`):
    its transition is the zero, not ``decay^0``, the identity.
    """
    return decay**steps * state if steps > 0 else torch.zeros_like(state)


def _convolution(run: "_SlicedRun", step: StepPlan, planned: "StepExchange", state: StateAnalysis, substitutions: dict):
    from .backends import convolution
    from .backends.parallel import Solver
    from .distributed import Exchange, _Request

    name = state.state
    conv = step.conv
    assert conv is not None
    first = run.rank == 0
    steps = run.lead[1]
    zero = run.initial[name] if first else run.full_state(state, 0.0)
    decay = convolution._to_state(run.seq.evaluate(conv.decay), conv.decay.type, state.type)
    decay = decay.to(torch.promote_types(decay.dtype, zero.dtype))
    ran = convolution.run(run.seq, conv, state, zero)
    sequence = None
    if ran is None:
        # An unstable decay or non-finite pieces: the plan's fallback scan on the slice, as on one device.
        assert step.fallback is not None
        scanned = replace(step, form=step.fallback, conv=None)
        sequence = Solver(run.plan, run.seq, {name: zero}).solve(scanned, state).expand(run.lead + state.type.shape)
        last = sequence[:, -1]
    else:
        readouts, last = ran
    if (run.owner.exchange_override or planned.exchange) is Exchange.RING:
        # Only states travel on the ring, and each rank applies its own transition: the power
        # itself, so that the ring's backward carries its gradient to the decay's params.
        parts, apply = [decay**steps, last], lambda summary, s: summary[0] * s + summary[1]
    else:
        # Every rank applies the others' transitions with its own decay (the same param).
        length = torch.full(run.state_lead + (1,), float(steps), dtype=run.numerics.real, device=run.numerics.device)
        parts, apply = [length, last], lambda summary, s: _powered(decay, _steps(summary[0]), s) + summary[1]
    received, whole = yield _Request.single_state(planned, parts, apply)
    start = run.initial[name] if first else received
    if sequence is not None:
        if not first:  # the scanned states plus decay^(t+1) * S_in
            lags = torch.arange(1, steps + 1, device=decay.device, dtype=decay.real.dtype if decay.is_complex() else decay.dtype)
            powers = decay.unsqueeze(0) ** lags.reshape((-1,) + (1,) * decay.dim())
            powers = powers.reshape((1, steps) + (1,) * (len(run.lead) - 2) + tuple(decay.shape))
            sequence = sequence + powers * start.unsqueeze(1)
        return sequence, start, whole
    if not first:
        readouts = [r + convolution._initial_state_terms(run.seq, conv, node, decay, start, steps) for r, node in zip(readouts, conv.readouts)]
    for node, value in zip(conv.readouts, readouts):
        substitutions[id(node)] = value
    return None, start, whole
