"""Reverse states and delays on the step-by-step backends (``newton``, ``fused``, the fused Triton kernel).

Those backends run one forward problem over the whole joint state.  A cell with reverse
states or delays is split, once at plan time, into that problem's pieces, as the
sequential backend's ``_run_directed`` (the definition) schedules them:

- a **delay** (a state whose update reads no recurrent value) is its update's values
  shifted one step, a time-parallel value: one ``cat``, no loop or solve;
- each other **group of the schedule** becomes a sub-cell of its own, in schedule order:
  its states (now forward), its updates and the bindings they read, and one ``out`` per
  state, its new value.  The values of every other state (earlier groups and delays) are
  inputs of the sub-cell: their whole sequences, before (``STATE_PREV``) and after
  (``STATE_NEW``) their updates.  A reverse group is a forward problem on the sequence
  flipped in time: its inputs are flipped, the backend runs it forward from the declared
  initial value (its value after the last step), and its state sequence is flipped back;
  the final state of that run is the state's value at step 0, which ``return_state``
  returns;
- the cell's **outputs** then read only whole sequences, so they are evaluated for all
  steps at once.

Gradients compose by autograd: each sub-run is differentiable in its inputs (the other
states' sequences included) and initial state, by the backend's own adjoint (Newton's
implicit differentiation, the fused loops' hand-derived adjoint loops, which run over the
flipped sequence, i.e. forward in time for a reverse group).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Mapping

import torch

from recdsl import ir
from recdsl.analysis import Analysis, analyze
from recdsl.errors import BackendError
from recdsl.ir import RefKind

from .sequential import _full_sequence, _LazySequences, delayed, pend_delays
from .torch_ops import Evaluator, Numerics


@dataclass(frozen=True)
class CarriedInput:
    """An input of a sub-cell that is another state's whole sequence (``kind``: before or after its update)."""

    name: str
    kind: RefKind  # STATE_PREV or STATE_NEW
    state: str


@dataclass(frozen=True)
class Part:
    """One group of the schedule as a forward sub-cell, and the backend's plan of it (set by the plan stage)."""

    names: tuple[str, ...]  # the group's states, in the order of the sub-cell's outputs
    direction: ir.Direction
    analysis: Analysis
    carried: tuple[CarriedInput, ...]
    plan: object | None = None  # the backend's ExecutionPlan of the sub-cell

    def describe(self) -> str:
        solver = getattr(self.plan, "solver", None)
        detail = solver.describe().splitlines()[0] if solver is not None and hasattr(solver, "describe") else ""
        run = "on the sequence flipped in time" if self.direction is ir.Direction.REVERSE else "forward"
        return f"{', '.join(self.names)} ({self.direction}): a sub-cell run {run}" + (f"; {detail}" if detail else "")


@dataclass(frozen=True)
class DirectedPlan:
    """A cell with reverse states or delays, as the step-by-step backends run it (see the module's docstring)."""

    parts: tuple[Part, ...]

    def describe(self) -> str:
        """One line for the whole, then one per part (``explain --plan``)."""
        lines = ["delays shifted one step (time-parallel); each other group of the schedule its own forward run, in schedule order"]
        lines.extend(f"    {part.describe()}" for part in self.parts)
        return "\n".join(lines)


def needed(analysis: Analysis) -> bool:
    """Whether the cell has reverse states or delays, so the step-by-step backends split it."""
    return bool(analysis.cell.reversed_recurrences or analysis.delays)


def _rewrite(expr: ir.Expr, replace_ref: Callable[[ir.Ref], ir.Expr | None]) -> ir.Expr:
    """``expr`` with each reference for which ``replace_ref`` returns a node replaced by it."""
    if isinstance(expr, ir.Ref):
        new = replace_ref(expr)
        return expr if new is None else new
    if isinstance(expr, ir.Op):
        args = tuple(_rewrite(arg, replace_ref) for arg in expr.args)
        return expr if args == expr.args and all(a is b for a, b in zip(args, expr.args)) else replace(expr, args=args)
    return expr


