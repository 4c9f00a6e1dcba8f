"""The generated-code cache (backends/kernel_cache.py, reached as the Triton backend reaches it).

Security: what runs is exactly the source recdsl generated -- never a planted bytecode file,
never a file swapped on disk after the check -- and Triton reads that same source.
Robustness: threads and processes loading at once, corrupt entries, unsafe or unwritable
cache directories.  Most tests load a tiny non-Triton source (a unique comment keeps the
in-process module table out of the way); the Triton ones run hgrn/mingru kernels in the
interpreter.

The tests run as root on the project's machines, and root ignores permission bits, so an
unwritable cache is made in ways that bind root too: a path below a regular file, and
``/sys`` (sysfs refuses new files even to root); a chmod-0500 directory is used instead
when not root.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import linecache
import os
import py_compile
import stat
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path

import pytest

import recdsl
from recdsl.backends import triton_backend
from recdsl.errors import BackendError

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)

HAS_TRITON = importlib.util.find_spec("triton") is not None
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
POSIX = os.name == "posix"


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh, not yet existing cache directory for each test."""
    directory = tmp_path / "cache"
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(directory))
    return directory


def unique_source(value: int = 42) -> str:
    """A source no earlier load in this process has seen (so it is not in the module table)."""
    return f"# {uuid.uuid4().hex}\nVALUE = {value}\n\n\ndef answer():\n    return VALUE\n"


def entry(directory: Path, source: str) -> Path:
    """Where ``source`` is cached: ``recdsl_<16 hex digits of its SHA-256>.py``."""
    return directory / f"recdsl_{hashlib.sha256(source.encode()).hexdigest()[:16]}.py"


def marker_source(marker: Path) -> str:
    """Code that, if it ever runs, leaves ``marker`` behind and returns the wrong answer."""
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nVALUE = 666\n\n\ndef answer():\n    return VALUE\n"


# ---- 1. what runs is the generated source, nothing on disk ------------------------------------


def test_a_planted_bytecode_file_never_runs(cache, tmp_path):
    source = unique_source()
    path = entry(cache, source)
    cache.mkdir(mode=0o700)
    path.write_text(source)  # the .py passes any byte-for-byte comparison ...
    planted = tmp_path / "planted.py"
    marker = tmp_path / "marker"
    planted.write_text(marker_source(marker))
    # ... while an unchecked-hash .pyc beside it is what Python's import system would run.
    py_compile.compile(
        str(planted), cfile=importlib.util.cache_from_source(str(path)), dfile=str(path),
        invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH, doraise=True,
    )
    module = triton_backend.load_generated(source)
    assert not marker.exists(), "the planted bytecode ran"
    assert module.answer() == 42, f"the module is not the generated source: answer() = {module.answer()}"


def test_loading_writes_no_bytecode(cache, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)  # as in a default Python (the tests' environment may set it)
    source = unique_source()
    module = triton_backend.load_generated(source)
    assert module.answer() == 42
    assert Path(module.__file__) == entry(cache, source) and entry(cache, source).read_text() == source
    assert not (cache / "__pycache__").exists(), "a bytecode cache was written: a later run could be made to use it"


_SWAP: dict = {"path": None, "opens": 0, "payload": ""}


def _swap_on_second_open(event: str, args: tuple) -> None:
    """Audit hook: the second time the armed path is opened, replace its text with the payload.

    The first open is the check; a second one is a reader that trusts the check.  (Audit hooks
    cannot be removed: disarmed, this returns at once.)
    """
    watched = _SWAP["path"]
    if watched is None or event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    if os.fsdecode(os.fspath(args[0])) != watched:
        return
    _SWAP["opens"] += 1
    if _SWAP["opens"] >= 2:
        _SWAP["path"] = None  # disarm while writing: the write opens the path too
        Path(watched).write_text(_SWAP["payload"])
        _SWAP["path"] = watched


