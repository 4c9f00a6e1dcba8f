"""Every kernel the Triton backend launches, compiled ahead of time for sm_80 (A100) and sm_90
(H100) on this CPU-only machine, with the argument types and specialisation of its launch at
the sizes of a real layer: no register spills, and shared memory within the target's limit
(for sm_80, within the 99 KB of sm_86/sm_89, which run the same code).

The launches are recorded by running the layer's forward and backward pass on the CPU with
the kernels not run (:func:`recdsl.backends.triton_aot.record_launches`); each distinct kernel
is compiled by ``triton.compile`` and ptxas's ``-v`` log is read.  Compiling takes seconds
per kernel, so the default run compiles the heaviest kernels (per-row-decay ``walk_outputs``
and ``chunk_key_grads`` at dk = dv = 128, the complex LRU's backward, its time-split kernels); ``pytest -m slow``
compiles all of them, for float32 and bfloat16 layers, one-pass and time-split, and with TF32
matmuls.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from recdsl.backends import triton_aot  # noqa: E402

REASON = triton_aot.nvidia_backend_missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
LAYERS = {layer.label: layer for layer in triton_aot.LAYERS}


def _specializations(label: str, dtype=None, split: bool = True) -> list[triton_aot.Specialization]:
    """The layer's kernels at batch 1: with ``split``, the diagonal scans' time-split kernels
    (a batch of one row is too few programs), else the one-pass kernels."""
    options = None if split else {"split_programs": 0}
    return triton_aot.distinct(triton_aot.layer_launches(EXAMPLES, LAYERS[label], dtype, backend_options=options))


def _compile(jobs: list[tuple[triton_aot.Specialization, triton_aot.Target]]) -> list[triton_aot.CompileReport]:
    try:
        return triton_aot.compile_all(jobs)
    except (TypeError, AttributeError, ImportError, triton_aot.PtxasLogMissing) as error:  # another Triton's compile API
        pytest.skip(f"this Triton's ahead-of-time compile API differs from the one used here: {error}")


def _check(reports: list[triton_aot.CompileReport]) -> None:
    print("\n" + triton_aot.report_table([("", r) for r in reports]))
    problems = []
    for r in reports:
        if r.spills:
            problems.append(f"{r.specialization.describe()} on {r.target.name}: {r.spill_stores} B spill stores, {r.spill_loads} B spill loads ({r.registers} registers)")
        limit = min(r.target.shared_limit, triton_aot.PORTABLE_SHARED_LIMIT) if r.target is triton_aot.SM80 else r.target.shared_limit
        if r.shared > limit:
            problems.append(f"{r.specialization.describe()} on {r.target.name}: {r.shared} B of shared memory, more than {limit}")
    assert not problems, "\n".join(problems)


def test_launches_carry_the_tiling_and_exact_matmuls():
    """Cheap (nothing compiled): every chunked launch sets num_warps/num_stages and asks for
    exact float32 products; no kernel argument is an unspecialisable Python object."""
    specs = _specializations("gla(dk=128, dv=128)")
    kernels = {"walk_outputs", "walk_state_grads", "chunk_key_grads", "chunk_value_grads"}  # forward and backward
    chunked = [s for s in specs if s.kernel in kernels]
    assert {s.kernel for s in chunked} == kernels
    for spec in chunked:
        assert {name for name, _ in spec.options} == {"num_warps", "num_stages"}, spec.describe()
        assert dict(spec.constants)["PRECISION"] == "ieee", spec.describe()


def test_heaviest_kernels_compile_without_spills():
    """Per-row-decay walk_outputs at dk = dv = 128 (the fused forward: the most registers of the
    chunked family) on both targets, its backward chunk_key_grads on sm_80, and the complex LRU's
    backward (the most registers of the generated scans) on sm_90."""
    gla = _specializations("gla(dk=128, dv=128)")
    outputs = [s for s in gla if s.kernel == "walk_outputs"]
    key_grads = [s for s in gla if s.kernel == "chunk_key_grads"]
    backward = [s for s in _specializations("lru(d=1024, n=1024)", split=False) if s.kernel.startswith("backward_")]
    assert len(outputs) == 1 and len(key_grads) == 1 and len(backward) == 1
    _check(_compile([(outputs[0], triton_aot.SM80), (outputs[0], triton_aot.SM90), (key_grads[0], triton_aot.SM80), (backward[0], triton_aot.SM90)]))


def test_normalised_walk_compiles_without_spills():
    """mLSTM's walk with its normaliser carried (the read-out divided in the kernel) in blocks of
    32 steps on sm_90 in float32, where blocks of 64 spilled, and the backward walk that forms
    the division's gradients on sm_80 (every kernel on both targets in the slow test)."""
    specs = {s.kernel: s for s in _specializations("mlstm(dk=128, dv=128)")}
    walk, state_grads = specs["walk_outputs"], specs["walk_state_grads"]
    assert dict(walk.constants)["NORMALISED"] and dict(walk.constants)["BT"] == 32 and dict(walk.constants)["KEPT_EVERY"] == 2
    assert dict(state_grads.constants)["NORMALISED"] and dict(state_grads.constants)["BT"] == 64
    _check(_compile([(walk, triton_aot.SM90), (state_grads, triton_aot.SM80)]))


