"""The sequential backend: a loop over time, and the definition of what a cell means.

Time-parallel bindings and outputs (those that read no state) are computed once for the
whole sequence; everything else is evaluated step by step in source order, exactly as
the program reads.  Every other backend is tested against this one.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from recdsl import ir
from recdsl.plan import ExecutionPlan
from recdsl.analysis import Analysis, recurrent_sources
from recdsl.ir import RefKind

from .torch_ops import Evaluator, Numerics, align, combine_carries


def _steps(value: torch.Tensor, declared: ir.Type, steps: int) -> list[torch.Tensor] | tuple[torch.Tensor, ...]:
    """``value``'s per-step slices, taken once for the whole loop.

    Values with leading dims are ``[B, T, *heads, *shape]``; params and consts have none and
    are the same at every step.  ``unbind`` is one autograd node whose backward stacks the
    step gradients; indexing ``value[:, t]`` at every step would instead give each step a
    backward that writes a zero-filled gradient of the whole sequence, quadratic in T.
    """
    return value.unbind(1) if value.dim() > declared.rank else [value] * steps


def _full_sequence(value: torch.Tensor, declared: ir.Type, lead: tuple[int, ...]) -> torch.Tensor:
    """``value`` expanded to ``[*lead, *shape]`` (a value reading only params has no lead dims)."""
    return value.expand(lead + tuple(value.shape[value.dim() - declared.rank :]))


def _to_shape(value: torch.Tensor, declared: ir.Type, like: torch.Tensor) -> torch.Tensor:
    """``value`` (declared ``declared``, broadcasting to a state or carry) with the shape of ``like``."""
    if value.dim() > declared.rank:  # leading dims: insert the state's missing dims after them
        value = align(value, declared.rank, like.dim() - (value.dim() - declared.rank))
    return value.expand(like.shape) if value.shape != like.shape else value


def run(
    plan: ExecutionPlan,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    resets: Mapping[int, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the cell over ``inputs`` (``[B, T, *heads, *shape]``) from ``state``.

    ``state`` holds every carried value (``[B, *heads, *shape]``): the states by name and
    each scan's carries as ``scan.carry``.  Returns the outputs, each
    ``[B, T, *heads, *shape]``, and the final state in the same form as ``state``.
    ``resets`` maps a step to the batch rows whose carried values are put back to their
    rows of ``state`` before it (sequences of different lengths aligned at their ends,
    :class:`.segments.EndAligned`).
    """
    analysis = plan.analysis
    cell = analysis.cell
    if cell.reversed_recurrences or analysis.delays:
        return _run_directed(plan, inputs, params, consts, state, numerics, resets)
    first = next(iter(inputs.values()))
    first_decl = cell.inputs[0].type
    lead = tuple(first.shape[: first.dim() - first_decl.rank])  # (B, T, *heads)
    steps = lead[1]

    shared: dict[tuple[RefKind, str], torch.Tensor] = {}
    shared.update({(RefKind.PARAM, name): value for name, value in params.items()})
    shared.update({(RefKind.CONST, name): value for name, value in consts.items()})

    # Everything that reads no state, for all steps at once.
    whole: dict[tuple[RefKind, str], torch.Tensor] = dict(shared)
    whole.update({(RefKind.INPUT, name): value for name, value in inputs.items()})
    whole_eval = Evaluator(numerics, whole)
    parallel: dict[str, tuple[torch.Tensor, ir.Type]] = {}
    parallel_outputs: dict[int, torch.Tensor] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            value = whole_eval.evaluate(statement.value)
            whole[(RefKind.BINDING, statement.name)] = value
            parallel[statement.name] = (value, statement.value.type)
        elif isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            value = whole_eval.evaluate(statement.value)
            if statement.name is not None:
                whole[(RefKind.BINDING, statement.name)] = value
                parallel[statement.name] = (value, statement.value.type)
            parallel_outputs[statement.index] = _full_sequence(value, statement.value.type, lead)

    # State-free parts of step-by-step statements (GRU's input projections), for all steps at once.
    hoisted = [(node, _steps(whole_eval.evaluate(node), node.type, steps)) for node in analysis.hoisted]
    input_steps = {name: value.unbind(1) for name, value in inputs.items()}
    parallel_steps = {name: _steps(value, decl, steps) for name, (value, decl) in parallel.items()}

    carried = dict(state)
    scans = {s.name: s for s in cell.scans}
    per_step: dict[int, list[torch.Tensor]] = {e.index: [] for e in cell.outputs if e.index not in parallel_outputs}
    for t in range(steps):
        if resets is not None and t in resets:
            rows = resets[t]
            carried = {name: value.index_copy(0, rows, state[name].index_select(0, rows).to(value.dtype)) for name, value in carried.items()}
        values: dict[tuple[RefKind, str], torch.Tensor] = dict(shared)
        values.update({(RefKind.INPUT, name): value[t] for name, value in input_steps.items()})
        values.update({(RefKind.BINDING, name): value[t] for name, value in parallel_steps.items()})
        values.update({(RefKind.STATE_PREV, s.name): carried[s.name] for s in cell.states})
        # Within a step each ref gets its value once, so one memo serves the whole step.
        evaluator = Evaluator(numerics, values, shared=True)
        for node, value in hoisted:
            evaluator.seed(node, value[t])
        for statement in cell.body:
            if isinstance(statement, ir.Assign):
                if statement.name not in analysis.time_parallel:
                    values[(RefKind.BINDING, statement.name)] = evaluator.evaluate(statement.value)
            elif isinstance(statement, ir.Update):
                new = evaluator.evaluate(statement.value)
                new = _to_shape(new, statement.value.type, carried[statement.state])
                values[(RefKind.STATE_NEW, statement.state)] = new
                carried[statement.state] = new
            elif isinstance(statement, ir.ScanAssign):
                monoid = scans[statement.name].monoid
                element = {}
                for carry, lift in zip(monoid.carries, statement.lifts):
                    value = evaluator.evaluate(lift)
                    element[carry.name] = _to_shape(value, lift.type, carried[f"{statement.name}.{carry.name}"])
                previous = {c.name: carried[f"{statement.name}.{c.name}"] for c in monoid.carries}
                combined = combine_carries(monoid, previous, element, numerics)
                for carry in monoid.carries:
                    carried[f"{statement.name}.{carry.name}"] = combined[carry.name]
                    values[(RefKind.SCAN, f"{statement.name}.{carry.name}")] = combined[carry.name]
            elif isinstance(statement, ir.Emit) and statement.index in per_step:
                value = evaluator.evaluate(statement.value)
                if statement.name is not None:
                    values[(RefKind.BINDING, statement.name)] = value
                step_lead = (lead[0],) + lead[2:]
                per_step[statement.index].append(_full_sequence(value, statement.value.type, step_lead))

    outputs = []
    for emit in cell.outputs:
        if emit.index in parallel_outputs:
            outputs.append(parallel_outputs[emit.index])
        else:
            outputs.append(torch.stack(per_step[emit.index], dim=1))
    return outputs, carried


