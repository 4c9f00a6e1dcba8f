"""Triton kernels for the chunked form of decayed outer products (GLA, RetNet, mLSTM, Mamba-2).

The same algorithm as :func:`recdsl.backends.chunk_kernels.decayed_outer_products`, for a
decay shared by a whole state (``[N, T, 1, 1]``) or by each row (``[N, T, K, 1]``).

Forward (:func:`forward`, one launch): ``walk_outputs``, one program per (row, value block),
walks the chunks in order; per chunk the log decays accumulated inside it (``tl.cumsum``),
the read-outs ``o_t = (q_t * exp(G_t)) @ S_start + sum_{s <= t} A_ts v_s`` with
``A = (Q K^T) * exp(G_t - G_s)`` for a scalar decay, and for per-row decays
``A = (Q * exp(G)) (K * exp(-G))^T`` summed over key blocks, each block factorised where its
``G`` stays within ``+-60`` inside the chunk, else summed exactly pair by pair; and the state
the next chunk starts from, ``exp(G_C) S_start + sum_s (k_s * exp(G_C - G_s))^T v_s``.  It
writes the read-outs, the state each chunk starts from (``T / chunk`` states, kept for the
backward; two reused slots when no backward follows) and the final state, and reads every
input once.  A second read-out of the same state (rare) takes ``chunk_outputs``, one program
per (chunk, value block), from the kept chunk-start states.

(``chunk_states`` + ``pass_states`` are the walk over chunk states in two launches, one program
per chunk for the updates; they write and read back every chunk's update, one state per chunk more.)

Backward (:func:`backward`, three launches, from the kept chunk-start states; nothing of the
torch chunked form is recomputed):

1. ``walk_state_grads``: the adjoint walk over reversed chunks,
   ``dS_c = sum_t (q_t exp(G_t))^T do_t + exp(G_C) dS_{c+1}``: the gradient of the state
   each chunk ends with, and of the initial state;
2. ``chunk_key_grads``: per (chunk, key block) dq, dk and the log decays' gradient, the
   reverse cumulative sum over the chunk of ``q dq - k dk`` plus the chunk-end term;
3. ``chunk_value_grads``: per (chunk, value block) dv.

A skip term in the first read-out (``o_t += skip_t v_t``, Mamba-2's ``D x``; see
:class:`recdsl.plan.SkipTerm`) is added by ``walk_outputs``; ``chunk_key_grads`` forms its
scale's gradient ``do_t . v_t`` and ``chunk_value_grads`` adds ``skip_t do_t`` to dv.

A normalised first read-out (``(q_t @ S_t) / max(|q_t . n_t|, floor_t)``, mLSTM's; see
:class:`Normalisation` and :class:`recdsl.plan.Normaliser`) carries ``n`` as the state's
column of ones: ``walk_outputs`` (NORMALISED; blocks of 32 steps, chunk-start states kept
every chunk) forms ``q_t . n_t`` and divides; ``walk_state_grads`` forms the division's
gradients and walks ``n``'s adjoint; ``chunk_key_grads`` and ``chunk_value_grads`` add the
column of ones to theirs.

Blocks are at least 16 wide so that ``tl.dot`` maps to tensor cores on a GPU; float32
products are exact (``input_precision="ieee"``) unless the caller passes ``allow_tf32=True``
(TF32 tensor cores, about 1e-3 relative error).  :func:`tiling` chooses the blocks and
launch options; offsets are 64-bit where they count over rows or chunks.  Log decays are
floored at -60 as the kernels load them (a decay of 0 is e^-60, with no gradient).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from .triton_launch import launch

_FACTOR_LIMIT = 60.0


# Triton's interpreter (3.9) multiplies bfloat16 operands as their raw 16-bit patterns, so there
# the operands are rounded to bfloat16 and multiplied in float32: the same products.  Decided
# when the module is imported, as @triton.jit decides whether its kernels are interpreted.
_BFLOAT16_DOT = tl.constexpr(os.environ.get("TRITON_INTERPRET") != "1")


@triton.jit
def _dot(a, b, p_like, PRECISION: tl.constexpr):
    # a @ b accumulated in the accumulator's type.  With bfloat16 inputs (``p_like`` points to
    # them) both operands go to tl.dot as bfloat16, for tensor cores with fp32 accumulation
    # (scores, decayed keys and states are rounded to bfloat16 there, as the inputs were);
    # float16 inputs stay in float32 products, since exp(-G) factors up to e^60 overflow float16.
    if p_like.dtype.element_ty == tl.bfloat16:
        if _BFLOAT16_DOT:
            return tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:
            return tl.dot(a.to(tl.bfloat16).to(tl.float32), b.to(tl.bfloat16).to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _floored(g):
    # A log decay floored at -60 (a decay of 0 counts as e^-60).  NaN stays NaN, so that a NaN
    # log decay reaches the final state, which parallel._run_chunk_plan checks for the scan
    # fallback (a plain maximum returns the other operand on GPUs).
    return tl.maximum(g, -60.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _gated(x, GATE: tl.constexpr, gate_scale):
    # The log decay from what the kernels read for it: itself, or with GATE the pre-activation x
    # of gate_scale * logsigmoid(x) (GLA's gate, logsigmoid(g) / 16), evaluated here rather than
    # in torch.  logsigmoid(x) = min(x, 0) - log(1 + e^{-|x|}): no overflow, NaN kept.
    if GATE:
        return gate_scale * (tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x))))
    else:
        return x


@triton.jit
def _padding(GATE: tl.constexpr):
    # What a masked load of the log decays gives past T: a log decay of 0, so the state is
    # carried unchanged (with GATE, the pre-activation +inf: logsigmoid(+inf) = 0).
    if GATE:
        return float("inf")
    else:
        return 0.0


@triton.jit
def _gate_slope(x, GATE: tl.constexpr, gate_scale):
    # d(log decay)/dx: gate_scale * sigmoid(-x) with GATE, else 1.
    if GATE:
        return gate_scale / (1.0 + tl.exp(x))
    else:
        return 1.0


@triton.jit
def _ones_column(p_c, o_t, sc_t, m_t, SCALED: tl.constexpr, ACC: tl.constexpr):
    # A normaliser's column of ones beside the values, as the kernels' values are scaled: c_t
    # (read from p_c, the chunk's first step) with SCALED, else 1; 0 past T.
    if SCALED:
        return tl.load(p_c + o_t * sc_t, mask=m_t, other=0.0).to(ACC)
    else:
        return tl.where(m_t, 1.0, 0.0).to(ACC)


@triton.jit
def _row(i_n, H, s_b, s_h):
    # The offset of row ``i_n`` (batch row ``i_n // H``, head ``i_n % H``) of a [B, H, T, d] sequence.
    return (i_n // H) * s_b + (i_n % H) * s_h


# Addressing: the sequences (queries, keys, values, log decays, read-outs and their gradients)
# are [B, H, T, d] with batch, head and step strides and a dense last dim (a [B, T, H, d]
# tensor's transposed view: no layout copy), row i_n = b H + h; ``p_x += _row(...)`` and the
# chunk's first step times the step stride are int64 scalars, then int32 offsets inside the
# tile.  The kernels' own buffers (chunk-start states, their gradients) are [N, ...] and
# contiguous.  N * T * K or N * n_chunks * K * V may pass 2^31 elements; one chunk or one
# state tile never does.


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
    b_update = _dot(tl.trans(b_scaled), b_v, p_k, PRECISION)
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
def chunk_outputs(p_q, p_k, p_v, p_c, p_g, p_starts, p_out, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_t, sg_b, sg_h, sg_t, sout_b, sout_h, sout_t, SCALED: tl.constexpr, gate_scale, GATE: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk, value block); the key dimension is walked in blocks of BK.
    i_nc = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_k += _row(i_n, H, sk_b, sk_h)
    p_v += _row(i_n, H, sv_b, sv_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the values are diag(c) v, c read from p_c
    p_g += _row(i_n, H, sg_b, sg_h)
    p_out += _row(i_n, H, sout_b, sout_h)
    i_c = i_nc % n_chunks
    o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n (T times a step stride may pass 2^31)
    o_state = (i_n * n_chunks + i_c) * K * V
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = i_c * BT + o_t < T
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    b_out = tl.zeros([BT, BV], dtype=ACC)
    b_scores = tl.zeros([BT, BT], dtype=ACC)
    if not ROWS:
        b_Gt = tl.cumsum(_floored(_gated(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=_padding(GATE)).to(ACC), GATE, gate_scale)), axis=0)  # the (shared) log decay of each step
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_k = tl.load(p_k + o_c * sk_t + o_t[:, None] * sk_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_start = tl.load(p_starts + o_state + o_k[:, None] * V + o_v[None, :], mask=(o_k[:, None] < K) & m_v[None, :], other=0.0).to(ACC)
        if ROWS:
            b_G = tl.cumsum(_floored(_gated(tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_tk, other=_padding(GATE)).to(ACC), GATE, gate_scale)), axis=0)
            b_qg = b_q * tl.exp(b_G)
            # From the state at the chunk start.
            b_out += _dot(b_qg, b_start, p_k, PRECISION)
            b_lowest = tl.min(tl.min(b_G, axis=1), axis=0)
            b_highest = tl.max(tl.max(b_G, axis=1), axis=0)
            if (b_lowest > -60.0) & (b_highest < 60.0):
                # exp(G_t - G_s) = exp(G_t) exp(-G_s), each factor within exp(+-60).
                b_scores += _dot(b_qg, tl.trans(b_k * tl.exp(-b_G)), p_k, PRECISION)
            else:
                # The exact pairwise form, one key dimension of this block at a time.
                for i_j in range(0, BK):
                    m_col = m_t & (o_t * 0 + i_k * BK + i_j < K)  # (a tensor: the interpreter has no scalar masks)
                    q_col = tl.load(p_q + (o_c + o_t) * sq_t + i_k * BK + i_j, mask=m_col, other=0.0).to(ACC)
                    k_col = tl.load(p_k + (o_c + o_t) * sk_t + i_k * BK + i_j, mask=m_col, other=0.0).to(ACC)
                    g_col = tl.sum(tl.where(tl.arange(0, BK)[None, :] == i_j, b_G, 0.0), axis=1)
                    gap = tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf"))
                    b_scores += q_col[:, None] * k_col[None, :] * tl.exp(gap)
        else:
            b_out += _dot(b_q, b_start, p_k, PRECISION)
            b_scores += _dot(b_q, tl.trans(b_k), p_k, PRECISION)
    if not ROWS:
        # The shared decay factors out of the key sum: q_t exp(G_t) S, and (q_t . k_s) exp(G_t - G_s).
        b_out = b_out * tl.exp(b_Gt)[:, None]
        b_scores = b_scores * tl.exp(tl.where(causal, b_Gt[:, None] - b_Gt[None, :], float("-inf")))
    b_scores = tl.where(causal, b_scores, 0.0)
    b_v = tl.load(p_v + o_c * sv_t + o_t[:, None] * sv_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    if SCALED:
        b_v = b_v * tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)[:, None]
    b_out += _dot(b_scores, b_v, p_k, PRECISION)
    tl.store(p_out + o_c * sout_t + o_t[:, None] * sout_t + o_v[None, :], b_out, mask=m_t[:, None] & m_v[None, :])


# ---- the fused forward: one walk over the chunks that also reads out ----------------------------
#
# A walk over the states (fla's chunk_fwd_h) then chunk_outputs read the keys, values and log
# decays twice and the chunk-start states back once (GLA: 169 MB where the minimum is 84, B = 2,
# T = 2048, 16 heads of 64).
# walk_outputs is one program per (row, value block) walking the chunks in order; per chunk
# and key block it reads that block of the state the chunk starts from, adds its share of
# the chunk's read-outs and scores, and writes the block of the state the next chunk starts
# from.  Queries, keys, values and log decays are read once, the read-outs written once, and
# each chunk-start state written once: into its own slot when the backward keeps them, else
# into one of two slots that the walk reuses (the state then never leaves the L2 cache).
#
# The state tile is passed between chunks through memory rather than registers because the
# key dimension is walked in blocks (an exact float32 tl.dot holds whole rows and columns of
# its operands per thread, so its blocks stay narrow: see Tiling) and Triton has no arrays
# of register tiles.  Each program reads back only what it wrote, after a barrier.


@triton.jit
def walk_outputs(p_q, p_k, p_v, p_c, p_g, p_skip, p_initial, p_states, p_kept, p_final, p_out, p_qsum, p_nstates, p_nkept, p_ninitial, p_nfinal, p_floor, p_den, T, K, V, n_chunks, n_slots, H, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_t, sg_b, sg_h, sg_t, sskip_b, sskip_h, sskip_t, sout_b, sout_h, sout_t, SCALED: tl.constexpr, SKIP: tl.constexpr, NORMALISED: tl.constexpr, KEPT_EVERY: tl.constexpr, gate_scale, GATE: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, value block); the key dimension is walked in blocks of BK, the steps in
    # ``n_chunks`` blocks of BT.  KEPT_EVERY > 1: the kept chunks (the backward's) are KEPT_EVERY
    # walk blocks long; the walk then reuses two slots of ``p_states`` and writes each kept
    # chunk's start state into ``p_kept`` [N, kept chunks, K, V] (and, NORMALISED, the row's
    # first value block its normaliser into ``p_nkept`` [N, kept chunks, K]); a walk block of
    # half a chunk holds half the scores (mLSTM's normalised walk spilled on sm_90 with 64).
    # ``p_states`` [N, n_slots, K, V]: chunk c starts from slot c % n_slots (n_slots = n_chunks:
    # every chunk-start state kept, for the backward and chunk_outputs; 2: reused).  ``p_qsum`` [N]: the
    # sum of the row's queries (a finite sum rules out infinite queries, see
    # chunk_kernels.with_infinite_readouts), written by the row's first value block.
    # SKIP: o_t += skip_t v_t (the values before their scale c; Mamba-2's D x).
    # NORMALISED (a decay shared by the state): the read-out is o_t / max(|den_t|, floor_t) with
    # den_t = q_t . n_t, n the state's normaliser, a column of ones beside the values (n = f n +
    # c k): den_t is the row sum of the block's decayed scores (times c) plus
    # exp(G_t) q_t . n_start, and n walks beside the state, in two slots of this program's own,
    # ``p_nstates`` [N, value blocks, 2, K] (another program's writes could run ahead).  The
    # row's first value block writes den ``p_den`` [N, T] (for the backward; ``p_floor`` is
    # [N, T] too) and the final n ``p_nfinal`` [N, K].
    tl.static_assert(not (NORMALISED and (ROWS or SKIP)), "a normaliser is carried beside a state with a shared decay and no skip term")
    i_n = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_k += _row(i_n, H, sk_b, sk_h)
    p_v += _row(i_n, H, sv_b, sv_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the values are diag(c) v, c read from p_c
    p_g += _row(i_n, H, sg_b, sg_h)
    p_skip += _row(i_n, H, sskip_b, sskip_h)
    p_out += _row(i_n, H, sout_b, sout_h)
    p_states += i_n * n_slots * K * V
    p_nstates += (i_n * tl.num_programs(1) + i_v) * 2 * K
    p_kept += i_n * tl.cdiv(n_chunks, KEPT_EVERY) * K * V
    p_nkept += i_n * tl.cdiv(n_chunks, KEPT_EVERY) * K
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    # The state chunk 0 starts from: the initial state, into slot 0.
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_kv = (o_k[:, None] < K) & m_v[None, :]
        o_tile = o_k[:, None] * V + o_v[None, :]
        b_S = tl.load(p_initial + i_n * K * V + o_tile, mask=m_kv, other=0.0).to(ACC)
        tl.store(p_states + o_tile, b_S, mask=m_kv)
        if KEPT_EVERY > 1:
            tl.store(p_kept + o_tile, b_S, mask=m_kv)
        if NORMALISED:
            b_n = tl.load(p_ninitial + i_n * K + o_k, mask=o_k < K, other=0.0).to(ACC)
            tl.store(p_nstates + o_k, b_n, mask=o_k < K)
            tl.store(p_nkept + o_k, b_n, mask=(o_k < K) & (o_k * 0 + i_v == 0))
    b_qsum = tl.zeros([BK], dtype=ACC)
    for i_c in range(0, n_chunks):
        tl.debug_barrier()  # the state this chunk starts from was stored by other threads of this program
        o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n (T times a step stride may pass 2^31)
        o_start = (i_c % n_slots) * K * V
        o_next = ((i_c + 1) % n_slots) * K * V
        m_t = i_c * BT + o_t < T
        m_tv = m_t[:, None] & m_v[None, :]
        b_v = tl.load(p_v + o_c * sv_t + o_t[:, None] * sv_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        if SCALED:
            b_v = b_v * tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)[:, None]
        b_qn = tl.zeros([BT], dtype=ACC)  # NORMALISED: q_t . n_start
        if not ROWS:
            b_gt = _floored(_gated(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=_padding(GATE)).to(ACC), GATE, gate_scale))
            b_Gt = tl.cumsum(b_gt, axis=0)  # the (shared) log decay of each step
            b_endt = tl.sum(b_gt, axis=0)  # G at the chunk's last step (padding adds 0)
        b_out = tl.zeros([BT, BV], dtype=ACC)
        b_scores = tl.zeros([BT, BT], dtype=ACC)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            o_tile = o_k[:, None] * V + o_v[None, :]
            b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            b_k = tl.load(p_k + o_c * sk_t + o_t[:, None] * sk_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            b_qsum += tl.sum(b_q, axis=0)
            b_S = tl.load(p_states + o_start + o_tile, mask=m_kv, other=0.0).to(ACC)
            if ROWS:
                b_G = tl.cumsum(_floored(_gated(tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_tk, other=_padding(GATE)).to(ACC), GATE, gate_scale)), axis=0)
                b_qg = b_q * tl.exp(b_G)
                # From the state at the chunk start.
                b_out += _dot(b_qg, b_S, p_k, PRECISION)
                b_lowest = tl.min(tl.min(b_G, axis=1), axis=0)
                b_highest = tl.max(tl.max(b_G, axis=1), axis=0)
                if (b_lowest > -60.0) & (b_highest < 60.0):
                    # exp(G_t - G_s) = exp(G_t) exp(-G_s), each factor within exp(+-60).
                    b_scores += _dot(b_qg, tl.trans(b_k * tl.exp(-b_G)), p_k, PRECISION)
                else:
                    # The exact pairwise form, one key dimension of this block at a time.
                    for i_j in range(0, BK):
                        m_col = m_t & (o_t * 0 + i_k * BK + i_j < K)  # (a tensor: the interpreter has no scalar masks)
                        q_col = tl.load(p_q + (o_c + o_t) * sq_t + i_k * BK + i_j, mask=m_col, other=0.0).to(ACC)
                        k_col = tl.load(p_k + (o_c + o_t) * sk_t + i_k * BK + i_j, mask=m_col, other=0.0).to(ACC)
                        g_col = tl.sum(tl.where(tl.arange(0, BK)[None, :] == i_j, b_G, 0.0), axis=1)
                        gap = tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf"))
                        b_scores += q_col[:, None] * k_col[None, :] * tl.exp(gap)
            else:
                b_out += _dot(b_q, b_S, p_k, PRECISION)
                b_scores += _dot(b_q, tl.trans(b_k), p_k, PRECISION)
        if NORMALISED:  # q_t . n_start, in a pass of its own over the key blocks (the queries again, from the cache)
            for i_k in range(0, tl.cdiv(K, BK)):
                o_k = i_k * BK + tl.arange(0, BK)
                m_k = o_k < K
                b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(ACC)
                b_qn += tl.sum(b_q * tl.load(p_nstates + (i_c % 2) * K + o_k, mask=m_k, other=0.0)[None, :], axis=1)
        if not ROWS:
            # The shared decay factors out of the key sum: q_t exp(G_t) S, and (q_t . k_s) exp(G_t - G_s).
            b_out = b_out * tl.exp(b_Gt)[:, None]
            b_qn = b_qn * tl.exp(b_Gt)
            b_scores = b_scores * tl.exp(tl.where(causal, b_Gt[:, None] - b_Gt[None, :], float("-inf")))
        b_scores = tl.where(causal, b_scores, 0.0)
        if NORMALISED:  # (c read again from the cache)
            b_den = b_qn + tl.sum(b_scores * _ones_column(p_c + o_c * sc_t, o_t, sc_t, m_t, SCALED, ACC)[None, :], axis=1)
        b_out += _dot(b_scores, b_v, p_k, PRECISION)
        if NORMALISED:
            tl.store(p_den + i_n * T + o_c + o_t, b_den, mask=m_t & (o_t * 0 + i_v == 0))  # (a tensor: the interpreter has no scalar masks)
            b_floor = tl.load(p_floor + i_n * T + o_c + o_t, mask=m_t, other=1.0).to(ACC)
            b_out = b_out / tl.maximum(tl.abs(b_den), b_floor, propagate_nan=tl.PropagateNan.ALL)[:, None]
        if SKIP:  # (the values before their scale read again, from the cache: one tile fewer live)
            b_x = tl.load(p_v + o_c * sv_t + o_t[:, None] * sv_t + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
            b_out += tl.load(p_skip + o_c * sskip_t + o_t * sskip_t, mask=m_t, other=0.0).to(ACC)[:, None] * b_x
        tl.store(p_out + o_c * sout_t + o_t[:, None] * sout_t + o_v[None, :], b_out, mask=m_tv)
        # The state the next chunk starts from, in a second pass over the key blocks (their keys and
        # log decays again, from the cache), so that the read-outs' tiles are not live beside it.
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k = o_k < K
            m_tk = m_t[:, None] & m_k[None, :]
            m_kv = m_k[:, None] & m_v[None, :]
            o_tile = o_k[:, None] * V + o_v[None, :]
            b_k = tl.load(p_k + o_c * sk_t + o_t[:, None] * sk_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            b_S = tl.load(p_states + o_start + o_tile, mask=m_kv, other=0.0).to(ACC)
            if ROWS:
                b_g = _floored(_gated(tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_tk, other=_padding(GATE)).to(ACC), GATE, gate_scale))
                b_end = tl.sum(b_g, axis=0)
                b_S = tl.exp(b_end)[:, None] * b_S + _dot(tl.trans(b_k * tl.exp(b_end[None, :] - tl.cumsum(b_g, axis=0))), b_v, p_k, PRECISION)
            else:
                b_S = tl.exp(b_endt) * b_S + _dot(tl.trans(b_k * tl.exp(b_endt - b_Gt)[:, None]), b_v, p_k, PRECISION)
                if NORMALISED:  # n_end = exp(G_C) n_start + sum_s exp(G_C - G_s) c_s k_s
                    b_n = tl.load(p_nstates + (i_c % 2) * K + o_k, mask=m_k, other=0.0)
                    b_n = tl.exp(b_endt) * b_n + tl.sum(b_k * (tl.exp(b_endt - b_Gt) * _ones_column(p_c + o_c * sc_t, o_t, sc_t, m_t, SCALED, ACC))[:, None], axis=0)
                    if i_c == n_chunks - 1:
                        tl.store(p_nfinal + i_n * K + o_k, b_n, mask=m_k & (o_k * 0 + i_v == 0))
                    else:
                        tl.store(p_nstates + ((i_c + 1) % 2) * K + o_k, b_n, mask=m_k)
                        if (i_c + 1) % KEPT_EVERY == 0:
                            tl.store(p_nkept + ((i_c + 1) // KEPT_EVERY) * K + o_k, b_n, mask=m_k & (o_k * 0 + i_v == 0))
            if i_c == n_chunks - 1:
                tl.store(p_final + i_n * K * V + o_tile, b_S, mask=m_kv)
            else:
                tl.store(p_states + o_next + o_tile, b_S, mask=m_kv)
                if KEPT_EVERY > 1:
                    if (i_c + 1) % KEPT_EVERY == 0:
                        tl.store(p_kept + ((i_c + 1) // KEPT_EVERY) * K * V + o_tile, b_S, mask=m_kv)
    if i_v == 0:
        tl.store(p_qsum + i_n, tl.sum(b_qsum, axis=0))


# ---- the normalised read-out's own gradients ---------------------------------------------------


@triton.jit
def _division_grads(p_out, p_dout, p_den, p_floor, o_c, o_t, m_t, T, V, sout_t, sdout_t, BV: tl.constexpr, ACC: tl.constexpr):
    # For the steps o_c + o_t of one row (``p_out``, ``p_dout`` at the row, ``p_den`` and
    # ``p_floor`` [T] at it): the read-out h_t = o_t / D_t with D_t = max(|den_t|, floor_t)
    # (walk_outputs, NORMALISED).  With r_t = dh_t . h_t (over every value block), the gradient
    # of o_t is dh_t / D_t and of D_t -r_t / D_t, shared as torch.maximum shares it (all to
    # the larger operand, half each at a tie).  Returns 1 / D_t, dL/dden_t and dL/dfloor_t.
    b_r = tl.zeros_like(o_t.to(ACC))
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m = m_t[:, None] & (o_v < V)[None, :]
        b_h = tl.load(p_out + o_c * sout_t + o_t[:, None] * sout_t + o_v[None, :], mask=m, other=0.0).to(ACC)
        b_dh = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m, other=0.0).to(ACC)
        b_r += tl.sum(b_h * b_dh, axis=1)
    b_den = tl.load(p_den + o_c + o_t, mask=m_t, other=1.0).to(ACC)
    b_floor = tl.load(p_floor + o_c + o_t, mask=m_t, other=1.0).to(ACC)
    b_magnitude = tl.abs(b_den)
    b_divisor = tl.maximum(b_magnitude, b_floor, propagate_nan=tl.PropagateNan.ALL)
    b_dD = -b_r / b_divisor
    b_share = tl.where(b_magnitude > b_floor, 1.0, tl.where(b_magnitude < b_floor, 0.0, 0.5))
    b_sign = tl.where(b_den > 0.0, 1.0, tl.where(b_den < 0.0, -1.0, 0.0))
    return 1.0 / b_divisor, b_dD * b_share * b_sign, b_dD * (1.0 - b_share)


# ---- the backward's walk over the chunks (state gradients) -------------------------------------
#
# ``chunk_states`` + ``pass_states`` write each chunk's update and read it back; the walks
# (walk_outputs above, walk_state_grads below) compute the update inside the loop over chunks
# instead (as fla's ``chunk_fwd_h`` does), so the only state-sized tensor written is the one the
# backward needs (forward: the state each chunk starts from; backward: the gradient of the
# state each chunk ends with).


@triton.jit
def walk_state_grads(p_q, p_g, p_dout, p_dfinal, p_dends, p_dinitial, p_out, p_den, p_floor, p_scale, p_dden, p_dfloor, p_dnfinal, p_dnends, p_dninitial, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sg_b, sg_h, sg_t, sdout_b, sdout_h, sdout_t, sout_b, sout_h, sout_t, NORMALISED: tl.constexpr, gate_scale, GATE: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # The adjoint of the forward's walk (walk_outputs), over reversed chunks: with S_c the state chunk c starts from,
    # dL/dS_c = sum_t (q_t exp(G_t))^T do_t + exp(G_C) dL/dS_{c+1}.  ``p_dends`` [N, n_chunks, K, V]
    # gets dL/dS_{c+1}, the gradient of the state chunk c ends with; ``p_dinitial`` dL/dS_0.
    # NORMALISED (see walk_outputs): ``p_dout`` is the gradient of the normalised read-out
    # ``p_out`` (h_t = o_t / D_t); per chunk every program forms the division's gradients
    # (_division_grads, from h, dh and ``p_den``, ``p_floor`` [N, T]) and takes do_t = dh_t / D_t,
    # and the row's first program stores 1 / D_t, dden_t and dfloor_t (``p_scale``, ``p_dden``,
    # ``p_dfloor`` [N, T]) for the kernels that follow; the normaliser's column of ones walks
    # beside with do_t = dden_t, and the first value block's programs write its end gradients
    # ``p_dnends`` [N, n_chunks, K] and ``p_dninitial`` [N, K].
    tl.static_assert(not (NORMALISED and ROWS), "a normaliser is carried beside a state with a shared decay")
    i_n = tl.program_id(0).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    p_out += _row(i_n, H, sout_b, sout_h)
    o_k = tl.program_id(1) * BK + tl.arange(0, BK)
    o_v = tl.program_id(2) * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    m_v = o_v < V
    m = m_k[:, None] & m_v[None, :]
    o_tile = o_k[:, None] * V + o_v[None, :]
    b_dstate = tl.load(p_dfinal + i_n * K * V + o_tile, mask=m, other=0.0).to(ACC)
    m_owner = m_k & (o_k * 0 + tl.program_id(2) == 0)  # NORMALISED: the first value block's programs write n's gradients
    if NORMALISED:
        b_dn = tl.load(p_dnfinal + i_n * K + o_k, mask=m_k, other=0.0).to(ACC)
    else:
        b_dn = tl.zeros([BK], dtype=ACC)
    for i_back in range(0, n_chunks):
        i_c = n_chunks - 1 - i_back
        tl.store(p_dends + (i_n * n_chunks + i_c) * K * V + o_tile, b_dstate, mask=m)
        o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n (T times a step stride may pass 2^31)
        m_t = i_c * BT + o_t < T
        b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0.0).to(ACC)
        b_do = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
        if NORMALISED:
            tl.store(p_dnends + (i_n * n_chunks + i_c) * K + o_k, b_dn, mask=m_owner)
            b_inverse, b_dden, b_dfloor = _division_grads(p_out, p_dout, p_den + i_n * T, p_floor + i_n * T, o_c, o_t, m_t, T, V, sout_t, sdout_t, BV, ACC)
            m_first = m_t & (o_t * 0 + tl.program_id(1) + tl.program_id(2) == 0)  # the row's first program
            tl.store(p_scale + i_n * T + o_c + o_t, b_inverse, mask=m_first)
            tl.store(p_dden + i_n * T + o_c + o_t, b_dden, mask=m_first)
            tl.store(p_dfloor + i_n * T + o_c + o_t, b_dfloor, mask=m_first)
            b_do = b_do * b_inverse[:, None]
        if ROWS:
            b_g = _floored(_gated(tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=_padding(GATE)).to(ACC), GATE, gate_scale))
            b_qg = b_q * tl.exp(tl.cumsum(b_g, axis=0))
            b_dstate = tl.exp(tl.sum(b_g, axis=0))[:, None] * b_dstate
        else:
            b_g = _floored(_gated(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=_padding(GATE)).to(ACC), GATE, gate_scale))
            b_qg = b_q * tl.exp(tl.cumsum(b_g, axis=0))[:, None]
            b_dstate = tl.exp(tl.sum(b_g, axis=0)) * b_dstate
            if NORMALISED:
                b_dn = tl.exp(tl.sum(b_g, axis=0)) * b_dn + tl.sum(b_qg * b_dden[:, None], axis=0)
        b_dstate += _dot(tl.trans(b_qg), b_do, p_q, PRECISION)
    tl.store(p_dinitial + i_n * K * V + o_tile, b_dstate, mask=m)
    if NORMALISED:
        tl.store(p_dninitial + i_n * K + o_k, b_dn, mask=m_owner)


# ---- gradients inside a chunk ------------------------------------------------------------------
#
# With S the state the chunk starts from, E = dL/dS_end the gradient of the state it ends with,
# dA_ts = do_t . v_s (s <= t) and D_ts = exp(G_t - G_s) (per key for a decay per row):
#
#   dq_t = exp(G_t) (do_t S^T) + sum_{s <= t} dA_ts D_ts k_s
#   dk_s = exp(G_C - G_s) (v_s E^T) + sum_{t >= s} dA_ts D_ts q_t
#   dv_s = (k_s exp(G_C - G_s)) E + sum_{t >= s} A_ts do_t,     A_ts = sum_k q_t k_s D_ts
#
# and the log decays' gradient without differentiating any exponential again: q_t enters every
# term as q_t exp(G_t), k_s as k_s exp(-G_s), and G_C scales S_end, so
# dL/dG_t = q_t dq_t - k_t dk_t (+ sum_v E S_end at the chunk's last step), and since G is the
# cumulative sum of g inside the chunk, dL/dg_t is the reverse cumulative sum of dL/dG over the
# chunk (fla's chunk GLA backward uses the same identity).


@triton.jit
def chunk_key_grads(p_q, p_k, p_v, p_c, p_g, p_dout, p_starts, p_final, p_dends, p_dq, p_dk, p_dg, p_dskip, p_scale, p_dden, p_nstarts, p_nfinal, p_dnends, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_t, sg_b, sg_h, sg_t, sdout_b, sdout_h, sdout_t, sdq_b, sdq_h, sdq_t, sdk_b, sdk_h, sdk_t, sdg_b, sdg_h, sdg_t, sdskip_b, sdskip_h, sdskip_t, SCALED: tl.constexpr, SKIP: tl.constexpr, NORMALISED: tl.constexpr, gate_scale, GATE: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk, key block); the value dimension is walked in blocks of BV.
    # ``p_dg``: [N, T, K] for a decay per row; for a shared decay [N, T, key blocks], each
    # block's share of the sum over keys (the caller adds them).  SKIP: the first key block's
    # programs also write ``p_dskip`` [N, T], dskip_t = do_t . v_t for the read-out's skip_t v_t
    # (walk_outputs; v before its scale c).  NORMALISED (see walk_state_grads): do_t scaled by
    # ``p_scale`` as it is read, and the normaliser's column of ones (values c_s, do_t = dden_t,
    # start and end values from ``p_nstarts`` [N, n_chunks, K] and ``p_nfinal``, end gradient
    # ``p_dnends``) adds dden_t c_s to dA_ts, dden_t n_start to do S^T, c_s dn_end to v E^T and
    # dn_end * n_end to the chunk-end term.
    tl.static_assert(not (NORMALISED and (ROWS or SKIP)), "a normaliser is carried beside a state with a shared decay and no skip term")
    i_nc = tl.program_id(0)
    i_k = tl.program_id(1)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_k += _row(i_n, H, sk_b, sk_h)
    p_v += _row(i_n, H, sv_b, sv_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the values are diag(c) v, c read from p_c
    p_g += _row(i_n, H, sg_b, sg_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    p_dq += _row(i_n, H, sdq_b, sdq_h)
    p_dk += _row(i_n, H, sdk_b, sdk_h)
    p_dg += _row(i_n, H, sdg_b, sdg_h)
    p_dskip += _row(i_n, H, sdskip_b, sdskip_h)
    i_c = i_nc % n_chunks
    o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n (T times a step stride may pass 2^31)
    o_state = (i_n * n_chunks + i_c) * K * V  # S and E; S_end is the next chunk's S, or the final state
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = i_c * BT + o_t < T
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    causal = o_t[:, None] >= o_t[None, :]
    b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    b_k = tl.load(p_k + o_c * sk_t + o_t[:, None] * sk_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
    b_dA = tl.zeros([BT, BT], dtype=ACC)
    b_dq = tl.zeros([BT, BK], dtype=ACC)  # do S^T, then the whole dq
    b_dk = tl.zeros([BT, BK], dtype=ACC)  # v E^T, then the whole dk
    b_dend = tl.zeros([BK], dtype=ACC)  # sum_v E S_end, per key
    b_dskip = tl.zeros([BT], dtype=ACC)  # SKIP: do_t . v_t
    if NORMALISED:
        b_scale = tl.load(p_scale + i_n * T + o_c + o_t, mask=m_t, other=0.0).to(ACC)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_kv = m_k[:, None] & m_v[None, :]
        o_tile = o_k[:, None] * V + o_v[None, :]
        b_do = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
        if NORMALISED:
            b_do = b_do * b_scale[:, None]
        b_v = tl.load(p_v + o_c * sv_t + o_t[:, None] * sv_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
        if SKIP:
            b_dskip += tl.sum(b_do * b_v, axis=1)
        if SCALED:
            b_v = b_v * tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)[:, None]
        b_S = tl.load(p_starts + o_state + o_tile, mask=m_kv, other=0.0).to(ACC)
        if i_c == n_chunks - 1:
            b_S_end = tl.load(p_final + i_n * K * V + o_tile, mask=m_kv, other=0.0).to(ACC)
        else:
            b_S_end = tl.load(p_starts + o_state + K * V + o_tile, mask=m_kv, other=0.0).to(ACC)
        b_E = tl.load(p_dends + o_state + o_tile, mask=m_kv, other=0.0).to(ACC)
        b_dA += _dot(b_do, tl.trans(b_v), p_k, PRECISION)
        b_dq += _dot(b_do, tl.trans(b_S), p_k, PRECISION)
        b_dk += _dot(b_v, tl.trans(b_E), p_k, PRECISION)
        b_dend += tl.sum(b_E * b_S_end, axis=1)
    if NORMALISED:
        b_ones = _ones_column(p_c + o_c * sc_t, o_t, sc_t, m_t, SCALED, ACC)
        o_nstate = (i_n * n_chunks + i_c) * K
        b_dden = tl.load(p_dden + i_n * T + o_c + o_t, mask=m_t, other=0.0).to(ACC)
        b_dn = tl.load(p_dnends + o_nstate + o_k, mask=m_k, other=0.0).to(ACC)
        if i_c == n_chunks - 1:
            b_n_end = tl.load(p_nfinal + i_n * K + o_k, mask=m_k, other=0.0).to(ACC)
        else:
            b_n_end = tl.load(p_nstarts + o_nstate + K + o_k, mask=m_k, other=0.0).to(ACC)
        b_dA += b_dden[:, None] * b_ones[None, :]
        b_dq += b_dden[:, None] * tl.load(p_nstarts + o_nstate + o_k, mask=m_k, other=0.0).to(ACC)[None, :]
        b_dk += b_ones[:, None] * b_dn[None, :]
        b_dend += b_dn * b_n_end
    b_dA = tl.where(causal, b_dA, 0.0)
    last = o_t[:, None] == BT - 1
    if ROWS:
        b_x = tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_tk, other=_padding(GATE)).to(ACC)
        b_g_raw = _gated(b_x, GATE, gate_scale)
        b_g = _floored(b_g_raw)
        b_G = tl.cumsum(b_g, axis=0)
        b_end = tl.sum(b_g, axis=0)
        b_dq = b_dq * tl.exp(b_G)
        b_dk = b_dk * tl.exp(b_end[None, :] - b_G)
        b_lowest = tl.min(tl.min(b_G, axis=1), axis=0)
        b_highest = tl.max(tl.max(b_G, axis=1), axis=0)
        if (b_lowest > -60.0) & (b_highest < 60.0):
            # exp(G_t - G_s) = exp(G_t) exp(-G_s), each factor within exp(+-60).
            b_qg = b_q * tl.exp(b_G)
            b_kg = b_k * tl.exp(-b_G)
            b_dq += _dot(b_dA, b_kg, p_k, PRECISION) * tl.exp(b_G)
            b_dk += _dot(tl.trans(b_dA), b_qg, p_k, PRECISION) * tl.exp(-b_G)
        else:
            # The exact pairwise form, one key of this block at a time.
            for i_j in range(0, BK):
                pick = tl.arange(0, BK)[None, :] == i_j
                q_col = tl.sum(tl.where(pick, b_q, 0.0), axis=1)
                k_col = tl.sum(tl.where(pick, b_k, 0.0), axis=1)
                g_col = tl.sum(tl.where(pick, b_G, 0.0), axis=1)
                b_dAD = b_dA * tl.exp(tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf")))
                dq_col = tl.sum(b_dAD * k_col[None, :], axis=1)
                dk_col = tl.sum(b_dAD * q_col[:, None], axis=0)
                b_dq += tl.where(pick, dq_col[:, None], 0.0)
                b_dk += tl.where(pick, dk_col[:, None], 0.0)
        b_dG = b_q * b_dq - b_k * b_dk + tl.where(last, b_dend[None, :], 0.0)
        b_dg = tl.where(b_g_raw >= -60.0, tl.cumsum(b_dG, axis=0, reverse=True), 0.0)  # the floor's gradient
        if GATE:
            b_dg = b_dg * _gate_slope(b_x, GATE, gate_scale)
        tl.store(p_dg + o_c * sdg_t + o_t[:, None] * sdg_t + o_k[None, :], b_dg, mask=m_tk)
    else:
        b_g_raw = _gated(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=_padding(GATE)).to(ACC), GATE, gate_scale)
        b_G = tl.cumsum(_floored(b_g_raw), axis=0)
        b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
        b_dAD = b_dA * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        b_dq = b_dq * tl.exp(b_G)[:, None] + _dot(b_dAD, b_k, p_k, PRECISION)
        b_dk = b_dk * tl.exp(b_end - b_G)[:, None] + _dot(tl.trans(b_dAD), b_q, p_k, PRECISION)
        b_dG = tl.sum(b_q * b_dq - b_k * b_dk, axis=1) + tl.where(o_t == BT - 1, tl.sum(b_dend, axis=0), 0.0)
        b_dg = tl.where(b_g_raw >= -60.0, tl.cumsum(b_dG, axis=0, reverse=True), 0.0)  # the floor's gradient
        tl.store(p_dg + (o_c + o_t) * sdg_t + i_k, b_dg, mask=m_t)
    tl.store(p_dq + o_c * sdq_t + o_t[:, None] * sdq_t + o_k[None, :], b_dq, mask=m_tk)
    tl.store(p_dk + o_c * sdk_t + o_t[:, None] * sdk_t + o_k[None, :], b_dk, mask=m_tk)
    if SKIP:
        if i_k == 0:
            tl.store(p_dskip + (o_c + o_t) * sdskip_t, b_dskip, mask=m_t)


# Registers per thread of ``chunk_value_grads`` when it scales the values (mLSTM's input gate):
# ptxas caps 8 warps at 128 on sm_90, and with bfloat16 operands that spilled 216 B.
SCALED_VALUE_GRAD_REGISTERS = 255


@triton.jit
def chunk_value_grads(p_q, p_k, p_v, p_c, p_g, p_dout, p_dends, p_dv, p_dc, p_skip, p_scale, p_dden, p_dnends, T, K, V, n_chunks, H, sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_h, sc_t, sg_b, sg_h, sg_t, sdout_b, sdout_h, sdout_t, sdv_b, sdv_h, sdv_t, sdc_b, sdc_h, sdc_t, sskip_b, sskip_h, sskip_t, SCALED: tl.constexpr, SKIP: tl.constexpr, NORMALISED: tl.constexpr, gate_scale, GATE: tl.constexpr, ROWS: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk, value block); the key dimension is walked in blocks of BK.
    # dv_s = (k_s exp(G_C - G_s)) E + sum_{t >= s} A_ts do_t, A the chunk's decayed scores as
    # chunk_outputs forms them.  SKIP: the read-out is also skip_t v_t (walk_outputs), so dv_t gets
    # skip_t do_t (chunk_key_grads forms dskip_t = do_t . v_t).  NORMALISED (see walk_state_grads):
    # do_t scaled by ``p_scale`` as it is read; with SCALED the first value block's programs add
    # the normaliser's column of ones (c_s) to dc: sum_{t >= s} A_ts dden_t + exp(G_C - G_s) k_s . dn_end.
    tl.static_assert(not (NORMALISED and (ROWS or SKIP)), "a normaliser is carried beside a state with a shared decay and no skip term")
    i_nc = tl.program_id(0)
    i_v = tl.program_id(1)
    i_n = (i_nc // n_chunks).to(tl.int64)
    # Sequences are [B, H, T, d] with strides (``H`` heads per batch row), the last dim dense.
    p_q += _row(i_n, H, sq_b, sq_h)
    p_k += _row(i_n, H, sk_b, sk_h)
    p_g += _row(i_n, H, sg_b, sg_h)
    p_dout += _row(i_n, H, sdout_b, sdout_h)
    p_dv += _row(i_n, H, sdv_b, sdv_h)
    p_v += _row(i_n, H, sv_b, sv_h)
    p_c += _row(i_n, H, sc_b, sc_h)  # SCALED: the values are diag(c) v; dv = diag(c) dV, dc = rowsum(dV * v)
    p_dc += _row(i_n, H, sdc_b, sdc_h)
    p_skip += _row(i_n, H, sskip_b, sskip_h)
    i_c = i_nc % n_chunks
    o_c = i_n * 0 + i_c * BT  # the chunk's first step, int64 as i_n (T times a step stride may pass 2^31)
    o_state = (i_n * n_chunks + i_c) * K * V
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = i_c * BT + o_t < T
    m_v = o_v < V
    causal = o_t[:, None] >= o_t[None, :]
    if SKIP:
        # The skip term's share of dv, skip_t do_t, first into dv and added back at the end: formed
        # there beside the tiles of the dot, it spilled on sm_90.
        b_skip = tl.load(p_skip + o_c * sskip_t + o_t * sskip_t, mask=m_t, other=0.0).to(ACC)
        b_do = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
        tl.store(p_dv + o_c * sdv_t + o_t[:, None] * sdv_t + o_v[None, :], b_skip[:, None] * b_do, mask=m_t[:, None] & m_v[None, :])
    b_dv = tl.zeros([BT, BV], dtype=ACC)
    b_scores = tl.zeros([BT, BT], dtype=ACC)
    b_kdn = tl.zeros([BT], dtype=ACC)  # NORMALISED: k_s . dn_end
    if not ROWS:
        b_G = tl.cumsum(_floored(_gated(tl.load(p_g + o_c * sg_t + o_t * sg_t, mask=m_t, other=_padding(GATE)).to(ACC), GATE, gate_scale)), axis=0)
        b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_q = tl.load(p_q + o_c * sq_t + o_t[:, None] * sq_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_k = tl.load(p_k + o_c * sk_t + o_t[:, None] * sk_t + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        b_E = tl.load(p_dends + o_state + o_k[:, None] * V + o_v[None, :], mask=m_k[:, None] & m_v[None, :], other=0.0).to(ACC)
        if ROWS:
            b_g = _floored(_gated(tl.load(p_g + o_c * sg_t + o_t[:, None] * sg_t + o_k[None, :], mask=m_tk, other=_padding(GATE)).to(ACC), GATE, gate_scale))
            b_Gk = tl.cumsum(b_g, axis=0)
            b_endk = tl.sum(b_g, axis=0)
            b_dv += _dot(b_k * tl.exp(b_endk[None, :] - b_Gk), b_E, p_k, PRECISION)
            b_lowest = tl.min(tl.min(b_Gk, axis=1), axis=0)
            b_highest = tl.max(tl.max(b_Gk, axis=1), axis=0)
            if (b_lowest > -60.0) & (b_highest < 60.0):
                b_scores += _dot(b_q * tl.exp(b_Gk), tl.trans(b_k * tl.exp(-b_Gk)), p_k, PRECISION)
            else:
                for i_j in range(0, BK):
                    pick = tl.arange(0, BK)[None, :] == i_j
                    q_col = tl.sum(tl.where(pick, b_q, 0.0), axis=1)
                    k_col = tl.sum(tl.where(pick, b_k, 0.0), axis=1)
                    g_col = tl.sum(tl.where(pick, b_Gk, 0.0), axis=1)
                    gap = tl.where(causal, g_col[:, None] - g_col[None, :], float("-inf"))
                    b_scores += q_col[:, None] * k_col[None, :] * tl.exp(gap)
        else:
            b_dv += _dot(b_k, b_E, p_k, PRECISION)
            b_scores += _dot(b_q, tl.trans(b_k), p_k, PRECISION)
            if NORMALISED:
                b_kdn += tl.sum(b_k * tl.load(p_dnends + (i_n * n_chunks + i_c) * K + o_k, mask=m_k, other=0.0).to(ACC)[None, :], axis=1)
    if not ROWS:
        b_dv = b_dv * tl.exp(b_end - b_G)[:, None]
        b_kdn = b_kdn * tl.exp(b_end - b_G)
        b_scores = b_scores * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
    b_scores = tl.where(causal, b_scores, 0.0)
    b_do = tl.load(p_dout + o_c * sdout_t + o_t[:, None] * sdout_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    if NORMALISED:
        b_do = b_do * tl.load(p_scale + i_n * T + o_c + o_t, mask=m_t, other=0.0).to(ACC)[:, None]
    b_dv += _dot(tl.trans(b_scores), b_do, p_k, PRECISION)
    if SCALED:  # b_dv is the gradient of diag(c) v: this value block's share of dc, and dv
        b_v = tl.load(p_v + o_c * sv_t + o_t[:, None] * sv_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
        b_c = tl.load(p_c + o_c * sc_t + o_t * sc_t, mask=m_t, other=0.0).to(ACC)
        b_dc = tl.sum(b_dv * b_v, axis=1)
        if NORMALISED:
            b_dden = tl.load(p_dden + i_n * T + o_c + o_t, mask=m_t, other=0.0).to(ACC)
            b_dc += tl.where(i_v == 0, b_kdn + tl.sum(b_scores * b_dden[:, None], axis=0), 0.0)
        tl.store(p_dc + (o_c + o_t) * sdc_t + i_v, b_dc, mask=m_t)
        b_dv = b_dv * b_c[:, None]
    if SKIP:
        tl.debug_barrier()  # skip_t do_t, stored by other threads of this program at its start
        b_dv += tl.load(p_dv + o_c * sdv_t + o_t[:, None] * sdv_t + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0.0).to(ACC)
    tl.store(p_dv + o_c * sdv_t + o_t[:, None] * sdv_t + o_v[None, :], b_dv, mask=m_t[:, None] & m_v[None, :])


@dataclass(frozen=True)
class Tiling:
    """Block sizes and launch options of the chunked kernels, chosen so that nothing spills.

    ``chunk``: steps per chunk (``BT``).  ``state_key_block``: the key rows of one program of
    the backward's walk over chunks (``walk_state_grads``; the key dimension is split
    across programs there); ``output_key_block``: the key block ``walk_outputs``,
    ``chunk_outputs`` and ``chunk_value_grads`` walk the key dimension in; ``value_block``: the value columns of one
    program; ``gradient_key_block``/``gradient_value_block``: the key block of one
    ``chunk_key_grads`` program and the value block it walks in.  ``precision``: ``tl.dot``'s
    ``input_precision``, ``"ieee"`` (exact float32) unless TF32 was asked for.

    The float32 ``ieee`` product runs on FMA units with each thread holding whole rows and
    columns of its operands, so the blocks that feed it stay narrow: compiled for sm_80 and
    sm_90 (``tests/test_triton_compile.py``, ``benchmarks/RESULTS_COMPILE.md``) every kernel,
    forward and backward, float32, TF32 or bfloat16 operands, uses at most 236 registers, no
    spills and at most 40 KB of shared memory at dk, dv <= 128.
    """

    chunk: int
    state_key_block: int
    output_key_block: int
    value_block: int
    num_warps: int
    num_stages: int
    precision: str
    gradient_key_block: int = 16
    gradient_value_block: int = 16
    # The value columns of one walk_outputs program and the key block it walks in (it holds the
    # read-outs, the values and a state block of that width beside the chunk's scores and its
    # key block's tiles; TF32's blocks of 32 keys spilled 56 B on sm_80 with a scalar decay).
    walk_value_block: int = 32
    walk_key_block: int = 16
    # The steps of one block of the walk (0: the chunk): a normalised walk's (see Normalisation)
    # denominators beside the read-outs spilled on sm_90 in float32 with blocks of 64 steps.
    walk_steps: int = 0
    # Nonzero: the kernels read the log decays' pre-activation x and take gate_scale * logsigmoid(x)
    # (GLA's gate, see LogSigmoidGate); 0: they read the log decays.
    gate_scale: float = 0.0


def tiling(chunk: int, keys: int, values: int, dtype: torch.dtype, allow_tf32: bool = False, operands: torch.dtype | None = None) -> Tiling:
    """The :class:`Tiling` for chunks of ``chunk`` steps, ``keys`` x ``values`` states in ``dtype``;
    ``operands``: the dtype of the queries, keys and values (bfloat16 ones go to ``tl.dot`` as such)."""
    precision = "tf32" if allow_tf32 and dtype == torch.float32 else "ieee"
    return Tiling(
        chunk=_block(chunk),
        # bfloat16 operands' layout conversions spilled 4 B in a walk over the states on sm_90 with 32 key rows.
        state_key_block=16 if operands == torch.bfloat16 else min(_block(keys), 32),
        # 16, tl.dot's smallest inner dimension, for FMA products; tensor cores (TF32) hold their
        # operands in fewer registers but spill on sm_80 with blocks of 16 (ptxas -v).
        output_key_block=32 if precision == "tf32" else 16,
        value_block=min(_block(values), 64),
        num_warps=8,
        num_stages=1,
        precision=precision,
        # chunk_key_grads holds dA [BT, BT] and six [BT, BK] tiles: blocks of 32 spill on sm_80 even with TF32.
        gradient_key_block=16,
        gradient_value_block=16,
        walk_value_block=min(_block(values), 32),
        walk_key_block=16,
    )


def _block(size: int) -> int:
    return max(16, triton.next_power_of_2(size))


def _accumulator(initial: torch.Tensor):
    """The dtype the kernels compute and write in (float64 for float64 states, else float32) and its Triton type."""
    return (torch.float64, tl.float64) if initial.dtype == torch.float64 else (torch.float32, tl.float32)


def _log_decay_rows(log_decay: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``log_decay`` ``[B, H, T, K or 1, 1]`` as the kernels read it, ``[B, H, T, K]`` or ``[B, H, T]``
    (a view: the kernels take its strides), and whether it is per key row.  The kernels floor it
    at ``-60`` as they load it (a decay of exactly 0 counts as ``e^-60``; the floor's gradient
    is zero below it), so no floored copy is made."""
    rows = log_decay.shape[-2] != 1
    g = log_decay[..., 0] if rows else log_decay[..., 0, 0]
    return (_dense_last(g) if rows else g), rows


