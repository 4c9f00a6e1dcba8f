"""Fuzzing the front end: whatever the text, recdsl either succeeds or raises RecDSLError.

Three sources of programs:

(a) random text: printable characters, and tokens of the language glued together (bare,
    and inside a cell so that the checker, not only the parser, sees them);
(b) mutations of the example programs: delete, duplicate or swap a token or a line,
    change a number, change a name;
(c) pathological nesting: thousands of parentheses, unary minus, calls, indexing.

A text goes through ``recdsl.load`` (parse and check); one that checks is compiled and
called once on tiny random inputs.  The only exception allowed out of any of these is a
``RecDSLError`` whose message is the documented located form, with no traceback, Lark
exception or recdsl source path in it.  The whole file runs in well under a minute.

The regressions at the end are crashes these fuzzers found, minimised.
"""

from __future__ import annotations

import math
import os
import re
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl import ops as recdsl_ops
from recdsl import ir

EXAMPLES = {path.stem: path.read_text() for path in sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.rec"))}

# By default the examples are derandomized (the same every run, so the suite is not flaky)
# and few.  For a longer, random campaign:  RECDSL_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py
CAMPAIGN = int(os.environ.get("RECDSL_FUZZ_EXAMPLES", "0"))


def _examples(default: int) -> int:
    return CAMPAIGN or default


FUZZ = settings(
    max_examples=_examples(120),
    deadline=None,
    derandomize=not CAMPAIGN,
    database=None if not CAMPAIGN else settings.default.database,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

# Tokens of the language (whitespace and comments kept, so that "".join(tokens) == text).
TOKEN = re.compile(r"[ \t]+|\n|#[^\n]*|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[jJ]?|[A-Za-z_]\w*|\*\*|//|<=|>=|==|!=|\.\.\.|.", re.S)
NAME = re.compile(r"[A-Za-z_]\w*")
NUMBER = re.compile(r"(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[jJ]?")

KEYWORDS = ["cell", "monoid", "input", "param", "state", "const", "out", "scan", "from", "combine", "carry", "complex", "None"]
# The vocabulary comes from the op registry, so a new function is fuzzed the day it is added.
FUNCTIONS = sorted(recdsl_ops.FUNCTIONS)
INITIALIZERS = ["zeros", "ones", "glorot", "normal", "uniform"]
NAMES = ["x", "h", "d", "S", "q", "k", "v", "W", "a", "b", "m", "n", "inf", "pi", "acc", "_"]
NUMBERS = ["0", "1", "2", "3", "-1", "0.5", "7", "1e400", "1j", "2.5j", ".5", "1e-3", "12", "99999999999999999999", "4096"]
PUNCTUATION = ["(", ")", "[", "]", "{", "}", ",", ":", "=", "+", "-", "*", "/", "//", "**", "@", "<", "<=", "==", ".", "...", "#", "\\", "$", ";", "'"]
LANGUAGE_TOKENS = KEYWORDS + FUNCTIONS + INITIALIZERS + NAMES + NUMBERS + PUNCTUATION + ["\n", " "]

INTERNALS = ("Traceback", "lark", "Lark", ".py", "site-packages", "recdsl/", "VisitError", "Unexpected")
MAX_ELEMENTS = 4096  # compile and run only programs whose every value is at most this big


# ---- the property --------------------------------------------------------------------


def assert_clean(error: recdsl.RecDSLError, text: str | None = None) -> None:
    message = str(error)
    for internal in INTERNALS:
        assert internal not in message, f"{internal!r} leaks into the message:\n{message}"
    assert error.__cause__ is None and (error.__suppress_context__ or error.__context__ is None)
    if error.span is not None and error.source is not None:
        head, shown, caret = message.split("\n")[:3]
        assert head.startswith(f"{error.filename}:{error.line}:{error.column}: {error.kind}: ")
        gutter = f"{error.line:>4} | "
        assert shown.startswith(gutter)
        assert caret.index("^") == len(gutter) + error.column - 1
        if text is not None:
            assert 1 <= error.line <= max(1, len(text.splitlines()))


def _as_program(text: str) -> str:
    # load() reads a one-line string without '{' as a path: keep fuzz text program text.
    return text if ("\n" in text or "{" in text) else text + "\n"


def _values(cell: ir.CellIR):
    for const in cell.consts:
        yield const.value
    for param in cell.params:
        if param.init.expr is not None:
            yield param.init.expr
    for state in cell.states:
        yield state.init
    for statement in cell.body:
        if isinstance(statement, ir.ScanAssign):
            yield from statement.lifts
            yield from (c.identity for c in statement.monoid.carries)
            yield from (a.value for a in statement.monoid.body)
        else:
            yield statement.value


def _small(cell: ir.CellIR) -> bool:
    types = [d.type for d in (*cell.inputs, *cell.params, *cell.states)]
    types += [node.type for value in _values(cell) for node in ir.walk(value)]
    return all(math.prod(t.shape) <= MAX_ELEMENTS for t in types if isinstance(t, ir.Type))


def _lower_rank_update(cell: ir.CellIR) -> bool:
    """A state update, scan element or combine result of lower rank than its declared shape
    (`h = tanh(sum(h))` with `h: [d]`): the backends once expanded these without aligning dims."""
    declared = {s.name: s.type for s in cell.states}
    for statement in cell.body:
        if isinstance(statement, ir.Update) and statement.value.type.rank < declared[statement.state].rank:
            return True
        if isinstance(statement, ir.ScanAssign):
            for carry, lift, result in zip(statement.monoid.carries, statement.lifts, statement.monoid.results):
                if lift.type.rank < carry.type.rank or result.type.rank < carry.type.rank:
                    return True
    return False


def _inputs(cell: ir.CellIR) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    inputs = {}
    for declared in cell.inputs:
        shape = (2, 3, *declared.type.shape)  # B = 2: a batch of 1 would hide broadcasting mistakes
        value = torch.randn(shape, generator=generator)
        if declared.type.kind is ir.Kind.COMPLEX:
            value = torch.complex(value, torch.randn(shape, generator=generator))
        inputs[declared.name] = value
    return inputs


def front_and_back(text: str) -> str:
    """Load, and if that works, compile and call once. Returns what happened."""
    text = _as_program(text)
    try:
        program = recdsl.parse(text)
    except recdsl.RecDSLError as error:
        assert_clean(error, text)
        return "parse error"
    cells = program.cells()
    dims: dict[str, int] = {}
    cell = None
    if cells:
        cell = cells[0].name if len(cells) > 1 and len({c.name for c in cells}) == len(cells) else None
        dims = {dim.name: 2 + i for i, dim in enumerate(cells[0].dims) if dim.default is None}
    try:
        checked = recdsl.load(text, cell=cell, dims=dims)
    except recdsl.RecDSLError as error:
        assert_clean(error, text)
        assert error.span is not None and error.source is not None, f"an error in a program is not located:\n{error}"
        return "check error"
    if not _small(checked):
        return "checked (too big to run)"
    try:
        module = recdsl.compile(text, cell=cell, **dims)
        with torch.no_grad():
            module(**_inputs(module.cell))
    except recdsl.RecDSLError as error:
        assert_clean(error, text)
        return "compile or call error"
    return "ran"


# ---- (a) random text ---------------------------------------------------------------

printable = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126) | st.sampled_from("\n\t\r\x0c"), max_size=300)
token_soup = st.lists(
    st.tuples(st.sampled_from(LANGUAGE_TOKENS), st.sampled_from(["", " ", " ", "\n"])), max_size=60
).map(lambda pairs: "".join(token + sep for token, sep in pairs))


