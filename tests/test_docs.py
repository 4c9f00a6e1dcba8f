"""Every code block in README.md and docs/*.md runs, so the docs cannot fall behind the code.

A fenced block is run according to its language tag, in document order, one shared
namespace per file:

- ```python  executed with ``exec`` (working directory: the repository root);
- ```sh      every command must start with ``recdsl``; it runs in process through
             ``recdsl.cli.main`` and must exit with status 0;
- ```rec     a recdsl program: parsed, and every cell in it checked, compiled and run for
             three steps on random inputs (dims: the cell's defaults, the ``dims``
             annotation, else 3, 4, 5, ... as ``recdsl check`` picks them);
- ```text    (or no tag) shown as is, unless annotated ``output`` (below).

HTML comments on the lines right before a fence annotate it:

- ``<!-- not-run: REASON -->``  the block is not run (a pip line, a GPU-only command, a
  command that needs a file the reader writes); the reason is required. Any other block
  that fails, fails this test.
- ``<!-- file: PATH -->``       the block is the text of PATH (relative to the repository
  root), byte for byte, so the file and the docs cannot drift apart.
- ``<!-- dims: d=4 n=2 -->``    dims for the cells of a ```rec block.
- ``<!-- error: ShapeError -->`` the ```rec block (or ```sh command) must fail with this
  ``RecDSLError`` subclass (for ```sh: exit status 1 and its ``kind`` on stderr).
- ``<!-- output -->``           each non-blank line of this block, except ``...``, must
  appear (stripped) in the output of the previous ```sh or ```python block, in order.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl import errors
from recdsl.cli import main as cli_main
from recdsl.ir import Kind

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = {"python", "sh", "rec"}
DISPLAY = {"", "text"}
ANNOTATION = re.compile(r"^<!--\s*(not-run|file|dims|error|output)\s*(?::\s*(.*?))?\s*-->$")
FENCE = re.compile(r"^(```+)\s*([\w-]*)\s*$")
STEPS = 3  # time steps a ```rec cell is run for


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    language: str
    text: str
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def parse_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a markdown file, with the annotations right above each."""
    lines = path.read_text(encoding="utf-8").split("\n")
    blocks: list[Block] = []
    number = 0
    while number < len(lines):
        opening = FENCE.match(lines[number])
        if opening is None:
            number += 1
            continue
        annotations: dict[str, str] = {}
        above = number - 1
        while above >= 0 and (lines[above].strip() == "" or ANNOTATION.match(lines[above].strip())):
            match = ANNOTATION.match(lines[above].strip())
            if match:
                annotations[match.group(1)] = match.group(2) or ""
            above -= 1
        end = number + 1
        while end < len(lines) and lines[end].strip() != opening.group(1):
            end += 1
        assert end < len(lines), f"{path.name}:{number + 1}: unclosed code fence"
        blocks.append(Block(path, number + 1, opening.group(2), "\n".join(lines[number + 1 : end]) + "\n", annotations))
        number = end + 1
    return blocks


def _dims(text: str) -> dict[str, int | float]:
    dims: dict[str, int | float] = {}
    for item in text.split():
        name, _, value = item.partition("=")
        dims[name] = float(value) if "." in value or "e" in value else int(value)
    return dims


def _random_inputs(module: recdsl.CompiledCell, batch: int = 2, steps: int = STEPS) -> dict[str, torch.Tensor]:
    inputs = {}
    for declared in module.cell.inputs:
        shape = (batch, steps, *declared.type.shape)
        value = torch.randn(shape)
        if declared.type.kind is Kind.COMPLEX:
            value = torch.complex(value, torch.randn(shape))
        inputs[declared.name] = value
    return inputs


