"""The operations of the language: one registry row each, with every rule about the op.

A row (:class:`OpSpec`) holds, in one place,

- its surface name, arity and category (which picks its shape rule in :mod:`recdsl.shapes`),
- the element kinds it accepts and returns (its type rule),
- ``laws``: the algebraic laws the analysis may rely on (:class:`Law`),
- ``fold``: how to evaluate it on Python numbers (constant folding in the checker and in
  kernel planning), or None when it is never folded,
- ``torch``: its torch form, a dotted name that :mod:`recdsl.backends.torch_ops` resolves
  (``torch.exp``, ``F.silu``, or ``recdsl.NAME`` for a helper defined there); None for the
  structural ops whose torch form is written by hand beside :class:`~recdsl.backends.torch_ops.Evaluator`,
- ``triton``: its elementwise Triton expression, a template over the operands' temporaries
  (``{0}``, ``{1}``, ...), or None when the op is not fused into kernels (then the
  kernel receives its value as a leaf computed by torch); ``triton_complex`` says
  whether the Triton emitter has a form for complex operands,
- ``derivative``: each operand's share of the adjoint, a :class:`Term` over the result's
  adjoint ``G``, the result ``F`` and the operands ``X``, ``Y``, ``Z`` (None: no gradient
  flows there), written once and printed by every code generator in its own language (the
  fused C loop, the fused Triton kernel, the Triton scan kernels' backward);
  ``derivative_complex`` the same for complex operands where the rule is not the real one
  applied to conjugates (see :class:`Term`).

Nothing here imports torch or triton: the backends read these strings.  Adding an op
means adding its row; ``tests/test_registry.py`` fails when a row lacks a form that a
backend claims (a torch form for every op, a Triton form for every elementwise op).
"""

from __future__ import annotations

import cmath
import math
import operator
from dataclasses import dataclass, replace
from enum import Enum
from typing import Callable


class Category(str, Enum):
    ELEMENTWISE = "elementwise"  # numpy broadcasting of every operand
    REDUCTION = "reduction"  # (x) or (x, axis, ...) over the per-step shape
    MATMUL = "matmul"  # numpy matmul rules
    STRUCTURAL = "structural"  # outer, diag, index: their own shape rule
    CONSTANT = "constant"  # arange(n), eye(n): static size, no tensor operands


class Accepts(str, Enum):
    REAL = "real"  # real (bool promotes to real)
    NUMBER = "number"  # real or complex
    ANY = "any"  # real, complex or bool


class Returns(str, Enum):
    PROMOTED = "promoted"  # complex if any operand is complex, else real
    REAL = "real"
    BOOL = "bool"
    CONDITIONAL = "conditional"  # where: the promotion of the last two operands; index, transpose, reshape: its operand's kind


class Law(Enum):
    """Algebraic laws of an op, the facts the classifier is allowed to use."""

    ASSOCIATIVE = "f(f(a, b), c) = f(a, f(b, c))"
    COMMUTATIVE = "f(a, b) = f(b, a)"
    # f(a + b) = f(a) + f(b) and f(c a) = c f(a): linear in its single tensor operand.
    LINEAR = "f(a + b) = f(a) + f(b), f(c a) = c f(a)"
    # Linear in each operand when the others are held fixed: f(a, b + c) = f(a, b) + f(a, c).
    BILINEAR = "f(a, b + c) = f(a, b) + f(a, c)"
    # Commutes with indexing and broadcasting of its operands: f(a)[i] = f(a[i]).
    POINTWISE = "f(a)[i] = f(a[i])"
    # Positive wherever it is defined (exp, sigmoid, softplus): the chunked forms take logs of such decays.
    POSITIVE = "f(x) > 0"


# ``max_args`` of the ops that take any number of operands (concat, stack) or of axes
# (reductions, softmax, reshape's dims).
VARIADIC = 1 << 30


@dataclass(frozen=True)
class OpSpec:
    name: str  # the IR name
    surface: str  # the function name or operator symbol in the language
    min_args: int
    max_args: int
    category: Category
    accepts: Accepts
    returns: Returns
    doc: str
    laws: frozenset[Law] = frozenset()
    fold: Callable[..., object] | None = None
    torch: str | None = None
    triton: str | None = None
    triton_complex: bool = False
    derivative: "tuple[Term | None, ...] | None" = None
    derivative_complex: "tuple[Term | None, ...] | None" = None

    def has(self, law: Law) -> bool:
        return law in self.laws


