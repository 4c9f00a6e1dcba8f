"""Mamba's selective scan (S6) as fused Triton kernels, planned and generated from the IR.

The pattern (Gu and Dao, 2023, "Mamba", Algorithm 2; the reference design is the
``selective_scan`` CUDA kernel of state-spaces/mamba): a diagonal affine state ``h: [d, n]``

    h_t = a_t * h_{t-1} + b_t,     y_t = f(h_t @ q_t, per-channel values)

whose decay ``a`` and input ``b`` are elementwise gate math over *outer-product broadcasts*:
per-step channel vectors ``[d]`` indexed ``v[:, None]``, per-step state-axis vectors ``[n]``
(``v[None, :]`` or bare), and time-invariant params ``[d, n]``, ``[d]``, ``[n]`` or scalars,
and which is read only by contractions over its state axis (``h @ q``, ``q: [n]``) inside
outputs that are elementwise over ``[d]``.  Run as a scan of ``[B, T, d, n]`` tensors, the
leaves are materialised at full state size and the whole state sequence is written and read
back: about 800 bytes per output element where the minimum is about 12.

Here one kernel reads the leaves at their own sizes, keeps a ``[BD, BN]`` block of the state
on chip, runs blocks of ``BT`` steps with an associative scan along time, and writes only the
outputs (``h @ C + D * x`` whole: the read-outs never leave the kernel) and the final state.
When a gradient is wanted it also stores the state entering every ``CK``-th block of steps
(a checkpoint, ``n / (BT * CK)`` state elements per channel and step).  The backward kernel
never stores the state sequence either: per block, in reverse, it recomputes the states
from the nearest checkpoint, runs the adjoint ``g_t = dL/dy_t-terms + a_{t+1} g_{t+1}`` as a
reverse associative scan, and pushes ``dL/da = g h_{t-1}`` and ``dL/db = g`` back through the
gate math by each op's adjoint rule (the table of :mod:`.triton_fused_codegen`).  Channel
leaves' gradients are written directly; state-axis leaves' (``dB``, ``dC``) as one partial
per block of channels, summed in torch; params' summed over time in registers, one partial
per program.  ``dh_0 = a_1 g_1``.

Planning is :func:`selective_plan` (a :class:`SelectiveScanPlan`, stored in the step's
``kernel``), generation :func:`generate`, running :func:`run_step`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from recdsl import ir
from recdsl.analysis import Analysis, DiagonalAffine, StateAnalysis
from recdsl.ir import Kind, Literal, Op, Ref, RefKind
from recdsl.ops import FUSED, OPS
from recdsl.plan import Unsupported
from recdsl.printer import format_expr
from recdsl.shapes import fold_constant

from .triton_codegen import IndentedBuffer, _literal, inline_parallel_bindings
from .triton_launch import launch

# ---- the plan ----------------------------------------------------------------------------------


class Layout(Enum):
    """Where a value sits in the kernel's ``[BT, BD, BN]`` block: which axes it varies along."""

    SCALAR = (False, False, False)
    CHANNEL = (False, True, False)  # [d]: one value per channel, broadcast along the state axis
    STATE = (False, False, True)  # [n]: along the contracted (state) axis, shared by the channels
    FULL = (False, True, True)  # [d, n]

    def per_step(self) -> tuple[bool, bool, bool]:
        return (True,) + self.value[1:]


class Source(Enum):
    """Where a leaf's tensor comes from, which decides how the kernel addresses it."""

    STEP = "an input: a new value every step, [B, T, *heads, m]"
    PARAM = "a param: the same at every step, gradient summed over time"
    CONST = "a const: the same at every step, no gradient"


@dataclass(frozen=True)
class Operand:
    """One tensor the kernels read: an input, param or const of the cell."""

    kind: RefKind
    name: str
    shape: tuple[int, ...]

    @property
    def source(self) -> Source:
        return {RefKind.INPUT: Source.STEP, RefKind.PARAM: Source.PARAM}.get(self.kind, Source.CONST)

    @property
    def stem(self) -> str:
        return f"{self.kind.value}_{self.name}".replace(".", "_")


@dataclass(frozen=True)
class SelectiveLeaf:
    """A leaf of the gate or output math: ``operand`` loaded in ``layout`` (``expr`` is the node)."""

    expr: ir.Expr
    operand: Operand
    layout: Layout


@dataclass(frozen=True)
class SelectiveScanPlan:
    """A diagonal affine ``[d, n]`` state fused with the outputs that read it (see the module docstring).

    ``decay`` and ``input`` are the update's terms with time-parallel bindings inlined;
    ``outputs`` the indices of the cell's outputs the kernel writes whole, ``output_exprs``
    their expressions (``analysis.expanded_outputs``, bindings inlined) and ``readouts``
    the ``h @ q`` nodes inside them, ``queries`` their ``q`` leaves.
    """

    state: str
    channels: int  # d
    width: int  # n, the state axis the read-outs contract
    decay: ir.Expr
    input: ir.Expr
    outputs: tuple[int, ...]
    output_exprs: tuple[ir.Expr, ...]
    readouts: tuple[ir.Expr, ...]
    queries: tuple[SelectiveLeaf, ...]
    term_leaves: tuple[SelectiveLeaf, ...]
    output_leaves: tuple[SelectiveLeaf, ...]
    operands: tuple[Operand, ...]
    comment: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.state.replace(".", "_")

    def describe(self) -> str:
        queries = ", ".join(format_expr(q.expr) for q in self.queries)
        return f"fused selective scan: h @ q with q = {queries} read out in the kernel; outputs {', '.join(map(str, self.outputs))} written whole; the state never stored per step"


def _is_full_slice(item: object) -> bool:
    return isinstance(item, ir.SliceItem) and item.start is None and item.stop is None and getattr(item, "step", None) is None


def _operand(ref: Ref) -> Operand | Unsupported:
    if ref.kind not in (RefKind.INPUT, RefKind.PARAM, RefKind.CONST) or ref.field is not None:
        return Unsupported(f"'{format_expr(ref)}' is not an input, param or const")
    if ref.type.kind is not Kind.REAL:
        return Unsupported(f"'{ref.name}' is not real")
    return Operand(ref.kind, ref.name, ref.type.shape)


