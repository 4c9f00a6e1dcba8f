"""Session setup shared by every test file."""

from __future__ import annotations

import importlib.util
import os


def _import_triton_for_the_interpreter() -> None:
    """Import triton once with TRITON_INTERPRET=1 set, then restore the environment.

    Triton sets up its language helpers when it is first imported; a process that first
    imports it for compiled kernels cannot run interpreted ones later ("Cannot call
    @triton.jit'd outside of the scope of a kernel"). These machines have no GPU, so every
    kernel a test runs is interpreted, whichever test file happens to import triton first.
    """
    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if torch.cuda.is_available():
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_import_triton_for_the_interpreter()
