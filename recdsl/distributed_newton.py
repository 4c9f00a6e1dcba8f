"""Newton's method with the time axis sharded: each iteration's linear solve uses the summary exchange.

A cell compiled with ``backend="newton"`` (:mod:`recdsl.backends.newton`) solves the whole
trajectory ``s_t = f(s_{t-1}, x_t)`` by Newton's method; each iteration's correction is the
linear recurrence ``delta_t = J_t delta_{t-1} + r_t`` in the step Jacobians, which is what
:mod:`recdsl.distributed` knows how to shard.  Per iteration, on every rank:

1. the step and its Jacobians on the slice, at the slice's trajectory shifted by the
   previous rank's last state (its *halo*);
2. the local solve of ``delta`` from zero, and the slice's summary: the product of its
   Jacobians (a vector for a diagonal Jacobian, ``nb`` blocks of ``m x m`` otherwise),
   the local final ``delta``, its current last state and its largest residual;
3. one all-gather of those summaries: every rank folds the summaries before it into its
   incoming ``delta`` (and every rank's halo for the next iteration), and all agree on
   the largest residual, so all stop at the same iteration;
4. the local solve again with the incoming ``delta`` entered at the first step.

One collective per iteration (and one before the first: the guess's last states, each the
next slice's halo); the tolerance and the solution are those of the single-process newton
run (up to rounding; a slice after the first guesses from the cell's initial value, not from
a given state, so the count of iterations may differ).  Steps still unconverged when the budget
runs out are run one by one, rank after rank, as the single-process backend runs its
unconverged suffix.

Backward (implicit differentiation, as the newton backend): the adjoint
``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` runs in reverse time, so its summaries travel
the other way: each rank solves its slice's adjoint from a zero carry, and sends
``a_r = h_r + J_0^T lambda_0`` (``h_r`` the gradient of the outputs reading the halo) with
``(prod_t J_t)^T``; each rank folds the summaries of the ranks after it into the adjoint
entering its last step, solves its slice again, and the step's ordinary backward gives the
parameter gradients (partial per rank: their sum is the single-process gradient).
That needs exact Jacobians (a diagonal structure, or ``jacobian="full"``, which ``auto``
picks up to 64-element blocks).  A quasi-Newton solve (the diagonal of larger blocks) knows
the true ``J^T`` only through vector-Jacobian products, and its exact summary would be the
dense transposed product (``m`` times the adjoint's size, ``m`` products a step to form), so
its adjoint travels along a ring instead: each rank, once it has the adjoint entering its
last step, solves its slice exactly (the newton backend's iterative adjoint) and sends
``h_r + J_0^T lambda_0`` to the rank before it (:func:`_ring_adjoint`).

Packed sequences (``cu_seqlens``): a sequence's first step reads that sequence's initial
state instead of the previous step (:class:`_Resets`), so its Jacobian is zero there and
every product through it (a summary, forward or adjoint) is a reset; each sequence's
final state is read where it ends and summed over the ranks in one all-reduce.

Reverse states (BiGRU): the cell runs in the parts of its directed plan, as on one device
(:mod:`recdsl.backends.directed`: delays shifted, each other group of the schedule its own
solve, a reverse one on the sequence flipped in time), each part's solve sharded as above
in the group seen in its own time (:class:`_Group` with ``reverse``: ranks counted from the
last, so a reverse part's initial state is the last rank's, its summaries fold from the
later ranks and its adjoint's from the earlier ones); values read across a slice's edge
(a delay's, a state's previous value read by another part or an output) come from the
neighbouring slice (:class:`_Boundaries`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

import torch

from . import ir
from .ir import RefKind

if TYPE_CHECKING:
    from .distributed import SequenceParallel


def describe_newton(executed: Any, world: int, batch: int = 1, heads: int = 1, itemsize: int = 4) -> str:
    """What a sharded newton run of ``executed`` (a newton plan) exchanges over ``world`` ranks, in words."""
    from .backends import newton as nt

    if _runs_in_parts(executed):
        return _describe_parts(executed, world, batch, heads, itemsize)
    plan = executed.solver
    assert isinstance(plan, nt.JacobianPlan)
    mode = plan.mode(nt.JacobianMode(dict(executed.options.backend_options).get("jacobian", "auto")))
    product = _product_elements(plan, mode)
    summary = product + 2 * plan.size
    adjoint = product + 2 * plan.size
    per_iteration = (world - 1) * (summary * batch * heads + 2) * itemsize if world > 1 else 0
    backward = backward_bytes(plan, mode, world, batch, heads, itemsize)
    if adjoint_on_ring(plan, mode):
        dense = len(plan.blocks) * plan.block_size * plan.block_size
        backward_line = (
            f"      backward: the adjoint passed along a ring, last rank to first (the exact summary, the transposed product of the dense {plan.block_size} x {plan.block_size} Jacobian blocks, "
            f"would be {dense + 2 * plan.size} numbers and {plan.block_size} vector-Jacobian products a step to form; the adjoint is {plan.size}): "
            f"one all-reduce of the final state's gradient ({plan.size}), then each rank solves its slice exactly once (exact J^T products, the diagonal as preconditioner) "
            f"and sends J_0^T lambda_0 plus the halo's gradient ({plan.size}) to the rank before it; P - 1 hops one after the other\n"
        )
    else:
        backward_line = f"      backward: one all-gather of (the product, J_0^T lambda_0 plus the halo's gradient, the final state's gradient) = {adjoint} numbers; the adjoint entering each slice folded from the ranks after it\n"
    jacobian = "diagonal" if product == plan.size else f"{len(plan.blocks)} block{'s' if len(plan.blocks) != 1 else ''} of {plan.block_size} x {plan.block_size}"
    return (
        f"sequence parallel over {world} rank{'s' if world != 1 else ''}: cell {executed.analysis.cell.name}, Newton's method (the newton backend) with each iteration's linear solve sharded\n"
        f"  joint state of {plan.size} numbers, Jacobian {plan.describe()}, solved {mode.value}\n"
        f"      summary per iteration: the product of the slice's Jacobians ({jacobian}: {product}) + the local final correction ({plan.size}) + the slice's last state ({plan.size}) = {summary} numbers per batch row and head, and 2 per rank (its largest residual and first unconverged step)\n"
        f"      exchange: one all-gather per iteration (every rank folds the summaries before it; all stop at the same iteration)\n"
        f"      correction: the slice's linear solve rerun with the incoming correction entered at its first step\n"
        f"      packed sequences (cu_seqlens): a sequence's first step reads its own initial state (a zero Jacobian: a reset in every summary); the final states, one all-reduce of N x {plan.size} numbers\n"
        + backward_line
        + f"  bytes sent per rank (B = {batch}, heads = {heads}, {itemsize} bytes a number): forward {per_iteration} per iteration, backward {backward}\n"
    )


def _describe_parts(executed: Any, world: int, batch: int, heads: int, itemsize: int) -> str:
    """:func:`describe_newton` of a cell with reverse states: each part of its directed split, and its slice edges."""
    from .distributed import _numel

    analysis = executed.analysis
    cell = analysis.cell
    lines = [
        f"sequence parallel over {world} rank{'s' if world != 1 else ''}: cell {cell.name}, Newton's method (the newton backend) in the parts of its directed split "
        "(delays shifted; each other group of the schedule its own solve, in schedule order), each part's linear solves sharded in its own time direction\n"
    ]
    for part in executed.directed.parts:
        if part.direction is ir.Direction.REVERSE:
            where = "the slice flipped in time, ranks counted from the last: its initial state is the last rank's, its summaries fold from the later ranks, its adjoint's from the earlier ones (below, 'before' and 'after' in its own time)"
        else:
            where = "ranks in order: its initial state is rank 0's"
        lines.append(f"  part {', '.join(part.names)} ({part.direction}): {where}\n")
        body = describe_newton(part.plan, world, batch, heads, itemsize).splitlines()[1:]
        lines.extend(f"  {line}\n" for line in body if "packed sequences" not in line)
    # The states whose value before a slice's first step is read outside their own solve.
    read_before = set(analysis.delays)
    for part in executed.directed.parts:
        read_before |= {c.state for c in part.carried if c.kind is RefKind.STATE_PREV}
    for expr in analysis.expanded_outputs:
        read_before |= {r.name for r in ir.refs(expr) if r.kind is RefKind.STATE_PREV}
    if read_before:
        names = sorted(read_before)
        numbers = sum(_numel(cell.state(n).type.shape) for n in names)
        sent = (world - 1) * numbers * batch * heads * itemsize if world > 1 else 0
        lines.append(
            f"  slice edges: the value before a slice's first step of {', '.join(names)} ({numbers} numbers per batch row and head in all) is the neighbouring slice's "
            f"(a forward state's previous rank's last value, a reverse state's next rank's first): one all-gather of each rank's edge row per call, where read "
            f"(a delay's value after the whole sequence comes from the same rows), its adjoint returned by an all-to-all; at most {sent} bytes per rank forward and as many backward\n"
        )
    lines.append(
        "  packed sequences (cu_seqlens): a reverse part sees them in reversed time (each sequence begins at its last step); a previous value at a sequence's first step "
        "is its initial row; a delay's final states, one all-reduce of N rows\n"
    )
    return "".join(lines)


def adjoint_on_ring(plan: Any, mode: Any) -> bool:
    """Whether the backward passes the adjoint along a ring: a quasi-Newton solve (the diagonal of
    dense blocks), whose exact summary (the dense transposed product) would be ``m`` times the
    adjoint's ``n`` numbers and cost ``m`` vector-Jacobian products a step; by size, the ring."""
    from .backends import newton as nt

    return not (mode is nt.JacobianMode.FULL or plan.structure is nt.JacobianStructure.DIAGONAL)


