"""Checks of the reference implementations against each other, against brute force and
against hand-written loops of the papers' equations. These do not need recdsl: they make
sure the ground truth of test_examples.py is itself right.

All in float64 (atol 1e-10, rtol 1e-8 unless a test says otherwise).
"""


import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

try:  # tests/ as a package or as a plain directory on sys.path
    from . import references as ref
except ImportError:
    import references as ref

DT = torch.float64
ATOL, RTOL = 1e-10, 1e-8


def close(a, b, what, atol=ATOL, rtol=RTOL):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    err = (a - b).abs()
    ok = err <= atol + rtol * b.abs()
    assert bool(ok.all()), f"{what}: max abs error {err.max().item():.3e} (atol={atol}, rtol={rtol})"


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(*shape, generator=g, dtype=DT)


@pytest.mark.parametrize("T", [1, 5, 17])
def test_gla_loop_equals_parallel_form(T):
    B, dk, dv = 2, 4, 3
    q, k, g = rnd(B, T, dk, seed=1), rnd(B, T, dk, seed=2), rnd(B, T, dk, seed=3, scale=3)
    v = rnd(B, T, dv, seed=4)
    close(ref.gla(q, k, v, g)[0], ref.gla_parallel(q, k, v, g), "GLA loop vs parallel")


@pytest.mark.parametrize("gamma", [0.96875, 0.5, 1.0])
def test_retnet_loop_equals_parallel_form(gamma):
    B, T, dk, dv = 2, 17, 4, 3
    q, k, v = rnd(B, T, dk, seed=1), rnd(B, T, dk, seed=2), rnd(B, T, dv, seed=3)
    close(ref.retnet(q, k, v, gamma)[0], ref.retnet_parallel(q, k, v, gamma), "RetNet loop vs parallel")


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_aaren_online_softmax_equals_causal_softmax(scale):
    B, T, d = 2, 17, 3
    score, v = rnd(B, T, seed=1, scale=scale), rnd(B, T, d, seed=2)
    close(ref.aaren(score, v)[0], ref.aaren_closed_form(score, v), "Aaren online vs closed form")


def test_crf_forward_equals_brute_force():
    B, T, n = 2, 4, 3
    emit, trans = rnd(B, T, n, seed=1), rnd(n, n, seed=2)
    start, stop = rnd(n, seed=3), rnd(n, seed=4)
    (alpha, logZ), _ = ref.crf(emit, trans, start, stop)
    close(logZ[:, -1], ref.crf_brute_force_logZ(emit, trans, start, stop), "CRF logZ vs enumeration")
    for t in range(1, T + 1):  # every prefix is itself a CRF
        close(logZ[:, t - 1], ref.crf_brute_force_logZ(emit[:, :t], trans, start, stop), f"CRF prefix {t}")


def test_s6_loop_equals_selective_scan_ref():
    B, T, d, n = 2, 17, 4, 3
    x, delta = rnd(B, T, d, seed=1), rnd(B, T, d, seed=2)
    Bm, Cm = rnd(B, T, n, seed=3), rnd(B, T, n, seed=4)
    A_log, D = rnd(d, n, seed=5, scale=0.5), rnd(d, seed=6)
    y, _ = ref.s6(x, delta, Bm, Cm, A_log, D)
    y2 = ref.selective_scan_ref(x.transpose(1, 2), delta.transpose(1, 2), -torch.exp(A_log),
                                Bm.transpose(1, 2), Cm.transpose(1, 2), D, delta_softplus=True)
    close(y, y2.transpose(1, 2), "S6 loop vs selective_scan_ref")


def test_mlstm_stabilised_equals_unstabilised_and_parallel():
    B, T, dk, dv = 2, 17, 4, 3
    q, k, v = rnd(B, T, dk, seed=1), rnd(B, T, dk, seed=2), rnd(B, T, dv, seed=3)
    i_pre, f_pre = rnd(B, T, seed=4, scale=2), rnd(B, T, seed=5, scale=2)
    h, _ = ref.mlstm(q, k, v, i_pre, f_pre)
    close(h, ref.mlstm_unstabilised(q, k, v, i_pre, f_pre), "mLSTM stabilised vs unstabilised")
    close(h, ref.mlstm_parallel(q, k, v, i_pre, f_pre), "mLSTM stabilised vs parallel")


