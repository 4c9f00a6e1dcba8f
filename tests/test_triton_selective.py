"""The fused selective scan (S6) of the Triton backend (backends/triton_selective.py), in Triton's
interpreter: planned from the IR, against the sequential backend (float64 tight, float32), against
the paper's S6 written as a loop (tests/references.py) and Mamba's own ``selective_scan_ref`` when
mamba_ssm is installed; outputs, final states and every gradient; T = 1, lengths past one block
and past one checkpoint, dims that are not powers of two, heads, a given initial state; and no
kernel argument as large as the state sequence."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.plan import Form
from recdsl.testing import Example, compare_backends, random_inputs

import references as ref  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Not S6's names or layout: a [n] vector broadcast bare (numpy-aligned) in the input, a scalar
# param in the decay, a sigmoid gate on the channel input, a param as a read-out's query, two
# read-outs of the state in two outputs, and an output that does not read the state.
VARIANT = """
cell Variant(c, m) {
    input u: [c]
    input step: [c]
    input key: [m]
    input query: [m]
    param rate: [c, m] = 0.1 * (1 + arange(m))
    param scale: [] = 0.5
    param probe: [m] = ones
    param skip: [c] = ones
    state s: [c, m] = 0
    gate = sigmoid(step)
    s = exp(-(scale * gate[:, None]) * exp(rate)) * s + key * (gate * tanh(u))[:, None]
    out s @ query + skip * u
    out 2.0 * (s @ probe) - u
    out u * u
}
"""


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _s6(**dims) -> recdsl.CompiledCell:
    return recdsl.compile(EXAMPLES / "s6.rec", **dims).double()


def test_s6_is_planned_as_a_fused_selective_scan():
    from recdsl.backends.triton_backend import emit
    from recdsl.backends.triton_selective import Layout, SelectiveScanPlan

    plan = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=5, n=3).plan
    (step,) = plan.steps
    assert step.form is Form.TRITON_SELECTIVE_SCAN and step.fallback is Form.LINEAR_SCAN
    kernel = step.kernel
    assert isinstance(kernel, SelectiveScanPlan)
    assert (kernel.channels, kernel.width, kernel.outputs) == (5, 3, (0,))
    layouts = {(leaf.operand.name, leaf.layout) for leaf in kernel.term_leaves + kernel.output_leaves + kernel.queries}
    assert layouts == {("delta", Layout.CHANNEL), ("x", Layout.CHANNEL), ("B", Layout.STATE), ("C", Layout.STATE), ("A_log", Layout.FULL), ("D", Layout.CHANNEL)}
    source = emit(plan)
    assert "def selective_forward_h(" in source and "def selective_backward_h(" in source
    assert "fused selective scan" in plan.format()


@pytest.mark.parametrize(
    "dims, length, heads",
    [
        (dict(d=5, n=3), 1, ()),
        (dict(d=5, n=3), 37, (2,)),  # two blocks of 32 steps, the second ragged; heads
        (dict(d=2, n=20), 10, ()),  # n = 20: blocks of 4 steps, a checkpoint every 8 blocks (the states between recomputed)
        pytest.param(dict(d=3, n=20), 37, (), marks=pytest.mark.slow),  # two checkpoints
        (dict(d=20, n=4), 5, ()),  # two blocks of 16 channels: dB and dC summed over their partials
    ],
)
def test_matches_sequential_float64(dims, length, heads):
    torch.manual_seed(0)
    module = _s6(**dims)
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=heads, seed=length, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_without_initial_state_and_without_gradients():
    torch.manual_seed(1)
    module = _s6(d=6, n=5)
    triton_module = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=6, n=5).double()
    triton_module.load_state_dict(module.state_dict())
    reference = recdsl.compile(EXAMPLES / "s6.rec", backend="sequential", d=6, n=5).double()
    reference.load_state_dict(module.state_dict())
    inputs, _ = random_inputs(module, Example(batch=3, length=45, heads=(), seed=3, with_state=False))
    with torch.no_grad():
        got, got_state = triton_module(**inputs, return_state=True)
        want, want_state = reference(**inputs, return_state=True)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg="y without a given state, no grad")
    torch.testing.assert_close(got_state["h"], want_state["h"], rtol=1e-10, atol=1e-12, msg="final h")


def _gradients(module, inputs, state):
    leaves = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
    start = {n: v.detach().clone().requires_grad_() for n, v in state.items()}
    module.zero_grad(set_to_none=True)
    y, final = module(**leaves, state=start, return_state=True)
    generator = torch.Generator().manual_seed(5)
    weights = torch.randn(y.shape, generator=generator, dtype=torch.float64), torch.randn(final["h"].shape, generator=generator, dtype=torch.float64)
    loss = (y * weights[0].to(y.dtype)).sum() + (final["h"] * weights[1].to(y.dtype)).sum()
    loss.backward()
    grads = {f"d{n}": v.grad for n, v in leaves.items()} | {f"d{n}": p.grad for n, p in module.named_parameters()} | {"dh0": start["h"].grad}
    return y.detach(), final["h"].detach(), grads


def test_float32_matches_float64_sequential():
    """float32 kernels (float32 accumulation) against the float64 definition, to 1e-4 of each quantity's scale."""
    torch.manual_seed(2)
    reference = recdsl.compile(EXAMPLES / "s6.rec", backend="sequential", d=7, n=6).double()
    kernel = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=7, n=6)
    kernel.load_state_dict(reference.state_dict())
    inputs, state = random_inputs(reference, Example(batch=2, length=20, heads=(), seed=4, with_state=True))
    want = _gradients(reference, inputs, state)
    got = _gradients(kernel, {n: v.float() for n, v in inputs.items()}, {n: v.float() for n, v in state.items()})
    for name, w, g in [("y", want[0], got[0]), ("final h", want[1], got[1])] + [(k, want[2][k], got[2][k]) for k in want[2]]:
        scale = w.abs().max().item() + 1e-30
        error = (g.double() - w).abs().max().item()
        assert error <= 1e-4 * scale, f"{name}: max error {error:.3g} at scale {scale:.3g} (tolerance 1e-4 of scale)"


