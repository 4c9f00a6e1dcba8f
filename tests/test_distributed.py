"""Sequence parallelism (recdsl.distributed) against the single-process run, on CPU with gloo.

Spawning is expensive on the project's 2-core machines, so each world size is one spawn
whose workers run every case and write their measured errors to a JSON file per rank;
the tests then read those files.  Every case compares, in float64, one rank's slice of
the outputs, the whole-sequence final state, the gradients of the rank's input slice,
of the initial state (rank 0) and of every param (summed over ranks, as DDP reduces
them) with the single-process run of the same module on the whole sequence.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.distributed import SequenceParallelError
from recdsl import ir
from recdsl.ir import Kind

sys.path.insert(0, str(Path(__file__).resolve().parent))
from example_dims import DIMS, EXAMPLES  # noqa: E402
from test_reverse import AFFINE_SCAN  # noqa: E402  (a reverse monoid scan beside a forward one)

TOLERANCE = 1e-10  # float64, absolute on values of order one (relative to max(1, |reference|))

# The examples the parallel backends run, one per parallel class at least.
PARALLEL_EXAMPLES = ("mingru", "minlstm", "lru", "s4d", "hgrn", "rglru", "s6", "mamba2", "gla", "retnet", "mlstm", "deltanet", "aaren", "crf", "gated_deltanet", "rwkv6", "ttt_linear", "hgrn2", "state_tracking_lrnn")
NONLINEAR_EXAMPLES = ("gru", "lstm", "paragru", "paralstm")
# Reverse states (LION: forward and reverse halves, a reverse delay; the CRF's backward
# variables: a reverse semiring matrix) and a coupled group scanned jointly (Titans).
REVERSE_AND_JOINT_EXAMPLES = ("lion", "crf_marginals", "titans")

# Cells whose states the chunked backend scans as explicit matrices (no example does), and delays.
MATRIX_SCAN_CELLS = {
    "delta_state": ("""cell DeltaState(dk, dv) {
    input k: [dk]
    input v: [dv]
    input b: []
    state S: [dk, dv] = 0
    beta = sigmoid(b)
    S = S - beta * outer(k, k @ S) + beta * outer(k, v)
    out S
}""", dict(dk=3, dv=2)),  # the delta rule with the whole state as output: low rank from the left
    "right_memory": ("""cell RightMemory(d) {
    input k: [d]
    input v: [d]
    state W: [d, d] = 0
    W = W - 0.5 * outer(W @ k, k) + outer(v, k)
    out W
}""", dict(d=3)),  # low rank from the right
    # Delays (no example runs one forward): a token shift, a shift of a shift, and a decay carried
    # one step into a diagonal scan; each rank's first steps read the previous rank's last inputs.
    "delays": ("""cell Delays(d) {
    input x: [d]
    input a: [d]
    state xp: [d] = 0.5
    state xpp: [d] = 0.25
    state lam: [d] = 1
    state h: [d] = 0
    before = xpp
    h = lam * h + xp
    xpp = xp
    xp = x
    lam = sigmoid(a)
    out h + before
}""", dict(d=3)),
    # Block diagonal along the columns, every block the same matrix (the scan keeps one block).
    "shared_blocks": ("""cell SharedBlocks(d, c) {
    input g: [d, d]
    input v: [d, c]
    state S: [d, c] = 0
    S = 0.5 * (g @ S) + v
    out S
}""", dict(d=3, c=2)),
    # A reverse scan of a monoid that does not commute beside a forward one.
    "suffix_scan": (AFFINE_SCAN, dict(d=3)),
    "dense": ("""cell Dense(d) {
    input x: [d]
    param A: [d, d] = normal(0.4)
    state h: [d] = 0
    h = h @ A + x
    out h
}""", dict(d=3)),  # a dense transition
    # The gated delta rule read out before its update and after it (one exclusive, one inclusive read-out).
    "previous_delta": ("""cell PreviousDelta(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input a: []
    input b: []
    state S: [dk, dv] = 0
    alpha = sigmoid(a)
    beta = sigmoid(b)
    out q @ S
    S = alpha * (S - beta * outer(k, k @ S)) + beta * outer(k, v)
    out q @ S
}""", dict(dk=3, dv=2)),
    # Decayed outer products with a decay per column, read out before and after the update.
    "previous_decayed": ("""cell PreviousDecayed(dk, dv) {
    input q: [dk]
    input k: [dk]
    input v: [dv]
    input d: [dv]
    state S: [dk, dv] = 0
    out q @ S
    S = exp(-exp(d))[None, :] * S + outer(k, v)
    out q @ S
}""", dict(dk=3, dv=2)),
    # A convolution whose decay exceeds 1 somewhere: each slice runs the plan's fallback scan
    # with the convolution's summary (its length and final state).
    "unstable_conv": ("""cell UnstableConv(d, n) {
    input x: [d]
    param a: [d, n] = 1.2
    param c: [d, n] = normal(1.0)
    state h: [d, n] = 0
    h = a * h + x[:, None]
    out sum(c * h, -1)
}""", dict(d=2, n=3)),
}


@dataclass(frozen=True)
class Case:
    example: str
    lengths: tuple[int, ...]  # the slice of every rank, rank 0 first
    with_state: bool
    chunk_size: int = 3  # small, so that slices cross chunk boundaries
    heads: tuple[int, ...] = ()
    ddp: bool = False
    fsdp: bool = False  # FSDP2's fully_shard over a CPU device mesh
    exchange: str | None = None  # an Exchange member's name to force it; None: as planned by size
    return_state: bool = True
    last_output_only: bool = False  # the loss reads only the last output (every rank must still reach the exchanges' backward)
    cu_seqlens: tuple[int, ...] | None = None  # packed sequences (B = 1): the global offsets every rank passes
    newton_iterations: int | None = None  # set: compiled with backend="newton" and this max_iterations (-1: the default)
    newton_jacobian: str | None = None  # with newton_iterations: the jacobian= option ("diagonal": quasi-Newton, the adjoint on a ring)
    source: str | None = None  # a cell's source (dims in ``dims``) rather than examples/<example>.rec
    dims: tuple[tuple[str, int], ...] = ()

    @property
    def name(self) -> str:
        extras = ("-h" + "x".join(map(str, self.heads)) if self.heads else "") + ("-ddp" if self.ddp else "") + ("-fsdp" if self.fsdp else "") + (f"-{self.exchange.lower()}" if self.exchange else "") + ("" if self.return_state else "-nofinal") + ("-lastoutput" if self.last_output_only else "") + ("-cu" + "_".join(map(str, self.cu_seqlens)) if self.cu_seqlens else "")
        if self.newton_iterations is not None:
            extras += f"-newton{self.newton_iterations}"
        if self.newton_jacobian is not None:
            extras += f"-{self.newton_jacobian}"
        return f"{self.example}-{'x'.join(map(str, self.lengths))}-{'state' if self.with_state else 'nostate'}{extras}"


def default_cases(world: int) -> list[Case]:
    """2 ranks: every parallel example, uneven slices with a slice of one step, each exchange
    forced on cells planned with the other, DDP.  4 ranks (4 processes on 2 cores): one
    cell per summary kind."""
    if world == 4:
        lengths = (3, 1, 4, 2)
        return [
            Case("lru", lengths, with_state=True),  # complex diagonal decays
            Case("gla", (2, 2, 2, 2), with_state=True, heads=(2,)),  # row decays, chunked, heads
            Case("mlstm", (1, 1, 1, 1), with_state=True),  # max-plus, scalar-decay chunked, vector: three exchanges
            Case("deltanet", lengths, with_state=False),  # the delta rule's transition
            Case("aaren", lengths, with_state=True),  # a monoid
            Case("crf", lengths, with_state=False, ddp=True),  # a semiring matrix, on the ring, under DDP
            Case("dense", lengths, with_state=True, exchange="ALL_GATHER"),  # a dense matrix scan
            Case("mamba2", lengths, with_state=True, exchange="RING", return_state=False),
            Case("state_tracking_lrnn", lengths, with_state=True),  # block matrices, on the ring
            Case("delays", (1, 1, 1, 1), with_state=True),  # shifts across every slice boundary
            Case("lion", lengths, with_state=True),  # forward and reverse exchanges in one cell
            Case("crf_marginals", (1, 4, 2, 1), with_state=True),  # a reverse semiring matrix on the ring
            Case("titans", lengths, with_state=True, exchange="ALL_GATHER"),  # joint block products gathered
            Case("suffix_scan", lengths, with_state=True, exchange="RING"),  # a reverse monoid on a reverse ring
            # Packed sequences over steps 0-2 | 3 | 4-7 | 8-9: sequence 1 (steps 2-5) crosses three
            # slices (rank 1's lies inside it), sequence 2 starts inside rank 2's slice.
            Case("gla", lengths, with_state=True, heads=(2,), cu_seqlens=PACKED_4),
            Case("lion", lengths, with_state=True, cu_seqlens=PACKED_4),
            # Summaries of recdsl.distributed_native: the gated delta rule's transition, its
            # transposed form (S @ q, on the ring), previous-state read-outs, the convolution.
            Case("gated_deltanet", lengths, with_state=True),
            Case("ttt_linear", lengths, with_state=False, exchange="RING"),
            Case("rwkv6", (1, 1, 1, 1), with_state=True),
            Case("s4d", lengths, with_state=True),
            Case("s4d", lengths, with_state=True, cu_seqlens=PACKED_4),  # rank 2's reset summary: a length of 0
            # A monoid, packed: rank 2 holds sequence 2's start, so rank 3's fold must drop ranks 0 and 1.
            Case("aaren", lengths, with_state=True, cu_seqlens=PACKED_4),
            # Newton's method with each iteration's linear solve sharded: a dense Jacobian, and
            # 2 x 2 blocks with a budget of 2 iterations (the rest swept rank after rank).
            Case("gru", lengths, with_state=True, newton_iterations=-1),
            Case("paralstm", lengths, with_state=False, newton_iterations=2),
            Case("lstm", lengths, with_state=True, newton_iterations=-1, newton_jacobian="diagonal", cu_seqlens=PACKED_4),  # quasi-Newton: the adjoint on a ring; packed
            *reverse_newton_cases(4),
        ]
    shapes = [(5, 3), (1, 6)]
    cases = []
    for i, example in enumerate(PARALLEL_EXAMPLES + tuple(MATRIX_SCAN_CELLS)):
        cases.append(Case(example, shapes[i % len(shapes)], with_state=bool(i % 2)))
    # Each exchange on cells planned with the other: three chained rings (mLSTM), a monoid's ring,
    # a ring without the final state, the CRF's all-gather.
    cases.append(Case("mlstm", shapes[-1], with_state=True, exchange="RING"))
    cases.append(Case("aaren", shapes[0], with_state=True, exchange="RING"))
    cases.append(Case("gla", shapes[0], with_state=True, exchange="RING", return_state=False))
    cases.append(Case("crf", shapes[-1], with_state=True, exchange="ALL_GATHER"))
    cases.append(Case("state_tracking_lrnn", shapes[0], with_state=True, exchange="ALL_GATHER"))  # block products gathered
    cases.append(Case("s4d", shapes[0], with_state=True, exchange="RING"))  # the convolution's own transition on the ring
    cases.append(Case("ttt_linear", shapes[-1], with_state=True, exchange="ALL_GATHER", heads=(2,)))  # S @ q gathered, heads
    # Under DDP: CRF's learnable initial state is read on rank 0 only; minGRU's params everywhere.
    cases.append(Case("crf", shapes[0], with_state=False, ddp=True))
    cases.append(Case("mingru", shapes[-1], with_state=True, ddp=True))
    cases.append(Case("hgrn", shapes[0], with_state=True, fsdp=True))
    # A given state on rank 0 leaves the CRF's learnable start unused there: every rank must
    # still give it a (zero) gradient, or FSDP's reduce-scatter differs between ranks.
    cases.append(Case("crf", shapes[-1], with_state=True, fsdp=True))
    cases.append(Case("crf", shapes[0], with_state=True, return_state=False, last_output_only=True))  # log Z alone
    # Packed sequences: boundaries inside a slice and on the slice boundary (5), a one-step
    # slice that starts a sequence continued by the next rank; diagonal, chunked matrix, both directions.
    cases.append(Case("mingru", (5, 3), with_state=True, cu_seqlens=(0, 2, 5, 8)))
    cases.append(Case("gla", (1, 6), with_state=True, cu_seqlens=(0, 3, 7)))
    cases.append(Case("lion", (5, 3), with_state=True, cu_seqlens=(0, 2, 6, 8)))
    cases.append(Case("lion", (1, 6), with_state=False, exchange="RING", cu_seqlens=(0, 1, 7)))
    # Declared monoids, packed (the fold restarts at a slice holding a first step): boundaries
    # inside a slice and on the slice boundary; a one-step slice whose sequence the next rank
    # continues, on the ring; the reverse suffix scan beside a forward one.
    cases.append(Case("aaren", (5, 3), with_state=True, cu_seqlens=(0, 2, 5, 8)))
    cases.append(Case("aaren", (1, 6), with_state=True, exchange="RING", cu_seqlens=(0, 3, 7)))
    cases.append(Case("suffix_scan", (5, 3), with_state=True, cu_seqlens=(0, 2, 6, 8)))
    # Reverse recurrences (summaries folded from the last rank) and a joint group, each exchange.
    cases.append(Case("lion", shapes[0], with_state=True))
    cases.append(Case("crf_marginals", shapes[-1], with_state=True, exchange="ALL_GATHER"))
    cases.append(Case("crf_marginals", shapes[0], with_state=False, return_state=False))
    cases.append(Case("titans", shapes[0], with_state=True))
    cases.append(Case("suffix_scan", shapes[-1], with_state=True))
    # Newton with the exchange: a diagonal Jacobian under DDP, a dense one, coupled blocks; one
    # iteration then the sequential sweep.
    cases.append(Case("paragru", shapes[0], with_state=True, ddp=True, newton_iterations=-1))
    cases.append(Case("gru", shapes[-1], with_state=False, newton_iterations=-1))
    cases.append(Case("lstm", shapes[0], with_state=True, newton_iterations=-1))
    cases.append(Case("paragru", shapes[-1], with_state=True, newton_iterations=1))
    cases.append(Case("gru", (1, 1), with_state=True, newton_iterations=-1))  # each slice's guess already solves its own step
    # Quasi-Newton (the diagonal of dense blocks): exact gradients by the adjoint passed along a ring.
    cases.append(Case("gru", shapes[-1], with_state=True, newton_iterations=-1, newton_jacobian="diagonal"))
    cases.append(Case("lstm", shapes[0], with_state=False, newton_iterations=-1, newton_jacobian="diagonal"))
    # Packed sequences with Newton: resets inside a slice and on the slice boundary; quasi-Newton on the ring.
    cases.append(Case("gru", (5, 3), with_state=True, newton_iterations=-1, cu_seqlens=(0, 2, 5, 8)))
    cases.append(Case("lstm", (1, 6), with_state=True, newton_iterations=-1, newton_jacobian="diagonal", cu_seqlens=(0, 3, 7)))
    cases.extend(reverse_newton_cases(2))
    return cases


def _reverse_newton_cells() -> dict[str, tuple[str, tuple[tuple[str, int], ...]]]:
    """Nonlinear cells with reverse states for the sharded newton run, by name: BiGRU; the
    directed tests' mixed cell (a forward state, a reverse pair reading its values before and
    after its update, a forward and a reverse delay); two cells of tests/test_directed.py's
    generator of 2-3 nonlinear states (the first drawn, per seed, with one reverse state that
    reads another state's previous value, so that values cross the slices' edges both ways)."""
    import random
    import re

    from hypothesis import HealthCheck, Phase, find, settings
    from test_directed import NONLINEAR_MIXED, mixed_cells

    def one_reverse_reading_a_previous_value(source: str) -> bool:
        reverse = re.findall(r"state s(\d): \[d\] = 0 reverse", source)
        return len(reverse) == 1 and re.search(rf"s{reverse[0]} = .*\bb\d", source) is not None

    cells = {"bigru": (None, ()), "nonlinear_mixed": (NONLINEAR_MIXED, (("d", 3),))}
    for seed in (0, 1):
        drawn = find(
            mixed_cells(),
            one_reverse_reading_a_previous_value,
            random=random.Random(seed),
            settings=settings(database=None, max_examples=1000, phases=[Phase.generate], suppress_health_check=list(HealthCheck)),
        )
        cells[f"random_reverse_{seed}"] = (drawn, (("d", 3),))
    return cells


def reverse_newton_cases(world: int, slow: bool = False) -> list[Case]:
    """Cells with reverse states by sharded Newton (each part of the directed split in its own
    time direction): 2 ranks, uneven slices with one of one step, packed sequences; 4 ranks,
    the quasi-Newton adjoint ring run from the last rank, the sweep after a budget of one
    iteration, delays across every slice boundary, packed sequences crossing three slices.
    ``slow``: every cell on every slicing and option."""
    cells = _reverse_newton_cells()

    def case(name: str, lengths: tuple[int, ...], with_state: bool, **options) -> Case:
        source, dims = cells[name]
        options.setdefault("newton_iterations", -1)
        return Case(name, lengths, with_state, source=source, dims=dims, **options)

    if slow:
        slicings = {2: [(1, 1), (7, 2), (2, 9)], 4: [(1, 1, 1, 1), (5, 1, 7, 3)]}[world]
        cases = []
        for name in cells:
            for lengths in slicings:
                cases.append(case(name, lengths, with_state=True))
                cases.append(case(name, lengths, with_state=False, newton_jacobian="diagonal"))
            cases.append(case(name, slicings[1], True, heads=(2,)))
            cases.append(case(name, slicings[1], True, newton_iterations=1))
            cases.append(case(name, slicings[1], True, newton_iterations=1, newton_jacobian="diagonal"))
            cases.append(case(name, slicings[1], False, return_state=False, last_output_only=True))
            cases.append(case(name, slicings[1], True, ddp=True))
            for offsets in {2: [(0, 3, 9), (0, 1, 2, 9)], 4: [(0, 5, 6, 16), (0, 1, 2, 3, 4, 16)]}[world]:
                cases.append(case(name, slicings[1], True, cu_seqlens=offsets))
                cases.append(case(name, slicings[1], False, newton_jacobian="diagonal", cu_seqlens=offsets))
            cases.append(case(name, slicings[1], True, newton_iterations=1, cu_seqlens=offsets))
        return cases
    if world == 4:
        return [
            case("bigru", (3, 1, 4, 2), True, newton_jacobian="diagonal"),  # the adjoint ring, g's from rank 0 to the last
            case("random_reverse_0", (3, 1, 4, 2), True, newton_iterations=1),  # then swept rank after rank, g's the other way
            case("nonlinear_mixed", (1, 1, 1, 1), True),  # delays and previous values across every slice boundary
            case("bigru", (3, 1, 4, 2), True, cu_seqlens=PACKED_4),
        ]
    return [
        case("bigru", (5, 3), True),
        case("nonlinear_mixed", (1, 6), True, cu_seqlens=(0, 3, 7)),  # packed: a delay's final rows from the rank holding each end
        case("random_reverse_1", (5, 3), False),
    ]


PACKED_4 = (0, 2, 6, 10)  # packed sequences over the 4-rank slices (3, 1, 4, 2)


def slow_cases(world: int) -> list[Case]:
    """The whole matrix: every parallel example x several slicings x with and without a state;
    packed sequences on every example."""
    slicings = {2: [(1, 1), (7, 2), (2, 9), (16, 16)], 4: [(1, 1, 1, 1), (5, 1, 7, 3), (8, 8, 8, 8)]}[world]
    cases = []
    cases.extend(reverse_newton_cases(world, slow=True))
    for example in NONLINEAR_EXAMPLES + ("slstm",):  # by Newton's method, sharded
        for lengths in slicings:
            cases.append(Case(example, lengths, with_state=len(lengths) % 2 == 0, newton_iterations=-1))
        cases.append(Case(example, slicings[1], True, heads=(2,), newton_iterations=3))
        for lengths in slicings[:2]:  # quasi-Newton: the diagonal of each block, the exact adjoint on a ring
            cases.append(Case(example, lengths, with_state=True, newton_iterations=-1, newton_jacobian="diagonal"))
        cases.append(Case(example, slicings[1], False, newton_iterations=3, newton_jacobian="diagonal"))
        for offsets in {2: [(0, 3, 9), (0, 1, 2, 9)], 4: [(0, 5, 6, 16), (0, 1, 2, 3, 4, 16)]}[world]:  # packed, each Jacobian mode
            cases.append(Case(example, slicings[1], True, newton_iterations=-1, cu_seqlens=offsets))
            cases.append(Case(example, slicings[1], False, newton_iterations=-1, newton_jacobian="diagonal", cu_seqlens=offsets))
        cases.append(Case(example, slicings[1], True, newton_iterations=1, cu_seqlens=offsets))  # then swept rank after rank, with resets
        cases.append(Case(example, slicings[1], True, ddp=True, newton_iterations=-1, newton_jacobian="diagonal"))  # the adjoint ring beside DDP's collectives
    for example in PARALLEL_EXAMPLES + REVERSE_AND_JOINT_EXAMPLES + tuple(MATRIX_SCAN_CELLS):
        for lengths in slicings:
            for with_state in (False, True):
                cases.append(Case(example, lengths, with_state))
        cases.append(Case(example, slicings[1], True, heads=(2,)))
        cases.append(Case(example, slicings[1], True, exchange="RING"))
        cases.append(Case(example, slicings[1], False, exchange="ALL_GATHER", return_state=False))
        params = list(_module(Case(example, slicings[1], False)).parameters())
        if params:
            cases.append(Case(example, slicings[1], False, ddp=True))
        if params and all(p.dim() > 0 for p in params):  # fully_shard refuses scalar params (Mamba-2's A_log)
            cases.append(Case(example, slicings[1], True, fsdp=True))
        for offsets in {2: [(0, 3, 9), (0, 1, 2, 9), (0, 7, 9)], 4: [(0, 5, 6, 16), (0, 1, 2, 3, 4, 16)]}[world]:
            cases.append(Case(example, slicings[1], True, cu_seqlens=offsets))
        cases.append(Case(example, slicings[1], False, exchange="RING", cu_seqlens=offsets))
    return cases


# ---- the worker ---------------------------------------------------------------------------


def _module(case: Case) -> recdsl.CompiledCell:
    torch.manual_seed(1234)
    options = dict(chunk_size=case.chunk_size)
    if case.newton_iterations is not None:
        options = dict(backend="newton", backend_options={} if case.newton_iterations < 0 else {"max_iterations": case.newton_iterations})
        if case.newton_jacobian is not None:
            options["backend_options"]["jacobian"] = case.newton_jacobian
    module = _compile(case, **options).double()
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.3 * torch.randn_like(param))
    return module


def _compile(case: Case, **options) -> recdsl.CompiledCell:
    if case.source is not None:
        return recdsl.compile(case.source, **options, **dict(case.dims))
    if case.example in MATRIX_SCAN_CELLS:
        source, dims = MATRIX_SCAN_CELLS[case.example]
        return recdsl.compile(source, **options, **dims)
    return recdsl.compile(str(EXAMPLES / f"{case.example}.rec"), **options, **DIMS[case.example])


def _inputs(module: recdsl.CompiledCell, case: Case):
    generator = torch.Generator().manual_seed(99)
    total = sum(case.lengths)
    batch = 1 if case.cu_seqlens else 2
    inputs = {}
    for declared in module.cell.inputs:
        shape = (batch, total, *case.heads, *declared.type.shape)
        value = 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64)
        if declared.type.kind is Kind.COMPLEX:
            value = torch.complex(value, 0.5 * torch.randn(shape, generator=generator, dtype=torch.float64))
        inputs[declared.name] = value
    if case.example in ("deltanet",):
        inputs["k"] = torch.nn.functional.normalize(inputs["k"], dim=-1)
    state = None
    if case.with_state:
        rows = len(case.cu_seqlens) - 1 if case.cu_seqlens else batch  # packed: one row per sequence
        start = module.initial_state(rows, *case.heads, dtype=torch.float64)
        state = {}
        for name, value in start.items():
            noise = 0.5 * torch.randn(value.shape, generator=generator, dtype=torch.float64)
            if value.is_complex():
                noise = torch.complex(noise, 0.5 * torch.randn(value.shape, generator=generator, dtype=torch.float64))
            state[name] = torch.where(torch.isinf(value), value, noise) if not value.is_complex() else noise
        if "lam_next" in state:  # LION's decay after the last step: in (0, 1), as the chunked form's log needs
            state["lam_next"] = torch.sigmoid(state["lam_next"])
    return inputs, state


def _weights(values, seed: int):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(v.shape, generator=generator, dtype=torch.float64) for v in values]


def _loss(outputs, weights) -> torch.Tensor:
    loss = torch.zeros((), dtype=torch.float64)
    for value, weight in zip(outputs, weights):
        part = value.real if value.is_complex() else value
        loss = loss + (torch.where(torch.isfinite(part), part, torch.zeros_like(part)) * weight).sum()
        if value.is_complex():
            loss = loss + (value.imag * weight.flip(-1)).sum()
    return loss


def _error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        got = torch.zeros_like(want) if got is None else got
        want = torch.zeros_like(got) if want is None else want
    both_inf = torch.isinf(got) & torch.isinf(want) & (got == want)
    got = torch.where(both_inf, torch.zeros_like(got), got)
    want = torch.where(both_inf, torch.zeros_like(want), want)
    scale = torch.clamp(want.abs(), min=1.0)
    difference = ((got - want).abs() / scale)
    if difference.numel() == 0:
        return 0.0
    value = float(difference.max())
    return value if value == value else float("inf")  # NaN is an error


def _run_case(case: Case, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from recdsl.distributed import SequenceParallel

    module = _module(case)
    inputs, state = _inputs(module, case)
    starts = [sum(case.lengths[:r]) for r in range(world)]
    begin, end = starts[rank], starts[rank] + case.lengths[rank]

    # The single-process run over the whole sequence.
    leaf_inputs = {n: v.clone().requires_grad_(True) for n, v in inputs.items()}
    leaf_state = None if state is None else {n: v.detach().clone().requires_grad_(bool(torch.isfinite(v).all())) for n, v in state.items()}
    if case.cu_seqlens:
        outputs, final = _one_by_one(module, leaf_inputs, leaf_state, case.cu_seqlens)
    else:
        outputs, final = module(**leaf_inputs, state=leaf_state, return_state=True)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    output_weights = _weights(outputs, 5)
    final_names = sorted(final)
    final_weights = _weights([final[k] for k in final_names], 6)
    counted = final_names if case.return_state else []
    read = slice(len(outputs) - 1, None) if case.last_output_only else slice(None)
    _loss(outputs[read] + [final[k] for k in counted], output_weights[read] + final_weights[: len(counted)]).backward()
    want = {
        "outputs": [o[:, begin:end].detach() for o in outputs],
        "final": {k: final[k].detach() for k in final_names},
        "input_grads": {n: None if v.grad is None else v.grad[:, begin:end] for n, v in leaf_inputs.items()},  # None: an input nothing reads
        "state_grads": {} if leaf_state is None else {n: v.grad for n, v in leaf_state.items()},
        "param_grads": {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in module.named_parameters()},
    }
    module.zero_grad(set_to_none=True)

    # The sharded run.
    from recdsl.distributed import Exchange

    parallel = SequenceParallel(module, group=_SEQUENCE_GROUP, exchange=None if case.exchange is None else Exchange[case.exchange])
    model = parallel
    if case.ddp:
        model = torch.nn.parallel.DistributedDataParallel(parallel)
    if case.fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        fully_shard(parallel, mesh=init_device_mesh("cpu", (world,)))
    local_inputs = {n: v[:, begin:end].clone().requires_grad_(True) for n, v in inputs.items()}
    # Every rank passes the whole state; a forward recurrence's entry is read on rank 0, a
    # reverse one's (its value after the last step) on the last rank.
    local_state = None
    if state is not None:
        local_state = {n: v.detach().clone().requires_grad_(bool(torch.isfinite(v).all())) for n, v in state.items()}
    reverse = set(module.cell.reversed_recurrences)
    reads_here = lambda name: rank == (world - 1 if name.split(".")[0] in reverse else 0)  # noqa: E731
    packed = {} if case.cu_seqlens is None else {"cu_seqlens": torch.tensor(case.cu_seqlens)}
    if case.return_state:
        got_outputs, got_final = model(**local_inputs, state=local_state, return_state=True, **packed)
    else:
        got_outputs, got_final = model(**local_inputs, state=local_state, **packed), {}
    got_outputs = list(got_outputs) if isinstance(got_outputs, tuple) else [got_outputs]
    # The final state enters the loss once, on the last rank; outputs with their slice of the weights.
    with_final = case.return_state and rank == world - 1
    pieces = got_outputs[read] + ([got_final[k] for k in final_names] if with_final else [])
    weights = [w[:, begin:end] for w in output_weights][read] + (final_weights if with_final else [])
    _loss(pieces, weights).backward()
    errors = {}
    for i, (g, w) in enumerate(zip(got_outputs, want["outputs"])):
        errors[f"output {i}"] = _error(g.detach(), w)
    if case.newton_iterations is not None:  # Newton's fixed point is the loop's, within its tolerance
        looped = _compile(case, backend="sequential").double()
        looped.load_state_dict(module.state_dict())
        with torch.no_grad():
            loop_outputs = _one_by_one(looped, inputs, state, case.cu_seqlens)[0] if case.cu_seqlens else looped(**inputs, state=state)
        loop_outputs = list(loop_outputs) if isinstance(loop_outputs, tuple) else [loop_outputs]
        for i, (g, w) in enumerate(zip(got_outputs, loop_outputs)):
            errors[f"output {i} against the sequential backend"] = _error(g.detach(), w[:, begin:end])
    for k in final_names if case.return_state else ():
        errors[f"final {k}"] = _error(got_final[k].detach(), want["final"][k])
    for n, v in local_inputs.items():
        errors[f"grad input {n}"] = _error(v.grad, want["input_grads"][n])
    for n, v in (local_state or {}).items():
        if v.requires_grad and case.cu_seqlens:  # each rank reads the rows of the sequences that begin in its slice
            grad = v.grad.clone() if v.grad is not None else torch.zeros_like(v)
            dist.all_reduce(grad)
            errors[f"grad state {n}"] = _error(grad, want["state_grads"][n])
        elif v.requires_grad and reads_here(n):
            errors[f"grad state {n}"] = _error(v.grad, want["state_grads"][n])
        elif v.requires_grad and v.grad is not None and bool((v.grad != 0).any()):
            errors[f"grad state {n} where it is not read"] = float("inf")
    for n, p in module.named_parameters():
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        if case.fsdp:
            grad = grad.full_tensor()  # FSDP keeps each rank's shard of the averaged gradient
        grad = grad.clone()
        if case.ddp or case.fsdp:
            grad = grad * world  # DDP and FSDP average the ranks' gradients
        else:
            dist.all_reduce(grad)
        errors[f"grad param {n}"] = _error(grad, want["param_grads"][n])
    sent = sum(b for _, _, b in parallel.last_exchange)
    if case.newton_iterations is None:
        planned = sum(e.elements for e in parallel.exchanges) * (1 if case.cu_seqlens else 2) * math.prod(case.heads) * 8  # B = 2 (packed: 1), float64
        if case.cu_seqlens:  # and the final states' rows, summed over the ranks
            planned += sum(v[0].numel() * (2 if v.is_complex() else 1) for v in want["final"].values()) * (len(case.cu_seqlens) - 1) * 8
        errors["bytes sent against the plan's summary sizes"] = 0.0 if sent == planned else float("inf")
    errors["_bytes"] = sent
    return errors


def _one_by_one(module, inputs, state, offsets):
    """A packed batch's reference: each sequence run alone, outputs concatenated along time, final states stacked."""
    outputs, finals = [], []
    for n, (begin, end) in enumerate(zip(offsets, offsets[1:])):
        start = None if state is None else {k: v[n : n + 1] for k, v in state.items()}
        got, final = module(**{k: v[:, begin:end] for k, v in inputs.items()}, state=start, return_state=True)
        outputs.append(list(got) if isinstance(got, tuple) else [got])
        finals.append(final)
    joined = [torch.cat([o[i] for o in outputs], 1) for i in range(len(outputs[0]))]
    return tuple(joined), {k: torch.cat([f[k] for f in finals], 0) for k in finals[0]}


