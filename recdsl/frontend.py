"""Source text or path to checked IR: the front half of the compiler in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from . import ir
from .checker import check_program
from .errors import RecDSLError, Source
from .parser import parse


def read_source(source_or_path: str | Path) -> Source:
    """The program text and its reported name.

    A :class:`~pathlib.Path`, or a one-line string that ends in ``.rec`` or names an
    existing file, is read from disk; any other string is the program itself.
    """
    if isinstance(source_or_path, Path):
        path = source_or_path
    elif (
        isinstance(source_or_path, str)
        and source_or_path.strip()
        and "\n" not in source_or_path
        and "{" not in source_or_path
        and (source_or_path.endswith(".rec") or Path(source_or_path).exists())
    ):
        path = Path(source_or_path)
    else:
        return Source(str(source_or_path), "<string>")
    try:
        return Source(path.read_text(encoding="utf-8"), str(path))
    except OSError as error:
        raise RecDSLError(f"cannot read '{path}': {error.strerror or error}", expected="a path to a .rec file, or the program text") from None
    except UnicodeDecodeError as error:
        raise RecDSLError(f"cannot read '{path}': it is not UTF-8 text (byte {error.start})", expected="a UTF-8 encoded .rec file") from None


def load(source_or_path: str | Path, cell: str | None = None, dims: Mapping[str, object] | None = None) -> ir.CellIR:
    """Parse and check a program; return the IR of its (chosen) cell with ``dims`` bound."""
    source = read_source(source_or_path)
    program = parse(source.text, source.filename)
    return check_program(program, source, cell=cell, dims=dims)