def _term_leaf(expr: ir.Expr, d: int, n: int) -> SelectiveLeaf | Unsupported:
    """A leaf of the decay or input term (``[d, n]`` context)."""
    target = expr
    layout: Layout
    if isinstance(expr, Op) and expr.op == "index" and isinstance(expr.args[0], Ref) and expr.args[0].type.rank == 1 and len(expr.attrs) == 2:
        target = expr.args[0]
        first, second = expr.attrs
        if _is_full_slice(first) and second == ir.NEW_AXIS and target.type.shape == (d,):
            layout = Layout.CHANNEL
        elif first == ir.NEW_AXIS and _is_full_slice(second) and target.type.shape == (n,):
            layout = Layout.STATE
        else:
            return Unsupported(f"'{format_expr(expr)}' is not a [d] vector as v[:, None] or an [n] vector as v[None, :]")
    elif isinstance(expr, Ref) and expr.type.shape == (n,):
        layout = Layout.STATE
    elif isinstance(expr, Ref) and expr.type.shape == (d, n):
        layout = Layout.FULL
    elif isinstance(expr, Ref) and expr.type.rank == 0:
        layout = Layout.SCALAR
    else:
        return Unsupported(f"'{format_expr(expr)}' is not an outer-product broadcast of [d] and [n] vectors, a [d, n] param or a scalar")
    if not isinstance(target, Ref):
        return Unsupported(f"'{format_expr(expr)}' is not a reference")
    operand = _operand(target)
    if isinstance(operand, Unsupported):
        return operand
    if operand.source is Source.STEP and layout is Layout.FULL:
        return Unsupported(f"input '{target.name}' is as large as the state at every step")
    return SelectiveLeaf(expr, operand, layout)


def _output_leaf(expr: ir.Expr, d: int) -> SelectiveLeaf | Unsupported:
    """A leaf of an output (``[d]`` context): a ``[d]`` vector or a scalar."""
    if not isinstance(expr, Ref) or expr.type.shape not in ((d,), ()):
        return Unsupported(f"'{format_expr(expr)}' in an output is not a [d] vector or a scalar")
    operand = _operand(expr)
    if isinstance(operand, Unsupported):
        return operand
    return SelectiveLeaf(expr, operand, Layout.CHANNEL if expr.type.rank == 1 else Layout.SCALAR)


def _leaves(exprs: list[ir.Expr], stop: set[int]) -> list[ir.Expr]:
    """The non-elementwise nodes under ``exprs`` (``stop``: nodes taken as leaves already)."""
    found: dict[int, ir.Expr] = {}

    def visit(node: ir.Expr) -> None:
        if id(node) in stop or isinstance(node, Literal):
            return
        if isinstance(node, Op) and node.op in FUSED:
            for arg in node.args:
                visit(arg)
            return
        found[id(node)] = node

    for expr in exprs:
        visit(expr)
    return list(found.values())


def _check_ops(exprs: list[ir.Expr]) -> Unsupported | None:
    """Why the elementwise math cannot run in the kernels (not real, or an op without an adjoint rule), or None."""
    for expr in exprs:
        for node in ir.walk(expr):
            if isinstance(node, Op) and node.op in FUSED:
                if node.type.kind is not Kind.REAL and node.type.kind is not Kind.BOOL:
                    return Unsupported(f"'{format_expr(node)}' is not real")
                if OPS[node.op].derivative is None or OPS[node.op].triton is None:
                    return Unsupported(f"'{node.op}' has no adjoint rule in the Triton kernels")
    return None


def selective_plan(analysis: Analysis, state: StateAnalysis) -> SelectiveScanPlan | Unsupported:
    """The fused selective-scan form of ``state``, or why it does not fit (see the module docstring)."""
    name = state.state
    recurrence = state.recurrence
    if not isinstance(recurrence, DiagonalAffine) or recurrence.decay is None or recurrence.input is None:
        return Unsupported("not a diagonal affine recurrence with a decay and an input")
    if state.type.rank != 2 or state.type.kind is not Kind.REAL:
        return Unsupported("not a real [d, n] state")
    if analysis.direction(name) is not ir.Direction.FORWARD:
        return Unsupported("a reverse state")
    d, n = state.type.shape
    cell = analysis.cell
    if any(other.state != name and name in other.reads for other in analysis.states):
        return Unsupported("another state's update reads it")
    decay, term_input = (inline_parallel_bindings(t, cell, analysis.time_parallel) for t in (recurrence.decay, recurrence.input))
    # Outputs that read the state: elementwise over [d] in its read-outs h @ q and [d] leaves.
    outputs, output_exprs, readouts, queries = [], [], [], []
    for index, expanded in enumerate(analysis.expanded_outputs):
        refs = [r for r in ir.walk(expanded) if isinstance(r, Ref) and r.name == name and r.kind in (RefKind.STATE_NEW, RefKind.STATE_PREV)]
        if not refs:
            continue
        expr = inline_parallel_bindings(expanded, cell, analysis.time_parallel)
        if expr.type.shape != (d,) or expr.type.kind is not Kind.REAL:
            return Unsupported(f"output {index} reads the state but is not a real [d] vector")
        found = [
            node
            for node in ir.walk(expr)
            if isinstance(node, Op) and node.op == "matmul" and isinstance(node.args[0], Ref) and node.args[0].kind is RefKind.STATE_NEW and node.args[0].name == name
        ]
        for readout in found:
            query = readout.args[1]
            if not isinstance(query, Ref) or query.type.shape != (n,):
                return Unsupported(f"the read-out {format_expr(readout)} does not contract the state with an [n] input or param")
            operand = _operand(query)
            if isinstance(operand, Unsupported):
                return operand
            if not any(r is readout for r in readouts):
                readouts.append(readout)
                queries.append(SelectiveLeaf(query, operand, Layout.STATE))
        outputs.append(index)
        output_exprs.append(expr)
    if not readouts:
        return Unsupported("no output reads it by h @ q")
    readout_ids = {id(r) for r in readouts}
    for expr in output_exprs:
        for node in _leaves([expr], readout_ids):
            if any(isinstance(r, Ref) and r.name == name and r.kind in (RefKind.STATE_NEW, RefKind.STATE_PREV) for r in ir.walk(node)):
                return Unsupported("an output reads the state other than by h @ q")
    for expr in (decay, term_input):
        if any(isinstance(r, Ref) and r.kind not in (RefKind.INPUT, RefKind.PARAM, RefKind.CONST) for r in ir.walk(expr)):
            return Unsupported("its decay or input reads a state or a step-by-step binding")
    problem = _check_ops([decay, term_input, *output_exprs])
    if problem is not None:
        return problem
    term_leaves = []
    for node in _leaves([decay, term_input], set()):
        leaf = _term_leaf(node, d, n)
        if isinstance(leaf, Unsupported):
            return leaf
        term_leaves.append(leaf)
    output_leaves = []
    for node in _leaves(output_exprs, readout_ids):
        leaf = _output_leaf(node, d)
        if isinstance(leaf, Unsupported):
            return leaf
        output_leaves.append(leaf)
    operands: list[Operand] = []
    for leaf in term_leaves + output_leaves + queries:
        if leaf.operand not in operands:
            operands.append(leaf.operand)
    update = cell.update(name)
    comment = (f"line {update.span.line}: {name} = {format_expr(update.value)}",) if update.span is not None else ()
    return SelectiveScanPlan(
        state=name,
        channels=d,
        width=n,
        decay=decay,
        input=term_input,
        outputs=tuple(outputs),
        output_exprs=tuple(output_exprs),
        readouts=tuple(readouts),
        queries=tuple(queries),
        term_leaves=tuple(term_leaves),
        output_leaves=tuple(output_leaves),
        operands=tuple(operands),
        comment=comment,
    )


