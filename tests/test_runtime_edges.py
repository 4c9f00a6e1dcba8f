"""The edges of compile and of a call: element budgets, consts, devices, state dtypes, dims named
like compile's keywords.  Each test reproduces a defect of issue 8 (items 6, 8, 9, 13)."""

from __future__ import annotations

import inspect

import pytest
import torch

import recdsl
from recdsl.checker import API_KEYWORDS
from recdsl.limits import DEFAULT_MAX_ELEMENTS

from example_dims import EXAMPLES  # noqa: E402  (tests/ is on sys.path)

INTERNALS = ("Traceback", "site-packages", "recdsl/", "lark")


@pytest.fixture(autouse=True)
def default_budget(monkeypatch):
    monkeypatch.delenv("RECDSL_MAX_ELEMENTS", raising=False)


# ---- sizes (item 6) -------------------------------------------------------------------


def test_huge_dim_is_a_located_error_before_anything_is_allocated():
    """hgrn with d_in=10**9 tried to allocate 16 GB at compile."""
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(EXAMPLES / "hgrn.rec", d_in=10**9, d=4)
    assert str(info.value) == (
        f"{EXAMPLES / 'hgrn.rec'}:17:5: dimension error: input 'x' (one step) has shape [1000000000]: 1_000_000_000 elements, "
        "more than the budget of 268_435_456\n"
        "  17 |     input x: [d_in]\n"
        "           ^~~~~~~~~~~~~~~\n"
        "  expected smaller dims, or a larger budget: compile(..., max_elements=N) or RECDSL_MAX_ELEMENTS=N"
    )


def test_dim_near_2_to_the_62_is_a_located_error_not_a_storage_overflow():
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=2**62)
    assert info.value.line == 14 and "param 'W_z' has shape [3, 4611686018427387904]" in str(info.value)


@pytest.mark.parametrize(
    "declaration, what",
    [
        ("param W: [n, n] = zeros", "param 'W' has shape [100, 100]"),
        ("const big = arange(n * n)", "const 'big' has shape [10000]"),
        ("state s: [n, n] = 0\n    s = s + 1", "state 's' (per batch element) has shape [100, 100]"),
        ("input y: [n, n]", "input 'y' (one step) has shape [100, 100]"),
        ("b = outer(x, x)", "binding 'b' (one step) has shape [100, 100]"),
    ],
    ids=["param", "const", "state", "input", "binding"],
)
def test_every_kind_of_tensor_is_held_to_the_budget(declaration, what):
    source = f"cell C(n) {{\n    input x: [n]\n    {declaration}\n    out x\n}}\n"
    recdsl.compile(source, n=100)  # 10_000 elements: within the default budget
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(source, n=100, max_elements=9_999)
    message = str(info.value)
    assert message.startswith(f"<string>:3:5: dimension error: {what}: 10_000 elements, more than the budget of 9_999")
    assert info.value.line == 3 and "^" in message


def test_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("RECDSL_MAX_ELEMENTS", "10")
    with pytest.raises(recdsl.DimensionError, match="budget of 10$|budget of 10\n"):
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4)
    assert recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4, max_elements=12).backend == "scan"
    monkeypatch.setenv("RECDSL_MAX_ELEMENTS", "-3")
    with pytest.raises(recdsl.DimensionError, match="RECDSL_MAX_ELEMENTS is '-3'"):
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "100"])
def test_max_elements_must_be_a_positive_int(bad):
    with pytest.raises(recdsl.DimensionError, match="max_elements must be a positive int"):
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4, max_elements=bad)


def test_default_budget_is_documented():
    from recdsl import limits

    assert DEFAULT_MAX_ELEMENTS == 2**28 and "2 ** 28" in (recdsl.compile.__doc__ or "")
    assert "RECDSL_MAX_ELEMENTS" in (limits.__doc__ or "")


BIG_CONST = """
cell C(d) {
    input x: [d]
    const big = arange(10000000)
    const scale = arange(d) + 1
    const twice = 2 * scale
    state h: [d] = 0
    h = 0.5 * h + x * twice
    out h
}
"""


