"""``recdsl explain``: the analysis of a cell, in words a researcher reads."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from . import ir
from .analysis import (
    Analysis,
    BlockAxes,
    DiagonalAffine,
    JointAffine,
    MatrixAffine,
    Delay,
    NoRecurrence,
    Nonlinear,
    SemiringAffine,
    analyze,
)
from .frontend import load
from .plan import BackendKind
from .printer import format_expr
from .printer import format_expr as _format


def _shape(t: ir.Type) -> str:
    return str(t)


def _state_lines(analysis: Analysis, name: str) -> list[str]:
    state = analysis.state(name)
    update = analysis.cell.update(name).value
    # Other states may be read both before and after their update: tell the two apart.
    others = frozenset(s.name for s in analysis.cell.states) - {name}

    def format_expr(expr: ir.Expr) -> str:
        return _format(expr, others)

    reverse = analysis.cell.state(name).reverse
    direction = "reverse state (runs from the last step to the first)" if reverse else "state"
    lines = [f"  {name} {_shape(state.type)}: {direction}, {_recurrence_title(state.recurrence)}"]
    if reverse:
        lines.append(f"      on the right, {name} is its value at step t + 1; its initial value is the one after the last step")
    lines.append(f"      {name} = {format_expr(update)}")
    expanded = format_expr(state.update)
    if expanded != format_expr(update):
        lines.append(f"      = {expanded}   (state-dependent bindings expanded)")
    recurrence = state.recurrence
    prev = f"{name} on the right is its previous value"
    if isinstance(recurrence, DiagonalAffine):
        lines.append(f"      {name}_t = a_t * {name}_(t-1) + b_t, elementwise ({prev}):")
        lines.append(f"      decay a     = {format_expr(recurrence.decay)}")
        lines.append(f"      input b     = {format_expr(recurrence.input) if recurrence.input is not None else '0'}")
    elif isinstance(recurrence, MatrixAffine):
        lines.append(f"      transition  A({name}) = {format_expr(recurrence.transition)}   ({prev})")
        if recurrence.decay is not None:
            lines.append(f"      decay       {format_expr(recurrence.decay)}")
        if recurrence.blocks is not None:
            lines.append(f"      blocks      {_blocks_phrase(recurrence.blocks, state.type)}")
        for term in recurrence.low_rank:
            lines.append(
                f"      rank one    {format_expr(term.coefficient)} * outer({format_expr(term.left)}, {format_expr(term.right)} @ {name})"
            )
        lines.append(f"      input term  {format_expr(recurrence.input) if recurrence.input is not None else '0'}")
    elif isinstance(recurrence, SemiringAffine):
        semiring = recurrence.semiring
        lines.append(
            f"      (+) = {'max' if semiring.plus == 'maximum' else semiring.plus}, (x) = +: "
            f"{name} = A({name}) (+) b with A linear over the semiring ({prev})"
        )
        if recurrence.decay is not None:
            lines.append(f"      decay       {name} (x) {format_expr(recurrence.decay)}")
        else:
            lines.append(f"      transition  A({name}) = {format_expr(recurrence.transition)}   (a semiring matrix product)")
        lines.append(f"      input term  {format_expr(recurrence.input) if recurrence.input is not None else 'none (the semiring zero, -inf)'}")
    elif isinstance(recurrence, Nonlinear):
        lines.append(f"      the previous value enters through {recurrence.reason}")
    elif isinstance(recurrence, Delay):
        step = "t + 1" if recurrence.direction is ir.Direction.REVERSE else "t - 1"
        lines.append(f"      a delay: its update reads no recurrent value, so its previous value is its update's value at step {step}, one shift of a time-parallel value")
    elif isinstance(recurrence, NoRecurrence):
        lines.append("      the new value does not read the previous one: no recurrence")
    if state.reads:
        lines.append(f"      reads the recurrent values of: {', '.join(state.reads)}")
    return lines


def _blocks_phrase(blocks: BlockAxes, state_type: ir.Type, members: int = 1) -> str:
    """``one 2 x 2 matrix per index of axis 0 (64 blocks)``: how a block-diagonal map splits."""
    count, inner = 1, 1
    for axis, size in enumerate(state_type.shape):
        if axis in blocks.axes:
            count *= size
        else:
            inner *= size
    inner *= members
    where = ", ".join(str(a) for a in blocks.axes)
    which = "the same matrix for every block" if blocks.shared else "each block its own matrix"
    return f"{count} blocks of {inner} elements, one per index of axis {where}: a {inner} x {inner} matrix per step, {which}"


def _group_lines(analysis: Analysis, group: tuple[str, ...]) -> list[str]:
    joint = analysis.group(group)
    if joint is None or not isinstance(joint.recurrence, JointAffine):
        why = f" ({joint.recurrence.reason})" if joint is not None else ""
        return [f"  coupled: {', '.join(group)} read each other's values, so they run jointly, step by step{why}"]
    recurrence = joint.recurrence
    lines = [f"  coupled: {', '.join(group)} read each other's values; their joint update is affine, X_t = A_t(X_(t-1)) + B_t with X the states stacked"]
    state_type = analysis.state(group[0]).type
    if recurrence.blocks is not None:
        lines.append(f"      joint transition: {_blocks_phrase(recurrence.blocks, state_type, len(group))}")
    else:
        lines.append("      joint transition: dense over all the members' elements")
    return lines


def _recurrence_title(recurrence) -> str:
    if isinstance(recurrence, (DiagonalAffine, MatrixAffine)):
        return f"{recurrence.name} ({recurrence.structure} transition)"
    if isinstance(recurrence, SemiringAffine):
        return f"{recurrence.name} ({recurrence.structure} transition)"
    return recurrence.name


def _scan_lines(scan: ir.ScanAssign) -> list[str]:
    monoid = scan.monoid
    carries = ", ".join(f"{c.name} {_shape(c.type)}" for c in monoid.carries)
    lifts = ", ".join(f"{c.name} = {format_expr(l)}" for c, l in zip(monoid.carries, scan.lifts))
    identity = ", ".join(f"{c.name} = {format_expr(c.identity)}" for c in monoid.carries)
    order = "suffix combine x_t (+) ... (+) x_T, from the last step to the first" if scan.reverse else "prefix combine"
    return [
        f"  {scan.name}: scan of the declared monoid {monoid.name}, {order} (associative by declaration; `recdsl check` tests it)",
        f"      carries     {carries}",
        f"      identity    {identity}",
        f"      each step   {lifts}",
    ]


def explain_analysis(analysis: Analysis, backend_line: str | None = None) -> str:
    """The text ``recdsl explain`` prints for an analysed cell."""
    cell = analysis.cell
    dims = ", ".join(f"{n}={v}" for n, v in cell.dims)
    lines = [f"cell {cell.name}({dims})"]
    lines.append("  inputs (per step; the module takes [B, T, *heads, *shape]):")
    lines.extend(f"    {i.name} {_shape(i.type)}" for i in cell.inputs)
    if cell.params:
        lines.append("  params: " + ", ".join(f"{p.name} {_shape(p.type)}" for p in cell.params))

    parallel = [s for s in cell.body if isinstance(s, ir.Assign) and s.name in analysis.time_parallel]
    lines.append("")
    lines.append("time-parallel (read no state; computed for all steps at once before the recurrence):")
    if parallel:
        lines.extend(f"  {s.name} = {format_expr(s.value)}" for s in parallel)
    else:
        lines.append("  (none)")
    stepwise = [s for s in cell.body if isinstance(s, ir.Assign) and s.name not in analysis.time_parallel]
    if stepwise:
        lines.append("")
        lines.append("state-dependent bindings (computed inside the recurrence):")
        lines.extend(f"  {s.name} = {format_expr(s.value)}   (reads {', '.join(sorted(analysis.dependencies[s.name]))})" for s in stepwise)
    if analysis.hoisted:
        lines.append("")
        lines.append("state-free parts of step-by-step lines (computed for all steps at once):")
        lines.extend(f"  {format_expr(node)}" for node in analysis.hoisted)

    lines.append("")
    lines.append("recurrences, in the order they can be computed:")
    scans = {s.name: s for s in cell.scans}
    if not analysis.schedule:
        lines.append("  (none: the cell has no state)")
    for group in analysis.schedule:
        if len(group) > 1:
            lines.extend(_group_lines(analysis, group))
        for name in group:
            lines.extend(_scan_lines(scans[name]) if name in scans else _state_lines(analysis, name))

    lines.append("")
    lines.append("outputs:")
    readouts = {}
    for readout in analysis.readouts:
        readouts.setdefault(readout.output, []).append(readout)
    for emit in cell.outputs:
        label = emit.name if emit.name else str(emit.index)
        lines.append(f"  out {label} {_shape(emit.value.type)} = {format_expr(emit.value)}")
        if emit.index in analysis.parallel_outputs:
            lines.append("      time-parallel: reads no state")
        for readout in (r for r in readouts.get(emit.index, []) if r.reduces):
            state_type = cell.state(readout.state).type
            what = f"{_shape(state_type)} -> {_shape(readout.expr.type)}"
            lines.append(f"      linear read-out of {readout.state}: {format_expr(readout.expr)} ({what}); a chunked form need not store the state of every step")
    if backend_line:
        lines.append("")
        lines.append(backend_line)
    return "\n".join(lines) + "\n"


def explain(
    source_or_path: str | Path,
    cell: str | None = None,
    backend: str = "auto",
    plan: bool = False,
    *,
    dims: Mapping[str, int | float] | None = None,
    **dim_values: int | float,
) -> str:
    """Parse, check, analyse and plan a program; return the explanation ``recdsl explain`` prints.

    Dims are bound as in :func:`recdsl.compile`: by keywords or by the mapping ``dims``.
    With ``plan=True`` the execution plan follows: each recurrence's form, the forms
    considered and rejected with their reasons, and the cost model's predictions.
    """
    from .frontend import check_option_types, dim_arguments
    from .plan import plan as make_plan

    check_option_types("explain", cell, backend)
    cell_ir = load(source_or_path, cell=cell, dims=dim_arguments("explain", dims, dim_values))
    analysis = analyze(cell_ir)
    chosen = make_plan(analysis, backend)
    line = f"backend: {chosen.backend} ({chosen.reason})"
    if chosen.backend is BackendKind.NEWTON:
        from .backends.newton import explain as explain_newton

        line += "\n" + explain_newton(analysis)
    text = explain_analysis(analysis, line)
    if plan:
        text += "\n" + chosen.format()
    return text
