"""Triton kernels for the chunked delta rule (DeltaNet) and gated delta rule (Gated DeltaNet, TTT).

The same algorithm as :func:`recdsl.backends.chunk_kernels.delta_rule`: the state ``S``
(``[K, V]``, as the kernels see it) follows

    S_t = d_t S_{t-1} + l_t u_t^T,    u_t = w_t + a_t (r_t^T S_{t-1})

(``d_t = 1`` for DeltaNet).  Inside a chunk starting from ``S_0``, with ``G_t`` the log decay
accumulated from the chunk start and ``G'_t = G_{t-1}``, the ``u`` solve the unit lower
triangular system of the UT transform (Yang et al., 2024, "Parallelizing Linear Transformers
with the Delta Rule over Sequence Length"; with the decay, Yang, Kautz and Hatamizadeh,
2024, "Gated Delta Networks"):

    (I - A) U = W + diag(a e^{G'}) R S_0,   A_ts = a_t (r_t . l_s) e^{G'_t - G_s}  (s < t)

so with ``T = (I - A)^{-1}``, ``U = T W + (T diag(a e^{G'}) R) S_0 = U_w + W_r S_0``, and

    O   = (Q e^{G}) S_0 + (tril(Q L^T) * e^{G_t - G_s}) U
    S_C = e^{G_C} S_0 + (L e^{G_C - G_s})^T U.

The forward is one kernel:

1. ``delta_chunks``, one program per (row, block of 16 value columns), walking the chunks in
   order.  Per chunk, from its start state ``S_0``: ``A`` and ``R S_0`` (``tl.dot`` over key
   blocks), ``T`` by forward substitution (row ``t`` of ``T`` is ``e_t + sum_{s<t} A_ts
   T_s``, one row per step of a loop over the chunk), ``U = T (W + diag(a e^{G'}) R S_0)``,
   then ``Q L^T`` and ``Q S_0`` (a second walk over the key blocks, from cache), the
   chunk's outputs and the next state.  ``U_w`` and ``W_r`` are never formed, and nothing
   of a chunk's transform reaches memory: the kernel reads ``q``, ``k`` (and ``r``), ``v``
   and the scalars once and writes the read-outs, the final state and, when gradients are
   wanted, each chunk's start state and ``U`` (both read by the backward).  The state's
   columns of this value block are kept in fp32 in the final state's buffer (a few KB per
   program, which stay in cache) and walked in key blocks of 16 rows, so that no product
   holds more than a ``[C, 16]`` or ``[16, C]`` operand per thread besides ``T`` (fp32
   products run on FMA units).  Each value block's program forms its chunks' ``T`` itself
   (``V / 16`` programs per row: more programs to fill the machine, the same ``T`` formed
   that many times).  The kernel also notes, per row, whether a read-out entry is infinite
   (:func:`delta_rule` splits such read-outs, as
   :func:`recdsl.backends.chunk_kernels.with_infinite_readouts` does, without a pass over
   the finite ones).

Every exponent is a decay accumulated forward from a step to a later one inside one chunk
(at most 0), so nothing overflows whatever T; each step's log decay is clamped at -60 as
in the torch form.  Float32 products are exact (``input_precision="ieee"``) unless the
caller passes ``allow_tf32=True``; bfloat16/float16 keys and queries enter the ``tl.dot``
of ``R L^T`` and ``Q L^T`` as they are, accumulated in fp32, and every other product is in
fp32.  Offsets that count over rows or chunks are 64-bit.

The backward pass is two more kernels (:func:`backward`), from each chunk's start state and
``U``, written by ``delta_chunks`` when gradients are wanted:

2. ``delta_adjoint_chunks``, one program per (row, value block), the chunks in reverse:
   the state's adjoint ``dS`` (its value columns never mix, as the state's), with
   ``dU = M^T dO + (L e^{G_C - G_s}) dS`` and ``dS_0 = e^{G_C} dS + (Q e^G)^T dO + W_r^T dU``,
   ``W_r^T dU = (diag(a e^{G'}) R)^T T^T dU`` with the chunk's ``T`` formed again;
   writes ``dU`` and ``dS`` at each chunk's end, and the initial state's gradient.
3. ``delta_gradients``, one program per (row, chunk), all chunks at once: the UT transform
   recomputed, then every input's gradient of the chunk (see the kernel's comments).

Several read-outs of one state (or none) differentiate
:func:`recdsl.backends.chunk_kernels.delta_rule`, recomputed in torch under autograd.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_chunk import _dense_last, _floored, _row, _strides, _with_heads, _written_like
from .triton_launch import launch

# The most key rows the kernels take (dk <= 128 compiles without spills; see tiling()).
_MAX_KEYS = 128

# Triton's interpreter (3.9) multiplies bfloat16 tiles as their raw 16-bit patterns, so there
# bfloat16 keys and queries are widened to float32 before the kernels (the same values, the
# products a GPU's bfloat16 tl.dot accumulates in float32).  Decided when the module is
# imported, as @triton.jit decides whether its kernels are interpreted.
_BFLOAT16_DOT = os.environ.get("TRITON_INTERPRET") != "1"


def _operand_dtype(left: torch.Tensor, right: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype keys and queries enter the kernels' ``tl.dot`` in: their own when both sides
    of the map are bfloat16 or both float16 (fp32 accumulation), else ``dtype``, the state's."""
    if left.dtype in (torch.bfloat16, torch.float16) and right.dtype == left.dtype:
        return left.dtype if left.dtype == torch.float16 or _BFLOAT16_DOT else dtype
    return dtype


@triton.jit
def _unit_lower_inverse(b_A, o_t, BT: tl.constexpr, ACC: tl.constexpr):
    """T = (I - A)^{-1} for a strictly lower triangular ``[BT, BT]`` block A, by forward
    substitution: row t is e_t + sum_{s<t} A_ts T_s, and the rows s < t are final when row t
    is formed."""
    b_inv = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0).to(ACC)
    for i_t in range(1, BT):
        b_row = tl.sum(tl.where(o_t[:, None] == i_t, b_A, 0.0), axis=0)  # A_{t, :}
        b_new = tl.sum(b_row[:, None] * b_inv, axis=0)
        b_inv = tl.where(o_t[:, None] == i_t, b_inv + b_new[None, :], b_inv)
    return b_inv