def backward_bytes(plan: Any, mode: Any, world: int, batch: int = 1, heads: int = 1, itemsize: int = 4) -> int:
    """Bytes one rank sends in the sharded newton backward (the most any rank sends)."""
    if world <= 1:
        return 0
    if adjoint_on_ring(plan, mode):
        # One all-reduce of the final state's gradient (a ring all-reduce sends 2 (P - 1) / P
        # of it per rank), then one adjoint state to the previous rank.
        state = plan.size * batch * heads * itemsize
        return -(-2 * (world - 1) * state // world) + state
    return (world - 1) * (_product_elements(plan, mode) + 2 * plan.size) * batch * heads * itemsize


def _product_elements(plan: Any, mode: Any) -> int:
    from .backends import newton as nt

    if plan.block_size == 1 or mode is nt.JacobianMode.DIAGONAL:
        return plan.size
    return len(plan.blocks) * plan.block_size * plan.block_size


class _Group:
    """The process group and this rank's place in it, with the collectives the run uses.

    ``reverse``: the group seen in reversed time (a reverse part of a directed cell), where
    the last rank holds the first steps: ranks count from the last, and gathered summaries
    come in that order, so every fold and ring below runs unchanged the other way.
    """

    def __init__(self, owner: "SequenceParallel", reverse: bool = False) -> None:
        self.group, self.world = owner.group, owner.world_size
        self.reverse = reverse
        self.rank = owner.world_size - 1 - owner.rank if reverse else owner.rank
        self.clock = owner.collective_time
        self.owner = owner

    def gather(self, flat: torch.Tensor, backward: bool = False) -> torch.Tensor:
        import time

        import torch.distributed as dist

        gathered = [torch.empty_like(flat) for _ in range(self.world)]
        started = time.perf_counter()
        dist.all_gather(gathered, flat.contiguous(), group=self.group)
        elapsed = time.perf_counter() - started
        if backward:
            self.clock.backward += elapsed
        else:
            self.clock.forward += elapsed
            self.owner.last_exchange.append((("newton",), flat.numel(), flat.numel() * flat.element_size()))
        return torch.stack(gathered[::-1] if self.reverse else gathered)

    def global_rank(self, rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.group, self.world - 1 - rank if self.reverse else rank)


# ---- the Jacobians' products and their action ---------------------------------------------------


def _product(jacobian) -> torch.Tensor:
    """``J_{T-1} ... J_0`` of a slice: ``[*lead, n]`` (diagonal) or ``[*lead, nb, m, m]``."""
    values = jacobian.values
    if jacobian.diagonal:
        return values.prod(1)
    matrices = values.movedim(1, 0)
    while matrices.shape[0] > 1:  # pairwise, log depth: later steps on the left
        pairs = matrices.shape[0] // 2
        product = matrices[1 : 2 * pairs : 2] @ matrices[0 : 2 * pairs : 2]
        matrices = torch.cat([product, matrices[2 * pairs :]], 0)
    return matrices[0]


def _apply(matrix: torch.Tensor, diagonal: bool, vector: torch.Tensor, index: torch.Tensor, size: int, transposed: bool = False) -> torch.Tensor:
    """``M v`` (or ``M^T v``) for ``M`` a diagonal ``[*lead, n]`` or blocks ``[*lead, nb, m, m]``."""
    from .backends import newton as nt

    if diagonal:
        return matrix * vector
    if transposed:
        matrix = matrix.transpose(-1, -2)
    blocks = nt._to_blocks(vector, index)
    return nt._from_blocks((matrix @ blocks.unsqueeze(-1)).squeeze(-1), index, size)


def _pack(parts: list[torch.Tensor], lead: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([p.expand(lead + tuple(p.shape[len(lead) :])).reshape(-1) for p in parts])


def _unpack(flat: torch.Tensor, templates: list[torch.Tensor]) -> list[torch.Tensor]:
    parts, offset = [], 0
    for template in templates:
        count = template.numel()
        parts.append(flat[offset : offset + count].reshape(template.shape))
        offset += count
    return parts


# ---- the run ----------------------------------------------------------------------------------


def run_sharded(owner: "SequenceParallel", inputs: Mapping[str, torch.Tensor], params, consts, state: Mapping[str, torch.Tensor], numerics, need_final: bool, packed: Any = None):
    """This rank's outputs and the whole sequence's final state, by sharded Newton iterations.

    ``packed`` (a :class:`recdsl.distributed._Packed`): packed sequences in one batch row;
    ``state`` then holds one row per sequence and the final states are per sequence.
    A cell with reverse states runs in the parts of its directed plan (:func:`_run_directed`).
    """
    owner.last_exchange = []
    executed = owner.module.plan
    if _runs_in_parts(executed):
        return _run_directed(owner, executed, inputs, params, consts, state, numerics, need_final, packed)
    outputs, final_states, _ = _solve(_Group(owner), executed, inputs, params, consts, state, numerics, packed)
    return outputs, final_states


def _runs_in_parts(executed: Any) -> bool:
    """Whether a newton plan runs sharded in the parts of its directed plan: a cell with reverse
    states (a cell with forward delays only runs as one joint solve, its delays Newton states)."""
    return executed.directed is not None and bool(executed.analysis.cell.reversed_recurrences)


def _solve(group: _Group, executed: Any, inputs: Mapping[str, torch.Tensor], params, consts, state: Mapping[str, torch.Tensor], numerics, packed: Any = None, order: torch.Tensor | None = None):
    """One newton plan's sharded solve on this rank's slice (in ``group``'s time):
    ``(outputs, final states, token)``.

    ``order`` (the output of the previous collective of the call, or None) is tied into the
    solve, and ``token`` (an output of its adjoint, None when not differentiable) returned,
    so that every rank's autograd runs the backward exchanges of a call's solves in the
    same (reverse) order.
    """
    from .backends import newton as nt
    from .backends.torch_ops import Evaluator
    from .distributed import _Tie

    owner = group.owner
    analysis = executed.analysis
    cell = analysis.cell
    plan = executed.solver
    assert isinstance(plan, nt.JacobianPlan)
    options = dict(executed.options.backend_options)
    requested, tolerance, max_iterations = nt._options(options.get("jacobian", "auto"), options.get("tolerance"), options.get("max_iterations"), numerics)
    mode = plan.mode(requested)
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])  # (B, T_r, *heads)
    steps = lead[1]
    state_lead = (lead[0],) + lead[2:]

    # Everything that reads no state, for all steps of the slice at once (as the newton backend).
    whole: dict[tuple[RefKind, str], torch.Tensor] = {}
    whole.update({(RefKind.PARAM, n): v for n, v in params.items()})
    whole.update({(RefKind.CONST, n): v for n, v in consts.items()})
    whole.update({(RefKind.INPUT, n): v for n, v in inputs.items()})
    whole_eval = Evaluator(numerics, whole, shared=True)
    parallel_outputs: dict[int, torch.Tensor] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            whole[(RefKind.BINDING, statement.name)] = whole_eval.evaluate(statement.value)
        elif isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            value = whole_eval.evaluate(statement.value)
            if statement.name is not None:
                whole[(RefKind.BINDING, statement.name)] = value
            parallel_outputs[statement.index] = value.expand(lead + tuple(value.shape[value.dim() - statement.value.type.rank :]))
    hoisted = [(node, whole_eval.evaluate(node)) for node in analysis.hoisted]

    # Rank 0: the sequence's initial state; the others: the cell's initial value, a guess only.
    attached = nt._Step(analysis, numerics, plan, whole, hoisted)
    ends: list[tuple[int, int]] = []
    if packed is None:
        initial = nt.pack(state, plan, state_lead).to(numerics.real)
        given = initial
    else:
        # Packed: a sequence's first step reads that sequence's initial state, whatever the
        # previous step holds (its Jacobian there is zero: a reset in every summary).
        given = nt.pack(state, plan, (len(packed.offsets) - 1,) + state_lead[1:]).to(numerics.real)
        attached, ends = _with_resets(attached, given, packed, steps)
        initial = attached.rows[:, 0]
    tracked = [v for v in list(whole.values()) + [v for _, v in hoisted] + [given] if isinstance(v, torch.Tensor) and v.requires_grad]
    differentiable = torch.is_grad_enabled() and bool(tracked)
    exact = not adjoint_on_ring(plan, mode)
    detached = attached.detached()
    index = nt._index(plan, initial.device)
    with torch.no_grad():
        trajectory, halo, final, jacobian = _newton(group, detached, initial.detach(), steps, plan, mode, tolerance, max_iterations, index)
        if packed is not None:  # each sequence's final state, from the rank that holds its last step
            held = torch.zeros_like(given)
            for sequence, step in ends:
                held[sequence] = trajectory[0, step]
            final = held.contiguous()
            if group.world > 1:
                import time

                import torch.distributed as dist

                started = time.perf_counter()
                dist.all_reduce(final, group=group.group)
                group.clock.forward += time.perf_counter() - started
                owner.last_exchange.append((("newton", "final states"), final.numel(), final.numel() * final.element_size()))

    if differentiable:
        # The step at the solution, differentiable in the params and inputs (and, on rank 0,
        # the initial state); the halo of the other ranks is a constant here: its adjoint
        # travels in the exchange of _ShardedAdjoint's backward.
        start = initial if group.rank == 0 else halo
        solution = attached(nt._shift(start, trajectory))
        quasi = None if exact else _QuasiAdjoint(detached, nt._shift(start, trajectory).detach(), tolerance, max_iterations)
        if order is not None and order.requires_grad:
            solution = _Tie.apply(solution, order)
        solution, halo_out, final_out = _ShardedAdjoint.apply(solution, start, final, (group, jacobian, index, plan.size, quasi, ends if packed is not None else None))
        token = final_out
    else:
        solution, halo_out, final_out = trajectory, initial if group.rank == 0 else halo, final
        token = None
    previous = nt._shift(halo_out, solution)
    if packed is not None:
        previous = attached.reset(previous)
    evaluation = attached if differentiable else detached
    new_states = {(RefKind.STATE_NEW, name): value for (_, name), value in nt.unpack(solution, plan).items()}
    values = evaluation.values(previous, new_states)
    outputs = []
    for emit in cell.outputs:
        if emit.index in parallel_outputs:
            value = parallel_outputs[emit.index]
            if differentiable:  # every rank's backward must reach the exchange
                value = _Tie.apply(value, solution)
            outputs.append(value)
            continue
        value = values.evaluator.evaluate(emit.value)
        outputs.append(value.expand(lead + tuple(value.shape[value.dim() - emit.value.type.rank :])))
    final_lead = state_lead if packed is None else (len(packed.offsets) - 1,) + state_lead[1:]
    final_states = {s.name: final_out[..., s.offset : s.offset + s.size].reshape(final_lead + s.shape) for s in plan.slots}
    return outputs, final_states, token


