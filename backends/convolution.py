"""The convolution form of a time-invariant diagonal recurrence (S4, S4D): read-outs as causal convolutions.

For ``h_t = decay * h_{t-1} + coefficient * u_t`` with ``decay`` and ``coefficient`` the same
at every step, and a read-out ``R`` linear with time-invariant coefficients that sums the
state over the axes along which ``u`` is constant (see :class:`recdsl.plan.ConvPlan`),

    R(h_t) = R(decay^(t+1) * h_0) + sum_{s <= t} K_{t-s} * u_s,    K_l = R(decay^l * coefficient).

The kernel ``K`` has the read-out's shape per lag, ``[T, *readout]``, and is shared by the
whole batch; the state is never stored per step.  Long sequences are convolved through the
FFT, short ones as a Toeplitz product.  Powers of the decay are built in blocks of lags so
that no tensor of ``T x state`` elements is ever held at once; the same blocks give the
final state as one matmul per block.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.utils.checkpoint

from recdsl import ir
from recdsl.analysis import StateAnalysis
from recdsl.ir import RefKind
from recdsl.plan import CONVOLUTION_BLOCK_ELEMENTS, ConvPlan

# Up to this length the convolution is a Toeplitz product (exact; FFT rounding is global).
DIRECT_MAX_LENGTH = 64
# Elements of one block of decay powers (lags x state), and of the initial state's terms.
BLOCK_ELEMENTS = CONVOLUTION_BLOCK_ELEMENTS


def _to_state(value: torch.Tensor, declared: ir.Type, state: ir.Type) -> torch.Tensor:
    """A time-invariant value (no batch or time dims) broadcast to the state's shape."""
    value = value.reshape((1,) * (state.rank - declared.rank) + tuple(value.shape[value.dim() - declared.rank :]))
    return value.expand(state.shape)


def _evaluate_with_state(seq, expr: ir.Expr, state: str, value: torch.Tensor) -> torch.Tensor:
    """``expr`` evaluated with the state's new value replaced by ``value`` (leading dims of its own)."""
    from .parallel import _LazyValues  # the whole-sequence memo, extended privately
    from .torch_ops import Evaluator

    values = _LazyValues()
    values.update(seq.values)
    values.pending = dict(seq.values.pending)
    values[(RefKind.STATE_NEW, state)] = value
    evaluator = Evaluator(seq.numerics, values)
    values.evaluator = evaluator
    return evaluator.evaluate(expr)


def _driver_for(driver: torch.Tensor, lead: int, axes: Sequence[int | None]) -> torch.Tensor:
    """The driver ``[*lead, *state-aligned]`` laid out along a read-out's axes (size 1 where it is constant)."""
    rank = driver.dim() - lead
    kept = [a for a in axes if a is not None]
    dropped = [j for j in range(rank) if j not in kept]
    value = driver.permute(*range(lead), *(lead + j for j in kept), *(lead + j for j in dropped))
    value = value.reshape(value.shape[: lead + len(kept)])  # the dropped axes have size 1
    for position, axis in enumerate(axes):
        if axis is None:
            value = value.unsqueeze(lead + position)
    return value


def causal_convolution(kernel: torch.Tensor, driver: torch.Tensor, heads: int) -> torch.Tensor:
    """``y[:, t] = sum_{s <= t} kernel[t - s] * driver[:, s]``; ``kernel`` ``[T, *r]``, ``driver`` ``[B, T, *heads, *r']``."""
    length = kernel.shape[0]
    value_shape = tuple(kernel.shape[1:])
    kernel = kernel.reshape((1, length) + (1,) * heads + value_shape)
    complex_result = kernel.is_complex() or driver.is_complex()
    if length <= DIRECT_MAX_LENGTH:
        lags = torch.arange(length, device=kernel.device)
        difference = lags[:, None] - lags[None, :]  # t - s
        toeplitz = kernel[0, difference.clamp(min=0)]  # [T, T, *heads(1), *r]
        mask = (difference >= 0).reshape((length, length) + (1,) * (toeplitz.dim() - 2))
        toeplitz = toeplitz * mask
        if complex_result:
            toeplitz, driver = toeplitz.to(torch.promote_types(toeplitz.dtype, driver.dtype)), driver.to(torch.promote_types(toeplitz.dtype, driver.dtype))
        return (toeplitz.unsqueeze(0) * driver.unsqueeze(1)).sum(2)
    size = 2 * length
    if complex_result:
        dtype = torch.promote_types(kernel.dtype, driver.dtype)
        spectrum = torch.fft.fft(kernel.to(dtype), n=size, dim=1) * torch.fft.fft(driver.to(dtype), n=size, dim=1)
        return torch.fft.ifft(spectrum, n=size, dim=1)[:, :length]
    spectrum = torch.fft.rfft(kernel, n=size, dim=1) * torch.fft.rfft(driver, n=size, dim=1)
    return torch.fft.irfft(spectrum, n=size, dim=1)[:, :length]