def _table(*rows: OpSpec) -> dict[str, OpSpec]:
    table = {row.name: row for row in rows}
    assert len(table) == len(rows), "two registry rows share a name"
    return table


E, R, M, S, C = Category.ELEMENTWISE, Category.REDUCTION, Category.MATMUL, Category.STRUCTURAL, Category.CONSTANT
A, CM, LIN, BI, PW, POS = Law.ASSOCIATIVE, Law.COMMUTATIVE, Law.LINEAR, Law.BILINEAR, Law.POINTWISE, Law.POSITIVE


def _number_function(real: Callable, complex_: Callable | None = None) -> Callable:
    """A fold that uses ``complex_`` for complex operands (cmath) and ``real`` otherwise (math)."""

    def fold(*args):
        if complex_ is not None and any(isinstance(a, complex) for a in args):
            return complex_(*args)
        return real(*args)

    return fold


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sign(x: float) -> float:
    if x != x:  # NaN stays NaN, as in torch.sign
        return x
    return float((x > 0) - (x < 0))


def _clamp(x: float, low: float, high: float) -> float:
    # min(max(x, low), high): torch.clamp's order, so low > high gives high.
    return min(max(x, low), high)


def _logaddexp(a: float, b: float) -> float:
    high = max(a, b)
    if high == -math.inf:
        return -math.inf
    return high + math.log1p(math.exp(-abs(a - b)))


# ---- derivative rules ------------------------------------------------------------


class TermLeaf(Enum):
    """What a leaf of a derivative rule stands for."""

    ADJOINT = "G"  # the adjoint of the op's result
    RESULT = "F"  # the op's result
    OPERAND = "operand"  # one of the op's operands (``Term.index``)
    NUMBER = "number"  # a number (``Term.value``)


@dataclass(frozen=True)
class Term:
    """One node of a derivative rule: a registry op applied to terms, or a leaf.

    A rule gives one operand's share of the adjoint (the adjoint already multiplied in), in
    the conventions of torch's ``derivatives.yaml`` so that every backend's gradients agree
    with the sequential backend's to rounding: ties of max/min split the gradient, relu'(0)
    = 0, ... .  Rules are written for real values.  For complex operands of a holomorphic op
    (add, mul, exp, ...) torch's gradient is ``G * conj(f'(z))``, which is the real rule
    evaluated at the conjugated operands and result (``f'`` has real coefficients); the
    non-holomorphic ops (conj, real, imag, abs) give their complex rule in
    ``OpSpec.derivative_complex``.  Code generators print a rule with :meth:`render`.
    """

    op: str | None = None
    args: tuple["Term", ...] = ()
    leaf: TermLeaf | None = None
    index: int = 0
    value: float | complex = 0.0

    def render(self, apply: Callable[[str, list[str]], str], leaf: Callable[["Term"], str]) -> str:
        """The rule as text: ``apply(op, operand_texts)`` for each op, ``leaf(term)`` for each leaf."""
        if self.op is None:
            return leaf(self)
        return apply(self.op, [arg.render(apply, leaf) for arg in self.args])

    def evaluate(self, operands: list, result, adjoint):
        """The rule's value on Python numbers, by the registry's folds (for tests)."""
        if self.op is not None:
            return OPS[self.op].fold(*(arg.evaluate(operands, result, adjoint) for arg in self.args))  # type: ignore[misc]
        match self.leaf:
            case TermLeaf.ADJOINT:
                return adjoint
            case TermLeaf.RESULT:
                return result
            case TermLeaf.OPERAND:
                return operands[self.index]
            case _:
                return self.value

    def _binary(self, op: str, other, swap: bool = False) -> "Term":
        other = other if isinstance(other, Term) else Term(leaf=TermLeaf.NUMBER, value=other)
        return Term(op, (other, self) if swap else (self, other))

    def __add__(self, other) -> "Term":
        return self._binary("add", other)

    def __radd__(self, other) -> "Term":
        return self._binary("add", other, swap=True)

    def __sub__(self, other) -> "Term":
        return self._binary("sub", other)

    def __rsub__(self, other) -> "Term":
        return self._binary("sub", other, swap=True)

    def __mul__(self, other) -> "Term":
        return self._binary("mul", other)

    def __rmul__(self, other) -> "Term":
        return self._binary("mul", other, swap=True)

    def __truediv__(self, other) -> "Term":
        return self._binary("div", other)

    def __rtruediv__(self, other) -> "Term":
        return self._binary("div", other, swap=True)

    def __neg__(self) -> "Term":
        return Term("neg", (self,))


