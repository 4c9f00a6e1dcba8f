"""The ``recdsl`` command: explain, run (and the later stages' commands) on ``.rec`` files."""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Callable, Sequence

from . import __version__
from .errors import RecDSLError

_DESCRIPTION = """\
recdsl compiles recurrences (RNN and state-space cells written in a few lines) to PyTorch.

  recdsl explain examples/gla.rec --dim dk=64 --dim dv=64
      what kind of recurrence each state is, which bindings are time-parallel,
      which outputs are linear read-outs, and which backend `auto` picks
  recdsl run examples/mingru.rec --batch 4 --length 1024
      compile, run on random inputs, print output shapes and timing
  recdsl check examples/deltanet.rec
      property-based test that every backend agrees with the sequential
      reference (outputs, final states, gradients), and that declared
      monoids are associative with their identity
  recdsl bench examples/gla.rec --lengths 256 1024 4096
      time every backend forward and forward+backward across T; a table and
      a plot (time against T, log-log) in gla_bench.png
  recdsl explain examples/lstm.rec --format dot --output lstm.png
      the analysis as a diagram (needs Graphviz); --format json for tools

Dims not given on the command line take their defaults from the cell, or else
distinct values 8, 12, 16, ... (distinct so that mismatched dims are caught).
"""


def _integer(minimum: int, maximum: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse ``type`` for an integer option in ``[minimum, maximum]``: a bad value is a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
            raise argparse.ArgumentTypeError(f"expected an integer {bounds}, got {value}")
        return value

    parse.__name__ = what  # argparse names the type in its own messages
    return parse


_POSITIVE = _integer(1, what="a positive integer")
# torch.Generator.manual_seed takes any value that fits in 64 bits, signed or unsigned.
_TORCH_SEED = _integer(-(2**63), 2**64 - 1, what="an integer seed")
# check runs lengths up to 3 chunks + 3 steps through the sequential reference: keep it finite.
_CHECK_CHUNK = _integer(1, 4096, what="a chunk length")


def _parse_dims(items: Sequence[str]) -> dict[str, int | float]:
    dims: dict[str, int | float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise RecDSLError(f"cannot read --dim {item!r}", expected="NAME=VALUE, e.g. --dim d=64")
        try:
            number: int | float = int(value)
        except ValueError:
            try:
                number = float(value)
            except ValueError:
                raise RecDSLError(f"the value of --dim {name} is not a number: {value!r}", expected="NAME=VALUE, e.g. --dim d=64") from None
        dims[name.strip()] = number
    return dims


def _complete_dims(path: str, cell: str | None, given: dict[str, int | float], small: bool = False) -> tuple[dict[str, int | float], list[str]]:
    """``given`` plus a distinct value for every dim that has neither a value nor a default.

    ``small`` picks 3, 4, 5, ... (for property tests) instead of 8, 12, 16, ...
    """
    from .frontend import read_source
    from .parser import parse

    source = read_source(path)
    program = parse(source.text, source.filename)
    cells = [c for c in program.cells() if cell is None or c.name == cell]
    if len(cells) != 1:
        return given, []  # let the checker report the ambiguity or the missing cell
    filled = dict(given)
    notes = []
    next_value, step = (3, 1) if small else (8, 4)
    for dim in cells[0].dims:
        if dim.name not in filled and dim.default is None:
            filled[dim.name] = next_value
            notes.append(f"{dim.name}={next_value}")
            next_value += step
    return filled, notes


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a .rec source file")
    parser.add_argument("--cell", help="the cell to use when the file defines several")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="bind a dim (repeatable), e.g. --dim d=64")
    parser.add_argument("--backend", default="auto", help="auto (default) or a backend name: sequential, scan, chunked, triton, newton")


def _explain(args: argparse.Namespace) -> int:
    from .explainer import explain

    dims, notes = _complete_dims(args.file, args.cell, _parse_dims(args.dim))
    if notes:  # on stderr for json/dot, whose stdout is read by tools
        print(f"(dims not given, set to: {', '.join(notes)})", file=sys.stdout if args.format == "text" else sys.stderr)
    if args.format != "text" or args.output:
        from .explain_formats import Format, write_explanation

        return write_explanation(args.file, Format(args.format), args.output, cell=args.cell, backend=args.backend, dims=dims)
    print(explain(args.file, cell=args.cell, backend=args.backend, plan=args.plan, dims=dims), end="")
    if args.sequence_parallel is not None:
        from .analysis import analyze
        from .distributed import describe_exchanges
        from .frontend import load

        from .plan import BackendKind

        analysis = analyze(load(args.file, cell=args.cell, dims=dims))
        if args.backend in {kind.value for kind in BackendKind} and BackendKind(args.backend) is BackendKind.NEWTON:
            from .distributed_newton import describe_newton
            from .plan import plan as make_plan

            print(describe_newton(make_plan(analysis, BackendKind.NEWTON.value), args.sequence_parallel), end="")
        else:
            print(describe_exchanges(analysis, args.sequence_parallel), end="")
    return 0


def _run(args: argparse.Namespace) -> int:
    import torch

    from .limits import MAX_ELEMENTS_VARIABLE, element_budget
    from .module import compile

    dims, notes = _complete_dims(args.file, args.cell, _parse_dims(args.dim))
    if notes:
        print(f"(dims not given, set to: {', '.join(notes)})")
    dtype = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    try:
        device = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise RecDSLError(f"cannot read --device {args.device!r}", expected="a torch device such as cpu, cuda or cuda:1") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RecDSLError(f"device '{args.device}' is not available: this torch has no CUDA device", expected="--device cpu")
    module = compile(args.file, backend=args.backend, cell=args.cell, dims=dims).to(args.device)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    budget = element_budget()
    inputs = {}
    for declared in module.cell.inputs:
        shape = (args.batch, args.length, *args.heads, *declared.type.shape)
        elements = math.prod(shape)
        if elements > budget:
            raise RecDSLError(
                f"input '{declared.name}' of --batch {args.batch} --length {args.length} would have shape {list(shape)}: "
                f"{elements:_} elements, more than the budget of {budget:_}",
                expected=f"a smaller --batch, --length or --heads, or a larger budget: {MAX_ELEMENTS_VARIABLE}=N",
            )
        if declared.type.kind.value == "complex":
            value = torch.complex(torch.randn(shape, generator=generator), torch.randn(shape, generator=generator))
        else:
            value = torch.randn(shape, generator=generator)
        inputs[declared.name] = value.to(device=args.device, dtype=dtype if not value.is_complex() else value.dtype)
    print(f"cell {module.cell.name}({', '.join(f'{n}={v}' for n, v in module.cell.dims)}) on {args.device}, backend {module.backend}")
    for name, value in inputs.items():
        print(f"  input  {name:<10} {list(value.shape)} {str(value.dtype).replace('torch.', '')}")
    with torch.no_grad():
        outputs = module(**inputs)  # warm-up, and the shapes to print
        timings = []
        for _ in range(args.repeat):
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            module(**inputs)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            timings.append(time.perf_counter() - start)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    for emit, value in zip(module.cell.outputs, outputs):
        label = emit.name or str(emit.index)
        print(f"  output {label:<10} {list(value.shape)} {str(value.dtype).replace('torch.', '')}")
    timings.sort()
    median = timings[len(timings) // 2]
    steps = args.batch * args.length
    print(f"  forward: median {median * 1e3:.3f} ms over {args.repeat} runs ({steps / median:,.0f} steps/s)")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .testing import check_equivalence, check_monoid_laws

    dims, notes = _complete_dims(args.file, args.cell, _parse_dims(args.dim), small=True)
    if notes:
        print(f"(dims not given, set to: {', '.join(notes)})")
    backends = [b for b in args.backends.split(",") if b] if args.backends else None
    from .progress import progress

    with progress(total=args.max_examples, desc="check", unit="example") as bar:
        report = check_equivalence(
            args.file, cell=args.cell, dims=dims, backends=backends, max_examples=args.max_examples, chunk_size=args.chunk_size,
            hypothesis_seed=args.seed, on_example=bar.update,
        )
    print(report)
    violations = check_monoid_laws(args.file, cell=args.cell, dims=dims, max_examples=args.max_examples)
    for violation in violations:
        print(violation)
    if not violations and _has_scan(args.file, args.cell, dims):
        print("monoid laws: associativity and identity hold")
    return 0 if report.ok and not violations else 1


def _emit(args: argparse.Namespace) -> int:
    from .analysis import analyze
    from .frontend import load, read_source
    from .plan import plan as make_plan

    if args.backend not in ("triton", "fused"):
        print(f"recdsl emit: only the triton backend (and fused's CUDA kernels) generates code here (got '{args.backend}')", file=sys.stderr)
        return 2
    from .backends import triton_backend

    dims, notes = _complete_dims(args.file, args.cell, _parse_dims(args.dim))
    if notes:
        print(f"# (dims not given, set to: {', '.join(notes)})")
    planned = make_plan(analyze(load(args.file, cell=args.cell, dims=dims)), args.backend)
    if args.backend == "fused":  # what it runs on CUDA tensors: the fused sequential Triton kernel
        if planned.gpu is None:
            print("recdsl emit: backend 'fused' has no CUDA kernels here (triton is not installed)", file=sys.stderr)
            return 2
        planned = planned.gpu
    print(triton_backend.emit(planned, read_source(args.file).filename), end="")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .bench import Pass, format_table, plot_result, run_bench

    plot = None if args.no_plot else Path(args.plot or f"{Path(args.file).stem}_bench.png")
    if plot is not None:
        from .plotting import pyplot

        pyplot()  # a missing matplotlib is reported before the timing, not after
    dims, notes = _complete_dims(args.file, args.cell, _parse_dims(args.dim))
    if notes:
        print(f"(dims not given, set to: {', '.join(notes)})")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RecDSLError(f"device '{args.device}' is not available: this torch has no CUDA device", expected="--device cpu")
    backends = [b for b in args.backends.split(",") if b] if args.backends else None
    passes = (Pass.FORWARD,) if args.forward_only else (Pass.FORWARD, Pass.FORWARD_BACKWARD)
    result = run_bench(
        args.file, cell=args.cell, dims=dims, lengths=args.lengths, batches=args.batch, heads=args.heads, backends=backends,
        passes=passes, repeat=args.repeat, device=args.device, max_sequential_length=args.max_sequential_length,
    )
    print(format_table(result), end="")
    if plot is not None:
        print(f"plot: {plot_result(result, plot)}")
    return 0


def _has_scan(path: str, cell: str | None, dims: dict) -> bool:
    from .frontend import load

    return bool(load(path, cell=cell, dims=dims).scans)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recdsl", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"recdsl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    explain = commands.add_parser("explain", help="print the analysis of a cell", description="Print what kind of recurrence a cell is and how it will run.")
    _common(explain)
    explain.add_argument("--plan", action="store_true", help="also print the execution plan: each recurrence's form, the forms rejected and why, and the predicted costs")
    explain.add_argument("--format", default="text", choices=["text", "json", "dot"], help="text (default); json for tools (schema: recdsl.explain/1); dot: a Graphviz diagram")
    explain.add_argument("--sequence-parallel", type=int, metavar="P", help="also print what recdsl.distributed.SequenceParallel exchanges over P ranks: each recurrence's summary, exchange and correction")
    explain.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout; with --format dot, a .png/.svg/.pdf FILE is rendered by Graphviz")
    explain.set_defaults(handler=_explain)

    run = commands.add_parser("run", help="compile a cell and run it on random inputs", description="Compile a cell, run it on random inputs, print output shapes and timing.")
    _common(run)
    run.add_argument("--batch", type=_POSITIVE, default=2, help="batch size B (default 2)")
    run.add_argument("--length", type=_POSITIVE, default=128, help="sequence length T (default 128)")
    run.add_argument("--heads", type=_POSITIVE, nargs="*", default=[], help="extra batch-like dims between T and the declared shape")
    run.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    run.add_argument("--device", default="cpu", help="torch device (default cpu)")
    run.add_argument("--repeat", type=_POSITIVE, default=5, help="timed runs after one warm-up (default 5)")
    run.add_argument("--seed", type=_TORCH_SEED, default=0, help="seed of the random inputs (default 0)")
    run.set_defaults(handler=_run)

    check = commands.add_parser(
        "check",
        help="test that every backend agrees with the sequential reference",
        description="Property-based equivalence of every available backend with the sequential reference on random "
        "shapes, lengths (including 1 and non-multiples of the chunk), initial states and inputs: outputs, final states "
        "and gradients. Declared monoids are also tested for associativity and identity. Exit status 1 on a failure, "
        "with a minimal counterexample and a snippet that reproduces it.",
    )
    check.add_argument("file", help="a .rec source file")
    check.add_argument("--cell", help="the cell to use when the file defines several")
    check.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="bind a dim (repeatable); unbound dims get 3, 4, 5, ...")
    check.add_argument("--backends", help="comma-separated backends to test (default: all that apply)")
    check.add_argument("--max-examples", type=_POSITIVE, default=25, help="Hypothesis examples per property (default 25)")
    check.add_argument("--chunk-size", type=_CHECK_CHUNK, default=8, help="chunk length for the chunked backend (default 8, so short sequences cross chunks)")
    check.add_argument("--seed", type=int, default=None, help="Hypothesis seed, for a reproducible search")
    check.set_defaults(handler=_check)

    bench = commands.add_parser(
        "bench",
        help="time a cell on every backend across sequence lengths, with a table and a plot",
        description="Time one cell on every backend that can run it (or --backends), forward and forward+backward, "
        "at each --lengths T and --batch B; print a table (milliseconds, median after a warm-up) and write a plot "
        "of time against T (log-log, one line per backend) to a PNG. The plot needs matplotlib (pip install 'recdsl[plot]').",
    )
    bench.add_argument("file", help="a .rec source file")
    bench.add_argument("--cell", help="the cell to use when the file defines several")
    bench.add_argument("--dim", action="append", default=[], metavar="NAME=VALUE", help="bind a dim (repeatable), e.g. --dim d=64")
    bench.add_argument("--lengths", type=int, nargs="+", default=[64, 256, 1024, 4096], metavar="T", help="sequence lengths (default 64 256 1024 4096)")
    bench.add_argument("--batch", type=int, nargs="+", default=[4], metavar="B", help="batch sizes (default 4)")
    bench.add_argument("--heads", type=int, nargs="*", default=[], help="extra batch-like dims between T and the declared shape")
    bench.add_argument("--backends", help="comma-separated backends (default: every one that runs the cell here; triton on CUDA only)")
    bench.add_argument("--repeat", type=int, default=3, help="timed runs after one warm-up (default 3)")
    bench.add_argument("--device", default="cpu", help="torch device (default cpu)")
    bench.add_argument("--max-sequential-length", type=int, default=4096, help="skip the sequential backend above this T (default 4096)")
    bench.add_argument("--forward-only", action="store_true", help="time the forward pass only")
    bench.add_argument("--plot", metavar="FILE.png", help="where the plot goes (default: FILE's stem + _bench.png)")
    bench.add_argument("--no-plot", action="store_true", help="print the table only")
    bench.set_defaults(handler=_bench)

    emit = commands.add_parser(
        "emit",
        help="print the code a backend generates",
        description="Print the Triton kernels generated for a cell: per recurrence its combine, forward and backward kernel, "
        "with the source line each part came from.",
    )
    _common(emit)
    emit.set_defaults(handler=_emit, backend="triton")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``recdsl`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.handler(args)
    except RecDSLError as error:
        print(str(error), file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
