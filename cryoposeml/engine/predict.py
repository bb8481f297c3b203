"""``cryoposeml predict``: poses, shifts and calibrated uncertainties for new particles.

Images stream from their stacks in batches (memory flat in N); a background thread reads and
preprocesses the next batch while the network and the matching run on the current one.
Inference is deterministic.

With a reference (the training particles' half-maps in the model folder, or ``--reference`` /
``--half-maps``), the network's proposals are verified and refined against the map
(:mod:`.verify`; ``--matching auto|proposals|exhaustive``); ``--matching none`` is the network
alone. Gold standard: a particle of rlnRandomSubset k is proposed by the half-k network and
matched against the half-k map, so the two half-sets never share data (particles without
rlnRandomSubset get a fixed random split, written to the output). ``--cross-halves`` is
CESPED's evaluation protocol instead: half-1 particles go to the half-2 network and map, for
scoring a model on its own training particles.

Written columns: the poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst; the input's are kept as
``...Original`` columns with ``--keep-original``), ``rlnParticleFigureOfMerit`` (probability that
the error is under 10 deg, from the held-out calibration) and ``rlnCpmlExpectedErrorDeg``; with
matching also ``rlnMaxValueProbDistribution`` (the posterior's largest probability, Relion's
meaning), ``rlnCpmlMatchZ`` (the match z-score: junk matches no view of the map),
``rlnCpmlMatchScore``, ``rlnCpmlEscalated`` (1 when the exhaustive search was needed),
``rlnCpmlProposalZ`` (the match z of the network's best proposal, before any escalation) and,
against the model's own reference, ``rlnCpmlMatchQuantile`` (the share of the model's good
calibration particles whose match z was lower: cleanup's junk test).
``top_k`` (distribution models) also writes ``OUT_topK.star``: K rows per particle, the K most
probable distinct poses with ``rlnCpmlPoseRank`` and ``rlnCpmlPoseProbability``.
``OUT.png``: projection directions, expected-error histogram, and the model's held-out error vs
confidence with these particles' confidences beside it.
"""
from __future__ import annotations

import concurrent.futures
import logging
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.errors import InputError
from ..core.symmetry import symmetric_distance_deg, symmetry_group, to_asymmetric_unit
from ..data.dataset import ParticleDataset
from ..data.star import ANGLE_COLUMNS, SHIFT_COLUMNS, ParticleStar, read_star, write_star
from ..families import FAMILIES, family
from ._outputs import check_new_file, stamp, write_json
from .calibration import Calibration
from .plots import pose_figure, save_figure
from .reconstruct import half_set_labels
from .train import escalation_threshold, load_model, match_quantile, preprocessor_for, resolve_device
from .verify import (MatchConfig, Reference, load_reference, match_config_dict, particle_ctf, reference_dir,
                     verify_batch)

__all__ = ["predict", "Predictor", "transfer_check", "predict_arrays", "load_models"]

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
    out = {"median_confidence": med, "validation_median_confidence": q50, "validation_p25_confidence": q25,
           "validation_p5_confidence": q5, "fraction_below_validation_p25": float(np.mean(scores < q25)),
           "fraction_below_validation_p5": below5, "transfers": bool(med >= q25 and below5 <= 0.2)}
    if not out["transfers"]:
        out["transfer_failures"] = ["much less confident than its held-out validation particles (median below the "
                                    "validation 25th percentile, or over 20% below its 5th)"]
    return out


def proposal_transfer_check(z_proposals: np.ndarray, escalate_z: float, validation: dict | None) -> dict:
    """Does the map confirm the network's proposals as often as on the model's calibration split?
    There, a share ``1 - fraction_escalated`` of the proposals matched the map above the escalation
    threshold; new particles of the same kind do so about as often, while for another protein, a
    much lower SNR or another preprocessing the proposals stop matching. Said not to transfer when
    fewer than half as many proposals are confirmed (with at least 20 particles, and a calibration
    that confirmed at least 10%: a network whose proposals are rarely right says little)."""
    confirmed = float(np.mean(z_proposals >= escalate_z))
    out = {"proposals_confirmed": confirmed}
    if validation is None or "fraction_escalated" not in validation:
        return out
    expected = 1.0 - float(validation["fraction_escalated"])
    out["validation_proposals_confirmed"] = expected
    if len(z_proposals) >= 20 and expected >= 0.1 and confirmed < 0.5 * expected:
        out["transfers"] = False
        out["transfer_failures"] = [f"the map confirms {100 * confirmed:.0f}% of its proposals, {100 * expected:.0f}% "
                                    "on its calibration particles"]
    return out


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


