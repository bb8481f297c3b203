"""3D cleanup (half-map FSC chooses the threshold) and the Relion local-refinement handoff, run for
real with Debian's relion_refine_mpi on a few hundred particles."""
import json

import numpy as np
import pytest

from cryoposeml.core.rotations import random_rotations
from cryoposeml.data.star import read_star, write_star
from cryoposeml.engine.demo import perturb_poses
from cryoposeml.engine.evaluate import match_particles
from cryoposeml.core.metrics import angular_error_stats
from conftest import cli


@pytest.fixture(scope="module")
def junk_scored(tmp_path_factory):
    """1000 particles at SNR 0.1 with CTF and shifts, 20% junk (pure noise and PTP1B). Good particles
    get their true poses perturbed by ~4 deg and an expected error in U(2, 8); junk gets random poses
    and U(6, 14): an uncertainty that separates them, but not perfectly."""
    d = tmp_path_factory.mktemp("cleanup")
    r = cli("simulate", "--n", 1000, "--snr", 0.1, "--shift-sigma", 3, "--junk-fraction", 0.2, "--seed", 6,
            "--out", d / "sim")
    assert r.returncode == 0, r.stderr
    s = read_star(d / "sim" / "ground_truth.star")
    junk = s.particles["rlnCpmlJunk"].to_numpy() != 0
    rng = np.random.default_rng(0)
    A = perturb_poses(s.matrices(), 4.0, seed=2)
    A[junk] = random_rotations(int(junk.sum()), 7)
    s.set_poses(A)
    s.particles["rlnCpmlExpectedErrorDeg"] = np.where(junk, rng.uniform(6, 14, len(s)), rng.uniform(2, 8, len(s)))
    return write_star(s, d / "scored.star"), d


def _junk_share(path, junk_col="rlnCpmlJunk"):
    p = read_star(path).particles
    return int((p[junk_col] != 0).sum()), int((p[junk_col] == 0).sum())


def _maps_are_those_of_the_kept_particles(kept_star, tmp_path):
    """cleanup's maps (kept from its sweep) are what ``reconstruct --halves`` makes of KEPT.star."""
    from cryoposeml.data.mrc import half_map_paths, read_map
    from cryoposeml.engine.cleanup import cleanup_paths

    r = cli("reconstruct", "--particles", kept_star, "--out", tmp_path / "again.mrc", "--halves")
    assert r.returncode == 0, r.stderr
    paths = cleanup_paths(kept_star)
    for name, again in zip(("map", "half1", "half2"), (tmp_path / "again.mrc", *half_map_paths(tmp_path / "again.mrc"))):
        ours, ref = read_map(paths[name])[0], read_map(again)[0]
        np.testing.assert_allclose(ours, ref, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_auto_cleanup_uses_the_half_map_fsc(junk_scored, tmp_path):
    star, d = junk_scored
    r = cli("cleanup", "--particles", star, "--out", d / "auto" / "kept.star")
    assert r.returncode == 0, r.stderr
    s = json.loads((d / "auto" / "kept_cleanup.json").read_text())
    junk_kept, good_kept = _junk_share(d / "auto" / "kept.star")
    junk_out, good_out = _junk_share(d / "auto" / "kept_discarded.star")
    assert junk_kept + junk_out == 200 and good_kept + good_out == 800
    # The map decides: removing junk improves the half-map resolution, removing good particles
    # costs it, so the chosen cut keeps nearly every good particle and drops most of the junk.
    assert s["resolution_kept_fsc0143_angstrom"] < s["resolution_all_fsc0143_angstrom"] - 0.3, s
    assert good_out <= 0.10 * 800, (good_out, s["particles_kept"])
    assert junk_out >= 0.6 * 200, (junk_out, s["particles_kept"])
    # ... and the choice is the best resolution of the sweep (ties to more particles).
    best = min(row["resolution_fsc0143_angstrom"] for row in s["sweep"])
    chosen = s["sweep"][s["chosen_index"]]
    assert chosen["crossing_shell_0143"] >= max(row["crossing_shell_0143"] for row in s["sweep"]) - 0.25
    assert chosen["resolution_fsc0143_angstrom"] <= best * 1.05
    assert (d / "auto" / "kept_cleanup.png").stat().st_size > 10_000
    kept = read_star(d / "auto" / "kept.star")
    assert "rlnCpmlExpectedErrorDeg" in kept.particles and "rlnCpmlJunk" in kept.particles   # columns survive
    assert kept.particles["rlnCpmlExpectedErrorDeg"].max() <= s["score_threshold"]
    _maps_are_those_of_the_kept_particles(d / "auto" / "kept.star", tmp_path)


def test_auto_cleanup_drops_what_fails_the_junk_test_first(junk_scored, tmp_path):
    """Verified poses carry rlnCpmlMatchQuantile (the share of the model's good particles that match
    the map worse): uniform for good particles, near 0 for junk. auto drops those under
    --junk-quantile before its FSC sweep, which the FSC alone would not do for a few percent of
    junk; without the column it is the sweep alone."""
    star, d = junk_scored
    s = read_star(star)
    junk = s.particles["rlnCpmlJunk"].to_numpy() != 0
    rng = np.random.default_rng(3)
    q = rng.uniform(0, 1, len(s))
    q[junk] = np.where(rng.uniform(size=junk.sum()) < 0.9, rng.uniform(0, 0.01, junk.sum()), q[junk])
    s.particles["rlnCpmlMatchQuantile"] = q
    s.particles["rlnCpmlExpectedErrorDeg"] = 5.0   # an uncertainty that tells nothing
    src = write_star(s, tmp_path / "q.star")
    r = cli("cleanup", "--particles", src, "--out", tmp_path / "kept.star")
    assert r.returncode == 0, r.stderr
    summary = json.loads((tmp_path / "kept_cleanup.json").read_text())
    failed = int((q < 0.01).sum())
    assert summary["junk_test"] == {"column": "rlnCpmlMatchQuantile", "below": 0.01, "particles": failed}
    junk_out, good_out = _junk_share(tmp_path / "kept_discarded.star")
    assert junk_out >= int((q[junk] < 0.01).sum())           # everything that failed the test is out
    assert summary["particles_kept"] <= len(s) - failed
    assert good_out <= 0.10 * 800, good_out
    assert read_star(tmp_path / "kept.star").particles["rlnCpmlMatchQuantile"].min() >= 0.01
    r = cli("cleanup", "--particles", src, "--out", tmp_path / "off.star", "--junk-quantile", 0)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "off_cleanup.json").read_text())["junk_test"] is None
    r = cli("cleanup", "--particles", src, "--out", tmp_path / "bad.star", "--junk-quantile", 0.7)
    assert r.returncode == 1 and "--junk-quantile" in r.stderr and not (tmp_path / "bad.star").exists()


