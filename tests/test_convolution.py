"""The convolution form of time-invariant recurrences (plan.ConvPlan, backends/convolution.py).

Every cell here runs on the ``chunked`` backend (whose plan takes the convolution for a
state with a time-invariant decay) and is compared with the sequential loop, outputs,
final states and gradients, in float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import recdsl
import recdsl.backends.convolution as convolution
from recdsl.plan import Form

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)

S4D = EXAMPLES / "s4d.rec"

# A real diagonal SSM (S4D-real), read out by a vector and by a matrix.
REAL_SSM = """
cell RealSSM(d, n, k) {
    input x: [d]
    input g: [d]
    param A_log: [d, n] = log(1 + arange(n))
    param B: [d, n] = normal(1.0)
    param c: [n] = normal(1.0)
    param W: [n, k] = normal(1.0)
    state h: [d, n] = 0
    h = exp(-0.1 * exp(A_log)) * h + B * (x * g)[:, None]
    out h @ c
    out sum(h @ W, -1) - 2 * (h @ c)
}
"""

# A decay that may be negative (an oscillating mode), or above 1 in modulus.
SIGNED_DECAY = """
cell Signed(d, n) {
    input x: [d]
    param a: [d, n] = normal(0.5)
    param C: [d, n] = normal(1.0)
    state h: [d, n] = 0
    h = a * h + x[:, None]
    out sum(C * h, -1)
}
"""


def _pair(source, **dims):
    torch.manual_seed(0)
    sequential = recdsl.compile(source, backend="sequential", **dims).double()
    chunked = recdsl.compile(source, backend="chunked", **dims).double()
    chunked.load_state_dict(sequential.state_dict())
    return sequential, chunked


def _inputs(module, batch, length, heads=(), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn((batch, length, *heads, *i.type.shape), generator=generator, dtype=torch.float64, requires_grad=True) for i in module.cell.inputs]


def _agree(sequential, chunked, inputs, state=None, atol=1e-10):
    expected, expected_state = sequential(*inputs, state=state, return_state=True)
    got, got_state = chunked(*inputs, state=state, return_state=True)
    expected = expected if isinstance(expected, tuple) else (expected,)
    got = got if isinstance(got, tuple) else (got,)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=atol, rtol=1e-8)
    for name in expected_state:
        torch.testing.assert_close(got_state[name], expected_state[name], atol=atol, rtol=1e-8)
    loss_expected = sum((e * torch.linspace(-1, 1, e.shape[1], dtype=e.dtype)[None, :, *([None] * (e.dim() - 2))]).sum() for e in expected)
    loss_got = sum((g * torch.linspace(-1, 1, g.shape[1], dtype=g.dtype)[None, :, *([None] * (g.dim() - 2))]).sum() for g in got)
    leaves_e = list(inputs) + list(sequential.parameters())
    leaves_g = list(inputs) + list(chunked.parameters())
    for ge, gg in zip(torch.autograd.grad(loss_expected, leaves_e), torch.autograd.grad(loss_got, leaves_g)):
        torch.testing.assert_close(gg, ge, atol=1e-8, rtol=1e-6)


def test_s4d_plans_a_convolution():
    module = recdsl.compile(S4D, backend="chunked", d=3, N=4)
    step = module.plan.step("h")
    assert step.form is Form.CONVOLUTION and step.fallback is Form.LINEAR_SCAN
    text = module.plan.format()
    assert "causal convolution" in text and "driven by x[:, None] with coefficient dB" in text


def test_auto_takes_the_convolution_where_the_state_is_larger_than_the_output():
    """The cost model's choice at the benchmark's dims (N = 64 modes per channel), not a timing."""
    assert recdsl.compile(S4D, d=256, N=64).plan.step("h").form is Form.CONVOLUTION
    lru = recdsl.compile(EXAMPLES / "lru.rec", backend="chunked", d=3, n=4)  # its read-out mixes the driven modes
    assert lru.plan.step("h").form is Form.LINEAR_SCAN


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    batch=st.integers(1, 3),
    length=st.sampled_from([1, 2, 7, 63, 64, 65, 100, 129]),
    heads=st.sampled_from([(), (2,)]),
    with_state=st.booleans(),
)
def test_property_s4d_convolution_equals_the_loop(batch, length, heads, with_state):
    sequential, chunked = _pair(S4D, d=3, N=4)
    inputs = _inputs(sequential, batch, length, heads, seed=length)
    state = None
    if with_state:
        generator = torch.Generator().manual_seed(1)
        shape = (batch, *heads, 3, 4)
        state = {"h": torch.complex(torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(shape, generator=generator, dtype=torch.float64))}
    _agree(sequential, chunked, inputs, state)


@pytest.mark.parametrize("length", [1, 40, 150])
def test_real_state_read_out_by_vector_and_matrix(length):
    sequential, chunked = _pair(REAL_SSM, d=3, n=5, k=2)
    assert chunked.plan.step("h").form is Form.CONVOLUTION
    generator = torch.Generator().manual_seed(2)
    state = {"h": torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)}
    _agree(sequential, chunked, _inputs(sequential, 2, length), state)


@pytest.mark.parametrize("length", [5, 90])
def test_negative_decays_oscillate_exactly(length):
    sequential, chunked = _pair(SIGNED_DECAY, d=3, n=4)
    with torch.no_grad():
        sequential.a.copy_(torch.tensor([-0.9, 0.3, -0.2, 1.0]).expand(3, 4))
        chunked.a.copy_(sequential.a)
    _agree(sequential, chunked, _inputs(sequential, 2, length))


def test_unstable_decay_and_infinite_inputs_fall_back_to_the_scan():
    sequential, chunked = _pair(SIGNED_DECAY, d=2, n=3)
    with torch.no_grad():
        sequential.a.fill_(1.05)
        chunked.a.copy_(sequential.a)
    _agree(sequential, chunked, _inputs(sequential, 2, 80))  # |decay| > 1: the FFT would swamp the early outputs
    with torch.no_grad():
        sequential.a.fill_(0.5)
        chunked.a.copy_(sequential.a)
    x = torch.randn(1, 80, 2, dtype=torch.float64)
    x[0, 3, 1] = float("inf")
    torch.testing.assert_close(chunked(x), sequential(x), equal_nan=True)


def test_zero_decay_has_finite_gradients():
    sequential, chunked = _pair(SIGNED_DECAY, d=2, n=3)
    with torch.no_grad():
        sequential.a.zero_()
        chunked.a.zero_()
    _agree(sequential, chunked, _inputs(sequential, 2, 70))


def test_float32_and_bfloat16_inputs_at_length_4096():
    """FFT rounding is relative to the largest term; against the float64 loop (scan) it stays small."""
    torch.manual_seed(0)
    chunked = recdsl.compile(S4D, backend="chunked", d=4, N=8)
    scan = recdsl.compile(S4D, backend="scan", d=4, N=8).double()
    scan.load_state_dict(chunked.state_dict())
    x = torch.randn(2, 4096, 4)
    expected = scan(x.double())
    scale = expected.abs().max()
    assert (chunked(x).double() - expected).abs().max() < 1e-4 * scale
    low = chunked(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert (low.double() - scan(x.bfloat16().double())).abs().max() < 2e-2 * scale


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_the_state_sequence_is_never_built(monkeypatch):
    """With blocks of 4096 lag-state elements, no tensor comes near the [B, T, d, N] states."""
    monkeypatch.setattr(convolution, "BLOCK_ELEMENTS", 4096)
    module = recdsl.compile(S4D, backend="chunked", d=8, N=32)
    batch, length = 4, 512
    x = torch.randn(batch, length, 8)
    state_sequence = batch * length * 8 * 32
    with _LargestTensor() as spy:
        module(x).sum().backward()
    assert spy.largest <= state_sequence // 8, (spy.largest, state_sequence)
    scan = recdsl.compile(S4D, backend="scan", d=8, N=32)
    with _LargestTensor() as spy:
        scan(x)
    assert spy.largest >= state_sequence  # the measure sees the scan's state sequence


@pytest.mark.parametrize(
    "body, reason",
    [
        ("h = a * h + x[:, None] * x[None, :]\n    out sum(C * h, -1)", "varies along every axis"),
        ("h = a * h + x[:, None]\n    out sum(C * h, 0)", "sums over an axis along which its input varies"),
        ("h = a * h + x[:, None]\n    out sum(x[:, None] * h, -1)", "varies in time"),
        ("out sum(C * h, -1)\n    h = a * h + x[:, None]", "previous value"),
        ("h = a * h + x[:, None]\n    out 2 * h", "as large as the state"),
    ],
)
def test_refusals_name_the_reason(body, reason):
    source = f"""
