"""Golden tests of the error messages a user sees for mistakes in a program or a call.

The contract (recdsl/errors.py): every mistake raises a subclass of ``recdsl.RecDSLError``
whose message is

    FILE:LINE:COL: KIND: summary
       N | the source line
           ^~~~ (a caret under the offending span)
      expected ...

and nothing internal (a traceback, a Lark exception, the path of a recdsl source file)
reaches the user.  Each ``Case`` below is a program with one mistake and the exact full
message; it is written to ``model.rec`` and loaded by path, so the file name is known.
Call-time mistakes (wrong inputs or states) raise ``InputError`` naming the input and the
shape it should have.

To add a case: write the program, run it, read the message critically (is the caret under
the right thing? does "expected" say what would have been right?), then paste it here.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field

import pytest
import torch

import recdsl


@dataclass(frozen=True)
class Case:
    id: str
    error: type
    program: str
    message: str
    dims: dict = field(default_factory=lambda: {"d": 4, "e": 3})
    cell: str | None = None

    @property
    def source(self) -> str:
        return textwrap.dedent(self.program).removeprefix("\n")

    @property
    def expected_message(self) -> str:
        return textwrap.dedent(self.message).strip("\n")


CASES = [
    Case(
        "missing-paren-across-lines",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                y = (x +
                    1
                out y
            }
            """,
        """
            model.rec:5:5: syntax error: unexpected 'out'
               5 |     out y
                       ^~~
              expected ')' or an operator; the '(' opened at line 3, column 9 is not closed: is a ')' missing?
            """,
    ),
    Case(
        "missing-brace",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                out x
            """,
        """
            model.rec:3:10: syntax error: unexpected end of file
               3 |     out x
                            ^
              expected a name, '}', 'const', 'input', 'out', 'param' or 'state'; the '{' opened at line 1, column 14 is not closed: is a '}' missing?
            """,
    ),
    Case(
        "stray-character",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                out x $ 2
            }
            """,
        """
            model.rec:3:11: syntax error: unexpected character '$'
               3 |     out x $ 2
                             ^
              expected a name, a number, an operator, a bracket or the end of the line
            """,
    ),
    Case(
        "bad-statement-start",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                + x
                out x
            }
            """,
        """
            model.rec:3:5: syntax error: unexpected '+'
               3 |     + x
                       ^
              expected a name, '}', 'const', 'input', 'out', 'param' or 'state'
            """,
    ),
    Case(
        "eof-in-expression",
        recdsl.ParseError,
        """
            cell C(d) {
                input x: [d]
                y = x *""",
        """
            model.rec:3:12: syntax error: unexpected end of file
               3 |     y = x *
                              ^
              expected an expression
            """,
    ),
    Case(
        "out-with-nothing",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                out
            }
            """,
        """
            model.rec:3:8: syntax error: unexpected end of line
               3 |     out
                          ^
              expected an expression
            """,
    ),
    Case(
        "extra-paren",
        recdsl.ParseError,
        """
            cell C(d, e) {
                input x: [d]
                out (x + 1))
            }
            """,
        """
            model.rec:3:16: syntax error: unexpected ')'
               3 |     out (x + 1))
                                  ^
              expected the end of the line
            """,
    ),
    Case(
        "undefined-name",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                param scale: [d] = ones
                out x * scal
            }
            """,
        """
            model.rec:4:13: name error: undefined name 'scal' (did you mean 'scale'?)
               4 |     out x * scal
                               ^~~~
              expected a dim, input, param, const, state or earlier binding of this cell
            """,
    ),
    Case(
        "duplicate-name",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                param x: [d] = zeros
                out x
            }
            """,
        """
            model.rec:3:5: name error: 'x' is already defined at line 2 as an input
               3 |     param x: [d] = zeros
                       ^~~~~~~~~~~~~~~~~~~~
              expected a new name: every name in a cell is defined once (a state is updated with `name = ...`)
            """,
    ),
    Case(
        "assign-to-input",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                x = 2 * x
                out x
            }
            """,
        """
            model.rec:3:5: name error: cannot assign to an input ('x')
               3 |     x = 2 * x
                       ^~~~~~~~~
              expected a new name for the binding
            """,
    ),
    Case(
        "state-updated-twice",
        recdsl.DeclarationError,
        """
            cell C(d, e) {
                input x: [d]
                state h: [d] = 0
                h = 0.5 * h + x
                h = tanh(h)
                out h
            }
            """,
        """
            model.rec:5:5: declaration error: state 'h' is updated twice (first at line 4)
               5 |     h = tanh(h)
                       ^~~~~~~~~~~
              expected one update line per state; bind intermediate values to new names
            """,
    ),
    Case(
        "state-never-updated",
        recdsl.DeclarationError,
        """
            cell C(d, e) {
                input x: [d]
                state h: [d] = 0
                state c: [d] = 0
                h = h + x
                out h
            }
            """,
        """
            model.rec:4:5: declaration error: state 'c' is never updated
               4 |     state c: [d] = 0
                       ^~~~~~~~~~~~~~~~
              expected a line `c = ...` in the cell body (its new value at each step)
            """,
    ),
    Case(
        "no-output",
        recdsl.DeclarationError,
        """
            cell C(d, e) {
                input x: [d]
                state h: [d] = 0
                h = h + x
            }
            """,
        """
            model.rec:1:6: declaration error: cell C has no output
               1 | cell C(d, e) {
                        ^
              expected a line `out EXPR` or `out NAME = EXPR`
            """,
    ),
    Case(
        "no-input",
        recdsl.DeclarationError,
        """
            cell C(d, e) {
                param w: [d] = ones
                state h: [d] = 0
                h = h + w
                out h
            }
            """,
        """
            model.rec:1:6: declaration error: cell C has no input
               1 | cell C(d, e) {
                        ^
              expected a line `input NAME: [shape]`
            """,
    ),
    Case(
        "broadcast-mismatch",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                input y: [e]
                out x + y
            }
            """,
        """
            model.rec:4:9: shape error: shapes [4] and [3] do not broadcast in '+'
               4 |     out x + y
                           ^~~~~
              expected shapes that are equal or 1 in each dim, aligned from the right (numpy broadcasting)
            """,
    ),
    Case(
        "bad-matmul",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                param W: [d, e] = glorot
                out W @ x
            }
            """,
        """
            model.rec:4:9: shape error: cannot multiply [4, 3] @ [4]: the inner dims differ: 3 (last of the left operand) and 4 (first matrix dim of the right operand)
               4 |     out W @ x
                           ^~~~~
              expected numpy matmul shapes, e.g. [k] @ [k, n] or [m, k] @ [k]
            """,
    ),
    Case(
        "outer-of-matrix",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                param W: [d, e] = glorot
                out outer(W, x)
            }
            """,
        """
            model.rec:4:15: shape error: outer() needs vectors, got shape [4, 3]
               4 |     out outer(W, x)
                                 ^
              expected a value of shape [n]
            """,
    ),
    Case(
        "axis-out-of-range",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                param W: [d, e] = glorot
                out sum(x @ W, 1)
            }
            """,
        """
            model.rec:4:20: shape error: axis 1 is out of range for a value of shape [3]
               4 |     out sum(x @ W, 1)
                                      ^
              expected an axis in [-1, 0]
            """,
    ),
    Case(
        "index-out-of-range",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                out x[4]
            }
            """,
        """
            model.rec:3:11: shape error: index 4 is out of range for a dim of size 4
               3 |     out x[4]
                             ^
              expected an index in [-4, 3]
            """,
    ),
    Case(
        "sigmoid-of-complex",
        recdsl.TypeCheckError,
        """
            cell C(d, e) {
                input x: [d]
                z = x * exp(1j * pi / 4)
                out sigmoid(z)
            }
            """,
        """
            model.rec:4:17: type error: 'sigmoid' needs real operands, got a complex value of shape [4]
               4 |     out sigmoid(z)
                                   ^
              expected a real value (use real(z), imag(z) or abs(z))
            """,
    ),
    Case(
        "wrong-arity",
        recdsl.TypeCheckError,
        """
            cell C(d, e) {
                input x: [d]
                input y: [d]
                out tanh(x, y)
            }
            """,
        """
            model.rec:4:9: type error: tanh() takes 1 argument, got 2
               4 |     out tanh(x, y)
                           ^~~~~~~~~~
              expected 1 argument (tanh: hyperbolic tangent)
            """,
    ),
    Case(
        "unknown-function",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                out sigmod(x)
            }
            """,
        """
            model.rec:3:9: name error: unknown function 'sigmod' (did you mean 'sigmoid'?)
               3 |     out sigmod(x)
                           ^~~~~~
              expected one of: abs, amax, amin, arange, clamp, concat, conj, cos, diag, exp, expm1, eye, imag, log, log1p, logaddexp, logsigmoid, logsumexp, max, mean, min, norm, outer, real, relu, reshape, sigmoid, sign, silu, sin, softmax, softplus, sqrt, stack, sum, tanh, transpose, where
            """,
    ),
    Case(
        "initializer-in-expression",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                param W: [d, e] = 0.1 * glorot
                out x @ W
            }
            """,
        """
            model.rec:3:29: name error: 'glorot' is an initializer
               3 |     param W: [d, e] = 0.1 * glorot
                                               ^~~~~~
              expected it only as the whole right-hand side of a `param` line
            """,
    ),
    Case(
        "param-init-shape",
        recdsl.ShapeError,
        """
            cell C(d, e) {
                input x: [d]
                param b: [e] = arange(d)
                out x
            }
            """,
        """
            model.rec:3:20: shape error: the initializer of param 'b' has shape [4], which does not broadcast to the declared [3]
               3 |     param b: [e] = arange(d)
                                      ^~~~~~~~~
              expected a value of shape [3] (or one that broadcasts to it)
            """,
    ),
    Case(
        "missing-dim",
        recdsl.DimensionError,
        """
            cell C(d, e) {
                input x: [d]
                out x
            }
            """,
        """
            model.rec:1:11: dimension error: cell C needs a value for dim 'e'
               1 | cell C(d, e) {
                             ^
              expected compile(..., e=<int>)
            """,
        dims={'d': 4},
    ),
    Case(
        "unknown-dim",
        recdsl.DimensionError,
        """
            cell C(d, e) {
                input x: [d]
                out x
            }
            """,
        """
            model.rec:1:6: dimension error: cell C has no dim 'dd' (did you mean 'd'?)
               1 | cell C(d, e) {
                        ^
              expected one of: d, e
            """,
        dims={'d': 4, 'e': 3, 'dd': 2},
    ),
    Case(
        "monoid-missing-carry",
        recdsl.DeclarationError,
        """
            monoid Sum(d) {
                carry s: [d] = 0
                carry n: [] = 0
                combine(a, b) {
                    s = a.s + b.s
                }
            }
            
            cell C(d, e) {
                input x: [d]
                acc = scan Sum(d) from (s = x, n = 1)
                out acc.s / acc.n
            }
            """,
        """
            model.rec:4:5: declaration error: combine of monoid Sum does not compute carry 'n'
               4 |     combine(a, b) {
                       ^~~~~~~~~~~~~~~
              expected a line `n = ...` in combine
            """,
    ),
    Case(
        "scan-unknown-carry",
        recdsl.NameResolutionError,
        """
            monoid Sum(d) {
                carry s: [d] = 0
                carry n: [] = 0
                combine(a, b) {
                    s = a.s + b.s
                    n = a.n + b.n
                }
            }
            
            cell C(d, e) {
                input x: [d]
                acc = scan Sum(d) from (s = x, m = 1)
                out acc.s
            }
            """,
        """
            model.rec:12:36: name error: monoid Sum has no carry 'm'
              12 |     acc = scan Sum(d) from (s = x, m = 1)
                                                      ^~~~~
              expected one of: s, n
            """,
    ),
    Case(
        "undefined-monoid",
        recdsl.NameResolutionError,
        """
            monoid Sum(d) {
                carry s: [d] = 0
                carry n: [] = 0
                combine(a, b) {
                    s = a.s + b.s
                    n = a.n + b.n
                }
            }
            
            cell C(d, e) {
                input x: [d]
                acc = scan Summ(d) from (s = x, n = 1)
                out acc.s
            }
            """,
        """
            model.rec:12:5: name error: undefined monoid 'Summ' (did you mean 'Sum'?)
              12 |     acc = scan Summ(d) from (s = x, n = 1)
                       ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
              expected a monoid declared in the same file: Sum
            """,
    ),
    Case(
        "several-cells",
        recdsl.DeclarationError,
        """
            cell MinGRU(d_in, d) {
                input x: [d_in]
                param W_z: [d_in, d] = glorot
                param W_h: [d_in, d] = glorot
                state h: [d] = 0
                z = sigmoid(x @ W_z)
                hc = x @ W_h
                h = (1 - z) * h + z * hc
                out h
            }
            
            cell Id(d) {
                input x: [d]
                out x
            }
            """,
        """
            model.rec:12:6: declaration error: the program defines 2 cells: MinGRU, Id
              12 | cell Id(d) {
                        ^~
              expected compile(..., cell=NAME) to pick one
            """,
        dims={'d': 4},
    ),
    Case(
        "state-init-from-input",
        recdsl.NameResolutionError,
        """
            cell C(d, e) {
                input x: [d]
                state h: [d] = x
                h = h + x
                out h
            }
            """,
        """
            model.rec:3:20: name error: an input ('x') cannot be used in a state's initial value
               3 |     state h: [d] = x
                                      ^
              expected consts, numbers, dims, params (in a state's initial value)
            """,
    ),
    Case(
        "complex-update-of-real-state",
        recdsl.TypeCheckError,
        """
            cell C(d, e) {
                input x: [d]
                state h: [d] = 0
                h = h * exp(1j) + x
                out real(h)
            }
            """,
        """
            model.rec:4:9: type error: the update of state 'h' is complex but is declared real
               4 |     h = h * exp(1j) + x
                           ^~~~~~~~~~~~~~~
              expected a real value, or declare it complex[...]
            """,
    ),
    Case(
        "unknown-carry-field",
        recdsl.NameResolutionError,
        """
            monoid Sum(d) {
                carry s: [d] = 0
                carry n: [] = 0
                combine(a, b) {
                    s = a.s + b.s
                    n = a.n + b.n
                }
            }
            
            cell C(d, e) {
                input x: [d]
                acc = scan Sum(d) from (s = x, n = 1)
                out acc.m
            }
            """,
        """
            model.rec:13:9: name error: 'acc' has no carry 'm'
              13 |     out acc.m
                           ^~~~~
              expected one of: s, n
            """,
    ),
    Case(
        "undefined-name-in-combine",
        recdsl.NameResolutionError,
        """
            monoid Sum(d) {
                carry s: [d] = 0
                combine(a, b) {
                    s = a.s + x
                }
            }

            cell C(d) {
                input x: [d]
                acc = scan Sum(d) from (s = x)
                out acc.s
            }
            """,
        """
            model.rec:4:19: name error: undefined name 'x'
               4 |         s = a.s + x
                                     ^
              expected a dim or const of this monoid, a carry of a combine operand (a.CARRY or b.CARRY) or an earlier combine binding
            """,
        dims={"d": 4},
    ),
]

