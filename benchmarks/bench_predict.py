"""Verified prediction benchmark: the network alone vs the network checked and refined against the map.

Per dataset (64 px at 1.5 A/px, CTF, origins of --shift-sigma A s.d., white noise at --snr):
``C1`` (AdK), ``D2`` (AdK's D2 average, searched in D2) and ``near-D2`` (AdK's D2 average with 20%
of one copy left as it is: four near-identical copies, one orientation right), a model is trained
on --n-train particles (or taken from --model-dir/<dataset>), then --n-test new particles are
predicted with --matching none, proposals, auto and exhaustive (each in its own process, timed
end to end including reading, peak RSS polled); with --worker also by the streaming worker
(predict --spool) in 4 batches (its start-up, and particles/s once loaded). Reported per row: median / mean angular error,
% under 5 and over 30 deg, median shift error, FSC 0.5 of the map reconstructed from the poses
against the true map, half-map FSC 0.143, ECE and Spearman of the expected error against the
actual one, fraction escalated, poses scored per particle, particles/s and peak RSS. With
--relion, Relion 3.1 global auto-refine of the same particles (from the true map low-passed to
30 A) is the last row.

Usage: python benchmarks/bench_predict.py [--datasets C1 D2 near-D2] [--n-train 5000] [--n-test 1000]
       [--model equivariant] [--epochs 15] [--model-dir DIR] [--relion] [--work DIR] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryoposeml.core.metrics import fsc, resolution_at, soft_sphere_mask
from cryoposeml.core.symmetry import symmetric_distance_deg
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map, write_map
from cryoposeml.data.star import read_star, write_star
from cryoposeml.engine.calibration import expected_calibration_error
from cryoposeml.engine.evaluate import match_particles
from cryoposeml.engine.reconstruct import reconstruct_star

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402
from _run import cli, run_measured  # noqa: E402

MODES = ("none", "proposals", "auto", "exhaustive")


def near_d2_map(path: Path) -> Path:
    """AdK's D2 average with 20% of AdK itself: nearly D2-symmetric, one orientation right."""
    d2, apix = read_map(resolve_map("d2_test"))
    adk, _ = read_map(resolve_map("adk_open"))
    vol = 0.8 * d2 / np.abs(d2).max() + 0.2 * adk / np.abs(adk).max()
    write_map(path, vol.astype(np.float32), apix)
    return path


def score_row(pred_path: Path, truth, true_map, sym: str, expected: bool = True) -> dict:
    """Errors of a prediction against the ground truth (junk excluded), its maps' FSCs and the
    calibration of its expected error."""
    from scipy.stats import spearmanr

    p = read_star(pred_path)
    ip, it = match_particles(p, truth)
    good = truth.particles["rlnCpmlJunk"].to_numpy()[it] == 0 if "rlnCpmlJunk" in truth.particles else np.ones(len(it), bool)
    ip, it = ip[good], it[good]
    err = symmetric_distance_deg(p.matrices()[ip], truth.matrices()[it], sym)
    shift = np.linalg.norm(p.shifts_angstrom()[ip] - truth.shifts_angstrom()[it], axis=1)
    calib = {}
    if expected:
        x = p.particles["rlnCpmlExpectedErrorDeg"].to_numpy()[ip]
        calib = {"ece_deg": expected_calibration_error(x, err),
                 "spearman_expected_vs_error": float(spearmanr(x, err).correlation),
                 "spearman_ceiling": spearman_ceiling(x)}
    sub = p.copy()
    sub.particles = p.particles.iloc[ip].reset_index(drop=True)
    row = {"median_deg": float(np.median(err)), "mean_deg": float(np.mean(err)),
           "pct_under_5deg": float(100 * np.mean(err < 5)), "pct_over_30deg": float(100 * np.mean(err > 30)),
           "shift_median_A": float(np.median(shift)), **calib}
    if true_map is None:   # poses only
        return row
    rec = reconstruct_star(sub, sym, halves=True, progress=False)
    mask = soft_sphere_mask(true_map.shape[0])
    f, c = fsc(rec.full, true_map, rec.pixel_size_angstrom, mask)
    fh, ch = rec.half_fsc(mask)
    return {**row, "fsc05_vs_true_A": resolution_at(f, c, 0.5), "half_map_fsc0143_A": resolution_at(fh, ch, 0.143)}


