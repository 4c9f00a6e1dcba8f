"""AST to checked IR: names, dims, shapes, element kinds, and the rules of states and outputs.

The checker binds a cell's dims to concrete values, resolves every name, computes each
expression's :class:`~recdsl.ir.Type` with numpy's broadcasting and matmul rules, and
lowers the result to :mod:`recdsl.ir`.  Every mistake is raised as a
:class:`~recdsl.errors.RecDSLError` pointing at the offending span.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Mapping

from . import ast, ir
from .errors import (
    DeclarationError,
    DimensionError,
    NameResolutionError,
    RecDSLError,
    ShapeError,
    Source,
    Span,
    TypeCheckError,
)
from .ir import Kind, RefKind, Type
from .ops import BINARY_OPERATORS, CONSTANTS, FUNCTIONS, INITIALIZERS, OPS, VARIADIC, Category
from .shapes import BROADCAST_EXPECTED, RuleViolation, Violation, broadcast_shapes, format_shape, matmul_shape, reshaped, result_type  # noqa: F401 (re-exported)

SCALAR = Type(())
# Integer constants computed at compile time are capped at this many bits.
_MAX_CONSTANT_BITS = 4096
# The keyword arguments of `recdsl.compile` and `recdsl.explain` other than dims: a dim with
# one of these names (or a Python keyword) cannot be bound as `compile(..., name=value)` and
# is bound through `dims={...}` instead.  tests/test_module.py keeps this in step with them.
API_KEYWORDS = frozenset({"source_or_path", "backend", "cell", "chunk_size", "max_elements", "backend_options", "allow_tf32", "dims", "plan"})


def dim_argument(name: str, value: str = "<int>") -> str:
    """How a caller of ``compile`` binds the dim ``name``: as a keyword, or through ``dims=``."""
    import keyword

    if name in API_KEYWORDS or keyword.iskeyword(name):
        return f"compile(..., dims={{'{name}': {value}}})"
    return f"compile(..., {name}={value})"


@dataclass(frozen=True)
class _Symbol:
    """What a name means at one point of a cell or monoid."""

    kind: str  # dim | constant | const | input | param | state | binding | scan | side | local
    span: Span | None
    type: Type | ir.StructType | None = None
    static: int | float | complex | None = None  # value known at compile time
    expr: ir.Expr | None = None  # monoid consts and locals are inlined


def _describe(symbol: _Symbol) -> str:
    return {
        "dim": "a dim",
        "constant": "a built-in constant",
        "const": "a const",
        "input": "an input",
        "param": "a param",
        "state": "a state",
        "binding": "a binding",
        "scan": "a scan result",
        "side": "a combine operand",
        "local": "a combine binding",
    }[symbol.kind]


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return format_shape(shape)


def _suggest(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _Scope:
    """The names visible at one point, and the lowering of expressions in their light."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.symbols: dict[str, _Symbol] = {name: _Symbol("constant", None, SCALAR, value) for name, value in CONSTANTS.items()}
        # Which kinds of name an expression may use: set by the checker per context.
        self.allowed: frozenset[str] = frozenset({"dim", "constant", "const"})
        self.context = "a constant expression"
        self.updated_states: set[str] = set()

    # ---- declarations
    def declare(self, name: str, symbol: _Symbol) -> None:
        existing = self.symbols.get(name)
        if existing is not None:
            if existing.kind == "constant":
                raise NameResolutionError(f"'{name}' is a built-in constant and cannot be redefined", symbol.span, expected="another name")
            where = f" at line {existing.span.line}" if existing.span else ""
            raise NameResolutionError(
                f"'{name}' is already defined{where} as {_describe(existing)}",
                symbol.span,
                expected="a new name: every name in a cell is defined once (a state is updated with `name = ...`)",
            )
        if name in FUNCTIONS or name in INITIALIZERS:
            kind = "function" if name in FUNCTIONS else "initializer"
            raise NameResolutionError(f"'{name}' is the name of a built-in {kind}", symbol.span, expected="another name")
        self.symbols[name] = symbol

    # ---- static evaluation (dims, axes, sizes, initializer arguments)
    def static(self, node: ast.Expr, what: str = "a constant") -> int | float | complex:
        if isinstance(node, ast.Number):
            return node.value
        if isinstance(node, ast.Name):
            symbol = self.symbols.get(node.id)
            if symbol is not None and symbol.static is not None:
                return symbol.static
            if symbol is None:
                raise self._undefined(node)
            raise TypeCheckError(f"'{node.id}' is {_describe(symbol)}, not known at compile time", node.span, expected=f"{what}: a number or an expression of the dims")
        if isinstance(node, ast.Unary):
            value = self.static(node.operand, what)
            return -value if node.op == "-" else value
        if isinstance(node, ast.Binary) and node.op in ("+", "-", "*", "/", "//", "**"):
            left, right = self.static(node.left, what), self.static(node.right, what)
            try:
                if node.op == "+":
                    return self._small(left + right, node)
                if node.op == "-":
                    return self._small(left - right, node)
                if node.op == "*":
                    return self._small(left * right, node)
                if node.op == "/":
                    return left / right
                if node.op == "//":
                    return left // right
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    if right * (abs(left).bit_length() - 1) > _MAX_CONSTANT_BITS:
                        raise self._too_large(node)
                return self._small(left**right, node)
            except (ZeroDivisionError, OverflowError, TypeError, ValueError) as error:
                raise TypeCheckError(f"cannot evaluate this constant: {error}", node.span) from None
        spec = OPS.get(FUNCTIONS.get(node.func, "")) if isinstance(node, ast.Call) else None
        if spec is not None and spec.fold is not None and spec.category is Category.ELEMENTWISE and node.args:
            if not spec.min_args <= len(node.args) <= spec.max_args:
                raise self._arity(node, spec)
            args = [self.static(a, what) for a in node.args]
            try:
                return self._small(spec.fold(*args), node)
            except (ValueError, OverflowError, TypeError, ZeroDivisionError) as error:
                raise TypeCheckError(f"cannot evaluate this constant: {error}", node.span) from None
        raise TypeCheckError(f"{what} must be known at compile time", node.span, expected="a number or an expression of the dims")

    @staticmethod
    def _too_large(node: ast.Expr) -> TypeCheckError:
        return TypeCheckError(
            f"this constant is too large (more than {_MAX_CONSTANT_BITS} bits)", node.span, expected="a number below 2 ** 4096 (or a float such as 1e300)"
        )

    def _small(self, value, node: ast.Expr):
        if isinstance(value, int) and value.bit_length() > _MAX_CONSTANT_BITS:
            raise self._too_large(node)
        return value

    @staticmethod
    def _arity(node: ast.Call, spec) -> TypeCheckError:
        if spec.max_args == VARIADIC:
            count = f"at least {spec.min_args}"
        else:
            count = str(spec.min_args) if spec.min_args == spec.max_args else f"{spec.min_args} or {spec.max_args}"
        plural = "s" if spec.max_args > 1 else ""
        return TypeCheckError(
            f"{node.func}() takes {count} argument{plural}, got {len(node.args)}",
            node.span,
            expected=f"{count} argument{plural} ({node.func}: {spec.doc})",
        )

    def static_int(self, node: ast.Expr, what: str, minimum: int | None = None) -> int:
        value = self.static(node, what)
        # (an int is checked as an int: float() of a huge one overflows)
        if not isinstance(value, int) and (isinstance(value, complex) or not float(value).is_integer()):
            raise TypeCheckError(f"{what} must be an integer, got {value}", node.span, expected="an integer")
        value = int(value)
        if abs(value) >= 2**63:
            raise ShapeError(f"{what} is too large ({len(str(abs(value)))} digits)", node.span, expected="an integer below 2 ** 63")
        if minimum is not None and value < minimum:
            raise ShapeError(f"{what} must be at least {minimum}, got {value}", node.span, expected=f"an integer >= {minimum}")
        return value

    def shape(self, spec: ast.TypeSpec) -> Type:
        dims = tuple(self.static_int(d, "a dim of a shape", minimum=1) for d in spec.dims)
        return Type(dims, Kind.COMPLEX if spec.is_complex else Kind.REAL)

    # ---- name lookup
    def _undefined(self, node: ast.Name) -> RecDSLError:
        visible = [n for n, s in self.symbols.items() if s.kind in self.allowed]
        if node.id in FUNCTIONS:
            return NameResolutionError(f"'{node.id}' is a function", node.span, expected=f"a call such as {node.id}(x)")
        if node.id in INITIALIZERS:
            return NameResolutionError(
                f"'{node.id}' is an initializer", node.span, expected="it only as the whole right-hand side of a `param` line"
            )
        expected = "a dim, input, param, const, state or earlier binding of this cell"
        if self.owner.startswith("monoid"):
            sides = [n for n, symbol in self.symbols.items() if symbol.kind == "side"]
            expected = "a dim or const of this monoid"
            if sides:
                expected += ", a carry of a combine operand (" + " or ".join(f"{side}.CARRY" for side in sides) + ") or an earlier combine binding"
        return NameResolutionError(f"undefined name '{node.id}'{_suggest(node.id, visible)}", node.span, expected=expected)

    def name(self, node: ast.Name) -> ir.Expr:
        symbol = self.symbols.get(node.id)
        if symbol is None:
            raise self._undefined(node)
        if symbol.kind not in self.allowed:
            raise NameResolutionError(
                f"{_describe(symbol)} ('{node.id}') cannot be used in {self.context}",
                node.span,
                expected=self._allowed_words(),
            )
        if symbol.kind in ("dim", "constant"):
            value = symbol.static
            return ir.Literal(value, Type((), Kind.COMPLEX if isinstance(value, complex) else Kind.REAL), label=node.id)
        if symbol.expr is not None:
            return symbol.expr
        assert isinstance(symbol.type, (Type, ir.StructType))
        if symbol.kind == "scan" or symbol.kind == "side":
            fields = ", ".join(n for n, _ in symbol.type.fields)  # type: ignore[union-attr]
            raise TypeCheckError(
                f"'{node.id}' is {_describe(symbol)} with carries {fields}", node.span, expected=f"one carry, such as {node.id}.{symbol.type.fields[0][0]}"  # type: ignore[union-attr]
            )
        kind = {
            "const": RefKind.CONST,
            "input": RefKind.INPUT,
            "param": RefKind.PARAM,
            "binding": RefKind.BINDING,
        }.get(symbol.kind)
        if symbol.kind == "state":
            kind = RefKind.STATE_NEW if node.id in self.updated_states else RefKind.STATE_PREV
        assert kind is not None and isinstance(symbol.type, Type)
        return ir.Ref(kind, node.id, symbol.type)

    def _allowed_words(self) -> str:
        words = {
            "dim": "dims",
            "constant": "numbers",
            "const": "consts",
            "param": "params",
            "input": "inputs",
            "state": "states",
            "binding": "bindings",
            "scan": "scan results",
            "side": "carries of the combine operands",
            "local": "earlier combine bindings",
        }
        return ", ".join(words[k] for k in sorted(self.allowed)) + f" (in {self.context})"

    # ---- expressions
    def expr(self, node: ast.Expr) -> ir.Expr:
        if isinstance(node, ast.Number):
            if isinstance(node.value, int) and node.value.bit_length() > 1023:
                raise TypeCheckError("this number is too large for a floating-point value", node.span, expected="a number below about 1.8e308 (or inf)")
            return ir.Literal(node.value, Type((), Kind.COMPLEX if isinstance(node.value, complex) else Kind.REAL))
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Unary):
            operand = self.expr(node.operand)
            if node.op == "+":
                return operand
            return self.apply("neg", (operand,), node.span, (node.operand.span,))
        if isinstance(node, ast.Binary):
            op = BINARY_OPERATORS[node.op]
            args = (self.expr(node.left), self.expr(node.right))
            return self.apply(op, args, node.span, (node.left.span, node.right.span))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.Index):
            return self.index(node)
        if isinstance(node, ast.Field):
            return self.field(node)
        raise TypeCheckError("unsupported expression", getattr(node, "span", None))

    def field(self, node: ast.Field) -> ir.Expr:
        if node.name == "T" and not self._has_fields(node.value):
            return self.transpose_last(node)
        if not isinstance(node.value, ast.Name):
            raise TypeCheckError("a field can only be read from a scan result or a combine operand", node.span, expected="name.carry")
        symbol = self.symbols.get(node.value.id)
        if symbol is None:
            raise self._undefined(node.value)
        if symbol.kind not in ("scan", "side") or symbol.kind not in self.allowed:
            raise TypeCheckError(
                f"'{node.value.id}' is {_describe(symbol)} and has no fields", node.span, expected="a scan result (or, in a combine, an operand) before '.'"
            )
        assert isinstance(symbol.type, ir.StructType)
        field_type = symbol.type.field_type(node.name)
        if field_type is None:
            fields = [n for n, _ in symbol.type.fields]
            raise NameResolutionError(
                f"'{node.value.id}' has no carry '{node.name}'{_suggest(node.name, fields)}", node.span, expected="one of: " + ", ".join(fields)
            )
        if symbol.kind == "scan":
            return ir.Ref(RefKind.SCAN, node.value.id, field_type, field=node.name)
        side = RefKind.CARRY_LEFT if symbol.static == 0 else RefKind.CARRY_RIGHT
        return ir.Ref(side, node.value.id, field_type, field=node.name)

    def call(self, node: ast.Call) -> ir.Expr:
        op = FUNCTIONS.get(node.func)
        if op is None:
            if node.func in INITIALIZERS:
                raise TypeCheckError(
                    f"'{node.func}' is an initializer", node.func_span, expected="it only as the whole right-hand side of a `param` line"
                )
            raise NameResolutionError(
                f"unknown function '{node.func}'{_suggest(node.func, sorted(FUNCTIONS))}",
                node.func_span,
                expected="one of: " + ", ".join(sorted(FUNCTIONS)),
            )
        spec = OPS[op]
        if not spec.min_args <= len(node.args) <= spec.max_args:
            raise self._arity(node, spec)
        if spec.category is Category.CONSTANT:
            size = self.static_int(node.args[0], f"the size given to {node.func}()", minimum=1)
            return self.apply(op, (), node.span, (), attrs=(size,))
        if spec.category is Category.REDUCTION or op == "softmax":
            value = self.expr(node.args[0])
            return self.apply(op, (value,), node.span, (node.args[0].span,), attrs=(self.axes(node, value),))
        if op == "transpose":
            value = self.expr(node.args[0])
            first, second = (self.axis(node, argument, value.type.shape) for argument in node.args[1:])
            return self.apply(op, (value,), node.span, (node.args[0].span,), attrs=(first, second))
        if op == "reshape":
            return self.reshape(node)
        if op in ("concat", "stack"):
            return self.join(node, op)
        args = tuple(self.expr(a) for a in node.args)
        return self.apply(op, args, node.span, tuple(a.span for a in node.args))

    # ---- static operands of calls: axes, dims
    def axis(self, node: ast.Call, argument: ast.Expr, shape: tuple[int, ...]) -> int:
        """A static axis of a value of ``shape`` given to ``node``'s function, counted from 0."""
        axis = self.static_int(argument, f"the axis of {node.func}()")
        rank = len(shape)
        if not -rank <= axis < rank:
            raise ShapeError(
                f"axis {axis} is out of range for a value of shape {_fmt_shape(shape)}",
                argument.span,
                expected=f"an axis in [{-rank}, {rank - 1}]" if rank else f"no axis: the value is a scalar, write {node.func}(x)",
            )
        return axis % rank

    def axes(self, node: ast.Call, value: ir.Expr) -> int | tuple[int, ...] | None:
        """The axes after a reduction's (or softmax's) operand: None for none (every axis), an int for one, else a sorted tuple."""
        found: list[int] = []
        for argument in node.args[1:]:
            axis = self.axis(node, argument, value.type.shape)
            if axis in found:
                raise ShapeError(f"axis {axis} is given twice to {node.func}()", argument.span, expected="each axis once")
            found.append(axis)
        if not found:
            return None
        return found[0] if len(found) == 1 else tuple(sorted(found))

    def transpose_last(self, node: ast.Field) -> ir.Expr:
        """``x.T``: ``x`` with its last two axes swapped."""
        value = self.expr(node.value)
        rank = value.type.rank
        if rank < 2:
            raise ShapeError(
                f"'.T' needs a value of at least two dims, got shape {_fmt_shape(value.type.shape)}",
                node.span,
                expected="a matrix (a vector has no row or column: write x[:, None] for a column, x[None, :] for a row)",
            )
        return self.apply("transpose", (value,), node.span, (node.value.span,), attrs=(rank - 2, rank - 1))

    def _has_fields(self, node: ast.Expr) -> bool:
        """Whether ``node`` names a scan result or combine operand (whose ``.T`` is a carry named T)."""
        symbol = self.symbols.get(node.id) if isinstance(node, ast.Name) else None
        return symbol is not None and symbol.kind in ("scan", "side")

    def reshape(self, node: ast.Call) -> ir.Expr:
        value = self.expr(node.args[0])
        dims: list[int] = []
        for argument in node.args[1:]:
            size = self.static_int(argument, "a dim given to reshape()")
            if size == -1:
                if -1 in dims:
                    raise ShapeError("reshape() can infer only one dim (-1)", argument.span, expected="at most one -1 among the dims")
            elif size < 1:
                raise ShapeError(f"a dim given to reshape() must be at least 1 (or -1), got {size}", argument.span, expected="a dim >= 1, or -1 for the one inferred")
            dims.append(size)
        resolved = reshaped(value.type.shape, tuple(dims))  # the IR holds the dims with -1 resolved
        return self.apply("reshape", (value,), node.span, (node.args[0].span,), attrs=tuple(dims) if isinstance(resolved, str) else resolved)

    def join(self, node: ast.Call, op: str) -> ir.Expr:
        """``concat(a, b, ..., axis)`` or ``stack(a, b, ..., axis)``: the last argument is the axis."""
        *operands, last = node.args
        values = tuple(self.expr(a) for a in operands)
        axis_value = self.static_int(last, f"the axis of {op}() (its last argument)")
        rank = values[0].type.rank + (1 if op == "stack" else 0)
        if rank == 0:
            raise ShapeError("concat() cannot join scalars", operands[0].span, expected="values of at least one dim (stack() joins scalars into a vector)")
        if not -rank <= axis_value < rank:
            raise ShapeError(
                f"axis {axis_value} is out of range for {op}() of values of {values[0].type.rank} dim{'s' if values[0].type.rank != 1 else ''}",
                last.span,
                expected=f"an axis in [{-rank}, {rank - 1}]",
            )
        return self.apply(op, values, node.span, tuple(a.span for a in operands), attrs=(axis_value % rank,))

    def apply(self, op: str, args: tuple[ir.Expr, ...], span: Span | None, arg_spans: tuple, attrs: tuple = ()) -> ir.Expr:
        """Type-check ``op`` applied to already lowered ``args`` (rules: :func:`recdsl.shapes.result_type`) and build the node."""
        try:
            result = result_type(op, [a.type for a in args], attrs)
        except RuleViolation as violation:
            where = (arg_spans[violation.operand] if violation.operand is not None and violation.operand < len(arg_spans) else None) or span
            message = violation.message
            if violation.violation is Violation.TYPE and violation.operand is not None and args[violation.operand].type.kind is Kind.COMPLEX:
                message += f" of shape {_fmt_shape(args[violation.operand].type.shape)}"
            error = ShapeError if violation.violation is Violation.SHAPE else TypeCheckError
            raise error(message, where, expected=violation.expected) from None
        return ir.Op(op, args, result, attrs)

    def index(self, node: ast.Index) -> ir.Expr:
        value = self.expr(node.value)
        shape = value.type.shape
        consuming = [i for i in node.items if not isinstance(i, (ast.NewAxis, ast.EllipsisIndex))]
        ellipses = [i for i in node.items if isinstance(i, ast.EllipsisIndex)]
        if len(ellipses) > 1:
            raise TypeCheckError("an index can have only one '...'", ellipses[1].span, expected="at most one '...'")
        if len(consuming) > len(shape):
            raise ShapeError(
                f"too many indices ({len(consuming)}) for a value of shape {_fmt_shape(shape)}", node.span, expected=f"at most {len(shape)} indices"
            )
        items: list = []
        result: list[int] = []
        axis = 0
        for item in node.items:
            if isinstance(item, ast.EllipsisIndex):
                skipped = len(shape) - len(consuming)
                for _ in range(skipped):
                    items.append(ir.SliceItem(None, None))
                    result.append(shape[axis])
                    axis += 1
            elif isinstance(item, ast.NewAxis):
                items.append(ir.NEW_AXIS)
                result.append(1)
            elif isinstance(item, ast.Slice):
                start = None if item.start is None else self.static_int(item.start, "a slice bound")
                stop = None if item.stop is None else self.static_int(item.stop, "a slice bound")
                size = len(range(*slice(start, stop).indices(shape[axis])))
                if size == 0:
                    raise ShapeError(f"the slice selects nothing from a dim of size {shape[axis]}", item.span, expected="a non-empty slice")
                items.append(ir.SliceItem(start, stop))
                result.append(size)
                axis += 1
            else:
                position = self.static_int(item, "an index")
                if not -shape[axis] <= position < shape[axis]:
                    raise ShapeError(f"index {position} is out of range for a dim of size {shape[axis]}", item.span, expected=f"an index in [{-shape[axis]}, {shape[axis] - 1}]")
                items.append(position % shape[axis])
                axis += 1
        while axis < len(shape):
            items.append(ir.SliceItem(None, None))
            result.append(shape[axis])
            axis += 1
        return ir.Op("index", (value,), Type(tuple(result), value.type.kind), attrs=tuple(items))

    def fits(self, value: ir.Expr, target: Type, span: Span | None, what: str) -> None:
        """Check that ``value`` broadcasts to exactly ``target`` and is of a compatible kind."""
        shape = broadcast_shapes(value.type.shape, target.shape)
        if shape != target.shape:
            raise ShapeError(
                f"{what} has shape {_fmt_shape(value.type.shape)}, which does not broadcast to the declared {_fmt_shape(target.shape)}",
                span,
                expected=f"a value of shape {_fmt_shape(target.shape)} (or one that broadcasts to it)",
            )
        if value.type.kind is Kind.COMPLEX and target.kind is not Kind.COMPLEX:
            raise TypeCheckError(f"{what} is complex but is declared real", span, expected="a real value, or declare it complex[...]")
        if value.type.kind is Kind.BOOL:
            raise TypeCheckError(f"{what} is a boolean", span, expected="a number: use where(cond, a, b)")


