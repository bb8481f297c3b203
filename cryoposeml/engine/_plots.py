"""Plot pieces shared by the commands that draw FSC curves (matplotlib, Agg, written atomically)."""
from __future__ import annotations

from pathlib import Path

from ..data._atomic import atomic_path

__all__ = ["pyplot", "plot_fsc_curves", "save_figure"]


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fsc_curves(ax, curves: dict, ylabel: str = "FSC") -> None:
    """``curves``: label -> (frequency 1/A, FSC); with the 0.5 and 0.143 thresholds."""
    for label, (freq, curve) in curves.items():
        ax.plot(freq, curve, label=label)
    for t in (0.5, 0.143):
        ax.axhline(t, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("spatial frequency (1/A)")
    ax.set_ylabel(ylabel)
    ax.set_ylim(-0.1, 1.05)
    ax.legend()


def save_figure(fig, path: Path) -> None:
    plt = pyplot()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
