"""The Triton backward kernel of declared monoids (backends/triton_monoid.py: the adjoint
recurrence derived from the combine by the op registry's rules) in Triton's interpreter,
against the sequential backend's gradients (torch's autograd of ``combine(y_{t-1}, l_t)``
step by step): Aaren and other monoids, T = 1 and lengths that are not multiples of the
block, ties of ``max``, initial carries with gradients, float64 tight and float32, one pass
and T split across programs; and the torch fallback when a combine has no derivative rule."""

from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.testing import Example, check_monoid_laws, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)
from test_reverse import AFFINE_SCAN  # noqa: E402

# The running maximum and the value at its last occurrence: ties of max pick the later
# element's value through `where`, and split max's own gradient in halves.
ARGMAX = """
monoid LastMax(d) {
    carry m: [d] = -inf
    carry v: [d] = 0
    combine(a, b) {
        m = max(a.m, b.m)
        v = where(b.m >= a.m, b.v, a.v)
    }
}
cell Argmax(d) {
    input x: [d]
    input u: [d]
    best = scan LastMax(d) from (m = x, v = tanh(u))
    out best.v + 0.5 * best.m
}
"""

# Two carries that never read each other, min and max of one input: ties everywhere with
# rounded inputs; and the log semiring's plus with a gate on the lift.
RANGE = """
monoid Range(d) {
    carry lo: [d] = inf
    carry hi: [d] = -inf
    carry l: [d] = -inf
    combine(a, b) {
        lo = min(a.lo, b.lo)
        hi = max(a.hi, b.hi)
        l = logaddexp(a.l, b.l)
    }
}
cell Spread(d) {
    input x: [d]
    input g: [d]
    param w: [d] = uniform(0.5, 1.5)
    r = scan Range(d) from (lo = x, hi = x * w, l = x - softplus(g))
    out r.hi - r.lo + r.l
}
"""

CELLS = {
    "aaren": (EXAMPLES / "aaren.rec", {"d": 3}),
    "affine": (AFFINE_SCAN, {"d": 3}),  # a reverse scan (torch) beside a forward one (the kernel)
    "argmax": (ARGMAX, {"d": 3}),
    "range": (RANGE, {"d": 2}),
}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _module(name: str) -> recdsl.CompiledCell:
    source, dims = CELLS[name]
    return recdsl.compile(source, **dims).double()


def _compare(module, length: int, batch: int, heads: tuple[int, ...], seed: int, with_state: bool, ties: bool, options=None, dtype=torch.float64) -> set[str]:
    from recdsl.backends.triton_launch import observe_launches

    inputs, state = random_inputs(module, Example(batch=batch, length=length, heads=heads, seed=seed, with_state=with_state))
    if ties:  # few distinct values: ties inside the sequence and with the initial carries
        inputs = {n: v.mul(1.5).round() for n, v in inputs.items()}
        state = None if state is None else {n: v.mul(1.5).round() for n, v in state.items()}
    inputs = {n: v.to(dtype) for n, v in inputs.items()}
    state = None if state is None else {n: v.to(dtype) for n, v in state.items()}
    tolerances = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    with observe_launches() as launches:
        mismatches = compare_backends(module, ["triton"], inputs, state, seed=seed, backend_options=options, **tolerances)
    assert not mismatches, "\n".join(map(str, mismatches))
    return {launch.name for launch in launches}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_example_monoids_are_monoids(name):
    source, dims = CELLS[name]
    assert check_monoid_laws(source, dims=dims) == []


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("length", [1, 37])  # 37: two blocks of 32 steps, the second ragged
def test_backward_kernel_matches_sequential(name, length):
    torch.manual_seed(0)
    launched = _compare(_module(name), length, batch=2, heads=(2,), seed=length, with_state=True, ties=False)
    assert any(n.startswith("backward_") for n in launched), launched


@pytest.mark.parametrize("name", ["aaren", "argmax", "range"])
def test_ties_of_max_split_the_gradient_as_the_sequential_backend_does(name):
    """Rounded inputs and initial carries: max(a.m, b.m) with a.m == b.m at most steps."""
    torch.manual_seed(1)
    _compare(_module(name), 35, batch=2, heads=(), seed=3, with_state=True, ties=True)


def test_aaren_equal_scores_give_torch_autograd_of_the_loop():
    """Every score equal to the initial maximum: each step's max is a tie.  The gradients are
    those of torch's autograd through a plain loop of the combine (ties split in halves)."""
    module = recdsl.compile(EXAMPLES / "aaren.rec", backend="triton", d=2).double()
    score = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 5, 2, dtype=torch.float64, requires_grad=True)
    start = {"acc.m": torch.zeros(1, dtype=torch.float64, requires_grad=True), "acc.s": torch.ones(1, dtype=torch.float64, requires_grad=True), "acc.n": torch.randn(1, 2, dtype=torch.float64, requires_grad=True)}
    out, final = module(score, v, state=start, return_state=True)
    weights = torch.randn_like(out)
    (out * weights).sum().add(final["acc.m"].sum() + 2 * final["acc.s"].sum() + final["acc.n"].sum()).backward()

    leaves = [score, v, *start.values()]
    fresh = [t.detach().clone().requires_grad_() for t in leaves]
    m, s, n = fresh[2], fresh[3], fresh[4]
    outputs = []
    for t in range(5):
        new_m = torch.maximum(m, fresh[0][:, t])
        # examples/aaren.rec's combine: exp(x - max) is 1 where x is the max
        earlier = torch.where(m == new_m, 1.0, torch.exp(m - new_m))
        later = torch.where(fresh[0][:, t] == new_m, 1.0, torch.exp(fresh[0][:, t] - new_m))
        s = s * earlier + later
        n = n * earlier[:, None] + fresh[1][:, t] * later[:, None]
        m = new_m
        outputs.append(n / s[:, None])
    (torch.stack(outputs, 1) * weights).sum().add(m.sum() + 2 * s.sum() + n.sum()).backward()
    for got, expected in zip(leaves, fresh):
        torch.testing.assert_close(got.grad, expected.grad, rtol=1e-12, atol=1e-12)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name=st.sampled_from(sorted(CELLS)),
    length=st.integers(1, 70),
    batch=st.integers(1, 2),
    heads=st.sampled_from([(), (2,)]),
    seed=st.integers(0, 1000),
    with_state=st.booleans(),
    ties=st.booleans(),
)
def test_backward_kernel_matches_sequential_on_random_sequences(name, length, batch, heads, seed, with_state, ties):
    _compare(_module(name), length, batch, heads, seed, with_state, ties)