def test_matches_the_papers_loop_with_every_gradient():
    """Against tests/references.py's S6 (Algorithm 2 written as a loop), float64: y, h_T and the
    gradients of x, delta, B, C, A_log, D and h_0."""
    torch.manual_seed(3)
    d, n, batch, length = 6, 5, 2, 41
    module = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=d, n=n).double()
    with torch.no_grad():
        module.A_log.add_(0.1 * torch.randn(d, n, dtype=torch.float64))
        module.D.add_(0.1 * torch.randn(d, dtype=torch.float64))
    inputs, state = random_inputs(module, Example(batch=batch, length=length, heads=(), seed=9, with_state=True))
    y, h, grads = _gradients(module, inputs, state)
    leaves = {n: v.detach().clone().requires_grad_() for n, v in inputs.items()}
    A_log, D = module.A_log.detach().clone().requires_grad_(), module.D.detach().clone().requires_grad_()
    h0 = state["h"].detach().clone().requires_grad_()
    y_ref, final = ref.s6(leaves["x"], leaves["delta"], leaves["B"], leaves["C"], A_log, D, {"h": h0})
    generator = torch.Generator().manual_seed(5)
    loss = (y_ref * torch.randn(y_ref.shape, generator=generator, dtype=torch.float64)).sum() + (final["h"] * torch.randn(final["h"].shape, generator=generator, dtype=torch.float64)).sum()
    loss.backward()
    expected = {f"d{k}": v.grad for k, v in leaves.items()} | {"dA_log": A_log.grad, "dD": D.grad, "dh0": h0.grad}
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-12, msg="y")
    torch.testing.assert_close(h, final["h"].detach(), rtol=1e-10, atol=1e-12, msg="h_T")
    for name, value in expected.items():
        torch.testing.assert_close(grads[name], value, rtol=1e-9, atol=1e-11, msg=f"gradient {name}")


def _mamba_selective_scan_ref(monkeypatch):
    """mamba_ssm's ``selective_scan_ref``, imported without its CUDA extension (a stub stands in)
    and without the package's ``__init__`` (which imports the models and their dependencies)."""
    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None or importlib.util.find_spec("einops") is None:
        pytest.skip("mamba_ssm (and einops) are not installed: MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE pip install --no-deps --no-build-isolation mamba-ssm")
    package = types.ModuleType("mamba_ssm")
    package.__path__ = list(spec.submodule_search_locations)
    monkeypatch.setitem(sys.modules, "mamba_ssm", package)
    monkeypatch.setitem(sys.modules, "selective_scan_cuda", types.ModuleType("selective_scan_cuda"))
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_ref
    except Exception as error:  # pragma: no cover - another mamba_ssm's imports
        pytest.skip(f"mamba_ssm's selective_scan_ref does not import here: {error}")
    return selective_scan_ref


