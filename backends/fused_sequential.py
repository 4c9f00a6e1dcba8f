"""The ``fused`` backend: the sequential loop as one generated C function per cell, on CPU.

The same step as the sequential backend, in the same order, but compiled: the step is
flattened once per cell into a :class:`~recdsl.backends.fused_program.StepProgram`
(state-free parts hoisted out of the loop and computed by torch for all steps; the
matmuls that share a state operand merged into one matmul against concatenated weights;
the remaining gate math as elementwise nodes), C source is generated for its forward and
its adjoint loop (:mod:`recdsl.backends.fused_codegen`), compiled with the system C
compiler into ``$RECDSL_CACHE_DIR/fused`` (default ``~/.cache/recdsl/fused``) under the
hash of the source, and called through ``ctypes``.  The backward is the generated adjoint
loop, run once over reversed time (no autograd graph per step); the weights' gradients
are one matmul over all steps.  torch's autograd connects it to the hoisted projections
and to the params.

Runs cells whose step works on real vectors and scalars (GRU, LSTM, minGRU, ...): see
:func:`unsupported`.  It needs a C compiler (``$CC``, else ``cc`` or ``gcc``); float32 and
float64 (low-precision inputs are computed in float32 by the module).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch.autograd.function import once_differentiable

from recdsl import ir
from recdsl.analysis import Analysis
from recdsl.errors import BackendError
from recdsl.ir import RefKind

from .fused_codegen import generate, pointer_layout
from .fused_program import StepProgram, Unsupported, build_program
from .torch_ops import Evaluator, Numerics

FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
_DTYPES = {torch.float32: "float", torch.float64: "double"}


def compiler() -> str | None:
    """The C compiler the backend uses, or None when there is none."""
    chosen = os.environ.get("CC")
    if chosen:
        return shutil.which(chosen)
    return shutil.which("cc") or shutil.which("gcc")


def cache_dir() -> Path:
    return Path(os.environ.get("RECDSL_CACHE_DIR", Path.home() / ".cache" / "recdsl")) / "fused"


def prepare(analysis: Analysis) -> StepProgram | str:
    """The step program of ``analysis``'s cell, or why the fused form cannot run it.

    The plan stage calls it once per compiled module and keeps the program in the plan.
    """
    if analysis.cell.reversed_recurrences:
        name = analysis.cell.reversed_recurrences[0]
        return f"'{name}' runs in reverse, and the compiled loop runs every state forward in one pass"
    if compiler() is None:
        return "no C compiler found (set $CC)"
    try:
        return build_program(analysis)
    except Unsupported as reason:
        return str(reason)


def unsupported(analysis: Analysis) -> str | None:
    """None when the fused form can run the cell, else the reason in words."""
    if analysis.cell.reversed_recurrences or analysis.delays:  # run in parts, each group's own loop (backends/directed.py)
        from recdsl.plan import BackendKind, PlanOptions, Unsupported as Refused, plan_backend

        planned = plan_backend(analysis, BackendKind.FUSED, PlanOptions())
        return planned.reason if isinstance(planned, Refused) else None
    program = prepare(analysis)
    return program if isinstance(program, str) else None


# ---- compiled kernels ---------------------------------------------------------------------


def _cpu_flags() -> str:
    """The CPU's feature flags: ``-march=native`` code is only reused on a CPU with the same ones."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(source: str) -> Path:
    cc = compiler()
    if cc is None:
        raise BackendError("the fused backend needs a C compiler and none was found", expected="gcc or clang on PATH, or $CC")
    key = hashlib.sha256("\n".join([source, cc, " ".join(FLAGS), platform.machine(), _cpu_flags()]).encode()).hexdigest()[:24]
    directory = cache_dir()
    library = directory / f"step_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"step_{key}.c").write_text(source)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        target = Path(scratch) / library.name
        done = subprocess.run([cc, *FLAGS, "-o", str(target), str(directory / f"step_{key}.c"), "-lm"], capture_output=True, text=True)
        if done.returncode != 0:
            raise BackendError(
                f"compiling the fused loop failed ({cc}):\n{done.stderr[-2000:]}", expected="a working C compiler ($CC), or backend='sequential'"
            )
        os.replace(target, library)  # atomic: concurrent builds of the same source agree
    return library


