"""The chunked Triton kernels (GLA, RetNet, mLSTM, Mamba-2) in Triton's interpreter.

Forward against the torch chunked form; the backward kernels against autograd of the torch
chunked form (every gradient: read-outs, keys, values, log decays, initial state), across key
and value blocks, ragged chunks, and decays strong enough for the exact pairwise path; whole
cells against the sequential reference in float64 and float32, T = 1, heads, initial states;
bfloat16 inputs against a float32 run; and the matmul precision each launch asks for.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import recdsl
from recdsl.testing import Example, _run, compare_backends, random_inputs

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Two key blocks of the gradient kernels (16), the second ragged; chunked state of at most 20 x 12.
CELLS = {
    "gla": dict(dk=20, dv=12),
    "retnet": dict(dk=20, dv=12),
    "mlstm": dict(dk=20, dv=12),
    "mamba2": dict(p=12, n=20),
}


@pytest.fixture(autouse=True)
def interpreter(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "recdsl-cache"))


def _problem(rows: bool, strength: float, keys: int = 80, values: int = 70, steps: int = 70, dtype=torch.float64, batch: int = 1, readouts: int = 1):
    generator = torch.Generator().manual_seed(11)
    qs = [torch.randn(batch, steps, keys, generator=generator, dtype=dtype) for _ in range(readouts)]
    k = torch.randn(batch, steps, keys, generator=generator, dtype=dtype)
    v = torch.randn(batch, steps, values, generator=generator, dtype=dtype)
    log_decay = -strength * torch.rand(batch, steps, keys if rows else 1, 1, generator=generator, dtype=dtype)
    initial = torch.randn(batch, keys, values, generator=generator, dtype=dtype)
    return qs, k, v, log_decay, initial


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
@pytest.mark.parametrize("strength", [0.05, 3.0], ids=["factorised", "pairwise"])
def test_chunk_kernels_match_the_torch_chunked_form_across_key_and_value_blocks(rows, strength):
    """dk = 80, dv = 70: two key and two value blocks of 64, the second of each ragged; 70 steps:
    two chunks, the second ragged.  A log decay of up to -3 per step takes G below -60 inside a
    chunk, where the per-row kernel switches to the exact pairwise sum."""
    from recdsl.backends import chunk_kernels, triton_chunk

    (q,), k, v, log_decay, initial = _problem(rows, strength)
    (out,), final = triton_chunk.forward([q], k, v, log_decay, initial, 64)
    (expected,), expected_final = chunk_kernels.decayed_outer_products([q], [chunk_kernels.RankOneInput(k, v)], log_decay, initial, 64)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, msg="read-outs q_t @ S_t")
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10, msg="final state S_T")


def _gradients(kernel, qs, k, v, log_decay, initial, chunk, output_weights, final_weights):
    """Gradients of ``sum(w_i * out_i) + sum(w * final)`` w.r.t. the read-outs, k, v, the log decay and S_0."""
    from recdsl.backends import chunk_kernels

    leaves = [t.detach().clone().requires_grad_() for t in (*qs, k, v, log_decay, initial)]
    *fq, fk, fv, fg, f0 = leaves
    outputs, final = kernel(fq, [chunk_kernels.RankOneInput(fk, fv)], fg, f0, chunk)
    loss = sum((o * w).sum() for o, w in zip(outputs, output_weights) if w is not None)
    if final_weights is not None:
        loss = loss + (final * final_weights).sum()
    found = torch.autograd.grad(loss, leaves, allow_unused=True)
    names = [f"read-out {i}" for i in range(len(qs))] + ["k", "v", "log decay", "initial state"]
    return {name: (torch.zeros_like(leaf) if g is None else g) for name, g, leaf in zip(names, found, leaves)}


def _assert_gradients_match(rows, strength, keys, values, steps, chunk, *, batch=1, readouts=1, with_outputs=True, with_final=True, rtol=1e-9, atol=1e-9):
    from recdsl.backends import chunk_kernels, triton_chunk

    qs, k, v, log_decay, initial = _problem(rows, strength, keys, values, steps, batch=batch, readouts=readouts)
    generator = torch.Generator().manual_seed(5)
    output_weights = [torch.randn(batch, steps, values, generator=generator, dtype=k.dtype) if with_outputs else None for _ in qs]
    final_weights = torch.randn(batch, keys, values, generator=generator, dtype=k.dtype) if with_final else None
    got = _gradients(triton_chunk.decayed_outer_products, qs, k, v, log_decay, initial, chunk, output_weights, final_weights)
    expected = _gradients(chunk_kernels.decayed_outer_products, qs, k, v, log_decay, initial, chunk, output_weights, final_weights)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=rtol, atol=atol, msg=lambda m, name=name: f"gradient of {name}: {m}")


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
@pytest.mark.parametrize("strength", [0.05, 3.0], ids=["factorised", "pairwise"])
def test_backward_kernels_match_autograd_of_the_torch_chunked_form(rows, strength):
    """dk = 40 (three key blocks of 16 in chunk_key_grads, the last ragged; two of 32 in the
    walks), dv = 24, 70 steps in chunks of 32 (three, the last ragged), two rows; every gradient
    in float64 to 1e-9, the log decay's included (the reverse cumulative sum of
    q dq - k dk and the chunk-end term)."""
    _assert_gradients_match(rows, strength, keys=40, values=24, steps=70, chunk=32, batch=2)


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_backward_of_one_step_of_several_read_outs_and_of_the_final_state_alone(rows):
    """T = 1 with two read-outs (their gradients are summed into dk, dv, dg, dS_0), and a loss of
    the final state alone (the read-outs' gradients are zero)."""
    _assert_gradients_match(rows, 0.5, keys=16, values=16, steps=1, chunk=64, readouts=2)
    _assert_gradients_match(rows, 0.5, keys=16, values=16, steps=20, chunk=16, with_outputs=False)


def test_log_decays_below_the_floor_get_no_gradient():
    """A decay of exactly 0 (log decay -inf) and log decays below -60 count as e^-60, as the torch
    form's clamp does, and get a zero gradient; the others get the torch form's."""
    from recdsl.backends import chunk_kernels, triton_chunk

    (q,), k, v, log_decay, initial = _problem(True, 0.5, keys=16, values=16, steps=20)
    log_decay = log_decay.clone()
    log_decay[0, 3, 2] = float("-inf")
    log_decay[0, 7, 5] = -75.0
    output_weights = [torch.randn(1, 20, 16, dtype=torch.float64)]
    got = _gradients(triton_chunk.decayed_outer_products, [q], k, v, log_decay, initial, 16, output_weights, None)
    expected = _gradients(chunk_kernels.decayed_outer_products, [q], k, v, log_decay, initial, 16, output_weights, None)
    assert got["log decay"][0, 3, 2].item() == 0.0 and got["log decay"][0, 7, 5].item() == 0.0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"gradient of {name}: {m}")


