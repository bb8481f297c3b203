"""The map's side of the verified prediction, without a network: how well particles are matched
against a reference, depending on the reference.

Simulates --n-train particles (their true poses make the half-maps, as `train` does) and --n-test
new ones with --junk-fraction junk (half noise, half PTP1B), AdK, 64 px, 1.5 A/px, CTF, origins
of --shift-sigma A, SNR --snr. References: the true map; half-map 1 weighted by Relion's
sqrt(2 FSC / (1 + FSC)) (the first version); half-map 1 masked around the particle and
Wiener-filtered by the masked FSC (what `train` keeps now). For each, on the good test particles:
refinement from the true poses (what the data allow against that map) and the exhaustive search
(library of 36,864 rotations, then local refinement) from origins off by 1 px s.d.: median and
% under 5 deg, the raw posterior spread, the calibrated expected error's cross-fitted ECE and
Spearman; on all test particles, the AUROC of the match z (noise SDs above the null mean) and of
the null-normalised z ((s - mean) / sd over the null poses) for telling junk from particles;
particles/s of the matching alone.

Usage: python benchmarks/bench_matching.py [--n-train 3000] [--n-test 400] [--snr 0.1] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from cryoposeml.core.fourier import fft2_centered
from cryoposeml.core.matching import SCORE_NOISE_SD, ReferenceMatcher, noise_power
from cryoposeml.core.metrics import fsc, soft_sphere_mask
from cryoposeml.core.symmetry import symmetric_distance_deg
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.dataset import ParticleDataset
from cryoposeml.data.mrc import read_map
from cryoposeml.data.star import read_star
from cryoposeml.engine.calibration import auroc, cross_fitted_ece, fit_isotonic_calibration
from cryoposeml.engine.reconstruct import reconstruct_star
from cryoposeml.engine.simulate import SimulationConfig, simulate
from cryoposeml.engine.verify import MatchConfig, _filter, filtered_halves, particle_ctf, verify_batch

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402


def main(argv=None) -> None:
    from scipy.stats import spearmanr

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-train", type=int, default=3000)
    ap.add_argument("--n-test", type=int, default=400)
    ap.add_argument("--snr", type=float, default=0.1)
    ap.add_argument("--shift-sigma", type=float, default=2.0)
    ap.add_argument("--junk-fraction", type=float, default=0.2)
    ap.add_argument("--work", default="bench_matching_work")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bench_matching")
    args = ap.parse_args(argv)
    work = Path(args.work)
    common = dict(map="adk_open", snr=args.snr, shift_sigma_angstrom=args.shift_sigma)
    for name, n, seed, junk in (("train", args.n_train, 1, 0.0), ("test", args.n_test, 2, args.junk_fraction)):
        if not (work / name / "ground_truth.star").exists():
            simulate(SimulationConfig(n=n, seed=seed, junk_fraction=junk, **common), work / name, progress=False)
    train = read_star(work / "train" / "ground_truth.star")
    rec = reconstruct_star(train, halves=True, progress=False)
    apix = train.pixel_size_angstrom
    true_map = read_map(resolve_map("adk_open"))[0]
    _, curve = fsc(rec.half1, rec.half2, apix, soft_sphere_mask(train.box))
    f = np.clip(curve, 0, 0.9999)
    references = {"true map": true_map,
                  "half-map, sqrt(2FSC/(1+FSC))": _filter(rec.half1, np.sqrt(2 * f / (1 + f))),
                  "half-map, masked + Wiener (FSC)": filtered_halves(rec.half1, rec.half2, apix)["half1"]}

    test = read_star(work / "test" / "ground_truth.star")
    junk = test.particles["rlnCpmlJunk"].to_numpy() != 0
    idx = np.arange(len(test))
    raw = torch.from_numpy(ParticleDataset(test).read_batch(idx))
    ctf = particle_ctf(test.ctf_params(), idx, test.box, apix)
    A, o = test.matrices(), test.shifts_px()
    start = torch.as_tensor(o + np.random.default_rng(0).normal(0, 1.0, o.shape), dtype=torch.float32)
    none = np.zeros((0, 3, 3))
    rows = []
    for name, vol in references.items():
        m = ReferenceMatcher(vol, "C1", 16, 27)
        m.library   # built before the clock starts
        g = ~junk
        from_truth = verify_batch(m, raw[g], ctf[g], torch.as_tensor(A[g], dtype=torch.float32)[:, None],
                                  torch.as_tensor(o[g], dtype=torch.float32), MatchConfig(matching="proposals"),
                                  none, 24)
        e_truth = symmetric_distance_deg(from_truth["matrix"].double().numpy(), A[g])
        t = time.perf_counter()
        r = verify_batch(m, raw, ctf, None, start, MatchConfig(matching="exhaustive"), none, 24)
        wall = time.perf_counter() - t
        err = symmetric_distance_deg(r["matrix"].double().numpy(), A)
        x = r["expected_raw"].numpy()
        ece, oof = cross_fitted_ece(-x[g], err[g], fit_isotonic_calibration)
        # the null-normalised z: (s - mean) / sd of the null poses' scores (the first definition)
        d = m.prepare(fft2_centered(raw - raw.mean((-2, -1), keepdim=True)), ctf, noise_power(raw, m.fine, 24),
                      m.coarse)
        mu, sd = m.null_stats(d, r["origin"])
        s = m.score_poses(d, r["matrix"][:, None], r["origin"])[:, 0]
        z_null = ((s - mu) / sd).numpy()
        row = {"reference": name, "from_truth_median_deg": float(np.median(e_truth)),
               "exhaustive_median_deg": float(np.median(err[g])), "exhaustive_mean_deg": float(np.mean(err[g])),
               "exhaustive_pct_under_5deg": float(100 * np.mean(err[g] < 5)),
               "posterior_spread_median_deg": float(np.median(x[g])), "ece_deg": ece,
               "spearman_expected_vs_error": float(spearmanr(oof, err[g]).correlation),
               "junk_auroc_match_z": auroc(r["z"].numpy(), g), "junk_auroc_null_normalised_z": auroc(z_null, g),
               "particles_per_s": len(raw) / wall, "noise_sd_units": SCORE_NOISE_SD}
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = write_results(args.out, args.name, args, rows)
    cols = ["reference", "from_truth_median_deg", "exhaustive_median_deg", "exhaustive_pct_under_5deg",
            "posterior_spread_median_deg", "ece_deg", "spearman_expected_vs_error", "junk_auroc_match_z",
            "junk_auroc_null_normalised_z", "particles_per_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
