"""Uncertainty calibration: a network's raw confidence score -> expected angular error (degrees)
and a figure of merit (probability that the error is under a threshold), fitted on held-out
particles with monotone (isotonic) regression, binned or not, and scored with ECE and AUROC."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Calibration", "fit_calibration", "fit_isotonic_calibration", "expected_calibration_error", "auroc",
           "cross_fitted_ece"]


@dataclass
class Calibration:
    """Piecewise-linear maps from confidence (ascending knots) to expected error and to FOM."""

    confidence: list
    expected_error_deg: list
    fom: list
    fom_threshold_deg: float
    validation_confidence_quantiles: list   # 5, 25, 50, 75, 95 % of the held-out scores

    def expected_error(self, score: np.ndarray) -> np.ndarray:
        return np.interp(score, self.confidence, self.expected_error_deg)

    def figure_of_merit(self, score: np.ndarray) -> np.ndarray:
        return np.clip(np.interp(score, self.confidence, self.fom), 0.0, 1.0)

    def to_dict(self) -> dict:
        return asdict(self)


def fit_calibration(score: np.ndarray, error_deg: np.ndarray, n_bins: int = 10,
                    fom_threshold_deg: float = 10.0) -> Calibration:
    """Bin held-out particles by score quantile; the bins' mean errors are made to decrease (and their
    FOMs to increase) with the score by pooling adjacent violators (isotonic regression weighted by
    the bins' sizes), so more confident never means a larger error and the mean expected error stays
    the mean error (a running minimum instead would bias it low wherever the score ranks poorly)."""
    from sklearn.isotonic import IsotonicRegression

    score, error_deg = np.asarray(score, np.float64), np.asarray(error_deg, np.float64)
    n_bins = max(1, min(n_bins, len(score) // 5))
    order = np.argsort(score)
    chunks = np.array_split(order, n_bins)
    centres = np.array([score[c].mean() for c in chunks])
    sizes = np.array([len(c) for c in chunks], np.float64)
    err = np.array([error_deg[c].mean() for c in chunks])
    fom = np.array([np.mean(error_deg[c] < fom_threshold_deg) for c in chunks])
    rank = np.arange(n_bins, dtype=np.float64)
    err = IsotonicRegression(increasing=False).fit_transform(rank, err, sample_weight=sizes)
    fom = IsotonicRegression(increasing=True).fit_transform(rank, fom, sample_weight=sizes)
    q = np.percentile(score, [5, 25, 50, 75, 95]).tolist()
    return Calibration(centres.tolist(), err.tolist(), fom.tolist(), fom_threshold_deg, q)


def fit_isotonic_calibration(score: np.ndarray, error_deg: np.ndarray, fom_threshold_deg: float = 10.0,
                             max_knots: int = 64) -> Calibration:
    """Isotonic regression (scikit-learn) of the error and of ``error < threshold`` on the score:
    the expected error never increases, nor the FOM decreases, with the score. The fitted steps
    are kept as knots of the piecewise-linear :class:`Calibration` (at most ``max_knots``, at
    quantiles of the score)."""
    from sklearn.isotonic import IsotonicRegression

    score, error_deg = np.asarray(score, np.float64), np.asarray(error_deg, np.float64)
    err = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(score, error_deg)
    fom = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(
        score, (error_deg < fom_threshold_deg).astype(np.float64))
    knots = np.unique(np.quantile(score, np.linspace(0, 1, max_knots)))
    q = np.percentile(score, [5, 25, 50, 75, 95]).tolist()
    return Calibration(knots.tolist(), err.predict(knots).tolist(), fom.predict(knots).tolist(), fom_threshold_deg, q)


def cross_fitted_ece(score: np.ndarray, error_deg: np.ndarray, fit=fit_calibration, folds: int = 5,
                     seed: int = 0) -> tuple[float, np.ndarray]:
    """ECE of a calibration judged on particles it was not fitted on: each fold's expected errors
    come from a calibration fitted on the other folds. Returns ``(ece, out_of_fold_expected)``."""
    fold = np.random.default_rng(seed).permutation(len(error_deg)) % folds
    out = np.empty(len(error_deg))
    for f in range(folds):
        out[fold == f] = fit(score[fold != f], error_deg[fold != f]).expected_error(score[fold == f])
    return expected_calibration_error(out, error_deg), out


def expected_calibration_error(predicted_deg: np.ndarray, actual_deg: np.ndarray, n_bins: int = 10) -> float:
    """Mean |predicted - actual| error (degrees) over equal-count bins of the prediction."""
    order = np.argsort(predicted_deg)
    chunks = [c for c in np.array_split(order, min(n_bins, max(1, len(order)))) if len(c)]
    gaps = [abs(predicted_deg[c].mean() - actual_deg[c].mean()) * len(c) for c in chunks]
    return float(np.sum(gaps) / len(order))


def auroc(score_positive_high: np.ndarray, is_positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for detecting ``is_positive`` (rank formula, ties
    counted half). NaN when one class is empty."""
    s = np.asarray(score_positive_high, np.float64)
    y = np.asarray(is_positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    from scipy.stats import rankdata

    ranks = rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
