"""The Triton backend: generated scan kernels, loaded from a content-hashed file, with autograd.

For each recurrence the analysis classifies as diagonal affine (real or complex), affine
with a row/column/scalar decay, diagonal affine over a tropical semiring, or a declared
monoid whose combine is elementwise, :mod:`.triton_codegen` writes a kernel with the gate
math fused in.  The source is written to ``$RECDSL_CACHE_DIR`` (default
``~/.cache/recdsl/triton``) under its content hash and executed from memory under that
file's name, with ``linecache`` filled (:mod:`.kernel_cache`): Triton's ``@jit`` reads a
kernel's source through ``inspect``, so a bare ``exec`` would not do.

Gradients: a ``torch.autograd.Function`` per recurrence.  Its backward runs the generated
adjoint kernel (``g_t = dy_t + w_{t+1} g_{t+1}``, gates recomputed from the leaves, not
stored), which differentiates the gate math in registers and writes one gradient per leaf
(summed over the steps of each program for a leaf constant in time) and ``dL/dh_0``; the
leaves reach the kernel as views (:meth:`_Launch.leaf_views`), so torch's autograd sums
them over what they broadcast and carries them on to the projections.  Declared monoids
have a generated backward kernel too (:mod:`.triton_monoid`: the adjoint recurrence whose
transition is the combine's Jacobian, derived by the registry's rules); a combine the
kernel cannot differentiate falls back to torch's scan of the same combine under autograd.

On a CPU, kernels run in Triton's interpreter: set ``TRITON_INTERPRET=1`` before the first
kernel is loaded.  Triton is imported only when this backend runs.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import replace
from typing import Mapping

import torch

from recdsl import ir
from recdsl.analysis import Analysis, DiagonalAffine, MatrixAffine, NoRecurrence, Nonlinear, SemiringAffine, StateAnalysis, Structure
from recdsl.errors import BackendError
from recdsl.ir import Kind
from recdsl.plan import ChunkKind, ChunkPlan, ExecutionPlan, Form, Rejected, StepPlan, Unsupported, chunk_plan, scan_form, with_normaliser
from recdsl.printer import format_expr
from recdsl.shapes import broadcast_shapes, fold_constant

from . import kernel_cache, parallel, triton_selective
from .torch_ops import Evaluator, Numerics, align
from .triton_launch import launch as launch_kernel
from .triton_codegen import (
    FUSED_OPS,
    SplitPasses,
    Leaf,
    LeafGradient,
    ScanKind,
    ScanSpec,
    TimeSplit,
    find_leaves,
    generate,
    inline_parallel_bindings,
    single_element_carries,
    summary_backward_terms,
    summary_parts,
)
from .triton_codegen import Unsupported as Unsupportable
from .triton_monoid import monoid_adjoint

BLOCK_T = 32
BACKWARD_WARPS = 8  # num_warps of the backward kernels that write the leaves' gradients
BACKWARD_BLOCK_C = 32  # and their most state elements per program
MONOID_BACKWARD_BLOCK_C = 16  # state elements per program of the monoid backward kernels (.triton_monoid)
# and of their forward kernels: a combine of several carries scanned over [BT, 64] tiles took
# all 255 registers and spilled on sm_90 with bfloat16 leaves (Aaren, three carries)
MONOID_FORWARD_BLOCK_C = 32
BACKWARD_REGISTERS = 255  # and registers per thread (ptxas otherwise caps 8 warps at 128 on sm_90, and spills)


# ---- planning: which kernels, generated once at compile time ------------------------------


def _state_spec(analysis: Analysis, state: StateAnalysis) -> ScanSpec | Unsupported:
    recurrence = state.recurrence
    name = state.state
    comment = []
    update = analysis.cell.update(name)
    if update.span is not None:
        comment.append(f"line {update.span.line}: {name} = {format_expr(update.value)}")
    semiring = None
    match recurrence:
        case DiagonalAffine() | MatrixAffine(low_rank=()) if recurrence.decay is not None:
            kind = ScanKind.AFFINE
        case SemiringAffine(structure=Structure.DIAGONAL):
            kind = ScanKind.SEMIRING
            semiring = recurrence.semiring
        case _:
            return Unsupported(f"state '{name}' is {recurrence.name} with a {getattr(recurrence, 'structure', '')} transition, which has no Triton scan kernel here")
    terms = [recurrence.decay, recurrence.input]
    terms = [None if t is None else inline_parallel_bindings(t, analysis.cell, analysis.time_parallel) for t in terms]
    comment.append(f"decay: {format_expr(terms[0])}")
    comment.append(f"input: {format_expr(terms[1]) if terms[1] is not None else 'none'}")
    leaves = find_leaves([t for t in terms if t is not None])
    if any(leaf.type.kind is Kind.BOOL for leaf in leaves):
        return Unsupported("a boolean leaf")
    return ScanSpec(
        name=_identifier(name),
        kind=kind,
        is_complex=state.type.kind is Kind.COMPLEX,
        terms=tuple(terms),
        leaves=tuple(Leaf(expr, f"l{i}") for i, expr in enumerate(leaves)),
        comment=tuple(comment),
        semiring=semiring,
    )


def _scan_spec(analysis: Analysis, scan: ir.ScanAssign) -> ScanSpec | Unsupported:
    monoid = scan.monoid
    identities = []
    for carry in monoid.carries:
        if carry.type.kind is not Kind.REAL:
            return Unsupported(f"monoid {monoid.name}: the Triton kernel needs real carries")
        value = fold_constant(carry.identity)
        if not isinstance(value, (int, float)):
            return Unsupported(f"monoid {monoid.name}: the identity of carry '{carry.name}' is not one real number")
        identities.append(float(value))
    for assign in monoid.body:
        for node in ir.walk(assign.value):
            if isinstance(node, ir.Op) and node.op not in FUSED_OPS:
                return Unsupported(f"monoid {monoid.name}: its combine uses '{node.op}', not elementwise")
    if broadcast_shapes(*(c.type.shape for c in monoid.carries)) is None:
        return Unsupported(f"monoid {monoid.name}: its carries do not broadcast to one shape")
    lifts = [inline_parallel_bindings(lift, analysis.cell, analysis.time_parallel) for lift in scan.lifts]
    leaves = find_leaves(lifts)
    comment = [f"line {scan.span.line}: {scan.name} = scan {monoid.name}(...)" if scan.span else f"scan {monoid.name}"]
    try:
        adjoint = monoid_adjoint(monoid, tuple(lifts))
    except Unsupportable as reason:  # the backward differentiates torch's scan of the combine instead
        adjoint = None
        comment.append(f"backward: torch's scan of the combine, differentiated by autograd ({reason})")
    return ScanSpec(
        name=_identifier(scan.name),
        kind=ScanKind.MONOID,
        is_complex=False,
        terms=tuple(lifts),
        leaves=tuple(Leaf(expr, f"l{i}") for i, expr in enumerate(leaves)),
        comment=tuple(comment),
        monoid=monoid,
        identities=tuple(identities),
        adjoint=adjoint,
    )


def _triton_chunk(analysis: Analysis, state: StateAnalysis) -> ChunkPlan | Unsupported:
    """The chunk plan of a matrix state the Triton chunked kernels run: one input term, one decay per state or per key row."""
    chunk = chunk_plan(analysis, state)
    if isinstance(chunk, Unsupported):
        return chunk
    if chunk.kind in (ChunkKind.DELTA_RULE, ChunkKind.GATED_DELTA_RULE):
        return _triton_delta_chunk(chunk, state)
    if chunk.kind is not ChunkKind.DECAYED_OUTER_PRODUCTS:
        return Unsupported(f"no Triton kernel for the {chunk.kind} yet")
    if len(chunk.inputs) != 1:
        return Unsupported("the Triton chunked kernels take one outer product per step")
    if chunk.reads_previous:
        return Unsupported("an output reads its previous value, which the Triton chunked kernels do not read out")
    structure = state.recurrence.structure
    key_rows = Structure.COLUMNS if chunk.transposed else Structure.ROWS
    if structure is not Structure.SCALAR and structure is not key_rows:
        return Unsupported("its decay is shared along the read-out's axis, which the Triton kernels do not tile")
    chunk = parallel.with_skip_term(chunk, analysis.expanded_outputs)  # Mamba-2's D x: added in the kernels
    chunk = with_normaliser(chunk, analysis)  # mLSTM's n: carried in the walk, the division fused
    return parallel.with_row_scale_folded(chunk, analysis.cell)  # mLSTM's k / sqrt(dk): k read in place


def _triton_delta_chunk(chunk: ChunkPlan, state: StateAnalysis) -> ChunkPlan | Unsupported:
    """A (gated) delta rule's chunk plan, when the kernels of :mod:`.triton_delta` take it:
    read-outs of the updated state and at most 128 key rows (two halves of 64 in registers)."""
    if chunk.reads_previous:
        return Unsupported("an output reads its previous value, which the Triton delta-rule kernels do not read out")
    keys = state.type.shape[1] if chunk.transposed else state.type.shape[0]
    if keys > 128:
        return Unsupported(f"its state has {keys} key rows; the Triton delta-rule kernels hold at most 128 in registers")
    return chunk


def _identifier(name: str) -> str:
    return name.replace(".", "_")


def plan_kernels(analysis: Analysis, options) -> tuple[tuple[StepPlan, ...], str] | Unsupported:
    """The Triton backend's steps for ``analysis``'s cell and the module source they need, or why it cannot run it.

    Each recurrence gets a generated scan kernel (gate math fused), except matrix states
    read out linearly, which run in the chunked kernels of :mod:`.triton_chunk`.  The
    source is generated here, once, and stored in the plan.
    """
    for group in analysis.coupled_groups:
        return Unsupported(f"states {', '.join(group)} are coupled (each reads the other), so they can only run step by step")
    scans = {s.name: s for s in analysis.cell.scans}
    steps: list[StepPlan] = []
    specs: list[ScanSpec] = []
    selective_plans: list = []  # fused selective scans (S6), from .triton_selective
    split = time_split(options)
    # The fused selective scans' and chunked states' plans first: a normaliser a chunked state
    # carries (mLSTM's n) needs no step of its own.
    selectives: dict[str, object] = {}
    chunks: dict[str, ChunkPlan | Unsupported] = {}
    for (name,) in analysis.schedule:
        state = None if name in scans else analysis.state(name)
        if state is not None and not isinstance(state.recurrence, (Nonlinear, NoRecurrence)):
            selectives[name] = triton_selective.selective_plan(analysis, state)
            if not isinstance(selectives[name], triton_selective.SelectiveScanPlan):
                chunks[name] = _triton_chunk(analysis, state)
    carried = {chunk.normaliser.state: name for name, chunk in chunks.items() if isinstance(chunk, ChunkPlan) and chunk.normaliser is not None}
    for (name,) in analysis.schedule:
        if name in scans and scans[name].reverse:
            # Solved in reversed time, the generated kernel would combine the elements in the
            # opposite order; the torch prefix scan swaps its operands (monoids need not commute).
            note = Rejected(Form.TRITON_SCAN, "a reverse scan: the generated kernel combines only in forward order")
            steps.append(StepPlan((name,), Form.MONOID_SCAN, rejected=(note,)))
            continue
        if name in scans:
            spec = _scan_spec(analysis, scans[name])
            if isinstance(spec, Unsupported):
                return spec
            spec = replace(spec, split=split)
            steps.append(StepPlan((name,), Form.TRITON_SCAN, kernel=spec))
            specs.append(spec)
            continue
        state = analysis.state(name)
        if isinstance(state.recurrence, Nonlinear):
            return Unsupported(f"state '{name}' is nonlinear: {state.recurrence.reason}")
        if isinstance(state.recurrence, NoRecurrence):
            steps.append(StepPlan((name,), Form.TIME_PARALLEL))
            continue
        if name in carried:
            # Run by the chunked step of the state it normalises; the fallback, when that step's
            # kernels refuse a call's pieces, beside that state's.
            fallback = scan_form(state)
            steps.append(StepPlan((name,), Form.NORMALISER, fallback=fallback if isinstance(fallback, Form) else None))
            continue
        selective = selectives[name]
        if isinstance(selective, triton_selective.SelectiveScanPlan):
            fallback = scan_form(state)
            steps.append(StepPlan((name,), Form.TRITON_SELECTIVE_SCAN, kernel=selective, fallback=fallback if isinstance(fallback, Form) else None))
            selective_plans.append(selective)
            continue
        chunk = chunks[name]
        if isinstance(chunk, ChunkPlan):
            fallback = scan_form(state)
            steps.append(StepPlan((name,), Form.TRITON_CHUNKED, chunk=chunk, fallback=fallback if isinstance(fallback, Form) else None))
            continue
        spec = _state_spec(analysis, state)
        if isinstance(spec, Unsupported):
            planned = chunk_plan(analysis, state)
            if isinstance(planned, ChunkPlan) and planned.kind in (ChunkKind.DELTA_RULE, ChunkKind.GATED_DELTA_RULE):
                return chunk  # a delta rule has no scan kernel: the delta-rule kernels' reason is the one to give
            return spec
        spec = replace(spec, split=split)
        steps.append(StepPlan((name,), Form.TRITON_SCAN, kernel=spec, rejected=(Rejected(Form.TRITON_CHUNKED, chunk.reason),)))
        specs.append(spec)
    try:
        source = generate(specs, None, analysis.cell)
        if selective_plans:
            source += "\n\n" + triton_selective.generate(selective_plans)
    except Unsupportable as reason:
        return Unsupported(str(reason))
    return tuple(steps), source


def time_split(options) -> TimeSplit:
    """When the scan kernels split T across programs: ``compile(backend="triton",
    backend_options={"split_programs": P, "split_min_steps": S})`` (defaults: 4 x 132
    programs, chunks of at least 128 steps; ``split_programs=0`` never splits)."""
    given = dict(options.backend_options)
    default = TimeSplit()
    values = {"split_programs": given.get("split_programs", default.target_programs), "split_min_steps": given.get("split_min_steps", default.min_chunk_steps)}
    for key, value in values.items():
        lowest = 0 if key == "split_programs" else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise BackendError(f"backend option '{key}' is {value!r}", expected=f"an integer of at least {lowest}")
    return TimeSplit(target_programs=values["split_programs"], min_chunk_steps=values["split_min_steps"])


def emit(plan: ExecutionPlan | Analysis, filename: str | None = None) -> str:
    """The generated Triton source of a Triton plan (or of an analysed cell), as ``recdsl emit`` prints it."""
    if isinstance(plan, Analysis):
        from recdsl.plan import plan as make_plan

        plan = make_plan(plan, "triton")
    assert plan.kernel_source is not None
    source = plan.kernel_source
    if filename:
        first, rest = source.split("\n", 1)
        source = first.replace("<string>", filename) + "\n" + rest
    chunked = sorted((step.name, step.chunk) for step in plan.steps if step.form is Form.TRITON_CHUNKED)
    if chunked:
        delta = (ChunkKind.DELTA_RULE, ChunkKind.GATED_DELTA_RULE)
        notes = "".join(
            f"# {name}: a matrix state read out linearly; it runs in the chunked kernels of recdsl/backends/triton_delta.py "
            f"(delta_chunks: the {chunk.kind}'s UT transform inside the walk over the chunks), never stored per step.\n"
            if chunk is not None and chunk.kind in delta else
            f"# {name}: a matrix state read out linearly; it runs in the chunked kernels of recdsl/backends/triton_chunk.py "
            f"(walk_outputs, chunk_outputs; backward walk_state_grads, chunk_key_grads, chunk_value_grads), never stored per step.\n"
            for name, chunk in chunked
        ) + "".join(
            f"# {chunk.normaliser.state}: the normaliser of {name}'s read-out, carried in {name}'s walk over the chunks "
            f"(a column of ones beside its values; the division by max(|q @ {chunk.normaliser.state}|, floor) in the kernels), never stored per step.\n"
            for name, chunk in chunked
            if chunk is not None and chunk.normaliser is not None
        )
        first, rest = source.split("\n", 1)
        source = first + "\n" + notes + rest
    return source


# ---- loading ---------------------------------------------------------------------------------


# The cache itself (safe loading, locking, permissions) lives in .kernel_cache.
cache_dir = kernel_cache.cache_dir


def load_generated(source: str):
    """The module ``source`` defines, cached under its content hash (see :mod:`.kernel_cache`)."""
    # triton.jit picks the interpreter when the module is executed: keep one module per mode.
    return kernel_cache.load_generated(source, "interpreted" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled")


# ---- running ---------------------------------------------------------------------------------


def _check_device(device: torch.device) -> None:
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(
            "the Triton backend got CPU tensors, and Triton runs on a GPU",
            expected="CUDA tensors, or TRITON_INTERPRET=1 in the environment to run the kernels in Triton's interpreter",
        )


def _accumulator(numerics: Numerics):
    import triton.language as tl

    return tl.float64 if numerics.real == torch.float64 else tl.float32


def _block_c(channels: int) -> int:
    size, limit = 1, min(channels, 64)
    while size < limit:
        size *= 2
    return size


def _to_ntc(value: torch.Tensor, lead: tuple[int, ...], state_shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, T, *heads, *s]`` (s broadcasting to the state's shape) as ``[N, T, C]``."""
    value = value.expand(lead + state_shape)
    moved = value.movedim(1, len(lead) - 1)  # [B, *heads, T, *S]
    steps = lead[1]
    return moved.reshape(-1, steps, max(1, _numel(state_shape)))


