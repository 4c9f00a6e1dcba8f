"""The op registry: every row has every form a backend claims, and the forms agree with each other.

Adding an op is one row in recdsl/ops.py; these tests fail when that row lacks a torch form,
a Triton form for an elementwise op (which would silently lose kernel fusion), or when
its forms, its constant folding and its declared laws disagree.
"""

from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch

from recdsl import ir
from recdsl.backends import torch_ops
from recdsl.ops import FUSED, OPS, Category, Law
from recdsl.shapes import RuleViolation, result_type

ELEMENTWISE = sorted(name for name, spec in OPS.items() if spec.category is Category.ELEMENTWISE)
# Operands where every elementwise op is defined and smooth (log, sqrt, pow of a positive base).
POSITIVE_OPERANDS = [0.3, 0.7, 1.9, 2.6, 0.05]
# Ops defined everywhere whose forms differ by the operand's sign (also checked on mixed signs).
MIXED_SIGNS = ["sign", "clamp", "abs", "relu"]


def test_every_op_has_a_torch_form():
    for name, spec in OPS.items():
        if spec.category in (Category.ELEMENTWISE, Category.REDUCTION):
            assert spec.torch is not None, f"{name}: no torch form in its registry row"
            assert callable(torch_ops.resolve_torch_form(spec.torch)), f"{name}: torch form {spec.torch} does not resolve"
        else:
            assert name in torch_ops.STRUCTURAL_FORMS, f"{name}: no hand-written torch form in Evaluator.apply"


def test_every_elementwise_op_has_a_triton_form():
    """The Triton emitter fuses exactly the ops with a Triton form; an elementwise op without one would become a leaf."""
    missing = [name for name in ELEMENTWISE if OPS[name].triton is None]
    assert not missing, f"elementwise ops without a Triton form: {missing}"
    from recdsl.backends.triton_codegen import FUSED_OPS

    assert FUSED_OPS == FUSED == frozenset(ELEMENTWISE)


def test_every_op_has_a_shape_rule():
    vector = ir.Type((3,))
    matrix = ir.Type((3, 3))
    boolean = ir.Type((3,), ir.Kind.BOOL)
    for name, spec in OPS.items():
        if spec.category is Category.CONSTANT:
            args, attrs = [], (3,)
        elif spec.category is Category.REDUCTION or name == "softmax":
            args, attrs = [matrix], (0,)
        elif name in ("index", "transpose", "reshape"):
            args, attrs = [matrix], {"index": (0,), "transpose": (0, 1), "reshape": (9,)}[name]
        elif name in ("concat", "stack"):
            args, attrs = [matrix, matrix], (1,)
        elif name == "where":
            args, attrs = [boolean, vector, vector], ()
        else:
            args, attrs = [matrix if name in ("matmul", "diag") else vector] * spec.min_args, ()
        result = result_type(name, args, attrs)
        assert isinstance(result, ir.Type), name


def test_the_shape_rule_rejects_what_numpy_rejects():
    with pytest.raises(RuleViolation, match="do not broadcast"):
        result_type("add", [ir.Type((3,)), ir.Type((4,))])
    with pytest.raises(RuleViolation, match="inner dims differ"):
        result_type("matmul", [ir.Type((3, 4)), ir.Type((3,))])
    with pytest.raises(RuleViolation, match="needs real operands"):
        result_type("sigmoid", [ir.Type((3,), ir.Kind.COMPLEX)])
    with pytest.raises(RuleViolation, match="holds 6 elements and \\[4\\] holds 4"):
        result_type("reshape", [ir.Type((2, 3))], (4,))
    with pytest.raises(RuleViolation, match="differ outside axis 0"):
        result_type("concat", [ir.Type((2, 3)), ir.Type((2, 4))], (0,))
    with pytest.raises(RuleViolation, match="operand 2 has shape \\[3, 2\\]"):
        result_type("stack", [ir.Type((2, 3)), ir.Type((3, 2))], (0,))


