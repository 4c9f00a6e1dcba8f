"""Triton source generated from the checked IR: scan kernels with the gate math fused in.

Nothing here imports triton: this module only writes text.  For each recurrence the
Triton backend runs, it emits

- ``combine_<state>``: the scan's associative operation, handed to ``tl.associative_scan``
  with a tuple carry (affine pairs, complex affine quadruples, semiring pairs, or a declared
  monoid's carries);
- ``forward_<state>``: one program per (batch row, block of state elements) walks the
  sequence in blocks of ``BT`` steps, loads the *leaves* (values torch computes first:
  inputs, params, projections), evaluates the elementwise gate math (sigmoid, exp,
  softplus, ...) in registers, scans the block and carries the last state into the next;
- ``backward_<state>`` for affine and semiring recurrences: the adjoint's recurrence
  ``g_t = dy_t + w_{t+1} g_{t+1}``, run as a forward scan over reversed time, with the
  gates recomputed from the leaves rather than stored, then the chain rule through the gate
  math (each op's derivative rule from its registry row, :data:`recdsl.ops.DERIVATIVES`)
  down to one gradient per leaf and ``dL/dh_0``: torch only carries the leaves' gradients
  on through whatever computed them (a matmul, a view);
- ``backward_<scan>`` for declared monoids, from :mod:`.triton_monoid`: the adjoint
  recurrence ``g_t = dy_t + (d y_{t+1} / d y_t)^T g_{t+1}`` with the combine's Jacobian
  derived by the same registry rules and scanned as matrix-affine pairs;
- the same scans with T split across programs (:class:`TimeSplit`), for calls with too few
  rows to fill the GPU: ``summarize_<state>`` folds each chunk of T, ``carries_<state>``
  passes the folds along the chunks, ``forward_<state>_chunks`` rescans each chunk from its
  carry (and ``summarize_backward_``, ``carries_backward_``, ``backward_<state>_chunks``).

States and gradients are addressed as ``[N, T, C]``: ``N`` rows (batch times heads), ``T``
steps and ``C`` state elements; leaves are read in place as ``[B, H, T, C]``, each with its
four strides (0 where it broadcasts), so that torch need not copy them into one layout.
Names follow flash-linear-attention's kernels: ``i_`` program ids, ``o_`` offsets, ``m_``
masks, ``p_`` pointers, ``b_`` block values, ``BT``/``BC`` block sizes.  The source line
each part came from is written above it as a comment.
"""

from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Iterator, Union

from recdsl import ir
from recdsl.errors import Source
from recdsl.ir import Kind, Literal, Op, Ref
from recdsl.ops import FUSED, MAX_PLUS, OPS, Semiring, Term, TermLeaf
from recdsl.printer import format_expr
from recdsl.shapes import fold_constant

if TYPE_CHECKING:
    from .triton_monoid import MonoidAdjoint

# ---- readable output -------------------------------------------------------------------


class IndentedBuffer:
    """Lines of code with an indentation level (as in PyTorch Inductor's ``IndentedBuffer``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.level = 0

    def line(self, text: str = "") -> None:
        self.lines.append(("    " * self.level + text) if text else "")

    @contextmanager
    def indent(self) -> Iterator[None]:
        self.level += 1
        try:
            yield
        finally:
            self.level -= 1

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


# ---- elementwise expressions ---------------------------------------------------------------


class Unsupported(Exception):
    """The Triton backend has no form for this expression; the message says why, in words."""


@dataclass(frozen=True)
class Leaf:
    """A value torch computes before the kernel runs; the kernel loads it as ``[B, H, T, C]``."""

    expr: ir.Expr
    name: str  # the kernel argument's stem: p_<name>, s_<name>_n, ...

    @property
    def is_complex(self) -> bool:
        return self.expr.type.kind is Kind.COMPLEX


RealValue = str
ComplexValue = tuple[str, str]
Value = Union[RealValue, ComplexValue]

# Ops evaluated inside the kernel (those whose registry row has a Triton form); everything
# else (matmul, reductions, outer, index of a non-broadcasting kind, refs) is a leaf.
FUSED_OPS = FUSED
# Of those, the ones with a complex form in ExpressionEmitter._complex.
COMPLEX_OPS = frozenset(name for name in FUSED if OPS[name].triton_complex)


# The text of an expression of number literals only (no temporaries, no leaves).
_CONSTANT_TEXT = re.compile(r"[0-9.eE+\-*/() ]+")


def _literal(value: float) -> str:
    if value == float("inf"):
        return 'float("inf")'
    if value == float("-inf"):
        return 'float("-inf")'
    return repr(float(value))


class ExpressionEmitter:
    """Writes Triton statements computing IR expressions from leaves, one temporary per node."""

    def __init__(self, buffer: IndentedBuffer, leaf_values: dict[ir.Expr, Value], prefix: str = "b_") -> None:
        self.buffer = buffer
        self.leaf_values = leaf_values  # leaf expr (structural: equal leaves are one) -> the name(s) its loaded block has
        self.memo: dict[ir.Expr, Value] = {}  # structural: equal subexpressions are computed once
        self.counter = 0
        self.prefix = prefix  # distinct per emission, so two evaluations of one term do not clash

    def _temp(self, text: str) -> str:
        if _CONSTANT_TEXT.fullmatch(text):
            # Arithmetic of literals stays inline, evaluated in Python's doubles: assigned to a
            # temporary it would be a float32 scalar in Triton (0.0 + 0.3, the imaginary part of
            # a real value plus 0.3j, rounded before it meets a float64 block).
            return f"({text})"
        name = f"{self.prefix}{self.counter}"
        self.counter += 1
        self.buffer.line(f"{name} = {text}")
        return name

    def emit(self, expr: ir.Expr) -> Value:
        if expr in self.leaf_values:
            return self.leaf_values[expr]
        if expr in self.memo:
            return self.memo[expr]
        value = self._emit(expr)
        self.memo[expr] = value
        return value

    def _emit(self, expr: ir.Expr) -> Value:
        if isinstance(expr, Literal):
            if isinstance(expr.value, complex):
                return (_literal(expr.value.real), _literal(expr.value.imag))
            return _literal(expr.value)
        if not isinstance(expr, Op) or expr.op not in FUSED_OPS:
            raise Unsupported(f"'{format_expr(expr)}' is not a leaf the kernel was given")  # pragma: no cover
        constant = fold_constant(expr)
        if isinstance(constant, (int, float)) and not isinstance(constant, bool):
            # Folded here: a temporary holding a Python float is a float32 scalar in Triton,
            # which would round -0.4 (and 1 - 0.3) before it meets a float64 block.
            return _literal(constant)
        args = [self.emit(a) for a in expr.args]
        if expr.type.kind is Kind.COMPLEX or any(isinstance(a, tuple) for a in args):
            return self._complex(expr, args)
        return self._real(expr.op, args, expr)

    def _real(self, op: str, args: list[Value], expr: ir.Expr) -> str:
        if op == "pow" and isinstance(expr.args[1], Literal) and expr.args[1].value in (2, 0.5):
            # Exact forms of the common powers; the registry's general form goes through logs.
            return self._temp(f"{args[0]} * {args[0]}" if expr.args[1].value == 2 else f"tl.sqrt({args[0]})")
        template = OPS[op].triton
        if template is None:  # pragma: no cover - find_leaves makes every non-fused op a leaf
            raise Unsupported(f"no Triton form of '{op}'")
        return self._temp(template.format(*args))

    def _complex(self, expr: Op, args: list[Value]) -> Value:
        op = expr.op
        if op not in COMPLEX_OPS:
            raise Unsupported(f"'{op}' of a complex value has no Triton form here (supported: {', '.join(sorted(COMPLEX_OPS))})")
        parts = [a if isinstance(a, tuple) else (a, "0.0") for a in args]
        if op in ("add", "sub"):
            (ar, ai), (br, bi) = parts
            sign = "+" if op == "add" else "-"
            return self._temp(f"{ar} {sign} {br}"), self._temp(f"{ai} {sign} {bi}")
        if op == "neg":
            (ar, ai), = parts
            return self._temp(f"-{ar}"), self._temp(f"-{ai}")
        if op == "conj":
            (ar, ai), = parts
            return ar, self._temp(f"-{ai}")
        if op == "real":
            return parts[0][0]
        if op == "imag":
            return parts[0][1]
        if op == "abs":
            (ar, ai), = parts
            return self._temp(f"tl.sqrt({ar} * {ar} + {ai} * {ai})")
        if op == "exp":  # e^(x + iy) = e^x (cos y + i sin y)
            (ar, ai), = parts
            magnitude = self._temp(f"tl.exp({ar})")
            return self._temp(f"{magnitude} * tl.cos({ai})"), self._temp(f"{magnitude} * tl.sin({ai})")
        if op == "mul":
            if not isinstance(args[0], tuple) or not isinstance(args[1], tuple):
                scale, (zr, zi) = (args[0], parts[1]) if not isinstance(args[0], tuple) else (args[1], parts[0])
                return self._temp(f"{scale} * {zr}"), self._temp(f"{scale} * {zi}")
            (ar, ai), (br, bi) = parts
            return self._temp(f"{ar} * {br} - {ai} * {bi}"), self._temp(f"{ar} * {bi} + {ai} * {br}")
        # div
        (ar, ai), (br, bi) = parts
        if not isinstance(args[1], tuple):
            return self._temp(f"{ar} / {br}"), self._temp(f"{ai} / {br}")
        norm = self._temp(f"{br} * {br} + {bi} * {bi}")
        return self._temp(f"({ar} * {br} + {ai} * {bi}) / {norm}"), self._temp(f"({ai} * {br} - {ar} * {bi}) / {norm}")


def find_leaves(exprs: list[ir.Expr]) -> list[ir.Expr]:
    """The subexpressions torch must compute before the kernel: refs and non-elementwise ops.

    Inline time-parallel bindings first (:func:`inline_parallel_bindings`) so that their
    elementwise math is fused too: minGRU's ``z = sigmoid(x @ W_z + b_z)`` then leaves only
    ``x @ W_z`` and ``b_z`` to torch.
    """
    leaves: dict[ir.Expr, ir.Expr] = {}  # by structure: the same value written twice is one leaf

    def visit(expr: ir.Expr) -> None:
        if isinstance(expr, Literal):
            return
        if isinstance(expr, Op) and expr.op in FUSED_OPS:
            for arg in expr.args:
                visit(arg)
            return
        leaves.setdefault(expr, expr)

    for expr in exprs:
        visit(expr)
    return list(leaves.values())


def inline_parallel_bindings(expr: ir.Expr, cell: ir.CellIR, time_parallel: frozenset[str]) -> ir.Expr:
    """``expr`` with references to time-parallel bindings replaced by their definitions."""
    definitions = {s.name: s.value for s in cell.body if isinstance(s, ir.Assign) and s.name in time_parallel}
    cache: dict[str, ir.Expr] = {}

    def go(node: ir.Expr) -> ir.Expr:
        if isinstance(node, Ref) and node.kind is ir.RefKind.BINDING and node.name in definitions:
            if node.name not in cache:
                cache[node.name] = go(definitions[node.name])
            return cache[node.name]
        if isinstance(node, Op):
            args = tuple(go(a) for a in node.args)
            if node.op == "index" and all(item == ir.NEW_AXIS or item == ir.SliceItem(None, None) for item in node.attrs):
                pushed = _push_broadcast_index(node, args[0])
                if pushed is not None:
                    return pushed
            return node if args == node.args else Op(node.op, args, node.type, node.attrs)
        return node

    return go(expr)


def _push_broadcast_index(node: Op, inner: ir.Expr) -> ir.Expr | None:
    """``f(a, b)[:, None]`` as ``f(a[:, None], b[:, None])`` for elementwise ``f``, so that the
    elementwise math stays fused and only the leaves are indexed."""
    if not (isinstance(inner, Op) and inner.op in FUSED_OPS and inner.op not in ("real", "imag", "abs")):
        return None
    new_args = []
    for arg in inner.args:
        if arg.type.rank == 0:
            new_args.append(arg)
        elif arg.type.shape == inner.type.shape:
            indexed = Op("index", (arg,), ir.Type(node.type.shape, arg.type.kind), node.attrs)
            new_args.append(_push_broadcast_index(indexed, arg) or indexed)
        else:
            return None
    return Op(inner.op, tuple(new_args), ir.Type(node.type.shape, inner.type.kind), inner.attrs)


# ---- kernels -------------------------------------------------------------------------------


class SplitMode(Enum):
    """Which part of a scan one generated kernel computes (see :class:`TimeSplit`)."""

    WHOLE = "whole"  # one program per (row, block of state elements) walks all of T
    SUMMARY = "summary"  # pass 1: one program per (row, block, chunk of T) folds its chunk from the identity
    CHUNK = "chunk"  # pass 3: one program per (row, block, chunk of T) rescans its chunk from the carry into it
    LOOK_BACK = "look-back"  # one pass: one program per (row, block, block of BT steps), its carry by a look-back


class SplitPasses(Enum):
    """How a scan runs, forward and backward, when a call splits T across programs (see :class:`TimeSplit`)."""

    THREE_PASSES = "three passes"  # fold each chunk, carry across chunks, rescan each chunk: the inputs read twice
    LOOK_BACK = "look-back"  # one pass: each block of steps scanned once, its carry from earlier blocks' published folds


@dataclass(frozen=True)
class TimeSplit:
    """When a scan kernel splits T across programs, decided at plan time and applied per call.

    The single-pass kernels launch one program per (row, block of ``BC`` state elements):
    at ``B = 8, d = 1024`` that is 128 programs, one per SM of an H100/H200, each walking all
    of T with nothing in flight to hide its loads' latency.  When a call has fewer
    programs than ``target_programs``, T is cut into chunks of at least
    ``min_chunk_steps`` steps (a multiple of the block of steps past one block) and the
    scan runs in three launches: ``summarize_*`` (per chunk, the fold of its elements),
    ``carries_*`` (per row block, a short sequential pass over the chunk folds giving the
    carry into each chunk) and ``*_chunks`` (per chunk, the scan again from that carry,
    writing the outputs).  ``target_programs = 0`` never splits.  An affine scan
    (:attr:`ScanSpec.split_passes`) splits in one launch instead, forward and backward,
    over blocks of ``BT`` steps with a look-back (:func:`emit_look_back`).
    """

    target_programs: int = 4 * 132  # about four programs per SM of an H100/H200
    min_chunk_steps: int = 128

    def chunk_steps(self, programs: int, steps: int, block: int) -> int | None:
        """The steps per chunk for a call of ``programs`` single-pass programs over ``steps`` steps, or None: one pass."""
        if programs >= self.target_programs or steps <= 1:
            return None
        wanted = -(-self.target_programs // programs)  # chunks per row block to reach the target
        length = max(self.min_chunk_steps, -(-steps // wanted), 1)
        if length > block:
            length = -(-length // block) * block  # whole blocks, so only the last block of the last chunk is ragged
        return length if length < steps else None

    def describe(self) -> str:
        if self.target_programs == 0:
            return "T is never split across programs"
        return (
            f"T split across programs when a call has fewer than {self.target_programs} (one per row and block of state elements): "
            f"affine scans in one pass over blocks of steps with a look-back, others in chunks of at least {self.min_chunk_steps} steps folded, carried, rescanned"
        )


class ScanKind(Enum):
    AFFINE = "affine"  # h = a * h + b
    SEMIRING = "semiring"  # h = plus(h + a, b)
    MONOID = "monoid"  # a declared monoid's carries


@dataclass(frozen=True)
class ScanSpec:
    """What one generated kernel computes.

    ``kind``: affine, semiring (``semiring`` says which) or a declared monoid.  ``terms`` are the elementwise expressions
    the kernel evaluates per step (decay and input; or one lift per carry), ``leaves`` what
    it loads.
    """

    name: str  # the state (or scan) this kernel solves
    kind: ScanKind
    is_complex: bool
    terms: tuple[ir.Expr | None, ...]
    leaves: tuple[Leaf, ...]
    comment: tuple[str, ...]
    semiring: Semiring | None = None
    monoid: ir.MonoidIR | None = None
    identities: tuple[float, ...] = ()  # a monoid's identity, one number per carry
    split: TimeSplit = TimeSplit()  # when the launch splits T across programs (the source has both forms)
    # A monoid whose backward is the generated kernel (.triton_monoid): its adjoint's structure; None: torch's scan is differentiated.
    adjoint: "MonoidAdjoint | None" = None

    @property
    def split_passes(self) -> SplitPasses:
        """Affine scans (real or complex) split T in one pass with a look-back, forward and
        backward (:func:`emit_look_back`, :func:`emit_gradient_backward`); semirings and
        monoids in three passes."""
        return SplitPasses.LOOK_BACK if self.kind is ScanKind.AFFINE else SplitPasses.THREE_PASSES

    def leaves_of(self, positions: tuple[int, ...]) -> tuple[Leaf, ...]:
        """The leaves the terms at ``positions`` read, in the spec's order."""
        needed = {node for i in positions if self.terms[i] is not None for node in ir.walk(self.terms[i])}  # type: ignore[arg-type]
        return tuple(leaf for leaf in self.leaves if leaf.expr in needed)