def test_quantile_and_max_error(junk_scored):
    star, d = junk_scored
    r = cli("cleanup", "--particles", star, "--out", d / "q" / "kept.star", "--method", "quantile",
            "--quantile", 0.3)
    assert r.returncode == 0, r.stderr
    assert len(read_star(d / "q" / "kept.star")) == 700
    assert len(read_star(d / "q" / "kept_discarded.star")) == 300
    _maps_are_those_of_the_kept_particles(d / "q" / "kept.star", d / "q")
    r = cli("cleanup", "--particles", star, "--out", d / "m" / "kept.star", "--method", "max-error",
            "--max-error", 7.0)
    assert r.returncode == 0, r.stderr
    kept = read_star(d / "m" / "kept.star").particles["rlnCpmlExpectedErrorDeg"]
    gone = read_star(d / "m" / "kept_discarded.star").particles["rlnCpmlExpectedErrorDeg"]
    assert kept.max() <= 7.0 < gone.min()
    assert len(read_star(star)) == 1000   # the input is untouched


def test_cleanup_refuses_particles_without_uncertainty(junk_scored, tmp_path):
    _, d = junk_scored
    r = cli("cleanup", "--particles", d / "sim" / "ground_truth.star", "--out", tmp_path / "kept.star")
    assert r.returncode == 1
    assert "rlnCpmlExpectedErrorDeg" in r.stderr and "ground_truth.star" in r.stderr
    assert not any(tmp_path.iterdir())


@pytest.fixture(scope="module")
def perturbed(tmp_path_factory):
    """300 particles at SNR 1 with CTF and shifts, 48 px at 2 A/px (Relion's cost grows with the box
    cubed); poses perturbed by ~4.6 deg (what a good network gives)."""
    d = tmp_path_factory.mktemp("refine")
    r = cli("simulate", "--n", 300, "--snr", 1, "--shift-sigma", 3, "--seed", 5, "--box-px", 48, "--out", d / "sim")
    assert r.returncode == 0, r.stderr
    s = read_star(d / "sim" / "ground_truth.star")
    s.set_poses(perturb_poses(s.matrices(), 5.0, seed=1))
    s.particles["rlnCpmlExpectedErrorDeg"] = np.random.default_rng(0).uniform(4, 10, len(s))
    return write_star(s, d / "perturbed.star"), d