_SEQUENCE_GROUP = None


def _worker(rank: int, world: int, store: str, cases: list[Case], out_dir: str) -> None:
    import torch.distributed as dist

    global _SEQUENCE_GROUP
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    _SEQUENCE_GROUP = dist.new_group(list(range(world)))
    results = {}
    for case in cases:
        if os.environ.get("RECDSL_SP_TRACE"):
            print(f"rank {rank}: {case.name}", file=sys.stderr, flush=True)
        try:
            results[case.name] = _run_case(case, rank, world)
        except Exception as error:  # noqa: BLE001 - reported per case
            results[case.name] = {"_error": f"{type(error).__name__}: {error}"}
            if os.environ.get("RECDSL_SP_TRACE"):
                import traceback

                traceback.print_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, cases: list[Case], tmp_path: Path, deadline: float = 600.0) -> dict[int, dict]:
    """Spawn ``world`` gloo ranks that run ``cases``; each rank's results by case name."""
    import torch.multiprocessing as mp

    store = tmp_path / "store"
    context = mp.start_processes(_worker, args=(world, str(store), cases, str(tmp_path)), nprocs=world, join=False, start_method="spawn")
    started = time.monotonic()
    while not context.join(timeout=5):
        if time.monotonic() - started > deadline:
            for process in context.processes:
                process.kill()
            raise AssertionError(f"the {world} ranks did not finish within {deadline} s")
    return {r: json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)}


