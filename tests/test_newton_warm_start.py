"""The newton backend's warm start: the previous call's solution as the initial guess.

Same result as a cold start (and as the sequential definition), fewer iterations when
consecutive calls solve nearby systems; a call of another shape starts cold.
"""

from __future__ import annotations

import pytest
import torch

import recdsl

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)


def _modules(name: str, dtype: torch.dtype, **dims):
    torch.manual_seed(0)
    warm = recdsl.compile(EXAMPLES / f"{name}.rec", backend="newton", backend_options={"warm_start": True}, **dims).to(dtype)
    cold = recdsl.compile(EXAMPLES / f"{name}.rec", backend="newton", **dims).to(dtype)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **dims).to(dtype)
    return warm, cold, sequential


def _nudge(module, scale: float, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator, dtype=param.dtype))


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize("name", ["paragru", "gru"])
def test_warm_start_after_a_small_parameter_step_takes_fewer_iterations_and_agrees(name, dtype, tolerance):
    warm, cold, sequential = _modules(name, dtype, d_in=3, d=5)
    x = torch.randn(2, 200, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    warm(x)
    assert not warm.last_solve.warm_started and warm.last_solve.trajectory is not None
    _nudge(warm, 1e-3, seed=2)  # an optimiser step
    cold.load_state_dict(warm.state_dict())
    sequential.load_state_dict(warm.state_dict())
    xs = [x.clone().requires_grad_() for _ in range(3)]
    outputs = [module(inp) for module, inp in zip((warm, cold, sequential), xs)]
    assert warm.last_solve.warm_started and warm.last_solve.converged
    assert warm.last_solve.iterations < cold.last_solve.iterations, (warm.last_solve, cold.last_solve)
    weights = torch.randn(outputs[0].shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    for module, output in zip((warm, cold, sequential), outputs):
        module.zero_grad()
        (output * weights).sum().backward()
    outputs = [o.detach() for o in outputs]
    scale = outputs[2].abs().max()
    for output in outputs[:2]:
        assert float((output - outputs[2]).abs().max() / scale) <= tolerance
    for inp in xs[:2]:
        assert float((inp.grad - xs[2].grad).abs().max() / xs[2].grad.abs().max()) <= tolerance
    for (label, param), (_, expected) in zip(warm.named_parameters(), sequential.named_parameters()):
        assert float((param.grad - expected.grad).abs().max() / expected.grad.abs().max().clamp_min(1e-30)) <= tolerance, label


def test_the_same_call_again_needs_no_iteration():
    warm, _, _ = _modules("paragru", torch.float64, d_in=3, d=4)
    x = torch.randn(2, 64, 3, dtype=torch.float64)
    first = warm(x)
    second = warm(x)
    assert warm.last_solve.warm_started and warm.last_solve.iterations == 0
    torch.testing.assert_close(first, second, rtol=1e-12, atol=1e-12)


def test_another_shape_or_dtype_starts_cold():
    warm, _, _ = _modules("paragru", torch.float64, d_in=3, d=4)
    warm(torch.randn(2, 64, 3, dtype=torch.float64))
    warm(torch.randn(2, 65, 3, dtype=torch.float64))
    assert not warm.last_solve.warm_started
    warm(torch.randn(3, 65, 3, dtype=torch.float64))
    assert not warm.last_solve.warm_started
    warm.float()
    warm(torch.randn(3, 65, 3))
    assert not warm.last_solve.warm_started


def test_without_the_option_nothing_is_kept():
    _, cold, _ = _modules("paragru", torch.float64, d_in=3, d=4)
    x = torch.randn(2, 16, 3, dtype=torch.float64)
    cold(x)
    cold(x)
    assert not cold.last_solve.warm_started and cold.last_solve.trajectory is None


def test_warm_start_must_be_a_bool():
    module = recdsl.compile(EXAMPLES / "paragru.rec", backend="newton", backend_options={"warm_start": "yes"}, d_in=3, d=4)
    with pytest.raises(recdsl.BackendError, match="warm_start must be True or False"):
        module(torch.randn(1, 3, 3))
