"""The plan stage: typed decisions made once at compile time, printed by `explain --plan`, and
interpreted by backends that keep no state of their own."""

from __future__ import annotations

import ast
import gc
import sys
from pathlib import Path

import pytest
import torch

import recdsl
import recdsl.printer
from recdsl.analysis import Side, Structure
from recdsl.plan import BackendKind, ExecutionPlan, Form, PlanOptions, Unsupported, plan, plan_backend, predict_seconds
from recdsl.testing import check_equivalence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_dims import DIMS, EXAMPLES  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

# A TTT / Titans memory W (dv x dk) trained online on ||W k - v||^2: the rank-one map multiplies from the right.
TTT = EXAMPLES / "ttt_linear.rec"

# HGRN2: a matrix state with a per-row forget gate bounded below, written as users write it.
HGRN2 = """
cell HGRN2(dk, dv, lower = 0.3) {
    input q: [dk]
    input f_pre: [dk]
    input v: [dv]
    state S: [dk, dv] = 0
    f = lower + (1 - lower) * sigmoid(f_pre)
    S = f[:, None] * S + outer(1 - f, v)
    out q @ S
}
"""

# RWKV-6 style: the output reads the state before its update, plus a bonus for the current token.
RWKV = """
cell Finch(dk, dv) {
    input r: [dk]
    input k: [dk]
    input v: [dv]
    input w_pre: [dk]
    param u: [dk] = ones
    out (r @ S) + sum(r * u * k) * v
    state S: [dk, dv] = 0
    S = exp(-exp(w_pre))[:, None] * S + outer(k, v)
}
"""


def test_the_plan_is_made_once_and_stored_on_the_module():
    module = recdsl.compile(EXAMPLES / "gla.rec", dk=64, dv=64)
    assert isinstance(module.plan, ExecutionPlan)
    assert module.plan.backend is BackendKind.CHUNKED and module.backend == "chunked"
    step = module.plan.step("S")
    assert step.form is Form.CHUNKED and step.chunk is not None
    assert [r.form for r in step.rejected] == [Form.LINEAR_SCAN]
    # The plan is a value: planning again gives an equal one.
    assert plan(module.analysis, "auto", PlanOptions()) == module.plan


def test_explain_plan_shows_the_forms_rejected_and_why(capsys):
    from recdsl.cli import main

    assert main(["explain", "--plan", str(EXAMPLES / "gla.rec"), "--dim", "dk=64", "--dim", "dv=64"]) == 0
    text = capsys.readouterr().out
    assert "plan: backend chunked" in text
    assert "S: chunked: matmuls inside chunks" in text and "decayed outer products" in text
    assert "not linear scan: the chunked form never stores the state per step" in text
    assert "predicted cost" in text and "sequential:" in text and "scan:" in text


def test_a_gate_with_a_floor_is_positive_so_the_state_is_chunked_and_agrees_with_sequential():
    module = recdsl.compile(HGRN2, dk=64, dv=64)
    step = module.plan.step("S")
    assert step.form is Form.CHUNKED, module.plan.format()
    assert "logaddexp" in recdsl.printer.format_expr(step.chunk.log_decay)
    report = check_equivalence(HGRN2, dims={"dk": 3, "dv": 4}, backends=["chunked"], max_examples=10)
    assert report.ok, str(report)


def test_explain_plan_says_why_a_decay_that_may_be_negative_is_not_chunked():
    text = recdsl.explain(HGRN2.replace("lower + (1 - lower) * sigmoid(f_pre)", "lower + tanh(f_pre)"), plan=True, dk=8, dv=8)
    assert "not chunked: its decay (lower + tanh(f_pre))[:, None] is not provably positive" in text, text


def test_a_read_out_of_the_previous_state_is_chunked_with_an_exclusive_mask():
    text = recdsl.explain(RWKV, plan=True, dk=8, dv=8)
    assert "S: chunked" in text and "read-outs q @ S_prev with q = r" in text, text


def test_a_backend_that_cannot_run_a_cell_says_why():
    analysis = recdsl.compile(EXAMPLES / "gru.rec", **DIMS["gru"]).analysis
    refused = plan_backend(analysis, BackendKind.SCAN, PlanOptions())
    assert isinstance(refused, Unsupported) and "nonlinear" in refused.reason
    with pytest.raises(recdsl.BackendError, match="backend 'chunked' cannot run cell GRU: state 'h' is nonlinear"):
        recdsl.compile(EXAMPLES / "gru.rec", backend="chunked", **DIMS["gru"])


