"""A call leaves nothing for the garbage collector: its tensors are freed when it returns.

A reference cycle through a run's memo (values that hold their evaluator, which holds
the values) keeps every tensor of the call (whole state sequences) alive until Python's
cycle collector happens to run, which a loop of large tensor calls may not trigger for a
long time: the S4D convolution's peak memory was 1.1 GB of such garbage against 0.2 GB
live.  Here the collector is off during a forward and backward, and afterwards nothing
that a collection would free may hold a tensor.
"""

from __future__ import annotations

import gc

import pytest
import torch

import recdsl

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

CASES = [
    ("mingru", "scan"),
    ("gla", "chunked"),
    ("gated_deltanet", "chunked"),
    ("s4d", "chunked"),  # the convolution form
    ("lion", "chunked"),  # reverse states and a delay
    ("state_tracking_lrnn", "scan"),  # block matrices
    ("gru", "newton"),
    ("gru", "sequential"),
    ("bigru", "sequential"),
]


@pytest.mark.parametrize("example, backend", CASES, ids=[f"{e}-{b}" for e, b in CASES])
def test_a_call_leaves_no_tensor_to_the_cycle_collector(example: str, backend: str) -> None:
    module = recdsl.compile(EXAMPLES / f"{example}.rec", backend=backend, **DIMS[example]).double()
    inputs = {i.name: torch.randn(2, 9, *i.type.shape, dtype=torch.float64, requires_grad=True) for i in module.cell.inputs}
    first = module(**inputs)  # a first call imports and caches what later calls share
    (first if isinstance(first, torch.Tensor) else first[0]).real.sum().backward()
    del first
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what a collection frees is kept in gc.garbage to be looked at
    try:
        out = module(**inputs)
        (out if isinstance(out, torch.Tensor) else out[0]).real.sum().backward()
        del out
        gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage if isinstance(o, torch.Tensor) or type(o).__name__ in {"_LazyValues", "Evaluator", "_StepValues"}]
    finally:
        gc.garbage.clear()
        gc.set_debug(0)
        gc.enable()
    assert garbage == [], f"{example} on {backend}: the call left {len(garbage)} objects to the cycle collector: {sorted(set(garbage))}"