_PRELUDE = '''import triton
import triton.language as tl


@triton.jit
def _maximum(a, b):
    # max(a, b), NaN if either is (torch.maximum's rule; tl.maximum alone would drop a NaN, as fmax does).
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _logaddexp(a, b):
    # log(e^a + e^b) without overflow, and -inf when both are -inf.
    m = tl.maximum(a, b)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    return m_safe + tl.log(tl.exp(a - m_safe) + tl.exp(b - m_safe))
'''


def _leaf_args(spec: ScanSpec) -> list[str]:
    args = []
    for leaf in spec.leaves:
        parts = ("re", "im") if leaf.is_complex else ("v",)
        for part in parts:
            args.append(f"p_{leaf.name}_{part}")
        args.extend([f"s_{leaf.name}_b", f"s_{leaf.name}_h", f"s_{leaf.name}_t", f"s_{leaf.name}_c"])
    return args


def _emit_loads(buffer: IndentedBuffer, spec: ScanSpec, offsets_t: str, mask: str, suffix: str = "") -> dict[ir.Expr, Value]:
    values: dict[ir.Expr, Value] = {}
    for leaf in spec.leaves:
        buffer.line(f"# {format_expr(leaf.expr)}")
        offset = f"{offsets_t}[:, None] * s_{leaf.name}_t + o_c[None, :] * s_{leaf.name}_c"
        if leaf.is_complex:
            re = f"b_{leaf.name}{suffix}_re"
            im = f"b_{leaf.name}{suffix}_im"
            buffer.line(f"{re} = tl.load(p_{leaf.name}_re + {offset}, mask={mask}, other=0.0).to(ACC)")
            buffer.line(f"{im} = tl.load(p_{leaf.name}_im + {offset}, mask={mask}, other=0.0).to(ACC)")
            values[leaf.expr] = (re, im)
        else:
            name = f"b_{leaf.name}{suffix}"
            buffer.line(f"{name} = tl.load(p_{leaf.name}_v + {offset}, mask={mask}, other=0.0).to(ACC)")
            values[leaf.expr] = name
    return values


def _carry_names(spec: ScanSpec) -> list[str]:
    if spec.kind is ScanKind.MONOID:
        assert spec.monoid is not None
        return [c.name for c in spec.monoid.carries]
    return ["a_re", "a_im", "b_re", "b_im"] if spec.is_complex else ["a", "b"]


