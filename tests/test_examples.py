"""The example cells in examples/*.rec against independent references (tests/references.py).

Every comparison runs in float64: the module is cast with ``mod.double()`` and the inputs
are float64, so the compiled cell and the reference differ only by rounding (summation
order), and the tolerances can be tight (``ATOL``/``RTOL`` below). A failure therefore
means a semantic difference, not float32 noise.

To add an example: put ``examples/<name>.rec`` next to the others and add a ``Case`` to
``CASES`` (with a reference in tests/references.py); ``test_every_example_is_covered``
fails until you do.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

import recdsl

try:  # tests/ as a package or as a plain directory on sys.path
    from . import references as ref
except ImportError:
    import references as ref

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

# Tolerances, float64 throughout.
ATOL = 1e-9       # outputs and final states
RTOL = 1e-7
GRAD_ATOL = 1e-8  # gradients (one more rounding-sensitive pass)
GRAD_RTOL = 1e-6
INIT_RTOL = 1e-6   # initial values: params are created in the default dtype (float32), then .double()
PARAM_NOISE = 0.3  # params are perturbed after init so zero-initialised biases etc. matter
B = 2              # batch size in every test

# The examples this project ships (the coverage test also catches unlisted ones).
EXPECTED_EXAMPLES = {
    "mingru", "minlstm", "lru", "hgrn", "rglru", "s6", "gla", "retnet", "mlstm",
    "deltanet", "aaren", "gru", "lstm", "crf", "mamba2", "paragru", "paralstm", "s4d",
    "gated_deltanet", "rwkv6", "ttt_linear", "hgrn2",
    "state_tracking_lrnn", "titans",
    "slstm",
    "lion", "bigru", "crf_marginals",
}


# --------------------------------------------------------------------------------------
# The table of examples
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One example cell and how to check it.

    inputs/params/states map names (as declared in the .rec file, in declaration order) to
    per-step shapes written with dim names or integers; states also say "real"/"complex".
    reference(inputs, params, dims, state0) -> (outputs, final_states), inputs folded to
    [B, T, *shape] (heads folded into the batch), params by name.
    """

    file: str
    cell: str
    dims: dict
    inputs: dict
    params: dict
    states: dict
    outputs: tuple
    reference: Callable
    prepare: Callable | None = None  # transform of the random inputs, dict -> dict
    input_scale: dict = field(default_factory=dict)  # std of the random inputs, default 1


def _normalise_k(inputs):
    return {**inputs, "k": F.normalize(inputs["k"], dim=-1)}


def _gate_params(d_in, d, *gates):
    out = {}
    for g in gates:
        out[f"W_{g}"] = (d_in, d)
        out[f"b_{g}"] = (d,)
    return out


_GRU_PARAMS = {**{f"W_i{g}": ("d_in", "d") for g in "rzn"}, **{f"W_h{g}": ("d", "d") for g in "rzn"},
               **{f"b_i{g}": ("d",) for g in "rzn"}, **{f"b_h{g}": ("d",) for g in "rzn"}}
_LSTM_PARAMS = {**{f"W_i{g}": ("d_in", "d") for g in "ifgo"}, **{f"W_h{g}": ("d", "d") for g in "ifgo"},
                **{f"b_i{g}": ("d",) for g in "ifgo"}, **{f"b_h{g}": ("d",) for g in "ifgo"}}