def test_mlstm_stabiliser_survives_huge_input_gates():
    B, T, dk, dv = 2, 9, 4, 3
    q, k, v = rnd(B, T, dk, seed=1), rnd(B, T, dk, seed=2), rnd(B, T, dv, seed=3)
    i_pre, f_pre = rnd(B, T, seed=4, scale=1000), rnd(B, T, seed=5)
    h, st_ = ref.mlstm(q, k, v, i_pre, f_pre)
    assert torch.isfinite(h).all() and all(torch.isfinite(s).all() for s in st_.values())
    assert not torch.isfinite(ref.mlstm_unstabilised(q, k, v, i_pre, f_pre)).all()


def test_deltanet_delta_rule_equals_product_form():
    B, T, dk, dv = 2, 17, 4, 3
    q, v, b = rnd(B, T, dk, seed=1), rnd(B, T, dv, seed=3), rnd(B, T, seed=4, scale=2)
    k = F.normalize(rnd(B, T, dk, seed=2), dim=-1)
    close(ref.deltanet(q, k, v, b)[0], ref.deltanet_product_form(q, k, v, b), "DeltaNet forms")


def _gru_by_hand(x, p, h):
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        r = torch.sigmoid(xt @ p["W_ir"] + p["b_ir"] + h @ p["W_hr"] + p["b_hr"])
        z = torch.sigmoid(xt @ p["W_iz"] + p["b_iz"] + h @ p["W_hz"] + p["b_hz"])
        n = torch.tanh(xt @ p["W_in"] + p["b_in"] + r * (h @ p["W_hn"] + p["b_hn"]))
        h = (1 - z) * n + z * h
        ys.append(h)
    return torch.stack(ys, 1), h


def test_gru_reference_weight_layout():
    """gru_torch (torch.nn.GRU) maps the [d_in, d] blocks correctly: same as the equations."""
    B, T, d_in, d = 2, 7, 3, 4
    names = ["W_ir", "W_iz", "W_in", "W_hr", "W_hz", "W_hn", "b_ir", "b_iz", "b_in", "b_hr", "b_hz", "b_hn"]
    p = {}
    for i, nm in enumerate(names):
        shape = (d_in, d) if nm.startswith("W_i") else (d, d) if nm.startswith("W_h") else (d,)
        p[nm] = rnd(*shape, seed=10 + i, scale=0.7)
    x, h0 = rnd(B, T, d_in, seed=1), rnd(B, d, seed=2)
    y, st_ = ref.gru_torch(x, **p, state0={"h": h0})
    y2, h2 = _gru_by_hand(x, p, h0)
    close(y, y2, "GRU torch vs equations")
    close(st_["h"], h2, "GRU final h")


def test_lstm_reference_weight_layout():
    B, T, d_in, d = 2, 7, 3, 4
    p = {}
    for i, gate in enumerate("ifgo"):
        p[f"W_i{gate}"] = rnd(d_in, d, seed=20 + i, scale=0.7)
        p[f"W_h{gate}"] = rnd(d, d, seed=30 + i, scale=0.7)
        p[f"b_i{gate}"] = rnd(d, seed=40 + i)
        p[f"b_h{gate}"] = rnd(d, seed=50 + i)
    x, h, c = rnd(B, T, d_in, seed=1), rnd(B, d, seed=2), rnd(B, d, seed=3)
    y, st_ = ref.lstm_torch(x, **p, state0={"h": h, "c": c})

    def gate(name, xt, h):
        return xt @ p[f"W_i{name}"] + p[f"b_i{name}"] + h @ p[f"W_h{name}"] + p[f"b_h{name}"]

    ys = []
    for t in range(T):
        i, f = torch.sigmoid(gate("i", x[:, t], h)), torch.sigmoid(gate("f", x[:, t], h))
        g, o = torch.tanh(gate("g", x[:, t], h)), torch.sigmoid(gate("o", x[:, t], h))
        c = f * c + i * g
        h = o * torch.tanh(c)
        ys.append(h)
    close(y, torch.stack(ys, 1), "LSTM torch vs equations")
    close(st_["h"], h, "LSTM final h")
    close(st_["c"], c, "LSTM final c")


