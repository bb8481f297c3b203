"""The uncertainty calibrations (engine/calibration.py): monotone in the score, and honest on
average when the score ranks poorly (a noisy network's case), on synthetic scores and errors."""
import numpy as np
import pytest

from cryoposeml.engine.calibration import cross_fitted_ece, fit_calibration, fit_isotonic_calibration


@pytest.mark.parametrize("fit", [fit_calibration, fit_isotonic_calibration])
def test_a_score_that_ranks_nothing_gets_the_mean_error(fit):
    """Errors independent of the score (a bimodal mix, as a network's right poses and flips): the
    calibrated expected error averages to the mean error. A running minimum over the bins instead
    gave 37 deg for a mean error of 57 deg (test_train_predict's network at SNR 1 before the fix)."""
    rng = np.random.default_rng(0)
    n = 130
    score = rng.uniform(0, 1, n)
    err = np.where(rng.uniform(0, 1, n) < 0.6, rng.gamma(2, 5, n), rng.uniform(90, 180, n))
    calib = fit(score, err)
    expected = calib.expected_error(score)
    assert abs(expected.mean() - err.mean()) < 0.05 * err.mean(), (expected.mean(), err.mean())
    assert np.all(np.diff(calib.expected_error_deg) <= 1e-9) and np.all(np.diff(calib.fom) >= -1e-9)


@pytest.mark.parametrize("fit", [fit_calibration, fit_isotonic_calibration])
def test_a_score_that_ranks_well_is_followed(fit):
    """Error falling with the score, plus noise: the calibration follows it (cross-fitted ECE of a few
    degrees against errors spread over 100 deg) and the FOM rises with the score."""
    rng = np.random.default_rng(1)
    n = 400
    score = rng.uniform(0, 1, n)
    err = np.abs(100 * (1 - score) + rng.normal(0, 5, n))
    ece, out_of_fold = cross_fitted_ece(score, err, fit)
    assert ece < 6, ece
    assert np.corrcoef(out_of_fold, err)[0, 1] > 0.95
    calib = fit(score, err)
    top = score > np.quantile(score, 0.9)        # the most confident tenth: ~3/4 of them under 10 deg
    fom = calib.figure_of_merit(score)
    assert fom[score < 0.5].max() < 0.05 and abs(fom[top].mean() - np.mean(err[top] < 10)) < 0.15
