"""C source of the fused sequential loop, generated from a :class:`StepProgram`.

Two functions per cell and dtype:

- ``recdsl_forward(T, N, save, p)`` runs the whole time loop: per step, each matmul group
  is one ``[N, K] @ [K, M]`` product against the concatenated weights (blocks of 4 rows x 16
  columns accumulated in registers), then the elementwise nodes, one loop over the
  ``N x size`` values per run of nodes of one size; states and outputs are written once per step.  With
  ``save`` the matmul results of every step are kept for the backward.
- ``recdsl_backward(T, N, p)`` is the adjoint loop over reversed time: per step it
  recomputes the elementwise nodes from the saved products (no matmul is recomputed),
  propagates adjoints through them in reverse order with each op's derivative (the same
  conventions as torch's autograd: ties of max/min split the gradient, relu'(0) = 0, ...),
  and pushes the products' adjoints back through the transposed weights.  The adjoints of
  varying leaves and of the products are written per step; the weights' gradients are one
  matmul over all steps, done by torch afterwards.

``p`` is an array of pointers in the order documented on :func:`pointer_layout`.
"""

from __future__ import annotations

from typing import Callable

from recdsl.ops import adjoint_templates

from .fused_program import Node, NodeKind, Step, StepProgram, literal_text

# The value of op(a, b, c) given the operands' C expressions {0}, {1}, {2}.
FORWARD: dict[str, str] = {
    "add": "({0} + {1})",
    "sub": "({0} - {1})",
    "mul": "({0} * {1})",
    "div": "({0} / {1})",
    "pow": "POW({0}, {1})",
    "neg": "(-{0})",
    "lt": "(real)({0} < {1})",
    "le": "(real)({0} <= {1})",
    "gt": "(real)({0} > {1})",
    "ge": "(real)({0} >= {1})",
    "eq": "(real)({0} == {1})",
    "ne": "(real)({0} != {1})",
    "exp": "EXP({0})",
    "log": "LOG({0})",
    "sqrt": "SQRT({0})",
    "abs": "FABS({0})",
    "tanh": "TANH({0})",
    "sigmoid": "sigmoid_({0})",
    "logsigmoid": "logsigmoid_({0})",
    "softplus": "softplus_({0})",
    "silu": "silu_({0})",
    "relu": "relu_({0})",
    "cos": "COS({0})",
    "sin": "SIN({0})",
    "log1p": "LOG1P({0})",
    "expm1": "EXPM1({0})",
    "real": "({0})",
    "conj": "({0})",
    "maximum": "maximum_({0}, {1})",
    "minimum": "minimum_({0}, {1})",
    "logaddexp": "logaddexp_({0}, {1})",
    "where": "(({0}) != 0 ? ({1}) : ({2}))",
    "clamp": "minimum_(maximum_({0}, {1}), {2})",
    "sign": "sign_({0})",
}

# Each operand's share of the adjoint: {g} is the result's adjoint, {r} the result,
# {0}, {1}, {2} the operands.  None: no gradient flows to that operand.  The rules are the op
# registry's (recdsl/ops.py, ``OpSpec.derivative``: torch's derivatives.yaml conventions),
# printed here in C so that the fused form's gradients agree with the sequential backend's.
ADJOINT: dict[str, tuple[str | None, ...]] = {
    op: adjoint_templates(op, lambda name, args: FORWARD[name].format(*args), literal_text) for op in FORWARD
}

_MATH = ("EXP exp", "LOG log", "SQRT sqrt", "FABS fabs", "TANH tanh", "COS cos", "SIN sin", "LOG1P log1p", "EXPM1 expm1", "POW pow")