def test_gru_reference_is_differentiable():
    d_in, d = 3, 4
    p = {nm: rnd(*((d_in, d) if nm.startswith("W_i") else (d, d) if nm.startswith("W_h") else (d,)),
                 seed=i).requires_grad_()
         for i, nm in enumerate(["W_ir", "W_iz", "W_in", "W_hr", "W_hz", "W_hn",
                                 "b_ir", "b_iz", "b_in", "b_hr", "b_hz", "b_hn"])}
    y, _ = ref.gru_torch(rnd(2, 5, d_in, seed=99), **p)
    y.sum().backward()
    for nm, t in p.items():
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0, nm


def test_diagonal_cells_equal_closed_form_scan():
    B, T, d_in, d = 2, 9, 3, 4
    x = rnd(B, T, d_in, seed=1)
    W_z, b_z, W_h, b_h = rnd(d_in, d, seed=2), rnd(d, seed=3), rnd(d_in, d, seed=4), rnd(d, seed=5)
    h0 = rnd(B, d, seed=6)
    y, _ = ref.mingru(x, W_z, b_z, W_h, b_h, state0={"h": h0})
    z = torch.sigmoid(x @ W_z + b_z)
    close(y, ref.linear_scan_closed_form(1 - z, z * (x @ W_h + b_h), h0), "minGRU vs closed form")

    W_f, b_f, W_i, b_i = rnd(d_in, d, seed=7), rnd(d, seed=8), rnd(d_in, d, seed=9), rnd(d, seed=10)
    y, _ = ref.minlstm(x, W_f, b_f, W_i, b_i, W_h, b_h, state0={"h": h0})
    f, i = torch.sigmoid(x @ W_f + b_f), torch.sigmoid(x @ W_i + b_i)
    close(y, ref.linear_scan_closed_form(f / (f + i), i / (f + i) * (x @ W_h + b_h), h0),
          "minLSTM vs closed form")


def test_lru_real_arithmetic_equals_complex():
    B, T, d, n = 2, 17, 3, 4
    x = rnd(B, T, d, seed=1)
    nu_log, theta_log, gamma_log = rnd(n, seed=2), rnd(n, seed=3), rnd(n, seed=4, scale=0.3)
    B_re, B_im, C_re, C_im = rnd(d, n, seed=5), rnd(d, n, seed=6), rnd(n, d, seed=7), rnd(n, d, seed=8)
    D = rnd(d, seed=9)
    h0 = torch.complex(rnd(B, n, seed=10), rnd(B, n, seed=11))
    y, st_ = ref.lru(x, nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im, D, state0={"h": h0})
    lam = torch.exp(-torch.exp(nu_log) + 1j * torch.exp(theta_log))
    Bc, Cc = torch.complex(B_re, B_im), torch.complex(C_re, C_im)
    h, ys = h0, []
    for t in range(T):
        h = lam * h + torch.exp(gamma_log) * (x[:, t].to(Bc.dtype) @ Bc)
        ys.append((h @ Cc).real + D * x[:, t])
    close(y, torch.stack(ys, 1), "LRU real vs complex")
    close(torch.view_as_real(st_["h"]), torch.view_as_real(h), "LRU final h")


def test_rglru_power_form_equals_log_form():
    """a^(c r) with a = sigmoid(-Lambda) equals exp(-c softplus(Lambda) r) (the .rec's form)."""
    B, T, d = 2, 9, 4
    x = rnd(B, T, d, seed=1)
    W_a, b_a, W_x, b_x, Lam = (rnd(d, d, seed=2), rnd(d, seed=3), rnd(d, d, seed=4), rnd(d, seed=5),
                               rnd(d, seed=6))
    y, _ = ref.rglru(x, W_a, b_a, W_x, b_x, Lam, c=8.0)
    r = torch.sigmoid(x @ W_a + b_a)
    a = torch.exp(-8.0 * F.softplus(Lam) * r)
    b = torch.sqrt(1 - a ** 2) * torch.sigmoid(x @ W_x + b_x) * x
    close(y, ref.linear_scan_closed_form(a, b), "RG-LRU vs closed form")


