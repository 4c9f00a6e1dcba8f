"""The plan stage: how a cell will run, decided once at compile time.

``analyze(cell) -> plan(analysis, backend, options) -> ExecutionPlan``.  The plan is an
immutable, typed, printable value stored on the compiled module.  For each state (or
coupled group, or scan) in schedule order it names the execution form (:class:`Form`)
with its parameters (the chunk plan of a matrix state read out linearly, the Triton
kernel spec of a recurrence), and for every form considered and rejected, the reason.
Backends interpret the plan: they make no decision of their own at run time.

``auto`` plans every backend that can run the cell and keeps the one the cost model
(:func:`predict_seconds`) predicts fastest for a nominal workload; it never keeps a form
predicted slower than the sequential loop.  On CUDA tensors ``auto`` runs the plan's
``gpu`` alternative, the generated Triton kernels, where they apply.

Nothing here imports torch: planning reads only the IR and the analysis.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field, replace
from enum import Enum

from . import ir
from .analysis import (
    Analysis,
    DiagonalAffine,
    MatrixAffine,
    NoRecurrence,
    Nonlinear,
    SemiringAffine,
    Side,
    StateAnalysis,
    Structure,
    as_outer,
    inline,
    log_of_positive,
)
from .errors import BackendError
from .ir import Kind, Op, Ref, RefKind
from .printer import format_expr
from .shapes import make, reduction_axes

# ---- the vocabulary of plans ------------------------------------------------------------


class BackendKind(Enum):
    """The backends a module can run on (``auto`` picks one of them)."""

    SEQUENTIAL = "sequential"
    SCAN = "scan"
    CHUNKED = "chunked"
    TRITON = "triton"
    NEWTON = "newton"
    FUSED = "fused"

    def __str__(self) -> str:
        return self.value


class VarlenForm(Enum):
    """How a backend runs a packed batch of variable-length sequences (``cu_seqlens``); the value is its prose."""

    SEGMENT_RESETS = "natively, one pass over the packed sequence with the states reset at each sequence's first step"
    END_ALIGNED_RESETS = "natively, the sequences as batch rows aligned at their ends, each row's state reset at its sequence's first step"
    START_ALIGNED = "natively, the sequences as batch rows padded at their ends, each final state read at its sequence's last step"
    GROUPED_BY_LENGTH = "grouped: sequences of equal length run as one batch, one call per distinct length"

    def __str__(self) -> str:
        return self.value


class LowPrecisionInputs(Enum):
    """How a plan's backend takes bfloat16/float16 inputs and params; the value is its prose.

    Either way states, carries and products accumulate in float32 (float64 when a param or
    input is float64), and the module returns the outputs in the inputs' promoted dtype.
    """

    UPCAST = "cast to float32 in torch before the backend runs"
    NATIVE = "passed to the kernels in their own dtype, converted to the float32 accumulator as they are loaded; torch code between kernels reads float32 copies"

    def __str__(self) -> str:
        return self.value


# The torch scans reset states inside their one pass over the packed sequence, the loop
# inside its max_len steps over a batch of the sequences; the C loop, Newton's solver and
# the Triton scan kernels, which keep the state of every step, read each padded row's final
# state at its own last step (recdsl.backends.segments).  The Triton chunk kernels keep only
# the state after the last step: such a plan runs equal-length groups as batches.
VARLEN_FORMS: dict[BackendKind, VarlenForm] = {
    BackendKind.SEQUENTIAL: VarlenForm.END_ALIGNED_RESETS,
    BackendKind.SCAN: VarlenForm.SEGMENT_RESETS,
    BackendKind.CHUNKED: VarlenForm.SEGMENT_RESETS,
    BackendKind.TRITON: VarlenForm.START_ALIGNED,
    BackendKind.NEWTON: VarlenForm.START_ALIGNED,
    BackendKind.FUSED: VarlenForm.START_ALIGNED,
}


class Form(Enum):
    """How one recurrence (a state, a coupled group or a scan) is computed; the value is its name in prose."""

    SEQUENTIAL = "step by step, in the loop over time"
    TIME_PARALLEL = "time-parallel: its update reads no previous value"
    LINEAR_SCAN = "linear scan of (decay, input)"
    LOW_RANK_MATRIX_SCAN = "scan of small transition matrices built from the rank-one terms"
    DENSE_MATRIX_SCAN = "scan of dense transition matrices (the transition applied to a basis)"
    BLOCK_MATRIX_SCAN = "scan of the small blocks of a block-diagonal transition (one matrix per block, not the whole state's)"
    JOINT_MATRIX_SCAN = "one scan of the coupled states stacked: their joint update is affine"
    SEMIRING_DIAGONAL_SCAN = "diagonal scan over the semiring"
    SEMIRING_MATRIX_SCAN = "matrix scan over the semiring"
    MONOID_SCAN = "prefix scan with the monoid's combine"
    CHUNKED = "chunked: matmuls inside chunks, only chunk-boundary states kept"
    # (Triton plans, see Normaliser.)
    NORMALISER = "the normaliser of a chunked state's read-out, carried in that state's walk over the chunks (a column of ones beside its values): never stored per step"
    CONVOLUTION = "causal convolution of the input with the impulse response K_l = R(decay^l * B) (FFT for long sequences); the state is never stored per step"
    TRITON_SCAN = "generated Triton scan kernel, gate math fused"
    TRITON_CHUNKED = "Triton chunked kernels"
    TRITON_SELECTIVE_SCAN = "fused selective scan (S6): one Triton kernel reads the leaves at their own sizes, keeps the state on chip and writes only the outputs that read it"
    NEWTON = "Newton's method over the whole trajectory, one scan of the linearised steps per iteration"
    FUSED = "step by step, the loop compiled to C (shared matmuls merged, gate math fused)"
    TRITON_FUSED = "step by step in one generated Triton kernel (time loop inside, shared matmuls merged, gate math fused)"

    def __str__(self) -> str:
        return self.value


class ChunkKind(Enum):
    DECAYED_OUTER_PRODUCTS = "decayed outer products"  # GLA, RetNet, mLSTM, Mamba-2
    DELTA_RULE = "delta rule"  # DeltaNet: the UT transform inside chunks
    GATED_DELTA_RULE = "gated delta rule"  # Gated DeltaNet, TTT / Titans memories: the UT transform with the decay folded in

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Unsupported:
    """A form or backend that cannot run a recurrence, and why (in words for ``explain``)."""

    reason: str

    def __str__(self) -> str:
        return self.reason


@dataclass(frozen=True)
class RankOneTerm:
    """A term ``coefficient * outer(row, column)`` of a matrix state's input."""

    row: ir.Expr
    column: ir.Expr
    coefficient: ir.Expr | None


@dataclass(frozen=True)
class SkipTerm:
    """A term ``scale * column`` added to a chunk plan's first read-out in an output (Mamba-2's
    ``y = C @ h + D * x``), ``column`` the values of the plan's one input term before their scalar
    coefficient and ``scale`` a scalar: the Triton chunked kernels add it as they write the
    read-out and form its gradients there.  The plan's first read-out is then the sum's node."""

    scale: ir.Expr
    column: ir.Expr


@dataclass(frozen=True)
class Normaliser:
    """A chunk plan's first read-out divided by a vector state's: ``(q @ S) / max(|q @ n|, floor)``
    (mLSTM's ``h``).  ``n`` (``state``) has the matrix state's scalar decay, and its input is the
    plan's one input term with the values replaced by ones (``n = f n + c k`` beside
    ``S = f S + c k v^T``); nothing else reads it; ``floor`` is a scalar per step that reads
    neither state.  The Triton chunked kernels carry ``n`` beside ``S`` in their walk over
    the chunks (``q_t . n_t`` is the row sum of the chunk's decayed scores plus
    ``q_t . n_start``), divide as they write the read-out and form every gradient there, so
    ``n`` is never stored per step; its step in the plan is :attr:`Form.NORMALISER`.  The
    plan's first read-out is then the division's node."""

    state: str
    floor: ir.Expr


@dataclass(frozen=True)
class ChunkPlan:
    """How a matrix state's read-outs are produced chunk by chunk, without storing it per step.

    ``transposed`` is set when the read-outs contract the state's second axis (``S @ q``);
    the kernels then see ``S^T``.  ``queries[i]`` is the vector of ``readouts[i]``, and
    ``previous[i]`` is set when that read-out takes the value before the update
    (``q @ S_{t-1}``: an exclusive causal mask).  For the delta rules ``transition`` is the
    rank-one map ``coefficient * row column^T`` multiplying the kernels' state from the left,
    and ``log_decay`` (gated) the log of its scalar identity part.
    """

    state: str
    kind: ChunkKind
    transposed: bool
    readouts: tuple[ir.Expr, ...]  # nodes inside analysis.expanded_outputs
    queries: tuple[ir.Expr, ...]
    inputs: tuple[RankOneTerm, ...]
    log_decay: ir.Expr | None = None
    previous: tuple[bool, ...] = ()
    transition: RankOneTerm | None = None
    # Set (Triton plans): readouts[0] is ``queries[0] @ S + skip.scale * skip.column``.
    skip: SkipTerm | None = None
    # Set (Triton plans): readouts[0] is ``(queries[0] @ S) / max(|queries[0] @ n|, floor)``.
    normaliser: Normaliser | None = None

    @property
    def reads_previous(self) -> bool:
        return any(self.previous)


@dataclass(frozen=True)
class ConvPlan:
    """A time-invariant diagonal state whose read-outs are causal convolutions of its input.

    The state's update is ``h = decay * h + coefficient * driver`` with ``decay`` and
    ``coefficient`` reading only params and consts, and ``driver`` the time-varying factor,
    constant along the state's *mode* axes (``driver`` broadcasts to the state with size 1
    there, as ``x[:, None]`` does against ``[d, N]``).  Each read-out ``R`` (linear, its
    coefficients time-invariant) sums the state over mode axes only, so
    ``R(h_t) = sum_{s <= t} K_{t-s} * driver_s`` with ``K_l = R(decay^l * coefficient)``:
    the sequence is never stored per step, only the kernel ``[T, *readout]`` is built.
    ``driver_axes[i]`` places the driver's axes in read-out ``i`` (None where the driver
    is constant along that read-out axis), so the driver is reshaped to each read-out.
    """

    state: str
    readouts: tuple[ir.Expr, ...]  # nodes inside analysis.expanded_outputs
    decay: ir.Expr
    coefficient: ir.Expr | None
    driver: ir.Expr
    driver_axes: tuple[tuple[int | None, ...], ...]  # per read-out: for each of its axes, the state axis it keeps