def _bind_dims(scope: _Scope, params: tuple[ast.DimParam, ...], given: Mapping[str, object], owner: str, span: Span | None) -> tuple[tuple[str, int | float], ...]:
    names = [p.name for p in params]
    unknown = [n for n in given if n not in names]
    if unknown:
        raise DimensionError(
            f"{owner} has no dim '{unknown[0]}'{_suggest(unknown[0], names)}", span, expected="one of: " + (", ".join(names) or "(none)")
        )
    bound = []
    for param in params:
        if param.name in given:
            value = given[param.name]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise DimensionError(f"dim '{param.name}' of {owner} must be a number, got {value!r}", param.span, expected="an int (or a float hyperparameter)")
            if (isinstance(value, float) and not math.isfinite(value)) or (isinstance(value, int) and abs(value) >= 2**63):
                raise DimensionError(f"dim '{param.name}' of {owner} must be a finite number, got {value!r}", param.span, expected="an int below 2 ** 63 (or a finite float hyperparameter)")
        elif param.default is not None:
            value = scope.static(param.default, f"the default of dim '{param.name}'")
        else:
            raise DimensionError(f"{owner} needs a value for dim '{param.name}'", param.span, expected=dim_argument(param.name))
        scope.declare(param.name, _Symbol("dim", param.span, SCALAR, static=value))
        bound.append((param.name, value))
    return tuple(bound)