def test_backward_runs_in_triton_kernels_not_torch_autograd(monkeypatch):
    """The backward launches walk_state_grads, chunk_key_grads and chunk_value_grads and never
    recomputes the torch chunked form."""
    from recdsl.backends import chunk_kernels, triton_chunk
    from recdsl.backends.triton_launch import observe_launches

    (q,), k, v, log_decay, initial = _problem(True, 0.05, keys=16, values=16, steps=16)
    leaves = [t.requires_grad_() for t in (q, k, v, log_decay, initial)]

    def refuse(*args, **kwargs):
        raise AssertionError("the backward recomputed the torch chunked form")

    (out,), final = triton_chunk.decayed_outer_products([q], [chunk_kernels.RankOneInput(k, v)], log_decay, initial, 64)
    monkeypatch.setattr(chunk_kernels, "decayed_outer_products", refuse)
    with observe_launches() as launches:
        torch.autograd.grad(out.sum() + final.sum(), leaves)
    assert [launch.name for launch in launches] == ["walk_state_grads", "chunk_key_grads", "chunk_value_grads"]


@pytest.mark.parametrize("dtype, allow_tf32, precision", [
    (torch.float32, False, "ieee"),
    (torch.float32, True, "tf32"),
    (torch.float64, True, "ieee"),
])
def test_matmuls_are_exact_unless_tf32_is_asked_for(dtype, allow_tf32, precision):
    from recdsl.backends import chunk_kernels, triton_chunk
    from recdsl.backends.triton_aot import record_launches

    # Two read-outs: the second is read out by chunk_outputs from the states the walk kept.
    qs, k, v, log_decay, initial = _problem(True, 0.05, keys=16, values=16, steps=16, dtype=dtype, readouts=2)
    leaves = [t.requires_grad_() for t in (*qs, k, v, log_decay, initial)]

    def forward_and_backward():
        (out, other), final = triton_chunk.decayed_outer_products(qs, [chunk_kernels.RankOneInput(k, v)], log_decay, initial, 64, allow_tf32=allow_tf32)
        torch.autograd.grad(out.sum() + other.sum() + final.sum(), leaves)

    launches = record_launches(forward_and_backward)
    with_dots = [launch for launch in launches if "PRECISION" in launch.meta]
    assert {launch.name for launch in with_dots} == {"walk_outputs", "chunk_outputs", "walk_state_grads", "chunk_key_grads", "chunk_value_grads"}
    assert {launch.meta["PRECISION"] for launch in with_dots} == {precision}


