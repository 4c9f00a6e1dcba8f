"""The language's array functions: transpose (``x.T``), reshape, concat, stack, softmax, clamp,
sign, norm and reductions over several axes.

Each is checked four ways: its misuse gives a golden error in the house style (the cases
are run by the machinery of tests/test_errors.py); small cells that use it agree with the
sequential backend on every backend that accepts them, gradients included (Hypothesis:
random batch, lengths from 1 and across chunk boundaries, initial states); the analysis
stays sound (a transposed state is a dense linear map, never a diagonal one; softmax is a
positive decay); and the backends that cannot run a cell refuse it with a reason.
"""

from __future__ import annotations

import math

import pytest
import torch

import recdsl
from recdsl import ir
from recdsl.analysis import DiagonalAffine, MatrixAffine, Structure, log_of_positive
from recdsl.ops import OPS
from recdsl.plan import BackendKind, PlanOptions, Unsupported, plan_backend
from recdsl.testing import Example, assert_backends_agree, compare_backends, random_inputs

from test_errors import Case, _load_case, assert_well_formed  # noqa: E402  (tests/ is on sys.path)

# ---- golden errors ---------------------------------------------------------------------------

_FRAME = """
    cell C(d, e) {{
        input x: [d]
        input y: [e]
        input M: [d, e]
        input z: complex[d]
        state h: [d] = 0
        {line}
        h = h + x
        out h
    }}
    """


def _case(id: str, error: type, line: str, message: str) -> Case:
    return Case(id, error, _FRAME.format(line=line), message)


