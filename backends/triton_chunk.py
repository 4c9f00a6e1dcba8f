"""Triton kernels for the chunked form of decayed outer products (GLA, RetNet, mLSTM, Mamba-2).

The same algorithm as :func:`recdsl.backends.chunk_kernels.decayed_outer_products`, for a
decay shared by a whole state (``[N, T, 1, 1]``) or by each row (``[N, T, K, 1]``):

1. ``chunk_states``: per chunk, the log decays accumulated inside it (``tl.cumsum``), the
   chunk's total decay and its update ``sum_s (k_s * exp(G_C - G_s))^T v_s`` (a ``tl.dot``);
2. ``pass_states``: one program per (row, key block, value block) walks the chunks in
   order, keeping the state in fp32 and writing the state each chunk starts from;
3. ``chunk_outputs``: ``o_t = (q_t * exp(G_t)) @ S_start + sum_{s <= t} A_ts v_s`` with
   ``A = (Q K^T) * exp(G_t - G_s)`` for a scalar decay, and for per-row decays
   ``A = (Q * exp(G)) (K * exp(-G))^T`` summed over key blocks, each block factorised where
   its ``G`` stays within ``+-60`` inside the chunk, else summed exactly pair by pair.

Blocks are at least 16 wide so that ``tl.dot`` maps to tensor cores on a GPU; float32
products are exact (``input_precision="ieee"``) unless the caller passes ``allow_tf32=True``
(TF32 tensor cores, about 1e-3 relative error).  :func:`tiling` chooses the blocks and
launch options; offsets are 64-bit where they count over rows or chunks.  The backward pass
recomputes the chunked form in torch under autograd (chunk-boundary states only); a
dedicated backward kernel is future work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_launch import launch

_FACTOR_LIMIT = 60.0


# Addressing: ``p_x += base`` with ``base`` an int64 scalar (the first element of the
# program's row and chunk), then int32 offsets inside the tile.  N * T * K or
# N * n_chunks * K * V may pass 2^31 elements; one chunk or one state tile never does.


@triton.jit
def chunk_states(p_k, p_v, p_g, p_update, p_decay, T, K, V, n_chunks, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk, key block, value block).
    i_nc = tl.program_id(0)
    i_k = tl.program_id(1)
    i_v = tl.program_id(2)
    i_n = (i_nc // n_chunks).to(tl.int64)
    i_c = i_nc % n_chunks
    o_row = i_n * T + i_c * BT  # the chunk's first step, counted over all rows
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = i_c * BT + o_t < T
    m_k = o_k < K
    m_v = o_v < V
    b_k = tl.load(p_k + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(ACC)
    b_v = tl.load(p_v + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    if ROWS:
        b_g = tl.load(p_g + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(ACC)
        b_G = tl.cumsum(b_g, axis=0)
        b_end = tl.sum(tl.where(o_t[:, None] == BT - 1, b_G, 0.0), axis=0)  # G at the chunk's last step, per key
        b_scaled = b_k * tl.exp(b_end[None, :] - b_G)
        b_decay = tl.exp(b_end)
    else:
        b_g = tl.load(p_g + o_row + o_t, mask=m_t, other=0.0).to(ACC)
        b_G = tl.cumsum(b_g, axis=0)
        b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
        b_scaled = b_k * tl.exp(b_end - b_G)[:, None]
        b_decay = tl.exp(b_end) + tl.zeros([BK], dtype=ACC)
    b_update = tl.dot(tl.trans(b_scaled), b_v, input_precision=PRECISION)
    o_state = (i_n * n_chunks + i_c) * K * V
    tl.store(p_update + o_state + o_k[:, None] * V + o_v[None, :], b_update, mask=m_k[:, None] & m_v[None, :])
    if i_v == 0:
        tl.store(p_decay + (i_n * n_chunks + i_c) * K + o_k, b_decay, mask=m_k)


@triton.jit
def pass_states(p_initial, p_update, p_decay, p_starts, p_final, K, V, n_chunks, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    # One program per (row, key block, value block): each state element evolves on its own.
    i_n = tl.program_id(0).to(tl.int64)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    o_v = tl.program_id(2) * BV + tl.arange(0, BV)
    m = (o_k[:, None] < K) & (o_v[None, :] < V)
    o_tile = o_k[:, None] * V + o_v[None, :]
    b_state = tl.load(p_initial + i_n * K * V + o_tile, mask=m, other=0.0).to(ACC)
    for i_c in range(0, n_chunks):
        o_chunk = i_n * n_chunks + i_c
        tl.store(p_starts + o_chunk * K * V + o_tile, b_state, mask=m)
        b_decay = tl.load(p_decay + o_chunk * K + o_k, mask=o_k < K, other=1.0).to(ACC)
        b_state = b_decay[:, None] * b_state + tl.load(p_update + o_chunk * K * V + o_tile, mask=m, other=0.0).to(ACC)
    tl.store(p_final + i_n * K * V + o_tile, b_state, mask=m)


@triton.jit
def chunk_outputs(p_q, p_k, p_v, p_g, p_starts, p_out, T, K, V, n_chunks, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk, value block); the key dimension is walked in blocks of BK.
    i_nc = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = (i_nc // n_chunks).to(tl.int64)
    i_c = i_nc % n_chunks
    o_row = i_n * T + i_c * BT
    o_state = (i_n * n_chunks + i_c) * K * V
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = i_c * BT + o_t < T
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    b_out = tl.zeros([BT, BV], dtype=ACC)
    b_scores = tl.zeros([BT, BT], dtype=ACC)
    if not ROWS:
        b_Gt = tl.cumsum(tl.load(p_g + o_row + o_t, mask=m_t, other=0.0).to(ACC), axis=0)  # the (shared) log decay of each step
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_q = tl.load(p_q + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_k = tl.load(p_k + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_start = tl.load(p_starts + o_state + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0).to(ACC)
        if ROWS:
            b_G = tl.cumsum(tl.load(p_g + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC), axis=0)
            b_qg = b_q * tl.exp(b_G)
            # From the state at the chunk start.
            b_out += tl.dot(b_qg, b_start, input_precision=PRECISION)
            b_lowest = tl.min(tl.min(b_G, axis=1), axis=0)
            b_highest = tl.max(tl.max(b_G, axis=1), axis=0)
            if (b_lowest > -60.0) & (b_highest < 60.0):
                # exp(G_t - G_s) = exp(G_t) exp(-G_s), each factor within exp(+-60).
                b_scores += tl.dot(b_qg, tl.trans(b_k * tl.exp(-b_G)), input_precision=PRECISION)
            else:
                # The exact pairwise form, one key dimension of this block at a time.
                for i_j in range(0, BK):
                    m_col = m_t & (o_t * 0 + i_k * BK + i_j < K)  # (a tensor: the interpreter has no scalar masks)
                    p_col = o_row * K + o_t * K + i_k * BK + i_j
                    q_col = tl.load(p_q + p_col, mask=m_col, other=0.0).to(ACC)
                    k_col = tl.load(p_k + p_col, mask=m_col, other=0.0).to(ACC)
                    g_col = tl.sum(tl.where(tl.arange(0, BK)[None, :] == i_j, b_G, 0.0), axis=1)
                    gap = tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf"))
                    b_scores += q_col[:, None] * k_col[None, :] * tl.exp(gap)
        else:
            b_out += tl.dot(b_q, b_start, input_precision=PRECISION)
            b_scores += tl.dot(b_q, tl.trans(b_k), input_precision=PRECISION)
    if not ROWS:
        # The shared decay factors out of the key sum: q_t exp(G_t) S, and (q_t . k_s) exp(G_t - G_s).
        b_out = b_out * tl.exp(b_Gt)[:, None]
        b_scores = b_scores * tl.exp(tl.where(causal, b_Gt[:, None] - b_Gt[None, :], float("-inf")))
    b_scores = tl.where(causal, b_scores, 0.0)
    b_v = tl.load(p_v + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    b_out += tl.dot(b_scores, b_v, input_precision=PRECISION)
    tl.store(p_out + o_row * V + o_t[:, None] * V + o_v[None, :], b_out, mask=m_t[:, None] & m_v[None, :])


@dataclass(frozen=True)
class Tiling:
    """Block sizes and launch options of the chunked kernels, chosen so that nothing spills.

    ``chunk``: steps per chunk (``BT``).  ``state_key_block``: the key rows of one program of
    ``chunk_states``/``pass_states`` (the key dimension is split across programs there);
    ``output_key_block``: the key block ``chunk_outputs`` walks the key dimension in;
    ``value_block``: the value columns of one program.  ``precision``: ``tl.dot``'s
    ``input_precision``, ``"ieee"`` (exact float32) unless TF32 was asked for.

    The float32 ``ieee`` product runs on FMA units with each thread holding whole rows and
    columns of its operands, so the blocks that feed it stay narrow: compiled for sm_80 and
    sm_90 (``tests/test_triton_compile.py``, ``benchmarks/RESULTS_COMPILE.md``) these give
    at most 236 registers, no spills and at most 40 KB of shared memory at dk, dv <= 128.
    """

    chunk: int
    state_key_block: int
    output_key_block: int
    value_block: int
    num_warps: int
    num_stages: int
    precision: str


def tiling(chunk: int, keys: int, values: int, dtype: torch.dtype, allow_tf32: bool = False) -> Tiling:
    """The :class:`Tiling` for chunks of ``chunk`` steps, ``keys`` x ``values`` states in ``dtype``."""
    precision = "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"
    return Tiling(
        chunk=_block(chunk),
        state_key_block=min(_block(keys), 32),
        # 16, tl.dot's smallest inner dimension, for FMA products; tensor cores (TF32) hold their
        # operands in fewer registers but spill on sm_80 with blocks of 16 (ptxas -v).
        output_key_block=32 if precision == "tf32" else 16,
        value_block=min(_block(values), 64),
        num_warps=8,
        num_stages=1,
        precision=precision,
    )


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def forward(readouts: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor, chunk: int, allow_tf32: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs and final state; ``k`` ``[N, T, K]``, ``v`` ``[N, T, V]``, ``log_decay`` ``[N, T, K or 1, 1]``."""
    rows = log_decay.shape[-2] != 1
    N, T, K = k.shape
    V = v.shape[-1]
    dtype = torch.float64 if initial.dtype == torch.float64 else torch.float32
    ACC = tl.float64 if dtype == torch.float64 else tl.float32
    tiles = tiling(chunk, K, V, dtype, allow_tf32)
    BT, BK, BV = tiles.chunk, tiles.state_key_block, tiles.value_block
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    n_chunks = triton.cdiv(T, BT)
    k, v = k.contiguous(), v.contiguous()
    g = (log_decay[..., 0] if rows else log_decay[..., 0, 0]).clamp(min=-60.0).contiguous()
    updates = torch.empty(N, n_chunks, K, V, dtype=dtype, device=k.device)
    decays = torch.empty(N, n_chunks, K, dtype=dtype, device=k.device)
    key_blocks, value_blocks = triton.cdiv(K, BK), triton.cdiv(V, BV)
    launch(chunk_states, (N * n_chunks, key_blocks, value_blocks), k, v, g, updates, decays, T, K, V, n_chunks, ROWS=rows, BT=BT, BK=BK, BV=BV, ACC=ACC, PRECISION=tiles.precision, **options)
    starts = torch.empty_like(updates)
    final = torch.empty(N, K, V, dtype=dtype, device=k.device)
    launch(pass_states, (N, key_blocks, value_blocks), initial.to(dtype).contiguous(), updates, decays, starts, final, K, V, n_chunks, BK=BK, BV=BV, ACC=ACC, **options)
    results = []
    for q in readouts:
        out = torch.empty(N, T, V, dtype=dtype, device=k.device)
        launch(chunk_outputs, (N * n_chunks, value_blocks), q.contiguous(), k, v, g, starts, out, T, K, V, n_chunks, ROWS=rows, BT=BT, BK=tiles.output_key_block, BV=BV, ACC=ACC, PRECISION=tiles.precision, **options)
        results.append(out)
    return results, final