def _check(results: dict[int, dict], cases: list[Case]) -> None:
    failures = []
    for case in cases:
        for rank, by_case in results.items():
            found = by_case[case.name]
            if "_error" in found:
                failures.append(f"{case.name} rank {rank}: {found['_error']}")
                continue
            for quantity, error in found.items():
                if not quantity.startswith("_") and not error <= TOLERANCE:
                    failures.append(f"{case.name} rank {rank}: {quantity} differs from the single-process run by {error:.3g} (tolerance {TOLERANCE})")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    cases = default_cases(2)
    return cases, run_world(2, cases, tmp_path_factory.mktemp("sp2"))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    cases = default_cases(4)
    return cases, run_world(4, cases, tmp_path_factory.mktemp("sp4"))


def test_two_ranks_equal_the_single_process_run(two_ranks):
    _check(two_ranks[1], two_ranks[0])


def test_four_ranks_equal_the_single_process_run(four_ranks):
    _check(four_ranks[1], four_ranks[0])


@pytest.mark.slow
def test_every_example_every_slicing(tmp_path):
    for world in (2, 4):
        cases = slow_cases(world)
        (tmp_path / str(world)).mkdir()
        _check(run_world(world, cases, tmp_path / str(world), deadline=1800.0), cases)


# ---- in this process: a group of one rank ---------------------------------------------------


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    import torch.distributed as dist

    if dist.is_initialized():  # pragma: no cover - another test left a group behind
        pytest.skip("a process group is already initialised in this process")
    store = tmp_path_factory.mktemp("sp1") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_one_rank_is_the_module_itself(one_rank):
    from recdsl.distributed import SequenceParallel

    module = _module(Case("mlstm", (5,), with_state=False))
    inputs, _ = _inputs(module, Case("mlstm", (5,), with_state=False))
    parallel = SequenceParallel(module)
    got, got_final = parallel(**inputs, return_state=True)
    want, want_final = module(**inputs, return_state=True)
    assert _error(got, want) <= TOLERANCE, "output of a one-rank group"
    for name in want_final:
        assert _error(got_final[name], want_final[name]) <= TOLERANCE, f"final state {name} of a one-rank group"
    # m first (C and n read it), then C and n in one all-gather.
    assert [names for names, _, _ in parallel.last_exchange] == [("m",), ("C", "n")]