def _dense_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` with unit stride along its last dim (the kernels' tiles are contiguous there): a view
    when it has one already, which is the usual case, else a copy."""
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _with_heads(x: torch.Tensor, sequence_dims: int) -> torch.Tensor:
    """A sequence given as ``[N, T, ...]`` (``sequence_dims`` = 3 for vectors) as ``[N, 1, T, ...]``;
    one given as ``[B, H, T, ...]`` unchanged."""
    return x.unsqueeze(1) if x.dim() == sequence_dims else x


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """The batch, head and step strides of a ``[B, H, T, ...]`` sequence, as the kernels take them."""
    return x.stride(0), x.stride(1), x.stride(2)


def _written_like(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A ``[B, H, T, d]`` result laid out as ``x`` (the layout its gradient or read-out goes back
    to, so that no copy follows), or as ``[B, T, H, d]`` when ``x`` is not dense (broadcast)."""
    out = torch.empty_like(x, dtype=dtype)  # x's strides when x is dense
    if out.stride() != x.stride():
        out = torch.empty((x.shape[0], x.shape[2], x.shape[1]) + tuple(x.shape[3:]), dtype=dtype, device=x.device).transpose(1, 2)
    return out


# The steps of one block of a normalised walk (walk_outputs with NORMALISED): blocks of 64 spilled 4-32 B on
# sm_90 in float32 however the denominators were ordered (benchmarks/RESULTS_COMPILE.md); the
# backward's chunks stay tiling().chunk long, each kept start state covering two walk blocks.
NORMALISED_WALK_STEPS = 32


@dataclass(frozen=True)
class Normalisation:
    """The normaliser a walk carries beside the state (:class:`recdsl.plan.Normaliser`): its
    initial value ``[N, K]`` and the floor of the division, a scalar per step (``[N, T]`` or
    ``[B, H, T]``).  The first read-out is then ``(q_t @ S_t) / max(|q_t . n_t|, floor_t)``."""

    initial: torch.Tensor
    floor: torch.Tensor


@dataclass(frozen=True)
class _Carried:
    """What a walk that carried a normaliser leaves: the value each kept chunk starts from
    (``[N, n_chunks, K]``; with no backward to follow, one per walk block, unread), the final
    value ``[N, K]``, the denominators ``q_t . n_t`` ``[N, T]`` and the floor as the kernels
    read it (``[N, T]``, contiguous)."""

    starts: torch.Tensor
    final: torch.Tensor
    denominators: torch.Tensor
    floor: torch.Tensor


def _walk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor, rows: bool, initial: torch.Tensor, tiles: Tiling, keep: bool, skip: torch.Tensor | None, normalisation: Normalisation | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, _Carried | None]:
    """One walk over the chunks (``walk_outputs``): the read-outs ``q_t @ S_t`` ``[B, H, T, V]`` (laid
    out ``[B, T, H, V]``; plus ``skip_t v_t`` with ``skip`` ``[B, H, T]``; divided by the
    normaliser's ``max(|q_t . n_t|, floor_t)`` with ``normalisation``), the chunk-start states
    ``[N, n_chunks, K, V]`` (with ``keep``; else two slots the walk reused), the final state
    ``[N, K, V]``, the sum of each row's queries ``[N]`` (the values ``diag(c) v`` when ``c`` is
    given) and what the normaliser left (or None)."""
    B, H, T, K = k.shape
    N, V = B * H, v.shape[-1]
    dtype, ACC = _accumulator(initial)
    steps = tiles.walk_steps or tiles.chunk  # the walk's blocks of steps; the kept chunks are tiles.chunk long
    n_blocks = triton.cdiv(T, steps)
    kept_every = tiles.chunk // steps if keep else 1
    n_slots = n_blocks if keep and kept_every == 1 else min(n_blocks, 2)
    value_blocks = triton.cdiv(V, tiles.walk_value_block)
    states = torch.empty(N, n_slots, K, V, dtype=dtype, device=k.device)
    kept = torch.empty(N, triton.cdiv(n_blocks, kept_every), K, V, dtype=dtype, device=k.device) if kept_every > 1 else states
    final = torch.empty(N, K, V, dtype=dtype, device=k.device)
    out = torch.empty(B, T, H, V, dtype=dtype, device=k.device).transpose(1, 2)
    q_sums = torch.empty(N, dtype=dtype, device=k.device)
    scale = g if c is None else c  # (not read when not scaled, nor skip when not skipped)
    skip_in = g if skip is None else skip
    carried = None
    if normalisation is not None:
        floor = normalisation.floor.reshape(N, T).to(dtype).contiguous()  # (one number per step: a copy costs nothing)
        carried = _Carried(
            torch.empty(N, triton.cdiv(n_blocks, kept_every), K, dtype=dtype, device=k.device),
            torch.empty(N, K, dtype=dtype, device=k.device),
            torch.empty(N, T, dtype=dtype, device=k.device),
            floor,
        )
        walk_slots = torch.empty(N, value_blocks, 2, K, dtype=dtype, device=k.device)
        n_in = (walk_slots, carried.starts, normalisation.initial.to(dtype).contiguous(), carried.final, floor, carried.denominators)
    else:
        n_in = (q_sums,) * 6  # (not read when not normalised)
    launch(
        walk_outputs, (N, value_blocks), q, k, v, scale, g, skip_in, initial.to(dtype).contiguous(), states, kept, final, out, q_sums, *n_in, T, K, V, n_blocks, n_slots, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(scale), *_strides(g), *_strides(skip_in), *_strides(out),
        SCALED=c is not None, SKIP=skip is not None, NORMALISED=normalisation is not None, KEPT_EVERY=kept_every, gate_scale=tiles.gate_scale, GATE=tiles.gate_scale != 0.0, ROWS=rows,
        BT=steps, BK=tiles.walk_key_block, BV=tiles.walk_value_block, ACC=ACC, PRECISION=tiles.precision, **_options(tiles),
    )
    return out, kept, final, q_sums, carried


def _options(tiles: Tiling) -> dict:
    return dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)


def _outputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor, rows: bool, starts: torch.Tensor, tiles: Tiling) -> torch.Tensor:
    """The read-outs ``q_t @ S_t`` ``[B, H, T, V]`` (laid out ``[B, T, H, V]``) from the chunk-start states."""
    B, H, T, K = k.shape
    V = v.shape[-1]
    n_chunks = starts.shape[1]
    out = torch.empty(B, T, H, V, dtype=starts.dtype, device=k.device).transpose(1, 2)
    ACC = tl.float64 if starts.dtype == torch.float64 else tl.float32
    launch(
        chunk_outputs, (B * H * n_chunks, triton.cdiv(V, tiles.value_block)), q, k, v, g if c is None else c, g, starts, out, T, K, V, n_chunks, H,
        *_strides(q), *_strides(k), *_strides(v), *_strides(g if c is None else c), *_strides(g), *_strides(out),
        SCALED=c is not None, gate_scale=tiles.gate_scale, GATE=tiles.gate_scale != 0.0, ROWS=rows, BT=tiles.chunk, BK=tiles.output_key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **_options(tiles),
    )
    return out


@dataclass(frozen=True)
class LogSigmoidGate:
    """The log decays given as their pre-activation ``x``: the decay is ``scale * logsigmoid(x)`` (GLA's
    gate, ``logsigmoid(g) / 16``), evaluated by the kernels as they read ``x`` and differentiated
    there (``scale * sigmoid(-x)``), so that neither it nor its backward runs in torch."""

    scale: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The log decay in torch (for the torch form)."""
        return self.scale * torch.nn.functional.logsigmoid(x)


def forward(readouts: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, initial: torch.Tensor, chunk: int, allow_tf32: bool = False, value_scale: torch.Tensor | None = None, gate: LogSigmoidGate | None = None, skip: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs and final state; ``k`` ``[N, T, K]``, ``v`` ``[N, T, V]``, ``log_decay`` ``[N, T, K or 1, 1]``,
    or each with the heads on an axis of their own, ``[B, H, T, ...]`` (``N = B H``: the kernels
    take batch, head and step strides, so a ``[B, T, H, K]`` tensor's transposed view is read
    in place); ``initial`` ``[N, K, V]``.  The read-outs come in the queries' form.
    ``value_scale`` (``[N, T]`` or ``[B, H, T]``): the values are ``value_scale[..., None] * v``,
    formed in the kernels as they read ``v`` (mLSTM's input gate, Mamba-2's ``dt``).  ``gate``:
    ``log_decay`` holds the pre-activation of a per-row :class:`LogSigmoidGate`.  ``skip`` (shaped as
    ``value_scale``): the first read-out is ``q_t @ S_t + skip_t v_t`` (Mamba-2's ``D x``, with ``v``
    the values before their scale).  The chunk-start states are not kept (no backward follows)."""
    run = _Forward.of(readouts, k, v, log_decay, initial, chunk, allow_tf32, value_scale, gate, skip, keep=False)
    return run.outputs, run.final


@dataclass(frozen=True)
class _Forward:
    """One forward pass and what its backward needs: the inputs as the kernels read them
    (``[B, H, T, ...]`` views), the tiling, the chunk-start states, the read-outs (in the
    callers' form), the final state and the sum of the first read-out's queries per row (``[N]``)."""

    readouts: tuple[torch.Tensor, ...]
    k: torch.Tensor
    v: torch.Tensor
    c: torch.Tensor | None  # the values' scale per step, or None
    g: torch.Tensor
    rows: bool
    tiles: Tiling
    starts: torch.Tensor
    outputs: list[torch.Tensor]
    final: torch.Tensor
    query_sums: torch.Tensor
    skip: torch.Tensor | None = None  # the first read-out's skip_t v_t term, [B, H, T], or None
    carried: _Carried | None = None  # the normaliser the walk carried, or None

    @staticmethod
    def of(readouts, k, v, log_decay, initial, chunk: int, allow_tf32: bool, value_scale: torch.Tensor | None = None, gate: LogSigmoidGate | None = None, skip: torch.Tensor | None = None, keep: bool = True, normalisation: Normalisation | None = None) -> "_Forward":
        """``keep``: keep every chunk-start state (for the backward); without it the walk reuses two
        slots, unless several read-outs read them back."""
        flat = k.dim() == 3  # [N, T, K]: one head per row
        g, rows = _log_decay_rows(_with_heads(log_decay, 4))
        k, v = _dense_last(_with_heads(k, 3)), _dense_last(_with_heads(v, 3))
        readouts = tuple(_dense_last(_with_heads(q, 3)) for q in readouts)
        c = None if value_scale is None else _with_heads(value_scale, 2)
        tiles = tiling(chunk, k.shape[-1], v.shape[-1], _accumulator(initial)[0], allow_tf32, operands=k.dtype)
        if gate is not None:
            assert rows, "the logsigmoid gate is taken for a decay per key row"
            tiles = replace(tiles, gate_scale=float(gate.scale))
        skip = None if skip is None else _with_heads(skip, 2)
        if normalisation is not None:
            tiles = replace(tiles, walk_steps=min(tiles.chunk, NORMALISED_WALK_STEPS))

        # The first read-out in the walk over the chunks; any other from the chunk-start states it kept.
        first, starts, final, query_sums, carried = _walk(readouts[0], k, v, c, g, rows, initial, tiles, keep or len(readouts) > 1, skip, normalisation)
        outputs = [first] + [_outputs(q, k, v, c, g, rows, starts, tiles) for q in readouts[1:]]
        if flat:
            outputs = [o.squeeze(1) for o in outputs]
        return _Forward(readouts, k, v, c, g, rows, tiles, starts, outputs, final, query_sums, skip, carried)


@dataclass(frozen=True)
class Gradients:
    """What :func:`backward` returns: one gradient per read-out, of ``k``, ``v``, the (floored) log
    decay ``[B, H, T, K]`` or ``[B, H, T]``, and the initial state (``[N, K, V]``); with a
    normaliser, of its initial value ``[N, K]`` and of the floor ``[N, T]``."""

    readouts: list[torch.Tensor]
    k: torch.Tensor
    v: torch.Tensor
    log_decay: torch.Tensor
    initial: torch.Tensor
    value_scale: torch.Tensor | None = None
    skip: torch.Tensor | None = None
    normaliser_initial: torch.Tensor | None = None
    floor: torch.Tensor | None = None


@dataclass(frozen=True)
class _CarriedGradient:
    """What the backward of a walk that carried a normaliser reads: its chunk-start values
    ``[N, n_chunks, K]`` and final value ``[N, K]``, the denominators and the floor ``[N, T]``,
    the normalised read-out and the gradient of the final value (or None)."""

    starts: torch.Tensor
    final: torch.Tensor
    denominators: torch.Tensor
    floor: torch.Tensor
    output: torch.Tensor
    grad_final: torch.Tensor | None


def backward(readouts: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, rows: bool, starts: torch.Tensor, final: torch.Tensor, grad_outputs: list[torch.Tensor | None], grad_final: torch.Tensor | None, tiles: Tiling, c: torch.Tensor | None = None, skip: torch.Tensor | None = None, carried: _CarriedGradient | None = None) -> Gradients:
    """The adjoint of :func:`forward` by Triton kernels, from the chunk-start states it kept.

    ``readouts``, ``k``, ``v``, ``g`` as :class:`_Forward` keeps them (``[B, H, T, ...]``); the
    gradients come laid out as the tensors they belong to.  Per read-out (the map is linear
    in the pair of read-out and final-state gradients, so the read-outs' gradients are
    summed): ``walk_state_grads`` walks the chunks backwards for the gradient of each chunk's
    end state and of the initial state; ``chunk_key_grads`` and ``chunk_value_grads``
    recompute each chunk's scores and give dq, dk, dg and dv (with ``c``, the values' scale:
    dv of the unscaled values and each value block's share of dc, summed here; with ``skip``
    ``[B, H, T]``, the first read-out's ``skip_t v_t`` term: dskip from chunk_key_grads, its
    share of dv from chunk_value_grads).  With ``carried`` (a normaliser the forward carried):
    ``walk_state_grads`` forms the division's gradients too, and the three kernels carry the
    normaliser's column of ones beside the first read-out's.
    """
    B, H, T, K = k.shape
    N, V = B * H, v.shape[-1]
    n_chunks = starts.shape[1]
    dtype, ACC = starts.dtype, (tl.float64 if starts.dtype == torch.float64 else tl.float32)
    constants = dict(gate_scale=tiles.gate_scale, GATE=tiles.gate_scale != 0.0, ROWS=rows, BT=tiles.chunk, ACC=ACC, PRECISION=tiles.precision, **_options(tiles))
    key_blocks = triton.cdiv(K, tiles.gradient_key_block)
    d_readouts: list[torch.Tensor] = []
    dk = dv = dg = d_initial = dc = d_skip = None
    value_blocks = triton.cdiv(V, tiles.value_block)
    values_scale = g if c is None else c  # (not read when not scaled)
    pairs = [(q, d) for q, d in zip(readouts, grad_outputs)]
    if not any(d is not None for _, d in pairs):
        pairs = pairs[:1]  # only the final state's gradient: one walk, with zero read-out gradients
    d_n_initial = d_floor = None
    for i, (q, d_out) in enumerate(pairs):
        d_out = torch.zeros(B, H, T, V, dtype=dtype, device=k.device) if d_out is None else _dense_last(_with_heads(d_out, 3).to(dtype))
        d_final = grad_final if (i == 0 and grad_final is not None) else torch.zeros(N, K, V, dtype=dtype, device=k.device)
        d_ends = torch.empty(N, n_chunks, K, V, dtype=dtype, device=k.device)
        d_start = torch.empty(N, K, V, dtype=dtype, device=k.device)
        normalised = carried is not None and i == 0
        if normalised:
            # The division's gradients (walk_state_grads forms them): 1 / D per step (applied to
            # d_out by the kernels that follow), dden and dfloor; then n's end gradients.
            scale, d_den, d_floor = (torch.empty(N, T, dtype=dtype, device=k.device) for _ in range(3))
            out = _with_heads(carried.output, 3)
            d_n_final = torch.zeros(N, K, dtype=dtype, device=k.device) if carried.grad_final is None else carried.grad_final.reshape(N, K).to(dtype).contiguous()
            d_n_ends = torch.empty(N, n_chunks, K, dtype=dtype, device=k.device)
            d_n_initial = torch.empty(N, K, dtype=dtype, device=k.device)
            n_walk = (out, carried.denominators, carried.floor, scale, d_den, d_floor, d_n_final, d_n_ends, d_n_initial)
            n_chunk = (scale, d_den, carried.starts, carried.final, d_n_ends)
        else:
            out = d_out
            n_walk = (d_out,) + (d_start,) * 8  # (not read when not normalised: tensors passed anyway stand in)
            n_chunk = (d_ends,) * 5
        walk = (N, triton.cdiv(K, tiles.state_key_block), triton.cdiv(V, tiles.value_block))
        launch(
            walk_state_grads, walk, q, g, d_out, d_final.to(dtype).contiguous(), d_ends, d_start, *n_walk, T, K, V, n_chunks, H, *_strides(q), *_strides(g), *_strides(d_out), *_strides(out),
            NORMALISED=normalised, BK=tiles.state_key_block, BV=tiles.value_block, **constants,
        )
        dq = _written_like(q, dtype)
        dk_i = _written_like(k, dtype)
        # A decay per key row: its gradient in g's layout; a shared one: each key block's share, summed below.
        dg_i = _written_like(g, dtype) if rows else torch.empty(B, H, T, key_blocks, dtype=dtype, device=k.device)
        skipped = skip is not None and i == 0
        d_skip_i = torch.empty(B, H, T, dtype=dtype, device=k.device) if skipped else dg_i  # (not written when not skipped)
        launch(
            chunk_key_grads, (N * n_chunks, key_blocks), q, k, v, values_scale, g, d_out, starts, final, d_ends, dq, dk_i, dg_i, d_skip_i, *n_chunk, T, K, V, n_chunks, H,
            *_strides(q), *_strides(k), *_strides(v), *_strides(values_scale), *_strides(g), *_strides(d_out), *_strides(dq), *_strides(dk_i), *_strides(dg_i), *_strides(d_skip_i),
            SCALED=c is not None, SKIP=skipped, NORMALISED=normalised, BK=tiles.gradient_key_block, BV=tiles.gradient_value_block, **constants,
        )
        dv_i = _written_like(v, dtype)
        dc_i = torch.empty(B, H, T, value_blocks, dtype=dtype, device=k.device) if c is not None else dv_i  # (not written when not scaled)
        skip_in = skip if skipped else values_scale  # (not read when not skipped)
        v_read = v if c is not None else d_out  # (v is read only to scale: a tensor passed anyway stands in)
        launch(
            chunk_value_grads, (N * n_chunks, value_blocks), q, k, v_read, values_scale, g, d_out, d_ends, dv_i, dc_i, skip_in, *n_chunk[:2], n_chunk[4], T, K, V, n_chunks, H,
            *_strides(q), *_strides(k), *_strides(v_read), *_strides(values_scale), *_strides(g), *_strides(d_out), *_strides(dv_i), *_strides(dc_i), *_strides(skip_in),
            SCALED=c is not None, SKIP=skipped, NORMALISED=normalised, BK=tiles.output_key_block, BV=tiles.value_block, **(dict(constants, maxnreg=SCALED_VALUE_GRAD_REGISTERS) if c is not None else constants),
        )
        if not rows:
            dg_i = dg_i[..., 0] if key_blocks == 1 else dg_i.sum(-1)
        if c is not None:
            dc_i = dc_i[..., 0] if value_blocks == 1 else dc_i.sum(-1)
            dc = dc_i if dc is None else dc + dc_i
        if skipped:
            d_skip = d_skip_i
        d_readouts.append(dq)
        dk, dv, dg, d_initial = (dk_i, dv_i, dg_i, d_start) if dk is None else (dk + dk_i, dv + dv_i, dg + dg_i, d_initial + d_start)
    d_readouts += [torch.zeros_like(d_readouts[0]) for _ in range(len(readouts) - len(d_readouts))]  # (a list comprehension: none made for none missing)
    return Gradients(d_readouts, dk, dv, dg, d_initial, dc, d_skip, d_n_initial, d_floor)


def decayed_outer_products(readouts, inputs, log_decay, initial, chunk, allow_tf32: bool = False, value_scales=None, gate: LogSigmoidGate | None = None, skip: torch.Tensor | None = None, infinite_readouts: bool = False, normalisation: Normalisation | None = None):
    """:func:`recdsl.backends.chunk_kernels.decayed_outer_products` with Triton kernels.

    Takes the Triton path for one input term and a decay shared by the state or by each row;
    anything else (several terms, a decay per value column) goes to the torch form.
    ``value_scales``: per input term, a scalar per step (or None) scaling its values (the
    term is ``k_t (c_t v_t)^T``), applied in the kernels as they read ``v``.  ``gate``:
    ``log_decay`` is the pre-activation of a :class:`LogSigmoidGate`.  ``skip`` (one input term; a
    scalar per step, shaped as a value scale): the first read-out is ``q_t @ S_t + skip_t v_t``,
    ``v`` the values before their scale (Mamba-2's ``D x``), added in the kernels.

    ``infinite_readouts``: give the loop's ``+-inf`` where a query is infinite, as
    :func:`.chunk_kernels.with_infinite_readouts` does around a kernel, here without reading the
    queries first: the walk sums the first read-out's queries as it reads them, and only a sum
    that is not finite (or another read-out's) sends the call through that function.

    ``normalisation`` (one input term, a decay shared by the state, no skip term): the walk
    carries the :class:`Normalisation`'s normaliser ``n`` beside the state and the first
    read-out is ``(q_t @ S_t) / max(|q_t . n_t|, floor_t)``; the call returns
    ``(read-outs, (final state, final n))``, or None when a query may be infinite (the
    caller then scans both states: the loop's infinities are not reproduced here).
    """
    from . import chunk_kernels

    if normalisation is not None:
        assert len(inputs) == 1 and log_decay.shape[-1] == 1 and log_decay.shape[-2] == 1 and gate is None and skip is None
        outputs, final, sums, carried_final = _with_query_sums(readouts, inputs, log_decay, initial, chunk, allow_tf32, value_scales, gate, skip, normalisation)
        if _may_be_infinite(readouts, sums):
            return None
        return outputs, (final, carried_final)
    if infinite_readouts:
        outputs, final, sums, _ = _with_query_sums(readouts, inputs, log_decay, initial, chunk, allow_tf32, value_scales, gate, skip)
        if _may_be_infinite(readouts, sums):
            kernel = functools.partial(decayed_outer_products, allow_tf32=allow_tf32, value_scales=value_scales, gate=gate, skip=skip)
            return chunk_kernels.with_infinite_readouts(kernel, readouts, inputs, log_decay, initial, chunk)
        return outputs, final
    outputs, final, _, _ = _with_query_sums(readouts, inputs, log_decay, initial, chunk, allow_tf32, value_scales, gate, skip)
    return outputs, final


def _may_be_infinite(readouts: list[torch.Tensor], first_sums: torch.Tensor | None) -> bool:
    """Whether a read-out vector may hold an infinity: the first read-out's per-row sums (from the
    walk, or None when the torch form ran) or any other's sum is not finite."""
    from .triton_launch import kernels_run

    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if (is_compiling is not None and is_compiling()) or not kernels_run():  # a trace, or kernels recorded, not run
        return False
    sums = [q.sum() for q in (readouts if first_sums is None else readouts[1:])]
    if first_sums is not None:
        sums.append(first_sums.sum())
    return not all(bool(torch.isfinite(s)) for s in sums)


def _with_query_sums(readouts, inputs, log_decay, initial, chunk, allow_tf32: bool, value_scales, gate, skip, normalisation: Normalisation | None = None):
    """:func:`decayed_outer_products`'s read-outs and final state, the per-row sums of the first
    read-out's queries from the walk (None when the torch form ran) and the normaliser's final
    value (None without ``normalisation``, which takes the kernels' path)."""
    from . import chunk_kernels

    if gate is not None and (len(inputs) != 1 or log_decay.shape[-1] != 1 or log_decay.shape[-2] == 1):
        log_decay, gate = gate(log_decay), None  # the torch form, or a shared decay: the gate in torch

    scale = None
    skipped_values = inputs[0].v  # (before their scale: the skip term's)
    if value_scales is not None:
        if len(inputs) == 1 and log_decay.shape[-1] == 1:
            scale = value_scales[0]
        else:
            inputs = [t if c is None else chunk_kernels.RankOneInput(t.k, t.v * c.unsqueeze(-1)) for t, c in zip(inputs, value_scales)]

    if len(inputs) != 1 or log_decay.shape[-1] != 1:
        # The torch form computes in the dtype it is given: low-precision operands (see
        # LowPrecisionInputs.NATIVE) in the states' dtype.
        dtype = initial.dtype
        readouts = [q.to(dtype) for q in readouts]
        inputs = [chunk_kernels.RankOneInput(term.k.to(dtype), term.v.to(dtype)) for term in inputs]
        log_decay = log_decay.to(dtype)
        if log_decay.dim() == 5:  # heads on their own axis: the torch form takes [B H, T, ...]
            B, H = log_decay.shape[:2]
            flat = [chunk_kernels.RankOneInput(t.k.flatten(0, 1), t.v.flatten(0, 1)) for t in inputs]
            outputs, final = chunk_kernels.decayed_outer_products([q.flatten(0, 1) for q in readouts], flat, log_decay.flatten(0, 1), initial, chunk)
            outputs = [o.unflatten(0, (B, H)) for o in outputs]
        else:
            outputs, final = chunk_kernels.decayed_outer_products(readouts, inputs, log_decay, initial, chunk)
        if skip is not None:
            outputs[0] = outputs[0] + skip.to(dtype).unsqueeze(-1) * skipped_values.to(dtype)
        return outputs, final, None, None
    term = inputs[0]
    n_initial, floor = (None, None) if normalisation is None else (normalisation.initial, normalisation.floor)
    leaves = (term.k, term.v, scale, log_decay, initial, skip, n_initial, floor, *readouts)
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in leaves)  # a backward may follow: keep the chunk-start states
    *outputs, final, carried_final, sums = DecayedOuterProducts.apply(chunk, allow_tf32, gate, keep, term.k, term.v, scale, log_decay, initial, skip, n_initial, floor, *readouts)
    return list(outputs), final, sums, (carried_final if normalisation is not None else None)


class DecayedOuterProducts(torch.autograd.Function):
    """The Triton forward, keeping the chunk-start states (``T / chunk`` of them) when a gradient is
    wanted; the Triton backward.  Returns the read-outs, the final state, the normaliser's final
    value (an empty tensor without one) and the per-row sums of the first read-out's queries
    (not differentiable)."""

    @staticmethod
    def forward(ctx, chunk: int, allow_tf32: bool, gate, keep: bool, k, v, scale, log_decay, initial, skip, n_initial, floor, *readouts):
        # ``scale`` (or None): the values are scale[..., None] * v, formed in the kernels; ``gate``
        # (or None): log_decay is its pre-activation; ``skip`` (or None): the first read-out's skip_t v_t;
        # ``n_initial`` and ``floor`` (or None): the normaliser the walk carries (see Normalisation).
        normalisation = None if n_initial is None else Normalisation(n_initial, floor)
        run = _Forward.of(readouts, k, v, log_decay, initial, chunk, allow_tf32, scale, gate, skip, keep=keep, normalisation=normalisation)
        carried = run.carried
        carried_final = carried.final if carried is not None else run.final.new_empty(0)
        ctx.mark_non_differentiable(run.query_sums)
        if carried is None:
            ctx.mark_non_differentiable(carried_final)
        ctx.normalised = carried is not None
        ctx.n_shape = None if n_initial is None else n_initial.shape
        ctx.n_dtype = None if n_initial is None else n_initial.dtype
        ctx.floor_shape = None if floor is None else floor.shape
        ctx.floor_dtype = None if floor is None else floor.dtype
        ctx.scale_dtype = None if scale is None else scale.dtype
        ctx.scale_shape = None if scale is None else scale.shape
        ctx.skip_dtype = None if skip is None else skip.dtype
        ctx.skip_shape = None if skip is None else skip.shape
        ctx.tiles, ctx.rows = run.tiles, run.rows
        ctx.dtypes = (k.dtype, v.dtype, log_decay.dtype, initial.dtype, *(q.dtype for q in readouts))
        ctx.log_decay_shape = log_decay.shape
        ctx.shapes = (k.shape, v.shape, *(q.shape for q in readouts))  # [N, T, ...] or [B, H, T, ...]
        # A copy of the final state (one state per row): the caller may change the one returned in place.
        # With a normaliser: its chunk-start values, a copy of its final value, the denominators,
        # the floor and the first (normalised) read-out, whose gradient reads it.
        normaliser = (carried.starts, carried.final.clone(), carried.denominators, carried.floor, run.outputs[0]) if carried is not None else (run.g,) * 5
        ctx.save_for_backward(run.k, run.v, run.g if run.c is None else run.c, run.g, run.g if run.skip is None else run.skip, run.starts, run.final.clone(), *normaliser, *run.readouts)
        return (*run.outputs, run.final, carried_final, run.query_sums)

    @staticmethod
    def backward(ctx, *grads):
        k, v, c, g, skip, starts, final, n_starts, n_final, denominators, floor, normalised_out, *readouts = ctx.saved_tensors
        *grad_outputs, grad_final, grad_n_final, _ = grads
        scaled, skipped = ctx.scale_dtype is not None, ctx.skip_dtype is not None
        carried = _CarriedGradient(n_starts, n_final, denominators, floor, normalised_out, grad_n_final) if ctx.normalised else None
        found = backward(list(readouts), k, v, g, ctx.rows, starts, final, list(grad_outputs), grad_final, ctx.tiles, c if scaled else None, skip if skipped else None, carried)
        d_log_decay = found.log_decay.reshape(ctx.log_decay_shape)
        k_dtype, v_dtype, g_dtype, initial_dtype, *q_dtypes = ctx.dtypes
        k_shape, v_shape, *q_shapes = ctx.shapes
        return (
            None,
            None,
            None,
            None,
            found.k.reshape(k_shape).to(k_dtype),
            found.v.reshape(v_shape).to(v_dtype),
            found.value_scale.reshape(ctx.scale_shape).to(ctx.scale_dtype) if scaled else None,
            d_log_decay.to(g_dtype),
            found.initial.to(initial_dtype),
            found.skip.reshape(ctx.skip_shape).to(ctx.skip_dtype) if skipped else None,
            found.normaliser_initial.reshape(ctx.n_shape).to(ctx.n_dtype) if ctx.normalised else None,
            found.floor.reshape(ctx.floor_shape).to(ctx.floor_dtype) if ctx.normalised else None,
            *(d.reshape(s).to(t) for d, s, t in zip(found.readouts, q_shapes, q_dtypes)),
        )
