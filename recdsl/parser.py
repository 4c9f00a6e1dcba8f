"""Text to AST: the Lark LALR parser, its post-lexer, and the transformer to :mod:`recdsl.ast`.

Syntax errors become :class:`~recdsl.errors.ParseError` with the position, the line, a
caret, and the tokens that would have been accepted, in words.  Lark's own exceptions
never escape this module.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast
from .errors import ParseError, RecDSLError, Source, Span

# Tokens that can start an expression: when all of them are acceptable the error says
# "an expression" rather than listing them.
_EXPRESSION_START = {"NAME", "NUMBER", "IMAG", "LPAR", "MINUS", "PLUS"}

_TOKEN_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "IMAG": "an imaginary number",
    "COMPLEX": "'complex'",
    "COMPARE": "a comparison",
    "NONE": "'None'",
    "ELLIPSIS": "'...'",
    "_NL": "the end of the line",
    "$END": "the end of the file",
    "LBRACE": "'{'",
    "RBRACE": "'}'",
    "LPAR": "'('",
    "RPAR": "')'",
    "LSQB": "'['",
    "RSQB": "']'",
    "COMMA": "','",
    "COLON": "':'",
    "EQUAL": "'='",
    "PLUS": "'+'",
    "MINUS": "'-'",
    "STAR": "'*'",
    "SLASH": "'/'",
    "AT": "'@'",
    "DOT": "'.'",
}


def _token_words(name: str, parser: Lark) -> str:
    if name in _TOKEN_WORDS:
        return _TOKEN_WORDS[name]
    try:
        pattern = parser.get_terminal(name).pattern
        if pattern.type == "str":
            return f"'{pattern.value}'"
    except KeyError:
        pass
    return name.lower()


# Tokens that continue an expression: listed together as "an operator".
_OPERATORS = {"PLUS", "MINUS", "STAR", "SLASH", "AT", "COMPARE", "DOT", "LSQB", "LPAR", "__ANON_0", "__ANON_1"}


def _describe_expected(expected: set[str], parser: Lark) -> str:
    names = set(expected)
    words: list[str] = []
    if _EXPRESSION_START <= names:
        words.append("an expression")
        names -= _EXPRESSION_START
    operators = names & _OPERATORS
    if len(operators) >= 4:
        names -= _OPERATORS
    else:
        operators = set()
    keywords = sorted(n for n in names if n.isupper() and n not in _TOKEN_WORDS and not n.startswith("__"))
    others = sorted(n for n in names if n not in keywords)
    words.extend(_token_words(n, parser) for n in others)
    words.extend(_token_words(n, parser) for n in keywords)
    if operators:
        words.append("an operator")
    words = list(dict.fromkeys(words))
    if not words:
        return "a valid statement"
    if len(words) == 1:
        return words[0]
    return ", ".join(words[:-1]) + " or " + words[-1]


_CLOSING = {"(": ")", "[": "]", "{": "}"}


def _lines(text: str) -> list[str]:
    """The lines as Lark numbers them: split at '\n' only (str.splitlines also splits at
    form feeds and other separators that the grammar treats as spaces or rejects)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _unclosed_bracket(text: str, line: int, column: int, opening: str = "([") -> str | None:
    """Where the innermost bracket (of ``opening``) still open before (line, column) was opened, in words."""
    closing = "".join(_CLOSING[c] for c in opening)
    stack: list[tuple[str, int, int]] = []
    for number, content in enumerate(_lines(text)[:line], start=1):
        limit = column - 1 if number == line else len(content)
        for position, char in enumerate(content[:limit], start=1):
            if char == "#":
                break
            if char in opening:
                stack.append((char, number, position))
            elif char in closing and stack:
                stack.pop()
    if not stack:
        return None
    char, number, position = stack[-1]
    return f"the '{char}' opened at line {number}, column {position} is not closed: is a '{_CLOSING[char]}' missing?"


def _end_of_code(text: str) -> tuple[int, int]:
    """(line, column) just past the last character of code, ignoring trailing blank and comment lines."""
    lines = _lines(text)
    for number in range(len(lines), 0, -1):
        code = lines[number - 1].split("#")[0].rstrip()
        if code:
            return number, len(code) + 1
    return 1, 1


# Deeper parse trees are refused with a clean error rather than a RecursionError in the
# recursive passes after the parser (about a hundred nested calls, or a chain of two
# hundred binary operators: far beyond any real cell).
MAX_DEPTH = 200