def test_describe_names_each_summary_and_exchange(one_rank):
    from recdsl.distributed import Correction, Exchange, SequenceParallel

    gla = SequenceParallel(recdsl.compile(str(EXAMPLES / "gla.rec"), dk=64, dv=64))
    text = gla.describe(batch=1, heads=1)
    assert "S: chunked" in text
    assert "transition [64, 1] + state [64, 64] = 4160 numbers per batch row and head" in text
    assert "exchange: all-gather of every rank's summary" in text
    assert "q_t (D_t * S_in)" in text
    delta = SequenceParallel(recdsl.compile(str(EXAMPLES / "deltanet.rec"), dk=8, dv=4))
    assert delta.exchanges[0].correction is Correction.TRANSITION_READOUT
    assert "transition [8, 8] + state [8, 4]" in delta.describe()
    crf = SequenceParallel(recdsl.compile(str(EXAMPLES / "crf.rec"), n=5))
    assert crf.exchanges[0].correction is Correction.RECOMPUTE
    # 25 numbers of transition for a state of 5: a ring sends the state only.
    assert crf.exchanges[0].exchange is Exchange.RING and crf.exchanges[0].elements == 5
    assert "exchange: ring" in crf.describe()
    forced = SequenceParallel(recdsl.compile(str(EXAMPLES / "crf.rec"), n=5), exchange=Exchange.ALL_GATHER)
    assert forced.exchanges[0].exchange is Exchange.ALL_GATHER and forced.exchanges[0].elements == 30
    aaren = SequenceParallel(recdsl.compile(str(EXAMPLES / "aaren.rec"), d=3))
    assert aaren.exchanges[0].correction is Correction.MONOID_FOLD and aaren.exchanges[0].elements == 5