def _run_directed(owner: "SequenceParallel", executed: Any, inputs: Mapping[str, torch.Tensor], params, consts, state: Mapping[str, torch.Tensor], numerics, need_final: bool, packed: Any = None):
    """A cell with reverse states, sharded: the parts of its directed plan (:mod:`recdsl.backends.directed`),
    each a sharded solve in its own time direction.

    The one-device split runs unchanged on the slice: delays shifted, each part in schedule
    order (a reverse part on the slice flipped in time), the outputs from the slice's whole
    sequences.  What crosses a slice boundary is exchanged: each part's solve runs in the
    group seen in its own time (a reverse part's ranks count from the last, so its initial
    state is the last rank's and its summaries fold from the later ranks, forward and in the
    adjoint), and a state's previous value at the slice's first step, where something reads
    it (a delay always), is the neighbouring slice's boundary value (:class:`_Boundaries`).

    Packed sequences: a reverse part sees them in reversed time too (sequence ``n`` is
    ``N - 1 - n`` there, its rows of the given and final states flipped), and a previous
    value at a sequence's first step (a reverse state's: at its last) is that sequence's
    initial row.
    """
    from .backends import directed
    from .distributed import _Tie

    boundaries = _Boundaries(owner, need_final, packed)
    directions = {id(part.plan): part.direction for part in executed.directed.parts}

    def run_part(plan, sub_inputs, sub_params, sub_consts, sub_state, sub_numerics):
        reverse = directions[id(plan)] is ir.Direction.REVERSE
        part_packed = packed
        if reverse and packed is not None:
            part_packed = _reversed(packed)
            sub_state = {name: value.flip(0) for name, value in sub_state.items()}
        outputs, finals, token = _solve(_Group(owner, reverse=reverse), plan, sub_inputs, sub_params, sub_consts, sub_state, sub_numerics, part_packed, order=boundaries.token)
        if token is not None:
            boundaries.token = token
        if reverse and packed is not None:
            finals = {name: value.flip(0) for name, value in finals.items()}
        return outputs, finals

    outputs, final = directed.run(executed, inputs, params, consts, state, numerics, run_part, shift=boundaries.shift, ends=boundaries.ends)
    token = boundaries.token
    if token is not None and token.requires_grad:
        # Every rank's backward must reach every exchange, whichever outputs or final states
        # its loss reads (the exchanges are chained, so reaching the last reaches all).
        outputs = [_Tie.apply(o, token) for o in outputs]
        final = {k: _Tie.apply(v, token) for k, v in final.items()}
    return outputs, final