# float32 exp and tanh without calls, so that the compiler vectorises the loops that use
# them (libm's expf/tanhf are scalar calls, 10-30x slower per element here).  Cody-Waite
# range reduction and the minimax polynomials of Cephes' expf and tanhf; about 1 ulp (the
# tests compare against torch at float32 tolerances), inf, 0 and NaN handled as torch does.
_FLOAT_MATH = """
#include <stdint.h>
static inline float exp_f(float x) {
    float c = x < 88.73f ? x : 88.73f;
    c = c > -104.0f ? c : -104.0f;
    float n = floorf(c * 1.44269504088896341f + 0.5f);
    float r = c - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float z = r * r;
    float y = 1.9875691500E-4f;
    y = y * r + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * z + r + 1.0f;
    int32_t k = (int32_t)n;
    int32_t half = k >> 1;  /* 2^k as two factors, so that k = 128 and k < -126 stay exact */
    union { int32_t i; float f; } s1, s2;
    s1.i = (half + 127) << 23;
    s2.i = (k - half + 127) << 23;
    float result = y * s1.f * s2.f;
    return x != x ? x : result;
}
static inline float tanh_f(float x) {
    float a = fabsf(x);
    float z = x * x;
    float p = -5.70498872745E-3f;
    p = p * z + 2.06390887954E-2f;
    p = p * z - 5.37397155531E-2f;
    p = p * z + 1.33314422036E-1f;
    p = p * z - 3.33332819422E-1f;
    float small = p * z * x + x;
    float large = 1 - 2 / (exp_f(2 * a) + 1);
    large = x < 0 ? -large : large;
    return a < 0.625f ? small : large;
}
"""

_HELPERS = """
static inline real sigmoid_(real x) { return 1 / (1 + EXP(-x)); }
static inline real logsigmoid_(real x) { return (x < 0 ? x : (real)0) - LOG1P(EXP(-FABS(x))); }
static inline real softplus_(real x) { return x > 20 ? x : LOG1P(EXP(x)); }
static inline real silu_(real x) { return x / (1 + EXP(-x)); }
static inline real relu_(real x) { return x < 0 ? (real)0 : x; }
static inline real sign_(real x) { return x > 0 ? (real)1 : (x < 0 ? (real)-1 : (real)0); }
static inline real maximum_(real a, real b) { return (a > b || a != a) ? a : b; }
static inline real minimum_(real a, real b) { return (a < b || a != a) ? a : b; }
static inline real logaddexp_(real a, real b) {
    if (isinf(a) && a == b) return a;
    real m = a > b ? a : b;
    return m + LOG1P(EXP(-FABS(a - b)));
}

/* C[n, 0:M] (+)= A[n, 0:K] @ W[K, M] for n < N (row strides lda, ldc).  Blocks of 4 rows x 16
   columns are accumulated in registers over k, so W is read once per 4 rows and C written once. */
#define ROWS 4
#define COLUMNS 16
static void matmul_rows(long N, long K, long M, const real *restrict A, long lda, const real *restrict W, real *restrict C, long ldc, int accumulate) {
    long j0 = 0;
    for (; j0 + COLUMNS <= M; j0 += COLUMNS) {
        for (long n0 = 0; n0 < N; n0 += ROWS) {
            real acc[ROWS][COLUMNS];
            for (int r = 0; r < ROWS; r++) for (int c = 0; c < COLUMNS; c++) acc[r][c] = 0;
            if (n0 + ROWS <= N) {
                for (long k = 0; k < K; k++) {
                    const real *w = W + k * M + j0;
                    for (int r = 0; r < ROWS; r++) {
                        const real a = A[(n0 + r) * lda + k];
                        for (int c = 0; c < COLUMNS; c++) acc[r][c] += a * w[c];
                    }
                }
            } else {
                for (long k = 0; k < K; k++) {
                    const real *w = W + k * M + j0;
                    for (int r = 0; r < ROWS; r++) {
                        const real a = n0 + r < N ? A[(n0 + r) * lda + k] : (real)0;
                        for (int c = 0; c < COLUMNS; c++) acc[r][c] += a * w[c];
                    }
                }
            }
            for (int r = 0; r < ROWS && n0 + r < N; r++) {
                real *out = C + (n0 + r) * ldc + j0;
                for (int c = 0; c < COLUMNS; c++) out[c] = accumulate ? out[c] + acc[r][c] : acc[r][c];
            }
        }
    }
    for (long n = 0; n < N; n++) {
        for (long j = j0; j < M; j++) {
            real sum = 0;
            for (long k = 0; k < K; k++) sum += A[n * lda + k] * W[k * M + j];
            C[n * ldc + j] = accumulate ? C[n * ldc + j] + sum : sum;
        }
    }
}
"""


