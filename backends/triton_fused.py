"""The fused sequential Triton kernel (FlashRNN's form) for nonlinear and coupled cells.

Cells that stay sequential (GRU, LSTM, ParaGRU, any gate that reads a state through a
nonlinearity) run on a GPU as two generated kernels (:mod:`.triton_fused_codegen`): the
forward loop over time inside one kernel, one program per tile of rows (batch times heads),
the gate math fused, states written once per step; and the adjoint loop over reversed
time.  They take the tensors the ``fused`` C loop takes (the step program of
:mod:`.fused_program`, the leaves hoisted out of the loop and computed by torch), so the
host side is :func:`.fused_sequential.run` with these kernels in place of the C ones;
torch's autograd connects them to the projections and the params, and the weights'
gradients are one matmul over all steps.

Selected by ``backend="triton"`` on a cell the scan kernels cannot run because a state is
nonlinear or states are coupled, and by ``backend="fused"`` on CUDA tensors (its plan's
``gpu`` alternative).  On a CPU the kernels run in Triton's interpreter
(``TRITON_INTERPRET=1``).  float32 and float64; lower-precision inputs are computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from recdsl.analysis import Analysis

from . import fused_sequential
from .fused_program import StepProgram, build_program
from .fused_program import Unsupported as ProgramUnsupported
from .triton_codegen import Unsupported as CodegenUnsupported
from .triton_fused_codegen import BLOCK_K, BLOCK_ROWS, Unsupported, generate, padded
from .triton_launch import launch


@dataclass(frozen=True)
class FusedKernelPlan:
    """What the plan holds for the fused Triton kernel: the step program and the kernels' tiling."""

    program: StepProgram
    block_rows: int = BLOCK_ROWS
    block_k: int = BLOCK_K
    num_warps: int = 8

    def describe(self) -> str:
        groups = ", ".join(f"[{g.inner}] @ [{g.inner}, {g.outer}]" for g in self.program.groups)
        matmuls = f"matmuls per step {groups}, in tiles of {self.block_k} rows of weights read from L2 each step" if groups else "no matmul in the step"
        return (
            f"one program per {self.block_rows} rows (batch x heads), the time loop inside the kernel, states in registers; "
            f"{matmuls}; backward: the adjoint loop over reversed time"
        )


def prepare(analysis: Analysis) -> tuple[FusedKernelPlan, str] | str:
    """The kernel plan and generated source for ``analysis``'s cell, or why the kernel cannot run it."""
    try:
        program = build_program(analysis)
        source = generate(program, analysis.cell.name)
    except (ProgramUnsupported, Unsupported, CodegenUnsupported) as reason:
        return str(reason)
    return FusedKernelPlan(program, block_rows=_block_rows(program)), source


def _block_rows(program: StepProgram) -> int:
    """Rows per program: 16 (``tl.dot``'s least) when the step has a matmul; without one, fewer
    rows for wide states, so that a program's tiles stay near 2048 values (no spills at d = 1024)."""
    if program.groups:
        return BLOCK_ROWS
    widest = max([padded(n.size) for n in program.nodes] + [1])
    return max(1, min(BLOCK_ROWS, 2048 // widest))


def _accumulator(dtype: torch.dtype):
    import triton.language as tl

    return tl.float64 if dtype == torch.float64 else tl.float32


class TritonKernel:
    """The generated kernels of one program for one dtype, with the C loop's calling convention.

    ``products`` (what the forward keeps for the backward) are the matmul results of every
    step, then the left operand of every step, one tensor per matmul group each.
    """

    def __init__(self, plan: FusedKernelPlan, source: str, dtype: torch.dtype) -> None:
        from .triton_backend import load_generated

        self.plan = plan
        self.program = plan.program
        self.dtype = dtype
        self.module = load_generated(source)
        p = self.program
        self.counts = (len(p.varying), len(p.constant), len(p.groups), len(p.states))
        self.separate_outputs = [o for o in p.outputs if o.same_as_state is None]

    def split(self, tensors: Sequence[torch.Tensor]):
        v, c, g, s = self.counts
        return tensors[:v], tensors[v : v + c], tensors[v + c : v + c + g], tensors[v + c + g : v + c + g + s]

    def _meta(self) -> dict:
        return dict(BB=self.plan.block_rows, BK=self.plan.block_k, ACC=_accumulator(self.dtype), PRECISION="ieee", num_warps=self.plan.num_warps, num_stages=1)

    def _grid(self, rows: int) -> tuple[int]:
        return (-(-rows // self.plan.block_rows),)

    def forward(self, steps: int, rows: int, tensors: Sequence[torch.Tensor], save: bool):
        varying, constant, weights, init = self.split(tensors)
        new = dict(dtype=self.dtype, device=init[0].device)
        kept = steps if save else 1
        sequences = [torch.empty(steps, rows, s.size, **new) for s in self.program.states]
        outputs = [torch.empty(steps, rows, o.size, **new) for o in self.separate_outputs]
        products = [torch.empty(kept, rows, g.outer, **new) for g in self.program.groups]
        lefts = [torch.empty(kept, rows, g.inner, **new) for g in self.program.groups]
        launch(
            self.module.fused_forward, self._grid(rows),
            *varying, *constant, *weights, *init, *sequences, *outputs, *products, *lefts, steps, rows,
            SAVE=int(save), **self._meta(),
        )  # fmt: skip
        return sequences, outputs, products + lefts

    def backward(self, steps: int, rows: int, tensors, sequences, saved, d_sequences, d_outputs):
        """Gradients of the loop's inputs (in ``tensors``' order) from those of its sequences and outputs."""
        varying, constant, weights, init = self.split(tensors)
        groups = len(self.program.groups)
        products, lefts = saved[:groups], saved[groups:]
        transposed = [w.t().contiguous() for w in weights]
        programs = self._grid(rows)[0]
        d_varying = [torch.zeros_like(v) for v in varying]
        d_constant = [torch.zeros(programs, c.numel(), dtype=self.dtype, device=c.device) for c in constant]
        d_products = [torch.zeros_like(p) for p in products]
        d_init = [torch.empty_like(s) for s in init]
        launch(
            self.module.fused_backward, self._grid(rows),
            *varying, *constant, *weights, *transposed, *init, *sequences, *products, *lefts,
            *d_sequences, *d_outputs, *d_varying, *d_constant, *d_products, *d_init, steps, rows,
            **self._meta(),
        )  # fmt: skip
        d_weights = [left.reshape(-1, left.shape[-1]).t() @ dp.reshape(-1, dp.shape[-1]) for left, dp in zip(lefts, d_products)]
        d_constant = [partial.sum(0).reshape(c.shape) for partial, c in zip(d_constant, constant)]
        return [*d_varying, *d_constant, *d_weights, *d_init]


def run_plan(plan, inputs, params, consts, state, numerics):
    """Interpret a plan whose steps are :attr:`~recdsl.plan.Form.TRITON_FUSED`: the host side of the fused C loop, these kernels inside."""
    from .triton_backend import _check_device

    _check_device(numerics.device)
    if plan.directed is not None:  # reverse states or delays: one kernel per group of the schedule (backends/directed.py)
        from .directed import run as run_directed

        return run_directed(plan, inputs, params, consts, state, numerics, run_plan)
    kernel_plan: FusedKernelPlan = plan.solver
    source = plan.kernel_source

    def make_kernel(program: StepProgram, dtype: torch.dtype) -> TritonKernel:
        return TritonKernel(kernel_plan, source, dtype)

    return fused_sequential.run(plan.analysis, inputs, params, consts, state, numerics, program=kernel_plan.program, make_kernel=make_kernel, backend="triton")
