"""``cryoposeml predict``: poses, shifts and calibrated uncertainties for new particles.

Images stream from their stacks in batches (memory flat in N); a background thread reads and
preprocesses the next batch while the network runs on the current one. Inference is
deterministic. With a half-set model, particles of rlnRandomSubset 1 are predicted by the half-2
network and vice versa (gold standard); others by half 1.

Written columns: the poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst; the input's are kept as
``...Original`` columns with ``--keep-original``), ``rlnParticleFigureOfMerit`` (probability that
the error is under 10 deg, from the held-out calibration) and ``rlnCpmlExpectedErrorDeg``.
``top_k`` (distribution models) also writes ``OUT_topK.star``: K rows per particle, the K most
probable distinct poses with ``rlnCpmlPoseRank`` and ``rlnCpmlPoseProbability``.
``OUT.png``: projection directions, expected-error histogram, and the model's held-out error vs
confidence with these particles' confidences beside it.
"""
from __future__ import annotations

import concurrent.futures
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import InputError
from ..core.symmetry import symmetry_group, to_asymmetric_unit
from ..data.dataset import ParticleDataset
from ..data.star import ANGLE_COLUMNS, SHIFT_COLUMNS, read_star, write_star
from ._outputs import check_new_file, stamp, write_json
from .calibration import Calibration
from .plots import pose_figure, save_figure
from .train import load_model, preprocessor_for, resolve_device

__all__ = ["predict", "transfer_check"]

log = logging.getLogger(__name__)


def transfer_check(scores: np.ndarray, calib: Calibration) -> dict:
    """Does the new data look like the validation data to the network? Held-out particles of the
    training data put 25% of their confidence scores below the validation 25th percentile and 5%
    below the 5th. The model is said not to transfer when the new particles' median falls below
    the validation 25th percentile (most of them are less certain than three quarters of the
    held-out ones) or more than 20% of them fall below the 5th percentile (a large unfamiliar
    fraction, four times the expected 5%)."""
    q5, q25, q50, q75, q95 = calib.validation_confidence_quantiles
    med = float(np.median(scores))
    below5 = float(np.mean(scores < q5))
    return {"median_confidence": med, "validation_median_confidence": q50, "validation_p25_confidence": q25,
            "validation_p5_confidence": q5, "fraction_below_validation_p25": float(np.mean(scores < q25)),
            "fraction_below_validation_p5": below5, "transfers": bool(med >= q25 and below5 <= 0.2)}


def _top_k_star(result, mats: np.ndarray, prob: np.ndarray, shifts_angstrom):
    """``k`` rows per particle (all of its columns, then the rank-``r`` pose), ranks 1..k with
    ``rlnCpmlPoseRank`` and ``rlnCpmlPoseProbability``; rank 1 is the pose of the main output."""
    n, k = prob.shape
    star = result.copy()
    star.particles = result.particles.loc[np.repeat(np.arange(n), k)].reset_index(drop=True)
    star.set_poses(mats.reshape(n * k, 3, 3), None if shifts_angstrom is None else np.repeat(shifts_angstrom, k, 0))
    star.particles["rlnCpmlPoseRank"] = np.tile(np.arange(1, k + 1), n)
    star.particles["rlnCpmlPoseProbability"] = prob.reshape(-1)
    return star