_HOOK_INSTALLED = []


def test_a_file_swapped_between_check_and_load_is_not_executed(cache, tmp_path):
    if not _HOOK_INSTALLED:
        sys.addaudithook(_swap_on_second_open)
        _HOOK_INSTALLED.append(True)
    source = unique_source()
    path = entry(cache, source)
    cache.mkdir(mode=0o700)
    path.write_text(source)
    marker = tmp_path / "marker"
    _SWAP.update(path=str(path), opens=0, payload=marker_source(marker))
    try:
        module = triton_backend.load_generated(source)
    finally:
        _SWAP["path"] = None
    assert not marker.exists(), "a file swapped in after the comparison was executed"
    assert module.answer() == 42


def test_source_seen_through_inspect_is_the_executed_source_even_after_the_file_changes(cache, tmp_path):
    source = unique_source()
    module = triton_backend.load_generated(source)
    expected = "def answer():\n    return VALUE\n"
    assert inspect.getsource(module.answer) == expected
    entry(cache, source).write_text(marker_source(tmp_path / "marker") + "# longer, so size and mtime change\n")
    linecache.checkcache()
    assert inspect.getsource(module.answer) == expected, "inspect (and so Triton) would read the file, not what ran"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("interpret", [True, False], ids=["interpreted", "compiled"])
def test_triton_jit_reads_the_generated_kernels_source(monkeypatch, interpret):
    """``@triton.jit`` takes a kernel's source through inspect, as it does before compiling for a GPU.

    Decorating needs no GPU; running the interpreted kernels is covered by test_triton.py and
    the concurrency test below.
    """
    # triton.language's own helpers are jitted when it is first imported, for the interpreter
    # only if TRITON_INTERPRET=1 then; later tests in this process run interpreted kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    import triton
    import triton.language  # noqa: F401

    if not interpret:
        monkeypatch.delenv("TRITON_INTERPRET")
    analysis = recdsl.analyze(recdsl.load(EXAMPLES / "hgrn.rec", dims={"d_in": 3, "d": 4}))
    source = triton_backend.emit(analysis)
    module = triton_backend.load_generated(source)
    kernels = {name: value for name, value in vars(module).items() if hasattr(value, "fn") and callable(value.fn)}
    assert "forward_h" in kernels and "backward_h" in kernels, sorted(kernels)
    for name, kernel in kernels.items():
        text = inspect.getsource(kernel.fn)
        assert f"def {name}(" in text and text in source, f"{name}: inspect.getsource differs from the generated source"
        if not interpret:
            assert isinstance(kernel, triton.runtime.jit.JITFunction)
            assert kernel.src.startswith(f"def {name}(") and kernel.src in source, f"{name}: JITFunction.src is not the generated kernel"
        assert kernel.fn.__code__.co_filename == module.__file__


# ---- 2. threads and processes ----------------------------------------------------------------


