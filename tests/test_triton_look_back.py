"""The affine scans' one-pass forward with T split across programs
(``forward_<state>_look_back``, backends/triton_codegen.py: emit_look_back).

The interpreter runs programs one after another, in ticket order, so every walk back finds
its predecessor's end state already published (flag 2): the differential tests of
tests/test_triton_split.py cover that path.  On a GPU a program may instead find blocks that
have published only their fold (flag 1) and must compose those.  Here that path is forced:
the kernel is launched again from a later ticket, with the flags of the blocks before it set
back to 1 and their published end states overwritten with NaN, so that only the composed
folds can give the carry."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import recdsl
from recdsl.backends.triton_launch import observe_launches

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

BLOCK_T = 32


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


@pytest.mark.parametrize("name", ["mingru", "lru"])  # real and complex states
def test_blocks_compose_published_folds_when_no_end_state_is_there(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", backend_options={"split_programs": 10**6}, **DIMS[name]).double()
    steps = 5 * BLOCK_T + 3  # six blocks of steps, the last ragged
    x = torch.randn(2, steps, *module.cell.inputs[0].type.shape, dtype=torch.float64)
    with torch.no_grad(), observe_launches() as launches:
        expected = module(x)
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name]).double()
    reference.load_state_dict(module.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(expected, reference(x), rtol=1e-10, atol=1e-10)

    (scan,) = [launch for launch in launches if launch.name.endswith("_look_back")]
    tensors = [a for a in scan.args if isinstance(a, torch.Tensor)]
    flags, ticket = [t for t in tensors if t.dtype == torch.int32]
    rows, blocks, chunks = flags.shape
    assert chunks == 6 and bool((flags == 2).all())
    parts = 2 if name == "lru" else 1
    outputs = tensors[parts:2 * parts]  # after the initial state's parts
    folds_and_ends = [t for t in tensors if t.dtype == torch.float64 and t.shape == (rows, chunks, outputs[0].shape[-1])]
    ends = folds_and_ends[-parts:]
    states = [o.clone() for o in outputs]

    first = 4  # relaunch from block 4: blocks 1-3 offer only their folds, block 0 its end state
    flags[..., 1:first] = 1
    flags[..., first:] = 0
    for end in ends:
        end[:, 1:first] = float("nan")
    for output in outputs:
        output.zero_()
    ticket.fill_(rows * blocks * first)
    scan.kernel[(rows * blocks * (chunks - first),)](*scan.args, **scan.meta)

    start = first * BLOCK_T
    for output, state in zip(outputs, states):
        assert bool((output[:, :start] == 0).all())  # blocks before the first ticket were not run again
        torch.testing.assert_close(output[:, start:], state[:, start:], rtol=1e-12, atol=1e-12)
    assert bool((flags == 2)[..., first:].all()) and bool((flags[..., 1:first] == 1).all())
