"""Reverse time (``state ... reverse``, ``scan reverse``) and delays, against the sequential
backend and against loops written here from the definitions."""

from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl import ir
from recdsl.analysis import Delay, analyze
from recdsl.errors import DeclarationError
from recdsl.frontend import load
from recdsl.parser import parse
from recdsl.plan import Form
from recdsl.printer import unparse
from recdsl.testing import Example, assert_backends_agree, compare_backends, random_inputs

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)

# A forward state reads a reverse one, which reads a reverse delay: three groups, each after
# the one it reads.
MIXED = """
cell Mixed(d) {
    input x: [d]
    input a: []
    state h: [d] = 0
    state g: [d] = 0 reverse
    state a_next: [] = 1 reverse
    lam = sigmoid(a)
    g = a_next * g + x
    a_next = lam
    h = lam * h + tanh(x) * g
    out y = h - g
}
"""

# Directions alternate along a chain: forward h, reverse g reading h (before and after its
# update), forward k reading g's value of the step after.
CHAIN = """
cell Chain(d) {
    input x: [d]
    input u: [d]
    state h: [d] = 0
    state g: [d] = 0 reverse
    state k: [d] = 0
    before = h
    h = sigmoid(u) * h + x
    g = 0.7 * g + h * before
    k = 0.9 * k + g
    later = g
    out k - later
}
"""

# The composition of affine maps x -> m x + c, applied earlier map first: not commutative,
# so a suffix combine in the wrong order would show.
AFFINE_SCAN = """
monoid Affine(d) {
    carry m: [d] = 1
    carry c: [d] = 0
    combine(p, q) {
        m = p.m * q.m
        c = q.m * p.c + q.c
    }
}
cell Suffix(d) {
    input x: [d]
    input u: [d]
    acc = scan reverse Affine(d) from (m = sigmoid(u), c = x)
    pre = scan Affine(d) from (m = sigmoid(u), c = x)
    out acc.c + 2 * pre.c
}
"""

# RWKV's token shift: a forward delay, read by everything after it.
TOKEN_SHIFT = """
cell TokenShift(d) {
    input x: [d]
    input g: [d]
    param mu: [d] = uniform(0, 1)
    state xp: [d] = 0
    state S: [d] = 0
    mixed = mu * x + (1 - mu) * xp
    S = sigmoid(g) * S + mixed
    xp = x
    out S
}
"""


def test_reverse_parses_and_prints_back():
    program = parse(MIXED + AFFINE_SCAN)
    printed = unparse(program)
    assert "state g: [d] = 0 reverse" in printed and "scan reverse Affine(d)" in printed
    assert parse(printed) == program


def test_ir_marks_the_direction():
    cell = load(MIXED, dims={"d": 3})
    assert [s.direction for s in cell.states] == [ir.Direction.FORWARD, ir.Direction.REVERSE, ir.Direction.REVERSE]
    assert cell.reversed_recurrences == ("g", "a_next")
    suffix = load(AFFINE_SCAN, cell="Suffix", dims={"d": 2})
    assert [s.direction for s in suffix.scans] == [ir.Direction.REVERSE, ir.Direction.FORWARD]


def test_delays_are_classified_and_scheduled_first():
    analysis = analyze(load(MIXED, dims={"d": 3}))
    assert analysis.delays == frozenset({"a_next"})
    assert isinstance(analysis.state("a_next").recurrence, Delay)
    assert analysis.state("a_next").recurrence.direction is ir.Direction.REVERSE
    assert analysis.schedule == (("a_next",), ("g",), ("h",))
    shift = analyze(load(TOKEN_SHIFT, dims={"d": 3}))
    assert shift.delays == frozenset({"xp"}) and shift.state("xp").recurrence.name == "delay"


def test_a_cycle_between_directions_is_a_compile_error():
    source = """
cell Cycle(d) {
    input x: [d]
    state h: [d] = 0
    state g: [d] = 0 reverse
    h = 0.5 * h + g
    g = 0.5 * g + h
    out h
}
"""
    with pytest.raises(DeclarationError) as caught:
        recdsl.compile(source, d=2)
    assert str(caught.value) == (
        "<string>:5:5: declaration error: forward state 'h' and reverse state 'g' read each other, so neither can run first\n"
        "   5 |     state g: [d] = 0 reverse\n"
        "           ^~~~~~~~~~~~~~~~~~~~~~~~\n"
        "  expected no cycle between forward and reverse recurrences (a forward state may read a reverse one, or the other way, not both)"
    )


def _loop_mixed(x, a, state):
    """MIXED by its definition, with explicit loops (reverse ones from the last step)."""
    B, T, d = x.shape
    lam = torch.sigmoid(a)
    g, gs = state["g"], [None] * T
    for t in reversed(range(T)):
        decay = lam[:, t + 1] if t + 1 < T else state["a_next"]
        g = decay[:, None] * g + x[:, t]
        gs[t] = g
    h, hs = state["h"], []
    for t in range(T):
        h = lam[:, t, None] * h + torch.tanh(x[:, t]) * gs[t]
        hs.append(h)
    y = torch.stack(hs, 1) - torch.stack(gs, 1)
    return y, {"h": h, "g": gs[0], "a_next": lam[:, 0]}


