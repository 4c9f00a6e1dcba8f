"""The newton backend against the sequential reference; the Jacobian structure it derives from the IR.

Agreement: outputs, final states and the gradients with respect to inputs, params and the
initial state, to 1e-10 relative in float64 (Hypothesis over batch, T including 1 and odd
lengths, heads and initial states) and 1e-5 relative in float32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import recdsl
from recdsl.backends import get_backend
from recdsl.backends.newton import JacobianMode, JacobianStructure, jacobian_structure
from recdsl.testing import Example, compare_backends, random_inputs

from example_dims import DIMS, EXAMPLES  # noqa: E402  (tests/ is on sys.path)

NEWTON = sorted(n for n in DIMS if get_backend("newton").unsupported(recdsl.compile(EXAMPLES / f"{n}.rec", backend="sequential", **DIMS[n]).analysis) is None)
NONLINEAR = ["gru", "lstm", "paragru", "paralstm", "slstm"]
F64_TOLERANCE = 1e-10
F32_TOLERANCE = 1e-5

# A state per head whose recurrent weights are block-diagonal: n blocks of dh (sLSTM's layout).
BLOCK_RNN = """
cell BlockRNN(n, dh) {
    input x: [n, dh]
    param R: [n, dh, dh] = glorot
    state h: [n, dh] = 0
    h = tanh(x + (h[:, None, :] @ R)[:, 0, :])
    out h
}
"""


def _module(name: str, dtype=torch.float64, **options):
    torch.manual_seed(0)
    return recdsl.compile(EXAMPLES / f"{name}.rec", backend="newton", backend_options=options or None, **DIMS[name]).to(dtype)


def test_newton_runs_the_examples_it_should():
    assert set(NONLINEAR) <= set(NEWTON)
    assert "lru" not in NEWTON and "aaren" not in NEWTON  # a complex state; a declared monoid


def test_refusals_say_why():
    with pytest.raises(recdsl.BackendError, match="scan 'acc' combines a declared monoid"):
        recdsl.compile(EXAMPLES / "aaren.rec", backend="newton", **DIMS["aaren"])
    with pytest.raises(recdsl.BackendError, match="state 'h' is complex"):
        recdsl.compile(EXAMPLES / "lru.rec", backend="newton", **DIMS["lru"])


# ---- the structure of the Jacobian --------------------------------------------------------


@pytest.mark.parametrize(
    "name, structure, block_size",
    [
        ("paragru", JacobianStructure.DIAGONAL, 1),
        ("mingru", JacobianStructure.DIAGONAL, 1),
        ("gla", JacobianStructure.DIAGONAL, 1),  # decay per row: still one element per element
        ("paralstm", JacobianStructure.BLOCK_DIAGONAL, 2),
        ("slstm", JacobianStructure.BLOCK_DIAGONAL, 8),  # c, n, m, h of a head of 2
        ("gru", JacobianStructure.DENSE, 4),
        ("lstm", JacobianStructure.DENSE, 8),
    ],
)
def test_jacobian_structure_from_the_ir(name, structure, block_size):
    plan = jacobian_structure(_module(name).analysis)
    assert plan.structure is structure, plan.describe()
    assert plan.block_size == block_size


def test_paralstm_blocks_pair_each_c_with_its_h():
    plan = jacobian_structure(_module("paralstm").analysis)
    c, h = plan.slots
    assert plan.blocks == tuple((c.offset + i, h.offset + i) for i in range(4))


def test_slstm_blocks_are_its_heads():
    """The recurrent matrices are masked by a block-diagonal const: one block per head."""
    plan = jacobian_structure(recdsl.compile(EXAMPLES / "slstm.rec", backend="newton", d_in=3, heads=3, dh=2).analysis)
    assert plan.structure is JacobianStructure.BLOCK_DIAGONAL and plan.describe() == "block-diagonal (3 blocks of 8)"
    for head, block in enumerate(plan.blocks):
        assert sorted(block) == sorted(slot.offset + 2 * head + i for slot in plan.slots for i in range(2))
    explained = recdsl.explain(EXAMPLES / "slstm.rec", backend="newton", d_in=3, heads=3, dh=2)
    assert "block-diagonal (3 blocks of 8)" in explained


def test_a_const_zero_pattern_is_structural_but_a_param_is_not():
    """Zeros fixed by the program (a const mask) shape the Jacobian; a param's values never do."""
    masked = recdsl.compile(
        "cell C(d) {\n input x: [d]\n param R: [d, d] = zeros\n const mask = eye(d)\n state h: [d] = 0\n h = tanh(x + h @ (R * mask))\n out h\n}",
        backend="newton",
        d=3,
    )
    assert jacobian_structure(masked.analysis).structure is JacobianStructure.DIAGONAL
    unmasked = recdsl.compile("cell C(d) {\n input x: [d]\n param R: [d, d] = zeros\n state h: [d] = 0\n h = tanh(x + h @ R)\n out h\n}", backend="newton", d=3)
    assert jacobian_structure(unmasked.analysis).structure is JacobianStructure.DENSE