def test_consts_are_evaluated_once_per_dtype_and_device_and_only_when_used(monkeypatch):
    """`const big = arange(10**8)` was evaluated twice on every forward, though nothing reads it."""
    from recdsl.backends import torch_ops

    const_values = {const.value: const.name for const in recdsl.load(BIG_CONST, dims={"d": 3}).consts}
    evaluated: list[str] = []
    original = torch_ops.Evaluator.evaluate

    def counting(self, expr, *args, **kwargs):
        if expr in const_values:
            evaluated.append(const_values[expr])
        return original(self, expr, *args, **kwargs)

    monkeypatch.setattr(torch_ops.Evaluator, "evaluate", counting)
    module = recdsl.compile(BIG_CONST, d=3)
    x = torch.randn(2, 4, 3)
    for _ in range(3):
        y = module(x)
    assert evaluated == ["scale", "twice"], f"consts evaluated: {evaluated}"
    module.double()(x.double())
    module.double()(x.double())
    assert evaluated == ["scale", "twice"] * 2, "once more for float64, not again after"
    # The result reads the const through another const.
    h = torch.zeros(2, 3)
    for t in range(4):
        h = 0.5 * h + x[:, t] * 2 * torch.arange(1.0, 4.0)
    expected = h
    torch.testing.assert_close(y[:, -1], expected)


def test_used_consts_follow_references_through_consts():
    cell = recdsl.load(BIG_CONST, dims={"d": 3})
    assert [c.name for c in cell.used_consts()] == ["scale", "twice"]


def test_cached_consts_are_not_pickled_and_serve_autograd_after_inference_mode():
    import pickle

    module = recdsl.compile(BIG_CONST, d=3)
    with torch.inference_mode():
        module(torch.randn(1, 2, 3))
    x = torch.randn(1, 2, 3, requires_grad=True)
    module(x).sum().backward()  # consts made under inference_mode could not be saved for backward
    assert x.grad is not None
    assert "_const_values" not in pickle.loads(pickle.dumps(module)).__dict__


# ---- devices (item 8) -----------------------------------------------------------------

GLA_DIMS = dict(dk=3, dv=2)


def _gla_inputs(device_of=lambda name: "cpu"):
    shapes = {"q": (2, 4, 3), "k": (2, 4, 3), "v": (2, 4, 2), "g": (2, 4, 3)}
    return {name: torch.randn(shape, device=device_of(name)) for name, shape in shapes.items()}


def _input_error(module, inputs, **kwargs) -> str:
    with pytest.raises(recdsl.InputError) as info:
        module(**inputs, **kwargs)
    message = str(info.value)
    for internal in INTERNALS:
        assert internal not in message
    return message


def test_meta_input_is_an_input_error():
    module = recdsl.compile(EXAMPLES / "gla.rec", **GLA_DIMS)
    message = _input_error(module, _gla_inputs(lambda name: "meta" if name == "k" else "cpu"))
    assert message == "input error: input 'k' is on the meta device, which holds no values\n  expected a tensor with values (on cpu, cuda, ...)"


def test_meta_params_are_an_input_error():
    module = recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4).to("meta")
    message = _input_error(module, {"x": torch.randn(2, 3, 3)})
    assert message == "input error: param 'W_z' is on meta but the inputs are on cpu\n  expected module.to('cpu') (params and inputs on one device)"


def test_meta_state_is_an_input_error():
    module = recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4)
    message = _input_error(module, {"x": torch.randn(2, 3, 3)}, state={"h": torch.zeros(2, 4, device="meta")})
    assert message == "input error: state 'h' is on meta but the inputs are on cpu\n  expected every input, state and param on one device"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device kind (CUDA)")
def test_inputs_on_two_devices_are_an_input_error():
    module = recdsl.compile(EXAMPLES / "gla.rec", **GLA_DIMS)
    message = _input_error(module, _gla_inputs(lambda name: "cuda" if name == "v" else "cpu"))
    assert message.startswith("input error: input 'v' is on cuda:0 but input 'q' is on cpu")


# ---- state dtypes (item 9) ------------------------------------------------------------


def test_complex_value_for_a_real_state_is_an_input_error():
    module = recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4)
    state = {"h": torch.complex(torch.zeros(2, 4), torch.ones(2, 4))}
    message = _input_error(module, {"x": torch.randn(2, 3, 3)}, state=state)
    assert message == "input error: state 'h' is complex but is declared real\n  expected a real tensor (torch.complex64 would lose its imaginary part)"