def load_models(model_dir, dev) -> tuple[dict, dict]:
    """The trained networks of a model folder (``full``, or ``half1`` + ``half2``) and its metadata."""
    models, meta = {}, None
    for run in ("full", "half1", "half2"):
        if (Path(model_dir) / run / "weights.safetensors").exists():
            models[run], meta = load_model(model_dir, run, dev)
    if not models:
        raise InputError("no trained network found (full/ or half1/, half2/)", model_dir)
    return models, meta


def predict_arrays(star: ParticleStar, rows: np.ndarray, models: dict, meta: dict, network_of: np.ndarray,
                   reference: Reference | None, reference_of: np.ndarray | None, cfg: MatchConfig, dev,
                   batch_size: int = 256, top_k: int = 0, progress: bool = True) -> dict:
    """Poses of the particles ``rows`` of ``star``: ``network_of[i]`` names the network
    (``full``/``half1``/``half2``) and ``reference_of[i]`` the reference map (``full``/``half1``/
    ``half2``) of ``rows[i]``. Returns arrays (one row per particle of ``rows``): ``matrix``,
    ``shift_px`` (of the input box), ``confidence`` (network), the network's own ``net_matrix``
    and, with matching, ``score``, ``z``, ``escalated``, ``expected_raw``, ``max_prob``,
    ``n_scored``; ``top_matrix``/``top_prob`` with ``top_k``."""
    pre = meta["preprocessing"]
    prep = preprocessor_for(star, pre["box_px"], pre["pixel_size_angstrom"])
    ds = ParticleDataset(star)
    group = torch.as_tensor(symmetry_group(meta["sym"]), dtype=torch.float32, device=dev)
    net_px = pre["pixel_size_angstrom"] / star.pixel_size_angstrom     # input px per network px
    matching = cfg.matching != "none" and reference is not None
    n = len(rows)
    out = {"matrix": np.empty((n, 3, 3)), "shift_px": np.empty((n, 2)), "confidence": np.empty(n),
           "net_matrix": np.empty((n, 3, 3)), "net_shift_px": np.empty((n, 2))}
    if matching:
        pseudo = reference.pseudo_symmetries(cfg)   # mates proposed too, and checked after refinement
        ctf_params = star.ctf_params() if star.has_ctf() else None
        radius = 0.5 * star.box - 0.125 * star.box   # the particle's radius for the background noise estimate
    # distribution models propose their top k poses to the matching, the others their one pose
    k_prop = cfg.top_k if matching and family(meta["network"]["family"]).distribution else 0
    if top_k:
        out["top_matrix"], out["top_prob"] = np.empty((n, top_k, 3, 3)), np.empty((n, top_k))
    batches = [np.arange(s, min(n, s + batch_size)) for s in range(0, n, batch_size)]
    bar = tqdm(total=n, desc="predict" + (f" + {cfg.matching} matching" if matching else ""), unit="img",
               disable=not progress)

    def read(b):
        raw = ds.read_batch(rows[b])
        return raw, prep(raw, rows[b])

    with concurrent.futures.ThreadPoolExecutor(1) as pool, torch.inference_mode():
        future = pool.submit(read, batches[0]) if batches else None
        for j, idx in enumerate(batches):
            raw, net_in = future.result()
            if j + 1 < len(batches):
                future = pool.submit(read, batches[j + 1])
            imgs = torch.from_numpy(net_in).to(dev)
            props = torch.empty(len(idx), max(1, k_prop), 3, 3)
            for run, model in models.items():
                sel = network_of[idx] == run
                if not sel.any():
                    continue
                o = model(imgs[torch.as_tensor(sel, device=dev)])
                out["net_matrix"][idx[sel]] = o["matrix"].double().cpu().numpy()
                out["net_shift_px"][idx[sel]] = o["shift_px"].double().cpu().numpy() * net_px
                out["confidence"][idx[sel]] = o["confidence"].double().cpu().numpy()
                if top_k:
                    tk = model.top_k(o, top_k, group)
                    out["top_matrix"][idx[sel]] = tk["matrix"].double().cpu().numpy()
                    out["top_prob"][idx[sel]] = tk["probability"].double().cpu().numpy()
                props[torch.as_tensor(sel)] = (model.top_k(o, k_prop, group)["matrix"] if k_prop
                                               else o["matrix"][:, None]).float().cpu()
            bar.update(len(idx))
            if not matching:
                continue
            raw_t = torch.from_numpy(raw)
            for ref_key in np.unique(reference_of[idx]):
                sel = np.nonzero(reference_of[idx] == ref_key)[0]
                m = reference.matcher(str(ref_key), cfg, dev)
                ctf = particle_ctf(ctf_params, rows[idx[sel]], star.box, star.pixel_size_angstrom)
                r = verify_batch(m, raw_t[sel], ctf, None if cfg.matching == "exhaustive" else props[sel],
                                 torch.as_tensor(out["net_shift_px"][idx[sel]]), cfg, pseudo, radius)
                for key, val in r.items():
                    v = val.double().cpu().numpy() if val.dtype != torch.bool else val.cpu().numpy()
                    key = "shift_px" if key == "origin" else key
                    if key not in out:
                        out[key] = np.zeros((n, *v.shape[1:]), v.dtype)
                    out[key][idx[sel]] = v
        bar.close()
    if not matching:
        out["matrix"], out["shift_px"] = out["net_matrix"].copy(), out["net_shift_px"].copy()
    return out


