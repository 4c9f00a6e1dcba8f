"""The analysis: every example classified as its paper says, and random programs classified by construction."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.analysis import Delay, DiagonalAffine, MatrixAffine, NoRecurrence, Nonlinear, SemiringAffine, Side, Structure, analyze
from recdsl.ops import LOG, MAX_PLUS

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
DIMS = dict(d_in=3, d=4, n=3, dk=4, dv=5, p=4, heads=2, dh=2)


def analysis_of(name: str):
    program = recdsl.parse_file(EXAMPLES / f"{name}.rec")
    cell = program.cells()[0]
    dims = {d.name: DIMS[d.name] for d in cell.dims if d.name in DIMS}
    return analyze(recdsl.load(EXAMPLES / f"{name}.rec", dims=dims))


# (example, state, class, structure) as the papers describe them.
EXPECTED = [
    ("mingru", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("minlstm", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("lru", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("s4d", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("hgrn", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("rglru", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("s6", "h", DiagonalAffine, Structure.ELEMENTWISE),
    ("mamba2", "h", MatrixAffine, Structure.SCALAR),
    ("gla", "S", MatrixAffine, Structure.ROWS),
    ("retnet", "S", MatrixAffine, Structure.SCALAR),
    ("mlstm", "C", MatrixAffine, Structure.SCALAR),
    ("mlstm", "n", DiagonalAffine, Structure.SCALAR),
    ("mlstm", "m", SemiringAffine, Structure.DIAGONAL),
    ("deltanet", "S", MatrixAffine, Structure.IDENTITY_PLUS_LOW_RANK),
    ("gated_deltanet", "S", MatrixAffine, Structure.SCALED_IDENTITY_PLUS_LOW_RANK),
    ("ttt_linear", "W", MatrixAffine, Structure.SCALED_IDENTITY_PLUS_LOW_RANK),
    ("rwkv6", "S", MatrixAffine, Structure.ROWS),
    ("hgrn2", "S", MatrixAffine, Structure.ROWS),
    ("crf", "prior", SemiringAffine, Structure.MATRIX),
    ("gru", "h", Nonlinear, None),
    ("lstm", "h", Nonlinear, None),
    ("lstm", "c", DiagonalAffine, Structure.ELEMENTWISE),
    ("paragru", "h", Nonlinear, None),
    ("paralstm", "c", Nonlinear, None),
    ("paralstm", "h", Nonlinear, None),
    ("state_tracking_lrnn", "h", MatrixAffine, Structure.BLOCK_DIAGONAL),
    # Titans' states, each alone (the other one free); the pair's joint update is in tests/test_blocks.py.
    ("titans", "M", MatrixAffine, Structure.SCALAR),
    ("titans", "W", MatrixAffine, Structure.SCALAR),
    # sLSTM: given the gates (which read h), m is max-plus and c, n are elementwise affine;
    # h reads them through o * c / n and the gates through sigmoid/exp.
    ("slstm", "m", SemiringAffine, Structure.DIAGONAL),
    ("slstm", "c", DiagonalAffine, Structure.ELEMENTWISE),
    ("slstm", "n", DiagonalAffine, Structure.ELEMENTWISE),
    ("slstm", "h", Nonlinear, None),
    ("lion", "Sf", MatrixAffine, Structure.SCALAR),
    ("lion", "Sb", MatrixAffine, Structure.SCALAR),
    ("lion", "zb", DiagonalAffine, Structure.SCALAR),
    ("lion", "lam_next", Delay, None),
    ("bigru", "h", Nonlinear, None),
    ("bigru", "g", Nonlinear, None),
    ("crf_marginals", "prior", SemiringAffine, Structure.MATRIX),
    ("crf_marginals", "beta", SemiringAffine, Structure.MATRIX),
]


@pytest.mark.parametrize("example, state, cls, structure", EXPECTED, ids=[f"{e}-{s}" for e, s, _, _ in EXPECTED])
def test_example_classification(example, state, cls, structure):
    recurrence = analysis_of(example).state(state).recurrence
    assert isinstance(recurrence, cls), f"{example}.{state}: expected {cls.__name__}, got {recurrence}"
    if structure is not None:
        assert recurrence.structure is structure, f"{example}.{state}: structure {recurrence.structure!r}, expected {structure!r}"


def test_every_example_has_an_expected_classification():
    covered = {e for e, _, _, _ in EXPECTED} | {"aaren"}
    on_disk = {p.stem for p in EXAMPLES.glob("*.rec")}
    assert on_disk <= covered, f"examples without a classification test: {sorted(on_disk - covered)}"


def test_semirings_are_named():
    assert analysis_of("mlstm").state("m").recurrence.semiring is MAX_PLUS
    assert analysis_of("crf").state("prior").recurrence.semiring is LOG


def test_aaren_is_a_declared_scan():
    analysis = analysis_of("aaren")
    assert analysis.schedule == (("acc",),)
    assert analysis.cell.scans[0].monoid.name == "SoftmaxSum"


def test_lstm_states_are_coupled_and_mlstm_states_are_ordered():
    assert analysis_of("lstm").coupled_groups == (("c", "h"),)  # in update order
    # m's update reads no other state, so it runs first; C and n read m.
    assert analysis_of("mlstm").schedule == (("m",), ("C",), ("n",))


def test_time_parallel_bindings():
    assert analysis_of("mingru").time_parallel == {"z", "hc"}
    assert analysis_of("gru").time_parallel == frozenset()
    assert "beta" in analysis_of("deltanet").time_parallel
    assert {"m_prev", "i_gate", "f_gate"}.isdisjoint(analysis_of("mlstm").time_parallel)


@pytest.mark.parametrize("example, state", [("gla", "S"), ("retnet", "S"), ("deltanet", "S"), ("s6", "h")])
def test_linear_readouts_are_found(example, state):
    readouts = [r for r in analysis_of(example).readouts if r.state == state]
    assert readouts and all(r.reduces for r in readouts), readouts


def test_diagonal_affine_terms():
    recurrence = analysis_of("mingru").state("h").recurrence
    from recdsl.printer import format_expr

    assert format_expr(recurrence.decay) == "1 - z"
    assert format_expr(recurrence.input) == "z * hc"


def _classify(body: str, state: str = "h", decl: str = "state h: [d] = 0") -> object:
    source = f"cell C(d) {{\n input x: [d]\n input g: [d]\n param W: [d, d] = glorot\n {decl}\n {body}\n out {state}\n}}\n"
    return analyze(recdsl.load(source, dims={"d": 3})).state(state).recurrence


@pytest.mark.parametrize(
    "body, cls, structure",
    [
        ("h = 0.5 * h + x", DiagonalAffine, Structure.SCALAR),
        ("h = x + h * sigmoid(g)", DiagonalAffine, Structure.ELEMENTWISE),
        ("h = -(h * g) / 2 - x", DiagonalAffine, Structure.ELEMENTWISE),
        ("h = h @ W + x", MatrixAffine, Structure.DENSE),
        ("h = x", NoRecurrence, None),
        ("h = tanh(h) + x", Nonlinear, None),
        ("h = h * h", Nonlinear, None),
        ("h = max(h + g, x)", SemiringAffine, Structure.DIAGONAL),
        ("h = logaddexp(x, h - g)", SemiringAffine, Structure.DIAGONAL),
        ("h = max(h, x) + logaddexp(h, x)", Nonlinear, None),
        ("h = amax(h[:, None] + W, 0)", SemiringAffine, Structure.MATRIX),
    ],
)
def test_small_updates(body, cls, structure):
    recurrence = _classify(body)
    assert isinstance(recurrence, cls), f"{body}: {recurrence}"
    if structure:
        assert recurrence.structure is structure


def test_gated_delta_rule_is_scaled_identity_plus_low_rank():
    source = """