# ---- code generation -------------------------------------------------------------------------

_AXES = ("o_t", "o_d", "o_n")
_MASKS = ("m_t", "m_d", "m_n")


def _mask(flags: tuple[bool, bool, bool]) -> str:
    """The validity mask of a block varying along ``flags`` (a [BT|1, BD|1, BN|1] boolean)."""
    parts = []
    for axis, (flag, mask) in enumerate(zip(flags, _MASKS)):
        if flag:
            index = ", ".join(":" if a == axis else "None" for a in range(3))
            parts.append(f"{mask}[{index}]")
    return " & ".join(parts) if parts else "True"


def _union(*flags: tuple[bool, bool, bool]) -> tuple[bool, bool, bool]:
    return tuple(any(f[a] for f in flags) for a in range(3))  # type: ignore[return-value]


@dataclass
class _Node:
    expr: ir.Expr
    value: str  # a temporary's name or a literal's text
    flags: tuple[bool, bool, bool]
    args: tuple[int, ...] = ()  # indices of the operand nodes
    constant: bool = False  # a literal or folded constant: no adjoint


class _Graph:
    """One evaluation of some expressions in the kernel, node by node, so that it can be differentiated."""

    def __init__(self, buffer: IndentedBuffer, leaves: dict[int, tuple[str, tuple[bool, bool, bool]]], prefix: str) -> None:
        self.buffer = buffer
        self.leaves = leaves  # id(leaf expr) -> (block name, flags)
        self.prefix = prefix
        self.nodes: list[_Node] = []
        self.index: dict[int, int] = {}  # id(expr) -> node
        self.memo: dict[ir.Expr, int] = {}  # structural: equal subexpressions share a node
        self.ids: list[list[int]] = []  # node -> the ids of the exprs it stands for

    def emit(self, expr: ir.Expr) -> int:
        if id(expr) in self.index:
            return self.index[id(expr)]
        if id(expr) not in self.leaves and expr in self.memo:  # structurally equal: computed once
            self.index[id(expr)] = self.memo[expr]
            self.ids[self.memo[expr]].append(id(expr))
            return self.memo[expr]
        if id(expr) in self.leaves:
            value, flags = self.leaves[id(expr)]
            node = _Node(expr, value, flags)
        elif isinstance(expr, Literal):
            node = _Node(expr, _literal(float(expr.value)), (False, False, False), constant=True)
        else:
            assert isinstance(expr, Op) and expr.op in FUSED, format_expr(expr)
            constant = fold_constant(expr)
            if isinstance(constant, (int, float)) and not isinstance(constant, bool):
                node = _Node(expr, _literal(float(constant)), (False, False, False), constant=True)
            else:
                args = tuple(self.emit(a) for a in expr.args)
                texts = [self.nodes[a].value for a in args]
                if expr.op == "pow" and isinstance(expr.args[1], Literal) and expr.args[1].value == 2:
                    text = f"{texts[0]} * {texts[0]}"
                else:
                    text = OPS[expr.op].triton.format(*texts)
                name = f"{self.prefix}{len(self.nodes)}"
                self.buffer.line(f"{name} = {text}")
                node = _Node(expr, name, _union(*(self.nodes[a].flags for a in args)), args)
        self.nodes.append(node)
        position = len(self.nodes) - 1
        self.index[id(expr)] = position
        self.ids.append([id(expr)])
        if id(expr) not in self.leaves:
            self.memo[expr] = position
        return position

    def value(self, expr: ir.Expr) -> str:
        return self.nodes[self.emit(expr)].value

    def backward(self, seeds: dict[int, tuple[str, tuple[bool, bool, bool]]], wanted: set[int]) -> dict[int, str]:
        """Adjoints by reverse sweep from ``seeds`` (id(expr) -> adjoint text and the axes it varies
        along); returns each wanted leaf's.

        A share reaching a node that varies along fewer axes than its consumer is summed over
        the others (masked: padded lanes hold no values), as broadcasting's adjoint does.
        """
        from .triton_fused_codegen import adjoint_formulas  # the registry's derivative rules, printed in Triton

        shares: dict[int, list[tuple[str, tuple[bool, bool, bool]]]] = {}
        for key, (text, flags) in seeds.items():
            shares.setdefault(self.index[key], []).append((text, flags))
        results: dict[int, str] = {}
        counter = 0
        for position in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[position]
            if position not in shares:
                continue
            parts = []
            for text, flags in shares[position]:
                extra = [a for a in range(3) if flags[a] and not node.flags[a]]
                if extra:
                    text = f"tl.where({_mask(flags)}, {text}, 0.0)"
                    for axis in extra:
                        text = f"tl.sum({text}, axis={axis}, keep_dims=True)"
                parts.append(text)
            name = f"{self.prefix}d{counter}"
            counter += 1
            self.buffer.line(f"{name} = {' + '.join(parts)}")
            for key in self.ids[position]:
                if key in wanted:
                    results[key] = name
            if not node.args:
                continue
            assert isinstance(node.expr, Op)
            operands = [self.nodes[a].value for a in node.args]
            for arg, formula in zip(node.args, adjoint_formulas(node.expr.op)):
                child = self.nodes[arg]
                if formula is None or child.constant:
                    continue  # no gradient, or a constant
                share = formula.format(*operands, g=name, r=node.value)
                shares.setdefault(arg, []).append((f"({share})", node.flags))
        return results