INTERNALS = ("Traceback", "lark", "Lark", ".py", "site-packages", "recdsl/")


def _load_case(case: Case, tmp_path, monkeypatch) -> recdsl.RecDSLError:
    (tmp_path / "model.rec").write_text(case.source)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(recdsl.RecDSLError) as info:
        recdsl.load("model.rec", cell=case.cell, dims=case.dims)
    return info.value


def assert_well_formed(error: recdsl.RecDSLError, source: str) -> None:
    """The message has the documented layout and points where error.line/column say."""
    message = str(error)
    for internal in INTERNALS:
        assert internal not in message, f"{internal!r} leaks into the message:\n{message}"
    # Raised `from None`: no internal exception is chained to it (and so printed above it).
    assert error.__cause__ is None
    assert error.__suppress_context__ or error.__context__ is None
    head, shown, caret, *rest = message.split("\n")
    assert head.startswith(f"{error.filename}:{error.line}:{error.column}: {error.kind}: ")
    gutter = f"{error.line:>4} | "
    assert shown == gutter + source.splitlines()[error.line - 1]
    assert caret.index("^") == len(gutter) + error.column - 1
    assert set(caret.strip()) <= {"^", "~"} and caret.strip().startswith("^")
    assert len(rest) == 1 and rest[0].startswith("  expected ")