def _to_bhtc(value: torch.Tensor, lead: tuple[int, ...], state_shape: tuple[int, ...]) -> torch.Tensor:
    """``[B, T, *heads, *s]`` as ``[B, H, T, C]``: a view with the leaf's own strides where torch can
    merge the head dims and the state dims (stride 0 where they broadcast), else a copy.

    Batch and heads stay two axes (with their own strides) because ``[B, T, H, C]`` memory
    cannot be addressed with one row stride over ``B * H``: merging them would copy.
    """
    value = value.expand(lead + state_shape)
    moved = value.movedim(1, len(lead) - 1)  # [B, *heads, T, *S]
    return moved.reshape(lead[0], _numel(lead[2:]), lead[1], max(1, _numel(state_shape)))


def _numel(shape: tuple[int, ...]) -> int:
    total = 1
    for n in shape:
        total *= n
    return total


def _leaf_arguments(leaves: list[torch.Tensor], specs: tuple[Leaf, ...]) -> list:
    arguments: list = []
    for tensor, leaf in zip(leaves, specs):
        if leaf.is_complex:
            pair = torch.view_as_real(tensor)
            parts = [pair[..., 0], pair[..., 1]]
        else:
            parts = [tensor]
        arguments += parts
        # [B, H, T, C] strides, 0 along axes of size 1 (they broadcast).
        arguments += [stride if size > 1 else 0 for size, stride in zip(tensor.shape, parts[0].stride())]
    return arguments