class _Names:
    """The C names and index expressions of each node's value and adjoint."""

    def __init__(self, program: StepProgram) -> None:
        self.program = program

    def _index(self, node: Node, consumer_size: int, row: str = "n") -> str:
        if node.kind is NodeKind.CONSTANT:
            return "0" if node.size == 1 else "j"
        if node.kind is NodeKind.PRODUCT:
            width = self.program.groups[node.slot].outer
            base = f"{row} * {width} + {node.offset}"
            return base if node.size == 1 else f"{base} + j"
        return row if node.size == 1 else f"{row} * {node.size} + j"

    def array(self, node: Node, adjoint: bool = False) -> str:
        prefix = "D" if adjoint else ""
        if node.kind is NodeKind.VARYING:
            return f"{prefix}LV{node.slot}"
        if node.kind is NodeKind.CONSTANT:
            return f"{prefix}LC{node.slot}"
        if node.kind is NodeKind.STATE:
            return f"{prefix}HP{node.slot}"
        if node.kind is NodeKind.PRODUCT:
            return f"{prefix}G{node.slot}"
        return f"{prefix}V{node.index}"

    def value(self, index: int, consumer_size: int) -> str:
        node = self.program.nodes[index]
        if node.kind is NodeKind.LITERAL:
            assert node.value is not None
            return literal_text(node.value)
        return f"{self.array(node)}[{self._index(node, consumer_size)}]"

    def adjoint(self, index: int, consumer_size: int) -> str | None:
        node = self.program.nodes[index]
        if node.kind is NodeKind.LITERAL or node.boolean:
            return None
        return f"{self.array(node, adjoint=True)}[{self._index(node, consumer_size)}]"


def _prelude(dtype: str) -> list[str]:
    suffix = "f" if dtype == "float" else ""
    lines = ["#include <math.h>", "#include <stdlib.h>", "#include <string.h>", f"typedef {dtype} real;"]
    fast = {"EXP": "exp_f", "TANH": "tanh_f"} if dtype == "float" else {}
    if fast:
        lines.append(_FLOAT_MATH)
    lines += [f"#define {macro} {fast.get(macro, function + suffix)}" for macro, function in (m.split() for m in _MATH)]
    lines.append(_HELPERS)
    return lines


def pointer_layout(program: StepProgram) -> dict[str, list[str]]:
    """The order of the pointer arrays passed to the two functions (names for documentation and checks)."""
    lv = [f"varying{i}" for i in range(len(program.varying))]
    lc = [f"constant{i}" for i in range(len(program.constant))]
    weights = [f"weights{g}" for g in range(len(program.groups))]
    transposed = [f"weights_t{g}" for g in range(len(program.groups))]
    init = [f"init_{s.name}" for s in program.states]
    sequences = [f"states_{s.name}" for s in program.states]
    outputs = [f"output{o.index}" for o in program.outputs if o.same_as_state is None]
    products = [f"products{g}" for g in range(len(program.groups))]
    return {
        "forward": lv + lc + weights + init + sequences + outputs + products,
        "backward": lv + lc + weights + transposed + init + sequences + products
        + [f"d_{name}" for name in sequences + outputs + lv + lc + products]
        + [f"left{g}" for g in range(len(program.groups))]
        + [f"d_{name}" for name in init],
    }  # fmt: skip


class _Source:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.depth = 0
        self.defined: set[str] = set()  # names of the functions written so far

    def __call__(self, line: str) -> None:
        self.lines.append("    " * self.depth + line)

    def block(self, header: str):
        source = self

        class _Block:
            def __enter__(self_inner):
                source(header + " {")
                source.depth += 1

            def __exit__(self_inner, *exc):
                source.depth -= 1
                source("}")

        return _Block()


def _unpack(out: _Source, names: list[str], program: StepProgram, backward: bool) -> None:
    """Bind the pointer array ``p`` to named pointers, in :func:`pointer_layout` order."""
    position = 0

    def take(c_name: str, const: bool) -> None:
        nonlocal position
        qualifier = "const " if const else ""
        out(f"{qualifier}real *{c_name} = (real *)p[{position}];")
        position += 1

    for i in range(len(program.varying)):
        take(f"lv{i}", True)
    for i in range(len(program.constant)):
        take(f"LC{i}", True)
    for g in range(len(program.groups)):
        take(f"W{g}", True)
    if backward:
        for g in range(len(program.groups)):
            take(f"WT{g}", True)
    for s in range(len(program.states)):
        take(f"init{s}", True)
    for s in range(len(program.states)):
        take(f"seq{s}", backward)
    if not backward:
        for o in program.outputs:
            if o.same_as_state is None:
                take(f"out{o.index}", False)
    for g in range(len(program.groups)):
        take(f"gseq{g}", backward)
    if backward:
        for s in range(len(program.states)):
            take(f"dseq{s}", True)
        for o in program.outputs:
            if o.same_as_state is None:
                take(f"dout{o.index}", True)
        for i in range(len(program.varying)):
            take(f"dlv{i}", False)
        for i in range(len(program.constant)):
            take(f"DLC{i}", False)
        for g in range(len(program.groups)):
            take(f"dgseq{g}", False)
        for g in range(len(program.groups)):
            take(f"lseq{g}", False)
        for s in range(len(program.states)):
            take(f"dinit{s}", False)
    assert position == len(names)