def _load_leaf(buffer: IndentedBuffer, operand: Operand, layout: Layout, name: str, shift: int) -> tuple[str, tuple[bool, bool, bool]]:
    """Load ``operand`` in ``layout`` as block ``name``; per-step inputs at time ``o_t + shift``."""
    stem = operand.stem
    if operand.source is Source.STEP:
        offset = f"o_t + {shift}" if shift > 0 else (f"o_t - {-shift}" if shift < 0 else "o_t")
        time = f"({offset})"
        if layout is Layout.CHANNEL:
            element, mask = f"{time}[:, None, None] * s_{stem}_t + o_d[None, :, None] * s_{stem}_c", f"({time} >= 0)[:, None, None] & ({time} < T)[:, None, None] & m_d[None, :, None]"
        elif layout is Layout.STATE:
            element, mask = f"{time}[:, None, None] * s_{stem}_t + o_n[None, None, :] * s_{stem}_c", f"({time} >= 0)[:, None, None] & ({time} < T)[:, None, None] & m_n[None, None, :]"
        else:
            assert layout is Layout.SCALAR
            element, mask = f"{time}[:, None, None] * s_{stem}_t", f"({time} >= 0)[:, None, None] & ({time} < T)[:, None, None]"
        buffer.line(f"{name} = tl.load(p_{stem} + i_b * s_{stem}_b + i_h * s_{stem}_h + {element}, mask={mask}, other=0.0).to(ACC)")
        return name, layout.per_step()
    return name, layout.value  # loaded once, before the loop (:func:`_load_invariants`)


def _invariant_name(operand: Operand, layout: Layout) -> str:
    return f"b_{operand.stem}_{layout.name.lower()}"


def _load_invariants(buffer: IndentedBuffer, plan: SelectiveScanPlan) -> None:
    """Params and consts, loaded once per program in the layouts the math uses."""
    seen = set()
    for leaf in plan.term_leaves + plan.output_leaves + plan.queries:
        operand, layout = leaf.operand, leaf.layout
        if operand.source is Source.STEP or (operand, layout) in seen:
            continue
        seen.add((operand, layout))
        stem = operand.stem
        name = _invariant_name(operand, layout)
        if layout is Layout.SCALAR:
            buffer.line(f"{name} = tl.load(p_{stem}).to(ACC)")
        elif layout is Layout.CHANNEL:
            buffer.line(f"{name} = tl.load(p_{stem} + o_d[None, :, None] * s_{stem}_0, mask=m_d[None, :, None], other=0.0).to(ACC)")
        elif layout is Layout.STATE:
            buffer.line(f"{name} = tl.load(p_{stem} + o_n[None, None, :] * s_{stem}_0, mask=m_n[None, None, :], other=0.0).to(ACC)")
        else:
            buffer.line(f"{name} = tl.load(p_{stem} + o_d[None, :, None] * s_{stem}_0 + o_n[None, None, :] * s_{stem}_1, mask=m_d[None, :, None] & m_n[None, None, :], other=0.0).to(ACC)")


def _leaf_blocks(buffer: IndentedBuffer, leaves: tuple[SelectiveLeaf, ...], shift: int, tag: str, loaded: dict) -> dict[int, tuple[str, tuple[bool, bool, bool]]]:
    """Each leaf's block at time shift ``shift``; ``loaded`` shares one load per (operand, layout)."""
    blocks = {}
    for leaf in leaves:
        key = (leaf.operand, leaf.layout, shift)
        if key not in loaded:
            if leaf.operand.source is Source.STEP:
                name = f"b_{leaf.operand.stem}_{leaf.layout.name.lower()}_{tag}"
                loaded[key] = _load_leaf(buffer, leaf.operand, leaf.layout, name, shift)
            else:
                loaded[key] = (_invariant_name(leaf.operand, leaf.layout), leaf.layout.value)
        blocks[id(leaf.expr)] = loaded[key]
    return blocks


def _full(text: str, padding: str) -> str:
    """``text`` broadcast to the whole [BT, BD, BN] block, ``padding`` outside the valid lanes."""
    return f"tl.where({_mask((True, True, True))}, {text} + tl.zeros([BT, BD, BN], dtype=ACC), {padding})"


def _operand_args(plan: SelectiveScanPlan) -> list[str]:
    args = []
    for operand in plan.operands:
        stem = operand.stem
        if operand.source is Source.STEP:
            args += [f"p_{stem}", f"s_{stem}_b", f"s_{stem}_h", f"s_{stem}_t", f"s_{stem}_c"]
        else:
            args += [f"p_{stem}"] + [f"s_{stem}_{i}" for i in range(len(operand.shape))]
    return args


def _output_args(plan: SelectiveScanPlan, prefix: str) -> list[str]:
    return [a for k in range(len(plan.outputs)) for a in (f"{prefix}{k}", f"s_{prefix}{k}_b", f"s_{prefix}{k}_h", f"s_{prefix}{k}_t", f"s_{prefix}{k}_c")]


def gradient_buffers(plan: SelectiveScanPlan) -> list[tuple[Operand, Layout]]:
    """The backward kernel's gradient outputs, in argument order: one per (operand, layout) with a gradient."""
    found = []
    for leaf in plan.term_leaves + plan.output_leaves + plan.queries:
        key = (leaf.operand, leaf.layout)
        if leaf.operand.source is not Source.CONST and key not in found:
            found.append(key)
    return found


def _gradient_name(operand: Operand, layout: Layout) -> str:
    return f"g_{operand.stem}_{layout.name.lower()}"


_SIZES = "T, D, N, H, NDB, NC"
_CONSTANTS = "CK: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr"


def _emit_program_start(buffer: IndentedBuffer) -> None:
    buffer.line("i_r = tl.program_id(0).to(tl.int64)  # the row: batch b and head h")
    buffer.line("i_d = tl.program_id(1)  # the block of channels")
    buffer.line("i_b = i_r // H")
    buffer.line("i_h = i_r % H")
    buffer.line("o_d = i_d * BD + tl.arange(0, BD)")
    buffer.line("m_d = o_d < D")
    buffer.line("o_n = tl.arange(0, BN)")
    buffer.line("m_n = o_n < N")
    buffer.line("o_k = tl.arange(0, BT)")
    buffer.line("o_s = o_d[:, None] * N + o_n[None, :]  # a [BD, BN] block of one row's [d, n] state")
    buffer.line("m_s = m_d[:, None] & m_n[None, :]")


