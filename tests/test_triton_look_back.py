"""The affine scans' one-pass kernels with T split across programs
(``forward_<state>_look_back``, ``backward_<state>_look_back``; backends/triton_codegen.py:
emit_look_back, emit_gradient_backward).

The interpreter runs programs one after another, in ticket order, so every walk back finds
its predecessor's end value already published (flag 2): the differential tests of
tests/test_triton_split.py cover that path.  On a GPU a program may instead find blocks that
have published only their fold (flag 1) and must compose those.  Here that path is forced:
each kernel is launched again from a later ticket, with the flags of the blocks before it
set back to 1 and their published end values overwritten with NaN, so that only the
composed folds can give the carry; its outputs must come out as in the first launch.  With
block 0 offering only its fold too, the walk composes every earlier block and must map the
initial state (backward: the zero adjoint past the last step) through them: the case the
first GPU run found wrong (every split scan's output off), which the interpreter never
reaches on its own."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
import torch

import recdsl
from recdsl.backends.triton_launch import observe_launches

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

BLOCK_T = 32
FIRST = 4  # relaunched from block 4: blocks 1-3 (or 0-3) offer only their folds


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _arguments(launch) -> dict[str, object]:
    names = list(inspect.signature(launch.python_function).parameters)
    return dict(zip(names, launch.args))


def _written_region(name: str, tensor: torch.Tensor, steps: int, backward: bool) -> tuple[slice, ...] | None:
    """The part of an output the blocks from FIRST on write (None: not an output)."""
    if not backward:
        return (slice(None), slice(FIRST * BLOCK_T, None)) if name.startswith("p_out") else None  # states [N, T, C]
    if name.startswith("p_dinit"):
        return (slice(None),)  # written by the block holding t = 0, which runs again
    if name.startswith("p_d") and tensor.dim() == 4:  # a leaf's gradient [B, H, T or blocks, C]
        if tensor.shape[2] == steps:  # per step: block k holds t = T - 1 - j, j in [k BT, (k + 1) BT)
            return (slice(None), slice(None), slice(0, steps - FIRST * BLOCK_T))
        return (slice(None), slice(None), slice(FIRST, None))  # summed per block of steps
    return None


@torch.no_grad()
def _rerun_from_a_later_block(launch, steps: int, backward: bool, ended: int) -> None:
    """Launch again from block FIRST, blocks ``ended``..FIRST - 1 offering only their folds."""
    arguments = _arguments(launch)
    flags, ticket = arguments["p_flags"], arguments["p_ticket"]
    rows, blocks, chunks = flags.shape
    assert chunks == -(-steps // BLOCK_T) and bool((flags == 2).all())
    outputs = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor) and _written_region(name, value, steps, backward) is not None}
    assert outputs
    expected = {name: value.clone() for name, value in outputs.items()}

    flags[..., ended:FIRST] = 1
    flags[..., FIRST:] = 0
    for name, value in arguments.items():
        if name.startswith("p_end_"):
            value[:, ended:FIRST] = float("nan")
    for value in outputs.values():
        value.zero_()
    ticket.fill_(rows * blocks * FIRST)
    launch.kernel[(rows * blocks * (chunks - FIRST),)](*launch.args, **launch.meta)

    for name, value in outputs.items():
        region = _written_region(name, value, steps, backward)
        torch.testing.assert_close(value[region], expected[name][region], rtol=1e-12, atol=1e-12, msg=name)
        untouched = value.clone()
        untouched[region] = 0
        assert bool((untouched == 0).all()), f"{name}: written outside the blocks that ran again"
    assert bool((flags[..., FIRST:] == 2).all()) and bool((flags[..., ended:FIRST] == 1).all())


@pytest.mark.parametrize("ended", [1, 0], ids=["block 0 ended", "block 0 folded only"])
@pytest.mark.parametrize("name", ["mingru", "lru", "rglru"])  # real, complex, a leaf constant in time (Lambda)
def test_blocks_compose_published_folds_when_no_end_value_is_there(name, ended):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", backend_options={"split_programs": 10**6}, **DIMS[name]).double()
    steps = 5 * BLOCK_T + 3  # six blocks of steps, the last ragged
    x = torch.randn(2, steps, *module.cell.inputs[0].type.shape, dtype=torch.float64, requires_grad=True)
    state = {key: torch.randn_like(value) for key, value in module.initial_state(2, dtype=torch.float64).items()}
    with observe_launches() as launches:
        y = module(x, state=state)
        y.backward(torch.randn_like(y))
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name]).double()
    reference.load_state_dict(module.state_dict())
    x_ref = x.detach().clone().requires_grad_()
    torch.testing.assert_close(y, reference(x_ref, state=state), rtol=1e-10, atol=1e-10)

    forward = [launch for launch in launches if launch.name == "forward_h_look_back"]
    backward = [launch for launch in launches if launch.name == "backward_h_look_back"]
    assert len(forward) == len(backward) == 1, [launch.name for launch in launches]
    _rerun_from_a_later_block(backward[0], steps, backward=True, ended=ended)  # first: it reads the states the forward's rerun zeroes
    _rerun_from_a_later_block(forward[0], steps, backward=False, ended=ended)