def _scratch(out: _Source, program: StepProgram, backward: bool, save: bool) -> None:
    """One allocation for every per-step buffer: node values (and adjoints), unsaved products."""
    parts: list[tuple[str, int]] = []  # (name, values per row)
    for node in program.nodes:
        if node.kind is NodeKind.ELEMENTWISE:
            parts.append((f"V{node.index}", node.size))
            if backward:
                parts.append((f"DV{node.index}", node.size))
    if backward:
        for s, state in enumerate(program.states):
            parts.append((f"DHP{s}", state.size))
            parts.append((f"DHN{s}", state.size))
    elif not save:
        for g, group in enumerate(program.groups):
            parts.append((f"gstep{g}", group.outer))
    total = sum(size for _, size in parts) or 1
    out(f"real *scratch = (real *)calloc((size_t)N * {total}, sizeof(real));")
    out("if (!scratch) return 1;")
    offset = 0
    for name, size in parts:
        out(f"real *{name} = scratch + N * {offset};")
        offset += size


def _step_pointers(out: _Source, program: StepProgram, backward: bool) -> None:
    for i, leaf in enumerate(program.varying):
        out(f"const real *LV{i} = lv{i} + t * N * {leaf.size};")
        if backward:
            out(f"real *DLV{i} = dlv{i} + t * N * {leaf.size};")
    for s, state in enumerate(program.states):
        out(f"const real *HP{s} = t ? seq{s} + (t - 1) * N * {state.size} : init{s};")
    for g, group in enumerate(program.groups):
        if backward:
            out(f"const real *G{g} = gseq{g} + t * N * {group.outer};")
            out(f"real *DG{g} = dgseq{g} + t * N * {group.outer};")
        else:
            out(f"real *G{g} = save ? gseq{g} + t * N * {group.outer} : gstep{g};")


def _loop(out: _Source, size: int, independent: bool = True):
    """``for n, for j`` over the values of a step.

    ``independent``: no iteration of the inner loop writes what another reads or writes
    (no accumulation into a broadcast scalar), so the compiler may vectorise it without
    checking for aliasing at run time (which costs compile time and code size).
    """
    out("for (long n = 0; n < N; n++)")
    if independent and size > 1:
        out("#pragma GCC ivdep")
    return out.block(f"for (long j = 0; j < {size}; j++)")


def _function(helpers: _Source, out: _Source, name: str, reads: set[str], writes: set[str], body: Callable[[_Source], None]) -> None:
    """Put ``body`` (a loop over the arrays ``reads`` and ``writes``) in its own function and call it.

    Small functions keep the compile time linear in the number of nodes (register allocation
    of one function holding every vectorised loop grows much faster); the arrays are
    distinct buffers, hence ``restrict``.
    """
    reads = reads - writes
    out(f"{name}({', '.join(['N', *sorted(writes), *sorted(reads)])});")
    if name in helpers.defined:  # the adjoint loop recomputes with the forward's functions
        return
    helpers.defined.add(name)
    signature = ["long N"] + [f"real *restrict {a}" for a in sorted(writes)] + [f"const real *restrict {a}" for a in sorted(reads)]
    function = _Source()
    with function.block(f"static void __attribute__((noinline)) {name}({', '.join(signature)})"):
        body(function)
    helpers.lines.extend(function.lines)


def _arrays(names: _Names, program: StepProgram, nodes, adjoint: bool = False) -> set[str]:
    found = set()
    for index in nodes:
        node = program.nodes[index]
        if node.kind is not NodeKind.LITERAL and not (adjoint and node.boolean):
            found.add(names.array(node, adjoint))
    return found


def _runs(program: StepProgram) -> list[Step]:
    """``program.order`` with consecutive elementwise nodes of one size grouped into runs (lists of node indices).

    A run is one loop over the step's values: each iteration computes all its nodes for
    one element, so values pass between them in registers rather than through a loop each.
    """
    runs: list = []
    for step in program.order:
        if step.node is None:
            runs.append(step)
            continue
        size = program.nodes[step.node].size
        if runs and isinstance(runs[-1], list) and program.nodes[runs[-1][0]].size == size:
            runs[-1].append(step.node)
        else:
            runs.append([step.node])
    return runs


