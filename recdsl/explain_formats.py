"""``recdsl explain --format json`` and ``--format dot``: the analysis for tools and as a diagram.

Both read an :class:`~recdsl.analysis.Analysis` and the backend choice; neither decides
anything.

The JSON document (``SCHEMA`` names its version; fields are only ever added within a
version) is one object:

``schema``      ``"recdsl.explain/1"``
``cell``        the cell's name
``dims``        ``{name: value}``
``inputs``      ``[{name, shape, kind}]`` per-step shapes; ``kind`` is ``"real"`` or ``"complex"``
``params``      ``[{name, shape, kind, init}]``
``time_parallel``  ``[{name, expr}]``: bindings that read no state, computed for all steps at once
``stepwise_bindings``  ``[{name, expr, reads}]``: bindings computed inside the recurrence, with the states they read
``hoisted``     ``[expr]``: state-free parts of stepwise lines, computed for all steps at once
``states``      ``[{name, shape, kind, class, class_text, structure, update, expanded_update,
                decay, input, transition, low_rank, semiring, reason, reads, direction}]``; ``class`` is one
                of ``delay``, ``no_recurrence``, ``diagonal_affine``, ``matrix_affine``, ``semiring_affine``,
                ``nonlinear``; ``class_text`` is how ``recdsl explain`` says it; ``structure``
                the transition's structure in words (``"elementwise"``, ``"diagonal over rows"``,
                ``"identity plus low rank"``, ...) or null; ``decay``, ``input``, ``transition``
                are expressions in the language's syntax or null; ``low_rank`` is
                ``[{coefficient, left, right}]``; ``semiring`` is ``"max-plus"``/``"log"`` or null;
                ``reason`` (nonlinear only) the operation through which the previous value enters
``scans``       ``[{name, monoid, carries: [{name, shape, kind, identity, lift}]}]``
``schedule``    ``[[name, ...], ...]``: states and scans in the order they run; a group of
                several is coupled and runs jointly
``coupled_groups``  the groups of ``schedule`` with more than one member
``outputs``     ``[{index, name, shape, kind, expr, time_parallel, readouts: [{state, expr, reduces}]}]``;
                a read-out is a part of the output linear in one state (``reduces``: smaller than the state)
``backend``     ``{requested, name, reason}``

Expressions are printed as in ``recdsl explain``: a state's name on the right of its own
update is its previous value.

The ``dot`` text draws the dataflow: inputs and params on the left, the time-parallel
bindings and outputs in one shaded cluster, each coupled group of states in a cluster of
its own, a state's dependence on its previous value as a self-loop labelled with its
class, edges from previous values dashed, and linear read-outs as bold blue edges.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from enum import Enum
from pathlib import Path
from typing import Any

from . import ir
from .analysis import Analysis, Delay, DiagonalAffine, MatrixAffine, NoRecurrence, Nonlinear, SemiringAffine, StateAnalysis
from .errors import MissingDependencyError, RecDSLError
from .printer import format_expr

SCHEMA = "recdsl.explain/1"


class Format(Enum):
    """What ``recdsl explain --format`` prints."""

    TEXT = "text"
    JSON = "json"
    DOT = "dot"


# ---- reading the analysis --------------------------------------------------------------


def structure_text(recurrence: object) -> str | None:
    """The transition structure of a recurrence in words, or None when it has none.

    The one place that reads ``recurrence.structure``: a string today, an enum with a
    display value when the analysis moves to enums.
    """
    structure = getattr(recurrence, "structure", None)
    if structure is None:
        return None
    if isinstance(structure, Enum):
        return str(structure.value)
    return str(structure)


_CLASS_IDS: tuple[tuple[type, str], ...] = (
    (Delay, "delay"),  # before its base class
    (NoRecurrence, "no_recurrence"),
    (DiagonalAffine, "diagonal_affine"),
    (MatrixAffine, "matrix_affine"),
    (SemiringAffine, "semiring_affine"),
    (Nonlinear, "nonlinear"),
)


def class_id(recurrence: object) -> str:
    """A stable identifier of a recurrence's class (``diagonal_affine``, ...)."""
    for cls, identifier in _CLASS_IDS:
        if isinstance(recurrence, cls):
            return identifier
    raise TypeError(f"unknown recurrence class {type(recurrence).__name__}")


def class_text(recurrence: object) -> str:
    """The class as ``recdsl explain`` says it, with the structure: ``matrix affine (scalar transition)``."""
    structure = structure_text(recurrence)
    name = recurrence.name  # type: ignore[attr-defined]
    return f"{name} ({structure} transition)" if structure else name