@dataclass(frozen=True)
class Rejected:
    """A form that was considered for a recurrence and not used."""

    form: Form
    reason: str


@dataclass(frozen=True)
class StepPlan:
    """The form of one entry of the schedule: a state, a coupled group or a scan.

    ``chunk`` is set for the chunked forms, with ``fallback``, the scan that runs instead
    when a call's inputs are not finite (the chunk kernels' exponent bookkeeping needs
    finite keys, values and decays); ``kernel`` (a
    :class:`recdsl.backends.triton_codegen.ScanSpec`) for the Triton scan kernel.
    """

    names: tuple[str, ...]
    form: Form
    chunk: ChunkPlan | None = None
    conv: ConvPlan | None = None
    kernel: object | None = None
    rejected: tuple[Rejected, ...] = ()
    fallback: Form | None = None

    @property
    def name(self) -> str:
        return ", ".join(self.names)


@dataclass(frozen=True)
class Workload:
    """The sizes the cost model assumes when the call's batch and length are not known yet."""

    batch: int = 4
    length: int = 1024


@dataclass(frozen=True)
class PlanOptions:
    chunk_size: int = 64
    workload: Workload = Workload()
    backend_options: tuple[tuple[str, object], ...] = ()  # compile(backend_options=...), sorted by name
    allow_tf32: bool = False  # float32 matmuls in Triton kernels may run as TF32 (about 1e-3 relative error)


@dataclass(frozen=True)
class Cost:
    """The cost model's prediction for one backend, or why that backend cannot run the cell."""

    backend: BackendKind
    seconds: float | None
    reason: str | None = None
    candidate: bool = True  # False: it could run the cell but auto does not consider it (``reason`` says why)


@dataclass(frozen=True)
class ExecutionPlan:
    """Everything a backend needs to run a cell, decided at compile time."""

    backend: BackendKind
    reason: str
    steps: tuple[StepPlan, ...]
    options: PlanOptions
    costs: tuple[Cost, ...] = ()
    kernel_source: str | None = None  # the generated Triton module, for the triton backend
    gpu: "ExecutionPlan | None" = None  # auto: the plan used on CUDA tensors
    solver: object | None = None  # newton: the JacobianPlan (the Jacobian's structure and blocks); fused: the step program
    # newton, fused and the fused Triton kernel on a cell with reverse states or delays: its
    # per-group forward sub-cells and their plans (a backends.directed.DirectedPlan)
    directed: object | None = None
    low_precision: LowPrecisionInputs = LowPrecisionInputs.UPCAST  # how bfloat16/float16 inputs reach the backend
    analysis: Analysis = field(default=None, compare=False, repr=False)  # type: ignore[assignment]

    @property
    def cell(self) -> ir.CellIR:
        return self.analysis.cell

    @property
    def chunk_size(self) -> int:
        return self.options.chunk_size

    @property
    def varlen(self) -> VarlenForm:
        """How this plan runs a packed variable-length batch (``module(..., cu_seqlens=...)``)."""
        if self.backend is BackendKind.TRITON and any(step.form is Form.TRITON_CHUNKED for step in self.steps):
            return VarlenForm.GROUPED_BY_LENGTH
        form = VARLEN_FORMS[self.backend]
        if form is VarlenForm.START_ALIGNED and self.cell.reversed_recurrences:
            # Rows padded at their ends would start a reverse state in the padding, not at
            # each sequence's last step: equal lengths run together, unpadded.
            return VarlenForm.GROUPED_BY_LENGTH
        return form

    def step(self, name: str) -> StepPlan:
        for step in self.steps:
            if name in step.names:
                return step
        raise KeyError(name)

    def not_chunked(self) -> tuple[tuple[str, str], ...]:
        """Each recurrence this plan scans or loops over rather than chunks, with the reason it is not chunked.

        Time-parallel states are left out (they need no form over time).  For the
        ``chunked`` backend these are the recurrences that run as the ``scan`` backend
        would run them."""
        found = []
        for step in self.steps:
            if step.form in (Form.CHUNKED, Form.TRITON_CHUNKED, Form.CONVOLUTION, Form.TIME_PARALLEL, Form.NORMALISER):
                continue
            reason = next((r.reason for r in step.rejected if r.form in (Form.CHUNKED, Form.TRITON_CHUNKED)), None)
            if reason is None and step.form is Form.MONOID_SCAN:
                reason = "a declared monoid scan (the chunked forms are for matrix states read out linearly)"
            found.append((step.name, reason or "no chunked form was considered"))
        return tuple(found)

    def for_device(self, device_type: str) -> "ExecutionPlan":
        """The plan to run on tensors of ``device_type`` (``auto``'s GPU alternative on ``cuda``)."""
        return self.gpu if device_type == "cuda" and self.gpu is not None else self

    def format(self) -> str:
        """The plan as ``recdsl explain --plan`` prints it."""
        lines = [f"plan: backend {self.backend} ({self.reason})"]
        if self.backend in (BackendKind.CHUNKED, BackendKind.TRITON) and not any(step.form is Form.TRITON_FUSED for step in self.steps):
            lines.append(f"  chunk size {self.chunk_size}")
        for step in self.steps:
            direction = " (reverse)" if self.analysis is not None and self.analysis.direction(step.names[0]) is ir.Direction.REVERSE else ""
            if self.analysis is not None and set(step.names) <= self.analysis.delays and step.form is Form.TIME_PARALLEL:
                lines.append(f"  {step.name}{direction}: a delay: its update's values shifted one step (one cat), no recurrence")
                continue
            lines.append(f"  {step.name}{direction}: {step.form}")
            if step.conv is not None:
                conv = step.conv
                coefficient = "" if conv.coefficient is None else f" with coefficient {format_expr(conv.coefficient)}"
                lines.append(f"      decay {format_expr(conv.decay)}; driven by {format_expr(conv.driver)}{coefficient}")
            if step.chunk is not None:
                chunk = step.chunk
                groups = [(before, [q for q, b in zip(chunk.queries, chunk.previous or (False,) * len(chunk.queries)) if b == before]) for before in (True, False)]
                described = []
                for before, queries in groups:
                    if queries:
                        read = "S_prev" if before else "S"
                        form = f"{read} @ q" if chunk.transposed else f"q @ {read}"
                        described.append(f"{form} with q = {', '.join(format_expr(q) for q in queries)}")
                lines.append(f"      {chunk.kind}; read-outs {'; '.join(described)}")
                if chunk.log_decay is not None:
                    lines.append(f"      log decay {format_expr(chunk.log_decay)}")
                if chunk.skip is not None:
                    lines.append(f"      plus {format_expr(chunk.skip.scale)} * {format_expr(chunk.skip.column)} in the first read-out, added in the kernels")
                if chunk.normaliser is not None:
                    lines.append(f"      the first read-out divided by max(|{format_expr(chunk.queries[0])} @ {chunk.normaliser.state}|, {format_expr(chunk.normaliser.floor)}) in the kernels, {chunk.normaliser.state} carried beside the state")
            if step.form is Form.NORMALISER:
                owner = next((other.name for other in self.steps if other.chunk is not None and other.chunk.normaliser is not None and other.chunk.normaliser.state == step.name), None)
                lines.append(f"      with {owner}, by {owner}'s chunked kernels")
            if step.form is Form.TRITON_SELECTIVE_SCAN and hasattr(step.kernel, "describe"):  # a SelectiveScanPlan
                lines.append(f"      {step.kernel.describe()}")
            if step.form is Form.TRITON_SCAN and hasattr(step.kernel, "split"):  # a ScanSpec: when the launch splits T
                lines.append(f"      {step.kernel.split.describe()}")
            for rejected in step.rejected:
                lines.append(f"      not {rejected.form.name.lower().replace('_', ' ')}: {rejected.reason}")
        if self.backend is BackendKind.NEWTON and self.solver is not None:
            lines.append(f"  Jacobian: {self.solver.describe()}")
        if self.solver is not None and any(step.form is Form.TRITON_FUSED for step in self.steps):
            lines.append(f"  kernel: {self.solver.describe()}")
        if self.directed is not None:
            lines.extend(f"  {line}" for line in f"reverse states and delays: {self.directed.describe()}".splitlines())
        lines.append(f"  variable-length batches (cu_seqlens): {self.varlen}")
        lines.append(f"  bfloat16/float16 inputs and params: {self.low_precision}")
        if self.costs:
            workload = self.options.workload
            lines.append(f"  predicted cost (cost model, B = {workload.batch}, T = {workload.length}, one CPU):")
            for cost in self.costs:
                if not cost.candidate:
                    lines.append(f"      {cost.backend}: not a candidate ({cost.reason})")
                elif cost.seconds is None:
                    lines.append(f"      {cost.backend}: cannot run ({cost.reason})")
                else:
                    note = f" ({cost.reason})" if cost.reason else ""  # what the prediction assumed
                    lines.append(f"      {cost.backend}: {cost.seconds * 1e3:.3g} ms{note}")
        if self.gpu is not None:
            lines.append(f"  on CUDA tensors: backend {self.gpu.backend}")
            lines.extend("  " + line for line in self.gpu.format().splitlines()[1:])
        return "\n".join(lines) + "\n"

    def __str__(self) -> str:
        return self.format()


# ---- chunked forms ----------------------------------------------------------------------


