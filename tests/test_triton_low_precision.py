"""bfloat16 and float16 through ``recdsl.compile(..., backend="triton")``, in Triton's interpreter.

The Triton plan takes low-precision inputs and params as they are
(:attr:`recdsl.plan.LowPrecisionInputs.NATIVE`): the kernels convert them to the float32
accumulator as they load them.  Checked here on a diagonal cell (minGRU), the fused selective
scan (S6), a chunked cell (GLA) and the delta rule (DeltaNet), forward and backward, against
the float64 sequential loop run on the same (already rounded) inputs and params, with
tolerances derived from where the kernels round (below); and that no float32 copy of an
input is made unless torch code between the kernels reads it.

Tolerances.  ``u`` is the unit roundoff of the low dtype (round to nearest: bfloat16 keeps 8
significant bits, ``u = 2^-8``; float16 11, ``u = 2^-11``); ``eps = 2^-24`` is float32's.  The
reference is exact for our purpose (float64), and its inputs are the rounded ones, so the
only errors are the kernels':

- every output and every gradient is computed in float32 and rounded to its tensor's dtype
  once at the end: at most ``u |ref|`` per element;
- float32 accumulation over a chunk or a block of steps: a few dozen roundings of ``eps``
  relative to the scale of the terms summed, at most ``64 eps`` of ``max |ref|`` at these sizes;
- with bfloat16 inputs the chunked kernels feed ``tl.dot`` bfloat16 operands (scaled queries
  and keys, chunk states, scores and their gradients; :func:`recdsl.backends.triton_chunk._dot`),
  each rounded once: every term of a read-out or gradient is a product of at most
  ``DOT_ROUNDINGS`` such factors, each off by at most ``u``, so the sum is off by at most
  ``DOT_ROUNDINGS u`` times the sum of the terms' magnitudes.  That sum is the same quantity
  computed with every sign made positive (``|q|, |k|, |v|, |dy|`` and the same decays: the
  decay factors and their derivatives are nonnegative), which the float64 loop gives.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import recdsl
from recdsl.plan import LowPrecisionInputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LOW = {"bfloat16": torch.bfloat16, "float16": torch.float16}
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
FLOAT32_ACCUMULATION = 64 * 2.0**-24
# bfloat16 tl.dot operands: the forward's terms pass q e^G, k e^-G (or the chunk state, itself
# summed from rounded scaled keys) and the scores; the backward's add the rounded gradient
# tiles (dA, the state gradients): at most five rounded factors per term.
DOT_ROUNDINGS = 5

# minGRU after its projections: the gate pre-activations and the candidates are inputs, so the
# scan kernel reads them directly (no torch code reads them).
MINGRU_GATES = """
cell MinGRUGates(d) {
    input zp: [d]
    input hc: [d]
    state h: [d] = 0
    z = sigmoid(zp)
    h = (1 - z) * h + z * hc
    out h
}
"""

# Source, dims, and steps: two blocks of 32 steps for the scan kernels, two chunks of 64 (the
# second ragged) for the chunked and delta-rule kernels.
CELLS = {
    "mingru": (EXAMPLES / "mingru.rec", dict(d_in=3, d=4), 37),
    "s6": (EXAMPLES / "s6.rec", dict(d=3, n=4), 37),
    "gla": (EXAMPLES / "gla.rec", dict(dk=20, dv=12), 70),
    "deltanet": (EXAMPLES / "deltanet.rec", dict(dk=4, dv=3), 70),
    "mingru_gates": (MINGRU_GATES, dict(d=5), 37),
}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _module(name: str, dtype: torch.dtype, backend: str = "triton"):
    source, dims, _ = CELLS[name]
    torch.manual_seed(3)
    module = recdsl.compile(source, backend=backend, **dims)
    return module.to(dtype)


def _inputs(module, dtype: torch.dtype, steps: int) -> dict[str, torch.Tensor]:
    """Inputs ``[B, steps, 2 heads, ...]`` rounded to ``dtype`` (unit-norm keys for the delta rule,
    as the cell expects); B = 2, or 1 past one chunk of steps (the interpreter is slow)."""
    generator = torch.Generator().manual_seed(7)
    values = {}
    batch = 2 if steps <= 64 else 1
    for declared in module.cell.inputs:
        value = torch.randn((batch, steps, 2) + declared.type.shape, generator=generator, dtype=torch.float64)
        if module.cell.name == "DeltaNet" and declared.name == "k":
            value = torch.nn.functional.normalize(value, dim=-1)
        values[declared.name] = value.to(dtype)
    return values


def _run(module, inputs: dict[str, torch.Tensor], output_weight: torch.Tensor, absolute: bool = False):
    """Outputs and the gradients of ``sum(output * weight)`` with respect to every input and param,
    by name.  ``absolute`` (GLA): with ``|q|, |k|, |v|, |weight|`` and the same gates ``g``, the sum
    of the magnitudes of the terms of each quantity."""
    leaves = {n: (v.abs() if absolute and n != "g" else v).detach().clone().requires_grad_() for n, v in inputs.items()}
    params = dict(module.named_parameters())
    output = module(**leaves)
    weight = output_weight.abs() if absolute else output_weight
    grads = torch.autograd.grad((output * weight.to(output.dtype)).sum(), [*leaves.values(), *params.values()])
    quantities = {"output": output}
    quantities.update({f"gradient of {n}": g for n, g in zip([*leaves, *params], grads)})
    return quantities


def _gla_magnitudes(inputs: dict[str, torch.Tensor], weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """For each quantity of GLA, the sum of the magnitudes of the terms the kernels add up.

    The output and the gradients of q, k, v: the float64 loop on ``|q|, |k|, |v|, |weight|``
    (every term made positive).  The log decays' gradient is formed from the others as
    ``dG_r = sum_{t >= r} (q_t dq_t - k_t dk_t)`` (per key), whose terms are bounded by the same
    reverse sum of ``|q| |dq| + |k| |dk|``; then times ``d(logsigmoid(g) / 16)/dg = (1 - sigmoid(g)) / 16``.
    """
    values = {n: v.double() for n, v in inputs.items()}
    magnitudes = _run(_module("gla", torch.float64, backend="sequential"), values, weight.double(), absolute=True)
    per_step = values["q"].abs() * magnitudes["gradient of q"] + values["k"].abs() * magnitudes["gradient of k"]
    reverse_sums = per_step.flip(1).cumsum(1).flip(1)
    magnitudes["gradient of g"] = reverse_sums * (1 - torch.sigmoid(values["g"])) / 16
    return magnitudes


# By default each kernel family in the dtype whose path differs in the interpreter: GLA in
# bfloat16 (bfloat16 tl.dot operands), the delta rule in float16 (its bfloat16 keys are widened
# to float32 there, see triton_delta._BFLOAT16_DOT); the other combinations are slow tests.
SLOW = pytest.mark.slow
CASES = [
    ("mingru", "bfloat16"), ("mingru", "float16"),
    ("s6", "bfloat16"), pytest.param("s6", "float16", marks=SLOW),
    ("gla", "bfloat16"), pytest.param("gla", "float16", marks=SLOW),
    ("deltanet", "float16"), pytest.param("deltanet", "bfloat16", marks=SLOW),
]


@pytest.mark.parametrize("name, dtype", CASES)
def test_low_precision_inputs_against_the_float64_loop(name, dtype):
    """Outputs and every gradient (inputs and params, all in ``dtype``) within the derived bound
    of the float64 loop on the same values; outputs and gradients come back in ``dtype`` and the
    final states in float32."""
    check_against_float64_loop(name, LOW[dtype], "cpu")


def check_against_float64_loop(name: str, dtype: torch.dtype, device: str) -> None:
    """The body of the test above, on ``device`` (tests/test_gpu.py runs it on CUDA)."""
    module = _module(name, dtype).to(device)
    assert module.plan.for_device(device).low_precision is LowPrecisionInputs.NATIVE
    inputs = _inputs(module, dtype, CELLS[name][2])
    reference = _module(name, torch.float64, backend="sequential")
    reference.load_state_dict({n: v.double().cpu() for n, v in module.state_dict().items()})
    output, state = module(**{n: v.to(device) for n, v in inputs.items()}, return_state=True)
    assert output.dtype == dtype and all(v.dtype == torch.float32 for v in state.values()), (output.dtype, {n: v.dtype for n, v in state.items()})
    weight = torch.randn(output.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    actual = {n: v.cpu() for n, v in _run(module, {n: v.to(device) for n, v in inputs.items()}, weight.to(device)).items()}
    expected = _run(reference, {n: v.double() for n, v in inputs.items()}, weight.double())
    dot_roundings = DOT_ROUNDINGS if (name == "gla" and dtype == torch.bfloat16) else 0
    magnitudes = _gla_magnitudes(inputs, weight) if dot_roundings else None
    u = UNIT_ROUNDOFF[dtype]
    failures = []
    for quantity, value in actual.items():
        wanted = dict(module.named_parameters()).get(quantity.removeprefix("gradient of "), inputs.get(quantity.removeprefix("gradient of ")))
        if quantity != "output" and value.dtype != wanted.dtype:
            failures.append(f"{quantity}: {value.dtype}, not {wanted.dtype}")
        reference_value = expected[quantity]
        bound = u * reference_value.abs() + FLOAT32_ACCUMULATION * reference_value.abs().max()
        if dot_roundings:
            bound = bound + dot_roundings * u * magnitudes[quantity].abs()
        excess = (value.double() - reference_value).abs() - bound
        if excess.max() > 0:
            failures.append(f"{quantity}: off by up to {(value.double() - reference_value).abs().max():.3g} at scale {reference_value.abs().max():.3g}, beyond the bound by {excess.max():.3g}")
    assert not failures, "\n".join(failures)


class _Conversions(TorchDispatchMode):
    """Records the element counts of bfloat16/float16 tensors converted to float32 or float64."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        name = func._schema.name.split("::")[-1].split(".")[0]
        if name in ("_to_copy", "copy_"):
            source, target = (args[0], result) if name == "_to_copy" else (args[1], args[0])
            low = isinstance(source, torch.Tensor) and source.dtype in (torch.bfloat16, torch.float16)
            if low and isinstance(target, torch.Tensor) and target.dtype in (torch.float32, torch.float64):
                self.sizes.append(target.numel())
        return result