def test_block_diagonal_recurrent_weights_give_one_block_per_head():
    module = recdsl.compile(BLOCK_RNN, backend="newton", n=3, dh=2).double()
    plan = jacobian_structure(module.analysis)
    assert plan.structure is JacobianStructure.BLOCK_DIAGONAL
    assert plan.blocks == ((0, 1), (2, 3), (4, 5))
    inputs, state = random_inputs(module, Example(batch=2, length=9, heads=(), seed=3, with_state=True))
    assert not compare_backends(module, ["newton"], inputs, state, seed=3, atol=F64_TOLERANCE, rtol=F64_TOLERANCE)


def test_auto_mode_uses_the_diagonal_of_large_blocks():
    plan = jacobian_structure(recdsl.compile(EXAMPLES / "gru.rec", backend="newton", d_in=2, d=80).analysis)
    assert plan.mode(JacobianMode.AUTO) is JacobianMode.DIAGONAL
    assert plan.mode(JacobianMode.FULL) is JacobianMode.FULL
    assert jacobian_structure(_module("gru").analysis).mode(JacobianMode.AUTO) is JacobianMode.FULL


# ---- agreement with the sequential reference ------------------------------------------------


@pytest.mark.parametrize("name", NEWTON)
def test_property_newton_agrees_with_sequential_float64(name):
    """Hypothesis: batch, T (1, odd, around 8), heads, inputs, initial state; gradients included."""
    module = _module(name)
    examples = 6 if name in NONLINEAR else 2

    @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
    @given(
        batch=st.integers(1, 3),
        length=st.one_of(st.just(1), st.integers(2, 19)),
        heads=st.sampled_from([(), (2,)]),
        seed=st.integers(0, 2**16),
        with_state=st.booleans(),
    )
    def agrees(batch, length, heads, seed, with_state):
        example = Example(batch, length, heads, seed, with_state)
        inputs, state = random_inputs(module, example)
        mismatches = compare_backends(module, ["newton"], inputs, state, seed=seed, atol=F64_TOLERANCE, rtol=F64_TOLERANCE)
        assert not mismatches, f"{example}: " + "; ".join(map(str, mismatches))

    agrees()


def _outputs_and_gradients(module, inputs, state):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    initial = {k: v.detach().clone().requires_grad_() for k, v in state.items()}
    module.zero_grad(set_to_none=True)
    output, final = module(**leaves, state=initial, return_state=True)
    generator = torch.Generator().manual_seed(1)
    loss = (output * torch.randn(output.shape, generator=generator, dtype=output.dtype)).sum()
    loss = loss + sum((final[k] * torch.randn(final[k].shape, generator=generator, dtype=output.dtype)).sum() for k in sorted(final))
    loss.backward()
    found = {"output": output.detach(), **{f"final {k}": v.detach() for k, v in final.items()}}
    found.update({f"gradient of input {k}": v.grad for k, v in leaves.items()})
    found.update({f"gradient of initial {k}": v.grad for k, v in initial.items()})
    found.update({f"gradient of {k}": p.grad.clone() for k, p in module.named_parameters()})
    return found


def _assert_agree(expected, actual, tolerance, name):
    """Each quantity within ``tolerance`` of the reference, relative to the reference's largest entry."""
    for quantity, value in expected.items():
        error = float((actual[quantity] - value).abs().max() / value.abs().max().clamp_min(1e-30))
        assert error <= tolerance, f"{name}: {quantity} differs by {error:.2e} relative (tolerance {tolerance})"


