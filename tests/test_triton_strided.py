"""The chunked and delta-rule Triton kernels read their pieces in place, and check only their final state.

The kernels take batch, head and step strides, so `backends/parallel._run_chunk_plan` passes
each `[B, T, *heads, d]` piece as a `[B, H, T, d]` view (no copy into `[B H, T, d]`) and the
read-outs and gradients come back laid out as the tensors they belong to.  Here, in Triton's
interpreter against the sequential loop with every gradient: inputs that are transposed views,
slices with a last-dim stride of 2, two head dims; and the finiteness rule (the kernels run
first, and a non-finite final state sends the call to the scan): +-inf and NaN planted in any
input give what the loop gives.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.testing import compare_backends

from test_triton_chunk import CELLS as CHUNKED_CELLS  # noqa: E402
from test_runtime_fuzz import Call, _make_call, _module, _reference, _results, assert_matches_where_defined  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Key dims of 20: two key blocks of the gradient kernels (16), the second ragged.
CELLS = {**CHUNKED_CELLS, "deltanet": dict(dk=20, dv=12), "gated_deltanet": dict(dk=20, dv=12)}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _strided_inputs(module: recdsl.CompiledCell, batch: int, length: int, heads: tuple[int, ...], seed: int) -> dict[str, torch.Tensor]:
    """Every input a non-contiguous view: the first ones stored ``[B, *heads, T, d]`` and seen as
    ``[B, T, *heads, d]``, every third one a slice taking every other element of its last dim."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {}
    for i, declared in enumerate(module.cell.inputs):
        item = tuple(declared.type.shape)
        if i % 3 == 2 and item:
            wide = 0.5 * torch.randn((batch, length, *heads, *item[:-1], 2 * item[-1]), generator=generator, dtype=torch.float64)
            value = wide[..., ::2]
        else:
            stored = 0.5 * torch.randn((batch, *heads, length, *item), generator=generator, dtype=torch.float64)
            value = stored.movedim(1 + len(heads), 1)
        inputs[declared.name] = value
    return inputs


@pytest.mark.parametrize("name", sorted(CELLS))
def test_strided_inputs_with_two_head_dims_match_sequential(name):
    """Outputs, final states and every gradient in float64, from non-contiguous inputs with head
    dims (1, 2), over two chunks (the second ragged) from a random initial state."""
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **CELLS[name]).double()
    heads = (1, 2)
    inputs = _strided_inputs(module, 2, 70, heads, seed=3)
    assert not any(v.is_contiguous() for v in inputs.values())
    generator = torch.Generator().manual_seed(4)
    state = {k: torch.where(torch.isinf(v), v, 0.5 * torch.randn(v.shape, generator=generator, dtype=torch.float64)) for k, v in module.initial_state(2, *heads, dtype=torch.float64).items()}
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=5)
    assert not mismatches, "\n".join(map(str, mismatches))


def test_read_outs_and_gradients_keep_the_inputs_layout():
    """The read-out comes laid out [B, T, H, V] (contiguous) and each input's gradient in the
    input's own layout: nothing is copied after the kernels."""
    module = recdsl.compile(EXAMPLES / "gla.rec", backend="triton", dk=20, dv=12).double()
    inputs = [torch.randn(2, 70, 3, d, dtype=torch.float64, requires_grad=True) for d in (20, 20, 12, 20)]
    out = module(*inputs)
    assert out.is_contiguous()
    out.sum().backward()
    for value in inputs:
        assert value.grad.stride() == value.stride()


# Plants: (position in [0, 1), fraction of the last axis, value), as in test_runtime_fuzz.
PLANTS = [
    ((0.1, 0.0, float("inf")),),
    ((0.5, 0.6, float("-inf")),),
    ((0.9, 0.3, float("nan")),),
    ((0.2, 0.9, float("inf")), (0.7, 0.1, float("nan"))),
]
# As in test_runtime_fuzz: the delta rule's loop applies each transition to a finite state, which
# its scan fallback (a product of matrices) does not reproduce with +-inf keys; queries only there.
QUERIES_ONLY = {"deltanet": {"q"}, "gated_deltanet": {"q"}}


@pytest.mark.parametrize("plants", PLANTS, ids=["inf early", "-inf", "nan late", "inf and nan"])
@pytest.mark.parametrize("name", sorted(CELLS))
def test_non_finite_inputs_give_what_the_loop_gives(name, plants):
    """+inf, -inf and NaN planted in every input (the delta rule: in the queries): where the loop
    is not NaN, the Triton backend agrees (the kernels run first; a non-finite final state runs
    the scan instead)."""
    reference = _reference(name)
    module = _module(name, "triton", None, reference, torch.float64)
    call = Call(batch=2, length=70, heads=(2,), dtype=torch.float64, seed=7, plants=plants, state="full")
    inputs, state = _make_call(module, call, QUERIES_ONLY.get(name))
    expected = _results(reference.to(torch.float64), inputs, state)
    assert_matches_where_defined(expected, _results(module, inputs, state), 1e-9, 1e-9, f"{name} on triton with {plants}")


def test_logsigmoid_gate_in_the_kernels_matches_the_torch_form():
    """GLA's gate evaluated in the kernels (``LogSigmoidGate``: the kernels read g and take
    logsigmoid(g) / 16) against the torch chunked form of logsigmoid(g) / 16, forward and every
    gradient, g's included, over two key blocks and a ragged second chunk, in [B, H, T, d] views."""
    from recdsl.backends import chunk_kernels, triton_chunk

    generator = torch.Generator().manual_seed(12)
    B, T, H, K, V = 2, 70, 3, 20, 12
    make = lambda d, scale=1.0: (scale * torch.randn(B, T, H, d, generator=generator, dtype=torch.float64)).requires_grad_()  # noqa: E731
    q, k, v, x = make(K), make(K), make(V), make(K, 4.0)
    initial = torch.randn(B * H, K, V, generator=generator, dtype=torch.float64).requires_grad_()
    heads = lambda t: t.transpose(1, 2)  # noqa: E731  [B, H, T, d] views
    gate = triton_chunk.LogSigmoidGate(1 / 16)
    (out,), final = triton_chunk.decayed_outer_products(
        [heads(q)], [chunk_kernels.RankOneInput(heads(k), heads(v))], heads(x).unsqueeze(-1), initial, 64, gate=gate
    )
    flat = lambda t: heads(t).flatten(0, 1)  # noqa: E731
    (want,), want_final = chunk_kernels.decayed_outer_products(
        [flat(q)], [chunk_kernels.RankOneInput(flat(k), flat(v))], (torch.nn.functional.logsigmoid(flat(x)) / 16).unsqueeze(-1), initial, 64
    )
    torch.testing.assert_close(out.flatten(0, 1), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, want_final, rtol=1e-10, atol=1e-10)
    weights = torch.randn(want.shape, generator=generator, dtype=torch.float64)
    leaves = (q, k, v, x, initial)
    got = torch.autograd.grad((out.flatten(0, 1) * weights).sum() + final.sum(), leaves)
    expected = torch.autograd.grad((want * weights).sum() + want_final.sum(), leaves)
    for name, a, b in zip("q k v g initial".split(), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=lambda m: f"d{name}: {m}")
