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


def test_empty_sequence_is_an_input_error(capsys):
    assert main(["run", str(EXAMPLES / "mingru.rec"), "--length", "0"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("input error: the sequences are empty (T = 0)")


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