# ---- monoids -------------------------------------------------------------------


def _check_monoid(node: ast.Monoid, args: tuple[int | float, ...], span: Span | None) -> ir.MonoidIR:
    scope = _Scope(f"monoid {node.name}")
    if len(args) != len(node.dims):
        raise TypeCheckError(
            f"monoid {node.name} takes {len(node.dims)} dim{'s' if len(node.dims) != 1 else ''}, got {len(args)}",
            span,
            expected=f"scan {node.name}(" + ", ".join(d.name for d in node.dims) + ") from (...)",
        )
    dims = _bind_dims(scope, node.dims, dict(zip((d.name for d in node.dims), args)), f"monoid {node.name}", node.span)
    carries: list[ir.Carry] = []
    combines = [s for s in node.body if isinstance(s, ast.Combine)]
    scope.allowed = frozenset({"dim", "constant", "local"})
    scope.context = "a monoid's consts and identities"
    for statement in node.body:
        if isinstance(statement, ast.ConstDecl):
            value = scope.expr(statement.value)
            static = None
            try:
                static = scope.static(statement.value)
            except RecDSLError:
                pass
            scope.declare(statement.name, _Symbol("local", statement.span, value.type, static=static, expr=value))
        elif isinstance(statement, ast.CarryDecl):
            carry_type = scope.shape(statement.type)
            identity = scope.expr(statement.identity)
            scope.fits(identity, carry_type, statement.identity.span, f"the identity of carry '{statement.name}'")
            if any(c.name == statement.name for c in carries):
                raise NameResolutionError(f"carry '{statement.name}' is declared twice", statement.span, expected="a new name")
            carries.append(ir.Carry(statement.name, carry_type, identity, span=statement.span))
    if not carries:
        raise DeclarationError(f"monoid {node.name} declares no carry", node.span, expected="a line `carry NAME: [shape] = IDENTITY`")
    if len(combines) != 1:
        raise DeclarationError(
            f"monoid {node.name} has {len(combines)} combine blocks", combines[1].span if combines else node.span, expected="exactly one `combine(a, b) { ... }`"
        )
    combine = combines[0]
    if combine.left == combine.right:
        raise NameResolutionError("the two operands of combine need different names", combine.span, expected="combine(a, b)")
    struct = ir.StructType(tuple((c.name, c.type) for c in carries))
    scope.declare(combine.left, _Symbol("side", combine.span, struct, static=0))
    scope.declare(combine.right, _Symbol("side", combine.span, struct, static=1))
    scope.allowed = frozenset({"dim", "constant", "local", "side"})
    scope.context = "a combine"
    body: list[ir.Assign] = []
    results: dict[str, ir.Expr] = {}
    carry_types = {c.name: c.type for c in carries}
    for binding in combine.body:
        value = scope.expr(binding.value)
        if binding.name in carry_types:
            if binding.name in results:
                raise NameResolutionError(f"carry '{binding.name}' is combined twice", binding.span, expected="one line per carry")
            scope.fits(value, carry_types[binding.name], binding.value.span, f"the combined carry '{binding.name}'")
        local = ir.Ref(RefKind.LOCAL, binding.name, value.type)
        scope.declare(binding.name, _Symbol("local", binding.span, value.type, expr=local))
        body.append(ir.Assign(binding.name, value, span=binding.span))
        if binding.name in carry_types:
            results[binding.name] = local
    missing = [c.name for c in carries if c.name not in results]
    if missing:
        raise DeclarationError(
            f"combine of monoid {node.name} does not compute carry '{missing[0]}'", combine.span, expected=f"a line `{missing[0]} = ...` in combine"
        )
    return ir.MonoidIR(
        node.name, dims, tuple(carries), tuple(body), tuple(results[c.name] for c in carries), (combine.left, combine.right), span=node.span
    )


