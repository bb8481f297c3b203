"""3D cleanup: drop the particles whose predicted poses are least certain.

Methods
- ``quantile``: drop the given fraction of most uncertain particles (default 25%).
- ``max-error``: drop particles whose expected error exceeds a bound (degrees).
- ``auto``: sweep the fraction kept (100% down to ``min_keep`` in ``step`` steps), reconstruct the
  two half-maps of each subset (one pass over the images; the half-sets stay independent), and keep
  the subset with the best half-map FSC-0.143 resolution. Resolutions within ``tie_shells`` Fourier
  shells of the best count as ties, and ties go to the larger subset. With verified poses that
  carry ``rlnCpmlMatchQuantile`` (the share of the model's good calibration particles that match
  the map worse), particles under ``junk_quantile`` are junk first: a test each good particle
  fails with probability ``junk_quantile``, where the FSC hardly notices a few percent of junk (it
  only adds noise at random poses). The sweep then runs on the rest.

The score is ``rlnCpmlMatchZ`` (the verified prediction's match z-score, larger is better: junk
matches no view of the map) when the STAR has it, else ``rlnCpmlExpectedErrorDeg`` (smaller is
better), unless another column is named; for
``rlnParticleFigureOfMerit``-like columns larger is better. Ties (the calibration is flat at its
ends) are ordered by the network's raw score ``rlnCpmlConfidence`` when the STAR has it.

Outputs for ``--out KEPT.star``: ``KEPT.star`` (written last), ``KEPT_discarded.star``,
``KEPT_cleanup.json`` (the sweep and the choice), ``KEPT_cleanup.png`` (resolution vs particles
kept, FSC curves), and the kept set's ``KEPT_map.mrc`` with half-maps. Particles without
``rlnRandomSubset`` get a fixed random split, written into both STAR files.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.metrics import fsc, resolution_at, soft_sphere_mask
from ..data.mrc import write_map
from ..data.star import ParticleStar, read_star, write_star
from ..options import option
from ._outputs import check_new_file, stamp, write_json
from .plots import cleanup_figure, save_figure
from .reconstruct import ReconstructionResult, half_map_paths, half_set_labels, nested_half_reconstructions

__all__ = ["CleanupConfig", "cleanup", "cleanup_paths", "score_order"]

log = logging.getLogger(__name__)

DEFAULT_COLUMN = "rlnCpmlExpectedErrorDeg"
LARGER_IS_BETTER = {"rlnParticleFigureOfMerit", "rlnMaxValueProbDistribution", "rlnCpmlPoseProbability",
                    "rlnLogLikeliContribution", "rlnCpmlMatchZ"}
#: verified poses are ranked by their match z (junk matches no view of the map) unless a column is named
MATCH_COLUMN = "rlnCpmlMatchZ"
#: written by predict against the model's own reference: the junk test of ``auto``
QUANTILE_COLUMN = "rlnCpmlMatchQuantile"
METHODS = ("auto", "quantile", "max-error")
TIE_BREAK = "rlnCpmlConfidence"


@dataclass
class CleanupConfig:
    method: str = option("auto", choices=METHODS)
    quantile: float = option(0.25, "quantile: fraction of most uncertain particles dropped")
    max_error_deg: float | None = option(None, "max-error: drop particles whose expected error exceeds this (degrees)",
                                         flag="--max-error", none_means="none; needed by --method max-error")
    column: str = option(DEFAULT_COLUMN, "uncertainty column")
    larger_is_better: bool | None = option(None, "the column is a confidence (--no-larger-is-better: an error)",
                                           none_means="from the column's name; known confidence columns are "
                                                      "recognised")
    sym: str = option("C1", "point group for the reconstructions")
    min_keep: float = option(0.5, "auto: smallest fraction of particles tried")
    step: float = option(0.05, "auto: step of the fraction kept")
    tie_shells: float = option(0.25, "auto: resolutions within this many Fourier shells tie; ties keep more particles")
    junk_quantile: float = option(0.01, "auto: particles with rlnCpmlMatchQuantile below this are junk (the share of "
                                        "good particles the test loses); 0: no junk test")
    regularization: float = 1e-3
    batch_size: int = option(256)

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown cleanup method {self.method!r} (choose from {', '.join(METHODS)})")
        if self.method == "quantile" and not 0.0 <= self.quantile < 1.0:
            raise InputError(f"--quantile must be in [0, 1), got {self.quantile}")
        if self.method == "max-error" and self.max_error_deg is None:
            raise InputError("--method max-error needs --max-error DEG")
        if self.method == "auto":
            if not 0.0 < self.min_keep <= 1.0:
                raise InputError(f"--min-keep must be in (0, 1], got {self.min_keep}")
            if not 0.0 < self.step < 1.0:
                raise InputError(f"--step must be in (0, 1), got {self.step}")
            if self.tie_shells < 0:
                raise InputError(f"--tie-shells must be >= 0, got {self.tie_shells}")
            if not 0.0 <= self.junk_quantile < 0.5:
                raise InputError(f"--junk-quantile must be in [0, 0.5), got {self.junk_quantile}")


def cleanup_paths(out: Path) -> dict[str, Path]:
    stem = out.with_suffix("")
    base = stem.parent / stem.name
    m = Path(f"{base}_map.mrc")
    h1, h2, _ = half_map_paths(m)
    return {"kept": out, "discarded": Path(f"{base}_discarded.star"), "summary": Path(f"{base}_cleanup.json"),
            "plot": Path(f"{base}_cleanup.png"), "map": m, "half1": h1, "half2": h2}


def score_order(star: ParticleStar, column: str, larger_is_better: bool | None) -> tuple[np.ndarray, np.ndarray, bool]:
    """``(order, score, larger_is_better)``: particle indices from most to least certain."""
    star.require([column], "cleanup (run cryoposeml predict first, or name another --column)")
    score = star.particles[column].to_numpy(np.float64)
    bad = ~np.isfinite(score)
    if bad.any():
        raise InputError(f"{column} is not a finite number in {int(bad.sum())} row(s) (first: row "
                         f"{int(np.nonzero(bad)[0][0]) + 1})", star.path)
    larger = column in LARGER_IS_BETTER if larger_is_better is None else larger_is_better
    keys = [-score if larger else score]
    if TIE_BREAK in star.particles and column != TIE_BREAK:
        # The calibrated error is piecewise linear with flat ends: the raw score orders its ties.
        keys.insert(0, -star.particles[TIE_BREAK].to_numpy(np.float64))
    order = np.lexsort(keys)   # last key is the primary one
    return order, score, larger


def _crossing_shell(freq: np.ndarray, curve: np.ndarray, threshold: float = 0.143) -> float:
    """Where the FSC first drops below ``threshold``, in (fractional) Fourier shells."""
    res = resolution_at(freq, curve, threshold)
    return float(1.0 / res / freq[1])


def _junk(star: ParticleStar, cfg: CleanupConfig) -> np.ndarray:
    """``auto``'s junk test: particles that match the map worse than all but ``junk_quantile`` of
    the model's good calibration particles (``rlnCpmlMatchQuantile``). All False otherwise."""
    n = len(star)
    if cfg.method != "auto" or cfg.junk_quantile <= 0 or QUANTILE_COLUMN not in star.particles:
        return np.zeros(n, bool)
    q = star.particles[QUANTILE_COLUMN].to_numpy(np.float64)
    if not np.isfinite(q).all():
        raise InputError(f"{QUANTILE_COLUMN} is not a finite number in {int((~np.isfinite(q)).sum())} row(s)",
                         star.path)
    junk = q < cfg.junk_quantile
    log.info("junk test: %d of %d particles match the map worse than %.1f%% of the model's good particles",
             junk.sum(), n, 100 * (1 - cfg.junk_quantile))
    if junk.all():
        raise InputError(f"every particle matches the map worse than {100 * (1 - cfg.junk_quantile):.0f}% of the "
                         "model's good calibration particles: are these the model's protein and data? "
                         "(--junk-quantile 0 skips the test)", star.path)
    if junk.mean() > 0.5:
        log.warning("WARNING: %.0f%% of the particles fail the junk test: far more than junk usually is. The "
                    "new data may be noisier than the training data (--junk-quantile 0 skips the test)",
                    100 * junk.mean())
    return junk


