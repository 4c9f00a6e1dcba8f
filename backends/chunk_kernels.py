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


# Factorising exp(G_t - G_s) into exp(G_t) exp(-G_s) is exact while exp(-G_s) stays well
# inside float32's range (exp(88) overflows).
_FACTOR_LIMIT = 60.0


def _pairwise_decay(G: torch.Tensor, causal: torch.Tensor) -> torch.Tensor:
    """``exp(G_t - G_s)`` for ``s <= t`` (zero above the diagonal): ``[N, n, C, C, K', V']``."""
    gap = G.unsqueeze(3) - G.unsqueeze(2)
    return gap.masked_fill(~causal[:, :, None, None], float("-inf")).exp()


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
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs ``q @ S_t`` for each ``q`` in ``readouts`` (``[N, T, K]``), and the final state.

    ``log_decay`` is ``[N, T, K', V']`` with ``K'`` in ``{1, K}`` and ``V'`` in ``{1, V}``;
    ``initial`` is ``S_0`` ``[N, K, V]``.  Returns ``([N, T, V], ...)`` and ``[N, K, V]``.
    With ``sequences`` (packed sequences, each on whole chunks) ``initial`` and the
    final state are ``[N, sequences, K, V]``: the recurrence over chunk-boundary states
    restarts at each sequence's first chunk.
    """
    steps = log_decay.shape[1]
    padded = -(-steps // chunk) * chunk
    g = _chunks(_pad_time(log_decay.clamp(min=_LOG_DECAY_FLOOR), padded), chunk)  # [N, n, C, K', V']
    G = g.cumsum(2)
    G_end = G[:, :, -1]  # [N, n, K', V']
    per_value = G.shape[-1] != 1  # the decay differs between value columns
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=G.device).tril()

    decay_to_end = (G_end.unsqueeze(2) - G).exp()  # [N, n, C(s), K', V']
    if per_value:
        decay_ts = _pairwise_decay(G, causal)
    else:
        # Inside a chunk, exp(G_t - G_s) = exp(G_t) * exp(-G_s): a matmul instead of a
        # C x C x K tensor of exponentials.  exp(-G_s) stays below exp(_FACTOR_LIMIT) where
        # the chunk's total decay is above exp(-_FACTOR_LIMIT) ("safe" dims); the other dims
        # (decays near zero) take the exact pairwise form.
        G_k = G[..., 0]  # [N, n, C, K']
        safe = (G_k.amin(2) > -_FACTOR_LIMIT) & (G_k.amax(2) < _FACTOR_LIMIT)  # [N, n, K']
        growth = torch.where(safe.unsqueeze(2), (-G_k).clamp(-_FACTOR_LIMIT, _FACTOR_LIMIT).exp(), torch.zeros_like(G_k))
        shrink = G_k.clamp(-_FACTOR_LIMIT, _FACTOR_LIMIT).exp()
        # The exact pairwise correction is masked to the unsafe dims, so adding it everywhere
        # is also exact; eager runs skip it when no dim needs it (a data-dependent branch that
        # torch.compile cannot trace, so compiled graphs always take the masked correction).
        skip_correction = not torch.compiler.is_compiling() and bool(safe.all())
        unsafe = None if skip_correction else ~safe

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
    for q_full in readouts:
        q = _chunks(_pad_time(q_full, padded), chunk)  # [N, n, C, K]
        # From the state at the chunk start.
        if per_value:
            out = torch.einsum("bntk,bntkv,bnkv->bntv", q, G.exp().expand(-1, -1, -1, q.shape[-1], -1), starts)
        else:
            out = (q * G.exp()[..., 0]) @ starts
        # From the steps of this chunk.
        for term in inputs:
            k = _chunks(_pad_time(term.k, padded), chunk)
            v = _chunks(_pad_time(term.v, padded), chunk)
            if per_value:
                scores = torch.einsum("bntk,bnsk,bntskv->bntsv", q, k, decay_ts.expand(-1, -1, -1, -1, q.shape[-1], -1))
                out = out + torch.einsum("bntsv,bnsv->bntv", scores, v)
                continue
            scores = ((q * shrink) @ (k * growth).transpose(-1, -2)).masked_fill(~causal, 0.0)
            if unsafe is not None:
                pairwise = _pairwise_decay(G, causal)[..., 0] * unsafe[:, :, None, None, :]
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
    inputs: list[tuple[torch.Tensor, torch.Tensor]],
    initial: torch.Tensor,
    chunk: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Read-outs and final state of ``S_t = S_{t-1} + a_t l_t (r_t^T S_{t-1}) + sum_i l_t w_{i,t}^T``.

    ``left``/``right`` (``l``, ``r``) are ``[N, T, K]``, ``coefficient`` (``a``) ``[N, T]``;
    each input is ``w`` ``[N, T, V]`` given with the same left vector ``l`` (its scalar factor
    already folded in).  ``initial`` is ``[N, K, V]``.
    """
    steps = left.shape[1]
    padded = -(-steps // chunk) * chunk
    L = _chunks(_pad_time(left, padded), chunk)
    R = _chunks(_pad_time(right, padded), chunk)
    a = _chunks(_pad_time(coefficient, padded), chunk)  # [N, n, C]
    W = None
    for w in inputs:
        chunked = _chunks(_pad_time(w, padded), chunk)
        W = chunked if W is None else W + chunked
    eye = torch.eye(chunk, dtype=L.dtype, device=L.device)
    strictly_lower = torch.ones(chunk, chunk, dtype=torch.bool, device=L.device).tril(-1)
    system = eye - a.unsqueeze(-1) * (R @ L.transpose(-1, -2)).masked_fill(~strictly_lower, 0.0)
    # U = U_w + U_r @ S_0 per chunk, both from one triangular solve.
    rhs_r = a.unsqueeze(-1) * R
    U_r = torch.linalg.solve_triangular(system, rhs_r, upper=False, unitriangular=True)
    U_w = torch.linalg.solve_triangular(system, W, upper=False, unitriangular=True) if W is not None else None
    Qs = [_chunks(_pad_time(q, padded), chunk) for q in readouts]
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=L.device).tril()
    attention = [(q @ L.transpose(-1, -2)).masked_fill(~causal, 0.0) for q in Qs]
    outs: list[list[torch.Tensor]] = [[] for _ in Qs]
    state = initial
    for c in range(L.shape[1]):
        U = U_r[:, c] @ state
        if U_w is not None:
            U = U + U_w[:, c]
        for i, q in enumerate(Qs):
            outs[i].append(q[:, c] @ state + attention[i][:, c] @ U)
        state = state + L[:, c].transpose(-1, -2) @ U
    results = [torch.cat(o, 1)[:, :steps] for o in outs]
    return results, state


def with_infinite_readouts(kernel: Callable[..., tuple[list[torch.Tensor], torch.Tensor]], readouts: list[torch.Tensor], *arguments):
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
    """
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    split = [not q.is_complex() and not (is_compiling is not None and is_compiling()) and bool(torch.isinf(q).any()) for q in readouts]
    if not any(split):
        return kernel(readouts, *arguments)
    finite = [q.masked_fill(torch.isinf(q), 0.0) if s else q for q, s in zip(readouts, split)]
    directions = [torch.where(torch.isinf(q), torch.sign(q), torch.zeros_like(q)) for q, s in zip(readouts, split) if s]
    results, final = kernel(finite + directions, *arguments)
    combined, extra = [], iter(results[len(readouts) :])
    for q, s, result in zip(readouts, split, results):
        if s:
            infinite_rows = torch.isinf(q).any(-1, keepdim=True)
            result = result + torch.where(infinite_rows, next(extra) * float("inf"), torch.zeros((), dtype=result.dtype, device=result.device))
        combined.append(result)
    return combined, final
