"""``recdsl bench``, ``benchmarks/bench_parallel.py --plot`` and the progress bars.

Tiny sizes; the tests check the table, the skipped cells and that a valid PNG is
written.  They never assert a timing.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import recdsl
from recdsl.bench import Pass, format_table, run_bench
from recdsl.testing import available_backends
from recdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MINGRU = [str(EXAMPLES / "mingru.rec"), "--dim", "d_in=3", "--dim", "d=4"]


def _rows(out: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| ") and not line.startswith("| backend")]


def test_bench_prints_a_table_for_every_backend_and_pass_and_writes_a_png(tmp_path, capsys):
    plot = tmp_path / "mingru.png"
    assert main(["bench", *MINGRU, "--lengths", "4", "9", "--repeat", "1", "--plot", str(plot)]) == 0
    captured = capsys.readouterr()
    assert "| backend | pass | B | T=4 | T=9 |" in captured.out
    rows = _rows(captured.out)
    applicable = ("sequential",) + available_backends(recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4))
    assert {"scan", "chunked"} <= set(applicable)
    assert {(r[0], r[1]) for r in rows} == {(b, p.value) for b in applicable for p in Pass}
    for row in rows:
        assert row[2] == "4" and all(float(ms) > 0 for ms in row[3:]), row
    assert f"plot: {plot}" in captured.out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert captured.err == "", "the progress bar must be quiet when stderr is not a terminal"


def test_bench_options_backends_batches_forward_only_no_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *MINGRU, "--lengths", "3", "--batch", "1", "2", "--backends", "scan", "--forward-only", "--repeat", "1", "--no-plot"]) == 0
    rows = _rows(capsys.readouterr().out)
    assert [(r[0], r[1], r[2]) for r in rows] == [("scan", "forward", "1"), ("scan", "forward", "2")]
    assert list(tmp_path.iterdir()) == []


def test_bench_skips_the_sequential_loop_above_its_length(tmp_path, capsys):
    assert main(["bench", *MINGRU, "--lengths", "2", "8", "--backends", "sequential", "--max-sequential-length", "4", "--repeat", "1", "--no-plot"]) == 0
    out = capsys.readouterr().out
    for row in _rows(out):
        assert row[4] == "—" and float(row[3]) > 0
    assert "—: skipped, T > --max-sequential-length 4" in out


def test_bench_default_plot_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["bench", *MINGRU, "--lengths", "2", "--backends", "scan", "--repeat", "1"]) == 0
    assert (tmp_path / "mingru_bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_bench_of_a_backend_that_cannot_run_the_cell_is_a_clean_error(capsys):
    assert main(["bench", str(EXAMPLES / "gru.rec"), "--dim", "d_in=3", "--dim", "d=4", "--lengths", "2", "--backends", "scan", "--no-plot"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("backend error: backend 'scan' cannot run cell GRU")
    assert "Traceback" not in err


def test_bench_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert main(["bench", *MINGRU, "--lengths", "2", "--plot", str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("missing dependency: writing a plot needs matplotlib")
    assert "pip install 'recdsl[plot]'" in err
    assert main(["bench", *MINGRU, "--lengths", "2", "--backends", "scan", "--repeat", "1", "--no-plot"]) == 0


def test_run_bench_api_and_table():
    result = run_bench(EXAMPLES / "gla.rec", dims={"dk": 3, "dv": 2}, lengths=(5,), batches=(1,), heads=(2,), repeat=1, show_progress=False)
    applicable = ("sequential",) + available_backends(recdsl.compile(EXAMPLES / "gla.rec", dk=3, dv=2))
    assert result.backends == applicable and {"scan", "chunked"} <= set(applicable)
    assert len(result.timings) == len(applicable) * 2
    table = format_table(result)
    assert table.startswith("cell GLA(dk=3, dv=2) on cpu, heads [2]")


def test_progress_bar_shows_when_forced(capsys, monkeypatch):
    monkeypatch.setenv("RECDSL_PROGRESS", "1")
    assert main(["bench", *MINGRU, "--lengths", "2", "--backends", "scan", "--repeat", "1", "--no-plot"]) == 0
    assert "bench MinGRU" in capsys.readouterr().err
    monkeypatch.setenv("RECDSL_PROGRESS", "1")
    assert main(["check", str(EXAMPLES / "mingru.rec"), "--max-examples", "2"]) == 0
    err = capsys.readouterr().err
    assert "check" in err and "example" in err


def _load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_parallel_writes_a_plot(tmp_path, capsys):
    bench_parallel = _load_benchmark("bench_parallel")
    plot = tmp_path / "bp.png"
    assert bench_parallel.main(["--cells", "minGRU", "--lengths", "8", "16", "--repeat", "1", "--batch", "1", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "| recdsl chunked | fwd+bwd |" in out
    assert plot.read_bytes().startswith(PNG_SIGNATURE)


@pytest.mark.parametrize("args, message", [(["--lengths", "0"], "every length must be a positive integer, got [0]"), (["--batch", "-1"], "every batch size"), (["--repeat", "0"], "every repeat")])
def test_bench_rejects_sizes_it_cannot_time(args, message, capsys):
    assert main(["bench", *MINGRU, "--no-plot", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bench error: ") and message in err
    assert "Traceback" not in err
