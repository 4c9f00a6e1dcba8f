"""The ``recdsl`` command: help, explain, run, and how it reports a bad program or file.

Most tests call ``recdsl.cli.main([...])`` in process (with ``capsys``); one runs the
installed ``recdsl`` command in a subprocess, as a user would.  A mistake in a program
exits with status 1 and the located message on stderr, never a traceback.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from recdsl.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

BAD_PROGRAM = """\
cell Bad(d) {
    input x: [d]
    state h: [d] = 0
    h = 0.5 * h + x
    out h @ W
}
"""

BAD_MESSAGE = """\
bad.rec:5:13: name error: undefined name 'W'
   5 |     out h @ W
                   ^
  expected a dim, input, param, const, state or earlier binding of this cell
"""


def _clean(text: str) -> None:
    for internal in ("Traceback", "lark", ".py", "site-packages"):
        assert internal not in text, f"{internal!r} in:\n{text}"


def test_help(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: recdsl")
    for command in ("explain", "run"):
        assert command in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "usage: recdsl" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["explain", "run"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "--dim" in out and "file" in out


@pytest.mark.parametrize(
    "example, dims, expected",
    [
        ("gla.rec", ["--dim", "dk=4", "--dim", "dv=6"], "S [4, 6]: state, matrix affine"),
        ("mingru.rec", ["--dim", "d_in=3", "--dim", "d=5"], "h [5]: state, diagonal affine"),
        ("lstm.rec", [], ": state, nonlinear"),
        ("aaren.rec", [], "scan of the declared monoid SoftmaxSum"),
    ],
)
def test_explain_names_the_class_of_each_state(example, dims, expected, capsys):
    assert main(["explain", str(EXAMPLES / example), *dims]) == 0
    captured = capsys.readouterr()
    assert expected in captured.out
    assert "backend:" in captured.out
    assert captured.err == ""


def test_explain_fills_in_missing_dims(capsys):
    assert main(["explain", str(EXAMPLES / "mingru.rec")]) == 0
    out = capsys.readouterr().out
    assert "(dims not given, set to: d_in=8, d=12)" in out
    assert "cell MinGRU(d_in=8, d=12)" in out


def test_run_prints_output_shapes(capsys):
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--dim", "d_in=3", "--dim", "d=5", "--length", "8", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "input  x          [2, 8, 3] float32" in out
    assert "output 0          [2, 8, 5] float32" in out
    assert "forward: median" in out


def test_run_with_heads_and_batch(capsys):
    assert main(["run", str(EXAMPLES / "gla.rec"), "--dim", "dk=4", "--dim", "dv=6", "--length", "8", "--batch", "3", "--heads", "2", "--repeat", "1"]) == 0
    assert "output 0          [3, 8, 2, 6] float32" in capsys.readouterr().out


def test_bad_program_exits_1_with_the_located_message(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.rec").write_text(BAD_PROGRAM)
    monkeypatch.chdir(tmp_path)
    for command in ("explain", "run"):
        assert main([command, "bad.rec", "--dim", "d=4"]) == 1
        captured = capsys.readouterr()
        assert captured.err == BAD_MESSAGE
        assert captured.out == ""


def test_syntax_error_exits_1(tmp_path, monkeypatch, capsys):
    (tmp_path / "bad.rec").write_text("cell C(d) {\n    input x: [d]\n    out (x +\n}\n")
    monkeypatch.chdir(tmp_path)
    assert main(["explain", "bad.rec"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("bad.rec:4:1: syntax error: unexpected '}'")
    assert "the '(' opened at line 3, column 9 is not closed" in err
    _clean(err)


def test_missing_file_is_a_clean_error(tmp_path, capsys):
    missing = tmp_path / "nowhere.rec"
    for command in ("explain", "run"):
        assert main([command, str(missing)]) == 1
        captured = capsys.readouterr()
        assert captured.err == f"error: cannot read '{missing}': No such file or directory\n  expected a path to a .rec file, or the program text\n"
        assert captured.out == ""


def test_directory_is_a_clean_error(tmp_path, capsys):
    assert main(["explain", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read '{tmp_path}'")
    _clean(err)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dim", "d"], "error: cannot read --dim 'd'"),
        (["--dim", "d=x"], "error: the value of --dim d is not a number: 'x'"),
        (["--dim", "q=3"], "dimension error: cell MinGRU has no dim 'q'"),
        (["--cell", "Foo"], "declaration error: no cell named 'Foo'"),
        (["--backend", "foo"], "backend error: unknown backend 'foo'"),
    ],
    ids=["dim-without-value", "dim-not-a-number", "unknown-dim", "unknown-cell", "unknown-backend"],
)
def test_bad_options_are_clean_errors(args, message, capsys):
    assert main(["explain", str(EXAMPLES / "mingru.rec"), *args]) == 1
    err = capsys.readouterr().err
    assert message in err
    _clean(err)


NUMERIC_OPTIONS = [
    (["run", "--batch", "-1"], "argument --batch: expected an integer >= 1, got -1"),
    (["run", "--batch", "0"], "argument --batch: expected an integer >= 1, got 0"),
    (["run", "--length", "-5"], "argument --length: expected an integer >= 1, got -5"),
    (["run", "--length", "0"], "argument --length: expected an integer >= 1, got 0"),
    (["run", "--length", "1.5"], "argument --length: expected a positive integer, got '1.5'"),
    (["run", "--heads", "2", "0"], "argument --heads: expected an integer >= 1, got 0"),
    (["run", "--repeat", "0"], "argument --repeat: expected an integer >= 1, got 0"),
    (["run", "--seed", str(2**64)], f"argument --seed: expected an integer from {-(2**63)} to {2**64 - 1}, got {2**64}"),
    (["check", "--max-examples", "0"], "argument --max-examples: expected an integer >= 1, got 0"),
    (["check", "--chunk-size", "0"], "argument --chunk-size: expected an integer from 1 to 4096, got 0"),
    (["check", "--chunk-size", "100000"], "argument --chunk-size: expected an integer from 1 to 4096, got 100000"),
    (["check", "--seed", "x"], "argument --seed: invalid int value: 'x'"),
]


@pytest.mark.parametrize("args, message", NUMERIC_OPTIONS, ids=[" ".join(a) for a, _ in NUMERIC_OPTIONS])
def test_numeric_options_are_validated(args, message, capsys):
    """Every numeric option: a bad value is argparse's usage line and one error line (status 2), no traceback."""
    command, *options = args
    with pytest.raises(SystemExit) as info:
        main([command, str(EXAMPLES / "mingru.rec"), *options])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.rstrip("\n").split("\n")[-1] == f"recdsl {command}: error: {message}"
    _clean(err)