def test_fused_sequential_kernels_compile_without_spills_at_d_128():
    """The fused sequential kernel of LSTM (the widest matmul group, [128] @ [128, 512]) at d = 128
    in float32: the weights are tiled, so nothing spills (forward on sm_90, backward on sm_80 here;
    both on both targets, GRU's and ParaGRU's too, in the slow test)."""
    specs = {s.kernel: s for s in _specializations("lstm(d_in=128, d=128)")}
    assert sorted(specs) == ["fused_backward", "fused_forward"]
    _check(_compile([(specs["fused_forward"], triton_aot.SM90), (specs["fused_backward"], triton_aot.SM80)]))


def test_time_split_kernels_compile_without_spills():
    """The complex LRU's scan with T split across programs (one pass with a look-back, forward
    and adjoint) on both targets, and a semiring's three passes (mLSTM's stabiliser: fold,
    carry, rescan) on sm_90 (every kernel on both targets, and every cell's, in the slow test)."""
    specs = {s.kernel: s for s in _specializations("lru(d=1024, n=1024)")}
    split = sorted(name for name in specs if name.startswith(("summarize_", "carries_")) or name.endswith(("_chunks", "_look_back")))
    assert split == ["backward_h_look_back", "forward_h_look_back"], sorted(specs)
    jobs = [(specs[name], target) for name in split for target in triton_aot.TARGETS]
    mlstm = {s.kernel: s for s in _specializations("mlstm(dk=64, dv=64)")}
    three_passes = sorted(name for name in mlstm if name.startswith(("summarize_", "carries_")) or name.endswith("_chunks"))
    assert len(three_passes) == 6, sorted(mlstm)
    _check(_compile(jobs + [(mlstm[name], triton_aot.SM90) for name in three_passes]))


@pytest.mark.slow
@pytest.mark.parametrize("label", sorted(LAYERS))
def test_every_kernel_compiles_without_spills(label):
    import torch

    specs: dict[triton_aot.Specialization, None] = {}
    for dtype in (torch.float32, torch.bfloat16):
        for split in (True, False):
            for spec in _specializations(label, dtype, split):
                specs.setdefault(spec, None)
    _check(_compile([(spec, target) for spec in specs for target in triton_aot.TARGETS]))


def _chunk_specializations(size: int, rows: bool, **options) -> list[triton_aot.Specialization]:
    """The chunked kernels' launches for two read-outs, and for one with scaled values and a skip term."""
    two = triton_aot.chunk_launches(size, size, rows, readouts=2, **options)
    skipped = triton_aot.chunk_launches(size, size, rows, skip=True, **options)
    return triton_aot.distinct(two + skipped)


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_chunked_kernels_with_tf32_compile_without_spills(rows, size):
    """Two read-outs (the second by chunk_outputs), and one with values scaled per step and a skip
    term (Mamba-2's dt x and D x), forward and backward with TF32 products."""
    specs = _chunk_specializations(size, rows, allow_tf32=True)
    assert {s.kernel for s in specs} == {"walk_outputs", "chunk_outputs", "walk_state_grads", "chunk_key_grads", "chunk_value_grads"}
    assert {dict(s.constants).get("PRECISION") for s in specs} == {"tf32"}
    _check(_compile([(spec, target) for spec in specs for target in triton_aot.TARGETS]))


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_chunked_kernels_with_bfloat16_operands_compile_without_spills(rows, size):
    """bfloat16 queries, keys, values and log decays: tl.dot on bfloat16 operands (tensor cores),
    forward and backward, dk = dv = 64 and 128, on sm_80 and sm_90."""
    import torch

    specs = _chunk_specializations(size, rows, allow_tf32=False, dtype=torch.bfloat16)
    assert {s.kernel for s in specs} == {"walk_outputs", "chunk_outputs", "walk_state_grads", "chunk_key_grads", "chunk_value_grads"}
    assert all("*bf16" in s.pointer_types for s in specs)
    _check(_compile([(spec, target) for spec in specs for target in triton_aot.TARGETS]))