def test_matches_mambas_selective_scan_ref(monkeypatch):
    selective_scan_ref = _mamba_selective_scan_ref(monkeypatch)
    torch.manual_seed(4)
    d, n = 5, 4
    module = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=d, n=n).double()
    inputs, _ = random_inputs(module, Example(batch=2, length=33, heads=(), seed=11, with_state=False))
    y, state = module(**inputs, return_state=True)
    # mamba's layout: u, delta [B, d, T]; A [d, n]; B, C [B, n, T].  selective_scan_ref computes
    # in float32 whatever it is given, so it gets float32 and is compared at float32 tolerances.
    t = lambda v: v.transpose(1, 2).float()  # noqa: E731
    y_ref, last = selective_scan_ref(
        t(inputs["x"]), t(inputs["delta"]), -torch.exp(module.A_log.detach()).float(), t(inputs["B"]), t(inputs["C"]), module.D.detach().float(),
        delta_softplus=True, return_last_state=True,
    )
    torch.testing.assert_close(y.detach().float(), y_ref.transpose(1, 2), rtol=1e-5, atol=1e-6, msg="y against mamba_ssm's selective_scan_ref")
    torch.testing.assert_close(state["h"].detach().float(), last, rtol=1e-5, atol=1e-6, msg="h_T against mamba_ssm's selective_scan_ref")


def test_a_variant_with_other_names_broadcasts_and_outputs():
    """The pattern is recognised from the IR, not from S6's names: see VARIANT."""
    module = recdsl.compile(VARIANT, c=6, m=5).double()
    plan = recdsl.compile(VARIANT, backend="triton", c=6, m=5).plan
    (step,) = plan.steps
    assert step.form is Form.TRITON_SELECTIVE_SCAN
    assert step.kernel.outputs == (0, 1)  # the third output does not read the state: torch computes it
    for length in (9,):
        inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(2,), seed=length, with_state=True))
        mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
        assert not mismatches, "\n".join(map(str, mismatches))


S6_UPDATE = "h = exp(dt[:, None] * -exp(A_log)) * h + (dt * x)[:, None] * B[None, :]"


@pytest.mark.parametrize(
    "update, outputs, reason",
    [
        (S6_UPDATE, "out h @ C\n    out sum(h)", "not a real [d] vector"),
        (S6_UPDATE, "out h @ C + h[:, 0]", "other than by h @ q"),
        (S6_UPDATE, "out (h * h) @ C", "no output reads it by h @ q"),
        ("h = exp(dt[:, None] * -exp(A_log)) * h + (dt * x)[:, None] * B[None, :] * B[None, :] @ A_log.T @ A_log", "out h @ C", "not an outer-product broadcast"),
    ],
)
def test_cells_outside_the_pattern_keep_the_scan(update, outputs, reason):
    from recdsl.backends import triton_selective

    source = f"""
cell Near(d, n) {{
    input x: [d]
    input delta: [d]
    input B: [n]
    input C: [n]
    param A_log: [d, n] = zeros
    state h: [d, n] = 0
    dt = softplus(delta)
    {update}
    {outputs}
}}
"""
    module = recdsl.compile(source, backend="triton", d=3, n=2)
    analysis = module.analysis
    refused = triton_selective.selective_plan(analysis, analysis.state("h"))
    assert isinstance(refused, triton_selective.Unsupported) and reason in refused.reason, refused
    assert all(step.form is not Form.TRITON_SELECTIVE_SCAN for step in module.plan.steps)


def test_no_kernel_argument_is_as_large_as_the_state_sequence():
    """Forward and backward at B = 2, T = 300, d = 48, n = 16: every tensor a kernel reads or
    writes is smaller than one [B, T, d, n] state sequence (the checkpoints are 1/32 of it)."""
    from recdsl.backends.triton_launch import observe_launches

    batch, length, d, n = 2, 300, 48, 16
    module = recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=d, n=n)
    inputs = {i.name: torch.randn(batch, length, *i.type.shape, requires_grad=True) for i in module.cell.inputs}
    with observe_launches(run_kernels=False) as launches:
        y = module(**inputs)
        y.backward(torch.ones_like(y))
    assert [launch.name for launch in launches] == ["selective_forward_h", "selective_backward_h"]
    sequence = batch * length * d * n
    for launch in launches:
        for argument in launch.args:
            if isinstance(argument, torch.Tensor):
                assert argument.numel() * 8 <= sequence, f"{launch.name}: an argument of {tuple(argument.shape)} ({argument.numel()} elements; the state sequence has {sequence})"