def _emit_terms(buffer: IndentedBuffer, plan: SelectiveScanPlan, shift: int, tag: str, loaded: dict, decay_only: bool = False) -> _Graph:
    leaves = plan.term_leaves
    if decay_only:  # load only what the decay reads
        under = {id(node) for node in ir.walk(plan.decay)}
        leaves = tuple(leaf for leaf in leaves if id(leaf.expr) in under)
    blocks = _leaf_blocks(buffer, leaves, shift, tag, loaded)
    graph = _Graph(buffer, blocks, f"b_{tag}")
    graph.emit(plan.decay)
    if not decay_only:
        graph.emit(plan.input)
    return graph


def _emit_block_states(buffer: IndentedBuffer, plan: SelectiveScanPlan, start: str, tag: str, loaded: dict) -> tuple[_Graph, str]:
    """The states of the block of steps ``o_t`` from ``start`` (a [BD, BN] state entering it): ``b_hs``."""
    graph = _emit_terms(buffer, plan, 0, tag, loaded)
    buffer.line(f"b_a = {_full(graph.value(plan.decay), '1.0')}  # padding: the state carried unchanged")
    buffer.line(f"b_u = {_full(graph.value(plan.input), '0.0')}")
    buffer.line("b_ca, b_cu = tl.associative_scan((b_a, b_u), 0, _affine_pair)")
    buffer.line(f"b_hs = b_ca * {start}[None, :, :] + b_cu")
    return graph, "b_hs"


def _emit_forward(buffer: IndentedBuffer, plan: SelectiveScanPlan) -> None:
    name = plan.name
    args = ["h0", "hT", "ckpt", *_output_args(plan, "y"), *_operand_args(plan), _SIZES, "STORE: tl.constexpr", _CONSTANTS]
    buffer.line("@triton.jit")
    buffer.line(f"def selective_forward_{name}({', '.join(args)}):")
    with buffer.indent():
        for line in plan.comment:
            buffer.line(f"# {line}")
        buffer.line(f"# decay: {format_expr(plan.decay)}")
        buffer.line(f"# input: {format_expr(plan.input)}")
        for k, expr in zip(plan.outputs, plan.output_exprs):
            buffer.line(f"# output {k}: {format_expr(expr)}")
        _emit_program_start(buffer)
        buffer.line("b_h = tl.load(h0 + i_r * D * N + o_s, mask=m_s, other=0.0).to(ACC)")
        _load_invariants(buffer, plan)
        buffer.line("for i_t in range(0, tl.cdiv(T, BT)):")
        with buffer.indent():
            buffer.line("if STORE:")
            with buffer.indent():
                buffer.line("if i_t % CK == 0:  # a checkpoint: the state entering this block, for the backward pass")
                with buffer.indent():
                    buffer.line("tl.store(ckpt + (i_r * NC + i_t // CK) * D * N + o_s, b_h, mask=m_s)")
            buffer.line("o_t = i_t * BT + o_k")
            buffer.line("m_t = o_t < T")
            loaded: dict = {}
            _, states = _emit_block_states(buffer, plan, "b_h", "f", loaded)
            _emit_outputs(buffer, plan, states, "f", loaded, store=True)
            buffer.line(f"b_h = tl.sum(tl.where(o_k[:, None, None] == BT - 1, {states}, 0.0), axis=0)")
        buffer.line("tl.store(hT + i_r * D * N + o_s, b_h, mask=m_s)")
    buffer.line("")
    buffer.line("")


def _emit_outputs(buffer: IndentedBuffer, plan: SelectiveScanPlan, states: str, tag: str, loaded: dict, store: bool) -> tuple[_Graph, dict]:
    blocks = _leaf_blocks(buffer, plan.output_leaves, 0, f"{tag}o", loaded)
    query_blocks = _leaf_blocks(buffer, plan.queries, 0, f"{tag}q", loaded)
    for r, (readout, query) in enumerate(zip(plan.readouts, plan.queries)):
        q_value, _ = query_blocks[id(query.expr)]
        buffer.line(f"b_{tag}r{r} = tl.sum({states} * {q_value}, axis=2, keep_dims=True)  # {format_expr(readout)}")
        blocks[id(readout)] = (f"b_{tag}r{r}", (True, True, False))
    graph = _Graph(buffer, blocks, f"b_{tag}y")
    for k, expr in enumerate(plan.output_exprs):
        value = graph.value(expr)
        if store:
            pointer = f"y{k} + i_b * s_y{k}_b + i_h * s_y{k}_h + o_t[:, None, None] * s_y{k}_t + o_d[None, :, None] * s_y{k}_c"
            buffer.line(f"tl.store({pointer}, {value} + tl.zeros([BT, BD, 1], dtype=ACC), mask={_mask((True, True, False))})")
    return graph, query_blocks