def _sizes(cfg: CleanupConfig, n: int, score_sorted: np.ndarray, larger: bool) -> list[int]:
    if cfg.method == "quantile":
        return sorted({max(1, int(round(n * (1.0 - cfg.quantile)))), n})
    if cfg.method == "max-error":
        x = score_sorted if not larger else -score_sorted
        bound = cfg.max_error_deg if not larger else -cfg.max_error_deg
        k = int(np.searchsorted(x, bound, side="right"))
        if k == 0:
            raise InputError(f"no particle has {cfg.column} within {cfg.max_error_deg}; nothing would be kept")
        return sorted({k, n})
    fractions = np.arange(1.0, cfg.min_keep - 1e-9, -cfg.step)
    return sorted({max(1, int(round(n * f))) for f in fractions})


def cleanup(particles, out, cfg: CleanupConfig | None = None, overwrite: bool = False, progress: bool = True,
            device=None) -> dict:
    """``cryoposeml cleanup``. Returns the summary written to ``KEPT_cleanup.json``."""
    cfg = cfg or CleanupConfig()
    cfg.check()
    out = Path(out)
    if out.suffix != ".star":
        raise InputError("the output must be a .star file", out)
    paths = cleanup_paths(out)
    for p in paths.values():
        check_new_file(p, overwrite)
    star = read_star(particles).copy()
    if not star.has_poses():
        raise InputError("the particles have no poses (rlnAngleRot/Tilt/Psi); run cryoposeml predict first",
                         star.path)
    subset, made_up = half_set_labels(star)
    if made_up:
        log.warning("%s has no rlnRandomSubset: assigning a fixed random split (written to the outputs)",
                    star.path)
        star.particles["rlnRandomSubset"] = subset
    if cfg.column == DEFAULT_COLUMN and MATCH_COLUMN in star.particles:
        cfg.column = MATCH_COLUMN
        log.info("ranking by %s (the verified prediction's match z-score)", MATCH_COLUMN)
    order, score, larger = score_order(star, cfg.column, cfg.larger_is_better)
    n = len(star)
    junk = _junk(star, cfg)
    order = np.concatenate([order[~junk[order]], order[junk[order]]])   # junk last, each part in score order
    n_ok = int(n - junk.sum())
    sizes = sorted(set(_sizes(cfg, n_ok, score[order[:n_ok]], larger)) | {n})

    mask = soft_sphere_mask(star.box)
    rows, fsc_all, best_shell, kept = [], None, -np.inf, None
    for res, full_map in nested_half_reconstructions(star, order, sizes, cfg.sym, regularization=cfg.regularization,
                                                     batch_size=cfg.batch_size, progress=progress, device=device):
        freq, curve = fsc(res.half1, res.half2, res.pixel_size_angstrom, mask)
        k = res.info["particles"]
        rows.append({"particles_kept": k, "fraction_kept": k / n, "score_threshold": float(score[order[k - 1]]),
                     "half_counts": res.info["half_counts"],
                     "resolution_fsc0143_angstrom": resolution_at(freq, curve, 0.143),
                     "resolution_fsc05_angstrom": resolution_at(freq, curve, 0.5),
                     "crossing_shell_0143": _crossing_shell(freq, curve)})
        if k == n:
            fsc_all = curve
        # The kept set, chosen as the sweep goes: auto keeps the largest subset whose crossing
        # shell is within tie_shells of the best (a subset with junk in it cannot be chosen), so
        # each subset that comes within them of the best so far replaces the one before; the
        # other methods keep the smaller size, the first. Its maps are kept, not made again.
        if cfg.method == "auto":
            shell = rows[-1]["crossing_shell_0143"] if k <= n_ok else -np.inf
            best_shell = max(best_shell, shell)
            chosen_now = shell >= best_shell - cfg.tie_shells
        else:
            chosen_now = kept is None
        if chosen_now:
            chosen, kept = len(rows) - 1, None   # the previous choice's maps go first
            kept = ReconstructionResult(full_map(), res.pixel_size_angstrom, res.half1, res.half2)
            kept_fsc = (freq, curve)
        del res
    n_keep = rows[chosen]["particles_kept"]
    keep = np.zeros(n, bool)
    keep[order[:n_keep]] = True

    kept_star = ParticleStar(star.particles[keep].reset_index(drop=True), star.optics, star.path,
                             star.other_blocks)
    freq, curve = kept_fsc
    everything = rows[-1]
    summary = {
        **stamp(particles=particles, **asdict(cfg)),
        "column": cfg.column, "larger_is_better": larger,
        "particles_in": n, "particles_kept": int(n_keep), "particles_discarded": int(n - n_keep),
        "fraction_kept": n_keep / n, "score_threshold": rows[chosen]["score_threshold"],
        "junk_test": {"column": QUANTILE_COLUMN, "below": cfg.junk_quantile, "particles": int(junk.sum())}
        if QUANTILE_COLUMN in star.particles and cfg.method == "auto" and cfg.junk_quantile > 0 else None,
        "halves_assigned_randomly": made_up,
        "resolution_all_fsc0143_angstrom": everything["resolution_fsc0143_angstrom"],
        "resolution_kept_fsc0143_angstrom": resolution_at(freq, curve, 0.143),
        "resolution_kept_fsc05_angstrom": resolution_at(freq, curve, 0.5),
        "fsc_frequency_per_angstrom": freq, "fsc_kept": curve, "fsc_all": fsc_all,
        "sweep": rows, "chosen_index": chosen,
        "outputs": {k: str(v) for k, v in paths.items()},
    }
    save_figure(cleanup_figure(summary), paths["plot"])
    write_map(paths["half1"], kept.half1, kept.pixel_size_angstrom)
    write_map(paths["half2"], kept.half2, kept.pixel_size_angstrom)
    write_map(paths["map"], kept.full, kept.pixel_size_angstrom)
    if n_keep < n:
        write_star(ParticleStar(star.particles[~keep].reset_index(drop=True), star.optics, star.path,
                                star.other_blocks), paths["discarded"])
    else:
        del summary["outputs"]["discarded"]
    write_json(paths["summary"], summary)
    write_star(kept_star, paths["kept"])
    return summary
