"""Triton kernels compiled ahead of time for NVIDIA GPUs, on a machine that has none.

The Triton wheel ships its NVIDIA backend and ``ptxas``: ``triton.compile`` with a
``GPUTarget`` compiles a kernel for an A100 (sm_80) or H100 (sm_90) without a driver, and
``ptxas -v`` reports what the interpreter hides: registers, spills to local memory, and the
shared memory a launch requests.  This module compiles the kernels the Triton backend
actually launches, each with the argument types and the specialisation of its launch:

1. :func:`record_launches` runs a compiled cell (forward and backward) under
   ``TRITON_INTERPRET=1`` and collects every kernel launch (:mod:`.triton_launch`);
2. :func:`specialize` turns a launch into what ``triton.compile`` needs, by the rules of
   Triton's launcher: a tensor is a typed pointer, 16-byte aligned or not; an int equal to 1
   is a constant; other ints are ``i32`` (``i64`` from 2^31) and marked divisible by 16 when
   they are; block sizes and the accumulator type are constexprs;
3. :func:`compile_kernel` compiles it for a :class:`Target` and reads ptxas's log.

Triton is imported only inside these functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from .triton_launch import KernelLaunch, observe_launches


@dataclass(frozen=True)
class Target:
    """An NVIDIA GPU architecture and the most shared memory one block may use on it."""

    name: str
    capability: int
    shared_limit: int  # bytes of (dynamic) shared memory per block


# sm_80: A100 (163 KB per block); sm_90: H100 (227 KB).  The kernels compiled for sm_80 also
# run on sm_86/sm_89 (RTX 30xx/40xx, L4, L40), which allow only 99 KB: PORTABLE_SHARED_LIMIT.
SM80 = Target("sm_80", 80, 163 * 1024)
SM90 = Target("sm_90", 90, 227 * 1024)
TARGETS = (SM80, SM90)
PORTABLE_SHARED_LIMIT = 99 * 1024


def nvidia_backend_missing() -> str | None:
    """Why kernels cannot be compiled ahead of time here (None when they can).

    Looks at the installed files without importing triton: a process that imports triton
    before setting ``TRITON_INTERPRET=1`` cannot run the interpreter afterwards on some
    versions (3.6), and this is called while tests are being collected.
    """
    found = importlib.util.find_spec("triton")
    if found is None or not found.submodule_search_locations:
        return "triton is not installed"
    package = Path(list(found.submodule_search_locations)[0])
    if not (package / "backends" / "nvidia" / "compiler.py").exists():
        return "the installed Triton has no NVIDIA backend"
    if not any((package / "backends" / "nvidia" / "bin").glob("ptxas*")):
        return "the installed Triton's NVIDIA backend has no ptxas"
    return None


# ---- from a launch to what triton.compile needs ---------------------------------------------

_POINTER_TYPES = {
    "float32": "fp32", "float64": "fp64", "float16": "fp16", "bfloat16": "bf16",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}


@dataclass(frozen=True)
class Specialization:
    """One kernel as ``triton.compile`` takes it: argument types, constants, alignment, options."""

    kernel: str
    source_file: str  # the file the kernel's Python function lives in
    signature: tuple[tuple[str, str], ...]  # (argument, type): "*fp32", "i32", "constexpr", ...
    constants: tuple[tuple[str, Any], ...]
    divisible: tuple[str, ...]  # arguments marked divisible by 16 (pointers: 16-byte aligned)
    options: tuple[tuple[str, Any], ...]  # num_warps, num_stages

    @property
    def pointer_types(self) -> tuple[str, ...]:
        return tuple(sorted({t for _, t in self.signature if t.startswith("*")}))

    def describe(self) -> str:
        constants = ", ".join(f"{k}={_constant_text(v)}" for k, v in self.constants)
        options = ", ".join(f"{k}={v}" for k, v in self.options)
        return f"{self.kernel}({constants}{'; ' + options if options else ''}; {'/'.join(self.pointer_types)})"


def _constant_text(value: Any) -> str:
    if isinstance(value, (bool, int, float, str)):
        return str(value)
    return getattr(value, "name", None) or str(value)  # a triton dtype prints as its name, "fp32"


def specialize(launch: KernelLaunch) -> Specialization:
    """The types and specialisation Triton's launcher gives ``launch``'s arguments."""
    import torch

    signature: list[tuple[str, str]] = []
    constants: list[tuple[str, Any]] = []
    divisible: list[str] = []
    constexprs = launch.constexprs
    for name, value in launch.arguments().items():
        if name in constexprs:
            signature.append((name, "constexpr"))
            constants.append((name, value))
        elif isinstance(value, torch.Tensor):
            signature.append((name, "*" + _POINTER_TYPES[str(value.dtype).removeprefix("torch.")]))
            if value.data_ptr() % 16 == 0:
                divisible.append(name)
        elif isinstance(value, bool):
            signature.append((name, "i1"))
        elif isinstance(value, int):
            if value == 1:  # a launch turns an int equal to 1 into a constant
                signature.append((name, "constexpr"))
                constants.append((name, 1))
                continue
            signature.append((name, "i32" if -(2**31) <= value < 2**31 else "i64"))
            if value % 16 == 0:
                divisible.append(name)
        elif isinstance(value, float):
            signature.append((name, "fp32"))
        else:
            raise TypeError(f"kernel {launch.name}: argument {name} of type {type(value).__name__} has no Triton type here")
    source_file = launch.python_function.__code__.co_filename
    return Specialization(launch.name, source_file, tuple(signature), tuple(constants), tuple(divisible), tuple(sorted(launch.options.items())))


def distinct(launches: list[KernelLaunch]) -> list[Specialization]:
    """The distinct specialisations among ``launches``, in order of first launch."""
    found: dict[Specialization, None] = {}
    for launch in launches:
        found.setdefault(specialize(launch), None)
    return list(found)


# ---- recording the launches of a cell ----------------------------------------------------------


@contextlib.contextmanager
def _environment(**values: str | None) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    try:
        for k, v in values.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def record_launches(run: Callable[[], Any]) -> list[KernelLaunch]:
    """Every kernel launch that ``run()`` makes, recorded on the CPU without running the kernels.

    The backend's host code runs as it would on a GPU (with ``TRITON_INTERPRET=1`` so that
    it accepts CPU tensors); the kernels are only recorded, so the values that come out are
    meaningless and the sizes may be those of a real layer.
    """
    with _environment(TRITON_INTERPRET="1"), observe_launches(run_kernels=False) as launches:
        run()
    return launches


@dataclass(frozen=True)
class Layer:
    """An example cell at the sizes of a real layer (issue 11: d = 1024; dk = dv = 64 and 128)."""

    example: str  # examples/<example>.rec
    dims: tuple[tuple[str, Any], ...]
    # Launches specialise ints on divisibility by 16: at T = 1024, T, T / 32 blocks and
    # T / 64 chunks all are, as at T = 4096, so the kernels compile the same, 4x cheaper to record.
    length: int = 1024
    # Head dims of the inputs: the chunked and delta-rule kernels take batch, head and step
    # strides, which a layer with one head (H = 1, specialised away) would not compile.
    heads: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.example}({', '.join(f'{k}={v}' for k, v in self.dims)})"


def _layer(example: str, **dims: Any) -> Layer:
    return Layer(example, tuple(dims.items()))


# Every example the Triton backend runs.  S6 runs in the fused selective scan
# (backends/triton_selective.py), at d = 1024 with Mamba's n = 16 (at n = 64 its backward
# kernel still spills a few bytes; see BlockSizes.choose there).
LAYERS = (
    _layer("mingru", d_in=1024, d=1024),
    _layer("minlstm", d_in=1024, d=1024),
    _layer("hgrn", d_in=1024, d=1024),
    _layer("rglru", d=1024),
    _layer("lru", d=1024, n=1024),
    _layer("s6", d=1024, n=16),
    _layer("aaren", d=1024),
    *(replace(_layer(name, dk=size, dv=size), heads=(2,)) for size in (64, 128) for name in ("gla", "retnet", "mlstm")),
    *(replace(_layer("mamba2", p=size, n=size), heads=(2,)) for size in (64, 128)),
    # The delta rule's chunked kernels (backends/triton_delta.py).
    *(replace(_layer(name, dk=size, dv=size), heads=(2,)) for size in (64, 128) for name in ("deltanet", "gated_deltanet")),
    # Nonlinear cells: the fused sequential kernel (backends/triton_fused.py), d = 128 as one head of FlashRNN's.
    _layer("gru", d_in=128, d=128),
    _layer("lstm", d_in=128, d=128),
    _layer("paragru", d_in=1024, d=1024),
    # A reverse state: one fused kernel per direction, the reverse one on the flipped sequence (backends/directed.py).
    _layer("bigru", d_in=128, d=128),
)


def layer_launches(examples: Path, layer: Layer, dtype: Any = None, batch: int = 1, backend_options: Mapping[str, Any] | None = None) -> list[KernelLaunch]:
    """The launches of one forward and backward pass of ``layer`` (inputs and params in ``dtype``).

    At ``batch = 1`` the diagonal scans split T across programs (the time-split kernels are
    launched); ``backend_options={"split_programs": 0}`` records the one-pass kernels instead.
    """
    import torch

    import recdsl

    dtype = dtype or torch.float32
    module = recdsl.compile(examples / f"{layer.example}.rec", backend="triton", backend_options=backend_options, **dict(layer.dims)).to(dtype)
    generator = torch.Generator().manual_seed(0)
    inputs = []
    for declared in module.cell.inputs:
        shape = (batch, layer.length, *layer.heads, *declared.type.shape)
        value = torch.randn(shape, generator=generator).to(dtype)
        if declared.type.kind.name == "COMPLEX":
            value = torch.complex(value.float(), value.float())
        inputs.append(value.requires_grad_())

    def run() -> None:
        outputs = module(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        total = sum((o.real if o.is_complex() else o).float().sum() for o in outputs)
        total.backward()

    return record_launches(run)


def chunk_launches(keys: int, values: int, rows: bool, allow_tf32: bool, length: int = 4096, chunk: int = 64, dtype: Any = None, readouts: int = 1, skip: bool = False) -> list[KernelLaunch]:
    """The launches of the Triton chunked form's forward and backward (:mod:`.triton_chunk`) for one
    head of ``keys x values`` states, with queries, keys, values and log decays in ``dtype``
    (float32 by default; bfloat16 feeds ``tl.dot`` bfloat16 operands).

    For the kernels' specialisations by option (``allow_tf32``, bfloat16 operands, which a
    compiled cell also passes: LowPrecisionInputs.NATIVE); ``rows``: a decay per key row (GLA) rather than one
    per state (RetNet, mLSTM, Mamba-2).  ``readouts``: 2 adds a second read-out of the state
    (``chunk_outputs``, from the chunk-start states the walk keeps); ``skip``: values scaled per
    step and a skip term ``skip_t v_t`` in the first read-out (Mamba-2's ``dt x`` and ``D x``).
    """
    import torch

    from . import chunk_kernels, triton_chunk

    dtype = dtype or torch.float32
    qs = [torch.randn(1, length, keys, dtype=dtype) for _ in range(readouts)]
    k = torch.randn(1, length, keys, dtype=dtype)
    v = torch.randn(1, length, values, dtype=dtype)
    log_decay = -torch.rand(1, length, keys if rows else 1, 1).to(dtype)
    initial = torch.zeros(1, keys, values)
    scale, skipped = (torch.rand(1, length).to(dtype), torch.randn(1, length).to(dtype)) if skip else (None, None)
    leaves = [t.requires_grad_() for t in (*qs, k, v, log_decay, initial) + ((scale, skipped) if skip else ())]

    def run() -> None:
        outputs, final = triton_chunk.decayed_outer_products(
            qs, [chunk_kernels.RankOneInput(k, v)], log_decay, initial, chunk, allow_tf32=allow_tf32, value_scales=[scale] if skip else None, skip=skipped
        )
        torch.autograd.grad(sum(out.float().sum() for out in outputs) + final.sum(), leaves)

    return record_launches(run)


def delta_launches(keys: int, values: int, gated: bool, dtype: Any = None, allow_tf32: bool = False, length: int = 4096, chunk: int = 64, backward: bool = False, same_sides: bool = True) -> list[KernelLaunch]:
    """The launches of :func:`.triton_delta.forward` (with ``backward``, of
    :func:`.triton_delta.delta_rule` and its backward kernels) for one head of ``keys x values``
    states, keys and queries in ``dtype`` (bfloat16 enters the kernels' products as such; a
    compiled cell casts its pieces to float32 before the kernels today).  ``same_sides``:
    DeltaNet's one key vector on both sides of the map; else two (TTT-linear's form)."""
    import torch

    from . import triton_delta

    dtype = dtype or torch.float32
    q, k = torch.randn(1, length, keys).to(dtype), torch.randn(1, length, keys).to(dtype)
    right = k if same_sides else torch.randn(1, length, keys).to(dtype)
    w = torch.randn(1, length, values)
    coefficient = -torch.rand(1, length)
    log_decay = -torch.rand(1, length) if gated else None
    initial = torch.zeros(1, keys, values)
    if backward:
        for tensor in {id(t): t for t in (q, k, right, w, coefficient, initial)}.values():
            tensor.requires_grad_()

        def run() -> None:
            (out,), final = triton_delta.delta_rule([q], k, right, coefficient, [w], initial, chunk, log_decay, allow_tf32=allow_tf32)
            (out.sum() + final.sum()).backward()

        return record_launches(run)
    return record_launches(lambda: triton_delta.forward([q], k, right, coefficient, [w], initial, chunk, log_decay, allow_tf32=allow_tf32))


# ---- compiling -----------------------------------------------------------------------------------

_COMPILED_MODULES: dict[str, Any] = {}


def _jit_function(spec: Specialization):
    """The kernel as a ``triton.JITFunction``: its file imported again with the interpreter off.

    A kernel recorded under ``TRITON_INTERPRET=1`` is an interpreted function, and so are the
    helpers it calls (combines); a fresh import of the same file gives the compilable ones.
    """
    module = _COMPILED_MODULES.get(spec.source_file)
    if module is None:
        digest = hashlib.sha256(spec.source_file.encode()).hexdigest()[:12]
        name = f"recdsl_aot_{digest}"
        loader = importlib.util.spec_from_file_location(name, spec.source_file)
        assert loader is not None and loader.loader is not None
        module = importlib.util.module_from_spec(loader)
        if os.path.dirname(os.path.abspath(spec.source_file)) == os.path.dirname(os.path.abspath(__file__)):
            module.__package__ = __package__  # a kernel file of this package imports its siblings relatively
        sys.modules[name] = module
        with _environment(TRITON_INTERPRET=None):
            loader.loader.exec_module(module)
        _COMPILED_MODULES[spec.source_file] = module
    return getattr(module, spec.kernel)


@dataclass(frozen=True)
class CompileReport:
    """What ptxas reports for one kernel on one target."""

    kernel: str
    target: Target
    specialization: Specialization
    registers: int
    spill_stores: int  # bytes
    spill_loads: int  # bytes
    stack: int  # bytes of stack frame (local memory)
    shared: int  # bytes of dynamic shared memory a launch requests
    num_warps: int
    num_stages: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads


class PtxasLogMissing(RuntimeError):
    """This Triton did not print ptxas's ``-v`` log (``TRITON_DUMP_PTXAS_LOG``)."""


