"""Chunked-parallel forms of matrix-state recurrences read out linearly, in torch.

Both kernels take batch-first tensors with one flattened batch dim ``N`` (batch and heads)
and time on dim 1, and never store the state of every step: inside a chunk of ``C`` steps
they use dense ``C x C`` products; between chunks they pass only the state at chunk
boundaries (``T / C`` states).

**Decayed outer products** (GLA, RetNet, mLSTM's memory, Mamba-2's SSD),
``S_t = exp(g_t) * S_{t-1} + sum_r k_t^r (v_t^r)^T`` read out as ``o_t = q_t @ S_t``.  With
``G_t = g_1 + ... + g_t`` the log decay accumulated inside a chunk,

    o_t = (q_t * exp(G_t)) @ S_0 + sum_{s <= t} sum_k q_t[k] k_s[k] exp(G_t[k] - G_s[k]) v_s

and the next chunk starts from ``exp(G_C) * S_0 + sum_s (k_s * exp(G_C - G_s)) v_s^T``.
Every exponent is a decay accumulated forward in time, so nothing overflows when the
decays are at most 1, whatever T (Yang et al., 2024, "Gated Linear Attention Transformers
with Hardware-Efficient Training", Section 4).

**Identity plus rank one** (DeltaNet), ``S_t = S_{t-1} + l_t u_t^T`` with
``u_t = c_t w_t + a_t S_{t-1}^T r_t``.  Inside a chunk the ``u`` solve a unit lower
triangular system (the UT transform of Yang et al., 2024, "Parallelizing Linear
Transformers with the Delta Rule over Sequence Length"):

    (I - diag(a) tril(R L^T, -1)) U = diag(c) W + diag(a) R S_0
    O = Q S_0 + tril(Q L^T) U,      S_C = S_0 + L^T U

**Scaled identity plus rank one** (Gated DeltaNet, Yang, Kautz and Hatamizadeh, 2024,
"Gated Delta Networks"; TTT-linear and Titans' memory with a forget gate),
``S_t = a_t S_{t-1} + l_t u_t^T`` with the same ``u_t``.  With ``G_t = log a_1 + ... +
log a_t`` accumulated from the chunk start and ``G'_t = G_{t-1}`` (``G'_1 = 0``), unrolling
gives ``S_t = e^{G_t} S_0 + sum_{s <= t} e^{G_t - G_s} l_s u_s^T``, so

    (I - diag(a) (tril(R L^T, -1) * e^{G'_t - G_s})) U = diag(c) W + diag(a e^{G'}) R S_0
    O = (Q * e^{G}) S_0 + (tril(Q L^T) * e^{G_t - G_s}) U
    S_C = e^{G_C} S_0 + (L * e^{G_C - G_s})^T U

(here ``a`` is the rank-one coefficient): every exponent is a decay accumulated forward
from a step to a later one inside one chunk, so nothing overflows whatever T.  The chunk
boundary states follow ``S_{c+1} = M_c S_c + B_c`` with ``M_c = e^{G_C} I + (L e^{G_C -
G_s})^T U_r`` (``K x K``) and ``B_c`` from the inputs: one matmul per chunk in the loop,
every other product batched over all chunks.

**Read-outs of the previous state** (RWKV-6, Peng et al., 2024, "Eagle and Finch"):
``o_t = q_t @ S_{t-1}`` takes ``G'_t`` in place of ``G_t`` on the query's side and the
strictly lower (exclusive) causal mask; both kernels take an ``exclusive`` flag per
read-out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .scans import linear_scan
from .segments import ChunkLayout

# exp(-60) ~ 1e-26: a decay below that is zero for every float type we compute in, and
# clamping keeps the chunk-local sums of log decays finite (log 0 = -inf would give
# -inf - -inf = NaN in G_t - G_s).
_LOG_DECAY_FLOOR = -60.0


# The chunk length the decayed outer products fall back to when most dims of a chunk decay
# past exp(-_FACTOR_LIMIT) (their pairwise form costs C x C x K per chunk).
_SUBCHUNK = 16

# Factorising exp(G_t - G_s) into exp(G_t) exp(-G_s) is exact while exp(-G_s) stays well
# inside float32's range (exp(88) overflows).
_FACTOR_LIMIT = 60.0


def _pairwise_decay(G_query: torch.Tensor, G: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(G_query[t] - G[s])`` where ``mask[t, s]`` (zero elsewhere): ``[N, n, C, C, *rest]``.

    ``G`` is ``[N, n, C, *rest]``; masked pairs never meet ``exp`` (their gap may be
    ``+inf`` or NaN-producing, e.g. a floor-clamped decay subtracted from a later one)."""
    gap = G_query.unsqueeze(3) - G.unsqueeze(2)
    extra = (None,) * (G.dim() - 3)
    return gap.masked_fill(~mask[(slice(None), slice(None)) + extra], float("-inf")).exp()


