"""Bytes moved by one layer's forward and backward pass, against the minimum, per example and backend.

    python benchmarks/traffic.py                     # writes benchmarks/RESULTS_TRAFFIC.md
    python benchmarks/traffic.py --quick             # small sizes, a smoke test
    python benchmarks/traffic.py --examples mingru gla --backends scan triton
    python benchmarks/traffic.py --examples mingru --backends triton --scope scan --ops   # where the bytes go
    python benchmarks/traffic.py --dtype bfloat16 --out -   # bfloat16 inputs and params

A scan is bandwidth bound on a GPU, so (minimum bytes) / (bytes moved) is the best fraction
of memory bandwidth a layer can reach: the "useful" column.  Both numbers are counted, not
timed, so the table is the same on a CPU as on a GPU:

- every aten op under a ``TorchDispatchMode`` reads its tensor arguments and writes its
  results; a tensor counts ``itemsize x`` the elements it addresses (dims of stride 0,
  broadcast, count once); views (ops whose results alias an argument: ``view``,
  ``expand``, ``transpose``, ``detach``, ...) and allocations (``empty``) move nothing;
  an in-place op reads and writes the tensor it mutates (``copy_`` and ``fill_`` only write);
- each Triton kernel launch moves the footprint of every distinct tensor argument once
  (:mod:`recdsl.backends.triton_launch` records launches).  The Triton backend runs here
  with its kernels recorded but not run (no GPU needed; values are meaningless, sizes are
  real), so the torch work around the kernels is counted at full size;
- the minimum, forward: every input and parameter read once, every output written once;
  backward: each output's gradient ``dy``, the outputs (standing for the states a fused
  backward re-reads), the inputs and the parameters read once, and one gradient per input
  and parameter written.

Two definitions of "the layer", both reported (``--scope layer``, ``scan`` or ``both``):

- **whole layer** (rows named after the example, e.g. ``mingru(d_in=1024, d=1024)``): the
  example cell as written, its input projections ``x @ W + b`` inside.  Its minimum reads
  ``x`` and the weights once and writes the output once, so every projected gate counts as
  traffic: at d_in = d the projections' outputs (two to three ``[B, T, d]`` tensors) and, in
  backward, their matmuls' reads and writes dominate.  On a GPU those matmuls are compute
  bound and the same for every implementation; the fraction is what the layer moves
  against what an ideal layer with the projections fused into the scan would move;
- **scan only** (rows ``scan:mingru(d=1024)``): the recurrence given its projected inputs,
  the cells of :data:`SCAN_CELLS` below (the gate pre-activations ``x W_z + b_z``, ... are
  inputs; the output is the state; the output gate of HGRN, LRU's read-out ``Re(h C) + D x``
  and the projections stay outside, as in fla's HGRN and accelerated-scan kernels, which
  take projected inputs).  Its minimum is the per-element inputs read once and the state
  written once: for minGRU 8 + 4 = 12 bytes per element forward (issue 11's "60%, +8
  B/element from torch.cat" is 12 against 20 on this definition).

``--ops`` prints, per row, the bytes of each aten op (by name) and each kernel (by name).
``--split-programs N`` passes the Triton scan kernels' option of that name (0: T never split
across programs, what a batch large enough to fill the machine gets; by default B = 2,
d = 1024 is 32 programs, so T is split: the affine scans run in one look-back pass each way,
semirings and monoids in three passes that read their inputs twice).

Sizes (``--batch``, ``--length``; default B = 2, T = 2048; B > 1 shows what merging batch
and heads into one axis costs): diagonal cells at d = 1024, S6 at d = 256, n = 16, the
chunked family at 16 heads with dk = dv = 64 (mLSTM, GLA, RetNet) or p = n = 64 (Mamba-2).
The issue's B = 8, T = 4096 takes 8x the memory; past B = 2 the fractions hardly move (the
per-element costs do not depend on B or T, only the parameters' share of the minimum does).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import recdsl

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULTS = Path(__file__).resolve().parent / "RESULTS_TRAFFIC.md"


# The scan-only cells: each example's recurrence given its projected inputs (see the docstring).
SCAN_CELLS = {
    "mingru": """
cell MinGRUScan(d) {
    input z_pre: [d]    # x W_z + b_z
    input hc: [d]       # x W_h + b_h
    state h: [d] = 0
    z = sigmoid(z_pre)
    h = (1 - z) * h + z * hc
    out h
}""",
    "minlstm": """