# ---- whole cells against the sequential reference --------------------------------------------


# mLSTM's stabiliser and normaliser are generated scans too: its longest cases take the most
# interpreter time, so they run with the slow tests.
SLOW_MLSTM = pytest.param("mlstm", marks=pytest.mark.slow)


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("length, heads, with_state", [(1, (2,), True), (70, (2,), True)], ids=["T=1, heads, state", "T=70, heads, state"])
def test_cells_match_sequential_in_float64(name, length, heads, with_state):
    """Outputs, final states (return_state) and every gradient (inputs, params, initial state) in
    float64 at the default tolerances (rtol 1e-6, atol 1e-8): one step; two chunks of 64, the
    second ragged, with a head dim; three chunks from the declared initial state."""
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **CELLS[name]).double()
    inputs, state = random_inputs(module, Example(batch=2, length=length, heads=heads, seed=length, with_state=with_state))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=length)
    assert not mismatches, "\n".join(map(str, mismatches))


@pytest.mark.parametrize("name", ["gla", "mamba2", "retnet", SLOW_MLSTM])
def test_cells_match_sequential_over_three_chunks(name):
    """130 steps from the declared initial state (three chunks of 64, the last ragged), float64."""
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **CELLS[name]).double()
    inputs, state = random_inputs(module, Example(batch=2, length=130, heads=(), seed=130, with_state=False))
    mismatches = compare_backends(module, ["triton"], inputs, state, seed=130)
    assert not mismatches, "\n".join(map(str, mismatches))