def _call(op: str, *args) -> Term:
    return Term(op, tuple(a if isinstance(a, Term) else Term(leaf=TermLeaf.NUMBER, value=a) for a in args))


G = Term(leaf=TermLeaf.ADJOINT)
F = Term(leaf=TermLeaf.RESULT)  # the result, f(x)
X, Y, Z = (Term(leaf=TermLeaf.OPERAND, index=i) for i in range(3))
_NONE2: tuple[None, None] = (None, None)


def _max_rules(lose_x: str, lose_y: str) -> tuple[Term, Term]:
    x_share = _call("where", _call(lose_x, X, Y), 0.0, _call("where", _call("eq", X, Y), G / 2.0, G))
    y_share = _call("where", _call(lose_y, X, Y), 0.0, _call("where", _call("eq", X, Y), G / 2.0, G))
    return x_share, y_share


_POW_BASE = _call("where", _call("eq", Y, 0.0), 0.0, G * Y * _call("pow", X, Y - 1.0))
_POW_EXPONENT_VALUE = G * F * _call("log", X)
_POW_EXPONENT = _call("where", _call("eq", X, 0.0), _call("where", _call("ge", Y, 0.0), 0.0, _POW_EXPONENT_VALUE), _POW_EXPONENT_VALUE)
# torch's clamp_backward and clamp_backward_min_max: x inside [lo, hi] passes the gradient;
# below lo it goes to lo (when lo < hi), above hi (or when hi < lo) to hi.
_CLAMP = (
    _call("where", _call("ge", X, Y), _call("where", _call("le", X, Z), G, 0.0), 0.0),
    _call("where", _call("lt", X, Y), _call("where", _call("lt", Y, Z), G, 0.0), 0.0),
    _call("where", _call("gt", X, Z), G, _call("where", _call("lt", Z, Y), G, 0.0)),
)

DERIVATIVES: dict[str, tuple[Term | None, ...]] = {
    "add": (G, G),
    "sub": (G, -G),
    "mul": (G * Y, G * X),
    "div": (G / Y, -G * X / (Y * Y)),
    "floordiv": _NONE2,  # a step function: no gradient flows (torch has no derivative for it)
    "pow": (_POW_BASE, _POW_EXPONENT),
    "neg": (-G,),
    "lt": _NONE2, "le": _NONE2, "gt": _NONE2, "ge": _NONE2, "eq": _NONE2, "ne": _NONE2,
    "exp": (G * F,),
    "log": (G / X,),
    "sqrt": (G / (2.0 * F),),
    "abs": (G * _call("sign", X),),
    "tanh": (G * (1.0 - F * F),),
    "sigmoid": (G * (1.0 - F) * F,),
    "logsigmoid": (G / (1.0 + _call("exp", X)),),
    "softplus": (_call("where", _call("gt", X, 20.0), G, G * _call("sigmoid", X)),),  # torch's threshold 20
    "silu": (G * _call("sigmoid", X) * (1.0 + X * (1.0 - _call("sigmoid", X))),),
    "relu": (_call("where", _call("gt", F, 0.0), G, 0.0),),
    "cos": (-G * _call("sin", X),),
    "sin": (G * _call("cos", X),),
    "log1p": (G / (1.0 + X),),
    "expm1": (G * (F + 1.0),),
    "real": (G,),
    "imag": (None,),  # of a real operand: 0
    "conj": (G,),
    "maximum": _max_rules("lt", "gt"),
    "minimum": _max_rules("gt", "lt"),
    "logaddexp": (G / (1.0 + _call("exp", Y - X)), G / (1.0 + _call("exp", X - Y))),
    "where": (None, _call("where", X, G, 0.0), _call("where", X, 0.0, G)),
    "clamp": _CLAMP,
    "sign": (None,),
}