def rank_one_terms(expr: ir.Expr | None) -> list[RankOneTerm] | None:
    """``expr`` as a sum of ``c * outer(u, v)`` terms (however the outer products are spelled), or None."""
    if expr is None:
        return []
    if not isinstance(expr, Op):
        return None
    if expr.op == "add":
        left, right = rank_one_terms(expr.args[0]), rank_one_terms(expr.args[1])
        return None if left is None or right is None else left + right
    if expr.op == "neg":  # -(c u v^T) = (-c) u v^T (a gradient step: - lr * outer(W @ k - v, k))
        inner = rank_one_terms(expr.args[0])
        return None if inner is None else [_negated(t) for t in inner]
    if expr.op == "sub":
        left, right = rank_one_terms(expr.args[0]), rank_one_terms(expr.args[1])
        return None if left is None or right is None else left + [_negated(t) for t in right]
    outer = as_outer(expr)
    if outer is not None:
        return [RankOneTerm(outer[0], outer[1], None)]
    if expr.op == "mul":
        for scalar, rest in ((expr.args[0], expr.args[1]), (expr.args[1], expr.args[0])):
            if scalar.type.rank == 0:
                inner = rank_one_terms(rest)
                if inner is not None:
                    return [RankOneTerm(t.row, t.column, scalar if t.coefficient is None else Op("mul", (scalar, t.coefficient), scalar.type)) for t in inner]
    return None


def _negated(term: RankOneTerm) -> RankOneTerm:
    if term.coefficient is None:
        return replace(term, coefficient=ir.Literal(-1.0, ir.Type(())))
    return replace(term, coefficient=Op("neg", (term.coefficient,), term.coefficient.type))


def _readout_query(readout: ir.Expr, state: str) -> tuple[ir.Expr, bool, bool] | None:
    """For ``q @ S`` the triple ``(q, False, previous)``; for ``S @ q`` ``(q, True, previous)``; else None.

    ``previous`` is set when the read-out takes the state's value before its update."""
    if not (isinstance(readout, Op) and readout.op == "matmul"):
        return None
    left, right = readout.args
    is_state = lambda e: isinstance(e, Ref) and e.kind in (RefKind.STATE_NEW, RefKind.STATE_PREV) and e.name == state  # noqa: E731
    if is_state(right) and left.type.rank == 1:
        return left, False, right.kind is RefKind.STATE_PREV
    if is_state(left) and right.type.rank == 1:
        return right, True, left.kind is RefKind.STATE_PREV
    # S.T @ q = q @ S and q @ S.T = S @ q for a matrix state
    transposed = lambda e: isinstance(e, Op) and e.op == "transpose" and e.args[0].type.rank == 2 and is_state(e.args[0])  # noqa: E731
    if transposed(left) and right.type.rank == 1:
        return right, False, left.args[0].kind is RefKind.STATE_PREV
    if transposed(right) and left.type.rank == 1:
        return left, True, right.args[0].kind is RefKind.STATE_PREV
    return None


def _mentions(expr: ir.Expr, state: str, exclude: set[int], kinds: tuple[RefKind, ...] = (RefKind.STATE_NEW, RefKind.STATE_PREV)) -> bool:
    stack = [expr]
    while stack:
        node = stack.pop()
        if id(node) in exclude:
            continue
        if isinstance(node, Ref) and node.name == state and node.kind in kinds:
            return True
        if isinstance(node, Op):
            stack.extend(node.args)
    return False


def chunk_plan(analysis: Analysis, state: StateAnalysis) -> ChunkPlan | Unsupported:
    """The chunked form of ``state``, or why it must be stored per step."""
    recurrence = state.recurrence
    name = state.state
    if state.type.rank != 2:
        return Unsupported("not a matrix state (the chunked form is for matrix states read out linearly)")
    if state.type.kind is not Kind.REAL:
        return Unsupported("a complex state")
    readouts = [r for r in analysis.readouts if r.state == name]
    if not readouts:
        return Unsupported("no output reads it linearly (q @ S)")
    queries = [_readout_query(r.expr, name) for r in readouts]
    if any(q is None for q in queries) or len({q[1] for q in queries}) != 1:  # type: ignore[index]
        return Unsupported("its read-outs are not all of the form q @ S (or all S @ q)")
    if any(q[0].type.kind is not Kind.REAL for q in queries):  # type: ignore[index]
        return Unsupported("a complex query reads a real state (the chunked kernels multiply real matrices)")
    transposed = queries[0][1]  # type: ignore[index]
    readout_ids = {id(r.expr) for r in readouts}
    if any(_mentions(e, name, readout_ids) for e in analysis.expanded_outputs):
        return Unsupported("an output reads it other than through its linear read-outs")
    if any(other.state != name and name in other.reads for other in analysis.states):
        return Unsupported("another state's update reads it")
    if isinstance(recurrence, (NoRecurrence, Nonlinear, SemiringAffine)):
        return Unsupported(f"a {recurrence.name} recurrence")
    terms = rank_one_terms(recurrence.input)
    if terms is None:
        return Unsupported("its input term is not a sum of outer products")
    if any(t.row.type.kind is not Kind.REAL or t.column.type.kind is not Kind.REAL for t in terms):
        return Unsupported("a complex input term")
    if transposed:
        terms = [RankOneTerm(t.column, t.row, t.coefficient) for t in terms]
    previous = tuple(q[2] for q in queries)  # type: ignore[index]
    base = dict(
        state=name,
        transposed=transposed,
        readouts=tuple(r.expr for r in readouts),
        queries=tuple(q[0] for q in queries),  # type: ignore[index]
        inputs=tuple(terms),
        previous=previous if any(previous) else (),
    )
    structure = recurrence.structure
    if isinstance(recurrence, DiagonalAffine) and structure is Structure.ELEMENTWISE:
        # S6: a decay per element makes every chunk's decay tensor as large as the states
        # of its steps, so chunking saves nothing over the scan.
        return Unsupported("its decay differs for every element of the state (chunks would be as large as the per-step states)")
    if not getattr(recurrence, "low_rank", ()) and structure.shares_decay:
        log_decay = log_of_positive(recurrence.decay, analysis.cell)
        if log_decay is None:
            written = format_expr(inline(recurrence.decay, analysis.cell, frozenset()))
            return Unsupported(f"its decay {written} is not provably positive (chunked forms accumulate decays in log space)")
        return ChunkPlan(kind=ChunkKind.DECAYED_OUTER_PRODUCTS, log_decay=log_decay, **base)
    delta = (Structure.IDENTITY_PLUS_LOW_RANK, Structure.SCALED_IDENTITY_PLUS_LOW_RANK)
    if isinstance(recurrence, MatrixAffine) and structure in delta and len(recurrence.low_rank) == 1:
        return _delta_rule_plan(analysis, recurrence, terms, base)
    return Unsupported(f"no chunked form for a {recurrence.name} recurrence with a {structure} transition")


def with_normaliser(chunk: ChunkPlan, analysis: Analysis) -> ChunkPlan:
    """``chunk`` with the :class:`Normaliser` of its read-out when an output divides the read-out
    ``q @ S`` by ``max(|q @ n|, floor)`` (either order) and ``n`` qualifies (see
    :class:`Normaliser`): that read-out first, its node the division's.  Else ``chunk``
    unchanged.  For the Triton chunked kernels, which carry ``n`` in their walk."""
    if chunk.kind is not ChunkKind.DECAYED_OUTER_PRODUCTS or len(chunk.inputs) != 1 or chunk.transposed or chunk.reads_previous or chunk.skip is not None:
        return chunk
    matrix = analysis.state(chunk.state)
    if matrix.recurrence.structure is not Structure.SCALAR:
        return chunk
    readouts = {id(r): i for i, r in enumerate(chunk.readouts)}
    vector_readouts = {id(r.expr): r.state for r in analysis.readouts if r.state != chunk.state}

    def normaliser_of(divisor: ir.Expr, query: ir.Expr) -> Normaliser | None:
        """The normaliser when ``divisor`` is ``max(|query @ n|, floor)`` for a qualifying ``n``."""
        if not (isinstance(divisor, Op) and divisor.op == "maximum" and len(divisor.args) == 2 and divisor.type.rank == 0):
            return None
        for magnitude, floor in (divisor.args, divisor.args[::-1]):
            if not (isinstance(magnitude, Op) and magnitude.op == "abs" and id(magnitude.args[0]) in vector_readouts):
                continue
            name = vector_readouts[id(magnitude.args[0])]
            read = _readout_query(magnitude.args[0], name)
            if read is None or read[1] or read[2] or read[0] != query or floor.type.rank != 0:
                continue
            if _mentions(floor, name, set()) or _mentions(floor, chunk.state, set()):
                continue
            if _qualifies_as_normaliser(analysis, chunk, name, {id(magnitude.args[0])}):
                return Normaliser(name, floor)
        return None

    def find(expr: ir.Expr) -> ChunkPlan | None:
        if not isinstance(expr, Op):
            return None
        if expr.op == "div" and len(expr.args) == 2 and id(expr.args[0]) in readouts and expr.type == expr.args[0].type:
            i = readouts[id(expr.args[0])]
            normaliser = normaliser_of(expr.args[1], chunk.queries[i])
            if normaliser is not None:
                order = [i] + [j for j in range(len(chunk.readouts)) if j != i]
                return replace(
                    chunk,
                    readouts=tuple(expr if j == i else chunk.readouts[j] for j in order),
                    queries=tuple(chunk.queries[j] for j in order),
                    normaliser=normaliser,
                )
        for arg in expr.args:
            found = find(arg)
            if found is not None:
                return found
        return None

    for output in analysis.expanded_outputs:
        found = find(output)
        if found is not None:
            return found
    return chunk


def _qualifies_as_normaliser(analysis: Analysis, chunk: ChunkPlan, name: str, read_by: set[int]) -> bool:
    """Whether state ``name`` is ``chunk``'s matrix state with its values replaced by ones: a real
    vector of the key length, the same scalar decay, the input ``c * k`` of the term ``c k v^T``
    (``c`` the term's coefficient, or the scalar of a column ``c * v``), read by nothing but
    the nodes ``read_by`` and running in the same direction."""
    vector = analysis.state(name)
    matrix = analysis.state(chunk.state)
    recurrence = vector.recurrence
    if not (isinstance(recurrence, DiagonalAffine) and recurrence.structure is Structure.SCALAR and recurrence.input is not None):
        return False
    if vector.type.kind is not Kind.REAL or vector.type.shape != matrix.type.shape[:1] or recurrence.decay != matrix.recurrence.decay:
        return False
    if analysis.direction(name) is not analysis.direction(chunk.state) or name in analysis.delays:
        return False
    if any(other.state != name and name in other.reads for other in analysis.states):
        return False
    if any(_mentions(e, name, read_by) for e in analysis.expanded_outputs):
        return False
    term = chunk.inputs[0]
    scale = term.coefficient if term.coefficient is not None else scalar_times_vector(term.column)[1]
    given = recurrence.input
    if scale is None:
        return given == term.row
    return isinstance(given, Op) and given.op == "mul" and len(given.args) == 2 and given.args in ((scale, term.row), (term.row, scale))


