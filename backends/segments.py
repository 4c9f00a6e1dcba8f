"""Variable-length batches: several sequences packed along one time axis (``cu_seqlens``).

The convention is flash-linear-attention's: inputs ``[1, total_T, *heads, *shape]`` and
offsets ``[N + 1]`` from 0 to ``total_T``; sequence ``n`` is steps
``offsets[n] .. offsets[n + 1] - 1``.  Every state starts afresh at each sequence's first
step (from ``state[n]``, ``[N, *heads, *shape]``), and each sequence's final state is its
value at its last step.

How each backend does it (:data:`recdsl.plan.VARLEN_FORMS`):

- ``sequential``: the sequences become the rows of a batch, aligned at their ends
  (:class:`EndAligned`); the loop over ``max_len`` steps puts each row's initial state
  back at its sequence's first step, so the state after the last step is final for all.
- ``scan`` / ``chunked``: one scan over the packed sequence whose transition is zeroed at
  each first step, the initial state entering through that step's input term
  (``h_t0 = a_t0 h0 + b_t0``); monoids and semiring matrices use the segmented combine
  (``(x1, f1) (o) (x2, f2) = (x2 if f2 else x1 (o) x2, f1 | f2)``); the chunk kernels lay
  each sequence out on whole chunks (:class:`ChunkLayout`) and restart the recurrence
  over chunk-boundary states at each sequence's first chunk; the delta rule, which loops
  over chunks, takes the sequences as rows of their own (:class:`ChunkRows`).
- ``fused``, ``newton``, ``triton``: the sequences become batch rows starting together
  and padded at their ends (:class:`StartAligned`); the C loop, Newton's solver and the
  Triton scan kernels keep every step's state, so each row's final state is read at its
  sequence's last step.
- ``triton`` with a chunk kernel (which keeps only the last state): sequences of equal
  length are run as one batch, one call per distinct length (:func:`run_grouped`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from recdsl import ir
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

    def firsts(self, sequence: torch.Tensor) -> torch.Tensor:
        """Each sequence's value at its first step (a reverse state's final value): ``[1, T, *rest]`` -> ``[N, *rest]``."""
        return sequence[0].index_select(0, self.starts)

    def reversed(self) -> "Segments":
        """The same sequences with time running backwards, for a reverse recurrence solved forward.

        Flipping the packed time axis flips each sequence and their order: sequence ``n``
        becomes sequence ``N - 1 - n`` of the flipped batch (so its rows of ``state=`` are
        read flipped too), and its last step becomes that sequence's first, where the
        recurrence restarts.
        """
        total = self.offsets[-1]
        return Segments.of(tuple(total - offset for offset in reversed(self.offsets)), self.starts.device)

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

    def shift(self, sequence: torch.Tensor, initial: torch.Tensor, direction: ir.Direction = ir.Direction.FORWARD) -> torch.Tensor:
        """The previous values: ``x_{t-1}``, each sequence's initial state at its first step; for a
        reverse recurrence ``x_{t+1}``, the initial state at each sequence's last step.

        Nothing crosses a boundary in either direction: the step a shift would take from the
        neighbouring sequence is the one overwritten by the initial state.
        """
        if direction is ir.Direction.REVERSE:
            shifted, entry = torch.cat([sequence[:, 1:], sequence[:, -1:]], 1), self.lasts
        else:
            shifted, entry = torch.cat([sequence[:, :1], sequence[:, :-1]], 1), self.starts
        return shifted.index_copy(1, entry, initial.unsqueeze(0).to(shifted.dtype).expand((1, self.count) + tuple(shifted.shape[2:])))

    def start_flags(self, steps: int) -> torch.Tensor:
        """``[T, 1]`` booleans, set at each sequence's first step: the flags of :func:`.scans.segmented`."""
        flags = torch.zeros(steps, dtype=torch.bool, device=self.starts.device).index_fill(0, self.starts, True)
        return flags.unsqueeze(1)


