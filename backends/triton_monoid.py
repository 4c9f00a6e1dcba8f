"""The backward kernel of a declared monoid's prefix scan, derived from its ``combine``.

The forward kernel (:func:`.triton_codegen.emit_forward`) computes the inclusive prefix

    y_t = y_{t-1} (+) l_t        (y_{-1} the initial carries, l_t the lifted leaves)

over ``k`` carries per state element.  Its adjoint is a first-order recurrence over reversed
time with, per element, a ``k x k`` transition: with ``A_t = d y_t / d y_{t-1}`` (the
combine's Jacobian in its earlier operand at ``(y_{t-1}, l_t)``) and ``B_t`` (in its later
operand),

    g_t = dy_t + A_{t+1}^T g_{t+1},      dl_t = B_t^T g_t,      d y_{-1} = A_0^T g_0.

``backward_<scan>`` walks reversed time in blocks of ``BT`` steps, as the affine scans'
backward does: per block it reloads ``y_t`` (the forward's outputs) and the leaves at
``t + 1``, evaluates the combine there and differentiates it by the op registry's rules
(:func:`.triton_codegen.emit_chain_rule`, seeded with each result in turn) into the entries
of ``W_t = A_{t+1}^T``, scans the pairs ``(W_t, dy_t)`` with ``adjoint_combine_<scan>``
(``(W1, u1) o (W2, u2) = (W2 W1, W2 u1 + u2)``, the matrix form of ``_affine_pair``), and
carries the last adjoint into the next block.  Then it evaluates the combine at
``(y_{t-1}, l_t)`` and carries ``g_t`` through it and the lifts' gate math to one gradient
per leaf.  ``dL/dy_{-1}`` is one more pass through the combine after the loop, at ``t = 0``.

The gradient is the sequential definition's (torch's autograd of ``combine(y_{t-1}, l_t)``
step by step): the registry's rules follow torch's conventions, so ties of ``max`` split
the adjoint in halves there too (Aaren's ``m = max(a.m, b.m)`` with equal scores).

Only the entries of ``W`` that can be nonzero are carried: ``W[i][j]`` (how the adjoint of
result ``j`` reaches earlier carry ``i``) is structurally zero when carry ``i`` does not
appear in result ``j``'s expression, and the scan's products stay within the reflexive,
transitive closure of that pattern (:class:`MonoidAdjoint`).  Aaren's ``(m, s, n)`` need 5
of the 9 (``m`` reads only ``m``; ``s`` and ``n`` read themselves and ``m``).

A carry of one element beside wider ones (Aaren's ``m`` and ``s``) is read as one value per
step (:func:`.triton_codegen.single_element_carries`), its gradient entering lane 0's copy
only; a leaf that is one value per step for every element (``score``) has its gradient
summed over the program's lanes (:class:`.triton_codegen.LeafGradient` ``SUMMED_OVER_LANES``).
"""

from __future__ import annotations

from dataclasses import dataclass

from recdsl import ir
from recdsl.ir import Kind, Op, Ref, RefKind
from recdsl.ops import OPS
from recdsl.printer import format_expr

from .triton_codegen import (
    _STATE_OFFSET,
    FUSED_OPS,
    NARROW_OFFSET,
    ExpressionEmitter,
    IndentedBuffer,
    Leaf,
    ScanSpec,
    SplitMode,
    Unsupported,
    Value,
    backward_sizes,
    emit_backward_block,
    _emit_fold,
    _emit_leaf_gradients,
    _emit_loads,
    _emit_row_pointers,
    _leaf_args,
    emit_chain_rule,
    leaf_gradient_args,
    leaf_mode_args,
    single_element_carries,
)


@dataclass(frozen=True)
class MonoidAdjoint:
    """The structure of a monoid's adjoint transition ``W = (d combine / d earlier)^T``, derived
    from the combine at plan time; its presence on a :class:`ScanSpec` means the backward is the
    generated kernel.

    ``entries``: the ``(i, j)`` where ``W[i][j]`` or a product of such matrices can be nonzero
    (the reflexive-transitive closure of "earlier carry ``i`` appears in result ``j``"), in
    row-major order; the scan carries only these.
    """

    carries: int
    entries: tuple[tuple[int, int], ...]

    def through(self, i: int, j: int) -> tuple[int, ...]:
        """The ``l`` with ``(i, l)`` and ``(l, j)`` both entries: the terms of ``(W2 W1)[i][j]``."""
        present = set(self.entries)
        return tuple(l for l in range(self.carries) if (i, l) in present and (l, j) in present)