def scalar_times_vector(column: ir.Expr) -> tuple[ir.Expr, ir.Expr | None]:
    """A column ``c * v`` or ``v * c`` (``c`` a scalar, ``v`` a vector of the column's type) as
    ``(v, c)``; any other column as ``(column, None)``.  The Triton chunk kernels scale the
    values as they read them."""
    if isinstance(column, Op) and column.op == "mul" and len(column.args) == 2:
        first, second = column.args
        if first.type.rank == 0 and second.type == column.type:
            return second, first
        if second.type.rank == 0 and first.type == column.type:
            return first, second
    return column, None


def _delta_rule_plan(analysis: Analysis, recurrence: MatrixAffine, terms: list[RankOneTerm], base: dict) -> ChunkPlan | Unsupported:
    """The (gated) delta rule's chunk plan: ``S = d S + c l (r^T S) + sum l w^T`` in the kernels' orientation.

    The kernels multiply the rank-one map from the left of the state they see: ``S`` read
    out as ``q @ S`` with a map from the left (DeltaNet), or ``S^T`` read out as ``S @ q``
    with a map from the right (a TTT or Titans memory ``W`` applied as ``W @ k``).  Every
    input term must share the map's left vector there (the UT transform solves for one
    column update ``u_t`` per step).
    """
    term = recurrence.low_rank[0]
    transposed = base["transposed"]
    if (recurrence.side is Side.RIGHT) != transposed:
        read = "S @ q" if transposed else "q @ S"
        return Unsupported(f"its rank-one map multiplies from the {recurrence.side} but it is read out as {read}; the chunked delta rule needs the map on the read-out's far side")
    # For S^T the map c S (u v^T) is c (v u^T) S^T: its left vector is v.
    left, right = (term.right, term.left) if transposed else (term.left, term.right)
    if any(t.row != left for t in terms):
        return Unsupported("its input term does not share the rank-one update's left vector")
    transition = RankOneTerm(left, right, term.coefficient)
    if recurrence.structure is Structure.IDENTITY_PLUS_LOW_RANK:
        return ChunkPlan(kind=ChunkKind.DELTA_RULE, transition=transition, **base)
    assert recurrence.decay is not None
    if recurrence.decay.type.rank != 0:
        return Unsupported("its identity part's scale is not a scalar per step (the chunked gated delta rule takes one decay per step)")
    log_decay = log_of_positive(recurrence.decay, analysis.cell)
    if log_decay is None:
        written = format_expr(inline(recurrence.decay, analysis.cell, frozenset()))
        return Unsupported(f"its decay {written} is not provably positive (chunked forms accumulate decays in log space)")
    return ChunkPlan(kind=ChunkKind.GATED_DELTA_RULE, transition=transition, log_decay=log_decay, **base)


# ---- the convolution form ------------------------------------------------------------------


def _reads_only_params(expr: ir.Expr, cell: ir.CellIR) -> bool:
    """Whether ``expr`` (through its bindings) reads only params and consts: the same at every step."""
    return all(r.kind in (RefKind.PARAM, RefKind.CONST) for r in ir.refs(inline(expr, cell, frozenset())))


def _factors(expr: ir.Expr, cell: ir.CellIR) -> list[ir.Expr] | None:
    """``expr`` as a product of factors (``a * b``, ``-a``, ``a / c`` with ``c`` time-invariant), or None."""
    if isinstance(expr, Op) and expr.op == "mul":
        left, right = _factors(expr.args[0], cell), _factors(expr.args[1], cell)
        return None if left is None or right is None else left + right
    if isinstance(expr, Op) and expr.op == "neg":
        inner = _factors(expr.args[0], cell)
        return None if inner is None else inner + [ir.Literal(-1, ir.Type(()))]
    if isinstance(expr, Op) and expr.op == "div" and _reads_only_params(expr.args[1], cell):
        inner = _factors(expr.args[0], cell)
        return None if inner is None else inner + [make("div", ir.Literal(1, ir.Type(())), expr.args[1])]
    return [expr]


def _product(factors: list[ir.Expr]) -> ir.Expr | None:
    result = None
    for factor in factors:
        result = factor if result is None else make("mul", result, factor)
    return result


def _reduced_axes(node: Op) -> tuple[int, ...]:
    """The axes (from the front of the argument's shape) a reduction removes."""
    rank = node.args[0].type.rank
    return tuple(sorted(a % rank for a in reduction_axes(rank, node.attrs[0] if node.attrs else None)))


def _readout_axes(expr: ir.Expr, state: str, cell: ir.CellIR) -> tuple[int | None, ...] | Unsupported:
    """For each axis of a linear read-out of ``state``, the state axis it keeps (None for a new axis).

    The read-out may scale the state by time-invariant factors, sum it over axes and
    contract it with time-invariant vectors or matrices; anything else (or a factor that
    varies in time) is refused: the convolution's kernel is the read-out of ``decay^l``.
    """
    if isinstance(expr, Ref):
        if expr.kind is RefKind.STATE_NEW and expr.name == state:
            return tuple(range(expr.type.rank))
        return Unsupported(f"its read-out reads {expr.name}")
    if not isinstance(expr, Op):
        return Unsupported("its read-out is a constant")
    reads = [_mentions(a, state, set()) for a in expr.args]
    if expr.op in ("add", "sub"):
        left, right = (_readout_axes(a, state, cell) for a in expr.args)
        for side in (left, right):
            if isinstance(side, Unsupported):
                return side
        if left != right:
            return Unsupported("the terms of its read-out keep different axes of the state")
        return left
    if expr.op == "neg":
        return _readout_axes(expr.args[0], state, cell)
    if expr.op in ("sum", "mean"):
        inner = _readout_axes(expr.args[0], state, cell)
        if isinstance(inner, Unsupported):
            return inner
        removed = set(_reduced_axes(expr))
        return tuple(a for i, a in enumerate(inner) if i not in removed)
    if expr.op in ("mul", "div", "matmul") and sum(reads) == 1:
        position = reads.index(True)
        other = expr.args[1 - position]
        if expr.op == "div" and position != 0:
            return Unsupported("its read-out divides by the state")
        if not _reads_only_params(other, cell):
            return Unsupported(f"its read-out multiplies the state by {format_expr(other)}, which varies in time")
        inner = _readout_axes(expr.args[position], state, cell)
        if isinstance(inner, Unsupported):
            return inner
        if expr.op != "matmul":  # broadcasting may add leading axes, along which nothing varies
            return (None,) * (expr.type.rank - len(inner)) + inner
        if other.type.rank > 2:
            return Unsupported("its read-out is a batched matmul")
        new = (None,) if other.type.rank == 2 else ()
        if position == 0:  # x @ q contracts x's last axis
            return inner[:-1] + new
        if len(inner) == 1:  # q @ x for a vector x
            return new
        return inner[:-2] + new + inner[-1:]  # q @ x contracts x's second-to-last axis
    return Unsupported(f"its read-out applies {expr.op}")


def conv_plan(analysis: Analysis, state: StateAnalysis) -> ConvPlan | Unsupported | None:
    """The convolution form of ``state``; None when its transition varies in time (no such form applies).

    It applies to a diagonal (or row/column-decay) recurrence whose decay reads only params
    and consts (S4, S4D, a time-invariant LRU), driven by an input that is a time-invariant
    coefficient times a time-varying factor constant along some axes of the state, and read
    out only by time-invariant linear maps that sum over those axes.
    """
    recurrence = state.recurrence
    cell = analysis.cell
    name = state.state
    if isinstance(recurrence, DiagonalAffine):
        decay = recurrence.decay
    elif isinstance(recurrence, MatrixAffine) and not recurrence.low_rank and recurrence.decay is not None:
        decay = recurrence.decay
    else:
        return None
    if not _reads_only_params(decay, cell):
        return None
    if recurrence.input is None:
        return Unsupported("it has no input term")
    factors = _factors(recurrence.input, cell)
    if factors is None:  # pragma: no cover - _factors always finds at least the whole term
        return Unsupported("its input term is not a product")
    invariant = [f for f in factors if _reads_only_params(f, cell)]
    varying = [f for f in factors if not _reads_only_params(f, cell)]
    driver = _product(varying)
    if driver is None:
        return Unsupported("its input term does not vary in time")
    shape = state.type.shape
    if driver.type.rank > len(shape):
        return Unsupported("its input term has more axes than the state")
    driver_shape = (1,) * (len(shape) - driver.type.rank) + driver.type.shape
    if any(d not in (1, s) for d, s in zip(driver_shape, shape)):
        return Unsupported("its time-varying input does not broadcast to the state")
    mode_axes = {j for j, d in enumerate(driver_shape) if d == 1}
    if not mode_axes:
        return Unsupported("its time-varying input varies along every axis of the state (a convolution would be as large as the scan)")
    if any(_mentions(e, name, set(), (RefKind.STATE_PREV,)) for e in analysis.expanded_outputs):
        return Unsupported(f"an output reads its previous value ({name} before its update)")
    if any(other.state != name and name in other.reads for other in analysis.states):
        return Unsupported("another state's update reads it")
    readouts = [r for r in analysis.readouts if r.state == name]
    if not readouts:
        return Unsupported("no output reads it linearly")
    readout_ids = {id(r.expr) for r in readouts}
    if any(_mentions(e, name, readout_ids) for e in analysis.expanded_outputs):
        return Unsupported("an output reads it other than through its linear read-outs")
    if not all(r.reduces for r in readouts):
        return Unsupported("a read-out is as large as the state (the convolution would cost as much as the scan)")
    axes_of_readouts = []
    for readout in readouts:
        axes = _readout_axes(readout.expr, name, cell)
        if isinstance(axes, Unsupported):
            return axes
        kept = [a for a in axes if a is not None]
        if len(set(kept)) != len(kept) or any(j not in kept for j in range(len(shape)) if j not in mode_axes):
            return Unsupported("a read-out sums over an axis along which its input varies")
        axes_of_readouts.append(axes)
    return ConvPlan(
        state=name,
        readouts=tuple(r.expr for r in readouts),
        decay=decay,
        coefficient=_product(invariant),
        driver=driver,
        driver_axes=tuple(axes_of_readouts),
    )