class Kernel:
    """A program's compiled loops for one dtype, and the calls that run them on tensors."""

    _LOADED: dict[Path, ctypes.CDLL] = {}

    def __init__(self, program: StepProgram, dtype: torch.dtype) -> None:
        self.program = program
        self.dtype = dtype
        path = _build(generate(program, _DTYPES[dtype]))
        library = self._LOADED.get(path)
        if library is None:
            library = self._LOADED[path] = ctypes.CDLL(str(path))
        self._forward = library.recdsl_forward
        self._forward.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.POINTER(ctypes.c_void_p)]
        self._forward.restype = ctypes.c_int
        self._backward = library.recdsl_backward
        self._backward.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.POINTER(ctypes.c_void_p)]
        self._backward.restype = ctypes.c_int
        layout = pointer_layout(program)
        self._forward_count, self._backward_count = len(layout["forward"]), len(layout["backward"])
        p = program
        self.counts = (len(p.varying), len(p.constant), len(p.groups), len(p.states))
        self.separate_outputs = [o for o in p.outputs if o.same_as_state is None]

    @staticmethod
    def _pointers(tensors: Sequence[torch.Tensor], count: int):
        assert len(tensors) == count, (len(tensors), count)
        return (ctypes.c_void_p * count)(*[t.data_ptr() for t in tensors])

    def split(self, tensors: Sequence[torch.Tensor]):
        v, c, g, s = self.counts
        return tensors[:v], tensors[v : v + c], tensors[v + c : v + c + g], tensors[v + c + g : v + c + g + s]

    def forward(self, steps: int, rows: int, tensors: Sequence[torch.Tensor], save: bool):
        """Run the loop; ``tensors`` are the varying leaves, constant leaves, weights and initial states."""
        varying, constant, weights, init = self.split(tensors)
        new = dict(dtype=self.dtype)
        sequences = [torch.empty(steps, rows, s.size, **new) for s in self.program.states]
        outputs = [torch.empty(steps, rows, o.size, **new) for o in self.separate_outputs]
        products = [torch.empty(steps if save else 1, rows, g.outer, **new) for g in self.program.groups]
        pointers = self._pointers([*varying, *constant, *weights, *init, *sequences, *outputs, *products], self._forward_count)
        if self._forward(steps, rows, int(save), pointers) != 0:
            raise MemoryError("the fused loop could not allocate its scratch buffers")
        return sequences, outputs, products

    def backward(self, steps: int, rows: int, tensors, sequences, products, d_sequences, d_outputs):
        """Gradients of the loop's inputs (in ``tensors``' order) from those of its sequences and outputs."""
        varying, constant, weights, init = self.split(tensors)
        new = dict(dtype=self.dtype)
        transposed = [w.t().contiguous() for w in weights]
        d_varying = [torch.zeros_like(v) for v in varying]
        d_constant = [torch.zeros_like(c) for c in constant]
        d_products = [torch.zeros_like(p) for p in products]
        lefts = [torch.empty(steps, rows, g.inner, **new) for g in self.program.groups]
        d_init = [torch.empty_like(s) for s in init]
        pointers = self._pointers(
            [*varying, *constant, *weights, *transposed, *init, *sequences, *products, *d_sequences, *d_outputs, *d_varying, *d_constant, *d_products, *lefts, *d_init],
            self._backward_count,
        )
        if self._backward(steps, rows, pointers) != 0:
            raise MemoryError("the fused loop could not allocate its scratch buffers")
        d_weights = [left.reshape(-1, left.shape[-1]).t() @ dp.reshape(-1, dp.shape[-1]) for left, dp in zip(lefts, d_products)]
        return [*d_varying, *d_constant, *d_weights, *d_init]


