"""Block-diagonal transitions and coupled groups whose joint update is affine (issue 10, items 8 and 9).

The analysis finds the axes a linear update keeps (element ``i`` along them reads only
index ``i``), the plan scans one small matrix per block (``Form.BLOCK_MATRIX_SCAN``) or
the coupled states stacked (``Form.JOINT_MATRIX_SCAN``), and both agree with the
sequential backend (Hypothesis: T = 1, lengths that are not powers of two, heads, initial
states, gradients of inputs, params and initial states), in float64.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.analysis import BlockAxes, JointAffine, MatrixAffine, Nonlinear, Structure, analyze
from recdsl.backends.scans import block_affine_scan
from recdsl.plan import BackendKind, Form, plan
from recdsl.testing import assert_backends_agree

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)


def analysis_of(source: str, **dims):
    return analyze(recdsl.load(source, dims=dims))


# A block-diagonal state written the ways users write a per-block product.
SPELLINGS = {
    "matmul of [n, 2, 2] by a column": "h = (A @ h[:, :, None])[:, :, 0] + x",
    "sum of a broadcast product": "h = sum(A * h[:, None, :], -1) + x",
    "matmul after a gate": "h = c[:, None] * (A @ h[:, :, None])[:, :, 0] + x",
}


def block_cell(update: str) -> str:
    return f"""
cell Blocks(n) {{
    input a: [n, 2, 2]
    input x: [n, 2]
    input z: [n]
    A = tanh(a)
    c = sigmoid(z)
    state h: [n, 2] = 0
    {update}
    out h
}}
"""


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_per_block_products_are_block_diagonal_along_the_block_axis(spelling):
    recurrence = analysis_of(block_cell(SPELLINGS[spelling]), n=5).state("h").recurrence
    assert isinstance(recurrence, MatrixAffine) and recurrence.structure is Structure.BLOCK_DIAGONAL, f"{spelling}: {recurrence}"
    assert recurrence.blocks == BlockAxes((0,), shared=False), f"{spelling}: blocks {recurrence.blocks}"


# (update of a state h: [n, 2], expected block axes or None for dense, shared)
CLASSIFIED = [
    ("h = h @ W + x", (0,), True),  # every row times the same [2, 2] matrix
    ("h = 0.5 * h + sum(h, 0)", (1,), True),  # columns mix their n elements, columns stay apart
    ("h = 0.5 * h + h[0]", (1,), True),  # row 0 is added to every row: columns stay apart
    ("h = c[:, None] * h[:, :1] + x", (0,), False),  # both elements of a block read its first
    ("h = tanh(z)[:, None] * (h @ W)", (0,), False),
    ("h = 0.5 * h + sum(h)", None, None),  # every element reads every other
    ("h = x + h[:, 1:] * h[:, :1] * 0 + 0.5 * (h @ W)", None, None),  # nonlinear: not affine at all
]


@pytest.mark.parametrize("update, axes, shared", CLASSIFIED, ids=[u for u, _, _ in CLASSIFIED])
def test_block_axes_are_found_where_the_update_keeps_them(update, axes, shared):
    source = block_cell(update).replace("input z: [n]", "input z: [n]\n    param W: [2, 2] = glorot")
    recurrence = analysis_of(source, n=5).state("h").recurrence
    if axes is None:
        assert getattr(recurrence, "blocks", None) is None, f"{update}: blocks {recurrence.blocks} found in an update that mixes them"
        return
    assert isinstance(recurrence, MatrixAffine) and recurrence.structure is Structure.BLOCK_DIAGONAL, f"{update}: {recurrence}"
    assert recurrence.blocks == BlockAxes(axes, shared), f"{update}: blocks {recurrence.blocks}, expected {BlockAxes(axes, shared)}"


def test_a_vector_state_mixed_by_a_matrix_stays_dense():
    source = "cell Dense(d) {\n input x: [d]\n param W: [d, d] = glorot\n state h: [d] = 0\n h = h @ W + x\n out h\n}"
    recurrence = analysis_of(source, d=4).state("h").recurrence
    assert recurrence.structure is Structure.DENSE and recurrence.blocks is None


@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_block_spellings_agree_with_sequential(spelling):
    mod = recdsl.compile(block_cell(SPELLINGS[spelling]), n=3, backend="scan")
    assert mod.plan.step("h").form is Form.BLOCK_MATRIX_SCAN
    assert_backends_agree(block_cell(SPELLINGS[spelling]), dims=dict(n=3), backends=("scan", "chunked"), max_examples=8, hypothesis_seed=3)


@pytest.mark.parametrize("update, axes, shared", [c for c in CLASSIFIED if c[1] is not None], ids=[c[0] for c in CLASSIFIED if c[1] is not None])
def test_classified_updates_agree_with_sequential(update, axes, shared):
    source = block_cell(update).replace("input z: [n]", "input z: [n]\n    param W: [2, 2] = glorot")
    assert_backends_agree(source, dims=dict(n=3), backends=("scan",), max_examples=6, hypothesis_seed=4)


def test_a_higher_rank_state_with_two_block_axes():
    source = """