@FUZZ
@given(printable)
def test_random_printable_text(text):
    front_and_back(text)


@FUZZ
@given(token_soup)
def test_random_tokens(text):
    front_and_back(text)


@FUZZ
@given(st.lists(token_soup, min_size=1, max_size=4), st.sampled_from(["d", "d, e", "d = 3", ""]))
def test_random_statements_inside_a_cell(lines, dims):
    # The soup sits in a valid frame, so more of it reaches the checker.
    body = "\n    ".join(line.replace("\n", " ") for line in lines)
    text = f"cell C({dims}) {{\n    input x: [{dims.split(',')[0].split('=')[0].strip() or 2}]\n    {body}\n    out x\n}}\n"
    front_and_back(text)


# Well-formed programs with random expressions: they get past the parser, so the checker,
# the analysis, the backends and the module see them. With d == e many of them check.
LEAVES = ["x", "y", "h", "S", "W", "b", "t", "d", "e", "1", "0.5", "2", "1j", "pi", "inf"]
UNARY = ["-"] + sorted(f for f, op in recdsl_ops.FUNCTIONS.items() if recdsl_ops.OPS[op].min_args == 1 and recdsl_ops.OPS[op].category is not recdsl_ops.Category.CONSTANT)
BINARY = sorted({spec.surface for spec in recdsl_ops.OPS.values() if spec.max_args == 2 and spec.category is not recdsl_ops.Category.REDUCTION} - {"<", "<=", ">", ">=", "==", "!="}) + ["where"]
POSTFIX = ["[:, None]", "[None]", "[0]", "[-1]", "[..., 0]", "[1:]", "[:, 0]", ".T"]
# Calls with static operands after the values (axes, dims): the array functions.
STATIC_CALLS = ["softmax({a}, {k})", "transpose({a}, 0, {k})", "reshape({a}, -1)", "concat({a}, {b}, {k})", "stack({a}, {b}, {k})", "clamp({a}, -1, {b})", "sum({a}, 0, {k})", "norm({a}, {k})"]


