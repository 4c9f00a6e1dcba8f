"""Parallel prefix scans in torch, time on dim 0.

A recurrence ``x_t = x_{t-1} (o) e_t`` with an associative ``(o)`` has all its prefixes
computed in ``ceil(log2 T)`` rounds of elementwise work (Hillis and Steele, 1986;
Blelloch, 1990, "Prefix sums and their applications"):

    round k: e'_t = e_{t - 2^k} (o) e_t   for t >= 2^k

Each element here is a tuple of tensors; ``combine(earlier, later)`` is the monoid's
operation, ``earlier`` the element that comes first in time.  For the first-order linear
recurrence ``h_t = a_t h_{t-1} + b_t`` the element is ``(a, b)`` and

    (a1, b1) (o) (a2, b2) = (a1 a2, a2 b1 + b2)

:func:`linear_scan`, the workhorse, needs no log factor: it runs chunks side by side,
sequentially inside each, recursing on the chunks' end states (see ``_linear_scan``).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

Elements = tuple[torch.Tensor, ...]
Combine = Callable[[Elements, Elements], Elements]


def prefix_scan(elements: Sequence[torch.Tensor], combine: Combine) -> Elements:
    """Inclusive scan of ``elements`` (each ``[T, ...]``) under ``combine``, by recursive doubling.

    Every element keeps its own shape through ``combine`` (shapes may differ between the
    members of the tuple, e.g. a broadcast decay beside a full state).
    """
    current = tuple(elements)
    steps = current[0].shape[0]
    offset = 1
    while offset < steps:
        earlier = tuple(e[:-offset] for e in current)
        later = tuple(e[offset:] for e in current)
        combined = combine(earlier, later)
        current = tuple(torch.cat([e[:offset], c.expand((c.shape[0],) + e.shape[1:]) if c.shape[1:] != e.shape[1:] else c], 0) for e, c in zip(current, combined))
        offset *= 2
    return current


def segmented(combine: Combine) -> Combine:
    """``combine`` on segments: each element carries, as its last member, a flag set at a segment's first step.

    ``(x1, f1) (o) (x2, f2) = (x2 if f2 else x1 (o) x2, f1 | f2)`` is associative whenever
    ``(o)`` is (Blelloch, 1990, "Prefix sums and their applications", section 1.5), and a
    prefix never combines across the start of a segment.  Flags are ``[T, 1]`` booleans.
    The combine across a start is still computed (and discarded by ``where``, which sends
    it no gradient), so it must be finite wherever the unsegmented scan's is.
    """

    def combine_segmented(earlier: Elements, later: Elements) -> Elements:
        *left, left_flag = earlier
        *right, right_flag = later
        combined = combine(tuple(left), tuple(right))
        chosen = []
        for value, joined in zip(right, combined):
            flag = right_flag.reshape(right_flag.shape + (1,) * (joined.dim() - right_flag.dim()))
            chosen.append(torch.where(flag, value.expand(joined.shape) if value.shape != joined.shape else value, joined))
        return tuple(chosen) + (left_flag | right_flag,)

    return combine_segmented


def _affine_combine(earlier: Elements, later: Elements) -> Elements:
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


def _sum_to(gradient: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Sum ``gradient`` over the dims that were broadcast from ``shape``."""
    dims = tuple(i for i, (g, s) in enumerate(zip(gradient.shape, shape)) if s == 1 and g != 1)
    return gradient.sum(dims, keepdim=True) if dims else gradient


class _LinearScan(torch.autograd.Function):
    """``h_t = a_t h_{t-1} + b_t`` with its adjoint derived rather than taped.

    The gradient flows backwards through the same recurrence, reversed in time:
    ``g_t = dL/dh_t + conj(a_{t+1}) g_{t+1}``, then ``dL/db_t = g_t`` and
    ``dL/da_t = g_t conj(h_{t-1})``.  Only ``a`` and ``h`` are kept for the backward pass,
    so memory is that of the inputs and outputs, not of every round of the scan.
    """

    @staticmethod
    def forward(ctx, decay: torch.Tensor, value: torch.Tensor, chunk: int | None) -> torch.Tensor:
        states = _linear_scan(decay, value, chunk)
        ctx.save_for_backward(decay, states)
        ctx.chunk = chunk
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        decay, states = ctx.saved_tensors
        following = torch.cat([decay[1:], torch.zeros_like(decay[:1])], 0).conj()
        adjoint = _linear_scan(following.flip(0), grad_states.flip(0), ctx.chunk).flip(0)
        grad_value = adjoint if ctx.needs_input_grad[1] else None
        grad_decay = None
        if ctx.needs_input_grad[0]:
            previous = torch.cat([torch.zeros_like(states[:1]), states[:-1]], 0)
            grad_decay = _sum_to(adjoint * previous.conj(), decay.shape)
            if not decay.is_complex() and grad_decay.is_complex():
                grad_decay = grad_decay.real
        return grad_decay, grad_value, None


