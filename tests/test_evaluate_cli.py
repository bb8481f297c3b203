"""``cryoposeml evaluate`` and ``cryoposeml demo``: numbers checked against independent computations."""
import json

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryoposeml.core.symmetry import symmetry_group
from cryoposeml.data.star import read_star, write_star
from conftest import MAPS, cli


def test_evaluate_median_matches_scipy(sim_noise_free_ctf, tmp_path):
    truth = read_star(sim_noise_free_ctf / "ground_truth.star")
    good = truth.particles["rlnCpmlJunk"].to_numpy() == 0
    rng = np.random.default_rng(5)
    A = truth.matrices()
    axis = rng.normal(size=(len(A), 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    noise = Rotation.from_rotvec(axis * np.deg2rad(rng.gamma(2.0, 3.0, len(A)))[:, None]).as_matrix()
    pred = truth.copy()
    pred.set_poses(A @ noise, truth.shifts_angstrom() + rng.normal(0, 1.0, (len(A), 2)))
    pred.particles["rlnParticleFigureOfMerit"] = rng.uniform(0, 1, len(A))
    # the prediction lives elsewhere, in another order: matching must be by image
    pred.particles = pred.particles.iloc[::-1].reset_index(drop=True)
    write_star(pred, tmp_path / "sub" / "pred.star")

    r = cli("evaluate", "--particles", tmp_path / "sub" / "pred.star", "--reference",
            sim_noise_free_ctf / "ground_truth.star", "--out", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())["poses"]
    # independent: scipy's rotation magnitude of R_true^T R_pred, in the file's original order
    P = read_star(tmp_path / "sub" / "pred.star")
    Ap = P.matrices()[::-1]
    err = np.rad2deg((Rotation.from_matrix(A[good]).inv() * Rotation.from_matrix(Ap[good])).magnitude())
    assert abs(rep["median_deg"] - np.median(err)) < 0.01
    assert abs(rep["mean_deg"] - err.mean()) < 0.01
    assert abs(rep["pct_under_5deg"] - 100 * np.mean(err < 5)) < 1e-6
    fom = P.particles["rlnParticleFigureOfMerit"].to_numpy()[::-1][good]
    assert abs(rep["weighted_mean_deg"] - np.sum(fom * err) / fom.sum()) < 0.01
    assert rep["matched_particles"] == good.sum()
    assert 0.5 < rep["shift_error_median_angstrom"] < 2.0
    assert (tmp_path / "report.png").stat().st_size > 10_000


def test_evaluate_poses_exported_without_their_stacks(sim_noise_free_ctf, tmp_path):
    """Poses from another machine: the STAR names stacks that are not here. Pose errors need no
    images, so evaluate matches particles by stack file name and slice and gives the same numbers;
    with --map (which reconstructs) the missing stack is named."""
    truth = read_star(sim_noise_free_ctf / "ground_truth.star")
    pred = truth.copy()
    pred.set_poses(truth.matrices() @ Rotation.from_euler("z", 3, degrees=True).as_matrix())
    pred.particles["rlnImageName"] = [n.split("@")[0] + "@/elsewhere/Particles/" + n.split("/")[-1]
                                      for n in truth.particles["rlnImageName"]]
    pred.particles = pred.particles.iloc[::-1].reset_index(drop=True)
    pred.path = None
    write_star(pred, tmp_path / "exported.star")
    r = cli("evaluate", "--particles", tmp_path / "exported.star", "--reference",
            sim_noise_free_ctf / "ground_truth.star", "--out", tmp_path / "report.json")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "report.json").read_text())["poses"]
    assert rep["matched_particles"] == int((truth.particles["rlnCpmlJunk"] == 0).sum())
    assert abs(rep["median_deg"] - 3.0) < 1e-3 and abs(rep["mean_deg"] - 3.0) < 1e-3, rep
    r = cli("evaluate", "--particles", tmp_path / "exported.star", "--reference",
            sim_noise_free_ctf / "ground_truth.star", "--map", MAPS / "adk_open.mrc", "--out", tmp_path / "m.json")
    assert r.returncode == 1 and "/elsewhere/Particles/" in r.stderr and "not found" in r.stderr, r.stderr
    assert not (tmp_path / "m.json").exists()