@pytest.mark.parametrize(
    "name, dtype, read_by_torch",
    [
        ("mingru_gates", torch.bfloat16, []),
        ("s6", torch.bfloat16, []),
        ("gla", torch.bfloat16, ["g"]),  # the log decay logsigmoid(g) / 16 is computed in torch
        ("mingru", torch.bfloat16, ["x"]),  # x @ W_z and x @ W_h are torch matmuls
        # The delta rule in float16: in the interpreter its bfloat16 keys are widened to float32
        # before the kernels (Triton 3.9's interpreter multiplies bfloat16 tiles as raw bits).
        ("deltanet", torch.float16, ["b"]),  # beta = 2 sigmoid(b) is computed in torch
    ],
)
def test_no_float32_copy_of_inputs_the_kernels_read(name, dtype, read_by_torch):
    """Forward: the only per-step low-precision tensors converted to float32 are the inputs torch
    code reads (once each).  Backward: only the output's gradient, by the cast of the float32
    result to the output dtype.  (A module casting every input first converts all of them.)"""
    module = _module(name, dtype)
    steps = 37  # one chunk is enough: the conversions do not depend on the length
    inputs = {n: v.requires_grad_() for n, v in _inputs(module, dtype, steps).items()}
    per_step = 2 * steps  # B x T: any tensor with fewer elements is a param or a state
    forward = _Conversions()
    with forward:
        output = module(**inputs)
    backward = _Conversions()
    with backward:
        output.backward(torch.ones_like(output))
    converted = sorted(n for n in forward.sizes if n >= per_step)
    assert converted == sorted(inputs[n].numel() for n in read_by_torch), (converted, {n: v.numel() for n, v in inputs.items()})
    assert [n for n in backward.sizes if n >= per_step] == [output.numel()], backward.sizes