def _output_paths(out, top_k: int, overwrite: bool) -> dict:
    out = Path(out)
    paths = {"star": out, "summary": out.with_suffix(".json"), "plot": out.with_suffix(".png")}
    if top_k:
        if top_k < 2:
            raise InputError(f"--top-k must be at least 2 (got {top_k}); the best pose is always in the output")
        paths["top_k"] = out.with_name(f"{out.stem}_top{top_k}.star")
    for path in paths.values():
        check_new_file(path, overwrite)
    return paths


class Predictor:
    """A model folder loaded once (networks, reference maps, their projection libraries, the
    escalation threshold): :meth:`predict` then gives poses to any number of particle files with
    the model's box and pixel size, without reloading. ``cryoposeml predict`` uses one for one
    file; ``predict --spool`` (the streaming worker) for every batch it is given."""

    def __init__(self, model_dir, device: str = "auto", sym: str | None = None, matching: str = "auto",
                 reference=None, half_maps=None, cross_halves: bool = False, match_cfg: MatchConfig | None = None,
                 batch_size: int = 256, top_k: int = 0, keep_original: bool = False, strict: bool = False,
                 progress: bool = True):
        cfg = MatchConfig(**{**(asdict(match_cfg) if match_cfg else {}), "matching": matching})
        cfg.check()
        self.model_dir, self.batch_size, self.top_k = model_dir, batch_size, top_k
        self.keep_original, self.strict, self.progress, self.cross_halves = keep_original, strict, progress, cross_halves
        self.reference_arg, self.half_maps_arg = reference, half_maps
        self.dev = dev = resolve_device(device)
        self.models, self.meta = models, meta = load_models(model_dir, dev)
        if sym is not None:
            symmetry_group(sym)
            if sym.strip().upper() != meta["sym"]:
                raise InputError(f"the model was trained with symmetry {meta['sym']}, not {sym}", model_dir)
        if top_k and not family(meta["network"]["family"]).distribution:
            kinds = ", ".join(f.name for f in FAMILIES.values() if f.distribution)
            raise InputError(f"--top-k needs a model that predicts a distribution over poses ({kinds}); this "
                             f"{meta['network']['family']} model predicts one pose per particle", model_dir)
        inp = meta["input"]
        self.ref = ref = None
        if cfg.matching != "none":
            self.ref = ref = load_reference(model_dir, reference, half_maps, meta["sym"], inp["box"],
                                            inp["pixel_size_angstrom"])
            if ref is None:
                if cfg.matching != "auto":
                    raise InputError(f"--matching {cfg.matching} needs a reference: this model folder has none "
                                     "(trained before references were kept); give --reference MAP", model_dir)
                log.warning("no reference in the model folder and none given: the network's poses are not verified "
                            "(retrain, or pass --reference MAP)")
                cfg.matching = "none"
        if cfg.matching == "auto" and cfg.escalate_z is None and ref is not None:
            zs = [escalation_threshold(meta["runs"][r].get("matching_right_z_percentiles"), cfg.escalate_right)
                  for r in models]
            if all(z is not None for z in zs):
                cfg.escalate_z = max(zs)   # the stricter of the halves' thresholds
            else:
                log.warning("no calibrated escalation threshold (model without a calibration split, or too few "
                            "right proposals on it): --matching auto searches every particle exhaustively; "
                            "set --escalate-z to trust the proposals")
        if cfg.matching == "auto" and cfg.rescue_z is None and ref is not None and cfg.rescue_quantile > 0 \
                and ref.source == str(reference_dir(model_dir)):
            good = [meta["runs"][r].get("matching_good_z") for r in models]
            if all(good):   # the model's own reference, which those z-scores were measured with
                cfg.rescue_z = max(float(np.quantile(g, cfg.rescue_quantile)) for g in good)
        self.cfg = cfg

    def warm_up(self) -> None:
        """Build now what the first batch would otherwise wait for: each reference's projection
        library (when the mode can escalate) and the map's near-symmetries."""
        if self.ref is None:
            return
        self.ref.pseudo_symmetries(self.cfg)
        if self.cfg.matching in ("auto", "exhaustive"):
            for key in self.ref.maps:
                self.ref.matcher(key, self.cfg, self.dev).library

    def predict(self, particles, out, overwrite: bool = False) -> dict:
        """Poses for the particles of the STAR file ``particles``, written to ``out`` (STAR, plus
        ``.json`` summary and ``.png``). Nothing is written when the input is refused."""
        paths = _output_paths(out, self.top_k, overwrite)
        models, meta, ref, cfg, top_k = self.models, self.meta, self.ref, self.cfg, self.top_k
        star = read_star(particles)
        inp = meta["input"]
        if star.box != inp["box"] or abs(star.pixel_size_angstrom - inp["pixel_size_angstrom"]) > 1e-3:
            raise InputError(f"particles are {star.box} px at {star.pixel_size_angstrom:.3f} A/px but the model was "
                             f"trained on {inp['box']} px at {inp['pixel_size_angstrom']:.3f} A/px; rescale the "
                             "particles (or train a model for them)", particles)
        cross_halves = self.cross_halves
        subset = star.random_subset()
        made_up = False
        if subset is None and (ref is not None or "full" not in models):
            subset, made_up = half_set_labels(star)
        n = len(star)
        if "full" in models:
            network_of = np.array(["full"] * n)
        else:
            mine = np.where(subset == 1, "half1", "half2")
            network_of = np.where(subset == 1, "half2", "half1") if cross_halves else mine
        reference_of = None
        if ref is not None:
            if "half1" in ref.maps and subset is not None:
                reference_of = (np.where(subset == 1, "half2", "half1") if cross_halves
                                else np.where(subset == 1, "half1", "half2"))
            else:
                reference_of = np.array(["full"] * n)
        arr = predict_arrays(star, np.arange(n), models, meta, network_of, ref, reference_of, cfg, self.dev,
                             self.batch_size, top_k, self.progress)
        return self._write(star, particles, paths, arr, network_of, subset, made_up)

    def _write(self, star, particles, paths, arr, network_of, subset, made_up) -> dict:
        models, meta, ref, cfg, top_k = self.models, self.meta, self.ref, self.cfg, self.top_k
        n = len(star)
        mats, shifts, score = arr["matrix"], arr["shift_px"], arr["confidence"]
        # one representative per symmetry orbit (no-op for C1)
        mats = to_asymmetric_unit(mats, meta["sym"])
        if top_k:
            top_mats, top_prob = to_asymmetric_unit(arr["top_matrix"], meta["sym"]), arr["top_prob"]
        result = star.copy()
        p = result.particles
        if made_up:
            p["rlnRandomSubset"] = subset
        if self.keep_original:
            for c in ANGLE_COLUMNS + SHIFT_COLUMNS:
                if c in p:
                    p[c + "Original"] = p[c]
        predicts_shifts = meta["network"].get("predict_shifts", True) or ref is not None
        result.set_poses(mats, shifts * star.pixel_size_angstrom if predicts_shifts else None)
        if not predicts_shifts:
            log.warning("this model does not predict shifts: the input's origins are kept")
        expected = np.empty(n)
        fom = np.empty(n)
        runs = {}
        matched = ref is not None
        for run in models:
            sel = network_of == run
            calib = Calibration(**meta["runs"][run]["calibration"])
            if matched:
                mc = meta["runs"][run].get("matching_calibration")
                if mc is not None:
                    mcal = Calibration(**mc)
                    expected[sel] = mcal.expected_error(-arr["expected_raw"][sel])
                    fom[sel] = mcal.figure_of_merit(-arr["expected_raw"][sel])
                else:
                    expected[sel], fom[sel] = arr["expected_raw"][sel], arr["max_prob"][sel]
            else:
                expected[sel] = calib.expected_error(score[sel])
                fom[sel] = calib.figure_of_merit(score[sel])
            runs[run] = {"particles": int(sel.sum()), **(transfer_check(score[sel], calib) if sel.any() else {})}
            if matched and sel.any() and cfg.matching == "auto" and cfg.escalate_z is not None:
                by_map = proposal_transfer_check(arr["z_proposals"][sel], cfg.escalate_z,
                                                 meta["runs"][run].get("matching_validation"))
                by_map["transfer_failures"] = runs[run].get("transfer_failures", []) + by_map.get("transfer_failures", [])
                runs[run].update(by_map)
        if matched and not all("matching_calibration" in meta["runs"][r] for r in models):
            log.warning("this model has no calibration of the matched uncertainty (trained before it existed): "
                        "rlnCpmlExpectedErrorDeg is the raw posterior spread, not calibrated")
        p["rlnParticleFigureOfMerit"] = fom
        p["rlnCpmlExpectedErrorDeg"] = expected
        p["rlnCpmlConfidence"] = score   # the network's raw score (higher: surer); ranks ties of the above
        if matched:
            p["rlnMaxValueProbDistribution"] = arr["max_prob"]
            p["rlnCpmlMatchZ"] = arr["z"]
            p["rlnCpmlMatchScore"] = arr["score"]
            p["rlnCpmlEscalated"] = arr["escalated"].astype(int)
            # how many of the model's good calibration particles match worse (cleanup's junk test);
            # only against the model's own reference, which those z-scores were measured with
            if ref.source == str(reference_dir(self.model_dir)):
                quantile = np.full(n, np.nan)
                for run in models:
                    sel = network_of == run
                    q = match_quantile(meta["runs"][run].get("matching_good_z"), arr["z"][sel])
                    if q is not None:
                        quantile[sel] = q
                if np.isfinite(quantile).all():
                    p["rlnCpmlMatchQuantile"] = quantile
                else:
                    log.warning("this model has no record of its good particles' match z (trained before it "
                                "existed): no rlnCpmlMatchQuantile, so cleanup cannot test for junk by it")
            if cfg.matching != "exhaustive":
                p["rlnCpmlProposalZ"] = arr["z_proposals"]   # the network's best proposal's match z
        bad = [r for r, v in runs.items() if v.get("transfers") is False]
        if bad:
            why = [f"{r}: {reason}" for r in bad for reason in runs[r]["transfer_failures"]]
            msg = (f"the model does not seem to transfer to these particles ({'; '.join(why)}). The network's poses "
                   "are likely unreliable (another protein, another pixel size or preprocessing, much lower SNR?)")
            if self.strict:
                raise InputError(msg, particles)
            log.warning("WARNING: %s", msg)
        summary = {**stamp(particles=particles, model=str(self.model_dir), batch_size=self.batch_size,
                           device=str(self.dev), reference=self.reference_arg, half_maps=self.half_maps_arg,
                           cross_halves=self.cross_halves, **match_config_dict(cfg)),
                   "particles": n, "runs": runs, "median_expected_error_deg": float(np.median(expected)),
                   "matching": cfg.matching}
        if matched:
            summary.update(reference=ref.source, reference_resolution_angstrom=ref.resolution_angstrom,
                           bands_shells=list(ref.bands(cfg)), fraction_escalated=float(arr["escalated"].mean()),
                           poses_scored_per_particle=float(arr["n_scored"].mean()),
                           median_match_z=float(np.median(arr["z"])), halves_assigned_randomly=made_up,
                           median_network_to_matched_deg=float(np.median(
                               symmetric_distance_deg(arr["net_matrix"], arr["matrix"], meta["sym"]))))
        if top_k:
            summary["top_k"] = {"k": top_k, "star": str(paths["top_k"]),
                                "median_probability_by_rank": np.median(top_prob, axis=0).tolist()}
            write_star(_top_k_star(result, top_mats, top_prob, arr["net_shift_px"] * star.pixel_size_angstrom
                                   if predicts_shifts else None), paths["top_k"])
        main_run = max(runs, key=lambda r: runs[r]["particles"])
        save_figure(pose_figure(result.angles_deg(), expected, Calibration(**meta["runs"][main_run]["calibration"]),
                                score[network_of == main_run]), paths["plot"])
        summary["plot"] = str(paths["plot"])
        write_star(result, paths["star"])
        write_json(paths["summary"], summary)
        return summary


def predict(particles, model_dir, out, batch_size: int = 256, device: str = "auto", sym: str | None = None,
            keep_original: bool = False, strict: bool = False, overwrite: bool = False,
            progress: bool = True, top_k: int = 0, matching: str = "auto", reference=None, half_maps=None,
            cross_halves: bool = False, match_cfg: MatchConfig | None = None) -> dict:
    """One particle file: load the model (:class:`Predictor`) and predict."""
    _output_paths(out, top_k, overwrite)   # refuse before the (slow) model loading
    return Predictor(model_dir, device, sym, matching, reference, half_maps, cross_halves, match_cfg, batch_size,
                     top_k, keep_original, strict, progress).predict(particles, out, overwrite)