# ---- cells with reverse recurrences or delays --------------------------------------------


class _LazySequences(dict):
    """Whole-sequence values by ``(RefKind, label)``; a pending one is computed on first read
    (a time-parallel binding may read a delay declared, or updated, further down)."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[tuple[RefKind, str], Callable[[], torch.Tensor]] = {}

    def __missing__(self, key):
        make = self.pending.pop(key, None)
        if make is None:
            raise KeyError(key)
        value = make()
        self[key] = value
        return value


def _sequence_of(value: torch.Tensor, declared: ir.Type, target: ir.Type, lead: tuple[int, ...]) -> torch.Tensor:
    """``value`` (declared ``declared``, broadcasting to ``target``) as ``[*lead, *target.shape]``."""
    if value.dim() > declared.rank:
        value = align(value, declared.rank, target.rank)
    else:
        value = value.reshape((1,) * (target.rank - declared.rank) + tuple(value.shape))
    return value.expand(lead + target.shape)


def delayed(sequence: torch.Tensor, initial: torch.Tensor, direction: ir.Direction) -> torch.Tensor:
    """The previous values of a sequence ``[B, T, ...]``: shifted one step later (forward) or
    earlier (reverse), ``initial`` (``[B, ...]``) filling the step with no predecessor."""
    if direction is ir.Direction.REVERSE:
        return torch.cat([sequence[:, 1:], initial.unsqueeze(1)], 1)
    return torch.cat([initial.unsqueeze(1), sequence[:, :-1]], 1)


def pend_delays(
    whole: "_LazySequences",
    evaluate: Callable[[ir.Expr], torch.Tensor],
    analysis: Analysis,
    state: Mapping[str, torch.Tensor],
    lead: tuple[int, ...],
    shift: Callable[[torch.Tensor, torch.Tensor, ir.Direction], torch.Tensor] = delayed,
) -> None:
    """Make each delay's whole sequence a pending value of ``whole``: its update over every
    step (``evaluate``), and its previous values that sequence shifted by ``shift`` from the
    delay's row of ``state``.  Computed on first read, so a delay nothing reads costs nothing."""
    cell = analysis.cell
    for name in analysis.delays:
        declared = cell.state(name)
        update = analysis.state(name).update

        def new_values(update=update, declared=declared) -> torch.Tensor:
            return _sequence_of(evaluate(update), update.type, declared.type, lead)

        whole.pending[(RefKind.STATE_NEW, name)] = new_values
        whole.pending[(RefKind.STATE_PREV, name)] = lambda name=name, declared=declared: shift(whole[(RefKind.STATE_NEW, name)], state[name], declared.direction)