def test_the_table_is_broad():
    kinds = {case.error for case in CASES}
    assert kinds >= {
        recdsl.ParseError,
        recdsl.NameResolutionError,
        recdsl.ShapeError,
        recdsl.TypeCheckError,
        recdsl.DeclarationError,
        recdsl.DimensionError,
    }
    assert len({case.id for case in CASES}) == len(CASES) >= 25


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_golden_message(case: Case, tmp_path, monkeypatch):
    error = _load_case(case, tmp_path, monkeypatch)
    assert str(error) == case.expected_message
    assert type(error) is case.error
    assert error.filename == "model.rec"
    header = case.expected_message.split(":")
    assert (error.line, error.column) == (int(header[1]), int(header[2]))
    assert_well_formed(error, case.source)


@pytest.mark.parametrize("case", CASES[::4], ids=[case.id for case in CASES[::4]])
def test_text_and_compile_report_the_same(case: Case):
    """Program text is reported as <string>; compile() raises what load() raises."""
    expected = case.expected_message.replace("model.rec:", "<string>:", 1)
    with pytest.raises(case.error) as loaded:
        recdsl.load(case.source, cell=case.cell, dims=case.dims)
    assert str(loaded.value) == expected
    assert loaded.value.filename == "<string>"
    with pytest.raises(case.error) as compiled:
        recdsl.compile(case.source, cell=case.cell, **case.dims)
    assert str(compiled.value) == expected