class _Boundaries:
    """A directed cell's values at its slice's edges, for the steps that read across them.

    A forward state's previous value at the slice's first step is the previous rank's last
    value (rank 0: the initial state), a reverse state's at the slice's last step the next
    rank's first value (the last rank: its initial state); a delay's value after the whole
    sequence is the last rank's last value (a reverse delay's: rank 0's first).  Each is one
    row per rank, all-gathered once per sequence (differentiably: the adjoint returns by an
    all-to-all), and chained with the solves' adjoints through ``token`` (the output of the
    call's last collective) so that every rank runs the backward collectives in one order.
    """

    def __init__(self, owner: "SequenceParallel", need_final: bool, packed: Any = None) -> None:
        self.owner = owner
        self.need_final = need_final
        self.packed = packed
        self.token: torch.Tensor | None = None
        self.gathered: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    def rows(self, sequence: torch.Tensor, direction: ir.Direction) -> list[torch.Tensor]:
        """Every rank's boundary row of ``sequence`` (its first step in reverse time, else its last), by rank."""
        from . import distributed as sp

        found = self.gathered.get(id(sequence))
        if found is not None and found[0] is sequence:
            return found[1]
        owner = self.owner
        row = sequence[:, 0] if direction is ir.Direction.REVERSE else sequence[:, -1]
        lead = tuple(row.shape[:1])
        real = row.real.dtype if row.is_complex() else row.dtype
        flat = sp._pack([row], lead, real)
        gathered = sp._AllGather.apply(flat, self.token, owner.group, owner.rank, owner.world_size, owner.collective_time)
        self.token = gathered
        owner.last_exchange.append((("newton", "slice boundary"), flat.numel(), flat.numel() * flat.element_size()))
        rows = [sp._unpack(gathered[r], [row], lead)[0] for r in range(owner.world_size)]
        self.gathered[id(sequence)] = (sequence, rows)
        return rows

    def shift(self, sequence: torch.Tensor, initial: torch.Tensor, direction: ir.Direction) -> torch.Tensor:
        """The previous values of a state's sequence on this slice, across the slice's edge."""
        from .backends.sequential import delayed

        rank, world = self.owner.rank, self.owner.world_size
        reverse = direction is ir.Direction.REVERSE
        edge = None
        if world > 1:
            rows = self.rows(sequence, direction)
            if reverse and rank < world - 1:
                edge = rows[rank + 1]
            elif not reverse and rank > 0:
                edge = rows[rank - 1]
        if self.packed is None:
            return delayed(sequence, initial if edge is None else edge, direction)
        # Packed: each sequence's first step (a reverse state's last) reads its initial row;
        # the slice's edge step is one where no rank is beyond it.
        starts, index = _packed_steps(self.packed, sequence.shape[1], sequence.device, reverse)
        shifted = delayed(sequence, torch.zeros_like(sequence[:, 0]) if edge is None else edge, direction)
        mask = starts.reshape((1, -1) + (1,) * (sequence.dim() - 2))
        return torch.where(mask, initial[index].unsqueeze(0).to(shifted.dtype), shifted)

    def ends(self, sequence: torch.Tensor, direction: ir.Direction) -> torch.Tensor:
        """A delay's value after the whole sequence, on every rank (this slice's own when not asked for)."""
        reverse = direction is ir.Direction.REVERSE
        if self.packed is not None:
            return self._packed_ends(sequence, reverse)
        if self.owner.world_size == 1 or not self.need_final:
            return sequence[:, 0] if reverse else sequence[:, -1]
        rows = self.rows(sequence, direction)
        return rows[0] if reverse else rows[-1]

    def _packed_ends(self, sequence: torch.Tensor, reverse: bool) -> torch.Tensor:
        """Packed: each sequence's value at its last step (a reverse delay's: its first), ``[N, ...]``,
        from the rank that holds that step, summed over the ranks in one all-reduce."""
        from . import distributed as sp

        packed, owner = self.packed, self.owner
        count = len(packed.offsets) - 1
        held = []  # (sequence, local step) of each sequence whose row this slice holds
        for n in range(count):
            local = (packed.offsets[n] if reverse else packed.offsets[n + 1] - 1) - packed.begin
            if 0 <= local < sequence.shape[1]:
                held.append((n, local))
        index = torch.tensor([n for n, _ in held], dtype=torch.long, device=sequence.device)
        steps = torch.tensor([t for _, t in held], dtype=torch.long, device=sequence.device)
        # Copied in even when this slice holds none, so that every rank's graph has the all-reduce.
        rows = sequence.new_zeros((count,) + tuple(sequence.shape[2:])).index_copy(0, index, sequence[0].index_select(0, steps))
        if owner.world_size == 1 or not self.need_final:
            return rows
        lead = (count,)
        real = rows.real.dtype if rows.is_complex() else rows.dtype
        flat = sp._pack([rows], lead, real)
        order = self.token if self.token is not None else flat.new_zeros(())
        summed = sp._AllReduceSum.apply(flat, order, owner.group, owner.collective_time)
        self.token = summed
        owner.last_exchange.append((("newton", "final states"), flat.numel(), flat.numel() * flat.element_size()))
        return sp._unpack(summed, [rows], lead)[0]