@pytest.mark.parametrize("name", NONLINEAR)
def test_newton_agrees_with_sequential_float32(name):
    torch.manual_seed(0)
    dims = dict(d_in=5, heads=2, dh=3) if name == "slstm" else dict(d_in=5, d=6)
    sequential = recdsl.compile(EXAMPLES / f"{name}.rec", backend="sequential", **dims)
    newton = recdsl.compile(EXAMPLES / f"{name}.rec", backend="newton", **dims)
    newton.load_state_dict(sequential.state_dict())
    generator = torch.Generator().manual_seed(2)
    # sLSTM's iterates overflow in float32 over long horizons (h = o c / n with n near zero
    # in a linearised guess), and then the suffix runs step by step (RESULTS_NEWTON_CPU.md):
    # a short sequence keeps this a test of Newton's method.  Its normaliser is positive in
    # any state a run reaches.
    length = 12 if name == "slstm" else 57
    inputs = {"x": torch.randn(3, length, 5, generator=generator)}
    state = {k: 0.5 * torch.randn(v.shape, generator=generator) for k, v in sequential.initial_state(3).items()}
    if name == "slstm":
        state["n"] = state["n"].abs() + 0.5
    expected, actual = _outputs_and_gradients(sequential, inputs, state), _outputs_and_gradients(newton, inputs, state)
    assert newton.last_solve.converged and newton.last_solve.sequential_steps == 0
    _assert_agree(expected, actual, F32_TOLERANCE, name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_accumulate_in_float32(dtype):
    module = _module("paralstm", torch.float32)
    x = torch.randn(2, 33, 3).to(dtype)
    output = module(x)
    assert output.dtype == dtype
    assert module.last_solve.tolerance == 16 * torch.finfo(torch.float32).eps
    reference = recdsl.compile(EXAMPLES / "paralstm.rec", backend="sequential", **DIMS["paralstm"])
    reference.load_state_dict(module.state_dict())
    torch.testing.assert_close(output, reference(x), rtol=0, atol=2 * torch.finfo(dtype).eps)


def test_state_continues_the_sequence():
    module = _module("paralstm")
    x = torch.randn(2, 21, 3, dtype=torch.float64)
    whole, final = module(x, return_state=True)
    first, middle = module(x[:, :8], return_state=True)
    second, split = module(x[:, 8:], state=middle, return_state=True)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=1e-12, atol=1e-12)
    for name in final:
        torch.testing.assert_close(split[name], final[name], rtol=1e-12, atol=1e-12)


# ---- convergence ----------------------------------------------------------------------------


def test_the_solve_is_reported():
    module = _module("paragru")
    module(torch.randn(2, 40, 3, dtype=torch.float64))
    solve = module.last_solve
    assert solve.converged and 1 <= solve.iterations <= 10 and solve.residual <= solve.tolerance
    assert solve.steps == 40 and solve.structure is JacobianStructure.DIAGONAL and solve.mode is JacobianMode.FULL


def test_affine_cells_converge_in_one_iteration():
    module = _module("mingru")
    module(torch.randn(2, 30, 3, dtype=torch.float64))
    assert module.last_solve.iterations == 1 and module.last_solve.converged


@pytest.mark.parametrize("mode", ["full", "diagonal"])
@pytest.mark.parametrize("budget", [0, 1, 2])
def test_an_exhausted_budget_finishes_the_suffix_step_by_step(budget, mode):
    """Never an unconverged result: steps after the converged prefix run sequentially, still exact.

    With the quasi-Newton diagonal the backward pass iterates too (its adjoint needs the
    exact transposed Jacobian) and sweeps its unconverged steps one by one.
    """
    sequential = recdsl.compile(EXAMPLES / "gru.rec", backend="sequential", **DIMS["gru"]).double()
    options = {"max_iterations": budget, "jacobian": mode}
    newton = recdsl.compile(EXAMPLES / "gru.rec", backend="newton", backend_options=options, **DIMS["gru"]).double()
    newton.load_state_dict(sequential.state_dict())
    inputs, state = random_inputs(newton, Example(batch=2, length=25, heads=(), seed=5, with_state=True))
    _assert_agree(_outputs_and_gradients(sequential, inputs, state), _outputs_and_gradients(newton, inputs, state), F64_TOLERANCE, f"gru ({mode})")
    solve = newton.last_solve
    assert not solve.converged and solve.iterations == budget
    # Newton makes step t exact after t + 1 iterations, so at least `budget` steps were solved.
    assert 0 < solve.sequential_steps <= 25 - budget