def spearman_ceiling(expected: np.ndarray, draws: int = 50) -> float:
    """The Spearman correlation a perfect uncertainty would reach on these particles: each error
    drawn from its own predicted distribution (an isotropic Gaussian about the pose in 3D, so the
    angle is ``sigma * chi_3`` with mean ``expected``), the median over ``draws`` draws. With
    similar expected errors it is low however good the uncertainty is: the error given its
    distribution is random."""
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    chi3_mean = 2 * np.sqrt(2 / np.pi)
    rho = [spearmanr(expected, expected / chi3_mean * np.sqrt(rng.chisquare(3, len(expected)))).correlation
           for _ in range(draws)]
    return float(np.median(rho))


def escalation_tradeoff(d: Path, model: Path, truth, sym: str, ds: str) -> list[dict]:
    """What ``auto`` would give for each share of right proposals escalated: particles whose best
    proposal's match z (``rlnCpmlProposalZ`` of the proposals run) is under the model's threshold
    for that share take the exhaustive run's pose, the others the proposals run's."""
    from cryoposeml.engine.train import ESCALATE_PERCENTILES, escalation_threshold

    meta = json.loads((model / "model.json").read_text())
    pct = next(iter(meta["runs"].values())).get("matching_right_z_percentiles")
    if pct is None:
        return []
    out = []
    prop, ex = read_star(d / "pred_proposals.star"), read_star(d / "pred_exhaustive.star")
    ip, it = match_particles(prop, truth)
    ie, _ = match_particles(ex, truth)
    good = truth.particles["rlnCpmlJunk"].to_numpy()[it] == 0 if "rlnCpmlJunk" in truth.particles else np.ones(len(it), bool)
    e_p = symmetric_distance_deg(prop.matrices()[ip], truth.matrices()[it], sym)[good]
    e_e = symmetric_distance_deg(ex.matrices()[ie], truth.matrices()[it], sym)[good]
    z = prop.particles["rlnCpmlProposalZ"].to_numpy()[ip][good]
    for q in ESCALATE_PERCENTILES:
        esc = z < escalation_threshold(pct, q / 100)
        e = np.where(esc, e_e, e_p)
        out.append({"dataset": ds, "method": f"auto, {q}% of right proposals escalated (from the two runs)",
                    "fraction_escalated": float(esc.mean()), "median_deg": float(np.median(e)),
                    "mean_deg": float(np.mean(e)), "pct_under_5deg": float(100 * np.mean(e < 5)),
                    "pct_over_30deg": float(100 * np.mean(e > 30))})
        print(json.dumps(out[-1]))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["C1", "D2", "near-D2"])
    ap.add_argument("--n-train", type=int, default=5000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--shift-sigma", type=float, default=2.0)
    ap.add_argument("--model", default="equivariant")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--box-px", type=int, default=32)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--model-dir", help="folder with a trained model per dataset (<dir>/<dataset>)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--worker", action="store_true", help="also the streaming worker (predict --spool) fed the "
                    "test set in 4 batches: start-up and steady-state particles/s")
    ap.add_argument("--relion", action="store_true", help="also Relion 3.1 global auto-refine (slow: ~30 min)")
    ap.add_argument("--work", default="bench_predict_work")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bench_predict")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for ds in args.datasets:
        d = work / ds
        d.mkdir(exist_ok=True)
        sym = "D2" if ds == "D2" else "C1"
        map_path = {"C1": resolve_map("adk_open"), "D2": resolve_map("d2_test")}.get(ds) or near_d2_map(d / "near_d2.mrc")
        true_map = read_map(map_path)[0]
        for name, n, seed in (("train", args.n_train, 1), ("test", args.n_test, 2)):
            if not (d / name / "ground_truth.star").exists():
                r = subprocess.run(cli("simulate", "--map", map_path, "--sym", sym, "--n", n, "--snr", args.snr,
                                       "--shift-sigma", args.shift_sigma, "--seed", seed, "--out", d / name),
                                   capture_output=True, text=True)
                assert r.returncode == 0, r.stderr
        model = Path(args.model_dir) / ds if args.model_dir else d / "model"
        train_s = None
        if not (model / "model.json").exists():
            train_s, train_gb, r = run_measured(cli("train", "--particles", d / "train" / "ground_truth.star", "--out",
                                                    model, "--model", args.model, "--sym", sym, "--epochs", args.epochs,
                                                    "--box-px", args.box_px, "--widths", *args.widths))
            assert r.returncode == 0, r.stderr
            print(f"[{ds}] trained in {train_s:.0f} s")
        truth = read_star(d / "test" / "ground_truth.star")
        for mode in args.modes:
            out = d / f"pred_{mode}.star"
            for suffix in (".star", ".json", ".png"):
                out.with_suffix(suffix).unlink(missing_ok=True)
            wall, gb, r = run_measured(cli("predict", "--particles", d / "test" / "particles.star", "--model", model,
                                           "--out", out, "--matching", mode))
            assert r.returncode == 0, r.stderr
            s = json.loads(out.with_suffix(".json").read_text())
            row = {"dataset": ds, "method": f"cryoposeml {mode}", "particles": args.n_test, "wall_s": wall,
                   "particles_per_s": args.n_test / wall, "peak_rss_gb": gb,
                   "fraction_escalated": s.get("fraction_escalated"),
                   "poses_scored_per_particle": s.get("poses_scored_per_particle"),
                   **score_row(out, truth, true_map, sym)}
            if train_s is not None:
                row["train_s"] = train_s
            rows.append(row)
            print(json.dumps(row))
        if {"proposals", "exhaustive"} <= set(args.modes):
            rows.extend(escalation_tradeoff(d, model, truth, sym, ds))
        if args.worker:
            rows.append(worker_row(d, model, truth, sym))
        if args.relion:
            rows.append(relion_row(d, map_path, sym, truth, true_map, args))
        path = write_results(args.out, args.name, args, rows)   # after each dataset: a partial run keeps its rows
    cols = ["dataset", "method", "median_deg", "mean_deg", "pct_under_5deg", "pct_over_30deg", "shift_median_A",
            "fsc05_vs_true_A", "half_map_fsc0143_A", "ece_deg", "spearman_expected_vs_error", "spearman_ceiling",
            "fraction_escalated",
            "poses_scored_per_particle", "particles_per_s", "peak_rss_gb"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c)) for c in cols) + " |")
    print(f"wrote {path}")


