"""Small dims for every example cell, shared by the backend tests.

Small keeps the sequential reference (and Triton's interpreter) fast; distinct values
catch transposed axes.
"""

from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

DIMS = {
    "mingru": dict(d_in=3, d=4),
    "minlstm": dict(d_in=3, d=4),
    "lru": dict(d=3, n=4),
    "hgrn": dict(d_in=3, d=4, lower=0.3),
    "rglru": dict(d=4),
    "s6": dict(d=3, n=4),
    "mamba2": dict(p=4, n=3),
    "gla": dict(dk=4, dv=3),
    "retnet": dict(dk=4, dv=3),
    "mlstm": dict(dk=4, dv=3),
    "deltanet": dict(dk=4, dv=3),
    "gated_deltanet": dict(dk=4, dv=3),
    "rwkv6": dict(dk=4, dv=3),
    "ttt_linear": dict(dk=4, dv=3),
    "hgrn2": dict(d_in=3, dk=4, dv=3, lower=0.3),
    "aaren": dict(d=3),
    "gru": dict(d_in=3, d=4),
    "lstm": dict(d_in=3, d=4),
    "crf": dict(n=3),
    "paragru": dict(d_in=3, d=4),
    "paralstm": dict(d_in=3, d=4),
    "s4d": dict(d=3, N=4),
    "state_tracking_lrnn": dict(d=3, n=4),
    "titans": dict(dk=4, dv=3),
    "slstm": dict(d_in=3, heads=2, dh=2),
    "lion": dict(dk=4, dv=3),
    "bigru": dict(d_in=3, d=4),
    "crf_marginals": dict(n=3),
}