class _Rows:
    """Moving values between the packed layout and a batch of padded rows (``sources``, ``positions``, ``steps``)."""

    steps: int
    sources: torch.Tensor
    positions: torch.Tensor

    def rows(self, packed: torch.Tensor) -> torch.Tensor:
        """``[1, T, *rest]`` -> ``[N, max_len, *rest]``."""
        rest = tuple(packed.shape[2:])
        return packed[0].index_select(0, self.sources).reshape((-1, self.steps) + rest)

    def packed(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N, max_len, *rest]`` -> ``[1, T, *rest]``: the steps of the sequences, in packed order."""
        return rows.reshape((-1,) + tuple(rows.shape[2:])).index_select(0, self.positions).unsqueeze(0)


@dataclass(frozen=True)
class EndAligned(_Rows):
    """A packed batch as a batch of ``N`` rows of ``max_len`` steps that all end at the last step.

    Row ``n`` holds sequence ``n`` in its last ``L_n`` steps; before that it repeats the
    sequence's first step (values from the data rather than zeros a cell might take the
    log of; what those steps compute is discarded, and the reset cuts off their state).
    The loop puts row ``n``'s initial state back at its first step (:attr:`resets`), so
    the state after the last step is every sequence's final state, and a loop over time
    takes ``max_len`` steps of a batch of ``N``, not ``total_T`` steps of one.
    """

    steps: int  # max_len
    sources: torch.Tensor  # [N * max_len] int64: the packed step each padded step reads
    positions: torch.Tensor  # [T] int64: where each packed step sits in the flattened [N * max_len]
    resets: dict[int, torch.Tensor]  # {step: rows whose sequence starts there}, steps > 0

    @staticmethod
    def of(segments: Segments) -> "EndAligned":
        device = segments.starts.device
        lengths = segments.lengths
        longest = max(lengths)
        steps = torch.arange(longest)
        sources, positions, starting = [], [], {}
        for n, (start, length) in enumerate(zip(segments.offsets, lengths)):
            pad = longest - length
            sources.append(start + (steps - pad).clamp(min=0))
            positions.append(n * longest + pad + torch.arange(length))
            if pad:
                starting.setdefault(pad, []).append(n)
        resets = {t: torch.tensor(rows, dtype=torch.long, device=device) for t, rows in starting.items()}
        return EndAligned(longest, torch.cat(sources).to(device), torch.cat(positions).to(device), resets)


@dataclass(frozen=True)
class StartAligned(_Rows):
    """A packed batch as a batch of ``N`` rows of ``max_len`` steps that all start at step 0.

    Row ``n`` holds sequence ``n`` in its first ``L_n`` steps, then repeats its last step
    (values from the data; what those steps compute is discarded).  A backend that keeps
    the state of every step reads row ``n``'s final state after step ``L_n - 1``
    (:attr:`last_steps`); nothing needs resetting, since every row starts at step 0.
    """

    steps: int  # max_len
    sources: torch.Tensor  # [N * max_len] int64: the packed step each padded step reads
    positions: torch.Tensor  # [T] int64: where each packed step sits in the flattened [N * max_len]
    last_steps: torch.Tensor  # [N] int64: L_n - 1

    @staticmethod
    def of(segments: Segments) -> "StartAligned":
        device = segments.starts.device
        lengths = segments.lengths
        longest = max(lengths)
        steps = torch.arange(longest)
        sources = [start + steps.clamp(max=length - 1) for start, length in zip(segments.offsets, lengths)]
        positions = [n * longest + torch.arange(length) for n, length in enumerate(lengths)]
        last_steps = torch.tensor(lengths, dtype=torch.long, device=device) - 1
        return StartAligned(longest, torch.cat(sources).to(device), torch.cat(positions).to(device), last_steps)


class _Slots:
    """Packed steps placed on a longer, padded time axis: step ``t`` at ``positions[t]``, padding between.

    A sequence's slot starts where its padded layout begins it and holds its steps in
    order; the padding steps leave the state unchanged (zero keys and values, log decay 0).
    """

    positions: torch.Tensor  # [T] int64: where each packed step sits on the padded axis
    padded_steps: int

    @staticmethod
    def _positions(slot_starts: list[int], lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.cat([start + torch.arange(length) for start, length in zip(slot_starts, lengths)]).to(device)

    def spread(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[N', T, ...]`` -> ``[N', padded_steps, ...]``, the padding filled with ``fill``."""
        padded = packed.new_full((packed.shape[0], self.padded_steps) + tuple(packed.shape[2:]), fill)
        return padded.index_copy(1, self.positions, packed)

    def gather(self, padded: torch.Tensor) -> torch.Tensor:
        """``[N', padded_steps, ...]`` -> ``[N', T, ...]``: the steps of the packed batch."""
        return padded.index_select(1, self.positions)