def _emit_backward(buffer: IndentedBuffer, plan: SelectiveScanPlan) -> None:
    name = plan.name
    grads = gradient_buffers(plan)
    args = ["h0", "ckpt", "dhT", "dh0", *_output_args(plan, "dy"), *_operand_args(plan), *(_gradient_name(o, l) for o, l in grads), _SIZES, "ATOMIC: tl.constexpr", _CONSTANTS]
    buffer.line("@triton.jit")
    buffer.line(f"def selective_backward_{name}({', '.join(args)}):")
    with buffer.indent():
        buffer.line("# Blocks of steps in reverse; per block the states are recomputed from the nearest checkpoint,")
        buffer.line("# the adjoint g_t = dL/dh_t (from the outputs and from step t + 1) is a reverse scan, and")
        buffer.line("# dL/da_t = g_t h_{t-1}, dL/db_t = g_t are pushed back through the gate math.")
        _emit_program_start(buffer)
        _load_invariants(buffer, plan)
        buffer.line("b_g = tl.load(dhT + i_r * D * N + o_s, mask=m_s, other=0.0).to(ACC)  # the adjoint entering from later steps")
        accumulators = {}
        for operand, layout in grads:
            if operand.source is not Source.STEP:
                accumulators[(operand, layout)] = f"b_acc_{operand.stem}_{layout.name.lower()}"
                shape = ["1", "BD" if layout.value[1] else "1", "BN" if layout.value[2] else "1"]
                buffer.line(f"{accumulators[(operand, layout)]} = tl.zeros([{', '.join(shape)}], dtype=ACC)")
        buffer.line("for i_j in range(0, tl.cdiv(T, BT)):")
        with buffer.indent():
            buffer.line("i_t = tl.cdiv(T, BT) - 1 - i_j")
            buffer.line("# the state entering this block: its checkpoint, carried over the blocks between")
            buffer.line("b_h = tl.load(ckpt + (i_r * NC + i_t // CK) * D * N + o_s, mask=m_s, other=0.0).to(ACC)")
            buffer.line("for i_c in range(i_t - i_t % CK, i_t):")
            with buffer.indent():
                buffer.line("o_t = i_c * BT + o_k")
                buffer.line("m_t = o_t < T")
                _, states = _emit_block_states(buffer, plan, "b_h", "r", {})
                buffer.line(f"b_h = tl.sum(tl.where(o_k[:, None, None] == BT - 1, {states}, 0.0), axis=0)")
            buffer.line("o_t = i_t * BT + o_k")
            buffer.line("m_t = o_t < T")
            buffer.line("# h_{t-1}: the scan of the terms one step back, the block's first step the identity")
            loaded: dict = {}
            previous = _emit_terms(buffer, plan, -1, "p", loaded)
            first = f"(o_k > 0)[:, None, None] & {_mask((True, True, True))}"
            buffer.line(f"b_pa = tl.where({first}, {previous.value(plan.decay)} + tl.zeros([BT, BD, BN], dtype=ACC), 1.0)")
            buffer.line(f"b_pu = tl.where({first}, {previous.value(plan.input)} + tl.zeros([BT, BD, BN], dtype=ACC), 0.0)")
            buffer.line("b_ca, b_cu = tl.associative_scan((b_pa, b_pu), 0, _affine_pair)")
            buffer.line("b_hp = b_ca * b_h[None, :, :] + b_cu")
            buffer.line("# the terms at t, kept node by node for their adjoints, and h_t")
            current = _emit_terms(buffer, plan, 0, "c", loaded)
            buffer.line(f"b_hs = b_hp * {current.value(plan.decay)} + {current.value(plan.input)}")
            buffer.line("# a_{t+1}, for the adjoint's recurrence (1 past the last step: dL/dh_T enters there)")
            following = _emit_terms(buffer, plan, 1, "n", loaded, decay_only=True)
            buffer.line(f"b_na = tl.where((o_t + 1 < T)[:, None, None] & {_mask((False, True, True))}, {following.value(plan.decay)} + tl.zeros([BT, BD, BN], dtype=ACC), 1.0)")
            buffer.line("# the outputs' adjoints")
            outputs, query_values = _emit_outputs(buffer, plan, "b_hs", "o", loaded, store=False)
            seeds = {}
            for k in range(len(plan.outputs)):
                pointer = f"dy{k} + i_b * s_dy{k}_b + i_h * s_dy{k}_h + o_t[:, None, None] * s_dy{k}_t + o_d[None, :, None] * s_dy{k}_c"
                buffer.line(f"b_dy{k} = tl.load({pointer}, mask={_mask((True, True, False))}, other=0.0).to(ACC)")
                seeds[id(plan.output_exprs[k])] = (f"b_dy{k}", (True, True, False))
            wanted = {id(leaf.expr) for leaf in plan.output_leaves} | {id(r) for r in plan.readouts}
            output_adjoints = outputs.backward(seeds, wanted)
            gy = []
            query_adjoints: dict[int, str] = {}
            for r, (readout, query) in enumerate(zip(plan.readouts, plan.queries)):
                if id(readout) not in output_adjoints:
                    continue
                adjoint = output_adjoints[id(readout)]
                gy.append(f"{adjoint} * {query_values[id(query.expr)][0]}")
                reduced = f"tl.sum(tl.where({_mask((True, True, True))}, {adjoint} * b_hs, 0.0), axis=1, keep_dims=True)"
                if query.operand.source is not Source.STEP:  # a param: summed over the block's steps too
                    reduced = f"tl.sum({reduced}, axis=0, keep_dims=True)"
                buffer.line(f"b_dq{r} = {reduced}")
                query_adjoints[id(query.expr)] = f"b_dq{r}"
            buffer.line(f"b_gy = tl.where({_mask((True, True, True))}, {' + '.join(gy) if gy else '0.0'} + tl.zeros([BT, BD, BN], dtype=ACC), 0.0)")
            buffer.line("# g_t = gy_t + a_{t+1} g_{t+1}: a scan in reverse time, the later block's adjoint carried in")
            buffer.line("b_ra, b_rg = tl.associative_scan((b_na, b_gy), 0, _affine_pair, reverse=True)")
            buffer.line("b_gs = b_ra * b_g[None, :, :] + b_rg")
            buffer.line("b_g = tl.sum(tl.where(o_k[:, None, None] == 0, b_gs, 0.0), axis=0)")
            buffer.line("if i_t == 0:  # dL/dh_0 = a_1 g_1")
            with buffer.indent():
                buffer.line(f"tl.store(dh0 + i_r * D * N + o_s, tl.sum(tl.where(o_k[:, None, None] == 0, b_gs * {current.value(plan.decay)}, 0.0), axis=0), mask=m_s)")
            buffer.line("# through the gate math")
            term_adjoints = current.backward({id(plan.decay): ("b_gs * b_hp", (True, True, True)), id(plan.input): ("b_gs", (True, True, True))}, {id(leaf.expr) for leaf in plan.term_leaves})
            _emit_gradient_writes(buffer, plan, grads, accumulators, [(plan.term_leaves, term_adjoints), (plan.output_leaves, output_adjoints), (plan.queries, query_adjoints)])
        for (operand, layout), accumulator in accumulators.items():
            target = _gradient_name(operand, layout)
            if layout is Layout.CHANNEL:
                buffer.line(f"tl.store({target} + i_r * D + o_d[None, :, None], {accumulator}, mask=m_d[None, :, None])")
            elif layout is Layout.STATE:
                buffer.line(f"tl.store({target} + (i_r * NDB + i_d) * N + o_n[None, None, :], {accumulator}, mask=m_n[None, None, :])")
            elif layout is Layout.FULL:
                buffer.line(f"tl.store({target} + i_r * D * N + o_s[None, :, :], {accumulator}, mask=m_s[None, :, :])")
            else:
                buffer.line(f"tl.store({target} + i_r * NDB + i_d + tl.zeros([1, 1, 1], dtype=tl.int32), {accumulator})")
    buffer.line("")
    buffer.line("")