_KERNELS: dict[tuple[int, torch.dtype], tuple[StepProgram, Kernel]] = {}


def kernel_for(program: StepProgram, dtype: torch.dtype) -> Kernel:
    """The compiled loops of ``program`` in ``dtype`` (compiled on first use, then cached on disk and here)."""
    key = (id(program), dtype)
    cached = _KERNELS.get(key)
    if cached is None or cached[0] is not program:
        cached = (program, Kernel(program, dtype))
        _KERNELS[key] = cached
    return cached[1]


class _FusedLoop(torch.autograd.Function):
    """The generated loop under autograd: its backward is the generated adjoint loop."""

    @staticmethod
    def forward(ctx, kernel: Kernel, steps: int, rows: int, *tensors: torch.Tensor):
        sequences, outputs, products = kernel.forward(steps, rows, tensors, save=True)
        ctx.kernel, ctx.steps, ctx.rows, ctx.count = kernel, steps, rows, len(tensors)
        ctx.save_for_backward(*tensors, *sequences, *products)
        return (*sequences, *outputs)

    @staticmethod
    @once_differentiable  # the adjoint loop is not itself differentiated: a second derivative raises
    def backward(ctx, *grads: torch.Tensor):
        kernel: Kernel = ctx.kernel
        saved = ctx.saved_tensors
        count, states = ctx.count, len(kernel.program.states)
        tensors, sequences, products = saved[:count], saved[count : count + states], saved[count + states :]
        grads = [g.contiguous() for g in grads]
        gradients = kernel.backward(ctx.steps, ctx.rows, tensors, sequences, products, grads[:states], grads[states:])
        return (None, None, None, *gradients)


# ---- running a cell -----------------------------------------------------------------------


def _real(value: torch.Tensor, numerics: Numerics) -> torch.Tensor:
    return value if value.dtype == numerics.real else value.to(numerics.real)


