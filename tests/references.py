"""Independent reference implementations of the cells in ``examples/``.

Written from the papers' equations, not from recdsl: plain per-step PyTorch loops (and,
where a cell has one, a second formulation: parallel/attention form, closed form, brute
force, or the library that defines the cell). They are the ground truth of
``test_examples.py`` and are checked against each other in ``test_references.py``.

Conventions, shared by every function here:

* inputs are batch-first, ``[B, T, *shape]`` with the per-step ``shape`` of the cell's
  ``input`` declaration (no extra head dims: the tests fold heads into the batch);
* parameters are passed by their names in the ``.rec`` file, with the declared shapes
  (row-vector convention: ``x @ W`` with ``W: [d_in, d]``);
* ``state0`` is an optional dict of initial states ``[B, *state_shape]`` keyed by the
  ``state`` names of the ``.rec`` file (missing entries take the cell's declared init);
* recurrent references return ``(output, final_state)``, ``output`` being ``[B, T, ...]``
  (a tuple when the cell has several ``out`` lines) and ``final_state`` a dict keyed
  like ``state0``.

Computation happens in the dtype of the arguments; the tests use float64.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = [
    "mingru", "minlstm", "lru", "hgrn", "rglru", "s6", "selective_scan_ref",
    "gla", "gla_parallel", "retnet", "retnet_parallel", "mlstm", "mlstm_unstabilised",
    "mlstm_parallel", "deltanet", "deltanet_product_form", "aaren", "aaren_closed_form",
    "gru_torch", "lstm_torch", "paragru", "paralstm", "crf", "crf_brute_force_logZ", "linear_scan_closed_form",
    "state_tracking_lrnn", "titans", "titans_joint_form",
    "slstm", "slstm_unstabilised",
]


def _init(state0, name, default):
    if state0 is not None and name in state0 and state0[name] is not None:
        return state0[name]
    return default


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


# --------------------------------------------------------------------------------------
# Diagonal (elementwise) linear recurrences
# --------------------------------------------------------------------------------------

def linear_scan_closed_form(a, b, h0=None):
    """Closed form of ``h_t = a_t * h_{t-1} + b_t`` (elementwise), ``a, b: [B, T, ...]``:

        h_t = (prod_{r<=t} a_r) h_0 + sum_{s<=t} (prod_{s<r<=t} a_r) b_s

    computed without a loop, by an explicit [T, T] weight matrix of products. Used to
    cross-check the loops of the diagonal cells.
    """
    T = a.shape[1]
    # P[t, s] = prod_{s < r <= t} a_r for s <= t (an empty product is 1), 0 for s > t.
    rows = []
    for t in range(T):
        cols = []
        for s in range(T):
            if s > t:
                cols.append(torch.zeros_like(a[:, 0]))
            else:
                p = torch.ones_like(a[:, 0])
                for r in range(s + 1, t + 1):
                    p = p * a[:, r]
                cols.append(p)
        rows.append(torch.stack(cols, 1))
    P = torch.stack(rows, 1)  # [B, T, T, ...]
    h = (P * b[:, None]).sum(2)
    if h0 is not None:
        decay = torch.cumprod(a, dim=1)
        h = h + decay * h0[:, None]
    return h


def mingru(x, W_z, b_z, W_h, b_h, state0=None):
    """minGRU (Feng et al. 2024, "Were RNNs All We Needed?", Sec. 3.1):

        z_t  = sigmoid(x_t W_z + b_z)
        h~_t = x_t W_h + b_h
        h_t  = (1 - z_t) * h_{t-1} + z_t * h~_t

    x: [B, T, d_in]. Returns (h: [B, T, d], {"h": h_T}).
    """
    B, T, _ = x.shape
    h = _init(state0, "h", x.new_zeros(B, W_z.shape[1]))
    ys = []
    for t in range(T):
        z = _sigmoid(x[:, t] @ W_z + b_z)
        h_tilde = x[:, t] @ W_h + b_h
        h = (1 - z) * h + z * h_tilde
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def minlstm(x, W_f, b_f, W_i, b_i, W_h, b_h, state0=None):
    """minLSTM (Feng et al. 2024, Sec. 3.2), with normalised gates:

        f_t = sigmoid(x_t W_f + b_f),  i_t = sigmoid(x_t W_i + b_i)
        f'_t = f_t / (f_t + i_t),      i'_t = i_t / (f_t + i_t)
        h~_t = x_t W_h + b_h
        h_t  = f'_t * h_{t-1} + i'_t * h~_t

    x: [B, T, d_in]. Returns (h: [B, T, d], {"h": h_T}).
    """
    B, T, _ = x.shape
    h = _init(state0, "h", x.new_zeros(B, W_f.shape[1]))
    ys = []
    for t in range(T):
        f = _sigmoid(x[:, t] @ W_f + b_f)
        i = _sigmoid(x[:, t] @ W_i + b_i)
        h_tilde = x[:, t] @ W_h + b_h
        h = (f * h + i * h_tilde) / (f + i)
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def lru(x, nu_log, theta_log, gamma_log, B_re, B_im, C_re, C_im, D, state0=None):
    """LRU (Orvieto et al. 2023, "Resurrecting RNNs for Long Sequences", Sec. 3):

        lambda = exp(-exp(nu_log) + i exp(theta_log)),  gamma = exp(gamma_log)
        h_t = lambda * h_{t-1} + gamma * (B u_t),        B = B_re + i B_im
        y_t = Re(C h_t) + D * u_t,                       C = C_re + i C_im

    Computed in real arithmetic on (Re h, Im h): multiplying by lambda = r e^{i theta} is a
    rotation by theta scaled by r = exp(-exp(nu_log)), and Re(C h) = C_re Re h - C_im Im h
    (row-vector convention: u_t @ B with B: [d, n], h_t @ C with C: [n, d]).

    x: [B, T, d]. Returns (y: [B, T, d], {"h": h_T complex [B, n]}).
    """
    Bsz, T, _ = x.shape
    n = nu_log.shape[0]
    r = torch.exp(-torch.exp(nu_log))
    theta = torch.exp(theta_log)
    cos, sin = r * torch.cos(theta), r * torch.sin(theta)
    gamma = torch.exp(gamma_log)
    h0 = _init(state0, "h", None)
    if h0 is None:
        h_re, h_im = x.new_zeros(Bsz, n), x.new_zeros(Bsz, n)
    else:
        h_re, h_im = h0.real, h0.imag
    ys = []
    for t in range(T):
        u = x[:, t]
        bu_re, bu_im = u @ B_re, u @ B_im
        h_re, h_im = (cos * h_re - sin * h_im + gamma * bu_re,
                      sin * h_re + cos * h_im + gamma * bu_im)
        ys.append(h_re @ C_re - h_im @ C_im + D * u)
    return torch.stack(ys, 1), {"h": torch.complex(h_re, h_im)}


def s4d(x, log_dt, A_log, A_im, C_re, C_im, D, state0=None):
    """S4D (Gu, Gupta, Goel and Re 2022, "On the Parameterization and Initialization of
    Diagonal State Space Models", Sec. 3), zero-order hold, B = 1:

        A = -exp(A_log) + i A_im,  dA = exp(Delta A),  dB = (exp(Delta A) - 1) / A
        h_t = dA * h_{t-1} + dB * x_t           (per channel d and mode n)
        y_t = 2 Re(sum_n C_n h_t,n) + D * x_t

    Computed in real arithmetic on (Re h, Im h): dA = e^{Delta Re A} (cos(Delta Im A) + i sin(...)).

    x: [B, T, d]. Returns (y: [B, T, d], {"h": h_T complex [B, d, N]}).
    """
    Bsz, T, d = x.shape
    dt = torch.exp(log_dt)[:, None]
    a_re, a_im = -torch.exp(A_log), A_im
    mag = torch.exp(dt * a_re)
    da_re, da_im = mag * torch.cos(dt * a_im), mag * torch.sin(dt * a_im)
    # (dA - 1) / A = ((da_re - 1) + i da_im) (a_re - i a_im) / |A|^2
    norm = a_re ** 2 + a_im ** 2
    db_re = ((da_re - 1) * a_re + da_im * a_im) / norm
    db_im = (da_im * a_re - (da_re - 1) * a_im) / norm
    h0 = _init(state0, "h", None)
    if h0 is None:
        h_re, h_im = x.new_zeros(Bsz, *A_log.shape), x.new_zeros(Bsz, *A_log.shape)
    else:
        h_re, h_im = h0.real, h0.imag
    ys = []
    for t in range(T):
        u = x[:, t, :, None]
        h_re, h_im = (da_re * h_re - da_im * h_im + db_re * u,
                      da_im * h_re + da_re * h_im + db_im * u)
        ys.append(2 * (C_re * h_re - C_im * h_im).sum(-1) + D * x[:, t])
    return torch.stack(ys, 1), {"h": torch.complex(h_re, h_im)}


def s4d_kernel_form(x, log_dt, A_log, A_im, C_re, C_im, D):
    """S4D as the paper computes it (Sec. 3, eq. 5): the SSM kernel
    K_l = 2 Re(sum_n C_n dB_n dA_n^l) (a Vandermonde product) convolved causally with x,
    plus the skip D x, summed directly over lags (no recurrence, no FFT)."""
    Bsz, T, d = x.shape
    A = torch.complex(-torch.exp(A_log), A_im)
    dtA = torch.exp(log_dt)[:, None] * A
    dB = (torch.exp(dtA) - 1) / A
    C = torch.complex(C_re, C_im)
    lags = torch.arange(T, dtype=x.dtype)
    vandermonde = torch.exp(dtA[..., None] * lags)  # [d, N, T]
    K = 2 * torch.einsum("dn,dnl->dl", C * dB, vandermonde).real  # [d, T]
    y = torch.zeros_like(x)
    for t in range(T):
        y[:, t] = (K[:, : t + 1].flip(-1)[None] * x[:, : t + 1].transpose(1, 2)).sum(-1)
    return y + D * x


def hgrn(x, W_f, b_f, W_c, b_c, W_g, b_g, lower=0.0, state0=None):
    """HGRU, real variant (Qin, Yang and Zhong 2023, "Hierarchically Gated RNN"):

        lambda_t = lower + (1 - lower) * sigmoid(x_t W_f + b_f)   lower-bounded forget gate
        c_t      = silu(x_t W_c + b_c)
        g_t      = sigmoid(x_t W_g + b_g)                         output gate
        h_t      = lambda_t * h_{t-1} + (1 - lambda_t) * c_t
        o_t      = g_t * h_t

    x: [B, T, d_in]. Returns (o: [B, T, d], {"h": h_T}).
    """
    B, T, _ = x.shape
    h = _init(state0, "h", x.new_zeros(B, W_f.shape[1]))
    ys = []
    for t in range(T):
        pre_c = x[:, t] @ W_c + b_c
        c = pre_c * _sigmoid(pre_c)
        lam = lower + (1 - lower) * _sigmoid(x[:, t] @ W_f + b_f)
        g = _sigmoid(x[:, t] @ W_g + b_g)
        h = lam * h + (1 - lam) * c
        ys.append(g * h)
    return torch.stack(ys, 1), {"h": h}


def rglru(x, W_a, b_a, W_x, b_x, Lambda, c=8.0, state0=None):
    """RG-LRU (De et al. 2024, "Griffin", Sec. 2.4), with a = sigmoid(-Lambda):

        r_t = sigmoid(x_t W_a + b_a),   i_t = sigmoid(x_t W_x + b_x)
        a_t = a ** (c * r_t)
        h_t = a_t * h_{t-1} + sqrt(1 - a_t**2) * (i_t * x_t)

    x: [B, T, d]. Returns (h: [B, T, d], {"h": h_T}).
    """
    B, T, d = x.shape
    a = _sigmoid(-Lambda)
    h = _init(state0, "h", x.new_zeros(B, d))
    ys = []
    for t in range(T):
        r = _sigmoid(x[:, t] @ W_a + b_a)
        i = _sigmoid(x[:, t] @ W_x + b_x)
        a_t = a ** (c * r)
        h = a_t * h + torch.sqrt(1 - a_t ** 2) * (i * x[:, t])
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def s6(x, delta, B, C, A_log, D, state0=None):
    """Mamba's selective SSM (Gu and Dao 2023, Algorithm 2), one block of d channels:

        Delta_t = softplus(delta_t),  A = -exp(A_log)
        h_t[c, j] = exp(Delta_t[c] A[c, j]) h_{t-1}[c, j] + Delta_t[c] x_t[c] B_t[j]
        y_t[c]    = sum_j h_t[c, j] C_t[j] + D[c] x_t[c]

    x, delta: [B, T, d]; B, C: [B, T, n]. Returns (y: [B, T, d], {"h": h_T [B, d, n]}).
    """
    Bsz, T, d = x.shape
    n = A_log.shape[-1]
    A = -torch.exp(A_log)
    h = _init(state0, "h", x.new_zeros(Bsz, d, n))
    ys = []
    for t in range(T):
        dt = F.softplus(delta[:, t])  # [B, d]
        h = torch.exp(dt[:, :, None] * A) * h + (dt * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append(torch.einsum("bcj,bj->bc", h, C[:, t]) + D * x[:, t])
    return torch.stack(ys, 1), {"h": h}


def mamba2(x, dt_raw, B, C, A_log, D, state0=None):
    """Mamba-2's SSD recurrence (Dao and Gu 2024, Section 7), one head:

        dt_t = softplus(dt_raw_t),  A = -exp(A_log) (a scalar)
        h_t[j, c] = exp(dt_t A) h_{t-1}[j, c] + B_t[j] dt_t x_t[c]
        y_t[c]    = sum_j C_t[j] h_t[j, c] + D x_t[c]

    x: [B, T, p]; dt_raw: [B, T]; B, C: [B, T, n]. Returns (y: [B, T, p], {"h": [B, n, p]}).
    """
    Bsz, T, p = x.shape
    n = B.shape[-1]
    A = -torch.exp(A_log)
    h = _init(state0, "h", x.new_zeros(Bsz, n, p))
    ys = []
    for t in range(T):
        dt = F.softplus(dt_raw[:, t])  # [B]
        h = torch.exp(dt * A)[:, None, None] * h + B[:, t, :, None] * (dt[:, None] * x[:, t])[:, None, :]
        ys.append(torch.einsum("bj,bjc->bc", C[:, t], h) + D * x[:, t])
    return torch.stack(ys, 1), {"h": h}


def selective_scan_ref(u, delta, A, B, C, D=None, delta_softplus=False):
    """The selective scan in the layout and steps of mamba_ssm's ``selective_scan_ref``
    (real A, input-dependent B and C of shape [batch, n, L]), written from its equations:

        deltaA   = exp(delta (x) A)            [batch, dim, L, n]
        deltaB_u = delta * u (x) B             [batch, dim, L, n]
        x_i = deltaA_i * x_{i-1} + deltaB_u_i;  y_i = x_i C_i;  out = y + D * u

    u, delta: [batch, dim, L]; A: [dim, n]; B, C: [batch, n, L]; D: [dim].
    Returns out: [batch, dim, L].
    """
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, L = u.shape
    n = A.shape[1]
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = u.new_zeros(batch, dim, n)
    ys = []
    for i in range(L):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, dim=2)
    return y if D is None else y + u * D[:, None]


# --------------------------------------------------------------------------------------
# Matrix-state linear attention family
# --------------------------------------------------------------------------------------

def gla(q, k, v, g, state0=None):
    """Gated linear attention (Yang et al. 2024), one head, gate temperature 16:

        alpha_t = sigmoid(g_t) ** (1/16)                  [dk]
        S_t = diag(alpha_t) S_{t-1} + k_t^T v_t           [dk, dv]
        o_t = q_t S_t

    q, k, g: [B, T, dk]; v: [B, T, dv]. Returns (o: [B, T, dv], {"S": S_T}).
    """
    B, T, dk = q.shape
    dv = v.shape[-1]
    S = _init(state0, "S", q.new_zeros(B, dk, dv))
    ys = []
    for t in range(T):
        alpha = _sigmoid(g[:, t]) ** (1.0 / 16)
        S = alpha[:, :, None] * S + k[:, t, :, None] * v[:, t, None, :]
        ys.append(torch.einsum("bi,bij->bj", q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def gla_parallel(q, k, v, g):
    """GLA in parallel (attention) form, from S_0 = 0:

        o_t = sum_{s<=t} sum_i q_t[i] (prod_{s<r<=t} alpha_r[i]) k_s[i] v_s
            = sum_{s<=t} (q_t * exp(b_t - b_s)) . k_s  v_s,   b_t = sum_{r<=t} log alpha_r

    Returns o: [B, T, dv].
    """
    T = q.shape[1]
    b = torch.cumsum(F.logsigmoid(g) / 16, dim=1)  # [B, T, dk]
    diff = b[:, :, None, :] - b[:, None, :, :]  # [B, t, s, dk] = b_t - b_s
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    diff = torch.where(causal[None, :, :, None], diff, torch.full_like(diff, -math.inf))
    A = torch.einsum("bti,btsi,bsi->bts", q, torch.exp(diff), k)
    return A @ v


def retnet(q, k, v, gamma=0.96875, state0=None):
    """Retention, recurrent form (Sun et al. 2023, eq. 6), one head:

        S_t = gamma S_{t-1} + k_t^T v_t;   o_t = q_t S_t

    q, k: [B, T, dk]; v: [B, T, dv]. Returns (o: [B, T, dv], {"S": S_T}).
    """
    B, T, dk = q.shape
    S = _init(state0, "S", q.new_zeros(B, dk, v.shape[-1]))
    ys = []
    for t in range(T):
        S = gamma * S + k[:, t, :, None] * v[:, t, None, :]
        ys.append(torch.einsum("bi,bij->bj", q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def retnet_parallel(q, k, v, gamma=0.96875):
    """Retention, parallel form (Sun et al. 2023, eq. 5):

        O = (Q K^T * D) V,   D_ts = gamma^(t-s) if s <= t else 0
    """
    T = q.shape[1]
    t = torch.arange(T, dtype=q.dtype, device=q.device)
    D = torch.where(t[:, None] >= t[None, :], gamma ** (t[:, None] - t[None, :]),
                    torch.zeros((), dtype=q.dtype, device=q.device))
    return ((q @ k.transpose(1, 2)) * D) @ v


def mlstm(q, k, v, i_pre, f_pre, state0=None):
    """mLSTM, stabilised (Beck et al. 2024, "xLSTM", Sec. 2.3 and appendix):

        log f_t = logsigmoid(f~_t)
        m_t  = max(log f_t + m_{t-1}, i~_t)                      m_0 = -inf
        i'_t = exp(i~_t - m_t),   f'_t = exp(log f_t + m_{t-1} - m_t)
        C_t  = f'_t C_{t-1} + i'_t (k_t / sqrt(dk))^T v_t
        n_t  = f'_t n_{t-1} + i'_t k_t / sqrt(dk)
        h_t  = q_t C_t / max(|q_t . n_t|, exp(-m_t))

    q, k: [B, T, dk]; v: [B, T, dv]; i_pre, f_pre: [B, T].
    Returns (h: [B, T, dv], {"C": [B, dk, dv], "n": [B, dk], "m": [B]}).
    """
    B, T, dk = q.shape
    dv = v.shape[-1]
    C = _init(state0, "C", q.new_zeros(B, dk, dv))
    n = _init(state0, "n", q.new_zeros(B, dk))
    m = _init(state0, "m", q.new_full((B,), -math.inf))
    ys = []
    for t in range(T):
        logf = F.logsigmoid(f_pre[:, t])
        m_new = torch.maximum(logf + m, i_pre[:, t])
        i_g = torch.exp(i_pre[:, t] - m_new)
        f_g = torch.exp(logf + m - m_new)
        kt = k[:, t] / math.sqrt(dk)
        C = f_g[:, None, None] * C + i_g[:, None, None] * kt[:, :, None] * v[:, t, None, :]
        n = f_g[:, None] * n + i_g[:, None] * kt
        m = m_new
        num = torch.einsum("bi,bij->bj", q[:, t], C)
        den = torch.maximum((q[:, t] * n).sum(-1).abs(), torch.exp(-m))
        ys.append(num / den[:, None])
    return torch.stack(ys, 1), {"C": C, "n": n, "m": m}


def mlstm_unstabilised(q, k, v, i_pre, f_pre):
    """mLSTM exactly as the paper's main text writes it (no stabiliser; overflows for
    large i~), from C_0 = 0, n_0 = 0:

        i_t = exp(i~_t), f_t = sigmoid(f~_t)
        C_t = f_t C_{t-1} + i_t k_t^T v_t,  n_t = f_t n_{t-1} + i_t k_t   (k scaled by 1/sqrt(dk))
        h_t = q_t C_t / max(|q_t . n_t|, 1)
    """
    B, T, dk = q.shape
    C = q.new_zeros(B, dk, v.shape[-1])
    n = q.new_zeros(B, dk)
    ys = []
    for t in range(T):
        i = torch.exp(i_pre[:, t])
        f = _sigmoid(f_pre[:, t])
        kt = k[:, t] / math.sqrt(dk)
        C = f[:, None, None] * C + i[:, None, None] * kt[:, :, None] * v[:, t, None, :]
        n = f[:, None] * n + i[:, None] * kt
        num = torch.einsum("bi,bij->bj", q[:, t], C)
        den = torch.clamp((q[:, t] * n).sum(-1).abs(), min=1.0)
        ys.append(num / den[:, None])
    return torch.stack(ys, 1)


def mlstm_parallel(q, k, v, i_pre, f_pre):
    """mLSTM parallel form (xLSTM appendix), unstabilised:

        D_ts = exp(sum_{s<r<=t} log f_r + i~_s) for s <= t, else 0
        C~   = (Q K^T / sqrt(dk)) * D
        h_t  = sum_s C~_ts v_s / max(|sum_s C~_ts|, 1)
    """
    T, dk = q.shape[1], q.shape[2]
    cum = torch.cumsum(F.logsigmoid(f_pre), dim=1)  # [B, T]
    logD = cum[:, :, None] - cum[:, None, :] + i_pre[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    logD = torch.where(causal, logD, torch.full_like(logD, -math.inf))
    Ct = (q @ k.transpose(1, 2)) / math.sqrt(dk) * torch.exp(logD)
    norm = torch.clamp(Ct.sum(-1).abs(), min=1.0)
    return (Ct @ v) / norm[..., None]


def deltanet(q, k, v, b, state0=None):
    """DeltaNet with beta in (0, 2) (Yang et al. 2024; Grazzi et al. 2024), delta-rule form:

        beta_t = 2 sigmoid(b_t)
        S_t = S_{t-1} + beta_t k_t^T (v_t - k_t S_{t-1})
        o_t = q_t S_t

    q, k: [B, T, dk]; v: [B, T, dv]; b: [B, T]. Returns (o: [B, T, dv], {"S": S_T}).
    """
    B, T, dk = q.shape
    S = _init(state0, "S", q.new_zeros(B, dk, v.shape[-1]))
    ys = []
    for t in range(T):
        beta = 2 * _sigmoid(b[:, t])
        err = v[:, t] - torch.einsum("bi,bij->bj", k[:, t], S)  # v_t - k_t S_{t-1}
        S = S + beta[:, None, None] * k[:, t, :, None] * err[:, None, :]
        ys.append(torch.einsum("bi,bij->bj", q[:, t], S))
    return torch.stack(ys, 1), {"S": S}


def deltanet_product_form(q, k, v, b):
    """DeltaNet as an explicit product of transitions, from S_0 = 0:

        S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    """
    B, T, dk = q.shape
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    S = q.new_zeros(B, dk, v.shape[-1])
    ys = []
    for t in range(T):
        beta = (2 * _sigmoid(b[:, t]))[:, None, None]
        kk = k[:, t, :, None] * k[:, t, None, :]
        S = (eye - beta * kk) @ S + beta * k[:, t, :, None] * v[:, t, None, :]
        ys.append((q[:, t, None, :] @ S)[:, 0])
    return torch.stack(ys, 1)


def gated_deltanet(q, k, v, a, b, A_log, dt_bias, state0=None):
    """Gated DeltaNet (Yang, Kautz and Hatamizadeh 2024, "Gated Delta Networks", eq. 10), in
    the paper's convention, the state H = S^T of shape [dv, dk]:

        alpha_t = exp(-exp(A_log) softplus(a_t + dt_bias)),   beta_t = sigmoid(b_t)
        H_t = H_{t-1} (alpha_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T
        o_t = H_t q_t

    q, k: [B, T, dk]; v: [B, T, dv]; a, b: [B, T]. Returns (o, {"S": H_T^T}), the state in
    recdsl's [dk, dv] layout.
    """
    B, T, dk = q.shape
    dv = v.shape[-1]
    H = _init(state0, "S", q.new_zeros(B, dk, dv)).transpose(1, 2)
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    ys = []
    for t in range(T):
        alpha = torch.exp(-torch.exp(A_log) * F.softplus(a[:, t] + dt_bias))[:, None, None]
        beta = _sigmoid(b[:, t])[:, None, None]
        kk = k[:, t, :, None] * k[:, t, None, :]
        H = H @ (alpha * (eye - beta * kk)) + beta * v[:, t, :, None] * k[:, t, None, :]
        ys.append((H @ q[:, t, :, None])[..., 0])
    return torch.stack(ys, 1), {"S": H.transpose(1, 2)}


def rwkv6(r, k, v, d, u, state0=None):
    """RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch", Section 4), one head:

        w_t = exp(-exp(d_t))
        wkv_t = S_{t-1} + diag(u) k_t^T v_t
        o_t = r_t wkv_t
        S_t = diag(w_t) S_{t-1} + k_t^T v_t

    r, k, d: [B, T, dk]; v: [B, T, dv]; u: [dk]. Returns (o, {"S": S_T}).
    """
    B, T, dk = r.shape
    S = _init(state0, "S", r.new_zeros(B, dk, v.shape[-1]))
    ys = []
    for t in range(T):
        kv = k[:, t, :, None] * v[:, t, None, :]
        wkv = S + u[:, None] * kv
        ys.append(torch.einsum("bi,bij->bj", r[:, t], wkv))
        S = torch.exp(-torch.exp(d[:, t]))[:, :, None] * S + kv
    return torch.stack(ys, 1), {"S": S}


def ttt_linear(k, v, q, a_pre, lr_pre, state0=None):
    """TTT-linear (Sun et al. 2024, "Learning to (Learn at Test Time)"), inner mini-batches of
    one step, no inner LayerNorm, with Titans' forget gate (Behrouz et al. 2024): the hidden
    state is a linear model W [dv, dk] taking one gradient step per token on
    l(W) = ||W k_t - v_t||^2 / 2 (its gradient taken by autograd, not written out):

        W_t = (1 - a_t) W_{t-1} - lr_t grad l(W_{t-1}),   a_t = sigmoid(a_pre_t),
        lr_t = sigmoid(lr_pre_t) / dk,                     o_t = W_t q_t

    k, q: [B, T, dk]; v: [B, T, dv]; a_pre, lr_pre: [B, T]. Returns (o, {"W": W_T}).
    """
    B, T, dk = k.shape
    W = _init(state0, "W", k.new_zeros(B, v.shape[-1], dk))
    ys = []
    for t in range(T):
        with torch.enable_grad():  # the gradient of the inner loss, kept differentiable for the tests' gradients
            model = W if W.requires_grad else W.detach().requires_grad_(True)
            loss = 0.5 * ((model @ k[:, t, :, None])[..., 0] - v[:, t]).square().sum()
            (gradient,) = torch.autograd.grad(loss, model, create_graph=True)
        a = _sigmoid(a_pre[:, t])[:, None, None]
        lr = (_sigmoid(lr_pre[:, t]) / dk)[:, None, None]
        W = (1 - a) * W - lr * gradient
        ys.append((W @ q[:, t, :, None])[..., 0])
    return torch.stack(ys, 1), {"W": W}


def hgrn2(x, W_f, W_i, W_o, lower=0.0, state0=None):
    """HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion", Section 3):

        f_t = lower + (1 - lower) sigmoid(x_t W_f),   i_t = x_t W_i,   o_t = silu(x_t W_o)
        S_t = Diag(f_t) S_{t-1} + (1 - f_t)^T i_t,    y_t = o_t S_t

    x: [B, T, d_in]. Returns (y: [B, T, dv], {"S": S_T}).
    """
    B, T, _ = x.shape
    S = _init(state0, "S", x.new_zeros(B, W_f.shape[1], W_i.shape[1]))
    ys = []
    for t in range(T):
        f = lower + (1 - lower) * _sigmoid(x[:, t] @ W_f)
        i = x[:, t] @ W_i
        o = F.silu(x[:, t] @ W_o)
        S = f[:, :, None] * S + (1 - f)[:, :, None] * i[:, None, :]
        ys.append(torch.einsum("bi,bij->bj", o, S))
    return torch.stack(ys, 1), {"S": S}


# --------------------------------------------------------------------------------------
# Attention as a scan
# --------------------------------------------------------------------------------------

def aaren(score, v):
    """Aaren (Feng et al. 2024, "Attention as an RNN"): o_t = sum_{s<=t} softmax_s(score) v_s,
    by an online softmax (running max m, denominator s, numerator n):

        m_t = max(m_{t-1}, score_t)
        s_t = s_{t-1} exp(m_{t-1} - m_t) + exp(score_t - m_t)
        n_t = n_{t-1} exp(m_{t-1} - m_t) + exp(score_t - m_t) v_t
        o_t = n_t / s_t

    score: [B, T]; v: [B, T, d]. Returns (o: [B, T, d], {"m", "s", "n"}).
    """
    B, T, d = v.shape
    m = score.new_full((B,), -math.inf)
    s = score.new_zeros(B)
    n = v.new_zeros(B, d)
    ys = []
    for t in range(T):
        m_new = torch.maximum(m, score[:, t])
        scale = torch.exp(m - m_new)
        w = torch.exp(score[:, t] - m_new)
        s = s * scale + w
        n = n * scale[:, None] + w[:, None] * v[:, t]
        m = m_new
        ys.append(n / s[:, None])
    return torch.stack(ys, 1), {"m": m, "s": s, "n": n}


def aaren_closed_form(score, v):
    """Causal softmax attention computed directly: o_t = softmax(score_{1..t}) @ v_{1..t}."""
    T = score.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=score.device).tril()
    logits = torch.where(causal, score[:, None, :].expand(-1, T, -1),
                         torch.full((), -math.inf, dtype=score.dtype, device=score.device))
    return torch.softmax(logits, dim=-1) @ v


# --------------------------------------------------------------------------------------
# Classic nonlinear RNNs: the reference is PyTorch's own implementation
# --------------------------------------------------------------------------------------

def gru_torch(x, W_ir, W_iz, W_in, W_hr, W_hz, W_hn, b_ir, b_iz, b_in, b_hr, b_hz, b_hn,
              state0=None):
    """torch.nn.GRU(batch_first=True) with the given weights (differentiably, through
    torch.func.functional_call). torch stores weight_ih_l0 as [3d, d_in] with the gate
    order r, z, n, i.e. the transposes of the [d_in, d] blocks stacked.

    Returns (h: [B, T, d], {"h": h_T}).
    """
    d_in, d = W_ir.shape
    module = torch.nn.GRU(d_in, d, batch_first=True).to(dtype=x.dtype, device=x.device)
    weights = {
        "weight_ih_l0": torch.cat([W_ir, W_iz, W_in], dim=1).T,
        "weight_hh_l0": torch.cat([W_hr, W_hz, W_hn], dim=1).T,
        "bias_ih_l0": torch.cat([b_ir, b_iz, b_in]),
        "bias_hh_l0": torch.cat([b_hr, b_hz, b_hn]),
    }
    h0 = _init(state0, "h", None)
    args = (x,) if h0 is None else (x, h0[None])
    out, h_n = torch.func.functional_call(module, weights, args)
    return out, {"h": h_n[0]}


def lstm_torch(x, W_ii, W_if, W_ig, W_io, W_hi, W_hf, W_hg, W_ho,
               b_ii, b_if, b_ig, b_io, b_hi, b_hf, b_hg, b_ho, state0=None):
    """torch.nn.LSTM(batch_first=True) with the given weights (gate order i, f, g, o;
    weight_ih_l0 is [4d, d_in]). Returns (h: [B, T, d], {"h": h_T, "c": c_T})."""
    d_in, d = W_ii.shape
    module = torch.nn.LSTM(d_in, d, batch_first=True).to(dtype=x.dtype, device=x.device)
    weights = {
        "weight_ih_l0": torch.cat([W_ii, W_if, W_ig, W_io], dim=1).T,
        "weight_hh_l0": torch.cat([W_hi, W_hf, W_hg, W_ho], dim=1).T,
        "bias_ih_l0": torch.cat([b_ii, b_if, b_ig, b_io]),
        "bias_hh_l0": torch.cat([b_hi, b_hf, b_hg, b_ho]),
    }
    B = x.shape[0]
    h0 = _init(state0, "h", None)
    c0 = _init(state0, "c", None)
    if h0 is None and c0 is None:
        args = (x,)
    else:
        h0 = x.new_zeros(B, d) if h0 is None else h0
        c0 = x.new_zeros(B, d) if c0 is None else c0
        args = (x, (h0[None], c0[None]))
    out, (h_n, c_n) = torch.func.functional_call(module, weights, args)
    return out, {"h": h_n[0], "c": c_n[0]}


# --------------------------------------------------------------------------------------
# Linear-chain CRF
# --------------------------------------------------------------------------------------

def crf(emit, trans, start, stop, state0=None):
    """Linear-chain CRF forward algorithm in log space (Lafferty et al. 2001):

        alpha_1 = start + emit_1
        alpha_t[j] = logsumexp_i(alpha_{t-1}[i] + trans[i, j]) + emit_t[j]
        logZ_t = logsumexp_j(alpha_t[j] + stop[j])

    ``state0`` may give "prior", the scores of y_1 before its emission (default: start),
    i.e. alpha_1 = prior + emit_1. emit: [B, T, n].
    Returns ((alpha: [B, T, n], logZ: [B, T]), {"prior": prior_{T+1}}).
    """
    B, T, n = emit.shape
    prior = _init(state0, "prior", start.expand(B, n))
    alphas, logZ = [], []
    alpha = None
    for t in range(T):
        if t == 0:
            alpha = prior + emit[:, 0]
        else:
            alpha = torch.logsumexp(alpha[:, :, None] + trans, dim=1) + emit[:, t]
        alphas.append(alpha)
        logZ.append(torch.logsumexp(alpha + stop, dim=-1))
    if T > 0:
        prior = torch.logsumexp(alpha[:, :, None] + trans, dim=1)
    return (torch.stack(alphas, 1), torch.stack(logZ, 1)), {"prior": prior}


def crf_brute_force_logZ(emit, trans, start, stop):
    """log Z = log sum over all n^T label paths y of exp(score(y)), by enumeration:

        score(y) = start[y_1] + sum_t emit_t[y_t] + sum_{t>1} trans[y_{t-1}, y_t] + stop[y_T]

    emit: [B, T, n]. Returns [B]. Only for tiny n and T.
    """
    B, T, n = emit.shape
    scores = []
    for path in itertools.product(range(n), repeat=T):
        s = start[path[0]] + stop[path[-1]] + emit[:, 0, path[0]]
        for t in range(1, T):
            s = s + trans[path[t - 1], path[t]] + emit[:, t, path[t]]
        scores.append(s)
    return torch.logsumexp(torch.stack(scores, -1), dim=-1)


# --------------------------------------------------------------------------------------
# ParaRNN's cells with diagonal recurrence (Danieli et al. 2025)
# --------------------------------------------------------------------------------------

def paragru(x, W_z, W_r, W_h, a_z, a_r, a_h, b_z, b_r, b_h, state0=None):
    """ParaGRU (Danieli et al. 2025, "ParaRNN", Sec. 4; GRUDiagMH of apple/ml-pararnn):
    the GRU with its recurrent matrices replaced by diagonals,

        z_t = sigmoid(B_z x_t + A_z h_{t-1} + b_z),   r_t = sigmoid(B_r x_t + A_r h_{t-1} + b_r)
        n_t = tanh(B_h x_t + A_h (h_{t-1} r_t) + b_h)
        h_t = (1 - z_t) h_{t-1} + z_t n_t

    with ``A = diag(a)``. x: [B, T, d_in]. Returns (h: [B, T, d], {"h": h_T}).
    """
    B, T, _ = x.shape
    h = _init(state0, "h", x.new_zeros(B, W_z.shape[1]))
    ys = []
    for t in range(T):
        xt = x[:, t]
        z = _sigmoid(xt @ W_z + a_z * h + b_z)
        r = _sigmoid(xt @ W_r + a_r * h + b_r)
        n = torch.tanh(xt @ W_h + a_h * (h * r) + b_h)
        h = z * n + (1 - z) * h
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def paralstm(x, W_f, W_c, W_o, a_f, a_c, a_o, p_f, p_o, b_f, b_c, b_o, state0=None):
    """ParaLSTM (Danieli et al. 2025, "ParaRNN", Sec. 4; LSTMCIFGDiagMH of apple/ml-pararnn):
    an LSTM with coupled input and forget gates and peepholes, diagonal recurrence,

        f_t  = sigmoid(B_f x_t + A_f h_{t-1} + C_f c_{t-1} + b_f)
        c~_t = tanh(B_c x_t + A_c h_{t-1} + b_c)
        c_t  = f_t c_{t-1} + (1 - f_t) c~_t
        o_t  = sigmoid(B_o x_t + A_o h_{t-1} + C_o c_t + b_o)
        h_t  = o_t tanh(c_t)

    with ``A = diag(a)`` and ``C = diag(p)``. x: [B, T, d_in].
    Returns (h: [B, T, d], {"c": c_T, "h": h_T}).
    """
    B, T, _ = x.shape
    d = W_f.shape[1]
    c = _init(state0, "c", x.new_zeros(B, d))
    h = _init(state0, "h", x.new_zeros(B, d))
    ys = []
    for t in range(T):
        xt = x[:, t]
        f = _sigmoid(xt @ W_f + a_f * h + p_f * c + b_f)
        c_tilde = torch.tanh(xt @ W_c + a_c * h + b_c)
        c = f * c + (1 - f) * c_tilde
        o = _sigmoid(xt @ W_o + a_o * h + p_o * c + b_o)
        h = o * torch.tanh(c)
        ys.append(h)
    return torch.stack(ys, 1), {"c": c, "h": h}


# --------------------------------------------------------------------------------------
# Block-diagonal transitions and coupled affine groups
# --------------------------------------------------------------------------------------

def state_tracking_lrnn(x, W_theta, W_phi, W_beta, W_v, state0=None):
    """A state-tracking linear RNN with input-dependent 2 x 2 blocks (Grazzi, Siems et al.
    2024, generalised Householder transitions with beta in (0, 2); Fan et al. 2024,
    block-diagonal input-dependent transitions), each block's matrices built explicitly:

        H_t = I - beta_t w_t w_t^T,   w_t = (cos phi_t, sin phi_t),   beta_t = 2 sigmoid(x_t W_beta)
        R_t = [[cos theta_t, -sin theta_t], [sin theta_t, cos theta_t]],  theta_t = pi tanh(x_t W_theta)
        h_t = R_t (H_t h_{t-1} + beta_t w_t v_t),   v_t = x_t W_v,   per block

    x: [B, T, d]; the state h: [B, n, 2]. Returns (h: [B, T, n, 2], {"h": h_T}).
    """
    B, T, _ = x.shape
    n = W_theta.shape[1]
    h = _init(state0, "h", x.new_zeros(B, n, 2))
    eye = torch.eye(2, dtype=x.dtype, device=x.device)
    ys = []
    for t in range(T):
        xt = x[:, t]
        theta = math.pi * torch.tanh(xt @ W_theta)
        phi = xt @ W_phi
        beta = 2 * _sigmoid(xt @ W_beta)
        v = xt @ W_v
        w = torch.stack([torch.cos(phi), torch.sin(phi)], -1)  # [B, n, 2]
        householder = eye - beta[..., None, None] * w[..., :, None] * w[..., None, :]
        c, s = torch.cos(theta), torch.sin(theta)
        rotation = torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)  # [B, n, 2, 2]
        reflected = (householder @ h[..., None])[..., 0] + beta[..., None] * w * v[..., None]
        h = (rotation @ reflected[..., None])[..., 0]
        ys.append(h)
    return torch.stack(ys, 1), {"h": h}


def titans(q, k, v, a, e, g, state0=None):
    """Titans' neural memory with momentum (Behrouz, Zhong and Mirrokni 2024, Eqs. 9-14),
    linear memory ``M(k) = k W`` (row-vector convention), the gradient taken by autograd:

        loss_t(W) = 1/2 ||k_t W - v_t||^2
        S_t = eta_t S_{t-1} - theta_t grad loss_t(W_{t-1})      (momentum, "surprise")
        W_t = (1 - alpha_t) W_{t-1} + S_t                       (forgetting gate)
        y_t = q_t W_t

    with alpha = sigmoid(a), eta = sigmoid(e), theta = sigmoid(g) (the paper's 2 of the
    squared loss is folded into theta by the 1/2). q, k: [B, T, dk]; v: [B, T, dv];
    a, e, g: [B, T]. States "M" (the momentum S) and "W". Returns (y: [B, T, dv], states).
    """
    B, T, dk = q.shape
    dv = v.shape[-1]
    momentum = _init(state0, "M", q.new_zeros(B, dk, dv))
    memory = _init(state0, "W", q.new_zeros(B, dk, dv))
    ys = []
    for t in range(T):
        alpha, eta, theta = _sigmoid(a[:, t]), _sigmoid(e[:, t]), _sigmoid(g[:, t])
        with torch.enable_grad():
            point = memory if memory.requires_grad else memory.detach().requires_grad_(True)
            prediction = torch.einsum("bi,bij->bj", k[:, t], point)
            loss = 0.5 * (prediction - v[:, t]).square().sum()
            (grad,) = torch.autograd.grad(loss, point, create_graph=torch.is_grad_enabled())
        momentum = eta[:, None, None] * momentum - theta[:, None, None] * grad
        memory = (1 - alpha)[:, None, None] * memory + momentum
        ys.append(torch.einsum("bi,bij->bj", q[:, t], memory))
    return torch.stack(ys, 1), {"M": momentum, "W": memory}


def titans_joint_form(q, k, v, a, e, g):
    """Titans with momentum as one linear recurrence of the stacked state X = [S; W] ([2 dk, dv]),
    from S_0 = W_0 = 0, the transition written out from the update rules:

        X_t = [[eta I, -theta k k^T], [eta I, (1 - alpha) I - theta k k^T]] X_{t-1} + [theta k v^T; theta k v^T]
    """
    B, T, dk = q.shape
    eye = torch.eye(dk, dtype=q.dtype, device=q.device)
    stacked = q.new_zeros(B, 2 * dk, v.shape[-1])
    ys = []
    for t in range(T):
        alpha, eta, theta = (_sigmoid(z[:, t])[:, None, None] for z in (a, e, g))
        kk = k[:, t, :, None] * k[:, t, None, :]
        top = torch.cat([eta * eye, -theta * kk], -1)
        bottom = torch.cat([eta * eye, (1 - alpha) * eye - theta * kk], -1)
        transition = torch.cat([top, bottom], -2)
        written = theta * k[:, t, :, None] * v[:, t, None, :]
        stacked = transition @ stacked + torch.cat([written, written], -2)
        ys.append(torch.einsum("bi,bij->bj", q[:, t], stacked[:, dk:]))
    return torch.stack(ys, 1)


# --------------------------------------------------------------------------------------
# sLSTM of xLSTM (Beck et al. 2024)
# --------------------------------------------------------------------------------------

def _head_blocks(R, heads):
    """The diagonal blocks ``[heads, dh, dh]`` of a recurrent matrix ``[d, d]``, d = heads * dh
    (the recurrence of head ``k`` reads only that head's ``dh`` elements of h)."""
    dh = R.shape[0] // heads
    return torch.stack([R[k * dh:(k + 1) * dh, k * dh:(k + 1) * dh] for k in range(heads)])


def _per_head(h, blocks):
    """``h @ blockdiag(blocks)`` for ``h: [B, d]`` and ``blocks: [heads, dh, dh]``."""
    heads, dh, _ = blocks.shape
    return torch.einsum("bki,kij->bkj", h.reshape(h.shape[0], heads, dh), blocks).reshape(h.shape)


def slstm(x, W_z, W_i, W_f, W_o, R_z, R_i, R_f, R_o, b_z, b_i, b_f, b_o, heads, state0=None):
    """sLSTM (Beck et al. 2024, "xLSTM", Sec. 2.2 and the stabilised form of App. A), with the
    sigmoid forget gate and recurrent weights acting within each head:

        z_t = tanh(W_z x_t + R_z h_{t-1} + b_z)        (R_* block-diagonal per head)
        i~_t = W_i x_t + R_i h_{t-1} + b_i,  log f_t = logsigmoid(W_f x_t + R_f h_{t-1} + b_f)
        o_t = sigmoid(W_o x_t + R_o h_{t-1} + b_o)
        m_t = max(log f_t + m_{t-1}, i~_t)
        i'_t = exp(i~_t - m_t),  f'_t = exp(log f_t + m_{t-1} - m_t)
        c_t = f'_t c_{t-1} + i'_t z_t,  n_t = f'_t n_{t-1} + i'_t,  h_t = o_t c_t / n_t

    Only the diagonal blocks of the ``[d, d]`` matrices ``R_*`` are read.  x: [B, T, d_in].
    Returns (h: [B, T, d], {"c", "n", "m", "h"} at T).
    """
    B, T, _ = x.shape
    d = W_z.shape[1]
    blocks = {g: _head_blocks(R, heads) for g, R in (("z", R_z), ("i", R_i), ("f", R_f), ("o", R_o))}
    c, n, m, h = (_init(state0, name, x.new_zeros(B, d)) for name in ("c", "n", "m", "h"))
    ys = []
    for t in range(T):
        xt = x[:, t]
        z = torch.tanh(xt @ W_z + _per_head(h, blocks["z"]) + b_z)
        i_tilde = xt @ W_i + _per_head(h, blocks["i"]) + b_i
        log_f = F.logsigmoid(xt @ W_f + _per_head(h, blocks["f"]) + b_f)
        o = _sigmoid(xt @ W_o + _per_head(h, blocks["o"]) + b_o)
        m_new = torch.maximum(log_f + m, i_tilde)
        i_gate = torch.exp(i_tilde - m_new)
        f_gate = torch.exp(log_f + m - m_new)
        c = f_gate * c + i_gate * z
        n = f_gate * n + i_gate
        m = m_new
        h = o * c / n
        ys.append(h)
    return torch.stack(ys, 1), {"c": c, "n": n, "m": m, "h": h}


def slstm_unstabilised(x, W_z, W_i, W_f, W_o, R_z, R_i, R_f, R_o, b_z, b_i, b_f, b_o, heads):
    """sLSTM from the zero state without the stabiliser (Beck et al. 2024, Eqs. 8-14):
    ``c_t = f_t c_{t-1} + i_t z_t``, ``n_t = f_t n_{t-1} + i_t`` with ``i_t = exp(i~_t)``,
    ``f_t = sigmoid(f~_t)``, ``h_t = o_t c_t / n_t``.  Equal to :func:`slstm`'s h while
    ``exp(i~_t)`` does not overflow.  Returns h: [B, T, d]."""
    B, T, _ = x.shape
    d = W_z.shape[1]
    blocks = {g: _head_blocks(R, heads) for g, R in (("z", R_z), ("i", R_i), ("f", R_f), ("o", R_o))}
    c, n, h = x.new_zeros(B, d), x.new_zeros(B, d), x.new_zeros(B, d)
    ys = []
    for t in range(T):
        xt = x[:, t]
        z = torch.tanh(xt @ W_z + _per_head(h, blocks["z"]) + b_z)
        i = torch.exp(xt @ W_i + _per_head(h, blocks["i"]) + b_i)
        f = _sigmoid(xt @ W_f + _per_head(h, blocks["f"]) + b_f)
        o = _sigmoid(xt @ W_o + _per_head(h, blocks["o"]) + b_o)
        c = f * c + i * z
        n = f * n + i
        h = o * c / n
        ys.append(h)
    return torch.stack(ys, 1)


# --------------------------------------------------------------------------------------
# Bidirectional cells (reverse states)
# --------------------------------------------------------------------------------------

def lion(q, k, v, a, state0=None):
    """LION-S (Afzal et al. 2025, arXiv:2502.16249) from its full-attention form,

        Y = C^-1 (Q K^T * M) V,   C_i = sum_j (Q K^T * M)_ij,
        M_ij = prod_{l=j+1..i} lambda_l (j <= i),  prod_{l=i+1..j} lambda_l (j > i),

    with lambda = sigmoid(a), queries and keys through softplus. An initial state adds the
    terms of the states before the first step (S^F_0, z^F_0, decayed by lambda_1..i) and
    after the last (S^B_{T+1}, z^B_{T+1}, decayed by lambda_{i+1..T} and "lam_next", the
    decay lambda_{T+1}). q, k: [B, T, dk], v: [B, T, dv], a: [B, T].
    Returns (y: [B, T, dv], final states {Sf: S^F_T, zf, Sb: S^B_1, zb, lam_next: lambda_1}).
    """
    B, T, dk = q.shape
    dv = v.shape[-1]
    qf, kf = F.softplus(q), F.softplus(k)
    log_lam = F.logsigmoid(a)
    L = log_lam.cumsum(1)  # L_i = log prod_{l<=i} lambda_l
    index = torch.arange(T, device=q.device)
    gap = L[:, :, None] - L[:, None, :]  # L_i - L_j
    M = torch.where(index[:, None] >= index[None, :], gap, -gap).exp()
    A = (qf @ kf.transpose(1, 2)) * M
    Sf0 = _init(state0, "Sf", q.new_zeros(B, dk, dv))
    zf0 = _init(state0, "zf", q.new_zeros(B, dk))
    Sb0 = _init(state0, "Sb", q.new_zeros(B, dk, dv))
    zb0 = _init(state0, "zb", q.new_zeros(B, dk))
    lam_end = _init(state0, "lam_next", q.new_ones(B))
    from_start = L.exp()  # prod_{l<=i} lambda_l
    to_end = (L[:, -1:] - L).exp() * lam_end[:, None]  # prod_{l=i+1..T+1} lambda_l
    numerator = A @ v + from_start[..., None] * (qf @ Sf0) + to_end[..., None] * (qf @ Sb0)
    denominator = A.sum(-1) + from_start * (qf @ zf0[..., None])[..., 0] + to_end * (qf @ zb0[..., None])[..., 0]
    y = numerator / denominator[..., None]
    weight_end = (L[:, -1:] - L).exp()  # prod_{l=j+1..T} lambda_l
    weight_first = (L - L[:, :1]).exp()  # prod_{l=2..j} lambda_l
    Sf = torch.einsum("bt,btk,btv->bkv", weight_end, kf, v) + L[:, -1].exp()[:, None, None] * Sf0
    zf = torch.einsum("bt,btk->bk", weight_end, kf) + L[:, -1].exp()[:, None] * zf0
    back = (L[:, -1] - L[:, 0]).exp() * lam_end
    Sb = torch.einsum("bt,btk,btv->bkv", weight_first, kf, v) + back[:, None, None] * Sb0
    zb = torch.einsum("bt,btk->bk", weight_first, kf) + back[:, None] * zb0
    return y, {"Sf": Sf, "zf": zf, "Sb": Sb, "zb": zb, "lam_next": log_lam[:, 0].exp()}


def bigru_torch(x, state0=None, **weights):
    """torch.nn.GRU(batch_first=True, bidirectional=True) with the given weights (the
    reverse direction's blocks carry the suffix b, as in examples/bigru.rec).

    Returns ((h: [B, T, d], g: [B, T, d]), {"h": h_T, "g": g_1}).
    """
    d_in, d = weights["W_ir"].shape
    module = torch.nn.GRU(d_in, d, batch_first=True, bidirectional=True).to(dtype=x.dtype, device=x.device)
    layout = {}
    for suffix, torch_suffix in (("", ""), ("b", "_reverse")):
        w = {name: weights[name + suffix] for name in ("W_ir", "W_iz", "W_in", "W_hr", "W_hz", "W_hn", "b_ir", "b_iz", "b_in", "b_hr", "b_hz", "b_hn")}
        layout[f"weight_ih_l0{torch_suffix}"] = torch.cat([w["W_ir"], w["W_iz"], w["W_in"]], dim=1).T
        layout[f"weight_hh_l0{torch_suffix}"] = torch.cat([w["W_hr"], w["W_hz"], w["W_hn"]], dim=1).T
        layout[f"bias_ih_l0{torch_suffix}"] = torch.cat([w["b_ir"], w["b_iz"], w["b_in"]])
        layout[f"bias_hh_l0{torch_suffix}"] = torch.cat([w["b_hr"], w["b_hz"], w["b_hn"]])
    B = x.shape[0]
    h0 = _init(state0, "h", x.new_zeros(B, d))
    g0 = _init(state0, "g", x.new_zeros(B, d))
    out, h_n = torch.func.functional_call(module, layout, (x, torch.stack([h0, g0])))
    return (out[..., :d], out[..., d:]), {"h": h_n[0], "g": h_n[1]}


def crf_marginals(emit, trans, start, stop, state0=None):
    """Log marginals log P(y_t = j | emit) of a linear-chain CRF, as the gradient of the
    log-partition function (the forward algorithm of :func:`crf`) with respect to the
    emissions: d log Z / d emit_t[j] = P(y_t = j).  An initial state replaces the start
    scores ("prior") and the stop scores ("beta", the backward variables after the last step).

    Returns (log p: [B, T, n], {"prior": prior_{T+1}, "beta": beta_0}), where
    beta_0[i] = log Z of the paths that follow label i at a step before the first.
    """
    B, T, n = emit.shape
    prior0 = _init(state0, "prior", start.expand(B, n))
    beta_end = _init(state0, "beta", stop.expand(B, n))
    with torch.enable_grad():
        e = emit if emit.requires_grad else emit.detach().requires_grad_()
        (_, logZ), final = crf(e, trans, start, beta_end, state0={"prior": prior0})
        (marginals,) = torch.autograd.grad(logZ[:, -1].sum(), e, create_graph=True)
    beta0 = torch.stack(
        [crf(emit, trans, start, beta_end, state0={"prior": trans[i].expand(B, n)})[0][1][:, -1] for i in range(n)], -1)
    return marginals.log(), {"prior": final["prior"], "beta": beta0}
