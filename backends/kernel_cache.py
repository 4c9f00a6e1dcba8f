"""The generated-code cache: source written under its content hash, executed from memory.

Generated kernels (today the Triton backend's) must live in a real file: Triton's ``@jit``
reads a kernel's source with ``inspect.getsource``, which fails on code built with a bare
``exec``.  The file is only a *view* of the source, never what runs:

- the module is made by ``compile(source, path, "exec")`` of the caller's own text into a
  fresh module object whose ``__file__`` is the path, and ``linecache`` holds that same
  text under the path (an entry that ``linecache.checkcache`` never invalidates), so
  ``inspect.getsource`` -- and through it Triton -- sees exactly the bytes that were
  hashed and executed.  Python's import system is not used: no ``__pycache__`` is read
  or written, so a planted ``.pyc`` never runs, and a file swapped on disk after the
  check changes nothing;
- the file is read once, only to decide whether it must be rewritten; anything that is
  not a regular file holding exactly the expected bytes (a different or truncated text,
  bytes that are not UTF-8, a directory, a symlink, a FIFO) is replaced;
- writes go to a unique ``tempfile.mkstemp`` file (``O_EXCL``, no symlink followed) and
  are moved into place with an atomic ``os.replace``, so concurrent processes and threads
  never see half a file; a lock per entry guards the in-process module table, so threads
  that load the same source at once get one module;
- the cache directory is created with mode 0700; an existing one that another user owns,
  or that group or others may write to, is refused (whoever can write there could change
  what a user reads as the running kernel).  An unwritable directory is a
  :class:`~recdsl.errors.BackendError` naming the path and ``RECDSL_CACHE_DIR``, not a
  silent fallback: a per-process temporary directory would hide the misconfiguration and
  defeat the cache across processes.

The module itself uses neither torch nor triton (its package imports torch).
"""

from __future__ import annotations

import hashlib
import linecache
import os
import shutil
import stat
import sys
import tempfile
import threading
import types
from pathlib import Path

from recdsl.errors import BackendError

#: The environment variable that chooses the cache directory.
CACHE_DIR_VARIABLE = "RECDSL_CACHE_DIR"

_SET_CACHE_DIR = f"set {CACHE_DIR_VARIABLE} to a directory of your own that only you can write to"


def cache_dir() -> Path:
    """The cache directory: ``$RECDSL_CACHE_DIR``, else ``~/.cache/recdsl/triton``."""
    configured = os.environ.get(CACHE_DIR_VARIABLE)
    if configured:
        return Path(configured)
    try:
        home = Path.home()
    except (RuntimeError, KeyError) as error:  # no HOME and no password-database entry
        raise BackendError(
            "the kernel cache has no place: the home directory cannot be determined",
            expected=f"a cache directory: {_SET_CACHE_DIR}",
        ) from error
    return home / ".cache" / "recdsl" / "triton"


def content_hash(source: str) -> str:
    """The first 16 hex digits of the SHA-256 of ``source`` (UTF-8): the name of its cache entry."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]


def entry_path(source: str) -> Path:
    """Where ``source`` is cached: ``<cache_dir()>/recdsl_<content_hash(source)>.py``."""
    return cache_dir() / f"recdsl_{content_hash(source)}.py"


# One module per (full SHA-256 of the source, variant): the 16 digits of a file name name an
# entry, the full digest decides which module a source gets.  The variant separates loads of the same text that
# must differ, e.g. Triton's interpreted and compiled kernels (``triton.jit`` picks the
# interpreter when the module is executed).
_LOADED: dict[tuple[str, str], types.ModuleType] = {}
_ENTRY_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_TABLE_LOCK = threading.Lock()


class GeneratedSource(str):
    """Generated module text that carries its SHA-256, computed once when the text is made
    (the plan holds one), so that each call's :func:`load_generated` hashes nothing."""

    digest: str

    def __new__(cls, text: str) -> "GeneratedSource":
        made = super().__new__(cls, text)
        made.digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        return made

    def __reduce__(self):
        return (GeneratedSource, (str(self),))