CASES = [
    _case(
        "reshape-not-static",
        recdsl.TypeCheckError,
        "x2 = reshape(x, h[0])",
        """
        model.rec:7:21: type error: a dim given to reshape() must be known at compile time
           7 |     x2 = reshape(x, h[0])
                                   ^~~~
          expected a number or an expression of the dims
        """,
    ),
    _case(
        "reshape-wrong-size",
        recdsl.ShapeError,
        "x2 = reshape(x, e)",
        """
        model.rec:7:10: shape error: cannot reshape [4] to [3]: [4] holds 4 elements and [3] holds 3
           7 |     x2 = reshape(x, e)
                        ^~~~~~~~~~~~~
          expected dims whose product is the number of elements (one of them may be -1)
        """,
    ),
    _case(
        "reshape-two-inferred",
        recdsl.ShapeError,
        "x2 = reshape(x, -1, -1)",
        """
        model.rec:7:25: shape error: reshape() can infer only one dim (-1)
           7 |     x2 = reshape(x, -1, -1)
                                       ^~
          expected at most one -1 among the dims
        """,
    ),
    _case(
        "reshape-zero-dim",
        recdsl.ShapeError,
        "x2 = reshape(x, 0, 4)",
        """
        model.rec:7:21: shape error: a dim given to reshape() must be at least 1 (or -1), got 0
           7 |     x2 = reshape(x, 0, 4)
                                   ^
          expected a dim >= 1, or -1 for the one inferred
        """,
    ),
    _case(
        "reshape-no-dims",
        recdsl.TypeCheckError,
        "x2 = reshape(x)",
        """
        model.rec:7:10: type error: reshape() takes at least 2 arguments, got 1
           7 |     x2 = reshape(x)
                        ^~~~~~~~~~
          expected at least 2 arguments (reshape: reshape(x, d1, d2, ...): the same elements in row-major order, static dims (one may be -1))
        """,
    ),
    _case(
        "concat-mismatched-shapes",
        recdsl.ShapeError,
        "x2 = concat(M, x[:, None], 0)",
        """
        model.rec:7:20: shape error: cannot concat these values: operand 2 has shape [4, 1] and operand 1 [4, 3], which differ outside axis 0
           7 |     x2 = concat(M, x[:, None], 0)
                                  ^~~~~~~~~~
          expected shapes equal except along axis 0
        """,
    ),
    _case(
        "concat-without-axis",
        recdsl.TypeCheckError,
        "x2 = concat(x, y)",
        """
        model.rec:7:20: type error: 'y' is an input, not known at compile time
           7 |     x2 = concat(x, y)
                                  ^
          expected the axis of concat() (its last argument): a number or an expression of the dims
        """,
    ),
    _case(
        "concat-of-scalars",
        recdsl.ShapeError,
        "x2 = concat(x[0], x[1], 0)",
        """
        model.rec:7:17: shape error: concat() cannot join scalars
           7 |     x2 = concat(x[0], x[1], 0)
                               ^~~~
          expected values of at least one dim (stack() joins scalars into a vector)
        """,
    ),
    _case(
        "concat-axis-out-of-range",
        recdsl.ShapeError,
        "x2 = concat(x, x, 1)",
        """
        model.rec:7:23: shape error: axis 1 is out of range for concat() of values of 1 dim
           7 |     x2 = concat(x, x, 1)
                                     ^
          expected an axis in [-1, 0]
        """,
    ),
    _case(
        "stack-mismatched-shapes",
        recdsl.ShapeError,
        "x2 = stack(x, y, 0)",
        """
        model.rec:7:19: shape error: cannot stack these values: operand 2 has shape [3] and operand 1 [4]
           7 |     x2 = stack(x, y, 0)
                                 ^
          expected the same shape for every operand
        """,
    ),
    _case(
        "transpose-axis-out-of-range",
        recdsl.ShapeError,
        "x2 = transpose(M, 0, 2)",
        """
        model.rec:7:26: shape error: axis 2 is out of range for a value of shape [4, 3]
           7 |     x2 = transpose(M, 0, 2)
                                        ^
          expected an axis in [-2, 1]
        """,
    ),
    _case(
        "transpose-without-axes",
        recdsl.TypeCheckError,
        "x2 = transpose(M)",
        """
        model.rec:7:10: type error: transpose() takes 3 arguments, got 1
           7 |     x2 = transpose(M)
                        ^~~~~~~~~~~~
          expected 3 arguments (transpose: transpose(x, i, j) swaps axes i and j; x.T swaps the last two)
        """,
    ),
    _case(
        "T-of-a-vector",
        recdsl.ShapeError,
        "x2 = x.T",
        """
        model.rec:7:10: shape error: '.T' needs a value of at least two dims, got shape [4]
           7 |     x2 = x.T
                        ^~~
          expected a matrix (a vector has no row or column: write x[:, None] for a column, x[None, :] for a row)
        """,
    ),
    _case(
        "softmax-axis-out-of-range",
        recdsl.ShapeError,
        "x2 = softmax(M, 2)",
        """
        model.rec:7:21: shape error: axis 2 is out of range for a value of shape [4, 3]
           7 |     x2 = softmax(M, 2)
                                   ^
          expected an axis in [-2, 1]
        """,
    ),
    _case(
        "sum-axis-given-twice",
        recdsl.ShapeError,
        "x2 = sum(M, 1, -1)",
        """
        model.rec:7:20: shape error: axis 1 is given twice to sum()
           7 |     x2 = sum(M, 1, -1)
                                  ^~
          expected each axis once
        """,
    ),
    _case(
        "norm-axis-not-static",
        recdsl.TypeCheckError,
        "x2 = norm(M, x[0])",
        """
        model.rec:7:18: type error: the axis of norm() must be known at compile time
           7 |     x2 = norm(M, x[0])
                                ^~~~
          expected a number or an expression of the dims
        """,
    ),
    _case(
        "clamp-without-upper-bound",
        recdsl.TypeCheckError,
        "x2 = clamp(x, 0)",
        """
        model.rec:7:10: type error: clamp() takes 3 arguments, got 2
           7 |     x2 = clamp(x, 0)
                        ^~~~~~~~~~~
          expected 3 arguments (clamp: clamp(x, lo, hi) = min(max(x, lo), hi))
        """,
    ),
    _case(
        "sign-of-complex",
        recdsl.TypeCheckError,
        "x2 = sign(z)",
        """
        model.rec:7:15: type error: 'sign' needs real operands, got a complex value of shape [4]
           7 |     x2 = sign(z)
                             ^
          expected a real value (use real(z), imag(z) or abs(z))
        """,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_golden_message(case: Case, tmp_path, monkeypatch):
    error = _load_case(case, tmp_path, monkeypatch)
    assert str(error) == case.expected_message
    assert type(error) is case.error
    assert_well_formed(error, case.source)


def test_a_carry_named_T_is_still_a_field():
    """``x.T`` is a transpose except on a scan result, where ``.T`` reads a carry named T."""
    source = """
monoid Sum() {
    carry T: [] = 0
    combine(a, b) {
        T = a.T + b.T
    }
}
cell C(d = 2) {
    input x: [d, d]
    acc = scan Sum() from (T = x[0, 1])
    out acc.T + sum(x.T[0])
}
"""
    module = recdsl.compile(source).double()
    x = torch.randn(1, 5, 2, 2, dtype=torch.float64)
    expected = x[..., 0, 1].cumsum(1) + x[..., :, 0].sum(-1)
    torch.testing.assert_close(module(x=x), expected)


# ---- cells, on every backend that accepts them ------------------------------------------------

# Every function on inputs, feeding a diagonal recurrence whose decay is a softmax (positive, so
# the chunked form takes its logarithm): scan, chunked, Triton, newton and fused all run it.
GATES = """
cell Gates(d = 4) {
    input x: [d]
    input z: [d]
    input y: [2, d]
    param W: [d, d] = glorot
    state h: [d] = 0
    g = softmax(z)
    pair = stack(x, z, 0)
    joined = reshape(concat(y[0, :2], y[1, 2:], x[:1], 0), -1)
    h = g * h + (1 - g) * clamp(x, -0.4, 0.4) + sign(x) * norm(y, 0) + sum(reshape(pair, 2, 1, -1), 0, 1) + joined[:d] + transpose(y, 0, 1)[:, 0] + (W.T @ z)
    out h + mean(y, 0) * amax(reshape(pair, 1, 2, d), 0, 1) + norm(pair) + softmax(y, 0, 1)[1]
}
"""

# A state read transposed: a linear map that is not diagonal (a diagonal form would be wrong).
TRANSPOSED_STATE = """
cell Swap(d = 3) {
    input k: [d]
    input v: [d]
    input r: [d]
    state S: [d, d] = 0
    S = 0.7 * S.T + outer(k, sigmoid(v))
    out S.T @ r
}
"""

# The elementwise functions inside a nonlinear step: the fused form compiles them to C.
CLAMPED_STEP = """
cell Clamped(d = 3) {
    input x: [d]
    param W: [d, d] = glorot
    state h: [d] = 0
    h = tanh(clamp(h @ W + x, -0.3, 0.5)) + 0.1 * sign(x) * h
    out h
}
"""

# Structural functions of the state itself: newton's Jacobian pattern follows each of them.
STRUCTURAL_STEP = """
cell Mixed(d = 4) {
    input x: [d]
    input y: [2, 2]
    state h: [d] = 0
    m = reshape(h, 2, 2).T + y
    h = tanh(reshape(m, -1) + 0.5 * softmax(h) * x + 0.2 * concat(h[2:], h[:2], 0) + 0.1 * norm(h) + 0.3 * stack(h, x, 0)[0] - 0.1 * amax(reshape(h, 2, 2), 0, 1))
    out h
}
"""

# Read-outs through a transpose: S.T @ q is q @ S and q @ S.T is S @ q, so the chunked form applies.
TRANSPOSED_READOUTS = """
cell ReadT(dk = 4, dv = 3) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input g: [dk]
    input b: []
    state S: [dk, dv] = 0
    state U: [dv, dk] = 0
    S = exp(logsigmoid(g))[:, None] * S + outer(k, v)
    U = sigmoid(b) * U + outer(v, k)
    out S.T @ q + q @ U.T
}
"""

# Complex values through the rearrangements, and norm's real result (an LRU-like diagonal state).
COMPLEX = """
cell Complex(d = 4) {
    input x: [d]
    input z: complex[2, d]
    param nu: [d] = uniform(0.5, 1.5)
    state h: complex[d] = 0
    lam = exp(-exp(nu) + 0.3j)
    u = reshape(transpose(z, 0, 1), -1)
    h = lam * h + concat(u[:2], u[6:], 0) * norm(z, 0) + stack(x, x, 0)[1] + sum(z, 0, 1)
    out real(h) + norm(h[None, :].T, 1)
}
"""

CELLS = {
    "complex": COMPLEX,
    "gates": GATES,
    "transposed-state": TRANSPOSED_STATE,
    "transposed-readouts": TRANSPOSED_READOUTS,
    "clamped-step": CLAMPED_STEP,
    "structural-step": STRUCTURAL_STEP,
}
ACCEPTED = {
    "complex": ("scan", "chunked", "triton"),
    "gates": ("scan", "chunked", "triton", "newton", "fused"),
    "transposed-readouts": ("scan", "chunked", "triton", "newton"),
    "transposed-state": ("scan", "chunked", "newton"),
    "clamped-step": ("triton", "newton", "fused"),  # clamp has a derivative rule: the fused Triton kernel runs it
    "structural-step": ("newton",),
}


def _module(source: str) -> recdsl.CompiledCell:
    torch.manual_seed(0)
    return recdsl.compile(source).double()


def _accepted(module: recdsl.CompiledCell) -> tuple[str, ...]:
    kinds = [b for b in BackendKind if b is not BackendKind.SEQUENTIAL]
    return tuple(b.value for b in kinds if not isinstance(plan_backend(module.analysis, b, PlanOptions()), Unsupported))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_backends_that_accept_each_cell(name):
    assert _accepted(_module(CELLS[name])) == ACCEPTED[name]


@pytest.mark.parametrize("name", sorted(CELLS))
def test_property_every_accepting_backend_agrees_with_sequential(name, monkeypatch):
    """Hypothesis: outputs, final states and gradients (inputs, params, initial state) in float64."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backends = tuple(b for b in ACCEPTED[name] if b != "triton")  # Triton below, on a few fixed shapes (the interpreter is slow)
    assert_backends_agree(CELLS[name], backends=backends, max_examples=6, hypothesis_seed=3, chunk_size=4)


@pytest.mark.parametrize("name", ["gates", "transposed-readouts", "complex"])
@pytest.mark.parametrize("length", [1, 5])
def test_triton_runs_the_cells_it_accepts(name, length, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    module = _module(CELLS[name])
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(), seed=length, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_the_triton_kernel_fuses_clamp_and_sign(monkeypatch, tmp_path):
    """clamp and sign are evaluated inside the generated kernel; softmax and norm reach it as leaves computed by torch."""
    from recdsl.backends.triton_codegen import FUSED_OPS

    assert {"clamp", "sign"} <= FUSED_OPS
    assert not {"softmax", "norm", "transpose", "reshape", "concat", "stack"} & FUSED_OPS


def test_refusals_say_why():
    transposed = _module(TRANSPOSED_STATE)
    assert "dense transition" in str(plan_backend(transposed.analysis, BackendKind.TRITON, PlanOptions()))
    structural = _module(STRUCTURAL_STEP)
    assert "'reshape' to a value that reads a state" in str(plan_backend(structural.analysis, BackendKind.FUSED, PlanOptions()))
    assert "'softmax' applied to a value that depends on it" in str(plan_backend(structural.analysis, BackendKind.TRITON, PlanOptions()))
    with pytest.raises(recdsl.BackendError, match="state 'S' has shape"):
        recdsl.compile(TRANSPOSED_STATE, backend="fused")


# ---- the analysis stays sound ----------------------------------------------------------------


def test_transposed_readouts_are_chunked():
    from recdsl.plan import ChunkPlan, chunk_plan

    analysis = _module(TRANSPOSED_READOUTS).analysis
    plans = {name: chunk_plan(analysis, analysis.state(name)) for name in ("S", "U")}
    assert all(isinstance(plan, ChunkPlan) for plan in plans.values()), plans
    assert (plans["S"].transposed, plans["U"].transposed) == (False, True)


def test_a_transposed_state_is_a_dense_linear_map():
    analysis = _module(TRANSPOSED_STATE).analysis
    recurrence = analysis.state("S").recurrence
    assert isinstance(recurrence, MatrixAffine) and recurrence.structure is Structure.DENSE


def test_a_softmax_decay_is_diagonal_and_its_log_is_exact():
    module = _module(GATES)
    recurrence = module.analysis.state("h").recurrence
    assert isinstance(recurrence, DiagonalAffine) and recurrence.structure is Structure.ELEMENTWISE
    cell = module.analysis.cell
    softmax = next(node for statement in cell.body for node in ir.walk(statement.value) if isinstance(node, ir.Op) and node.op == "softmax")
    log = log_of_positive(softmax, cell)
    assert log is not None and log.type == softmax.type
    # log(softmax(z)) = z - logsumexp(z), evaluated by the torch forms
    from recdsl.backends.torch_ops import Evaluator, Numerics

    z = torch.randn(3, 4, dtype=torch.float64)
    evaluator = Evaluator(Numerics(torch.float64, torch.device("cpu")), {(ir.RefKind.INPUT, "z"): z})
    torch.testing.assert_close(evaluator.evaluate(log), torch.log_softmax(z, -1))


def test_newton_follows_the_structure_of_a_transpose():
    """S.T pairs S[0, 1] with S[1, 0]: blocks {1, 2}, {0}, {3} of the flattened 2 x 2 state, not a diagonal."""
    from recdsl.backends.newton import JacobianStructure, jacobian_structure

    module = _module("cell T(d = 2) {\n    input x: [d, d]\n    state S: [d, d] = 0\n    S = tanh(S.T + x)\n    out S\n}\n")
    plan = jacobian_structure(module.analysis)
    assert plan.structure is JacobianStructure.BLOCK_DIAGONAL and (1, 2) in plan.blocks
    dense = jacobian_structure(_module(STRUCTURAL_STEP).analysis)
    assert dense.structure is JacobianStructure.DENSE  # softmax and norm read every element


# ---- folding and printing ---------------------------------------------------------------------


def test_sign_and_clamp_fold_like_torch_on_every_sign():
    for value in (-2.5, -0.0, 0.0, 0.3, 7.0, math.inf, -math.inf):
        assert OPS["sign"].fold(value) == float(torch.sign(torch.tensor(value, dtype=torch.float64)))
        for low, high in ((-1.0, 1.0), (0.5, 0.2)):
            expected = torch.clamp(torch.tensor(value, dtype=torch.float64), torch.tensor(low, dtype=torch.float64), torch.tensor(high, dtype=torch.float64))
            assert OPS["clamp"].fold(value, low, high) == float(expected)
    assert math.isnan(OPS["sign"].fold(math.nan))


def test_constants_fold_through_the_new_elementwise_functions():
    module = recdsl.compile("cell K(d = 2) {\n    input x: [d]\n    const c = clamp(3, 0, 2) * sign(-4)\n    out x * c\n}\n")
    x = torch.ones(1, 2, 2)
    torch.testing.assert_close(module(x=x), -2 * x)


def test_explain_prints_the_static_operands():
    text = recdsl.explain(GATES)
    for expected in ("softmax(y, 0, 1)", "transpose(y, 0, 1)", "reshape(", "concat(", "stack(x, z, 0)", "sum(reshape(pair, 2, 1, 4), 0, 1)", "norm(y, 0)", "transpose(W, 0, 1)"):
        assert expected in text, expected


@pytest.mark.parametrize("name", ["sum", "mean", "amax", "amin", "logsumexp", "norm", "softmax"])
def test_reductions_of_a_scalar(name):
    """Over no axes (a scalar operand) every reduction is its operand (norm: its modulus), softmax is 1; found by the fuzzer."""
    module = recdsl.compile(f"cell F(d = 2) {{\n    input x: [d]\n    out {name}(x[0]) + 0 * x\n}}\n").double()
    x = torch.randn(2, 3, 2, dtype=torch.float64)
    expected = {"norm": x[..., 0].abs(), "softmax": torch.ones_like(x[..., 0])}.get(name, x[..., 0])
    torch.testing.assert_close(module(x=x)[..., 0], expected)


def test_triton_keeps_constant_bounds_in_float64(monkeypatch, tmp_path):
    """clamp(x, -0.4, 0.4) and 1 - 0.3: constant arithmetic is folded or kept inline, never a float32 temporary."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    module = _module("cell L(d = 4) {\n    input x: [d]\n    state h: [d] = 0\n    h = sigmoid(x) * h + clamp(x, -0.4, 0.4) + max(x, -0.25) * (1 - 0.3)\n    out h\n}\n")
    inputs, state = random_inputs(module, Example(batch=2, length=3, heads=(), seed=0, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, atol=0, rtol=1e-13)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_cells_print_back_to_the_same_program(name):
    from recdsl.printer import unparse

    program = recdsl.parse(CELLS[name])
    assert recdsl.parse(unparse(program)) == program