def test_a_complex_query_of_a_real_matrix_state_is_not_chunked_and_agrees_with_sequential():
    source = (EXAMPLES / "retnet.rec").read_text().replace("input q: [dk]", "input q: complex[dk]")
    module = recdsl.compile(source, backend="chunked", dk=4, dv=3)
    step = module.plan.step("S")
    assert step.form is Form.LINEAR_SCAN
    assert any("complex query" in r.reason for r in step.rejected)
    report = check_equivalence(source, dims={"dk": 4, "dv": 3}, backends=["chunked", "scan"], max_examples=5)
    assert report.ok, str(report)


# ---- the cost model and auto --------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DIMS))
def test_auto_never_picks_a_form_predicted_slower_than_the_loop(name):
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
    costs = {c.backend: c.seconds for c in module.plan.costs}
    chosen = costs[module.plan.backend]
    assert chosen is not None and chosen <= costs[BackendKind.SEQUENTIAL], module.plan.format()


def test_the_transposed_ttt_memory_is_low_rank_and_auto_is_not_the_dense_scan():
    module = recdsl.compile(TTT, dk=16, dv=16)
    recurrence = module.analysis.state("W").recurrence
    assert recurrence.structure is Structure.SCALED_IDENTITY_PLUS_LOW_RANK and recurrence.side is Side.RIGHT
    scan_plan = plan(module.analysis, "scan")
    assert scan_plan.step("W").form is Form.LOW_RANK_MATRIX_SCAN
    assert module.plan.step("W").form is not Form.DENSE_MATRIX_SCAN
    dense = predict_seconds(module.analysis, BackendKind.SCAN, (scan_plan.step("W").__class__(("W",), Form.DENSE_MATRIX_SCAN),), PlanOptions())
    assert dense > predict_seconds(module.analysis, BackendKind.SEQUENTIAL, (), PlanOptions())


@pytest.mark.parametrize(
    "source, dims",
    [
        (TTT, {"dk": 3, "dv": 4}),  # scaled identity plus low rank, from the right
        (
            """cell GatedDeltaRows(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input g: [dk]
    input b: []
    state S: [dk, dv] = 0
    S = sigmoid(g)[:, None] * S - sigmoid(b) * outer(k, k @ S) + outer(k, v)
    out q @ S
}""",
            {"dk": 3, "dv": 4},
        ),  # diagonal (per row) plus low rank, from the left
        (
            """cell DeltaRight(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input b: []
    state S: [dv, dk] = 0
    S = S - sigmoid(b) * (S @ k)[:, None] * k + outer(v, k)
    out S @ q
}""",
            {"dk": 3, "dv": 4},
        ),  # identity plus low rank, from the right, spelled with broadcasting
    ],
    ids=["ttt-right", "rows-plus-low-rank-left", "delta-right"],
)
def test_low_rank_scans_from_either_side_agree_with_sequential(source, dims):
    module = recdsl.compile(source, backend="scan", **dims)
    assert any(step.form is Form.LOW_RANK_MATRIX_SCAN for step in module.plan.steps), module.plan.format()
    report = check_equivalence(source, dims=dims, backends=["scan", "chunked"], max_examples=8)
    assert report.ok, str(report)


# ---- backends keep no state of their own --------------------------------------------------


def _module_level_sizes() -> dict[str, int]:
    sizes = {}
    for name, module in list(sys.modules.items()):
        if not (name == "recdsl" or name.startswith("recdsl.")):
            continue
        for attribute, value in vars(module).items():
            if isinstance(value, (dict, list, set)):
                sizes[f"{name}.{attribute}"] = len(value)
    return sizes


