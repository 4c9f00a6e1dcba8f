"""Evaluating IR expressions with torch, on values that carry leading batch-like dims.

A value of declared type ``[*shape]`` is a tensor ``[*lead, *shape]`` where ``lead`` is
``(B, *heads)`` inside a step, ``(B, T, *heads)`` for a whole sequence, or ``()`` for
params and consts.  The declared shapes follow numpy's rules; this module inserts the
singleton dims that make torch's right-aligned broadcasting agree with them.  One
function per op, in a table keyed like :data:`recdsl.ops.OPS`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from recdsl import ir
from recdsl.ir import Kind, RefKind
from recdsl.ops import OPS, Category


@dataclass(frozen=True)
class Numerics:
    """The dtypes a run computes in: real values in ``real``, complex ones in ``complex``."""

    real: torch.dtype
    device: torch.device

    @property
    def complex(self) -> torch.dtype:
        return torch.complex128 if self.real == torch.float64 else torch.complex64

    def dtype_of(self, kind: Kind) -> torch.dtype:
        return self.complex if kind is Kind.COMPLEX else (torch.bool if kind is Kind.BOOL else self.real)


def lead_dims(value: torch.Tensor, declared: ir.Type) -> int:
    """How many leading (batch, time, head) dims ``value`` has beyond its declared shape."""
    return value.dim() - declared.rank


def align(value: torch.Tensor, declared_rank: int, target_rank: int) -> torch.Tensor:
    """Insert singleton dims after the leading dims so that the declared part has ``target_rank`` dims.

    Values without leading dims need nothing: torch aligns them from the right.
    """
    lead = value.dim() - declared_rank
    if lead == 0 or declared_rank >= target_rank:
        return value
    return value.reshape(value.shape[:lead] + (1,) * (target_rank - declared_rank) + value.shape[lead:])


def imaginary_part(x: torch.Tensor) -> torch.Tensor:
    return torch.imag(x) if x.is_complex() else torch.zeros_like(x)


def real_part(x: torch.Tensor) -> torch.Tensor:
    return torch.real(x) if x.is_complex() else x


def conjugate(x: torch.Tensor) -> torch.Tensor:
    return torch.conj(x).resolve_conj() if x.is_complex() else x


def euclidean_norm(x: torch.Tensor, dim: tuple[int, ...]) -> torch.Tensor:
    """sqrt(sum(|x| ** 2)) over ``dim`` (the modulus for complex ``x``): the torch form of ``norm``."""
    return torch.linalg.vector_norm(x, dim=dim)


def resolve_torch_form(dotted: str) -> Callable[..., torch.Tensor]:
    """The callable a registry row's ``torch`` field names: ``torch.X``, ``F.X`` or ``recdsl.X`` (this module)."""
    namespace, _, attribute = dotted.partition(".")
    owner = {"torch": torch, "F": F, "recdsl": sys.modules[__name__]}[namespace]
    return getattr(owner, attribute)


# The torch form of every elementwise op and reduction, read from the op registry.
ELEMENTWISE: dict[str, Callable[..., torch.Tensor]] = {
    name: resolve_torch_form(spec.torch) for name, spec in OPS.items() if spec.category is Category.ELEMENTWISE and spec.torch
}


def _reduce_dims(rank: int, axis: int | tuple[int, ...] | None) -> tuple[int, ...]:
    # Count from the end so that leading dims never shift the axis.
    if axis is None:
        return tuple(range(-rank, 0))
    return (axis - rank,) if isinstance(axis, int) else tuple(a - rank for a in axis)


def _reduction(function: Callable[..., torch.Tensor]) -> Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]:
    def reduce(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        if not dims:  # a scalar: reduce over a new unit axis (torch reads dim=() as every dim)
            return function(x.unsqueeze(-1), dim=(-1,))
        return function(x, dim=dims)

    return reduce


REDUCTIONS: dict[str, Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]] = {
    name: _reduction(resolve_torch_form(spec.torch)) for name, spec in OPS.items() if spec.category is Category.REDUCTION and spec.torch
}

# The ops whose torch form is written by hand in Evaluator.apply (their own shape handling).
STRUCTURAL_FORMS = frozenset({"matmul", "outer", "diag", "index", "arange", "eye", "softmax", "transpose", "reshape", "concat", "stack"})


