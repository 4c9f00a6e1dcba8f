"""``mod.step``: one time step for decoding; a loop of steps gives what ``forward`` gives over T."""

from __future__ import annotations

import pytest
import torch

import recdsl
from recdsl.errors import BackendError, InputError
from recdsl.testing import Example, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)
from test_varlen import CELLS, _compile  # noqa: E402

TOLERANCE = dict(rtol=1e-10, atol=1e-12)


def _leaves(result) -> list[torch.Tensor]:
    return list(result) if isinstance(result, tuple) else [result]


def _loss(outputs: list[torch.Tensor], final: dict[str, torch.Tensor]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros((), dtype=torch.float64)
    for value in outputs + [final[k] for k in sorted(final)]:
        term = value.real if value.is_complex() else value
        term = term.where(torch.isfinite(term), torch.zeros_like(term))
        total = total + (term * torch.randn(term.shape, generator=generator, dtype=torch.float64)).sum()
    return total


# Cells with states that run backwards in time cannot be decoded step by step (tested below).
BIDIRECTIONAL = {"lion", "bigru", "crf_marginals"}


@pytest.mark.parametrize("with_state", [True, False])
@pytest.mark.parametrize("name", sorted(set(DIMS) - BIDIRECTIONAL) + sorted(CELLS))
def test_a_loop_of_steps_is_the_forward_pass(name, with_state):
    """Outputs, final state and every gradient (inputs, initial state, params) of T = 5 steps, B = 2, one head dim."""
    module = _compile(name)
    inputs, state = random_inputs(module, Example(batch=2, length=5, heads=(2,), seed=1, with_state=with_state))
    inputs = {k: v.detach().requires_grad_(True) for k, v in inputs.items()}
    state = {k: v.detach().requires_grad_(True) for k, v in state.items()} if state is not None else None
    wrt = list(inputs.values()) + (list(state.values()) if state else []) + list(module.parameters())

    outputs, final = module(**inputs, state=state, return_state=True)
    outputs = _leaves(outputs)
    expected = torch.autograd.grad(_loss(outputs, final), wrt, allow_unused=True)

    carried = state
    per_step: list[list[torch.Tensor]] = []
    for t in range(5):
        out, carried = module.step(**{k: v[:, t] for k, v in inputs.items()}, state=carried)
        per_step.append(_leaves(out))
    stepped = [torch.stack([s[i] for s in per_step], 1) for i in range(len(outputs))]
    got = torch.autograd.grad(_loss(stepped, carried), wrt, allow_unused=True)

    for i, (a, b) in enumerate(zip(stepped, outputs)):
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{name}: output {i}: {m}")
    assert set(carried) == set(final)
    for key in final:
        torch.testing.assert_close(carried[key], final[key], **TOLERANCE, msg=lambda m: f"{name}: state {key}: {m}")
    for i, (a, b) in enumerate(zip(got, expected)):
        if b is None:
            assert a is None or not bool(a.abs().max() > 0)
            continue
        torch.testing.assert_close(a, b, **TOLERANCE, msg=lambda m: f"{name}: gradient {i}: {m}")


@pytest.mark.parametrize("backend", ["scan", "chunked", "newton"])
def test_step_agrees_whatever_backend_the_module_runs(backend):
    module = _compile("gla", backend)
    x = {i.name: torch.randn(1, 3, *i.type.shape, dtype=torch.float64) for i in module.cell.inputs}
    expected = module(**x)
    state = None
    for t in range(3):
        out, state = module.step(**{n: value[:, t] for n, value in x.items()}, state=state)
        torch.testing.assert_close(out, expected[:, t], **TOLERANCE)


def test_step_does_not_plan(monkeypatch):
    """Nothing is planned or analysed per call: the loop body is evaluated from the compiled IR."""
    module = recdsl.compile(EXAMPLES / "gru.rec", **DIMS["gru"])

    def forbidden(*args, **kwargs):
        raise AssertionError("planned during step()")

    monkeypatch.setattr("recdsl.plan.plan", forbidden)
    monkeypatch.setattr("recdsl.module.make_plan", forbidden)
    monkeypatch.setattr("recdsl.module.analyze", forbidden)
    out, state = module.step(torch.randn(4, 3))
    out, state = module.step(torch.randn(4, 3), state=state)
    assert out.shape == (4, 4) and state["h"].shape == (4, 4)


def test_step_from_none_is_the_declared_initial_state():
    module = recdsl.compile(EXAMPLES / "crf.rec", **DIMS["crf"])
    x = torch.randn(2, 3)
    torch.testing.assert_close(module.step(x)[0][0], module.step(x, state=module.initial_state(2))[0][0])


def test_step_keeps_low_precision_outputs():
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])
    out, state = module.step(torch.randn(2, 3).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and state["h"].dtype == torch.float32


def test_step_inputs_have_no_time_axis():
    module = recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])
    with pytest.raises(InputError) as caught:
        module.step(torch.randn(3))
    assert str(caught.value) == (
        "input error: input 'x' has shape [3]\n"
        "  expected [B, *heads, 3]: batch (one step: no time axis), optional head dims, then its declared shape [3]"
    )
    with pytest.raises(InputError, match=r"state 'h' has shape \[5, 4\]\n  expected \[2, 4\]"):
        module.step(torch.randn(2, 3), state={"h": torch.zeros(5, 4)})
    # A sequence [B, T, d] is read as B x heads: its state must then have the head dim.
    with pytest.raises(InputError, match=r"state 'h' has shape \[2, 4\]\n  expected \[2, 7, 4\]"):
        module.step(torch.randn(2, 7, 3), state={"h": torch.zeros(2, 4)})


def test_a_state_running_backwards_refuses_to_step():
    """A reverse state's value at a step depends on the steps after it: step() refuses, naming it."""
    assert recdsl.compile(EXAMPLES / "mingru.rec", **DIMS["mingru"])._step_refusal() is None
    module = recdsl.compile(EXAMPLES / "bigru.rec", **DIMS["bigru"])
    with pytest.raises(BackendError) as caught:
        module.step(torch.randn(2, 3))
    assert str(caught.value) == (
        "backend error: step() cannot run one step at a time: state 'g' of cell BiGRU runs backwards in time: "
        "its value at a step depends on the steps after it\n"
        "  expected forward() over the whole sequence"
    )
