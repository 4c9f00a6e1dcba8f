"""Shape and type rules of every operation: one function, :func:`result_type`.

The checker calls it to type the user's expressions (and turns a :class:`RuleViolation`
into a located error); the analysis calls it (through :func:`make`) when it builds new IR
while rewriting updates.  Both therefore agree on every node's type by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Sequence

from . import ir
from .ir import Kind, Type
from .ops import OPS, Accepts, Category, Returns

BROADCAST_EXPECTED = "shapes that are equal or 1 in each dim, aligned from the right (numpy broadcasting)"


class Violation(Enum):
    SHAPE = "shape"  # becomes a ShapeError
    TYPE = "type"  # becomes a TypeCheckError


@dataclass
class RuleViolation(Exception):
    """An op applied to operands its rule rejects; ``operand`` is the offending one, if any."""

    violation: Violation
    message: str
    expected: str | None = None
    operand: int | None = None

    def __str__(self) -> str:
        return self.message


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...] | None:
    """numpy's broadcast of ``shapes``, or None when they do not broadcast."""
    rank = max((len(s) for s in shapes), default=0)
    result = []
    for axis in range(rank):
        sizes = {s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0}
        sizes.discard(1)
        if len(sizes) > 1:
            return None
        result.append(sizes.pop() if sizes else 1)
    return tuple(result)


def matmul_shape(left: tuple[int, ...], right: tuple[int, ...]) -> tuple[int, ...] | str:
    """numpy's matmul result shape, or a sentence saying why the operands do not fit."""
    if not left or not right:
        return "'@' needs operands of at least one dim; use '*' to scale by a scalar"
    a = (1,) + left if len(left) == 1 else left
    b = right + (1,) if len(right) == 1 else right
    if a[-1] != b[-2]:
        return f"the inner dims differ: {a[-1]} (last of the left operand) and {b[-2]} (first matrix dim of the right operand)"
    batch = broadcast_shapes(a[:-2], b[:-2])
    if batch is None:
        return "the leading (batch) dims do not broadcast"
    shape = batch + (a[-2], b[-1])
    if len(left) == 1:
        shape = shape[:-2] + shape[-1:]
    if len(right) == 1:
        shape = shape[:-1]
    return shape


def format_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def promote(*kinds: Kind) -> Kind:
    return Kind.COMPLEX if Kind.COMPLEX in kinds else Kind.REAL


def check_kinds(op: str, kinds: Sequence[Kind]) -> None:
    """Raise a :class:`RuleViolation` when an operand's element kind is not accepted by ``op``."""
    spec = OPS[op]
    for position, kind in enumerate(kinds):
        if op == "where" and position == 0:
            if kind is not Kind.BOOL:
                raise RuleViolation(Violation.TYPE, "the condition of where() must be a comparison", "a boolean such as x > 0", position)
            continue
        if spec.accepts is Accepts.REAL and kind is Kind.COMPLEX:
            raise RuleViolation(Violation.TYPE, f"'{spec.surface}' needs real operands, got a complex value", "a real value (use real(z), imag(z) or abs(z))", position)


def result_kind(op: str, kinds: Sequence[Kind]) -> Kind:
    """The element kind of ``op`` applied to operands of ``kinds``."""
    spec = OPS[op]
    if spec.returns is Returns.REAL:
        return Kind.REAL
    if spec.returns is Returns.BOOL:
        return Kind.BOOL
    if spec.returns is Returns.CONDITIONAL:
        if op in ("index", "transpose", "reshape"):
            return kinds[0]
        return promote(*(kinds[1:] if op == "where" else kinds))
    return promote(*kinds)