def _relative_errors(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per quantity: the largest difference over the reference's largest magnitude (at least 1e-3:
    mLSTM's initial memory gets a zero gradient from m_0 = -inf, and e^-60 times something from
    the chunked forms, whose log decays are floored at -60)."""
    errors = {}
    for quantity, reference in expected.items():
        assert quantity in actual, f"{quantity} missing"
        value, reference = actual[quantity].detach().double(), reference.detach()
        errors[quantity] = float((value - reference).abs().max() / reference.abs().max().clamp(min=1e-3))
    return errors


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cells_in_float32_match_the_float64_sequential_reference(name):
    """The Triton backend in float32 (exact float32 products) against the sequential loop in
    float64, 70 steps with heads and an initial state: every quantity within 1e-4 of its scale,
    except a param's gradient summed over every step (Mamba-2's A_log: one number from B T H
    terms of both signs, where float32 cancels; the float32 loop itself is 7e-6 off, the torch
    chunked form 1e-4), within 2e-3."""
    module = recdsl.compile(EXAMPLES / f"{name}.rec", **CELLS[name])
    inputs, state = random_inputs(module, Example(batch=1, length=70, heads=(2,), seed=3, with_state=True))
    reference = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **CELLS[name]).double()
    reference.load_state_dict(module.state_dict())
    triton_module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **CELLS[name])
    triton_module.load_state_dict(module.state_dict())
    expected = _run(reference, inputs, state, seed=3)
    actual = _run(triton_module, {n: v.float() for n, v in inputs.items()}, {n: v.float() for n, v in state.items()}, seed=3)
    errors = _relative_errors(expected, actual)
    too_far = {q: e for q, e in errors.items() if e >= (2e-3 if q.startswith("gradient of param") else 1e-4)}
    assert not too_far, errors


@pytest.mark.parametrize("name", ["gla", "mamba2", "retnet", SLOW_MLSTM])
def test_bfloat16_inputs_match_a_float32_run(name):
    """bfloat16 inputs and params against the same (bfloat16-rounded) values in float32: the
    chunked kernels accumulate in float32, so every quantity is within 3e-2 of its scale (bfloat16
    keeps 8 bits of mantissa; the outputs are rounded to bfloat16 once)."""
    module = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **CELLS[name])
    inputs, state = random_inputs(module, Example(batch=1, length=70, heads=(2,), seed=4, with_state=True))
    inputs = {n: v.to(torch.bfloat16) for n, v in inputs.items()}
    float32 = recdsl.compile(EXAMPLES / f"{name}.rec", backend="triton", **CELLS[name])
    float32.load_state_dict(module.to(torch.bfloat16).state_dict())
    float32 = float32.float()
    expected = _run(float32, {n: v.float() for n, v in inputs.items()}, {n: v.float() for n, v in state.items()}, seed=4)
    actual = _run(module, inputs, {n: v.float() for n, v in state.items()}, seed=4)
    expected = {quantity: value.double() for quantity, value in expected.items()}
    errors = _relative_errors(expected, actual)
    assert max(errors.values()) < 3e-2, errors


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_bfloat16_operands_accumulate_in_float32(rows):
    """bfloat16 keys, values, queries and log decays go to tl.dot as bfloat16 (fp32 accumulation;
    in the interpreter, rounded to bfloat16 and multiplied in float32): the read-outs, the final
    state and every gradient within 3e-2 of their scale of a float32 run on the same
    (bfloat16-rounded) values, the gradients in the inputs' dtype."""
    from recdsl.backends import chunk_kernels, triton_chunk

    qs, k, v, log_decay, initial = _problem(rows, 0.1, keys=40, values=24, steps=70, dtype=torch.float32, batch=2)
    rounded = [t.to(torch.bfloat16) for t in (*qs, k, v, log_decay)]
    generator = torch.Generator().manual_seed(5)
    output_weights = [torch.randn(2, 70, 24, generator=generator)]
    final_weights = torch.randn(2, 40, 24, generator=generator)

    def run(q, k, v, log_decay):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, log_decay, initial)]
        (out,), final = triton_chunk.decayed_outer_products([leaves[0]], [chunk_kernels.RankOneInput(leaves[1], leaves[2])], leaves[3], leaves[4], 32)
        grads = torch.autograd.grad((out.float() * output_weights[0]).sum() + (final.float() * final_weights).sum(), leaves)
        return dict(zip(["output", "final state", "gradient of q", "gradient of k", "gradient of v", "gradient of log decay", "gradient of initial state"], (out, final, *grads)))

    expected = run(*(t.float() for t in rounded))
    actual = run(*rounded)
    assert [actual[f"gradient of {n}"].dtype for n in ("q", "k", "v", "log decay")] == [torch.bfloat16] * 4
    errors = _relative_errors({n: t.double() for n, t in expected.items()}, actual)
    assert max(errors.values()) < 3e-2, errors