def test_native_summaries_are_described():
    """The gated delta rule, S @ q, previous-state read-outs and the convolution have summaries of their own."""
    from recdsl.distributed import Correction, Exchange, describe_exchanges, local_plan, plan_exchanges

    def planned(example, **dims):
        analysis = recdsl.compile(str(EXAMPLES / f"{example}.rec"), **dims).analysis
        (exchange,) = plan_exchanges(local_plan(analysis))
        return exchange, describe_exchanges(analysis, 4)

    gated, text = planned("gated_deltanet", dk=8, dv=8)
    assert gated.correction is Correction.TRANSITION_READOUT and gated.exchange is Exchange.ALL_GATHER
    assert "times the decays" in text and "transition [8, 8] + state [8, 8] = 128 numbers" in text
    ttt, text = planned("ttt_linear", dk=8, dv=16)  # W [dv, dk]: the kernel runs W^T, an 8 x 8 transition
    assert ttt.summary[0].shape == (8, 8) and "transposed state" in text
    rwkv, text = planned("rwkv6", dk=8, dv=4)
    assert rwkv.correction is Correction.PREVIOUS_DECAYED_READOUT and "transition [8, 1] + state [8, 4]" in text
    s4d, text = planned("s4d", d=4, N=3)
    # The length stands for decay^length: one number beside the complex [4, 3] state.
    assert s4d.correction is Correction.CONVOLUTION_READOUT and s4d.summary_elements == 1 + 2 * 12
    assert "length [1] + state [4, 3] complex = 25 numbers" in text
    assert "scan" not in text.split("\n")[1], "the convolution runs on the slices, not the fallback scan"