def split(analysis: Analysis) -> tuple[Part, ...] | str:
    """The forward sub-cells of ``analysis``'s cell, one per group of its schedule that is not a delay; or why it cannot be split."""
    cell = analysis.cell
    if cell.scans:
        scan = cell.scans[0]
        return f"scan '{scan.name}' combines a declared monoid, which the step-by-step backends do not run"
    taken = {d.name for d in cell.inputs} | {p.name for p in cell.params} | {c.name for c in cell.consts} | {s.name for s in cell.states}
    taken |= {s.name for s in cell.body if isinstance(s, (ir.Assign, ir.Emit)) and s.name}
    names: dict[tuple[RefKind, str], str] = {}

    def input_name(kind: RefKind, state: str) -> str:
        key = (kind, state)
        if key not in names:
            base = f"{state}__{'prev' if kind is RefKind.STATE_PREV else 'new'}"
            while base in taken:
                base += "_"
            taken.add(base)
            names[key] = base
        return names[key]

    bindings = {s.name: s for s in cell.body if isinstance(s, (ir.Assign, ir.Emit)) and s.name}
    parts: list[Part] = []
    for group in analysis.schedule:
        members = set(group)
        if members <= analysis.delays:
            continue
        # The bindings the group's updates read, directly or through other bindings.
        needed_bindings: set[str] = set()
        pending = [cell.update(name).value for name in group]
        while pending:
            for ref in ir.refs(pending.pop()):
                if ref.kind is RefKind.BINDING and ref.name not in needed_bindings and ref.name in bindings:
                    needed_bindings.add(ref.name)
                    pending.append(bindings[ref.name].value)
        carried: dict[tuple[RefKind, str], CarriedInput] = {}

        def outside(ref: ir.Ref) -> ir.Expr | None:
            if ref.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW) and ref.name not in members:
                key = (ref.kind, ref.name)
                if key not in carried:
                    carried[key] = CarriedInput(input_name(ref.kind, ref.name), ref.kind, ref.name)
                return ir.Ref(RefKind.INPUT, carried[key].name, ref.type)
            return None

        body: list[ir.Statement] = []
        for statement in cell.body:
            if isinstance(statement, (ir.Assign, ir.Emit)) and statement.name in needed_bindings:
                body.append(ir.Assign(statement.name, _rewrite(statement.value, outside), statement.span))
            elif isinstance(statement, ir.Update) and statement.state in members:
                body.append(replace(statement, value=_rewrite(statement.value, outside)))
        order = tuple(s.name for s in cell.states if s.name in members)
        for index, name in enumerate(order):
            body.append(ir.Emit(index, None, ir.Ref(RefKind.STATE_NEW, name, cell.state(name).type)))
        extra = tuple(ir.Input(c.name, cell.state(c.state).type) for c in carried.values())
        sub = ir.CellIR(
            name=f"{cell.name}_{'_'.join(order)}",
            dims=cell.dims,
            inputs=cell.inputs + extra,
            params=cell.params,
            consts=cell.consts,
            states=tuple(replace(s, direction=ir.Direction.FORWARD) for s in cell.states if s.name in members),
            body=tuple(body),
            span=cell.span,
        )
        parts.append(Part(order, analysis.direction(group), analyze(sub), tuple(carried.values())))
    return tuple(parts)


def _flip(value: torch.Tensor, declared: ir.Type) -> torch.Tensor:
    """``value`` reversed in time (a value with no time dim, a param's, is the same at every step)."""
    return value.flip(1) if value.dim() > declared.rank else value