def test_quasi_newton_converges_to_the_same_solution_and_gradients():
    exact = _module("gru")
    quasi = _module("gru", jacobian="diagonal")
    inputs, state = random_inputs(exact, Example(batch=2, length=30, heads=(2,), seed=4, with_state=True))
    _assert_agree(_outputs_and_gradients(exact, inputs, state), _outputs_and_gradients(quasi, inputs, state), F64_TOLERANCE, "gru (diagonal)")
    assert quasi.last_solve.mode is JacobianMode.DIAGONAL and quasi.last_solve.converged
    assert quasi.last_solve.iterations >= exact.last_solve.iterations


def test_options_are_checked():
    with pytest.raises(recdsl.BackendError, match="backend 'newton' has no option 'chunk'"):
        recdsl.compile(EXAMPLES / "gru.rec", backend="newton", backend_options={"chunk": 2}, **DIMS["gru"])
    with pytest.raises(recdsl.BackendError, match="backend 'sequential' has no option 'jacobian'"):
        recdsl.compile(EXAMPLES / "gru.rec", backend="sequential", backend_options={"jacobian": "full"}, **DIMS["gru"])
    module = _module("gru", jacobian="sparse")
    with pytest.raises(recdsl.BackendError, match="jacobian='sparse' is not a Jacobian mode"):
        module(torch.randn(1, 3, 3, dtype=torch.float64))


def test_explain_names_the_jacobian_structure():
    text = recdsl.explain(EXAMPLES / "paralstm.rec", backend="newton", d_in=3, d=4)
    assert "backend: newton" in text and "block-diagonal (4 blocks of 2)" in text and "2 x 2 matrices" in text
    wide = recdsl.explain(EXAMPLES / "gru.rec", backend="newton", d_in=2, d=80)
    assert "dense (80 x 80)" in wide and "quasi-Newton" in wide


@pytest.mark.parametrize("mode", ["full", "diagonal"])
def test_dense_blocks_wider_than_one_group_of_tangents(mode):
    """LSTM with d = 6: a 12 x 12 dense block, filled by more than one vmapped group of products."""
    torch.manual_seed(0)
    sequential = recdsl.compile(EXAMPLES / "lstm.rec", backend="sequential", d_in=2, d=6).double()
    newton = recdsl.compile(EXAMPLES / "lstm.rec", backend="newton", backend_options={"jacobian": mode}, d_in=2, d=6).double()
    newton.load_state_dict(sequential.state_dict())
    inputs, state = random_inputs(newton, Example(batch=2, length=23, heads=(), seed=9, with_state=True))
    _assert_agree(_outputs_and_gradients(sequential, inputs, state), _outputs_and_gradients(newton, inputs, state), F64_TOLERANCE, f"lstm ({mode})")
    assert newton.last_solve.converged and newton.last_solve.mode is JacobianMode(mode)


@pytest.mark.parametrize("block", [1, 2, 6])
@pytest.mark.parametrize("steps", [1, 16, 17, 300])
def test_block_linear_scan_equals_the_matrix_scan(block, steps):
    """The chunked scan of small matrices (planar for blocks up to 4, matmuls beyond) against recursive doubling."""
    from recdsl.backends.scans import block_linear_scan, matrix_affine_scan

    generator = torch.Generator().manual_seed(steps + block)
    transition = 0.4 / block**0.5 * torch.randn(steps, 2, 3, block, block, generator=generator, dtype=torch.float64)  # spectral radius below 1
    value = torch.randn(steps, 2, 3, block, generator=generator, dtype=torch.float64)
    expected = matrix_affine_scan(transition, value.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(block_linear_scan(transition, value), expected, rtol=1e-12, atol=1e-12)