cell Heads(h, n) {
    input a: [h, n, 2, 2]
    input x: [h, n, 2]
    state s: [h, n, 2] = 0
    s = (tanh(a) @ s[..., None])[..., 0] + x
    out s
}
"""
    recurrence = analysis_of(source, h=2, n=3).state("s").recurrence
    assert recurrence.blocks == BlockAxes((0, 1), shared=False)
    assert_backends_agree(source, dims=dict(h=2, n=3), backends=("scan",), max_examples=6, hypothesis_seed=5)


# ---- coupled groups ---------------------------------------------------------------------


def test_titans_momentum_and_memory_form_one_joint_affine_group():
    analysis = analysis_of(str(EXAMPLES / "titans.rec"), dk=4, dv=3)
    assert analysis.coupled_groups == (("M", "W"),)
    joint = analysis.group(("M", "W")).recurrence
    assert isinstance(joint, JointAffine) and joint.structure is Structure.BLOCK_DIAGONAL
    # The columns of [M; W] evolve alike: one 2 dk x 2 dk matrix for all dv of them.
    assert joint.blocks == BlockAxes((1,), shared=True)
    assert plan(analysis, "scan").step("W").form is Form.JOINT_MATRIX_SCAN


COUPLED = {
    # No axis is kept (matmuls mix every element): one dense block of 2 d.
    "dense": """
cell Coupled(d) {
    input x: [d]
    param W: [d, d] = glorot
    param U: [d, d] = glorot
    state u: [d] = 0
    state v: [d] = 0
    u = 0.9 * u + v @ W + x
    v = sigmoid(x) * v + u @ U
    out u + v
}
""",
    # Columns kept, but the decay differs per column: each column its own 2 dk x 2 dk block.
    "blocks per column": """
cell PerColumn(dk, dv) {
    input k: [dk]
    input v: [dv]
    input f: [dv]
    state M: [dk, dv] = 0
    state W: [dk, dv] = 0
    M = sigmoid(f) * M - 0.5 * outer(k, k @ W - v)
    W = 0.9 * W + M
    out k @ W
}
""",
    # Three states in one cycle, one read before its update (previous value) and one after.
    "three states": """
