"""The scan and chunked backends against the sequential reference: every example, random programs, numerics."""

from __future__ import annotations


import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.analysis import Nonlinear, Structure
from recdsl.testing import Example, assert_backends_agree, available_backends, check_equivalence, check_monoid_laws, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

# Newton's method runs every cell with real states and no declared monoid.
NEWTON_REFUSED = {"lru", "aaren", "s4d"}
PARALLEL = ["mingru", "minlstm", "lru", "s4d", "hgrn", "rglru", "s6", "mamba2", "gla", "retnet", "mlstm", "deltanet", "aaren", "crf", "gated_deltanet", "rwkv6", "ttt_linear", "hgrn2"]
PARALLEL += ["state_tracking_lrnn", "titans"]  # a block-diagonal state; a coupled group with an affine joint update
PARALLEL += ["lion", "crf_marginals"]  # reverse states


def test_every_example_has_dims_here():
    assert {p.stem for p in EXAMPLES.glob("*.rec")} == set(DIMS)


@pytest.mark.parametrize("name", sorted(DIMS))
def test_parallel_backends_apply_exactly_to_the_parallel_examples(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
    expected = (("scan", "chunked") if name in PARALLEL else ()) + (() if name in NEWTON_REFUSED else ("newton",))
    # The fused form (a compiled sequential loop, tests/test_fused.py) runs nonlinear cells too.
    assert tuple(b for b in available_backends(module) if b != "fused") == expected


@pytest.mark.parametrize("name", PARALLEL)
def test_property_every_backend_agrees_with_sequential(name):
    """Hypothesis: random B, T (1, around the chunk size, others), heads, inputs, initial states."""
    assert_backends_agree(EXAMPLES / f"{name}.rec", dims=DIMS[name], backends=("scan", "chunked"), max_examples=12, hypothesis_seed=1)


@pytest.mark.parametrize("name", PARALLEL)
@pytest.mark.parametrize("length", [1, 63, 64, 65, 130])
def test_default_chunk_size_boundaries(name, length):
    """The chunked backend at its default chunk size (64), across chunk boundaries; gradients included."""
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    example = Example(batch=2, length=length, heads=(2,), seed=length, with_state=True)
    inputs, state = random_inputs(module, example)
    mismatches = compare_backends(module, ["scan", "chunked"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_explain_reports_the_chosen_backend():
    text = recdsl.explain(EXAMPLES / "gla.rec", dk=64, dv=64)
    assert "backend: chunked" in text and "S (decayed outer products)" in text
    assert "backend: scan" in recdsl.explain(EXAMPLES / "s6.rec", d=3, n=2)
    from recdsl.backends.fused_sequential import compiler

    chosen = "fused" if compiler() else "sequential"  # no scan form: the loop, compiled to C when it can be
    assert f"backend: {chosen} (no time-parallel form: state 'h' is nonlinear" in recdsl.explain(EXAMPLES / "gru.rec", d_in=3, d=4)


# ---- random programs --------------------------------------------------------------------

GATES = [
    "sigmoid(x @ Wa)",
    "exp(-softplus(g))",
    "exp(logsigmoid(g) / 4)",
    "1 - sigmoid(g)",
    "0.9",
    "sigmoid(g) * sigmoid(x @ Wa)",
    "exp(-exp(lam))",
]
TERMS = ["x @ Wb", "tanh(x @ Wb) * sigmoid(g)", "silu(g)", "g * (x @ Wb)"]


def _vector_cell(gate: str, term: str, second: bool, readout: str) -> str:
    lines = [
        "cell Random(d_in, d) {",
        "    input x: [d_in]",
        "    input g: [d]",
        "    param Wa: [d_in, d] = glorot",
        "    param Wb: [d_in, d] = glorot",
        "    param lam: [d] = normal(0.5)",
        "    state h: [d] = 0",
        f"    a = {gate}",
        f"    h = a * h + (1 - a) * ({term})",
    ]
    if second:
        # A second state whose update reads the first: scheduled after it.
        lines += ["    state u: [d] = 0", "    u = sigmoid(g) * u + h * g"]
    lines.append(f"    out {readout}")
    if second:
        lines.append("    out u")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _matrix_cell(decay: str, rank_one: bool, readout_left: bool) -> str:
    update = f"S = {decay} * S + outer(k, v)"
    if rank_one:
        update = "S = S - beta * outer(k, k @ S) + beta * outer(k, v)"
    out = "q @ S" if readout_left else "S @ w"
    return "\n".join(
        [
            "cell RandomMatrix(dk, dv) {",
            "    input q: [dk]",
            "    input k: [dk]",
            "    input v: [dv]",
            "    input w: [dv]",
            "    input g: [dk]",
            "    input b: []",
            "    state S: [dk, dv] = 0",
            "    beta = sigmoid(b)",
            f"    {update}",
            f"    out {out}",
            "}",
        ]
    ) + "\n"


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    gate=st.sampled_from(GATES),
    term=st.sampled_from(TERMS),
    second=st.booleans(),
    readout=st.sampled_from(["h", "h * g", "tanh(h)", "h + x @ Wa"]),
    example=st.builds(Example, batch=st.integers(1, 2), length=st.integers(1, 20), heads=st.sampled_from([(), (2,)]), seed=st.integers(0, 1000), with_state=st.booleans()),
)
def test_random_vector_programs_agree_across_backends(gate, term, second, readout, example):
    source = _vector_cell(gate, term, second, readout)
    torch.manual_seed(example.seed)
    module = recdsl.compile(source, d_in=3, d=4).double()
    assert not any(isinstance(s.recurrence, Nonlinear) for s in module.analysis.states), source
    inputs, state = random_inputs(module, example)
    mismatches = compare_backends(module, ["scan", "chunked"], inputs, state, seed=example.seed, chunk_size=4)
    assert not mismatches, source + "\n".join(map(str, mismatches))


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    decay=st.sampled_from(["0.8", "exp(logsigmoid(g))[:, None]", "sigmoid(b)", "exp(-softplus(g))[:, None] * sigmoid(b)"]),
    rank_one=st.booleans(),
    readout_left=st.booleans(),
    example=st.builds(Example, batch=st.integers(1, 2), length=st.integers(1, 20), heads=st.sampled_from([(), (2,)]), seed=st.integers(0, 1000), with_state=st.booleans()),
)
def test_random_matrix_programs_agree_across_backends(decay, rank_one, readout_left, example):
    source = _matrix_cell(decay, rank_one, readout_left)
    module = recdsl.compile(source, dk=3, dv=2).double()
    inputs, state = random_inputs(module, example)
    mismatches = compare_backends(module, ["scan", "chunked"], inputs, state, seed=example.seed, chunk_size=4)
    assert not mismatches, source + "\n".join(map(str, mismatches))


def test_dense_transition_runs_as_a_matrix_scan():
    source = "cell Linear(d) {\n input x: [d]\n param W: [d, d] = normal(0.3)\n state h: [d] = 0\n h = h @ W + x\n out h\n}\n"
    torch.manual_seed(0)
    module = recdsl.compile(source, d=3).double()
    assert module.analysis.state("h").recurrence.structure is Structure.DENSE
    inputs, state = random_inputs(module, Example(2, 9, (), 3, True))
    assert not compare_backends(module, ["scan", "chunked"], inputs, state)


def test_semiring_matrix_without_input_and_max_plus_viterbi():
    viterbi = "cell Viterbi(n) {\n input emit: [n]\n param trans: [n, n] = normal(1.0)\n state score: [n] = 0\n score = amax(score[:, None] + trans, 0) + emit\n out score\n}\n"
    torch.manual_seed(0)
    module = recdsl.compile(viterbi, n=3).double()
    assert module.analysis.state("score").recurrence.semiring.name == "max-plus"
    inputs, state = random_inputs(module, Example(2, 11, (2,), 5, True))
    assert not compare_backends(module, ["scan"], inputs, state)


# ---- the property checker itself ---------------------------------------------------------


def test_a_broken_backend_is_caught_with_a_minimal_reproducible_counterexample(monkeypatch):
    from recdsl.backends import scans

    original = scans.linear_scan

    def off_by_a_little(decay, value, chunk=32):
        result = original(decay, value, chunk)
        return result + (1e-3 if value.shape[0] >= 3 else 0.0)  # wrong only from T = 3 on

    monkeypatch.setattr("recdsl.backends.parallel.linear_scan", off_by_a_little)
    report = check_equivalence(EXAMPLES / "mingru.rec", dims=DIMS["mingru"], backends=["scan"], max_examples=30, hypothesis_seed=0)
    assert not report.ok
    assert report.counterexample is not None and report.counterexample.length == 3, report
    assert report.counterexample.batch == 1 and report.counterexample.heads == ()
    assert "compare_backends" in report.snippet and "Example(batch=1, length=3" in report.snippet
    # The snippet runs and shows the mismatch.
    namespace: dict = {}
    exec(compile(report.snippet.replace("print(mismatch)", "found.append(mismatch)"), "<snippet>", "exec"), {"found": (found := [])}, namespace)
    assert found and found[0].backend == "scan"


def test_monoid_that_is_not_associative_is_reported():
    source = """
monoid Skewed(d) {
    carry s: [d] = 0
    combine(a, b) {
        s = 0.5 * a.s + b.s
    }
}
cell C(d) {
    input x: [d]
    acc = scan Skewed(d) from (s = x)
    out acc.s
}
"""
    violations = check_monoid_laws(source, dims={"d": 2})
    laws = {v.law for v in violations}
    assert "associativity" in laws and "left identity" not in laws and "right identity" in laws
    assert "monoid Skewed: associativity fails for carry 's'" in str(next(v for v in violations if v.law == "associativity"))


def test_declared_monoids_of_the_examples_satisfy_their_laws():
    assert check_monoid_laws(EXAMPLES / "aaren.rec", dims={"d": 3}) == []


def test_the_identity_combined_with_itself_is_checked():
    """The log-sum-exp combine without its guard gives exp(-inf - -inf) = NaN for two -inf
    maxima: random carries never meet it, but a scan combining two scores of -inf does (the
    loop, whose prefix max is finite, does not), so the law checker tests e (+) e = e."""
    unguarded = (EXAMPLES / "aaren.rec").read_text().replace("where(a.m == m, 1, exp(a.m - m))", "exp(a.m - m)").replace("where(b.m == m, 1, exp(b.m - m))", "exp(b.m - m)")
    assert "where" not in unguarded.split("cell Aaren")[0].split("combine")[1]
    violations = check_monoid_laws(unguarded, dims={"d": 3})
    assert [(v.law, v.carry) for v in violations] == [("identity with itself", "s")]
    score = torch.tensor([[0.5, float("-inf"), float("-inf"), 0.25]], dtype=torch.float64)
    values = torch.randn(1, 4, 3, dtype=torch.float64)
    guarded = {backend: recdsl.compile(EXAMPLES / "aaren.rec", backend=backend, d=3).double()(score, values) for backend in ("sequential", "scan")}
    assert torch.isfinite(guarded["scan"]).all()
    torch.testing.assert_close(guarded["scan"], guarded["sequential"], rtol=1e-12, atol=1e-12)


# ---- numerics ------------------------------------------------------------------------------

LONG = 65536


@pytest.mark.parametrize("name, dims, gate_bias", [("gla", dict(dk=4, dv=4), 8.0), ("gla", dict(dk=4, dv=4), -8.0), ("mingru", dict(d_in=4, d=4), 8.0), ("mingru", dict(d_in=4, d=4), -8.0)])
@pytest.mark.parametrize("backend", ["scan", "chunked"])
def test_long_sequences_with_decays_near_zero_and_one_stay_finite(name, dims, gate_bias, backend):
    """T = 65536: no overflow or NaN in float32; in float64 the end agrees with a sequential run
    resumed near the end (in float32 two chunkings of 65536 steps round differently by ~1e-4
    when the decay keeps ~50000 steps of memory, so the exact comparison is made in float64)."""
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **dims)
    generator = torch.Generator().manual_seed(1)
    inputs = {i.name: torch.randn(1, LONG, *i.type.shape, generator=generator) for i in module.cell.inputs}
    if "g" in inputs:  # GLA: decay = sigmoid(g) ** (1/16), near 1 for g >> 0 and near 0.6 for g << 0
        inputs["g"] = inputs["g"] + gate_bias
    else:  # minGRU: decay = 1 - sigmoid(x @ W_z + b_z)
        with torch.no_grad():
            module.b_z.fill_(gate_bias)
    out, final = module(**inputs, return_state=True)
    assert torch.isfinite(out).all() and all(torch.isfinite(v).all() for v in final.values())
    module = module.double()
    inputs = {n: v.double() for n, v in inputs.items()}
    out = module(**inputs)
    tail = 100
    _, middle = module(**{n: v[:, : LONG - tail] for n, v in inputs.items()}, return_state=True)
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **dims)
    reference.load_state_dict(module.state_dict())
    expected = reference.double()(**{n: v[:, LONG - tail :] for n, v in inputs.items()}, state=middle)
    torch.testing.assert_close(out[:, LONG - tail :], expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["scan", "chunked"])
def test_low_precision_inputs_accumulate_in_float32(dtype, backend):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "gla.rec", backend=backend, dk=8, dv=8)
    generator = torch.Generator().manual_seed(0)
    inputs = {i.name: torch.randn(2, 300, *i.type.shape, generator=generator) for i in module.cell.inputs}
    inputs["g"] = inputs["g"] + 6.0  # slow decay: errors would accumulate over many steps
    low = {n: v.to(dtype) for n, v in inputs.items()}
    out, final = module(**low, return_state=True)
    assert out.dtype == dtype and final["S"].dtype == torch.float32
    exact = module.double()(**{n: v.double() for n, v in low.items()})
    error = (out.double() - exact).abs().max() / exact.abs().max()
    assert error < 2e-2, f"relative error {error:.2e}: the state is not accumulated in float32"