def _unary(f: str, a: str) -> str:
    return f"(-{a})" if f == "-" else f"{f}({a})"


def _binary(op: str, a: str, b: str) -> str:
    if op == "where":
        return f"where({a} > 0, {a}, {b})"
    return f"({a} {op} {b})" if not op.isalpha() else f"{op}({a}, {b})"


expressions = st.recursive(
    st.sampled_from(LEAVES),
    lambda inner: st.one_of(
        st.builds(_unary, st.sampled_from(UNARY), inner),
        st.builds(_binary, st.sampled_from(BINARY), inner, inner),
        st.builds(lambda a, p: f"({a}){p}", inner, st.sampled_from(POSTFIX)),
        st.builds(lambda a, k: f"sum({a}, {k})", inner, st.sampled_from(["0", "1", "-1"])),
        st.builds(lambda f, a, b, k: f.format(a=a, b=b, k=k), st.sampled_from(STATIC_CALLS), inner, inner, st.sampled_from(["0", "1", "-1"])),
    ),
    max_leaves=6,
)


@settings(FUZZ, max_examples=_examples(200))
@given(expressions, expressions, expressions, expressions, st.sampled_from([(2, 2), (2, 3), (1, 2)]), st.booleans())
def test_random_expressions_in_a_cell(t, update_h, update_s, output, sizes, gated):
    if gated:  # the shape of the cells in the examples: a gated diagonal / outer-product update
        update_h = f"sigmoid(real({update_h})) * h + (1 - sigmoid(real({update_h}))) * x"
        update_s = f"0.9 * S + outer({update_s}, y)"
    text = (
        "cell F(d, e) {\n    input x: [d]\n    input y: [e]\n    param W: [d, e] = glorot\n    param b: [e] = zeros\n"
        f"    state h: [d] = 0\n    state S: [d, e] = 0\n    t = {t}\n    h = {update_h}\n    S = {update_s}\n    out {output}\n}}\n"
    )
    front_and_back(text.replace("cell F(d, e)", f"cell F(d = {sizes[0]}, e = {sizes[1]})"))


# ---- (b) mutations of the examples --------------------------------------------------


def _mutate(text: str, draw) -> str:
    tokens = TOKEN.findall(text)
    assert "".join(tokens) == text
    for _ in range(draw(st.integers(1, 3))):
        if not tokens:
            break
        kind = draw(st.sampled_from(["delete", "duplicate", "swap", "number", "name", "insert", "line"]))
        i = draw(st.integers(0, len(tokens) - 1))
        if kind == "delete":
            del tokens[i]
        elif kind == "duplicate":
            tokens.insert(i, tokens[i])
        elif kind == "swap":
            j = draw(st.integers(0, len(tokens) - 1))
            tokens[i], tokens[j] = tokens[j], tokens[i]
        elif kind == "number":
            positions = [k for k, t in enumerate(tokens) if NUMBER.fullmatch(t)]
            if positions:
                tokens[draw(st.sampled_from(positions))] = draw(st.sampled_from(NUMBERS))
        elif kind == "name":
            positions = [k for k, t in enumerate(tokens) if NAME.fullmatch(t)]
            if positions:
                own = sorted({t for t in tokens if NAME.fullmatch(t)})
                tokens[draw(st.sampled_from(positions))] = draw(st.sampled_from(own + KEYWORDS + FUNCTIONS + INITIALIZERS + NAMES))
        elif kind == "insert":
            tokens.insert(i, draw(st.sampled_from(LANGUAGE_TOKENS)))
        else:
            lines = "".join(tokens).split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            how = draw(st.sampled_from(["delete", "duplicate", "swap"]))
            if how == "delete":
                del lines[a]
            elif how == "duplicate":
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            tokens = TOKEN.findall("\n".join(lines))
    return "".join(tokens)