def test_hgrn_lower_bound_and_closed_form():
    B, T, d_in, d = 2, 9, 3, 4
    x = rnd(B, T, d_in, seed=1)
    p = {nm: rnd(*(shape), seed=i) for i, (nm, shape) in enumerate(
        [("W_f", (d_in, d)), ("b_f", (d,)), ("W_c", (d_in, d)), ("b_c", (d,)), ("W_g", (d_in, d)), ("b_g", (d,))])}
    y, _ = ref.hgrn(x, **p, lower=0.5)
    lam = 0.5 + 0.5 * torch.sigmoid(x @ p["W_f"] + p["b_f"])
    h = ref.linear_scan_closed_form(lam, (1 - lam) * F.silu(x @ p["W_c"] + p["b_c"]))
    close(y, torch.sigmoid(x @ p["W_g"] + p["b_g"]) * h, "HGRN vs closed form")


# Every reference must continue from its own final state: running T = a + b in one call
# equals a then b (this checks the state0 plumbing the tests rely on).
def _split_cases():
    d_in, d, n, dk, dv = 3, 4, 3, 4, 3
    P = lambda *s, seed: rnd(*s, seed=seed, scale=0.5)  # noqa: E731
    return {
        "mingru": (lambda I, s: ref.mingru(I[0], P(d_in, d, seed=1), P(d, seed=2), P(d_in, d, seed=3), P(d, seed=4), s),
                   [(d_in,)]),
        "s6": (lambda I, s: ref.s6(*I, P(d, n, seed=1), P(d, seed=2), s), [(d,), (d,), (n,), (n,)]),
        "gla": (lambda I, s: ref.gla(*I, s), [(dk,), (dk,), (dv,), (dk,)]),
        "retnet": (lambda I, s: ref.retnet(*I, 0.9, s), [(dk,), (dk,), (dv,)]),
        "mlstm": (lambda I, s: ref.mlstm(*I, s), [(dk,), (dk,), (dv,), (), ()]),
        "deltanet": (lambda I, s: ref.deltanet(I[0], F.normalize(I[1], dim=-1), I[2], I[3], s),
                     [(dk,), (dk,), (dv,), ()]),
        "crf": (lambda I, s: ref.crf(I[0], P(n, n, seed=1), P(n, seed=2), P(n, seed=3), s), [(n,)]),
        "lstm": (lambda I, s: ref.lstm_torch(
            I[0], *[P(d_in, d, seed=i) for i in range(4)], *[P(d, d, seed=10 + i) for i in range(4)],
            *[P(d, seed=20 + i) for i in range(8)], state0=s), [(d_in,)]),
    }


@pytest.mark.parametrize("name", list(_split_cases()))
def test_reference_state_continuation(name):
    fn, shapes = _split_cases()[name]
    I = [rnd(2, 10, *s, seed=i) for i, s in enumerate(shapes)]
    y, s = fn(I, None)
    y1, s1 = fn([t[:, :4] for t in I], None)
    y2, s2 = fn([t[:, 4:] for t in I], s1)
    ys = y if isinstance(y, tuple) else (y,)
    y1s = y1 if isinstance(y1, tuple) else (y1,)
    y2s = y2 if isinstance(y2, tuple) else (y2,)
    for a, b1, b2 in zip(ys, y1s, y2s):
        close(torch.cat([b1, b2], 1), a, f"{name} split output")
    for k in s:
        close(s2[k], s[k], f"{name} split state {k}")


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 12), dk=st.integers(1, 5), dv=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_gla_and_retnet_forms_agree_on_random_shapes(T, dk, dv, seed):
    q, k, g = rnd(2, T, dk, seed=seed), rnd(2, T, dk, seed=seed + 1), rnd(2, T, dk, seed=seed + 2)
    v = rnd(2, T, dv, seed=seed + 3)
    close(ref.gla(q, k, v, g)[0], ref.gla_parallel(q, k, v, g), "GLA")
    close(ref.retnet(q, k, v, 0.8)[0], ref.retnet_parallel(q, k, v, 0.8), "RetNet")


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 5), n=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_crf_forward_equals_brute_force_random(T, n, seed):
    emit, trans = rnd(2, T, n, seed=seed), rnd(n, n, seed=seed + 1)
    start, stop = rnd(n, seed=seed + 2), rnd(n, seed=seed + 3)
    (_, logZ), _ = ref.crf(emit, trans, start, stop)
    close(logZ[:, -1], ref.crf_brute_force_logZ(emit, trans, start, stop), "CRF")