@dataclass(frozen=True)
class ChunkLayout(_Slots):
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
        slot_starts, firsts, lasts, cursor = [], [], [], 0
        for length in segments.lengths:
            chunks = -(-length // chunk)
            slot_starts.append(cursor)
            firsts.append(cursor // chunk)
            lasts.append(cursor // chunk + chunks - 1)
            cursor += chunks * chunk
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        return ChunkLayout(_Slots._positions(slot_starts, segments.lengths, device), cursor, as_tensor(firsts), as_tensor(lasts))


@dataclass(frozen=True)
class ChunkRows(_Slots):
    """Each sequence of a packed batch in a row of its own, for a chunk kernel that loops over chunks.

    The delta rule's chunked form steps from chunk to chunk; on one packed row it would
    take as many steps as all sequences have chunks.  Here the ``N`` sequences are ``N``
    rows of ``max_len`` steps rounded up to whole chunks, padded at their ends with steps
    that leave the state unchanged (zero keys, values and coefficients), so the loop takes
    the longest sequence's chunks and the state after each row's last step is final.
    Values are ``[N', T, ...]`` packed and ``[N' * N, steps, ...]`` in rows: the padded
    axis of :class:`_Slots` cut into the rows.
    """

    positions: torch.Tensor  # [T] int64: where each packed step sits in the flattened [N * steps]
    count: int  # N
    steps: int  # the longest sequence, rounded up to whole chunks

    @staticmethod
    def of(segments: Segments, chunk: int) -> "ChunkRows":
        steps = -(-max(segments.lengths) // chunk) * chunk
        slot_starts = [n * steps for n in range(segments.count)]
        return ChunkRows(_Slots._positions(slot_starts, segments.lengths, segments.starts.device), segments.count, steps)

    @property
    def padded_steps(self) -> int:  # type: ignore[override]
        return self.count * self.steps

    def spread(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``[N', T, ...]`` -> ``[N' * N, steps, ...]``, the padding filled with ``fill``."""
        return super().spread(packed, fill).reshape((-1, self.steps) + tuple(packed.shape[2:]))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """``[N' * N, steps, ...]`` -> ``[N', T, ...]``."""
        return super().gather(rows.reshape((-1, self.padded_steps) + tuple(rows.shape[2:])))


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
        case VarlenForm.END_ALIGNED_RESETS:
            aligned = EndAligned.of(segments)
            rows = {name: aligned.rows(value) for name, value in inputs.items()}
            outputs, final = run(plan, rows, params, consts, state, numerics, resets=aligned.resets, **options)
            return [aligned.packed(o) for o in outputs], final
        case VarlenForm.START_ALIGNED:
            aligned = StartAligned.of(segments)
            rows = {name: aligned.rows(value) for name, value in inputs.items()}
            outputs, final = run(plan, rows, params, consts, state, numerics, last_steps=aligned.last_steps, **options)
            return [aligned.packed(o) for o in outputs], final
        case VarlenForm.GROUPED_BY_LENGTH:
            return run_grouped(run, plan, segments, inputs, params, consts, state, numerics, **options)
    raise AssertionError(plan.varlen)  # pragma: no cover - every form is handled above