def test_several_cells_pick_one_with_cell():
    case = next(c for c in CASES if c.id == "several-cells")
    cell = recdsl.load(case.source, cell="Id", dims={"d": 4})
    assert cell.name == "Id"
    with pytest.raises(recdsl.DeclarationError, match=r"no cell named 'MinGr' \(did you mean 'MinGRU'\?\)"):
        recdsl.load(case.source, cell="MinGr", dims={"d": 4})


def test_errors_are_exceptions_of_one_family():
    for cls in (
        recdsl.ParseError,
        recdsl.NameResolutionError,
        recdsl.ShapeError,
        recdsl.TypeCheckError,
        recdsl.DeclarationError,
        recdsl.DimensionError,
        recdsl.InputError,
        recdsl.BackendError,
    ):
        assert issubclass(cls, recdsl.RecDSLError) and issubclass(cls, Exception)


def test_missing_file_is_a_clean_error(tmp_path):
    with pytest.raises(recdsl.RecDSLError) as info:
        recdsl.load(str(tmp_path / "nowhere.rec"))
    message = str(info.value)
    assert message.startswith("error: cannot read '") and "nowhere.rec" in message
    assert "Traceback" not in message and "Errno" not in message


# ---- call time ----------------------------------------------------------------------

MINGRU = """\
cell MinGRU(d_in, d) {
    input x: [d_in]
    param W_z: [d_in, d] = glorot
    param W_h: [d_in, d] = glorot
    state h: [d] = 0
    z = sigmoid(x @ W_z)
    hc = x @ W_h
    h = (1 - z) * h + z * hc
    out h
}
"""

