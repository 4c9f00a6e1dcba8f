"""The sequential backend's cost structure: its backward does work linear in T.

No timing: the test counts the elements that the aten ops of the backward write (a
dispatch mode sees every op autograd runs), which grows quadratically in T when a step's
slice of a whole-sequence value has a backward that writes a gradient of the whole sequence.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import recdsl

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)


class _ElementsWritten(TorchDispatchMode):
    """Counts the elements of every tensor the ops run under it return."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for value in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(value, torch.Tensor):
                self.elements += value.numel()
        return result


def _backward_elements(module: torch.nn.Module, length: int) -> int:
    torch.manual_seed(length)
    x = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    loss = module(x).sum()
    with _ElementsWritten() as counter:
        loss.backward()
    return counter.elements


@pytest.mark.parametrize("name", ["mingru", "gru", "lstm"])
def test_sequential_backward_writes_elements_linear_in_T(name):
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", d_in=3, d=4).double()
    short, long = _backward_elements(module, 32), _backward_elements(module, 256)
    ratio = long / short
    # 8x the steps: linear work gives about 8x; a whole-sequence gradient per step gives ~ 8^2 on the T^2 part.
    assert ratio < 10, f"{name}: the backward writes {long} elements at T = 256 and {short} at T = 32 ({ratio:.1f}x for 8x the steps)"