def decayed_outer_products(readouts, inputs, log_decay, initial, chunk, allow_tf32: bool = False):
    """:func:`recdsl.backends.chunk_kernels.decayed_outer_products` with Triton kernels.

    Takes the Triton path for one input term and a decay shared by the state or by each row;
    anything else (several terms, a decay per value column) goes to the torch form.
    """
    from . import chunk_kernels

    if len(inputs) != 1 or log_decay.shape[-1] != 1:
        return chunk_kernels.decayed_outer_products(readouts, inputs, log_decay, initial, chunk)
    term = inputs[0]
    *outputs, final = DecayedOuterProducts.apply(chunk, allow_tf32, term.k, term.v, log_decay, initial, *readouts)
    return list(outputs), final


class DecayedOuterProducts(torch.autograd.Function):
    """The Triton forward; the backward differentiates the torch chunked form, recomputed."""

    @staticmethod
    def forward(ctx, chunk: int, allow_tf32: bool, k, v, log_decay, initial, *readouts):
        outputs, final = forward(list(readouts), k, v, log_decay, initial, chunk, allow_tf32)
        ctx.chunk = chunk
        ctx.save_for_backward(k, v, log_decay, initial, *readouts)
        return (*outputs, final)

    @staticmethod
    def backward(ctx, *grads):
        from .chunk_kernels import RankOneInput, decayed_outer_products

        k, v, log_decay, initial, *readouts = ctx.saved_tensors
        with torch.enable_grad():
            fresh = [t.detach().requires_grad_(t.requires_grad) for t in (k, v, log_decay, initial, *readouts)]
            fk, fv, fg, f0, *fq = fresh
            outputs, final = decayed_outer_products(fq, [RankOneInput(fk, fv)], fg, f0, ctx.chunk)
            pairs = [(o, g) for o, g in zip([*outputs, final], grads) if g is not None]
            wanted = [i for i, t in enumerate(fresh) if t.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [fresh[i] for i in wanted], [g for _, g in pairs], allow_unused=True) if wanted and pairs else ()
        result: list = [None] * len(fresh)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, None, *result)