cell MinLSTMScan(d) {
    input f_pre: [d]    # x W_f + b_f
    input i_pre: [d]    # x W_i + b_i
    input hc: [d]       # x W_h + b_h
    state h: [d] = 0
    f = sigmoid(f_pre)
    i = sigmoid(i_pre)
    h = f / (f + i) * h + i / (f + i) * hc
    out h
}""",
    "hgrn": """
cell HGRNScan(d, lower = 0.0) {
    input f_pre: [d]    # x W_f + b_f
    input c_pre: [d]    # x W_c + b_c
    state h: [d] = 0
    lam = lower + (1 - lower) * sigmoid(f_pre)
    h = lam * h + (1 - lam) * silu(c_pre)
    out h
}""",
    "rglru": """
cell RGLRUScan(d, c = 8, r_min = 0.9, r_max = 0.999) {
    input r_pre: [d]    # x W_a + b_a
    input i_pre: [d]    # x W_x + b_x
    input x: [d]
    param Lambda: [d] = log(expm1(-log(r_min + (r_max - r_min) * (arange(d) + 0.5) / d) / c))
    state h: [d] = 0
    a = exp(-c * softplus(Lambda) * sigmoid(r_pre))
    h = a * h + sqrt(1 - a**2) * (sigmoid(i_pre) * x)
    out h
}""",
    "lru": """
cell LRUScan(n, r_min = 0.0, r_max = 1.0, max_phase = 6.28) {
    input bu: complex[n]    # x B_re + i x B_im
    const u = r_min**2 + (r_max**2 - r_min**2) * (arange(n) + 0.5) / n
    const p = max_phase * (arange(n) + 0.5) / n
    param nu_log: [n] = log(-0.5 * log(u))
    param theta_log: [n] = log(p)
    param gamma_log: [n] = 0.5 * log(1 - u)
    state h: complex[n] = 0
    h = exp(-exp(nu_log) + 1j * exp(theta_log)) * h + exp(gamma_log) * bu
    out h
}""",
}


@dataclass(frozen=True)
class Layer:
    example: str
    dims: dict
    heads: tuple[int, ...] = ()
    backends: tuple[str, ...] = ("scan", "triton")
    scan_only: bool = False  # the recurrence of SCAN_CELLS[example], given projected inputs

    @property
    def source(self):
        return SCAN_CELLS[self.example] if self.scan_only else EXAMPLES / f"{self.example}.rec"

    @property
    def label(self) -> str:
        dims = ", ".join(f"{k}={v}" for k, v in self.dims.items())
        heads = ", heads=" + "x".join(map(str, self.heads)) if self.heads else ""
        return f"{'scan:' if self.scan_only else ''}{self.example}({dims}{heads})"


LAYERS = (
    Layer("mingru", dict(d_in=1024, d=1024)),
    Layer("mingru", dict(d_in=64, d=64), heads=(16,)),
    Layer("minlstm", dict(d_in=1024, d=1024)),
    Layer("hgrn", dict(d_in=1024, d=1024)),
    Layer("rglru", dict(d=1024)),
    Layer("lru", dict(d=1024, n=1024)),
    Layer("s6", dict(d=256, n=16)),
    Layer("aaren", dict(d=1024)),
    Layer("gla", dict(dk=64, dv=64), heads=(16,), backends=("chunked", "triton")),
    Layer("retnet", dict(dk=64, dv=64), heads=(16,), backends=("chunked", "triton")),
    Layer("mlstm", dict(dk=64, dv=64), heads=(16,), backends=("chunked", "triton")),
    Layer("mamba2", dict(p=64, n=64), heads=(16,), backends=("chunked", "triton")),
    Layer("deltanet", dict(dk=64, dv=64), heads=(16,), backends=("chunked", "triton")),
    Layer("gated_deltanet", dict(dk=64, dv=64), heads=(16,), backends=("chunked", "triton")),
    Layer("mingru", dict(d=1024), scan_only=True),
    Layer("mingru", dict(d=64), heads=(16,), scan_only=True),
    Layer("minlstm", dict(d=1024), scan_only=True),
    Layer("hgrn", dict(d=1024), scan_only=True),
    Layer("rglru", dict(d=1024), scan_only=True),
    Layer("lru", dict(n=1024), scan_only=True),
)


# ---- counting ----------------------------------------------------------------------------------


def footprint(tensor: torch.Tensor) -> int:
    """Bytes a tensor addresses: its element size times the sizes of its non-broadcast dims."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "bernoulli_", "random_"}