GLA = """\
cell GLA(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input g: [dk]
    state S: [dk, dv] = 0
    alpha = exp(logsigmoid(g) / 16)
    S = alpha[:, None] * S + outer(k, v)
    out q @ S
}
"""


@pytest.fixture(scope="module")
def mingru():
    return recdsl.compile(MINGRU, d_in=3, d=4)


@pytest.fixture(scope="module")
def gla():
    return recdsl.compile(GLA, dk=3, dv=4)


def _call_error(module, *args, **kwargs) -> str:
    with pytest.raises(recdsl.InputError) as info:
        module(*args, **kwargs)
    message = str(info.value)
    for internal in INTERNALS:
        assert internal not in message
    assert message.startswith("input error: ")
    return message


def test_call_ok(mingru, gla):
    assert mingru(torch.randn(2, 5, 3)).shape == (2, 5, 4)
    assert gla(torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4), torch.randn(2, 5, 3)).shape == (2, 5, 4)


def test_missing_input(gla):
    message = _call_error(gla, torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4))
    assert message == (
        "input error: input 'g' is missing\n"
        "  expected q: [B, T, *heads, 3], k: [B, T, *heads, 3], v: [B, T, *heads, 4], g: [B, T, *heads, 3]"
    )


def test_unknown_and_extra_inputs(mingru):
    assert "has no input 'y'" in _call_error(mingru, x=torch.randn(2, 5, 3), y=torch.randn(2, 5, 3))
    assert "takes 1 input, got 2" in _call_error(mingru, torch.randn(2, 5, 3), torch.randn(2, 5, 3))
    assert "'x' is given twice" in _call_error(mingru, torch.randn(2, 5, 3), x=torch.randn(2, 5, 3))


def test_wrong_trailing_shape(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 4))
    assert message == (
        "input error: input 'x' has shape [2, 5, 4]\n"
        "  expected [B, T, *heads, 3]: batch, time, optional head dims, then its declared shape [3]"
    )


def test_missing_batch_or_time_dim(mingru):
    message = _call_error(mingru, torch.randn(5, 3))
    assert "input 'x' has shape [5, 3]" in message and "[B, T, *heads, 3]" in message