def test_delta_rule_kernels_compile_without_spills():
    """The gated delta rule's three kernels (backends/triton_delta.py) at dk = dv = 128 in float32:
    delta_chunks and delta_gradients on sm_80, delta_chunks and delta_adjoint_chunks on sm_90
    (every combination in the slow tests)."""
    specs = {s.kernel: s for s in _specializations("gated_deltanet(dk=128, dv=128)")}
    assert sorted(specs) == ["delta_adjoint_chunks", "delta_chunks", "delta_gradients"]
    for spec in specs.values():
        assert dict(spec.constants)["PRECISION"] == "ieee", spec.describe()
        assert {name for name, _ in spec.options} == {"num_warps", "num_stages"}, spec.describe()
    _check(_compile([
        (specs["delta_chunks"], triton_aot.SM80), (specs["delta_gradients"], triton_aot.SM80),
        (specs["delta_chunks"], triton_aot.SM90), (specs["delta_adjoint_chunks"], triton_aot.SM90),
    ]))


@pytest.mark.slow
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
def test_delta_rule_kernels_with_bfloat16_keys_and_tf32_compile_without_spills(gated, size):
    """bfloat16 keys and queries fed to tl.dot as such, and float32 with TF32 products: the
    delta-rule kernels' other specialisations, forward and backward (a compiled cell's layer launches, recorded under
    the interpreter, carry float32 keys: there bfloat16 keys are widened, see triton_delta._BFLOAT16_DOT)."""
    import torch

    from recdsl.backends import triton_delta

    specs = {}
    # The launches are recorded, not run: take the GPU's path, bfloat16 keys as they are.
    widened, triton_delta._BFLOAT16_DOT = triton_delta._BFLOAT16_DOT, True
    try:
        for dtype, allow_tf32 in ((torch.bfloat16, False), (torch.float32, True)):
            for spec in triton_aot.distinct(triton_aot.delta_launches(size, size, gated, dtype, allow_tf32=allow_tf32, backward=True)):
                specs.setdefault(spec, None)
    finally:
        triton_delta._BFLOAT16_DOT = widened
    assert {dict(s.constants)["PRECISION"] for s in specs} == {"ieee", "tf32"}
    assert any("bf16" in s.describe() for s in specs)
    _check(_compile([(spec, target) for spec in specs for target in triton_aot.TARGETS]))


@pytest.mark.slow
@pytest.mark.parametrize("gated", [False, True], ids=["delta rule", "gated delta rule"])
def test_delta_rule_kernels_with_two_key_sides_compile_without_spills(gated):
    """TTT-linear's form (a left vector other than the right, so delta_gradients writes both
    sides' gradients) at dk = dv = 128, forward and backward, float32, both targets."""
    specs = triton_aot.distinct(triton_aot.delta_launches(128, 128, gated, backward=True, same_sides=False))
    assert {dict(s.constants).get("SAME_SIDES") for s in specs} == {False}  # (the adjoint kernel forms R L^T too)
    _check(_compile([(spec, target) for spec in specs for target in triton_aot.TARGETS]))


def test_monoid_backward_kernels_compile_without_spills():
    """Aaren's backward (backends/triton_monoid.py: the combine's Jacobian by the registry's
    rules, the adjoint scanned as matrix-affine pairs) at d = 1024: the one-pass kernel on
    sm_80, the time-split rescan and fold on sm_90 (all of them on both targets, float32 and
    bfloat16 layers, in the slow test)."""
    whole = {s.kernel: s for s in _specializations("aaren(d=1024)", split=False)}
    split = {s.kernel: s for s in _specializations("aaren(d=1024)")}
    assert "backward_acc" in whole and {"summarize_backward_acc", "carries_backward_acc", "backward_acc_chunks"} <= set(split), (sorted(whole), sorted(split))
    _check(_compile([(whole["backward_acc"], triton_aot.SM80), (split["backward_acc_chunks"], triton_aot.SM90), (split["summarize_backward_acc"], triton_aot.SM90)]))
