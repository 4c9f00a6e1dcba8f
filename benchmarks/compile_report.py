"""Registers, spills and shared memory of every Triton kernel, compiled ahead of time for sm_80 and sm_90.

Runs on a CPU: each example layer's forward and backward launches are recorded (kernels not
run) and every distinct kernel is compiled with ``triton.compile`` for both targets; ptxas's
``-v`` log gives registers and spills.  ``--tf32`` adds the chunked kernels with TF32 matmuls,
``--bfloat16`` the layers in bfloat16 and the chunked kernels with bfloat16 operands.

    python benchmarks/compile_report.py [--tf32] [--out FILE] [--layers gru lstm ...] [--bfloat16]

(tests/test_triton_compile.py asserts the same numbers: no spills, shared memory within limits.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from recdsl.backends import triton_aot

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf32", action="store_true", help="also compile the chunked kernels with TF32 matmuls")
    parser.add_argument("--out", type=Path, help="write the Markdown table here too")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--layers", nargs="*", help="only the layers of these examples (e.g. gru lstm paragru)")
    parser.add_argument("--bfloat16", action="store_true", help="also record each layer with bfloat16 inputs and params")
    args = parser.parse_args(argv)
    missing = triton_aot.nvidia_backend_missing()
    if missing:
        print(f"cannot compile ahead of time: {missing}")
        return 1
    started = time.time()
    specs: dict[triton_aot.Specialization, str] = {}
    import torch

    dtypes = [torch.float32] + ([torch.bfloat16] if args.bfloat16 else [])
    for layer in triton_aot.LAYERS:
        if args.layers and layer.example not in args.layers:
            continue
        for dtype in dtypes:
            suffix = "" if dtype == torch.float32 else ", bfloat16"
            # Batch 1: the diagonal scans run with T split across programs; split_programs = 0 adds the one-pass kernels.
            for options in (None, {"split_programs": 0}):
                for spec in triton_aot.distinct(triton_aot.layer_launches(EXAMPLES, layer, dtype, backend_options=options)):
                    specs.setdefault(spec, layer.label + suffix)
    if args.tf32:
        for size in (64, 128):
            for rows, label in ((True, "gla"), (False, "retnet")):
                for spec in triton_aot.distinct(triton_aot.chunk_launches(size, size, rows, allow_tf32=True)):
                    specs.setdefault(spec, f"{label}(dk={size}, dv={size}), allow_tf32")
    if args.bfloat16:
        # The chunked kernels called with bfloat16 operands directly (a compiled bfloat16 cell passes them too).
        for size in (64, 128):
            for rows, label in ((True, "gla"), (False, "retnet")):
                for spec in triton_aot.distinct(triton_aot.chunk_launches(size, size, rows, allow_tf32=False, dtype=torch.bfloat16)):
                    specs.setdefault(spec, f"{label}(dk={size}, dv={size}), bfloat16 operands")
    jobs = [(spec, target) for spec in specs for target in triton_aot.TARGETS]
    reports = triton_aot.compile_all(jobs, workers=args.workers)
    table = triton_aot.report_table([(specs[r.specialization], r) for r in reports])
    print(table)
    print(f"\n{len(jobs)} compiles in {time.time() - started:.0f} s")
    if args.out:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
