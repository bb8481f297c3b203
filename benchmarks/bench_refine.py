"""Relion handoff benchmark: (A) Relion global auto-refine vs (B) predict -> cleanup -> local refine.

Both run on the same simulated test particles (AdK, 64 px at 1.5 A/px, CTF, origins of
--shift-sigma A s.d. (default 4.5 A, 3 px), white noise at --snr, --junk-fraction junk: half pure
noise, half PTP1B projections).
(A) is what a user runs without cryoposeml: relion_refine_mpi auto-refine with global searches
from the true map low-passed to 30 A. (B) uses a model trained on other particles of the same
protein (``--model``, or trained here first, timed separately): cryoposeml predict, cleanup
--method auto, refine. Reported for both: wall clock, half-map FSC-0.143 resolution, FSC-0.5
against the true map, median angular error against the ground truth (junk excluded); for the
cleanup: the share of junk removed and of good particles lost. With --oracle, (C) runs the same
handoff for the good particles from their true poses turned by a known median error (a stand-in
network of that quality; 0: the true poses), which shows what accuracy a network must reach for the
handoff to end where the targets ask.

Usage: python benchmarks/bench_refine.py [--model MODEL_DIR] [--n-test 1000] [--junk-fraction 0.2]
       [--no-priors-too] [--oracle [--oracle-error-deg 3] [--oracle-search-deg 3]] [--global-time-limit MIN] [--skip-global] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cryoposeml.core.fourier import lowpass_volume
from cryoposeml.core.metrics import angular_error_stats, fsc, resolution_at, soft_sphere_mask
from cryoposeml.core.rotations import random_rotations
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map, write_map
from cryoposeml.data.star import read_star, write_star
from cryoposeml.engine.cleanup import CleanupConfig, cleanup
from cryoposeml.engine.demo import perturb_poses
from cryoposeml.engine.evaluate import match_particles
from cryoposeml.engine.predict import predict
from cryoposeml.engine.refine import (RefineConfig, RelionTimeout, autorefine_command, find_program, final_resolution,
                                      refine, run_relion)
from cryoposeml.engine.simulate import SimulationConfig, simulate
from cryoposeml.engine.train import TrainConfig, train


def _pose_error(path, truth) -> float:
    """Median angular error of the non-junk particles of ``path`` against the ground truth."""
    p = read_star(path)
    ip, it = match_particles(p, truth)
    good = truth.particles["rlnCpmlJunk"].to_numpy()[it] == 0
    return angular_error_stats(p.matrices()[ip[good]], truth.matrices()[it[good]])["median_deg"]


def _maps(half1, half2, full, true_map, apix) -> dict:
    mask = soft_sphere_mask(true_map.shape[0])
    f, c = fsc(read_map(half1)[0], read_map(half2)[0], apix, mask)
    f2, c2 = fsc(read_map(full)[0], true_map, apix, mask)
    return {"half_map_fsc0143_A": resolution_at(f, c, 0.143), "vs_true_fsc05_A": resolution_at(f2, c2, 0.5)}


def _last_iteration(rel: Path, truth, true_map, apix) -> dict:
    """(A) stopped early: its last finished iteration, evaluated like a final result (the half-maps
    are that iteration's unmasked half reconstructions; FSC against the truth uses their average)."""
    import re

    its = sorted(int(m.group(1)) for p in rel.glob("run_it*_half2_model.star")
                 if (m := re.match(r"run_it(\d+)_half2_model", p.name)))
    if not its or its[-1] == 0:
        return {"last_iteration": 0}
    it = its[-1]
    root = rel / f"run_it{it:03d}"
    h1, h2 = read_map(f"{root}_half1_class001.mrc")[0], read_map(f"{root}_half2_class001.mrc")[0]
    full = rel / "average_of_last_halves.mrc"
    write_map(full, (h1 + h2) / 2, apix)
    return {"last_iteration": it, "median_deg": _pose_error(f"{root}_data.star", truth),
            "relion_resolution_A": final_resolution(Path(f"{root}_half1_model.star")),
            **_maps(f"{root}_half1_class001.mrc", f"{root}_half2_class001.mrc", full, true_map, apix)}


def _cleanup_outcome(cl: dict, kept_path: Path, truth) -> dict:
    """What a cleanup kept (its summary ``cl`` and ``kept_path``): the share of the junk removed
    (None without junk) and of the good particles lost, and the resolutions before and after."""
    junk = truth.particles["rlnCpmlJunk"].to_numpy() != 0
    kept = junk[match_particles(read_star(kept_path), truth)[1]]
    return {"kept": cl["particles_kept"], "fraction_kept": cl["fraction_kept"],
            "junk_removed_pct": 100 * (1 - kept.sum() / junk.sum()) if junk.any() else None,
            "good_lost_pct": 100 * (1 - (~kept).sum() / (~junk).sum()),
            "resolution_all_A": cl["resolution_all_fsc0143_angstrom"],
            "resolution_kept_A": cl["resolution_kept_fsc0143_angstrom"]}


def _stand_in_cleanup(truth, good, c_dir: Path, good_error_deg: float) -> dict:
    """``cleanup --method auto`` on the stand-in network's poses for all particles: the good ones'
    from ``good``, the junk at random poses, expected errors ``good_error_deg`` and 40 deg (each
    plus up to 1 deg of noise): a network that ranks all junk last."""
    junk = truth.particles["rlnCpmlJunk"].to_numpy() != 0
    s = truth.copy()
    A = s.matrices()
    A[~junk] = good.matrices()
    A[junk] = random_rotations(int(junk.sum()), 5)
    s.set_poses(A)
    noise = np.random.default_rng(0).uniform(0.0, 1.0, len(s))
    s.particles["rlnCpmlExpectedErrorDeg"] = np.where(junk, 40.0, good_error_deg) + noise
    s.particles = s.particles.drop(columns=["rlnCpmlJunk", "rlnCpmlState"], errors="ignore")
    write_star(s, c_dir / "stand_in_all.star")
    cl = cleanup(c_dir / "stand_in_all.star", c_dir / "kept.star", CleanupConfig(), progress=False)
    return _cleanup_outcome(cl, c_dir / "kept.star", truth)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="trained model folder (default: train one on --n-train other particles)")
    ap.add_argument("--n-train", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--junk-fraction", type=float, default=0.2)
    ap.add_argument("--shift-sigma", type=float, default=4.5,
                    help="s.d. of the particles' origins, A (match the model's training data; default: %(default)s)")
    ap.add_argument("--skip-global", action="store_true", help="do not run (A)")
    ap.add_argument("--global-maxsig", type=int, default=0,
                    help="(A)'s --maxsig (0: Relion's default, no limit)")
    ap.add_argument("--global-time-limit", type=float, default=0,
                    help="stop (A) after this many minutes and report its last finished iteration (0: no limit). "
                         "On 2 cores, (A)'s first iteration alone takes about 18 min for 300 particles at SNR 0.1: "
                         "Relion's 'Estimating accuracies in the orientational assignment' at 30 A")
    ap.add_argument("--no-priors-too", action="store_true",
                    help="also run (B) with the predicted poses as the start only (no prior columns)")
    ap.add_argument("--oracle", action="store_true",
                    help="also run (C): the same handoff for the good particles started from their true poses "
                         "turned by --oracle-error-deg (a stand-in network of that median error)")
    ap.add_argument("--oracle-error-deg", type=float, default=3.0,
                    help="(C)'s median start error; 0: the true poses, the floor of any handoff (default: "
                         "%(default)s, the supervised benchmark's target median)")
    ap.add_argument("--oracle-search-deg", type=float, default=3.0,
                    help="(C)'s expected error per particle, from which the handoff picks sigma_ang and the "
                         "HEALPix order (default: %(default)s)")
    ap.add_argument("--work", help="keep intermediate files here (default: a temporary folder, removed)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    find_program("relion_refine_mpi", "the benchmark runs Relion")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cpml_bench_refine_"))
    work.mkdir(parents=True, exist_ok=True)
    result = {"config": vars(args)}
    common = dict(map="adk_open", snr=args.snr, ctf=True, shift_sigma_angstrom=args.shift_sigma)
    try:
        model = Path(args.model) if args.model else work / "model"
        if not args.model:
            simulate(SimulationConfig(n=args.n_train, seed=1, **common), work / "train", progress=False)
            t = time.perf_counter()
            train(work / "train" / "ground_truth.star", model,
                  TrainConfig(model="image2sphere", epochs=args.epochs, box_px=32, widths=(32, 64, 128)),
                  progress=False)
            result["train_s"] = time.perf_counter() - t
        simulate(SimulationConfig(n=args.n_test, seed=2, junk_fraction=args.junk_fraction, **common),
                 work / "test", progress=False)
        truth = read_star(work / "test" / "ground_truth.star")
        true_map, apix = read_map(resolve_map("adk_open"))

        # (B) predict -> cleanup -> local refine
        b = {}
        t = time.perf_counter()
        predict(work / "test" / "particles.star", model, work / "B" / "pred.star", progress=False)
        b["predict_s"] = time.perf_counter() - t
        b["predicted_median_deg"] = _pose_error(work / "B" / "pred.star", truth)
        t = time.perf_counter()
        cl = cleanup(work / "B" / "pred.star", work / "B" / "kept.star", CleanupConfig(), progress=False)
        b["cleanup_s"] = time.perf_counter() - t
        b["cleanup"] = _cleanup_outcome(cl, work / "B" / "kept.star", truth)
        b["kept_median_deg"] = _pose_error(work / "B" / "kept.star", truth)
        rf = refine(work / "B" / "kept.star", work / "B" / "refine", RefineConfig(), progress=False)
        b["refine_s"] = rf["total_seconds"]
        b["relion_s"] = rf["relion_seconds"]
        b["search"] = rf["search"]
        b["wall_s"] = b["predict_s"] + b["cleanup_s"] + b["refine_s"]
        b["median_deg"] = _pose_error(work / "B" / "refine" / "refined.star", truth)
        b["relion_resolution_A"] = rf["relion_resolution_angstrom"]
        r = work / "B" / "refine"
        b.update(_maps(r / "map_half1.mrc", r / "map_half2.mrc", r / "map.mrc", true_map, apix))
        result["B"] = b
        print(json.dumps({"B": b}), flush=True)
        if args.no_priors_too:
            # The same handoff with the predicted poses only as the start (no prior columns): Relion
            # then centres each iteration on the previous pose instead of the network's.
            rf = refine(work / "B" / "kept.star", work / "B" / "refine_np", RefineConfig(priors=False), progress=False)
            r = work / "B" / "refine_np"
            bn = {"refine_s": rf["total_seconds"], "relion_s": rf["relion_seconds"],
                  "wall_s": b["predict_s"] + b["cleanup_s"] + rf["total_seconds"],
                  "median_deg": _pose_error(r / "refined.star", truth),
                  "relion_resolution_A": rf["relion_resolution_angstrom"],
                  **_maps(r / "map_half1.mrc", r / "map_half2.mrc", r / "map.mrc", true_map, apix)}
            result["B_no_priors"] = bn
            print(json.dumps({"B_no_priors": bn}), flush=True)

        if args.oracle:
            # (C) a stand-in network of known quality on the same data: the good particles' true
            # poses turned by random rotations of median angle --oracle-error-deg (0: the true
            # poses), each with the expected error --oracle-search-deg (which sets the handoff's
            # sigma and sampling). Its handoff, on the good particles only, shows what a network of
            # that quality would end at; with 0, the floor of any handoff (though priors centred on
            # the truth also pull towards it). Its cleanup adds the junk at random poses, ranked
            # last: whether the half-map FSC then finds where the junk starts.
            c_dir = work / "C"
            c_dir.mkdir(parents=True)
            good = truth.copy()
            good.particles = truth.particles[truth.particles["rlnCpmlJunk"] == 0].reset_index(drop=True)
            if args.oracle_error_deg > 0:   # |N(0, s)| has median 0.674 s
                good.set_poses(perturb_poses(good.matrices(), args.oracle_error_deg / 0.674, seed=3))
            good.particles["rlnCpmlExpectedErrorDeg"] = args.oracle_search_deg
            write_star(good, c_dir / "stand_in_good.star")
            oc = {"start_median_deg": _pose_error(c_dir / "stand_in_good.star", truth)}
            if b["cleanup"]["junk_removed_pct"] is not None:   # the test set has junk
                oc["cleanup"] = _stand_in_cleanup(truth, good, c_dir, args.oracle_search_deg)
            rf = refine(c_dir / "stand_in_good.star", c_dir / "refine", RefineConfig(), progress=False)
            r = c_dir / "refine"
            oc.update({"search": rf["search"], "refine_s": rf["total_seconds"], "relion_s": rf["relion_seconds"],
                       "wall_s": rf["total_seconds"], "median_deg": _pose_error(r / "refined.star", truth),
                       "relion_resolution_A": rf["relion_resolution_angstrom"],
                       **_maps(r / "map_half1.mrc", r / "map_half2.mrc", r / "map.mrc", true_map, apix)})
            result["C_oracle"] = oc
            print(json.dumps({"C_oracle": oc}), flush=True)

        # (A) Relion global auto-refine from the true map low-passed to 30 A
        if not args.skip_global:
            a_dir = work / "A"
            (a_dir / "relion").mkdir(parents=True)
            inp = write_star(read_star(work / "test" / "particles.star"), a_dir / "input.star")
            write_map(a_dir / "reference.mrc", lowpass_volume(true_map, apix, 30.0), apix)
            box = true_map.shape[0]
            cmd = autorefine_command(inp.name, "reference.mrc", "relion/run", "C1", 30.0, 0.9 * box * apix, True,
                                     healpix_order=2, local_order=4, offset_range_px=5, offset_step_px=1,
                                     extra_args=f"--maxsig {args.global_maxsig}" if args.global_maxsig else "")
            t = time.perf_counter()
            rel = a_dir / "relion"
            try:
                run_relion(cmd, a_dir, a_dir / "relion.log", progress=False,
                           timeout_s=60 * args.global_time_limit or None)
                a = {"wall_s": time.perf_counter() - t, "command": " ".join(cmd), "finished": True}
                a["median_deg"] = _pose_error(rel / "run_data.star", truth)
                a["relion_resolution_A"] = final_resolution(rel / "run_model.star")
                a.update(_maps(rel / "run_half1_class001_unfil.mrc", rel / "run_half2_class001_unfil.mrc",
                               rel / "run_class001.mrc", true_map, apix))
            except RelionTimeout:
                a = {"wall_s": time.perf_counter() - t, "command": " ".join(cmd), "finished": False,
                     **_last_iteration(rel, truth, true_map, apix)}
            result["A"] = a
            result["speedup_A_over_B"] = a["wall_s"] / b["wall_s"]   # a lower bound when A did not finish
            if "half_map_fsc0143_A" in a:
                shell = box * apix
                result["resolution_gap_shells"] = shell / b["half_map_fsc0143_A"] - shell / a["half_map_fsc0143_A"]
    finally:
        if not args.work:
            shutil.rmtree(work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_refine.json").write_text(json.dumps(result, indent=2, default=float))
    print("run | wall clock (min) | half-map FSC 0.143 (A) | Relion resolution (A) | FSC 0.5 vs true (A) | median error (deg)")
    for k in ("A", "B", "B_no_priors", "C_oracle"):
        if k in result:
            r = result[k]
            if "median_deg" not in r:
                print(f"{k} | > {r['wall_s'] / 60:.1f} (stopped in its first iteration) | | | |")
                continue
            note = "" if r.get("finished", True) else f" (stopped after iteration {r['last_iteration']})"
            print(f"{k} | {r['wall_s'] / 60:.1f}{note} | {r['half_map_fsc0143_A']:.2f} | {r['relion_resolution_A']:.2f} | "
                  f"{r['vs_true_fsc05_A']:.2f} | {r['median_deg']:.2f}")
    c = result["B"]["cleanup"]
    junk = "no junk" if c["junk_removed_pct"] is None else f"junk removed {c['junk_removed_pct']:.1f}%"
    print(f"cleanup: kept {c['kept']} ({c['fraction_kept']:.0%}); {junk}, "
          f"good lost {c['good_lost_pct']:.1f}%; predicted median {result['B']['predicted_median_deg']:.2f} deg")
    if "cleanup" in result.get("C_oracle", {}):
        c = result["C_oracle"]["cleanup"]
        print(f"C's cleanup (junk ranked last): kept {c['kept']} ({c['fraction_kept']:.0%}); junk removed "
              f"{c['junk_removed_pct']:.1f}%, good lost {c['good_lost_pct']:.1f}%; "
              f"{c['resolution_all_A']:.2f} -> {c['resolution_kept_A']:.2f} A")
    if "speedup_A_over_B" in result:
        bound = "" if result["A"]["finished"] else "at least "
        print(f"B is {bound}{result['speedup_A_over_B']:.1f}x faster than A" +
              (f"; resolution gap {result['resolution_gap_shells']:+.2f} shells (negative: B worse)"
               if "resolution_gap_shells" in result else ""))
    print(f"wrote {out / 'bench_refine.json'}")


if __name__ == "__main__":
    main()
