"""Reverse states and delays on the step-by-step backends: ``newton``, ``fused`` (the loop
compiled to C) and the fused sequential Triton kernel (``triton``, in Triton's interpreter).

Each runs a cell with reverse states or delays in parts (backends/directed.py): delays
shifted, each group of the schedule a forward sub-cell, a reverse one on the sequence
flipped in time.  Compared against the sequential backend (the definition): outputs, final
states (a reverse state's is its value at step 0) and the gradients with respect to inputs,
params and initial states; float64 at recdsl.testing's tolerances, float32 at 1e-4 of the
largest value; T = 1 and lengths that are not powers of two (Hypothesis draws them).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.backends import fused_sequential
from recdsl.plan import BackendKind, Form
from recdsl.testing import Example, check_equivalence, compare_backends, random_inputs

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)
from test_fused import _run_float32  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_compiler = pytest.mark.skipif(fused_sequential.compiler() is None, reason="no C compiler (the fused backend compiles C)")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

# A forward nonlinear state; a reverse pair coupled through each other (LSTM-like) that reads
# the forward state before and after its update; a reverse delay and a forward one.
NONLINEAR_MIXED = """
cell NonlinearMixed(d) {
    input x: [d]
    input a: []
    param W: [d, d] = glorot
    param u: [d] = uniform(0, 1)
    state h: [d] = 0
    state c: [d] = 0 reverse
    state g: [d] = 0 reverse
    state a_next: [] = 1 reverse
    state xp: [d] = 0
    before = h
    h = tanh(h @ W + x + u * xp)
    c = sigmoid(a_next) * c + tanh(x + g * h)
    g = tanh(c) * sigmoid(x - before)
    a_next = a
    xp = x
    out y = h * g + c - before
}
"""

# Delays only (a token shift and the shift of the shift), read by a nonlinear forward state
# and by the output, before and after their updates.
DELAYS = """
cell Shifted(d) {
    input x: [d]
    param mu: [d] = uniform(0, 1)
    state xp: [d] = 0
    state xpp: [d] = 0
    state h: [d] = 0
    mixed = mu * x + (1 - mu) * xp + 0.5 * xpp
    h = tanh(h * sigmoid(mixed) + mixed)
    xpp = xp
    xp = x
    out h + xp
}
"""

CELLS = {
    "bigru": (EXAMPLES / "bigru.rec", {"d_in": 3, "d": 4}),
    "nonlinear-mixed": (NONLINEAR_MIXED, {"d": 3}),
    "delays": (DELAYS, {"d": 3}),
}


def _backends() -> list:
    return [
        pytest.param("newton"),
        pytest.param("fused", marks=needs_compiler),
    ]


@pytest.fixture
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(CELLS))
def test_property_agrees_with_sequential(name, backend):
    """Hypothesis (float64): B, T (1 and lengths around 8), heads, initial states; outputs, final states, every gradient."""
    source, dims = CELLS[name]
    report = check_equivalence(source, dims=dims, backends=[backend], max_examples=5, max_length=12, hypothesis_seed=7)
    assert report.ok and report.examples > 0, str(report)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("name", list(CELLS))
def test_plans_run_each_group_in_its_direction_and_shift_the_delays(name, backend):
    source, dims = CELLS[name]
    module = recdsl.compile(source, backend=backend, **dims)
    plan = module.plan
    assert plan.directed is not None
    forms = {step.name: step.form for step in plan.steps}
    for delay in module.analysis.delays:
        assert forms[delay] is Form.TIME_PARALLEL, f"delay {delay} is {forms[delay]}"
    parts = {part.names: part.direction for part in plan.directed.parts}
    expected = {tuple(group): module.analysis.direction(group) for group in module.analysis.schedule if not set(group) <= module.analysis.delays}
    assert parts == expected
    text = plan.format()
    assert "delays shifted one step" in text
    if module.cell.reversed_recurrences:
        assert "on the sequence flipped in time" in text


@pytest.mark.parametrize("backend", _backends())
def test_reverse_state_returned_is_its_value_at_step_zero(backend):
    """BiGRU's output g is the reverse state after each step's update: the returned state is ``g`` at step 0."""
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "bigru.rec", backend=backend, d_in=3, d=4).double()
    inputs, state = random_inputs(module, Example(batch=2, length=5, heads=(), seed=1, with_state=True))
    (h, g), final = module(**inputs, state=state, return_state=True)
    torch.testing.assert_close(final["g"], g[:, 0], atol=0, rtol=0, msg="reverse state g returned vs g at step 0")
    torch.testing.assert_close(final["h"], h[:, -1], atol=0, rtol=0, msg="forward state h returned vs h at the last step")


_FLOAT32_PAIRS: dict[tuple[str, str], tuple[torch.nn.Module, torch.nn.Module]] = {}


def _float32_pair(name: str, backend: str, seed: int):
    key = (name, backend)
    if key not in _FLOAT32_PAIRS:
        source, dims = CELLS[name]
        _FLOAT32_PAIRS[key] = (recdsl.compile(source, backend=backend, **dims), recdsl.compile(source, backend="sequential", **dims))
    module, sequential = _FLOAT32_PAIRS[key]
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    sequential.load_state_dict(module.state_dict())
    return module, sequential


def _assert_float32_close(module, sequential, example: Example, label: str) -> None:
    inputs, state = random_inputs(module, example, scale=1.0)
    inputs = {k: v.float() for k, v in inputs.items()}
    state = None if state is None else {k: v.float() for k, v in state.items()}
    expected, actual = _run_float32(sequential, inputs, state), _run_float32(module, inputs, state)
    assert set(expected) == set(actual)
    for quantity, reference in expected.items():
        assert actual[quantity].dtype == torch.float32, quantity
        tolerance = 1e-4 * max(1.0, reference.abs().max().item())
        error = (actual[quantity] - reference).abs().max().item()
        assert error <= tolerance, f"{label} {quantity}: max error {error:.3g} > {tolerance:.3g} ({example})"


@pytest.mark.parametrize("backend", _backends())
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.sampled_from(list(CELLS)),
    batch=st.integers(1, 3),
    length=st.sampled_from([1, 2, 7, 19]),
    heads=st.sampled_from([(), (2,)]),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_property_float32_agrees_with_sequential(backend, name, batch, length, heads, with_state, seed):
    module, sequential = _float32_pair(name, backend, seed)
    _assert_float32_close(module, sequential, Example(batch, length, heads, seed, with_state), f"{name} on {backend}")


# ---- random cells: directions, coupling and what each update reads, drawn ------------------------


@st.composite
def mixed_cells(draw) -> str:
    """A cell of 2-3 nonlinear states, each forward or reverse, each reading the states declared
    before it (before or after their updates), with an optional delay of either direction."""
    count = draw(st.integers(2, 3))
    directions = [draw(st.booleans()) for _ in range(count)]
    activations = [draw(st.sampled_from(["tanh", "sigmoid", "softplus"])) for _ in range(count)]
    delay = draw(st.sampled_from([None, "forward", "reverse"]))
    lines = ["cell Random(d) {", "    input x: [d]", "    input a: []"]
    lines += [f"    param p{i}: [d] = uniform(-1, 1)" for i in range(count)]
    lines += [f"    state s{i}: [d] = 0{' reverse' if reverse else ''}" for i, reverse in enumerate(directions)]
    if delay is not None:
        lines.append(f"    state dl: [] = 1{' reverse' if delay == 'reverse' else ''}")
    lines += [f"    b{i} = s{i}" for i in range(count)]  # each state's value before its update
    for i in range(count):
        terms = [f"p{i} * s{i}", "x"]
        for j in range(i):
            terms.append(f"{draw(st.sampled_from([0.5, -0.7]))} * {draw(st.sampled_from([f's{j}', f'b{j}']))}")
        if delay is not None and draw(st.booleans()):
            terms.append("dl * x")
        lines.append(f"    s{i} = {activations[i]}({' + '.join(terms)})")
    if delay is not None:
        lines.append("    dl = sigmoid(a)")
    lines.append("    out y = " + " + ".join(f"s{i} * b{i}" if i % 2 else f"s{i}" for i in range(count)))
    lines.append("}")
    return "\n".join(lines)


@pytest.mark.parametrize("backend", _backends())
@settings(max_examples=5, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(source=mixed_cells(), length=st.sampled_from([1, 3, 6]), with_state=st.booleans(), seed=st.integers(0, 2**16))
def test_property_random_mixed_cells_agree_with_sequential(backend, source, length, with_state, seed):
    torch.manual_seed(seed)
    module = recdsl.compile(source, d=3).double()
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(), seed=seed, with_state=with_state))
    mismatches = compare_backends(module, [backend], inputs, state, seed=seed)
    assert not mismatches, source + "\n" + "\n".join(map(str, mismatches))


# ---- the fused Triton kernel, in the interpreter --------------------------------------------------


@needs_triton
@pytest.mark.parametrize("name", list(CELLS))
def test_triton_fused_kernel_runs_reverse_states_and_delays(name, interpreter):
    """One example each in the default run (T = 5, heads, a given initial state); Hypothesis below (slow)."""
    source, dims = CELLS[name]
    torch.manual_seed(0)
    module = recdsl.compile(source, **dims).double()
    planned = recdsl.compile(source, backend="triton", **dims).plan
    assert planned.directed is not None and Form.TRITON_FUSED in {step.form for step in planned.steps}
    inputs, state = random_inputs(module, Example(batch=2, length=5, heads=(2,), seed=3, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3)
    assert not mismatches, "\n".join(map(str, mismatches))


@needs_triton
def test_triton_fused_kernel_float32_at_length_one(interpreter):
    module = recdsl.compile(EXAMPLES / "bigru.rec", backend="triton", d_in=3, d=4)
    sequential = recdsl.compile(EXAMPLES / "bigru.rec", backend="sequential", d_in=3, d=4)
    sequential.load_state_dict(module.state_dict())
    for length in (1, 6):
        _assert_float32_close(module, sequential, Example(2, length, (), length, True), "bigru on triton")


@needs_triton
@pytest.mark.slow
@pytest.mark.parametrize("name", list(CELLS))
def test_property_triton_fused_kernel_agrees_with_sequential(name, interpreter):
    source, dims = CELLS[name]
    report = check_equivalence(source, dims=dims, backends=["triton"], max_examples=4, max_length=9, hypothesis_seed=5)
    assert report.ok and report.examples > 0, str(report)


# ---- auto, packed batches ----------------------------------------------------------------------


@needs_compiler
def test_auto_picks_the_fused_loop_for_bigru_on_cpu():
    module = recdsl.compile(EXAMPLES / "bigru.rec", d_in=128, d=128)
    assert module.plan.backend is BackendKind.FUSED, module.plan.reason
    assert module.plan.directed is not None
    costs = {cost.backend: cost for cost in module.plan.costs}
    assert costs[BackendKind.FUSED].seconds is not None and costs[BackendKind.NEWTON].reason is None or "at least" in costs[BackendKind.NEWTON].reason


@pytest.mark.parametrize("backend", _backends())
def test_packed_batches_with_delays_match_one_call_per_sequence(backend):
    """Forward delays with cu_seqlens (sequences padded at their ends: each delay's final value read at its sequence's last step)."""
    torch.manual_seed(2)
    module = recdsl.compile(DELAYS, backend=backend, d=3).double()
    offsets = [0, 3, 4, 9]
    x = torch.randn(1, offsets[-1], 3, dtype=torch.float64)
    packed, final = module(x, cu_seqlens=torch.tensor(offsets), return_state=True)
    for n, (start, end) in enumerate(zip(offsets, offsets[1:])):
        alone, alone_final = module(x[:, start:end], return_state=True)
        torch.testing.assert_close(packed[:, start:end], alone, msg=f"sequence {n}: outputs")
        for key, value in alone_final.items():
            torch.testing.assert_close(final[key][n : n + 1], value, msg=f"sequence {n}: final state {key}")


@pytest.mark.parametrize("backend", _backends())
def test_packed_batches_with_reverse_states_run_grouped_by_length(backend):
    """Padding would start a reverse state inside the padding, so a packed batch runs in groups of equal length
    (values against one call per sequence: tests/test_varlen_reverse.py)."""
    from recdsl.plan import VarlenForm

    module = recdsl.compile(EXAMPLES / "bigru.rec", backend=backend, d_in=3, d=4).double()
    assert module.plan.varlen is VarlenForm.GROUPED_BY_LENGTH
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    packed = module(x, cu_seqlens=torch.tensor([0, 2, 6]))  # BiGRU's outputs: the forward and the backward halves
    for got, alone in zip(packed, module(x[:, 2:])):
        torch.testing.assert_close(got[:, 2:], alone)


def test_newton_warm_start_with_one_part():
    """The delay cell is one Newton solve (its delays are shifted): the warm start applies, and the second call converges at once."""
    torch.manual_seed(0)
    module = recdsl.compile(DELAYS, backend="newton", backend_options={"warm_start": True}, d=3).double()
    assert len(module.plan.directed.parts) == 1
    x = torch.randn(2, 9, 3, dtype=torch.float64)
    first = module(x)
    cold = module.last_solve
    second = module(x)
    assert module.last_solve.warm_started and module.last_solve.iterations <= cold.iterations
    torch.testing.assert_close(second, first, msg="warm-started solution vs cold one")


@needs_compiler
def test_fused_unsupported_agrees_with_the_plan():
    from recdsl.backends.registry import get_backend

    module = recdsl.compile(EXAMPLES / "lion.rec", dk=3, dv=2)
    reason = fused_sequential.unsupported(module.analysis)
    assert reason is not None and "group Sf (forward)" in reason and reason == get_backend("fused").unsupported(module.analysis)