def test_eight_threads_loading_for_the_first_time_get_one_module(cache):
    rounds, threads = 25, 8
    failures: list[str] = []
    for round_index in range(rounds):
        source = unique_source(round_index)
        barrier = threading.Barrier(threads)
        loaded: list[object] = [None] * threads

        def load(index: int) -> None:
            barrier.wait()
            try:
                loaded[index] = triton_backend.load_generated(source)
            except Exception as error:  # noqa: BLE001 - collected and reported below
                failures.append(f"round {round_index}, thread {index}: {type(error).__name__}: {error}")

        workers = [threading.Thread(target=load, args=(index,)) for index in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        if len({id(module) for module in loaded if module is not None}) > 1:
            failures.append(f"round {round_index}: threads got different module objects for one source")
        assert all(module is None or module.answer() == round_index for module in loaded)
    assert not failures, f"{len(failures)} of {rounds * threads} loads failed:\n" + "\n".join(failures[:5])
    assert sorted(path.name for path in cache.iterdir()) == sorted(
        path.name for path in cache.glob("recdsl_*.py")
    ), "temporary files were left in the cache"


_WORKER = textwrap.dedent(
    """
    import sys, threading
    import torch
    import recdsl
    from recdsl.backends import triton_backend
    from recdsl.testing import DEFAULT_ATOL, DEFAULT_RTOL  # the tolerances check_equivalence uses

    examples, process = sys.argv[1], int(sys.argv[2])
    # Threads 0, 2, ... compile mingru, 1, 3, ... hgrn; odd processes use another d, so
    # the same source is loaded by many threads and processes and different ones at once.
    d = 4 + process % 2
    cells = [("mingru", dict(d_in=3, d=d)), ("hgrn", dict(d_in=3, d=d, lower=0.3))]
    barrier = threading.Barrier(8)
    # Compiling, loading and running are all concurrent: the backend serialises interpreted
    # launches itself (Triton's interpreter patches triton.language during each launch).
    failures = []

    def run(index):
        name, dims = cells[index % 2]
        try:
            barrier.wait()
            module = recdsl.compile(f"{examples}/{name}.rec", backend="triton", **dims).double()
            source = triton_backend.emit(module.analysis)
            barrier.wait()  # all eight load their first kernels at once
            triton_backend.load_generated(source)
            reference = recdsl.compile(f"{examples}/{name}.rec", backend="sequential", **dims).double()
            reference.load_state_dict(module.state_dict())
            x = torch.randn(1, 5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(index))
            with torch.no_grad():
                torch.testing.assert_close(module(x), reference(x), rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL)
        except Exception as error:
            failures.append(f"{name} thread {index}: {type(error).__name__}: {error}")
            barrier.abort()  # the others must not wait for this thread

    threads = [threading.Thread(target=run, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print("\\n".join(failures) if failures else "ok")
    sys.exit(1 if failures else 0)
    """
)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize(
    "processes",
    [3, pytest.param(8, marks=pytest.mark.slow)],  # each process imports torch: 8 take ~30 s of CPU
)
def test_processes_of_eight_threads_compile_and_run_triton_cells_into_an_empty_cache(cache, processes):
    environment = dict(os.environ, TRITON_INTERPRET="1", RECDSL_CACHE_DIR=str(cache), OMP_NUM_THREADS="1")
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(EXAMPLES), str(index)],
            env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for index in range(processes)
    ]
    reports = [(index, worker.communicate(timeout=600)[0], worker.returncode) for index, worker in enumerate(workers)]
    failed = [f"process {index} (exit {code}):\n{output[-2000:]}" for index, output, code in reports if code != 0]
    assert not failed, "\n".join(failed)
    names = sorted(path.name for path in cache.iterdir())
    # mingru and hgrn at d = 4 and d = 5: four sources, nothing else (no temporary files left)
    assert len(names) == 4 and all(name.startswith("recdsl_") and name.endswith(".py") for name in names), names


# ---- 3. corrupt entries are replaced ---------------------------------------------------------


def _plant_bytes(path: Path, tmp_path: Path) -> None:
    path.write_bytes(b"VALUE = '\xff\xfe not UTF-8'\n")


def _plant_truncated(path: Path, tmp_path: Path) -> None:
    path.write_text("VALUE = ")


def _plant_directory(path: Path, tmp_path: Path) -> None:
    path.mkdir()
    (path / "inside.txt").write_text("a directory at the entry's path")


