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

The backward pass is :func:`recdsl.backends.chunk_kernels.delta_rule` recomputed in torch
under autograd (chunk-boundary states only, never per step); a backward kernel is future
work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .triton_launch import launch

# The most key rows the kernels take (dk <= 128 compiles without spills; see tiling()).
_MAX_KEYS = 128


@triton.jit
def delta_prepare(p_l, p_r, p_w, p_a, p_g, p_uw, p_wr, T, K, V, n_chunks, GATED: tl.constexpr, SAME_SIDES: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row and chunk): the chunk's UT transform.
    i_nc = tl.program_id(0)
    i_n = (i_nc // n_chunks).to(tl.int64)
    i_c = i_nc % n_chunks
    o_row = i_n * T + i_c * BT  # the chunk's first step, counted over all rows
    o_t = tl.arange(0, BT)
    m_t = i_c * BT + o_t < T
    strict = o_t[:, None] > o_t[None, :]
    b_a = tl.load(p_a + o_row + o_t, mask=m_t, other=0.0).to(ACC)
    if GATED:
        b_g = tl.maximum(tl.load(p_g + o_row + o_t, mask=m_t, other=0.0).to(ACC), -60.0)
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
        b_l = tl.load(p_l + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
        if SAME_SIDES:  # DeltaNet's k (I - beta k k^T): one vector read once
            b_r = b_l
        else:
            b_r = tl.load(p_r + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
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
        b_w = tl.load(p_w + o_row * V + o_t[:, None] * V + o_v[None, :], mask=m_tv, other=0.0).to(ACC)
        tl.store(p_uw + o_row * V + o_t[:, None] * V + o_v[None, :], tl.dot(b_inv, b_w, input_precision=PRECISION), mask=m_tv)
    # W_r = T diag(a e^{G'}) R, key block by key block.
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        if SAME_SIDES:
            b_r = tl.load(p_l + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        else:
            b_r = tl.load(p_r + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
        tl.store(p_wr + o_row * K + o_t[:, None] * K + o_k[None, :], tl.dot(b_inv, b_r * b_ar[:, None], input_precision=PRECISION), mask=m_tk)


@triton.jit
def delta_chunks(p_q, p_l, p_g, p_uw, p_wr, p_initial, p_out, p_state, T, K, V, n_chunks, GATED: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    # One program per (row, value block), the chunks in order.  The state's columns of this
    # value block live in p_state (the final state's buffer, cached on chip) between chunks
    # and are walked in key blocks of BK rows, so every product's inner dimension is BK or
    # BT: an fp32 tl.dot on FMA units holds whole rows and columns of its operands.
    i_n = tl.program_id(0).to(tl.int64)
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
            b_q = tl.load(p_q + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            b_l = tl.load(p_l + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0)
            b_u += tl.dot(b_wr, b_s, input_precision=PRECISION)
            b_out += tl.dot(b_q.to(ACC), b_s, input_precision=PRECISION)
            b_scores += tl.dot(b_q, tl.trans(b_l), input_precision=PRECISION, out_dtype=ACC)
        if GATED:
            b_G = tl.cumsum(tl.maximum(tl.load(p_g + o_row + o_t, mask=m_t, other=0.0).to(ACC), -60.0), axis=0)
            b_end = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)  # G_C (padding steps carry the state)
            b_out = b_out * tl.exp(b_G)[:, None]
            b_scores = b_scores * tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], float("-inf")))
        else:
            b_scores = tl.where(causal, b_scores, 0.0)
        b_out += tl.dot(b_scores, b_u, input_precision=PRECISION)
        tl.store(p_out + o_row * V + o_t[:, None] * V + o_v[None, :], b_out, mask=m_tv)
        tl.debug_barrier()  # every thread has read S_0 before it is overwritten
        # S_C = e^{G_C} S_0 + (L e^{G_C - G_s})^T U.
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_tk = m_t[:, None] & (o_k[None, :] < K)
            m_kv = (o_k[:, None] < K) & m_v[None, :]
            b_s = tl.load(p_state + o_state + o_k[:, None] * V + o_v[None, :], mask=m_kv, other=0.0)
            b_l = tl.load(p_l + o_row * K + o_t[:, None] * K + o_k[None, :], mask=m_tk, other=0.0).to(ACC)
            if GATED:
                b_s = b_s * tl.exp(b_end) + tl.dot(tl.trans(b_l * tl.exp(b_end - b_G)[:, None]), b_u, input_precision=PRECISION)
            else:
                b_s += tl.dot(tl.trans(b_l), b_u, input_precision=PRECISION)
            tl.store(p_state + o_state + o_k[:, None] * V + o_v[None, :], b_s, mask=m_kv)
        tl.debug_barrier()  # the next chunk reads the state in another layout


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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs ``q_t @ S_t`` and the final state, by the Triton kernels; the arguments of
    :func:`recdsl.backends.chunk_kernels.delta_rule` (``left``, ``right`` ``[N, T, K]``,
    ``coefficient`` and ``log_decay`` ``[N, T]``, inputs ``[N, T, V]``, ``initial``
    ``[N, K, V]``).  Keys and queries in bfloat16/float16 are read as such; everything else
    is computed in float32 (float64 for a float64 state)."""
    N, T, K = left.shape
    V = initial.shape[-1]
    assert supports(K), f"the delta-rule kernels take at most {_MAX_KEYS} key rows"
    dtype = torch.float64 if initial.dtype == torch.float64 else torch.float32
    ACC = tl.float64 if dtype == torch.float64 else tl.float32
    tiles = tiling(chunk, K, V, dtype, allow_tf32, steps=T)
    BT = tiles.chunk
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    n_chunks = triton.cdiv(T, BT)
    device = left.device
    low = left.dtype if left.dtype in (torch.bfloat16, torch.float16) and right.dtype == left.dtype else dtype
    same_sides = right is left
    left = left.to(low).contiguous()
    right = left if same_sides else right.to(low).contiguous()
    w = None
    for term in inputs:
        w = term if w is None else w + term
    w = (w if w is not None else torch.zeros(N, T, V, dtype=dtype, device=device)).contiguous()
    a = coefficient.contiguous()
    gated = log_decay is not None
    g = log_decay.contiguous() if gated else a  # (not read when not gated)
    uw = torch.empty(N, T, V, dtype=dtype, device=device)
    wr = torch.empty(N, T, K, dtype=dtype, device=device)
    launch(delta_prepare, (N * n_chunks,), left, right, w, a, g, uw, wr, T, K, V, n_chunks, GATED=gated, SAME_SIDES=same_sides, BT=BT, BK=tiles.prepare_block, BV=tiles.prepare_block, ACC=ACC, PRECISION=tiles.precision, **options)
    start = initial.to(dtype).contiguous()
    results = []
    final = torch.empty(N, K, V, dtype=dtype, device=device)
    grid = (N, triton.cdiv(V, tiles.value_block))
    for q in readouts:
        # One pass over the chunks per read-out (each recomputes the same states; cells read a
        # delta-rule state out once).
        out = torch.empty(N, T, V, dtype=dtype, device=device)
        launch(delta_chunks, grid, q.to(low).contiguous(), left, g, uw, wr, start, out, final, T, K, V, n_chunks, GATED=gated, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options)
        results.append(out)
    if not readouts:
        empty = torch.zeros(N, T, K, dtype=low, device=device)
        launch(delta_chunks, grid, empty, left, g, uw, wr, start, torch.empty(N, T, V, dtype=dtype, device=device), final, T, K, V, n_chunks, GATED=gated, BT=BT, BK=tiles.key_block, BV=tiles.value_block, ACC=ACC, PRECISION=tiles.precision, **options)
    return results, final


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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """:func:`recdsl.backends.chunk_kernels.delta_rule` with the Triton forward kernels.

    Read-outs of the previous state (``exclusive``) and states of more than 128 key rows go
    to the torch form; gradients differentiate the torch form, recomputed (:class:`DeltaRule`).
    """
    from . import chunk_kernels

    if (exclusive and any(exclusive)) or not supports(left.shape[-1]):
        return chunk_kernels.delta_rule(readouts, left, right, coefficient, inputs, initial, chunk, log_decay=log_decay, exclusive=exclusive)
    # The inputs share the left vector, so their sum is one input term (as the torch form sums them).
    w = None
    for term in inputs:
        w = term if w is None else w + term
    if w is None:
        w = torch.zeros(initial.shape[:1] + left.shape[1:2] + initial.shape[-1:], dtype=initial.dtype, device=initial.device)
    *outputs, final = DeltaRule.apply(chunk, allow_tf32, left, right, coefficient, w, log_decay, initial, *readouts)
    return list(outputs), final


class DeltaRule(torch.autograd.Function):
    """The Triton forward; the backward differentiates the torch chunked form, recomputed
    (it keeps chunk-boundary states only, as the forward)."""

    @staticmethod
    def forward(ctx, chunk: int, allow_tf32: bool, left, right, coefficient, w, log_decay, initial, *readouts):
        outputs, final = forward(list(readouts), left, right, coefficient, [w], initial, chunk, log_decay, allow_tf32)
        ctx.chunk = chunk
        ctx.gated = log_decay is not None
        ctx.save_for_backward(left, right, coefficient, w, log_decay if log_decay is not None else coefficient, initial, *readouts)
        return (*outputs, final)

    @staticmethod
    def backward(ctx, *grads):
        from .chunk_kernels import delta_rule as torch_delta_rule

        left, right, coefficient, w, log_decay, initial, *readouts = ctx.saved_tensors
        if not ctx.gated:
            log_decay = None
        tensors = [left, right, coefficient, w, log_decay, initial, *readouts]
        with torch.enable_grad():
            fresh = [None if t is None else t.detach().requires_grad_(t.requires_grad) for t in tensors]
            fl, fr, fa, fw, fg, f0, *fq = fresh
            outputs, final = torch_delta_rule(fq, fl, fr, fa, [fw], f0, ctx.chunk, log_decay=fg)
            pairs = [(o, g) for o, g in zip([*outputs, final], grads) if g is not None]
            wanted = [i for i, t in enumerate(fresh) if t is not None and t.requires_grad]
            found = torch.autograd.grad([o for o, _ in pairs], [fresh[i] for i in wanted], [g for _, g in pairs], allow_unused=True) if wanted and pairs else ()
        result: list = [None] * len(fresh)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, None, *result)