def test_mismatched_batch_dims_across_inputs(gla):
    q, k, v = torch.randn(2, 5, 3), torch.randn(2, 5, 3), torch.randn(2, 5, 4)
    message = _call_error(gla, q, k, v, torch.randn(2, 6, 3))
    assert message == (
        "input error: input 'g' has leading dims [2, 6] but input 'q' has [2, 5]\n"
        "  expected the same [B, T, *heads] for every input"
    )
    message = _call_error(gla, q, k, v, torch.randn(2, 5, 7, 3))
    assert "input 'g' has leading dims [2, 5, 7]" in message


def test_wrong_state_key(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3), state={"hh": torch.zeros(2, 4)})
    assert message == "input error: cell MinGRU has no state 'hh'\n  expected keys among: h"


def test_wrong_state_shape(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3), state={"h": torch.zeros(2, 5)})
    assert message == "input error: state 'h' has shape [2, 5]\n  expected [2, 4] (batch, heads, then the declared shape)"
    message = _call_error(mingru, torch.randn(2, 5, 3), state={"h": torch.zeros(3, 4)})
    assert "state 'h' has shape [3, 4]" in message and "[2, 4]" in message


def test_state_not_a_dict(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3), state=[torch.zeros(2, 4)])
    assert "state must be a dict of tensors, got list" in message


def test_integer_dtype(mingru):
    message = _call_error(mingru, torch.randint(0, 3, (2, 5, 3)))
    assert message == (
        "input error: input 'x' has dtype torch.int64\n"
        "  expected a floating-point (or, for complex inputs, complex) tensor"
    )


def test_complex_tensor_for_a_real_input(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3, dtype=torch.complex64))
    assert "input 'x' is complex but is declared real" in message and "[B, T, *heads, 3]" in message


def test_not_a_tensor(mingru):
    message = _call_error(mingru, [[[1.0, 2.0, 3.0]]])
    assert "input 'x' is a list, not a torch.Tensor" in message and "[B, T, *heads, 3]" in message


def test_empty_sequence(mingru):
    assert "T = 0" in _call_error(mingru, torch.randn(2, 0, 3))


def test_form_feed_does_not_shift_the_shown_line():
    text = "cell C(d) {\x0c\n    input x: [d]\n    out y\n}\n"
    with pytest.raises(recdsl.NameResolutionError) as info:
        recdsl.load(text, dims={"d": 2})
    assert info.value.line == 3
    assert str(info.value).split("\n")[1] == "   3 |     out y"


# ---- runtime edges (issue 8) ------------------------------------------------------------


def test_budget_error_is_located_and_well_formed():
    source = "cell Big(d) {\n    input x: [d]\n    param W: [d, d] = glorot\n    out x @ W\n}\n"
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(source, d=2**20)
    assert str(info.value) == (
        "<string>:3:5: dimension error: param 'W' has shape [1048576, 1048576]: 1_099_511_627_776 elements, more than the budget of 268_435_456\n"
        "   3 |     param W: [d, d] = glorot\n"
        "           ^~~~~~~~~~~~~~~~~~~~~~~~\n"
        "  expected smaller dims, or a larger budget: compile(..., max_elements=N) or RECDSL_MAX_ELEMENTS=N"
    )
    assert_well_formed(info.value, source)


def test_complex_state_for_a_real_state(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3), state={"h": torch.zeros(2, 4, dtype=torch.complex128)})
    assert message == "input error: state 'h' is complex but is declared real\n  expected a real tensor (torch.complex128 would lose its imaginary part)"


def test_tensors_on_the_meta_device(mingru):
    message = _call_error(mingru, torch.randn(2, 5, 3, device="meta"))
    assert message == "input error: input 'x' is on the meta device, which holds no values\n  expected a tensor with values (on cpu, cuda, ...)"
    message = _call_error(mingru, torch.randn(2, 5, 3), state={"h": torch.zeros(2, 4, device="meta")})
    assert message == "input error: state 'h' is on meta but the inputs are on cpu\n  expected every input, state and param on one device"


def test_dim_named_like_a_keyword_of_compile():
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile("cell C(cell) {\n    input x: [cell]\n    out x\n}\n", cell=3)
    assert str(info.value) == (
        "dimension error: compile's keyword 'cell' is the name of a cell of the program, got 3\n"
        "  expected a string; to bind a dim called 'cell', compile(..., dims={'cell': 3})"
    )