def test_integer_state_is_an_input_error():
    module = recdsl.compile(EXAMPLES / "mingru.rec", d_in=3, d=4)
    message = _input_error(module, {"x": torch.randn(2, 3, 3)}, state={"h": torch.zeros(2, 4, dtype=torch.int64)})
    assert message == "input error: state 'h' has dtype torch.int64\n  expected a floating-point (or, for a complex state, complex) tensor"


def test_complex_state_accepts_complex_and_real_values():
    module = recdsl.compile(EXAMPLES / "lru.rec", d=3, n=4)
    x = torch.randn(2, 3, 3)
    complex_start = module(x, state={"h": torch.zeros(2, 4, dtype=torch.complex64)})
    real_start = module(x, state={"h": torch.zeros(2, 4)})
    torch.testing.assert_close(complex_start, real_start)


# ---- dims named like keywords (item 13) -----------------------------------------------

CLASH = """
cell C(cell, backend, chunk_size = 2) {
    input x: [cell]
    param W: [cell, backend] = glorot
    state h: [backend] = 0
    h = 0.5 * h + x @ W
    out h * chunk_size
}
"""


def test_dims_as_a_mapping_bind_any_name():
    module = recdsl.compile(CLASH, dims={"cell": 3, "backend": 2, "chunk_size": 5}, backend="chunked", chunk_size=4)
    assert dict(module.cell.dims) == {"cell": 3, "backend": 2, "chunk_size": 5}
    assert module.backend == "chunked" and module.plan.chunk_size == 4
    assert module(torch.randn(1, 3, 3)).shape == (1, 3, 2)
    text = recdsl.explain(CLASH, dims={"cell": 3, "backend": 2})
    assert text.startswith("cell C(cell=3, backend=2, chunk_size=2)")


def test_mapping_and_keywords_combine():
    module = recdsl.compile(EXAMPLES / "mingru.rec", dims={"d_in": 3}, d=4)
    assert dict(module.cell.dims) == {"d_in": 3, "d": 4}
    with pytest.raises(recdsl.DimensionError, match="dim 'd' is given twice: in dims= and as a keyword"):
        recdsl.compile(EXAMPLES / "mingru.rec", dims={"d_in": 3, "d": 4}, d=4)
    with pytest.raises(recdsl.DimensionError, match="compile's dims= takes a mapping of dim names to values, got int"):
        recdsl.compile(EXAMPLES / "mingru.rec", dims=4)


@pytest.mark.parametrize("function", [recdsl.compile, recdsl.explain], ids=["compile", "explain"])
def test_a_number_for_cell_or_backend_was_meant_for_a_dim(function):
    """`compile(src, cell=3)` for a cell with a dim `cell` was a raw TypeError or a confusing 'no cell named 3'."""
    name = function.__name__
    with pytest.raises(recdsl.DimensionError) as info:
        function(CLASH, cell=3, backend=2)
    assert str(info.value) == (
        f"dimension error: {name}'s keyword 'cell' is the name of a cell of the program, got 3\n"
        f"  expected a string; to bind a dim called 'cell', {name}(..., dims={{'cell': 3}})"
    )
    with pytest.raises(recdsl.DimensionError, match=r"keyword 'backend' is the name of a backend, got 2"):
        function(CLASH, backend=2)


def test_an_option_that_is_also_a_dim_must_be_disambiguated():
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(CLASH, dims={"cell": 3, "backend": 2}, chunk_size=4)
    message = str(info.value)
    assert message.startswith(
        "<string>:2:6: dimension error: 'chunk_size' is both a keyword of compile and a dim of cell C: chunk_size=4 sets the compile option, so the dim is bound through dims="
    )
    assert message.endswith("expected compile(..., dims={'chunk_size': <value>}) for the dim, and chunk_size= only for the option")


def test_a_missing_dim_named_like_a_keyword_says_how_to_bind_it():
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(CLASH, backend="auto", dims={"backend": 2})
    assert str(info.value).endswith("expected compile(..., dims={'cell': <int>})")
    with pytest.raises(recdsl.DimensionError) as info:
        recdsl.compile(EXAMPLES / "mingru.rec", d_in=3)
    assert str(info.value).endswith("expected compile(..., d=<int>)")


def test_api_keywords_match_the_signatures():
    keywords = set(inspect.signature(recdsl.compile).parameters) | set(inspect.signature(recdsl.explain).parameters)
    assert keywords - {"dim_values"} == API_KEYWORDS