def predict(particles, model_dir, out, batch_size: int = 256, device: str = "auto", sym: str | None = None,
            keep_original: bool = False, strict: bool = False, overwrite: bool = False,
            progress: bool = True, top_k: int = 0) -> dict:
    out = Path(out)
    check_new_file(out, overwrite)
    summary_path = out.with_suffix(".json")
    check_new_file(summary_path, overwrite)
    plot_path = out.with_suffix(".png")
    check_new_file(plot_path, overwrite)
    topk_path = out.with_name(f"{out.stem}_top{top_k}.star")
    if top_k:
        if top_k < 2:
            raise InputError(f"--top-k must be at least 2 (got {top_k}); the best pose is always in the output")
        check_new_file(topk_path, overwrite)
    dev = resolve_device(device)
    star = read_star(particles)
    runs = {}
    models, meta = {}, None
    for run in ("full", "half1", "half2"):
        if (Path(model_dir) / run / "weights.safetensors").exists():
            models[run], meta = load_model(model_dir, run, dev)
    if not models:
        raise InputError("no trained network found (full/ or half1/, half2/)", model_dir)
    if sym is not None:
        symmetry_group(sym)
        if sym.strip().upper() != meta["sym"]:
            raise InputError(f"the model was trained with symmetry {meta['sym']}, not {sym}", model_dir)
    if top_k and not all(hasattr(m, "top_k") for m in models.values()):
        raise InputError(f"--top-k needs a model that predicts a distribution over poses (image2sphere); this "
                         f"{meta['network']['family']} model predicts one pose per particle", model_dir)
    group = torch.as_tensor(symmetry_group(meta["sym"]), dtype=torch.float32, device=dev)
    inp = meta["input"]
    if star.box != inp["box"] or abs(star.pixel_size_angstrom - inp["pixel_size_angstrom"]) > 1e-3:
        raise InputError(f"particles are {star.box} px at {star.pixel_size_angstrom:.3f} A/px but the model was "
                         f"trained on {inp['box']} px at {inp['pixel_size_angstrom']:.3f} A/px; rescale the "
                         "particles (or train a model for them)", particles)
    pre = meta["preprocessing"]
    prep = preprocessor_for(star, pre["box_px"], pre["pixel_size_angstrom"])
    ds = ParticleDataset(star, transform=prep)
    subset = star.random_subset()
    if "full" in models:
        which = np.array(["full"] * len(star))
    else:
        which = np.where(subset == 1, "half2", "half1") if subset is not None else np.array(["half1"] * len(star))
    n = len(star)
    mats = np.empty((n, 3, 3))
    shifts = np.empty((n, 2))
    score = np.empty(n)
    if top_k:
        top_mats, top_prob = np.empty((n, top_k, 3, 3)), np.empty((n, top_k))
    batches = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    bar = tqdm(total=n, desc="predict", unit="img", disable=not progress)
    with concurrent.futures.ThreadPoolExecutor(1) as pool, torch.inference_mode():
        future = pool.submit(ds.read_batch, batches[0]) if batches else None
        for k, idx in enumerate(batches):
            imgs = torch.from_numpy(future.result()).to(dev)
            if k + 1 < len(batches):
                future = pool.submit(ds.read_batch, batches[k + 1])
            for run, model in models.items():
                sel = which[idx] == run
                if not sel.any():
                    continue
                o = model(imgs[torch.as_tensor(sel, device=dev)])
                mats[idx[sel]] = o["matrix"].double().cpu().numpy()
                shifts[idx[sel]] = o["shift_px"].double().cpu().numpy()
                score[idx[sel]] = o["confidence"].double().cpu().numpy()
                if top_k:
                    tk = model.top_k(o, top_k, group)
                    top_mats[idx[sel]] = tk["matrix"].double().cpu().numpy()
                    top_prob[idx[sel]] = tk["probability"].double().cpu().numpy()
            bar.update(len(idx))
    bar.close()

    # one representative per symmetry orbit (no-op for C1)
    mats = to_asymmetric_unit(mats, meta["sym"])
    if top_k:
        top_mats = to_asymmetric_unit(top_mats, meta["sym"])
    result = star.copy()
    p = result.particles
    if keep_original:
        for c in ANGLE_COLUMNS + SHIFT_COLUMNS:
            if c in p:
                p[c + "Original"] = p[c]
    predicts_shifts = meta["network"].get("predict_shifts", True)
    result.set_poses(mats, shifts * pre["pixel_size_angstrom"] if predicts_shifts else None)
    if not predicts_shifts:
        log.warning("this model does not predict shifts: the input's origins are kept")
    expected = np.empty(n)
    fom = np.empty(n)
    for run in models:
        sel = which == run
        calib = Calibration(**meta["runs"][run]["calibration"])
        expected[sel] = calib.expected_error(score[sel])
        fom[sel] = calib.figure_of_merit(score[sel])
        runs[run] = {"particles": int(sel.sum()), **(transfer_check(score[sel], calib) if sel.any() else {})}
    p["rlnParticleFigureOfMerit"] = fom
    p["rlnCpmlExpectedErrorDeg"] = expected
    p["rlnCpmlConfidence"] = score   # the network's raw score (higher: surer); ranks ties of the above
    bad = [r for r, v in runs.items() if v.get("transfers") is False]
    if bad:
        msg = (f"the model does not seem to transfer to these particles ({', '.join(bad)}): they are much less "
               "confident than its held-out validation particles (median below the validation 25th percentile, "
               "or over 20% below its 5th). Poses are likely unreliable (another protein, another pixel size or "
               "preprocessing, much lower SNR?)")
        if strict:
            raise InputError(msg, particles)
        log.warning("WARNING: %s", msg)
    summary = {**stamp(particles=particles, model=str(model_dir), batch_size=batch_size, device=str(dev)),
               "particles": n, "runs": runs, "median_expected_error_deg": float(np.median(expected))}
    if top_k:
        summary["top_k"] = {"k": top_k, "star": str(topk_path),
                            "median_probability_by_rank": np.median(top_prob, axis=0).tolist()}
        write_star(_top_k_star(result, top_mats, top_prob, shifts * pre["pixel_size_angstrom"] if predicts_shifts
                               else None), topk_path)
    main_run = max(runs, key=lambda r: runs[r]["particles"])
    save_figure(pose_figure(result.angles_deg(), expected, Calibration(**meta["runs"][main_run]["calibration"]),
                            score[which == main_run]), plot_path)
    summary["plot"] = str(plot_path)
    write_star(result, out)
    write_json(summary_path, summary)
    return summary