def _needs_graph(*tensors) -> bool:
    """Whether a kernel call on ``tensors`` (tensors, or lists of them) must be recorded for
    autograd: grad mode on and some tensor requiring a gradient."""
    if not torch.is_grad_enabled():
        return False
    for value in tensors:
        if isinstance(value, torch.Tensor):
            if value.requires_grad:
                return True
        elif any(t.requires_grad for t in value):
            return True
    return False


def _contiguous_as(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``value.to(dtype).contiguous()``, without the dispatches where it already is."""
    if value.dtype != dtype:
        value = value.to(dtype)
    return value if value.is_contiguous() else value.contiguous()


def _complex_parts(value: torch.Tensor) -> list[torch.Tensor]:
    """A complex ``[N, (T,) C]`` tensor's real and imaginary parts as the scan kernels address
    them: strided views of the one buffer (contiguous first, a no-op when it is)."""
    pair = torch.view_as_real(value.contiguous())
    return [pair[..., 0], pair[..., 1]]


def _leaf_subset(arguments: list, specs: tuple[Leaf, ...], keep: list[int]) -> list:
    """The kernel arguments (:func:`_leaf_arguments`) of the leaves at positions ``keep``."""
    result, start = [], 0
    for i, leaf in enumerate(specs):
        count = (2 if leaf.is_complex else 1) + 4
        if i in keep:
            result.extend(arguments[start:start + count])
        start += count
    return result


class _Launch:
    """Everything a kernel call needs, shared by the forward and backward passes."""

    def __init__(self, plan: ExecutionPlan, spec: ScanSpec, seq, state_type: ir.Type) -> None:
        self.plan = plan
        self.spec = spec
        self.seq = seq
        self.state_type = state_type
        self.lead = seq.lead
        self.channels = max(1, _numel(state_type.shape))
        self.rows = _numel((self.lead[0],) + self.lead[2:])
        self.heads = _numel(self.lead[2:])  # rows are (batch, heads) pairs: i_n = b * heads + h
        self.steps = self.lead[1]
        self.blocks = -(-self.steps // BLOCK_T)  # blocks of BT steps, counted on the host
        self._block = _block_c(self.channels)
        self._chunk_steps: tuple[int | None] | None = None  # chunk_steps(), found once per call
        self._accumulator = None
        self._module = None

    def module(self):
        """The generated kernels, loaded once per process from the plan's source (whose hash the
        plan holds); looked up once per call, the backward reusing the forward's."""
        if self._module is None:
            self._module = load_generated(self.plan.kernel_source)
        return self._module

    def leaf_values(self) -> list[torch.Tensor]:
        """Each leaf's value over the whole sequence, as torch computes it (declared shapes);
        a bfloat16/float16 input or param as it is (the kernels convert it as they load it)."""
        return [self.seq.operand(leaf.expr) for leaf in self.spec.leaves]

    def ntc(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The leaves as the kernel addresses them: ``[B, H, T, C]``, views where torch can (stride 0 where they broadcast)."""
        return [_to_bhtc(self.seq.full(v, leaf.expr.type, self.state_type), self.lead, self.state_type.shape) for v, leaf in zip(leaves, self.spec.leaves)]

    def leaf_views(self, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
        """The leaves as the recurrence kernels read them: ``[B', H', T', C]`` views, each of
        ``B'``, ``H'``, ``T'`` the full size where the leaf varies along it and 1 where it does
        not (a parameter is ``[1, 1, 1, C]``), so that the backward kernel can sum a leaf
        constant in time over each program's steps, and autograd sums over the rest."""
        return [self._leaf_view(value, leaf) for value, leaf in zip(leaves, self.spec.leaves)]

    def _leaf_view(self, value: torch.Tensor, leaf: Leaf) -> torch.Tensor:
        rank, lead, shape = leaf.expr.type.rank, self.lead, self.state_type.shape
        dims = value.dim()
        if dims == rank:  # params and consts: no leading dims
            value = value.reshape((1,) * (len(lead) + len(shape) - rank) + tuple(value.shape))
        elif rank < len(shape):
            value = align(value, rank, len(shape))
        sizes = value.shape
        keep = [size if sizes[i] != 1 else 1 for i, size in enumerate(lead)]
        if any(k != 1 for k in keep[2:]):
            keep[2:] = lead[2:]  # the kernel has one head stride: all head dims, or none
        # Each view below is skipped where it would change nothing: under autograd every
        # view op is a node, forward and backward.
        target = tuple(keep) + shape
        if sizes != target:
            value = value.expand(target)
        if len(lead) > 2:
            value = value.movedim(1, len(lead) - 1)  # [b, *heads, t, *S]
        viewed = (keep[0], _numel(keep[2:]), keep[1], self.channels)
        return value if value.shape == viewed else value.reshape(viewed)

    def block_c(self, backward: bool = False) -> int:
        """``BC``: state elements per program; the backward kernels take at most 32 (registers, below)."""
        block = self._block
        if backward:
            return min(block, BACKWARD_BLOCK_C)
        return min(block, MONOID_FORWARD_BLOCK_C) if self.spec.kind is ScanKind.MONOID else block

    def grid(self, backward: bool = False):
        return (self.rows, -(-self.channels // self.block_c(backward)))

    def constants(self, backward: bool = False) -> dict:
        if self._accumulator is None:
            self._accumulator = _accumulator(self.seq.numerics)
        return dict(BT=BLOCK_T, BC=self.block_c(backward), ACC=self._accumulator)

    def chunk_steps(self) -> int | None:
        """This call's steps per chunk of T when the plan's :class:`TimeSplit` splits it, else None."""
        if self._chunk_steps is None:
            rows, blocks = self.grid()
            self._chunk_steps = (self.spec.split.chunk_steps(rows * blocks, self.steps, BLOCK_T),)
        return self._chunk_steps[0]

    def chunk_count(self) -> int:
        """How many chunks of T this call's scans run in (1: one pass)."""
        length = self.chunk_steps()
        if length is not None and self.spec.split_passes is SplitPasses.LOOK_BACK:
            return self.blocks  # one program per block of BLOCK_T steps
        return 1 if length is None else -(-self.steps // length)

    def scan(self, backward: bool, inputs: list, outputs: list, leaf_arguments: list, modes: dict | None = None) -> None:
        """Run the forward (or adjoint) scan: one kernel, or, when the call's rows and blocks
        of state elements are too few programs for the device, T split across programs.

        ``inputs``: the initial state's parts (backward: also the states' and the output
        gradients' parts); ``outputs``: the states' parts (backward: ``dL/dh_0``'s parts, then
        each leaf's gradient parts, written as ``modes`` says: :class:`LeafGradient` per leaf).

        Split, the third launch reads every chunk's inputs again (the leaves, or ``dy``,
        the states and the leaves) rather than the first storing local results for it to
        correct: for ``h = a * h + b`` in float32, recomputing moves 8 + 12 = 20 bytes per
        element, storing the chunk-local states and cumulative decays and correcting them
        8 + 8 + 8 + 4 = 28; gates fused in the kernel are recomputed either way.
        """
        spec = self.spec
        module = self.module()
        stem = f"backward_{spec.name}" if backward else f"forward_{spec.name}"
        length = self.chunk_steps()
        sizes = (self.steps, self.channels, self.heads)
        # The backward kernels hold the gates at t and t + 1, the adjoint scan and the chain
        # rule's temporaries: blocks of 32 state elements over eight warps take a quarter of the
        # registers per thread of the forward's [32, 64] over four (which spill on sm_90 for the
        # complex LRU's backward), and up to 255 registers each (ptxas would cap eight warps at
        # 128 on sm_90 and spill RG-LRU's).  Compiled for sm_80/sm_90: 120-210 registers, no spills.
        gradient_modes = dict(modes or {}, num_warps=BACKWARD_WARPS, maxnreg=BACKWARD_REGISTERS) if backward else {}
        if length is None:
            launch_kernel(getattr(module, stem), self.grid(backward), *inputs, *outputs, *leaf_arguments, *sizes, self.blocks, **self.constants(backward), **gradient_modes)
            return
        if spec.split_passes is SplitPasses.LOOK_BACK:
            self._look_back(module, backward, inputs, outputs, leaf_arguments, gradient_modes)
            return
        chunks = -(-self.steps // length)
        grid = self.grid(backward) + (chunks,)
        shape = (self.rows, chunks, self.channels)
        device = outputs[0].device
        dtype = self.seq.numerics.real
        sums = [torch.empty(shape, dtype=dtype, device=device) for _ in range(summary_parts(spec))]
        carried = [torch.empty(shape, dtype=dtype, device=device) for _ in range(len(inputs) if not backward else (2 if spec.is_complex else 1))]
        per_chunk = (*sizes, length, -(-length // BLOCK_T), chunks)
        constants = self.constants(backward)
        if backward:
            # The fold reads dy (semiring: and the states) and the leaves of w_{t+1} only.
            read = [i for i, leaf in enumerate(spec.leaves) if leaf in spec.leaves_of(summary_backward_terms(spec))]
            parts = 2 if spec.is_complex else 1
            folded = inputs[parts:] if spec.kind is ScanKind.SEMIRING else inputs[2 * parts:]
            launch_kernel(getattr(module, f"summarize_backward_{spec.name}"), grid, *folded, *sums, *_leaf_subset(leaf_arguments, spec.leaves, read), *per_chunk, **constants)
            launch_kernel(getattr(module, f"carries_backward_{spec.name}"), self.grid(backward), *sums, *carried, self.channels, chunks, BC=constants["BC"], ACC=constants["ACC"])
        else:
            launch_kernel(getattr(module, f"summarize_{spec.name}"), grid, *sums, *leaf_arguments, *per_chunk, **constants)
            launch_kernel(getattr(module, f"carries_{spec.name}"), self.grid(), *inputs, *sums, *carried, self.channels, chunks, BC=constants["BC"], ACC=constants["ACC"])
            inputs = []
        launch_kernel(getattr(module, f"{stem}_chunks"), grid, *carried, *inputs, *outputs, *leaf_arguments, *per_chunk, **constants, **gradient_modes)


    def _look_back(self, module, backward: bool, inputs: list, outputs: list, leaf_arguments: list, gradient_modes: dict) -> None:
        """An affine scan (or its adjoint) with T split into blocks of ``BLOCK_T`` steps, in one
        pass (:func:`.triton_codegen.emit_look_back`): each input read once, each output
        written once, plus each block's fold and end value (``[N, blocks of T, C]``)."""
        spec = self.spec
        rows, blocks = self.grid(backward)
        chunks = self.blocks
        device = outputs[0].device
        dtype = self.seq.numerics.real
        parts = 2 if spec.is_complex else 1
        folds = [torch.empty((self.rows, chunks, self.channels), dtype=dtype, device=device) for _ in range(2 * parts)]
        ends = [torch.empty((self.rows, chunks, self.channels), dtype=dtype, device=device) for _ in range(parts)]
        flags = torch.zeros((self.rows, blocks, chunks), dtype=torch.int32, device=device)
        ticket = torch.zeros((1,), dtype=torch.int32, device=device)
        sizes = (self.steps, self.channels, self.heads, rows * blocks, blocks, chunks)
        grid = (rows * blocks * chunks,)
        if backward:
            kernel = getattr(module, f"backward_{spec.name}_look_back")
            launch_kernel(kernel, grid, *folds, *ends, flags, ticket, *inputs, *outputs, *leaf_arguments, *sizes, **self.constants(backward), **gradient_modes)
        else:
            kernel = getattr(module, f"forward_{spec.name}_look_back")
            launch_kernel(kernel, grid, *inputs, *outputs, *leaf_arguments, *folds, *ends, flags, ticket, *sizes, **self.constants())


def _leaf_gradient_buffers(launch: "_Launch", leaves, wanted: list[bool], dtype: torch.dtype, chunks: int, lanes: int | None = None) -> tuple[dict, list, list]:
    """Where a backward kernel writes each leaf's gradient: ``(modes, buffers, arguments)``.

    Per step where the leaf's view varies in time, in the leaf's own layout (``empty_like``
    keeps a dense view's strides; written in full where it broadcasts over batch or heads, and
    summed by the caller); each program's sum over its steps (``[B, H, chunks, C]``) for a leaf
    constant in time; with ``lanes`` (the monoid kernels' channel blocks), each program's sum
    over its lanes (``[B, H, T, lanes]``) for a per-step leaf of one element (Aaren's score);
    a placeholder where none is wanted.  ``arguments``: each buffer (complex ones as their real
    and imaginary parts) and its four strides, as the kernels take them.
    """
    modes, buffers, arguments = {}, [], []
    whole = (launch.lead[0], launch.heads)
    for view, leaf, needed in zip(leaves, launch.spec.leaves, wanted):
        complex_leaf = leaf.is_complex
        kind = launch.seq.numerics.complex if complex_leaf else dtype
        shape = view.shape
        if not needed:
            mode, buffer = LeafGradient.NONE, torch.empty((1, 1, 1, 1), dtype=kind, device=view.device)
        elif lanes is not None and shape[2] == launch.steps and shape[3] == 1 < launch.channels:
            mode, buffer = LeafGradient.SUMMED_OVER_LANES, torch.empty(whole + (launch.steps, lanes), dtype=kind, device=view.device)
        elif shape[2] == launch.steps:
            if shape[:2] == whole:
                mode, buffer = LeafGradient.PER_STEP, torch.empty_like(view, dtype=kind)
            else:  # broadcast over batch or heads: written in full, summed by the caller
                mode, buffer = LeafGradient.PER_STEP, torch.empty(whole + (launch.steps, launch.channels), dtype=kind, device=view.device)
        else:
            mode, buffer = LeafGradient.SUMMED_OVER_TIME, torch.empty(whole + (chunks, launch.channels), dtype=kind, device=view.device)
        modes[f"G_{leaf.name}"] = mode.value
        buffers.append(buffer)
        if complex_leaf:
            pair = torch.view_as_real(buffer)
            arguments += (pair[..., 0], pair[..., 1])
            arguments += pair[..., 0].stride() if mode is not LeafGradient.NONE else (0, 0, 0, 0)
        else:
            arguments.append(buffer)
            arguments += buffer.stride() if mode is not LeafGradient.NONE else (0, 0, 0, 0)
    return modes, buffers, arguments


def _leaf_gradients(views, leaves: tuple[Leaf, ...], buffers: list[torch.Tensor], modes: dict) -> list[torch.Tensor | None]:
    """Each leaf view's gradient from what the backward kernel wrote into ``buffers`` (as
    :func:`_leaf_gradient_buffers` laid them out): summed over a constant leaf's programs, over
    a one-element leaf's lanes (the monoid kernels) and over what the view broadcasts, in the
    view's dtype; None where none was wanted."""
    grads: list[torch.Tensor | None] = []
    for view, leaf, grad in zip(views, leaves, buffers):
        mode = LeafGradient(modes[f"G_{leaf.name}"])
        if mode is LeafGradient.NONE:
            grads.append(None)
            continue
        if mode is LeafGradient.SUMMED_OVER_TIME:
            grad = grad.sum(2, keepdim=True)
        elif mode is LeafGradient.SUMMED_OVER_LANES:
            grad = grad.sum(3, keepdim=True)
        if grad.shape != view.shape:
            grad = grad.sum_to_size(view.shape)
        grads.append(grad if grad.dtype == view.dtype else grad.to(view.dtype))
    return grads


class _RecurrenceScan(torch.autograd.Function):
    """An affine or semiring recurrence solved by its generated kernels.

    ``leaves`` are the kernel's views of the leaves (:meth:`_Launch.leaf_views`), so that
    torch's autograd carries their gradients back through the views (summing over what
    they broadcast) and on to whatever computed the leaves.  The backward kernel writes one
    gradient per leaf (the gate math differentiated in the kernel) and ``dL/dh_0``.
    """

    @staticmethod
    def run(launch: _Launch, initial: torch.Tensor, leaves) -> tuple[torch.Tensor, torch.Tensor]:
        """The forward kernel's states ``[N, T, C]`` and the initial state as it read it (``[N, C]``,
        contiguous, in the states' dtype): the forward pass, and the whole call where no
        gradient is wanted (no ``autograd.Function`` then: :meth:`TritonSolver.kernel_recurrence`)."""
        spec = launch.spec
        start = initial.reshape(launch.rows, launch.channels)
        dtype = launch.seq.numerics.complex if spec.is_complex else launch.seq.numerics.real
        start = _contiguous_as(start, dtype)
        states = torch.empty(launch.rows, launch.steps, launch.channels, dtype=dtype, device=start.device)
        if spec.is_complex:
            # The kernels read and write complex values in place, (re, im) interleaved
            # (triton_codegen._in_state_layout): the parts are strided views, not copies.
            launch.scan(False, _complex_parts(start), _complex_parts(states), _leaf_arguments(leaves, spec.leaves))
        else:
            launch.scan(False, [start], [states], _leaf_arguments(leaves, spec.leaves))
        return states, start

    @staticmethod
    def forward(ctx, launch: _Launch, initial: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        states, start = _RecurrenceScan.run(launch, initial, leaves)
        ctx.launch = launch
        ctx.initial = (initial.shape, initial.dtype, initial.is_complex())  # its gradient's layout
        ctx.save_for_backward(start, states, *leaves)
        return states

    @staticmethod
    def backward(ctx, grad_states: torch.Tensor):
        launch: _Launch = ctx.launch
        start, states, *leaves = ctx.saved_tensors
        spec = launch.spec
        dtype = launch.seq.numerics.real
        device = states.device
        if not grad_states.is_contiguous():
            grad_states = grad_states.contiguous()
        chunks = launch.chunk_count()
        needs = ctx.needs_input_grad
        wanted = [needs[2 + i] for i in range(len(leaves))]
        modes, grad_buffers, gradient_arguments = _leaf_gradient_buffers(launch, leaves, wanted, dtype, chunks)
        if spec.is_complex:
            grad_initial = torch.empty(launch.rows, launch.channels, dtype=states.dtype, device=device)
            outputs = _complex_parts(grad_initial) + gradient_arguments
            inputs = [*_complex_parts(start), *_complex_parts(states), *_complex_parts(grad_states)]
        else:
            grad_initial = torch.empty(launch.rows, launch.channels, dtype=dtype, device=device)
            outputs = [grad_initial] + gradient_arguments
            inputs = [start, states, grad_states]
        launch.scan(True, inputs, outputs, _leaf_arguments(leaves, spec.leaves), modes)
        if not needs[1]:  # the declared initial value (a constant): the kernel wrote dL/dh_0 for no one
            grad_initial = None
        else:
            shape, initial_dtype, complex_initial = ctx.initial
            if not complex_initial and grad_initial.is_complex():
                grad_initial = grad_initial.real
            grad_initial = grad_initial.reshape(shape).to(initial_dtype)
        return (None, grad_initial, *_leaf_gradients(leaves, spec.leaves, grad_buffers, modes))


class _MonoidScan(torch.autograd.Function):
    """A declared monoid's prefix scan by its generated kernel; backward through torch's scan
    (for combines the generated backward cannot differentiate: :class:`_MonoidAdjointScan` otherwise).

    ``tensors`` are the initial carries ``[B, *heads, *carry]`` and then the leaves.  The
    outputs are the carries laid out as ``[N, T, C]`` over the carries' common shape
    (``[N, T, 1]`` for a carry of one element beside wider ones: :func:`_carry_outputs`).
    """

    @staticmethod
    def forward(ctx, launch: _Launch, scan: ir.ScanAssign, *tensors: torch.Tensor):
        count = len(scan.monoid.carries)
        initial, leaves = tensors[:count], tensors[count:]
        dtype = launch.seq.numerics.real
        starts = [_common_layout(launch, value, carry.type, with_time=False).to(dtype).contiguous() for value, carry in zip(initial, scan.monoid.carries)]
        outputs = _carry_outputs(launch, count, starts[0].device)
        launch.scan(False, starts, outputs, _leaf_arguments(launch.ntc(list(leaves)), launch.spec.leaves))
        ctx.launch, ctx.scan = launch, scan
        ctx.save_for_backward(*tensors)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        from .scans import prefix_scan
        from .torch_ops import combine_carries

        launch: _Launch = ctx.launch
        scan: ir.ScanAssign = ctx.scan
        monoid = scan.monoid
        count = len(monoid.carries)
        names = [c.name for c in monoid.carries]
        numerics = launch.seq.numerics
        with torch.enable_grad():
            fresh = [t.detach().requires_grad_(t.requires_grad) for t in ctx.saved_tensors]
            initial, leaves = fresh[:count], fresh[count:]
            known = {id(leaf.expr): value for leaf, value in zip(launch.spec.leaves, leaves)}
            evaluator = Evaluator(numerics, {})
            lifts = []
            for carry, lift in zip(monoid.carries, launch.spec.terms):
                value = launch.seq.full(evaluator.evaluate(lift, known), lift.type, carry.type).expand(launch.lead + carry.type.shape)
                lifts.append(value.transpose(0, 1))

            def combine(earlier, later):
                result = combine_carries(monoid, dict(zip(names, earlier)), dict(zip(names, later)), numerics)
                return tuple(result[n] for n in names)

            scanned = prefix_scan(tuple(lifts), combine)
            folded = combine(tuple(i.unsqueeze(0) for i in initial), scanned)
            narrow = single_element_carries(launch.spec)
            outputs = [_common_layout(launch, f.transpose(0, 1), carry.type, with_time=True, one_element=i in narrow) for i, (f, carry) in enumerate(zip(folded, monoid.carries))]
            wanted = [i for i, t in enumerate(fresh) if t.requires_grad]
            found = torch.autograd.grad(outputs, [fresh[i] for i in wanted], list(grads), allow_unused=True) if wanted else ()
        result: list[torch.Tensor | None] = [None] * len(fresh)
        for i, g in zip(wanted, found):
            result[i] = g
        return (None, None, *result)


class _MonoidAdjointScan(torch.autograd.Function):
    """A declared monoid's prefix scan whose backward is the generated kernel ``backward_<scan>``
    (:mod:`.triton_monoid`: the adjoint recurrence derived from the combine).

    ``tensors`` are the initial carries in the kernel's ``[N, C]`` layout (torch's autograd
    carries their gradients back to the declared shapes) and then the leaves as
    :meth:`_Launch.leaf_views`.  The outputs are the carries as :func:`_carry_outputs` lays them
    out (``[N, T, C]``, or ``[N, T, 1]``); the backward
    kernel reloads them (``y_{t-1}`` and ``y_t``) with the leaves and writes one gradient per
    leaf and per initial carry.
    """

    @staticmethod
    def forward(ctx, launch: _Launch, scan: ir.ScanAssign, *tensors: torch.Tensor):
        count = len(scan.monoid.carries)
        starts, leaves = tensors[:count], tensors[count:]
        dtype = launch.seq.numerics.real
        outputs = _carry_outputs(launch, count, starts[0].device)
        launch.scan(False, list(starts), outputs, _leaf_arguments(list(leaves), launch.spec.leaves))
        ctx.launch, ctx.count = launch, count
        ctx.save_for_backward(*starts, *outputs, *leaves)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        launch: _Launch = ctx.launch
        count = ctx.count
        saved = ctx.saved_tensors
        starts, outputs, leaves = saved[:count], saved[count:2 * count], saved[2 * count:]
        spec = launch.spec
        dtype = launch.seq.numerics.real
        device = outputs[0].device
        grads = tuple(torch.zeros_like(y) if g is None else g.to(dtype).contiguous() for g, y in zip(grads, outputs))
        chunk_count = launch.chunk_count()
        # Blocks of 16 state elements: the combine is evaluated twice per step and differentiated
        # once per carry, which at 32 took all 255 registers of backward_acc_chunks on sm_80.
        block = min(launch.block_c(backward=True), MONOID_BACKWARD_BLOCK_C)
        grid = (launch.rows, -(-launch.channels // block))
        constants = dict(launch.constants(backward=True), BC=block)
        wanted = [ctx.needs_input_grad[2 + count + i] for i in range(len(leaves))]
        modes, buffers, gradient_arguments = _leaf_gradient_buffers(launch, leaves, wanted, dtype, chunk_count, lanes=grid[1])
        dinit = [torch.empty(launch.rows, launch.channels, dtype=dtype, device=device) for _ in range(count)]
        module = launch.module()
        leaf_arguments = _leaf_arguments(list(leaves), spec.leaves)
        tensors = (*starts, *outputs, *grads, *dinit, *gradient_arguments, *leaf_arguments)
        options = dict(modes, num_warps=BACKWARD_WARPS, maxnreg=BACKWARD_REGISTERS)
        length = launch.chunk_steps()
        if length is None:
            launch_kernel(getattr(module, f"backward_{spec.name}"), grid, *tensors, launch.steps, launch.channels, launch.heads, launch.blocks, **constants, **options)
        else:  # T split across programs: fold each chunk's (W, dy) pairs, carry the adjoint across chunks, rescan each chunk
            chunks = chunk_count
            shape = (launch.rows, chunks, launch.channels)
            sums = [torch.empty(shape, dtype=dtype, device=device) for _ in range(len(spec.adjoint.entries) + count)]
            carried = [torch.empty(shape, dtype=dtype, device=device) for _ in range(count)]
            per_chunk = (launch.steps, launch.channels, launch.heads, length, -(-length // BLOCK_T), chunks)
            launch_kernel(getattr(module, f"summarize_backward_{spec.name}"), grid + (chunks,), *outputs, *grads, *sums, *leaf_arguments, *per_chunk, **constants)
            launch_kernel(getattr(module, f"carries_backward_{spec.name}"), grid, *sums, *carried, launch.channels, chunks, BC=constants["BC"], ACC=constants["ACC"])
            launch_kernel(getattr(module, f"backward_{spec.name}_chunks"), grid + (chunks,), *carried, *tensors, *per_chunk, **constants, **options)
        initial_grads = [d.to(s.dtype) if ctx.needs_input_grad[2 + i] else None for i, (d, s) in enumerate(zip(dinit, starts))]
        return (None, None, *initial_grads, *_leaf_gradients(leaves, spec.leaves, buffers, modes))


def _whole_state_view(launch: _Launch, value: torch.Tensor, leaf: Leaf) -> torch.Tensor | None:
    """A leaf that varies in time and is one value for every state element (Aaren's ``score``
    for ``n: [d]``) as a ``[B', H', T, 1]`` view, not expanded over the state: its gradient is
    then one value per step (the backward kernel sums its lanes), not one per element for torch
    to sum.  None for any other leaf (:meth:`_Launch.leaf_views` then)."""
    declared, lead, shape = leaf.expr.type, launch.lead, launch.state_type.shape
    if value.dim() == declared.rank or _numel(shape) == 1:
        return None
    value = align(value, declared.rank, len(shape))
    if any(size != 1 for size in value.shape[len(lead):]) or value.shape[1] != lead[1]:
        return None
    keep = [size if value.shape[i] != 1 else 1 for i, size in enumerate(lead)]
    if any(k != 1 for k in keep[2:]):
        keep[2:] = lead[2:]  # one head stride: all head dims, or none
    value = value.expand(tuple(keep) + value.shape[len(lead):])
    moved = value.movedim(1, len(lead) - 1)  # [b, *heads, T, 1, ...]
    return moved.reshape(keep[0], _numel(tuple(keep[2:])), keep[1], 1)


def _carry_outputs(launch: _Launch, count: int, device: torch.device) -> list[torch.Tensor]:
    """The forward kernel's outputs, one per carry: ``[N, T, C]``, or ``[N, T, 1]`` for a carry of
    one element beside wider ones (:func:`.triton_codegen.single_element_carries`)."""
    narrow = single_element_carries(launch.spec)
    dtype = launch.seq.numerics.real
    return [torch.empty(launch.rows, launch.steps, 1 if i in narrow else launch.channels, dtype=dtype, device=device) for i in range(count)]


def _common_layout(launch: _Launch, value: torch.Tensor, declared: ir.Type, with_time: bool, one_element: bool = False) -> torch.Tensor:
    """A carry ``[B, (T,) *heads, *carry]`` broadcast over the carries' common shape: ``[N, (T,) C]``
    (``one_element``: a carry of one element, ``[N, T, 1]``)."""
    common = tuple(1 for _ in launch.state_type.shape) if one_element else launch.state_type.shape
    lead = launch.lead if with_time else (launch.lead[0],) + launch.lead[2:]
    value = align(value, declared.rank, len(common)).expand(lead + common)
    if with_time:
        return _to_ntc(value, launch.lead, common)
    return value.reshape(launch.rows, launch.channels)


class TritonSolver(parallel.Solver):
    """Runs the plan's Triton scan kernels; every other form as the torch solver does."""

    def _launch(self, step: StepPlan, state_type: ir.Type) -> _Launch:
        assert isinstance(step.kernel, ScanSpec)
        return _Launch(self.plan, step.kernel, self.seq, state_type)

    def kernel_recurrence(self, step: StepPlan, state: StateAnalysis) -> torch.Tensor:
        launch = self._launch(step, state.type)
        leaves = launch.leaf_views(launch.leaf_values())
        initial = self.initial[state.state]
        if _needs_graph(initial, leaves):
            states = _RecurrenceScan.apply(launch, initial, *leaves)
        else:  # nothing to differentiate: the kernel without autograd.Function's bookkeeping
            states, _ = _RecurrenceScan.run(launch, initial, leaves)
        # [N, T, C] -> [B, T, *heads, *shape]
        lead = self.seq.lead
        shape = (lead[0],) + lead[2:] + (lead[1],) + state.type.shape
        shaped = states if states.shape == shape else states.reshape(shape)
        return shaped.movedim(len(lead) - 1, 1) if len(lead) > 2 else shaped

    def selective_scan(self, step: StepPlan, initial: torch.Tensor) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
        """A fused selective scan (:mod:`.triton_selective`): the outputs it writes, by their
        expression's id in ``analysis.expanded_outputs``, and the final state."""
        _check_device(self.seq.numerics.device)
        plan = step.kernel
        assert isinstance(plan, triton_selective.SelectiveScanPlan)
        # The kernels convert each operand as they load it: bfloat16/float16 ones are read as they are.
        values = {(operand.kind, operand.name): self.seq.native.get((operand.kind, operand.name)) for operand in plan.operands}
        values = {key: self.seq.values[key] if value is None else value for key, value in values.items()}
        outputs, final = triton_selective.run_step(self.plan.kernel_source, plan, values, self.seq.lead, self.seq.numerics.real, initial)
        expanded = self.plan.analysis.expanded_outputs
        return {id(expanded[index]): value for index, value in outputs.items()}, final

    def kernel_scan(self, step: StepPlan, scan: ir.ScanAssign) -> dict[str, torch.Tensor]:
        monoid = scan.monoid
        common = broadcast_shapes(*(c.type.shape for c in monoid.carries)) or ()
        launch = self._launch(step, ir.Type(common))
        _check_device(self.seq.numerics.device)
        leaves = launch.leaf_values()
        initial = [self.initial[f"{scan.name}.{c.name}"] for c in monoid.carries]
        if step.kernel.adjoint is not None:  # the backward is the generated kernel
            dtype = self.seq.numerics.real
            starts = [_common_layout(launch, value, carry.type, with_time=False).to(dtype).contiguous() for value, carry in zip(initial, monoid.carries)]
            views = launch.leaf_views(leaves)
            for i, (value, leaf) in enumerate(zip(leaves, launch.spec.leaves)):
                narrow_view = _whole_state_view(launch, value, leaf)
                if narrow_view is not None:
                    views[i] = narrow_view
            outputs = _MonoidAdjointScan.apply(launch, scan, *starts, *views)
        else:
            outputs = _MonoidScan.apply(launch, scan, *initial, *leaves)
        lead = self.seq.lead
        result = {}
        narrow = single_element_carries(step.kernel)
        for i, (carry, value) in enumerate(zip(monoid.carries, outputs)):
            stored = tuple(1 for _ in common) if i in narrow else common  # one-element carries: one copy per step
            shaped = value.reshape((lead[0],) + lead[2:] + (lead[1],) + stored).movedim(len(lead) - 1, 1)
            # A carry smaller than the common shape was replicated along the other axes: take one copy.
            index = tuple(slice(None) if size == full else slice(0, 1) for size, full in zip((1,) * (len(common) - carry.type.rank) + carry.type.shape, stored))
            shaped = shaped[(Ellipsis,) + index].reshape(lead + carry.type.shape)
            result[carry.name] = shaped
        return result


def run(plan: ExecutionPlan, inputs: Mapping[str, torch.Tensor], params, consts, state, numerics: Numerics, last_steps: torch.Tensor | None = None):
    """Run a Triton plan; the signature of :func:`.sequential.run`.

    Matrix states read out linearly (GLA, RetNet, mLSTM, Mamba-2) go through the chunked
    kernels of :mod:`.triton_chunk`; every other recurrence through its generated scan.
    ``allow_tf32``: let the chunked kernels' float32 matmuls run as TF32 on tensor cores
    (about 1e-3 relative error); by default they are exact (``input_precision="ieee"``).
    ``last_steps``: each batch row's last step, as in :func:`.parallel.run` (plans without
    chunked kernels).
    """
    _check_device(numerics.device)
    if any(step.form is Form.TRITON_FUSED for step in plan.steps):  # a nonlinear or coupled cell: the fused sequential kernel
        from . import triton_fused

        return triton_fused.run_plan(plan, inputs, params, consts, state, numerics)
    decayed_outer_products = delta_rule = None
    if any(step.form is Form.TRITON_CHUNKED for step in plan.steps):  # only chunked steps call these
        import functools

        from . import triton_chunk, triton_delta

        decayed_outer_products = functools.partial(triton_chunk.decayed_outer_products, allow_tf32=plan.options.allow_tf32)
        delta_rule = functools.partial(triton_delta.delta_rule, allow_tf32=plan.options.allow_tf32)
    return parallel.run(
        plan, inputs, params, consts, state, numerics, solver=TritonSolver,
        decayed_outer_products=decayed_outer_products, delta_rule=delta_rule, last_steps=last_steps,
    )