# ---- cells -----------------------------------------------------------------------


def _init(scope: _Scope, node: ast.Expr, param_type: Type, name: str) -> ir.Init:
    if isinstance(node, ast.Name) and node.id in INITIALIZERS:
        arity, doc = INITIALIZERS[node.id]
        if arity:
            raise TypeCheckError(f"initializer '{node.id}' needs {arity} argument{'s' if arity > 1 else ''}", node.span, expected=doc)
        if node.id == "glorot" and param_type.rank == 0:
            raise TypeCheckError("glorot needs a param of at least one dim", node.span, expected="zeros, ones, normal(std), uniform(lo, hi) or a number")
        return ir.Init(node.id)
    if isinstance(node, ast.Call) and node.func in INITIALIZERS:
        arity, doc = INITIALIZERS[node.func]
        if len(node.args) != arity:
            raise TypeCheckError(f"initializer '{node.func}' takes {arity} argument{'s' if arity != 1 else ''}, got {len(node.args)}", node.span, expected=doc)
        values = []
        for arg in node.args:
            value = scope.static(arg, f"an argument of {node.func}()")
            if isinstance(value, complex):
                raise TypeCheckError("initializer arguments must be real", arg.span, expected="a real number")
            if not math.isfinite(value):
                raise TypeCheckError(f"initializer arguments must be finite, got {value}", arg.span, expected="a finite real number")
            values.append(float(value))
        if node.func == "normal" and values[0] < 0:
            raise TypeCheckError("normal(std) needs std >= 0", node.args[0].span, expected="a non-negative standard deviation")
        if node.func == "uniform" and values[0] > values[1]:
            raise TypeCheckError("uniform(lo, hi) needs lo <= hi", node.span, expected="uniform(lo, hi) with lo <= hi")
        return ir.Init(node.func, tuple(values))
    value = scope.expr(node)
    scope.fits(value, param_type, node.span, f"the initializer of param '{name}'")
    return ir.Init("expr", (), value)