def _reversed(packed: Any) -> Any:
    """A packed slice seen in reversed time: sequence ``n`` becomes ``N - 1 - n``."""
    total = packed.offsets[-1]
    return replace(packed, offsets=tuple(total - o for o in reversed(packed.offsets)), begin=total - packed.begin - packed.length)


def _packed_steps(packed: Any, steps: int, device: torch.device, reverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Of each step of the slice: whether it is its sequence's first (``reverse``: its last), and its sequence."""
    offsets = torch.tensor(packed.offsets, dtype=torch.long, device=device)
    positions = packed.begin + torch.arange(steps, device=device)
    starts = torch.isin(positions + 1, offsets[1:]) if reverse else torch.isin(positions, offsets[:-1])
    return starts, torch.searchsorted(offsets[1:], positions, right=True)


class _Resets:
    """A newton step whose previous state, at each sequence's first step, is that sequence's initial state.

    ``starts`` (``[T_r]`` bool) marks the slice's sequence starts, ``rows``
    (``[1, T_r, *heads, n]``) the initial state of each step's sequence.  The step then
    reads nothing of the previous state there, so its Jacobian (and every product through
    it) is zero: the reset that cuts the exchange's summaries at a sequence boundary.
    """

    def __init__(self, step: Any, starts: torch.Tensor, rows: torch.Tensor) -> None:
        self.step, self.starts, self.rows = step, starts, rows

    def reset(self, previous: torch.Tensor) -> torch.Tensor:
        mask = self.starts.reshape((1, -1) + (1,) * (previous.dim() - 2))
        return torch.where(mask, self.rows, previous)

    def __call__(self, previous: torch.Tensor) -> torch.Tensor:
        return self.step(self.reset(previous))

    def values(self, previous: torch.Tensor, extra: dict | None = None):
        return self.step.values(previous, extra)  # callers pass a previous state already reset

    def at(self, start: int, stop: int) -> "_Resets":
        return _Resets(self.step.at(start, stop), self.starts[start:stop], self.rows[:, start:stop])

    def detached(self) -> "_Resets":
        return _Resets(self.step.detached(), self.starts, self.rows.detach())


def _with_resets(step: Any, given: torch.Tensor, packed: Any, steps: int) -> tuple[_Resets, list[tuple[int, int]]]:
    """``step`` with the packed sequences' resets, and ``(sequence, local step)`` of each sequence ending in this slice."""
    starts, sequence = _packed_steps(packed, steps, given.device)
    ends = [(n, end - 1 - packed.begin) for n, end in enumerate(packed.offsets[1:]) if packed.begin < end <= packed.begin + steps]
    return _Resets(step, starts, given[sequence].unsqueeze(0)), ends


def _newton(group: _Group, step, initial: torch.Tensor, steps: int, plan, mode, tolerance: float, max_iterations: int, index: torch.Tensor):
    """The converged slice ``[B, T_r, *heads, n]``, its halo, the whole sequence's final state, the Jacobians there."""
    from .backends import newton as nt

    rank, world, size = group.rank, group.world, plan.size
    lead = tuple(initial.shape[:-1])
    # The initial guess: every step taken from the (cell's) initial state, as the newton backend.
    trajectory = step(initial.unsqueeze(1).expand(initial.shape[:1] + (steps,) + initial.shape[1:]))
    halo = initial
    if world > 1:
        # Each slice's first step reads the previous slice's last state from the start, so that
        # every iteration is a Newton step of the whole sequence's system (a guess that holds a
        # slice's own initial value would let its residual vanish at the wrong fixed point).
        guessed = group.gather(trajectory[:, -1].reshape(-1))
        halo = initial if rank == 0 else guessed[rank - 1].reshape(initial.shape)
    iterations = 0
    while True:
        value, jacobian = nt._evaluate_with_jacobian(step, nt._shift(halo, trajectory), plan, mode, index)
        residual = nt._residual(value, trajectory)
        errors = nt._step_errors(residual, value)
        local = nt._solve_linear(jacobian, residual, index, size)
        unconverged = torch.nonzero(~(errors <= tolerance))
        first_unconverged = float(unconverged[0]) if len(unconverged) else -1.0
        templates = [_product(jacobian), local[:, -1], trajectory[:, -1]]
        scalars = torch.tensor([float(errors.max()), first_unconverged], dtype=initial.dtype, device=initial.device)
        gathered = group.gather(torch.cat([_pack(templates, lead), scalars]))
        summaries = [_unpack(g, templates) for g in gathered]
        worst = max(float(g[-2]) for g in gathered)
        if worst != worst or worst == float("inf") or worst <= tolerance or iterations >= max_iterations:
            break
        # The correction entering each slice: the exclusive fold of the slices before it (rank 0's is zero).
        incoming = [torch.zeros_like(local[:, -1])]
        for j in range(world - 1):
            incoming.append(_apply(summaries[j][0], jacobian.diagonal, incoming[j], index, size) + summaries[j][1])
        if rank > 0:
            residual = residual.clone()
            residual[:, 0] = residual[:, 0] + _apply(jacobian.values[:, 0], jacobian.diagonal, incoming[rank], index, size)
            local = nt._solve_linear(jacobian, residual, index, size)
            halo = summaries[rank - 1][2] + incoming[rank]  # the previous slice's last state, corrected
        trajectory = trajectory + local
        iterations += 1
    lasts = [summary[2] for summary in summaries]
    if not worst <= tolerance:
        # Steps from the first unconverged one on are run one by one, rank after rank (the
        # single-process backend runs its unconverged suffix so).
        first_bad = [int(g[-1]) for g in gathered]
        bad_rank = next(j for j, found in enumerate(first_bad) if found >= 0)
        trajectory = _sweep(group, step, trajectory, initial if rank == 0 else lasts[rank - 1], first_bad[rank] if rank == bad_rank else 0, bad_rank)
        lasts = [g.reshape(initial.shape) for g in group.gather(trajectory[:, -1].reshape(-1))]
    halo = initial if rank == 0 else lasts[rank - 1]
    _, jacobian = nt._evaluate_with_jacobian(step, nt._shift(halo, trajectory), plan, mode, index)
    return trajectory, halo, lasts[world - 1], jacobian


def _sweep(group: _Group, step, trajectory: torch.Tensor, halo: torch.Tensor, start: int, bad_rank: int) -> torch.Tensor:
    """Run this slice's steps from ``start`` one by one; from the first unconverged rank on, in rank order."""
    import torch.distributed as dist

    rank, world = group.rank, group.world
    if rank < bad_rank:
        return trajectory
    carried = halo if start == 0 else trajectory[:, start - 1]
    if rank > bad_rank:
        carried = torch.empty_like(halo)
        dist.recv(carried, src=group.global_rank(rank - 1), group=group.group)
    trajectory = trajectory.clone()
    for t in range(start, trajectory.shape[1]):
        carried = step.at(t, t + 1)(carried.unsqueeze(1)).squeeze(1)
        trajectory[:, t] = carried
    if rank < world - 1:
        dist.send(carried.contiguous(), dst=group.global_rank(rank + 1), group=group.group)
    return trajectory


class _ShardedAdjoint(torch.autograd.Function):
    """``(solution, halo, final)`` unchanged; backward turns their gradients into this slice's adjoint ``lambda``.

    ``halo`` is the state before the slice's first step as its outputs read it, ``final`` the
    whole sequence's final state; their gradients enter the exchange of adjoint summaries.
    """

    @staticmethod
    def forward(ctx, solution: torch.Tensor, halo: torch.Tensor, final: torch.Tensor, context: tuple):
        ctx.context = context
        ctx.shapes = (solution.shape, halo.shape, final.shape)
        ctx.dtype = solution.dtype
        return solution.view_as(solution), halo.clone(), final.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gradient, halo_gradient, final_gradient):
        from .backends import newton as nt

        group, jacobian, index, size, quasi, ends = ctx.context
        solution_shape, halo_shape, final_shape = ctx.shapes
        zeros = lambda shape: torch.zeros(shape, dtype=ctx.dtype, device=jacobian.values.device)  # noqa: E731
        gradient = zeros(solution_shape) if gradient is None else gradient.contiguous()
        halo_gradient = zeros(halo_shape) if halo_gradient is None else halo_gradient
        final_gradient = zeros(final_shape) if final_gradient is None else final_gradient
        if ends is not None:
            # Packed: each sequence's final state is the step where it ends; its gradient,
            # summed over the ranks that read it, enters there (none crosses a slice).
            import torch.distributed as dist

            final_gradient = final_gradient.contiguous().clone()
            if group.world > 1:
                dist.all_reduce(final_gradient, group=group.group)
            gradient = gradient.clone()
            for sequence, step in ends:
                gradient[0, step] = gradient[0, step] + final_gradient[sequence]
            final_gradient = zeros(halo_shape)
        if quasi is not None:
            return _ring_adjoint(group, jacobian, index, size, quasi, gradient, halo_gradient, final_gradient), halo_gradient, None, None
        # The slice's adjoint from a zero carry, and what it sends to the slice before it.
        adjoint = nt._solve_adjoint(jacobian, gradient, index, size)
        leaving = halo_gradient + _apply(jacobian.values[:, 0], jacobian.diagonal, adjoint[:, 0], index, size, transposed=True)
        product = _product(jacobian)
        templates = [product, leaving, final_gradient]
        lead = tuple(halo_shape[:-1])
        summaries = [_unpack(g, templates) for g in group.gather(_pack(templates, lead), backward=True)]
        # The adjoint entering this slice's last step: the final state's gradient (summed over
        # the ranks that read it), carried back through every later slice.
        carry = sum(summary[2] for summary in summaries)
        for j in range(group.world - 1, group.rank, -1):
            carry = summaries[j][1] + _apply(summaries[j][0], jacobian.diagonal, carry, index, size, transposed=True)
        gradient = gradient.clone()
        gradient[:, -1] = gradient[:, -1] + carry
        return nt._solve_adjoint(jacobian, gradient, index, size), halo_gradient, None, None


