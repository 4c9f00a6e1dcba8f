"""Claims the README makes in prose (its code blocks are run by tests/test_docs.py).

- ``mod.double()`` computes in float64, with or without params;
- ``python -m pytest -m slow`` runs something (pytest exits 5 when it selects nothing);
- the docs link only to files inside the repository.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import recdsl

ROOT = Path(__file__).resolve().parent.parent

EMA = """
cell Ema(d, decay = 0.9) {
    input x: [d]
    state h: [d] = 0
    h = decay * h + (1 - decay) * x
    out h
}
"""


@pytest.mark.parametrize("source", [EMA, "examples/mingru.rec"], ids=["without params", "with params"])
def test_double_computes_in_float64(source: str) -> None:
    dims = {"d": 3} if source == EMA else {"d_in": 3, "d": 3}
    mod = recdsl.compile(source, **dims)
    x = torch.randn(2, 5, 3)
    y, state = mod.double()(x, return_state=True)
    assert y.dtype == torch.float64 and state["h"].dtype == torch.float64
    # computed in float64, not computed in float32 and cast: equal to the float64 input's result
    assert torch.equal(y, mod(x.double()))
    assert mod.float()(x).dtype == torch.float32
    assert "_dtype_anchor" not in mod.state_dict(), "the dtype buffer must not change the state dict"


def test_the_slow_marker_selects_tests() -> None:
    result = subprocess.run(
        # one file keeps it quick; the project's addopts (-m 'not slow') still apply
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "slow", str(ROOT / "tests" / "test_packaging.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"`python -m pytest -m slow` selects nothing or fails to collect:\n{result.stdout}\n{result.stderr}"
    assert "test_packaging.py::test_wheel_installs" in result.stdout, result.stdout


def test_docs_link_only_inside_the_repository() -> None:
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text(encoding="utf-8")
        assert "shared/LANGUAGE.md" not in text, f"{path.name} points to the starting contract outside the repository"
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), f"{path.relative_to(ROOT)} links to {target}, which is not a file in the repository"