def test_packed_sequences_and_other_backends_cast_first():
    """Only the Triton plan takes low-precision values as they are; the others (and packed
    batches) run on float32 copies, and every backend returns the same dtypes."""
    for backend in ("sequential", "scan", "chunked"):
        module = _module("gla", torch.bfloat16, backend=backend)
        assert module.plan.low_precision is LowPrecisionInputs.UPCAST
        inputs = _inputs(module, torch.bfloat16, steps=5)
        output, state = module(**inputs, return_state=True)
        assert output.dtype == torch.bfloat16 and state["S"].dtype == torch.float32
    module = _module("mingru_gates", torch.bfloat16)
    inputs = {n: v[:1] for n, v in _inputs(module, torch.bfloat16, steps=9).items()}
    offsets = torch.tensor([0, 4, 9])
    packed, state = module(**inputs, cu_seqlens=offsets, return_state=True)
    reference = _module("mingru_gates", torch.float64, backend="sequential")
    expected = reference(**{n: v.double() for n, v in inputs.items()}, cu_seqlens=offsets)
    assert packed.dtype == torch.bfloat16 and state["h"].dtype == torch.float32
    torch.testing.assert_close(packed.double(), expected, rtol=UNIT_ROUNDOFF[torch.bfloat16], atol=1e-6)