def _element(node: Node) -> str:
    return "n" if node.size == 1 else f"n * {node.size} + j"


def _read_outside_their_run(program: StepProgram) -> set[int]:
    """The elementwise nodes whose values are read outside the run that computes them.

    Only these are stored by the forward loop; the others stay in registers.  (The adjoint
    loop recomputes and stores every node: its reverse sweep reads them.)
    """
    run_of: dict[int, int] = {}
    for number, step in enumerate(_runs(program)):
        if isinstance(step, list):
            run_of.update({index: number for index in step})
    escaping: set[int] = set()
    for index, run in run_of.items():
        for arg in program.nodes[index].args:
            if arg in run_of and run_of[arg] != run:
                escaping.add(arg)
    escaping.update(group.left for group in program.groups)
    escaping.update(state.new for state in program.states)
    escaping.update(output.node for output in program.outputs)
    return escaping & set(run_of)


def _emit_run_forward(helpers: _Source, out: _Source, names: _Names, program: StepProgram, run: list[int], stored: set[int] | None) -> None:
    """A run's values, one loop; ``stored``: the nodes whose values are written out (None: all of them)."""
    nodes = [program.nodes[i] for i in run]
    size = nodes[0].size
    kept = set(run) if stored is None else stored & set(run)

    def body(code: _Source) -> None:
        with _loop(code, size):
            local: dict[int, str] = {}
            for node in nodes:
                assert node.op is not None
                operands = [local.get(a) or names.value(a, size) for a in node.args]
                code(f"const real v{node.index} = {FORWARD[node.op].format(*operands)};")
                local[node.index] = f"v{node.index}"
                if node.index in kept:
                    code(f"V{node.index}[{_element(node)}] = v{node.index};")

    reads = _arrays(names, program, [a for node in nodes for a in node.args if a not in run])
    prefix = "recompute" if stored is None else "forward"
    _function(helpers, out, f"{prefix}_{run[0]}_{run[-1]}", reads, {f"V{i}" for i in kept}, body)


def _emit_run_backward(helpers: _Source, out: _Source, names: _Names, program: StepProgram, run: list[int], escaping: set[int]) -> None:
    """The adjoints of a run's nodes, last node first, each pushing its share to its operands.

    Nodes read only inside the run (not in ``escaping``) keep their adjoints in registers,
    zeroed at the start of each element; the others accumulate in their ``DV`` arrays.
    """
    size = program.nodes[run[0]].size
    members = set(run)
    local = [i for i in run if i not in escaping and not program.nodes[i].boolean]
    independent = True
    reads: set[str] = set()
    writes: set[str] = set()
    blocks: list[list[str]] = []
    for index in reversed(run):
        node = program.nodes[index]
        assert node.op is not None
        if node.boolean:
            continue
        values = [names.value(a, size) for a in node.args]
        shares = []
        for arg, formula in zip(node.args, ADJOINT[node.op]):
            target = names.adjoint(arg, size)
            if formula is None or target is None:
                continue
            if arg in members and arg not in escaping:
                target = f"d{arg}"
            else:
                writes.add(names.array(program.nodes[arg], True))
                independent = independent and program.nodes[arg].size == size
            shares.append(f"{target} += {formula.format(*values, g='g', r='r')};")
        if not shares:
            continue
        element = _element(node)
        reads |= _arrays(names, program, node.args) | {f"V{index}"}
        if index in escaping:
            reads.add(f"DV{index}")
        adjoint = f"DV{index}[{element}]" if index in escaping else f"d{index}"
        blocks.append([f"const real g = {adjoint};", f"const real r = V{index}[{element}];", "(void)r;", *shares])
    if not blocks:
        return

    def body(code: _Source) -> None:
        with _loop(code, size, independent):
            for index in local:
                code(f"real d{index} = 0;")
            for block in blocks:
                with code.block(""):
                    for line in block:
                        code(line)

    _function(helpers, out, f"backward_{run[0]}_{run[-1]}", reads, writes, body)


def _left(names: _Names, program: StepProgram, group_index: int, adjoint: bool) -> tuple[str, str]:
    """The pointer and row stride of a matmul group's left operand (or its adjoint)."""
    node = program.nodes[program.groups[group_index].left]
    array = names.array(node, adjoint)
    if node.kind is NodeKind.PRODUCT:
        return f"{array} + {node.offset}", str(program.groups[node.slot].outer)
    return array, str(node.size)