def _emit_gradient_writes(buffer, plan, grads, accumulators, sources) -> None:
    """Sum each (operand, layout)'s leaf adjoints; write per-step ones, accumulate params'."""
    for operand, layout in grads:
        parts = []
        for leaves, adjoints in sources:
            for leaf in leaves:
                if leaf.operand == operand and leaf.layout is layout and id(leaf.expr) in adjoints:
                    parts.append(adjoints[id(leaf.expr)])
        total = " + ".join(dict.fromkeys(parts)) or "0.0"  # no gradient reaches it: zeros, written all the same
        target = _gradient_name(operand, layout)
        if operand.source is Source.STEP:
            if layout is Layout.CHANNEL:  # [rows, T, d]
                pointer = f"{target} + (i_r * T + o_t[:, None, None]) * D + o_d[None, :, None]"
                buffer.line(f"tl.store({pointer}, {total} + tl.zeros([BT, BD, 1], dtype=ACC), mask={_mask((True, True, False))})")
            else:
                # Summed over the blocks of channels: with ATOMIC by atomic adds into [rows, 1, T(, n)]
                # (zeroed), else one partial per block, [rows, NDB, T(, n)], summed in torch.
                width, shape, lanes = ("N", "[BT, 1, BN]", " + o_n[None, None, :]") if layout is Layout.STATE else ("1", "[BT, 1, 1]", "")
                mask = _mask((True, False, layout is Layout.STATE))
                buffer.line("if ATOMIC:")
                with buffer.indent():
                    buffer.line(f"tl.atomic_add({target} + (i_r * T + o_t[:, None, None]) * {width}{lanes}, {total} + tl.zeros({shape}, dtype=ACC), mask={mask})")
                buffer.line("else:")
                with buffer.indent():
                    buffer.line(f"tl.store({target} + ((i_r * NDB + i_d) * T + o_t[:, None, None]) * {width}{lanes}, {total} + tl.zeros({shape}, dtype=ACC), mask={mask})")
        else:
            accumulator = accumulators[(operand, layout)]
            # the sweep summed the shares over the block's steps already (a param does not vary in time)
            buffer.line(f"{accumulator} += tl.where({_mask(layout.value)}, {total}, 0.0)" if layout is not Layout.SCALAR else f"{accumulator} += {total}")


def generate(plans: list[SelectiveScanPlan]) -> str:
    """The Triton source of the plans' forward and backward kernels (appended to the backend's module)."""
    buffer = IndentedBuffer()
    for plan in plans:
        buffer.line(f"# ---- {plan.name}: fused selective scan (S6): the state stays on chip " + "-" * 20)
        buffer.line("")
        _emit_forward(buffer, plan)
        _emit_backward(buffer, plan)
    return buffer.text()


# ---- running ---------------------------------------------------------------------------------


def _next_power_of_two(value: int) -> int:
    size = 1
    while size < value:
        size *= 2
    return size