# Allocations, metadata, and views whose schema does not declare the alias (``_unsafe_view``
# is how ``reshape`` returns a view of a matmul's result).
_FREE = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "_local_scalar_dense",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "_unsafe_view", "_reshape_alias",
}


@dataclass
class Traffic:
    """Bytes read and written by aten ops and by Triton kernels, and how many of each ran."""

    read: int = 0
    written: int = 0
    kernel_bytes: int = 0
    ops: int = 0
    kernels: int = 0
    op_names: dict = field(default_factory=dict)
    op_bytes: dict = field(default_factory=dict)  # aten op name -> bytes read and written
    kernel_names: dict = field(default_factory=dict)  # kernel name -> launches
    kernel_footprints: dict = field(default_factory=dict)  # kernel name -> bytes of its arguments

    @property
    def total(self) -> int:
        return self.read + self.written + self.kernel_bytes


class CountingMode(TorchDispatchMode):
    """Adds every aten op's bytes to a :class:`Traffic`."""

    def __init__(self, traffic: Traffic) -> None:
        super().__init__()
        self.traffic = traffic

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        schema = func._schema
        name = schema.name.split("::")[-1]
        if name in _FREE:
            return result
        returns_alias = [r.alias_info for r in schema.returns]
        if returns_alias and all(a is not None and not a.is_write for a in returns_alias):
            return result  # a view
        mutated, read = [], []
        for argument, value in zip(schema.arguments, list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]):
            tensors = _tensors(value)
            if argument.alias_info is not None and argument.alias_info.is_write:
                mutated.extend(tensors)
            else:
                read.extend(tensors)
        base = name.split(".")[0]
        written = sum(footprint(t) for t in mutated) if mutated else sum(footprint(t) for t in _tensors(result))
        reads = sum(footprint(t) for t in read)
        if mutated and base not in _WRITE_ONLY:
            reads += sum(footprint(t) for t in mutated)
        self.traffic.read += reads
        self.traffic.written += written
        self.traffic.ops += 1
        self.traffic.op_names[base] = self.traffic.op_names.get(base, 0) + 1
        self.traffic.op_bytes[base] = self.traffic.op_bytes.get(base, 0) + reads + written
        return result


@contextlib.contextmanager
def counting(traffic: Traffic):
    """Count aten ops and Triton launches (recorded, not run) inside the block into ``traffic``."""
    from recdsl.backends.triton_launch import observe_launches

    with observe_launches(run_kernels=False) as launches, CountingMode(traffic):
        yield
    for launch in launches:
        traffic.kernels += 1
        # A tensor passed twice (the delta rule's k as both sides of its map) is one buffer.
        distinct = {(a.data_ptr(), a.shape, a.stride()): a for a in launch.args if isinstance(a, torch.Tensor)}
        moved = sum(footprint(a) for a in distinct.values())
        traffic.kernel_bytes += moved
        name = launch.name
        traffic.kernel_names[name] = traffic.kernel_names.get(name, 0) + 1
        traffic.kernel_footprints[name] = traffic.kernel_footprints.get(name, 0) + moved


# ---- one layer ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    label: str
    backend: str
    forward: Traffic
    backward: Traffic
    ideal_forward: int
    ideal_backward: int
    elements: int  # output elements (B x T x outputs), for bytes per element


def _bytes(tensors) -> int:
    return sum(footprint(t) for t in tensors)


def measure(layer: Layer, backend: str, batch: int, length: int, split_programs: int | None = None, dtype: torch.dtype = torch.float32) -> Row:
    """One layer's forward and backward traffic; ``split_programs``: the Triton scan kernels'
    ``backend_options`` of that name (0: never split T; None: the default); ``dtype``: the real
    inputs' and params' dtype (complex ones stay complex64)."""
    torch.manual_seed(0)
    options = {"split_programs": split_programs} if split_programs is not None and backend == "triton" else None
    module = recdsl.compile(layer.source, backend=backend, backend_options=options, **layer.dims)
    for param in module.parameters():
        if not param.is_complex():
            param.data = param.data.to(dtype)
    inputs = []
    for declared in module.cell.inputs:
        shape = (batch, length, *layer.heads, *declared.type.shape)
        value = 0.5 * torch.randn(shape)
        if declared.type.kind.name == "COMPLEX":
            value = torch.complex(value, 0.5 * torch.randn(shape))
        else:
            value = value.to(dtype)
        inputs.append(value.requires_grad_())
    params = [p for p in module.parameters() if p.requires_grad]
    forward = Traffic()
    with counting(forward):
        outputs = module(*inputs)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    grads = [torch.randn_like(o) for o in outputs]
    backward = Traffic()
    with counting(backward):
        torch.autograd.backward(outputs, grads)
    ideal_forward = _bytes(inputs) + _bytes(params) + _bytes(outputs)
    ideal_backward = _bytes(grads) + _bytes(outputs) + _bytes(inputs) + _bytes(params) + _bytes(inputs) + _bytes(params)
    return Row(layer.label, backend, forward, backward, ideal_forward, ideal_backward, sum(o.numel() for o in outputs))


