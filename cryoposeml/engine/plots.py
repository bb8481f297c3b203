"""The figures cryoposeml draws (matplotlib): written as PNG by the commands (Agg backend, written
atomically) and shown by the Scipion viewers. One builder per figure, returning the Figure."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data._atomic import atomic_path

__all__ = ["pyplot", "plot_fsc_curves", "save_figure", "training_figure", "angular_distribution", "pose_figure", "abinitio_figure",
           "cleanup_figure", "refine_figure", "hetero_figure", "latent_figure", "live_map_figure"]


def pyplot():
    """matplotlib.pyplot (imported only when plotting); the non-interactive Agg backend unless an
    interactive one is already in use (the Scipion GUI's)."""
    import matplotlib

    if not _interactive_backend(matplotlib):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _interactive_backend(matplotlib) -> bool:
    import sys

    return "matplotlib.pyplot" in sys.modules and matplotlib.get_backend().lower() not in ("agg", "pdf", "svg", "ps")


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


# -- figures shared by the CLI (PNG files) and the Scipion viewers (interactive windows) ---------------
def training_figure(runs: dict):
    """``runs``: run name (full, half1, half2) -> metric rows (epoch, train_loss, val_median_deg,
    val_mean_deg). Loss and validation error per epoch."""
    fig, ax = pyplot().subplots(1, 2, figsize=(10, 3.8))
    for name, rows in runs.items():
        ep = [int(r["epoch"]) for r in rows]
        tag = "" if len(runs) == 1 else f" ({name})"
        ax[0].plot(ep, [float(r["train_loss"]) for r in rows], label=f"train loss{tag}")
        ax[1].plot(ep, [float(r["val_median_deg"]) for r in rows], label=f"validation median{tag}")
        ax[1].plot(ep, [float(r["val_mean_deg"]) for r in rows], ls="--", label=f"validation mean{tag}")
    ax[0].set_xlabel("epoch")
    ax[0].set_yscale("log")
    ax[0].legend()
    ax[1].set_xlabel("epoch")
    ax[1].set_ylabel("angular error (deg)")
    ax[1].legend()
    return fig


def angular_distribution(ax, angles_deg: np.ndarray) -> None:
    """Projection directions (Relion rot, tilt) on a Hammer projection, counts per cell."""
    angles_deg = np.asarray(angles_deg, np.float64).reshape(-1, 3)
    lon = np.radians((angles_deg[:, 0] + 180.0) % 360.0 - 180.0)
    lat = np.radians(90.0 - np.clip(angles_deg[:, 1], 0.0, 180.0))
    bins = (72, 36) if len(lon) >= 5000 else (36, 18)   # 5 or 10 degree cells
    counts, xe, ye = np.histogram2d(lon, lat, bins=bins, range=[[-np.pi, np.pi], [-np.pi / 2, np.pi / 2]])
    mesh = ax.pcolormesh(xe, ye, np.ma.masked_equal(counts.T, 0), cmap="viridis", shading="flat")
    ax.grid(True, lw=0.4)
    ax.set_xticklabels([])
    ax.set_title(f"projection directions ({len(lon)} particles)", fontsize=10, pad=16)
    ax.figure.colorbar(mesh, ax=ax, orientation="horizontal", fraction=0.05, pad=0.04, label="particles")


def pose_figure(angles_deg: np.ndarray, expected_error_deg: np.ndarray | None, calibration=None,
                confidence: np.ndarray | None = None):
    """Predicted poses: angular distribution, expected-error histogram and, with the model's
    calibration, the held-out error vs confidence with this set's confidences beside it."""
    plt = pyplot()
    n_panels = 1 + (expected_error_deg is not None) + (calibration is not None)
    fig = plt.figure(figsize=(5.2 * n_panels, 4.2))
    angular_distribution(fig.add_subplot(1, n_panels, 1, projection="hammer"), angles_deg)
    k = 2
    if expected_error_deg is not None:
        ax = fig.add_subplot(1, n_panels, k)
        e = np.asarray(expected_error_deg, np.float64)
        ax.hist(e, bins=40, color="tab:blue")
        ax.axvline(np.median(e), color="tab:red", label=f"median {np.median(e):.1f} deg")
        ax.set_xlabel("expected angular error (deg)")
        ax.set_ylabel("particles")
        ax.legend()
        k += 1
    if calibration is not None:
        ax = fig.add_subplot(1, n_panels, k)
        ax.plot(calibration.confidence, calibration.expected_error_deg, "o-", color="tab:blue",
                label="held-out error per confidence bin")
        ax.set_xlabel("network confidence (raw score)")
        ax.set_ylabel("angular error on held-out particles (deg)")
        q = calibration.validation_confidence_quantiles
        ax.axvspan(q[1], q[3], color="tab:blue", alpha=0.1, label="held-out 25-75%")
        if confidence is not None and len(confidence):
            lo, hi = np.percentile(confidence, [25, 75])
            ax.axvspan(lo, hi, color="tab:orange", alpha=0.2, label="these particles 25-75%")
        ax.legend(fontsize=8)
    return fig


def cleanup_figure(summary: dict):
    """From cleanup's summary (``KEPT_cleanup.json``): resolution vs particles kept (the sweep, the
    choice circled) and the half-map FSC curves of all particles and of those kept."""
    rows, chosen, column = summary["sweep"], summary["chosen_index"], summary["column"]
    freq = np.asarray(summary["fsc_frequency_per_angstrom"])
    curves = {}
    if "fsc_all" in summary:   # (absent from summaries written before it was recorded)
        curves[f"all {summary['particles_in']}"] = (freq, np.asarray(summary["fsc_all"]))
    if summary["particles_kept"] != summary["particles_in"] or not curves:
        curves[f"kept {summary['particles_kept']}"] = (freq, np.asarray(summary["fsc_kept"]))
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(11, 4))
    kept = np.array([r["particles_kept"] for r in rows])
    res = np.array([r["resolution_fsc0143_angstrom"] for r in rows])
    a1.plot(kept, res, "o-", color="tab:blue")
    a1.plot(kept[chosen], res[chosen], "o", ms=12, mfc="none", mec="tab:red", mew=2,
            label=f"kept {kept[chosen]} ({rows[chosen]['fraction_kept']:.0%}): {res[chosen]:.2f} A")
    a1.set_xlabel(f"particles kept (most certain first, by {column})")
    a1.set_ylabel("half-map FSC 0.143 resolution (A)")
    a1.invert_yaxis()
    a1.legend()
    plot_fsc_curves(a2, curves, "half-map FSC")
    return fig


