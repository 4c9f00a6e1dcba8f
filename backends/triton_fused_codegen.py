"""Triton source of the fused sequential kernel (FlashRNN's form), generated from a :class:`StepProgram`.

The same step program the ``fused`` C loop runs (:mod:`.fused_program`: state-free leaves
hoisted out of the loop, the matmuls that share a state operand merged into one group,
elementwise gate math), written as two Triton kernels (Pöppel et al., 2024, "FlashRNN:
I/O-Aware Optimization of Traditional RNNs on modern hardware"):

- ``fused_forward``: one program per tile of ``BB`` rows (batch times heads).  The states
  stay in registers across the time loop, which runs inside the kernel; per step the
  varying leaves of step ``t`` are loaded, each matmul group is computed, the gate math is
  evaluated in registers, and the new states (and outputs) are written once.  With ``SAVE``
  the matmul results of every step are written too, for the backward;
- ``fused_backward``: the adjoint loop over reversed time (the adjoint the C loop derives:
  the step's values recomputed from the saved matmul results, each op's derivative with
  torch's conventions, the products' adjoints pushed back through the transposed weights).
  It writes the adjoints of the varying leaves and of the matmul results per step, each
  program's sum of the constant leaves' adjoints, and the initial states' adjoints; the
  weights' gradients are one matmul over all steps, done by torch afterwards.

Where the recurrent weights live.  FlashRNN keeps them on chip, split across several
thread blocks that synchronise once per step through a grid-wide barrier.  Triton has no
grid barrier (a spin on a global counter would deadlock under ``TRITON_INTERPRET=1``, which
runs programs one after another), and one program cannot hold them: at d = 128 in float32,
LSTM's ``[128, 512]`` weights are 256 KB, the whole register file of an SM and more than its
shared memory (164 KB on sm_80, 228 KB on sm_90).  So each matmul is tiled: the left
operand of a step (a state, or a value computed from states) is written once per step
(the backward needs it anyway, for the weights' gradients) and read back in chunks of
``BK`` columns; each chunk meets a ``[BK, n]`` tile of weights, loaded that step.  Every
program reads the same weights, so after the first step they come from L2 (50 MB on sm_90)
rather than DRAM, and no program holds more than one tile: nothing spills at any size.

Values are ``[BB, P]`` tiles, ``P`` the size rounded up to a power of two and at least 16
(``tl.dot``'s smallest block); scalars are ``[BB, 1]``, constant leaves ``[1, P]``.  Lanes
past a size or past the last row hold whatever the masked loads gave; every store, every
reduction and every ``tl.dot`` operand is masked, so they never reach a result.  Names
follow the Triton backend's: ``o_`` offsets, ``m_`` masks, ``b_`` block values, ``d_``
adjoints.  Nothing here imports triton: this module only writes text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from recdsl.ops import OPS, adjoint_templates

from .fused_program import Node, NodeKind, StepProgram
from .triton_codegen import IndentedBuffer

BLOCK_ROWS = 16  # BB: rows of one program (tl.dot needs at least 16)
BLOCK_K = 16  # BK: columns of a matmul's left operand (and rows of a weight tile) per chunk


class Unsupported(Exception):
    """The kernel has no form for a construct of the program; the message says which."""


def padded(size: int) -> int:
    """The block width of a vector of ``size`` elements: a power of two, at least 16 (1 for scalars)."""
    if size == 1:
        return 1
    return max(16, 1 << (size - 1).bit_length())


# Each op's value in Triton, over its operands' expressions {0}, {1}, {2}: the op registry's
# ``triton`` template (recdsl/ops.py), except comparisons, which give 1.0 / 0.0 as the C loop's
# booleans do, and ``where``, whose condition is such a number.
def _forward_template(op: str) -> str:
    if op in ("lt", "le", "gt", "ge", "eq", "ne"):
        return f"tl.where({OPS[op].triton}, 1.0, 0.0)"
    if op == "where":
        return "tl.where({0} != 0, {1}, {2})"
    if op == "pow":  # the registry's exp(b * log(a)) is nan for a < 0: torch.pow's signs at integer exponents
        return "_pow({0}, {1})"
    template = OPS[op].triton
    if template is None:
        raise Unsupported(f"'{op}' has no Triton form")
    return f"({template})"


def adjoint_formulas(op: str) -> tuple[str | None, ...]:
    """Each operand's share of ``op``'s adjoint as a Triton expression template, one per operand.

    In a template ``{g}`` is the result's adjoint, ``{r}`` the result and ``{0}``, ``{1}``, ``{2}``
    the operands; None: no gradient flows to that operand.  The rules are the op registry's
    (recdsl/ops.py, ``OpSpec.derivative``, as the C loop's), printed in Triton.  Raises
    :class:`Unsupported` for an op without a Triton form.
    """
    return adjoint_templates(op, lambda name, args: _forward_template(name).format(*args), _literal)


_HELPERS = '''
@triton.jit
def _pow(a, b):
    # a ** b as torch.pow computes it: |a| ** b with the sign of a at odd integer b, nan for a
    # negative base at a non-integer b, 0 ** 0 = 1.
    magnitude = tl.exp(b * tl.log(tl.abs(a)))
    integer = b == tl.floor(b)
    odd = integer & ((b - 2.0 * tl.floor(b * 0.5)) != 0)
    signed = tl.where(integer, tl.where(odd, -magnitude, magnitude), float("nan"))
    return tl.where(b == 0, 1.0, tl.where(a < 0, signed, magnitude))


@triton.jit
def _logaddexp(a, b):
    # log(e^a + e^b) without overflow; -inf when both are -inf, inf when both are inf.
    m = tl.maximum(a, b)
    m_safe = tl.where((m == float("-inf")) | (m == float("inf")), 0.0, m)
    return tl.where(m == float("inf"), m, m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe)))
'''


def _literal(value: float) -> str:
    if math.isnan(value):
        return 'float("nan")'
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    return repr(float(value))


@dataclass(frozen=True)
class KernelArguments:
    """The pointer arguments of the two kernels, in order (names as in the generated source)."""

    forward: tuple[str, ...]
    backward: tuple[str, ...]


def arguments(program: StepProgram) -> KernelArguments:
    """The kernels' pointer arguments: what :mod:`.triton_fused` passes, in this order."""
    lv = [f"lv{i}" for i in range(len(program.varying))]
    lc = [f"lc{i}" for i in range(len(program.constant))]
    w = [f"w{g}" for g in range(len(program.groups))]
    wt = [f"wt{g}" for g in range(len(program.groups))]
    init = [f"init{s}" for s in range(len(program.states))]
    seq = [f"seq{s}" for s in range(len(program.states))]
    out = [f"out{o.index}" for o in program.outputs if o.same_as_state is None]
    prod = [f"prod{g}" for g in range(len(program.groups))]
    left = [f"left{g}" for g in range(len(program.groups))]
    return KernelArguments(
        forward=tuple(lv + lc + w + init + seq + out + prod + left),
        backward=tuple(
            lv + lc + w + wt + init + seq + prod + left
            + [f"dseq{s}" for s in range(len(program.states))]
            + [f"dout{o.index}" for o in program.outputs if o.same_as_state is None]
            + [f"dlv{i}" for i in range(len(program.varying))]
            + [f"dlc{i}" for i in range(len(program.constant))]
            + [f"dprod{g}" for g in range(len(program.groups))]
            + [f"dinit{s}" for s in range(len(program.states))]
        ),
    )  # fmt: skip


class _Writer:
    """Expressions and loads of the program's values (shared by the two kernels)."""

    def __init__(self, program: StepProgram) -> None:
        self.program = program
        sizes = {n.size for n in program.nodes} | {s.size for s in program.states} | {o.size for o in program.outputs}
        sizes |= {g.inner for g in program.groups} | {g.outer for g in program.groups}
        self.sizes = sorted(s for s in sizes if s > 1)

    # ---- offsets and masks
    @staticmethod
    def columns(size: int) -> str:
        return f"o_c{size}"

    def mask(self, size: int) -> str:
        """The mask of a ``[BB, P]`` tile of ``size`` values per row (rows past N and lanes past size off)."""
        return "m_r[:, None]" if size == 1 else f"(m_r[:, None] & m_c{size}[None, :])"

    def element(self, base: str, row_time: str, size: int, offset: int = 0, stride: int | None = None) -> str:
        """A ``[BB, P]`` pointer block into a ``[*, N, stride]`` buffer at rows ``row_time``."""
        stride = size if stride is None else stride
        column = "" if size == 1 else f" + {self.columns(size)}[None, :]"
        shift = f" + {offset}" if offset else ""
        return f"{base} + ({row_time}) * {stride}{shift}{column}"

    def setup(self, buffer: IndentedBuffer) -> None:
        buffer.line("i_b = tl.program_id(0)")
        buffer.line("o_r = i_b * BB + tl.arange(0, BB)")
        buffer.line("m_r = o_r < N")
        buffer.line("o_n = o_r.to(tl.int64)[:, None]  # row offsets in 64 bits: T * N * size may pass 2^31")
        buffer.line("o_k = tl.arange(0, BK)")
        for size in self.sizes:
            buffer.line(f"o_c{size} = tl.arange(0, {padded(size)})")
            buffer.line(f"m_c{size} = o_c{size} < {size}")

    def load_constants(self, buffer: IndentedBuffer) -> None:
        for node in self.program.nodes:
            if node.kind is NodeKind.CONSTANT:
                if node.size == 1:
                    buffer.line(f"b_{node.index} = tl.load(lc{node.slot} + tl.zeros([1, 1], tl.int32)).to(ACC)")
                else:
                    c = self.columns(node.size)
                    buffer.line(f"b_{node.index} = tl.load(lc{node.slot} + {c}[None, :], mask=m_c{node.size}[None, :], other=0.0).to(ACC)")

    def load_varying(self, buffer: IndentedBuffer) -> None:
        for node in self.program.nodes:
            if node.kind is NodeKind.VARYING:
                pointer = self.element(f"lv{node.slot}", "t * N + o_n", node.size)
                buffer.line(f"b_{node.index} = tl.load({pointer}, mask={self.mask(node.size)}, other=0.0).to(ACC)")

    def value(self, index: int) -> str:
        node = self.program.nodes[index]
        if node.kind is NodeKind.LITERAL:
            assert node.value is not None
            return _literal(node.value)
        if node.kind is NodeKind.STATE:
            return f"b_h{node.slot}"
        return f"b_{index}"

    def full(self, index: int, size: int) -> str:
        """Node ``index``'s value as a ``[BB, P(size)]`` tile of the accumulator type."""
        return f"(tl.zeros([BB, {padded(size)}], ACC) + {self.value(index)}).to(ACC)"

    def operands(self, node: Node) -> list[str]:
        """The operands' expressions; a number's made a tensor like the other operand's for ``pow``
        (whose helper calls ``tl.floor``, ``tl.abs`` on it, which take tensors)."""
        values = [self.value(a) for a in node.args]
        if node.op == "pow":
            kinds = [self.program.nodes[a].kind for a in node.args]
            for i, kind in enumerate(kinds):
                if kind is NodeKind.LITERAL:
                    values[i] = f"(tl.zeros_like({values[1 - i]}) + {values[i]})"
        return values

    def elementwise(self, buffer: IndentedBuffer, node: Node) -> None:
        assert node.op is not None
        text = _forward_template(node.op).format(*self.operands(node))
        buffer.line(f"b_{node.index} = {text}")

    def product_tiles(self, buffer: IndentedBuffer, group_index: int, left: str, weights: str, stride_time: str) -> None:
        """``b_<product> = left @ W[:, offset:offset + size]`` for each product node of the group, in chunks of BK."""
        program = self.program
        group = program.groups[group_index]
        products = [n for n in program.nodes if n.kind is NodeKind.PRODUCT and n.slot == group_index]
        for node in products:  # one product at a time: one weight tile live, whatever the group's width
            buffer.line(f"b_{node.index} = tl.zeros([BB, {padded(node.size)}], ACC)")
            buffer.line(f"for k0 in range(0, {group.inner}, BK):")
            with buffer.indent():
                buffer.line("o_kk = k0 + o_k")
                buffer.line("m_kk = o_kk < " + str(group.inner))
                buffer.line(f"b_a = tl.load({left} + ({stride_time} + o_n) * {group.inner} + o_kk[None, :], mask=m_r[:, None] & m_kk[None, :], other=0.0).to(ACC)")
                columns = "0" if node.size == 1 else f"o_c{node.size}[None, :]"
                column_mask = "" if node.size == 1 else f" & m_c{node.size}[None, :]"
                width = padded(node.size)
                tile = f"tl.load({weights} + o_kk[:, None] * {group.outer} + {node.offset} + {columns}, mask=m_kk[:, None]{column_mask}, other=0.0).to(ACC)"
                if width == 1:
                    # a scalar product: a row reduction (tl.dot needs 16 columns)
                    buffer.line(f"b_{node.index} += tl.sum(b_a * tl.trans({tile}), axis=1)[:, None]")
                else:
                    buffer.line(f"b_{node.index} += tl.dot(b_a, {tile}, input_precision=PRECISION)")


def _signature(names: tuple[str, ...]) -> str:
    return ", ".join(names) + ", T, N, BB: tl.constexpr, BK: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr"


def _forward(program: StepProgram, writer: _Writer, buffer: IndentedBuffer, names: tuple[str, ...]) -> None:
    buffer.line("@triton.jit")
    buffer.line(f"def fused_forward({_signature(names)}, SAVE: tl.constexpr):")
    with buffer.indent():
        writer.setup(buffer)
        writer.load_constants(buffer)
        for s, state in enumerate(program.states):
            pointer = writer.element(f"init{s}", "o_n", state.size)
            buffer.line(f"b_h{s} = tl.load({pointer}, mask={writer.mask(state.size)}, other=0.0).to(ACC)  # state {state.name}")
        buffer.line("for t in range(T):")
        with buffer.indent():
            writer.load_varying(buffer)
            for step in program.order:
                if step.node is not None:
                    writer.elementwise(buffer, program.nodes[step.node])
                    continue
                group = program.groups[step.group]
                left = program.nodes[group.left]
                buffer.line(f"# matmul group {step.group}: [{group.inner}] @ [{group.inner}, {group.outer}] (weights of {len(group.weights)} products)")
                buffer.line(f"tl.store({writer.element(f'left{step.group}', 't * N * SAVE + o_n', group.inner)}, {writer.full(left.index, group.inner)}, mask={writer.mask(group.inner)})")
                buffer.line("tl.debug_barrier()  # the left operand, written by every thread, read back in chunks")
                writer.product_tiles(buffer, step.group, f"left{step.group}", f"w{step.group}", "t * N * SAVE")
                buffer.line("tl.debug_barrier()  # read before the next step overwrites it")
                buffer.line("if SAVE:")
                with buffer.indent():
                    for node in program.nodes:
                        if node.kind is NodeKind.PRODUCT and node.slot == step.group:
                            pointer = writer.element(f"prod{step.group}", "t * N + o_n", node.size, node.offset, group.outer)
                            buffer.line(f"tl.store({pointer}, b_{node.index}, mask={writer.mask(node.size)})")
            for s, state in enumerate(program.states):
                buffer.line(f"b_n{s} = {writer.full(state.new, state.size)}")
            for s, state in enumerate(program.states):
                buffer.line(f"b_h{s} = b_n{s}")
                buffer.line(f"tl.store({writer.element(f'seq{s}', 't * N + o_n', state.size)}, b_h{s}, mask={writer.mask(state.size)})")
            for o in program.outputs:
                if o.same_as_state is None:
                    value = writer.full(o.node, o.size)
                    buffer.line(f"tl.store({writer.element(f'out{o.index}', 't * N + o_n', o.size)}, {value}, mask={writer.mask(o.size)})")


class _Adjoints:
    """The adjoint variables written so far in one step of the backward kernel."""

    def __init__(self, program: StepProgram, writer: _Writer, buffer: IndentedBuffer) -> None:
        self.program = program
        self.writer = writer
        self.buffer = buffer
        self.present: set[int] = set()
        self.constants: set[int] = set()  # constant slots with a loop-carried accumulator

    def receives(self, index: int) -> bool:
        node = self.program.nodes[index]
        return node.kind is not NodeKind.LITERAL and not node.boolean

    def add(self, index: int, share: str, consumer_size: int) -> None:
        """``d_<index> += share``, ``share`` a tile of a consumer of ``consumer_size`` values per row."""
        node = self.program.nodes[index]
        if not self.receives(index):
            return
        if node.kind is NodeKind.CONSTANT:
            masked = f"tl.where({self.writer.mask(consumer_size)}, {share}, 0.0)"
            if node.size == 1 and consumer_size > 1:
                masked = f"tl.sum({masked}, axis=1)[:, None]"
            self.buffer.line(f"d_c{node.slot} += tl.sum({masked}, axis=0)[None, :]")
            return
        if node.size == 1 and consumer_size > 1:
            share = f"tl.sum(tl.where(m_c{consumer_size}[None, :], {share}, 0.0), axis=1)[:, None]"
        name = self.name(index)
        if index in self.present:
            self.buffer.line(f"{name} = {name} + {share}")
        else:
            self.buffer.line(f"{name} = tl.zeros([BB, {padded(node.size)}], ACC) + {share}")
            self.present.add(index)

    def name(self, index: int) -> str:
        node = self.program.nodes[index]
        if node.kind is NodeKind.STATE:
            return f"d_h{node.slot}"
        return f"d_{index}"


def _backward(program: StepProgram, writer: _Writer, buffer: IndentedBuffer, names: tuple[str, ...]) -> None:
    buffer.line("@triton.jit")
    buffer.line(f"def fused_backward({_signature(names)}):")
    with buffer.indent():
        writer.setup(buffer)
        writer.load_constants(buffer)
        constant_slots = sorted({n.slot for n in program.nodes if n.kind is NodeKind.CONSTANT and not n.boolean})
        for slot in constant_slots:
            size = program.constant[slot].size
            buffer.line(f"d_c{slot} = tl.zeros([1, {padded(size)}], ACC)")
        for s, state in enumerate(program.states):
            buffer.line(f"b_g{s} = tl.zeros([BB, {padded(state.size)}], ACC)  # the adjoint of state {state.name} from the step after")
        buffer.line("for i in range(T):")
        with buffer.indent():
            buffer.line("t = T - 1 - i")
            buffer.line("if t > 0:  # the states before the step")
            for branch, (base, rows) in enumerate((("seq", "(t - 1) * N + o_n"), ("init", "o_n"))):
                if branch:
                    buffer.line("else:")
                with buffer.indent():
                    for s, state in enumerate(program.states):
                        pointer = writer.element(f"{base}{s}", rows, state.size)
                        buffer.line(f"b_h{s} = tl.load({pointer}, mask={writer.mask(state.size)}, other=0.0).to(ACC)")
            writer.load_varying(buffer)
            buffer.line("# the step's values, recomputed from the saved matmul results")
            for step in program.order:
                if step.node is not None:
                    writer.elementwise(buffer, program.nodes[step.node])
                    continue
                group = program.groups[step.group]
                for node in program.nodes:
                    if node.kind is NodeKind.PRODUCT and node.slot == step.group:
                        pointer = writer.element(f"prod{step.group}", "t * N + o_n", node.size, node.offset, group.outer)
                        buffer.line(f"b_{node.index} = tl.load({pointer}, mask={writer.mask(node.size)}, other=0.0).to(ACC)")
            adjoints = _Adjoints(program, writer, buffer)
            buffer.line("# adjoints arriving at this step: the outputs', and the next step's reading of the states")
            for s, state in enumerate(program.states):
                arriving = writer.element(f"dseq{s}", "t * N + o_n", state.size)
                buffer.line(f"b_e{s} = b_g{s} + tl.load({arriving}, mask={writer.mask(state.size)}, other=0.0).to(ACC)")
                adjoints.add(state.new, f"b_e{s}", state.size)
            for o in program.outputs:
                if o.same_as_state is None:
                    arriving = writer.element(f"dout{o.index}", "t * N + o_n", o.size)
                    adjoints.add(o.node, f"tl.load({arriving}, mask={writer.mask(o.size)}, other=0.0).to(ACC)", o.size)
            buffer.line("# reverse sweep")
            for step in reversed(program.order):
                if step.node is not None:
                    node = program.nodes[step.node]
                    if node.index not in adjoints.present or node.boolean:
                        continue
                    assert node.op is not None
                    values = writer.operands(node)
                    for arg, formula in zip(node.args, adjoint_formulas(node.op)):
                        if formula is None or not adjoints.receives(arg):
                            continue
                        share = formula.format(*values, g=f"d_{node.index}", r=f"b_{node.index}")
                        adjoints.add(arg, f"({share})", node.size)
                    continue
                group = program.groups[step.group]
                buffer.line(f"# matmul group {step.group}: the products' adjoints, then pushed back through the transposed weights")
                for node in program.nodes:
                    if node.kind is NodeKind.PRODUCT and node.slot == step.group and node.index in adjoints.present:
                        pointer = writer.element(f"dprod{step.group}", "t * N + o_n", node.size, node.offset, group.outer)
                        buffer.line(f"tl.store({pointer}, d_{node.index}, mask={writer.mask(node.size)})")
                buffer.line("tl.debug_barrier()")
                inner = group.inner
                buffer.line(f"b_dl = tl.zeros([BB, {padded(inner)}], ACC)")
                buffer.line(f"for k0 in range(0, {group.outer}, BK):")
                with buffer.indent():
                    buffer.line("o_kk = k0 + o_k")
                    buffer.line(f"m_kk = o_kk < {group.outer}")
                    buffer.line(f"b_a = tl.load(dprod{step.group} + (t * N + o_n) * {group.outer} + o_kk[None, :], mask=m_r[:, None] & m_kk[None, :], other=0.0).to(ACC)")
                    columns = "0" if inner == 1 else f"o_c{inner}[None, :]"
                    column_mask = "" if inner == 1 else f" & m_c{inner}[None, :]"
                    tile = f"tl.load(wt{step.group} + o_kk[:, None] * {inner} + {columns}, mask=m_kk[:, None]{column_mask}, other=0.0).to(ACC)"
                    if inner == 1:
                        buffer.line(f"b_dl += tl.sum(b_a * tl.trans({tile}), axis=1)[:, None]")
                    else:
                        buffer.line(f"b_dl += tl.dot(b_a, {tile}, input_precision=PRECISION)")
                buffer.line("tl.debug_barrier()")
                adjoints.add(group.left, "b_dl", inner)
            for node in program.nodes:
                if node.kind is NodeKind.VARYING and node.index in adjoints.present:
                    pointer = writer.element(f"dlv{node.slot}", "t * N + o_n", node.size)
                    buffer.line(f"tl.store({pointer}, d_{node.index}, mask={writer.mask(node.size)})")
            for s, state in enumerate(program.states):
                prev = state.prev
                buffer.line(f"b_g{s} = {'d_h' + str(s) if prev in adjoints.present else f'tl.zeros([BB, {padded(state.size)}], ACC)'}")
        for s, state in enumerate(program.states):
            buffer.line(f"tl.store({writer.element(f'dinit{s}', 'o_n', state.size)}, b_g{s}, mask={writer.mask(state.size)})")
        for slot in constant_slots:
            size = program.constant[slot].size
            if size == 1:
                buffer.line(f"tl.store(dlc{slot} + i_b + tl.zeros([1, 1], tl.int32), d_c{slot})")
            else:
                buffer.line(f"tl.store(dlc{slot} + i_b * {size} + o_c{size}[None, :], d_c{slot}, mask=m_c{size}[None, :])")


def generate(program: StepProgram, cell_name: str) -> str:
    """The Triton module (source text) of ``program``'s forward and backward kernels."""
    for node in program.nodes:
        if node.op is not None and OPS[node.op].derivative is None:
            raise Unsupported(f"'{node.op}' has no adjoint in the fused Triton kernel")
        if node.op is not None:
            _forward_template(node.op)
    names = arguments(program)
    writer = _Writer(program)
    buffer = IndentedBuffer()
    buffer.line(f'"""The fused sequential kernels of cell {cell_name}, generated by recdsl (recdsl/backends/triton_fused_codegen.py)."""')
    buffer.line("import triton")
    buffer.line("import triton.language as tl")
    buffer.line()
    for line in program.describe().splitlines():
        buffer.line(f"# {line}")
    for line in _HELPERS.strip("\n").splitlines():
        buffer.line(line)
    buffer.line()
    buffer.line()
    _forward(program, writer, buffer, names.forward)
    buffer.line()
    buffer.line()
    _backward(program, writer, buffer, names.backward)
    return buffer.text()