def table(rows: list[Row], batch: int, length: int, dtype: torch.dtype = torch.float32) -> str:
    lines = [
        f"B = {batch}, T = {length}, {str(dtype).removeprefix('torch.')}.  MB = 10^6 bytes; B/el = bytes per output element; useful = minimum / moved.",
        "",
        "| layer | backend | forward MB (min) | forward B/el | forward useful | backward MB (min) | backward B/el | backward useful | aten ops fwd / bwd | kernels fwd / bwd |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.label} | {r.backend} | {r.forward.total / 1e6:.0f} ({r.ideal_forward / 1e6:.0f}) | {r.forward.total / r.elements:.0f} | "
            f"{100 * r.ideal_forward / r.forward.total:.0f}% | {r.backward.total / 1e6:.0f} ({r.ideal_backward / 1e6:.0f}) | "
            f"{r.backward.total / r.elements:.0f} | {100 * r.ideal_backward / r.backward.total:.0f}% | {r.forward.ops} / {r.backward.ops} | "
            f"{r.forward.kernels} / {r.backward.kernels} |"
        )
    return "\n".join(lines)


def breakdown(row: Row) -> str:
    """Where a row's bytes go: per aten op name and per kernel name, largest first, in MB."""
    lines = [f"{row.label} {row.backend}:"]
    for direction, counted, ideal in (("forward", row.forward, row.ideal_forward), ("backward", row.backward, row.ideal_backward)):
        parts = [(f"{name} x{counted.op_names[name]}", moved) for name, moved in counted.op_bytes.items()]
        parts += [(f"kernel {name} x{counted.kernel_names[name]}", moved) for name, moved in counted.kernel_footprints.items()]
        lines.append(f"  {direction}: {counted.total / 1e6:.1f} MB (minimum {ideal / 1e6:.1f})")
        lines += [f"    {moved / 1e6:8.1f} MB  {what}" for what, moved in sorted(parts, key=lambda p: -p[1])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--quick", action="store_true", help="B = 1, T = 256")
    parser.add_argument("--examples", nargs="*", help="only these examples")
    parser.add_argument("--backends", nargs="*", help="only these backends")
    parser.add_argument("--scope", choices=("layer", "scan", "both"), default="both", help="whole layers (projections inside), scan-only cells, or both (default)")
    parser.add_argument("--split-programs", type=int, help="the Triton scan kernels' split_programs (0: one pass, never split T; default: the backend's)")
    parser.add_argument("--ops", action="store_true", help="print each row's bytes per aten op and per kernel")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="the inputs' and params' dtype")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"the Markdown file to write (default {RESULTS.name}); '-' for none")
    args = parser.parse_args(argv)
    batch, length = (1, 256) if args.quick else (args.batch, args.length)
    dtype = getattr(torch, args.dtype)
    # The Triton backend's host code accepts CPU tensors under the interpreter flag; its
    # kernels are recorded, not run, so the interpreter never runs either.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    rows = []
    started = time.time()
    for layer in LAYERS:
        if args.examples and layer.example not in args.examples:
            continue
        if (args.scope == "layer" and layer.scan_only) or (args.scope == "scan" and not layer.scan_only):
            continue
        for backend in layer.backends:
            if args.backends and backend not in args.backends:
                continue
            row = measure(layer, backend, batch, length, args.split_programs, dtype)
            rows.append(row)
            print(table([row], batch, length, dtype).splitlines()[-1], flush=True)
            if args.ops:
                print(breakdown(row), flush=True)
    text = table(rows, batch, length, dtype)
    print(f"\n{text}\n\n({time.time() - started:.0f} s)")
    if str(args.out) != "-":
        header = (
            "# Bytes moved per layer: recdsl's backends against the minimum\n\n"
            "Produced by `python benchmarks/traffic.py` (see its docstring for what is counted). "
            "Counted on a CPU; the Triton backend's kernels were recorded, not run, and each launch counts "
            "the footprint of its tensor arguments once.\n\n"
        )
        args.out.write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