# ---- scans ---------------------------------------------------------------------------------

# The largest state (in elements) whose transition is scanned as an explicit matrix.
MAX_MATRIX_STATE = 256


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def low_rank_as_one_matrix(recurrence: MatrixAffine, state: ir.Type) -> bool:
    """Whether a (diagonal plus) low-rank transition is one small matrix multiplying from its side."""
    if not recurrence.low_rank or state.rank != 2:
        return False
    return not recurrence.decay_axes or recurrence.decay_axes == ((0,) if recurrence.side is Side.LEFT else (1,))


def scan_form(state: StateAnalysis) -> Form | Unsupported:
    """The scan that solves ``state``'s recurrence over the whole sequence, or why none does."""
    recurrence = state.recurrence
    match recurrence:
        case NoRecurrence():
            return Form.TIME_PARALLEL
        case Nonlinear(reason=reason):
            return Unsupported(f"state '{state.state}' is nonlinear: {reason}")
        case DiagonalAffine():
            return Form.LINEAR_SCAN
        case MatrixAffine(low_rank=()) if recurrence.decay is not None:
            return Form.LINEAR_SCAN
        case MatrixAffine() if low_rank_as_one_matrix(recurrence, state.type):
            return Form.LOW_RANK_MATRIX_SCAN
        case MatrixAffine(structure=Structure.BLOCK_DIAGONAL):
            block = block_size(state.type, recurrence.blocks.axes)
            if block > MAX_MATRIX_STATE:
                return Unsupported(f"state '{state.state}' has a block-diagonal transition with blocks of {block} elements (more than {MAX_MATRIX_STATE} to scan as matrices)")
            return Form.BLOCK_MATRIX_SCAN
        case MatrixAffine():
            size = _numel(state.type.shape)
            if size > MAX_MATRIX_STATE:
                return Unsupported(f"state '{state.state}' has a {recurrence.structure} transition and {size} elements (more than {MAX_MATRIX_STATE} to scan as a matrix)")
            return Form.DENSE_MATRIX_SCAN
        case SemiringAffine(structure=Structure.DIAGONAL):
            return Form.SEMIRING_DIAGONAL_SCAN
        case SemiringAffine():
            size = _numel(state.type.shape)
            if size > MAX_MATRIX_STATE:
                return Unsupported(f"state '{state.state}' has a semiring matrix transition and {size} elements (more than {MAX_MATRIX_STATE} to scan as a matrix)")
            return Form.SEMIRING_MATRIX_SCAN
    raise AssertionError(f"unclassified recurrence {recurrence}")  # pragma: no cover


def block_size(state: ir.Type, axes: tuple[int, ...]) -> int:
    """The elements of one block of a state block diagonal along ``axes``."""
    return _numel(tuple(n for axis, n in enumerate(state.shape) if axis not in axes))


def joint_form(analysis: Analysis, group: tuple[str, ...]) -> Form | Unsupported:
    """The scan of a coupled group, or why it must run step by step."""
    coupled = f"states {', '.join(group)} are coupled (each reads the other)"
    joint = analysis.group(group)
    if joint is None:
        return Unsupported(f"{coupled}, so they can only run step by step")
    recurrence = joint.recurrence
    if isinstance(recurrence, Nonlinear):
        return Unsupported(f"{coupled} and their joint update is not affine: {recurrence.reason}, so they can only run step by step")
    types = [analysis.state(name).type for name in group]
    if any(t.kind is not types[0].kind for t in types):
        return Unsupported(f"{coupled} and mix real and complex values, so they can only run step by step")
    axes = recurrence.blocks.axes if recurrence.blocks is not None else ()
    block = sum(block_size(t, axes) for t in types)
    if block > MAX_MATRIX_STATE:
        return Unsupported(f"{coupled}; their joint update is affine but a block of it has {block} elements (more than {MAX_MATRIX_STATE} to scan as a matrix)")
    return Form.JOINT_MATRIX_SCAN


def parallel_steps(analysis: Analysis, chunked: bool) -> tuple[StepPlan, ...] | Unsupported:
    """The plan of the ``scan`` (or, with ``chunked``, the ``chunked``) backend, or why it cannot run the cell."""
    joint: dict[tuple[str, ...], Form] = {}
    for group in analysis.coupled_groups:
        form = joint_form(analysis, group)
        if isinstance(form, Unsupported):
            return form
        joint[group] = form
    scans = {s.name for s in analysis.cell.scans}
    steps = []
    for group in analysis.schedule:
        if group in joint:
            steps.append(StepPlan(group, joint[group]))
            continue
        (name,) = group
        if name in scans:
            steps.append(StepPlan((name,), Form.MONOID_SCAN))
            continue
        state = analysis.state(name)
        form = scan_form(state)
        if isinstance(form, Unsupported):
            return form
        rejected: list[Rejected] = []
        if chunked and form is Form.LINEAR_SCAN:
            conv = conv_plan(analysis, state)
            if isinstance(conv, ConvPlan):
                steps.append(StepPlan((name,), Form.CONVOLUTION, conv=conv, rejected=(Rejected(form, "the convolution never stores the state per step"),), fallback=form))
                continue
            if isinstance(conv, Unsupported):
                rejected.append(Rejected(Form.CONVOLUTION, conv.reason))
        if chunked and form is not Form.TIME_PARALLEL:
            plan = chunk_plan(analysis, state)
            if isinstance(plan, ChunkPlan):
                steps.append(StepPlan((name,), Form.CHUNKED, chunk=plan, rejected=(Rejected(form, "the chunked form never stores the state per step"),), fallback=form))
                continue
            rejected.append(Rejected(Form.CHUNKED, plan.reason))
        steps.append(StepPlan((name,), form, rejected=tuple(rejected)))
    return tuple(steps)


def sequential_steps(analysis: Analysis) -> tuple[StepPlan, ...]:
    """The sequential backend's plan: every group of the schedule, step by step."""
    return tuple(StepPlan(group, Form.SEQUENTIAL) for group in analysis.schedule)


# ---- the cost model ------------------------------------------------------------------------

# A 2-core CPU running eager torch (measured on the project's machines; see
# benchmarks/bench_cost_model.py, which checks the ranking the model gives).
OP_OVERHEAD_SECONDS = 6e-6  # dispatching one torch op
ELEMENTS_PER_SECOND = 1.5e9  # elementwise work
FLOPS_PER_SECOND = 4e10  # matmuls
STEP_OVERHEAD_SECONDS = 25e-6  # the sequential loop's own bookkeeping per time step
STEP_OP_SECONDS = 10e-6  # one IR node evaluated inside the loop (dispatch plus the evaluator's own work)
STEP_COMBINE_SECONDS = 150e-6  # one monoid combine per step (carries bound, broadcast and read back)
CONVOLUTION_BLOCK_ELEMENTS = 1 << 21  # lags x state elements of one block of decay powers (backends/convolution.py)
# The fused form: the loop in generated C, one thread.  Fitted to the quiet-machine runs of
# benchmarks/bench_sequential.py (GRU 43 ms, LSTM 66 ms forward at B = 4, T = 2048, d = 128;
# RESULTS_SEQUENTIAL.md): the per-step matmul runs at about 30 GFLOP/s with -march=native.
FUSED_CALL_SECONDS = 300e-6  # per call: ctypes, the output buffers, autograd's bookkeeping
FUSED_STEP_SECONDS = 0.3e-6  # per time step: the loop's own pointer arithmetic
FUSED_ELEMENTS_PER_SECOND = 3e9  # gate math, vectorised
FUSED_FLOPS_PER_SECOND = 3e10  # the register-blocked per-step matmul
# The newton form: iterations assumed at plan time (RESULTS_NEWTON_CPU.md measures 4-5 for
# exact Newton at every T from 256 to 65536, 13-34 for the diagonal of a dense Jacobian).
# With them the model predicts ParaGRU at B = 2, T = 8192, d = 64 in 0.55 s (measured 0.37 s).
NEWTON_EXACT_ITERATIONS = 5
NEWTON_QUASI_ITERATIONS = 30


def _small_matmul_seconds(flops: float, size: int) -> float:
    """Batched products of ``size x size`` matrices: below 64 the rate falls about in proportion
    (the matrix scans of DeltaNet at 32 and of a TTT memory at 16 ran at about 23 and 12
    GFLOP/s on the project's 2-core machines, benchmarks/bench_cost_model.py)."""
    return flops / (FLOPS_PER_SECOND * min(1.0, size / 64))


def _op_work(node: ir.Expr) -> tuple[int, float, float]:
    """(ops, elements, flops) of evaluating ``node`` once per step and batch row, its subtree included."""
    ops, elements, flops = 0, 0.0, 0.0
    seen: set[int] = set()
    stack = [node]
    while stack:
        current = stack.pop()
        if id(current) in seen or not isinstance(current, Op):
            continue
        seen.add(id(current))
        ops += 1
        size = _numel(current.type.shape)
        elements += size
        if current.op == "matmul":
            inner = current.args[0].type.shape[-1] if current.args[0].type.rank else 1
            flops += 2.0 * size * inner
        stack.extend(current.args)
    return ops, elements, flops


def _seconds(ops: float, elements: float, flops: float) -> float:
    return ops * OP_OVERHEAD_SECONDS + elements / ELEMENTS_PER_SECOND + flops / FLOPS_PER_SECOND