# ---- the fused forward (walk_outputs): reused slots, the skip term, infinite queries ------------


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
@pytest.mark.parametrize("steps, chunk", [(70, 16), (1, 64), (64, 16)], ids=["five chunks, the last ragged", "T=1", "four whole chunks"])
def test_walk_without_a_backward_reuses_two_slots_and_matches_the_kept_walk(rows, steps, chunk):
    """:func:`forward` (no backward: the walk passes the state between chunks through two reused
    slots) and the autograd function (every chunk-start state kept) give the torch chunked form's
    read-outs and final state, from an initial state, over several chunks, three value blocks
    (dv = 70 in blocks of 32) and five key blocks (dk = 80 in blocks of 16), float64 to 1e-10."""
    from recdsl.backends import chunk_kernels, triton_chunk

    (q,), k, v, log_decay, initial = _problem(rows, 0.3, steps=steps, batch=2)
    (expected,), expected_final = chunk_kernels.decayed_outer_products([q], [chunk_kernels.RankOneInput(k, v)], log_decay, initial, chunk)
    (reused,), reused_final = triton_chunk.forward([q], k, v, log_decay, initial, chunk)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    (kept,), kept_final = triton_chunk.decayed_outer_products([leaves[0]], [chunk_kernels.RankOneInput(leaves[1], leaves[2])], log_decay, initial, chunk)
    for name, got, want in (("read-outs, two slots", reused, expected), ("final state, two slots", reused_final, expected_final), ("read-outs, kept", kept, expected), ("final state, kept", kept_final, expected_final)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, name=name: f"{name}: {m}")


def _skip_gradients(kernel, q, k, v, scale, skip, log_decay, initial, chunk, weights, final_weights):
    """Gradients of ``sum(w * out) + sum(w' * final)`` for the read-out ``q @ S + skip v`` with values
    ``scale v``: the torch form gets the scaled values and the skip term added in torch."""
    from recdsl.backends import chunk_kernels, triton_chunk

    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, scale, skip, log_decay, initial)]
    lq, lk, lv, lc, ls, lg, l0 = leaves
    if kernel is triton_chunk.decayed_outer_products:
        (out,), final = kernel([lq], [chunk_kernels.RankOneInput(lk, lv)], lg, l0, chunk, value_scales=[lc], skip=ls)
    else:
        (out,), final = kernel([lq], [chunk_kernels.RankOneInput(lk, lv * lc.unsqueeze(-1))], lg, l0, chunk)
        out = out + ls.unsqueeze(-1) * lv
    loss = (out * weights).sum() + (final * final_weights).sum()
    names = ["q", "k", "v", "value scale", "skip", "log decay", "initial state"]
    return {"read-outs": out.detach(), "final state": final.detach(), **{f"gradient of {n}": g for n, g in zip(names, torch.autograd.grad(loss, leaves))}}


@pytest.mark.parametrize("rows", [True, False], ids=["decay per row", "scalar decay"])
def test_skip_term_and_its_gradients_in_the_kernels(rows):
    """Mamba-2's ``y = C @ h + D x`` with values ``dt x``: the kernels add ``skip_t x_t`` to the read-out
    (walk_outputs) and give dx its ``skip_t dy_t`` and dskip its ``dy_t . x_t`` (chunk_value_grads),
    against the torch form with the term in torch: outputs, final state and every gradient in
    float64 to 1e-9; 70 steps in chunks of 32, dk = 40, dv = 70 (several key and value blocks)."""
    from recdsl.backends import chunk_kernels, triton_chunk

    (q,), k, v, log_decay, initial = _problem(rows, 0.3, keys=40, values=70, steps=70, batch=2)
    generator = torch.Generator().manual_seed(7)
    scale = torch.rand(2, 70, generator=generator, dtype=torch.float64)
    skip = torch.randn(2, 70, generator=generator, dtype=torch.float64)
    weights = torch.randn(2, 70, 70, generator=generator, dtype=torch.float64)
    final_weights = torch.randn(2, 40, 70, generator=generator, dtype=torch.float64)
    arguments = (q, k, v, scale, skip, log_decay, initial, 32, weights, final_weights)
    got = _skip_gradients(triton_chunk.decayed_outer_products, *arguments)
    expected = _skip_gradients(chunk_kernels.decayed_outer_products, *arguments)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")