def test_evaluate_symmetry_mates_have_zero_error(sim_noise_free_ctf, tmp_path):
    truth = read_star(sim_noise_free_ctf / "ground_truth.star")
    G = symmetry_group("D2")
    pick = np.random.default_rng(0).integers(0, len(G), len(truth))
    mates = truth.copy()
    mates.set_poses(truth.matrices() @ G[pick])
    write_star(mates, tmp_path / "mates.star")
    out = {}
    for sym in ("D2", "C1"):
        r = cli("evaluate", "--particles", tmp_path / "mates.star", "--reference",
                sim_noise_free_ctf / "ground_truth.star", "--sym", sym, "--out", tmp_path / f"{sym}.json")
        assert r.returncode == 0, r.stderr
        out[sym] = json.loads((tmp_path / f"{sym}.json").read_text())["poses"]
    assert out["D2"]["mean_deg"] < 1e-3
    # without the symmetry most of them are 180 deg away
    assert out["C1"]["median_deg"] > 170


def test_evaluate_with_map(sim_noise_free_ctf, tmp_path):
    r = cli("evaluate", "--particles", sim_noise_free_ctf / "ground_truth.star", "--reference",
            sim_noise_free_ctf / "ground_truth.star", "--map", MAPS / "adk_open.mrc", "--out", tmp_path / "r.json")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "r.json").read_text())["maps"]
    # noise-free data at the true poses: the map is the truth up to (almost) Nyquist (3 A)
    assert m["resolution_vs_reference_fsc05_angstrom"] < 3.2
    assert m["pcc_vs_reference"] > 0.99 and m["pcc_half_maps"] > 0.99


@pytest.mark.slow
def test_demo_runs(tmp_path):
    """The whole pipeline, tiny (a model trained for 2 epochs predicts little): every stage runs, the
    report's numbers are the evaluations', and a second run never overwrites the first."""
    args = ["demo", "--out", tmp_path / "demo", "--n-train", 500, "--n", 250, "--epochs", 2]
    r = cli(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "demo"
    report = (d / "report.md").read_text()
    for name, label in [("network", "network alone (all particles)"),
                        ("predicted", "verified against the map (all particles)"), ("cleanup", "after cleanup"),
                        ("refined", "after Relion local refinement")]:
        ev = json.loads((d / "evaluation" / f"{name}.json").read_text())
        row = [l for l in report.splitlines() if l.startswith(f"| {label} |")][0].split("|")
        assert float(row[3]) == pytest.approx(ev["poses"]["median_deg"], abs=0.006)
        assert float(row[6]) == pytest.approx(ev["maps"]["resolution_half_maps_fsc0143_angstrom"], abs=0.006)
    kept, gone = read_star(d / "cleanup" / "kept.star"), d / "cleanup" / "kept_discarded.star"
    assert len(kept) + (len(read_star(gone)) if gone.exists() else 0) == 250
    assert len(read_star(d / "refine" / "refined.star")) == len(kept)
    again = cli(*args)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_fom_weighting_ignores_zero_weight_particles(sim_noise_free_ctf, tmp_path):
    """Particles with rlnParticleFigureOfMerit 0 (here with scrambled poses) must not count."""
    from cryoposeml.core.metrics import pcc
    from cryoposeml.core.rotations import random_rotations
    from cryoposeml.data.mrc import read_map

    star = read_star(sim_noise_free_ctf / "ground_truth.star")
    bad = np.arange(len(star)) % 3 == 0
    A = star.matrices()
    A[bad] = random_rotations(int(bad.sum()), 0)
    star.set_poses(A)
    star.particles["rlnParticleFigureOfMerit"] = np.where(bad, 0.0, 0.7)
    write_star(star, tmp_path / "all.star")
    good_only = star.copy()
    good_only.particles = star.particles[~bad].reset_index(drop=True)
    write_star(good_only, tmp_path / "good.star")
    for name, extra in (("weighted", ["--fom-weighting"]), ("plain", [])):
        r = cli("reconstruct", "--particles", tmp_path / "all.star", "--out", tmp_path / f"{name}.mrc", *extra)
        assert r.returncode == 0, r.stderr
    r = cli("reconstruct", "--particles", tmp_path / "good.star", "--out", tmp_path / "good.mrc")
    assert r.returncode == 0, r.stderr
    weighted, good, plain = (read_map(tmp_path / f"{n}.mrc")[0] for n in ("weighted", "good", "plain"))
    assert pcc(weighted, good) > 0.999
    assert pcc(plain, good) < 0.99
