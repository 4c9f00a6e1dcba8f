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

Two kernels:

1. ``delta_prepare``, one program per (row, chunk), all chunks in parallel: ``A`` from
   ``R L^T`` (a ``tl.dot`` over key blocks), ``T`` by forward substitution (row ``t`` of
   ``T`` is ``e_t + sum_{s<t} A_ts T_s``, one row per step of a loop over the chunk), then
   ``U_w = T W`` and ``W_r = T diag(a e^{G'}) R``, written out (one ``[C, V]`` and one
   ``[C, K]`` tile per chunk, the sizes of ``v`` and ``k``).
2. ``delta_chunks``, one program per (row, value block), walking the chunks in order:
   ``U = U_w + W_r S_0``, the chunk's outputs and the next state.  The state's columns of
   this value block are kept in fp32 in the final state's buffer (a few KB per program,
   which stay in cache) and walked in key blocks of 16 rows, so that no product holds more
   than a ``[C, 16]`` or ``[16, C]`` operand per thread (fp32 products run on FMA units);
   the chunk-boundary states are never stored, and every read-out is computed on the way.

Every exponent is a decay accumulated forward from a step to a later one inside one chunk
(at most 0), so nothing overflows whatever T; each step's log decay is clamped at -60 as
in the torch form.  Float32 products are exact (``input_precision="ieee"``) unless the
caller passes ``allow_tf32=True``; bfloat16/float16 keys and queries enter the ``tl.dot``
of ``R L^T`` and ``Q L^T`` as they are, accumulated in fp32, and every other product is in
fp32.  Offsets that count over rows or chunks are 64-bit.

The backward pass is two more kernels (:func:`backward`), from each chunk's start state and
``U``, written by ``delta_chunks`` when gradients are wanted, and ``W_r``:

3. ``delta_adjoint_chunks``, one program per (row, value block), the chunks in reverse:
   the state's adjoint ``dS`` (its value columns never mix, as the state's), with
   ``dU = M^T dO + (L e^{G_C - G_s}) dS`` and ``dS_0 = e^{G_C} dS + (Q e^G)^T dO + W_r^T dU``;
   writes ``dU`` and ``dS`` at each chunk's end, and the initial state's gradient.