def test_compiling_and_dropping_a_thousand_modules_leaves_no_module_level_growth():
    from recdsl.module import CompiledCell

    x = torch.randn(1, 3, 4)
    source = (EXAMPLES / "gla.rec").read_text()
    gla_inputs = [torch.randn(1, 3, 4), torch.randn(1, 3, 4), torch.randn(1, 3, 3), torch.randn(1, 3, 4)]
    for _ in range(3):  # warm every lazy import
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=4, d=4)(x)
        recdsl.compile(source, backend="chunked", dk=4, dv=3)(*gla_inputs)
    gc.collect()
    before = _module_level_sizes()
    for _ in range(50):  # the whole path, source to outputs
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=4, d=4)(x)
        recdsl.compile(source, backend="chunked", dk=4, dv=3)(*gla_inputs)
    analyses = [recdsl.compile(EXAMPLES / "mingru.rec", d_in=4, d=4).analysis, recdsl.compile(source, dk=4, dv=3).analysis]
    for i in range(900):  # planning and running, from fresh analyses each time
        analysis = analyses[i % 2]
        fresh = type(analysis)(**{f: getattr(analysis, f) for f in analysis.__dataclass_fields__})
        module = CompiledCell(fresh, "chunked" if i % 2 else "auto")
        if i % 10 == 0:
            module(*gla_inputs) if i % 2 else module(x)
    gc.collect()
    after = _module_level_sizes()
    grown = {k: (before.get(k, 0), v) for k, v in after.items() if v > before.get(k, 0)}
    assert not grown, f"module-level containers grew: {grown}"


DECISION_ATTRIBUTES = {"structure", "kind", "form", "semiring", "backend", "side"}


def test_no_string_comparison_decides_which_form_runs():
    """Decisions are enums: a comparison of a decision attribute with a string literal is a silent wrong branch waiting for a typo."""
    files = [ROOT / "recdsl" / "plan.py", ROOT / "recdsl" / "analysis.py", ROOT / "recdsl" / "module.py", *sorted((ROOT / "backends").glob("*.py"))]
    offenders = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            strings = [o for o in operands if isinstance(o, ast.Constant) and isinstance(o.value, str)]
            attributes = [o for o in operands if isinstance(o, ast.Attribute) and o.attr in DECISION_ATTRIBUTES]
            if strings and attributes:
                offenders.append(f"{path.name}:{node.lineno}")
    assert not offenders, f"string comparisons of decisions: {offenders}"


# ---- torch.compile ---------------------------------------------------------------------------

# The default run traces a chunked and a scanned example; `pytest -m slow` traces all of them.
COMPILE_CASES = [("gla", "chunked"), ("aaren", "scan")]
def _runs_on_the_scan_backend(name: str) -> bool:
    """Whether the time-parallel backends can run an example (nonlinear and coupled nonlinear cells run step by step)."""
    analysis = recdsl.analyze(recdsl.load(EXAMPLES / f"{name}.rec", dims=DIMS[name]))
    return not isinstance(plan_backend(analysis, BackendKind.SCAN, PlanOptions()), Unsupported)


ALL_COMPILE_CASES = [(name, backend) for name in sorted(DIMS) if _runs_on_the_scan_backend(name) for backend in ("scan", "chunked")]


def _check_compiles(name: str, backend: str) -> None:
    # Each module is a new `self` for CompiledCell.forward: without a reset, dynamo's
    # per-code-object recompile limit (8) is reached after a few examples.
    torch._dynamo.reset()
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **DIMS[name]).double()
    inputs = []
    for declared in module.cell.inputs:
        dtype = torch.complex128 if declared.type.kind.value == "complex" else torch.float64
        inputs.append(torch.randn(2, 9, *declared.type.shape, dtype=dtype, requires_grad=True))
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got, expected = compiled(*inputs), module(*inputs)
    got, expected = (got if isinstance(got, tuple) else (got,)), (expected if isinstance(expected, tuple) else (expected,))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)
    (grads,) = [torch.autograd.grad(sum(g.abs().sum() for g in got), inputs[0])]
    (expected_grads,) = [torch.autograd.grad(sum(e.abs().sum() for e in expected), inputs[0])]
    torch.testing.assert_close(grads, expected_grads, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, backend", COMPILE_CASES, ids=[f"{n}-{b}" for n, b in COMPILE_CASES])
def test_torch_compile_fullgraph(name, backend):
    _check_compiles(name, backend)


@pytest.mark.slow
@pytest.mark.parametrize("name, backend", ALL_COMPILE_CASES, ids=[f"{n}-{b}" for n, b in ALL_COMPILE_CASES])
def test_torch_compile_fullgraph_every_example(name, backend):
    _check_compiles(name, backend)
