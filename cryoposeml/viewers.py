"""Scipion viewers: the plots of each cryoposeml protocol, opened from the protocol (Analyze Results).

Each viewer reads what its protocol wrote (metrics CSV, JSON summaries, STAR files, the output set)
and draws it with the figure builders of :mod:`cryoposeml.engine.plots`, the same figures the CLI
writes as PNG files. ``figure(name)`` returns the matplotlib Figure (used headless by the tests);
the GUI shows it in a window.
"""
import csv
from pathlib import Path

import numpy as np

import pyworkflow.protocol.params as params
from pyworkflow.viewer import DESKTOP_TKINTER
from pwem.viewers import EmProtocolViewer

from .protocols import (CryoPoseMLProtAbinitio, CryoPoseMLProtCleanup, CryoPoseMLProtHetero, CryoPoseMLProtLocalRefine,
                        CryoPoseMLProtPredict, CryoPoseMLProtTrain)


class _FigureViewer(EmProtocolViewer):
    """A form with one button per figure; ``_figures`` maps a LabelParam name to (label, builder)."""
    _environments = [DESKTOP_TKINTER]
    _figures: dict = {}

    def _defineParams(self, form):
        form.addSection(label="Plots")
        for name, (label, _) in self._figures.items():
            form.addParam(name, params.LabelParam, label=label)

    def _getVisualizeDict(self):
        return {name: (lambda _param=None, n=name: self._show(n)) for name in self._figures}

    def figure(self, name):
        """The matplotlib Figure for ``name`` (one of ``_figures``)."""
        return getattr(self, self._figures[name][1])()

    def _show(self, name):
        from pyworkflow.gui.plotter import Plotter

        try:
            fig = self.figure(name)
        except (OSError, KeyError, ValueError) as e:
            return [self.errorMessage(f"Nothing to plot yet: {e}", title="cryoposeml")]
        return [Plotter(figure=fig)]


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _particle_arrays(particles):
    """Relion angles (deg), and the expected error / confidence attributes, of a Scipion set."""
    from .core.rotations import scipion_matrix_to_relion

    mats, expected, confidence = [], [], []
    for p in particles.iterItems():
        mats.append(p.getTransform().getMatrix())
        expected.append(p._cryoposemlExpectedError.get() if hasattr(p, "_cryoposemlExpectedError") else np.nan)
        confidence.append(p._cryoposemlConfidence.get() if hasattr(p, "_cryoposemlConfidence") else np.nan)
    if not mats:
        raise ValueError("the output has no particles")
    angles, _ = scipion_matrix_to_relion(np.array(mats))
    expected, confidence = np.array(expected), np.array(confidence)
    return (angles, None if np.isnan(expected).all() else expected,
            None if np.isnan(confidence).all() else confidence)


class CryoPoseMLViewerTrain(_FigureViewer):
    """Training curves: loss and validation angular error per epoch (per half-set)."""
    _label = "cryoposeml training viewer"
    _targets = [CryoPoseMLProtTrain]
    _figures = {"showCurves": ("Training curves (loss, validation error)", "_trainingFigure")}

    def _trainingFigure(self):
        from .engine.plots import training_figure

        model = Path(self.protocol._getExtraPath("model"))
        runs = {run: _read_csv(model / run / "metrics.csv") for run in ("full", "half1", "half2")
                if (model / run / "metrics.csv").exists()}
        if not runs:
            raise OSError(f"no metrics.csv under {model}")
        return training_figure(runs)


class CryoPoseMLViewerPredict(_FigureViewer):
    """Predicted poses: angular distribution, expected-error histogram, and the model's held-out
    error vs confidence with these particles' confidences; the live map (central slices, half-map
    FSC, resolution vs particles kept and vs time). Both work while streaming."""
    _label = "cryoposeml prediction viewer"
    _targets = [CryoPoseMLProtPredict]
    _figures = {"showPoses": ("Angular distribution, uncertainty and calibration", "_poseFigure"),
                "showLiveMap": ("Live map: slices, half-map FSC, resolution vs particles and time", "_liveFigure")}

    def _poseFigure(self):
        from .engine.calibration import Calibration
        from .engine.plots import pose_figure
        from .objects import readModelMetadata

        out = getattr(self.protocol, "outputParticles", None)
        if out is None:
            raise ValueError("no particles predicted yet")
        angles, expected, confidence = _particle_arrays(out)
        meta = readModelMetadata(self.protocol._modelPath())
        run = "full" if "full" in meta["runs"] else sorted(meta["runs"])[0]
        calib = Calibration(**meta["runs"][run]["calibration"])
        return pose_figure(angles, expected, calib, confidence)

    def _liveFigure(self):
        """The map grown batch by batch (extra/live), as it stands now."""
        import json

        from .data.mrc import read_map
        from .engine.plots import live_map_figure

        folder = Path(self.protocol._getExtraPath("live"))
        with open(folder / "history.json") as f:
            record = json.load(f)
        volume = read_map(folder / "map.mrc")[0] if (folder / "map.mrc").exists() else None
        return live_map_figure(record, volume)