def test_newton_modules_run_each_iteration_sharded(one_rank, capsys):
    """A module compiled with backend="newton" is wrapped, not refused; a quasi-Newton solve gives gradients."""
    from recdsl.cli import main
    from recdsl.distributed import SequenceParallel

    assert main(["explain", "--sequence-parallel", "2", "--backend", "newton", "examples/paragru.rec", "--dim", "d_in=3", "--dim", "d=4"]) == 0
    assert "Newton's method (the newton backend) with each iteration's linear solve sharded" in capsys.readouterr().out

    gru = SequenceParallel(recdsl.compile(str(EXAMPLES / "gru.rec"), backend="newton", **DIMS["gru"]))
    text = gru.describe()
    assert "Newton's method" in text and "one all-gather per iteration" in text and "dense" in text
    case = Case("paralstm", (4,), with_state=False)
    module = recdsl.compile(str(EXAMPLES / "paralstm.rec"), backend="newton", backend_options={"jacobian": "diagonal"}, **DIMS["paralstm"]).double()
    inputs, _ = _inputs(module, case)
    quasi = SequenceParallel(module)
    with torch.no_grad():
        assert _error(quasi(**inputs), module(**inputs)) <= TOLERANCE, "quasi-Newton forward on a one-rank group"
    assert "adjoint passed along a ring" in quasi.describe()
    assert "adjoint passed along a ring" not in gru.describe(), "an exact dense Jacobian gathers its transposed product"
    wide = SequenceParallel(recdsl.compile(str(EXAMPLES / "gru.rec"), backend="newton", d_in=2, d=256))  # auto: the diagonal of a 256 x 256 block
    assert "solved diagonal" in wide.describe() and "adjoint passed along a ring" in wide.describe()
    leaves = {n: v.clone().requires_grad_(True) for n, v in inputs.items()}
    quasi(**leaves).square().sum().backward()
    direct = {n: v.clone().requires_grad_(True) for n, v in inputs.items()}
    module(**direct).square().sum().backward()
    for n in inputs:
        assert _error(leaves[n].grad, direct[n].grad) <= TOLERANCE, f"quasi-Newton gradient of {n} on a one-rank group"