SCAN_NAMES = {"aaren": "acc", "argmax": "best", "range": "r"}


@pytest.mark.parametrize("name", sorted(SCAN_NAMES))
@pytest.mark.parametrize("length,min_steps", [(37, 5), (33, 32), (2, 1)], ids=["ragged last chunk", "last chunk of 1 step", "chunks of 1 step"])
def test_split_backward_matches_sequential(name, length, min_steps):
    """T split across programs: each chunk of reversed time folded into (W, u), the adjoint
    carried across chunks, each chunk rescanned from it (Range's param: a gradient summed per chunk)."""
    torch.manual_seed(0)
    launched = _compare(_module(name), length, batch=1, heads=(), seed=length, with_state=True, ties=name != "aaren", options={"split_programs": 1000, "split_min_steps": min_steps})
    scan = SCAN_NAMES[name]
    assert {f"summarize_backward_{scan}", f"carries_backward_{scan}", f"backward_{scan}_chunks"} <= launched, launched


@pytest.mark.parametrize("name", ["aaren", "range"])
def test_float32(name):
    torch.manual_seed(0)
    source, dims = CELLS[name]
    module = recdsl.compile(source, **dims)
    _compare(module.double(), 40, batch=2, heads=(), seed=4, with_state=False, ties=False, dtype=torch.float32)


def test_backward_runs_no_combine_math_in_torch():
    """Aaren's backward: the kernel differentiates the combine; torch only runs the read-out's
    backward (acc.n / acc.s) and the sums of the broadcast leaves."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from recdsl.backends.triton_launch import observe_launches

    class Recorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name.split("::")[-1])
            return func(*args, **(kwargs or {}))

    module = recdsl.compile(EXAMPLES / "aaren.rec", backend="triton", d=3).double()
    score = torch.randn(2, 9, dtype=torch.float64, requires_grad=True)
    v = torch.randn(2, 9, 3, dtype=torch.float64, requires_grad=True)
    out = module(score, v)
    with observe_launches(run_kernels=False) as launches, Recorder() as recorder:  # torch's ops only, not the interpreter's
        out.sum().backward()
    assert [launch.name for launch in launches] == ["backward_acc"]
    assert not {"maximum", "exp", "where", "eq", "lt", "gt"} & set(recorder.names), recorder.names
    assert recorder.names.count("mul") <= 1, recorder.names  # the read-out's division: d(n / s) / ds


def test_a_combine_without_a_derivative_rule_falls_back_to_torch(monkeypatch):
    """With max's rule taken out of the registry, the plan keeps the forward kernel, says why
    there is no backward kernel, and the backward differentiates torch's scan (same gradients)."""
    from recdsl import ops
    from recdsl.backends.triton_launch import observe_launches

    monkeypatch.setitem(ops.OPS, "maximum", dataclasses.replace(ops.OPS["maximum"], derivative=None))
    module = recdsl.compile(EXAMPLES / "aaren.rec", backend="triton", d=3)
    (spec,) = [step.kernel for step in module.plan.steps if step.kernel is not None]
    assert spec.adjoint is None
    assert "backward: torch's scan of the combine, differentiated by autograd (monoid SoftmaxSum: 'maximum' has no derivative rule in the op registry)" in spec.comment
    assert "def backward_acc" not in module.plan.kernel_source
    with observe_launches() as launches:
        _compare(_module("aaren"), 9, batch=1, heads=(), seed=2, with_state=True, ties=False)
    assert not any(launch.name.startswith(("backward_", "summarize_backward_")) for launch in launches)


def test_emit_shows_the_backward_kernel(capsys):
    from recdsl.cli import main

    assert main(["emit", "--backend", "triton", str(EXAMPLES / "aaren.rec"), "--dim", "d=4"]) == 0
    text = capsys.readouterr().out
    for kernel in ("adjoint_combine_acc", "backward_acc", "summarize_backward_acc", "carries_backward_acc", "backward_acc_chunks"):
        assert f"def {kernel}(" in text, kernel
    # Aaren's W: m's adjoint gathers from m, s and n; s and n only from themselves.
    assert "def adjoint_combine_acc(w_0_0_1, w_0_1_1, w_0_2_1, w_1_1_1, w_2_2_1, u_0_1, u_1_1, u_2_1," in text
    compile(text, "<emitted>", "exec")