def _stepwise_statements(analysis: Analysis) -> list[ir.Expr]:
    cell = analysis.cell
    values: list[ir.Expr] = []
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            continue
        if isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            continue
        if isinstance(statement, ir.ScanAssign):
            values.extend(statement.lifts)
            values.extend(statement.monoid.results)
        elif isinstance(statement, (ir.Assign, ir.Update, ir.Emit)):
            values.append(statement.value)
    return values


def _newton_seconds(analysis: Analysis, solver: object, options: PlanOptions, per_step: tuple[int, float, float]) -> float:
    """Newton's method over the trajectory: a few iterations of (step for all ``t``, its
    vector-Jacobian products, one scan of the linearised steps)."""
    from .backends.newton import JacobianMode, JacobianStructure  # the solver is newton's JacobianPlan

    batch, length = options.workload.batch, options.workload.length
    requested = dict(options.backend_options).get("jacobian", "auto")
    mode = solver.mode(JacobianMode(requested)) if requested in {m.value for m in JacobianMode} else JacobianMode.AUTO  # type: ignore[attr-defined]
    size, block = solver.size, solver.block_size  # type: ignore[attr-defined]
    exact = solver.structure is JacobianStructure.DIAGONAL or mode is JacobianMode.FULL  # type: ignore[attr-defined]
    iterations = NEWTON_EXACT_ITERATIONS if exact else NEWTON_QUASI_ITERATIONS
    ops, elements, flops = per_step
    evaluation = _seconds(ops, elements * batch * length, flops * batch * length)
    products = block  # one vector-Jacobian product (about twice an evaluation) per position in a block
    rounds = max(1, math.ceil(math.log2(length)))
    if block == 1 or mode is JacobianMode.DIAGONAL:
        scan = _seconds(2 * math.sqrt(length) + 10, 8 * size * batch * length, 0.0)
    else:
        blocks = len(solver.blocks)  # type: ignore[attr-defined]
        scan = _seconds(8 * rounds, 2 * rounds * blocks * block * block * batch * length, 0.0)
        scan += _small_matmul_seconds(rounds * 2.0 * batch * length * blocks * (block**3 + block**2), block)
    per_iteration = evaluation * (1 + 2 * products) + scan + _seconds(12, 6 * size * batch * length, 0.0)
    # The initial guess and the read-outs are one evaluation each.
    return (iterations + 1) * per_iteration + 2 * evaluation


def _newton_lower_bound(analysis: Analysis, options: PlanOptions) -> float | None:
    """Newton's predicted time if the step's Jacobian were diagonal (any other structure costs
    more), without analysing it; None when the newton backend cannot run the cell."""
    from .backends import newton  # the Jacobian plan's types

    if newton.unsupported(analysis) is not None:
        return None
    size = sum(_numel(state.type.shape) for state in analysis.cell.states)
    diagonal = newton.JacobianPlan(newton.JacobianStructure.DIAGONAL, (), size, 1, ())
    return predict_seconds(analysis, BackendKind.NEWTON, (), options, diagonal)


def predict_seconds(analysis: Analysis, backend: BackendKind, steps: tuple[StepPlan, ...], options: PlanOptions, solver: object | None = None) -> float:
    """Predicted forward time of ``backend`` running ``steps`` on ``options.workload``, on one CPU.

    A roofline of eager torch: every op costs a dispatch, plus its elements at
    :data:`ELEMENTS_PER_SECOND` and its matmul flops at :data:`FLOPS_PER_SECOND`.  The
    time-parallel part is common to every backend and included once.  The ``fused`` loop
    is priced per step at the generated C's rates; ``newton`` (``solver`` is its plan's
    Jacobian plan) as a nominal number of iterations of whole-sequence evaluations,
    vector-Jacobian products and scans.
    """
    batch, length = options.workload.batch, options.workload.length
    rounds = max(1, math.ceil(math.log2(length)))
    parallel_ops, parallel_elements, parallel_flops = 0, 0.0, 0.0
    for statement in analysis.cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            o, e, f = _op_work(statement.value)
            parallel_ops, parallel_elements, parallel_flops = parallel_ops + o, parallel_elements + e, parallel_flops + f
    total = _seconds(parallel_ops, parallel_elements * batch * length, parallel_flops * batch * length)
    if backend is BackendKind.SEQUENTIAL:
        ops, elements, flops = 0, 0.0, 0.0
        for value in _stepwise_statements(analysis):
            o, e, f = _op_work(value)
            ops, elements, flops = ops + o, elements + e, flops + f
        per_step = STEP_OVERHEAD_SECONDS + ops * STEP_OP_SECONDS + len(analysis.cell.scans) * STEP_COMBINE_SECONDS
        return total + length * (per_step + elements * batch / ELEMENTS_PER_SECOND + flops * batch / FLOPS_PER_SECOND)
    if backend in (BackendKind.FUSED, BackendKind.NEWTON):
        ops, elements, flops = 0, 0.0, 0.0
        for value in _stepwise_statements(analysis):
            o, e, f = _op_work(value)
            ops, elements, flops = ops + o, elements + e, flops + f
        if backend is BackendKind.NEWTON:
            return total + _newton_seconds(analysis, solver, options, (ops, elements, flops))
        per_row = elements / FUSED_ELEMENTS_PER_SECOND + flops / FUSED_FLOPS_PER_SECOND
        return total + FUSED_CALL_SECONDS + length * (FUSED_STEP_SECONDS + batch * per_row)
    states = {s.name: s for s in analysis.cell.states}
    scans = {s.name: s for s in analysis.cell.scans}
    for step in steps:
        if step.form is Form.JOINT_MATRIX_SCAN or step.form is Form.BLOCK_MATRIX_SCAN:
            total += _block_scan_seconds(analysis, step, batch, length)
            continue
        (name,) = step.names
        if name in scans:
            carries = sum(_numel(c.type.shape) for c in scans[name].monoid.carries)
            o, e, _ = _op_work(ir.Op("add", tuple(scans[name].monoid.results), ir.Type(())) if len(scans[name].monoid.results) > 1 else scans[name].monoid.results[0])
            total += rounds * _seconds(o + 4, (e + carries) * batch * length, 0.0)
            continue
        shape = states[name].type.shape
        size = _numel(shape)
        recurrence = analysis.state(name).recurrence
        terms = [t for t in (getattr(recurrence, "decay", None), getattr(recurrence, "input", None)) if t is not None]
        term_ops = sum(_op_work(t)[0] for t in terms)
        term_elements = size * max(1, term_ops)  # the decay and input terms, broadcast to the state
        stored = size * batch * length  # the state of every step, written and read back by the outputs
        match step.form:
            case Form.TIME_PARALLEL:
                total += _seconds(term_ops, term_elements * batch * length, 0.0)
            case Form.TRITON_SELECTIVE_SCAN:  # the state never leaves the chip: its terms only
                total += _seconds(term_ops + 2 * math.sqrt(length) + 10, term_elements * batch * length, 0.0)
                stored = 0
            case Form.LINEAR_SCAN | Form.TRITON_SCAN:
                total += _seconds(term_ops + 2 * math.sqrt(length) + 10, (term_elements + 8 * size) * batch * length, 0.0)
            case Form.LOW_RANK_MATRIX_SCAN:
                rows = shape[0] if recurrence.side is Side.LEFT else shape[1]
                matrices = (rows * rows + size) * batch * length  # the matrices and values, copied every round
                total += _seconds(term_ops + 8 * rounds, 4 * stored + 2 * rounds * matrices, 0.0)
                total += _small_matmul_seconds(rounds * 2.0 * batch * length * (rows**3 + rows * size), rows)
            case Form.DENSE_MATRIX_SCAN:
                matrices = (size * size + size) * batch * length
                total += _seconds(term_ops + 8 * rounds, size * term_elements * batch * length + 4 * stored + 2 * rounds * matrices, 0.0)
                total += _small_matmul_seconds(rounds * 2.0 * batch * length * (size**3 + size**2), size)
            case Form.SEMIRING_DIAGONAL_SCAN:
                total += _seconds(term_ops + 4 * rounds, (term_elements + 4 * rounds * size) * batch * length, 0.0)
            case Form.SEMIRING_MATRIX_SCAN:
                # Each round broadcasts [n, n, n] sums and reduces them with logsumexp/amax: about
                # twenty passes of transcendental work per element.
                total += _seconds(term_ops + 4 * rounds, (size * term_elements + 20 * rounds * size**3) * batch * length, 0.0)
            case Form.CONVOLUTION:
                assert step.conv is not None
                readout_size = sum(_numel(r.type.shape) for r in step.conv.readouts)
                readout_ops = sum(_op_work(r)[0] for r in step.conv.readouts)
                blocks = math.ceil(length * size / CONVOLUTION_BLOCK_ELEMENTS)
                points = 2 * length
                # The kernel: decay powers and read-outs over T x state elements, shared by the
                # batch; the final state: one matmul of the driver with those powers; the
                # read-outs: three FFTs of 2T points per batch row and read-out element.
                kernel_elements = length * size * (4 + readout_ops)
                fft_elements = 3 * batch * readout_size * points * math.log2(points)
                total += _seconds(term_ops + blocks * (6 + readout_ops) + 12, kernel_elements + fft_elements, 2.0 * batch * length * size)
                stored = 0
            case Form.CHUNKED | Form.TRITON_CHUNKED:
                assert step.chunk is not None
                keys, values = (shape[1], shape[0]) if step.chunk.transposed else shape
                chunk = options.chunk_size
                chunks = math.ceil(length / chunk)
                readouts = len(step.chunk.queries)
                flops = 2.0 * batch * length * ((keys + values) * chunk * readouts + 2 * keys * values)
                ops = 40 + term_ops
                if step.chunk.kind in (ChunkKind.DELTA_RULE, ChunkKind.GATED_DELTA_RULE):
                    # Batched over all chunks: R L^T, two triangular solves, the chunk
                    # transitions M (K x K) and inputs B, the read-outs; then a loop over
                    # chunks of one K x K by K x V product each.
                    ops += 2 * chunks + 30
                    per_step = chunk * (3 * keys + 2 * values) + keys * keys + 2 * keys * values + keys * keys * values / chunk
                    flops += 2.0 * batch * length * per_step
                else:
                    ops += 2 * math.sqrt(chunks)
                total += _seconds(ops, (keys + values + chunk) * batch * length * 4, flops)
                stored = 0
        if stored:
            total += stored * 2 / ELEMENTS_PER_SECOND  # outputs read the stored states
    return total