def test_block_diagonal_summary_is_described(one_rank):
    from recdsl.distributed import Correction, SequenceParallel

    lrnn = SequenceParallel(recdsl.compile(str(EXAMPLES / "state_tracking_lrnn.rec"), **DIMS["state_tracking_lrnn"]))
    (planned,) = lrnn.exchanges
    assert planned.correction is Correction.RECOMPUTE
    assert "h: scan of the small blocks" in lrnn.describe()
    assert "the products of its" in lrnn.describe() and "step matrices and its final state from zero" in lrnn.describe()


def test_delays_are_time_parallel_with_the_previous_rank_last_value(one_rank):
    from recdsl.distributed import Correction, SequenceParallel

    source, dims = MATRIX_SCAN_CELLS["delays"]
    parallel = SequenceParallel(recdsl.compile(source, **dims))
    corrections = {e.names[0]: e.correction for e in parallel.exchanges}
    assert corrections["xp"] is corrections["xpp"] is corrections["lam"] is Correction.NONE


def test_a_nonlinear_reverse_cell_is_refused_when_wrapped(one_rank):
    from recdsl.distributed import SequenceParallel

    module = recdsl.compile(str(EXAMPLES / "bigru.rec"), **DIMS["bigru"])
    with pytest.raises(SequenceParallelError, match="cannot run sequence-parallel") as raised:
        SequenceParallel(module)
    assert "nonlinear" in str(raised.value), str(raised.value)
    assert isinstance(raised.value, recdsl.RecDSLError)


def test_a_nonlinear_reverse_cell_compiled_for_newton_runs_in_parts(one_rank, capsys):
    """BiGRU with backend="newton" is wrapped: h's solve runs forward over the ranks, g's from the last rank."""
    from recdsl.cli import main
    from recdsl.distributed import SequenceParallel

    module = recdsl.compile(str(EXAMPLES / "bigru.rec"), backend="newton", **DIMS["bigru"]).double()
    parallel = SequenceParallel(module)
    text = parallel.describe()
    assert "in the parts of its directed split" in text
    assert "part h (forward): ranks in order" in text and "part g (reverse): the slice flipped in time, ranks counted from the last" in text
    inputs, _ = _inputs(module, Case("bigru", (6,), with_state=False))
    with torch.no_grad():
        (h, g), final = parallel(**inputs, return_state=True)
        (want_h, want_g), want_final = module(**inputs, return_state=True)
    assert _error(g, want_g) <= TOLERANCE and _error(final["g"], want_final["g"]) <= TOLERANCE, "BiGRU's reverse state on a one-rank group"
    packed, _ = _inputs(module, Case("bigru", (6,), with_state=False, cu_seqlens=(0, 2, 6)))
    with torch.no_grad():
        (h, g), final = parallel(**packed, cu_seqlens=torch.tensor([0, 2, 6]), return_state=True)
        (want_h, want_g), want_final = _one_by_one(module, packed, None, (0, 2, 6))
    assert _error(g, want_g) <= TOLERANCE and _error(final["g"], want_final["g"]) <= TOLERANCE, "BiGRU packed on a one-rank group"
    mixed = SequenceParallel(_compile(reverse_newton_cases(2)[1], backend="newton"))  # delays and previous values read across the parts
    assert "slice edges: the value before a slice's first step of a_next, h, xp (7 numbers per batch row and head in all)" in mixed.describe()
    assert main(["explain", "--sequence-parallel", "4", "--backend", "newton", "examples/bigru.rec", "--dim", "d_in=3", "--dim", "d=4"]) == 0
    out = capsys.readouterr().out
    # Per part: a 4 x 4 product, the final correction and the last state (24 numbers), and 2, to 3 ranks, 4 bytes each.
    assert out.count("forward 312 per iteration, backward 288") == 2, out