@triton.jit
def delta_chunks(p_q, p_l, p_r, p_w, p_c, p_a, p_g, p_initial, p_out, p_state, p_starts, p_u, p_infinite, T, K, V, n_chunks, H, s0_n, s0_k, s0_v, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sr_b, sr_h, sr_t, sw_b, sw_h, sw_t, sc_b, sc_h, sc_t, sa_b, sa_h, sa_t, sg_b, sg_h, sg_t, sout_b, sout_h, sout_t, SCALED: tl.constexpr, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, KEEP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, value block), the chunks in order; each chunk's UT transform is
    # formed here, beside the state that needs it (U reaches memory only when kept for the
    # backward kernels, with the chunks' start states).  The state's
    # columns of this value block live in p_state (the final state's buffer, cached on chip)
    # between chunks and are walked in key blocks of BK rows, so every product's inner
    # dimension is BK, BT or BV: an fp32 tl.dot on FMA units holds whole rows and columns of
    # its operands.  Per chunk, from its start state S_0:
    #     A = diag(a) tril(R L^T, -1) (* e^{G'_t - G_s}),   T = (I - A)^{-1},
    #     U = T (W + diag(a e^{G'}) R S_0),
    #     O = (Q e^G) S_0 + (tril(Q L^T) * e^{G_t - G_s}) U,   S_C = e^{G_C} S_0 + (L e^{G_C - G_s})^T U.
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_l += _row(i_n, H, sl_b, sl_h)
    p_r += _row(i_n, H, sr_b, sr_h)
    p_w += _row(i_n, H, sw_b, sw_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the input is W = diag(c) w, w read from p_w
    p_a += _row(i_n, H, sa_b, sa_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_out += _row(i_n, H, sout_b, sout_h)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_t = tl.arange(0, BT)
    strict = o_t[:, None] > o_t[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    o_state = i_n * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_kv = (o_k[:, None] < K) & m_v[None, :]
        # (the initial state through its strides: a broadcast one is read where it lies)
        b_s = tl.load(p_initial + i_n * s0_n + o_k[:, None] * s0_k + o_v[None, :] * s0_v, mask=m_kv, other=0.0).to(ACC)
        tl.store(p_state + o_state + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
    tl.debug_barrier()
    # Whether a read-out entry is infinite, found as they are read (chunk_kernels.with_infinite_readouts
    # splits such read-outs; the count spares it a pass over them).
    b_infinite = tl.sum(tl.zeros([BT], dtype=tl.int32), axis=0)
    for i_c in range(0, n_chunks):
        o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n
        m_t = i_c * BT + o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        b_a = tl.load(p_a + o_c * sa_t + o_t * sa_t, mask=m_t, other=0.0).to(ACC)
        if GATED:
            b_g = _floored(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC))
            b_G = tl.cumsum(b_g, axis=0)
            b_Gp = b_G - b_g  # G_{t-1}: the decay from the chunk start to the step before t
            b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)  # G_C (padding steps carry the state)
            b_b = b_a * tl.exp(b_Gp)
        else:
            b_b = b_a
        # The UT transform first, while few tiles are live: R L^T and R S_0 (S_0 kept for the backward).
        b_A = tl.zeros([BT, BT], dtype=ACC)
        b_rs = tl.zeros([BT, BV], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            if KEEP:
                tl.store(p_starts + (i_n * n_chunks + i_c) * K * V + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
            if SAME_SIDES:  # DeltaNet's k (I - beta k k^T): one vector read once
                b_r = b_l
            else:
                b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0)
            b_A += tl.dot(b_r, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
            b_rs += tl.dot(b_r.to(ACC), b_s, input_precision=PRECISION)
        b_A = b_A * b_a[:, None]
        if GATED:
            # e^{G'_t - G_s} for s < t (masked pairs never meet exp: their gap may be positive).
            b_A = b_A * tl.exp(tl.where(strict, b_Gp[:, None] - b_G[None, :], float("-inf")))
        b_A = tl.where(strict, b_A, 0.0)
        # T = (I - A)^{-1} (A is strictly lower triangular)
        b_inv = _unit_lower_inverse(b_A, o_t, BT, ACC)
        b_w = tl.load(p_w + o_c * sw_t + o_t[:, None] * sw_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        if SCALED:
            b_w = b_w * tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)[:, None]
        b_u = tl.dot(b_inv, b_w + b_b[:, None] * b_rs, input_precision=PRECISION)
        if KEEP:  # for the backward kernels: U, and the chunk's start state (above)
            tl.store(p_u + (i_n * T + i_c * BT) * V + o_t[:, None] * V + o_v[None, :], b_u, mask=m_tv)
        # The read-outs: Q L^T and Q S_0, a second walk over the key blocks (from cache).
        b_scores = tl.zeros([BT, BT], dtype=ACC)
        b_out = tl.zeros([BT, BV], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
            b_infinite = tl.maximum(b_infinite, tl.max(tl.max(tl.where(tl.abs(b_q.to(ACC)) == float("inf"), 1, 0), axis=1), axis=0))
            b_scores += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
            b_out += tl.dot(b_q.to(ACC), b_s, input_precision=PRECISION)
        if GATED:
            b_out = b_out * tl.exp(b_G)[:, None]
            b_scores = b_scores * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        else:
            b_scores = tl.where(causal, b_scores, 0.0)
        b_out += tl.dot(b_scores, b_u, input_precision=PRECISION)
        tl.store(p_out + o_c * sout_t + o_t[:, None] * sout_t + o_v[None, :], b_out, mask=m_tv)
        tl.debug_barrier()  # every thread has read S_0 before it is overwritten
        # S_C = e^{G_C} S_0 + (L e^{G_C - G_s})^T U.
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if GATED:
                b_s = b_s * tl.exp(b_end) + tl.dot(tl.trans(b_l * tl.exp(b_end - b_G)[:, None]), b_u, input_precision=PRECISION)
            else:
                b_s += tl.dot(tl.trans(b_l), b_u, input_precision=PRECISION)
            tl.store(p_state + o_state + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
        tl.debug_barrier()  # the next chunk reads the state in another layout
    tl.store(p_infinite + i_n, b_infinite, mask=i_v == 0)


@triton.jit
def delta_adjoint_chunks(p_q, p_l, p_r, p_a, p_g, p_dout, p_dfinal, p_dstate, p_dends, p_du, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sr_b, sr_h, sr_t, sa_b, sa_h, sa_t, sg_b, sg_h, sg_t, sdout_b, sdout_h, sdout_t, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # The adjoint of the state, carried backwards over the chunks: one program per (row, value
    # block), as delta_chunks (the adjoint's columns, like the state's, never mix).  With
    # dS the adjoint of the chunk's end state S_C,
    #     dU   = M^T dO + (L e^{G_C - G_s}) dS,           M = tril(Q L^T) e^{G_t - G_s}
    #     dS_0 = e^{G_C} dS + (Q e^G)^T dO + (diag(b) R)^T T^T dU    (b = a e^{G'}),
    # the last term U's dependence on S_0 (U = T (W + diag(b) R S_0)), with the chunk's
    # T = (I - A)^{-1} formed again here as in delta_chunks.  dS (kept in p_dstate, the
    # initial state's gradient at the end) is stored at each chunk's end for
    # delta_gradients, and so is dU (the kernels' own [N, T, V] buffer).
    i_n = tl.program_id(0).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_l += _row(i_n, H, sl_b, sl_h)
    p_r += _row(i_n, H, sr_b, sr_h)
    p_a += _row(i_n, H, sa_b, sa_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_t = tl.arange(0, BT)
    strict = o_t[:, None] > o_t[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    o_state = i_n * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_kv = (o_k[:, None] < K) & m_v[None, :]
        b_ds = tl.load(p_dfinal + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(ACC)
        tl.store(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], b_ds, mask=m_kv)
    tl.debug_barrier()
    for i_r in range(0, n_chunks):
        i_c = n_chunks - 1 - i_r
        o_row = i_n * T + i_c * BT
        o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n
        m_t = i_c * BT + o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        b_a = tl.load(p_a + o_c * sa_t + o_t * sa_t, mask=m_t, other=0.0).to(ACC)
        if GATED:
            b_g = _floored(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC))
            b_G = tl.cumsum(b_g, axis=0)
            b_Gp = b_G - b_g
            b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
            b_b = b_a * tl.exp(b_Gp)
        else:
            b_b = b_a
        b_du = tl.zeros([BT, BV], dtype=ACC)
        b_scores = tl.zeros([BT, BT], dtype=ACC)
        b_A = tl.zeros([BT, BT], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_ds = tl.load(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            tl.store(p_dends + (i_n * n_chunks + i_c) * K * V + o_k[:, None] * V + o_v[None, :], b_ds, mask=m_kv)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
            if SAME_SIDES:
                b_r = b_l
            else:
                b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0)
            b_scores += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
            b_A += tl.dot(b_r, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
            b_lf = b_l.to(ACC)
            if GATED:
                b_lf = b_lf * tl.exp(b_end - b_G)[:, None]
            b_du += tl.dot(b_lf, b_ds, input_precision=PRECISION)
        if GATED:
            b_scores = b_scores * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        else:
            b_scores = tl.where(causal, b_scores, 0.0)
        b_dout = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_du += tl.dot(tl.trans(b_scores), b_dout, input_precision=PRECISION)
        tl.store(p_du + o_row * V + o_t[:, None] * V + o_v[None, :], b_du, mask=m_tv)
        # T = (I - A)^{-1}, as in delta_chunks; then T^T dU, which U's S_0 term passes back.
        b_A = b_A * b_a[:, None]
        if GATED:
            b_A = b_A * tl.exp(tl.where(strict, b_Gp[:, None] - b_G[None, :], float("-inf")))
        b_A = tl.where(strict, b_A, 0.0)
        b_inv = _unit_lower_inverse(b_A, o_t, BT, ACC)
        b_dz = tl.dot(tl.trans(b_inv), b_du, input_precision=PRECISION)
        tl.debug_barrier()
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_ds = tl.load(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if SAME_SIDES:
                b_r = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            else:
                b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if GATED:
                b_ds = b_ds * tl.exp(b_end)
                b_q = b_q * tl.exp(b_G)[:, None]
            b_ds += tl.dot(tl.trans(b_q), b_dout, input_precision=PRECISION)
            b_ds += tl.dot(tl.trans(b_r * b_b[:, None]), b_dz, input_precision=PRECISION)
            tl.store(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], b_ds, mask=m_kv)
        tl.debug_barrier()


@triton.jit
def delta_gradients(p_q, p_l, p_r, p_a, p_g, p_w, p_c, p_u, p_du, p_dout, p_starts, p_dends, p_dq, p_dl, p_dr, p_da, p_dw, p_dc, p_dg, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sr_b, sr_h, sr_t, sa_b, sa_h, sa_t, sg_b, sg_h, sg_t, sw_b, sw_h, sw_t, sc_b, sc_h, sc_t, sdout_b, sdout_h, sdout_t, sdq_b, sdq_h, sdq_t, sdl_b, sdl_h, sdl_t, sdr_b, sdr_h, sdr_t, sda_b, sda_h, sda_t, sdw_b, sdw_h, sdw_t, sdc_b, sdc_h, sdc_t, sdg_b, sdg_h, sdg_t, SCALED: tl.constexpr, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, chunk), all chunks at once: the gradients of the chunk's inputs
    # from its start state S_0 and U (stored by delta_chunks), the adjoint dS of its end state
    # and dU (delta_adjoint_chunks).  The UT transform T = (I - A)^{-1} is formed again as
    # in delta_chunks.  The chain, backwards through the forward's equations:
    #     U = T Z, Z = W + diag(b) R S_0   (b = a e^{G'}; U_w = T W, W_r = T diag(b) R)
    #     dZ = T^T dU (dW = dZ), d(diag(b) R) = dZ S_0^T = T^T dW_r with dW_r = dU S_0^T,
    #     dA = T^T (dU Z^T) T^T = dZ U^T (d(X^{-1}) = -X^{-1} dX X^{-1} with X = I - A),
    # and every decay factor e^{x} passes x's gradient (factor * its adjoint) to the G it
    # names; G = cumsum(g) hands dg the reverse cumulative sum of dG.  The phases are ordered
    # so that at most three [BT, BT] tiles are live at once (R L^T and Q L^T are formed
    # twice rather than kept): a float32 tl.dot on FMA units holds whole operand rows.
    i_nc = tl.program_id(0)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense;
    # U and dU are the kernels' own [N, T, V] buffers.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_l += _row(i_n, H, sl_b, sl_h)
    p_r += _row(i_n, H, sr_b, sr_h)
    p_a += _row(i_n, H, sa_b, sa_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_w += _row(i_n, H, sw_b, sw_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    p_dq += _row(i_n, H, sdq_b, sdq_h)
    p_dl += _row(i_n, H, sdl_b, sdl_h)
    p_dr += _row(i_n, H, sdr_b, sdr_h)
    p_da += _row(i_n, H, sda_b, sda_h)
    p_dw += _row(i_n, H, sdw_b, sdw_h)
    # SCALED: the input is W = diag(c) w (w at p_w): dw = diag(c) dW and dc = rowsum(dW * w).
    p_c += _row(i_n, H, sc_b, sc_h)
    p_dc += _row(i_n, H, sdc_b, sdc_h)
    p_dg += _row(i_n, H, sdg_b, sdg_h)
    i_c = i_nc % n_chunks
    o_row = i_n * T + i_c * BT
    o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n
    o_state = (i_n * n_chunks + i_c) * K * V
    o_t = tl.arange(0, BT)
    m_t = i_c * BT + o_t < T
    strict = o_t[:, None] > o_t[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    b_a = tl.load(p_a + o_c * sa_t + o_t * sa_t, mask=m_t, other=0.0).to(ACC)
    if GATED:
        b_graw = tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC)
        b_G = tl.cumsum(_floored(b_graw), axis=0)
        b_Gp = b_G - _floored(b_graw)
        b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
        b_b = b_a * tl.exp(b_Gp)
    else:
        b_b = b_a
    # T = (I - A)^{-1}, as in delta_chunks.
    b_A = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
        if SAME_SIDES:
            b_r = b_l
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0)
        b_A += tl.dot(b_r, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
    b_A = b_A * b_a[:, None]
    if GATED:
        b_A = b_A * tl.exp(tl.where(strict, b_Gp[:, None] - b_G[None, :], float("-inf")))
    b_A = tl.where(strict, b_A, 0.0)
    b_inv = _unit_lower_inverse(b_A, o_t, BT, ACC)
    # dA = T^T dT T^T with dT = dU Z^T (U = T Z, Z = W + diag(b) R S_0) is dZ U^T, where
    # dZ = T^T dU (dW = dZ): products of inner dimension BV or BK only, and no W_r.
    b_dA = tl.zeros([BT, BT], dtype=ACC)
    b_dc = tl.zeros([BT], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_du = tl.load(p_du + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_w = tl.load(p_w + o_c * sw_t + o_t[:, None] * sw_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_dw = tl.dot(tl.trans(b_inv), b_du, input_precision=PRECISION)
        if SCALED:
            b_c = tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)
            b_dc += tl.sum(b_dw * b_w, axis=1)
            b_w = b_w * b_c[:, None]
            tl.store(p_dw + o_c * sdw_t + o_t[:, None] * sdw_t + o_v[None, :], b_dw * b_c[:, None], mask=m_tv)
        else:
            tl.store(p_dw + o_c * sdw_t + o_t[:, None] * sdw_t + o_v[None, :], b_dw, mask=m_tv)
        b_u = tl.load(p_u + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_dA += tl.dot(b_dw, tl.trans(b_u), input_precision=PRECISION)
    if SCALED:
        tl.store(p_dc + o_c * sdc_t + o_t * sdc_t, b_dc, mask=m_t)
    # Key blocks: dW_r = dU S_0^T (W_r = T diag(b) R), dR's part diag(b) T^T dW_r, db.
    b_db = tl.zeros([BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_dwr = tl.zeros([BT, BK], dtype=ACC)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v[None, :] < V)
            b_s = tl.load(p_starts + o_state + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & (o_v[None, :] < V), other=0.0).to(ACC)
            b_du = tl.load(p_du + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
            b_dwr += tl.dot(b_du, tl.trans(b_s), input_precision=PRECISION)
        if SAME_SIDES:
            b_r = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_dB = tl.dot(tl.trans(b_inv), b_dwr, input_precision=PRECISION)
        b_db += tl.sum(b_r * b_dB, axis=1)
        tl.store(p_dr + o_c * sdr_t + o_t[:, None] * sdr_t + o_k[None, :], b_dB * b_b[:, None], mask=m_tk)
    # A = diag(a) tril(R L^T, -1) e^{G'_t - G_s}: dA passes to a, G', G and R L^T.
    b_dA = tl.where(strict, b_dA, 0.0)
    b_dG = tl.zeros([BT], dtype=ACC)
    if GATED:
        b_dA = b_dA * tl.exp(tl.where(strict, b_Gp[:, None] - b_G[None, :], float("-inf")))
        b_da = b_db * tl.exp(b_Gp)
        b_dGp = b_db * b_b
    else:
        b_da = b_db
    b_Araw = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
        if SAME_SIDES:
            b_r = b_l
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0)
        b_Araw += tl.dot(b_r, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
    b_y = b_dA * b_Araw
    b_da += tl.sum(b_y, axis=1)
    if GATED:
        b_y = b_y * b_a[:, None]
        b_dGp += tl.sum(b_y, axis=1)
        b_dG -= tl.sum(b_y, axis=0)
    b_dAraw = b_dA * b_a[:, None]
    tl.store(p_da + o_c * sda_t + o_t * sda_t, b_da, mask=m_t)
    tl.debug_barrier()  # dr's first part, stored above, is read back by other threads
    # A's part of dr and dl (dl's first part: kept in its buffer).
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        if SAME_SIDES:
            b_r = b_l
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_dr = tl.load(p_dr + o_c * sdr_t + o_t[:, None] * sdr_t + o_k[None, :], mask=m_tk, other=0.0) + tl.dot(b_dAraw, b_l, input_precision=PRECISION)
        if SAME_SIDES:  # one vector on both sides: p_dr is p_dl, its gradient the sum of both
            tl.store(p_dl + o_c * sdl_t + o_t[:, None] * sdl_t + o_k[None, :], b_dr + tl.dot(tl.trans(b_dAraw), b_r, input_precision=PRECISION), mask=m_tk)
        else:
            tl.store(p_dr + o_c * sdr_t + o_t[:, None] * sdr_t + o_k[None, :], b_dr, mask=m_tk)
            tl.store(p_dl + o_c * sdl_t + o_t[:, None] * sdl_t + o_k[None, :], tl.dot(tl.trans(b_dAraw), b_r, input_precision=PRECISION), mask=m_tk)
    # The read-outs' scores: dP = (dO U^T) masked and decayed as the scores Q L^T were.
    b_P = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
        b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0)
        b_P += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
    b_dP = tl.zeros([BT, BT], dtype=ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_dout = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_u = tl.load(p_u + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_dP += tl.dot(b_dout, tl.trans(b_u), input_precision=PRECISION)
    if GATED:
        b_dP = tl.where(causal, b_dP * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf"))), 0.0)
        b_x = b_dP * b_P  # the adjoint of G_t - G_s through e^{G_t - G_s}
        b_dG += tl.sum(b_x, axis=1) - tl.sum(b_x, axis=0)
    else:
        b_dP = tl.where(causal, b_dP, 0.0)
    # Key blocks: dq, dl and dr, with the state terms dO S_0^T and U dS^T.
    b_dend = tl.sum(tl.zeros([BT], dtype=ACC), axis=0)
    tl.debug_barrier()  # dl's first part, stored above, is read back by other threads
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_dqs = tl.zeros([BT, BK], dtype=ACC)  # dO S_0^T
        b_uds = tl.zeros([BT, BK], dtype=ACC)  # U dS^T
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v[None, :] < V)
            m_kv = m_k[:, None] & (o_v[None, :] < V)
            b_s = tl.load(p_starts + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(ACC)
            b_ds = tl.load(p_dends + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(ACC)
            b_dout = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
            b_u = tl.load(p_u + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
            b_dqs += tl.dot(b_dout, tl.trans(b_s), input_precision=PRECISION)
            b_uds += tl.dot(b_u, tl.trans(b_ds), input_precision=PRECISION)
            if GATED:
                b_dend += tl.sum(tl.sum(b_s * b_ds, axis=1), axis=0) * tl.exp(b_end)
        b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        if GATED:
            b_dqs = b_dqs * tl.exp(b_G)[:, None]
            b_uds = b_uds * tl.exp(b_end - b_G)[:, None]
            b_dG += tl.sum(b_q * b_dqs, axis=1)
            b_f = tl.sum(b_l * b_uds, axis=1)
            b_dG -= b_f
            b_dend += tl.sum(b_f, axis=0)
        b_dq = b_dqs + tl.dot(b_dP, b_l, input_precision=PRECISION)
        b_dl = tl.load(p_dl + o_c * sdl_t + o_t[:, None] * sdl_t + o_k[None, :], mask=m_tk, other=0.0) + b_uds + tl.dot(tl.trans(b_dP), b_q, input_precision=PRECISION)
        tl.store(p_dq + o_c * sdq_t + o_t[:, None] * sdq_t + o_k[None, :], b_dq, mask=m_tk)
        tl.store(p_dl + o_c * sdl_t + o_t[:, None] * sdl_t + o_k[None, :], b_dl, mask=m_tk)
    if GATED:
        # G'_t = G_t - g_t; G_C is G at the chunk's last row (padding rows add g = 0).
        b_dG += tl.where(o_t == BT - 1, b_dend, 0.0)
        b_total = b_dG + b_dGp
        b_dg = tl.sum(b_total, axis=0) - tl.cumsum(b_total, axis=0) + b_total - b_dGp
        tl.store(p_dg + o_c * sdg_t + o_t * sdg_t, tl.where(b_graw >= -60.0, b_dg, 0.0), mask=m_t)


@dataclass(frozen=True)
class DeltaTiling:
    """Block sizes and launch options of the delta-rule kernels.

    ``chunk``: steps per chunk (``BT``, 16 to 64: the forward substitution walks its rows);
    ``gradient_block``: the key and value blocks ``delta_gradients`` walks ``R``, ``L``,
    ``W`` and ``dU`` in; ``key_block``: the state rows ``delta_chunks`` and
    ``delta_adjoint_chunks`` walk in; ``value_block``: the state's columns per program of
    those two (16: with 32, ``delta_chunks``, which holds ``T``, ``Q L^T`` and ``R S_0``,
    spills on sm_90).
    ``precision``: ``tl.dot``'s ``input_precision``, ``"ieee"`` unless TF32 was asked for.
    """

    chunk: int
    gradient_block: int
    key_block: int
    value_block: int
    num_warps: int
    num_stages: int
    precision: str
    gradient_warps: int = 8


def tiling(chunk: int, keys: int, values: int, dtype: torch.dtype, allow_tf32: bool = False, steps: int | None = None) -> DeltaTiling:
    """The :class:`DeltaTiling` for chunks of ``chunk`` steps and ``keys x values`` states (``keys <= 128``).

    The kernels' chunk is at most 64 steps, and no longer than a sequence of ``steps``: the
    delta rule's values do not depend on where the chunks fall, and the forward substitution
    walks every row of a chunk."""
    precision = "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"
    return DeltaTiling(
        chunk=min(_block(chunk), 64, _block(steps or chunk)),
        gradient_block=16,
        key_block=16,
        value_block=16,
        num_warps=8,
        num_stages=1,
        precision=precision,
    )


def supports(keys: int) -> bool:
    """Whether the kernels take states of ``keys`` rows (in their orientation): at most 128."""
    return keys <= _MAX_KEYS


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def forward(
    readouts: list[torch.Tensor],
    left: torch.Tensor,
    right: torch.Tensor,
    coefficient: torch.Tensor,
    inputs: list[torch.Tensor],
    initial: torch.Tensor,
    chunk: int,
    log_decay: torch.Tensor | None = None,
    allow_tf32: bool = False,
    input_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs ``q_t @ S_t`` and the final state (see :func:`_forward`)."""
    outputs, final, _, _ = _forward(readouts, left, right, coefficient, inputs, initial, chunk, log_decay, allow_tf32, input_scale=input_scale)
    return outputs, final


@dataclass(frozen=True)
class Saved:
    """What :func:`backward` needs from the forward pass: each chunk's start state
    (``starts``, ``[N, n_chunks, K, V]``) and ``U`` (``[N, T, V]``), in the kernels' dtype
    (the backward kernels form each chunk's UT transform and ``W_r`` again)."""

    starts: torch.Tensor
    u: torch.Tensor


def _forward(
    readouts: list[torch.Tensor],
    left: torch.Tensor,
    right: torch.Tensor,
    coefficient: torch.Tensor,
    inputs: list[torch.Tensor],
    initial: torch.Tensor,
    chunk: int,
    log_decay: torch.Tensor | None = None,
    allow_tf32: bool = False,
    keep: bool = False,
    input_scale: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor, Saved | None, torch.Tensor]:
    """Read-outs ``q_t @ S_t``, the final state, what the backward kernels need (``keep``)
    and, per read-out and row, 1 where the read-out has an infinite entry (int32
    ``[len(readouts), N]``), by the Triton kernels; the arguments of
    :func:`recdsl.backends.chunk_kernels.delta_rule` (``left``, ``right`` ``[N, T, K]``,
    ``coefficient`` and ``log_decay`` ``[N, T]``, inputs ``[N, T, V]``, ``initial``
    ``[N, K, V]``), or each sequence with the heads on an axis of their own (``[B, H, T, ...]``,
    ``N = B H``; read in place through their strides, read-outs laid out ``[B, T, H, V]``).
    Keys and queries in bfloat16/float16 are read as such; everything else is computed in
    float32 (float64 for a float64 state).  ``input_scale`` (``[N, T]``, one input): the
    input is ``input_scale[..., None] * inputs[0]``, formed inside ``delta_chunks`` (the
    delta rule's ``beta v``), never in memory."""
    flat = left.dim() == 3
    readouts = [_with_heads(q, 3) for q in readouts]
    left_given = left
    left = _with_heads(left, 3)
    right = left if right is left_given else _with_heads(right, 3)
    coefficient = _with_heads(coefficient, 2)
    inputs = [_with_heads(w, 3) for w in inputs]
    log_decay = None if log_decay is None else _with_heads(log_decay, 2)
    scaled = input_scale is not None
    assert not scaled or len(inputs) == 1, "an input scale goes with one input"
    B, H, T, K = left.shape
    N = B * H
    V = initial.shape[-1]
    assert supports(K), f"the delta-rule kernels take at most {_MAX_KEYS} key rows"
    dtype = torch.float64 if initial.dtype == torch.float64 else torch.float32
    ACC = tl.float64 if dtype == torch.float64 else tl.float32
    tiles = tiling(chunk, K, V, dtype, allow_tf32, steps=T)
    BT = tiles.chunk
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    n_chunks = triton.cdiv(T, BT)
    device = left.device
    low = _operand_dtype(left, right, dtype)
    same_sides = right is left
    left = _dense_last(left.to(low))
    right = left if same_sides else _dense_last(right.to(low))
    w = None
    for term in inputs:
        w = term if w is None else w + term
    w = _dense_last(w if w is not None else torch.zeros(B, H, T, V, dtype=dtype, device=device))
    a = coefficient
    gated = log_decay is not None
    g = log_decay if gated else a  # (not read when not gated)
    c = _with_heads(input_scale, 2) if scaled else a  # (not read when not scaled)
    start = initial.to(dtype).reshape(N, K, V)  # read through its strides (often a broadcast zero state)
    results = []
    final = torch.empty(N, K, V, dtype=dtype, device=device)
    grid = (N, triton.cdiv(V, tiles.value_block))
    # The backward kernels' chunk start states and U, written by the first pass (only when kept).
    saved = Saved(torch.empty(N, n_chunks, K, V, dtype=dtype, device=device), torch.empty(N, T, V, dtype=dtype, device=device)) if keep else None
    starts, u = (saved.starts, saved.u) if keep else (final, final)  # (not written when not kept)
    # Per read-out and row: 1 where the read-out has an infinite entry (zeros: a launch that is
    # recorded, not run, finds none).
    infinite = torch.zeros(max(len(readouts), 1), N, dtype=torch.int32, device=device)
    if not readouts:
        readouts = [torch.zeros(B, H, T, K, dtype=low, device=device)]
        outputs_wanted = False
    else:
        outputs_wanted = True
    for i, q in enumerate(readouts):
        # One pass over the chunks per read-out (each recomputes the same states; cells read a
        # delta-rule state out once).
        out = torch.empty(B, T, H, V, dtype=dtype, device=device).transpose(1, 2)
        q = _dense_last(q.to(low))
        sequences = (q, left, right, w, c, a, g, out)
        launch(
            delta_chunks, grid, q, left, right, w, c, a, g, start, out, final, starts, u, infinite[i], T, K, V, n_chunks, H, *start.stride(), *(stride for x in sequences for stride in _strides(x)),
            SCALED=scaled, GATED=gated, SAME_SIDES=same_sides, KEEP=keep and i == 0, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options,
        )
        if outputs_wanted:
            results.append(out.squeeze(1) if flat else out)
    return results, final, saved, infinite[: len(results)]


def backward(
    readout: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    coefficient: torch.Tensor,
    w: torch.Tensor,
    log_decay: torch.Tensor | None,
    saved: Saved,
    d_output: torch.Tensor,
    d_final: torch.Tensor,
    chunk: int,
    allow_tf32: bool = False,
    input_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, ...]:
    """The gradients of one read-out's delta rule by the backward kernels: ``(dq, dleft,
    dright, dcoefficient, dw, dlog_decay, dinitial, dinput_scale)`` (the last None without
    ``input_scale``; with it, ``dw`` is the gradient of the unscaled input) (``dlog_decay`` None when not gated;
    ``dright`` None when ``right is left``, whose one gradient ``dleft`` then is),
    from ``d_output`` (``[N, T, V]``), ``d_final`` (``[N, K, V]``) and what :func:`_forward`
    kept.  ``delta_adjoint_chunks`` carries the state's adjoint over the chunks in reverse,
    then ``delta_gradients`` forms every chunk's gradients at once.  Computed in float32
    (float64 for a float64 state); the caller casts them to its inputs' dtypes.  Sequences
    may be ``[B, H, T, ...]`` as in :func:`_forward`; each gradient comes in the shape and,
    where that is dense, the layout of what it belongs to."""
    left_given = left
    left = _with_heads(left, 3)
    right = left if right is left_given else _with_heads(right, 3)
    readout, coefficient, w, d_output = _with_heads(readout, 3), _with_heads(coefficient, 2), _with_heads(w, 3), _with_heads(d_output, 3)
    log_decay = None if log_decay is None else _with_heads(log_decay, 2)
    scaled = input_scale is not None
    B, H, T, K = left.shape
    N = B * H
    V = w.shape[-1]
    dtype = saved.starts.dtype
    ACC = tl.float64 if dtype == torch.float64 else tl.float32
    tiles = tiling(chunk, K, V, dtype, allow_tf32, steps=T)
    BT = tiles.chunk
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    n_chunks = triton.cdiv(T, BT)
    device = left.device
    low = _operand_dtype(left, right, dtype)
    same_sides = right is left
    left = _dense_last(left.to(low))
    right = left if same_sides else _dense_last(right.to(low))
    q = _dense_last(readout.to(low))
    gated = log_decay is not None
    a = coefficient
    g = log_decay if gated else a  # (not read when not gated)
    d_output = _dense_last(d_output.to(dtype))
    w = _dense_last(w)  # as it is: the kernel converts a low-precision w as it loads it
    d_initial = torch.empty(N, K, V, dtype=dtype, device=device)
    d_ends = torch.empty(N, n_chunks, K, V, dtype=dtype, device=device)
    du = torch.empty(N, T, V, dtype=dtype, device=device)
    grid = (N, triton.cdiv(V, tiles.value_block))
    launch(
        delta_adjoint_chunks, grid, q, left, right, a, g, d_output, d_final.to(dtype).contiguous(), d_initial, d_ends, du, T, K, V, n_chunks, H,
        *_strides(q), *_strides(left), *_strides(right), *_strides(a), *_strides(g), *_strides(d_output), GATED=gated, SAME_SIDES=same_sides, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options,
    )
    dq, dl = _written_like(q, dtype), _written_like(left, dtype)
    dr = dl if same_sides else _written_like(right, dtype)
    da, dg = _written_like(a, dtype), _written_like(g, dtype)
    dw = _written_like(w, dtype)
    c = _with_heads(input_scale, 2) if scaled else a  # (not read when not scaled)
    dc = _written_like(c, dtype) if scaled else da  # (not written when not scaled)
    sequences = (q, left, right, a, g, w, c, d_output, dq, dl, dr, da, dw, dc, dg)
    launch(
        delta_gradients, (N * n_chunks,), q, left, right, a, g, w, c, saved.u, du, d_output, saved.starts, d_ends, dq, dl, dr, da, dw, dc, dg, T, K, V, n_chunks, H,
        *(stride for x in sequences for stride in _strides(x)), SCALED=scaled, GATED=gated, SAME_SIDES=same_sides, BT=BT, BK=tiles.gradient_block, BV=tiles.gradient_block, ACC=ACC, PRECISION=tiles.precision, num_warps=tiles.gradient_warps, num_stages=tiles.num_stages,
    )
    return dq, dl, None if same_sides else dr, da, dw, dg if gated else None, d_initial, dc if scaled else None


def delta_rule(
    readouts: list[torch.Tensor],
    left: torch.Tensor,
    right: torch.Tensor,
    coefficient: torch.Tensor,
    inputs: list[torch.Tensor],
    initial: torch.Tensor,
    chunk: int,
    log_decay: torch.Tensor | None = None,
    exclusive: tuple[bool, ...] | None = None,
    allow_tf32: bool = False,
    input_scales: list[torch.Tensor | None] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`recdsl.backends.chunk_kernels.delta_rule` with the Triton kernels, and the loop's
    ``+-inf`` where a read-out vector is infinite (as
    :func:`recdsl.backends.chunk_kernels.with_infinite_readouts` gives them).

    Read-outs of the previous state (``exclusive``) and states of more than 128 key rows go
    to the torch form; gradients are the backward kernels' with one read-out, else the
    torch form's, recomputed (:class:`DeltaRule`).  ``input_scales``: a scalar per step (or
    None) for each input, which enters as ``scale[..., None] * input`` (DeltaNet's
    ``beta v``): formed in the kernels for one input, else in torch first.  The kernels
    note infinite read-out entries as they read them: only a read-out that has one is
    split (finite part and directions) and run again, so finite read-outs are never read
    by a separate check.
    """
    from . import chunk_kernels
    from .triton_launch import kernels_run

    def run(queries: list[torch.Tensor], exclusive: tuple[bool, ...] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        outputs, final, _ = _delta_rule(queries, left, right, coefficient, inputs, initial, chunk, log_decay, exclusive, allow_tf32, input_scales)
        return outputs, final

    outputs, final, infinite = _delta_rule(readouts, left, right, coefficient, inputs, initial, chunk, log_decay, exclusive, allow_tf32, input_scales)
    if infinite is None:  # the torch form, which looks for infinite read-outs first
        return chunk_kernels.with_infinite_readouts(run, readouts, exclusive=exclusive)
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if not readouts or (is_compiling is not None and is_compiling()) or not kernels_run() or not bool(infinite.any()):
        return outputs, final
    return chunk_kernels.with_infinite_readouts(run, readouts)


def _delta_rule(
    readouts: list[torch.Tensor],
    left: torch.Tensor,
    right: torch.Tensor,
    coefficient: torch.Tensor,
    inputs: list[torch.Tensor],
    initial: torch.Tensor,
    chunk: int,
    log_decay: torch.Tensor | None,
    exclusive: tuple[bool, ...] | None,
    allow_tf32: bool,
    input_scales: list[torch.Tensor | None] | None,
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """:func:`delta_rule` without its handling of infinite read-outs: the read-outs, the final
    state and the kernels' note of infinite read-out entries (None from the torch form)."""
    from . import chunk_kernels

    scale = None
    if input_scales is not None:
        if len(inputs) == 1 and not (exclusive and any(exclusive)) and supports(left.shape[-1]):
            scale = input_scales[0]
        else:
            inputs = [w if c is None else w * c.unsqueeze(-1) for w, c in zip(inputs, input_scales)]

    if (exclusive and any(exclusive)) or not supports(left.shape[-1]):
        # The torch form computes in the dtype it is given: low-precision operands (see
        # LowPrecisionInputs.NATIVE) in the state's dtype.
        dtype = initial.dtype
        upcast = (lambda x: x if x is None else x.to(dtype))  # noqa: E731
        same_sides = right is left
        left = upcast(left)
        right = left if same_sides else upcast(right)
        outputs, final = _flat_rows(chunk_kernels.delta_rule)([upcast(q) for q in readouts], left, right, upcast(coefficient), [upcast(w) for w in inputs], initial, chunk, log_decay=upcast(log_decay), exclusive=exclusive)
        return outputs, final, None
    # The inputs share the left vector, so their sum is one input term (as the torch form sums them).
    w = None
    for term in inputs:
        w = term if w is None else w + term
    if w is None:
        w = torch.zeros(left.shape[:-1] + initial.shape[-1:], dtype=initial.dtype, device=initial.device)
    *outputs, final, infinite = DeltaRule.apply(chunk, allow_tf32, left, right, coefficient, w, scale, log_decay, initial, *readouts)
    return list(outputs), final, infinite


def _flat_rows(kernel):
    """``kernel`` (:func:`recdsl.backends.chunk_kernels.delta_rule`, which takes ``[N, T, ...]``
    sequences) called with ``[B, H, T, ...]`` ones: they are merged into ``B H`` rows (a copy
    unless dense) and the read-outs split back; ``[N, T, ...]`` ones pass unchanged."""

    def run(readouts, left, right, coefficient, inputs, initial, chunk, log_decay=None, exclusive=None):
        if left.dim() == 3:
            return kernel(readouts, left, right, coefficient, inputs, initial, chunk, log_decay=log_decay, exclusive=exclusive)
        heads = left.shape[:2]
        merge = lambda x: None if x is None else x.flatten(0, 1)  # noqa: E731
        flat_left = merge(left)
        outputs, final = kernel(
            [merge(q) for q in readouts], flat_left, flat_left if right is left else merge(right), merge(coefficient),
            [merge(w) for w in inputs], initial, chunk, log_decay=merge(log_decay), exclusive=exclusive,
        )
        return [o.unflatten(0, heads) for o in outputs], final

    return run


class DeltaRule(torch.autograd.Function):
    """The Triton forward (its last output the kernel's note of infinite read-out entries,
    not differentiable); with one read-out, the backward kernels (:func:`backward`) from
    the chunk start states and ``U`` the forward kept.  Otherwise (no read-out, or several) the
    backward differentiates the torch chunked form, recomputed (chunk-boundary states only)."""

    @staticmethod
    def forward(ctx, chunk: int, allow_tf32: bool, left, right, coefficient, w, scale, log_decay, initial, *readouts):
        # ``scale`` (or None): the input is scale[..., None] * w, formed in the kernels.
        ctx.kernels = len(readouts) == 1 and any(ctx.needs_input_grad)
        outputs, final, saved, infinite = _forward(list(readouts), left, right, coefficient, [w], initial, chunk, log_decay, allow_tf32, keep=ctx.kernels, input_scale=scale)
        ctx.mark_non_differentiable(infinite)
        ctx.set_materialize_grads(False)  # (no zero gradient for the note, nor for an unused output)
        ctx.scaled = scale is not None
        ctx.chunk = chunk
        ctx.allow_tf32 = allow_tf32
        ctx.gated = log_decay is not None
        ctx.same_sides = right is left
        ctx.saved = saved
        ctx.save_for_backward(left, right, coefficient, w, scale if scale is not None else coefficient, log_decay if log_decay is not None else coefficient, initial, *readouts)
        return (*outputs, final, infinite)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.kernels:
            return DeltaRule._kernel_backward(ctx, *grads)
        return DeltaRule._torch_backward(ctx, *grads)

    @staticmethod
    def _kernel_backward(ctx, d_output, d_final, _infinite):
        left, right, coefficient, w, scale, log_decay, initial, q = ctx.saved_tensors
        if ctx.same_sides:
            right = left
        saved = ctx.saved
        if d_output is None:
            d_output = torch.zeros(q.shape[:-1] + saved.starts.shape[-1:], dtype=saved.starts.dtype, device=q.device)
        if d_final is None:
            d_final = torch.zeros_like(initial, dtype=saved.starts.dtype)
        dq, dl, dr, da, dw, dg, d_initial, dc = backward(
            q, left, right, coefficient, w, log_decay if ctx.gated else None, saved, d_output, d_final, ctx.chunk, ctx.allow_tf32, input_scale=scale if ctx.scaled else None
        )
        return (
            None, None,
            dl.reshape(left.shape).to(left.dtype), None if dr is None else dr.reshape(right.shape).to(right.dtype),
            da.reshape(coefficient.shape).to(coefficient.dtype), dw.reshape(w.shape).to(w.dtype),
            dc.reshape(scale.shape).to(scale.dtype) if ctx.scaled else None,
            dg.reshape(log_decay.shape).to(log_decay.dtype) if ctx.gated else None, d_initial.to(initial.dtype), dq.reshape(q.shape).to(q.dtype),
        )

    @staticmethod
    def _torch_backward(ctx, *grads):
        from .chunk_kernels import delta_rule as torch_delta_rule

        left, right, coefficient, w, scale, log_decay, initial, *readouts = ctx.saved_tensors
        if not ctx.gated:
            log_decay = None
        if not ctx.scaled:
            scale = None
        tensors = [left, right, coefficient, w, scale, log_decay, initial, *readouts]
        dtype = initial.dtype  # the torch form computes in the dtype it is given: low-precision operands in the state's
        with torch.enable_grad():
            fresh = [None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad) for t in tensors]
            fl, fr, fa, fw, fc, fg, f0, *fq = fresh
            fw = fw if fc is None else fw * fc.unsqueeze(-1)
            outputs, final = _flat_rows(torch_delta_rule)(fq, fl, fr, fa, [fw], f0, ctx.chunk, log_decay=fg)
            pairs = [(o, g) for o, g in zip([*outputs, final], grads) if g is not None]
            wanted = [i for i, t in enumerate(fresh) if t is not None and t.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [fresh[i] for i in wanted], [g for _, g in pairs], allow_unused=True) if wanted and pairs else ()
        result: list = [None] * len(fresh)
        for i, g in zip(wanted, found):
            result[i] = g if g is None else g.to(tensors[i].dtype)
        return (None, None, *result)