@pytest.mark.relion
def test_relion_local_refinement_improves_the_poses(perturbed):
    star, d = perturbed
    r = cli("refine", "--particles", star, "--out", d / "refine")
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((d / "refine" / "refine.json").read_text())
    truth = read_star(d / "sim" / "ground_truth.star")
    errors = {}
    for name, path in [("given", star), ("refined", d / "refine" / "refined.star")]:
        p = read_star(path)
        ip, it = match_particles(p, truth)
        errors[name] = angular_error_stats(p.matrices()[ip], truth.matrices()[it])["median_deg"]
    assert errors["refined"] < 0.6 * errors["given"], errors
    assert errors["refined"] < 2.5, errors
    # Relion read our priors (it keeps and rewrites them) and kept our own column.
    relion_data = read_star(d / "refine" / "relion" / "run_data.star").particles
    given = read_star(d / "refine" / "input.star").particles
    for c in ["rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior", "rlnOriginXPriorAngst",
              "rlnOriginYPriorAngst", "rlnCpmlExpectedErrorDeg"]:
        np.testing.assert_allclose(relion_data[c].to_numpy(), given[c].to_numpy(), atol=1e-3, err_msg=c)
    np.testing.assert_allclose(given["rlnAngleTiltPrior"], read_star(star).particles["rlnAngleTilt"], atol=1e-4)
    # The search follows the predicted errors: 75th percentile of U(4, 10) = 8.5 deg -> sigma 5.3 deg,
    # sampled at 1.9 deg (order 5: the coarsest step under sigma / 2).
    assert 4.5 < s["search"]["sigma_ang_deg"] < 6.0 and s["search"]["healpix_order"] == 5
    assert "--sigma_ang" in s["relion_command"] and "--auto_local_healpix_order 5" in s["relion_command"]
    assert s["half_map_fsc0143_angstrom"] < 6.0
    for f in ("map.mrc", "map_half1.mrc", "map_half2.mrc", "reference.mrc"):
        assert (d / "refine" / f).stat().st_size > 48 ** 3 * 4


@pytest.mark.relion
def test_refine_reports_a_missing_relion(perturbed, tmp_path):
    from cryoposeml.core.errors import InputError
    from cryoposeml.engine.refine import RefineConfig, refine

    star, _ = perturbed
    with pytest.raises(InputError, match="relion_refine_nonexistent not found"):
        refine(star, tmp_path / "r", RefineConfig(relion_refine="relion_refine_nonexistent"), progress=False)
    assert not (tmp_path / "r").exists()
    # Relion failing: its own error message reaches the user, and no result looks complete.
    r = cli("refine", "--particles", star, "--out", tmp_path / "bad", "--relion-args", "--particle_diameter abc")
    assert r.returncode == 1
    assert "relion_refine_mpi failed" in r.stderr and "textToFloat" in r.stderr
    assert not (tmp_path / "bad" / "refine.json").exists() and not (tmp_path / "bad" / "refined.star").exists()


def test_refine_prepared_for_another_launcher(perturbed, tmp_path):
    """--prepare-only writes the job (what Scipion's runJob launches through hosts.conf) and runs no
    Relion; --finish before Relion has run names what is missing and writes nothing that looks done."""
    star, _ = perturbed
    out = tmp_path / "prep"
    r = cli("refine", "--particles", star, "--out", out, "--mpi", 4, "--threads", 2, "--prepare-only")
    assert r.returncode == 0, r.stderr[-3000:]
    job = json.loads((out / "relion_job.json").read_text())
    assert job["program"] == "relion_refine_mpi" and job["mpi_ranks"] == 4 and job["cwd"] == str(out.resolve())
    args = job["args"]
    assert args[args.index("--i") + 1] == "input.star" and args[args.index("--j") + 1] == "2"
    assert (out / "input.star").exists() and (out / "reference.mrc").exists()
    assert not any((out / "relion").iterdir()) and not (out / "refine.json").exists()
    r = cli("refine", "--out", out, "--finish")
    assert r.returncode == 1 and "run_data.star" in r.stderr and "without its final outputs" in r.stderr
    assert not (out / "refine.json").exists() and not (out / "refined.star").exists()
    r = cli("refine", "--out", tmp_path / "nothing", "--finish")
    assert r.returncode == 1 and "relion_job.json" in r.stderr