def run(
    plan,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    run_part: Callable[..., tuple[list[torch.Tensor], dict[str, torch.Tensor]]],
    last_steps: torch.Tensor | None = None,
    shift: Callable[[torch.Tensor, torch.Tensor, ir.Direction], torch.Tensor] = delayed,
    ends: Callable[[torch.Tensor, ir.Direction], torch.Tensor] | None = None,
    **options,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run a plan whose ``directed`` is a :class:`DirectedPlan`: delays shifted, each part by
    ``run_part(part.plan, inputs, params, consts, state, numerics, **options)`` in schedule
    order (reverse parts on flipped inputs), the outputs from the whole sequences.

    ``last_steps`` (sequences padded at their ends) is refused with a reverse part: its
    value at the padded end is not its initial value.

    ``shift(sequence, initial, direction)`` gives a state's previous values from its new
    ones (:func:`~.sequential.delayed`: ``initial`` fills the step with no predecessor) and
    ``ends(sequence, direction)`` a delay's value after the whole sequence (its last step's,
    or a reverse one's first); a run on one slice of a sharded sequence
    (:mod:`recdsl.distributed_newton`) passes its own, which read the neighbouring slices."""
    directed: DirectedPlan = plan.directed
    analysis = plan.analysis
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])  # (B, T, *heads)
    if last_steps is not None and any(p.direction is ir.Direction.REVERSE for p in directed.parts) or (last_steps is not None and any(cell.state(n).reverse for n in analysis.delays)):
        raise BackendError(
            f"cell {cell.name} has states that run backwards in time, which sequences padded at their ends cannot start at their last step",
            expected="one call per sequence for a cell with reverse states",
        )

    whole = _LazySequences()
    whole.update({(RefKind.PARAM, name): value for name, value in params.items()})
    whole.update({(RefKind.CONST, name): value for name, value in consts.items()})
    whole.update({(RefKind.INPUT, name): value for name, value in inputs.items()})
    whole_eval = Evaluator(numerics, whole)
    for statement in cell.body:
        if isinstance(statement, (ir.Assign, ir.Emit)) and statement.name:
            whole.pending[(RefKind.BINDING, statement.name)] = lambda expr=statement.value: whole_eval.evaluate(expr)
    pend_delays(whole, whole_eval.evaluate, analysis, state, lead, shift)

    final: dict[str, torch.Tensor] = {}
    rows = None if last_steps is None else torch.arange(lead[0], device=last_steps.device)
    for name in sorted(analysis.delays):
        sequence = whole[(RefKind.STATE_NEW, name)]
        if ends is not None:
            final[name] = ends(sequence, cell.state(name).direction)
        elif cell.state(name).reverse:
            final[name] = sequence[:, 0]
        else:
            final[name] = sequence[:, -1] if last_steps is None else sequence[rows, last_steps]

    reports = []
    for part in directed.parts:
        reverse = part.direction is ir.Direction.REVERSE
        sub_inputs: dict[str, torch.Tensor] = {}
        for declared in cell.inputs:
            sub_inputs[declared.name] = _flip(inputs[declared.name], declared.type) if reverse else inputs[declared.name]
        for carried in part.carried:
            value = whole[(carried.kind, carried.state)]
            sub_inputs[carried.name] = value.flip(1) if reverse else value
        sub_state = {name: state[name] for name in part.names}
        extra = dict(options)
        if "report" in options:
            extra["report"] = reports.append
        if last_steps is not None:
            extra["last_steps"] = last_steps
        sequences, sub_final = run_part(part.plan, sub_inputs, params, consts, sub_state, numerics, **extra)
        for name, sequence in zip(part.names, sequences):
            sequence = sequence.flip(1) if reverse else sequence
            whole[(RefKind.STATE_NEW, name)] = sequence
            # Shifted when first read (the outputs may read only the new values).
            whole.pending[(RefKind.STATE_PREV, name)] = lambda sequence=sequence, name=name, direction=part.direction: shift(sequence, state[name], direction)
            final[name] = sub_final[name]
    if reports and options.get("report") is not None:
        options["report"](_merged(reports))

    outputs = []
    for emit in cell.outputs:
        outputs.append(_full_sequence(whole_eval.evaluate(emit.value), emit.value.type, lead))
    return outputs, {name: final[name] for name in state}


def _merged(reports: list):
    """One report for several Newton solves (one per part): the most iterations, the largest residual."""
    if len(reports) == 1:
        return reports[0]
    worst = max(reports, key=lambda r: r.residual)
    return replace(
        worst,
        iterations=max(r.iterations for r in reports),
        converged=all(r.converged for r in reports),
        sequential_steps=max(r.sequential_steps for r in reports),
        trajectory=None,
    )
