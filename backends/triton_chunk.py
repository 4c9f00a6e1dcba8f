"""Triton kernels for the chunked form of decayed outer products (GLA, RetNet, mLSTM, Mamba-2).

The same algorithm as :func:`recdsl.backends.chunk_kernels.decayed_outer_products`, for a
decay shared by a whole state (``[N, T, 1, 1]``) or by each row (``[N, T, K, 1]``):

1. ``chunk_states``: per chunk, the log decays accumulated inside it (``tl.cumsum``), the
   chunk's total decay and its update ``sum_s (k_s * exp(G_C - G_s))^T v_s`` (a ``tl.dot``);
2. ``pass_states``: one program per (row, key block, value block) walks the chunks in
   order, keeping the state in fp32 and writing the state each chunk starts from;
3. ``chunk_outputs``: ``o_t = (q_t * exp(G_t)) @ S_start + sum_{s <= t} A_ts v_s`` with
   ``A = (Q K^T) * exp(G_t - G_s)`` for a scalar decay, and for per-row decays
   ``A = (Q * exp(G)) (K * exp(-G))^T`` where every ``exp(-G_s)`` of the chunk stays within
   ``exp(60)``, else the exact pairwise sum over the key dimension.

Blocks are at least 16 wide so that ``tl.dot`` maps to tensor cores on a GPU.  The backward
pass recomputes the chunked form in torch under autograd (chunk-boundary states only); a
dedicated backward kernel is future work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FACTOR_LIMIT = 60.0


@triton.jit
def chunk_states(p_k, p_v, p_g, p_update, p_decay, T, K, V, n_chunks, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    i_nc = tl.program_id(0)
    i_n = i_nc // n_chunks
    i_c = i_nc % n_chunks
    o_t = i_c * BT + tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_t = o_t < T
    b_k = tl.load(p_k + (i_n * T + o_t[:, None]) * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0.0).to(ACC)
    b_v = tl.load(p_v + (i_n * T + o_t[:, None]) * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0).to(ACC)
    if ROWS:
        b_g = tl.load(p_g + (i_n * T + o_t[:, None]) * K + o_k[None, :], mask=m_t[:, None] & (o_k[None, :] < K), other=0.0).to(ACC)
    else:
        b_g = tl.load(p_g + i_n * T + o_t, mask=m_t, other=0.0).to(ACC)[:, None] + tl.zeros([BT, BK], dtype=ACC)
    b_G = tl.cumsum(b_g, axis=0)
    b_end = tl.sum(tl.where(tl.arange(0, BT)[:, None] == BT - 1, b_G, 0.0), axis=0)  # G at the chunk's last step
    b_scaled = b_k * tl.exp(b_end[None, :] - b_G)
    b_update = tl.dot(tl.trans(b_scaled), b_v)
    o_state = ((i_n * n_chunks + i_c) * K + o_k[:, None]) * V + o_v[None, :]
    tl.store(p_update + o_state, b_update, mask=(o_k[:, None] < K) & (o_v[None, :] < V))
    if tl.program_id(1) == 0:
        tl.store(p_decay + (i_n * n_chunks + i_c) * K + o_k, tl.exp(b_end), mask=o_k < K)


@triton.jit
def pass_states(p_initial, p_update, p_decay, p_starts, p_final, K, V, n_chunks, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    i_n = tl.program_id(0)
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m = (o_k[:, None] < K) & (o_v[None, :] < V)
    b_state = tl.load(p_initial + (i_n * K + o_k[:, None]) * V + o_v[None, :], mask=m, other=0.0).to(ACC)
    for i_c in range(0, n_chunks):
        o_state = ((i_n * n_chunks + i_c) * K + o_k[:, None]) * V + o_v[None, :]
        tl.store(p_starts + o_state, b_state, mask=m)
        b_decay = tl.load(p_decay + (i_n * n_chunks + i_c) * K + o_k, mask=o_k < K, other=1.0).to(ACC)
        b_state = b_decay[:, None] * b_state + tl.load(p_update + o_state, mask=m, other=0.0).to(ACC)
    tl.store(p_final + (i_n * K + o_k[:, None]) * V + o_v[None, :], b_state, mask=m)


@triton.jit
def chunk_outputs(p_q, p_k, p_v, p_g, p_starts, p_out, T, K, V, n_chunks, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr):
    i_nc = tl.program_id(0)
    i_n = i_nc // n_chunks
    i_c = i_nc % n_chunks
    o_t = i_c * BT + tl.arange(0, BT)
    o_s = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_t = o_t < T
    m_tk = m_t[:, None] & (o_k[None, :] < K)
    b_q = tl.load(p_q + (i_n * T + o_t[:, None]) * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    b_k = tl.load(p_k + (i_n * T + o_t[:, None]) * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    b_v = tl.load(p_v + (i_n * T + o_t[:, None]) * V + o_v[None, :], mask=m_t[:, None] & (o_v[None, :] < V), other=0.0).to(ACC)
    if ROWS:
        b_g = tl.load(p_g + (i_n * T + o_t[:, None]) * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    else:
        b_g = tl.load(p_g + i_n * T + o_t, mask=m_t, other=0.0).to(ACC)[:, None] + tl.zeros([BT, BK], dtype=ACC)
    b_G = tl.cumsum(b_g, axis=0)
    b_start = tl.load(p_starts + ((i_n * n_chunks + i_c) * K + o_k[:, None]) * V + o_v[None, :], mask=(o_k[:, None] < K) & (o_v[None, :] < V), other=0.0).to(ACC)
    # From the state at the chunk start.
    b_out = tl.dot(b_q * tl.exp(b_G), b_start)
    causal = o_s[:, None] >= o_s[None, :]
    if ROWS:
        b_lowest = tl.min(tl.min(b_G, axis=1), axis=0)
        b_highest = tl.max(tl.max(b_G, axis=1), axis=0)
        if (b_lowest > -60.0) & (b_highest < 60.0):
            # exp(G_t - G_s) = exp(G_t) exp(-G_s), each factor within exp(+-60).
            b_scores = tl.dot(b_q * tl.exp(b_G), tl.trans(b_k * tl.exp(-b_G)))
        else:
            # The exact pairwise form, one key dimension at a time.
            b_scores = tl.zeros([BT, BT], dtype=ACC)
            for i_k in range(0, K):
                p_col = (i_n * T + o_t) * K + i_k
                q_col = tl.load(p_q + p_col, mask=m_t, other=0.0).to(ACC)
                k_col = tl.load(p_k + p_col, mask=m_t, other=0.0).to(ACC)
                g_col = tl.sum(tl.where(o_k[None, :] == i_k, b_G, 0.0), axis=1)
                gap = tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf"))
                b_scores += q_col[:, None] * k_col[None, :] * tl.exp(gap)
    else:
        b_Gt = tl.sum(tl.where(o_k[None, :] == 0, b_G, 0.0), axis=1)  # the (shared) decay of each step
        gap = tl.where(causal, b_Gt[:, None] - b_Gt[None, :], float("-inf"))
        b_scores = tl.dot(b_q, tl.trans(b_k)) * tl.exp(gap)
    b_scores = tl.where(causal, b_scores, 0.0)
    b_out += tl.dot(b_scores, b_v)
    tl.store(p_out + (i_n * T + o_t[:, None]) * V + o_v[None, :], b_out, mask=m_t[:, None] & (o_v[None, :] < V))


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def forward(readouts: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor, chunk: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs and final state; ``k`` ``[N, T, K]``, ``v`` ``[N, T, V]``, ``log_decay`` ``[N, T, K or 1, 1]``."""
    rows = log_decay.shape[-2] != 1
    N, T, K = k.shape
    V = v.shape[-1]
    dtype = torch.float64 if initial.dtype == torch.float64 else torch.float32
    ACC = tl.float64 if dtype == torch.float64 else tl.float32
    BT = max(16, triton.next_power_of_2(chunk))
    BK, BV = _block(K), min(_block(V), 64)
    n_chunks = triton.cdiv(T, BT)
    k, v = k.contiguous(), v.contiguous()
    g = (log_decay[..., 0] if rows else log_decay[..., 0, 0]).clamp(min=-60.0).contiguous()
    updates = torch.empty(N, n_chunks, K, V, dtype=dtype, device=k.device)
    decays = torch.empty(N, n_chunks, K, dtype=dtype, device=k.device)
    chunk_states[(N * n_chunks, triton.cdiv(V, BV))](k, v, g, updates, decays, T, K, V, n_chunks, ROWS=rows, BT=BT, BK=BK, BV=BV, ACC=ACC)
    starts = torch.empty_like(updates)
    final = torch.empty(N, K, V, dtype=dtype, device=k.device)
    pass_states[(N, triton.cdiv(V, BV))](initial.to(dtype).contiguous(), updates, decays, starts, final, K, V, n_chunks, BK=BK, BV=BV, ACC=ACC)
    results = []
    for q in readouts:
        out = torch.empty(N, T, V, dtype=dtype, device=k.device)
        chunk_outputs[(N * n_chunks, triton.cdiv(V, BV))](q.contiguous(), k, v, g, starts, out, T, K, V, n_chunks, ROWS=rows, BT=BT, BK=BK, BV=BV, ACC=ACC)
        results.append(out)
    return results, final


def decayed_outer_products(readouts, inputs, log_decay, initial, chunk):
    """:func:`recdsl.backends.chunk_kernels.decayed_outer_products` with Triton kernels.

    Takes the Triton path for one input term and a decay shared by the state or by each row;
    anything else (several terms, a decay per value column) goes to the torch form.
    """
    from . import chunk_kernels

    if len(inputs) != 1 or log_decay.shape[-1] != 1:
        return chunk_kernels.decayed_outer_products(readouts, inputs, log_decay, initial, chunk)
    term = inputs[0]
    *outputs, final = DecayedOuterProducts.apply(chunk, len(readouts), term.k, term.v, log_decay, initial, *readouts)
    return list(outputs), final


class DecayedOuterProducts(torch.autograd.Function):
    """The Triton forward; the backward differentiates the torch chunked form, recomputed."""

    @staticmethod
    def forward(ctx, chunk: int, count: int, k, v, log_decay, initial, *readouts):
        outputs, final = forward(list(readouts), k, v, log_decay, initial, chunk)
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
