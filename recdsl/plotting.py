"""Figures: time against sequence length for ``recdsl bench`` and ``benchmarks/``.

matplotlib is an optional dependency (``pip install recdsl[plot]``), imported only when a
figure is asked for, with the non-interactive Agg backend so that plots are written on
machines without a display.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from .errors import MissingDependencyError


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend; a :class:`MissingDependencyError` if matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        raise MissingDependencyError("writing a plot needs matplotlib, which is not installed", expected="pip install 'recdsl[plot]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_times(series: Mapping[str, Mapping[str, Mapping[int, float]]], path: str | Path, title: str, x_label: str = "sequence length T") -> Path:
    """Write a log-log figure of time against length, one panel per pass, one line per form.

    ``series[pass_name][form][length]`` is milliseconds, e.g.
    ``{"forward": {"scan": {256: 1.2, 1024: 3.4}}, "forward+backward": {...}}``.
    Missing points (a form skipped at some length) are left out of its line.
    """
    plt = pyplot()
    passes = [name for name, forms in series.items() if any(forms.values())]
    figure, axes = plt.subplots(1, max(1, len(passes)), figsize=(5.5 * max(1, len(passes)), 4.2), squeeze=False)
    for axis, pass_name in zip(axes[0], passes):
        for form, times in series[pass_name].items():
            lengths = sorted(times)
            if lengths:
                axis.plot(lengths, [times[n] for n in lengths], marker="o", label=form)
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        ticks = sorted({n for times in series[pass_name].values() for n in times})
        axis.set_xticks(ticks, [str(n) for n in ticks])
        axis.minorticks_off()
        axis.set_xlabel(x_label)
        axis.set_ylabel("time (ms)")
        axis.set_title(pass_name)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
