"""The sequential backend: a loop over time, and the definition of what a cell means.

Time-parallel bindings and outputs (those that read no state) are computed once for the
whole sequence; everything else is evaluated step by step in source order, exactly as
the program reads.  Every other backend is tested against this one.
"""

from __future__ import annotations

from typing import Mapping

import torch

from recdsl import ir
from recdsl.plan import ExecutionPlan
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