def run_rec(block: Block) -> None:
    """Check, compile and run every cell of a ```rec block (or expect the annotated error)."""
    given = _dims(block.annotations.get("dims", ""))
    expected_error = block.annotations.get("error")
    try:
        program = recdsl.parse(block.text, block.where)
        for cell in program.cells():
            dims = {}
            next_value = 3
            for dim in cell.dims:
                if dim.name in given:
                    dims[dim.name] = given[dim.name]
                elif dim.default is None:
                    dims[dim.name] = next_value
                    next_value += 1
            module = recdsl.compile(block.text, cell=cell.name, **dims)
            outputs = module(**_random_inputs(module))
            for output in outputs if isinstance(outputs, tuple) else (outputs,):
                assert output.shape[:2] == (2, STEPS), f"{block.where}: cell {cell.name}: output shape {list(output.shape)}"
    except errors.RecDSLError as error:
        if expected_error and type(error).__name__ == expected_error:
            return
        raise AssertionError(f"{block.where}: the ```rec block failed:\n{error}") from None
    if expected_error:
        raise AssertionError(f"{block.where}: the ```rec block was expected to fail with {expected_error}, but it compiled and ran")


def _commands(block: Block) -> list[list[str]]:
    text = re.sub(r"\\\n", " ", block.text)
    commands = []
    for line in text.split("\n"):
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def run_sh(block: Block) -> str:
    """Run each ``recdsl ...`` command of a ```sh block in process; return its output."""
    captured = []
    for words in _commands(block):
        assert words[0] == "recdsl", (
            f"{block.where}: `{' '.join(words)}` is not a recdsl command; "
            "run only recdsl commands in ```sh blocks, or annotate the block <!-- not-run: REASON -->"
        )
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                status = cli_main(words[1:])
            except SystemExit as exit:  # argparse's --help and --version
                status = exit.code if isinstance(exit.code, int) else 1
        expected_error = block.annotations.get("error")
        if expected_error:
            kind = getattr(errors, expected_error).kind
            assert status == 1 and f": {kind}:" in stderr.getvalue(), (
                f"{block.where}: `{' '.join(words)}` was expected to fail with a {kind} (exit status 1), "
                f"got status {status}:\n{stdout.getvalue()}{stderr.getvalue()}"
            )
        else:
            assert status == 0, f"{block.where}: `{' '.join(words)}` exited with status {status}:\n{stdout.getvalue()}{stderr.getvalue()}"
        captured.append(stdout.getvalue() + stderr.getvalue())
    return "".join(captured)


def run_python(block: Block, namespace: dict) -> str:
    stdout = io.StringIO()
    code = compile(block.text, block.where, "exec")
    try:
        with contextlib.redirect_stdout(stdout):
            exec(code, namespace)
    except Exception as error:
        raise AssertionError(f"{block.where}: the ```python block failed: {type(error).__name__}: {error}\n{stdout.getvalue()}") from error
    return stdout.getvalue()


def check_output(block: Block, output: str | None) -> None:
    assert output is not None, f"{block.where}: an <!-- output --> block must follow a ```sh or ```python block"
    produced = [line.strip() for line in output.split("\n")]
    position = 0
    for expected in (line.strip() for line in block.text.split("\n")):
        if not expected or expected == "...":
            continue
        while position < len(produced) and produced[position] != expected:
            position += 1
        assert position < len(produced), (
            f"{block.where}: the line {expected!r} is not in the output of the block above (in order); it printed:\n{output}"
        )
        position += 1