@pytest.mark.parametrize("T", [1, 6, 33])
def test_s4d_recurrence_equals_kernel_convolution(T):
    B, d, N = 2, 3, 4
    x = rnd(B, T, d, seed=1)
    log_dt, A_log, A_im = rnd(d, seed=2, scale=0.5) - 2, rnd(d, N, seed=3, scale=0.3), rnd(d, N, seed=4, scale=3)
    C_re, C_im, D = rnd(d, N, seed=5), rnd(d, N, seed=6), rnd(d, seed=7)
    y, _ = ref.s4d(x, log_dt, A_log, A_im, C_re, C_im, D)
    close(y, ref.s4d_kernel_form(x, log_dt, A_log, A_im, C_re, C_im, D), "S4D recurrence vs kernel convolution")


def _slstm_weights(d_in, heads, dh, seed):
    g = torch.Generator().manual_seed(seed)
    d = heads * dh
    weights = {f"W_{k}": 0.5 * torch.randn(d_in, d, generator=g, dtype=torch.float64) for k in "zifo"}
    weights.update({f"R_{k}": 0.5 * torch.randn(d, d, generator=g, dtype=torch.float64) for k in "zifo"})
    weights.update({f"b_{k}": 0.5 * torch.randn(d, generator=g, dtype=torch.float64) for k in "zifo"})
    return weights


def test_slstm_stabilised_equals_unstabilised_and_reads_only_the_head_blocks():
    weights = _slstm_weights(3, 2, 3, seed=0)
    x = torch.randn(2, 11, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    h, _ = ref.slstm(x, **weights, heads=2)
    close(h, ref.slstm_unstabilised(x, **weights, heads=2), "sLSTM stabilised vs unstabilised")
    # Entries of R outside the heads' blocks are never read.
    off_block = {k: (v + torch.ones_like(v).triu(3) if k.startswith("R_") else v) for k, v in weights.items()}
    close(ref.slstm(x, **off_block, heads=2)[0], h, "sLSTM with the off-block entries of R changed")


def test_slstm_matches_the_xlstm_package_pointwise_step():
    """Optional: the xlstm package's vanilla sLSTM step (`pip install --no-deps xlstm`), gates in
    its order (i, f, z, o), the per-head recurrent products computed here."""
    vanilla = pytest.importorskip("xlstm.blocks.slstm.src.vanilla.slstm")
    heads, dh, d_in = 2, 3, 4
    d = heads * dh
    weights = _slstm_weights(d_in, heads, dh, seed=2)
    x = torch.randn(2, 9, d_in, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    expected, _ = ref.slstm(x, **weights, heads=heads)
    blocks = {k: ref._head_blocks(weights[f"R_{k}"], heads) for k in "ifzo"}
    W = torch.cat([weights[f"W_{k}"] for k in "ifzo"], 1)
    b = torch.cat([weights[f"b_{k}"] for k in "ifzo"])[None]
    states = torch.zeros(4, 2, d, dtype=torch.float64)  # y, c, n, m
    ys = []
    for t in range(x.shape[1]):
        Ry = torch.cat([ref._per_head(states[0], blocks[k]) for k in "ifzo"], 1)
        states, _ = vanilla.slstm_forward_pointwise(x[:, t] @ W, Ry, b, states, {})
        ys.append(states[0])
    close(torch.stack(ys, 1), expected, "sLSTM reference vs xlstm's slstm_forward_pointwise")