def _forward_steps(helpers: _Source, out: _Source, names: _Names, program: StepProgram, backward: bool) -> None:
    stored = None if backward else _read_outside_their_run(program)
    for step in _runs(program):
        if isinstance(step, list):
            _emit_run_forward(helpers, out, names, program, step, stored)
        elif not backward:
            group = program.groups[step.group]
            left, stride = _left(names, program, step.group, False)
            out(f"matmul_rows(N, {group.inner}, {group.outer}, {left}, {stride}, W{step.group}, G{step.group}, {group.outer}, 0);")


def generate(program: StepProgram, dtype: str) -> str:
    """The C source of ``program``'s forward and backward loops computing in ``dtype`` (``float`` or ``double``)."""
    names = _Names(program)
    layout = pointer_layout(program)
    helpers = _Source()  # one function per run's loop, forward and adjoint
    out = _Source()
    escaping = _read_outside_their_run(program)

    # ---- forward
    with out.block("int recdsl_forward(long T, long N, int save, void **p)"):
        _unpack(out, layout["forward"], program, backward=False)
        _scratch(out, program, backward=False, save=False)
        with out.block("for (long t = 0; t < T; t++)"):
            _step_pointers(out, program, backward=False)
            _forward_steps(helpers, out, names, program, backward=False)
            for s, state in enumerate(program.states):
                with _loop(out, state.size):
                    out(f"seq{s}[t * N * {state.size} + n * {state.size} + j] = {names.value(state.new, state.size)};")
            for o in program.outputs:
                if o.same_as_state is None:
                    with _loop(out, o.size):
                        out(f"out{o.index}[t * N * {o.size} + n * {o.size} + j] = {names.value(o.node, o.size)};")
        out("free(scratch);")
        out("return 0;")

    # ---- backward
    with out.block("int recdsl_backward(long T, long N, void **p)"):
        _unpack(out, layout["backward"], program, backward=True)
        _scratch(out, program, backward=True, save=True)
        with out.block("for (long t = T - 1; t >= 0; t--)"):
            _step_pointers(out, program, backward=True)
            out("/* recompute the step's values from the saved products */")
            _forward_steps(helpers, out, names, program, backward=True)
            for g, group in enumerate(program.groups):
                left, stride = _left(names, program, g, False)
                with _loop(out, group.inner):
                    out(f"lseq{g}[t * N * {group.inner} + n * {group.inner} + j] = ({left})[n * {stride} + j];")
            for index in sorted(escaping):  # the other adjoints live in registers
                out(f"memset(DV{index}, 0, sizeof(real) * N * {program.nodes[index].size});")
            for s, state in enumerate(program.states):
                out(f"memset(DHP{s}, 0, sizeof(real) * N * {state.size});")
            out("/* adjoints arriving at this step: outputs, and the next step's reading of the states */")
            for s, state in enumerate(program.states):
                target = names.adjoint(state.new, state.size)
                with _loop(out, state.size, independent=program.nodes[state.new].size == state.size):
                    out(f"const real g = DHN{s}[n * {state.size} + j] + dseq{s}[t * N * {state.size} + n * {state.size} + j];")
                    if target is not None:
                        out(f"{target} += g;")
            for o in program.outputs:
                target = names.adjoint(o.node, o.size)
                if o.same_as_state is None and target is not None:
                    with _loop(out, o.size, independent=program.nodes[o.node].size == o.size):
                        out(f"{target} += dout{o.index}[t * N * {o.size} + n * {o.size} + j];")
            out("/* reverse sweep */")
            for step in reversed(_runs(program)):
                if isinstance(step, list):
                    _emit_run_backward(helpers, out, names, program, step, escaping)
                    continue
                group = program.groups[step.group]
                dleft, stride = _left(names, program, step.group, True)
                out(f"matmul_rows(N, {group.outer}, {group.inner}, DG{step.group}, {group.outer}, WT{step.group}, {dleft}, {stride}, 1);")
            for s, state in enumerate(program.states):
                out(f"{{ real *swap = DHN{s}; DHN{s} = DHP{s}; DHP{s} = swap; }}")
        for s, state in enumerate(program.states):
            out(f"memcpy(dinit{s}, DHN{s}, sizeof(real) * N * {state.size});")
        out("free(scratch);")
        out("return 0;")
    return "\n".join(_prelude(dtype) + helpers.lines + out.lines) + "\n"