def check_cell(cell: ast.Cell, monoids: Mapping[str, ast.Monoid], dims: Mapping[str, object]) -> ir.CellIR:
    """Check one cell with its dims bound to ``dims`` (and defaults); lower it to the IR."""
    scope = _Scope(f"cell {cell.name}")
    bound_dims = _bind_dims(scope, cell.dims, dims, f"cell {cell.name}", cell.span)

    inputs: list[ir.Input] = []
    params: list[tuple[ast.ParamDecl, Type]] = []
    consts: list[ir.Const] = []
    states: list[tuple[ast.StateDecl, Type]] = []

    # Declarations first, in order, so that they may appear anywhere in the body.
    scope.allowed = frozenset({"dim", "constant", "const"})
    scope.context = "a const"
    for statement in cell.body:
        if isinstance(statement, ast.ConstDecl):
            value = scope.expr(statement.value)
            if value.type.kind is Kind.BOOL:
                raise TypeCheckError("a const must be a number", statement.value.span, expected="a numeric expression")
            static = None
            try:
                static = scope.static(statement.value)
            except RecDSLError:
                pass
            scope.declare(statement.name, _Symbol("const", statement.span, value.type, static=static))
            consts.append(ir.Const(statement.name, value, span=statement.span))
        elif isinstance(statement, ast.InputDecl):
            input_type = scope.shape(statement.type)
            scope.declare(statement.name, _Symbol("input", statement.span, input_type))
            inputs.append(ir.Input(statement.name, input_type, span=statement.span))
        elif isinstance(statement, ast.ParamDecl):
            param_type = scope.shape(statement.type)
            scope.declare(statement.name, _Symbol("param", statement.span, param_type))
            params.append((statement, param_type))
        elif isinstance(statement, ast.StateDecl):
            state_type = scope.shape(statement.type)
            scope.declare(statement.name, _Symbol("state", statement.span, state_type))
            states.append((statement, state_type))

    if not inputs:
        raise DeclarationError(f"cell {cell.name} has no input", cell.span, expected="a line `input NAME: [shape]`")

    scope.context = "a param initializer"
    checked_params = tuple(
        ir.Param(decl.name, param_type, _init(scope, decl.init, param_type, decl.name), span=decl.span) for decl, param_type in params
    )
    scope.allowed = frozenset({"dim", "constant", "const", "param"})
    scope.context = "a state's initial value"
    checked_states = []
    for decl, state_type in states:
        init = scope.expr(decl.init)
        scope.fits(init, state_type, decl.init.span, f"the initial value of state '{decl.name}'")
        direction = ir.Direction.REVERSE if decl.reverse else ir.Direction.FORWARD
        checked_states.append(ir.State(decl.name, state_type, init, span=decl.span, direction=direction))

    scope.allowed = frozenset({"dim", "constant", "const", "param", "input", "state", "binding", "scan"})
    scope.context = "the cell body"
    body: list[ir.Statement] = []
    update_lines: dict[str, Span | None] = {}
    output_count = 0
    for statement in cell.body:
        if isinstance(statement, ast.Binding):
            symbol = scope.symbols.get(statement.name)
            value = scope.expr(statement.value)
            if symbol is not None and symbol.kind == "state":
                if statement.name in update_lines:
                    first = update_lines[statement.name]
                    raise DeclarationError(
                        f"state '{statement.name}' is updated twice" + (f" (first at line {first.line})" if first else ""),
                        statement.span,
                        expected="one update line per state; bind intermediate values to new names",
                    )
                assert isinstance(symbol.type, Type)
                scope.fits(value, symbol.type, statement.value.span, f"the update of state '{statement.name}'")
                body.append(ir.Update(statement.name, value, span=statement.span))
                update_lines[statement.name] = statement.span
                scope.updated_states.add(statement.name)
                continue
            if symbol is not None and symbol.kind in ("input", "param", "const", "dim"):
                raise NameResolutionError(
                    f"cannot assign to {_describe(symbol)} ('{statement.name}')", statement.span, expected="a new name for the binding"
                )
            if value.type.kind is Kind.BOOL:
                pass  # booleans may be bound and used in where()
            scope.declare(statement.name, _Symbol("binding", statement.span, value.type))
            body.append(ir.Assign(statement.name, value, span=statement.span))
        elif isinstance(statement, ast.ScanBinding):
            monoid_node = monoids.get(statement.monoid)
            if monoid_node is None:
                raise NameResolutionError(
                    f"undefined monoid '{statement.monoid}'{_suggest(statement.monoid, sorted(monoids))}",
                    statement.span,
                    expected="a monoid declared in the same file" + (": " + ", ".join(sorted(monoids)) if monoids else ""),
                )
            monoid_args = tuple(scope.static(a, f"a dim of monoid {statement.monoid}") for a in statement.args)
            monoid = _check_monoid(monoid_node, monoid_args, statement.span)
            lifts: dict[str, ir.Expr] = {}
            carry_types = {c.name: c.type for c in monoid.carries}
            for lift in statement.lifts:
                if lift.carry not in carry_types:
                    raise NameResolutionError(
                        f"monoid {monoid.name} has no carry '{lift.carry}'{_suggest(lift.carry, list(carry_types))}",
                        lift.span,
                        expected="one of: " + ", ".join(carry_types),
                    )
                if lift.carry in lifts:
                    raise NameResolutionError(f"carry '{lift.carry}' is given twice", lift.span, expected="each carry once")
                value = scope.expr(lift.value)
                scope.fits(value, carry_types[lift.carry], lift.value.span, f"the element of carry '{lift.carry}'")
                lifts[lift.carry] = value
            missing = [c for c in carry_types if c not in lifts]
            if missing:
                raise DeclarationError(
                    f"scan of {monoid.name} does not give carry '{missing[0]}'", statement.span, expected=f"'{missing[0]} = ...' inside from (...)"
                )
            scope.declare(statement.name, _Symbol("scan", statement.span, monoid.struct_type))
            direction = ir.Direction.REVERSE if statement.reverse else ir.Direction.FORWARD
            body.append(ir.ScanAssign(statement.name, monoid, tuple(lifts[c.name] for c in monoid.carries), span=statement.span, direction=direction))
        elif isinstance(statement, ast.Output):
            value = scope.expr(statement.value)
            if value.type.kind is Kind.BOOL:
                raise TypeCheckError("an output must be a number, not a boolean", statement.value.span, expected="a numeric expression")
            if statement.name is not None:
                scope.declare(statement.name, _Symbol("binding", statement.span, value.type))
            body.append(ir.Emit(output_count, statement.name, value, span=statement.span))
            output_count += 1

    for decl, _ in states:
        if decl.name not in update_lines:
            raise DeclarationError(
                f"state '{decl.name}' is never updated", decl.span, expected=f"a line `{decl.name} = ...` in the cell body (its new value at each step)"
            )
    if output_count == 0:
        raise DeclarationError(f"cell {cell.name} has no output", cell.span, expected="a line `out EXPR` or `out NAME = EXPR`")
    return ir.CellIR(
        cell.name, bound_dims, tuple(inputs), checked_params, tuple(consts), tuple(checked_states), tuple(body), span=cell.span
    )