def linear_scan(decay: torch.Tensor, value: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``h_t = decay_t * h_{t-1} + value_t`` with ``h_{-1} = 0``, for all t; time on dim 0.

    ``decay`` broadcasts against ``value`` (a decay shared along some axes stays small).
    Real or complex.  No division and no logarithm, so decays near 0, exactly 0, negative
    or complex are all exact; products only shrink when ``|decay| <= 1``.  Differentiable,
    with the reverse scan as its backward pass.
    """
    steps = value.shape[0]
    decay = decay.expand((steps,) + decay.shape[1:]) if decay.shape[0] != steps else decay
    if decay.is_complex() and not value.is_complex():
        value = value.to(decay.dtype)
    if torch.is_grad_enabled() and (decay.requires_grad or value.requires_grad):
        return _LinearScan.apply(decay, value, chunk)
    return _linear_scan(decay, value, chunk)


def _linear_scan(decay: torch.Tensor, value: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """The scan without autograd: sequential inside chunks, vectorised across them.

    The sequence is cut into ``n`` chunks of ``C`` steps.  Step ``i`` of every chunk is
    computed at once (``C`` vectorised steps, no log factor of extra work): the local state
    from a zero carry and the product of the chunk's decays so far.  The chunks' end states
    form a shorter recurrence of the same kind, solved recursively; a final fix-up adds each
    chunk's carried-in state.  With ``C`` about ``sqrt(T)`` there are ``O(sqrt(T))`` small
    Python-level steps and ``O(1)`` passes over the data.
    """
    steps = value.shape[0]
    shape = torch.broadcast_shapes(decay.shape, value.shape)
    value = value.expand(shape)
    if steps <= 16:
        states = torch.empty(shape, dtype=torch.promote_types(decay.dtype, value.dtype), device=value.device)
        states[0] = value[0]
        for t in range(1, steps):
            torch.addcmul(value[t], decay[t], states[t - 1], out=states[t])
        return states
    size = chunk or max(8, min(256, int(steps**0.5)))
    chunks = -(-steps // size)
    pad = chunks * size - steps
    if pad:
        decay = torch.cat([decay, decay.new_ones((pad,) + decay.shape[1:])], 0)
        value = torch.cat([value, value.new_zeros((pad,) + value.shape[1:])], 0)
    # [C, n, ...]: step i of every chunk is one contiguous slab.
    a = decay.reshape((chunks, size) + decay.shape[1:]).transpose(0, 1)
    b = value.reshape((chunks, size) + value.shape[1:]).transpose(0, 1)
    local = torch.empty(b.shape, dtype=torch.promote_types(a.dtype, b.dtype), device=b.device)
    products = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    local[0] = b[0]
    products[0] = a[0]
    for i in range(1, size):
        torch.addcmul(b[i], a[i], local[i - 1], out=local[i])
        torch.mul(products[i - 1], a[i], out=products[i])
    ends = _linear_scan(products[-1], local[-1])  # the state at the end of each chunk
    carry_in = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]], 0)
    local.addcmul_(products, carry_in.unsqueeze(0))
    return local.transpose(0, 1).reshape((chunks * size,) + local.shape[2:])[:steps]


def matrix_affine_scan(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``S_t = M_t @ S_{t-1} + B_t`` with ``S_{-1} = 0``: ``transition`` ``[T, ..., K, K]``, ``value`` ``[T, ..., K, V]``."""

    def combine(earlier: Elements, later: Elements) -> Elements:
        m1, b1 = earlier
        m2, b2 = later
        return m2 @ m1, m2 @ b1 + b2

    return prefix_scan((transition, value), combine)[1]


def _tropical_times(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x (x) y = x + y`` in the max-plus and log semirings, whose zero ``-inf`` annihilates.

    IEEE gives ``-inf + inf = NaN``; the semiring gives ``-inf``.  The loop never adds two
    weights, but a scan multiplies the weights of two steps: a step whose row is the zero
    (a ``-inf`` input) before one with a ``+inf`` weight must give the zero, not NaN.
    """
    total = x + y
    opposite = ((x == float("-inf")) & (y == float("inf"))) | ((x == float("inf")) & (y == float("-inf")))
    return total.masked_fill(opposite, float("-inf"))


def semiring_diagonal_scan(decay: torch.Tensor, value: torch.Tensor, plus: Callable) -> torch.Tensor:
    """``h_t = plus(h_{t-1} + decay_t, value_t)`` (a tropical semiring, times = +), ``h_{-1}`` = the zero.

    The first ``value`` must already include the initial state.
    """

    def combine(earlier: Elements, later: Elements) -> Elements:
        a1, b1 = earlier
        a2, b2 = later
        return _tropical_times(a1, a2), plus(_tropical_times(b1, a2), b2)

    decay = decay.expand((value.shape[0],) + decay.shape[1:]) if decay.shape[0] != value.shape[0] else decay
    return prefix_scan((decay, value), combine)[1]


def semiring_matmul(left: torch.Tensor, right: torch.Tensor, reduce: Callable) -> torch.Tensor:
    """``(left (x) right)[..., i, j] = (+)_k left[..., i, k] + right[..., k, j]``."""
    return reduce(_tropical_times(left.unsqueeze(-1), right.unsqueeze(-3)), -2)


def semiring_product_scan(transition: torch.Tensor, reduce: Callable, starts: torch.Tensor | None = None) -> torch.Tensor:
    """Prefix products ``P_t = T_0 (x) T_1 (x) ... (x) T_t`` of ``[T, ..., N, N]`` semiring matrices.

    ``starts`` (``[T, 1]`` booleans): segments, each product restarting at its first step.
    """

    def combine(earlier: Elements, later: Elements) -> Elements:
        return (semiring_matmul(earlier[0], later[0], reduce),)

    if starts is not None:
        return prefix_scan((transition, starts), segmented(combine))[0]
    return prefix_scan((transition,), combine)[0]


def semiring_matrix_scan(transition: torch.Tensor, value: torch.Tensor, plus: Callable, reduce: Callable, starts: torch.Tensor | None = None) -> torch.Tensor:
    """``h_t = plus(h_{t-1} (x) T_t, value_t)`` for row vectors ``value`` ``[T, ..., N]``, ``h_{-1}`` = the zero.

    ``starts`` (``[T, 1]`` booleans): segments, each restarting from the zero at its first
    step (a zero matrix there instead would reduce rows of zeros, whose logsumexp has a
    NaN gradient).
    """

    def combine(earlier: Elements, later: Elements) -> Elements:
        t1, b1 = earlier
        t2, b2 = later
        return semiring_matmul(t1, t2, reduce), plus(semiring_matmul(b1.unsqueeze(-2), t2, reduce).squeeze(-2), b2)

    if starts is not None:
        return prefix_scan((transition, value, starts), segmented(combine))[1]
    return prefix_scan((transition, value), combine)[1]



def _matvec(matrix: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    return (matrix @ vector.unsqueeze(-1)).squeeze(-1)


def block_linear_scan(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``x_t = M_t x_{t-1} + v_t`` with ``x_{-1} = 0``: ``transition`` ``[T, ..., m, m]``, ``value`` ``[T, ..., m]``.

    The chunked form of :func:`linear_scan` for small matrices (no autograd): step ``i``
    of every chunk at once, carrying the local state and the product of the chunk's
    transitions; the chunks' end states are a shorter recurrence of the same kind, solved
    recursively, and each chunk then adds its carried-in state through its products.
    ``O(T m^3)`` work with no log factor, ``O(sqrt(T))`` Python-level steps.  Blocks of
    at most :data:`PLANAR_BLOCK` run entry by entry on contiguous planes (an LSTM-like
    2 x 2 block is 4 + 8 fused multiply-adds per step, not a batched matmul of tiny
    matrices).
    """
    m = value.shape[-1]
    if m <= PLANAR_BLOCK:
        planes_a = transition.movedim((-2, -1), (0, 1)).contiguous()  # [m, m, T, ...]
        planes_b = value.movedim(-1, 0).contiguous()  # [m, T, ...]
        return _planar_scan(planes_a, planes_b).movedim(0, -1)
    return _dense_block_scan(transition, value)


PLANAR_BLOCK = 4


def _chunks(steps: int) -> tuple[int, int, int]:
    size = max(8, min(256, int(steps**0.5)))
    chunks = -(-steps // size)
    return size, chunks, chunks * size - steps


def _planar_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`block_linear_scan` on planes: ``a`` ``[m, m, T, ...]``, ``b`` ``[m, T, ...]``."""
    m, steps = b.shape[0], b.shape[1]

    def matvec(matrix, vector, out, add=None):  # out[r] = sum_c matrix[r, c] * vector[c] (+ add[r])
        for r in range(m):
            torch.mul(matrix[r, 0], vector[0], out=out[r]) if add is None else torch.addcmul(add[r], matrix[r, 0], vector[0], out=out[r])
            for c in range(1, m):
                out[r].addcmul_(matrix[r, c], vector[c])

    if steps <= 16:
        states = torch.empty_like(b)
        states[:, 0] = b[:, 0]
        for t in range(1, steps):
            matvec(a[:, :, t], states[:, t - 1], states[:, t], add=b[:, t])
        return states
    size, chunks, pad = _chunks(steps)
    if pad:
        a = torch.cat([a, a.new_zeros(a.shape[:2] + (pad,) + a.shape[3:])], 2)
        b = torch.cat([b, b.new_zeros(b.shape[:1] + (pad,) + b.shape[2:])], 1)
    # [m, (m,) C, n, ...]: step i of every chunk is one slab.
    a = a.reshape(a.shape[:2] + (chunks, size) + a.shape[3:]).transpose(2, 3).contiguous()
    b = b.reshape(b.shape[:1] + (chunks, size) + b.shape[2:]).transpose(1, 2).contiguous()
    local = torch.empty_like(b)
    products = torch.empty_like(a)
    local[:, 0] = b[:, 0]
    products[:, :, 0] = a[:, :, 0]
    for i in range(1, size):
        matvec(a[:, :, i], local[:, i - 1], local[:, i], add=b[:, i])
        for c in range(m):  # column c of a_i @ P_{i-1}
            matvec(a[:, :, i], products[:, c, i - 1], products[:, c, i])
    ends = _planar_scan(products[:, :, -1], local[:, -1])  # [m, n, ...]: the state at the end of each chunk
    carry_in = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], 1)
    for i in range(size):
        matvec(products[:, :, i], carry_in, local[:, i], add=local[:, i])
    return local.transpose(1, 2).reshape(local.shape[:1] + (chunks * size,) + local.shape[3:])[:, :steps]


def _dense_block_scan(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    steps = value.shape[0]
    if steps <= 16:
        states = torch.empty_like(value)
        states[0] = value[0]
        for t in range(1, steps):
            states[t] = _matvec(transition[t], states[t - 1]) + value[t]
        return states
    size, chunks, pad = _chunks(steps)
    if pad:
        transition = torch.cat([transition, transition.new_zeros((pad,) + transition.shape[1:])], 0)
        value = torch.cat([value, value.new_zeros((pad,) + value.shape[1:])], 0)
    a = transition.reshape((chunks, size) + transition.shape[1:]).transpose(0, 1)
    b = value.reshape((chunks, size) + value.shape[1:]).transpose(0, 1)
    local = torch.empty(b.shape, dtype=b.dtype, device=b.device)
    products = torch.empty(a.shape, dtype=a.dtype, device=a.device)
    local[0] = b[0]
    products[0] = a[0]
    for i in range(1, size):
        local[i] = _matvec(a[i], local[i - 1]) + b[i]
        products[i] = a[i] @ products[i - 1]
    ends = _dense_block_scan(products[-1], local[-1])
    carry_in = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]], 0)
    local = local + _matvec(products, carry_in.unsqueeze(0))
    return local.transpose(0, 1).reshape((chunks * size,) + local.shape[2:])[:steps]


def _affine_scan_backward(ctx, grad_states: torch.Tensor, scan: Callable, step_outer: Callable) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The adjoint of ``x_t = M_t x_{t-1} + v_t`` (``ctx`` saved ``M`` and the states ``x``), solved by ``scan``.

    The same recurrence backwards with the transposed transitions,
    ``g_t = dL/dx_t + M_{t+1}^H g_{t+1}``, gives ``dL/dv_t = g_t``; then
    ``dL/dM_t = step_outer(g_t, x_{t-1}^*)`` (``g x^H`` of vectors or of column blocks),
    summed over the dims a broadcast ``M`` was spread to.
    """
    transition, states = ctx.saved_tensors
    following = torch.cat([transition[1:], torch.zeros_like(transition[:1])], 0).transpose(-1, -2).conj()
    adjoint = scan(following.flip(0), grad_states.flip(0).to(states.dtype)).flip(0)
    grad_transition = None
    if ctx.needs_input_grad[0]:
        previous = torch.cat([torch.zeros_like(states[:1]), states[:-1]], 0)
        grad_transition = step_outer(adjoint, previous.conj())
        extra = grad_transition.dim() - transition.dim()
        if extra:
            grad_transition = grad_transition.sum(tuple(range(extra)))
        grad_transition = _sum_to(grad_transition, transition.shape)
        if not transition.is_complex() and grad_transition.is_complex():
            grad_transition = grad_transition.real
    return grad_transition, adjoint if ctx.needs_input_grad[1] else None


class _BlockLinearScan(torch.autograd.Function):
    """``x_t = M_t x_{t-1} + v_t`` over small blocks, with its adjoint derived rather than taped.

    The gradient runs the same block recurrence backwards with the transposed blocks:
    ``g_t = dL/dx_t + M_{t+1}^H g_{t+1}``; then ``dL/dv_t = g_t`` and ``dL/dM_t = g_t x_{t-1}^H``
    (summed over the blocks a shared ``M`` is broadcast to).  Only ``M`` and ``x`` are kept.
    """

    @staticmethod
    def forward(ctx, transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        states = block_linear_scan(transition, value)
        ctx.save_for_backward(transition, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        return _affine_scan_backward(ctx, grad_states, block_linear_scan, lambda g, x: g.unsqueeze(-1) * x.unsqueeze(-2))


def _columns_scan(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``X_t = M_t X_{t-1} + V_t`` with ``X_{-1} = 0``: ``transition`` ``[T, ..., m, m]``, ``value`` ``[T, ..., m, c]``.

    :func:`block_linear_scan` for blocks that share one matrix: the blocks are the columns
    of one matrix recurrence, so every step is a matmul (never the matrix copied per block).
    """
    steps = value.shape[0]
    if steps <= 16:
        states = torch.empty_like(value)
        states[0] = value[0]
        for t in range(1, steps):
            states[t] = transition[t] @ states[t - 1] + value[t]
        return states
    size, chunks, pad = _chunks(steps)
    if pad:
        transition = torch.cat([transition, transition.new_zeros((pad,) + transition.shape[1:])], 0)
        value = torch.cat([value, value.new_zeros((pad,) + value.shape[1:])], 0)
    a = transition.reshape((chunks, size) + transition.shape[1:]).transpose(0, 1).contiguous()
    b = value.reshape((chunks, size) + value.shape[1:]).transpose(0, 1).contiguous()
    local = torch.empty_like(b)
    products = torch.empty_like(a)
    local[0] = b[0]
    products[0] = a[0]
    for i in range(1, size):
        torch.matmul(a[i], local[i - 1], out=local[i])
        local[i] += b[i]
        torch.matmul(a[i], products[i - 1], out=products[i])
    ends = _columns_scan(products[-1], local[-1])
    carry_in = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]], 0)
    local = local + products @ carry_in.unsqueeze(0)
    return local.transpose(0, 1).reshape((chunks * size,) + local.shape[2:])[:steps]


class _ColumnsScan(torch.autograd.Function):
    """:func:`_columns_scan` with its adjoint: ``G_t = dL/dX_t + M_{t+1}^H G_{t+1}``,
    ``dL/dV_t = G_t``, ``dL/dM_t = G_t X_{t-1}^H``."""

    @staticmethod
    def forward(ctx, transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        states = _columns_scan(transition, value)
        ctx.save_for_backward(transition, states)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        return _affine_scan_backward(ctx, grad_states, _columns_scan, lambda g, x: g @ x.transpose(-1, -2))


def block_affine_scan(transition: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``x_t = M_t x_{t-1} + v_t`` with ``x_{-1} = 0``, for all t; time on dim 0.

    ``transition`` ``[T, ..., m, m]`` broadcasts against ``value`` ``[T, ..., m]`` over the
    middle dims (one matrix shared by every block stays ``[T, ..., 1, m, m]``).  The scan of
    a block-diagonal state's ``n`` blocks: ``O(T n m^3)`` work, never the ``(n m)^3`` of the
    whole state's matrix.  Differentiable, with the reverse scan as its backward pass.
    """
    transition = transition.to(torch.promote_types(transition.dtype, value.dtype))
    value = value.to(transition.dtype)
    if transition.shape[-3] == 1 and value.shape[-2] > 1 and value.shape[-1] > PLANAR_BLOCK:
        # One matrix for every block: the blocks are the columns of X_t = M_t X_{t-1} + V_t.
        matrix, columns = transition.squeeze(-3), value.transpose(-1, -2)
        if torch.is_grad_enabled() and (matrix.requires_grad or columns.requires_grad):
            return _ColumnsScan.apply(matrix, columns).transpose(-1, -2)
        return _columns_scan(matrix, columns).transpose(-1, -2)
    if torch.is_grad_enabled() and (transition.requires_grad or value.requires_grad):
        return _BlockLinearScan.apply(transition, value)
    return block_linear_scan(transition, value)