# The non-holomorphic ops' rules for a complex operand (torch's convention: the gradient of
# a real loss w.r.t. z is dL/dRe(z) + i dL/dIm(z)).
DERIVATIVES_COMPLEX: dict[str, tuple[Term | None, ...]] = {
    "conj": (_call("conj", G),),
    "real": (G,),
    "imag": (G * 1j,),
    "abs": (G * X / F,),
}


OPS: dict[str, OpSpec] = _table(
    # arithmetic operators
    OpSpec("add", "+", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a + b", frozenset({A, CM, PW}), operator.add, "torch.add", "{0} + {1}", True),
    OpSpec("sub", "-", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a - b", frozenset({PW}), operator.sub, "torch.sub", "{0} - {1}", True),
    OpSpec("mul", "*", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a * b", frozenset({A, CM, BI, PW}), operator.mul, "torch.mul", "{0} * {1}", True),
    OpSpec("div", "/", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a / b", frozenset({PW}), operator.truediv, "torch.div", "{0} / {1}", True),
    OpSpec("floordiv", "//", 2, 2, E, Accepts.REAL, Returns.REAL, "floor(a / b)", frozenset({PW}), operator.floordiv, "torch.floor_divide", "tl.floor({0} / {1})"),
    OpSpec("pow", "**", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a ** b", frozenset({PW}), operator.pow, "torch.pow", "tl.exp({1} * tl.log({0}))"),
    OpSpec("neg", "-", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "-a", frozenset({LIN, PW}), operator.neg, "torch.neg", "-{0}", True),
    OpSpec("matmul", "@", 2, 2, M, Accepts.NUMBER, Returns.PROMOTED, "a @ b with numpy's matmul rules", frozenset({BI})),
    # comparisons
    OpSpec("lt", "<", 2, 2, E, Accepts.REAL, Returns.BOOL, "a < b", frozenset({PW}), operator.lt, "torch.lt", "{0} < {1}"),
    OpSpec("le", "<=", 2, 2, E, Accepts.REAL, Returns.BOOL, "a <= b", frozenset({PW}), operator.le, "torch.le", "{0} <= {1}"),
    OpSpec("gt", ">", 2, 2, E, Accepts.REAL, Returns.BOOL, "a > b", frozenset({PW}), operator.gt, "torch.gt", "{0} > {1}"),
    OpSpec("ge", ">=", 2, 2, E, Accepts.REAL, Returns.BOOL, "a >= b", frozenset({PW}), operator.ge, "torch.ge", "{0} >= {1}"),
    OpSpec("eq", "==", 2, 2, E, Accepts.NUMBER, Returns.BOOL, "a == b", frozenset({CM, PW}), operator.eq, "torch.eq", "{0} == {1}"),
    OpSpec("ne", "!=", 2, 2, E, Accepts.NUMBER, Returns.BOOL, "a != b", frozenset({CM, PW}), operator.ne, "torch.ne", "{0} != {1}"),
    # elementwise functions
    OpSpec("exp", "exp", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "e ** x", frozenset({PW, POS}), _number_function(math.exp, cmath.exp), "torch.exp", "tl.exp({0})", True),
    OpSpec("log", "log", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "natural logarithm", frozenset({PW}), _number_function(math.log, cmath.log), "torch.log", "tl.log({0})"),
    OpSpec("sqrt", "sqrt", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "square root", frozenset({PW}), _number_function(math.sqrt, cmath.sqrt), "torch.sqrt", "tl.sqrt({0})"),
    OpSpec("abs", "abs", 1, 1, E, Accepts.NUMBER, Returns.REAL, "absolute value (modulus for complex)", frozenset({PW}), abs, "torch.abs", "tl.abs({0})", True),
    # tanh(x) = 2 sigmoid(2x) - 1
    OpSpec("tanh", "tanh", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "hyperbolic tangent", frozenset({PW}), _number_function(math.tanh, cmath.tanh), "torch.tanh", "2.0 / (1.0 + tl.exp(-2.0 * {0})) - 1.0"),
    OpSpec("sigmoid", "sigmoid", 1, 1, E, Accepts.REAL, Returns.REAL, "1 / (1 + exp(-x))", frozenset({PW, POS}), _sigmoid, "torch.sigmoid", "1.0 / (1.0 + tl.exp(-{0}))"),
    # log(sigmoid(x)) = min(x, 0) - log(1 + e^-|x|)
    OpSpec("logsigmoid", "logsigmoid", 1, 1, E, Accepts.REAL, Returns.REAL, "log(sigmoid(x)), computed stably", frozenset({PW}), lambda x: -_softplus(-x), "F.logsigmoid", "tl.minimum({0}, 0.0) - tl.log(1.0 + tl.exp(-tl.abs({0})))"),
    # log(1 + e^x) = max(x, 0) + log(1 + e^-|x|)
    OpSpec("softplus", "softplus", 1, 1, E, Accepts.REAL, Returns.REAL, "log(1 + exp(x)), computed stably", frozenset({PW, POS}), _softplus, "F.softplus", "tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0})))"),
    OpSpec("silu", "silu", 1, 1, E, Accepts.REAL, Returns.REAL, "x * sigmoid(x)", frozenset({PW}), lambda x: x * _sigmoid(x), "F.silu", "{0} / (1.0 + tl.exp(-{0}))"),
    OpSpec("relu", "relu", 1, 1, E, Accepts.REAL, Returns.REAL, "max(x, 0)", frozenset({PW}), lambda x: max(x, 0.0), "torch.relu", "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)"),
    OpSpec("cos", "cos", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "cosine", frozenset({PW}), _number_function(math.cos, cmath.cos), "torch.cos", "tl.cos({0})"),
    OpSpec("sin", "sin", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "sine", frozenset({PW}), _number_function(math.sin, cmath.sin), "torch.sin", "tl.sin({0})"),
    OpSpec("log1p", "log1p", 1, 1, E, Accepts.REAL, Returns.REAL, "log(1 + x), accurate near 0", frozenset({PW}), math.log1p, "torch.log1p", "tl.log(1.0 + {0})"),
    OpSpec("expm1", "expm1", 1, 1, E, Accepts.REAL, Returns.REAL, "exp(x) - 1, accurate near 0", frozenset({PW}), math.expm1, "torch.expm1", "tl.exp({0}) - 1.0"),
    OpSpec("real", "real", 1, 1, E, Accepts.NUMBER, Returns.REAL, "real part", frozenset({LIN, PW}), lambda x: x.real, "recdsl.real_part", "{0}", True),
    OpSpec("imag", "imag", 1, 1, E, Accepts.NUMBER, Returns.REAL, "imaginary part", frozenset({LIN, PW}), lambda x: x.imag, "recdsl.imaginary_part", "{0} * 0.0", True),
    OpSpec("conj", "conj", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "complex conjugate", frozenset({LIN, PW}), lambda x: x.conjugate(), "recdsl.conjugate", "{0}", True),
    OpSpec("maximum", "max", 2, 2, E, Accepts.REAL, Returns.REAL, "elementwise maximum of two operands", frozenset({A, CM, PW}), max, "torch.maximum", "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    OpSpec("minimum", "min", 2, 2, E, Accepts.REAL, Returns.REAL, "elementwise minimum of two operands", frozenset({A, CM, PW}), min, "torch.minimum", "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"),
    OpSpec("logaddexp", "logaddexp", 2, 2, E, Accepts.REAL, Returns.REAL, "log(exp(a) + exp(b)), computed stably", frozenset({A, CM, PW}), _logaddexp, "torch.logaddexp", "_logaddexp({0}, {1})"),
    OpSpec("where", "where", 3, 3, E, Accepts.ANY, Returns.CONDITIONAL, "where(condition, a, b): a where condition holds, else b", frozenset({PW}), lambda c, a, b: a if c else b, "torch.where", "tl.where({0}, {1}, {2})"),
    # clamp(x, lo, hi) = min(max(x, lo), hi), torch.clamp's order (lo > hi gives hi)
    OpSpec("clamp", "clamp", 3, 3, E, Accepts.REAL, Returns.REAL, "clamp(x, lo, hi) = min(max(x, lo), hi)", frozenset({PW}), _clamp, "torch.clamp", "tl.minimum(tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL), {2}, propagate_nan=tl.PropagateNan.ALL)"),
    # sign(x) = where(x > 0, 1, where(x < 0, -1, x * 0)): NaN stays NaN, and the gradient is 0 everywhere.
    OpSpec("sign", "sign", 1, 1, E, Accepts.REAL, Returns.REAL, "-1, 0 or 1 by the sign of x", frozenset({PW}), _sign, "torch.sign", "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, {0} * 0.0))"),
    # reductions over the per-step shape: (x) over every axis, (x, axis, ...) over the axes given
    OpSpec("sum", "sum", 1, VARIADIC, R, Accepts.NUMBER, Returns.PROMOTED, "sum(x), sum(x, axis) or sum(x, axis, axis, ...)", frozenset({LIN}), torch="torch.sum"),
    OpSpec("mean", "mean", 1, VARIADIC, R, Accepts.NUMBER, Returns.PROMOTED, "mean(x), mean(x, axis) or mean(x, axis, axis, ...)", frozenset({LIN}), torch="torch.mean"),
    OpSpec("logsumexp", "logsumexp", 1, VARIADIC, R, Accepts.REAL, Returns.REAL, "log(sum(exp(x), axis, ...)), computed stably", torch="torch.logsumexp"),
    OpSpec("amax", "amax", 1, VARIADIC, R, Accepts.REAL, Returns.REAL, "maximum over the axes given (or all)", torch="torch.amax"),
    OpSpec("amin", "amin", 1, VARIADIC, R, Accepts.REAL, Returns.REAL, "minimum over the axes given (or all)", torch="torch.amin"),
    OpSpec("norm", "norm", 1, VARIADIC, R, Accepts.NUMBER, Returns.REAL, "Euclidean norm sqrt(sum(abs(x) ** 2)) over the axes given (or all)", torch="recdsl.euclidean_norm"),
    # exp(x) / sum(exp(x)) over the axes given (or all): positive, shape kept.
    OpSpec("softmax", "softmax", 1, VARIADIC, S, Accepts.REAL, Returns.REAL, "softmax(x) or softmax(x, axis, ...): exp(x) / sum(exp(x)) over the axes, computed stably", frozenset({POS}), torch="recdsl.softmax"),
    # structure
    OpSpec("outer", "outer", 2, 2, S, Accepts.NUMBER, Returns.PROMOTED, "outer(u, v)[i, j] = u[i] * v[j]", frozenset({BI})),
    OpSpec("diag", "diag", 1, 1, S, Accepts.NUMBER, Returns.PROMOTED, "vector to diagonal matrix, or matrix to its diagonal", frozenset({LIN})),
    OpSpec("index", "[]", 1, 1, S, Accepts.ANY, Returns.CONDITIONAL, "numpy basic indexing: integers, slices, None, ...", frozenset({LIN})),
    OpSpec("transpose", "transpose", 3, 3, S, Accepts.ANY, Returns.CONDITIONAL, "transpose(x, i, j) swaps axes i and j; x.T swaps the last two", frozenset({LIN})),
    OpSpec("reshape", "reshape", 2, VARIADIC, S, Accepts.ANY, Returns.CONDITIONAL, "reshape(x, d1, d2, ...): the same elements in row-major order, static dims (one may be -1)", frozenset({LIN})),
    OpSpec("concat", "concat", 2, VARIADIC, S, Accepts.NUMBER, Returns.PROMOTED, "concat(a, b, ..., axis): join along an existing axis"),
    OpSpec("stack", "stack", 2, VARIADIC, S, Accepts.NUMBER, Returns.PROMOTED, "stack(a, b, ..., axis): join along a new axis"),
    OpSpec("arange", "arange", 1, 1, C, Accepts.REAL, Returns.REAL, "arange(n) = [0, 1, ..., n - 1]"),
    OpSpec("eye", "eye", 1, 1, C, Accepts.REAL, Returns.REAL, "eye(n): the n x n identity"),
)

# Each row's derivative rules (written above, beside the other rules of the ops they cover).
OPS = {
    name: replace(row, derivative=DERIVATIVES.get(name), derivative_complex=DERIVATIVES_COMPLEX.get(name))
    for name, row in OPS.items()
}
assert set(DERIVATIVES) <= set(OPS) and set(DERIVATIVES_COMPLEX) <= set(OPS), "a derivative rule for an op with no row"

def adjoint_templates(op: str, apply: Callable[[str, list[str]], str], number: Callable[[float], str]) -> tuple[str | None, ...]:
    """``op``'s derivative rules printed in a target language: each operand's share as a
    template over ``{g}`` (the result's adjoint), ``{r}`` (the result) and ``{0}``, ``{1}``, ...
    (the operands); None where no gradient flows.  ``apply(op, operand_texts)`` prints an op,
    ``number(value)`` a number.  Raises KeyError for an op with no rules."""
    rules = OPS[op].derivative
    if rules is None:
        raise KeyError(op)

    def leaf(term: Term) -> str:
        match term.leaf:
            case TermLeaf.ADJOINT:
                return "{g}"
            case TermLeaf.RESULT:
                return "{r}"
            case TermLeaf.OPERAND:
                return "{" + str(term.index) + "}"
            case _:
                return number(term.value)  # type: ignore[arg-type]

    return tuple(None if rule is None else rule.render(apply, leaf) for rule in rules)


# The surface name of a call -> the IR op.
FUNCTIONS: dict[str, str] = {
    spec.surface: spec.name
    for spec in OPS.values()
    if spec.surface.isidentifier()
}

BINARY_OPERATORS: dict[str, str] = {
    "+": "add", "-": "sub", "*": "mul", "/": "div", "//": "floordiv", "**": "pow", "@": "matmul",
    "<": "lt", "<=": "le", ">": "gt", ">=": "ge", "==": "eq", "!=": "ne",
}

# Initializers of a `param` line that are not expressions.
INITIALIZERS: dict[str, tuple[int, str]] = {
    "zeros": (0, "all zeros"),
    "ones": (0, "all ones"),
    "glorot": (0, "Glorot (Xavier) uniform, fans from the last two dims"),
    "normal": (1, "normal(std): normal with mean 0"),
    "uniform": (2, "uniform(lo, hi)"),
}

# Built-in constants usable wherever a number is.
CONSTANTS: dict[str, float] = {"inf": float("inf"), "pi": 3.141592653589793}


def ops_with(law: Law) -> frozenset[str]:
    """The names of the ops that obey ``law``."""
    return frozenset(name for name, spec in OPS.items() if law in spec.laws)


# Read by the classifier: linear maps of one operand, and ops linear in each operand.
LINEAR_UNARY = ops_with(Law.LINEAR)
BILINEAR = ops_with(Law.BILINEAR)
# Ops the Triton emitter evaluates inside a kernel (everything else reaches it as a leaf).
FUSED = frozenset(name for name, spec in OPS.items() if spec.triton is not None)


# ---- semirings ---------------------------------------------------------------------


class SemiringKind(Enum):
    SUM_PRODUCT = "sum-product"
    MAX_PLUS = "max-plus"
    LOG = "log"


@dataclass(frozen=True)
class Semiring:
    """(S, plus, times) with plus associative and commutative and times distributing over it.

    ``plus`` is the elementwise binary op, ``reduce`` the reduction that folds ``plus`` over an
    axis, ``zero`` the identity of ``plus`` and ``one`` that of ``times``.
    """

    kind: SemiringKind
    plus: str
    times: str
    reduce: str
    zero: float
    one: float

    def __post_init__(self) -> None:
        # The scans regroup and reorder plus: it must be a commutative monoid.
        assert {Law.ASSOCIATIVE, Law.COMMUTATIVE} <= OPS[self.plus].laws, f"{self.plus} is not a commutative monoid"
        assert Law.ASSOCIATIVE in OPS[self.times].laws

    @property
    def name(self) -> str:
        return self.kind.value


SUM_PRODUCT = Semiring(SemiringKind.SUM_PRODUCT, "add", "mul", "sum", 0.0, 1.0)
# max(a, b) + c = max(a + c, b + c): the tropical semiring of Viterbi and of stabilisers.
MAX_PLUS = Semiring(SemiringKind.MAX_PLUS, "maximum", "add", "amax", float("-inf"), 0.0)
# logaddexp(a, b) + c = logaddexp(a + c, b + c): the log semiring of forward algorithms.
LOG = Semiring(SemiringKind.LOG, "logaddexp", "add", "logsumexp", float("-inf"), 0.0)

TROPICAL_SEMIRINGS = (MAX_PLUS, LOG)