class CryoPoseMLViewerCleanup(_FigureViewer):
    """Cleanup: half-map resolution vs particles kept (the choice circled) and the FSC curves."""
    _label = "cryoposeml cleanup viewer"
    _targets = [CryoPoseMLProtCleanup]
    _figures = {"showSweep": ("Resolution vs particles kept, FSC", "_cleanupFigure")}

    def _cleanupFigure(self):
        from .engine.plots import cleanup_figure

        return cleanup_figure(self.protocol.summaryJson())


class CryoPoseMLViewerRefine(_FigureViewer):
    """Relion local refinement: half-map FSC, and how far Relion moved each particle from its
    predicted pose against the predicted expected error."""
    _label = "cryoposeml local-refine viewer"
    _targets = [CryoPoseMLProtLocalRefine]
    _figures = {"showRefine": ("FSC; pose change vs expected error", "_refineFigure")}

    def _refineFigure(self):
        from .data.star import read_star
        from .engine.plots import refine_figure

        s = self.protocol.summaryJson()
        refined = read_star(self.protocol._getExtraPath("refine", "refined.star")).particles
        if "rlnCpmlPoseChangeDeg" not in refined:
            raise KeyError("refined.star has no rlnCpmlPoseChangeDeg (made by an older cryoposeml)")
        expected = (refined["rlnCpmlExpectedErrorDeg"].to_numpy(float) if "rlnCpmlExpectedErrorDeg" in refined
                    else None)
        return refine_figure(np.asarray(s["fsc_frequency_per_angstrom"]), np.asarray(s["fsc_half_maps"]), expected,
                             refined["rlnCpmlPoseChangeDeg"].to_numpy(float))


__all__ = ["CryoPoseMLViewerTrain", "CryoPoseMLViewerPredict", "CryoPoseMLViewerCleanup", "CryoPoseMLViewerRefine",
           "CryoPoseMLViewerAbinitio", "CryoPoseMLViewerHetero"]

class CryoPoseMLViewerAbinitio(_FigureViewer):
    """Ab initio curves: the loss per epoch (first half-set, or the single run), with the pose-search
    epochs shaded, and the pose error when the run had a reference."""
    _label = "cryoposeml ab initio viewer"
    _targets = [CryoPoseMLProtAbinitio]
    _figures = {"showCurves": ("Loss (and pose error) per epoch", "_abinitioFigure")}

    def _abinitioFigure(self):
        from .engine.abinitio import CONVERGED_MEDSE
        from .engine.plots import abinitio_figure

        out = Path(self.protocol._getExtraPath("abinitio"))
        path = out / "half1" / "metrics.csv"
        if not path.exists():
            path = out / "metrics.csv"
        rows = [{k: v if k == "phase" else float(v) for k, v in r.items() if v != ""} for r in _read_csv(path)]
        if not rows:
            raise ValueError("no epoch finished yet")
        return abinitio_figure(rows, CONVERGED_MEDSE)


class CryoPoseMLViewerHetero(_FigureViewer):
    """Heterogeneity: the particles' conformations on the first two principal axes of z, coloured by
    class (from the output set), and the loss curves."""
    _label = "cryoposeml heterogeneity viewer"
    _targets = [CryoPoseMLProtHetero]
    _figures = {"showLatent": ("Conformations (PCA of z) by class", "_latentFigure"),
                "showCurves": ("Loss per epoch", "_curvesFigure")}

    def _latentFigure(self):
        from .engine.hetero import pca
        from .engine.plots import latent_figure

        z, labels = [], []
        for p in self.protocol.outputParticles.iterItems():
            z.append([float(v) for v in p._cryoposemlZ])
            labels.append(p.getClassId() - 1)
        if not z:
            raise ValueError("the output has no particles")
        return latent_figure(pca(np.array(z))[0], np.array(labels))

    def _curvesFigure(self):
        from .engine.plots import hetero_figure

        rows = [{k: v if k == "phase" else float(v) for k, v in r.items() if v != ""}
                for r in _read_csv(Path(self.protocol._getExtraPath("hetero", "metrics.csv")))]
        if not rows:
            raise ValueError("no epoch finished yet")
        return hetero_figure(rows)
