"""Variable-length batches: several sequences packed along one time axis (``cu_seqlens``).

The convention is flash-linear-attention's: inputs ``[1, total_T, *heads, *shape]`` and
offsets ``[N + 1]`` from 0 to ``total_T``; sequence ``n`` is steps
``offsets[n] .. offsets[n + 1] - 1``.  Every state starts afresh at each sequence's first
step (from ``state[n]``, ``[N, *heads, *shape]``), and each sequence's final state is its
value at its last step.

How each backend does it (:data:`recdsl.plan.VARLEN_FORMS`):

- ``sequential``: the loop over all ``total_T`` steps puts the initial state back at each
  sequence's first step (:meth:`Segments.enter`) and keeps the state at each last step.
- ``scan`` / ``chunked``: one scan over the packed sequence whose transition is zeroed at
  each first step, the initial state entering through that step's input term
  (``h_t0 = a_t0 h0 + b_t0``); monoids use the segmented combine
  (``(f1, x1) (o) (f2, x2) = (f1 | f2, x2 if f2 else x1 (o) x2)``); the chunk kernels lay
  each sequence out on whole chunks (:class:`ChunkLayout`) and restart the recurrence
  over chunk-boundary states at each sequence's first chunk.
- ``triton``, ``newton``, ``fused``: sequences of equal length are run as one batch, one
  call per distinct length (:func:`run_grouped`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from recdsl.plan import ExecutionPlan, VarlenForm


@dataclass(frozen=True)
class Segments:
    """The sequences of a packed batch: where each starts and ends on the time axis.

    ``offsets`` are the validated ``cu_seqlens`` as Python ints; ``starts`` and ``lasts``
    (each sequence's first and last step) are also kept as index tensors on the device.
    """

    offsets: tuple[int, ...]
    starts: torch.Tensor  # [N] int64: offsets[n]
    lasts: torch.Tensor  # [N] int64: offsets[n + 1] - 1
    sequence_of_step: torch.Tensor  # [T] int64: the sequence each step belongs to

    @staticmethod
    def of(offsets: tuple[int, ...], device: torch.device) -> "Segments":
        starts = torch.tensor(offsets[:-1], dtype=torch.long, device=device)
        lasts = torch.tensor(offsets[1:], dtype=torch.long, device=device) - 1
        owners = torch.repeat_interleave(torch.arange(len(offsets) - 1, device=device), lasts - starts + 1)
        return Segments(tuple(offsets), starts, lasts, owners)

    @property
    def count(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:]))

    # ---- the loop over time (sequential backend)
    def first_steps(self) -> dict[int, int]:
        """``{first step of sequence n: n}``."""
        return {start: n for n, start in enumerate(self.offsets[:-1])}

    def last_steps(self) -> dict[int, int]:
        """``{last step of sequence n: n}``."""
        return {end - 1: n for n, end in enumerate(self.offsets[1:])}

    @staticmethod
    def enter(state: Mapping[str, torch.Tensor], sequence: int) -> dict[str, torch.Tensor]:
        """The carried values at the first step of ``sequence``: row ``sequence`` of each initial value, as a batch of one."""
        return {name: value[sequence : sequence + 1] for name, value in state.items()}

    @staticmethod
    def stack_finals(finals: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Per-sequence final values (each a batch of one) as ``[N, *heads, *shape]``."""
        return {name: torch.cat([final[name] for final in finals], 0) for name in finals[0]}

    # ---- whole sequences (scan and chunked backends), time on dim 1
    def at_starts(self, sequence: torch.Tensor) -> torch.Tensor:
        """``sequence``'s values at each first step: ``[1, T, ...]`` -> ``[1, N, ...]``."""
        return sequence.index_select(1, self.starts)

    def per_step(self, initial: torch.Tensor) -> torch.Tensor:
        """Each step's sequence's row of ``initial``: ``[N, ...]`` -> ``[1, T, ...]``."""
        return initial.index_select(0, self.sequence_of_step).unsqueeze(0)

    def finals(self, sequence: torch.Tensor) -> torch.Tensor:
        """Each sequence's value at its last step: ``[1, T, *rest]`` -> ``[N, *rest]``."""
        return sequence[0].index_select(0, self.lasts)

    def carry_in(
        self,
        transition: torch.Tensor,
        value: torch.Tensor,
        initial: torch.Tensor,
        enter: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        reset: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A scan's elements with every sequence's initial state carried into its first step.

        ``x_t = T_t (x) x_{t-1} (+) v_t``: at each first step ``t0`` of sequence ``n`` the
        value becomes ``enter(T_t0, initial[n], v_t0)`` and the transition ``reset`` (the
        scan's zero: 0, or -inf over a tropical semiring), so that nothing of the previous
        sequence leaks in.  ``transition`` and ``value`` are ``[1, T, ...]``, ``initial``
        ``[N, ...]``.
        """
        first = enter(self.at_starts(transition), initial.unsqueeze(0), self.at_starts(value))
        first = first.expand((1, self.count) + tuple(value.shape[2:]))
        return transition.index_fill(1, self.starts, reset), value.index_copy(1, self.starts, first.to(value.dtype))

    def shift(self, sequence: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
        """The previous values ``x_{t-1}``: the sequence shifted by one step, each sequence's initial state at its first step."""
        shifted = torch.cat([sequence[:, :1], sequence[:, :-1]], 1)
        return shifted.index_copy(1, self.starts, initial.unsqueeze(0).to(shifted.dtype).expand((1, self.count) + tuple(shifted.shape[2:])))

    def start_flags(self, steps: int) -> torch.Tensor:
        """``[T, 1]`` booleans, set at each sequence's first step: the flags of :func:`.scans.segmented`."""
        flags = torch.zeros(steps, dtype=torch.bool, device=self.starts.device).index_fill(0, self.starts, True)
        return flags.unsqueeze(1)


@dataclass(frozen=True)
class ChunkLayout:
    """Each sequence of a packed batch laid out on whole chunks, for the chunked kernels.

    Sequence ``n`` of length ``L`` occupies ``ceil(L / C)`` chunks; the steps after its end
    in its last chunk are padding that leaves the state unchanged (zero keys and values,
    log decay 0).  So each sequence's final state is the state at the end of its last
    chunk, and the recurrence over chunk-boundary states restarts at each first chunk.
    """

    positions: torch.Tensor  # [T] int64: where step t of the packed batch sits in the padded layout
    padded_steps: int
    first_chunks: torch.Tensor  # [N] int64
    last_chunks: torch.Tensor  # [N] int64

    @staticmethod
    def of(segments: Segments, chunk: int) -> "ChunkLayout":
        device = segments.starts.device
        positions, firsts, lasts, cursor = [], [], [], 0
        for length in segments.lengths:
            chunks = -(-length // chunk)
            positions.append(torch.arange(cursor, cursor + length))
            firsts.append(cursor // chunk)
            lasts.append(cursor // chunk + chunks - 1)
            cursor += chunks * chunk
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return ChunkLayout(torch.cat(positions).to(device), cursor, as_tensor(firsts), as_tensor(lasts))

    @property
    def first_chunk_list(self) -> list[int]:
        return self.first_chunks.tolist()

    @property
    def last_chunk_list(self) -> list[int]:
        return self.last_chunks.tolist()

    def spread(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[N', T, ...]`` -> ``[N', padded_steps, ...]``, the padding filled with ``fill``."""
        padded = packed.new_full((packed.shape[0], self.padded_steps) + tuple(packed.shape[2:]), fill)
        return padded.index_copy(1, self.positions, packed)

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """``[N', padded_steps, ...]`` -> ``[N', T, ...]``: the steps of the packed batch."""
        return padded.index_select(1, self.positions)


# ---- the grouped fallback -----------------------------------------------------------------


def run_grouped(
    run: Callable,
    plan: ExecutionPlan,
    segments: Segments,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics,
    **options,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run a backend with no native segment resets: each group of equal-length sequences as one batch.

    No padding is needed (so the final states are exact), and there is one call of ``run``
    per distinct length.  Outputs are put back in packed order, ``[1, T, ...]``; final
    states are ``[N, ...]`` in sequence order.
    """
    groups: dict[int, list[int]] = {}
    for n, length in enumerate(segments.lengths):
        groups.setdefault(length, []).append(n)
    device = segments.starts.device
    pieces: list[list[torch.Tensor]] = []
    order: list[torch.Tensor] = []  # the packed steps each group's flattened outputs come from
    finals: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    for length, members in groups.items():
        ids = torch.tensor(members, dtype=torch.long, device=device)
        steps = (segments.starts.index_select(0, ids).unsqueeze(1) + torch.arange(length, device=device)).reshape(-1)  # [g * L]
        batch = {name: value[0].index_select(0, steps).reshape((len(members), length) + tuple(value.shape[2:])) for name, value in inputs.items()}
        start = {name: value.index_select(0, ids) for name, value in state.items()}
        outputs, final = run(plan, batch, params, consts, start, numerics, **options)
        pieces.append([o.reshape((-1,) + tuple(o.shape[2:])) for o in outputs])
        order.append(steps)
        finals.append((ids, final))
    inverse = torch.empty_like(torch.cat(order))
    inverse[torch.cat(order)] = torch.arange(inverse.shape[0], device=device)
    outputs = [torch.cat([group[i] for group in pieces], 0).index_select(0, inverse).unsqueeze(0) for i in range(len(pieces[0]))]
    sequence_order = torch.empty(segments.count, dtype=torch.long, device=device)
    sequence_order[torch.cat([ids for ids, _ in finals])] = torch.arange(segments.count, device=device)
    final = {name: torch.cat([f[name] for _, f in finals], 0).index_select(0, sequence_order) for name in finals[0][1]}
    return outputs, final


def run_packed(
    run: Callable,
    plan: ExecutionPlan,
    segments: Segments,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics,
    **options,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run ``plan`` (whose runner is ``run``) on a packed batch, in the plan's :class:`~recdsl.plan.VarlenForm`."""
    match plan.varlen:
        case VarlenForm.SEGMENT_RESETS:
            return run(plan, inputs, params, consts, state, numerics, segments=segments, **options)
        case VarlenForm.GROUPED_BY_LENGTH:
            return run_grouped(run, plan, segments, inputs, params, consts, state, numerics, **options)
    raise AssertionError(plan.varlen)  # pragma: no cover - every form is handled above
