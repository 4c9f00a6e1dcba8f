"""The state-tracking training script (examples/train/state_tracking.py) runs end to end.

A smoke test with a few steps on tiny sizes, so the script cannot rot; the tasks'
labels are checked against Python's own arithmetic; the cell with beta_max = 2 is
examples/deltanet.rec.  The accuracies of a real run are not asserted here (see
examples/train/results/).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import recdsl

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _script():
    spec = importlib.util.spec_from_file_location("state_tracking", ROOT / "examples" / "train" / "state_tracking.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_run_writes_table_json_and_figure(tmp_path):
    # In a subprocess, as a user runs it, and because an optimizer step imports
    # torch._dynamo and with it triton, before test_triton.py sets TRITON_INTERPRET=1.
    script = ROOT / "examples" / "train" / "state_tracking.py"
    run = subprocess.run([sys.executable, str(script), "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    table = (tmp_path / "state_tracking.md").read_text()
    for task in ("parity", "modular arithmetic"):
        for cell in ("DeltaNet", "diagonal (Mamba decay)"):
            for eigenvalues in ("[0, 1]", "[-1, 1]"):
                assert f"| {task} | {cell} | {eigenvalues} |" in table
    assert "| task | cell | eigenvalues | T=8 | T=16 |" in table
    runs = json.loads((tmp_path / "state_tracking.json").read_text())["runs"]
    assert len(runs) == 8
    assert all(0.0 <= a <= 1.0 for run in runs for a in run["accuracy"].values())
    assert (tmp_path / "state_tracking.png").read_bytes().startswith(PNG_SIGNATURE)
    assert table in run.stdout
    assert run.stderr == "", "the progress bar must be quiet when stderr is not a terminal"
    redrawn = tmp_path / "redrawn"
    again = subprocess.run([sys.executable, str(script), "--from-json", str(tmp_path / "state_tracking.json"), "--out-dir", str(redrawn)], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert (redrawn / "state_tracking.md").read_text() == table
    assert (redrawn / "state_tracking.png").read_bytes().startswith(PNG_SIGNATURE)


def test_task_labels():
    script = _script()
    generator = torch.Generator().manual_seed(0)
    tokens, labels = script.sample(script.Task.PARITY, 4, 9, generator)
    assert torch.equal(labels, tokens.cumsum(1) % 2)
    tokens, labels = script.sample(script.Task.MODULAR_ARITHMETIC, 50, 11, generator)
    symbols = "+-*"
    for row, expected in zip(tokens.tolist(), labels.tolist()):
        for end in range(11):
            text = "".join(str(t) if t < script.MODULUS else symbols[t - script.MODULUS] for t in row[: end + 1])
            assert expected[end] == (eval(text) % 5 if end % 2 == 0 else script.IGNORE), text


def test_deltanet_with_beta_max_2_is_the_example_cell():
    torch.manual_seed(0)
    ranged = recdsl.compile(ROOT / "examples" / "train" / "state_tracking.rec", cell="DeltaNetRange", dk=3, dv=2, beta_max=2)
    example = recdsl.compile(ROOT / "examples" / "deltanet.rec", dk=3, dv=2)
    inputs = dict(q=torch.randn(2, 7, 3), k=F.normalize(torch.randn(2, 7, 3), dim=-1), v=torch.randn(2, 7, 2), b=torch.randn(2, 7))
    torch.testing.assert_close(ranged(**inputs), example(**inputs), rtol=1e-5, atol=1e-6)