def _type(t: ir.Type) -> dict[str, Any]:
    return {"shape": list(t.shape), "kind": t.kind.value}


def _expr(expr: ir.Expr | None, previous: frozenset[str] = frozenset()) -> str | None:
    return None if expr is None else format_expr(expr, previous)


def _state_json(analysis: Analysis, state: StateAnalysis) -> dict[str, Any]:
    others = frozenset(s.name for s in analysis.cell.states) - {state.state}
    recurrence = state.recurrence
    semiring = getattr(recurrence, "semiring", None)
    return {
        "name": state.state,
        **_type(state.type),
        "class": class_id(recurrence),
        "class_text": class_text(recurrence),
        "structure": structure_text(recurrence),
        "update": _expr(analysis.cell.update(state.state).value, others),
        "expanded_update": _expr(state.update, others),
        "decay": _expr(getattr(recurrence, "decay", None), others),
        "input": _expr(getattr(recurrence, "input", None), others),
        "transition": _expr(getattr(recurrence, "transition", None), others),
        "low_rank": [
            {"coefficient": _expr(term.coefficient, others), "left": _expr(term.left, others), "right": _expr(term.right, others)}
            for term in getattr(recurrence, "low_rank", ())
        ],
        "semiring": semiring.name if semiring is not None else None,
        "reason": recurrence.reason if isinstance(recurrence, Nonlinear) else None,
        "reads": list(state.reads),
        "direction": analysis.cell.state(state.state).direction.value,
    }


def _init_text(init: ir.Init) -> str:
    if init.expr is not None:
        return format_expr(init.expr)
    if init.args:
        return f"{init.scheme}({', '.join(str(a) for a in init.args)})"
    return init.scheme


def explanation_json(analysis: Analysis, backend: tuple[str, str, str]) -> dict[str, Any]:
    """The document of the module docstring; ``backend`` is ``(requested, chosen, reason)``."""
    cell = analysis.cell
    readouts: dict[int, list[dict[str, Any]]] = {}
    for readout in analysis.readouts:
        readouts.setdefault(readout.output, []).append({"state": readout.state, "expr": format_expr(readout.expr), "reduces": readout.reduces})
    assigns = [s for s in cell.body if isinstance(s, ir.Assign)]
    requested, chosen, reason = backend
    return {
        "schema": SCHEMA,
        "cell": cell.name,
        "dims": dict(cell.dims),
        "inputs": [{"name": i.name, **_type(i.type)} for i in cell.inputs],
        "params": [{"name": p.name, **_type(p.type), "init": _init_text(p.init)} for p in cell.params],
        "time_parallel": [{"name": s.name, "expr": format_expr(s.value)} for s in assigns if s.name in analysis.time_parallel],
        "stepwise_bindings": [
            {"name": s.name, "expr": format_expr(s.value), "reads": sorted(analysis.dependencies.get(s.name, frozenset()))}
            for s in assigns
            if s.name not in analysis.time_parallel
        ],
        "hoisted": [format_expr(node) for node in analysis.hoisted],
        "states": [_state_json(analysis, state) for state in analysis.states],
        "scans": [
            {
                "name": scan.name,
                "monoid": scan.monoid.name,
                "carries": [
                    {"name": c.name, **_type(c.type), "identity": format_expr(c.identity), "lift": format_expr(lift)}
                    for c, lift in zip(scan.monoid.carries, scan.lifts)
                ],
            }
            for scan in cell.scans
        ],
        "schedule": [list(group) for group in analysis.schedule],
        "coupled_groups": [list(group) for group in analysis.coupled_groups],
        "outputs": [
            {
                "index": emit.index,
                "name": emit.name,
                **_type(emit.value.type),
                "expr": format_expr(emit.value),
                "time_parallel": emit.index in analysis.parallel_outputs,
                "readouts": readouts.get(emit.index, []),
            }
            for emit in cell.outputs
        ],
        "backend": {"requested": requested, "name": chosen, "reason": reason},
    }


def explanation_json_text(analysis: Analysis, backend: tuple[str, str, str]) -> str:
    """:func:`explanation_json` as indented JSON text, ending in a newline."""
    return json.dumps(explanation_json(analysis, backend), indent=2) + "\n"


# ---- the diagram -----------------------------------------------------------------------