4. ``delta_gradients``, one program per (row, chunk), all chunks at once: the UT transform
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
def delta_prepare(p_l, p_r, p_w, p_c, p_a, p_g, p_uw, p_wr, T, K, V, n_chunks, H, sl_b, sl_h, sl_t, sr_b, sr_h, sr_t, sw_b, sw_h, sw_t, sc_b, sc_h, sc_t, sa_b, sa_h, sa_t, sg_b, sg_h, sg_t, SCALED: tl.constexpr, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk): the chunk's UT transform.
    i_nc = tl.program_id(0)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense;
    # U_w, W_r, U and dU are the kernels' own [N, T, d] buffers.
    p_l += _row(i_n, H, sl_b, sl_h)
    p_r += _row(i_n, H, sr_b, sr_h)
    p_w += _row(i_n, H, sw_b, sw_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the input is W = diag(c) w, w read from p_w
    p_a += _row(i_n, H, sa_b, sa_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    i_c = i_nc % n_chunks
    o_row = i_n * T + i_c * BT  # the chunk's first step, counted over all rows
    o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n
    o_t = tl.arange(0, BT)
    m_t = i_c * BT + o_t < T
    strict = o_t[:, None] > o_t[None, :]
    b_a = tl.load(p_a + o_c * sa_t + o_t * sa_t, mask=m_t, other=0.0).to(ACC)
    if GATED:
        b_g = _floored(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC))
        b_G = tl.cumsum(b_g, axis=0)
        b_Gp = b_G - b_g  # G_{t-1}: the decay from the chunk start to the step before t
        # e^{G'_t - G_s} for s < t (masked pairs never meet exp: their gap may be positive).
        b_gap = tl.exp(tl.where(strict, b_Gp[:, None] - b_G[None, :], float("-inf")))
        b_ar = b_a * tl.exp(b_Gp)
    else:
        b_ar = b_a
    # A = diag(a) tril(R L^T, -1) (* e^{G'_t - G_s}).
    b_A = tl.zeros([BT, BT], dtype=ACC)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
        if SAME_SIDES:  # DeltaNet's k (I - beta k k^T): one vector read once
            b_r = b_l
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0)
        b_A += tl.dot(b_r, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
    b_A = b_A * b_a[:, None]
    if GATED:
        b_A = b_A * b_gap
    b_A = tl.where(strict, b_A, 0.0)
    # T = (I - A)^{-1} by forward substitution: row t is e_t + sum_{s<t} A_ts T_s, and the
    # rows s < t are final when row t is formed (A is strictly lower triangular).
    b_inv = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0).to(ACC)
    for i_t in range(1, BT):
        b_row = tl.sum(tl.where(o_t[:, None] == i_t, b_A, 0.0), axis=0)  # A_{t, :}
        b_new = tl.sum(b_row[:, None] * b_inv, axis=0)
        b_inv = tl.where(o_t[:, None] == i_t, b_inv + b_new[None, :], b_inv)
    # U_w = T W, value block by value block.
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_w = tl.load(p_w + o_c * sw_t + o_t[:, None] * sw_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        if SCALED:
            b_w = b_w * tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)[:, None]
        tl.store(p_uw + o_row * V + o_t[:, None] * V + o_v[None, :], tl.dot(b_inv, b_w, input_precision=PRECISION), mask=m_tv)
    # W_r = T diag(a e^{G'}) R, key block by key block.
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        if SAME_SIDES:
            b_r = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        else:
            b_r = tl.load(p_r + o_c * sr_t + o_t[:, None] * sr_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        tl.store(p_wr + o_row * K + o_t[:, None] * K + o_k[None, :], tl.dot(b_inv, b_r * b_ar[:, None], input_precision=PRECISION), mask=m_tk)


@triton.jit
def delta_chunks(p_q, p_l, p_g, p_uw, p_wr, p_initial, p_out, p_state, p_starts, p_u, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sg_b, sg_h, sg_t, sout_b, sout_h, sout_t, GATED: tl.constexpr, KEEP: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, value block), the chunks in order.  The state's columns of this
    # value block live in p_state (the final state's buffer, cached on chip) between chunks
    # and are walked in key blocks of BK rows, so every product's inner dimension is BK or
    # BT: an fp32 tl.dot on FMA units holds whole rows and columns of its operands.
    i_n = tl.program_id(0).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense;
    # U_w, W_r, U and dU are the kernels' own [N, T, d] buffers.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_l += _row(i_n, H, sl_b, sl_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_out += _row(i_n, H, sout_b, sout_h)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_t = tl.arange(0, BT)
    causal = o_t[:, None] >= o_t[None, :]
    o_state = i_n * K * V
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_kv = (o_k[:, None] < K) & m_v[None, :]
        b_s = tl.load(p_initial + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0).to(ACC)
        tl.store(p_state + o_state + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
    tl.debug_barrier()
    for i_c in range(0, n_chunks):
        o_row = i_n * T + i_c * BT
        o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n
        m_t = i_c * BT + o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        # U = U_w + W_r S_0, and the read-outs' parts Q S_0 and Q L^T, one key block at a time.
        b_u = tl.load(p_uw + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        b_out = tl.zeros([BT, BV], dtype=ACC)
        b_scores = tl.zeros([BT, BT], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0)
            b_wr = tl.load(p_wr + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
            b_u += tl.dot(b_wr, b_s, input_precision=PRECISION)
            b_out += tl.dot(b_q.to(ACC), b_s, input_precision=PRECISION)
            b_scores += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
        if GATED:
            b_G = tl.cumsum(_floored(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC)), axis=0)
            b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)  # G_C (padding steps carry the state)
            b_out = b_out * tl.exp(b_G)[:, None]
            b_scores = b_scores * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        else:
            b_scores = tl.where(causal, b_scores, 0.0)
        b_out += tl.dot(b_scores, b_u, input_precision=PRECISION)
        if KEEP:  # for the backward kernels: U, and the chunk's start state (below)
            tl.store(p_u + o_row * V + o_t[:, None] * V + o_v[None, :], b_u, mask=m_tv)
        tl.store(p_out + o_c * sout_t + o_t[:, None] * sout_t + o_v[None, :], b_out, mask=m_tv)
        tl.debug_barrier()  # every thread has read S_0 before it is overwritten
        # S_C = e^{G_C} S_0 + (L e^{G_C - G_s})^T U.
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            if KEEP:
                tl.store(p_starts + (i_n * n_chunks + i_c) * K * V + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if GATED:
                b_s = b_s * tl.exp(b_end) + tl.dot(tl.trans(b_l * tl.exp(b_end - b_G)[:, None]), b_u, input_precision=PRECISION)
            else:
                b_s += tl.dot(tl.trans(b_l), b_u, input_precision=PRECISION)
            tl.store(p_state + o_state + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
        tl.debug_barrier()  # the next chunk reads the state in another layout


@triton.jit
def delta_adjoint_chunks(p_q, p_l, p_g, p_wr, p_dout, p_dfinal, p_dstate, p_dends, p_du, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sg_b, sg_h, sg_t, sdout_b, sdout_h, sdout_t, GATED: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # The adjoint of the state, carried backwards over the chunks: one program per (row, value
    # block), as delta_chunks (the adjoint's columns, like the state's, never mix).  With
    # dS the adjoint of the chunk's end state S_C,
    #     dU   = M^T dO + (L e^{G_C - G_s}) dS,           M = tril(Q L^T) e^{G_t - G_s}
    #     dS_0 = e^{G_C} dS + (Q e^G)^T dO + W_r^T dU.
    # dS (kept in p_dstate, the initial state's gradient at the end) is stored at each
    # chunk's end for delta_gradients, and so is dU.
    i_n = tl.program_id(0).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense;
    # U_w, W_r, U and dU are the kernels' own [N, T, d] buffers.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_l += _row(i_n, H, sl_b, sl_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    o_v = tl.program_id(1) * BV + tl.arange(0, BV)
    m_v = o_v < V
    o_t = tl.arange(0, BT)
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
        if GATED:
            b_G = tl.cumsum(_floored(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=0.0).to(ACC)), axis=0)
            b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
        b_du = tl.zeros([BT, BV], dtype=ACC)
        b_scores = tl.zeros([BT, BT], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_ds = tl.load(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            tl.store(p_dends + (i_n * n_chunks + i_c) * K * V + o_k[:, None] * V + o_v[None, :], b_ds, mask=m_kv)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0)
            b_l = tl.load(p_l + o_c * sl_t + o_t[:, None] * sl_t + o_k[None, :], mask=m_tk, other=0.0)
            b_scores += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
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
        tl.debug_barrier()
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_ds = tl.load(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            b_wr = tl.load(p_wr + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if GATED:
                b_ds = b_ds * tl.exp(b_end)
                b_q = b_q * tl.exp(b_G)[:, None]
            b_ds += tl.dot(tl.trans(b_q), b_dout, input_precision=PRECISION)
            b_ds += tl.dot(tl.trans(b_wr), b_du, input_precision=PRECISION)
            tl.store(p_dstate + o_state + o_k[:, None] * V + o_v[None, :], b_ds, mask=m_kv)
        tl.debug_barrier()


@triton.jit
def delta_gradients(p_q, p_l, p_r, p_a, p_g, p_w, p_c, p_wr, p_u, p_du, p_dout, p_starts, p_dends, p_dq, p_dl, p_dr, p_da, p_dw, p_dc, p_dg, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sl_b, sl_h, sl_t, sr_b, sr_h, sr_t, sa_b, sa_h, sa_t, sg_b, sg_h, sg_t, sw_b, sw_h, sw_t, sc_b, sc_h, sc_t, sdout_b, sdout_h, sdout_t, sdq_b, sdq_h, sdq_t, sdl_b, sdl_h, sdl_t, sdr_b, sdr_h, sdr_t, sda_b, sda_h, sda_t, sdw_b, sdw_h, sdw_t, sdc_b, sdc_h, sdc_t, sdg_b, sdg_h, sdg_t, SCALED: tl.constexpr, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, chunk), all chunks at once: the gradients of the chunk's inputs
    # from its start state S_0 (stored by delta_chunks), the adjoint dS of its end state and
    # dU (delta_adjoint_chunks).  The UT transform T = (I - A)^{-1} is recomputed as in
    # delta_prepare.  The chain, backwards through the forward's equations:
    #     U_w = T W, W_r = T diag(b) R, U = U_w + W_r S_0   (b = a e^{G'})
    #     dW = T^T dU, dW_r = dU S_0^T, dT = dU W^T + dW_r (diag(b) R)^T,
    #     dA = T^T dT T^T (d(X^{-1}) = -X^{-1} dX X^{-1} with X = I - A),
    # and every decay factor e^{x} passes x's gradient (factor * its adjoint) to the G it
    # names; G = cumsum(g) hands dg the reverse cumulative sum of dG.  The phases are ordered
    # so that at most three [BT, BT] tiles are live at once (R L^T and Q L^T are formed
    # twice rather than kept): a float32 tl.dot on FMA units holds whole operand rows.
    i_nc = tl.program_id(0)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense;
    # U_w, W_r, U and dU are the kernels' own [N, T, d] buffers.
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
    # T = (I - A)^{-1}, as in delta_prepare.
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
    b_inv = tl.where(o_t[:, None] == o_t[None, :], 1.0, 0.0).to(ACC)
    for i_t in range(1, BT):
        b_row = tl.sum(tl.where(o_t[:, None] == i_t, b_A, 0.0), axis=0)
        b_new = tl.sum(b_row[:, None] * b_inv, axis=0)
        b_inv = tl.where(o_t[:, None] == i_t, b_inv + b_new[None, :], b_inv)
    # dA = T^T dT T^T with dT = dU W^T + dW_r (diag(b) R)^T is dW U_w^T + dB W_r^T, where
    # dW = T^T dU, dB = T^T dW_r, U_w = T W and W_r = T diag(b) R: products of inner
    # dimension BV or BK only.
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
        b_dA += tl.dot(b_dw, tl.trans(tl.dot(b_inv, b_w, input_precision=PRECISION)), input_precision=PRECISION)
    if SCALED:
        tl.store(p_dc + o_c * sdc_t + o_t * sdc_t, b_dc, mask=m_t)
    # Key blocks: dW_r = dU S_0^T, dT's part dW_r (diag(b) R)^T, dR's part diag(b) T^T dW_r, db.
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
        b_wr = tl.load(p_wr + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_dA += tl.dot(b_dB, tl.trans(b_wr), input_precision=PRECISION)
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
    ``prepare_block``: the key and value blocks ``delta_prepare`` walks ``R``, ``L`` and
    ``W`` in; ``key_block``: the state rows ``delta_chunks`` walks in; ``value_block``: the
    state's columns per ``delta_chunks`` program.
    ``precision``: ``tl.dot``'s ``input_precision``, ``"ieee"`` unless TF32 was asked for.
    """

    chunk: int
    prepare_block: int
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
        prepare_block=16,
        key_block=16,
        value_block=min(_block(values), 32),
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
    outputs, final, _ = _forward(readouts, left, right, coefficient, inputs, initial, chunk, log_decay, allow_tf32, input_scale=input_scale)
    return outputs, final


@dataclass(frozen=True)
class Saved:
    """What :func:`backward` needs from the forward pass: each chunk's start state
    (``starts``, ``[N, n_chunks, K, V]``), ``U`` (``[N, T, V]``) and ``W_r`` (``[N, T, K]``),
    in the kernels' dtype."""

    starts: torch.Tensor
    u: torch.Tensor
    wr: torch.Tensor


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
) -> tuple[list[torch.Tensor], torch.Tensor, Saved | None]:
    """Read-outs ``q_t @ S_t`` and the final state, by the Triton kernels; the arguments of
    :func:`recdsl.backends.chunk_kernels.delta_rule` (``left``, ``right`` ``[N, T, K]``,
    ``coefficient`` and ``log_decay`` ``[N, T]``, inputs ``[N, T, V]``, ``initial``
    ``[N, K, V]``), or each sequence with the heads on an axis of their own (``[B, H, T, ...]``,
    ``N = B H``; read in place through their strides, read-outs laid out ``[B, T, H, V]``).
    Keys and queries in bfloat16/float16 are read as such; everything else is computed in
    float32 (float64 for a float64 state).  ``input_scale`` (``[N, T]``, one input): the
    input is ``input_scale[..., None] * inputs[0]``, formed inside ``delta_prepare`` (the
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
    uw = torch.empty(N, T, V, dtype=dtype, device=device)
    wr = torch.empty(N, T, K, dtype=dtype, device=device)
    launch(
        delta_prepare, (N * n_chunks,), left, right, w, c, a, g, uw, wr, T, K, V, n_chunks, H, *_strides(left), *_strides(right), *_strides(w), *_strides(c), *_strides(a), *_strides(g),
        SCALED=scaled, GATED=gated, SAME_SIDES=same_sides, BT=BT, BK=tiles.prepare_block, BV=tiles.prepare_block, ACC=ACC, PRECISION=tiles.precision, **options,
    )
    start = initial.to(dtype).contiguous()
    results = []
    final = torch.empty(N, K, V, dtype=dtype, device=device)
    grid = (N, triton.cdiv(V, tiles.value_block))
    # The backward kernels' chunk start states and U, written by the first pass (only when kept).
    saved = Saved(torch.empty(N, n_chunks, K, V, dtype=dtype, device=device), torch.empty(N, T, V, dtype=dtype, device=device), wr) if keep else None
    starts, u = (saved.starts, saved.u) if keep else (final, uw)  # (not written when not kept)
    for i, q in enumerate(readouts):
        # One pass over the chunks per read-out (each recomputes the same states; cells read a
        # delta-rule state out once).
        out = torch.empty(B, T, H, V, dtype=dtype, device=device).transpose(1, 2)
        q = _dense_last(q.to(low))
        launch(delta_chunks, grid, q, left, g, uw, wr, start, out, final, starts, u, T, K, V, n_chunks, H, *_strides(q), *_strides(left), *_strides(g), *_strides(out), GATED=gated, KEEP=keep and i == 0, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options)
        results.append(out.squeeze(1) if flat else out)
    if not readouts:
        empty = torch.zeros(B, H, T, K, dtype=low, device=device)
        out = torch.empty(B, H, T, V, dtype=dtype, device=device)
        launch(delta_chunks, grid, empty, left, g, uw, wr, start, out, final, starts, u, T, K, V, n_chunks, H, *_strides(empty), *_strides(left), *_strides(g), *_strides(out), GATED=gated, KEEP=keep, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options)
    return results, final, saved


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
    dtype = saved.u.dtype
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
        delta_adjoint_chunks, grid, q, left, g, saved.wr, d_output, d_final.to(dtype).contiguous(), d_initial, d_ends, du, T, K, V, n_chunks, H,
        *_strides(q), *_strides(left), *_strides(g), *_strides(d_output), GATED=gated, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options,
    )
    dq, dl = _written_like(q, dtype), _written_like(left, dtype)
    dr = dl if same_sides else _written_like(right, dtype)
    da, dg = _written_like(a, dtype), _written_like(g, dtype)
    dw = _written_like(w, dtype)
    c = _with_heads(input_scale, 2) if scaled else a  # (not read when not scaled)
    dc = _written_like(c, dtype) if scaled else da  # (not written when not scaled)
    sequences = (q, left, right, a, g, w, c, d_output, dq, dl, dr, da, dw, dc, dg)
    launch(
        delta_gradients, (N * n_chunks,), q, left, right, a, g, w, c, saved.wr, saved.u, du, d_output, saved.starts, d_ends, dq, dl, dr, da, dw, dc, dg, T, K, V, n_chunks, H,
        *(stride for x in sequences for stride in _strides(x)), SCALED=scaled, GATED=gated, SAME_SIDES=same_sides, BT=BT, BK=tiles.prepare_block, BV=tiles.prepare_block, ACC=ACC, PRECISION=tiles.precision, num_warps=tiles.gradient_warps, num_stages=tiles.num_stages,
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
    """:func:`recdsl.backends.chunk_kernels.delta_rule` with the Triton kernels.

    Read-outs of the previous state (``exclusive``) and states of more than 128 key rows go
    to the torch form; gradients are the backward kernels' with one read-out, else the
    torch form's, recomputed (:class:`DeltaRule`).  ``input_scales``: a scalar per step (or
    None) for each input, which enters as ``scale[..., None] * input`` (DeltaNet's
    ``beta v``): formed in the kernels for one input, else in torch first.
    """
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
        return _flat_rows(chunk_kernels.delta_rule)([upcast(q) for q in readouts], left, right, upcast(coefficient), [upcast(w) for w in inputs], initial, chunk, log_decay=upcast(log_decay), exclusive=exclusive)
    # The inputs share the left vector, so their sum is one input term (as the torch form sums them).
    w = None
    for term in inputs:
        w = term if w is None else w + term
    if w is None:
        w = torch.zeros(left.shape[:-1] + initial.shape[-1:], dtype=initial.dtype, device=initial.device)
    *outputs, final = DeltaRule.apply(chunk, allow_tf32, left, right, coefficient, w, scale, log_decay, initial, *readouts)
    return list(outputs), final


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
    """The Triton forward; with one read-out, the backward kernels (:func:`backward`) from
    the chunk start states the forward kept.  Otherwise (no read-out, or several) the
    backward differentiates the torch chunked form, recomputed (chunk-boundary states only)."""

    @staticmethod
    def forward(ctx, chunk: int, allow_tf32: bool, left, right, coefficient, w, scale, log_decay, initial, *readouts):
        # ``scale`` (or None): the input is scale[..., None] * w, formed in the kernels.
        ctx.kernels = len(readouts) == 1 and any(ctx.needs_input_grad)
        outputs, final, saved = _forward(list(readouts), left, right, coefficient, [w], initial, chunk, log_decay, allow_tf32, keep=ctx.kernels, input_scale=scale)
        ctx.scaled = scale is not None
        ctx.chunk = chunk
        ctx.allow_tf32 = allow_tf32
        ctx.gated = log_decay is not None
        ctx.same_sides = right is left
        ctx.saved = saved
        ctx.save_for_backward(left, right, coefficient, w, scale if scale is not None else coefficient, log_decay if log_decay is not None else coefficient, initial, *readouts)
        return (*outputs, final)

    @staticmethod
    def backward(ctx, *grads):
        if ctx.kernels:
            return DeltaRule._kernel_backward(ctx, *grads)
        return DeltaRule._torch_backward(ctx, *grads)

    @staticmethod
    def _kernel_backward(ctx, d_output, d_final):
        left, right, coefficient, w, scale, log_decay, initial, q = ctx.saved_tensors
        if ctx.same_sides:
            right = left
        saved = ctx.saved
        if d_output is None:
            d_output = torch.zeros(q.shape[:-1] + saved.u.shape[-1:], dtype=saved.u.dtype, device=q.device)
        if d_final is None:
            d_final = torch.zeros_like(initial, dtype=saved.u.dtype)
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
