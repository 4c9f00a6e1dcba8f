"""The sequential backend's cost structure: its backward does work linear in T.

No timing: the test counts the elements of the gradients the backward's autograd nodes
produce, which grows quadratically in T when a step's slice of a whole-sequence value has
a backward that writes a gradient of the whole sequence.
"""

from __future__ import annotations

import pytest
import torch

import recdsl

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)


def _backward_elements(module: torch.nn.Module, length: int) -> int:
    """The elements of every gradient the backward's autograd nodes produce (a hook on each node)."""
    torch.manual_seed(length)
    x = torch.randn(2, length, 3, dtype=torch.float64, requires_grad=True)
    loss = module(x).sum()
    produced = [0]

    def count(grad_inputs, grad_outputs) -> None:
        produced[0] += sum(g.numel() for g in grad_inputs if g is not None)

    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        node.register_hook(count)
        stack.extend(next_node for next_node, _ in node.next_functions)
    loss.backward()
    return produced[0]


@pytest.mark.parametrize("name", ["mingru", "gru", "lstm"])
def test_sequential_backward_writes_elements_linear_in_T(name):
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", d_in=3, d=4).double()
    short, long = _backward_elements(module, 32), _backward_elements(module, 256)
    ratio = long / short
    # 8x the steps: linear work gives about 8x; a whole-sequence gradient per step gives ~ 8^2 on the T^2 part.
    assert ratio < 10, f"{name}: the backward writes {long} elements at T = 256 and {short} at T = 32 ({ratio:.1f}x for 8x the steps)"