def _emit_combine(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    names = _carry_names(spec)
    left = [f"{n}_1" for n in names]
    right = [f"{n}_2" for n in names]
    buffer.line("@triton.jit")
    buffer.line(f"def combine_{spec.name}({', '.join(left + right)}):")
    with buffer.indent():
        if spec.kind is ScanKind.AFFINE and not spec.is_complex:
            buffer.line("# (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2)")
            buffer.line("return a_1 * a_2, a_2 * b_1 + b_2")
        elif spec.kind is ScanKind.AFFINE:
            buffer.line("# the affine pair over complex numbers, as (re, im) parts")
            buffer.line("a_re = a_re_1 * a_re_2 - a_im_1 * a_im_2")
            buffer.line("a_im = a_re_1 * a_im_2 + a_im_1 * a_re_2")
            buffer.line("b_re = a_re_2 * b_re_1 - a_im_2 * b_im_1 + b_re_2")
            buffer.line("b_im = a_re_2 * b_im_1 + a_im_2 * b_re_1 + b_im_2")
            buffer.line("return a_re, a_im, b_re, b_im")
        elif spec.kind is ScanKind.SEMIRING:
            plus = "_maximum" if spec.semiring is MAX_PLUS else "_logaddexp"
            buffer.line(f"# (a1, b1) o (a2, b2) = (a1 + a2, {plus.lstrip('_')}(b1 + a2, b2)) over the {spec.semiring.name} semiring")
            buffer.line(f"return a_1 + a_2, {plus}(b_1 + a_2, b_2)")
        else:
            assert spec.monoid is not None
            buffer.line(f"# combine of the declared monoid {spec.monoid.name}, with a = the earlier element")
            side_names = {}
            left, right = spec.monoid.operands
            for carry in spec.monoid.carries:
                side_names[(ir.RefKind.CARRY_LEFT, f"{left}.{carry.name}")] = f"{carry.name}_1"
                side_names[(ir.RefKind.CARRY_RIGHT, f"{right}.{carry.name}")] = f"{carry.name}_2"
            emitter = _CombineEmitter(buffer, side_names)
            for assign in spec.monoid.body:
                buffer.line(f"# {assign.name} = {format_expr(assign.value)}")
                emitter.locals[assign.name] = emitter.emit(assign.value)
            results = [emitter.locals[c.name] for c in spec.monoid.carries]
            buffer.line(f"return {', '.join(str(r) for r in results)}")
    buffer.line("")
    buffer.line("")


class _CombineEmitter(ExpressionEmitter):
    """Emits a monoid's combine: refs are the two operands' carries and earlier locals."""

    def __init__(self, buffer: IndentedBuffer, side_names: dict) -> None:
        super().__init__(buffer, {})
        self.side_names = side_names
        self.locals: dict[str, Value] = {}

    def _emit(self, expr: ir.Expr) -> Value:
        if isinstance(expr, Ref):
            if expr.kind is ir.RefKind.LOCAL:
                return self.locals[expr.name]
            return self.side_names[(expr.kind, expr.label)]
        return super()._emit(expr)


def _emit_terms(buffer: IndentedBuffer, spec: ScanSpec, values: dict[ir.Expr, Value], prefix: str = "b_", only: tuple[int, ...] | None = None) -> list[Value]:
    """Statements computing the spec's terms (all, or those at positions ``only``)."""
    emitter = ExpressionEmitter(buffer, values, prefix)
    for line in spec.comment:
        buffer.line(f"# {line}")
    return [emitter.emit(term) if term is not None and (only is None or i in only) else None for i, term in enumerate(spec.terms)]  # type: ignore[misc]


def _emit_loads_for(buffer: IndentedBuffer, spec: ScanSpec, offsets_t: str, mask: str, suffix: str, only: tuple[int, ...]) -> dict[ir.Expr, Value]:
    """Loads of just the leaves that the terms at positions ``only`` read."""
    return _emit_loads(buffer, replace(spec, leaves=spec.leaves_of(only)), offsets_t, mask, suffix)


def emit_forward(buffer: IndentedBuffer, spec: ScanSpec, mode: SplitMode = SplitMode.WHOLE) -> None:
    """The forward kernel of ``spec``: fused terms, a blocked scan, the carry between blocks.

    ``mode``: the whole sequence per program (``forward_*``), or one chunk of T per program:
    its fold from the identity (``summarize_*``, pass 1 of :class:`TimeSplit`) or its scan
    from the carry into it, read from the ``carries_*`` pass's ``[N, n_chunks, C]`` output
    (``forward_*_chunks``, pass 3).
    """
    names = _carry_names(spec)
    outputs = ["p_out_re", "p_out_im"] if spec.is_complex else (["p_out"] if spec.kind is not ScanKind.MONOID else [f"p_out_{n}" for n in names])
    initial = ["p_init_re", "p_init_im"] if spec.is_complex else (["p_init"] if spec.kind is not ScanKind.MONOID else [f"p_init_{n}" for n in names])
    sums = [f"p_sum_{n}" for n in names]
    if mode is SplitMode.WHOLE:
        arguments = initial + outputs + _leaf_args(spec) + ["T", "C", "H", "n_blocks", "BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
        title = f"forward_{spec.name}"
    else:
        chunk_args = ["T", "C", "H", "L", "n_blocks", "n_chunks", "BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
        if mode is SplitMode.SUMMARY:
            arguments = sums + _leaf_args(spec) + chunk_args
            title = f"summarize_{spec.name}"
        else:
            arguments = initial + outputs + _leaf_args(spec) + chunk_args
            title = f"forward_{spec.name}_chunks"
    buffer.line("@triton.jit")
    buffer.line(f"def {title}({', '.join(arguments)}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        narrow = [outputs[i] for i in single_element_carries(spec)]  # [N, T, 1]: one copy of a carry the common shape broadcasts
        wide = [p for p in outputs if p not in narrow]
        if mode is SplitMode.WHOLE:
            _emit_row_pointers(buffer, spec, initial, wide)
        else:
            buffer.line("i_k = tl.program_id(2)  # the chunk of T: steps [i_k * L, min(T, (i_k + 1) * L))")
            _emit_row_pointers(buffer, spec, [], wide if mode is SplitMode.CHUNK else [])
        for pointer in narrow if mode is not SplitMode.SUMMARY else []:
            buffer.line(f"{pointer} += o_row * T  # [N, T, 1]: one element per step")
        if mode is not SplitMode.WHOLE:
            for pointer in initial if mode is SplitMode.CHUNK else sums:
                buffer.line(f"{pointer} += (o_row * n_chunks + i_k) * C  # [N, n_chunks, C]")
            buffer.line("t_end = tl.minimum(T, (i_k + 1) * L)")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        carries = [f"b_carry_{i}" for i in range(len(initial))]
        if mode is SplitMode.SUMMARY:
            totals = [f"b_sum_{i}" for i in range(len(names))]
            for total, identity in zip(totals, summary_identities(spec)):
                buffer.line(f"{total} = tl.full([BC], {_literal(identity)}, dtype=ACC)")
        else:
            # Whole: the initial state, in the states' layout; chunks: the carries pass's [N, n_chunks, C].
            buffer.line(f"o_init = {_in_state_layout(spec, 'o_c') if mode is SplitMode.WHOLE else 'o_c'}")
            for carry, pointer in zip(carries, initial):
                buffer.line(f"{carry} = tl.load({pointer} + o_init, mask=m_c, other=0.0).to(ACC)")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        if mode is SplitMode.WHOLE:
            buffer.line("for i_t in range(0, n_blocks):  # n_blocks = ceil(T / BT), from the host")
        else:
            buffer.line("for i_t in range(0, n_blocks):  # n_blocks = ceil(L / BT), from the host")
        with buffer.indent():
            if mode is SplitMode.WHOLE:
                buffer.line("o_t = i_t * BT + tl.arange(0, BT)")
                buffer.line("m = (o_t[:, None] < T) & m_c[None, :]")
            else:
                buffer.line("o_t = i_k * L + i_t * BT + tl.arange(0, BT)")
                buffer.line("m = (o_t[:, None] < t_end) & m_c[None, :]")
            values = _emit_loads(buffer, spec, "o_t", "m")
            terms = _emit_terms(buffer, spec, values)
            if mode is SplitMode.SUMMARY:
                _emit_fold(buffer, _emit_elements(buffer, spec, terms), f"combine_{spec.name}", totals)
            else:
                _emit_scan_and_store(buffer, spec, terms, carries, outputs)
        if mode is SplitMode.SUMMARY:
            for pointer, total in zip(sums, totals):
                buffer.line(f"tl.store({pointer} + o_c, {total}, mask=m_c)")
    buffer.line("")
    buffer.line("")


def emit_look_back(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    """The forward of an affine scan with T split across programs, in one pass (a chained
    scan with decoupled look-back, as GPU prefix sums do it).

    One program per (row, block of ``BC`` state elements, block of ``BT`` steps), taken in
    the order of a ticket counter (``p_ticket``, zero at launch): chunk by chunk, so a
    program waits only for programs that already hold a ticket and run.  Each loads its
    block once and scans it from the identity in registers; publishes the block's fold
    ``(A, B)`` (flag 1); walks back over earlier blocks, composing their folds until one
    has published the state at its end (flag 2); then writes its states from that carry
    and publishes its own end state (flag 2).  The block of t = 0 starts from the initial
    state.  Each input is read once and each state written once, plus two or three numbers
    per block and state element for the folds and end states (``[N, n_chunks, C]``;
    ``p_flags``: ``[N, n_c, n_chunks]``, zero at launch).
    """
    assert spec.kind is ScanKind.AFFINE
    names = _carry_names(spec)
    outputs = ["p_out_re", "p_out_im"] if spec.is_complex else ["p_out"]
    initial = ["p_init_re", "p_init_im"] if spec.is_complex else ["p_init"]
    folds = [f"p_fold_{n}" for n in names]
    ends = [f"p_end_{i}" for i in range(len(outputs))]
    arguments = initial + outputs + _leaf_args(spec) + folds + ends + ["p_flags", "p_ticket", "T", "C", "H", "R", "n_c", "n_chunks", "BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
    buffer.line("@triton.jit")
    buffer.line(f"def forward_{spec.name}_look_back({', '.join(arguments)}):")
    with buffer.indent():
        _emit_look_back_ids(buffer)
        _emit_row_pointers(buffer, spec, initial, outputs)
        for pointer in folds + ends:
            buffer.line(f"{pointer} += o_row * n_chunks * C  # [N, n_chunks, C]")
        buffer.line("p_flags += (o_row * n_c + i_c) * n_chunks  # [N, n_c, n_chunks]")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        buffer.line("o_t = i_k * BT + tl.arange(0, BT)")
        buffer.line("m = (o_t[:, None] < T) & m_c[None, :]")
        values = _emit_loads(buffer, spec, "o_t", "m")
        terms = _emit_terms(buffer, spec, values)
        elements = _emit_elements(buffer, spec, terms)
        scanned = [f"b_S{i}" for i in range(len(elements))]
        buffer.line(f"{', '.join(scanned)} = tl.associative_scan(({', '.join(elements)},), 0, combine_{spec.name})")
        buffer.line("# publish this block's fold for the blocks after it")
        _emit_publish(buffer, folds, [f"tl.sum(tl.where(b_last, {value}, 0.0), axis=0)" for value in scanned], 1)
        buffer.line("# the carry into this block: the initial state, or earlier blocks' folds composed back to a published end state")
        carries = [f"b_carry_{i}" for i in range(len(initial))]
        for carry, pointer in zip(carries, initial):
            buffer.line(f"{carry} = tl.load({pointer} + {_in_state_layout(spec, 'o_c')}, mask=m_c, other=0.0).to(ACC)")
        _emit_walk_back(buffer, spec, folds, ends, carries)
        if spec.is_complex:
            buffer.line(f"b_h_re = b_S0 * {carries[0]}[None, :] - b_S1 * {carries[1]}[None, :] + b_S2")
            buffer.line(f"b_h_im = b_S0 * {carries[1]}[None, :] + b_S1 * {carries[0]}[None, :] + b_S3")
            states = ["b_h_re", "b_h_im"]
        else:
            buffer.line(f"b_h = b_S0 * {carries[0]}[None, :] + b_S1")
            states = ["b_h"]
        for pointer, value, carry in zip(outputs, states, carries):
            _store_and_carry(buffer, pointer, value, carry, _in_state_layout(spec, _STATE_OFFSET))
        buffer.line("# publish the state at this block's end")
        _emit_publish(buffer, ends, carries, 2)
    buffer.line("")
    buffer.line("")


def _emit_look_back_ids(buffer: IndentedBuffer) -> None:
    """A look-back program's (row, block of elements, block of steps) from its ticket."""
    buffer.line("# R = N * n_c programs per block of steps; tickets run block of steps by block of steps")
    buffer.line("i_p = tl.atomic_add(p_ticket, 1)")
    buffer.line("i_k = i_p // R")
    buffer.line("i_n = (i_p % R) // n_c")
    buffer.line("i_c = i_p % n_c")


def _emit_publish(buffer: IndentedBuffer, pointers: list[str], values: list[str], flag: int) -> None:
    """Store this block's values (``[N, n_chunks, C]``), then raise its flag: 1 its fold, 2 its end state.

    The block barrier orders every thread's stores before the one thread's release of the flag."""
    for pointer, value in zip(pointers, values):
        buffer.line(f"tl.store({pointer} + i_k * C + o_c, {value}, mask=m_c)")
    buffer.line("tl.debug_barrier()")
    buffer.line(f"tl.atomic_xchg(p_flags + i_k, {flag}, sem=\"release\")")


def _emit_walk_back(buffer: IndentedBuffer, spec: ScanSpec, folds: list[str], ends: list[str], carries: list[str]) -> None:
    """Set ``carries`` to the scan's value just before block ``i_k``: walk back over blocks
    ``i_k - 1, i_k - 2, ...``, composing the folds of those that have published only their
    fold (flag 1), until one has published its end value (flag 2), then map that value through
    the composed folds.  A walk that composes every earlier block's fold, block 0's included,
    maps ``carries`` as given (the initial state; the adjoint's zero past the last step): on a
    GPU, block 0 may not have finished when later blocks look back.  Spin while a block has
    published nothing (it holds an earlier ticket, so it runs)."""
    names = [pointer.removeprefix("p_fold_") for pointer in folds]
    running = [f"b_r{i}" for i in range(len(names))]
    for name, identity in zip(running, (1.0, 0.0, 0.0, 0.0) if spec.is_complex else (1.0, 0.0)):
        buffer.line(f"{name} = tl.full([BC], {_literal(identity)}, dtype=ACC)")
    buffer.line("j = i_k - 1")
    buffer.line("while j >= 0:")
    with buffer.indent():
        buffer.line("status = tl.atomic_add(p_flags + j, 0, sem=\"acquire\")")
        buffer.line("while status == 0:")
        with buffer.indent():
            buffer.line("status = tl.atomic_add(p_flags + j, 0, sem=\"acquire\")")
        buffer.line("if status == 2:")
        with buffer.indent():
            for carry, pointer in zip(carries, ends):
                buffer.line(f"{carry} = tl.load({pointer} + j * C + o_c, mask=m_c, other=0.0, cache_modifier=\".cg\").to(ACC)")
            buffer.line("j = -1")
        buffer.line("else:")
        with buffer.indent():
            fold = [f"b_f{i}" for i in range(len(names))]
            for value, pointer in zip(fold, folds):
                buffer.line(f"{value} = tl.load({pointer} + j * C + o_c, mask=m_c, other=0.0, cache_modifier=\".cg\").to(ACC)")
            buffer.line(f"{', '.join(running)} = combine_{spec.name}({', '.join(fold + running)})")
            buffer.line("j -= 1")
    buffer.line("# the value found (or the boundary value) through the folds walked over: combine((1, h), running)'s second half")
    unit = ["tl.full([BC], 1.0, dtype=ACC)", "tl.zeros([BC], dtype=ACC)"][: len(names) - len(carries)]
    applied = [f"b_x{i}" for i in range(len(names))]
    buffer.line(f"{', '.join(applied)} = combine_{spec.name}({', '.join(unit + carries + running)})")
    for carry, value in zip(carries, applied[len(names) - len(carries):]):
        buffer.line(f"{carry} = {value}")


def summary_identities(spec: ScanSpec, backward: bool = False) -> tuple[float, ...]:
    """The identity of the scan's combine, one number per part of a chunk's fold.

    Forward: the affine pair's ``(1, 0)`` (complex: ``(1, 0, 0, 0)``), the semiring pair's
    ``(0, -inf)``, a monoid's declared identity.  Backward: the adjoint is always an affine
    pair, ``(1, 0)`` (complex: ``(1, 0, 0, 0)``).
    """
    if backward or spec.kind is ScanKind.AFFINE:
        return (1.0, 0.0, 0.0, 0.0) if spec.is_complex else (1.0, 0.0)
    if spec.kind is ScanKind.SEMIRING:
        return (0.0, float("-inf"))
    return spec.identities


def summary_parts(spec: ScanSpec) -> int:
    """How many ``[N, n_chunks, C]`` tensors hold a chunk's fold (forward or backward)."""
    return len(_carry_names(spec))


def state_parts(spec: ScanSpec, backward: bool = False) -> tuple[int, ...]:
    """Which parts of a fold are the carried state: the affine and semiring pairs' second
    half (``b``: the state reached from the carry), a monoid's every carry."""
    if backward or spec.kind is not ScanKind.MONOID:
        return (2, 3) if spec.is_complex else (1,)
    return tuple(range(len(_carry_names(spec))))


def _emit_fold(buffer: IndentedBuffer, elements: list[str], combine: str, totals: list[str]) -> None:
    """Fold one block of elements (identity past the chunk's end) into the running ``totals``."""
    scanned = [f"b_S{i}" for i in range(len(elements))]
    buffer.line(f"{', '.join(scanned)} = tl.associative_scan(({', '.join(elements)},), 0, {combine})")
    ends = [f"b_end{i}" for i in range(len(elements))]
    for end, value in zip(ends, scanned):
        buffer.line(f"{end} = tl.sum(tl.where(b_last, {value}, 0.0), axis=0)")
    buffer.line(f"{', '.join(totals)} = {combine}({', '.join(totals)}, {', '.join(ends)})")


def emit_carries(buffer: IndentedBuffer, spec: ScanSpec, backward: bool = False) -> None:
    """Pass 2 of :class:`TimeSplit`: per (row, block of state elements), the carry into each chunk.

    A short sequential loop over the ``n_chunks`` folds: the running prefix starts at the
    identity with the initial state as its state part (backward: a zero adjoint) and
    combines each chunk's fold after storing the state part as that chunk's carry.
    """
    names = (["w_re", "w_im", "g_re", "g_im"] if spec.is_complex else ["w", "g"]) if backward else _carry_names(spec)
    states = state_parts(spec, backward)
    sums = [f"p_sum_{n}" for n in names]
    carries = [f"p_carry_{i}" for i in range(len(states))]
    initial = [] if backward else [f"p_init_{i}" for i in range(len(states))]
    combine = "_affine_pair" if backward and spec.kind is ScanKind.SEMIRING else f"combine_{spec.name}"
    title = f"carries_backward_{spec.name}" if backward else f"carries_{spec.name}"
    buffer.line("@triton.jit")
    buffer.line(f"def {title}({', '.join(initial + sums + carries + ['C', 'n_chunks', 'BC: tl.constexpr', 'ACC: tl.constexpr'])}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        buffer.line("o_row = i_n.to(tl.int64)")
        for pointer in initial:
            buffer.line(f"{pointer} += o_row * C{' * 2' if spec.is_complex else ''}")  # the initial state, in the states' layout
        for pointer in sums + carries:
            buffer.line(f"{pointer} += o_row * n_chunks * C  # [N, n_chunks, C]")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        running = [f"b_r{i}" for i in range(len(names))]
        identities = summary_identities(spec, backward)
        for i, name in enumerate(running):
            if i in states and not backward:
                buffer.line(f"{name} = tl.load({initial[states.index(i)]} + {_in_state_layout(spec, 'o_c')}, mask=m_c, other=0.0).to(ACC)")
            else:
                buffer.line(f"{name} = tl.full([BC], {_literal(identities[i])}, dtype=ACC)")
        buffer.line("for i_k in range(0, n_chunks):")
        with buffer.indent():
            for pointer, i in zip(carries, states):
                buffer.line(f"tl.store({pointer} + i_k * C + o_c, {running[i]}, mask=m_c)")
            parts = [f"b_s{i}" for i in range(len(names))]
            for part, pointer in zip(parts, sums):
                buffer.line(f"{part} = tl.load({pointer} + i_k * C + o_c, mask=m_c, other=0.0).to(ACC)")
            buffer.line(f"{', '.join(running)} = {combine}({', '.join(running)}, {', '.join(parts)})")
    buffer.line("")
    buffer.line("")


def _full(buffer: IndentedBuffer, name: str, value: str, padding: str) -> None:
    # Steps past T (and elements past C) get the identity so the carry passes through.
    buffer.line(f"{name} = tl.where(m, {value} + tl.zeros([BT, BC], dtype=ACC), {padding})")


_STATE_OFFSET = "o_t[:, None] * C + o_c[None, :]"


def _in_state_layout(spec: ScanSpec, offset: str) -> str:
    """An element offset into the states, their gradients, the initial state or its gradient.

    A complex state's real and imaginary parts are read and written in place in torch's
    complex layout (``view_as_real``: the two parts interleaved, the imaginary part's pointer
    one float past the real's), so its element offsets count pairs: twice the offset.  No
    copy splits a complex tensor into parts around the kernels.
    """
    return f"2 * ({offset})" if spec.is_complex else offset


def _emit_row_pointers(buffer: IndentedBuffer, spec: ScanSpec, initial: list[str], sequences: list[str]) -> None:
    """Move every pointer to the program's row ``i_n`` (batch ``i_n // H``, head ``i_n % H``), in 64-bit arithmetic.

    ``N * T * C`` (or a leaf's ``b * s_b``) may pass 2^31 elements; offsets within one row
    (``t * s_t + c * s_c``, below ``T * C``) stay 32-bit.  Leaves are read in their own
    layout (``[B, T, H, C]`` or broadcast), through their batch and head strides.
    """
    buffer.line("o_row = i_n.to(tl.int64)  # 64-bit: offsets over rows may pass 2^31 elements")
    pairs = " * 2" if spec.is_complex else ""  # complex states: (re, im) interleaved, see _in_state_layout
    if spec.leaves:
        buffer.line("o_b = o_row // H")
        buffer.line("o_h = o_row % H")
    for pointer in initial:
        buffer.line(f"{pointer} += o_row * C{pairs}")
    for pointer in sequences:
        buffer.line(f"{pointer} += o_row * T * C{pairs}")
    for leaf in spec.leaves:
        for part in ("re", "im") if leaf.is_complex else ("v",):
            buffer.line(f"p_{leaf.name}_{part} += o_b * s_{leaf.name}_b + o_h * s_{leaf.name}_h")


def _store_and_carry(buffer: IndentedBuffer, pointer: str, value: str, carry: str, offset: str = _STATE_OFFSET) -> None:
    """Store a block of states and keep its last row as the carry into the next block."""
    buffer.line(f"tl.store({pointer} + {offset}, {value}, mask=m)")
    buffer.line(f"{carry} = tl.sum(tl.where(b_last, {value}, 0.0), axis=0)")


def _emit_elements(buffer: IndentedBuffer, spec: ScanSpec, terms: list) -> list[str]:
    """The block's scan elements from the terms, the combine's identity past T (or the chunk) and C."""
    if spec.kind is ScanKind.AFFINE and not spec.is_complex:
        _full(buffer, "b_a", terms[0], "1.0")
        _full(buffer, "b_b", terms[1] if terms[1] is not None else "0.0", "0.0")
        return ["b_a", "b_b"]
    if spec.kind is ScanKind.AFFINE:
        a = terms[0] if isinstance(terms[0], tuple) else (terms[0], "0.0")
        b = terms[1] if isinstance(terms[1], tuple) else ((terms[1], "0.0") if terms[1] is not None else ("0.0", "0.0"))
        _full(buffer, "b_a_re", a[0], "1.0")
        _full(buffer, "b_a_im", a[1], "0.0")
        _full(buffer, "b_b_re", b[0], "0.0")
        _full(buffer, "b_b_im", b[1], "0.0")
        return ["b_a_re", "b_a_im", "b_b_re", "b_b_im"]
    if spec.kind is ScanKind.SEMIRING:
        _full(buffer, "b_a", terms[0], "0.0")
        _full(buffer, "b_b", terms[1] if terms[1] is not None else 'float("-inf")', 'float("-inf")')
        return ["b_a", "b_b"]
    elements = []
    for i, (term, identity) in enumerate(zip(terms, spec.identities)):
        _full(buffer, f"b_e{i}", term, _literal(identity))
        elements.append(f"b_e{i}")
    return elements


def _emit_scan_and_store(buffer: IndentedBuffer, spec: ScanSpec, terms: list, carries: list[str], outputs: list[str]) -> None:
    elements = _emit_elements(buffer, spec, terms)
    if spec.kind is ScanKind.AFFINE and not spec.is_complex:
        buffer.line(f"b_A, b_B = tl.associative_scan((b_a, b_b), 0, combine_{spec.name})")
        buffer.line(f"b_h = b_A * {carries[0]}[None, :] + b_B")
        _store_and_carry(buffer, outputs[0], "b_h", carries[0])
    elif spec.kind is ScanKind.AFFINE:
        buffer.line(f"b_A_re, b_A_im, b_B_re, b_B_im = tl.associative_scan((b_a_re, b_a_im, b_b_re, b_b_im), 0, combine_{spec.name})")
        buffer.line(f"b_h_re = b_A_re * {carries[0]}[None, :] - b_A_im * {carries[1]}[None, :] + b_B_re")
        buffer.line(f"b_h_im = b_A_re * {carries[1]}[None, :] + b_A_im * {carries[0]}[None, :] + b_B_im")
        _store_and_carry(buffer, outputs[0], "b_h_re", carries[0], _in_state_layout(spec, _STATE_OFFSET))
        _store_and_carry(buffer, outputs[1], "b_h_im", carries[1], _in_state_layout(spec, _STATE_OFFSET))
    elif spec.kind is ScanKind.SEMIRING:
        plus = "_maximum" if spec.semiring is MAX_PLUS else "_logaddexp"
        buffer.line(f"b_A, b_B = tl.associative_scan((b_a, b_b), 0, combine_{spec.name})")
        buffer.line(f"b_h = {plus}({carries[0]}[None, :] + b_A, b_B)")
        _store_and_carry(buffer, outputs[0], "b_h", carries[0])
    else:
        assert spec.monoid is not None
        scanned = [f"b_s{i}" for i in range(len(elements))]
        buffer.line(f"{', '.join(scanned)} = tl.associative_scan(({', '.join(elements)},), 0, combine_{spec.name})")
        # Fold in the carry from earlier blocks: combine(carry, scanned).
        folded = [f"b_f{i}" for i in range(len(elements))]
        buffer.line(f"{', '.join(folded)} = combine_{spec.name}({', '.join(c + '[None, :]' for c in carries)}, {', '.join(scanned)})")
        narrow = single_element_carries(spec)
        for i, (pointer, value, carry) in enumerate(zip(outputs, folded, carries)):
            if i in narrow:  # every lane holds the same value: lane 0 stores it
                buffer.line(f"tl.store({pointer} + {NARROW_OFFSET}, {value}, mask=m & (o_c[None, :] == 0))")
                buffer.line(f"{carry} = tl.sum(tl.where(b_last, {value}, 0.0), axis=0)")
            else:
                _store_and_carry(buffer, pointer, value, carry)


# A carry with one element per step ([N, T, 1]) read or written by every lane of a block.
NARROW_OFFSET = "o_t[:, None] + o_c[None, :] * 0"


def single_element_carries(spec: ScanSpec) -> tuple[int, ...]:
    """The positions of a monoid's carries of one element when the carries' common shape has
    more (Aaren's ``m`` and ``s`` beside ``n: [d]``): the kernels compute them in every lane
    (each lane a copy) but store and read one copy per step, ``[N, T, 1]``."""
    if spec.kind is not ScanKind.MONOID or spec.monoid is None:
        return ()
    sizes = [_elements(carry.type.shape) for carry in spec.monoid.carries]
    if max(sizes) == 1:
        return ()
    return tuple(i for i, size in enumerate(sizes) if size == 1)


def _elements(shape: tuple[int, ...]) -> int:
    total = 1
    for size in shape:
        total *= size
    return total


def summary_backward_terms(spec: ScanSpec) -> tuple[int, ...]:
    """The terms the split backward's fold evaluates: the decay (affine), decay and input (semiring: ``e_{t+1}``)."""
    return (0,) if spec.kind is ScanKind.AFFINE else (0, 1)


def emit_backward_summary(buffer: IndentedBuffer, spec: ScanSpec) -> None:
    """Pass 1 of the split backward: each chunk of reversed time folded into the adjoint's affine pair.

    For ``h_t = f(h_{t-1}, a_t, b_t)`` with ``w_t = d h_t / d h_{t-1}`` the adjoint is

        g_t = dL/dh_t + w_{t+1} g_{t+1}       (a forward scan over j = T - 1 - t)

    affine: ``w = a`` (conjugated for complex values); semiring: ``w_t = e_t``
    (max-plus: ``[h_{t-1} + a_t >= b_t]``; log: ``exp(h_{t-1} + a_t - h_t)``).  Steps past the
    chunk's end get the pair's identity ``(1, 0)``.  ``summarize_backward_*`` writes each
    chunk's fold of the pairs ``(w_{t+1}, dy_t)``; ``carries_backward_*`` passes them along
    and :func:`emit_gradient_backward` rescans each chunk from its carry.
    """
    complex_ = spec.is_complex
    grads = ["p_grad_re", "p_grad_im"] if complex_ else ["p_grad"]
    states = ["p_h_re", "p_h_im"] if complex_ else ["p_h"]
    initial = ["p_init_re", "p_init_im"] if complex_ else ["p_init"]
    sums = ["p_sum_w_re", "p_sum_w_im", "p_sum_g_re", "p_sum_g_im"] if complex_ else ["p_sum_w", "p_sum_g"]
    chunk_args = ["T", "C", "H", "L", "n_blocks", "n_chunks", "BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
    # Only what the fold reads: dy, the leaves of w_{t+1} and, for a semiring's w, the states.
    read = spec.leaves_of(summary_backward_terms(spec))
    states = states if spec.kind is ScanKind.SEMIRING else []
    arguments = states + grads + sums + _leaf_args(replace(spec, leaves=read)) + chunk_args
    buffer.line("@triton.jit")
    buffer.line(f"def summarize_backward_{spec.name}({', '.join(arguments)}):")
    with buffer.indent():
        buffer.line("i_n = tl.program_id(0)")
        buffer.line("i_c = tl.program_id(1)")
        buffer.line("i_k = tl.program_id(2)  # the chunk of reversed time: steps j in [i_k * L, min(T, (i_k + 1) * L))")
        _emit_row_pointers(buffer, replace(spec, leaves=read), [], states + grads)
        for pointer in sums:
            buffer.line(f"{pointer} += (o_row * n_chunks + i_k) * C  # [N, n_chunks, C]")
        buffer.line("j_end = tl.minimum(T, (i_k + 1) * L)")
        buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
        buffer.line("m_c = o_c < C")
        totals = [f"b_sum_{i}" for i in range(len(sums))]
        for total, identity in zip(totals, summary_identities(spec, backward=True)):
            buffer.line(f"{total} = tl.full([BC], {_literal(identity)}, dtype=ACC)")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        buffer.line("for i_j in range(0, n_blocks):")
        with buffer.indent():
            buffer.line("# step j of the reversed sequence is time t = T - 1 - j")
            buffer.line("o_j = i_k * L + i_j * BT + tl.arange(0, BT)")
            buffer.line("o_t = T - 1 - o_j")
            buffer.line("m = (o_j[:, None] < j_end) & m_c[None, :]")
            # m, not just t + 1 < T: a padding step's t + 1 may be negative (before the leaf's first row).
            buffer.line("m_next = m & (o_t[:, None] + 1 < T)")
            for pointer, name in zip(grads, ["b_dy_re", "b_dy_im"] if complex_ else ["b_dy"]):
                buffer.line(f"{name} = tl.load({pointer} + {_in_state_layout(spec, _STATE_OFFSET)}, mask=m, other=0.0).to(ACC)")
            buffer.line("# gates at t + 1")
            next_values = _emit_loads_for(buffer, spec, "(o_t + 1)", "m_next", "_next", summary_backward_terms(spec))
            next_terms = _emit_terms(buffer, spec, next_values, prefix="b_next_", only=summary_backward_terms(spec))
            if spec.kind is ScanKind.AFFINE and not complex_:
                _adjoint_decay(buffer, "b_w", next_terms[0], "1.0", True)
                _emit_fold(buffer, ["b_w", "b_dy"], f"combine_{spec.name}", totals)
            elif spec.kind is ScanKind.AFFINE:
                a_next = next_terms[0] if isinstance(next_terms[0], tuple) else (next_terms[0], "0.0")
                # The adjoint runs with conj(a): g_t = dy_t + conj(a_{t+1}) g_{t+1}.
                _adjoint_decay(buffer, "b_w_re", a_next[0], "1.0", True)
                _adjoint_decay(buffer, "b_w_im", f"-({a_next[1]})", "0.0", True)
                _emit_fold(buffer, ["b_w_re", "b_w_im", "b_dy_re", "b_dy_im"], f"combine_{spec.name}", totals)
            else:
                # w_{t+1} = e_{t+1} needs h_t, a_{t+1}, b_{t+1}, h_{t+1}.
                buffer.line(f"b_h = tl.load(p_h + {_STATE_OFFSET}, mask=m, other=0.0)")
                buffer.line(f"b_h_next = tl.load(p_h + {_STATE_OFFSET} + C, mask=m_next, other=0.0)")
                b_next = next_terms[1] if next_terms[1] is not None else 'float("-inf")'
                if spec.semiring is MAX_PLUS:
                    buffer.line(f"b_e_next = tl.where(b_h + {next_terms[0]} >= {b_next}, 1.0, 0.0)")
                else:
                    buffer.line(f"b_e_next = tl.exp(b_h + {next_terms[0]} - tl.where(m_next, b_h_next, 0.0))")
                _adjoint_decay(buffer, "b_w", "b_e_next", "1.0", True)
                _emit_fold(buffer, ["b_w", "b_dy"], "_affine_pair", totals)
        for pointer, total in zip(sums, totals):
            buffer.line(f"tl.store({pointer} + o_c, {total}, mask=m_c)")
    buffer.line("")
    buffer.line("")


# ---- the backward kernel: adjoint scan, then the chain rule through the gate math ----------


def leaf_gradient_args(spec: ScanSpec) -> list[str]:
    """The gradient arguments of the backward kernels: per leaf its parts' pointers
    (``p_d<leaf>_v``, or ``_re``, ``_im``) and the ``[B, H, T, C]`` strides of the gradient
    (``T`` is the chunk for a gradient summed over time), so that a per-step gradient is
    written in the leaf's own layout (``[B, T, H, C]`` under heads) and needs no copy."""
    args = []
    for leaf in spec.leaves:
        args.extend(f"p_d{leaf.name}_{part}" for part in (("re", "im") if leaf.is_complex else ("v",)))
        args.extend(f"s_d{leaf.name}_{axis}" for axis in "bhtc")
    return args


def leaf_mode_args(spec: ScanSpec) -> list[str]:
    """Per leaf, how its gradient is written (:class:`LeafGradient`), a ``tl.constexpr``."""
    return [f"G_{leaf.name}: tl.constexpr" for leaf in spec.leaves]


class LeafGradient(Enum):
    """How the backward kernel writes one leaf's gradient (the value of its ``G_<leaf>`` constexpr)."""

    NONE = 0  # the leaf needs no gradient
    PER_STEP = 1  # [N, T, C]: one value per row, step and element
    SUMMED_OVER_TIME = 2  # [B, H, chunks, C]: the leaf does not vary in time; each program sums its steps
    SUMMED_OVER_LANES = 3  # [B, H, T, blocks]: the leaf is one value per step for every state element; each program sums its lanes (monoid kernels)


def _result_kind(op: str, kinds: list[Kind]) -> Kind:
    from recdsl.shapes import result_kind

    return result_kind(op, kinds)


def _rule_expr(term: Term, node: Op, adjoint: ir.Expr, conjugate: bool) -> ir.Expr:
    """A registry derivative rule as an IR expression over ``node``'s operands, result and adjoint.

    ``conjugate``: the operands and the result enter conjugated (a holomorphic op's complex
    gradient, see :class:`recdsl.ops.Term`).  Constant conditions pick their branch, and
    ``pow(x, 1)`` is ``x`` (the registry's pow form goes through a log).
    """
    if term.op is None:
        if term.leaf is TermLeaf.ADJOINT:
            return adjoint
        if term.leaf is TermLeaf.NUMBER:
            return Literal(term.value, ir.Type((), Kind.COMPLEX if isinstance(term.value, complex) else Kind.REAL))
        value = node if term.leaf is TermLeaf.RESULT else node.args[term.index]
        if conjugate and value.type.kind is Kind.COMPLEX:
            return Op("conj", (value,), value.type)
        return value
    args = tuple(_rule_expr(arg, node, adjoint, conjugate) for arg in term.args)
    if term.op == "where":
        condition = fold_constant(args[0])
        if isinstance(condition, bool):
            return args[1] if condition else args[2]
    if term.op == "pow" and fold_constant(args[1]) == 1:
        return args[0]
    kind = _result_kind(term.op, [a.type.kind for a in args])
    return Op(term.op, args, ir.Type((), kind))


def _as_kind(value: Value, complex_: bool) -> Value:
    """A share as the receiving value's kind: the real part for a real value, ``(x, 0)`` for a complex one."""
    if complex_:
        return value if isinstance(value, tuple) else (value, "0.0")
    return value[0] if isinstance(value, tuple) else value


def emit_chain_rule(emitter: ExpressionEmitter, seeds: list[tuple[ir.Expr, Value]], leaves: tuple[Leaf, ...]) -> dict[ir.Expr, Value]:
    """Reverse-mode differentiation of the gate math: from the adjoints of the terms
    (``seeds``) to those of the leaves, each op's share by its registry rule.

    ``emitter`` holds the forward values of every node (it computed the terms at this step),
    so the rules read them from registers; shares of a node read by several others add up.
    Returns each leaf's adjoint (absent: no gradient reaches it).
    """
    leaf_exprs = {leaf.expr for leaf in leaves}
    order: list[ir.Expr] = []
    seen: set[ir.Expr] = set()
    reaches: set[ir.Expr] = set()  # nodes with a leaf below them

    def visit(node: ir.Expr) -> bool:
        if node in seen:
            return node in reaches
        seen.add(node)
        if node in leaf_exprs:
            reaches.add(node)
            return True
        if isinstance(node, Literal) or not isinstance(node, Op) or fold_constant(node) is not None:
            return False
        found = False
        for arg in node.args:
            found = visit(arg) or found
        if found:
            reaches.add(node)
            order.append(node)
        return found

    for root, _ in seeds:
        visit(root)
    adjoints: dict[ir.Expr, Value] = {}

    def add(node: ir.Expr, share: Value) -> None:
        complex_ = node.type.kind is Kind.COMPLEX
        share = _as_kind(share, complex_)
        if node not in adjoints:
            adjoints[node] = share
            return
        old = adjoints[node]
        if complex_:
            adjoints[node] = (emitter._temp(f"{old[0]} + {share[0]}"), emitter._temp(f"{old[1]} + {share[1]}"))
        else:
            adjoints[node] = emitter._temp(f"{old} + {share}")

    for root, seed in seeds:
        if root in reaches:
            add(root, seed)
    for count, node in enumerate(reversed(order)):
        assert isinstance(node, Op)
        if node not in adjoints:
            continue
        complex_ = node.type.kind is Kind.COMPLEX or any(a.type.kind is Kind.COMPLEX for a in node.args)
        spec = OPS[node.op]
        rules = spec.derivative_complex if complex_ and spec.derivative_complex is not None else spec.derivative
        if rules is None:
            raise Unsupported(f"'{node.op}' has no derivative rule in the op registry")
        placeholder = Ref(ir.RefKind.LOCAL, f"__adjoint_{count}", ir.Type((), node.type.kind))
        emitter.leaf_values[placeholder] = adjoints[node]
        conjugate = complex_ and spec.derivative_complex is None
        emitter.buffer.line(f"# d/d operands of {format_expr(node)}"[:160])
        for arg, rule in zip(node.args, rules):
            if rule is None or arg not in reaches:
                continue
            add(arg, emitter.emit(_rule_expr(rule, node, placeholder, conjugate)))
    return {leaf: adjoints[leaf] for leaf in leaf_exprs if leaf in adjoints}


def _emit_leaf_gradients(buffer: IndentedBuffer, spec: ScanSpec, found: dict[ir.Expr, Value], chunked: bool) -> None:
    """Write each leaf's gradient block per its ``G_<leaf>`` mode (masked: lanes past T, C or the chunk hold garbage)."""
    for leaf in spec.leaves:
        value = found.get(leaf.expr)
        parts = ("re", "im") if leaf.is_complex else ("v",)
        values = _as_kind(value, leaf.is_complex) if value is not None else (("0.0", "0.0") if leaf.is_complex else "0.0")
        values = values if isinstance(values, tuple) else (values,)
        buffer.line(f"if G_{leaf.name} == 1:  # d {format_expr(leaf.expr)}"[:160])
        with buffer.indent():
            for part, v in zip(parts, values):
                buffer.line(
                    f"tl.store(p_d{leaf.name}_{part} + o_b * s_d{leaf.name}_b + o_h * s_d{leaf.name}_h + o_t[:, None] * s_d{leaf.name}_t + o_c[None, :] * s_d{leaf.name}_c, "
                    f"{v} + tl.zeros([BT, BC], dtype=ACC), mask=m)"
                )
        buffer.line(f"if G_{leaf.name} == 2:")
        with buffer.indent():
            for part, v in zip(parts, values):
                buffer.line(f"b_acc_{leaf.name}_{part} += tl.sum(tl.where(m, {v} + tl.zeros([BT, BC], dtype=ACC), 0.0), axis=0)")


def backward_sizes(mode: SplitMode) -> list[str]:
    """The size and tiling arguments that end a backward kernel's signature, by ``mode``
    (shared by the affine and semiring backward and the monoids', :mod:`.triton_monoid`)."""
    tiling = ["BT: tl.constexpr", "BC: tl.constexpr", "ACC: tl.constexpr"]
    if mode is SplitMode.LOOK_BACK:
        return ["T", "C", "H", "R", "n_c", "n_chunks"] + tiling
    if mode is SplitMode.CHUNK:
        return ["T", "C", "H", "L", "n_blocks", "n_chunks"] + tiling
    return ["T", "C", "H", "n_blocks"] + tiling


def emit_backward_block(buffer: IndentedBuffer, mode: SplitMode, carried: list[str]) -> None:
    """After a backward kernel's row pointers: its chunk of reversed time (CHUNK: ``i_k``, the
    adjoint ``carried`` into it, its end ``j_end``; WHOLE: ``i_k = 0``) and its block of state
    elements ``o_c``, ``m_c``."""
    assert mode in (SplitMode.WHOLE, SplitMode.CHUNK)
    if mode is SplitMode.CHUNK:
        buffer.line("i_k = tl.program_id(2)  # the chunk of reversed time: steps j in [i_k * L, min(T, (i_k + 1) * L))")
        for pointer in carried:
            buffer.line(f"{pointer} += (o_row * n_chunks + i_k) * C  # [N, n_chunks, C]")
        buffer.line("j_end = tl.minimum(T, (i_k + 1) * L)")
    else:
        buffer.line("i_k = 0")
    buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
    buffer.line("m_c = o_c < C")


def emit_gradient_backward(buffer: IndentedBuffer, spec: ScanSpec, mode: SplitMode = SplitMode.WHOLE) -> None:
    """The backward of an affine or semiring scan, writing the gradients of the kernel's leaves.

    Per block of reversed time it loads the leaves (and the decay's leaves one step later),
    recomputes the gates in registers, runs the adjoint scan ``g_t = dy_t + w_{t+1} g_{t+1}``
    (see :func:`emit_backward_summary`), forms the adjoints of the decay and input terms
    (affine: ``g_t conj(h_{t-1})`` and ``g_t``; semiring: ``g_t e_t`` and ``g_t (1 - e_t)``)
    and carries them through the gate math by the registry's derivative rules
    (:func:`emit_chain_rule`) to one gradient per leaf: per step (``[N, T, C]``), or summed
    over the program's steps for a leaf constant in time (``[N, chunks, C]``, summed over
    rows by torch).  ``dL/dh_0`` (``g_0 conj(a_0)``, semiring ``g_0 e_0``) is written too.

    ``mode``: WHOLE, or CHUNK (one chunk of reversed time from the adjoint carried into it;
    the chunk holding t = 0 writes ``dL/dh_0``).
    """
    assert mode is not SplitMode.SUMMARY
    complex_ = spec.is_complex
    grads = ["p_grad_re", "p_grad_im"] if complex_ else ["p_grad"]
    states = ["p_h_re", "p_h_im"] if complex_ else ["p_h"]
    initial = ["p_init_re", "p_init_im"] if complex_ else ["p_init"]
    dinit = ["p_dinit_re", "p_dinit_im"] if complex_ else ["p_dinit"]
    carried = ["p_carry_re", "p_carry_im"] if complex_ else ["p_carry"]
    look_back = mode is SplitMode.LOOK_BACK
    assert not look_back or spec.kind is ScanKind.AFFINE
    split = mode in (SplitMode.CHUNK, SplitMode.LOOK_BACK)
    folds = ["p_fold_w_re", "p_fold_w_im", "p_fold_g_re", "p_fold_g_im"] if complex_ else ["p_fold_w", "p_fold_g"]
    ends = [f"p_end_{i}" for i in range(len(carried))]
    leaf_grads = leaf_gradient_args(spec)
    sizes = backward_sizes(mode)
    if look_back:
        arguments = folds + ends + ["p_flags", "p_ticket"] + initial + states + grads + dinit + leaf_grads + _leaf_args(spec) + sizes + leaf_mode_args(spec)
        title = f"backward_{spec.name}_look_back"
    elif not split:
        arguments = initial + states + grads + dinit + leaf_grads + _leaf_args(spec) + sizes + leaf_mode_args(spec)
        title = f"backward_{spec.name}"
    else:
        arguments = carried + initial + states + grads + dinit + leaf_grads + _leaf_args(spec) + sizes + leaf_mode_args(spec)
        title = f"backward_{spec.name}_chunks"
    buffer.line("@triton.jit")
    buffer.line(f"def {title}({', '.join(arguments)}):")
    with buffer.indent():
        if look_back:
            _emit_look_back_ids(buffer)
        else:
            buffer.line("i_n = tl.program_id(0)")
            buffer.line("i_c = tl.program_id(1)")
        _emit_row_pointers(buffer, spec, initial + dinit, states + grads)
        if look_back:
            buffer.line("# one block of reversed time per program: steps j in [i_k * BT, min(T, (i_k + 1) * BT))")
            for pointer in folds + ends:
                buffer.line(f"{pointer} += o_row * n_chunks * C  # [N, n_chunks, C]")
            buffer.line("p_flags += (o_row * n_c + i_c) * n_chunks  # [N, n_c, n_chunks]")
            buffer.line("L = BT")
            buffer.line("n_blocks = 1")
            buffer.line("j_end = tl.minimum(T, (i_k + 1) * L)")
            buffer.line("o_c = i_c * BC + tl.arange(0, BC)")
            buffer.line("m_c = o_c < C")
        else:
            emit_backward_block(buffer, mode, carried)
        carries = ["b_g_re", "b_g_im"] if complex_ else ["b_g"]
        for carry, pointer in zip(carries, carried):
            if split and not look_back:
                buffer.line(f"{carry} = tl.load({pointer} + o_c, mask=m_c, other=0.0).to(ACC)")
            else:
                buffer.line(f"{carry} = tl.zeros([BC], dtype=ACC)")
        dh0 = ["b_dh0_re", "b_dh0_im"] if complex_ else ["b_dh0"]
        for name in dh0:
            buffer.line(f"{name} = tl.zeros([BC], dtype=ACC)")
        for leaf in spec.leaves:
            for part in ("re", "im") if leaf.is_complex else ("v",):
                buffer.line(f"b_acc_{leaf.name}_{part} = tl.zeros([BC], dtype=ACC)")
        buffer.line("b_last = tl.arange(0, BT)[:, None] == BT - 1")
        buffer.line("for i_j in range(0, n_blocks):")
        with buffer.indent():
            buffer.line("# step j of the reversed sequence is time t = T - 1 - j")
            if not split:
                buffer.line("o_t = T - 1 - (i_j * BT + tl.arange(0, BT))")
                buffer.line("m = (o_t[:, None] >= 0) & m_c[None, :]")
            else:
                buffer.line("o_j = i_k * L + i_j * BT + tl.arange(0, BT)")
                buffer.line("o_t = T - 1 - o_j")
                buffer.line("m = (o_j[:, None] < j_end) & m_c[None, :]")
            buffer.line("m_next = m & (o_t[:, None] + 1 < T)")
            buffer.line("m_prev = (o_t[:, None] >= 1) & m_c[None, :]")
            buffer.line("m_first = m & (o_t[:, None] == 0)")
            offset = _STATE_OFFSET
            buffer.line("o_init = o_c[None, :] + o_t[:, None] * 0")
            hp = ["b_hp_re", "b_hp_im"] if complex_ else ["b_hp"]
            previous, initial_offset = _in_state_layout(spec, f"{offset} - C"), _in_state_layout(spec, "o_init")
            for pointer, init, name in zip(states, initial, hp):
                buffer.line(f"{name} = tl.where(m_prev, tl.load({pointer} + {previous}, mask=m_prev, other=0.0), tl.load({init} + {initial_offset}, mask=m, other=0.0)).to(ACC)")
            dy = ["b_dy_re", "b_dy_im"] if complex_ else ["b_dy"]
            for pointer, name in zip(grads, dy):
                buffer.line(f"{name} = tl.load({pointer} + {_in_state_layout(spec, offset)}, mask=m, other=0.0).to(ACC)")
            needed_next = (0,) if spec.kind is ScanKind.AFFINE else (0, 1)
            buffer.line("# gates at t + 1")
            next_values = _emit_loads_for(buffer, spec, "(o_t + 1)", "m_next", "_next", needed_next)
            next_terms = _emit_terms(buffer, spec, next_values, prefix="b_next_", only=needed_next)
            buffer.line("# gates at t")
            values = _emit_loads(buffer, spec, "o_t", "m")
            emitter = ExpressionEmitter(buffer, values, "b_")
            for line in spec.comment:
                buffer.line(f"# {line}")
            terms = [emitter.emit(term) if term is not None else None for term in spec.terms]
            if spec.kind is ScanKind.AFFINE and not complex_:
                _adjoint_decay(buffer, "b_w", next_terms[0], "1.0", split)
                buffer.line(f"b_W, b_G = tl.associative_scan((b_w, b_dy), 0, combine_{spec.name})")
                if look_back:
                    _emit_adjoint_look_back(buffer, spec, folds, ends, ["b_W", "b_G"], carries)
                buffer.line("b_gt = b_W * b_g[None, :] + b_G")
                buffer.line("b_g = tl.sum(tl.where(b_last, b_gt, 0.0), axis=0)")
                if look_back:
                    _emit_publish(buffer, ends, carries, 2)
                buffer.line(f"b_dh0 += tl.sum(tl.where(m_first, b_gt * ({terms[0]}), 0.0), axis=0)")
                seeds = [(spec.terms[0], emitter._temp("b_gt * b_hp")), (spec.terms[1], "b_gt")]
            elif spec.kind is ScanKind.AFFINE:
                a_next = next_terms[0] if isinstance(next_terms[0], tuple) else (next_terms[0], "0.0")
                _adjoint_decay(buffer, "b_w_re", a_next[0], "1.0", split)
                _adjoint_decay(buffer, "b_w_im", f"-({a_next[1]})", "0.0", split)
                buffer.line(f"b_W_re, b_W_im, b_G_re, b_G_im = tl.associative_scan((b_w_re, b_w_im, b_dy_re, b_dy_im), 0, combine_{spec.name})")
                if look_back:
                    _emit_adjoint_look_back(buffer, spec, folds, ends, ["b_W_re", "b_W_im", "b_G_re", "b_G_im"], carries)
                buffer.line("b_gt_re = b_W_re * b_g_re[None, :] - b_W_im * b_g_im[None, :] + b_G_re")
                buffer.line("b_gt_im = b_W_re * b_g_im[None, :] + b_W_im * b_g_re[None, :] + b_G_im")
                buffer.line("b_g_re = tl.sum(tl.where(b_last, b_gt_re, 0.0), axis=0)")
                buffer.line("b_g_im = tl.sum(tl.where(b_last, b_gt_im, 0.0), axis=0)")
                if look_back:
                    _emit_publish(buffer, ends, carries, 2)
                a_now = terms[0] if isinstance(terms[0], tuple) else (terms[0], "0.0")
                buffer.line("# dL/dh_0 = g_0 conj(a_0); dL/da_t = g_t conj(h_{t-1})")
                buffer.line(f"b_dh0_re += tl.sum(tl.where(m_first, b_gt_re * ({a_now[0]}) + b_gt_im * ({a_now[1]}), 0.0), axis=0)")
                buffer.line(f"b_dh0_im += tl.sum(tl.where(m_first, b_gt_im * ({a_now[0]}) - b_gt_re * ({a_now[1]}), 0.0), axis=0)")
                da = (emitter._temp("b_gt_re * b_hp_re + b_gt_im * b_hp_im"), emitter._temp("b_gt_im * b_hp_re - b_gt_re * b_hp_im"))
                seeds = [(spec.terms[0], da), (spec.terms[1], ("b_gt_re", "b_gt_im"))]
            else:
                buffer.line(f"b_h = tl.load(p_h + {offset}, mask=m, other=0.0).to(ACC)")
                buffer.line(f"b_h_next = tl.load(p_h + {offset} + C, mask=m_next, other=0.0).to(ACC)")
                b_next = next_terms[1] if next_terms[1] is not None else 'float("-inf")'
                b_now = terms[1] if terms[1] is not None else 'float("-inf")'
                if spec.semiring is MAX_PLUS:
                    buffer.line(f"b_e_next = tl.where(b_h + {next_terms[0]} >= {b_next}, 1.0, 0.0)")
                    buffer.line(f"b_e = tl.where(b_hp + {terms[0]} >= {b_now}, 1.0, 0.0)")
                else:
                    buffer.line(f"b_e_next = tl.exp(b_h + {next_terms[0]} - tl.where(m_next, b_h_next, 0.0))")
                    buffer.line(f"b_e = tl.exp(b_hp + {terms[0]} - b_h)")
                _adjoint_decay(buffer, "b_w", "b_e_next", "1.0", split)
                buffer.line("b_W, b_G = tl.associative_scan((b_w, b_dy), 0, _affine_pair)")
                buffer.line("b_gt = b_W * b_g[None, :] + b_G")
                buffer.line("b_g = tl.sum(tl.where(b_last, b_gt, 0.0), axis=0)")
                buffer.line("b_e = tl.where(b_e == b_e, b_e, 0.0)  # NaN (from -inf - -inf) carries no gradient")
                buffer.line("b_dh0 += tl.sum(tl.where(m_first, b_gt * b_e, 0.0), axis=0)")
                seeds = [(spec.terms[0], emitter._temp("b_gt * b_e")), (spec.terms[1], emitter._temp("b_gt * (1.0 - b_e)"))]
            seeds = [(term, value) for term, value in seeds if term is not None]
            buffer.line("# the chain rule through the gate math, each op's rule from the op registry")
            found = emit_chain_rule(emitter, seeds, spec.leaves)
            _emit_leaf_gradients(buffer, spec, found, split)
        last = " & (o_c * 0 + j_end >= T)" if split else ""  # split: only the chunk holding t = 0
        for pointer, name in zip(dinit, dh0):
            buffer.line(f"tl.store({pointer} + {_in_state_layout(spec, 'o_c')}, {name}, mask=m_c{last})")
        for leaf in spec.leaves:
            buffer.line(f"if G_{leaf.name} == 2:")
            with buffer.indent():
                for part in ("re", "im") if leaf.is_complex else ("v",):
                    pointer = f"p_d{leaf.name}_{part} + o_b * s_d{leaf.name}_b + o_h * s_d{leaf.name}_h + i_k * s_d{leaf.name}_t + o_c * s_d{leaf.name}_c"
                    buffer.line(f"tl.store({pointer}, b_acc_{leaf.name}_{part}, mask=m_c)  # this program's sum over its steps")
    buffer.line("")
    buffer.line("")


def _emit_adjoint_look_back(buffer: IndentedBuffer, spec: ScanSpec, folds: list[str], ends: list[str], scanned: list[str], carries: list[str]) -> None:
    """In a look-back backward: publish this block's fold of the adjoint pairs, then find the
    adjoint carried into it from the blocks later in time (``carries``, zero for the last block)."""
    buffer.line("# publish this block's fold of (w_{t+1}, dy_t) for the blocks before it in time")
    _emit_publish(buffer, folds, [f"tl.sum(tl.where(b_last, {value}, 0.0), axis=0)" for value in scanned], 1)
    buffer.line("# the adjoint carried in from later blocks: their folds composed back to a published adjoint")
    _emit_walk_back(buffer, spec, folds, ends, carries)


def _adjoint_decay(buffer: IndentedBuffer, name: str, value: str, identity: str, split: bool) -> None:
    """``w_{t+1}`` as a block: 0 past the last step; split, also the identity past the chunk's
    end (a chunk's fold must not see them; whole, nothing reads the steps after the last)."""
    if not split:
        _full_mask(buffer, name, value, "0.0", "m_next")
        return
    buffer.line(f"{name} = tl.where(m, tl.where(m_next, {value} + tl.zeros([BT, BC], dtype=ACC), 0.0), {identity})")


def _full_mask(buffer: IndentedBuffer, name: str, value: str, padding: str, mask: str) -> None:
    buffer.line(f"{name} = tl.where({mask}, {value} + tl.zeros([BT, BC], dtype=ACC), {padding})")


_AFFINE_PAIR = '''

@triton.jit
def _affine_pair(a_1, b_1, a_2, b_2):
    # (a1, b1) o (a2, b2) = (a1 a2, a2 b1 + b2): the adjoint of any first-order recurrence is affine
    return a_1 * a_2, a_2 * b_1 + b_2
'''


def generate(specs: list[ScanSpec], source: Source | None, cell: ir.CellIR) -> str:
    """The complete Triton module for ``specs``: prelude, then per recurrence its combine, forward and backward."""
    buffer = IndentedBuffer()
    origin = source.filename if source is not None else "<string>"
    buffer.line(f"# Generated by recdsl from {origin}, cell {cell.name}({', '.join(f'{n}={v}' for n, v in cell.dims)}).")
    buffer.line("# Do not edit: it is regenerated from the checked IR whenever the cell changes.")
    buffer.line("")
    body = _PRELUDE + _AFFINE_PAIR
    for line in body.strip("\n").splitlines():
        buffer.line(line)
    buffer.line("")
    buffer.line("")
    for spec in specs:
        buffer.line(f"# ---- {spec.name}: {spec.kind.value}{' (complex, as (re, im) pairs)' if spec.is_complex else ''} " + "-" * 20)
        buffer.line("")
        _emit_combine(buffer, spec)
        emit_forward(buffer, spec)
        if spec.kind is not ScanKind.MONOID:
            emit_gradient_backward(buffer, spec)
        elif spec.adjoint is not None:
            from .triton_monoid import emit_adjoint_combine, emit_monoid_backward

            emit_adjoint_combine(buffer, spec)
            emit_monoid_backward(buffer, spec)
        if spec.split_passes is SplitPasses.LOOK_BACK:
            buffer.line(f"# {spec.name} with T split across programs (when a call's rows are too few): one pass with a look-back, forward and backward")
            buffer.line("")
            emit_look_back(buffer, spec)
            emit_gradient_backward(buffer, spec, SplitMode.LOOK_BACK)
        else:
            buffer.line(f"# {spec.name} with T split across programs (when a call's rows are too few): fold each chunk, carry, rescan")
            buffer.line("")
            emit_forward(buffer, spec, SplitMode.SUMMARY)
            emit_carries(buffer, spec)
            emit_forward(buffer, spec, SplitMode.CHUNK)
        if spec.kind is not ScanKind.MONOID and spec.split_passes is not SplitPasses.LOOK_BACK:
            emit_backward_summary(buffer, spec)
            emit_carries(buffer, spec, backward=True)
            emit_gradient_backward(buffer, spec, SplitMode.CHUNK)
        elif spec.kind is ScanKind.MONOID and spec.adjoint is not None:
            from .triton_monoid import emit_monoid_backward, emit_monoid_backward_carries, emit_monoid_backward_summary

            emit_monoid_backward_summary(buffer, spec)
            emit_monoid_backward_carries(buffer, spec)
            emit_monoid_backward(buffer, spec, SplitMode.CHUNK)
    return buffer.text()


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