def _plant_symlink(path: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.py"
    elsewhere.write_text("VALUE = 666\n")
    path.symlink_to(elsewhere)


PLANTS = {"non_utf8": _plant_bytes, "truncated": _plant_truncated, "directory": _plant_directory}
if POSIX:
    PLANTS["symlink"] = _plant_symlink


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_a_corrupt_entry_is_replaced(cache, tmp_path, plant):
    source = unique_source()
    path = entry(cache, source)
    cache.mkdir(mode=0o700)
    PLANTS[plant](path, tmp_path)
    module = triton_backend.load_generated(source)
    assert module.answer() == 42
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == source.encode(), f"the {plant} entry was not replaced"
    if plant == "symlink":
        assert (tmp_path / "elsewhere.py").read_text() == "VALUE = 666\n", "the write followed the symlink"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_at_the_entry_path_neither_blocks_nor_stays(cache):
    source = unique_source()
    path = entry(cache, source)
    cache.mkdir(mode=0o700)
    os.mkfifo(path)
    loaded: list[object] = []
    # A reader that opens a FIFO blocks until a writer comes: run the load where a hang shows.
    loader = threading.Thread(target=lambda: loaded.append(triton_backend.load_generated(source)), daemon=True)
    loader.start()
    loader.join(timeout=30)
    assert not loader.is_alive(), "loading blocked on a FIFO at the cache entry's path"
    assert loaded and loaded[0].answer() == 42
    assert stat.S_ISREG(os.lstat(path).st_mode) and path.read_bytes() == source.encode()


# ---- 1 (directories) and 4: unsafe and unwritable caches -------------------------------------


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_a_created_cache_directory_is_private(cache, monkeypatch):
    nested = cache / "a" / "b"
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(nested))
    triton_backend.load_generated(unique_source())
    assert stat.S_IMODE(os.stat(nested).st_mode) == 0o700


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
@pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
def test_a_cache_directory_others_can_write_is_refused(cache, mode):
    cache.mkdir()
    os.chmod(cache, mode)
    with pytest.raises(BackendError) as raised:
        triton_backend.load_generated(unique_source())
    message = str(raised.value)
    assert str(cache) in message and "group or others" in message and "chmod go-w" in message and "RECDSL_CACHE_DIR" in message


@pytest.mark.skipif(not IS_ROOT, reason="giving a directory to another user needs root")
def test_a_cache_directory_owned_by_another_user_is_refused(cache):
    cache.mkdir(mode=0o700)
    os.chown(cache, 4321, -1)
    with pytest.raises(BackendError) as raised:
        triton_backend.load_generated(unique_source())
    message = str(raised.value)
    assert str(cache) in message and "another user (uid 4321)" in message and "RECDSL_CACHE_DIR" in message


def test_a_cache_below_a_regular_file_is_a_backend_error(tmp_path, monkeypatch):
    regular = tmp_path / "a-file"
    regular.write_text("")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(regular / "cache"))
    with pytest.raises(BackendError) as raised:
        triton_backend.load_generated(unique_source())
    message = str(raised.value)
    assert str(regular / "cache") in message and "cannot be created or written" in message and "RECDSL_CACHE_DIR" in message


def test_an_unwritable_home_is_a_backend_error_naming_the_variable(tmp_path, monkeypatch):
    home = tmp_path / "home-is-a-file"
    home.write_text("")
    monkeypatch.delenv("RECDSL_CACHE_DIR")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))
    with pytest.raises(BackendError) as raised:
        triton_backend.load_generated(unique_source())
    message = str(raised.value)
    assert str(home / ".cache" / "recdsl" / "triton") in message and "RECDSL_CACHE_DIR" in message


@pytest.mark.skipif(not POSIX, reason="POSIX permissions")
def test_an_existing_read_only_cache_directory_is_a_backend_error(tmp_path, monkeypatch):
    if IS_ROOT:
        if not os.path.isdir("/sys"):
            pytest.skip("root ignores permission bits and there is no /sys to stand for a read-only directory")
        read_only = Path("/sys")  # root's, mode 0555, and sysfs refuses new files even to root
    else:
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(read_only))
    with pytest.raises(BackendError) as raised:
        triton_backend.load_generated(unique_source())
    message = str(raised.value)
    assert str(read_only) in message and "cannot be created or written" in message and "RECDSL_CACHE_DIR" in message