def test_the_new_shape_rules_agree_with_torch():
    """transpose, reshape (with -1), concat, stack and reductions over several axes: the rule's shape is torch's."""
    x = torch.zeros(2, 3, 4)
    cases = [
        ("transpose", [x], (0, 2), x.transpose(0, 2)),
        ("reshape", [x], (4, -1), x.reshape(4, -1)),
        ("concat", [x, torch.zeros(2, 5, 4)], (1,), torch.cat([x, torch.zeros(2, 5, 4)], 1)),
        ("stack", [x, x, x], (3,), torch.stack([x, x, x], 3)),
        ("sum", [x], ((0, 2),), x.sum((0, 2))),
        ("amax", [x], (None,), x.amax((0, 1, 2))),
        ("softmax", [x], ((1, 2),), x),
        ("norm", [x], (1,), torch.linalg.vector_norm(x, dim=1)),
    ]
    for name, values, attrs, expected in cases:
        result = result_type(name, [ir.Type(tuple(v.shape)) for v in values], attrs)
        assert result.shape == tuple(expected.shape), name


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if OPS[n].fold is not None])
def test_constant_folding_agrees_with_the_torch_form(name):
    spec = OPS[name]
    function = torch_ops.resolve_torch_form(spec.torch)
    for first in POSITIVE_OPERANDS:
        operands = [first, 0.4, 1.3][: spec.min_args]
        if name == "where":
            operands = [first > 1, 0.4, 1.3]
        folded = spec.fold(*operands)
        tensors = [torch.tensor(o, dtype=torch.bool if isinstance(o, bool) else torch.float64) for o in operands]
        expected = function(*tensors)
        assert math.isclose(float(folded), float(expected), rel_tol=1e-12, abs_tol=1e-12), f"{name}{tuple(operands)}: fold {folded}, torch {float(expected)}"


