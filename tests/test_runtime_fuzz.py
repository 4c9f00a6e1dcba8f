"""The runtime fuzzer: random calls of every example on every backend against the sequential loop.

Hypothesis draws the cell, the backend, B, T, head dims, the dtype, the chunk size, inputs
with NaN and +-inf planted in them, the state dict (none, every key, some keys, values
without the batch dims) and the device (cpu, or meta, which every backend must refuse with an
InputError).  The rule for values that are not finite (issue 8, item 10): wherever the
sequential loop gives a number or +-inf, every backend gives the same (numbers within the
tolerance, infinities exactly); where the loop gives NaN, nothing is required.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.testing import available_backends

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

SPECIALS = (float("inf"), float("-inf"), float("nan"))


@dataclass(frozen=True)
class Call:
    """One drawn call: everything needed to rebuild it (Hypothesis prints it on a failure)."""

    batch: int
    length: int
    heads: tuple[int, ...]
    dtype: torch.dtype
    seed: int
    plants: tuple[tuple[float, float, float], ...]  # (position in [0, 1), fraction of the last axis, value)
    state: str  # none | full | partial | unbatched


def _draw_tensor(shape, complex_, dtype, generator, scale=0.5):
    real = scale * torch.randn(shape, generator=generator, dtype=torch.float64)
    if complex_:
        return torch.complex(real, scale * torch.randn(shape, generator=generator, dtype=torch.float64)).to(
            torch.complex128 if dtype == torch.float64 else torch.complex64
        )
    return real.to(dtype)


def _plant(value: torch.Tensor, plants) -> torch.Tensor:
    """Put each planted special value at its (time step, last-axis element), every batch row."""
    value = value.clone()
    steps = value.shape[1]
    for position, fraction, special in plants:
        t = int(position * steps)
        flat = value[:, t].reshape(value.shape[0], -1).clone()
        index = int(fraction * flat.shape[1])
        flat[:, index] = special
        value[:, t] = flat.reshape(value[:, t].shape)
    return value


def _make_call(module: recdsl.CompiledCell, call: Call, planted: set[str] | None = None):
    generator = torch.Generator().manual_seed(call.seed)
    inputs = {}
    for declared in module.cell.inputs:
        shape = (call.batch, call.length, *call.heads, *declared.type.shape)
        value = _draw_tensor(shape, declared.type.kind.value == "complex", call.dtype, generator)
        if (planted is None or declared.name in planted) and not value.is_complex():
            value = _plant(value, call.plants)
        inputs[declared.name] = value
    state = None
    if call.state != "none":
        start = module.initial_state(call.batch, *call.heads, dtype=call.dtype)
        keys = sorted(start)
        if call.state == "partial":
            keys = keys[: max(1, len(keys) // 2)]
        state = {}
        for name in keys:
            value = start[name]
            noise = _draw_tensor(tuple(value.shape), value.is_complex(), call.dtype, generator)
            noise = torch.where(torch.isinf(value), value, noise) if not value.is_complex() else noise
            state[name] = noise[(0,) * (1 + len(call.heads))].clone() if call.state == "unbatched" else noise
    return inputs, state


def _results(module, inputs, state):
    with torch.no_grad():
        outputs, final = module(**inputs, state=state, return_state=True)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    named = {f"output {i}": o for i, o in enumerate(outputs)}
    named.update({f"final state {k}": v for k, v in final.items()})
    return named


def assert_matches_where_defined(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor], rtol: float, atol: float, what: str) -> None:
    """Where ``expected`` is a number or +-inf, ``actual`` is the same; NaN in ``expected`` allows anything."""
    assert expected.keys() == actual.keys(), what
    for quantity, reference in expected.items():
        value = actual[quantity]
        assert value.shape == reference.shape and value.dtype == reference.dtype, f"{what}: {quantity} is {value.dtype}{list(value.shape)}, expected {reference.dtype}{list(reference.shape)}"
        parts = [(reference.real, value.real), (reference.imag, value.imag)] if reference.is_complex() else [(reference, value)]
        for ref, val in parts:
            defined = ~torch.isnan(ref)
            infinite = torch.isinf(ref)
            assert torch.equal(val[infinite], ref[infinite]), f"{what}: {quantity}: the loop's +-inf became {val[infinite].tolist()}"
            finite = defined & ~infinite
            if finite.any():
                error = (val[finite] - ref[finite]).abs()
                tolerance = atol + rtol * ref[finite].abs()
                worst = int((error - tolerance).argmax())
                assert bool((error <= tolerance).all()), (
                    f"{what}: {quantity} differs by {error[worst].item():.3g} (tolerance {tolerance[worst].item():.3g}) where the loop gives "
                    f"{ref[finite][worst].item():.6g}; got {val[finite][worst].item():.6g}"
                )


def _module(name: str, backend: str, chunk_size: int | None, reference: recdsl.CompiledCell, dtype: torch.dtype) -> recdsl.CompiledCell:
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, chunk_size=chunk_size if backend == "chunked" else None, **DIMS[name])
    module.load_state_dict(reference.state_dict())
    return module.to(dtype)


def _reference(name: str) -> recdsl.CompiledCell:
    torch.manual_seed(0)
    return recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name])


def _calls(special_values=SPECIALS, max_plants: int = 3):
    plant = st.tuples(st.floats(0, 0.999), st.floats(0, 0.999), st.sampled_from(special_values))
    return st.builds(
        Call,
        batch=st.integers(1, 3),
        length=st.integers(1, 19),
        heads=st.sampled_from([(), (2,), (1, 2)]),
        dtype=st.sampled_from([torch.float32, torch.float64]),
        seed=st.integers(0, 2**16),
        plants=st.lists(plant, max_size=max_plants).map(tuple),
        state=st.sampled_from(["none", "full", "partial", "unbatched"]),
    )


TOLERANCE = {torch.float32: (2e-4, 2e-4), torch.float64: (1e-9, 1e-9)}
CASES = []
for _name in sorted(DIMS):
    torch.manual_seed(0)
    _backends = available_backends(recdsl.compile(EXAMPLES / f"{_name}.rec", **DIMS[_name]))
    CASES.extend((_name, b) for b in _backends if b != "triton")


@pytest.mark.parametrize("name, backend", CASES)
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(call=_calls(special_values=(0.0,), max_plants=1), chunk_size=st.integers(1, 8))
def test_finite_calls_match_the_loop(name, backend, call, chunk_size):
    """Finite inputs of random shapes, dtypes and state dicts: every backend matches the loop."""
    reference = _reference(name)
    module = _module(name, backend, chunk_size, reference, call.dtype)
    inputs, state = _make_call(module, call)
    expected = _results(reference.to(call.dtype), inputs, state)
    rtol, atol = TOLERANCE[call.dtype]
    assert_matches_where_defined(expected, _results(module, inputs, state), rtol, atol, f"{name} on {backend}")


@pytest.mark.parametrize("name, backend", CASES + [(name, "sequential") for name in sorted(DIMS)])
@settings(max_examples=3, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(call=_calls())
def test_meta_tensors_are_refused_on_every_backend(name, backend, call):
    reference = _reference(name)
    module = _module(name, backend, 4, reference, call.dtype)
    inputs, state = _make_call(module, call)
    first = next(iter(inputs))
    inputs[first] = inputs[first].to("meta")
    with pytest.raises(recdsl.InputError, match=f"input '{first}' is on the meta device"):
        module(**inputs, state=state)


# ---- +-inf and NaN (issue 8, item 10) ---------------------------------------------------


# Cells whose matrix transition (low rank, or a coupled group's joint one) is scanned as a product of matrices: IEEE matrix
# products are not associative with +-inf (k = inf gives inf - inf in M_2 M_1 where the loop
# applies each M_t to a finite state), so these get non-finite values in the queries only.
QUERIES_ONLY = {"deltanet": {"q"}, "gated_deltanet": {"q"}, "ttt_linear": {"q"}, "titans": {"q"}}  # titans: its joint 2 dk x 2 dk transitions are multiplied likewise


@pytest.mark.parametrize("name, backend", CASES)
@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(call=_calls(), chunk_size=st.integers(1, 8))
def test_non_finite_inputs_give_what_the_loop_gives(name, backend, call, chunk_size):
    """+inf, -inf and NaN planted in any input: where the loop is not NaN, the backend agrees."""
    reference = _reference(name)
    module = _module(name, backend, chunk_size, reference, call.dtype)
    inputs, state = _make_call(module, call, QUERIES_ONLY.get(name))
    expected = _results(reference.to(call.dtype), inputs, state)
    rtol, atol = TOLERANCE[call.dtype]
    assert_matches_where_defined(expected, _results(module, inputs, state), rtol, atol, f"{name} on {backend} with {call.plants}")


@pytest.mark.parametrize("name, backend, planted", [("crf", "scan", {"emit"}), ("gla", "chunked", {"q"}), ("gla", "chunked", None)])
@settings(max_examples=30, deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
@given(call=_calls(special_values=(float("inf"), float("-inf"))), chunk_size=st.integers(1, 8))
def test_infinite_inputs_of_the_issue(name, backend, planted, call, chunk_size):
    """Issue 8, item 10: +-inf in the CRF's emissions on scan, in GLA's queries (or any input) on chunked."""
    reference = _reference(name)
    module = _module(name, backend, chunk_size, reference, call.dtype)
    inputs, state = _make_call(module, call, planted)
    expected = _results(reference.to(call.dtype), inputs, state)
    rtol, atol = TOLERANCE[call.dtype]
    assert_matches_where_defined(expected, _results(module, inputs, state), rtol, atol, f"{name} on {backend} with {call.plants}")


def test_issue_reproductions():
    """CRF on scan with emit[0, 2] = +inf gave NaN after step 2; GLA on chunked with q[0, 2] = +inf gave NaN at step 2."""
    for name, backend, key in [("crf", "scan", "emit"), ("gla", "chunked", "q")]:
        reference = _reference(name).double()
        module = _module(name, backend, None, reference, torch.float64)
        generator = torch.Generator().manual_seed(0)
        inputs = {d.name: 0.5 * torch.randn((1, 5, *d.type.shape), generator=generator, dtype=torch.float64) for d in module.cell.inputs}
        inputs[key][0, 2, 0] = float("inf")
        expected = _results(reference, inputs, None)
        assert torch.isinf(expected["output 0"][0, 2]).any()
        assert_matches_where_defined(expected, _results(module, inputs, None), 1e-9, 1e-9, f"{name} on {backend}")
