"""The chunked Triton kernels (GLA, RetNet, mLSTM, Mamba-2) in Triton's interpreter, against the
torch chunked form: several key and value blocks, ragged chunks, and decays strong enough for
the exact pairwise path; and the matmul precision each launch asks for."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _problem(rows: bool, strength: float, keys: int = 80, values: int = 70, steps: int = 70, dtype=torch.float64):
    generator = torch.Generator().manual_seed(11)
    q, k = (torch.randn(1, steps, keys, generator=generator, dtype=dtype) for _ in range(2))
    v = torch.randn(1, steps, values, generator=generator, dtype=dtype)
    log_decay = -strength * torch.rand(1, steps, keys if rows else 1, 1, generator=generator, dtype=dtype)
    initial = torch.randn(1, keys, values, generator=generator, dtype=dtype)
    return q, k, v, log_decay, initial


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
@pytest.mark.parametrize("strength", [0.05, 3.0], ids=["factorised", "pairwise"])
def test_chunk_kernels_match_the_torch_chunked_form_across_key_and_value_blocks(rows, strength):
    """dk = 80, dv = 70: two key and two value blocks of 64, the second of each ragged; 70 steps:
    two chunks, the second ragged.  A log decay of up to -3 per step takes G below -60 inside a
    chunk, where the per-row kernel switches to the exact pairwise sum."""
    from recdsl.backends import chunk_kernels, triton_chunk

    q, k, v, log_decay, initial = _problem(rows, strength)
    (out,), final = triton_chunk.forward([q], k, v, log_decay, initial, 64)
    (expected,), expected_final = chunk_kernels.decayed_outer_products([q], [chunk_kernels.RankOneInput(k, v)], log_decay, initial, 64)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg="read-outs q_t @ S_t")
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10, msg="final state S_T")


@pytest.mark.parametrize("dtype, allow_tf32, precision", [
    (torch.float32, False, "ieee"),
    (torch.float32, True, "tf32"),
    (torch.float64, True, "ieee"),
])
def test_matmuls_are_exact_unless_tf32_is_asked_for(dtype, allow_tf32, precision):
    from recdsl.backends import triton_chunk
    from recdsl.backends.triton_aot import record_launches

    q, k, v, log_decay, initial = _problem(True, 0.05, keys=16, values=16, steps=16, dtype=dtype)
    launches = record_launches(lambda: triton_chunk.forward([q], k, v, log_decay, initial, 64, allow_tf32=allow_tf32))
    with_dots = [launch for launch in launches if "PRECISION" in launch.meta]
    assert {launch.name for launch in with_dots} == {"chunk_states", "chunk_outputs"}
    assert {launch.meta["PRECISION"] for launch in with_dots} == {precision}
