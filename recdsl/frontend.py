"""Source text or path to checked IR: the front half of the compiler in one call."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from . import ir
from .checker import check_program
from .errors import DimensionError, RecDSLError, Source
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


def dim_arguments(function: str, dims: object, keyword_dims: Mapping[str, object]) -> dict[str, object]:
    """The dims a caller of ``function`` (``compile``, ``explain``) binds: ``dims`` and keywords.

    ``dims`` is a mapping (or None); it is the only way to bind a dim whose name is a
    keyword of ``function`` (``cell``, ``backend``, ``chunk_size``, ...).  A dim given
    both ways is an error.
    """
    if dims is None:
        merged: dict[str, object] = {}
    elif isinstance(dims, Mapping) and all(isinstance(name, str) for name in dims):
        merged = dict(dims)
    else:
        raise DimensionError(
            f"{function}'s dims= takes a mapping of dim names to values, got {type(dims).__name__}",
            expected=f"{function}(..., dims={{'d': 64}}) or {function}(..., d=64)",
        )
    for name, value in keyword_dims.items():
        if name in merged:
            raise DimensionError(f"dim '{name}' is given twice: in dims= and as a keyword", expected="each dim once")
        merged[name] = value
    return merged


def check_option_clashes(function: str, options: Mapping[str, object], cell: ir.CellIR, dims: Mapping[str, object]) -> None:
    """Refuse a keyword option of ``function`` that is also a dim of ``cell`` not bound in ``dims``.

    ``compile(src, chunk_size=8)`` for a cell with a dim ``chunk_size`` (that has a
    default) would otherwise set one and silently leave the other at its default.
    """
    dim_names = {name for name, _ in cell.dims}
    for name, value in options.items():
        if value is not None and name in dim_names and name not in dims:
            raise DimensionError(
                f"'{name}' is both a keyword of {function} and a dim of cell {cell.name}: {name}={value!r} sets the {function} option, "
                "so the dim is bound through dims=",
                cell.span,
                expected=f"{function}(..., dims={{'{name}': <value>}}) for the dim, and {name}= only for the option",
            )


def check_option_types(function: str, cell: object, backend: object) -> None:
    """A number passed as ``cell=`` or ``backend=`` was meant for a dim with that name."""
    for name, value in (("cell", cell), ("backend", backend)):
        if value is not None and not isinstance(value, str):
            what = "the name of a cell of the program" if name == "cell" else "the name of a backend"
            raise DimensionError(
                f"{function}'s keyword '{name}' is {what}, got {value!r}",
                expected=f"a string; to bind a dim called '{name}', {function}(..., dims={{'{name}': {value!r}}})",
            )