def _run_directed(
    plan: ExecutionPlan,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    resets: Mapping[int, torch.Tensor] | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """:func:`run` for a cell with reverse recurrences or delays: the definition of both.

    Delays are their update's values shifted one step (one ``cat``).  Then each group of
    the schedule runs its own loop over time, forward or from the last step to the first,
    evaluating in source order its updates and the bindings that become computable, with
    the values of earlier groups at the same step; a reverse state's previous value is its
    value at the step after.  A last forward loop evaluates the outputs.

    ``resets`` (rows aligned at their ends, :class:`.segments.EndAligned`): row ``b``'s
    sequence starts at step ``first_steps[b]``.  Forward states and delays take their
    initial value there; reverse ones start at the last step, every row's own, and return
    their value at ``first_steps[b]`` (what they compute before it, over the padding, is
    discarded).
    """
    analysis = plan.analysis
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])  # (B, T, *heads)
    steps = lead[1]
    sources = analysis.dependencies
    rows = torch.arange(lead[0], device=first.device)
    first_steps = torch.zeros(lead[0], dtype=torch.long, device=first.device)  # each row's first step
    for t, starting in (resets or {}).items():
        first_steps = first_steps.index_fill(0, starting, t)

    def delayed_in_rows(sequence: torch.Tensor, initial: torch.Tensor, direction: ir.Direction) -> torch.Tensor:
        shifted = delayed(sequence, initial, direction)
        if resets and direction is ir.Direction.FORWARD:  # nothing leaks in from the padding before a row's first step
            shifted = shifted.index_put((rows, first_steps), initial.to(shifted.dtype).expand(shifted[:, 0].shape))
        return shifted

    shared: dict[tuple[RefKind, str], torch.Tensor] = {}
    shared.update({(RefKind.PARAM, name): value for name, value in params.items()})
    shared.update({(RefKind.CONST, name): value for name, value in consts.items()})
    whole = _LazySequences()
    whole.update(shared)
    whole.update({(RefKind.INPUT, name): value for name, value in inputs.items()})
    whole_eval = Evaluator(numerics, whole)
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            whole.pending[(RefKind.BINDING, statement.name)] = lambda expr=statement.value: whole_eval.evaluate(expr)
    pend_delays(whole, whole_eval.evaluate, analysis, state, lead, delayed_in_rows)

    # Bindings that read delays and nothing else recurrent are time-parallel too, once the
    # delays are shifted (RWKV's token-shift mix).
    after_delays = {
        s.name for s in cell.body
        if isinstance(s, ir.Assign) and s.name not in analysis.time_parallel and analysis.delays and sources.get(s.name, frozenset()) <= analysis.delays
    }
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in after_delays:
            whole.pending[(RefKind.BINDING, statement.name)] = lambda expr=statement.value: whole_eval.evaluate(expr)

    per_step: dict[tuple[RefKind, str], list[torch.Tensor] | tuple[torch.Tensor, ...]] = {}
    per_step.update({(RefKind.INPUT, name): value.unbind(1) for name, value in inputs.items()})
    parallel_outputs: dict[int, torch.Tensor] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and (statement.name in analysis.time_parallel or statement.name in after_delays):
            per_step[(RefKind.BINDING, statement.name)] = _steps(whole[(RefKind.BINDING, statement.name)], statement.value.type, steps)
        elif isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            value = whole_eval.evaluate(statement.value)
            if statement.name is not None:
                whole[(RefKind.BINDING, statement.name)] = value
                per_step[(RefKind.BINDING, statement.name)] = _steps(value, statement.value.type, steps)
            parallel_outputs[statement.index] = _full_sequence(value, statement.value.type, lead)
    final: dict[str, torch.Tensor] = {}
    for name in sorted(analysis.delays):
        for kind in (RefKind.STATE_NEW, RefKind.STATE_PREV):
            per_step[(kind, name)] = whole[(kind, name)].unbind(1)
        sequence = whole[(RefKind.STATE_NEW, name)]
        final[name] = sequence[rows, first_steps] if cell.state(name).reverse else sequence[:, -1]
    hoisted = [(node, _steps(whole_eval.evaluate(node), node.type, steps)) for node in analysis.hoisted]

    scans = {s.name: s for s in cell.scans}
    done: set[str] = set(analysis.delays)
    computed = {name for kind, name in per_step if kind is RefKind.BINDING}
    computed |= {f"#out{index}" for index in parallel_outputs}
    emitted: dict[int, list[torch.Tensor]] = {}

    def named(statement) -> str | None:
        """The key of a binding or step-by-step output (None for anything else)."""
        if isinstance(statement, ir.Assign):
            return statement.name
        if isinstance(statement, ir.Emit) and statement.index not in parallel_outputs:
            return statement.name if statement.name is not None else f"#out{statement.index}"
        return None

    def reads(statement) -> frozenset[str]:
        return recurrent_sources(statement.value, sources)

    def loop(order: range, statements: list, carried: dict[str, torch.Tensor], members: set[str], reverse: bool = False) -> None:
        records: dict[tuple[RefKind, str], list] = {}
        for t in order:
            if resets and not reverse and t in resets:  # a row's sequence starts here: its initial state
                starting = resets[t]
                carried.update({key: value.index_copy(0, starting, state[key].index_select(0, starting).to(value.dtype)) for key, value in carried.items()})
            values: dict[tuple[RefKind, str], torch.Tensor] = dict(shared)
            values.update({key: sequence[t] for key, sequence in per_step.items()})
            values.update({(RefKind.STATE_PREV, s.name): carried[s.name] for s in cell.states if s.name in members})
            evaluator = Evaluator(numerics, values, shared=True)
            for node, value in hoisted:
                evaluator.seed(node, value[t])

            def record(key: tuple[RefKind, str], value: torch.Tensor) -> None:
                values[key] = value
                records.setdefault(key, [None] * steps)[t] = value

            for statement in statements:
                if isinstance(statement, ir.Update):
                    new = _to_shape(evaluator.evaluate(statement.value), statement.value.type, carried[statement.state])
                    record((RefKind.STATE_PREV, statement.state), carried[statement.state])
                    record((RefKind.STATE_NEW, statement.state), new)
                    carried[statement.state] = new
                elif isinstance(statement, ir.ScanAssign):
                    monoid = scans[statement.name].monoid
                    element = {}
                    for carry, lift in zip(monoid.carries, statement.lifts):
                        element[carry.name] = _to_shape(evaluator.evaluate(lift), lift.type, carried[f"{statement.name}.{carry.name}"])
                    previous = {c.name: carried[f"{statement.name}.{c.name}"] for c in monoid.carries}
                    # The suffix combine keeps the sequence's order: x_t (+) (x_{t+1} (+) ...).
                    if statement.reverse:
                        combined = combine_carries(monoid, element, previous, numerics)
                    else:
                        combined = combine_carries(monoid, previous, element, numerics)
                    for carry in monoid.carries:
                        carried[f"{statement.name}.{carry.name}"] = combined[carry.name]
                        record((RefKind.SCAN, f"{statement.name}.{carry.name}"), combined[carry.name])
                else:
                    value = evaluator.evaluate(statement.value)
                    if statement.name is not None:
                        record((RefKind.BINDING, statement.name), value)
                    if isinstance(statement, ir.Emit):
                        step_lead = (lead[0],) + lead[2:]
                        emitted.setdefault(statement.index, [None] * steps)[t] = _full_sequence(value, statement.value.type, step_lead)
            if resets and reverse and t in resets:  # a row's sequence starts here: keep its reverse states' returned values
                starting = resets[t]
                returned.update({key: returned.get(key, value).index_copy(0, starting, value.index_select(0, starting)) for key, value in carried.items()})
        per_step.update(records)

    for group in analysis.schedule:
        members = set(group)
        if members <= done:
            continue
        ready = done | members
        statements = []
        for statement in cell.body:
            name = named(statement)
            if name is not None and name not in computed and reads(statement) <= ready:
                statements.append(statement)
                computed.add(name)
            elif isinstance(statement, ir.Update) and statement.state in members:
                statements.append(statement)
            elif isinstance(statement, ir.ScanAssign) and statement.name in members:
                statements.append(statement)
        carried = {key: value for key, value in state.items() if key.split(".")[0] in members}
        reverse = analysis.direction(group) is ir.Direction.REVERSE
        returned: dict[str, torch.Tensor] = {}
        loop(range(steps - 1, -1, -1) if reverse else range(steps), statements, carried, members, reverse)
        final.update(carried)
        if returned:  # rows that start after step 0 return the value kept at their first step
            late = torch.cat(list(resets.values()))
            final.update({key: carried[key].index_copy(0, late, returned[key].index_select(0, late)) for key in returned})
        done |= members
    rest = [s for s in cell.body if named(s) is not None and named(s) not in computed]
    if rest:
        loop(range(steps), rest, {}, set())

    outputs = []
    for emit in cell.outputs:
        if emit.index in parallel_outputs:
            outputs.append(parallel_outputs[emit.index])
        else:
            outputs.append(torch.stack(emitted[emit.index], dim=1))
    return outputs, {name: final[name] for name in state}