def _block_scan_seconds(analysis: Analysis, step: StepPlan, batch: int, length: int) -> float:
    """A scan of ``nb`` independent ``m x m`` blocks (a block-diagonal state or a coupled group).

    The transition is applied to ``m`` probe states at once (one evaluation, ``m`` times the
    elements), giving every block's matrix; :func:`~recdsl.backends.scans.block_linear_scan`
    then runs about ``sqrt(T)`` chunk steps, each ``m^3 + 2 m^2`` fused multiply-adds on
    planes for ``m <= 4`` (so as many ops) or a few batched matmuls above.
    """
    names = step.names
    types = [analysis.state(name).type for name in names]
    if step.form is Form.JOINT_MATRIX_SCAN:
        joint = analysis.group(names).recurrence
        transitions = list(joint.transitions) + [t for t in joint.inputs if t is not None]
    else:
        recurrence = analysis.state(names[0]).recurrence
        joint = recurrence
        transitions = [recurrence.transition] + ([recurrence.input] if recurrence.input is not None else [])
    axes = joint.blocks.axes if joint.blocks is not None else ()
    shared = joint.blocks is not None and joint.blocks.shared
    m = sum(block_size(t, axes) for t in types)
    size = sum(_numel(t.shape) for t in types)
    blocks = size // m
    matrices = 1 if shared else blocks
    term_ops = sum(_op_work(t)[0] for t in transitions)
    term_elements = sum(_op_work(t)[1] for t in transitions)
    # m probes at once; shared blocks probe one block's worth (the block axes of size 1).
    probe_elements = term_elements * (m / blocks if shared else m)
    chunk_steps = 1.2 * math.sqrt(length)
    rows = batch * length
    if m <= 4:  # PLANAR_BLOCK
        ops = chunk_steps * (m**3 + 2 * m**2)
        elements = rows * (3 * matrices * (m**3 + m**2) + 3 * blocks * m**2)
        scan = _seconds(ops, elements, 0.0)
    else:
        scan = _seconds(chunk_steps * 6, rows * 3 * (matrices * m**2 + size), 0.0)
        scan += _small_matmul_seconds(2.0 * rows * 2 * (matrices * m**3 + blocks * m**2), m)
    stored = size * rows  # the states of every step, read back by the outputs
    return _seconds(term_ops + 20, probe_elements * rows + 4 * matrices * m * m * rows + 4 * stored, 0.0) + scan + stored * 2 / ELEMENTS_PER_SECOND


# ---- planning ------------------------------------------------------------------------------


def _triton_plan(analysis: Analysis, options: PlanOptions) -> "ExecutionPlan | Unsupported":
    if importlib.util.find_spec("triton") is None:
        return Unsupported("triton is not installed (pip install triton)")
    from .backends.kernel_cache import GeneratedSource  # hashed once here, not per call
    from .backends.triton_backend import plan_kernels  # the kernels' source is written from the IR, once

    planned = plan_kernels(analysis, options)
    if isinstance(planned, Unsupported):
        return planned
    steps, source = planned
    # Every kernel of these plans loads its operands with a conversion to the accumulator.
    return ExecutionPlan(BackendKind.TRITON, "", steps, options, kernel_source=GeneratedSource(source), low_precision=LowPrecisionInputs.NATIVE, analysis=analysis)


def _newton_plan(analysis: Analysis, options: PlanOptions) -> "ExecutionPlan | Unsupported":
    from .backends import newton  # the Jacobian's structure is found by propagating dependence patterns (torch)

    reason = newton.unsupported(analysis)
    if reason is not None:
        return Unsupported(reason)
    if _is_directed(analysis):
        return _directed_plan(analysis, options, BackendKind.NEWTON, Form.NEWTON, _newton_plan, solver=newton.jacobian_structure(analysis))
    steps = tuple(StepPlan(group, Form.NEWTON) for group in analysis.schedule)
    return ExecutionPlan(BackendKind.NEWTON, "", steps, options, solver=newton.jacobian_structure(analysis), analysis=analysis)


def _is_directed(analysis: Analysis) -> bool:
    """Whether the cell has reverse states or delays (the step-by-step backends then run it in parts)."""
    return bool(analysis.cell.reversed_recurrences or analysis.delays)


def _directed_plan(analysis: Analysis, options: PlanOptions, kind: BackendKind, form: Form, make, solver: object | None = None, gpu: "ExecutionPlan | None" = None) -> "ExecutionPlan | Unsupported":
    """The plan of a step-by-step backend for a cell with reverse states or delays: the
    delays shifted, each other group of the schedule a forward sub-cell planned by ``make``
    (a reverse one run on the flipped sequence; backends/directed.py)."""
    from .backends import directed  # the sub-cells are built from the IR, once

    parts = directed.split(analysis)
    if isinstance(parts, str):
        return Unsupported(parts)
    planned = []
    for part in parts:
        sub = make(part.analysis, options)
        if isinstance(sub, Unsupported):
            return Unsupported(f"group {', '.join(part.names)} ({part.direction}): {sub.reason}")
        planned.append(replace(part, plan=sub))
    steps = tuple(StepPlan(group, Form.TIME_PARALLEL if set(group) <= analysis.delays else form) for group in analysis.schedule)
    return ExecutionPlan(kind, "", steps, options, solver=solver, gpu=gpu, directed=directed.DirectedPlan(tuple(planned)), analysis=analysis)


def _fused_plan(analysis: Analysis, options: PlanOptions) -> "ExecutionPlan | Unsupported":
    from .backends import fused_sequential  # the step program: leaves, merged matmuls, elementwise nodes

    if _is_directed(analysis):
        if fused_sequential.compiler() is None:
            return Unsupported("no C compiler found (set $CC)")
        gpu_directed = triton_fused_plan(analysis, options)
        if isinstance(gpu_directed, ExecutionPlan):
            gpu_directed = replace(gpu_directed, reason="backend 'fused' on CUDA tensors: the fused sequential Triton kernel")
        return _directed_plan(analysis, options, BackendKind.FUSED, Form.FUSED, _fused_plan, gpu=gpu_directed if isinstance(gpu_directed, ExecutionPlan) else None)
    program = fused_sequential.prepare(analysis)
    if isinstance(program, str):
        return Unsupported(program)
    steps = tuple(StepPlan(group, Form.FUSED) for group in analysis.schedule)
    gpu = triton_fused_plan(analysis, options)  # on CUDA tensors the same program runs as the fused Triton kernel
    if isinstance(gpu, ExecutionPlan):
        gpu = replace(gpu, reason="backend 'fused' on CUDA tensors: the fused sequential Triton kernel")
    return ExecutionPlan(BackendKind.FUSED, "", steps, options, solver=program, gpu=gpu if isinstance(gpu, ExecutionPlan) else None, analysis=analysis)


def triton_fused_plan(analysis: Analysis, options: PlanOptions) -> "ExecutionPlan | Unsupported":
    """The fused sequential Triton kernel's plan (backend ``triton``, every step
    :attr:`Form.TRITON_FUSED`), or why it cannot run the cell.

    The kernel runs any cell whose step is vectors and scalars, nonlinear and coupled ones
    included: the generated source and the step program are made here, once.
    """
    if importlib.util.find_spec("triton") is None:
        return Unsupported("triton is not installed (pip install triton)")
    from .backends import triton_fused  # the step program (as the fused C loop's) and its kernels' source

    if _is_directed(analysis):
        return _directed_plan(analysis, options, BackendKind.TRITON, Form.TRITON_FUSED, triton_fused_plan)
    prepared = triton_fused.prepare(analysis)
    if isinstance(prepared, str):
        return Unsupported(prepared)
    kernel_plan, source = prepared
    steps = tuple(StepPlan(group, Form.TRITON_FUSED) for group in analysis.schedule)
    from .backends.kernel_cache import GeneratedSource  # hashed once here, not per call

    return ExecutionPlan(BackendKind.TRITON, "", steps, options, kernel_source=GeneratedSource(source), solver=kernel_plan, analysis=analysis)


def _runs_step_by_step(analysis: Analysis) -> bool:
    """Whether a state is nonlinear or states are coupled: no scan kernel applies, the fused kernel may."""
    return bool(analysis.coupled_groups) or any(isinstance(state.recurrence, Nonlinear) for state in analysis.states)


def _triton_or_fused_plan(analysis: Analysis, options: PlanOptions) -> "ExecutionPlan | Unsupported":
    """Backend ``triton``: the scan kernels; for a cell that must run step by step, the fused sequential kernel."""
    planned = _triton_plan(analysis, options)
    if isinstance(planned, ExecutionPlan) or not _runs_step_by_step(analysis):
        return planned
    fused = triton_fused_plan(analysis, options)
    if isinstance(fused, Unsupported):
        return Unsupported(f"{planned.reason}; the fused sequential kernel cannot run it either: {fused.reason}")
    return fused


# The options each backend takes through compile(backend_options=...).
BACKEND_OPTIONS: dict[BackendKind, tuple[str, ...]] = {
    BackendKind.NEWTON: ("jacobian", "tolerance", "max_iterations", "warm_start"),
    BackendKind.TRITON: ("split_programs", "split_min_steps"),  # the scan kernels' TimeSplit (backends/triton_codegen.py)
}


def _check_backend_options(kind: BackendKind, options: PlanOptions) -> None:
    accepted = BACKEND_OPTIONS.get(kind, ())
    for key, _ in options.backend_options:
        if key not in accepted:
            raise BackendError(
                f"backend '{kind}' has no option '{key}'", expected=f"options of backend '{kind}': {', '.join(accepted) if accepted else 'none'}"
            )