def test_examples_run_unmutated():
    # The baseline of the mutation fuzzer: every example loads, compiles and runs here.
    for name, text in EXAMPLES.items():
        assert front_and_back(text) == "ran", name


@settings(FUZZ, max_examples=_examples(250))
@given(st.sampled_from(sorted(EXAMPLES)), st.data())
def test_mutated_examples(name, data):
    front_and_back(_mutate(EXAMPLES[name], data.draw))


# ---- (c) deep nesting ---------------------------------------------------------------

CELL = "cell C(d) {{\n    input x: [d]\n    state h: [d] = 0\n    h = {}\n    out h\n}}\n"
DEEP = 5000


@pytest.mark.parametrize(
    "expression",
    [
        "(" * DEEP + "h" + ")" * DEEP,
        "-" * DEEP + "h",
        "tanh(" * DEEP + "h" + ")" * DEEP,
        "h" + "[:]" * DEEP,
        "h" + " + x" * DEEP,
        "h" + " ** h" * DEEP,
        "h[" * DEEP + "0" + "]" * DEEP,
        "(" * DEEP + "h",
        "max(h, " * DEEP + "x" + ")" * DEEP,
    ],
    ids=["parentheses", "unary-minus", "calls", "slices", "sum-chain", "power-chain", "nested-index", "unclosed", "binary-calls"],
)
def test_deep_nesting_is_a_clean_error(expression):
    text = CELL.format(expression)
    limit = sys.getrecursionlimit()
    outcome = front_and_back(text)
    assert sys.getrecursionlimit() == limit
    if expression.startswith("(" * DEEP) and expression.endswith(")"):
        assert outcome == "ran"  # redundant parentheses are not nesting
    else:
        assert outcome in ("parse error", "check error")


def test_deep_nesting_message():
    text = CELL.format("-" * DEEP + "h")
    with pytest.raises(recdsl.ParseError) as info:
        recdsl.load(text, dims={"d": 3})
    assert info.value.line == 4
    assert "nested too deeply" in str(info.value)
    assert_clean(info.value, text)


def test_moderate_nesting_still_works():
    text = CELL.format("tanh(" * 60 + "h" + ")" * 60 + " + x")
    assert front_and_back(text) == "ran"
    text = CELL.format("h" + " + x" * 150)
    assert front_and_back(text) == "ran"


# ---- regressions: crashes found by fuzzing, minimised ---------------------------------

REGRESSIONS = {
    # OverflowError from float() of a huge static int
    "huge-dim-power": ("cell C(d) {\n    input x: [d]\n    input y: [d ** 1000]\n    out x\n}\n", recdsl.ShapeError),
    # took forever (a 10**10-digit integer) before the constant-size cap
    "power-tower": ("cell C(d) {\n    input x: [d]\n    out x[10 ** 10 ** 10]\n}\n", recdsl.TypeCheckError),
    "squaring-consts-in-a-shape": (
        "cell C(d) {\n    input x: [d]\n" + "".join(f"    const c{i} = c{i - 1} * c{i - 1}\n" if i else "    const c0 = 2 ** 4000\n" for i in range(40)) + "    input y: [c39]\n    out x\n}\n",
        recdsl.TypeCheckError,
    ),
    # ValueError (int max str digits) escaped as an unlocated "invalid literal"
    "number-too-long": ("cell C(d) {\n    input x: [d]\n    out x * " + "9" * 5000 + "\n}\n", recdsl.ParseError),
    # OverflowError in the torch backend when the literal became a tensor
    "int-literal-beyond-float": ("cell C(d) {\n    input x: [d]\n    out x * 1" + "0" * 400 + "\n}\n", recdsl.TypeCheckError),
    # VisitError(RecursionError) escaped from the Lark transformer
    "deep-power-chain": ("cell C(d) {\n    input x: [d]\n    out x" + " ** x" * 700 + "\n}\n", recdsl.ParseError),
    # max(1) evaluated statically: "'int' object is not iterable"
    "static-call-arity": ("cell C(d) {\n    input x: [d]\n    input y: [max(1)]\n    out x\n}\n", recdsl.TypeCheckError),
    # nan/inf initializer arguments were accepted
    "normal-nan": ("cell C(d) {\n    input x: [d]\n    param p: [d] = normal(0 * inf)\n    out x\n}\n", recdsl.TypeCheckError),
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_regression(name):
    text, error = REGRESSIONS[name]
    with pytest.raises(error) as info:
        recdsl.compile(text, d=3)
    assert_clean(info.value, text)
    assert info.value.span is not None


def test_squaring_consts_stays_fast():
    # Each const's compile-time value is capped, so 40 squarings do not build a 2**40-bit int;
    # the consts themselves are fine (floats, inf at run time).
    text = "cell C(d) {\n    input x: [d]\n" + "".join(f"    const c{i} = c{i - 1} * c{i - 1}\n" if i else "    const c0 = 2 ** 4000\n" for i in range(40)) + "    out x * c39\n}\n"
    assert front_and_back(text) == "ran"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 2**70])