def earlier_carries(monoid: ir.MonoidIR) -> tuple[Ref, ...]:
    """Stand-ins for the earlier operand's carries (``y_{t-1}``), leaves of the derivative."""
    return tuple(Ref(RefKind.LOCAL, f"__earlier_{carry.name}", carry.type) for carry in monoid.carries)


def combine_expressions(monoid: ir.MonoidIR, earlier: tuple[ir.Expr, ...], later: tuple[ir.Expr, ...]) -> tuple[ir.Expr, ...]:
    """The combine's results as single expressions: the operands' carries replaced by
    ``earlier`` and ``later`` (one per carry), the body's local bindings inlined."""
    left, right = monoid.operands
    operands: dict[tuple[RefKind, str], ir.Expr] = {}
    for carry, first, second in zip(monoid.carries, earlier, later):
        operands[(RefKind.CARRY_LEFT, f"{left}.{carry.name}")] = first
        operands[(RefKind.CARRY_RIGHT, f"{right}.{carry.name}")] = second
    bound: dict[str, ir.Expr] = {}

    def substitute(node: ir.Expr) -> ir.Expr:
        if isinstance(node, Ref):
            if node.kind is RefKind.LOCAL and node.name in bound:
                return bound[node.name]
            return operands.get((node.kind, node.label), node)
        if isinstance(node, Op):
            args = tuple(substitute(a) for a in node.args)
            return node if args == node.args else Op(node.op, args, node.type, node.attrs)
        return node

    for assign in monoid.body:
        bound[assign.name] = substitute(assign.value)
    return tuple(substitute(result) for result in monoid.results)


def _fused_nodes(expr: ir.Expr):
    """The nodes the kernel evaluates (not below a leaf: torch computes those and differentiates them)."""
    yield expr
    if isinstance(expr, Op) and expr.op in FUSED_OPS:
        for arg in expr.args:
            yield from _fused_nodes(arg)


def monoid_adjoint(monoid: ir.MonoidIR, lifts: tuple[ir.Expr, ...]) -> MonoidAdjoint:
    """The adjoint's structure for ``monoid`` scanned from ``lifts``, or :class:`Unsupported`
    (raised) when the kernel cannot differentiate it: an op without a derivative rule in the
    registry, or a complex value inside the combine or the lifts."""
    earlier = earlier_carries(monoid)
    results = combine_expressions(monoid, earlier, lifts)
    for result in results:
        for node in _fused_nodes(result):
            if node.type.kind is Kind.COMPLEX:
                raise Unsupported(f"monoid {monoid.name}: '{format_expr(node)}' is complex; the generated backward differentiates real values only")
            if isinstance(node, Op) and node.op in FUSED_OPS and OPS[node.op].derivative is None:
                raise Unsupported(f"monoid {monoid.name}: '{node.op}' has no derivative rule in the op registry")
    count = len(monoid.carries)
    reaches = {(i, j) for j, result in enumerate(results) for i, carry in enumerate(earlier) if any(node == carry for node in _fused_nodes(result))}
    closure = reaches | {(i, i) for i in range(count)}
    while True:
        longer = closure | {(i, j) for (i, l) in closure for (m, j) in closure if l == m}
        if longer == closure:
            break
        closure = longer
    return MonoidAdjoint(count, tuple(sorted(closure)))


def _entry(i: int, j: int, side: str = "") -> str:
    return f"w_{i}_{j}{side}"


