"""Printing programs back as source: the AST (for round trips) and IR expressions (for humans).

Both printers put parentheses only where precedence needs them, so that
``parse(unparse(program)) == program`` and explanations read like the source.
"""

from __future__ import annotations

from . import ast, ir
from .ops import OPS

# Binding strength, loosest first: comparisons, sums, products, unary minus, powers, postfix.
_PRECEDENCE = {"compare": 1, "+": 2, "-": 2, "*": 3, "/": 3, "//": 3, "@": 3, "unary": 4, "**": 5, "postfix": 6, "atom": 7}
_COMPARISONS = {"<", "<=", ">", ">=", "==", "!="}


def format_number(value: int | float | complex) -> str:
    """A literal as the language writes it (``inf``, ``1j``, ``0.5``)."""
    if isinstance(value, complex):
        if value.real == 0:
            return f"{format_number(value.imag)}j"
        return f"({format_number(value.real)} + {format_number(value.imag)}j)"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        if value == float("-inf"):
            return "-inf"
        if value.is_integer() and abs(value) < 1e16:
            return f"{value:.1f}"
        return repr(value)
    return str(value)


def _wrap(text: str, strength: int, needed: int) -> str:
    return f"({text})" if strength < needed else text


# ---- AST -------------------------------------------------------------------------


def _ast_expr(node: ast.Expr) -> tuple[str, int]:
    if isinstance(node, ast.Number):
        text = format_number(node.value)
        return text, _PRECEDENCE["unary"] if text.startswith("-") or text.startswith("(") else _PRECEDENCE["atom"]
    if isinstance(node, ast.Name):
        return node.id, _PRECEDENCE["atom"]
    if isinstance(node, ast.Unary):
        operand, strength = _ast_expr(node.operand)
        return node.op + _wrap(operand, strength, _PRECEDENCE["unary"]), _PRECEDENCE["unary"]
    if isinstance(node, ast.Binary):
        level = _PRECEDENCE["compare"] if node.op in _COMPARISONS else _PRECEDENCE[node.op]
        left, left_strength = _ast_expr(node.left)
        right, right_strength = _ast_expr(node.right)
        if node.op == "**":  # right-associative; its left operand binds tighter than unary minus
            return f"{_wrap(left, left_strength, _PRECEDENCE['postfix'])} ** {_wrap(right, right_strength, _PRECEDENCE['unary'])}", level
        right_needed = level + 1
        left_needed = level + 1 if node.op in _COMPARISONS else level
        return f"{_wrap(left, left_strength, left_needed)} {node.op} {_wrap(right, right_strength, right_needed)}", level
    if isinstance(node, ast.Call):
        return f"{node.func}({', '.join(_ast_expr(a)[0] for a in node.args)})", _PRECEDENCE["postfix"]
    if isinstance(node, ast.Index):
        value, strength = _ast_expr(node.value)
        items = ", ".join(_ast_index_item(i) for i in node.items)
        return f"{_wrap(value, strength, _PRECEDENCE['postfix'])}[{items}]", _PRECEDENCE["postfix"]
    if isinstance(node, ast.Field):
        value, strength = _ast_expr(node.value)
        return f"{_wrap(value, strength, _PRECEDENCE['postfix'])}.{node.name}", _PRECEDENCE["postfix"]
    raise TypeError(f"not an expression: {node!r}")


def _ast_index_item(item) -> str:
    if isinstance(item, ast.NewAxis):
        return "None"
    if isinstance(item, ast.EllipsisIndex):
        return "..."
    if isinstance(item, ast.Slice):
        start = "" if item.start is None else unparse_expr(item.start)
        stop = "" if item.stop is None else unparse_expr(item.stop)
        return f"{start}:{stop}"
    return unparse_expr(item)


def unparse_expr(node: ast.Expr) -> str:
    """An AST expression as source text."""
    return _ast_expr(node)[0]


def _type_spec(spec: ast.TypeSpec) -> str:
    return ("complex" if spec.is_complex else "") + "[" + ", ".join(unparse_expr(d) for d in spec.dims) + "]"


def _dims(dims: tuple[ast.DimParam, ...]) -> str:
    return ", ".join(d.name if d.default is None else f"{d.name} = {unparse_expr(d.default)}" for d in dims)