def test_non_finite_or_huge_dims(value):
    with pytest.raises(recdsl.DimensionError, match="must be a finite number"):
        recdsl.load("cell C(d) {\n    input x: [3]\n    out x * d\n}\n", dims={"d": value})


LOWER_RANK_UPDATES = {
    "state": "cell C(d) {\n    input x: [d]\n    state h: [d] = 0\n    h = tanh(sum(h))\n    out h\n}\n",
    "scan-element": (
        "monoid Sum(d) {\n    carry s: [d] = 0\n    combine(a, b) {\n        s = a.s + b.s\n    }\n}\n"
        "cell C(d) {\n    input x: [d]\n    acc = scan Sum(d) from (s = sum(x))\n    out acc.s\n}\n"
    ),
    "combine-result": (
        "monoid M(d) {\n    carry s: [d] = 0\n    combine(a, b) {\n        s = a.s[0] + b.s[0]\n    }\n}\n"
        "cell C(d) {\n    input x: [d]\n    acc = scan M(d) from (s = x)\n    out acc.s\n}\n"
    ),
}


@pytest.mark.parametrize("name", sorted(LOWER_RANK_UPDATES))
def test_lower_rank_update_runs(name):
    text = LOWER_RANK_UPDATES[name]
    assert _lower_rank_update(recdsl.load(text, dims={"d": 3}))
    module = recdsl.compile(text, backend="sequential", d=3)
    output = module(torch.randn(2, 4, 3))
    assert output.shape == (2, 4, 3)


LINEAR_SPLIT_BIAS = {
    # (1 + S[:, 0]) is split into the bias 1 (shape []) and the term S[:, 0]; outer(1, x) is
    # then rebuilt with the shape (shapes[0][0], ...) of a scalar: IndexError
    "outer": "cell F(d) {\n    input x: [d]\n    state S: [d, d] = 0\n    S = outer(1 + S[:, 0], x)\n    out S\n}\n",
    # the same split gives 1 @ W, a 0-D matmul that torch refuses (scan backend)
    "matmul": "cell F(d) {\n    input x: [d]\n    param W: [d, d] = glorot\n    state h: [d] = 0\n    h = (1 + h) @ W\n    out h\n}\n",
}


@pytest.mark.parametrize("name", sorted(LINEAR_SPLIT_BIAS))
def test_bilinear_of_a_broadcast_bias_runs(name):
    assert front_and_back(LINEAR_SPLIT_BIAS[name]) == "ran"


def test_doubling_chain_of_bindings_runs():
    n = 12
    body = "    y0 = h\n" + "".join(f"    y{k} = y{k - 1} + y{k - 1}\n" for k in range(1, n)) + f"    h = y{n - 1}\n    out h\n}}\n"
    text = "cell C(d) {\n    input x: [d]\n    state h: [d] = 0\n" + body
    assert front_and_back(text) == "ran"


def test_long_chain_of_bindings_compiles():
    body = "    y0 = h\n" + "".join(f"    y{k} = y{k - 1} * 0.5 + x\n" for k in range(1, 400)) + "    h = y399\n    out h\n}\n"
    text = "cell C(d) {\n    input x: [d]\n    state h: [d] = 0\n" + body
    assert front_and_back(text) in ("ran", "compile or call error")
