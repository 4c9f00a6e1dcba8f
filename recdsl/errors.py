"""Errors a user of recdsl can see, and the source positions they point at.

Every mistake in a program is reported as a subclass of :class:`RecDSLError` whose
message names the file, line and column, shows the offending line with a caret under
the offending span, and says what was expected.  Internal exceptions never reach the
user for a mistake in their program: the front end converts them at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A region of source text: 1-based line and column of its first and last character."""

    line: int
    column: int
    end_line: int
    end_column: int

    def merge(self, other: "Span | None") -> "Span":
        """The smallest span covering both ``self`` and ``other``."""
        if other is None:
            return self
        start = min((self.line, self.column), (other.line, other.column))
        end = max((self.end_line, self.end_column), (other.end_line, other.end_column))
        return Span(start[0], start[1], end[0], end[1])


@dataclass(frozen=True)
class Source:
    """The text of a program and the name it is reported under (a path or ``<string>``)."""

    text: str
    filename: str = "<string>"

    def line_text(self, line: int) -> str:
        """The text of the 1-based ``line`` without its newline ('' past the end).

        Lines end at ``\n`` only, as the lexer counts them (``str.splitlines`` would also
        split at form feeds and other separators and show the wrong line).
        """
        lines = self.text.split("\n")
        if 1 <= line <= len(lines):
            return lines[line - 1].rstrip("\r")
        return ""


class RecDSLError(Exception):
    """Base class of every error recdsl reports about a user's program or call.

    ``summary`` says what is wrong, ``expected`` what would have been right; when the
    error is about a place in a program, ``source`` and ``span`` locate it and the
    message shows the line with a caret.
    """

    kind = "error"

    def __init__(
        self,
        summary: str,
        span: Span | None = None,
        source: Source | None = None,
        expected: str | None = None,
    ) -> None:
        self.summary = summary
        self.span = span
        self.source = source
        self.expected = expected
        super().__init__(self._format())

    @property
    def filename(self) -> str | None:
        return self.source.filename if self.source is not None else None

    @property
    def line(self) -> int | None:
        return self.span.line if self.span is not None else None

    @property
    def column(self) -> int | None:
        return self.span.column if self.span is not None else None

    def located(self, source: Source, span: Span | None = None) -> "RecDSLError":
        """This error with its source (and span, if it had none) filled in."""
        if self.source is None:
            self.source = source
        if self.span is None and span is not None:
            self.span = span
        self.args = (self._format(),)
        return self

    def _format(self) -> str:
        if self.span is None or self.source is None:
            text = f"{self.kind}: {self.summary}"
            if self.expected:
                text += f"\n  expected {self.expected}"
            return text
        span = self.span
        head = f"{self.source.filename}:{span.line}:{span.column}: {self.kind}: {self.summary}"
        line_text = self.source.line_text(span.line).expandtabs(1)
        width = span.end_column - span.column + 1 if span.end_line == span.line else len(line_text) - span.column + 1
        width = max(1, min(width, max(1, len(line_text) - span.column + 1)))
        gutter = f"{span.line:>4} | "
        caret = " " * (len(gutter) + span.column - 1) + "^" + "~" * (width - 1)
        text = f"{head}\n{gutter}{line_text}\n{caret}"
        if self.expected:
            text += f"\n  expected {self.expected}"
        return text

    def __str__(self) -> str:
        return self.args[0] if self.args else self._format()


class ParseError(RecDSLError):
    """The text is not a well-formed program (a syntax error)."""

    kind = "syntax error"


class NameResolutionError(RecDSLError):
    """A name is undefined, defined twice, or used where it cannot be."""

    kind = "name error"


class ShapeError(RecDSLError):
    """Shapes do not broadcast, do not match for ``@``, or do not fit a declaration."""

    kind = "shape error"


class TypeCheckError(RecDSLError):
    """A value has the wrong kind: complex where real is needed, wrong arity, and so on."""

    kind = "type error"


class DeclarationError(RecDSLError):
    """A cell's declarations are inconsistent: a state never updated, no output, ..."""

    kind = "declaration error"


class DimensionError(RecDSLError):
    """A cell's dimensions are missing or invalid when it is compiled."""

    kind = "dimension error"


class InputError(RecDSLError):
    """Tensors passed to a compiled cell have the wrong names, shapes or dtypes."""

    kind = "input error"


class BackendError(RecDSLError):
    """A backend was asked for that does not exist or cannot run this cell."""

    kind = "backend error"


class MissingDependencyError(RecDSLError):
    """An optional package that a command needs (matplotlib for plots) is not installed."""

    kind = "missing dependency"
