"""The operations of the language: one row each, and the algebraic laws the analysis uses.

Adding an operation means adding a row here (its surface name, arity, the kinds of
element it accepts and returns) and its torch implementation in
``recdsl.backends.torch_ops``; the checker and the classifier consult these tables
rather than special-casing names.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Category(str, Enum):
    ELEMENTWISE = "elementwise"  # numpy broadcasting of every operand
    REDUCTION = "reduction"  # (x) or (x, axis) over the per-step shape
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
    CONDITIONAL = "conditional"  # where: the promotion of the last two operands


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


def _table(*rows: OpSpec) -> dict[str, OpSpec]:
    return {row.name: row for row in rows}


E, R, M, S, C = Category.ELEMENTWISE, Category.REDUCTION, Category.MATMUL, Category.STRUCTURAL, Category.CONSTANT

OPS: dict[str, OpSpec] = _table(
    # arithmetic operators
    OpSpec("add", "+", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a + b"),
    OpSpec("sub", "-", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a - b"),
    OpSpec("mul", "*", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a * b"),
    OpSpec("div", "/", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a / b"),
    OpSpec("floordiv", "//", 2, 2, E, Accepts.REAL, Returns.REAL, "floor(a / b)"),
    OpSpec("pow", "**", 2, 2, E, Accepts.NUMBER, Returns.PROMOTED, "a ** b"),
    OpSpec("neg", "-", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "-a"),
    OpSpec("matmul", "@", 2, 2, M, Accepts.NUMBER, Returns.PROMOTED, "a @ b with numpy's matmul rules"),
    # comparisons
    OpSpec("lt", "<", 2, 2, E, Accepts.REAL, Returns.BOOL, "a < b"),
    OpSpec("le", "<=", 2, 2, E, Accepts.REAL, Returns.BOOL, "a <= b"),
    OpSpec("gt", ">", 2, 2, E, Accepts.REAL, Returns.BOOL, "a > b"),
    OpSpec("ge", ">=", 2, 2, E, Accepts.REAL, Returns.BOOL, "a >= b"),
    OpSpec("eq", "==", 2, 2, E, Accepts.NUMBER, Returns.BOOL, "a == b"),
    OpSpec("ne", "!=", 2, 2, E, Accepts.NUMBER, Returns.BOOL, "a != b"),
    # elementwise functions
    OpSpec("exp", "exp", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "e ** x"),
    OpSpec("log", "log", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "natural logarithm"),
    OpSpec("sqrt", "sqrt", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "square root"),
    OpSpec("abs", "abs", 1, 1, E, Accepts.NUMBER, Returns.REAL, "absolute value (modulus for complex)"),
    OpSpec("tanh", "tanh", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "hyperbolic tangent"),
    OpSpec("sigmoid", "sigmoid", 1, 1, E, Accepts.REAL, Returns.REAL, "1 / (1 + exp(-x))"),
    OpSpec("logsigmoid", "logsigmoid", 1, 1, E, Accepts.REAL, Returns.REAL, "log(sigmoid(x)), computed stably"),
    OpSpec("softplus", "softplus", 1, 1, E, Accepts.REAL, Returns.REAL, "log(1 + exp(x)), computed stably"),
    OpSpec("silu", "silu", 1, 1, E, Accepts.REAL, Returns.REAL, "x * sigmoid(x)"),
    OpSpec("relu", "relu", 1, 1, E, Accepts.REAL, Returns.REAL, "max(x, 0)"),
    OpSpec("cos", "cos", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "cosine"),
    OpSpec("sin", "sin", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "sine"),
    OpSpec("log1p", "log1p", 1, 1, E, Accepts.REAL, Returns.REAL, "log(1 + x), accurate near 0"),
    OpSpec("expm1", "expm1", 1, 1, E, Accepts.REAL, Returns.REAL, "exp(x) - 1, accurate near 0"),
    OpSpec("real", "real", 1, 1, E, Accepts.NUMBER, Returns.REAL, "real part"),
    OpSpec("imag", "imag", 1, 1, E, Accepts.NUMBER, Returns.REAL, "imaginary part"),
    OpSpec("conj", "conj", 1, 1, E, Accepts.NUMBER, Returns.PROMOTED, "complex conjugate"),
    OpSpec("maximum", "max", 2, 2, E, Accepts.REAL, Returns.REAL, "elementwise maximum of two operands"),
    OpSpec("minimum", "min", 2, 2, E, Accepts.REAL, Returns.REAL, "elementwise minimum of two operands"),
    OpSpec("logaddexp", "logaddexp", 2, 2, E, Accepts.REAL, Returns.REAL, "log(exp(a) + exp(b)), computed stably"),
    OpSpec("where", "where", 3, 3, E, Accepts.ANY, Returns.CONDITIONAL, "where(condition, a, b): a where condition holds, else b"),
    # reductions over the per-step shape
    OpSpec("sum", "sum", 1, 2, R, Accepts.NUMBER, Returns.PROMOTED, "sum(x) or sum(x, axis)"),
    OpSpec("mean", "mean", 1, 2, R, Accepts.NUMBER, Returns.PROMOTED, "mean(x) or mean(x, axis)"),
    OpSpec("logsumexp", "logsumexp", 1, 2, R, Accepts.REAL, Returns.REAL, "log(sum(exp(x), axis)), computed stably"),
    OpSpec("amax", "amax", 1, 2, R, Accepts.REAL, Returns.REAL, "maximum over an axis (or all)"),
    OpSpec("amin", "amin", 1, 2, R, Accepts.REAL, Returns.REAL, "minimum over an axis (or all)"),
    # structure
    OpSpec("outer", "outer", 2, 2, S, Accepts.NUMBER, Returns.PROMOTED, "outer(u, v)[i, j] = u[i] * v[j]"),
    OpSpec("diag", "diag", 1, 1, S, Accepts.NUMBER, Returns.PROMOTED, "vector to diagonal matrix, or matrix to its diagonal"),
    OpSpec("index", "[]", 1, 1, S, Accepts.ANY, Returns.CONDITIONAL, "numpy basic indexing: integers, slices, None, ..."),
    OpSpec("arange", "arange", 1, 1, C, Accepts.REAL, Returns.REAL, "arange(n) = [0, 1, ..., n - 1]"),
    OpSpec("eye", "eye", 1, 1, C, Accepts.REAL, Returns.REAL, "eye(n): the n x n identity"),
)

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

# ---- laws the classifier relies on -------------------------------------------

# f(f(a, b), c) = f(a, f(b, c))
ASSOCIATIVE = frozenset({"add", "mul", "maximum", "minimum", "logaddexp"})
# f(a, b) = f(b, a)
COMMUTATIVE = frozenset({"add", "mul", "maximum", "minimum", "logaddexp", "eq", "ne"})
# f(a + b) = f(a) + f(b) and f(c a) = c f(a): linear in their single tensor operand.
LINEAR_UNARY = frozenset({"neg", "index", "sum", "diag", "conj", "real", "imag"})
# Linear in each operand when the other is held fixed: f(a, b + c) = f(a, b) + f(a, c).
BILINEAR = frozenset({"mul", "matmul", "outer"})


@dataclass(frozen=True)
class Semiring:
    """(S, plus, times) with plus associative and commutative and times distributing over it.

    ``plus`` is the elementwise binary op, ``reduce`` the reduction that folds ``plus`` over an
    axis, ``zero`` the identity of ``plus`` and ``one`` that of ``times``.
    """

    name: str
    plus: str
    times: str
    reduce: str
    zero: float
    one: float


SUM_PRODUCT = Semiring("sum-product", "add", "mul", "sum", 0.0, 1.0)
# max(a, b) + c = max(a + c, b + c): the tropical semiring of Viterbi and of stabilisers.
MAX_PLUS = Semiring("max-plus", "maximum", "add", "amax", float("-inf"), 0.0)
# logaddexp(a, b) + c = logaddexp(a + c, b + c): the log semiring of forward algorithms.
LOG = Semiring("log", "logaddexp", "add", "logsumexp", float("-inf"), 0.0)

TROPICAL_SEMIRINGS = (MAX_PLUS, LOG)