def _previous(G: torch.Tensor) -> torch.Tensor:
    """``G`` shifted one step later along dim 2 inside each chunk, 0 first: ``G'_t = G_{t-1}``."""
    return torch.cat([torch.zeros_like(G[:, :, :1]), G[:, :, :-1]], 2)


@dataclass(frozen=True)
class RankOneInput:
    """One term ``k_t v_t^T`` of the input, ``k`` ``[N, T, K]`` and ``v`` ``[N, T, V]``."""

    k: torch.Tensor
    v: torch.Tensor


def _pad_time(x: torch.Tensor, steps: int, value: float = 0.0) -> torch.Tensor:
    pad = steps - x.shape[1]
    if pad == 0:
        return x
    return torch.cat([x, x.new_full((x.shape[0], pad) + x.shape[2:], value)], 1)


def _chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    return x.reshape((x.shape[0], x.shape[1] // chunk, chunk) + x.shape[2:])


def decayed_outer_products(
    readouts: list[torch.Tensor],
    inputs: list[RankOneInput],
    log_decay: torch.Tensor,
    initial: torch.Tensor,
    chunk: int,
    sequences: ChunkLayout | None = None,
    exclusive: tuple[bool, ...] | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs ``q @ S_t`` for each ``q`` in ``readouts`` (``[N, T, K]``), and the final state.

    ``log_decay`` is ``[N, T, K', V']`` with ``K'`` in ``{1, K}`` and ``V'`` in ``{1, V}``;
    ``initial`` is ``S_0`` ``[N, K, V]``.  Returns ``([N, T, V], ...)`` and ``[N, K, V]``.
    Where ``exclusive[i]`` is set, read-out ``i`` is ``q_t @ S_{t-1}`` instead.
    With ``sequences`` (packed sequences, each on whole chunks) ``initial`` and the
    final state are ``[N, sequences, K, V]``: the recurrence over chunk-boundary states
    restarts at each sequence's first chunk.
    """
    exclusive = exclusive or (False,) * len(readouts)
    steps = log_decay.shape[1]
    padded = -(-steps // chunk) * chunk
    g = _chunks(_pad_time(log_decay.clamp(min=_LOG_DECAY_FLOOR), padded), chunk)  # [N, n, C, K', V']
    G = g.cumsum(2)
    G_end = G[:, :, -1]  # [N, n, K', V']
    per_value = G.shape[-1] != 1  # the decay differs between value columns
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=G.device).tril()

    decay_to_end = (G_end.unsqueeze(2) - G).exp()  # [N, n, C(s), K', V']
    if not per_value:
        # Inside a chunk, exp(G_t - G_s) = exp(G_t) * exp(-G_s): a matmul instead of a
        # C x C x K tensor of exponentials.  exp(-G_s) stays below exp(_FACTOR_LIMIT) where
        # the chunk's total decay is above exp(-_FACTOR_LIMIT) ("safe" dims); the other dims
        # (decays near zero) take the exact pairwise form.
        G_k = G[..., 0]  # [N, n, C, K']
        safe = (G_k.amin(2) > -_FACTOR_LIMIT) & (G_k.amax(2) < _FACTOR_LIMIT)  # [N, n, K']
        growth = torch.where(safe.unsqueeze(2), (-G_k).clamp(-_FACTOR_LIMIT, _FACTOR_LIMIT).exp(), torch.zeros_like(G_k))
        # The exact pairwise correction is masked to the unsafe dims, so adding it everywhere
        # is also exact; eager runs skip it when no dim needs it (a data-dependent branch that
        # torch.compile cannot trace, so compiled graphs always take the masked correction).
        skip_correction = not torch.compiler.is_compiling() and bool(safe.all())
        unsafe = None if skip_correction else ~safe
        # (Packed sequences sit on whole chunks of the layout's size, so they keep it.)
        if unsafe is not None and sequences is None and chunk > _SUBCHUNK and not torch.compiler.is_compiling() and bool(unsafe.float().mean() > 0.25):
            # Strong decays (RWKV-6's w = exp(-exp(d)) with d near 0 loses e^-60 in 20 steps):
            # most dims would take the C x C x K pairwise form, so shorter chunks, whose
            # decays stay in the factorisable range far more often, are cheaper.  Same values.
            return decayed_outer_products(readouts, inputs, log_decay, initial, _SUBCHUNK, exclusive=exclusive)

    # The chunk-boundary states: S_end[c] = exp(G_end[c]) * S_end[c-1] + update[c].
    update = None
    for term in inputs:
        k = _chunks(_pad_time(term.k, padded), chunk)
        v = _chunks(_pad_time(term.v, padded), chunk)
        if per_value:
            contribution = torch.einsum("bnsk,bnskv,bnsv->bnkv", k, decay_to_end.expand(-1, -1, -1, k.shape[-1], -1), v)
        else:
            contribution = torch.einsum("bnsk,bnsv->bnkv", k * decay_to_end[..., 0], v)
        update = contribution if update is None else update + contribution
    state_shape = initial.shape
    if update is None:
        update = initial.new_zeros((initial.shape[0], g.shape[1]) + state_shape[1:])
    chunk_decay = G_end.exp()
    if sequences is None:
        shifted = update.clone()
        shifted[:, 0] = shifted[:, 0] + chunk_decay[:, 0] * initial
        ends = linear_scan(chunk_decay.transpose(0, 1), shifted.transpose(0, 1)).transpose(0, 1)  # [N, n, K, V]
        starts = torch.cat([initial.unsqueeze(1), ends[:, :-1]], 1)
        final = ends[:, -1]
    else:
        # Each sequence's initial state enters at its first chunk, whose transition is zeroed.
        firsts = sequences.first_chunks
        shifted = update.index_add(1, firsts, chunk_decay.index_select(1, firsts) * initial)
        ends = linear_scan(chunk_decay.index_fill(1, firsts, 0.0).transpose(0, 1), shifted.transpose(0, 1)).transpose(0, 1)
        starts = torch.cat([ends[:, :1], ends[:, :-1]], 1).index_copy(1, firsts, initial.to(ends.dtype))
        final = ends.index_select(1, sequences.last_chunks)

    results = []
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=G.device).tril(-1)
    G_previous = _previous(G)  # G_{t-1}: the decay from the chunk start to the step before t
    for q_full, before in zip(readouts, exclusive):
        q = _chunks(_pad_time(q_full, padded), chunk)  # [N, n, C, K]
        G_q = G_previous if before else G  # the decay accumulated up to the state read
        mask = strict if before else causal
        # From the state at the chunk start.
        if per_value:
            out = torch.einsum("bntk,bntkv,bnkv->bntv", q, G_q.exp().expand(-1, -1, -1, q.shape[-1], -1), starts)
        else:
            out = (q * G_q.exp()[..., 0]) @ starts
        # From the steps of this chunk.
        for term in inputs:
            k = _chunks(_pad_time(term.k, padded), chunk)
            v = _chunks(_pad_time(term.v, padded), chunk)
            if per_value:
                scores = torch.einsum("bntk,bnsk,bntskv->bntsv", q, k, _pairwise_decay(G_q, G, mask).expand(-1, -1, -1, -1, q.shape[-1], -1))
                out = out + torch.einsum("bntsv,bnsv->bntv", scores, v)
                continue
            # G_q is G or G shifted by one step, so it lies in the same +-_FACTOR_LIMIT window
            # (G_0 = 0) and the same dims are safe to factorise.
            shrink_q = G_q[..., 0].clamp(-_FACTOR_LIMIT, _FACTOR_LIMIT).exp()
            scores = ((q * shrink_q) @ (k * growth).transpose(-1, -2)).masked_fill(~mask, 0.0)
            if unsafe is not None:
                pairwise = _pairwise_decay(G_q, G, mask)[..., 0] * unsafe[:, :, None, None, :]
                if pairwise.shape[-1] == 1:
                    scores = scores + (q @ k.transpose(-1, -2)) * pairwise[..., 0]
                else:
                    scores = scores + torch.einsum("bntk,bnsk,bntsk->bnts", q, k, pairwise)
            out = out + scores @ v
        results.append(out.reshape((out.shape[0], padded) + out.shape[3:])[:, :steps])
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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs and final state of ``S_t = d_t S_{t-1} + a_t l_t (r_t^T S_{t-1}) + sum_i l_t w_{i,t}^T``.

    ``left``/``right`` (``l``, ``r``) are ``[N, T, K]``, ``coefficient`` (``a``) ``[N, T]``;
    each input is ``w`` ``[N, T, V]`` given with the same left vector ``l`` (its scalar factor
    already folded in).  ``log_decay`` is ``log d`` ``[N, T]`` (None: ``d = 1``, DeltaNet);
    ``initial`` is ``[N, K, V]``.  Read-out ``i`` is ``q_t @ S_t``, or ``q_t @ S_{t-1}`` where
    ``exclusive[i]`` is set.
    """
    exclusive = exclusive or (False,) * len(readouts)
    steps = left.shape[1]
    padded = -(-steps // chunk) * chunk
    L = _chunks(_pad_time(left, padded), chunk)  # [N, n, C, K]
    R = _chunks(_pad_time(right, padded), chunk)
    a = _chunks(_pad_time(coefficient, padded), chunk)  # [N, n, C]
    W = None
    for w in inputs:
        chunked = _chunks(_pad_time(w, padded), chunk)
        W = chunked if W is None else W + chunked
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=L.device).tril()
    if log_decay is None:
        G = G_previous = None
        decay_incl = causal.to(L.dtype)
    else:
        # Log decays accumulated from the chunk start (padding: decay 1); a decay of 0 is
        # clamped to exp(_LOG_DECAY_FLOOR) so that no difference of two sums is -inf - -inf.
        G = _chunks(_pad_time(log_decay.clamp(min=_LOG_DECAY_FLOOR), padded), chunk).cumsum(2)  # [N, n, C]
        G_previous = _previous(G)
        decay_incl = _pairwise_decay(G, G, causal)  # e^{G_t - G_s}, s <= t: [N, n, C, C]
    # e^{G_{t-1} - G_s} for s < t is the row above's e^{G_{t-1} - G_s} for s <= t - 1.
    decay_strict = torch.nn.functional.pad(decay_incl[..., :-1, :], (0, 0, 1, 0))
    # (I - diag(a) (tril(R L^T, -1) * decay)) U = [diag(a e^{G'}) R, W]: U = [U_r, U_w], so
    # that U_r S_0 + U_w is the chunk's u.  The solve reads only the strictly lower part
    # (unitriangular), so the identity is never formed.
    aR = a.unsqueeze(-1) * R
    system = (aR @ L.transpose(-1, -2)) * decay_strict.neg()
    rhs = aR if G_previous is None else aR * G_previous.exp().unsqueeze(-1)
    keys = rhs.shape[-1]
    if W is not None:
        rhs = torch.cat([rhs, W], -1)
    U = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [N, n, C, K (+ V)]
    U_r = U[..., :keys]
    # The chunk boundary states: S_{c+1} = M_c S_c + B_c, with [M_c - e^{G_C} I, B_c] = (L e^{G_C - G_s})^T U.
    eye = torch.eye(keys, dtype=L.dtype, device=L.device)
    if G is None:
        L_to_end = L
        end_decay = None
    else:
        G_end = G[:, :, -1:]  # [N, n, 1]
        L_to_end = L * (G_end - G).exp().unsqueeze(-1)
        end_decay = G_end.exp().unsqueeze(-1)  # [N, n, 1, 1]
    transfer = L_to_end.transpose(-1, -2) @ U  # [N, n, K, K (+ V)]
    M = transfer[..., :keys] + (eye if end_decay is None else end_decay * eye)
    B = transfer[..., keys:] if W is not None else None
    # Each chunk's M and B taken apart once and the starts stacked once: indexing M[:, c] and
    # writing starts[:, c] in the loop would cost a full-size gradient tensor per chunk in backward.
    transitions = M.unbind(1)
    chunk_inputs = B.unbind(1) if B is not None else None
    state = initial
    boundary = []
    for c in range(L.shape[1]):
        boundary.append(state)
        state = torch.baddbmm(chunk_inputs[c], transitions[c], state) if chunk_inputs is not None else transitions[c] @ state
    starts = torch.stack(boundary, 1)  # [N, n, K, V]
    results = []
    for q_full, before in zip(readouts, exclusive):
        q = _chunks(_pad_time(q_full, padded), chunk)
        attention = (q @ L.transpose(-1, -2)) * (decay_strict if before else decay_incl)
        G_q = G_previous if before else G
        q_start = q if G_q is None else q * G_q.exp().unsqueeze(-1)
        # O = (Q e^{G_q} + A U_r) S_0 + A U_w, every chunk at once.
        mixed = attention @ U
        out = (q_start + mixed[..., :keys]) @ starts
        if W is not None:
            out = out + mixed[..., keys:]
        results.append(out.reshape((out.shape[0], padded) + out.shape[3:])[:, :steps])
    return results, state


def with_infinite_readouts(kernel: Callable[..., tuple[list[torch.Tensor], torch.Tensor]], readouts: list[torch.Tensor], *arguments, exclusive: tuple[bool, ...] | None = None):
    """``kernel(readouts, *arguments)``, giving the loop's ``+-inf`` where a read-out vector is infinite.

    The loop reads out ``o_t = q_t @ S_t``: an infinite ``q_t[k]`` meets the one number
    ``S_t[k, j]`` and gives ``+-inf`` by its sign.  The chunked forms split ``S_t`` into
    terms per step and per chunk, and ``inf`` times terms of both signs is NaN.  So each
    real ``q`` is split: its finite part (NaN kept) is read out as usual, and its
    directions ``d = sign(q)`` where ``q`` is infinite (0 elsewhere) by the same kernel,
    which is linear in each read-out.  ``d_t @ S_t`` is finite, with the sign the loop's
    infinite terms share whenever its sum is not NaN; scaled by ``inf`` and added in the
    rows where ``q_t`` is infinite, it gives the loop's result.  Finite read-outs (the
    usual case) run the kernel once, unchanged; a trace (torch.compile) skips the check.
    ``exclusive`` (read-outs of the previous state) is passed on to the kernel when set,
    each direction read-out taking its read-out's flag.
    """
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    # A finite sum rules out infinities in one reduction; only otherwise is q searched.
    split = [
        not q.is_complex() and not (is_compiling is not None and is_compiling()) and not bool(torch.isfinite(q.sum())) and bool(torch.isinf(q).any())
        for q in readouts
    ]
    if not any(split):
        return kernel(readouts, *arguments, exclusive=exclusive) if exclusive else kernel(readouts, *arguments)
    finite = [q.masked_fill(torch.isinf(q), 0.0) if s else q for q, s in zip(readouts, split)]
    directions = [torch.where(torch.isinf(q), torch.sign(q), torch.zeros_like(q)) for q, s in zip(readouts, split) if s]
    if exclusive:
        flags = tuple(exclusive) + tuple(e for e, s in zip(exclusive, split) if s)
        results, final = kernel(finite + directions, *arguments, exclusive=flags)
    else:
        results, final = kernel(finite + directions, *arguments)
    combined, extra = [], iter(results[len(readouts) :])
    for q, s, result in zip(readouts, split, results):
        if s:
            infinite_rows = torch.isinf(q).any(-1, keepdim=True)
            result = result + torch.where(infinite_rows, next(extra) * float("inf"), torch.zeros((), dtype=result.dtype, device=result.device))
        combined.append(result)
    return combined, final
