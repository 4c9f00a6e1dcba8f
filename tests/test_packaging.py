"""Packaging: ``recdsl --version``, and a wheel that works outside the source tree.

The slow test builds the sdist and the wheel with ``python -m build`` (the wheel from
the sdist, so a file missing from either shows), installs the wheel into a fresh virtual
environment and runs it from a directory outside the repository: the grammar must come
from the installed package, and ``import recdsl`` must resolve inside the venv, not in
the source tree. The venv sees this interpreter's packages (torch is not reinstalled)
through ``--system-site-packages`` and a ``.pth`` file naming this environment's
site-packages.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import recdsl
from recdsl.cli import main

ROOT = Path(__file__).resolve().parent.parent
BUILD_ARTIFACTS = (".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", ".venv", "venv")


def test_version_flag_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"recdsl {recdsl.__version__}"
    assert importlib.metadata.version("recdsl") == recdsl.__version__, "the installed metadata and recdsl.__version__ differ"


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"`{' '.join(map(str, command))}` exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs_outside_the_source_tree(tmp_path: Path) -> None:
    try:
        import build  # noqa: F401  (only to give a clear message when it is missing)
    except ImportError:
        pytest.fail("the `build` package is missing: pip install -e '.[test]'")
    env = {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}

    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*BUILD_ARTIFACTS))
    dist = tmp_path / "dist"
    # No isolation: the test extra brings a setuptools that satisfies build-system.requires,
    # so no network is needed (build checks the requirement and fails if it is not met).
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(source)], tmp_path, env)
    wheels = list(dist.glob("recdsl-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {sorted(p.name for p in dist.iterdir())}"

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, env)
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / "python"
    venv_site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    # This environment's packages (torch, numpy, lark) when it is itself a venv; a
    # directory named in a .pth is put on sys.path without running its own .pth files,
    # so an editable install of recdsl there is not picked up.
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()}
    (venv_site / "_recdsl_test_parent_env.pth").write_text("\n".join(sorted(ours)) + "\n")
    # --no-deps: the dependencies come from this environment (a fresh venv's own older
    # setuptools would otherwise make pip try to upgrade it for torch); they are checked
    # in the wheel's metadata instead.
    with zipfile.ZipFile(wheels[0]) as wheel:
        metadata = wheel.read(f"recdsl-{recdsl.__version__}.dist-info/METADATA").decode()
        assert "recdsl/grammar.lark" in wheel.namelist(), "the grammar is missing from the wheel"
    required = {line.split(":", 1)[1].strip().split(";")[0].split(">")[0].split("=")[0].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line}
    assert {"torch", "numpy", "lark"} <= required, f"the wheel's dependencies are {sorted(required)}"
    _run([str(python), "-m", "pip", "install", "--no-index", "--no-deps", str(wheels[0])], tmp_path, env)

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(ROOT / "examples" / "mingru.rec", outside / "mingru.rec")
    location = _run([str(python), "-c", "import recdsl; print(recdsl.__file__)"], outside, env).strip()
    assert Path(location).resolve().is_relative_to(venv.resolve()), f"recdsl was imported from {location}, not from the venv {venv}"
    assert not Path(location).resolve().is_relative_to(ROOT), f"recdsl was imported from the source tree: {location}"

    version = _run([str(bin_dir / "recdsl"), "--version"], outside, env).strip()
    assert version == f"recdsl {recdsl.__version__}"
    compiled = _run(
        [
            str(python),
            "-c",
            "import torch, recdsl\n"
            "mod = recdsl.compile('mingru.rec', d_in=3, d=4)\n"
            "print(tuple(mod(torch.randn(2, 5, 3)).shape))\n",
        ],
        outside,
        env,
    )
    assert compiled.strip() == "(2, 5, 4)", compiled
    explained = _run([str(bin_dir / "recdsl"), "explain", "mingru.rec", "--dim", "d_in=3", "--dim", "d=4"], outside, env)
    assert "diagonal affine" in explained, explained