def check_program(program: ast.Program, source: Source, cell: str | None = None, dims: Mapping[str, object] | None = None) -> ir.CellIR:
    """Check the chosen cell of ``program`` (the only one, or the one named ``cell``).

    Any error is located in ``source``; an internal failure while checking a statement
    is reported at that statement rather than as a traceback.
    """
    dims = dict(dims or {})
    cells = program.cells()
    monoids: dict[str, ast.Monoid] = {}
    try:
        for monoid in program.monoids():
            if monoid.name in monoids:
                raise NameResolutionError(f"monoid '{monoid.name}' is defined twice", monoid.span, expected="a new name")
            monoids[monoid.name] = monoid
        names = [c.name for c in cells]
        for position, name in enumerate(names):
            if name in names[:position]:
                raise NameResolutionError(f"cell '{name}' is defined twice", cells[position].span, expected="a new name")
        if not cells:
            raise DeclarationError("the program defines no cell", Span(1, 1, 1, 1), expected="a `cell NAME(dims) { ... }` block")
        if cell is None:
            if len(cells) > 1:
                raise DeclarationError(
                    f"the program defines {len(cells)} cells: {', '.join(names)}", cells[1].span, expected="compile(..., cell=NAME) to pick one"
                )
            chosen = cells[0]
        else:
            matches = [c for c in cells if c.name == cell]
            if not matches:
                raise DeclarationError(f"no cell named '{cell}'{_suggest(cell, names)}", None, expected="one of: " + ", ".join(names))
            chosen = matches[0]
        return check_cell(chosen, monoids, dims)
    except RecDSLError as error:
        raise error.located(source) from None
    except RecursionError:
        raise TypeCheckError("the program is nested too deeply", Span(1, 1, 1, 1), source) from None
