"""benchmarks/bench_cost_model.py times every example: `auto` is checked against the loop on all of them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_cost_model_benchmark_covers_every_example() -> None:
    spec = importlib.util.spec_from_file_location("bench_cost_model", ROOT / "benchmarks" / "bench_cost_model.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    covered = {Path(path).stem for _, path, _ in bench.CELLS}
    examples = {path.stem for path in (ROOT / "examples").glob("*.rec")}
    assert examples - covered == set(), f"examples missing from bench_cost_model.CELLS: {sorted(examples - covered)}"