def test_mamba2_plan_adds_its_skip_term_in_the_kernels():
    """The Triton plan of Mamba-2 takes ``D * x`` beside ``C @ h`` as the chunk plan's skip term (the
    kernels add it; its first read-out is the sum's node); GLA's plan has none."""
    from recdsl import ir

    mamba2 = recdsl.compile(EXAMPLES / "mamba2.rec", backend="triton", **CELLS["mamba2"])
    (chunk,) = [step.chunk for step in mamba2.plan.steps if step.chunk is not None]
    assert chunk.skip is not None and chunk.skip.scale == ir.Ref(ir.RefKind.PARAM, "D", chunk.skip.scale.type)
    assert isinstance(chunk.readouts[0], ir.Op) and chunk.readouts[0].op == "add"
    assert "plus D * x in the first read-out, added in the kernels" in mamba2.plan.format()
    gla = recdsl.compile(EXAMPLES / "gla.rec", backend="triton", **CELLS["gla"])
    assert all(step.chunk.skip is None for step in gla.plan.steps if step.chunk is not None)


def test_infinite_queries_found_by_the_walk_give_the_loops_infinities():
    """A query of +inf: the walk's sum of the queries is not finite, so the call is run again with
    the infinite directions split out (chunk_kernels.with_infinite_readouts); finite queries run
    the walk once.  Same infinities and values as the torch form split the same way."""
    from recdsl.backends import chunk_kernels, triton_chunk
    from recdsl.backends.triton_launch import observe_launches

    (q,), k, v, log_decay, initial = _problem(True, 0.3, keys=16, values=16, steps=20)
    inputs = [chunk_kernels.RankOneInput(k, v)]
    with observe_launches() as launches:
        triton_chunk.decayed_outer_products([q], inputs, log_decay, initial, 16, infinite_readouts=True)
    assert [launch.name for launch in launches] == ["walk_outputs"]
    q = q.clone()
    q[0, 5, 3] = float("inf")
    (got,), final = triton_chunk.decayed_outer_products([q], inputs, log_decay, initial, 16, infinite_readouts=True)
    (expected,), expected_final = chunk_kernels.with_infinite_readouts(chunk_kernels.decayed_outer_products, [q], inputs, log_decay, initial, 16)
    assert torch.isinf(got[0, 5]).any() and torch.equal(torch.isinf(got), torch.isinf(expected)) and torch.equal(torch.isnan(got), torch.isnan(expected))
    finite = torch.isfinite(expected)
    torch.testing.assert_close(got[finite], expected[finite], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, expected_final, rtol=1e-10, atol=1e-10)


def test_skip_term_of_a_triton_plan_in_the_torch_chunked_form():
    """A Triton plan run by the torch chunked form (``parallel.run`` without the Triton kernels, as
    packed sequences would be): the chunk plan's skip term (Mamba-2's ``D x``) is added in torch,
    and the outputs are the sequential loop's, float64."""
    from recdsl.backends import parallel
    from recdsl.backends.torch_ops import Numerics

    module = recdsl.compile(EXAMPLES / "mamba2.rec", backend="triton", **CELLS["mamba2"]).double()
    reference = recdsl.compile(EXAMPLES / "mamba2.rec", backend="sequential", **CELLS["mamba2"]).double()
    reference.load_state_dict(module.state_dict())
    assert any(step.chunk is not None and step.chunk.skip is not None for step in module.plan.steps)
    inputs, state = random_inputs(module, Example(batch=2, length=70, heads=(), seed=8, with_state=True))
    params = {name: value for name, value in module.named_parameters()}
    consts = {name: value for name, value in module.named_buffers()}
    (got,), final = parallel.run(module.plan, inputs, params, consts, state, Numerics(torch.float64, torch.device("cpu")))
    expected, expected_state = reference(*inputs.values(), state=state, return_state=True)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9, msg=lambda m: f"outputs y = C @ h + D x: {m}")
    torch.testing.assert_close(final["h"], expected_state["h"], rtol=1e-9, atol=1e-9)