def run(
    analysis: Analysis,
    inputs: Mapping[str, torch.Tensor],
    params: Mapping[str, torch.Tensor],
    consts: Mapping[str, torch.Tensor],
    state: Mapping[str, torch.Tensor],
    numerics: Numerics,
    program: StepProgram | str | None = None,
    make_kernel=None,
    backend: str = "fused",
    last_steps: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Run the cell as :func:`recdsl.backends.sequential.run` does, with the loop in generated C.

    ``program`` is :func:`prepare`'s result when the caller made it once (the plan holds it).
    ``make_kernel(program, dtype)``: the loops to run instead of the C ones (the Triton
    kernels of :mod:`.triton_fused`, which take the same tensors); ``backend`` names them in errors.
    ``last_steps`` (``[B]`` int64): the final state of batch row ``b`` is its state after
    step ``last_steps[b]`` rather than after the last (sequences of different lengths
    padded at their ends, :class:`.segments.StartAligned`).
    """
    program = prepare(analysis) if program is None else program
    if isinstance(program, str):
        raise BackendError(f"backend '{backend}' cannot run cell {analysis.cell.name}: {program}", expected="backend='sequential'")
    if make_kernel is None and numerics.device.type != "cpu":
        raise BackendError(f"backend 'fused' runs on the CPU, not on {numerics.device}", expected="CPU tensors, or backend='sequential'")
    if numerics.real not in _DTYPES:
        raise BackendError(f"backend '{backend}' computes in float32 or float64, not {numerics.real}", expected="float32 or float64 params")
    cell = analysis.cell
    first = next(iter(inputs.values()))
    lead = tuple(first.shape[: first.dim() - cell.inputs[0].type.rank])  # (B, T, *heads)
    steps = lead[1]
    row_lead = (lead[0],) + lead[2:]
    rows = math.prod(row_lead)

    # The time-parallel bindings and outputs, for all steps at once (as the sequential backend
    # does), time-major: evaluated on [T, B, *heads, ...] inputs, the leaves come out in the
    # layout the loop reads, with no transposing copy per leaf.
    time_major = (steps,) + row_lead
    whole: dict[tuple[RefKind, str], torch.Tensor] = {}
    whole.update({(RefKind.PARAM, name): value for name, value in params.items()})
    whole.update({(RefKind.CONST, name): value for name, value in consts.items()})
    whole.update({(RefKind.INPUT, name): value.transpose(0, 1).contiguous() for name, value in inputs.items()})
    parallel_eval = Evaluator(numerics, whole)
    parallel_outputs: dict[int, torch.Tensor] = {}
    for statement in cell.body:
        if isinstance(statement, ir.Assign) and statement.name in analysis.time_parallel:
            whole[(RefKind.BINDING, statement.name)] = parallel_eval.evaluate(statement.value)
        elif isinstance(statement, ir.Emit) and statement.index in analysis.parallel_outputs:
            value = parallel_eval.evaluate(statement.value)
            if statement.name is not None:
                whole[(RefKind.BINDING, statement.name)] = value
            trailing = tuple(value.shape[value.dim() - statement.value.type.rank :])
            parallel_outputs[statement.index] = value.expand(time_major + trailing).transpose(0, 1)
    leaves = Evaluator(numerics, whole, shared=True)

    def varying(expr: ir.Expr) -> torch.Tensor:
        value = _real(leaves.evaluate(expr), numerics)
        return value.expand(time_major + expr.type.shape).reshape(steps, rows, -1).contiguous()

    def constant(expr: ir.Expr) -> torch.Tensor:
        return _real(leaves.evaluate(expr), numerics).expand(expr.type.shape).reshape(-1).contiguous()

    def weights(group) -> torch.Tensor:
        parts = []
        for weight in group.weights:
            value = _real(leaves.evaluate(weight.expr), numerics)
            parts.append(value.t() if weight.transposed else value)
        return (torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]).contiguous()

    tensors = [varying(leaf.expr) for leaf in program.varying]
    tensors += [constant(leaf.expr) for leaf in program.constant]
    tensors += [weights(group) for group in program.groups]
    tensors += [_real(state[s.name], numerics).reshape(rows, s.size).contiguous() for s in program.states]

    kernel = (make_kernel or kernel_for)(program, numerics.real)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        results = _FusedLoop.apply(kernel, steps, rows, *tensors)
        sequences, separate = list(results[: len(program.states)]), list(results[len(program.states) :])
    else:
        sequences, separate, _ = kernel.forward(steps, rows, tensors, save=False)

    def per_step(value: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return value.view((steps,) + row_lead + shape).movedim(0, 1)

    if last_steps is None:
        final = {s.name: sequences[i][-1].view(row_lead + s.shape) for i, s in enumerate(program.states)}
    else:  # every state is kept per step: read each row's at its own last step
        per_row = last_steps.repeat_interleave(rows // lead[0])
        every_row = torch.arange(rows, device=per_row.device)
        final = {s.name: sequences[i][per_row, every_row].view(row_lead + s.shape) for i, s in enumerate(program.states)}
    step_outputs: dict[int, torch.Tensor] = {}
    separate_iter = iter(separate)
    for slot in program.outputs:
        source = sequences[slot.same_as_state] if slot.same_as_state is not None else next(separate_iter)
        step_outputs[slot.index] = per_step(source, slot.shape)
    outputs = [parallel_outputs[e.index] if e.index in parallel_outputs else step_outputs[e.index] for e in cell.outputs]
    return outputs, final


def run_plan(plan, inputs, params, consts, state, numerics: Numerics, last_steps: torch.Tensor | None = None):
    """Interpret a fused :class:`~recdsl.plan.ExecutionPlan`: its step program was built at compile time.

    A cell with reverse states or delays runs in parts (:mod:`.directed`): one compiled loop
    per group of its schedule, a reverse one over the flipped sequence."""
    if plan.directed is not None:
        from .directed import run as run_directed

        return run_directed(plan, inputs, params, consts, state, numerics, run_plan, last_steps=last_steps)
    return run(plan.analysis, inputs, params, consts, state, numerics, program=plan.solver, last_steps=last_steps)