cell GatedDelta(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input a: []
    state S: [dk, dv] = 0
    S = a * (S - outer(k, k @ S)) + outer(k, v)
    out q @ S
}
"""
    recurrence = analyze(recdsl.load(source, dims={"dk": 3, "dv": 2})).state("S").recurrence
    assert isinstance(recurrence, MatrixAffine) and recurrence.structure is Structure.SCALED_IDENTITY_PLUS_LOW_RANK
    assert len(recurrence.low_rank) == 1


# ---- random affine programs -----------------------------------------------------------

GATES = ["sigmoid(x)", "exp(-softplus(g))", "0.9", "1 - sigmoid(g)", "sigmoid(x @ W)", "exp(logsigmoid(g) / 4)"]
INPUTS = ["x", "g * x", "tanh(x @ W)", "silu(g)", "0"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(GATES), st.sampled_from(INPUTS), st.booleans(), st.booleans())
def test_random_affine_programs_are_diagonal_affine(gate, term, gate_first, via_binding):
    a, b = ("a", "b") if via_binding else (f"({gate})", f"({term})")
    decay = f"{a} * h" if gate_first else f"h * {a}"
    update = f"a = {gate}\n b = {term}\n h = {decay} + {b}"
    recurrence = _classify(update)
    assert isinstance(recurrence, DiagonalAffine), f"{update}: {recurrence}"


def test_state_free_projections_of_nonlinear_cells_are_hoisted():
    from recdsl.printer import format_expr

    hoisted = [format_expr(n) for n in analysis_of("gru").hoisted]
    assert hoisted == ["x @ W_ir + b_ir", "x @ W_iz + b_iz", "x @ W_in + b_in"]
    assert len(analysis_of("lstm").hoisted) == 4
    # An outer product would store far more per step than the inputs it reads: left in the loop.
    big = analyze(recdsl.load(EXAMPLES / "mlstm.rec", dims={"dk": 16, "dv": 16}))
    assert not any(n.op == "outer" for n in big.hoisted)


# ---- transition structure, whichever side the state is multiplied from -------------------


def _matrix_cell(update: str, readout: str = "q @ S", transposed: bool = False) -> object:
    shape = "dv, dk" if transposed else "dk, dv"
    source = f"""