def matmul(a: torch.Tensor, a_rank: int, b: torch.Tensor, b_rank: int) -> torch.Tensor:
    """numpy's ``a @ b`` on the declared dims, batched over leading dims."""
    if a_rank == 1 and b_rank == 1:
        return (align(a, 1, 1) * align(b, 1, 1)).sum(-1)
    if a_rank == 1 and b_rank == 2 and b.dim() == 2:
        # A vector (with any leading dims) times one matrix (a param's projection, x @ W): torch's
        # own broadcasting, without the unsqueeze/squeeze pair (two autograd nodes) around it.
        return torch.matmul(a, b)
    a2 = a.unsqueeze(-2) if a_rank == 1 else a
    b2 = b.unsqueeze(-1) if b_rank == 1 else b
    rank = max(a_rank, b_rank, 2)
    a2 = align(a2, max(a_rank, 2), rank)
    b2 = align(b2, max(b_rank, 2), rank)
    out = torch.matmul(a2, b2)
    if a_rank == 1:
        out = out.squeeze(-2)
    if b_rank == 1:
        out = out.squeeze(-1)
    return out


def softmax(x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """exp(x) / sum(exp(x)) over ``dims`` (counted from the end), computed stably; over no dims (a scalar) it is 1."""
    if not dims:
        return torch.ones_like(x)
    if len(dims) == 1:
        return torch.softmax(x, dim=dims[0])
    return torch.exp(x - torch.logsumexp(x, dim=dims, keepdim=True))


def transpose(x: torch.Tensor, rank: int, first: int, second: int) -> torch.Tensor:
    """Swap the declared axes ``first`` and ``second`` of ``x`` (declared rank ``rank``; leading dims kept)."""
    return x.transpose(first - rank, second - rank)


def reshape(x: torch.Tensor, rank: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``x`` with its declared dims (the last ``rank``) reshaped to ``shape`` in row-major order."""
    return x.reshape(x.shape[: x.dim() - rank] + tuple(shape))


def join(op: str, values: list[torch.Tensor], rank: int, axis: int) -> torch.Tensor:
    """``concat`` (along declared ``axis``) or ``stack`` (a new declared ``axis``) of values of declared rank ``rank``.

    The values' leading dims broadcast first (a param joined with an input takes the
    input's batch and time dims).
    """
    leads = [v.shape[: v.dim() - rank] for v in values]
    common = torch.broadcast_shapes(*leads)
    values = [v if v.shape[: v.dim() - rank] == common else v.expand(common + v.shape[v.dim() - rank :]) for v in values]
    if op == "stack":
        return torch.stack(values, dim=axis - (rank + 1))
    return torch.cat(values, dim=axis - rank)


def _index_key(items: tuple) -> tuple:
    key: list = [Ellipsis]
    for item in items:
        if item == ir.NEW_AXIS:
            key.append(None)
        elif isinstance(item, ir.SliceItem):
            key.append(slice(item.start, item.stop))
        else:
            key.append(item)
    return tuple(key)


class Evaluator:
    """Evaluates IR expressions given the tensors of the refs they read.

    ``values`` maps ``(RefKind, label)`` to tensors (any mapping: a lazy one may compute a
    binding on first use).  Each node's value is memoised by identity; with ``shared=True``
    the memo lives as long as the evaluator, so subexpressions common to several
    expressions of one run (a decay and its logarithm, say) are computed once.  Only
    share it while ``values`` do not change.
    """

    def __init__(self, numerics: Numerics, values: Mapping[tuple[RefKind, str], torch.Tensor], shared: bool = False) -> None:
        self.numerics = numerics
        self.values = values
        # id(node) -> (node, value): the node is kept so that its id cannot be reused.
        self._shared: dict[int, tuple[ir.Expr, torch.Tensor]] | None = {} if shared else None

    def seed(self, node: ir.Expr, value: torch.Tensor) -> None:
        """Give the shared memo the value of ``node`` (computed elsewhere, e.g. for all steps at once)."""
        assert self._shared is not None, "seed() needs an evaluator with a shared memo"
        self._shared[id(node)] = (node, value)

    def literal(self, node: ir.Literal) -> torch.Tensor:
        return torch.tensor(node.value, dtype=self.numerics.dtype_of(node.type.kind), device=self.numerics.device)

    def evaluate(self, expr: ir.Expr, known: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
        """The value of ``expr``; ``known`` gives values of subexpressions by ``id`` (substitutions)."""
        memo = self._shared if self._shared is not None and not known else {}
        if known:
            memo.update({key: (None, value) for key, value in known.items()})  # type: ignore[misc]
        return self._eval(expr, memo)

    def _eval(self, node: ir.Expr, memo: dict[int, tuple[ir.Expr, torch.Tensor]]) -> torch.Tensor:
        key = id(node)
        hit = memo.get(key)
        if hit is not None and (hit[0] is node or hit[0] is None):
            return hit[1]
        if isinstance(node, ir.Literal):
            result = self.literal(node)
        elif isinstance(node, ir.Ref):
            result = self.values[(node.kind, node.label)]
        else:
            args = [self._eval(a, memo) for a in node.args]
            result = self.apply(node, args)
        memo[key] = (node, result)
        return result

    def apply(self, node: ir.Op, args: list[torch.Tensor]) -> torch.Tensor:
        op, rank = node.op, node.type.rank
        if op in ELEMENTWISE:
            aligned = [align(a, arg.type.rank, rank) for a, arg in zip(args, node.args)]
            if node.type.kind is not Kind.BOOL and op not in ("real", "imag", "abs", "where"):
                aligned = [self._as_value(a, node.type.kind) for a in aligned]
            if op == "where":
                aligned = [aligned[0]] + [self._as_value(a, node.type.kind) for a in aligned[1:]]
            return ELEMENTWISE[op](*aligned)
        if op in REDUCTIONS:
            (value,) = args
            (axis,) = node.attrs
            return REDUCTIONS[op](self._as_value(value, node.type.kind), _reduce_dims(node.args[0].type.rank, axis))
        if op == "matmul":
            a, b = (self._as_value(x, node.type.kind) for x in args)
            return matmul(a, node.args[0].type.rank, b, node.args[1].type.rank)
        if op == "outer":
            u, v = (self._as_value(x, node.type.kind) for x in args)
            return u.unsqueeze(-1) * v.unsqueeze(-2)
        if op == "diag":
            (value,) = args
            if node.args[0].type.rank == 1:
                return torch.diag_embed(value)
            return torch.diagonal(value, dim1=-2, dim2=-1)
        if op == "index":
            return args[0][_index_key(node.attrs)]
        if op == "softmax":
            (value,) = args
            (axis,) = node.attrs
            return softmax(self._as_value(value, node.type.kind), _reduce_dims(node.args[0].type.rank, axis))
        if op == "transpose":
            return transpose(args[0], node.args[0].type.rank, *node.attrs)
        if op == "reshape":
            return reshape(args[0], node.args[0].type.rank, node.type.shape)
        if op in ("concat", "stack"):
            values = [self._as_value(a, node.type.kind) for a in args]
            return join(op, values, node.args[0].type.rank, node.attrs[0])
        if op == "arange":
            return torch.arange(node.attrs[0], dtype=self.numerics.real, device=self.numerics.device)
        if op == "eye":
            return torch.eye(node.attrs[0], dtype=self.numerics.real, device=self.numerics.device)
        raise NotImplementedError(f"no torch implementation of op '{op}'")

    def _as_value(self, value: torch.Tensor, kind: Kind) -> torch.Tensor:
        """Cast booleans and real operands of complex ops to the computing dtype."""
        if kind is Kind.COMPLEX:
            return value if value.dtype == self.numerics.complex else value.to(self.numerics.complex)
        if value.dtype == torch.bool or (kind is Kind.REAL and value.dtype != self.numerics.real and not value.is_complex()):
            return value.to(self.numerics.real)
        return value


def combine_carries(
    monoid: ir.MonoidIR, earlier: Mapping[str, torch.Tensor], later: Mapping[str, torch.Tensor], numerics: Numerics
) -> dict[str, torch.Tensor]:
    """The monoid's ``combine(earlier, later)`` on carries with any (matching) leading dims."""
    values: dict[tuple[RefKind, str], torch.Tensor] = {}
    left, right = monoid.operands
    for carry in monoid.carries:
        values[(RefKind.CARRY_LEFT, f"{left}.{carry.name}")] = earlier[carry.name]
        values[(RefKind.CARRY_RIGHT, f"{right}.{carry.name}")] = later[carry.name]
    evaluator = Evaluator(numerics, values)
    for assign in monoid.body:
        values[(RefKind.LOCAL, assign.name)] = evaluator.evaluate(assign.value)
    result = {}
    for carry, expr in zip(monoid.carries, monoid.results):
        value = evaluator.evaluate(expr)
        if value.dim() > expr.type.rank:  # a lower-rank result broadcasts to the carry's shape
            value = align(value, expr.type.rank, carry.type.rank)
        lead = max(earlier[carry.name].dim(), later[carry.name].dim()) - carry.type.rank
        target = torch.broadcast_shapes(earlier[carry.name].shape[:lead] + carry.type.shape, later[carry.name].shape[:lead] + carry.type.shape)
        result[carry.name] = value.expand(target) if tuple(value.shape) != tuple(target) else value
    return result