def _tracing() -> bool:
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(is_compiling is not None and is_compiling())


def _convolvable(decay: torch.Tensor, *pieces: torch.Tensor) -> bool:
    """Whether the convolution gives the loop's values: a stable decay (|decay| <= 1) and finite pieces.

    A decay above 1 in modulus makes the kernel grow with the lag, and the FFT's rounding,
    relative to the largest term, swamps the early outputs; infinities meet as ``inf - inf``.
    A trace (torch.compile) takes the convolution without looking.
    """
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if is_compiling is not None and is_compiling():
        return True
    if not bool((decay.abs() <= 1).all()):
        return False
    return all(bool(torch.isfinite(piece).all()) for piece in pieces)


def run(seq, plan: ConvPlan, state: StateAnalysis, h0: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """The read-outs ``[B, T, *heads, *readout]`` and the final state; None when the scan must run instead."""
    lead = seq.lead
    batch, length, heads = lead[0], lead[1], lead[2:]
    state_type = state.type
    decay = _to_state(seq.evaluate(plan.decay), plan.decay.type, state_type)
    dtype = h0.dtype
    decay = decay.to(torch.promote_types(decay.dtype, dtype))
    coefficient = None
    if plan.coefficient is not None:
        coefficient = _to_state(seq.evaluate(plan.coefficient), plan.coefficient.type, state_type)
    driver = seq.full(seq.evaluate(plan.driver), plan.driver.type, state_type)
    driver = driver.expand(lead + tuple(driver.shape[len(lead) :]))
    pieces = [driver, h0] + ([coefficient] if coefficient is not None else [])
    if not _convolvable(decay, *pieces):
        return None

    shape = state_type.shape
    size = max(1, torch.Size(shape).numel())
    block = max(1, BLOCK_ELEMENTS // size)
    # Channel axes: those along which the driver varies; the final state contracts the lags
    # of each channel with one matmul: [B', L, C] x [L, C, M] -> [B', C, M].
    driver_shape = tuple(driver.shape[len(lead) :])
    channels = [j for j, n in enumerate(driver_shape) if n > 1]
    modes = [j for j in range(len(shape)) if j not in channels]
    channel_size = torch.Size([shape[j] for j in channels]).numel()
    mode_size = torch.Size([shape[j] for j in modes]).numel()
    flat_driver = driver.movedim(1, -1 - len(driver_shape))  # [B, *heads, T, *driver]
    flat_driver = flat_driver.reshape((-1, length) + tuple(driver_shape[j] for j in channels))
    flat_driver = flat_driver.reshape(flat_driver.shape[0], length, channel_size).to(decay.dtype)

    # The first block of powers by doubling: [1, d], then [1, d, d^2, d^3] = [1, d] and
    # [1, d] * d^2, ...: log2(L) multiplies and one small pow per doubling, never a pow per
    # element (an exp and a log each, which dominated the call); the rounding grows with
    # log2(L), as a pow's does with the exponent.  Block k is this block times decay^(k L).
    base = torch.ones_like(decay).unsqueeze(0)
    first_block = min(block, length)
    while base.shape[0] < first_block:
        base = torch.cat([base, base[: first_block - base.shape[0]] * decay ** base.shape[0]], 0)

    def one_block(start: int, stop: int, driver_steps: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The kernel's lags [start, stop) for every read-out, and their part of the final state."""
        # decay^l * coefficient for the block's lags: the block's own factor (decay^start times
        # the coefficient, state-sized) applied to the first block in one multiply.
        scale = decay ** float(start) if start else None
        if coefficient is not None:
            scale = coefficient if scale is None else scale * coefficient
        terms = base[: stop - start] if scale is None else base[: stop - start] * scale  # [L, *state]
        kernel_blocks = tuple(_evaluate_with_state(seq, readout, plan.state, terms) for readout in plan.readouts)
        # The final state's input part: sum_s decay^(T-1-s) coefficient u_s, the lags of this block reversed.
        grid = terms.permute(0, *(1 + j for j in channels), *(1 + j for j in modes)).reshape(stop - start, channel_size, mode_size)
        # One batched matmul over the channels: [C, B', L] @ [C, L, M] -> [C, B', M].
        part = torch.matmul(driver_steps.permute(2, 0, 1).contiguous(), grid.transpose(0, 1).contiguous()).permute(1, 0, 2)
        return kernel_blocks + (part,)

    # Under autograd each block is recomputed in the backward pass (checkpointed), so that no
    # tensor of lags x state elements is kept: the memory stays that of one block.
    recompute = torch.is_grad_enabled() and not _tracing()
    kernels: list[list[torch.Tensor]] = [[] for _ in plan.readouts]
    accumulated = None
    for start in range(0, length, block):
        stop = min(length, start + block)
        driver_steps = flat_driver[:, length - stop : length - start].flip(1)  # s = T-1-l for l in the block
        if recompute:
            pieces = torch.utils.checkpoint.checkpoint(one_block, start, stop, driver_steps, use_reentrant=False)
        else:
            pieces = one_block(start, stop, driver_steps)
        for index in range(len(plan.readouts)):
            kernels[index].append(pieces[index])
        accumulated = pieces[-1] if accumulated is None else accumulated + pieces[-1]

    assert accumulated is not None
    permuted_shape = tuple(shape[j] for j in channels) + tuple(shape[j] for j in modes)
    inverse = [0] * len(shape)
    for position, axis in enumerate(channels + modes):
        inverse[axis] = position
    batch_dims = (batch,) + heads
    final = accumulated.reshape(batch_dims + permuted_shape).permute(*range(len(batch_dims)), *(len(batch_dims) + p for p in inverse))
    nonzero_start = True
    is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if not (is_compiling is not None and is_compiling()):
        nonzero_start = bool((h0 != 0).any())
    if nonzero_start:
        final = final + decay ** length * h0

    results = []
    for index, readout in enumerate(plan.readouts):
        kernel = torch.cat(kernels[index], 0)
        value = _driver_for(driver, len(lead), plan.driver_axes[index])
        result = causal_convolution(kernel, value, len(heads))
        if nonzero_start:
            result = result + _initial_state_terms(seq, plan, readout, decay, h0, length)
        results.append(result)
    return results, final.to(dtype)


def _initial_state_terms(seq, plan: ConvPlan, readout: ir.Expr, decay: torch.Tensor, h0: torch.Tensor, length: int) -> torch.Tensor:
    """``R(decay^(t+1) * h_0)`` for every step, ``[B, T, *heads, *readout]``, in blocks of lags."""
    rank = decay.dim()
    batch_rank = h0.dim() - rank
    block = max(1, BLOCK_ELEMENTS // max(1, h0.numel()))
    parts = []
    for start in range(0, length, block):
        stop = min(length, start + block)
        lags = torch.arange(start + 1, stop + 1, device=decay.device, dtype=decay.real.dtype if decay.is_complex() else decay.dtype)
        powers = decay.unsqueeze(0) ** lags.reshape((-1,) + (1,) * rank)  # [L, *state]
        terms = powers.reshape((stop - start,) + (1,) * batch_rank + tuple(decay.shape)) * h0.unsqueeze(0)
        parts.append(_evaluate_with_state(seq, readout, plan.state, terms))
    return torch.cat(parts, 0).movedim(0, 1)
