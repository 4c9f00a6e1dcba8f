"""The step of a sequential cell as a flat program: what the fused sequential form runs.

Built once per analysis, from the IR.  A step of the cell becomes

- *leaves*: the state-free values a step reads, computed by torch before the loop, either
  for every step at once (``varying``: they read inputs, like GRU's ``x @ W_ir + b_ir``) or
  once (``constant``: params, consts and expressions of them, like ``b_hr``);
- *matmul groups*: every ``v @ W`` (or ``W @ v``) whose ``v`` reads a state and whose ``W`` is
  constant.  Products that share the same ``v`` form one group and are computed as one
  matrix product against their weights concatenated along the output dim (GRU's three
  ``h @ W_h*`` become one ``h @ [W_hr | W_hz | W_hn]``);
- *nodes*: elementwise operations on vectors (or scalars) of one size, in an order in which
  each node's operands come first.

Everything a step computes has rank 0 or 1 (leading batch and head dims are flattened into
one row dim); cells with matrix states, reductions, indexing or scans inside the step are
not in this form (``unsupported`` says which construct stops it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

from recdsl import ir
from recdsl.analysis import Analysis
from recdsl.ir import Kind, RefKind

# Elementwise ops the fused form evaluates (and differentiates) on real values.
ELEMENTWISE_OPS = frozenset(
    {
        "add", "sub", "mul", "div", "pow", "neg", "lt", "le", "gt", "ge", "eq", "ne",
        "exp", "log", "sqrt", "abs", "tanh", "sigmoid", "logsigmoid", "softplus", "silu", "relu",
        "cos", "sin", "log1p", "expm1", "real", "conj", "maximum", "minimum", "logaddexp", "where",
        "clamp", "sign",
    }
)  # fmt: skip


class NodeKind(str, Enum):
    """Where a value of the step comes from."""

    LITERAL = "literal"  # a number in the generated code
    VARYING = "varying"  # a leaf computed for every step before the loop: [T, N, size]
    CONSTANT = "constant"  # a leaf computed once per call: [size]
    STATE = "state"  # a state's value before the step: [N, size]
    PRODUCT = "product"  # a slice of a matmul group's result: [N, size]
    ELEMENTWISE = "elementwise"  # an op of earlier nodes: [N, size]


@dataclass(frozen=True)
class Node:
    """One value of the step.

    ``index`` is the position in :attr:`StepProgram.nodes`; ``slot`` numbers the node among
    those of its kind (the leaf, state or group it reads); ``offset`` is a product's first
    column in its group's result.  ``size`` is 1 for scalars, else the vector length.
    """

    index: int
    kind: NodeKind
    size: int
    boolean: bool = False
    op: str | None = None
    args: tuple[int, ...] = ()
    value: float | None = None
    slot: int = -1
    offset: int = 0


@dataclass(frozen=True)
class Leaf:
    """A state-free value the step reads, evaluated by torch from ``expr``."""

    expr: ir.Expr
    size: int


@dataclass(frozen=True)
class Weight:
    """One constant matrix of a matmul group: ``expr`` is ``[K, M]``, or ``[M, K]`` if ``transposed``."""

    expr: ir.Expr
    transposed: bool
    offset: int
    size: int


@dataclass
class MatmulGroup:
    """``left @ [W_1 | W_2 | ...]``: products sharing the left operand (a node of size ``inner``)."""

    left: int
    inner: int
    weights: list[Weight] = field(default_factory=list)

    @property
    def outer(self) -> int:
        return sum(w.size for w in self.weights)


@dataclass(frozen=True)
class StateSlot:
    name: str
    size: int
    shape: tuple[int, ...]
    prev: int  # the node of its previous value
    new: int  # the node of its new value (broadcast to ``size`` when smaller)


@dataclass(frozen=True)
class OutputSlot:
    """A step-by-step output: the node it writes, or the state whose sequence it is."""

    index: int
    node: int
    size: int
    shape: tuple[int, ...]
    same_as_state: int | None  # the output is this state's new value: no separate buffer


@dataclass(frozen=True)
class Step:
    """One operation of the step, in execution order: an elementwise node or a matmul group."""

    node: int | None = None
    group: int | None = None


@dataclass
class StepProgram:
    """The step of a cell as leaves, matmul groups and elementwise nodes (see the module docstring)."""

    nodes: list[Node]
    varying: list[Leaf]
    constant: list[Leaf]
    groups: list[MatmulGroup]
    order: list[Step]
    states: list[StateSlot]
    outputs: list[OutputSlot]

    def describe(self) -> str:
        """The program in a few lines (for messages and tests)."""
        lines = [f"{len(self.varying)} varying leaves, {len(self.constant)} constant leaves, {len(self.nodes)} nodes"]
        for number, group in enumerate(self.groups):
            lines.append(f"matmul group {number}: node {group.left} [{group.inner}] @ {len(group.weights)} weights -> [{group.outer}]")
        return "\n".join(lines)


class Unsupported(Exception):
    """The cell has a construct the fused form does not run; the message says which."""


def _size(t: ir.Type) -> int:
    return t.shape[0] if t.rank == 1 else 1


class _Builder:
    def __init__(self, analysis: Analysis) -> None:
        self.analysis = analysis
        cell = analysis.cell
        self.cell = cell
        self.stepwise: dict[str, ir.Expr] = {}
        self.varying_bindings: set[str] = set()
        for statement in cell.body:
            if isinstance(statement, ir.Assign):
                if statement.name in analysis.time_parallel:
                    if self._reads_time(statement.value):
                        self.varying_bindings.add(statement.name)
                else:
                    self.stepwise[statement.name] = statement.value
            elif isinstance(statement, ir.Emit) and statement.name is not None:
                if statement.index in analysis.parallel_outputs:
                    if self._reads_time(statement.value):
                        self.varying_bindings.add(statement.name)
                else:
                    self.stepwise[statement.name] = statement.value
        self.updates = {s.state: s.value for s in cell.body if isinstance(s, ir.Update)}
        self.nodes: list[Node] = []
        self.varying: list[Leaf] = []
        self.constant: list[Leaf] = []
        self.groups: list[MatmulGroup] = []
        self.order: list[Step] = []
        self.memo: dict[ir.Expr, int] = {}
        self.state_nodes: dict[str, int] = {}
        self.dependent_memo: dict[ir.Expr, bool] = {}

    # ---- classification of expressions
    def _reads_time(self, expr: ir.Expr) -> bool:
        return any(r.kind is RefKind.INPUT or (r.kind is RefKind.BINDING and r.name in self.varying_bindings) for r in ir.refs(expr))

    def dependent(self, expr: ir.Expr) -> bool:
        """Whether ``expr`` reads a state (directly or through step-by-step bindings)."""
        known = self.dependent_memo.get(expr)
        if known is not None:
            return known
        if isinstance(expr, ir.Ref):
            result = expr.kind in (RefKind.STATE_PREV, RefKind.STATE_NEW, RefKind.SCAN) or (
                expr.kind is RefKind.BINDING and expr.name in self.stepwise
            )
        elif isinstance(expr, ir.Op):
            result = any(self.dependent(a) for a in expr.args)
        else:
            result = False
        self.dependent_memo[expr] = result
        return result

    # ---- nodes
    def _add(self, **fields) -> int:
        node = Node(index=len(self.nodes), **fields)
        self.nodes.append(node)
        return node.index

    def _check_type(self, t: ir.Type, what: str) -> None:
        if t.kind is Kind.COMPLEX:
            raise Unsupported(f"{what} is complex")
        if t.rank > 1:
            raise Unsupported(f"{what} has shape {t} (the fused form runs steps of vectors and scalars)")

    def leaf(self, expr: ir.Expr) -> int:
        self._check_type(expr.type, "a state-free value read by the step")
        if isinstance(expr, ir.Literal):
            return self._add(kind=NodeKind.LITERAL, size=1, value=float(expr.value))
        boolean = expr.type.kind is Kind.BOOL
        if self._reads_time(expr):
            self.varying.append(Leaf(expr, _size(expr.type)))
            return self._add(kind=NodeKind.VARYING, size=_size(expr.type), boolean=boolean, slot=len(self.varying) - 1)
        self.constant.append(Leaf(expr, _size(expr.type)))
        return self._add(kind=NodeKind.CONSTANT, size=_size(expr.type), boolean=boolean, slot=len(self.constant) - 1)

    def visit(self, expr: ir.Expr) -> int:
        known = self.memo.get(expr)
        if known is not None:
            return known
        result = self._visit(expr)
        self.memo[expr] = result
        return result

    def _visit(self, expr: ir.Expr) -> int:
        if not self.dependent(expr):
            return self.leaf(expr)
        if isinstance(expr, ir.Ref):
            if expr.kind is RefKind.STATE_PREV:
                return self.state_nodes[expr.name]
            if expr.kind is RefKind.STATE_NEW:
                return self.visit(self.updates[expr.name])
            if expr.kind is RefKind.BINDING:
                return self.visit(self.stepwise[expr.name])
            raise Unsupported(f"the step reads the scan '{expr.name}'")
        assert isinstance(expr, ir.Op)
        self._check_type(expr.type, f"'{expr.op}' in the step")
        if expr.op == "matmul":
            return self.product(expr)
        if expr.op not in ELEMENTWISE_OPS:
            raise Unsupported(f"the step applies '{expr.op}' to a value that reads a state")
        for arg in expr.args:
            self._check_type(arg.type, f"an operand of '{expr.op}'")
        args = tuple(self.visit(a) for a in expr.args)
        size = _size(expr.type)
        for arg in args:
            if self.nodes[arg].size not in (1, size):
                raise Unsupported(f"'{expr.op}' broadcasts a vector of {self.nodes[arg].size} to {size}")
        node = self._add(kind=NodeKind.ELEMENTWISE, size=size, boolean=expr.type.kind is Kind.BOOL, op=expr.op, args=args)
        self.order.append(Step(node=node))
        return node

    def product(self, expr: ir.Op) -> int:
        a, b = expr.args
        if self.dependent(a) and not self.dependent(b) and a.type.rank == 1 and b.type.rank == 2:
            vector, matrix, transposed = a, b, False
        elif self.dependent(b) and not self.dependent(a) and a.type.rank == 2 and b.type.rank == 1:
            vector, matrix, transposed = b, a, True
        else:
            raise Unsupported("a matmul in the step is not a vector that reads a state times a constant matrix")
        if self._reads_time(matrix) or matrix.type.kind is not Kind.REAL:
            raise Unsupported("a matmul in the step multiplies a state by a matrix that changes with time")
        left = self.visit(vector)
        group_index = next((i for i, g in enumerate(self.groups) if g.left == left), None)
        if group_index is None:
            self.groups.append(MatmulGroup(left=left, inner=self.nodes[left].size))
            group_index = len(self.groups) - 1
            self.order.append(Step(group=group_index))
        group = self.groups[group_index]
        size = expr.type.shape[0]
        weight = Weight(matrix, transposed, group.outer, size)
        group.weights.append(weight)
        return self._add(kind=NodeKind.PRODUCT, size=size, slot=group_index, offset=weight.offset)

    def build(self) -> StepProgram:
        cell = self.cell
        if cell.scans:
            raise Unsupported(f"the cell has a scan ('{cell.scans[0].name}')")
        for number, state in enumerate(cell.states):
            self._check_type(state.type, f"state '{state.name}'")
            self.state_nodes[state.name] = self._add(kind=NodeKind.STATE, size=_size(state.type), slot=number)
        states = []
        for number, state in enumerate(cell.states):
            new = self.visit(self.updates[state.name])
            states.append(StateSlot(state.name, _size(state.type), state.type.shape, self.state_nodes[state.name], new))
        outputs = []
        for emit in cell.outputs:
            if emit.index in self.analysis.parallel_outputs:
                continue
            self._check_type(emit.value.type, f"output {emit.index}")
            node = self.visit(emit.value)
            size = _size(emit.value.type)
            same = next((i for i, s in enumerate(states) if s.new == node and s.size == size), None)
            outputs.append(OutputSlot(emit.index, node, size, emit.value.type.shape, same))
        return StepProgram(self.nodes, self.varying, self.constant, self.groups, self.order, states, outputs)


def build_program(analysis: Analysis) -> StepProgram:
    """The step program of ``analysis``'s cell; raises :class:`Unsupported` with the reason."""
    if analysis.cell.reversed_recurrences:  # the program's one loop runs every state forward
        name = analysis.cell.reversed_recurrences[0]
        raise Unsupported(f"'{name}' runs in reverse, and the fused loop runs every state forward in one pass")
    return _Builder(analysis).build()


def literal_text(value: float) -> str:
    """``value`` as a C expression of type ``real``."""
    if math.isnan(value):
        return "((real)NAN)"
    if math.isinf(value):
        return "((real)INFINITY)" if value > 0 else "(-(real)INFINITY)"
    return f"((real){float(value)!r})"