CASES = {
    "mingru": Case(
        "mingru", "MinGRU", dict(d_in=3, d=4), dict(x=("d_in",)),
        _gate_params("d_in", "d", "z", "h"), dict(h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.mingru(I["x"], **P, state0=s)),
    "minlstm": Case(
        "minlstm", "MinLSTM", dict(d_in=3, d=4), dict(x=("d_in",)),
        _gate_params("d_in", "d", "f", "i", "h"), dict(h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.minlstm(I["x"], **P, state0=s)),
    "lru": Case(
        "lru", "LRU", dict(d=3, n=4), dict(x=("d",)),
        dict(nu_log=("n",), theta_log=("n",), gamma_log=("n",), B_re=("d", "n"), B_im=("d", "n"),
             C_re=("n", "d"), C_im=("n", "d"), D=("d",)),
        dict(h=(("n",), "complex")), ("y",),
        lambda I, P, D, s: ref.lru(I["x"], **P, state0=s)),
    "s4d": Case(
        "s4d", "S4D", dict(d=3, N=4), dict(x=("d",)),
        dict(log_dt=("d",), A_log=("d", "N"), A_im=("d", "N"), C_re=("d", "N"), C_im=("d", "N"), D=("d",)),
        dict(h=(("d", "N"), "complex")), ("y",),
        lambda I, P, D, s: ref.s4d(I["x"], **P, state0=s)),
    "hgrn": Case(
        "hgrn", "HGRN", dict(d_in=3, d=4, lower=0.5), dict(x=("d_in",)),
        _gate_params("d_in", "d", "f", "c", "g"), dict(h=(("d",), "real")), ("o",),
        lambda I, P, D, s: ref.hgrn(I["x"], **P, lower=D["lower"], state0=s)),
    "hgrn[lower=default]": Case(
        "hgrn", "HGRN", dict(d_in=3, d=4), dict(x=("d_in",)),
        _gate_params("d_in", "d", "f", "c", "g"), dict(h=(("d",), "real")), ("o",),
        lambda I, P, D, s: ref.hgrn(I["x"], **P, lower=0.0, state0=s)),
    "rglru": Case(
        "rglru", "RGLRU", dict(d=4), dict(x=("d",)),
        dict(W_a=("d", "d"), b_a=("d",), W_x=("d", "d"), b_x=("d",), Lambda=("d",)),
        dict(h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.rglru(I["x"], **P, c=8.0, state0=s)),
    "s6": Case(
        "s6", "S6", dict(d=4, n=3), dict(x=("d",), delta=("d",), B=("n",), C=("n",)),
        dict(A_log=("d", "n"), D=("d",)), dict(h=(("d", "n"), "real")), ("y",),
        lambda I, P, D, s: ref.s6(I["x"], I["delta"], I["B"], I["C"], **P, state0=s)),
    "mamba2": Case(
        "mamba2", "Mamba2", dict(p=4, n=3), dict(x=("p",), dt_raw=(), B=("n",), C=("n",)),
        dict(A_log=(), D=()), dict(h=(("n", "p"), "real")), ("y",),
        lambda I, P, D, s: ref.mamba2(I["x"], I["dt_raw"], I["B"], I["C"], **P, state0=s)),
    "gla": Case(
        "gla", "GLA", dict(dk=4, dv=3), dict(q=("dk",), k=("dk",), v=("dv",), g=("dk",)),
        {}, dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.gla(**I, state0=s)),
    "retnet": Case(
        "retnet", "RetNet", dict(dk=4, dv=3), dict(q=("dk",), k=("dk",), v=("dv",)),
        {}, dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.retnet(**I, gamma=0.96875, state0=s)),
    "retnet[gamma=0.5]": Case(
        "retnet", "RetNet", dict(dk=4, dv=3, gamma=0.5), dict(q=("dk",), k=("dk",), v=("dv",)),
        {}, dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.retnet(**I, gamma=D["gamma"], state0=s)),
    "mlstm": Case(
        "mlstm", "MLSTM", dict(dk=4, dv=3),
        dict(q=("dk",), k=("dk",), v=("dv",), i_pre=(), f_pre=()),
        {}, dict(C=(("dk", "dv"), "real"), n=(("dk",), "real"), m=((), "real")), ("h",),
        lambda I, P, D, s: ref.mlstm(**I, state0=s), input_scale=dict(i_pre=2.0, f_pre=2.0)),
    "deltanet": Case(
        "deltanet", "DeltaNet", dict(dk=4, dv=3), dict(q=("dk",), k=("dk",), v=("dv",), b=()),
        {}, dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.deltanet(**I, state0=s), prepare=_normalise_k,
        input_scale=dict(b=2.0)),
    "gated_deltanet": Case(
        "gated_deltanet", "GatedDeltaNet", dict(dk=4, dv=3), dict(q=("dk",), k=("dk",), v=("dv",), a=(), b=()),
        dict(A_log=(), dt_bias=()), dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.gated_deltanet(**I, **P, state0=s), prepare=_normalise_k,
        input_scale=dict(a=2.0, b=2.0)),
    "rwkv6": Case(
        "rwkv6", "RWKV6", dict(dk=4, dv=3), dict(r=("dk",), k=("dk",), v=("dv",), d=("dk",)),
        dict(u=("dk",)), dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.rwkv6(**I, **P, state0=s)),
    "ttt_linear": Case(
        "ttt_linear", "TTT", dict(dk=4, dv=3), dict(k=("dk",), v=("dv",), q=("dk",), a_pre=(), lr_pre=()),
        {}, dict(W=(("dv", "dk"), "real")), ("o",),
        lambda I, P, D, s: ref.ttt_linear(**I, state0=s), prepare=_normalise_k),
    "hgrn2": Case(
        "hgrn2", "HGRN2", dict(d_in=3, dk=4, dv=3, lower=0.3), dict(x=("d_in",)),
        dict(W_f=("d_in", "dk"), W_i=("d_in", "dv"), W_o=("d_in", "dk")), dict(S=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.hgrn2(I["x"], **P, lower=D["lower"], state0=s)),
    "aaren": Case(
        # The scan's carries are internal: their names in the state dict are the compiler's
        # business, so final states are compared only run-against-run (state splitting).
        "aaren", "Aaren", dict(d=3), dict(score=(), v=("d",)), {}, {}, ("o",),
        lambda I, P, D, s: ref.aaren(I["score"], I["v"]), input_scale=dict(score=3.0)),
    "gru": Case(
        "gru", "GRU", dict(d_in=3, d=4), dict(x=("d_in",)), _GRU_PARAMS,
        dict(h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.gru_torch(I["x"], **P, state0=s)),
    "lstm": Case(
        "lstm", "LSTM", dict(d_in=3, d=4), dict(x=("d_in",)), _LSTM_PARAMS,
        dict(h=(("d",), "real"), c=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.lstm_torch(I["x"], **P, state0=s)),
    "paragru": Case(
        "paragru", "ParaGRU", dict(d_in=3, d=4), dict(x=("d_in",)),
        {**{f"W_{g}": ("d_in", "d") for g in "zrh"}, **{f"a_{g}": ("d",) for g in "zrh"}, **{f"b_{g}": ("d",) for g in "zrh"}},
        dict(h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.paragru(I["x"], **P, state0=s)),
    "paralstm": Case(
        "paralstm", "ParaLSTM", dict(d_in=3, d=4), dict(x=("d_in",)),
        {**{f"W_{g}": ("d_in", "d") for g in "fco"}, **{f"a_{g}": ("d",) for g in "fco"},
         **{f"p_{g}": ("d",) for g in "fo"}, **{f"b_{g}": ("d",) for g in "fco"}},
        dict(c=(("d",), "real"), h=(("d",), "real")), ("h",),
        lambda I, P, D, s: ref.paralstm(I["x"], **P, state0=s)),
    "slstm": Case(
        # d = heads * dh = 4: two heads of 2.
        "slstm", "SLSTM", dict(d_in=3, heads=2, dh=2), dict(x=("d_in",)),
        {**{f"W_{g}": ("d_in", 4) for g in "zifo"}, **{f"R_{g}": (4, 4) for g in "zifo"}, **{f"b_{g}": (4,) for g in "zifo"}},
        dict(c=((4,), "real"), n=((4,), "real"), m=((4,), "real"), h=((4,), "real")), ("h",),
        lambda I, P, D, s: ref.slstm(I["x"], **P, heads=D["heads"], state0=s)),
    "crf": Case(
        "crf", "CRF", dict(n=3), dict(emit=("n",)),
        dict(trans=("n", "n"), start=("n",), stop=("n",)), dict(prior=(("n",), "real")),
        ("alpha", "logZ"),
        lambda I, P, D, s: ref.crf(I["emit"], **P, state0=s)),
    "state_tracking_lrnn": Case(
        "state_tracking_lrnn", "StateTrackingLRNN", dict(d=3, n=4), dict(x=("d",)),
        {f"W_{g}": ("d", "n") for g in ("theta", "phi", "beta", "v")},
        dict(h=(("n", 2), "real")), ("h",),
        lambda I, P, D, s: ref.state_tracking_lrnn(I["x"], **P, state0=s)),
    "titans": Case(
        "titans", "Titans", dict(dk=4, dv=3),
        dict(q=("dk",), k=("dk",), v=("dv",), a=(), e=(), g=()),
        {}, dict(M=(("dk", "dv"), "real"), W=(("dk", "dv"), "real")), ("o",),
        lambda I, P, D, s: ref.titans(**I, state0=s), prepare=_normalise_k),
    # Bidirectional cells: reverse states (and LION's delayed decay).
    "lion": Case(
        "lion", "LION", dict(dk=4, dv=3), dict(q=("dk",), k=("dk",), v=("dv",), a=()),
        {}, dict(Sf=(("dk", "dv"), "real"), zf=(("dk",), "real"), Sb=(("dk", "dv"), "real"),
                 zb=(("dk",), "real"), lam_next=((), "real")), ("y",),
        lambda I, P, D, s: ref.lion(**I, state0=s),
        prepare=lambda I: {**I, "a": I["a"] + 2.0}),
    "bigru": Case(
        "bigru", "BiGRU", dict(d_in=3, d=4), dict(x=("d_in",)),
        {**_GRU_PARAMS, **{name + "b": shape for name, shape in _GRU_PARAMS.items()}},
        dict(h=(("d",), "real"), g=(("d",), "real")), ("h", "g"),
        lambda I, P, D, s: ref.bigru_torch(I["x"], state0=s, **P)),
    "crf_marginals": Case(
        "crf_marginals", "CRFMarginals", dict(n=3), dict(emit=("n",)),
        dict(trans=("n", "n"), start=("n",), stop=("n",)),
        dict(prior=(("n",), "real"), beta=(("n",), "real")), ("logp",),
        lambda I, P, D, s: ref.crf_marginals(I["emit"], **P, state0=s)),
}

# Cells with reverse states: their outputs depend on the steps after, so a sequence cannot be
# split into calls that continue from the returned state.
BIDIRECTIONAL = {"lion", "bigru", "crf_marginals"}

STATELESS_REFERENCE = {name for name, c in CASES.items() if not c.states}


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------

def _shape(shape, dims):
    return tuple(dims[s] if isinstance(s, str) else int(s) for s in shape)


def compile_case(case: Case, seed: int = 0, perturb: bool = True, **dims_override):
    """Compile the example, cast it to float64, and (by default) perturb its parameters."""
    dims = {**case.dims, **dims_override}
    torch.manual_seed(seed)
    mod = recdsl.compile(str(EXAMPLES / f"{case.file}.rec"), cell=case.cell, **dims)
    mod = mod.double()
    if perturb:
        g = torch.Generator().manual_seed(seed + 1000)
        with torch.no_grad():
            for p in mod.parameters():
                p.add_(PARAM_NOISE * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return mod, dims


def make_inputs(case: Case, dims, T, extra=(), seed=0, scale=1.0):
    """Random float64 inputs {name: [B, T, *extra, *shape]} in declaration order."""
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, shape in case.inputs.items():
        std = scale * case.input_scale.get(name, 1.0)
        inputs[name] = std * torch.randn(B, T, *extra, *_shape(shape, dims), generator=g,
                                         dtype=torch.float64)
    if case.prepare is not None:
        inputs = case.prepare(inputs)
    return inputs


def make_state(case: Case, dims, extra=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (shape, kind) in case.states.items():
        full = (B, *extra, *_shape(shape, dims))
        x = 0.5 * torch.randn(full, generator=g, dtype=torch.float64)
        if kind == "complex":
            x = torch.complex(x, 0.5 * torch.randn(full, generator=g, dtype=torch.float64))
        state[name] = x
    return state


def params_of(case: Case, mod):
    return {name: getattr(mod, name) for name in case.params}


def as_tuple(out):
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _fold(x, ne):
    """[B, T, *E, *s] -> [B * prod(E), T, *s] (heads are batch-like)."""
    if ne == 0:
        return x
    x = x.movedim(1, 1 + ne)
    return x.reshape(-1, *x.shape[1 + ne:])


def _unfold(y, extra):
    """[B * prod(E), T, *o] -> [B, T, *E, *o]."""
    if not extra:
        return y
    return y.reshape(B, *extra, *y.shape[1:]).movedim(1 + len(extra), 1)


def _fold_state(s, extra):
    return s if not extra else s.reshape(-1, *s.shape[1 + len(extra):])


def _unfold_state(s, extra):
    return s if not extra else s.reshape(B, *extra, *s.shape[1:])


def run_reference(case: Case, mod, dims, inputs, extra=(), state0=None):
    ne = len(extra)
    I = {k: _fold(v, ne) for k, v in inputs.items()}
    S0 = None if state0 is None else {k: _fold_state(v, extra) for k, v in state0.items()}
    out, st = case.reference(I, params_of(case, mod), dims, S0)
    return (tuple(_unfold(y, extra) for y in as_tuple(out)),
            {k: _unfold_state(v, extra) for k, v in st.items()})


def assert_close(actual, expected, what, atol=ATOL, rtol=RTOL):
    """Elementwise |actual - expected| <= atol + rtol * |expected|, with a useful message."""
    assert isinstance(actual, torch.Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{what}: shape {tuple(actual.shape)}, reference has {tuple(expected.shape)}")
    assert actual.is_complex() == expected.is_complex(), (
        f"{what}: dtype {actual.dtype}, reference has {expected.dtype}")
    if actual.numel() == 0:
        return
    a, e = actual.detach(), expected.detach().to(actual.dtype)
    err = (a - e).abs()
    tol = atol + rtol * e.abs()
    bad = ~(err <= tol)  # NaN counts as bad
    if bool(bad.any()):
        excess = torch.where(bad, torch.nan_to_num(err - tol, nan=math.inf), torch.zeros_like(err))
        idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(excess), err.shape))
        raise AssertionError(
            f"{what}: {int(bad.sum())}/{err.numel()} elements out of tolerance "
            f"(atol={atol:g}, rtol={rtol:g}); max abs error {err.max().item():.3e}; "
            f"worst at index {idx}: got {a[idx].item()}, expected {e[idx].item()}"
            + (f"; {int(torch.isnan(a).sum())} NaN in the result" if torch.isnan(a).any() else ""))


def compare_outputs(case, outs, ref_outs, what):
    outs = as_tuple(outs)
    assert len(outs) == len(case.outputs), (
        f"{what}: {len(outs)} outputs, the cell declares {len(case.outputs)} {case.outputs}")
    for name, a, e in zip(case.outputs, outs, ref_outs):
        assert_close(a, e, f"{what}, output {name!r}")


def compare_states(case, states, ref_states, what):
    for name in case.states:
        assert name in states, f"{what}: state {name!r} missing from the returned state dict {sorted(states)}"
        assert_close(states[name], ref_states[name], f"{what}, final state {name!r}")


def _leaves(obj, path=""):
    """(path, tensor) pairs of a state: a tensor, or dicts / tuples / lists of them."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k in sorted(obj):
            yield from _leaves(obj[k], f"{path}.{k}" if path else str(k))
    elif isinstance(obj, (tuple, list)):
        for i, v in enumerate(obj):
            yield from _leaves(v, f"{path}[{i}]")
    elif hasattr(obj, "__dict__"):
        yield from _leaves(vars(obj), path)
    else:
        raise AssertionError(f"unexpected state leaf {path}: {type(obj).__name__}")


NAMES = list(CASES)


# --------------------------------------------------------------------------------------
# Coverage
# --------------------------------------------------------------------------------------

def _cells_in(path: Path):
    return re.findall(r"^\s*cell\s+([A-Za-z_]\w*)", path.read_text(), flags=re.M)


def test_every_example_is_covered():
    files = sorted(EXAMPLES.glob("*.rec"))
    assert files, f"no examples found in {EXAMPLES}"
    covered = {(c.file, c.cell) for c in CASES.values()}
    missing = [f"{p.name}: cell {cell}" for p in files for cell in _cells_in(p)
               if (p.stem, cell) not in covered]
    assert not missing, f"examples without a reference test (add a Case to CASES): {missing}"
    dangling = [f"{name}: {c.file}.rec / {c.cell}" for name, c in CASES.items()
                if not (EXAMPLES / f"{c.file}.rec").exists()
                or c.cell not in _cells_in(EXAMPLES / f"{c.file}.rec")]
    assert not dangling, f"cases whose example file or cell does not exist: {dangling}"
    absent = EXPECTED_EXAMPLES - {p.stem for p in files}
    assert not absent, f"expected examples missing from {EXAMPLES}: {sorted(absent)}"
    for p in files:
        first = p.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{p.name} must start with a comment citing its source"


# --------------------------------------------------------------------------------------
# Against the references
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_declared_parameters(name):
    """Each `param` is an nn.Parameter attribute with its source name and declared shape."""
    case = CASES[name]
    mod, dims = compile_case(case, perturb=False)
    for pname, shape in case.params.items():
        p = getattr(mod, pname, None)
        assert isinstance(p, torch.nn.Parameter), f"{name}: mod.{pname} is {type(p).__name__}, not a Parameter"
        assert tuple(p.shape) == _shape(shape, dims), (
            f"{name}: mod.{pname} has shape {tuple(p.shape)}, declared {_shape(shape, dims)}")
        assert torch.isfinite(p).all(), f"{name}: mod.{pname} initialised with non-finite values"
    n = len(list(mod.parameters()))
    assert n == len(case.params), f"{name}: module has {n} parameters, the cell declares {len(case.params)}"


@pytest.mark.parametrize("T", [1, 5, 17])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference(name, T):
    case = CASES[name]
    mod, dims = compile_case(case, seed=T)
    inputs = make_inputs(case, dims, T, seed=T)
    with torch.no_grad():
        outs, states = mod(**inputs, return_state=True)
        ref_outs, ref_states = run_reference(case, mod, dims, inputs)
    compare_outputs(case, outs, ref_outs, f"{name} (T={T})")
    compare_states(case, states, ref_states, f"{name} (T={T})")


@pytest.mark.parametrize("extra", [(3,), (2, 3)], ids=["H=3", "2x3"])
@pytest.mark.parametrize("name", NAMES)
def test_matches_reference_with_heads(name, extra):
    """Dims between T and the declared shape are batch-like: [B, T, *extra, *shape]."""
    case = CASES[name]
    T = 5
    mod, dims = compile_case(case, seed=7)
    inputs = make_inputs(case, dims, T, extra=extra, seed=7)
    with torch.no_grad():
        outs, states = mod(**inputs, return_state=True)
        ref_outs, ref_states = run_reference(case, mod, dims, inputs, extra=extra)
    compare_outputs(case, outs, ref_outs, f"{name} (heads {extra})")
    compare_states(case, states, ref_states, f"{name} (heads {extra})")


@pytest.mark.parametrize("name", [n for n in NAMES if n not in STATELESS_REFERENCE])
def test_initial_state_matches_reference(name):
    """`state=` sets the initial state: same result as the reference started from it."""
    case = CASES[name]
    T, extra = 6, (2,)
    mod, dims = compile_case(case, seed=3)
    inputs = make_inputs(case, dims, T, extra=extra, seed=3)
    state0 = make_state(case, dims, extra=extra, seed=4)
    with torch.no_grad():
        outs, states = mod(**inputs, state=state0, return_state=True)
        ref_outs, ref_states = run_reference(case, mod, dims, inputs, extra=extra, state0=state0)
    compare_outputs(case, outs, ref_outs, f"{name} (given initial state)")
    compare_states(case, states, ref_states, f"{name} (given initial state)")


@pytest.mark.parametrize("extra", [(), (2,)], ids=["no-heads", "H=2"])
@pytest.mark.parametrize("name", [n for n in NAMES if n not in BIDIRECTIONAL])
def test_state_splitting(name, extra):
    """Running T=10 at once equals running 4 steps, then 6 from the returned state."""
    case = CASES[name]
    mod, dims = compile_case(case, seed=5)
    inputs = make_inputs(case, dims, 10, extra=extra, seed=5)
    with torch.no_grad():
        full, s_full = mod(**inputs, return_state=True)
        first, s_first = mod(**{k: v[:, :4] for k, v in inputs.items()}, return_state=True)
        second, s_second = mod(**{k: v[:, 4:] for k, v in inputs.items()}, state=s_first,
                               return_state=True)
        plain = mod(**inputs)
    for i, (f, a, b, p) in enumerate(zip(as_tuple(full), as_tuple(first), as_tuple(second),
                                         as_tuple(plain))):
        oname = case.outputs[i] if i < len(case.outputs) else str(i)
        assert_close(torch.cat([a, b], dim=1), f, f"{name}: output {oname!r} of 4 + 6 steps vs 10")
        assert_close(p, f, f"{name}: output {oname!r} without vs with return_state")
    leaves_full = dict(_leaves(s_full))
    leaves_split = dict(_leaves(s_second))
    assert leaves_full.keys() == leaves_split.keys(), (
        f"{name}: state keys differ: {sorted(leaves_full)} vs {sorted(leaves_split)}")
    for k in leaves_full:
        assert_close(leaves_split[k], leaves_full[k], f"{name}: final state {k} after 4 + 6 steps vs 10")


@pytest.mark.parametrize("name", NAMES)
def test_gradients(name):
    """loss.backward() works; every param and input gets a finite, non-zero gradient equal
    to the reference's autograd gradient."""
    case = CASES[name]
    T = 5
    mod, dims = compile_case(case, seed=11)
    inputs = {k: v.detach().requires_grad_() for k, v in make_inputs(case, dims, T, seed=11).items()}
    params = params_of(case, mod)

    g = torch.Generator().manual_seed(12)
    outs = as_tuple(mod(**inputs))
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    mod.zero_grad(set_to_none=True)
    loss.backward()

    ref_outs, _ = run_reference(case, mod, dims, inputs)
    ref_loss = sum((o * w).sum() for o, w in zip(ref_outs, weights))
    leaves = list(params.items()) + list(inputs.items())
    ref_grads = torch.autograd.grad(ref_loss, [t for _, t in leaves], allow_unused=True)

    for (lname, t), rg in zip(leaves, ref_grads):
        kind = "param" if lname in params else "input"
        assert t.grad is not None, f"{name}: no gradient reached {kind} {lname!r}"
        assert torch.isfinite(t.grad).all(), f"{name}: non-finite gradient for {kind} {lname!r}"
        assert t.grad.abs().sum() > 0, f"{name}: gradient of {kind} {lname!r} is identically zero"
        assert_close(t.grad, rg, f"{name}: d loss / d {lname}", atol=GRAD_ATOL, rtol=GRAD_RTOL)


# --------------------------------------------------------------------------------------
# Second references: other formulations of the same cells
# --------------------------------------------------------------------------------------

def _copy_into_torch_rnn(kind, mod, d_in, d):
    """The brief's literal route: copy the recdsl parameters into a torch.nn.GRU/LSTM."""
    gates = "rzn" if kind == "GRU" else "ifgo"
    rnn = (torch.nn.GRU if kind == "GRU" else torch.nn.LSTM)(d_in, d, batch_first=True).double()
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.cat([getattr(mod, f"W_i{g}") for g in gates], 1).T)
        rnn.weight_hh_l0.copy_(torch.cat([getattr(mod, f"W_h{g}") for g in gates], 1).T)
        rnn.bias_ih_l0.copy_(torch.cat([getattr(mod, f"b_i{g}") for g in gates]))
        rnn.bias_hh_l0.copy_(torch.cat([getattr(mod, f"b_h{g}") for g in gates]))
    return rnn


def _alt_gru(I, mod, D):
    return (_copy_into_torch_rnn("GRU", mod, D["d_in"], D["d"])(I["x"])[0],)


def _alt_lstm(I, mod, D):
    return (_copy_into_torch_rnn("LSTM", mod, D["d_in"], D["d"])(I["x"])[0],)


def _alt_s6(I, mod, D):
    y = ref.selective_scan_ref(I["x"].transpose(1, 2), I["delta"].transpose(1, 2), -torch.exp(mod.A_log),
                               I["B"].transpose(1, 2), I["C"].transpose(1, 2), mod.D, delta_softplus=True)
    return (y.transpose(1, 2),)


def _alt_mingru_closed_form(I, mod, D):
    x = I["x"]
    z = torch.sigmoid(x @ mod.W_z + mod.b_z)
    return (ref.linear_scan_closed_form(1 - z, z * (x @ mod.W_h + mod.b_h)),)


ALTERNATIVES = {
    ("gla", "parallel form"): lambda I, mod, D: (ref.gla_parallel(**I),),
    ("retnet", "parallel form"): lambda I, mod, D: (ref.retnet_parallel(**I, gamma=0.96875),),
    ("retnet[gamma=0.5]", "parallel form"): lambda I, mod, D: (ref.retnet_parallel(**I, gamma=0.5),),
    ("mlstm", "unstabilised"): lambda I, mod, D: (ref.mlstm_unstabilised(**I),),
    ("mlstm", "parallel form"): lambda I, mod, D: (ref.mlstm_parallel(**I),),
    ("deltanet", "product of transitions"): lambda I, mod, D: (ref.deltanet_product_form(**I),),
    ("aaren", "causal softmax attention"): lambda I, mod, D: (ref.aaren_closed_form(I["score"], I["v"]),),
    ("s6", "selective_scan_ref"): _alt_s6,
    ("gru", "torch.nn.GRU with copied weights"): _alt_gru,
    ("lstm", "torch.nn.LSTM with copied weights"): _alt_lstm,
    ("mingru", "closed-form scan"): _alt_mingru_closed_form,
    ("titans", "joint transition of the stacked state"): lambda I, mod, D: (ref.titans_joint_form(**I),),
    ("slstm", "unstabilised"): lambda I, mod, D: (ref.slstm_unstabilised(I["x"], **params_of(CASES["slstm"], mod), heads=D["heads"]),),
}


@pytest.mark.parametrize("T", [1, 17])
@pytest.mark.parametrize("name,label", list(ALTERNATIVES), ids=[f"{n}-{l}" for n, l in ALTERNATIVES])
def test_matches_alternative_form(name, label, T):
    case = CASES[name]
    mod, dims = compile_case(case, seed=21)
    inputs = make_inputs(case, dims, T, seed=21)
    with torch.no_grad():
        outs = as_tuple(mod(**inputs))
        expected = ALTERNATIVES[name, label](inputs, mod, dims)
    for oname, a, e in zip(case.outputs, outs, expected):
        assert_close(a, e, f"{name} vs {label} (T={T}), output {oname!r}")


def test_crf_log_partition_equals_brute_force():
    """n = 3 labels, T = 4: log Z from the cell's last step equals the log-sum-exp of the
    scores of all 3^4 label paths; every prefix too."""
    case = CASES["crf"]
    mod, dims = compile_case(case, seed=31)
    assert dims["n"] == 3
    inputs = make_inputs(case, dims, 4, seed=31)
    emit = inputs["emit"]
    with torch.no_grad():
        alpha, logZ = as_tuple(mod(**inputs))
        for t in range(1, 5):
            bf = ref.crf_brute_force_logZ(emit[:, :t], mod.trans, mod.start, mod.stop)
            assert_close(logZ[:, t - 1], bf, f"crf: log Z of the first {t} steps vs enumeration")
        assert_close(torch.logsumexp(alpha[:, -1] + mod.stop, -1), logZ[:, -1], "crf: logZ vs alpha")


def test_mlstm_stabiliser_handles_huge_input_gates():
    """i~ of order 1000 overflows exp() even in float64; the stabilised cell stays finite and
    equals the stabilised reference."""
    case = CASES["mlstm"]
    mod, dims = compile_case(case, seed=41)
    inputs = make_inputs(case, dims, 9, seed=41)
    inputs["i_pre"] = 1000 * inputs["i_pre"]
    with torch.no_grad():
        outs, states = mod(**inputs, return_state=True)
        ref_outs, ref_states = run_reference(case, mod, dims, inputs)
    assert torch.isfinite(as_tuple(outs)[0]).all(), "mlstm: non-finite output with large input gates"
    compare_outputs(case, outs, ref_outs, "mlstm (i_pre ~ 1000)")
    compare_states(case, states, ref_states, "mlstm (i_pre ~ 1000)")


# --------------------------------------------------------------------------------------
# Initialisers written in the examples
# --------------------------------------------------------------------------------------

def test_s6_initialisation():
    case = CASES["s6"]
    mod, dims = compile_case(case, perturb=False)
    d, n = dims["d"], dims["n"]
    expected = torch.log(1 + torch.arange(n, dtype=torch.float64)).expand(d, n)
    assert_close(mod.A_log, expected, "s6: A_log init = log(1 + arange(n)) in every channel", rtol=INIT_RTOL)
    assert_close(mod.D, torch.ones(d, dtype=torch.float64), "s6: D init = ones", rtol=INIT_RTOL)


@pytest.mark.parametrize("hyper", [{}, dict(r_min=0.9, r_max=0.999, max_phase=0.314)],
                         ids=["paper-code-defaults", "lra-ring"])
def test_lru_initialisation(hyper):
    """|lambda|^2 at the n midpoint quantiles of U[r_min^2, r_max^2], arg(lambda) at those of
    U[0, max_phase], gamma = sqrt(1 - |lambda|^2), B ~ N(0, 1/(2d)), C ~ N(0, 1/n)."""
    case = CASES["lru"]
    mod, dims = compile_case(case, perturb=False, d=48, n=32, **hyper)
    d, n = dims["d"], dims["n"]
    r_min, r_max, max_phase = hyper.get("r_min", 0.0), hyper.get("r_max", 1.0), hyper.get("max_phase", 6.28)
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    mod2 = torch.exp(-2 * torch.exp(mod.nu_log))
    assert_close(mod2, r_min ** 2 + (r_max ** 2 - r_min ** 2) * q, "lru: |lambda|^2 quantiles", rtol=INIT_RTOL)
    assert_close(torch.exp(mod.theta_log), max_phase * q, "lru: arg(lambda) quantiles", rtol=INIT_RTOL)
    assert_close(torch.exp(mod.gamma_log), torch.sqrt(1 - mod2), "lru: gamma = sqrt(1 - |lambda|^2)", rtol=INIT_RTOL)
    for pname, std in [("B_re", (2 * d) ** -0.5), ("B_im", (2 * d) ** -0.5),
                       ("C_re", n ** -0.5), ("C_im", n ** -0.5)]:
        got = getattr(mod, pname).std().item()
        assert abs(got / std - 1) < 0.15, f"lru: {pname} std {got:.4f}, paper init {std:.4f}"
    assert abs(mod.D.std().item() - 1) < 0.5, f"lru: D std {mod.D.std().item():.3f}, paper init 1"


def test_rglru_initialisation():
    """a^c = exp(-c softplus(Lambda)) at the midpoint quantiles of U[0.9, 0.999]."""
    case = CASES["rglru"]
    mod, dims = compile_case(case, perturb=False, d=16)
    q = (torch.arange(16, dtype=torch.float64) + 0.5) / 16
    assert_close(torch.exp(-8 * F.softplus(mod.Lambda)), 0.9 + (0.999 - 0.9) * q, "rglru: a^c quantiles", rtol=INIT_RTOL)


def test_zero_initialised_biases_and_crf_scores():
    for name, zeros in [("mingru", ["b_z", "b_h"]), ("minlstm", ["b_f", "b_i", "b_h"]),
                        ("hgrn", ["b_f", "b_c", "b_g"]), ("rglru", ["b_a", "b_x"]),
                        ("gru", [p for p in _GRU_PARAMS if p.startswith("b_")]),
                        ("lstm", [p for p in _LSTM_PARAMS if p.startswith("b_")]),
                        ("crf", ["start", "stop"])]:
        mod, _ = compile_case(CASES[name], perturb=False)
        for p in zeros:
            assert torch.count_nonzero(getattr(mod, p)) == 0, f"{name}: {p} should be initialised to zeros"