cell R(d, n) {{
    input x: [d]
    param a: [d, n] = 0.5
    param C: [d, n] = normal(1.0)
    state h: [d, n] = 0
    {body}
}}
"""
    module = recdsl.compile(source, backend="chunked", d=3, n=3)
    step = module.plan.step("h")
    assert step.form is not Form.CONVOLUTION
    reasons = [r.reason for r in step.rejected if r.form is Form.CONVOLUTION]
    assert reasons and reason in reasons[0], step.rejected


def test_time_varying_decays_are_not_considered():
    module = recdsl.compile(EXAMPLES / "s6.rec", backend="chunked", d=3, n=4)
    assert all(r.form is not Form.CONVOLUTION for r in module.plan.step("h").rejected)


def test_the_kernel_is_the_impulse_response():
    """The cell's response to a unit impulse at t = 0 is the kernel K (plus the skip D at t = 0)."""
    torch.manual_seed(0)
    module = recdsl.compile(S4D, backend="chunked", d=3, N=4).double()
    impulse = torch.zeros(1, 50, 3, dtype=torch.float64)
    impulse[0, 0] = 1
    response = module(impulse)[0]  # [T, d]
    A = torch.complex(-torch.exp(module.A_log), module.A_im)
    dtA = torch.exp(module.log_dt)[:, None] * A
    dB = (torch.exp(dtA) - 1) / A
    C = torch.complex(module.C_re, module.C_im)
    lags = torch.arange(50, dtype=torch.float64)
    K = 2 * (C * dB * torch.exp(dtA[..., None] * lags).movedim(-1, 0)).sum(-1).real  # [T, d]
    K[0] = K[0] + module.D
    torch.testing.assert_close(response, K.detach(), atol=1e-12, rtol=1e-10)
    assert math.isfinite(float(response.detach().abs().max()))