def test_reverse_and_joint_summaries_are_described(one_rank):
    from recdsl.distributed import Correction, Exchange, SequenceParallel

    lion = SequenceParallel(recdsl.compile(str(EXAMPLES / "lion.rec"), dk=4, dv=3))
    directions = {e.names: e.direction for e in lion.exchanges}
    assert directions[("Sf",)] is ir.Direction.FORWARD and directions[("Sb",)] is directions[("lam_next",)] is ir.Direction.REVERSE
    text = lion.describe()
    assert "Sb: chunked" in text and "reverse: the summaries travel from the last rank to the first" in text
    titans = SequenceParallel(recdsl.compile(str(EXAMPLES / "titans.rec"), dk=4, dv=3))
    (joint,) = titans.exchanges
    assert joint.names == ("M", "W") and joint.correction is Correction.RECOMPUTE
    # One 8 x 8 joint block serves every column (shared), and the two [4, 3] states.
    assert [p.shape for p in joint.summary] == [(1, 8, 8), (4, 3), (4, 3)] and joint.state_count == 2
    assert joint.exchange is Exchange.RING and joint.elements == 24  # 64 numbers of transition for 24 of state
    assert "joint block of 8 x 8 step matrices of the stacked states (M, W)" in titans.describe()


@pytest.mark.parametrize("example", NONLINEAR_EXAMPLES)
def test_a_nonlinear_cell_is_refused_with_its_reason(one_rank, example):
    from recdsl.distributed import SequenceParallel

    module = recdsl.compile(str(EXAMPLES / f"{example}.rec"), **DIMS[example])
    with pytest.raises(SequenceParallelError) as raised:
        SequenceParallel(module)
    message = str(raised.value)
    assert "cannot run sequence-parallel" in message and ("nonlinear" in message or "coupled" in message), message
    assert isinstance(raised.value, recdsl.RecDSLError)


def test_only_compiled_modules_are_wrapped(one_rank):
    from recdsl.distributed import SequenceParallel

    with pytest.raises(SequenceParallelError, match="wraps a module made by recdsl.compile"):
        SequenceParallel(torch.nn.Linear(2, 2))


def test_explain_prints_the_exchange_without_a_process_group(capsys):
    from recdsl.cli import main

    assert main(["explain", "--sequence-parallel", "4", "examples/gla.rec", "--dim", "dk=8", "--dim", "dv=8"]) == 0
    out = capsys.readouterr().out
    assert "sequence parallel over 4 ranks: cell GLA" in out
    assert "transition [8, 1] + state [8, 8] = 72 numbers per batch row and head" in out
    # 72 numbers of 4 bytes reach the 3 other ranks forward; 3 rows of adjoints go back.
    assert "forward 864, backward 864" in out
    assert main(["explain", "--sequence-parallel", "2", "examples/gru.rec", "--dim", "d_in=3", "--dim", "d=4"]) == 1
    assert "cannot run sequence-parallel: state 'h' is nonlinear" in capsys.readouterr().err


def test_recurrences_that_do_not_read_each_other_share_an_exchange():
    from recdsl.distributed import exchange_groups

    mlstm = recdsl.compile(str(EXAMPLES / "mlstm.rec"), dk=4, dv=3)
    assert exchange_groups(mlstm.analysis) == [("m",), ("C", "n")]  # C and n decay by m
    gla = recdsl.compile(str(EXAMPLES / "gla.rec"), dk=4, dv=3)
    assert exchange_groups(gla.analysis) == [("S",)]


def test_packed_sequences_are_checked(one_rank):
    from recdsl.distributed import SequenceParallel

    aaren = _module(Case("aaren", (5,), with_state=False))
    inputs, _ = _inputs(aaren, Case("aaren", (5,), with_state=False, cu_seqlens=(0, 2, 5)))
    y, final = SequenceParallel(aaren)(**inputs, cu_seqlens=torch.tensor([0, 2, 5]), return_state=True)
    want, want_final = _one_by_one(aaren, inputs, None, (0, 2, 5))
    assert _error(y, want[0]) <= TOLERANCE, "packed monoid output of a one-rank group"
    assert all(_error(final[k], want_final[k]) <= TOLERANCE for k in want_final) and final["acc.n"].shape[0] == 2, "a monoid's final rows"
    packed, packed_final = aaren(**inputs, cu_seqlens=torch.tensor([0, 2, 5]), return_state=True)  # the module's own packed run
    assert _error(y, packed) <= TOLERANCE and all(_error(final[k], packed_final[k]) <= TOLERANCE for k in packed_final), "the module's packed run"
    gla = _module(Case("gla", (5,), with_state=False))
    inputs, _ = _inputs(gla, Case("gla", (5,), with_state=False, cu_seqlens=(0, 2, 5)))
    # The offsets are global: they must end at the sum of every rank's slice (here 5).
    with pytest.raises(recdsl.RecDSLError, match="cu_seqlens ends at 4"):
        SequenceParallel(gla)(**inputs, cu_seqlens=torch.tensor([0, 2, 4]))
    y, final = SequenceParallel(gla)(**inputs, cu_seqlens=torch.tensor([0, 2, 5]), return_state=True)
    want, want_final = _one_by_one(gla, inputs, None, (0, 2, 5))
    assert _error(y, want[0]) <= TOLERANCE, "packed output of a one-rank group"
    assert _error(final["S"], want_final["S"]) <= TOLERANCE and final["S"].shape[0] == 2, "one final row per sequence"


def test_summaries_pack_and_unpack_complex_parts_after_an_odd_count_of_reals():
    """A complex summary after an odd number of real ones sits at an odd offset of the flat
    buffer: unpacking it, and the gradient's way back, must not need a complex view of it
    (the slow matrix's S4D with packed sequences failed so)."""
    from recdsl.distributed import _pack, _unpack

    lead = (1,)  # B = 1, as packed sequences are
    real = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)  # 3 reals: the complex part starts at an odd offset
    wave = torch.randn(1, 4, dtype=torch.complex128, requires_grad=True)
    flat = _pack([real, wave], lead, torch.float64)
    assert flat.shape == (3 + 8,)
    got = _unpack(flat, [real, wave], lead)
    for before, after in zip((real, wave), got):
        assert after.dtype == before.dtype and torch.equal(after.detach(), before.detach())
    weights = torch.randn(1, 4, dtype=torch.complex128)
    (got[0].sum() + (got[1] * weights).real.sum()).backward()
    assert torch.equal(real.grad, torch.ones_like(real))
    assert torch.allclose(wave.grad, weights.conj())