_USED = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_kernel(spec: Specialization, target: Target) -> CompileReport:
    """Compile ``spec`` for ``target`` with the installed Triton and read ptxas's ``-v`` log.

    Runs in the calling process: call it from a process that has not run Triton's
    interpreter (which leaves ``triton.language`` patched); :func:`compile_all` does so.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _jit_function(spec)
    names = list(fn.arg_names)
    constants = {(names.index(k),): v for k, v in spec.constants}
    attrs = {(names.index(k),): [["tt.divisibility", 16]] for k in spec.divisible}
    source = ASTSource(fn, dict(spec.signature), constants, attrs)
    log = io.StringIO()
    # Compile even when Triton's cache has the kernel, so that ptxas runs and prints its log.
    with _environment(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1", TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1")):
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", target.capability, 32), options=dict(spec.options))
    text = log.getvalue()
    used = _USED.search(text)
    spills = _SPILLS.search(text)
    if used is None or spills is None:
        raise PtxasLogMissing(f"no ptxas -v log for {spec.kernel} (TRITON_DUMP_PTXAS_LOG is not honoured by this Triton?): {text[-500:]!r}")
    metadata = compiled.metadata
    return CompileReport(
        kernel=spec.kernel,
        target=target,
        specialization=spec,
        registers=int(used.group(1)),
        spill_stores=int(spills.group(2)),
        spill_loads=int(spills.group(3)),
        stack=int(spills.group(1)),
        shared=int(metadata.shared),
        num_warps=int(metadata.num_warps),
        num_stages=int(metadata.num_stages),
    )


def _compile_job(job: tuple[Specialization, Target]) -> CompileReport:
    return compile_kernel(*job)


def _worker_start() -> None:
    os.environ.pop("TRITON_INTERPRET", None)


def compile_all(jobs: list[tuple[Specialization, Target]], workers: int = 2) -> list[CompileReport]:
    """:func:`compile_kernel` for each ``(specialization, target)``, in fresh worker processes.

    Fresh processes, because a process that ran kernels in Triton's interpreter cannot compile
    them any more; ``workers`` of them, since ptxas is single-threaded.
    """
    import concurrent.futures
    import multiprocessing

    if not jobs:
        return []
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=context, initializer=_worker_start) as pool:
        return list(pool.map(_compile_job, jobs))


def report_table(reports: list[tuple[str, CompileReport]]) -> str:
    """A Markdown table of ``(cell, report)`` pairs."""
    lines = [
        "| cell | kernel | target | warps | stages | registers | spill stores / loads (B) | shared (KB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for cell, r in reports:
        lines.append(
            f"| {cell} | {r.specialization.describe()} | {r.target.name} | {r.num_warps} | {r.num_stages} | {r.registers} | "
            f"{r.spill_stores} / {r.spill_loads} | {r.shared / 1024:.1f} |"
        )
    return "\n".join(lines)