def refine_figure(freq: np.ndarray, fsc_half: np.ndarray, expected_error_deg: np.ndarray | None,
                  pose_change_deg: np.ndarray):
    """After the Relion local refinement: its half-map FSC, and how far Relion moved each particle
    from the predicted pose against the predicted expected error (a check of the uncertainty)."""
    fig, (a1, a2) = pyplot().subplots(1, 2, figsize=(11, 4))
    plot_fsc_curves(a1, {"refined half-maps": (np.asarray(freq), np.asarray(fsc_half))}, "half-map FSC")
    moved = np.asarray(pose_change_deg, np.float64)
    if expected_error_deg is None:
        a2.hist(moved, bins=40, color="tab:blue")
        a2.set_xlabel("pose change by Relion (deg)")
        a2.set_ylabel("particles")
        return fig
    e = np.asarray(expected_error_deg, np.float64)
    a2.scatter(e, moved, s=4, alpha=0.3, color="tab:blue", label="particles")
    order = np.argsort(e)
    chunks = [c for c in np.array_split(order, min(10, max(1, len(e) // 20))) if len(c)]
    a2.plot([e[c].mean() for c in chunks], [np.mean(moved[c]) for c in chunks], "o-", color="tab:red",
            label="mean per bin")
    top = float(max(np.percentile(e, 99), np.percentile(moved, 99), 1.0))
    a2.plot([0, top], [0, top], color="grey", lw=0.8, ls=":", label="y = x")
    a2.set_xlim(0, top * 1.05)
    a2.set_ylim(0, top * 1.05)
    a2.set_xlabel("predicted expected error (deg)")
    a2.set_ylabel("pose change by Relion (deg)")
    a2.legend(fontsize=8)
    return fig


def abinitio_figure(rows: list[dict], converged_medse: float):
    """Ab initio curves per epoch (``metrics.csv`` rows): the loss, and with a reference the pose
    error after the best global alignment (MedSE / MSE of ``||R - R_true||_F^2``)."""
    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    with_truth = "medse" in rows[0]
    fig, ax = plt.subplots(1, 2 if with_truth else 1, figsize=(10, 3.8), squeeze=False)
    ax[0, 0].plot(ep, [r["loss"] for r in rows])
    ax[0, 0].set_yscale("log")
    ax[0, 0].set_xlabel("epoch")
    ax[0, 0].set_ylabel("loss")
    searched = [r["epoch"] for r in rows if r.get("phase") == "search"]
    if searched:
        for a in ax[0]:
            a.axvspan(0.5, max(searched) + 0.5, color="0.9", zorder=0, label="pose search")
    if with_truth:
        a = ax[0, 1]
        a.plot(ep, [r["medse"] for r in rows], label="MedSE")
        a.plot(ep, [r["mse"] for r in rows], label="MSE")
        if "encoder_medse" in rows[0]:
            a.plot(ep, [r["encoder_medse"] for r in rows], "--", label="MedSE, encoder alone")
        a.axhline(converged_medse, ls=":", c="k", label="converged (10 deg)")
        a.set_yscale("log")
        a.set_xlabel("epoch")
        a.set_ylabel("||R - R_true||_F^2 after alignment")
        a.legend(fontsize=8)
    return fig


def hetero_figure(rows: list[dict]):
    """Heterogeneity curves per epoch: the loss (and the image loss and KL once the conformations
    learn), and with a reference the median pose error and the misclassification."""
    plt = pyplot()
    ep = [r["epoch"] for r in rows]
    with_truth = "median_deg" in rows[0]
    fig, ax = plt.subplots(1, 2 if with_truth else 1, figsize=(10, 3.8), squeeze=False)
    a = ax[0, 0]
    a.plot(ep, [r["loss"] for r in rows], label="loss")
    for key in ("image_loss", "kl", "task2_loss"):
        pts = [(r["epoch"], r[key]) for r in rows if r.get(key) not in (None, "")]
        if pts:
            a.plot(*zip(*pts), label=key.replace("_", " "))
    a.set_yscale("log")
    a.set_xlabel("epoch")
    a.legend(fontsize=8)
    searched = [r["epoch"] for r in rows if r.get("phase") == "search"]
    if searched:
        for b in ax[0]:
            b.axvspan(0.5, max(searched) + 0.5, color="0.9", zorder=0)
    if with_truth:
        a = ax[0, 1]
        a.plot(ep, [r["median_deg"] for r in rows], label="median pose error (deg)")
        pts = [(r["epoch"], 100 * r["misclassified"]) for r in rows if r.get("misclassified") not in (None, "")]
        if pts:
            a.plot(*zip(*pts), label="misclassified (%)")
        a.set_yscale("log")
        a.set_xlabel("epoch")
        a.legend(fontsize=8)
    return fig


def latent_figure(pcs: np.ndarray, labels: np.ndarray, states: np.ndarray | None = None):
    """The particles' conformations on the first two principal axes of z, coloured by class (and,
    given the true states, a second panel coloured by state), and PC1's histogram per class."""
    plt = pyplot()
    panels = 3 if states is not None else 2
    fig, ax = plt.subplots(1, panels, figsize=(4.2 * panels, 3.8))
    y = pcs[:, 1] if pcs.shape[1] > 1 else np.zeros(len(pcs))
    ax[0].scatter(pcs[:, 0], y, c=labels, s=4, cmap="tab10", vmin=0, vmax=9)
    ax[0].set_xlabel("PC1")
    ax[0].set_ylabel("PC2")
    ax[0].set_title("classes")
    for k in np.unique(labels):
        ax[1].hist(pcs[labels == k, 0], bins=40, alpha=0.6, label=f"class {k + 1}")
    ax[1].set_xlabel("PC1")
    ax[1].legend(fontsize=8)
    if states is not None:
        ax[2].scatter(pcs[:, 0], y, c=states, s=4, cmap="viridis")
        ax[2].set_xlabel("PC1")
        ax[2].set_title("true state")
    return fig


def live_map_figure(record: dict, volume: np.ndarray | None = None):
    """The live map of a streaming prediction: central slices of the map (top), its half-map FSC,
    the FSC-0.143 resolution against particles kept and against minutes since the first batch
    (bottom). ``record`` is the live map's ``history.json``."""
    plt = pyplot()
    rows = [r for r in record.get("batches", []) if r.get("resolution_fsc0143_angstrom")]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7.5))
    if volume is not None:
        c = volume.shape[0] // 2
        for ax, (name, plane) in zip(axes[0], (("z", volume[c]), ("y", volume[:, c]), ("x", volume[:, :, c]))):
            ax.imshow(plane, cmap="gray", origin="lower")
            ax.set_title(f"central slice, {name} = {c}")
            ax.set_axis_off()
    else:
        for ax in axes[0]:
            ax.set_axis_off()
        axes[0][1].set_title("no map yet")
    a, b, t = axes[1]
    if "fsc_half_maps" in record:
        plot_fsc_curves(a, {"half-map 1 vs 2": (np.asarray(record["fsc_frequency_per_angstrom"]),
                                                np.asarray(record["fsc_half_maps"]))})
    a.set_title(f"{rows[-1]['particles_kept']} particles kept" if rows else "half-map FSC")
    res = [r["resolution_fsc0143_angstrom"] for r in rows]
    b.plot([r["particles_kept"] for r in rows], res, "o-")
    b.set_xlabel("particles kept")
    b.set_ylabel("FSC 0.143 resolution (A)")
    b.set_title("resolution vs particles")
    if rows:
        t0 = min(r["time"] for r in record["batches"])
        t.plot([(r["time"] - t0) / 60 for r in rows], res, "o-")
    t.set_xlabel("minutes since the first batch")
    t.set_ylabel("FSC 0.143 resolution (A)")
    t.set_title("resolution vs time")
    return fig
