"""The newton backend: a nonlinear recurrence solved for all steps at once by Newton's method.

The steps ``s_t = f(s_{t-1}, x_t)`` of a cell (``s`` every state, coupled or not) form
one system of ``T`` equations ``F_t(S) = f(s_{t-1}, x_t) - s_t = 0`` in the whole
trajectory ``S`` (DEER, Lim et al., 2023; ParaRNN, Danieli et al., 2025).  Newton's
method linearises it around the current trajectory: with ``J_t = df/ds_{t-1}`` evaluated
there and the residual ``r_t = f(s_{t-1}, x_t) - s_t``, the correction solves the linear
recurrence

    delta_t = J_t delta_{t-1} + r_t,    delta_{-1} = 0 (the initial state is given),

one parallel scan (:func:`~recdsl.backends.scans.linear_scan` when ``J`` is diagonal,
:func:`~recdsl.backends.scans.block_linear_scan` of small blocks otherwise).  Step ``t``
is exact after ``t + 1`` iterations whatever ``J`` is (by induction: once ``s_{t-1}`` is
exact its residual and correction vanish, so ``delta_t = r_t`` makes ``s_t = f(s_{t-1})``),
so replacing ``J`` by its diagonal (quasi-Newton, Gonzalez et al., 2024) changes only
the speed of convergence, never the solution.

What is decided once from the IR (:func:`jacobian_structure`): which elements of the
previous state each element of the new state reads, found by propagating dependence
patterns through the update's operations (elementwise ops keep an element's own
dependences, a matmul or a reduction mixes along its axis, ``outer`` and ``diag`` have
their own patterns).  The connected groups of that pattern are the Jacobian's blocks:
all of size 1 means diagonal (ParaGRU), equal small groups mean block-diagonal (LSTM-like
cells whose ``c[i]`` and ``h[i]`` read each other: blocks of 2), one group of every
element means dense (GRU).  The blocks' values are vector-Jacobian products ``v^T J`` with one
vector per position inside a block (the groups never overlap, so one product fills that
row of every block), so a diagonal Jacobian costs one product per iteration.

What is decided per call: convergence.  The residual is measured per element relative to
the state's size, ``|r| / (1 + |s|)``, and the iteration stops when its maximum is at most
``tolerance`` (default ``16 * eps`` of the computing dtype: 1.9e-6 in float32, 3.6e-15 in
float64), or after ``max_iterations`` (default 48).  An unconverged result is never
returned: the steps from the first one whose residual is above tolerance are run one by
one, exactly as the sequential backend would.  A :class:`NewtonSolve` reports the
iterations, the final residual and how many steps ran sequentially.

The initial guess is the initial state held constant over the sequence, so the first
iteration solves the cell linearised at its initial state (at zero for zero-initialised
states): ParaRNN's guess, computed by the scan rather than by one extra step.

Gradients come from implicit differentiation, never from the iterations: at the
solution ``S = f(shift(S), theta)``, the adjoint ``lambda_t = dL/ds_t + J_{t+1}^T lambda_{t+1}``
is one more scan in reverse time with the transposed Jacobians of the converged
trajectory, and ``dL/dtheta = sum_t lambda_t^T df_t/dtheta`` is the ordinary backward of one
step function evaluated for all steps at once, which also carries ``J_0^T lambda_0`` to the
initial state.  With the quasi-Newton diagonal of a larger block, the adjoint is solved
the same way as the forward system: residuals with the exact ``J^T`` (vector-Jacobian
products of the step), corrections by the reverse diagonal scan.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Callable, Iterator, Mapping

import torch

from recdsl import ir
from recdsl.analysis import Analysis
from recdsl.errors import BackendError
from recdsl.ir import Kind, RefKind
from recdsl.ops import OPS

from .scans import block_linear_scan, linear_scan
from .torch_ops import ELEMENTWISE, REDUCTIONS, Evaluator, Numerics, _index_key, _reduce_dims, align, join, matmul, reshape, transpose

# A state larger than this (elements per batch row and head) is not analysed: the
# dependence pattern holds one number per pair of elements for each operation.
MAX_STATE_ELEMENTS = 1024
# A block larger than this is solved with its diagonal (quasi-Newton) unless the full
# Jacobian is asked for: a dense block costs m^2 numbers per step and m^3 per combine.
MAX_FULL_BLOCK = 64
DEFAULT_MAX_ITERATIONS = 48
# The options of ``run`` a user passes through ``recdsl.compile(backend_options=...)``.
OPTIONS = ("jacobian", "tolerance", "max_iterations", "warm_start")
TOLERANCE_IN_EPS = 16


class JacobianStructure(str, Enum):
    """The shape of ``df/ds_{t-1}`` over the joint state (all states, flattened, concatenated)."""

    DIAGONAL = "diagonal"  # each element reads only its own previous value
    BLOCK_DIAGONAL = "block-diagonal"  # independent groups of elements, padded to one size
    DENSE = "dense"  # one group of every element


class JacobianMode(str, Enum):
    """How much of the Jacobian each Newton step uses (the ``jacobian=`` option)."""

    AUTO = "auto"  # FULL when blocks have at most MAX_FULL_BLOCK elements, else DIAGONAL
    FULL = "full"  # exact Newton: every block
    DIAGONAL = "diagonal"  # quasi-Newton: the diagonal of each block


@dataclass(frozen=True)
class StateSlot:
    """Where one state lives in the joint state vector."""

    name: str
    shape: tuple[int, ...]
    offset: int
    size: int


@dataclass(frozen=True)
class JacobianPlan:
    """The structure of a cell's step Jacobian, decided from the IR.

    ``blocks[b]`` lists the joint-state indices of block ``b`` (all blocks have
    ``block_size`` entries; ``size`` marks padding, an element that is always zero).
    """

    structure: JacobianStructure
    slots: tuple[StateSlot, ...]
    size: int
    block_size: int
    blocks: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        if self.structure is JacobianStructure.DIAGONAL:
            return f"diagonal ({self.size} independent elements)"
        if self.structure is JacobianStructure.DENSE:
            return f"dense ({self.size} x {self.size})"
        return f"block-diagonal ({len(self.blocks)} blocks of {self.block_size})"

    def mode(self, requested: JacobianMode) -> JacobianMode:
        """The mode a run uses: ``auto`` resolved by the block size."""
        if requested is not JacobianMode.AUTO:
            return requested
        if self.block_size <= MAX_FULL_BLOCK:
            return JacobianMode.FULL
        return JacobianMode.DIAGONAL


@dataclass(frozen=True)
class NewtonSolve:
    """What one call of the newton backend did.

    ``iterations`` Newton updates were applied; ``residual`` is the final maximum of
    ``|f(s_{t-1}) - s_t| / (1 + |s_t|)`` over the steps solved by Newton, ``tolerance``
    the bound it was held to.  ``sequential_steps`` steps (a suffix) were run one by one
    because the iteration budget ran out before they converged.
    """

    iterations: int
    residual: float
    tolerance: float
    converged: bool
    sequential_steps: int
    steps: int
    structure: JacobianStructure
    mode: JacobianMode
    warm_started: bool = False  # the initial guess was the previous call's solution
    # The converged joint-state trajectory [B, T, *heads, n] (detached), kept only with
    # warm_start=True: the next call's initial guess.
    trajectory: torch.Tensor | None = field(default=None, repr=False, compare=False)


# ---- the structure of the Jacobian, from the IR -----------------------------------------------


def cell_is_directed(analysis: Analysis) -> bool:
    """Whether the cell has reverse states or delays: its plan then solves it in parts (:mod:`.directed`)."""
    return bool(analysis.cell.reversed_recurrences or analysis.delays)


def _slots(cell: ir.CellIR) -> tuple[StateSlot, ...]:
    slots, offset = [], 0
    for state in cell.states:
        size = math.prod(state.type.shape)
        slots.append(StateSlot(state.name, state.type.shape, offset, size))
        offset += size
    return tuple(slots)


def unsupported(analysis: Analysis) -> str | None:
    """Why the newton backend cannot run this cell, or None when it can."""
    cell = analysis.cell
    if cell.scans:
        return f"scan '{cell.scans[0].name}' combines a declared monoid, which Newton's method does not linearise"
    if not cell.states:
        return "the cell has no state"
    for state in cell.states:
        if state.type.kind is not Kind.REAL:
            return f"state '{state.name}' is complex (the Jacobian would not be complex-linear)"
    size = sum(slot.size for slot in _slots(cell))
    if size > MAX_STATE_ELEMENTS:
        return f"the states hold {size} elements per batch row (more than {MAX_STATE_ELEMENTS} to analyse the Jacobian's structure)"
    return None


class _Dependence:
    """Which joint-state elements each element of an expression reads: ``[n, *shape]`` of 0/1.

    ``None`` stands for "reads no state".  Values that read no state are treated as dense
    (a param may hold any value), so the pattern is a property of the program, not of
    its current weights, except for zeros the program itself fixes: a const's zero
    entries, and what a product with one keeps zero (:meth:`support`).  A recurrent matrix
    written ``R * mask`` with a block-diagonal const ``mask`` (sLSTM's heads) gives a
    block-diagonal Jacobian.
    """

    def __init__(self, cell: ir.CellIR, slots: tuple[StateSlot, ...]) -> None:
        self.cell = cell
        self.size = sum(s.size for s in slots)
        self.slots = {s.name: s for s in slots}
        self.bindings = {s.name: s.value for s in cell.body if isinstance(s, ir.Assign)}
        self.bindings.update({s.name: s.value for s in cell.body if isinstance(s, ir.Emit) and s.name})
        self.memo: dict[int, tuple[ir.Expr, torch.Tensor | None]] = {}
        self.named: dict[tuple[RefKind, str], torch.Tensor | None] = {}
        self.consts: dict[tuple[RefKind, str], torch.Tensor] = {}
        self.support_memo: dict[int, tuple[ir.Expr, torch.Tensor | None]] = {}

    def const_value(self, name: str) -> torch.Tensor:
        key = (RefKind.CONST, name)
        if key not in self.consts:
            with torch.no_grad():
                evaluator = Evaluator(Numerics(torch.float64, torch.device("cpu")), self.consts)
                for const in self.cell.consts:
                    if (RefKind.CONST, const.name) not in self.consts:
                        self.consts[(RefKind.CONST, const.name)] = evaluator.evaluate(const.value)
                    if const.name == name:
                        break
        return self.consts[key]

    def support(self, node: ir.Expr) -> torch.Tensor | None:
        """Where a value that reads no state can be nonzero (0/1 of its shape); None: anywhere.

        Only zeros the program fixes count: a literal 0, a const's zero entries, and what
        multiplying, dividing, negating, indexing or matrix-multiplying them keeps zero.
        """
        hit = self.support_memo.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        result = self._support(node)
        if result is not None:
            result = result.expand(node.type.shape) if result.dim() <= node.type.rank else result
            if bool(result.all()):
                result = None
        self.support_memo[id(node)] = (node, result)
        return result

    def _support(self, node: ir.Expr) -> torch.Tensor | None:
        if node.type.kind is not Kind.REAL:
            return None
        if isinstance(node, ir.Literal):
            return None if node.value else torch.zeros(node.type.shape)
        if isinstance(node, ir.Ref):
            if node.kind is RefKind.CONST:
                return (self.const_value(node.name) != 0).to(torch.float32)
            if node.kind is RefKind.BINDING and node.name in self.bindings:
                return self.support(self.bindings[node.name])
            return None
        ones = lambda arg: torch.ones(arg.type.shape)  # noqa: E731
        if node.op == "mul":
            a, b = (self.support(arg) for arg in node.args)
            if a is None and b is None:
                return None
            return (a if a is not None else ones(node.args[0])) * (b if b is not None else ones(node.args[1]))
        if node.op in ("div", "neg"):
            return self.support(node.args[0])
        if node.op == "index":
            inner = self.support(node.args[0])
            return None if inner is None else inner[_index_key(node.attrs)]
        if node.op == "matmul":
            a, b = (self.support(arg) for arg in node.args)
            if a is None and b is None:
                return None
            left = a if a is not None else ones(node.args[0])
            right = b if b is not None else ones(node.args[1])
            return _matmul_pattern(left, node.args[0].type.rank, right, node.args[1].type.rank)
        return None

    def of_update(self, state: str) -> torch.Tensor:
        key = (RefKind.STATE_NEW, state)
        if key not in self.named:
            slot = self.slots[state]
            update = self.cell.update(state)
            found = self.of(update.value)
            shape = (self.size,) + slot.shape
            self.named[key] = torch.zeros(shape) if found is None else _lift(found, update.value.type.rank, len(slot.shape)).expand(shape)
        return self.named[key]  # type: ignore[return-value]

    def of(self, node: ir.Expr) -> torch.Tensor | None:
        hit = self.memo.get(id(node))
        if hit is not None and hit[0] is node:
            return hit[1]
        result = self._compute(node)
        self.memo[id(node)] = (node, result)
        return result

    def _compute(self, node: ir.Expr) -> torch.Tensor | None:
        if isinstance(node, ir.Literal):
            return None
        if isinstance(node, ir.Ref):
            if node.kind is RefKind.STATE_PREV:
                slot = self.slots[node.name]
                identity = torch.zeros((self.size, slot.size))
                identity[slot.offset : slot.offset + slot.size] = torch.eye(slot.size)
                return identity.reshape((self.size,) + slot.shape)
            if node.kind is RefKind.STATE_NEW:
                return self.of_update(node.name)
            if node.kind is RefKind.BINDING:
                key = (RefKind.BINDING, node.name)
                if key not in self.named:
                    self.named[key] = self.of(self.bindings[node.name])
                return self.named[key]
            return None
        args = [self.of(a) for a in node.args]
        if all(a is None for a in args):
            return None
        op, rank, shape = node.op, node.type.rank, node.type.shape
        full = (self.size,) + shape
        if op == "where":  # the condition has no derivative
            args[0] = None
            present = [_lift(a, arg.type.rank, rank).expand(full) for a, arg in zip(args, node.args) if a is not None]
            return _union(present, full)
        if node.type.kind is Kind.BOOL:
            return None
        if op in REDUCTIONS:
            (axis,) = node.attrs
            return args[0].amax(dim=_reduce_dims(node.args[0].type.rank, axis)) if args[0] is not None else None
        if op == "matmul":
            (a, b), (ta, tb) = args, (node.args[0].type, node.args[1].type)
            parts = []
            # Structurally, out[i, j] reads a[i, k] and b[k, j] for every k where the other
            # operand's entry is not fixed at zero.
            if a is not None:
                other = self.support(node.args[1]) if b is None else None
                parts.append(_matmul_pattern(a, ta.rank, torch.ones(tb.shape) if other is None else other, tb.rank))
            if b is not None:
                other = self.support(node.args[0]) if a is None else None
                parts.append(_matmul_pattern(torch.ones(ta.shape) if other is None else other, ta.rank, b, tb.rank))
            return _union([p.expand(full) for p in parts], full)
        if op == "outer":
            (u, v) = args
            parts = []
            if u is not None:
                parts.append(u.unsqueeze(-1).expand(full))
            if v is not None:
                parts.append(v.unsqueeze(-2).expand(full))
            return _union(parts, full)
        if op == "diag":
            (value,) = args
            if node.args[0].type.rank == 1:
                return torch.diag_embed(value)
            return torch.diagonal(value, dim1=-2, dim2=-1)
        if op == "index":
            return args[0][_index_key(node.attrs)]
        if op == "mul" and sum(a is None for a in args) == 1:
            # A product with a value fixed at zero somewhere reads nothing there.
            free = 0 if args[0] is None else 1
            zeros = self.support(node.args[free])
            if zeros is not None:
                dependent = 1 - free
                pattern = _lift(args[dependent], node.args[dependent].type.rank, rank).expand(full)
                return pattern * zeros.reshape((1,) * (1 + rank - zeros.dim()) + tuple(zeros.shape)).expand(full)
        if op == "softmax":  # each element reads every element along the axes
            (axis,) = node.attrs
            dims = _reduce_dims(rank, axis)
            return args[0].amax(dim=dims, keepdim=True).expand(full) if dims else args[0]
        if op == "transpose":
            return transpose(args[0], node.args[0].type.rank, *node.attrs)
        if op == "reshape":
            return reshape(args[0], node.args[0].type.rank, shape)
        if op in ("concat", "stack"):  # an operand that reads no state contributes no dependence
            parts = [torch.zeros((self.size,) + arg.type.shape) if a is None else a for a, arg in zip(args, node.args)]
            return join(op, parts, node.args[0].type.rank, node.attrs[0])
        if op not in ELEMENTWISE:
            raise BackendError(f"backend 'newton' has no Jacobian pattern for '{OPS[op].surface}' applied to a value that reads a state", expected="backend='sequential' or 'auto'")
        # Elementwise: each element reads what the operands' elements at its position read.
        present = [_lift(a, arg.type.rank, rank).expand(full) for a, arg in zip(args, node.args) if a is not None]
        return _union(present, full)


def _lift(pattern: torch.Tensor, rank: int, target_rank: int) -> torch.Tensor:
    """A pattern ``[n, *shape]`` of declared rank ``rank`` with singleton dims to broadcast to ``target_rank``."""
    if rank >= target_rank:
        return pattern
    return pattern.reshape(pattern.shape[:1] + (1,) * (target_rank - rank) + pattern.shape[1:])


def _union(patterns: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    result = torch.zeros(shape)
    for pattern in patterns:
        result = torch.maximum(result, pattern)
    return result


def _matmul_pattern(a: torch.Tensor, a_rank: int, b: torch.Tensor, b_rank: int) -> torch.Tensor:
    product = matmul(a, a_rank, b, b_rank)
    return (product > 0).to(torch.float32)


def _groups(pattern: torch.Tensor) -> list[list[int]]:
    """Connected components of the undirected graph with adjacency ``pattern`` (``[n, n]``)."""
    n = pattern.shape[0]
    adjacent = (pattern + pattern.T) > 0
    labels = torch.arange(n)
    while True:  # label propagation: each element takes the smallest label among its neighbours
        candidates = torch.where(adjacent, labels.unsqueeze(0).expand(n, n), torch.full((n, n), n))
        updated = torch.minimum(labels, candidates.amin(dim=1))
        if torch.equal(updated, labels):
            break
        labels = updated
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(index)
    return list(groups.values())


def jacobian_structure(analysis: Analysis) -> JacobianPlan:
    """The structure of the cell's step Jacobian ``df/ds_{t-1}``, from the IR alone.

    Raises :class:`BackendError` when the newton backend cannot run the cell.
    """
    why_not = unsupported(analysis)
    if why_not is not None:
        raise BackendError(f"backend 'newton' cannot run cell {analysis.cell.name}: {why_not}", expected="backend='sequential' or 'auto'")
    cell = analysis.cell
    slots = _slots(cell)
    size = sum(s.size for s in slots)
    dependence = _Dependence(cell, slots)
    # rows: elements of the new state; columns: elements of the previous state
    rows = [dependence.of_update(s.name).reshape(size, s.size).T for s in slots]
    pattern = torch.cat(rows, 0)
    groups = _groups(pattern)
    block_size = max(len(g) for g in groups)
    if block_size == 1:
        structure = JacobianStructure.DIAGONAL
    elif len(groups) == 1:
        structure = JacobianStructure.DENSE
    else:
        structure = JacobianStructure.BLOCK_DIAGONAL
    blocks = tuple(tuple(g) + (size,) * (block_size - len(g)) for g in sorted(groups))
    return JacobianPlan(structure, slots, size, block_size, blocks)


def prepare(analysis: Analysis) -> dict[str, JacobianPlan]:
    """The options a module passes to every call of :func:`run`: the Jacobian plan, made once."""
    return {"plan": jacobian_structure(analysis)}


def explain(analysis: Analysis) -> str:
    """What the newton backend does with this cell: the Jacobian's structure and the scan it implies."""
    plan = jacobian_structure(analysis)
    mode = plan.mode(JacobianMode.AUTO)
    if plan.structure is JacobianStructure.DIAGONAL:
        scan = "one elementwise linear scan per Newton iteration (exact Newton)"
    elif mode is JacobianMode.FULL:
        scan = f"a scan of {plan.block_size} x {plan.block_size} matrices per Newton iteration (exact Newton)"
    else:
        scan = f"blocks of {plan.block_size} exceed {MAX_FULL_BLOCK}, so jacobian='auto' keeps their diagonal: quasi-Newton, an elementwise scan per iteration"
    return f"newton: the step's Jacobian over the states is {plan.describe()}, found from the IR; {scan}; jacobian='diagonal' or 'full' overrides"


# ---- the step function over the whole sequence ----------------------------------------------


class _StepValues(Mapping):
    """The refs of one evaluation of the step, bindings and new states computed on first use."""

    def __init__(self, analysis: Analysis, known: dict[tuple[RefKind, str], torch.Tensor], evaluator_numerics: Numerics, hoisted: list[tuple[ir.Expr, torch.Tensor]]) -> None:
        self.cell = analysis.cell
        self.time_parallel = analysis.time_parallel
        self.known = known
        # A proxy, not self: the evaluator lives only through these values, and a cycle would
        # keep every evaluation's tensors alive until the garbage collector ran.
        self.evaluator = Evaluator(evaluator_numerics, weakref.proxy(self), shared=True)
        for node, value in hoisted:
            self.evaluator.seed(node, value)
        self.bindings = {s.name: s.value for s in self.cell.body if isinstance(s, ir.Assign)}
        self.bindings.update({s.name: s.value for s in self.cell.body if isinstance(s, ir.Emit) and s.name})

    def __getitem__(self, key: tuple[RefKind, str]) -> torch.Tensor:
        value = self.known.get(key)
        if value is not None:
            return value
        kind, name = key
        if kind is RefKind.BINDING:
            value = self.evaluator.evaluate(self.bindings[name])
        elif kind is RefKind.STATE_NEW:
            update = self.cell.update(name)
            value = self.evaluator.evaluate(update.value)
            like = self.known[(RefKind.STATE_PREV, name)]
            if value.dim() > update.value.type.rank:
                value = align(value, update.value.type.rank, like.dim() - (value.dim() - update.value.type.rank))
            value = value.expand(like.shape)
        else:
            raise KeyError(key)
        self.known[key] = value
        return value

    def __iter__(self) -> Iterator:
        return iter(self.known)

    def __len__(self) -> int:
        return len(self.known)


@dataclass
class _Step:
    """``f``: previous joint states ``[B, T, *heads, n]`` -> new joint states, for all steps at once."""

    analysis: Analysis
    numerics: Numerics
    plan: JacobianPlan
    base: dict[tuple[RefKind, str], torch.Tensor]  # params, consts, inputs, time-parallel bindings
    hoisted: list[tuple[ir.Expr, torch.Tensor]]

    def values(self, previous: torch.Tensor, extra: dict | None = None) -> _StepValues:
        known = dict(self.base)
        known.update(unpack(previous, self.plan))
        if extra:
            known.update(extra)
        return _StepValues(self.analysis, known, self.numerics, self.hoisted)

    def __call__(self, previous: torch.Tensor) -> torch.Tensor:
        values = self.values(previous)
        return torch.cat([values[(RefKind.STATE_NEW, s.name)].reshape(previous.shape[:-1] + (s.size,)) for s in self.plan.slots], -1)

    def at(self, start: int, stop: int) -> "_Step":
        """The step restricted to steps ``start:stop`` (values with leading dims are sliced in time)."""
        base = {key: _time_slice(value, _declared_rank(self.analysis, key), start, stop) for key, value in self.base.items()}
        hoisted = [(node, _time_slice(value, node.type.rank, start, stop)) for node, value in self.hoisted]
        return _Step(self.analysis, self.numerics, self.plan, base, hoisted)

    def detached(self) -> "_Step":
        return _Step(self.analysis, self.numerics, self.plan, {k: v.detach() for k, v in self.base.items()}, [(n, v.detach()) for n, v in self.hoisted])


def _declared_rank(analysis: Analysis, key: tuple[RefKind, str]) -> int:
    kind, name = key
    cell = analysis.cell
    if kind is RefKind.INPUT:
        return next(i.type.rank for i in cell.inputs if i.name == name)
    if kind is RefKind.BINDING:
        return next(s.value.type.rank for s in cell.body if isinstance(s, (ir.Assign, ir.Emit)) and getattr(s, "name", None) == name)
    return 10**6  # params and consts have no leading dims


def _time_slice(value: torch.Tensor, rank: int, start: int, stop: int) -> torch.Tensor:
    # Values with leading dims are [B, T, *heads, *shape]; params, consts and values of them have none.
    return value[:, start:stop] if value.dim() > rank else value


def unpack(joint: torch.Tensor, plan: JacobianPlan) -> dict[tuple[RefKind, str], torch.Tensor]:
    """The states, by name, of a joint state ``[*lead, n]``."""
    lead = joint.shape[:-1]
    return {(RefKind.STATE_PREV, s.name): joint[..., s.offset : s.offset + s.size].reshape(lead + s.shape) for s in plan.slots}


def pack(states: Mapping[str, torch.Tensor], plan: JacobianPlan, lead: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([states[s.name].expand(lead + s.shape).reshape(lead + (s.size,)) for s in plan.slots], -1)


# ---- Jacobians and the linear solves ------------------------------------------------------


@dataclass
class _Jacobian:
    """``J_t`` for every step: ``[B, T, *heads, n]`` (diagonal) or ``[B, T, *heads, nb, m, m]`` (blocks)."""

    values: torch.Tensor
    diagonal: bool


def _index(plan: JacobianPlan, device: torch.device) -> torch.Tensor:
    return torch.tensor(plan.blocks, dtype=torch.long, device=device)  # [nb, m], padding = n


def _to_blocks(vector: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``[..., n]`` -> ``[..., nb, m]`` (padding reads a zero)."""
    padded = torch.cat([vector, vector.new_zeros(vector.shape[:-1] + (1,))], -1)
    return padded[..., index]


def _from_blocks(blocks: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    flat = blocks.reshape(blocks.shape[:-2] + (-1,))
    out = flat.new_zeros(flat.shape[:-1] + (size + 1,))
    out[..., index.reshape(-1)] = flat
    return out[..., :size]


def _evaluate_with_jacobian(step: _Step, previous: torch.Tensor, plan: JacobianPlan, mode: JacobianMode, index: torch.Tensor) -> tuple[torch.Tensor, _Jacobian]:
    """``f(previous)`` and its Jacobian, by one vector-Jacobian product per block position.

    The blocks never overlap, so the product with ``v_p`` (1 at position ``p`` of every
    block) is row ``p`` of every block at once: ``m`` products fill all blocks of size
    ``m``, and a diagonal Jacobian is one product, ``J^T 1``.  Reverse mode rather than
    forward mode: torch's forward-mode AD (dual numbers, ``torch.func.jvp``) imports
    torch._dynamo, and with it Triton, on first use.
    """
    size, m = plan.size, plan.block_size
    with torch.enable_grad():
        leaf = previous.detach().requires_grad_()
        value = step(leaf)
    if not value.requires_grad:  # no state is read: the Jacobian is zero
        zeros = torch.zeros_like(value)
        if m == 1 or mode is JacobianMode.DIAGONAL:
            return value.detach(), _Jacobian(zeros, True)
        return value.detach(), _Jacobian(zeros.new_zeros(zeros.shape[:-1] + (len(plan.blocks), m, m)), False)
    if m == 1:
        (diagonal,) = torch.autograd.grad(value, leaf, torch.ones_like(value))
        return value.detach(), _Jacobian(diagonal, True)
    rows = []  # row p of every block, [..., nb, m]; only its entry p in DIAGONAL mode
    for position in range(m):
        members = index[:, position]
        cotangent = torch.zeros(size, dtype=value.dtype, device=value.device)
        cotangent[members[members < size]] = 1
        (product,) = torch.autograd.grad(value, leaf, cotangent.expand_as(value), retain_graph=position + 1 < m)
        row = _to_blocks(product, index)
        rows.append(row if mode is JacobianMode.FULL else row[..., position])
    if mode is JacobianMode.DIAGONAL:
        return value.detach(), _Jacobian(_from_blocks(torch.stack(rows, -1), index, size), True)
    return value.detach(), _Jacobian(torch.stack(rows, -2), False)  # [..., nb, m (row), m (column)]


def _solve_linear(jacobian: _Jacobian, residual: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``delta_t = J_t delta_{t-1} + r_t`` from ``delta_{-1} = 0``; time on dim 1."""
    if jacobian.diagonal:
        return linear_scan(jacobian.values.movedim(1, 0), residual.movedim(1, 0)).movedim(0, 1)
    blocks = _to_blocks(residual, index)
    solved = block_linear_scan(jacobian.values.movedim(1, 0), blocks.movedim(1, 0)).movedim(0, 1)
    return _from_blocks(solved, index, size)


def _solve_adjoint(jacobian: _Jacobian, gradient: torch.Tensor, index: torch.Tensor, size: int) -> torch.Tensor:
    """``lambda_t = g_t + J_{t+1}^T lambda_{t+1}``, ``lambda_{T-1} = g_{T-1}``; time on dim 1."""
    values = jacobian.values
    following = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], 1)
    if jacobian.diagonal:
        return linear_scan(following.movedim(1, 0).flip(0), gradient.movedim(1, 0).flip(0)).flip(0).movedim(0, 1)
    transposed = following.transpose(-1, -2)
    blocks = _to_blocks(gradient, index)
    solved = block_linear_scan(transposed.movedim(1, 0).flip(0), blocks.movedim(1, 0).flip(0)).flip(0).movedim(0, 1)
    return _from_blocks(solved, index, size)


def _shift(initial: torch.Tensor, trajectory: torch.Tensor) -> torch.Tensor:
    """The previous state of every step: ``[s_{-1}, s_0, ..., s_{T-2}]``."""
    return torch.cat([initial.unsqueeze(1), trajectory[:, :-1]], 1)


def _residual(value: torch.Tensor, trajectory: torch.Tensor) -> torch.Tensor:
    """``f(s_{t-1}) - s_t``, zero where both are the same infinity (a max-plus state at -inf)."""
    return torch.where(value == trajectory, torch.zeros_like(value), value - trajectory)


def _step_errors(residual: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The largest relative residual of each step: ``[T]``."""
    relative = residual.abs() / (1 + value.abs())
    return relative.transpose(0, 1).reshape(residual.shape[1], -1).amax(1)


def _newton(
    step: _Step, initial: torch.Tensor, steps: int, plan: JacobianPlan, mode: JacobianMode, tolerance: float, max_iterations: int, keep_jacobian: bool,
    guess: torch.Tensor | None = None,
):
    """The converged trajectory ``[B, T, *heads, n]``, its Jacobians (when kept) and the report.

    ``guess`` (a trajectory of the same shape) replaces the default initial guess.
    """
    index = _index(plan, initial.device)
    if guess is not None:
        trajectory = guess.clone()
    else:
        # The initial guess: every step taken from the initial state, f(s_{-1}, x_t) (ParaRNN's guess).
        trajectory = step(initial.unsqueeze(1).expand(initial.shape[:1] + (steps,) + initial.shape[1:]))
    iterations = 0
    while True:
        value, jacobian = _evaluate_with_jacobian(step, _shift(initial, trajectory), plan, mode, index)
        residual = _residual(value, trajectory)
        errors = _step_errors(residual, value)
        worst = float(errors.max())
        if not math.isfinite(worst) or worst <= tolerance or iterations >= max_iterations:
            break
        trajectory = trajectory + _solve_linear(jacobian, residual, index, plan.size)
        iterations += 1
    sequential = 0
    converged = worst <= tolerance
    if not converged:
        # Steps before the first unconverged one are solved; finish the rest one by one.
        above = torch.nonzero(~(errors <= tolerance))
        start = int(above[0]) if len(above) else steps
        sequential = steps - start
        carried = initial if start == 0 else trajectory[:, start - 1]
        for t in range(start, steps):
            carried = step.at(t, t + 1)(carried.unsqueeze(1)).squeeze(1)
            trajectory[:, t] = carried
        value, jacobian = _evaluate_with_jacobian(step, _shift(initial, trajectory), plan, mode, index) if keep_jacobian else (trajectory, None)
        prefix = errors[:start]
        worst = float(prefix.max()) if start else 0.0
    report = NewtonSolve(iterations, worst, tolerance, converged, sequential, steps, plan.structure, mode, warm_started=guess is not None)
    return trajectory, (jacobian if keep_jacobian else None), report


@dataclass
class _Linearisation:
    """What the backward pass needs of a converged solve.

    ``exact`` is False when ``jacobian`` is only the diagonal of a larger block
    (quasi-Newton): the adjoint then needs the true transposed Jacobian, applied as
    vector-Jacobian products of ``step`` at ``previous``, with the diagonal as a
    preconditioner.
    """

    jacobian: _Jacobian
    exact: bool
    index: torch.Tensor
    size: int
    step: _Step
    previous: torch.Tensor
    tolerance: float
    max_iterations: int


def _iterative_adjoint(linearisation: _Linearisation, gradient: torch.Tensor) -> torch.Tensor:
    """The adjoint ``lambda_t = g_t + J_{t+1}^T lambda_{t+1}`` with ``J`` known only through products.

    Quasi-Newton on this linear system: the residual uses the exact ``J^T`` (one
    vector-Jacobian product of the step for all steps at once), the correction the reverse
    diagonal scan.  As in the forward solve, the last ``k`` steps are exact after ``k``
    iterations; when the budget runs out the rest is swept step by step.
    """
    lin = linearisation
    with torch.enable_grad():
        previous = lin.previous.detach().requires_grad_()
        value = lin.step(previous)

    def following(products: torch.Tensor) -> torch.Tensor:  # J_{t+1}^T lambda_{t+1} for step t
        return torch.cat([products[:, 1:], torch.zeros_like(products[:, :1])], 1)

    adjoint = _solve_adjoint(lin.jacobian, gradient, lin.index, lin.size)
    for _ in range(lin.max_iterations):
        products = torch.autograd.grad(value, previous, adjoint, retain_graph=True)[0]
        residual = gradient + following(products) - adjoint
        errors = _step_errors(residual, adjoint)
        if float(errors.max()) <= lin.tolerance:
            return adjoint
        adjoint = adjoint + _solve_adjoint(lin.jacobian, residual, lin.index, lin.size)
    products = torch.autograd.grad(value, previous, adjoint, retain_graph=True)[0]
    errors = _step_errors(gradient + following(products) - adjoint, adjoint)
    above = torch.nonzero(errors > lin.tolerance)
    steps = gradient.shape[1]
    last = int(above[-1]) if len(above) else -1
    adjoint = adjoint.clone()
    for t in range(last, -1, -1):
        if t + 1 == steps:
            adjoint[:, t] = gradient[:, t]
            continue
        with torch.enable_grad():
            state = lin.previous[:, t + 1 : t + 2].detach().requires_grad_()
            product = torch.autograd.grad(lin.step.at(t + 1, t + 2)(state), state, adjoint[:, t + 1 : t + 2])[0]
        adjoint[:, t] = gradient[:, t] + product[:, 0]
    return adjoint


class _ImplicitAdjoint(torch.autograd.Function):
    """Identity on the trajectory; its backward turns ``dL/ds`` into the adjoint ``lambda``.

    Placed after one differentiable evaluation ``S = f(shift(S*), theta)`` at the solution,
    it makes that evaluation's backward produce ``sum_t lambda_t^T df_t/dtheta``: the
    gradient of the solution of the whole system, by the implicit function theorem.
    """

    @staticmethod
    def forward(ctx, trajectory: torch.Tensor, linearisation: _Linearisation) -> torch.Tensor:
        ctx.linearisation = linearisation
        return trajectory.view_as(trajectory)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gradient: torch.Tensor):
        lin = ctx.linearisation
        if lin.exact:
            return _solve_adjoint(lin.jacobian, gradient.contiguous(), lin.index, lin.size), None
        return _iterative_adjoint(lin, gradient.contiguous()), None


# ---- the backend --------------------------------------------------------------------------


def _warm_guess(previous: "NewtonSolve | None", like: tuple[int, ...], numerics: Numerics) -> torch.Tensor | None:
    """The previous call's solution when it can start this call: same shape, dtype and device, finite."""
    if previous is None or previous.trajectory is None:
        return None
    guess = previous.trajectory
    if tuple(guess.shape) != like or guess.dtype != numerics.real or guess.device != numerics.device:
        return None
    return guess if bool(torch.isfinite(guess).all()) else None


def _options(jacobian, tolerance, max_iterations, numerics: Numerics) -> tuple[JacobianMode, float, int]:
    try:
        mode = JacobianMode(jacobian)
    except ValueError:
        raise BackendError(f"jacobian={jacobian!r} is not a Jacobian mode of the newton backend", expected="'auto', 'full' or 'diagonal'") from None
    if tolerance is None:
        tolerance = TOLERANCE_IN_EPS * torch.finfo(numerics.real).eps
    elif isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise BackendError(f"tolerance must be a positive number, got {tolerance!r}", expected="e.g. tolerance=1e-6")
    if max_iterations is None:
        max_iterations = DEFAULT_MAX_ITERATIONS
    elif isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or max_iterations < 0:
        raise BackendError(f"max_iterations must be a non-negative int, got {max_iterations!r}", expected="e.g. max_iterations=32")
    return mode, float(tolerance), max_iterations


def run(
    analysis: Analysis,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    *,
    jacobian: str = "auto",
    tolerance: float | None = None,
    max_iterations: int | None = None,
    warm_start: bool = False,
    report: Callable[[NewtonSolve], None] | None = None,
    previous: NewtonSolve | None = None,
    plan: JacobianPlan | None = None,
    last_steps: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the cell by Newton's method over the whole sequence; the signature of the sequential backend's ``run``.

    ``jacobian``: ``auto`` (exact blocks up to :data:`MAX_FULL_BLOCK` elements, their
    diagonal beyond), ``full`` or ``diagonal`` (quasi-Newton).  ``tolerance``: the bound
    on the relative residual (default ``16 * eps`` of the computing dtype);
    ``max_iterations``: Newton updates before the unconverged suffix runs step by step.
    ``warm_start``: start from ``previous.trajectory`` (the last call's solution, kept in
    its report) when it has this call's shape, dtype and device, instead of the cold guess;
    the solution is the same (Newton's fixed point does not depend on the guess), the
    iterations fewer when the two calls solve nearby systems.
    ``report`` receives the :class:`NewtonSolve` of the call; ``plan`` is
    :func:`jacobian_structure`'s result when the caller made it once (else it is made here).
    ``last_steps`` (``[B]`` int64): the final state of batch row ``b`` is its state after step
    ``last_steps[b]`` (sequences padded at their ends, :class:`.segments.StartAligned`).
    """
    if not isinstance(warm_start, bool):
        raise BackendError(f"warm_start must be True or False, got {warm_start!r}", expected="warm_start=True")
    if cell_is_directed(analysis):
        raise BackendError(
            f"newton.run solves one forward trajectory, and cell {analysis.cell.name} has reverse states or delays",
            expected="the plan of recdsl.compile(..., backend='newton') (run_plan), which solves each group in its own direction",
        )
    plan = plan if plan is not None else jacobian_structure(analysis)
    requested, tolerance, max_iterations = _options(jacobian, tolerance, max_iterations, numerics)
    mode = plan.mode(requested)
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])  # (B, T, *heads)
    steps = lead[1]

    # Everything that reads no state, for all steps at once (differentiably).
    whole: dict[tuple[RefKind, str], torch.Tensor] = {}
    whole.update({(RefKind.PARAM, n): v for n, v in params.items()})
    whole.update({(RefKind.CONST, n): v for n, v in consts.items()})
    whole.update({(RefKind.INPUT, n): v for n, v in inputs.items()})
    whole_eval = Evaluator(numerics, whole, shared=True)
    parallel_outputs: dict[int, torch.Tensor] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            value = whole_eval.evaluate(statement.value)
            whole[(RefKind.BINDING, statement.name)] = value
        elif isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            value = whole_eval.evaluate(statement.value)
            if statement.name is not None:
                whole[(RefKind.BINDING, statement.name)] = value
            parallel_outputs[statement.index] = value.expand(lead + tuple(value.shape[value.dim() - statement.value.type.rank :]))
    hoisted = []
    for node in analysis.hoisted:
        value = whole_eval.evaluate(node)
        hoisted.append((node, value))

    state_lead = (lead[0],) + lead[2:]
    initial = pack(state, plan, state_lead).to(numerics.real)
    tracked = [v for v in list(whole.values()) + [v for _, v in hoisted] + [initial] if isinstance(v, torch.Tensor) and v.requires_grad]
    differentiable = torch.is_grad_enabled() and bool(tracked)

    attached = _Step(analysis, numerics, plan, whole, hoisted)
    detached = attached.detached()
    guess = _warm_guess(previous, tuple(state_lead[:1]) + (steps,) + tuple(state_lead[1:]) + (plan.size,), numerics) if warm_start else None
    with torch.no_grad():
        trajectory, jacobian_values, solve = _newton(detached, initial.detach(), steps, plan, mode, tolerance, max_iterations, keep_jacobian=differentiable, guess=guess)
    if warm_start:
        solve = replace(solve, trajectory=trajectory.detach())
    if report is not None:
        report(solve)

    if differentiable:
        solution = attached(_shift(initial, trajectory.detach()))
        exact = mode is JacobianMode.FULL or plan.structure is JacobianStructure.DIAGONAL
        linearisation = _Linearisation(
            jacobian_values, exact, _index(plan, initial.device), plan.size, detached, _shift(initial, trajectory).detach(), tolerance, max_iterations
        )
        solution = _ImplicitAdjoint.apply(solution, linearisation)
        previous = _shift(initial, solution)
        evaluation = attached
    else:
        solution = trajectory
        previous = _shift(initial, trajectory)
        evaluation = detached

    new_states = {(RefKind.STATE_NEW, name): value for (_, name), value in unpack(solution, plan).items()}
    values = evaluation.values(previous, new_states)
    outputs = []
    for emit in cell.outputs:
        if emit.index in parallel_outputs:
            outputs.append(parallel_outputs[emit.index])
            continue
        value = values.evaluator.evaluate(emit.value)
        outputs.append(value.expand(lead + tuple(value.shape[value.dim() - emit.value.type.rank :])))
    # Each row's state after its last step: the whole trajectory is solved, so any step can be read.
    last = solution[:, -1] if last_steps is None else solution[torch.arange(lead[0], device=solution.device), last_steps]
    final = {s.name: last[..., s.offset : s.offset + s.size].reshape(state_lead + s.shape) for s in plan.slots}
    return outputs, final



def run_plan(
    plan,
    inputs,
    params,
    consts,
    state,
    numerics: Numerics,
    report: Callable[[NewtonSolve], None] | None = None,
    last_steps: torch.Tensor | None = None,
    previous: NewtonSolve | None = None,
):
    """Interpret a newton :class:`~recdsl.plan.ExecutionPlan`: its Jacobian plan was made at compile time.

    ``previous`` is the module's last report, the warm start's guess (with ``warm_start=True``).
    A cell with reverse states or delays runs in parts (:mod:`.directed`): one solve per
    group of its schedule, each in its own time direction, one report for all of them (the
    warm start then applies when there is one part).
    """
    if plan.directed is not None:
        from .directed import run as run_directed

        single = len(plan.directed.parts) == 1
        return run_directed(plan, inputs, params, consts, state, numerics, run_plan, last_steps=last_steps, report=report, previous=previous if single else None)
    return run(
        plan.analysis, inputs, params, consts, state, numerics, plan=plan.solver, report=report, last_steps=last_steps, previous=previous, **dict(plan.options.backend_options)
    )