def test_run_length_over_the_element_budget_is_one_error(capsys, monkeypatch):
    monkeypatch.delenv("RECDSL_MAX_ELEMENTS", raising=False)
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--length", "1000000000"]) == 1
    err = capsys.readouterr().err
    assert err == (
        "error: input 'x' of --batch 2 --length 1000000000 would have shape [2, 1000000000, 8]: 16_000_000_000 elements, "
        "more than the budget of 268_435_456\n"
        "  expected a smaller --batch, --length or --heads, or a larger budget: RECDSL_MAX_ELEMENTS=N\n"
    )


def test_run_budget_follows_the_environment(capsys, monkeypatch):
    monkeypatch.setenv("RECDSL_MAX_ELEMENTS", "100")
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--dim", "d_in=3", "--dim", "d=4", "--length", "20", "--repeat", "1"]) == 1
    assert "budget of 100" in capsys.readouterr().err
    monkeypatch.setenv("RECDSL_MAX_ELEMENTS", "many")
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--length", "2"]) == 1
    assert capsys.readouterr().err.startswith("dimension error: the environment variable RECDSL_MAX_ELEMENTS is 'many'")


def test_bad_device_is_a_clean_error(capsys):
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--device", "nowhere", "--length", "2"]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read --device 'nowhere'")
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--device", "meta", "--length", "2"]) == 1
    assert capsys.readouterr().err.startswith("input error: input 'x' is on the meta device")


def test_dims_named_like_keywords(tmp_path, capsys):
    """--dim cell=3 binds a dim called `cell` (compile's keyword of that name is --cell)."""
    (tmp_path / "clash.rec").write_text("cell C(cell, backend) {\n    input x: [cell]\n    param W: [cell, backend] = glorot\n    out x @ W\n}\n")
    for command in ("explain", "run"):
        assert main([command, str(tmp_path / "clash.rec"), "--dim", "cell=3", "--dim", "backend=2", "--length", "2", "--repeat", "1"][: 6 if command == "explain" else None]) == 0
        assert "cell C(cell=3, backend=2)" in capsys.readouterr().out
    assert main(["check", str(tmp_path / "clash.rec"), "--dim", "cell=3", "--dim", "backend=2", "--max-examples", "2"]) == 0


def test_check_without_hypothesis_is_a_clean_error(capsys, monkeypatch):
    """hypothesis is a dependency; if it is missing anyway, `check` says how to install it."""
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # `import hypothesis` raises ImportError
    assert main(["check", str(EXAMPLES / "mingru.rec"), "--max-examples", "1"]) == 1
    err = capsys.readouterr().err
    assert err == "error: recdsl check needs the hypothesis package, which is not installed\n  expected pip install hypothesis (or pip install recdsl)\n"


def test_hypothesis_is_a_runtime_dependency():
    """`recdsl check` is a headline feature: a plain `pip install recdsl` must be enough for it."""
    import re

    text = (EXAMPLES.parent / "pyproject.toml").read_text()
    dependencies = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)
    assert dependencies is not None and '"hypothesis' in dependencies.group(1)


def test_non_utf8_file_is_a_clean_error(tmp_path, capsys):
    (tmp_path / "latin1.rec").write_bytes(b"# caf\xe9\ncell C(d) {\n    input x: [d]\n    out x\n}\n")
    assert main(["explain", str(tmp_path / "latin1.rec")]) == 1
    err = capsys.readouterr().err
    assert "cannot read" in err
    _clean(err)


def _installed_command() -> list[str]:
    found = shutil.which("recdsl")
    if found is not None:
        return [found]
    # The console script is installed next to the interpreter running the tests.
    candidate = Path(sys.executable).with_name("recdsl")
    if candidate.exists():
        return [str(candidate)]
    pytest.skip("the recdsl command is not installed (pip install -e .)")


def test_installed_command(tmp_path):
    command = _installed_command()
    good = subprocess.run([*command, "explain", str(EXAMPLES / "gla.rec"), "--dim", "dk=4", "--dim", "dv=4"], capture_output=True, text=True, timeout=120)
    assert good.returncode == 0, good.stderr
    assert "matrix affine" in good.stdout

    (tmp_path / "bad.rec").write_text(BAD_PROGRAM)
    bad = subprocess.run([*command, "run", "bad.rec", "--dim", "d=4", "--length", "8"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert bad.returncode == 1
    assert bad.stderr == BAD_MESSAGE
    assert bad.stdout == ""

    missing = subprocess.run([*command, "explain", "nowhere.rec"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: cannot read 'nowhere.rec'")
    _clean(missing.stderr)