def worker_row(d: Path, model: Path, truth, sym: str, n_batches: int = 4) -> dict:
    """The streaming worker (``predict --spool``) fed the test particles in ``n_batches`` batches:
    start-up (process, model, reference, library), then each batch from its submission to its
    outputs on disk (reading, network, matching, writing). Steady state: the batches after the
    first, the worker already waiting."""
    from _worker import feed_worker

    star = read_star(d / "test" / "particles.star")
    folder = d / "worker"
    parts = np.array_split(np.arange(len(star)), n_batches)
    paths = []
    for k, rows in enumerate(parts):
        b = star.copy()
        b.particles = star.particles.iloc[rows].reset_index(drop=True)
        paths.append(write_star(b, d / "test" / f"worker_batch{k}.star"))
    run = feed_worker(model, paths, folder)
    startup, walls = run["startup_s"], run["batch_wall_s"]
    steady = sum(len(r) for r in parts[1:]) / sum(walls[1:])
    out = star.copy()
    out.particles = pd.concat([read_star(p).particles for p in run["outputs"]], ignore_index=True)
    merged = write_star(out, folder / "all.star")
    row = {"dataset": d.name, "method": f"cryoposeml auto, streaming worker ({n_batches} batches)",
           "particles": len(star), "worker_startup_s": startup, "batch_wall_s": walls,
           "particles_per_s": steady, "first_batch_particles_per_s": len(parts[0]) / walls[0],
           **score_row(merged, truth, None, sym)}
    print(json.dumps(row))
    return row


def relion_row(d: Path, map_path: Path, sym: str, truth, true_map, args) -> dict:
    """Relion 3.1 global auto-refine of the test particles (the handoff benchmark's run A)."""
    from cryoposeml.core.fourier import lowpass_volume
    from cryoposeml.engine.refine import autorefine_command, run_relion

    vol, apix = read_map(map_path)
    rel = d / "relion_global"
    (rel / "relion").mkdir(parents=True, exist_ok=True)
    write_map(rel / "reference.mrc", lowpass_volume(vol, apix, 30.0), apix)
    inp = write_star(read_star(d / "test" / "particles.star"), rel / "input.star")
    cmd = autorefine_command(inp.name, "reference.mrc", "relion/run", sym, 30.0, 0.9 * vol.shape[0] * apix, True,
                             healpix_order=2, local_order=4, offset_range_px=5, offset_step_px=1)
    t = time.perf_counter()
    run_relion(cmd, rel, rel / "relion.log", progress=False)
    wall = time.perf_counter() - t
    row = {"dataset": d.name, "method": "Relion 3.1 global auto-refine", "particles": args.n_test, "wall_s": wall,
           "particles_per_s": args.n_test / wall}
    row.update(score_row(rel / "relion" / "run_data.star", truth, true_map, sym, expected=False))
    return row


if __name__ == "__main__":
    main()