def check_file(block: Block) -> None:
    path = ROOT / block.annotations["file"]
    assert path.is_file(), f"{block.where}: <!-- file: {block.annotations['file']} --> names no file"
    assert path.read_text(encoding="utf-8") == block.text, f"{block.where}: the block differs from {block.annotations['file']}"


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_doc_code_blocks_run(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs:{path.name}"}
    last_output: str | None = None
    for block in parse_blocks(path):
        for name in block.annotations:
            if name == "not-run":
                assert block.annotations[name], f"{block.where}: <!-- not-run: REASON --> needs a reason"
        if "file" in block.annotations:
            check_file(block)
        if "not-run" in block.annotations:
            continue
        if "output" in block.annotations:
            check_output(block, last_output)
            continue
        if block.language in DISPLAY:
            continue
        assert block.language in RUNNABLE, (
            f"{block.where}: unknown block language {block.language!r}; use one of {sorted(RUNNABLE | DISPLAY)} "
            "or annotate <!-- not-run: REASON -->"
        )
        if block.language == "rec":
            run_rec(block)
            last_output = None
        elif block.language == "sh":
            last_output = run_sh(block)
        else:
            last_output = run_python(block, namespace)


def test_docs_exist() -> None:
    assert (ROOT / "docs" / "language.md").is_file()
    assert (ROOT / "docs" / "tutorial.md").is_file()


# ---- the language reference covers the language -------------------------------------

LANGUAGE = ROOT / "docs" / "language.md"


def _section(heading: str) -> str:
    text = LANGUAGE.read_text(encoding="utf-8")
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    assert match, f"docs/language.md has no section '## {heading}'"
    return match.group(1)


def _table_codes(section: str) -> list[str]:
    """The backticked code in the first column of every table row of ``section``."""
    codes: list[str] = []
    for line in section.split("\n"):
        if line.startswith("|") and not line.startswith("|---"):
            codes += re.findall(r"`([^`]+)`", line.split("|")[1])
    return codes


def _tokens(codes: list[str]) -> set[str]:
    return {token for code in codes for token in re.findall(r"[A-Za-z_]\w*|\*\*|//|<=|>=|==|!=|[-+*/@<>\[]", code)}


def test_every_op_in_the_registry_is_in_the_language_reference() -> None:
    from recdsl.ops import CONSTANTS, FUNCTIONS, INITIALIZERS, OPS

    codes = _table_codes(_section("Operators and functions"))
    documented = _tokens(codes)
    # an op's surface is its function name or operator symbol; indexing's is "[]"
    missing = sorted(f"{spec.name} ({spec.surface})" for spec in OPS.values() if spec.surface.rstrip("]") not in documented)
    assert not missing, f"ops in recdsl.ops.OPS missing from the tables of docs/language.md 'Operators and functions': {missing}"
    called = {name for code in codes for name in re.findall(r"([A-Za-z_]\w*)\(", code)} - {"f"}
    unknown = sorted(called - set(FUNCTIONS))
    assert not unknown, f"docs/language.md documents functions that recdsl.ops does not define: {unknown}"
    initializers = _tokens(_table_codes(_section("Initializers")))
    assert set(INITIALIZERS) <= initializers, f"initializers missing from docs/language.md: {sorted(set(INITIALIZERS) - initializers)}"
    constants = _section("Names, numbers and constants")
    assert all(f"`{name}`" in constants for name in CONSTANTS), "a built-in constant is missing from docs/language.md"



def test_the_operand_kinds_in_the_language_reference_match_the_registry() -> None:
    from recdsl.ops import OPS, Accepts

    words = {"real": Accepts.REAL, "real or complex": Accepts.NUMBER}
    by_surface: dict[str, list] = {}
    for spec in OPS.values():
        by_surface.setdefault(spec.surface, []).append(spec)
    wrong = []
    for line in _section("Operators and functions").split("\n"):
        columns = [column.strip() for column in line.split("|")]
        if len(columns) < 4 or columns[3] not in words:
            continue
        for token in _tokens(re.findall(r"`([^`]+)`", columns[1])):
            for spec in by_surface.get(token, []):
                if spec.accepts is not words[columns[3]]:
                    wrong.append(f"{spec.name} ({spec.surface}): documented '{columns[3]}', registry {spec.accepts.value}")
    assert not wrong, f"operand kinds in docs/language.md differ from recdsl.ops.OPS: {wrong}"

def test_every_keyword_of_the_grammar_is_in_the_language_reference() -> None:
    grammar = (ROOT / "recdsl" / "grammar.lark").read_text(encoding="utf-8")
    keywords = set(re.findall(r'"([A-Za-z_]+)"', grammar)) | set(re.findall(r'^[A-Z]+: "([A-Za-z_]+)"', grammar, flags=re.M))
    documented = set(re.findall(r"`(\w+)`", _section("Keywords")))
    missing = sorted(keywords - documented)
    assert keywords and not missing, f"grammar keywords missing from docs/language.md 'Keywords': {missing}"


def test_every_error_class_is_in_the_language_reference() -> None:
    documented = _section("Errors")
    classes = [cls.__name__ for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.RecDSLError)]
    missing = [name for name in classes if f"`{name}`" not in documented]
    assert not missing, f"error classes missing from docs/language.md 'Errors': {missing}"