def load_generated(source: str, variant: str = "") -> types.ModuleType:
    """The module ``source`` defines, executed from ``source`` itself and cached per process.

    ``source`` is written to :func:`entry_path` first (unless that file
    already holds exactly its bytes), and that path is the module's ``__file__`` and the
    file name of its code.  Raises :class:`~recdsl.errors.BackendError` when the cache
    directory is unsafe or cannot be written.
    """
    digest = source.digest if isinstance(source, GeneratedSource) else hashlib.sha256(source.encode("utf-8")).hexdigest()
    key = (digest, variant)
    with _TABLE_LOCK:
        module = _LOADED.get(key)
        if module is not None:
            return module
        entry_lock = _ENTRY_LOCKS.setdefault(key, threading.Lock())
    with entry_lock:
        with _TABLE_LOCK:
            module = _LOADED.get(key)
        if module is not None:  # another thread loaded it while this one waited
            return module
        expected = source.encode("utf-8")
        directory = _private_directory(cache_dir())
        path = directory / f"recdsl_{content_hash(source)}.py"
        if _read_entry(path, len(expected)) != expected:
            _write_entry(directory, path, expected)
        module = _execute(source, path, f"recdsl_generated_{content_hash(source)}_{variant or 'default'}")
        with _TABLE_LOCK:
            _LOADED[key] = module
        return module


def _private_directory(directory: Path) -> Path:
    """``directory``, created with mode 0700 if missing; refused if others may write to it."""
    directory = directory.expanduser()
    if not directory.is_absolute():
        directory = Path.cwd() / directory
    try:
        directory.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as error:
        raise _unwritable(directory, error) from error
    try:
        status = os.stat(directory)
    except OSError as error:
        raise _unwritable(directory, error) from error
    if not stat.S_ISDIR(status.st_mode):
        raise BackendError(
            f"the kernel cache {directory} is not a directory",
            expected=f"a directory; {_SET_CACHE_DIR}",
        )
    owner = getattr(os, "geteuid", None)  # POSIX only: Windows has no owners or mode bits to check
    if owner is not None:
        if status.st_uid != owner():
            raise BackendError(
                f"the kernel cache {directory} is owned by another user (uid {status.st_uid})",
                expected=f"a directory owned by uid {owner()}; {_SET_CACHE_DIR}",
            )
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise BackendError(
                f"the kernel cache {directory} can be written by group or others "
                f"(mode {stat.S_IMODE(status.st_mode):04o})",
                expected=f"a directory only its owner can write to: run `chmod go-w {directory}` or {_SET_CACHE_DIR}",
            )
    return directory


def _unwritable(directory: Path, error: OSError) -> BackendError:
    reason = error.strerror or type(error).__name__
    return BackendError(
        f"the kernel cache {directory} cannot be created or written ({reason})",
        expected=f"a writable directory: {_SET_CACHE_DIR}",
    )


def _read_entry(path: Path, expected_size: int) -> bytes | None:
    """The bytes of the regular file at ``path`` (at most one more than expected), else None.

    Opened without following a symlink and without blocking on a FIFO; whatever cannot be
    read as a regular file counts as a stale entry, to be replaced.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
    try:
        descriptor = os.open(path, flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        chunks = []
        remaining = expected_size + 1  # one byte more tells a longer file from the expected one
        while remaining > 0:
            chunk = os.read(descriptor, remaining)
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(descriptor)


def _write_entry(directory: Path, path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically, replacing whatever is there (a directory too)."""
    try:
        descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _unwritable(directory, error) from error
    try:
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(data)
        except OSError as error:
            raise _unwritable(directory, error) from error
        try:
            os.replace(temporary, path)
        except OSError:
            # A directory (or something else rename cannot replace) sits at the entry's path.
            _remove_stale(path)
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise BackendError(
                    f"the stale kernel cache entry {path} cannot be replaced ({error.strerror or error})",
                    expected=f"a path recdsl can write: remove {path}, or {_SET_CACHE_DIR}",
                ) from error
    finally:
        try:
            os.unlink(temporary)
        except FileNotFoundError:  # moved into place
            pass
        except OSError:  # pragma: no cover - a leftover temp file is harmless
            pass


def _remove_stale(path: Path) -> None:
    """Remove what sits at ``path`` (another process may be removing it at the same time)."""
    try:
        if stat.S_ISDIR(os.lstat(path).st_mode):
            shutil.rmtree(path, ignore_errors=True)  # rmtree does not follow symlinks inside
        else:
            os.unlink(path)
    except OSError:
        pass  # gone already, or not removable: the retried replace reports it


def _execute(source: str, path: Path, name: str) -> types.ModuleType:
    """A fresh module named ``name`` made by executing ``source`` as if it were the file ``path``."""
    filename = str(path)
    code = compile(source, filename, "exec", dont_inherit=True)
    # ``inspect.getsource`` reads through linecache; an mtime of None marks the entry as not
    # backed by the file, so ``linecache.checkcache`` keeps it even if the file changes.
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    module = types.ModuleType(name)
    module.__file__ = filename
    sys.modules[name] = module  # tools that look a function's module up by name find it
    try:
        exec(code, module.__dict__)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