def reduction_axes(rank: int, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    """The axes a reduction's (or softmax's) ``attrs[0]`` names: None is every axis, an int one, a tuple several."""
    if axis is None:
        return tuple(range(rank))
    return (axis,) if isinstance(axis, int) else tuple(axis)


def reduced_shape(shape: tuple[int, ...], axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    axes = reduction_axes(len(shape), axis)
    return tuple(size for position, size in enumerate(shape) if position not in axes)


def reshaped(shape: tuple[int, ...], target: tuple[int, ...]) -> tuple[int, ...] | str:
    """``target`` with its one ``-1`` (if any) resolved for ``shape``'s elements, or a sentence saying why it does not fit."""
    count = math.prod(shape)
    known = math.prod(size for size in target if size != -1)
    if -1 in target:
        if known == 0 or count % known:
            return f"{count} elements cannot be split into {format_shape(target)}"
        target = tuple(count // known if size == -1 else size for size in target)
    elif known != count:
        return f"{format_shape(shape)} holds {count} elements and {format_shape(target)} holds {known}"
    return target


def joined_shape(op: str, shapes: Sequence[tuple[int, ...]], axis: int) -> tuple[int, ...] | tuple[int, str]:
    """The shape of ``concat`` (along ``axis``) or ``stack`` (a new ``axis``) of ``shapes``,
    or ``(position, sentence)``: the first operand that does not fit, and why."""
    first = shapes[0]
    for position, shape in enumerate(shapes[1:], start=1):
        if op == "stack" and shape != first:
            return position, f"operand {position + 1} has shape {format_shape(shape)} and operand 1 {format_shape(first)}"
        if op == "concat" and (len(shape) != len(first) or shape[:axis] + shape[axis + 1 :] != first[:axis] + first[axis + 1 :]):
            return position, f"operand {position + 1} has shape {format_shape(shape)} and operand 1 {format_shape(first)}, which differ outside axis {axis}"
    if op == "stack":
        return first[:axis] + (len(shapes),) + first[axis:]
    return first[:axis] + (sum(shape[axis] for shape in shapes),) + first[axis + 1 :]


def index_shape(shape: tuple[int, ...], items: tuple) -> tuple[int, ...]:
    """The shape a checked index (``Op('index').attrs``: ints, SliceItems, NEW_AXIS) selects from ``shape``."""
    result: list[int] = []
    axis = 0
    for item in items:
        if item == ir.NEW_AXIS:
            result.append(1)
        elif isinstance(item, ir.SliceItem):
            result.append(len(range(*slice(item.start, item.stop).indices(shape[axis]))))
            axis += 1
        else:
            axis += 1
    result.extend(shape[axis:])
    return tuple(result)


def result_type(op: str, args: Sequence[Type], attrs: tuple = ()) -> Type:
    """The type of ``op(args)`` with static operands ``attrs``; a :class:`RuleViolation` if it has none.

    Element kinds are checked first, then shapes by the op's category: numpy broadcasting
    (elementwise), numpy matmul, reductions over ``attrs[0]`` (None: all axes; an int or a
    tuple of ints), and the structural rules of ``outer``, ``diag``, ``index``, ``softmax``
    (``attrs[0]`` its axes, shape kept), ``transpose`` (``attrs``: the two axes), ``reshape``
    (``attrs``: the target dims), ``concat``/``stack`` (``attrs[0]``: the axis), ``arange`` and ``eye``.
    """
    spec = OPS[op]
    kinds = [a.kind for a in args]
    check_kinds(op, kinds)
    kind = result_kind(op, kinds)
    shapes = [a.shape for a in args]
    category = spec.category
    if category is Category.ELEMENTWISE:
        shape = broadcast_shapes(*shapes)
        if shape is None:
            listing = " and ".join(format_shape(s) for s in shapes)
            raise RuleViolation(Violation.SHAPE, f"shapes {listing} do not broadcast in '{spec.surface}'", BROADCAST_EXPECTED)
        return Type(shape, kind)
    if category is Category.MATMUL:
        shape = matmul_shape(*shapes)
        if isinstance(shape, str):
            raise RuleViolation(
                Violation.SHAPE,
                f"cannot multiply {format_shape(shapes[0])} @ {format_shape(shapes[1])}: {shape}",
                "numpy matmul shapes, e.g. [k] @ [k, n] or [m, k] @ [k]",
            )
        return Type(shape, kind)
    if category is Category.REDUCTION:
        (axis,) = attrs
        return Type(reduced_shape(shapes[0], axis), kind)
    if category is Category.CONSTANT:
        (size,) = attrs
        return Type((size,) if op == "arange" else (size, size), kind)
    if op == "outer":
        for position, shape in enumerate(shapes):
            if len(shape) != 1:
                raise RuleViolation(Violation.SHAPE, f"outer() needs vectors, got shape {format_shape(shape)}", "a value of shape [n]", position)
        return Type((shapes[0][0], shapes[1][0]), kind)
    if op == "diag":
        (shape,) = shapes
        if len(shape) == 1:
            return Type((shape[0], shape[0]), kind)
        if len(shape) == 2:
            return Type((min(shape),), kind)
        raise RuleViolation(Violation.SHAPE, f"diag() needs a vector or a matrix, got shape {format_shape(shape)}", "a value of shape [n] or [m, n]")
    if op == "index":
        return Type(index_shape(shapes[0], attrs), kind)
    if op == "softmax":
        return Type(shapes[0], kind)
    if op == "transpose":
        first, second = attrs
        swapped = list(shapes[0])
        swapped[first], swapped[second] = swapped[second], swapped[first]
        return Type(tuple(swapped), kind)
    if op == "reshape":
        target = reshaped(shapes[0], tuple(attrs))
        if isinstance(target, str):
            raise RuleViolation(Violation.SHAPE, f"cannot reshape {format_shape(shapes[0])} to {format_shape(tuple(attrs))}: {target}", "dims whose product is the number of elements (one of them may be -1)")
        return Type(target, kind)
    if op in ("concat", "stack"):
        (axis,) = attrs
        if op == "concat" and any(len(shape) == 0 for shape in shapes):
            raise RuleViolation(Violation.SHAPE, "concat() cannot join scalars", "values of at least one dim (stack() joins scalars into a vector)", next(i for i, s in enumerate(shapes) if not s))
        joined = joined_shape(op, shapes, axis)
        if isinstance(joined[-1], str):
            position, why = joined
            expected = "the same shape for every operand" if op == "stack" else f"shapes equal except along axis {axis}"
            raise RuleViolation(Violation.SHAPE, f"cannot {op} these values: {why}", expected, position)
        return Type(tuple(joined), kind)
    raise RuleViolation(Violation.TYPE, f"'{spec.surface}' cannot be applied here")  # pragma: no cover - every category is handled


def make(op: str, *args: ir.Expr, attrs: tuple = ()) -> ir.Op:
    """The IR node ``op(args)`` with its type from :func:`result_type` (for passes that build IR)."""
    return ir.Op(op, tuple(args), result_type(op, [a.type for a in args], attrs), attrs)


def fold_constant(expr: ir.Expr) -> int | float | complex | None:
    """The value of a scalar expression of literals, by the registry's folding rules; None if it reads anything else."""
    if isinstance(expr, ir.Literal):
        return expr.value
    if not isinstance(expr, ir.Op) or expr.type.rank != 0:
        return None
    fold = OPS[expr.op].fold
    if fold is None:
        return None
    args = [fold_constant(arg) for arg in expr.args]
    if any(arg is None for arg in args):
        return None
    try:
        return fold(*args)
    except (ArithmeticError, ValueError, TypeError):
        return None