@dataclass
class _QuasiAdjoint:
    """What the backward of a quasi-Newton solve needs: the true ``J^T`` is known only through
    vector-Jacobian products of ``step`` at ``previous`` (the slice's shifted solution, its
    first row the halo); the diagonal kept by the solve preconditions the local adjoint."""

    step: Any
    previous: torch.Tensor
    tolerance: float
    max_iterations: int


def _ring_adjoint(group: _Group, jacobian, index: torch.Tensor, size: int, quasi: _QuasiAdjoint, gradient: torch.Tensor, halo_gradient: torch.Tensor, final_gradient: torch.Tensor) -> torch.Tensor:
    """The slice's exact adjoint when its Jacobians are known only through products (a ring).

    The exact summary of a slice would be the transposed product of its dense Jacobians,
    ``nb m^2`` numbers that cost ``m`` vector-Jacobian products per step to form: what the
    quasi-Newton solve avoids.  The adjoint's state is only ``n`` numbers, so it travels
    along a ring (LASP's) from the last rank to the first: each rank receives the adjoint
    entering its last step, solves its slice exactly once (the newton backend's iterative
    adjoint: exact ``J^T`` residuals, corrections by the diagonal's reverse scan), and sends
    on ``h_r + J_0^T lambda_0`` (``h_r`` the gradient of the outputs reading its halo).
    ``P - 1`` hops one after the other; one all-reduce first sums the final state's gradient
    over the ranks that read it.
    """
    import time

    import torch.distributed as dist

    from .backends import newton as nt

    rank, world = group.rank, group.world
    started = time.perf_counter()
    carry = final_gradient.contiguous().clone()
    if world > 1:
        dist.all_reduce(carry, group=group.group)
        if rank < world - 1:
            dist.recv(carry, src=group.global_rank(rank + 1), group=group.group)
    group.clock.backward += time.perf_counter() - started
    gradient = gradient.clone()
    gradient[:, -1] = gradient[:, -1] + carry
    linearisation = nt._Linearisation(jacobian, False, index, size, quasi.step, quasi.previous, quasi.tolerance, quasi.max_iterations)
    adjoint = nt._iterative_adjoint(linearisation, gradient)
    if rank > 0:
        with torch.enable_grad():
            halo = quasi.previous[:, :1].detach().requires_grad_()
            (entering,) = torch.autograd.grad(quasi.step.at(0, 1)(halo), halo, adjoint[:, :1])
        leaving = (halo_gradient + entering[:, 0]).contiguous()
        started = time.perf_counter()
        dist.send(leaving, dst=group.global_rank(rank - 1), group=group.group)
        group.clock.backward += time.perf_counter() - started
    return adjoint