cell M(dk, dv) {{
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input kc: [dv]
    input a: []
    input g: [dk]
    input gc: [dv]
    state S: [{shape}] = 0
    S = {update}
    out {readout}
}}
"""
    return analyze(recdsl.load(source, dims={"dk": 3, "dv": 4})).state("S").recurrence


# The delta rule's rank-one map, spelled every way a user writes it.  Left: (k k^T) S; right: S (kc kc^T).
LOW_RANK_SPELLINGS = [
    ("S - a * outer(k, k @ S) + outer(k, v)", Side.LEFT),
    ("S - a * (outer(k, k) @ S) + outer(k, v)", Side.LEFT),
    ("S - a * k[:, None] * (k @ S) + outer(k, v)", Side.LEFT),
    ("S - a * outer(S @ kc, kc) + outer(k, v)", Side.RIGHT),
    ("S - a * (S @ outer(kc, kc)) + outer(k, v)", Side.RIGHT),
    ("S - a * (S @ kc)[:, None] * kc + outer(k, v)", Side.RIGHT),
]


@pytest.mark.parametrize("update, side", LOW_RANK_SPELLINGS, ids=[u for u, _ in LOW_RANK_SPELLINGS])
def test_low_rank_is_recognised_from_either_side(update, side):
    recurrence = _matrix_cell(update)
    assert isinstance(recurrence, MatrixAffine), f"{update}: {recurrence}"
    assert recurrence.structure is Structure.IDENTITY_PLUS_LOW_RANK, f"{update}: {recurrence.structure}"
    assert recurrence.side is side and len(recurrence.low_rank) == 1


def test_ttt_memory_written_from_the_right_is_low_rank_not_dense():
    # TTT/Titans: W = (1 - a) W - th (W k - v) k^T, the gradient step of ||W k - v||^2.
    recurrence = _matrix_cell("(1 - a) * S - a * outer(S @ kc - q, kc)", readout="S @ kc")
    assert recurrence.structure is Structure.SCALED_IDENTITY_PLUS_LOW_RANK and recurrence.side is Side.RIGHT


def test_maps_from_both_sides_are_dense():
    assert _matrix_cell("S - a * outer(k, k @ S) - a * outer(S @ kc, kc)").structure is Structure.DENSE


# Pieces of matrix-state updates in one convention and their transposes: (S, S^T) spellings.
# The generator writes a cell and its transpose, reading q @ S against S^T @ q.
DECAYS = [("a * S", "a * S"), ("g[:, None] * S", "S * g"), ("S * gc", "gc[:, None] * S"), ("sigmoid(g)[:, None] * S", "S * sigmoid(g)[None, :]"), ("S", "S")]
RANK_ONE = [
    ("a * outer(k, k @ S)", "a * outer(S @ k, k)"),
    ("a * (outer(k, k) @ S)", "a * (S @ outer(k, k))"),
    ("a * k[:, None] * (k @ S)", "a * (S @ k)[:, None] * k"),
]
FREE = [("outer(k, v)", "outer(v, k)"), ("k[:, None] * v", "v[:, None] * k"), ("a * outer(k, v) + outer(g, v)", "a * outer(v, k) + outer(v, g)")]


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(DECAYS), st.lists(st.sampled_from(RANK_ONE), max_size=2), st.sampled_from(FREE))
def test_transposing_the_state_never_changes_its_class(decay, rank_one, free):
    """Writing a cell for S^T instead of S gives the same class; only rows and columns swap."""
    forward = " - ".join([decay[0]] + [r[0] for r in rank_one]) + " + " + free[0]
    backward = " - ".join([decay[1]] + [r[1] for r in rank_one]) + " + " + free[1]
    original = _matrix_cell(forward, readout="q @ S")
    transposed = _matrix_cell(backward, readout="S @ q", transposed=True)
    assert type(original) is type(transposed), f"{forward}: {original}\n{backward}: {transposed}"
    assert transposed.structure is original.structure.transposed(), f"{forward}: {original.structure}; {backward}: {transposed.structure}"
    if rank_one and original.structure is not Structure.DENSE:
        assert {t.side for t in original.low_rank} == {Side.LEFT} and {t.side for t in transposed.low_rank} == {Side.RIGHT}