def emit_adjoint_combine(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    """``adjoint_combine_<scan>``: the affine pair with a matrix, over the adjoint's entries."""
    adjoint = spec.adjoint
    assert adjoint is not None
    k = adjoint.carries
    sides = []
    for side in ("_1", "_2"):
        sides += [_entry(i, j, side) for i, j in adjoint.entries] + [f"u_{i}{side}" for i in range(k)]
    buffer.line("@triton.jit")
    buffer.line(f"def adjoint_combine_{spec.name}({', '.join(sides)}):")
    with buffer.indent():
        buffer.line("# (W1, u1) o (W2, u2) = (W2 W1, W2 u1 + u2): g_t = W_t g_{t+1} + dy_t over reversed time,")
        buffer.line("# W_t = (d y_{t+1} / d y_t)^T per state element, only its entries that can be nonzero")
        present = set(adjoint.entries)
        for i, j in adjoint.entries:
            products = [f"{_entry(i, l, '_2')} * {_entry(l, j, '_1')}" for l in adjoint.through(i, j)]
            buffer.line(f"{_entry(i, j)} = {' + '.join(products)}")
        for i in range(k):
            terms = [f"{_entry(i, l, '_2')} * u_{l}_1" for l in range(k) if (i, l) in present] + [f"u_{i}_2"]
            buffer.line(f"u_{i} = {' + '.join(terms)}")
        buffer.line(f"return {', '.join([_entry(i, j) for i, j in adjoint.entries] + [f'u_{i}' for i in range(k)])}")
    buffer.line("")
    buffer.line("")


def _forked(emitter: ExpressionEmitter, prefix: str) -> ExpressionEmitter:
    """A new emitter that knows ``emitter``'s values (the combine's forward nodes) but keeps its
    own memo: each chain-rule pass binds its adjoints to fresh placeholders of the same names."""
    fork = ExpressionEmitter(emitter.buffer, dict(emitter.leaf_values), prefix)
    fork.memo = dict(emitter.memo)
    return fork


def _emit_transition(buffer: IndentedBuffer, spec: ScanSpec, results: tuple[ir.Expr, ...], padding: bool) -> list[str]:
    """The block's scan elements ``(W_t, dy_t)``: ``y_t`` and the leaves at ``t + 1`` loaded, the
    combine evaluated there and differentiated (one chain-rule pass per result, seeded with 1)
    into the entries of ``W_t = (d y_(t+1) / d y_t)^T``; zero at ``t = T - 1``.  ``padding``:
    steps past the chunk's end get the identity (a fold over the block must not see them)."""
    adjoint, monoid = spec.adjoint, spec.monoid
    assert adjoint is not None and monoid is not None
    names = [carry.name for carry in monoid.carries]
    earlier = earlier_carries(monoid)
    narrow = single_element_carries(spec)
    for i, name in enumerate(names):
        offset = NARROW_OFFSET if i in narrow else _STATE_OFFSET
        buffer.line(f"b_y_{i} = tl.load(p_out_{name} + {offset}, mask=m, other=0.0).to(ACC)  # y_t.{name}")
        # A one-element carry's gradient enters lane 0's copy only (the copies are one value).
        dy_mask = "m & (o_c[None, :] == 0)" if i in narrow else "m"
        buffer.line(f"b_dy_{i} = tl.load(p_grad_{name} + {offset}, mask={dy_mask}, other=0.0).to(ACC)")
    buffer.line("# the leaves at t + 1")
    at_next = _emit_loads(buffer, spec, "(o_t + 1)", "m_next", "_next")
    buffer.line(f"# the combine at t + 1, y_t {monoid.name} l_(t+1)")
    ahead = ExpressionEmitter(buffer, {**at_next, **{carry: f"b_y_{i}" for i, carry in enumerate(earlier)}}, "b_n_")
    for result in results:
        ahead.emit(result)
    earlier_leaves = tuple(Leaf(carry, f"earlier_{i}") for i, carry in enumerate(earlier))
    partials: dict[tuple[int, int], Value] = {}
    for j, result in enumerate(results):
        buffer.line(f"# d {names[j]} / d (the earlier carries), by the op registry's rules")
        found = emit_chain_rule(_forked(ahead, f"b_n{j}_"), [(result, "1.0")], earlier_leaves)
        for i, carry in enumerate(earlier):
            if carry in found:
                partials[(i, j)] = found[carry]
    elements = []
    for i, j in adjoint.entries:
        value = partials.get((i, j), "0.0")
        within = f"tl.where(m_next, {value} + tl.zeros([BT, BC], dtype=ACC), 0.0)"
        if padding:
            within = f"tl.where(m, {within}, {1.0 if i == j else 0.0})"
        buffer.line(f"b_{_entry(i, j)} = {within}  # d y_(t+1).{names[j]} / d y_t.{names[i]}")
        elements.append(f"b_{_entry(i, j)}")
    return elements + [f"b_dy_{i}" for i in range(adjoint.carries)]


def _emit_sequence_pointers(buffer: IndentedBuffer, spec: ScanSpec, initial: list[str], states: list[str], grads: list[str]) -> None:
    """The row's pointers: the states and their gradients ``[N, T, C]``, ``[N, T, 1]`` for a one-element carry."""
    narrow = single_element_carries(spec)
    wide = [pointer for i, pointer in enumerate(states) if i not in narrow] + [pointer for i, pointer in enumerate(grads) if i not in narrow]
    _emit_row_pointers(buffer, spec, initial, wide)
    for i in narrow:
        for pointer in (states[i], grads[i]):
            buffer.line(f"{pointer} += o_row * T  # [N, T, 1]: one element per step")


def _reversed_block(buffer: IndentedBuffer, chunked: bool) -> None:
    """The block's times and masks: whole, all of T in reverse; chunked, the chunk's steps."""
    buffer.line("# step j of the reversed sequence is time t = T - 1 - j")
    if chunked:
        buffer.line("o_j = i_k * L + i_j * BT + tl.arange(0, BT)")
        buffer.line("o_t = T - 1 - o_j")
        buffer.line("m = (o_j[:, None] < j_end) & m_c[None, :]")
    else:
        buffer.line("o_t = T - 1 - (i_j * BT + tl.arange(0, BT))")
        buffer.line("m = (o_t[:, None] >= 0) & m_c[None, :]")
    buffer.line("m_next = m & (o_t[:, None] + 1 < T)")


def _sum_parts(spec: ScanSpec) -> list[str]:
    assert spec.adjoint is not None
    return [f"p_sum_{_entry(i, j)}" for i, j in spec.adjoint.entries] + [f"p_sum_u_{i}" for i in range(spec.adjoint.carries)]


def emit_monoid_backward_summary(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    """``summarize_backward_<scan>``: pass 1 of the split backward (see :class:`.triton_codegen.TimeSplit`),
    each chunk of reversed time folded into one pair ``(W, u)``."""
    assert spec.adjoint is not None and spec.monoid is not None
    names = [carry.name for carry in spec.monoid.carries]
    states = [f"p_out_{n}" for n in names]
    grads = [f"p_grad_{n}" for n in names]
    sums = _sum_parts(spec)
    chunk_args = ["T", "C", "H", "L", "n_blocks", "n_chunks", "BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
    results = combine_expressions(spec.monoid, earlier_carries(spec.monoid), spec.terms)  # type: ignore[arg-type]
    buffer.line("@triton.jit")
    buffer.line(f"def summarize_backward_{spec.name}({', '.join(states + grads + sums + _leaf_args(spec) + chunk_args)}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        buffer.line("i_k = tl.program_id(2)  # the chunk of reversed time: steps j in [i_k * L, min(T, (i_k + 1) * L))")
        _emit_sequence_pointers(buffer, spec, [], states, grads)
        for pointer in sums:
            buffer.line(f"{pointer} += (o_row * n_chunks + i_k) * C  # [N, n_chunks, C]")
        buffer.line("j_end = tl.minimum(T, (i_k + 1) * L)")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        totals = [f"b_sum_{i}" for i in range(len(sums))]
        identities = [1.0 if i == j else 0.0 for i, j in spec.adjoint.entries] + [0.0] * spec.adjoint.carries
        for total, identity in zip(totals, identities):
            buffer.line(f"{total} = tl.full([BC], {identity}, dtype=ACC)")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        buffer.line("for i_j in range(0, n_blocks):")
        with buffer.indent():
            _reversed_block(buffer, chunked=True)
            elements = _emit_transition(buffer, spec, results, padding=True)
            _emit_fold(buffer, elements, f"adjoint_combine_{spec.name}", totals)
        for pointer, total in zip(sums, totals):
            buffer.line(f"tl.store({pointer} + o_c, {total}, mask=m_c)")
    buffer.line("")
    buffer.line("")


def emit_monoid_backward_carries(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    """``carries_backward_<scan>``: pass 2 of the split backward, the adjoint carried into each
    chunk (``g`` at the step after it) by a short loop over the chunks' folds: ``g <- W g + u``."""
    adjoint = spec.adjoint
    assert adjoint is not None
    k = adjoint.carries
    sums = _sum_parts(spec)
    carries = [f"p_carry_{i}" for i in range(k)]
    buffer.line("@triton.jit")
    buffer.line(f"def carries_backward_{spec.name}({', '.join(sums + carries + ['C', 'n_chunks', 'BC: tl.constexpr', 'ACC: tl.constexpr'])}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        buffer.line("o_row = i_n.to(tl.int64)")
        for pointer in sums + carries:
            buffer.line(f"{pointer} += o_row * n_chunks * C  # [N, n_chunks, C]")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        for i in range(k):
            buffer.line(f"b_g_{i} = tl.zeros([BC], dtype=ACC)")
        buffer.line("for i_k in range(0, n_chunks):")
        with buffer.indent():
            for i, pointer in enumerate(carries):
                buffer.line(f"tl.store({pointer} + i_k * C + o_c, b_g_{i}, mask=m_c)")
            for (i, j), pointer in zip(adjoint.entries, sums):
                buffer.line(f"b_{_entry(i, j)} = tl.load({pointer} + i_k * C + o_c, mask=m_c, other=0.0)")
            for i in range(k):
                buffer.line(f"b_u_{i} = tl.load({sums[len(adjoint.entries) + i]} + i_k * C + o_c, mask=m_c, other=0.0)")
            for i in range(k):
                terms = [f"b_{_entry(i, j)} * b_g_{j}" for j in range(k) if (i, j) in adjoint.entries]
                buffer.line(f"b_h_{i} = {' + '.join(terms + [f'b_u_{i}'])}")
            for i in range(k):
                buffer.line(f"b_g_{i} = b_h_{i}")
    buffer.line("")
    buffer.line("")


def emit_monoid_backward(buffer: IndentedBuffer, spec: ScanSpec, mode: SplitMode = SplitMode.WHOLE) -> None:
    """``backward_<scan>``: the adjoint of a declared monoid's prefix, one gradient per leaf and
    ``dL/dy_{-1}`` per carry (see the module's docstring).  WHOLE: one program per (row, block
    of ``BC`` state elements) walks all of T in reverse; CHUNK (``backward_<scan>_chunks``,
    pass 3 of the split backward): one chunk of reversed time from the adjoint carried into it,
    the chunk holding ``t = 0`` writing ``dL/dy_{-1}``."""
    adjoint = spec.adjoint
    monoid = spec.monoid
    assert adjoint is not None and monoid is not None and mode is not SplitMode.SUMMARY
    chunked = mode is SplitMode.CHUNK
    names = [carry.name for carry in monoid.carries]
    k = len(names)
    initial = [f"p_init_{n}" for n in names]
    states = [f"p_out_{n}" for n in names]
    grads = [f"p_grad_{n}" for n in names]
    dinit = [f"p_dinit_{n}" for n in names]
    carried = [f"p_carry_{i}" for i in range(k)] if chunked else []
    arguments = carried + initial + states + grads + dinit + leaf_gradient_args(spec) + _leaf_args(spec) + backward_sizes(mode) + leaf_mode_args(spec)
    earlier = earlier_carries(monoid)
    results = combine_expressions(monoid, earlier, spec.terms)  # type: ignore[arg-type]
    earlier_leaves = tuple(Leaf(carry, f"earlier_{i}") for i, carry in enumerate(earlier))
    buffer.line("@triton.jit")
    buffer.line(f"def backward_{spec.name}{'_chunks' if chunked else ''}({', '.join(arguments)}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        _emit_sequence_pointers(buffer, spec, initial + dinit, states, grads)
        emit_backward_block(buffer, mode, carried)
        for i in range(k):
            start = f"tl.load({carried[i]} + o_c, mask=m_c, other=0.0).to(ACC)" if chunked else "tl.zeros([BC], dtype=ACC)"
            buffer.line(f"b_g_{i} = {start}  # the adjoint of y_t.{names[i]} at the step after the block")
            buffer.line(f"b_g0_{i} = tl.zeros([BC], dtype=ACC)  # and at t = 0")
        for leaf in spec.leaves:
            buffer.line(f"b_acc_{leaf.name}_v = tl.zeros([BC], dtype=ACC)")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        buffer.line("for i_j in range(0, n_blocks):")
        with buffer.indent():
            _reversed_block(buffer, chunked)
            buffer.line("m_prev = (o_t[:, None] >= 1) & m_c[None, :]")
            buffer.line("m_first = m & (o_t[:, None] == 0)")
            buffer.line("o_init = o_c[None, :] + o_t[:, None] * 0")
            elements = _emit_transition(buffer, spec, results, padding=chunked)
            scanned = [f"b_W_{i}_{j}" for i, j in adjoint.entries] + [f"b_U_{i}" for i in range(k)]
            buffer.line(f"{', '.join(scanned)} = tl.associative_scan(({', '.join(elements)},), 0, adjoint_combine_{spec.name})")
            for i in range(k):
                carry = " + ".join(f"b_W_{i}_{j} * b_g_{j}[None, :]" for j in range(k) if (i, j) in adjoint.entries)
                buffer.line(f"b_gt_{i} = {carry} + b_U_{i}" if carry else f"b_gt_{i} = b_U_{i}")
            for i in range(k):
                buffer.line(f"b_g_{i} = tl.sum(tl.where(b_last, b_gt_{i}, 0.0), axis=0)")
                buffer.line(f"b_g0_{i} += tl.sum(tl.where(m_first, b_gt_{i}, 0.0), axis=0)")
            buffer.line(f"# the combine at t, y_(t-1) {monoid.name} l_t (y_(-1): the initial carries)")
            for i in range(k):
                previous = f"{NARROW_OFFSET} - 1" if i in single_element_carries(spec) else f"{_STATE_OFFSET} - C"
                buffer.line(f"b_p_{i} = tl.where(m_prev, tl.load({states[i]} + {previous}, mask=m_prev, other=0.0), tl.load({initial[i]} + o_init, mask=m, other=0.0)).to(ACC)")
            at_now = _emit_loads(buffer, spec, "o_t", "m")
            now = ExpressionEmitter(buffer, {**at_now, **{carry: f"b_p_{i}" for i, carry in enumerate(earlier)}}, "b_c_")
            for line in spec.comment:
                buffer.line(f"# {line}")
            for result in results:
                now.emit(result)
            buffer.line("# g_t through the combine's later operand and the lifts, each op's rule from the op registry")
            found = emit_chain_rule(now, [(result, f"b_gt_{j}") for j, result in enumerate(results)], spec.leaves)
            _emit_leaf_gradients(buffer, spec, found, chunked)
            rows = "o_j < j_end" if chunked else "o_t >= 0"
            for leaf in spec.leaves:
                value = found.get(leaf.expr, "0.0")
                buffer.line(f"if G_{leaf.name} == 3:  # one value per step for every element: this program's lanes summed")
                with buffer.indent():
                    pointer = f"p_d{leaf.name}_v + o_b * s_d{leaf.name}_b + o_h * s_d{leaf.name}_h + o_t * s_d{leaf.name}_t + i_c * s_d{leaf.name}_c"
                    buffer.line(f"tl.store({pointer}, tl.sum(tl.where(m, {value} + tl.zeros([BT, BC], dtype=ACC), 0.0), axis=1), mask={rows})")
        buffer.line("# dL/dy_(-1) = (d y_0 / d y_(-1))^T g_0: the combine at t = 0 once more, on [BC] lanes")
        first: dict[ir.Expr, Value] = {}
        for i, carry in enumerate(earlier):
            buffer.line(f"b_i_{i} = tl.load({initial[i]} + o_c, mask=m_c, other=0.0).to(ACC)")
            first[carry] = f"b_i_{i}"
        for leaf in spec.leaves:
            buffer.line(f"b_{leaf.name}_first = tl.load(p_{leaf.name}_v + o_c * s_{leaf.name}_c, mask=m_c, other=0.0).to(ACC)  # {format_expr(leaf.expr)}"[:160])
            first[leaf.expr] = f"b_{leaf.name}_first"
        start = ExpressionEmitter(buffer, first, "b_f_")
        for result in results:
            start.emit(result)
        found = emit_chain_rule(start, [(result, f"b_g0_{j}") for j, result in enumerate(results)], earlier_leaves)
        holds_first = " & (o_c * 0 + j_end >= T)" if chunked else ""  # split: only the chunk holding t = 0
        for i, carry in enumerate(earlier):
            value = found.get(carry, "0.0")
            buffer.line(f"tl.store({dinit[i]} + o_c, {value} + tl.zeros([BC], dtype=ACC), mask=m_c{holds_first})")
        for leaf in spec.leaves:
            buffer.line(f"if G_{leaf.name} == 2:")
            with buffer.indent():
                pointer = f"p_d{leaf.name}_v + o_b * s_d{leaf.name}_b + o_h * s_d{leaf.name}_h + i_k * s_d{leaf.name}_t + o_c * s_d{leaf.name}_c"
                buffer.line(f"tl.store({pointer}, b_acc_{leaf.name}_v, mask=m_c)  # this program's sum over its steps")
    buffer.line("")
    buffer.line("")
