"""Supervised pose estimation benchmark: simulate, train, predict held-out particles, evaluate.

    .venv/bin/python benchmarks/bench_supervised.py [--n-train 20000] [--n-test 2000] [--snr 0.1]
        [--box-px 64] [--epochs 30] [--models image2sphere equivariant bingham] [--datasets C1 D2] [--device auto]

Datasets: C1 = AdK (bundled adk_open), D2 = the bundled D2-symmetrised AdK map; CTF, shifts of
about 3 px s.d., white noise at --snr. The test particles are simulated separately (another seed)
and never seen in training. Per model and dataset it reports the median and mean angular error
(symmetry-aware), % under 5 and 10 deg, shift error, ECE (mean |expected - actual| error over
deciles of the predicted error, degrees), AUROC of the FOM for "error > 10 deg", training time,
inference particles/s and the process's peak resident memory (cumulative over the run). The JSON
also has a 10-degree histogram of the errors: a model confused by the symmetry piles errors up
near half the symmetry angles (e.g. 90 deg for D2's 2-folds). Prints a table, writes JSON.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import write_results
from cryoposeml.core.symmetry import symmetric_distance_deg
from cryoposeml.data.star import read_star
from cryoposeml.engine.calibration import auroc, expected_calibration_error
from cryoposeml.engine.predict import predict
from cryoposeml.engine.simulate import SimulationConfig, simulate
from cryoposeml.engine.train import TrainConfig, train

MAPS = {"C1": "adk_open", "D2": "d2_test"}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=20000)
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--box-px", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--widths", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--models", nargs="+", default=["image2sphere", "equivariant", "bingham"])
    ap.add_argument("--datasets", nargs="+", default=["C1", "D2"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpml_bench_sup_"))
    rows = []
    try:
        for ds in args.datasets:
            common = dict(map=MAPS[ds], snr=args.snr, ctf=True, sym=ds, shift_sigma_angstrom=4.5)
            simulate(SimulationConfig(n=args.n_train, seed=1, **common), work / ds / "train", progress=False)
            simulate(SimulationConfig(n=args.n_test, seed=2, **common), work / ds / "test", progress=False)
            truth = read_star(work / ds / "test" / "ground_truth.star")
            for model in args.models:
                mdir = work / ds / model
                t = time.perf_counter()
                meta = train(work / ds / "train" / "ground_truth.star", mdir,
                             TrainConfig(model=model, sym=ds, epochs=args.epochs, box_px=args.box_px,
                                         widths=tuple(args.widths), device=args.device), progress=False)
                t_train = time.perf_counter() - t
                t = time.perf_counter()
                predict(work / ds / "test" / "particles.star", mdir, mdir / "pred.star", device=args.device,
                        progress=False)
                t_pred = time.perf_counter() - t
                pred = read_star(mdir / "pred.star")
                err = symmetric_distance_deg(pred.matrices(), truth.matrices(), ds)
                shift = np.linalg.norm(pred.shifts_angstrom() - truth.shifts_angstrom(), axis=1)
                expected = pred.particles["rlnCpmlExpectedErrorDeg"].to_numpy()
                fom = pred.particles["rlnParticleFigureOfMerit"].to_numpy()
                rows.append(dict(
                    dataset=ds, model=model, median_deg=float(np.median(err)), mean_deg=float(err.mean()),
                    pct_under_5=float(100 * np.mean(err < 5)), pct_under_10=float(100 * np.mean(err < 10)),
                    pct_over_30=float(100 * np.mean(err > 30)),
                    error_histogram_10deg=np.histogram(err, bins=np.arange(0, 190, 10))[0].tolist(),
                    shift_median_A=float(np.median(shift)), ece_deg=expected_calibration_error(expected, err),
                    auroc=auroc(-fom, err > 10), val_ece_deg=meta["runs"]["full"]["validation"]["ece_deg"],
                    train_s=t_train, epochs_run=meta["runs"]["full"]["epochs_run"],
                    infer_particles_per_s=args.n_test / t_pred,
                    peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
                print(json.dumps(rows[-1]), flush=True)
                _write(args, rows)   # after every model: a long run stopped early keeps what it measured
    finally:
        shutil.rmtree(work)
    head = ["dataset", "model", "median_deg", "mean_deg", "pct_under_5", "pct_under_10", "pct_over_30",
            "shift_median_A",
            "ece_deg", "auroc", "train_s", "infer_particles_per_s", "peak_rss_mib"]
    print(" | ".join(head))
    for r in rows:
        print(" | ".join(f"{r[h]:.2f}" if isinstance(r[h], float) else str(r[h]) for h in head))
    print(f"wrote {_write(args, rows)}")


def _write(args, rows) -> Path:
    return write_results(args.out, "bench_supervised", args, rows)


if __name__ == "__main__":
    main()