def plan_backend(analysis: Analysis, backend: BackendKind, options: PlanOptions) -> ExecutionPlan | Unsupported:
    """The plan of one backend for ``analysis``'s cell, or why that backend cannot run it."""
    match backend:
        case BackendKind.SEQUENTIAL:
            steps: tuple[StepPlan, ...] | Unsupported = sequential_steps(analysis)
        case BackendKind.SCAN | BackendKind.CHUNKED:
            steps = parallel_steps(analysis, chunked=backend is BackendKind.CHUNKED)
        case BackendKind.TRITON:
            return _triton_or_fused_plan(analysis, options)
        case BackendKind.NEWTON:
            return _newton_plan(analysis, options)
        case BackendKind.FUSED:
            return _fused_plan(analysis, options)
    if isinstance(steps, Unsupported):
        return steps
    return ExecutionPlan(backend, "", steps, options, analysis=analysis)


def backend_kind(name: str | BackendKind) -> BackendKind:
    """The backend called ``name``; a :class:`BackendError` lists the others."""
    if isinstance(name, BackendKind):
        return name
    for kind in BackendKind:
        if kind.value == name:
            return kind
    raise BackendError(f"unknown backend '{name}'", expected="one of: auto, " + ", ".join(k.value for k in BackendKind))


_CPU_CANDIDATES = (BackendKind.SEQUENTIAL, BackendKind.SCAN, BackendKind.CHUNKED)
# The faster forms of a cell that has no scan form (auto considers them only then).
_STEPWISE_CANDIDATES = (BackendKind.FUSED, BackendKind.NEWTON)
_NOT_A_CANDIDATE = (
    "every recurrence has a scan form, which auto keeps: it runs on any device (Triton on a GPU) "
    "without compiling C per cell; ask for it by name"
)


def plan(analysis: Analysis, backend: str | BackendKind = "auto", options: PlanOptions = PlanOptions()) -> ExecutionPlan:
    """The execution plan of ``analysis``'s cell on ``backend`` (a name, or ``auto``)."""
    if backend != "auto":
        kind = backend_kind(backend)
        _check_backend_options(kind, options)
        planned = plan_backend(analysis, kind, options)
        if isinstance(planned, Unsupported):
            raise BackendError(f"backend '{kind}' cannot run cell {analysis.cell.name}: {planned.reason}", expected="backend='sequential' or 'auto'")
        costs = ()
        if kind in _CPU_CANDIDATES + _STEPWISE_CANDIDATES:
            costs = (Cost(kind, predict_seconds(analysis, kind, planned.steps, options, planned.solver)),)
        reason = f"backend '{kind}' was requested"
        if kind is BackendKind.CHUNKED:
            reason += _chunked_note(planned)
        return replace(planned, reason=reason, costs=costs)
    return _plan_auto(analysis, options)


def _chunked_note(chunked: ExecutionPlan) -> str:
    """What the ``chunked`` backend does not chunk, and why, for its plan's reason.

    The chunked backend chunks the matrix states read out linearly and scans the rest, as
    the ``scan`` backend does (mLSTM: its memory chunked, its normaliser scanned), so a
    recurrence it cannot chunk is no error; but the plan says which and why, so that a
    request for ``chunked`` never silently runs a scan."""
    missing = chunked.not_chunked()
    if not missing:
        return ""
    listed = "; ".join(f"{name}: {reason}" for name, reason in missing)
    if not any(step.form is Form.CHUNKED for step in chunked.steps):
        return f"; nothing in this cell is chunked, so it runs as backend 'scan' would (not chunked: {listed})"
    return f"; not chunked, scanned instead: {listed}"


def _with_rejections_of(chosen: ExecutionPlan, chunked: ExecutionPlan | None) -> ExecutionPlan:
    """``chosen`` with, for each recurrence it scans, why the chunked candidate did not (or was not picked)."""
    if chunked is None or chosen.backend is not BackendKind.SCAN:
        return chosen
    steps = []
    for step in chosen.steps:
        other = chunked.step(step.names[0])
        if other.form is Form.CHUNKED:
            note = Rejected(Form.CHUNKED, "the cost model predicts the scan faster for these dims")
            steps.append(replace(step, rejected=step.rejected + (note,)))
        else:
            steps.append(replace(step, rejected=step.rejected + other.rejected))
    return replace(chosen, steps=tuple(steps))


def _plan_auto(analysis: Analysis, options: PlanOptions) -> ExecutionPlan:
    """The candidate the cost model predicts fastest; never one predicted slower than the loop.

    A cell whose recurrences all have scan forms runs on ``scan`` or ``chunked`` (or the
    loop, when the model predicts it faster).  A cell that has none (a nonlinear or coupled
    recurrence) is also planned on ``fused`` (the loop compiled to C; unavailable without a
    C compiler) and ``newton``, and runs on whichever of those and the loop is predicted
    fastest.  On CUDA tensors the plan's ``gpu`` alternative runs: the Triton kernels where
    they apply (the scan and chunked kernels, or for a cell with no scan form the fused
    sequential kernel); otherwise, after ``fused`` (CPU only), the faster of ``newton`` and the loop.
    """
    if options.backend_options:
        raise BackendError("backend options need a named backend, not auto", expected="e.g. backend='newton', backend_options={'jacobian': 'diagonal'}")
    candidates: dict[BackendKind, ExecutionPlan] = {}
    costs: list[Cost] = []
    for kind in _CPU_CANDIDATES:
        planned = plan_backend(analysis, kind, options)
        if isinstance(planned, Unsupported):
            costs.append(Cost(kind, None, planned.reason))
            continue
        candidates[kind] = planned
        costs.append(Cost(kind, predict_seconds(analysis, kind, planned.steps, options)))
    stepwise_only = BackendKind.SCAN not in candidates
    for kind in _STEPWISE_CANDIDATES:
        if not stepwise_only:
            costs.append(Cost(kind, None, _NOT_A_CANDIDATE, candidate=False))
            continue
        if kind is BackendKind.NEWTON and BackendKind.SEQUENTIAL in candidates:
            # The Jacobian's structure takes seconds to find for large states: skip it when
            # even a diagonal one (the cheapest) is predicted slower than the loop.
            bound = _newton_lower_bound(analysis, options)
            if bound is not None and bound > costs[0].seconds:  # type: ignore[operator]
                costs.append(Cost(kind, bound, "at least: even a diagonal Jacobian is predicted slower than the loop, so its structure was not analysed"))
                continue
        planned = plan_backend(analysis, kind, options)
        if isinstance(planned, Unsupported):
            costs.append(Cost(kind, None, planned.reason))
            continue
        candidates[kind] = planned
        assumed = f"Jacobian {planned.solver.describe()}" if kind is BackendKind.NEWTON else None  # type: ignore[union-attr]
        costs.append(Cost(kind, predict_seconds(analysis, kind, planned.steps, options, planned.solver), assumed))
    predicted = {c.backend: c.seconds for c in costs if c.seconds is not None}
    order = _CPU_CANDIDATES + _STEPWISE_CANDIDATES
    # Ties go to the earlier (simpler) form: sequential, then scan, chunked, fused, newton.
    best = min(predicted, key=lambda kind: (predicted[kind], order.index(kind)))
    chosen = _with_rejections_of(candidates[best], candidates.get(BackendKind.CHUNKED))
    unavailable = "; ".join(f"{c.backend}: {c.reason}" for c in costs if c.backend in _STEPWISE_CANDIDATES and c.seconds is None and c.candidate)
    blocked = next((c.reason for c in costs if c.backend is BackendKind.SCAN and c.reason), None)
    if stepwise_only:
        if best is BackendKind.NEWTON:
            winner = f"Newton's method over the trajectory (Jacobian {chosen.solver.describe()}) is predicted fastest"  # type: ignore[union-attr]
        elif best is BackendKind.FUSED:
            winner = "the loop compiled to C is predicted fastest"
        else:
            winner = "the loop over time is predicted fastest"
        timings = ", ".join(f"{kind} {predicted[kind] * 1e3:.3g} ms" for kind in order if kind in predicted)
        reason = f"no time-parallel form: {blocked}; {winner} ({timings})"
        if unavailable:
            reason += f"; unavailable: {unavailable}"
    elif best is BackendKind.SEQUENTIAL:
        reason = f"no time-parallel form: {blocked}" if blocked else "the cost model predicts the loop over time fastest for these dims"
    elif best is BackendKind.CHUNKED and any(step.form is Form.CHUNKED for step in chosen.steps):
        chunked = ", ".join(f"{s.name} ({s.chunk.kind})" for s in chosen.steps if s.chunk is not None)
        reason = (
            f"matrix state {chunked} is read out linearly, so chunks of {options.chunk_size} steps compute it with matmuls "
            "without storing it per step; the other recurrences are scanned"
        )
    else:
        reason = "every recurrence is associative (affine, semiring-affine or a declared monoid), so each is one scan over the sequence"
    gpu: ExecutionPlan | Unsupported | None
    if best in (BackendKind.SCAN, BackendKind.CHUNKED):
        gpu = _triton_plan(analysis, options)
        if isinstance(gpu, ExecutionPlan):
            reason += "; on a GPU, the generated Triton kernels"
            gpu = replace(gpu, reason="auto on CUDA tensors: the generated Triton kernels apply")
    elif stepwise_only and isinstance(kernel := triton_fused_plan(analysis, options), ExecutionPlan):
        # Measured on an H200 (benchmarks/RESULTS_GPU.md): the fused kernel runs GRU and LSTM
        # 30x faster than the loop of torch ops, and ParaGRU's forward faster than newton.
        gpu = replace(kernel, reason="auto on CUDA tensors: the fused sequential Triton kernel (the time loop inside one kernel, gate math fused)")
        reason += "; on a GPU, the fused sequential Triton kernel"
    elif best is BackendKind.FUSED:
        # The generated C runs on the CPU only: on CUDA tensors, the better of the others.
        fallback = min((k for k in (BackendKind.SEQUENTIAL, BackendKind.NEWTON) if k in predicted), key=lambda kind: predicted[kind])
        gpu = replace(candidates[fallback], reason=f"auto on CUDA tensors: the fused loop runs on the CPU only; {fallback} is predicted the faster of the others")
        reason += f"; on a GPU, {fallback}"
    else:
        gpu = None
    return replace(chosen, reason=reason, costs=tuple(costs), gpu=gpu if isinstance(gpu, ExecutionPlan) else None)