def _quote(text: str) -> str:
    """A DOT double-quoted string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _node_id(kind: str, name: str) -> str:
    return _quote(f"{kind}:{name}")


# The node each kind of reference points at, and whether it is a state's previous value.
_REF_NODES: dict[ir.RefKind, tuple[str, bool]] = {
    ir.RefKind.INPUT: ("input", False),
    ir.RefKind.PARAM: ("param", False),
    ir.RefKind.BINDING: ("binding", False),
    ir.RefKind.STATE_PREV: ("state", True),
    ir.RefKind.STATE_NEW: ("state", False),
    ir.RefKind.SCAN: ("scan", False),
}


def _sources(expr: ir.Expr) -> list[tuple[str, str, bool]]:
    """``(node kind, name, previous value?)`` for each distinct value ``expr`` reads (consts are not drawn)."""
    found: dict[tuple[str, str, bool], None] = {}
    for ref in ir.refs(expr):
        if ref.kind in _REF_NODES:
            kind, previous = _REF_NODES[ref.kind]
            found[(kind, ref.name, previous)] = None
    return list(found)


def explanation_dot(analysis: Analysis, backend: tuple[str, str, str], params: bool = False) -> str:
    """Graphviz ``dot`` text of the cell's dataflow and state dependencies.

    Params are left out unless ``params=True`` (a cell with many weights reads more easily without them).
    """
    cell = analysis.cell
    dims = ", ".join(f"{n}={v}" for n, v in cell.dims)
    requested, chosen, _ = backend
    lines = [
        f"digraph {_quote(cell.name)} {{",
        "  rankdir=LR;",
        f"  label={_quote(f'cell {cell.name}({dims}): backend {chosen}' + ('' if requested == chosen else f' (requested {requested})'))};",
        '  labelloc="t"; fontname="Helvetica"; fontsize=12;',
        '  node [fontname="Helvetica", fontsize=10]; edge [fontname="Helvetica", fontsize=9];',
    ]
    for declared in cell.inputs:
        lines.append(f"  {_node_id('input', declared.name)} [label={_quote(f'input {declared.name} {declared.type}')}, shape=cds, style=filled, fillcolor=\"#e8eefc\"];")
    if params:
        for param in cell.params:
            lines.append(f"  {_node_id('param', param.name)} [label={_quote(f'{param.name} {param.type}')}, shape=note, color=gray50, fontcolor=gray30];")

    assigns = [s for s in cell.body if isinstance(s, ir.Assign)]
    parallel_bindings = [s for s in assigns if s.name in analysis.time_parallel]
    parallel_outputs = [e for e in cell.outputs if e.index in analysis.parallel_outputs]
    if parallel_bindings or parallel_outputs:
        lines.append('  subgraph "cluster_time_parallel" {')
        lines.append(f"    label={_quote('time-parallel: all steps at once')}; style=filled; color=\"#d7ecd9\"; fontcolor=\"#2e6b34\";")
        for statement in parallel_bindings:
            lines.append(f"    {_node_id('binding', statement.name)} [label={_quote(f'{statement.name} = {format_expr(statement.value)}')}, shape=box, style=\"rounded,filled\", fillcolor=white];")
        for emit in parallel_outputs:
            lines.append(f"    {_output_node(emit)}")
        lines.append("  }")
    for statement in assigns:
        if statement.name not in analysis.time_parallel:
            lines.append(f"  {_node_id('binding', statement.name)} [label={_quote(f'{statement.name} = {format_expr(statement.value)}')}, shape=box, style=rounded];")

    scans = {s.name: s for s in cell.scans}
    for index, group in enumerate(analysis.schedule):
        indent = "  "
        if len(group) > 1:
            lines.append(f'  subgraph "cluster_coupled_{index}" {{')
            lines.append(f"    label={_quote('coupled: ' + ', '.join(group) + ' (step by step, jointly)')}; style=dashed; color=firebrick; fontcolor=firebrick;")
            indent = "    "
        for name in group:
            if name in scans:
                scan = scans[name]
                lines.append(f"{indent}{_node_id('scan', name)} [label={_quote(f'{name}: scan {scan.monoid.name}')}, shape=box3d, style=filled, fillcolor=\"#fff4d6\"];")
            else:
                state = analysis.state(name)
                label = f"state {name} {state.type}\n{class_text(state.recurrence)}"
                lines.append(f"{indent}{_node_id('state', name)} [label={_quote(label)}, shape=box, peripheries=2, style=filled, fillcolor=\"#fff4d6\"];")
        if len(group) > 1:
            lines.append("  }")
    for emit in cell.outputs:
        if emit.index not in analysis.parallel_outputs:
            lines.append(f"  {_output_node(emit)}")

    # Edges: each value into the bindings, updates, scans and outputs that read it.
    for statement in assigns:
        lines.extend(_edges(_sources(statement.value), _node_id("binding", statement.name), params))
    for state in analysis.states:
        target = _node_id("state", state.state)
        sources = [s for s in _sources(cell.update(state.state).value) if not (s[0] == "state" and s[1] == state.state)]
        lines.extend(_edges(sources, target, params))
        if not isinstance(state.recurrence, NoRecurrence):
            lines.append(f"  {target} -> {target} [label={_quote(state.recurrence.name)}, style=dashed, color=gray40];")
    for scan in cell.scans:
        target = _node_id("scan", scan.name)
        for lift in scan.lifts:
            lines.extend(_edges(_sources(lift), target, params))
        lines.append(f"  {target} -> {target} [label={_quote('combine')}, style=dashed, color=gray40];")
    readouts: dict[tuple[int, str], list[str]] = {}
    for readout in analysis.readouts:
        if readout.reduces:
            readouts.setdefault((readout.output, readout.state), []).append(format_expr(readout.expr))
    for emit in cell.outputs:
        target = _node_id("out", str(emit.index))
        direct = _sources(emit.value)
        for kind, name, previous in direct:
            if not (kind == "state" and (emit.index, name) in readouts):
                lines.extend(_edges([(kind, name, previous)], target, params))
        # A read-out is drawn from the state even when the output reaches it through bindings.
        for (output, state_name), exprs in readouts.items():
            if output == emit.index:
                label = "linear read-out: " + "; ".join(exprs)
                lines.append(f"  {_node_id('state', state_name)} -> {target} [label={_quote(label)}, color=\"#1f5fbf\", fontcolor=\"#1f5fbf\", penwidth=2];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _output_node(emit: ir.Emit) -> str:
    label = f"out {emit.name or emit.index} {emit.value.type}\n{format_expr(emit.value)}"
    return f"{_node_id('out', str(emit.index))} [label={_quote(label)}, shape=box, style=\"filled,bold\", fillcolor=\"#e8eefc\"];"


def _edges(sources: list[tuple[str, str, bool]], target: str, params: bool) -> list[str]:
    edges = []
    for kind, name, previous in sources:
        if kind == "param" and not params:
            continue
        style = ' [style=dashed, label="previous"]' if previous else (" [color=gray60]" if kind == "param" else "")
        edges.append(f"  {_node_id(kind, name)} -> {target}{style};")
    return edges


# ---- writing ---------------------------------------------------------------------------


def render_dot(dot_text: str, path: str | Path) -> Path:
    """Render ``dot_text`` with Graphviz to ``path`` (format from its suffix: .png, .svg, .pdf).

    A :class:`MissingDependencyError` when the ``dot`` program is not on PATH.
    """
    path = Path(path)
    program = shutil.which("dot")
    if program is None:
        raise MissingDependencyError(
            f"rendering {path.name} needs Graphviz's `dot` program, which is not on PATH",
            expected="Graphviz installed (e.g. apt-get install graphviz), or --output FILE.dot to write the text",
        )
    form = path.suffix.lstrip(".").lower() or "png"
    result = subprocess.run([program, f"-T{form}", "-o", str(path)], input=dot_text, text=True, capture_output=True)
    if result.returncode != 0:
        raise RecDSLError(f"Graphviz could not render {path.name}: {result.stderr.strip()}", expected="an output suffix Graphviz knows: .png, .svg or .pdf")
    return path


def write_explanation(
    source_or_path: str | Path, form: Format, output: str | Path | None = None, *, cell: str | None = None, backend: str = "auto", dims: dict | None = None
) -> int:
    """``recdsl explain --format FORMAT [--output FILE]``: analyse, then print or write; returns the exit status.

    With ``--format dot`` and an output whose suffix is not ``.dot``/``.gv``, the diagram
    is rendered by Graphviz (:func:`render_dot`).
    """
    from .analysis import analyze
    from .backends import choose_backend
    from .explainer import explain_analysis
    from .frontend import load

    analysis = analyze(load(source_or_path, cell=cell, dims=dims or {}))
    chosen, reason = choose_backend(backend, analysis)
    choice = (backend, chosen.name, reason)
    if form is Format.JSON:
        text = explanation_json_text(analysis, choice)
    elif form is Format.DOT:
        text = explanation_dot(analysis, choice)
    else:
        text = explain_analysis(analysis, f"backend: {chosen.name} ({reason})")
    if output is None:
        print(text, end="")
        return 0
    path = Path(output)
    if form is Format.DOT and path.suffix.lower() not in (".dot", ".gv", ""):
        render_dot(text, path)
    else:
        path.write_text(text)
    print(f"wrote {path}")
    return 0