def _too_deep(tree: lark.Tree, source: Source) -> ParseError | None:
    """A ParseError at the first subtree nested deeper than MAX_DEPTH, if any (iterative)."""
    stack = [(tree, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            span = _meta_span(node.meta) if isinstance(node, lark.Tree) else _token_span(node)
            return ParseError(
                f"the expression is nested too deeply (more than {MAX_DEPTH} levels)",
                span or Span(1, 1, 1, 1),
                source,
                expected="a shallower expression: bind parts of it to names on lines of their own",
            )
        if isinstance(node, lark.Tree):
            stack.extend((child, depth + 1) for child in node.children if isinstance(child, lark.Tree))
    return None


class _DropNewlinesInBrackets:
    """Post-lexer: inside ``( )`` and ``[ ]`` a newline does not end the statement."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for token in stream:
            if token.type in ("LPAR", "LSQB"):
                depth += 1
            elif token.type in ("RPAR", "RSQB"):
                depth = max(0, depth - 1)
            elif token.type == "_NL" and depth > 0:
                continue
            yield token


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = resources.files("recdsl").joinpath("grammar.lark").read_text()
    return Lark(
        grammar,
        parser="lalr",
        propagate_positions=True,
        postlex=_DropNewlinesInBrackets(),
        maybe_placeholders=True,
    )


def _meta_span(meta) -> Span | None:
    if getattr(meta, "empty", True):
        return None
    return Span(meta.line, meta.column, meta.end_line, max(meta.column, meta.end_column - 1) if meta.end_line == meta.line else meta.end_column - 1)


def _token_span(token: Token) -> Span:
    end_column = token.end_column - 1 if token.end_column is not None else token.column
    end_line = token.end_line if token.end_line is not None else token.line
    return Span(token.line, token.column, end_line, max(end_column, token.column) if end_line == token.line else end_column)


def _parse_number(text: str, span: Span | None = None) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    try:
        return int(text)
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits)
        raise ParseError(f"the number has {len(text)} digits, too many to read", span, expected="a shorter number (or a float such as 1e300)") from None


@v_args(meta=True)
class _ToAST(Transformer):
    """One method per grammar rule, each building a frozen AST node with its span."""

    # ---- expressions
    def number(self, meta, children):
        (token,) = children
        return ast.Number(_parse_number(str(token), _token_span(token)), span=_token_span(token))

    def imaginary(self, meta, children):
        (token,) = children
        # float() never overflows (it gives inf), unlike complex(0, <huge int>).
        return ast.Number(complex(0, float(str(token)[:-1])), span=_token_span(token))

    def name(self, meta, children):
        (token,) = children
        return ast.Name(str(token), span=_token_span(token))

    def _binary(op):  # noqa: N805 - a rule factory used in the class body
        def rule(self, meta, children):
            left, right = children
            return ast.Binary(op, left, right, span=_meta_span(meta))

        return rule

    add = _binary("+")
    sub = _binary("-")
    mul = _binary("*")
    div = _binary("/")
    floordiv = _binary("//")
    matmul = _binary("@")
    pow = _binary("**")

    def compare(self, meta, children):
        left, op, right = children
        return ast.Binary(str(op), left, right, span=_meta_span(meta))

    def neg(self, meta, children):
        return ast.Unary("-", children[0], span=_meta_span(meta))

    def pos(self, meta, children):
        return ast.Unary("+", children[0], span=_meta_span(meta))

    def call_args(self, meta, children):
        return tuple(c for c in children if c is not None)

    def call(self, meta, children):
        func, args = children
        return ast.Call(str(func), args, span=_meta_span(meta), func_span=_token_span(func))

    def index_items(self, meta, children):
        return tuple(c for c in children if c is not None)

    def index(self, meta, children):
        value, items = children
        return ast.Index(value, items, span=_meta_span(meta))

    def slice(self, meta, children):
        start, stop = children
        return ast.Slice(start, stop, span=_meta_span(meta))

    def new_axis(self, meta, children):
        return ast.NewAxis(span=_token_span(children[0]))

    def ellipsis(self, meta, children):
        return ast.EllipsisIndex(span=_token_span(children[0]))

    def field(self, meta, children):
        value, name = children
        return ast.Field(value, str(name), span=_meta_span(meta))

    # ---- declarations
    def type_spec(self, meta, children):
        is_complex = children[0] is not None
        dims = tuple(c for c in children[1:] if c is not None)
        return ast.TypeSpec(is_complex, dims, span=_meta_span(meta))

    def dim_param(self, meta, children):
        name, default = children
        return ast.DimParam(str(name), default, span=_meta_span(meta))

    def dim_params(self, meta, children):
        return tuple(c for c in children if c is not None)

    def input_decl(self, meta, children):
        name, type_spec = children
        return ast.InputDecl(str(name), type_spec, span=_meta_span(meta))

    def param_decl(self, meta, children):
        name, type_spec, init = children
        return ast.ParamDecl(str(name), type_spec, init, span=_meta_span(meta))

    def const_decl(self, meta, children):
        name, value = children
        return ast.ConstDecl(str(name), value, span=_meta_span(meta))

    def state_decl(self, meta, children):
        name, type_spec, init, reverse = children
        return ast.StateDecl(str(name), type_spec, init, span=_meta_span(meta), reverse=reverse is not None)

    def binding(self, meta, children):
        name, value = children
        return ast.Binding(str(name), value, span=_meta_span(meta))

    def lift(self, meta, children):
        name, value = children
        return ast.Lift(str(name), value, span=_meta_span(meta))

    def scan_binding(self, meta, children):
        name, reverse, monoid, args, *lifts = children
        lifts = tuple(l for l in lifts if l is not None)
        return ast.ScanBinding(str(name), str(monoid), args, lifts, span=_meta_span(meta), reverse=reverse is not None)

    def output_anon(self, meta, children):
        return ast.Output(None, children[0], span=_meta_span(meta))

    def output_named(self, meta, children):
        name, value = children
        return ast.Output(str(name), value, span=_meta_span(meta))

    def cell(self, meta, children):
        name, dims, *body = children
        return ast.Cell(str(name), dims, tuple(body), span=_token_span(name))

    def carry_decl(self, meta, children):
        name, type_spec, identity = children
        return ast.CarryDecl(str(name), type_spec, identity, span=_meta_span(meta))

    def combine(self, meta, children):
        left, right, *body = children
        return ast.Combine(str(left), str(right), tuple(body), span=_meta_span(meta))

    def monoid(self, meta, children):
        name, dims, *body = children
        return ast.Monoid(str(name), dims, tuple(body), span=_token_span(name))

    def start(self, meta, children):
        return ast.Program(tuple(children))


def _syntax_error(error: UnexpectedInput, source: Source) -> ParseError:
    parser = _lark()
    if isinstance(error, UnexpectedCharacters):
        char = source.text[error.pos_in_stream] if error.pos_in_stream < len(source.text) else ""
        span = Span(error.line, error.column, error.line, error.column)
        return ParseError(
            f"unexpected character {char!r}", span, source, "a name, a number, an operator, a bracket or the end of the line"
        )
    if isinstance(error, UnexpectedToken):
        token = error.token
        expected = _describe_expected(set(error.accepts or error.expected), parser)
        if token.type == "$END":
            line, column = _end_of_code(source.text)
            # An open '(' or '[' (inside which newlines do not end a statement) is the likely
            # culprit; an open '{' only when a '}' would have been accepted here.
            hint = _unclosed_bracket(source.text, line, column)
            if hint is None and "RBRACE" in set(error.accepts or error.expected):
                hint = _unclosed_bracket(source.text, line, column, "{")
            return ParseError("unexpected end of file", Span(line, column, line, column), source, f"{expected}; {hint}" if hint else expected)
        if token.type == "_NL":
            # The newline token starts at the end of the line: point just past its last character.
            return ParseError("unexpected end of line", Span(token.line, token.column, token.line, token.column), source, expected)
        what = f"'{token}'" if token.type not in ("NAME", "NUMBER", "IMAG") else f"{token.type.lower()} '{token}'"
        hint = _unclosed_bracket(source.text, token.line, token.column)
        if hint and token.line > 1 and hint.split("line ")[1].split(",")[0] != str(token.line):
            expected = f"{expected}; {hint}"
        return ParseError(f"unexpected {what}", _token_span(token), source, expected)
    if isinstance(error, UnexpectedEOF):
        line, column = _end_of_code(source.text)
        return ParseError("unexpected end of file", Span(line, column, line, column), source, _describe_expected(set(error.expected), parser))
    return ParseError(str(error).splitlines()[0] if str(error) else "syntax error", None, source)


def _longest_line(source: Source) -> Span:
    """The longest line, whole: the likeliest place of a nesting too deep for the parser."""
    lines = _lines(source.text)
    number = max(range(len(lines)), key=lambda i: len(lines[i])) + 1
    return Span(number, 1, number, max(1, len(lines[number - 1])))


def parse(text: str, filename: str = "<string>") -> ast.Program:
    """Parse a recdsl program into its AST.

    >>> program = parse("cell C(d) {\\n input x: [d]\\n out x\\n}\\n")
    >>> program.cells()[0].name
    'C'

    Raises :class:`ParseError` for malformed text.
    """
    source = Source(text, filename)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as error:
        raise _syntax_error(error, source) from None
    except RecursionError:
        raise ParseError("the program is nested too deeply", _longest_line(source), source) from None
    too_deep = _too_deep(tree, source)
    if too_deep is not None:
        raise too_deep
    try:
        return _ToAST().transform(tree)
    except VisitError as error:
        inner = error.orig_exc
        if isinstance(inner, RecDSLError):
            raise inner.located(source) from None
        if isinstance(inner, (ValueError, OverflowError)):
            raise ParseError(f"invalid literal: {inner}", _meta_span(error.obj.meta) if isinstance(error.obj, lark.Tree) else None, source) from None
        if isinstance(inner, RecursionError):
            raise ParseError("the program is nested too deeply", _longest_line(source), source) from None
        raise
    except RecursionError:
        raise ParseError("the program is nested too deeply", _longest_line(source), source) from None


def parse_file(path: str | Path) -> ast.Program:
    """Parse the program in the file at ``path``; errors name the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise RecDSLError(f"cannot read '{path}': {error.strerror or error}", expected="a path to a .rec file") from None
    except UnicodeDecodeError as error:
        raise RecDSLError(f"cannot read '{path}': it is not UTF-8 text ({error.reason} at byte {error.start})", expected="a .rec file in UTF-8") from None
    return parse(text, str(path))


__all__ = ["parse", "parse_file"]