@pytest.mark.parametrize("T", [1, 5, 67])
def test_sequential_reverse_matches_loops_from_the_definition(T):
    module = recdsl.compile(MIXED, d=3, backend="sequential").double()
    g = torch.Generator().manual_seed(T)
    x, a = torch.randn(2, T, 3, generator=g, dtype=torch.float64), torch.randn(2, T, generator=g, dtype=torch.float64)
    state = {"h": torch.randn(2, 3, generator=g, dtype=torch.float64), "g": torch.randn(2, 3, generator=g, dtype=torch.float64), "a_next": torch.rand(2, generator=g, dtype=torch.float64)}
    y, final = module(x, a, state=state, return_state=True)
    expected, expected_final = _loop_mixed(x, a, state)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12, msg="Mixed: output y vs loops")
    for name, value in expected_final.items():
        torch.testing.assert_close(final[name], value, atol=1e-12, rtol=1e-12, msg=f"Mixed: returned state {name} (value at step 0 for reverse states)")


def test_reverse_scan_is_the_suffix_combine_in_sequence_order():
    module = recdsl.compile(AFFINE_SCAN, cell="Suffix", d=2, backend="sequential").double()
    g = torch.Generator().manual_seed(0)
    x, u = torch.randn(1, 6, 2, generator=g, dtype=torch.float64), torch.randn(1, 6, 2, generator=g, dtype=torch.float64)
    y = module(x, u)
    m = torch.sigmoid(u)
    suffix_c, carry_m, carry_c = [None] * 6, torch.ones(1, 2, dtype=torch.float64), torch.zeros(1, 2, dtype=torch.float64)
    for t in reversed(range(6)):  # x_t (+) acc_{t+1}: apply step t's map, then the later ones
        carry_c = carry_m * x[:, t] + carry_c
        carry_m = m[:, t] * carry_m
        suffix_c[t] = carry_c
    prefix_c, c = [], torch.zeros(1, 2, dtype=torch.float64)
    for t in range(6):
        c = m[:, t] * c + x[:, t]
        prefix_c.append(c)
    expected = torch.stack(suffix_c, 1) + 2 * torch.stack(prefix_c, 1)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12, msg="reverse scan vs the suffix combine")


def test_alternating_directions_are_scheduled_in_order():
    assert analyze(load(CHAIN, dims={"d": 2})).schedule == (("h",), ("g",), ("k",))


@pytest.mark.parametrize("source, cell", [(MIXED, None), (AFFINE_SCAN, "Suffix"), (TOKEN_SHIFT, None), (CHAIN, None)], ids=["mixed", "reverse-scan", "token-shift", "chain"])
def test_property_parallel_backends_agree_with_sequential(source, cell):
    """Hypothesis: T = 1, lengths around the chunk size, heads, initial states, gradients."""
    assert_backends_agree(source, cell=cell, dims={"d": 3}, backends=("scan", "chunked"), max_examples=15, hypothesis_seed=2)


def test_property_lion_chunked_agrees_with_sequential():
    assert_backends_agree(EXAMPLES / "lion.rec", dims={"dk": 4, "dv": 3}, backends=("scan", "chunked"), max_examples=15, hypothesis_seed=3)


def test_lion_stays_chunked_with_its_delayed_decay():
    """The reverse half reads the decay of the step after (a delay): both matrix states chunk."""
    module = recdsl.compile(EXAMPLES / "lion.rec", dk=64, dv=64)
    assert module.backend == "chunked"
    forms = {step.name: step.form for step in module.plan.steps}
    assert forms["Sf"] is Form.CHUNKED and forms["Sb"] is Form.CHUNKED and forms["lam_next"] is Form.TIME_PARALLEL
    assert "lam_next (reverse): a delay" in module.plan.format()
    assert "Sb (reverse)" in module.plan.format()


def test_explain_shows_reverse_states_and_delays():
    text = recdsl.explain(EXAMPLES / "lion.rec", dk=4, dv=3)
    assert "Sb [4, 3]: reverse state (runs from the last step to the first)" in text
    assert "lam_next []: reverse state (runs from the last step to the first), delay" in text
    assert "a delay: its update reads no recurrent value" in text
    scan_text = recdsl.explain(AFFINE_SCAN, cell="Suffix", d=2)
    assert "suffix combine" in scan_text


@pytest.mark.parametrize("backend", ["newton", "fused"])
def test_step_by_step_backends_run_reverse_states_in_parts(backend):
    """newton and fused run a BiGRU as two forward sub-cells, the reverse one flipped (tests/test_directed.py compares them)."""
    if backend == "fused":
        from recdsl.backends import fused_sequential

        if fused_sequential.compiler() is None:
            pytest.skip("no C compiler")
    planned = recdsl.compile(EXAMPLES / "bigru.rec", d_in=3, d=4, backend=backend).plan
    assert [(part.names, str(part.direction)) for part in planned.directed.parts] == [(("h",), "forward"), (("g",), "reverse")]


def test_triton_runs_reverse_states_and_scans(monkeypatch, tmp_path):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path / "recdsl-cache"))
    for source, cell in ((MIXED, None), (AFFINE_SCAN, "Suffix")):
        module = recdsl.compile(source, cell=cell, d=3).double()
        example = Example(batch=2, length=9, heads=(2,), seed=4, with_state=True)
        inputs, state = random_inputs(module, example)
        mismatches = compare_backends(module, ["triton"], inputs, state, seed=4)
        assert not mismatches, "\n".join(map(str, mismatches))