def _statement(node) -> str:
    if isinstance(node, ast.InputDecl):
        return f"input {node.name}: {_type_spec(node.type)}"
    if isinstance(node, ast.ParamDecl):
        return f"param {node.name}: {_type_spec(node.type)} = {unparse_expr(node.init)}"
    if isinstance(node, ast.ConstDecl):
        return f"const {node.name} = {unparse_expr(node.value)}"
    if isinstance(node, ast.StateDecl):
        return f"state {node.name}: {_type_spec(node.type)} = {unparse_expr(node.init)}" + (" reverse" if node.reverse else "")
    if isinstance(node, ast.Binding):
        return f"{node.name} = {unparse_expr(node.value)}"
    if isinstance(node, ast.ScanBinding):
        lifts = ", ".join(f"{l.carry} = {unparse_expr(l.value)}" for l in node.lifts)
        args = ", ".join(unparse_expr(a) for a in node.args)
        return f"{node.name} = scan {'reverse ' if node.reverse else ''}{node.monoid}({args}) from ({lifts})"
    if isinstance(node, ast.Output):
        return f"out {node.name} = {unparse_expr(node.value)}" if node.name else f"out {unparse_expr(node.value)}"
    if isinstance(node, ast.CarryDecl):
        return f"carry {node.name}: {_type_spec(node.type)} = {unparse_expr(node.identity)}"
    raise TypeError(f"not a statement: {node!r}")


def unparse(program: ast.Program) -> str:
    """A whole program as source text, four-space indented, one statement a line."""
    blocks = []
    for item in program.items:
        lines = []
        if isinstance(item, ast.Cell):
            lines.append(f"cell {item.name}({_dims(item.dims)}) {{")
            lines.extend("    " + _statement(s) for s in item.body)
        else:
            lines.append(f"monoid {item.name}({_dims(item.dims)}) {{")
            for statement in item.body:
                if isinstance(statement, ast.Combine):
                    lines.append(f"    combine({statement.left}, {statement.right}) {{")
                    lines.extend("        " + _statement(b) for b in statement.body)
                    lines.append("    }")
                else:
                    lines.append("    " + _statement(statement))
        lines.append("}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


# ---- IR ----------------------------------------------------------------------------

_OPERATORS = {spec.name: spec.surface for spec in OPS.values() if not spec.surface.isidentifier() and spec.name not in ("neg", "index")}


def _ir_expr(node: ir.Expr, previous: frozenset[str]) -> tuple[str, int]:
    if isinstance(node, ir.Literal):
        text = node.label or format_number(node.value)
        return text, _PRECEDENCE["unary"] if text.startswith("-") or text.startswith("(") else _PRECEDENCE["atom"]
    if isinstance(node, ir.Ref):
        label = node.label
        if node.kind is ir.RefKind.STATE_PREV and node.name in previous:
            label = f"{label}_prev"
        return label, _PRECEDENCE["atom"]
    op = node.op
    if op == "add" and isinstance(node.args[1], ir.Op) and node.args[1].op == "neg":
        # a + -b reads better as a - b (the analysis builds the former when it splits terms)
        node = ir.Op("sub", (node.args[0], node.args[1].args[0]), node.type)
        op = "sub"
    args = [_ir_expr(a, previous) for a in node.args]
    if op == "neg":
        (operand, strength), = args
        return "-" + _wrap(operand, strength, _PRECEDENCE["unary"]), _PRECEDENCE["unary"]
    if op in _OPERATORS:
        symbol = _OPERATORS[op]
        level = _PRECEDENCE["compare"] if symbol in _COMPARISONS else _PRECEDENCE[symbol]
        (left, ls), (right, rs) = args
        if symbol == "**":
            return f"{_wrap(left, ls, _PRECEDENCE['postfix'])} ** {_wrap(right, rs, _PRECEDENCE['unary'])}", level
        return f"{_wrap(left, ls, level + 1 if symbol in _COMPARISONS else level)} {symbol} {_wrap(right, rs, level + 1)}", level
    if op == "index":
        (value, strength), = args
        items = []
        for item in node.attrs:
            if item == ir.NEW_AXIS:
                items.append("None")
            elif isinstance(item, ir.SliceItem):
                items.append(f"{'' if item.start is None else item.start}:{'' if item.stop is None else item.stop}")
            else:
                items.append(str(item))
        return f"{_wrap(value, strength, _PRECEDENCE['postfix'])}[{', '.join(items) or '...'}]", _PRECEDENCE["postfix"]
    surface = OPS[op].surface
    texts = [a[0] for a in args]
    if op in ("arange", "eye"):
        texts = [str(node.attrs[0])]
    elif (OPS[op].category.value == "reduction" or op == "softmax") and node.attrs and node.attrs[0] is not None:
        axis = node.attrs[0]
        texts.extend(str(a) for a in ((axis,) if isinstance(axis, int) else axis))
    elif op in ("transpose", "reshape", "concat", "stack"):
        texts.extend(str(a) for a in node.attrs)
    return f"{surface}({', '.join(texts)})", _PRECEDENCE["postfix"]


def format_expr(node: ir.Expr, previous: frozenset[str] | set[str] = frozenset()) -> str:
    """An IR expression as source text.

    The previous values of the states named in ``previous`` print as ``name_prev``, to tell
    them from the new values in expressions that read both.
    """
    return _ir_expr(node, frozenset(previous))[0]