@pytest.mark.parametrize("name", sorted(n for n, s in OPS.items() if Law.ASSOCIATIVE in s.laws and s.category is Category.ELEMENTWISE))
def test_declared_associativity_and_commutativity_hold(name):
    spec = OPS[name]
    function = torch_ops.resolve_torch_form(spec.torch)
    generator = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(64, generator=generator, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(function(function(a, b), c), function(a, function(b, c)), rtol=1e-12, atol=1e-12)
    if Law.COMMUTATIVE in spec.laws:
        torch.testing.assert_close(function(a, b), function(b, a), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(n for n, s in OPS.items() if Law.POSITIVE in s.laws))
def test_declared_positivity_holds(name):
    function = torch_ops.resolve_torch_form(OPS[name].torch)
    points = torch.linspace(-30, 30, 301, dtype=torch.float64)
    values = function(points) if OPS[name].category is Category.ELEMENTWISE else function(points, (-1,))
    assert bool((values > 0).all()), name


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_every_triton_form_agrees_with_the_torch_form(tmp_path, monkeypatch):
    """One generated kernel evaluates every elementwise op's Triton expression; the interpreter runs it against torch."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("RECDSL_CACHE_DIR", str(tmp_path))
    from recdsl.backends.triton_codegen import IndentedBuffer
    from recdsl.backends.triton_backend import load_generated

    real = [n for n in ELEMENTWISE if OPS[n].returns.value != "bool"]
    buffer = IndentedBuffer()
    buffer.line("import triton")
    buffer.line("import triton.language as tl")
    buffer.line("")
    buffer.line("")
    buffer.line("@triton.jit")
    buffer.line("def _logaddexp(a, b):")
    with buffer.indent():
        buffer.line("m = tl.maximum(a, b)")
        buffer.line("return m + tl.log(tl.exp(a - m) + tl.exp(b - m))")
    buffer.line("")
    buffer.line("")
    buffer.line("@triton.jit")
    buffer.line("def every_op(p_x, p_y, p_z, p_c, p_out, N: tl.constexpr):")
    with buffer.indent():
        buffer.line("o = tl.arange(0, N)")
        buffer.line("x = tl.load(p_x + o)")
        buffer.line("y = tl.load(p_y + o)")
        buffer.line("z = tl.load(p_z + o)")
        buffer.line("c = tl.load(p_c + o) > 0.5")
        for i, name in enumerate(real):
            operands = {"where": ["c", "x", "y"]}.get(name, ["x", "y", "z"][: OPS[name].min_args])
            buffer.line(f"tl.store(p_out + {i} * N + o, {OPS[name].triton.format(*operands)})")
        for i, name in enumerate(MIXED_SIGNS):
            operands = ["(x - 1.0)", "y - 1.5", "z"][: OPS[name].min_args]
            buffer.line(f"tl.store(p_out + {len(real) + i} * N + o, {OPS[name].triton.format(*operands)})")
    module = load_generated(buffer.text())
    size = 16
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(size, generator=generator, dtype=torch.float64) * 2 + 0.1
    y = torch.rand(size, generator=generator, dtype=torch.float64) * 2 + 0.1
    z = torch.rand(size, generator=generator, dtype=torch.float64) * 2 + 0.1
    x[0] = 1.0  # x - 1 below takes sign's three cases and clamp's values below, inside and above its bounds
    c = torch.rand(size, generator=generator, dtype=torch.float64)
    out = torch.empty(len(real) + len(MIXED_SIGNS), size, dtype=torch.float64)
    module.every_op[(1,)](x, y, z, c, out, N=size)
    for i, name in enumerate(real):
        function = torch_ops.resolve_torch_form(OPS[name].torch)
        operands = {"where": [c > 0.5, x, y]}.get(name, [x, y, z][: OPS[name].min_args])
        torch.testing.assert_close(out[i], function(*operands).to(torch.float64), rtol=1e-9, atol=1e-12, msg=f"{name}: Triton form {OPS[name].triton}")
    for i, name in enumerate(MIXED_SIGNS):
        function = torch_ops.resolve_torch_form(OPS[name].torch)
        expected = function(*[x - 1.0, y - 1.5, z][: OPS[name].min_args])
        torch.testing.assert_close(out[len(real) + i], expected, rtol=1e-9, atol=1e-12, msg=f"{name} on mixed signs: Triton form {OPS[name].triton}")
    assert os.environ["TRITON_INTERPRET"] == "1"


def test_every_op_triton_fuses_has_its_derivative_rule():
    """The Triton scan kernels' backward differentiates the gate math by these rules (and the
    fused C loop and fused Triton kernel print the same rules): an op the kernels fuse must
    have one rule per operand, and a complex form where the emitter fuses complex operands."""
    from recdsl.ops import DERIVATIVES_COMPLEX

    for name in sorted(FUSED):
        rules = OPS[name].derivative
        assert rules is not None, f"{name}: fused into Triton kernels but its registry row has no derivative rule"
        assert len(rules) == OPS[name].max_args, f"{name}: {len(rules)} derivative rules for {OPS[name].max_args} operands"
    # Complex operands: the holomorphic ops use the real rule at conjugated values; these are not holomorphic.
    assert set(DERIVATIVES_COMPLEX) == {"conj", "real", "imag", "abs"}


@pytest.mark.parametrize("name", [n for n in ELEMENTWISE if OPS[n].derivative is not None and any(OPS[n].derivative)])
def test_derivative_rules_agree_with_torch_autograd(name):
    """Each operand's share, evaluated by the registry's folds, against torch.autograd of the torch form (float64)."""
    spec = OPS[name]
    form = torch_ops.resolve_torch_form(spec.torch)
    points = [POSITIVE_OPERANDS[i:] + POSITIVE_OPERANDS[:i] for i in range(spec.max_args)]
    if name in MIXED_SIGNS or name in ("maximum", "minimum", "where"):
        points = [[-1.3, 0.4, 2.2, -0.2, 0.7], [0.5, 0.4, -2.0, 1.1, 0.9], [1.0, -0.5, 3.0, 0.6, -0.1]][: spec.max_args]
    for k in range(len(points[0])):
        values = [p[k] for p in points]
        tensors = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in values]
        if name == "where":
            tensors[0] = torch.tensor(values[0] > 0)
            values[0] = values[0] > 0
        result = form(*tensors)
        adjoint = 0.7
        wanted = [t for t in tensors if t.requires_grad]
        expected = torch.autograd.grad(result, wanted, torch.tensor(adjoint, dtype=torch.float64), allow_unused=True)
        expected_iter = iter(expected)
        for position, (rule, tensor) in enumerate(zip(spec.derivative, tensors)):
            torch_value = next(expected_iter) if tensor.requires_grad else None
            if rule is None:
                assert torch_value is None or float(torch_value) == 0.0, f"{name}: operand {position} has no rule but torch gives {torch_value}"
                continue
            got = rule.evaluate(values, float(result.detach()), adjoint)
            want = 0.0 if torch_value is None else float(torch_value)
            assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12), f"{name} operand {position} at {values}: rule gives {got}, torch {want}"
