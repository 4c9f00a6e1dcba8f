"""Compiled modules survive pickle, torch.save/torch.load and copy.deepcopy.

Every example on every backend it supports (sequential; scan and chunked where they apply;
triton in Triton's interpreter for two cells): the round-tripped module gives exactly the
outputs and final state of the original, and keeps its backend and params.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import pickle

import pytest
import torch

import recdsl
from recdsl.testing import Example, available_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)


def _pickle(module):
    return pickle.loads(pickle.dumps(module))


def _torch_save(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {"pickle": _pickle, "torch.save": _torch_save, "deepcopy": copy.deepcopy}


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name in sorted(DIMS):
        torch.manual_seed(0)
        module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name])
        cases.extend((name, backend) for backend in ("sequential",) + tuple(b for b in available_backends(module) if b != "triton"))
    return cases


def _assert_round_trip(name: str, backend: str, round_trip) -> None:
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **DIMS[name]).double()
    inputs, state = random_inputs(module, Example(batch=2, length=5, heads=(), seed=3, with_state=True))
    expected, expected_state = module(**inputs, state=state, return_state=True)
    restored = round_trip(module)
    assert restored.backend == module.backend == backend
    for (key, value), (other_key, other) in zip(module.state_dict().items(), restored.state_dict().items()):
        assert key == other_key and torch.equal(value, other), f"param {key} changed in the round trip"
    actual, actual_state = restored(**inputs, state=state, return_state=True)
    expected = expected if isinstance(expected, tuple) else (expected,)
    actual = actual if isinstance(actual, tuple) else (actual,)
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert torch.equal(want, got), f"output {index} differs after the round trip"
    assert expected_state.keys() == actual_state.keys()
    for key in expected_state:
        assert torch.equal(expected_state[key], actual_state[key]), f"final state {key} differs after the round trip"


@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("name, backend", _cases())
def test_round_trip_keeps_the_module(name, backend, how):
    _assert_round_trip(name, backend, ROUND_TRIPS[how])


def test_auto_gru_pickles():
    """The issue's case: `auto` on a GRU (the fused loop with a C compiler, else the Python loop) survives pickling."""
    from recdsl.backends.fused_sequential import compiler

    module = recdsl.compile(EXAMPLES / "gru.rec", d_in=3, d=4)
    assert module.backend == ("fused" if compiler() else "sequential")
    restored = _pickle(module)
    assert restored.backend == module.backend
    x = torch.randn(2, 5, 3)
    assert torch.equal(module(x), restored(x))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("how", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("name", ["mingru", "gla"])
def test_triton_round_trip(name, how, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path / "cache"))
    _assert_round_trip(name, "triton", ROUND_TRIPS[how])