cell Three(d) {
    input x: [d]
    state a: [d] = 0
    state b: [d] = 0
    state c: [d] = 0
    a = 0.5 * a + 0.25 * c + x
    b = 0.5 * b - a
    c = sigmoid(x) * c + 0.1 * b
    out a + c
}
""",
}
COUPLED_DIMS = {"dense": dict(d=3), "blocks per column": dict(dk=3, dv=2), "three states": dict(d=3)}
COUPLED_STRUCTURE = {"dense": None, "blocks per column": BlockAxes((1,), shared=False), "three states": BlockAxes((0,), shared=False)}


@pytest.mark.parametrize("name", list(COUPLED))
def test_coupled_affine_groups_agree_with_sequential(name):
    analysis = analysis_of(COUPLED[name], **COUPLED_DIMS[name])
    (group,) = analysis.coupled_groups
    joint = analysis.group(group).recurrence
    assert isinstance(joint, JointAffine), f"{name}: {joint}"
    assert joint.blocks == COUPLED_STRUCTURE[name], f"{name}: blocks {joint.blocks}"
    assert plan(analysis, "scan").step(group[0]).form is Form.JOINT_MATRIX_SCAN
    assert_backends_agree(COUPLED[name], dims=COUPLED_DIMS[name], backends=("scan", "chunked"), max_examples=8, hypothesis_seed=6)


def test_titans_agrees_with_sequential_at_larger_dims():
    assert_backends_agree(EXAMPLES / "titans.rec", dims=dict(dk=5, dv=4), backends=("scan",), max_examples=6, hypothesis_seed=7)


def test_a_nonlinear_coupled_group_still_runs_step_by_step_and_says_why():
    analysis = analysis_of(str(EXAMPLES / "lstm.rec"), d_in=3, d=4)
    (group,) = analysis.coupled_groups
    assert isinstance(analysis.group(group).recurrence, Nonlinear)
    with pytest.raises(recdsl.BackendError, match="coupled .* joint update is not affine"):
        plan(analysis, "scan")


# ---- explain and the cost model ------------------------------------------------------------


def test_explain_names_the_blocks_and_the_joint_group():
    text = recdsl.explain(EXAMPLES / "state_tracking_lrnn.rec", d=8, n=64, plan=True)
    assert "block diagonal transition" in text and "64 blocks of 2 elements, one per index of axis 0" in text
    assert str(Form.BLOCK_MATRIX_SCAN) in text
    text = recdsl.explain(EXAMPLES / "titans.rec", dk=4, dv=3, plan=True)
    assert "their joint update is affine" in text and "3 blocks of 8 elements" in text and "the same matrix for every block" in text
    assert str(Form.JOINT_MATRIX_SCAN) in text


def test_auto_scans_the_blocks_at_the_benchmark_size():
    mod = recdsl.compile(EXAMPLES / "state_tracking_lrnn.rec", d=64, n=64)
    assert mod.plan.backend is BackendKind.SCAN and mod.plan.step("h").form is Form.BLOCK_MATRIX_SCAN
    costs = {c.backend: c.seconds for c in mod.plan.costs}
    assert costs[BackendKind.SCAN] < costs[BackendKind.SEQUENTIAL] / 2


# ---- the scan itself ------------------------------------------------------------------------


def loop(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    state = torch.zeros(value.shape[1:], dtype=value.dtype)
    states = []
    for t in range(value.shape[0]):
        state = (transition[t] @ state.unsqueeze(-1)).squeeze(-1) + value[t]
        states.append(state)
    return torch.stack(states)


@settings(max_examples=20, deadline=None)
@given(length=st.integers(1, 70), block=st.sampled_from([1, 2, 3, 5, 6]), blocks=st.integers(1, 4), shared=st.booleans(), seed=st.integers(0, 999))
def test_block_affine_scan_is_the_loop_with_its_gradients(length, block, blocks, shared, seed):
    generator = torch.Generator().manual_seed(seed)
    transition = (0.6 * torch.randn(length, 2, 1 if shared else blocks, block, block, generator=generator, dtype=torch.float64)).requires_grad_()
    value = torch.randn(length, 2, blocks, block, generator=generator, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(length, 2, blocks, block, generator=generator, dtype=torch.float64)
    scanned, expected = block_affine_scan(transition, value), loop(transition, value)
    torch.testing.assert_close(scanned, expected, rtol=1e-10, atol=1e-10, msg=lambda m: f"states of the block scan: {m}")
    for got, want, what in zip(
        torch.autograd.grad((scanned * weights).sum(), (transition, value)),
        torch.autograd.grad((expected * weights).sum(), (transition, value)),
        ("transition", "value"),
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9, msg=lambda m: f"gradient of the {what}: {m}")


def test_complex_blocks_agree_with_sequential():
    source = """
cell ComplexBlocks(n) {
    input a: [n, 2, 2]
    input x: [n, 2]
    A = 0.5 * exp(1j * a)
    state h: complex[n, 2] = 0
    h = (A @ h[:, :, None])[:, :, 0] + x
    out real(h) + imag(h)
}
"""
    assert recdsl.compile(source, n=3, backend="scan").plan.step("h").form is Form.BLOCK_MATRIX_SCAN
    assert_backends_agree(source, dims=dict(n=3), backends=("scan",), max_examples=6, hypothesis_seed=8)
