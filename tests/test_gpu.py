"""The backends on a CUDA device, compiled (no interpreter), against the sequential reference on the CPU.

Skipped on machines without a GPU (CI has none); run on a GPU machine with
``python -m pytest tests/test_gpu.py``.  Every example on every backend that can run it:
the generated Triton kernels (scan, chunked and fused sequential), and the torch forms
(scan, chunked, newton) on CUDA tensors, float64 exact and float32 to 1e-4 of scale, with
gradients; bfloat16 inputs accumulate in float32.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import recdsl
from recdsl.plan import BackendKind, PlanOptions, Unsupported, plan_backend
from recdsl.testing import Example, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

KINDS = [BackendKind.TRITON, BackendKind.SCAN, BackendKind.CHUNKED, BackendKind.NEWTON]


def _backends(module: recdsl.CompiledCell) -> list[str]:
    runnable = []
    for kind in KINDS:
        if kind is BackendKind.TRITON and importlib.util.find_spec("triton") is None:
            continue
        if not isinstance(plan_backend(module.analysis, kind, PlanOptions()), Unsupported):
            runnable.append(kind.value)
    return runnable


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


@pytest.mark.parametrize("name", sorted(DIMS))
@pytest.mark.parametrize("length", [1, 37, 130])
def test_float64_on_cuda_matches_sequential(name, length):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    backends = _backends(module)
    if not backends:
        pytest.skip("no backend but the sequential loop runs this cell")
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=(2,), seed=length, with_state=True))
    mismatches = compare_backends(module, backends, inputs, state, seed=length, device="cuda")
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", sorted(DIMS))
def test_float32_on_cuda_matches_sequential(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **DIMS[name]).double()
    backends = _backends(module)
    if not backends:
        pytest.skip("no backend but the sequential loop runs this cell")
    inputs, _ = random_inputs(module, Example(batch=3, length=300, heads=(), seed=5, with_state=False))
    inputs = {n: v.to(torch.complex64 if v.is_complex() else torch.float32) for n, v in inputs.items()}
    mismatches = compare_backends(module, backends, inputs, None, seed=5, device="cuda", rtol=1e-4, atol=1e-5)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", ["mingru", "gla", "gated_deltanet", "gru"])
def test_bfloat16_inputs_accumulate_in_float32_on_cuda(name):
    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **DIMS[name]).cuda()
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name])
    reference.load_state_dict(module.state_dict())
    inputs, _ = random_inputs(reference, Example(batch=2, length=200, heads=(), seed=1, with_state=False))
    low = {n: v.to(torch.bfloat16) for n, v in inputs.items()}
    got = module(**{n: v.cuda() for n, v in low.items()})
    got = got[0] if isinstance(got, tuple) else got
    expected = reference(**{n: v.float() for n, v in low.items()})
    expected = expected[0] if isinstance(expected, tuple) else expected
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float().cpu(), expected.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["mingru", "s6", "gla", "deltanet"])
def test_low_precision_inputs_reach_the_compiled_kernels(name, dtype):
    """bfloat16/float16 inputs and params go to the compiled kernels as they are (bfloat16 tl.dot
    operands included): outputs and gradients within the bounds of tests/test_triton_low_precision.py."""
    from test_triton_low_precision import check_against_float64_loop

    check_against_float64_loop(name, dtype, "cuda")


def _packed_against_one_call_per_sequence(name: str, device: str) -> None:
    """Every backend that runs ``name`` on ``device``, on a packed batch (``cu_seqlens``), against
    the CPU sequential loop called once per sequence: outputs, returned states (a reverse
    state's at each sequence's first step) and input gradients, float64."""
    lengths = [65, 1, 64, 3, 130]
    offsets = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **DIMS[name]).double()
    generator = torch.Generator().manual_seed(0)
    inputs = {i.name: 0.5 * torch.randn((1, offsets[-1].item(), 2, *i.type.shape), generator=generator, dtype=torch.float64) for i in reference.cell.inputs}
    state = {k: 0.5 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in reference.initial_state(len(lengths), 2, dtype=torch.float64).items()}

    def run(module, x, s, dev, packed):
        x = {k: v.to(dev).requires_grad_() for k, v in x.items()}
        if packed:
            out, final = module(**x, state={k: v.to(dev) for k, v in s.items()}, cu_seqlens=offsets.to(dev), return_state=True)
            outs = list(out) if isinstance(out, tuple) else [out]
        else:
            pieces, finals = [], []
            for n in range(len(lengths)):
                a, b = int(offsets[n]), int(offsets[n + 1])
                out, fin = module(**{k: v[:, a:b] for k, v in x.items()}, state={k: v[n : n + 1] for k, v in s.items()}, return_state=True)
                pieces.append(list(out) if isinstance(out, tuple) else [out])
                finals.append(fin)
            outs = [torch.cat([p[i] for p in pieces], 1) for i in range(len(pieces[0]))]
            final = {k: torch.cat([f[k] for f in finals], 0) for k in finals[0]}
        loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype, device=o.device).reshape(o.shape)).sum() for o in outs)
        grads = torch.autograd.grad(loss, list(x.values()))
        return [o.detach().cpu() for o in outs], {k: v.detach().cpu() for k, v in final.items()}, [g.cpu() for g in grads]

    expected = run(reference, inputs, state, "cpu", packed=False)
    for backend in _backends(reference) if device == "cuda" else ["scan", "chunked"]:
        module = recdsl.compile(EXAMPLES / f"{name}.rec", backend=backend, **DIMS[name]).double().to(device)
        module.load_state_dict(reference.state_dict())
        got = run(module, inputs, state, device, packed=True)
        for what, g, e in (("output", got[0], expected[0]), ("input gradient", got[2], expected[2])):
            for i, (a, b) in enumerate(zip(g, e)):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} on {backend}: {what} {i}: {m}")
        for key in expected[1]:
            torch.testing.assert_close(got[1][key], expected[1][key], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name} on {backend}: returned state {key}: {m}")


@pytest.mark.parametrize("name", ["mingru", "gla", "deltanet", "lion", "crf_marginals"])
def test_packed_sequences_on_cuda_match_one_call_per_sequence(name):
    """Packed batches with forward and reverse states (LION, CRF marginals) on CUDA: native resets, or equal-length groups on Triton."""
    _packed_against_one_call_per_sequence(name, "cuda")


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("operands", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_chunked_kernels_forward_and_backward_on_cuda(rows, operands, size):
    """The chunked Triton kernels compiled (forward and backward, exact float32 or bfloat16
    tl.dot operands) at dk = dv = 64 and 128, 300 steps, against the torch chunked form in
    float64 on the same (rounded) values: two read-outs (the first by the walk over the chunks,
    walk_outputs, with values scaled per step and Mamba-2's skip term skip_t v_t; the second by
    chunk_outputs from the kept chunk-start states), final state and every gradient within
    1e-4 (float32) or 3e-2 (bfloat16) of their scale."""
    _chunked_kernels_against_the_torch_form(rows, operands, size, "cuda")


def _chunked_kernels_against_the_torch_form(rows, operands, size, device):
    from recdsl.backends import chunk_kernels, triton_chunk

    generator = torch.Generator().manual_seed(size)
    N, T = 3, 300
    q, q2, k = (torch.randn(N, T, size, generator=generator).to(operands) for _ in range(3))
    v = torch.randn(N, T, size, generator=generator).to(operands)
    log_decay = (-0.2 * torch.rand(N, T, size if rows else 1, 1, generator=generator)).to(operands)
    initial = torch.randn(N, size, size, generator=generator)
    scale = torch.rand(N, T, generator=generator).to(operands)
    skip = torch.randn(N, T, generator=generator).to(operands)
    output_weights = [torch.randn(N, T, size, generator=generator, dtype=torch.float64) for _ in range(2)]
    final_weights = torch.randn(N, size, size, generator=generator, dtype=torch.float64)

    def run(kernel, tensors, device):
        leaves = [t.to(device).detach().requires_grad_() for t in tensors]
        lq, lq2, lk, lv, lg, l0, lc, ls = leaves
        if kernel is triton_chunk.decayed_outer_products:
            (out, out2), final = kernel([lq, lq2], [chunk_kernels.RankOneInput(lk, lv)], lg, l0, 64, value_scales=[lc], skip=ls)
        else:
            (out, out2), final = kernel([lq, lq2], [chunk_kernels.RankOneInput(lk, lv * lc.unsqueeze(-1))], lg, l0, 64)
            out = out + ls.unsqueeze(-1) * lv
        loss = sum((o.double() * w.to(device)).sum() for o, w in zip((out, out2), output_weights)) + (final.double() * final_weights.to(device)).sum()
        return [x.detach().double().cpu() for x in (out, out2, final, *torch.autograd.grad(loss, leaves))]

    got = run(triton_chunk.decayed_outer_products, (q, q2, k, v, log_decay, initial, scale, skip), device)
    expected = run(chunk_kernels.decayed_outer_products, [t.double() for t in (q, q2, k, v, log_decay, initial, scale, skip)], "cpu")
    tolerance = 1e-4 if operands == torch.float32 else 3e-2
    names = ["read-outs", "second read-outs", "final state", "gradient of q", "gradient of the second q", "gradient of k", "gradient of v", "gradient of the log decay", "gradient of the initial state", "gradient of the value scale", "gradient of the skip"]
    for name, a, b in zip(names, got, expected):
        error = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))
        assert error < tolerance, f"{name}: {error:.2e} of its scale"

@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("size", [64, 128])
@pytest.mark.parametrize("operands", [torch.float32, torch.bfloat16])
def test_normalised_walk_forward_and_backward_on_cuda(operands, size):
    """mLSTM's normalised read-out in the compiled kernels (walk_outputs in blocks of 32 steps with
    its normaliser and in-program barriers, walk_state_grads forming the division's gradients) at
    dk = dv = 64 and 128, 300 steps, against the float64 loop on the same (rounded) values:
    read-outs, final state and normaliser, every gradient within 1e-4 (float32) or 3e-2
    (bfloat16) of their scale."""
    from recdsl.backends import chunk_kernels, triton_chunk
    from test_triton_normaliser import _loop

    generator = torch.Generator().manual_seed(size)
    N, T = 3, 300
    q, k, v = (torch.randn(N, T, size, generator=generator).to(operands) for _ in range(3))
    c = (0.5 * torch.rand(N, T, generator=generator) + 0.1).to(operands)
    log_decay = (-0.2 * torch.rand(N, T, generator=generator)).to(operands)
    initial, n_initial = torch.randn(N, size, size, generator=generator), torch.randn(N, size, generator=generator)
    floor = 3.0 * torch.rand(N, T, generator=generator)
    weights = [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in ((N, T, size), (N, size, size), (N, size))]

    def run(tensors, device, kernels):
        leaves = [t.to(device).detach().requires_grad_() for t in tensors]
        if kernels:
            lq, lk, lv, lc, lg, l0, ln, lf = leaves
            (out,), (final, n_final) = triton_chunk.decayed_outer_products(
                [lq], [chunk_kernels.RankOneInput(lk, lv)], lg[..., None, None], l0, 64, value_scales=[lc], normalisation=triton_chunk.Normalisation(ln, lf)
            )
        else:
            out, final, n_final = _loop(*leaves)
        loss = sum((x.double() * w.to(device)).sum() for x, w in zip((out, final, n_final), weights))
        return [x.detach().double().cpu() for x in (out, final, n_final, *torch.autograd.grad(loss, leaves))]

    tensors = (q, k, v, c, log_decay, initial, n_initial, floor)
    got = run(tensors, "cuda", kernels=True)
    expected = run([t.double() for t in tensors], "cpu", kernels=False)
    tolerance = 1e-4 if operands == torch.float32 else 3e-2
    names = ["read-outs", "final state", "final normaliser"] + [f"gradient of {n}" for n in ("q", "k", "v", "the value scale", "the log decay", "the initial state", "the initial normaliser", "the floor")]
    for name, a, b in zip(names, got, expected):
        error = float((a - b).abs().max() / b.abs().max().clamp(min=1e-3))
        assert error < tolerance, f"{name}: {error:.2e} of its scale"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("n", [16, 64])
def test_fused_selective_scan_on_cuda_at_layer_width(n):
    """S6's fused selective scan (backends/triton_selective.py) compiled, at d = 96 (several blocks
    of channels) and Mamba's n = 16 or n = 64, over 300 steps (several checkpoints, the states
    between them recomputed), float64 with every gradient against the sequential reference."""
    from recdsl.plan import Form

    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / "s6.rec", d=96, n=n).double()
    assert recdsl.compile(EXAMPLES / "s6.rec", backend="triton", d=96, n=n).plan.steps[0].form is Form.TRITON_SELECTIVE_SCAN
    inputs, state = random_inputs(module, Example(batch=2, length=300, heads=(), seed=3, with_state=True))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=3, device="cuda")
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name,dims", [("mingru", dict(d_in=8, d=1024)), ("lru", dict(d=8, n=512))])
def test_look_back_scans_on_cuda_with_many_blocks_in_flight(name, dims):
    """The affine scans' one-pass split (forward_h_look_back, backward_h_look_back) compiled,
    with thousands of programs in flight (1 row, 16 or 8 blocks of elements, 64 blocks of
    steps), so that walks back meet blocks that have published only their fold: float64,
    every gradient, against the sequential reference."""
    from recdsl.backends.triton_launch import observe_launches

    torch.manual_seed(0)
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **dims).double()
    inputs, state = random_inputs(module, Example(batch=1, length=2048, heads=(), seed=4, with_state=True))
    with observe_launches() as launches:
        mismatches = compare_backends(module, ["triton"], inputs, state, seed=4, device="cuda")
    assert not mismatches, "\n".join(map(str, mismatches))
    assert {"forward_h_look_back", "backward_h_look_back"} <= {launch.name for launch in launches}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_delta_rule_kernel_finds_infinite_queries_on_cuda(name):
    """The compiled delta_chunks notes infinite read-out entries as it reads them (no pass over
    q in torch): a query with +-inf entries gives the loop's infinities, NaNs and values."""
    torch.manual_seed(0)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", dk=16, dv=16).double()
    triton = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", dk=16, dv=16).double().cuda()
    triton.load_state_dict(sequential.state_dict())
    inputs = {i.name: 0.5 * torch.randn(2, 150, *i.type.shape, dtype=torch.float64) for i in sequential.cell.inputs}
    inputs["q"][0, 70, 1] = float("inf")
    inputs["q"][1, 149, 0] = -float("inf")
    expected = sequential(**inputs)
    got = triton(**{n: v.cuda() for n, v in inputs.items()}).cpu()
    assert torch.isinf(expected).any()
    assert torch.equal(torch.isinf(expected), torch.isinf(got)) and torch.equal(torch.isnan(expected), torch.isnan(got))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-9, atol=1e-10)