@dataclass(frozen=True)
class BlockSizes:
    """The kernels' tiling: ``BT`` steps x ``BD`` channels x ``BN`` (all of n) state elements per
    block, a checkpoint every ``CK`` blocks of steps, and the warps per program."""

    steps: int
    channels: int
    width: int
    checkpoint_blocks: int
    num_warps: int

    @staticmethod
    def choose(channels: int, width: int, elements: int | None = None) -> "BlockSizes":
        """About ``elements`` per block (2048 in 8 warps, or from n > 32 on 1024 in 4 warps: the
        backward kernel's carries and param sums are [BD, n] each): no spills at n = 16 on sm_80 and
        sm_90 (tests/test_triton_compile.py); at n = 64 the backward kernel still spills a few
        bytes (8 B on sm_80 for one specialisation; 2 warps and 512 elements leave 4 B on sm_90,
        so this is not register pressure alone); a checkpoint every ``2 n`` steps or more (the
        checkpoints then cost at most 2 bytes per channel and step in float32), at most 8
        blocks apart (the backward pass recomputes up to that many blocks from a checkpoint)."""
        width_block = _next_power_of_two(width)
        elements = elements or (2048 if width_block <= 32 else 1024)
        steps = max(4, min(32, elements // (width_block * 16)))
        channel_block = max(1, min(_next_power_of_two(channels), elements // (steps * width_block)))
        checkpoint = min(8, max(1, -(-2 * width // steps)))
        return BlockSizes(steps, channel_block, width_block, checkpoint, 8 if width_block <= 32 else 4)


def _numel(shape) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def _rows_view(value, lead: tuple[int, ...]):
    """``[B, T, *heads, m]`` as ``[B, H, T, m]`` (a view where torch can)."""
    moved = value.movedim(1, len(lead) - 1)
    return moved.reshape(lead[0], _numel(lead[2:]), lead[1], value.shape[-1] if value.dim() > len(lead) else 1)


def _strides(view) -> list[int]:
    return [stride if size > 1 else 0 for size, stride in zip(view.shape, view.stride())]


class _Runner:
    """One call's sizes, tensors' layouts and kernels, shared by the forward and backward passes."""

    def __init__(self, kernel_source: str, plan: SelectiveScanPlan, lead: tuple[int, ...], dtype) -> None:
        self.source = kernel_source
        self.plan = plan
        self.lead = lead
        self.rows = _numel((lead[0],) + lead[2:])
        self.heads = _numel(lead[2:])
        self.steps = lead[1]
        self.dtype = dtype
        self.blocks = BlockSizes.choose(plan.channels, plan.width)
        self.channel_blocks = -(-plan.channels // self.blocks.channels)
        time_blocks = -(-self.steps // self.blocks.steps)
        self.checkpoints = -(-time_blocks // self.blocks.checkpoint_blocks)
        self.store = False  # whether the forward pass stores checkpoints (set by run_step)
        # dB, dC (state-axis inputs) summed over the blocks of channels by atomic adds when one
        # partial per block would move more than the channel gradients do (n > BD; Mamba's kernel
        # adds atomically too), else as partials summed in torch (deterministic).
        self.atomic = plan.width > self.blocks.channels

    def module(self):
        from .triton_backend import load_generated

        return load_generated(self.source)

    def sizes(self) -> list[int]:
        return [self.steps, self.plan.channels, self.plan.width, self.heads, self.channel_blocks, self.checkpoints]

    def constants(self) -> dict:
        import triton.language as tl

        sizes = self.blocks
        accumulator = tl.float64 if self.dtype == torch.float64 else tl.float32
        return dict(CK=sizes.checkpoint_blocks, BT=sizes.steps, BD=sizes.channels, BN=sizes.width, ACC=accumulator, num_warps=sizes.num_warps)

    def grid(self) -> tuple[int, int]:
        return (self.rows, self.channel_blocks)

    def operand_arguments(self, operands) -> list:
        arguments: list = []
        for operand, value in zip(self.plan.operands, operands):
            if operand.source is Source.STEP:
                view = _rows_view(value, self.lead)
                arguments += [view, *_strides(view)]
            else:
                arguments += [value, *[stride if size > 1 else 0 for size, stride in zip(value.shape, value.stride())]]
        return arguments

    def sequence_arguments(self, values) -> list:
        arguments: list = []
        for value in values:
            view = _rows_view(value, self.lead)
            arguments += [view, *_strides(view)]
        return arguments


class _SelectiveScan(torch.autograd.Function):
    """The fused selective scan: ``(h0, *operands) -> (h_T, *outputs)``."""

    @staticmethod
    def forward(ctx, runner: _Runner, h0: torch.Tensor, *operands: torch.Tensor):
        plan = runner.plan
        device = h0.device
        start = h0.reshape(runner.rows, plan.channels, plan.width).to(runner.dtype).contiguous()
        final = torch.empty_like(start)
        outputs = [torch.empty(runner.lead + (plan.channels,), dtype=runner.dtype, device=device) for _ in plan.outputs]
        store = runner.store
        shape = (runner.rows, runner.checkpoints, plan.channels, plan.width) if store else (1,)
        checkpoints = torch.empty(shape, dtype=runner.dtype, device=device)
        module = runner.module()
        launch(
            getattr(module, f"selective_forward_{plan.name}"), runner.grid(),
            start, final, checkpoints, *runner.sequence_arguments(outputs), *runner.operand_arguments(operands), *runner.sizes(),
            STORE=store, **runner.constants(),
        )
        ctx.runner = runner
        ctx.initial_shape = h0.shape
        ctx.save_for_backward(start, checkpoints, *operands)
        return (final, *outputs)

    @staticmethod
    def backward(ctx, grad_final, *grad_outputs):
        runner: _Runner = ctx.runner
        plan = runner.plan
        start, checkpoints, *operands = ctx.saved_tensors
        device, dtype = start.device, runner.dtype
        grad_final = torch.zeros_like(start) if grad_final is None else grad_final.reshape(start.shape).to(dtype).contiguous()
        grad_outputs = [torch.zeros(runner.lead + (plan.channels,), dtype=dtype, device=device) if g is None else g for g in grad_outputs]
        grad_start = torch.empty_like(start)
        buffers = []
        for operand, layout in gradient_buffers(plan):
            if operand.source is Source.STEP:
                if layout is Layout.CHANNEL:
                    shape = (runner.rows, runner.steps, plan.channels)
                else:  # summed over blocks of channels: atomically, or one partial per block
                    shape = (runner.rows, 1 if runner.atomic else runner.channel_blocks, runner.steps) + ((plan.width,) if layout is Layout.STATE else ())
                    if runner.atomic:
                        buffers.append(torch.zeros(shape, dtype=dtype, device=device))
                        continue
            else:
                shape = {
                    Layout.CHANNEL: (runner.rows, plan.channels),
                    Layout.STATE: (runner.rows, runner.channel_blocks, plan.width),
                    Layout.FULL: (runner.rows, plan.channels, plan.width),
                    Layout.SCALAR: (runner.rows, runner.channel_blocks),
                }[layout]
            buffers.append(torch.empty(shape, dtype=dtype, device=device))  # the kernel writes every element
        module = runner.module()
        launch(
            getattr(module, f"selective_backward_{plan.name}"), runner.grid(),
            start, checkpoints, grad_final, grad_start, *runner.sequence_arguments(grad_outputs), *runner.operand_arguments(operands),
            *buffers, *runner.sizes(), ATOMIC=runner.atomic, **runner.constants(),
        )
        # Partials to gradients: sums over blocks of channels and over rows, in torch.
        grads: list = [None] * len(operands)
        lead = runner.lead
        for (operand, layout), buffer in zip(gradient_buffers(plan), buffers):
            index = plan.operands.index(operand)
            if operand.source is Source.STEP:
                value = buffer if layout is Layout.CHANNEL else (buffer[:, 0] if runner.atomic else buffer.sum(1))  # [rows, T(, m)]
                value = value.reshape((lead[0],) + lead[2:] + (lead[1],) + operand.shape).movedim(len(lead) - 1, 1)
            else:
                value = buffer.sum(0)
                if layout in (Layout.STATE, Layout.SCALAR):
                    value = value.sum(0)
                value = value.reshape(operand.shape)
            grads[index] = value if grads[index] is None else grads[index] + value
        for i, operand in enumerate(operands):
            if grads[i] is not None:
                grads[i] = grads[i].to(operand.dtype) if ctx.needs_input_grad[2 + i] else None
        return (None, grad_start.reshape(ctx.initial_shape), *grads)


def run_step(kernel_source: str, plan: SelectiveScanPlan, values, lead: tuple[int, ...], dtype, initial):
    """Run the fused kernels: ``({output index: [B, T, *heads, d]}, final state [B, *heads, d, n])``.

    ``values`` maps ``(RefKind, name)`` to the cell's inputs, params and consts.
    """
    runner = _Runner(kernel_source, plan, lead, dtype)
    operands = [values[(operand.kind, operand.name)] for operand in plan.operands]
    initial = initial.expand((lead[0],) + lead[2:] + (plan.channels, plan.width))
    # Checkpoints only when a gradient will be asked for (inside forward grad mode is off).
    runner.store = torch.is_grad_enabled() and (initial.requires_grad or any(t.requires_grad for t in operands))
    final, *outputs = _SelectiveScan.apply(runner, initial, *operands)
    final = final.reshape((lead[0],) + lead[2:] + (plan.channels, plan.width))
    return dict(zip(plan.outputs, outputs)), final
