"""Supervised training and prediction: label-consistent augmentation, learning on a tiny set,
deterministic prediction with calibrated uncertainty, resume after a kill, safe loading."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from cryoposeml.core.inplane import D4, transform_images, transform_poses
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import geodesic_distance_deg, random_rotations
from cryoposeml.data.star import read_star
from conftest import cli

TINY = ["--box-px", 32, "--widths", 16, 32, 64, "--batch-size", 64]


def test_d4_transforms_match_the_projector(adk_map):
    """Turning/mirroring an image equals projecting at the transformed pose (seed 004, eq. 4)."""
    vol, _ = adk_map
    P = Projector(vol)
    A = torch.as_tensor(random_rotations(6, 3), dtype=torch.float32)
    o = torch.tensor([[2.0, -3.0], [1, 1], [0, 4], [-2, 0.5], [3, 3], [0, 0]])
    img = P.project(A, o)
    for T in D4:
        A2, o2 = transform_poses(A, o, T)
        expected = P.project(A2, o2)
        got = transform_images(img, T)
        cc = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(expected.numpy(), got.numpy())]
        assert min(cc) > 0.9999, (T, cc)


def test_equivariant_network_follows_turns_and_mirrors():
    """The escnn D4 network: turning or mirroring the image turns the predicted pose by T3 and the
    shift by T (seed 004, eq. 4), and leaves the confidence unchanged, to rounding."""
    from cryoposeml.models import PoseNetConfig, build_model

    torch.manual_seed(0)
    for box in (32, 48):
        model = build_model(PoseNetConfig(family="equivariant", box=box, widths=(8, 16, 32))).eval()
        x = torch.randn(3, box, box)
        with torch.no_grad():
            ref = model(x)
            for T in D4:
                got = model(transform_images(x, T))
                A, o = transform_poses(ref["matrix"], ref["shift_px"], T)
                assert torch.allclose(got["matrix"], A, atol=1e-4), T
                assert torch.allclose(got["shift_px"], o, atol=1e-4), T
                assert torch.allclose(got["confidence"], ref["confidence"], atol=1e-4), T


@pytest.mark.parametrize("form", ["symmetric", "cholesky"])
def test_bingham_head_returns_the_smallest_eigenvector(form):
    from cryoposeml.models.heads import BinghamHead

    torch.manual_seed(0)
    head = BinghamHead(8, form=form)
    feats = torch.randn(5, 8, requires_grad=True)
    out = head(feats)
    q = out["quaternion"]
    assert torch.allclose(q.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert (out["dispersion"] > 0).all()
    R = out["matrix"]
    assert torch.allclose(R @ R.transpose(-1, -2), torch.eye(3).expand(5, 3, 3), atol=1e-5)
    out["quaternion"].sum().backward()
    assert torch.isfinite(feats.grad).all()


def test_models_written_before_the_symmetric_head_load_as_they_were():
    """A model.json without pool_grid / head_form is an older bingham or sixd network: 4 x 4 pooled
    layout and a Cholesky head. Its weights must fit the network built from it, and no other."""
    from cryoposeml.models import PoseNetConfig, build_model

    new = PoseNetConfig(family="bingham", box=32, widths=(8, 16, 32))
    old = new.to_dict()
    del old["pool_grid"], old["head_form"]
    legacy = PoseNetConfig.from_dict(old)
    assert (legacy.pool_grid, legacy.head_form) == (4, "cholesky")
    assert PoseNetConfig.from_dict(new.to_dict()) == new
    old_weights = build_model(legacy).state_dict()
    build_model(PoseNetConfig.from_dict(old)).load_state_dict(old_weights)
    with pytest.raises(RuntimeError):
        build_model(new).load_state_dict(old_weights)


@pytest.fixture(scope="module")
def tiny_training(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    r = cli("simulate", "--n", 3000, "--no-noise", "--shift-sigma", 1.5, "--seed", 4, "--out", d / "sim")
    assert r.returncode == 0, r.stderr
    star = read_star(d / "sim" / "ground_truth.star")
    # held-out particles the model never sees: the last 200
    train = star.copy()
    train.particles = star.particles.iloc[:2800].reset_index(drop=True)
    test = star.copy()
    test.particles = star.particles.iloc[2800:].reset_index(drop=True)
    from cryoposeml.data.star import write_star

    write_star(train, d / "train.star")
    write_star(test, d / "test.star")
    t = time.perf_counter()
    r = cli("train", "--particles", d / "train.star", "--out", d / "model", "--model", "image2sphere",
            "--epochs", 20, "--no-augment", "--lr", "1e-3", "--box-px", 32, "--widths", 32, 64, 128)
    assert r.returncode == 0, r.stderr
    print(f"tiny training took {time.perf_counter() - t:.0f} s")
    return d


def test_training_learns_and_prediction_is_calibrated(tiny_training):
    d = tiny_training
    meta = json.loads((d / "model" / "model.json").read_text())
    val = meta["runs"]["full"]["validation"]
    # a random pose is ~126 deg off on average; the network must have learned the map's views
    assert val["median_deg"] < 15, val
    # the network alone (its own calibration is what is checked here)
    for name in ("pred1", "pred2"):
        r = cli("predict", "--particles", d / "test.star", "--model", d / "model", "--out", d / f"{name}.star",
                "--matching", "none")
        assert r.returncode == 0, r.stderr
    p1, p2 = read_star(d / "pred1.star"), read_star(d / "pred2.star")
    # deterministic
    np.testing.assert_array_equal(p1.particles["rlnAngleRot"].to_numpy(), p2.particles["rlnAngleRot"].to_numpy())
    fom = p1.particles["rlnParticleFigureOfMerit"].to_numpy()
    assert ((fom >= 0) & (fom <= 1)).all()
    r = cli("evaluate", "--particles", d / "pred1.star", "--reference", d / "test.star", "--out", d / "ev.json")
    assert r.returncode == 0, r.stderr
    ev = json.loads((d / "ev.json").read_text())["poses"]
    assert ev["median_deg"] < 15, ev
    # the expected error is of the right size on particles it never saw, and it ranks them:
    # the confident half is more accurate than the other half
    expected = p1.particles["rlnCpmlExpectedErrorDeg"].to_numpy()
    assert abs(np.mean(expected) - ev["mean_deg"]) < 10
    assert ev["weighted_mean_deg"] < ev["mean_deg"]
    summary = json.loads((d / "pred1.json").read_text())
    assert summary["runs"]["full"]["transfers"]
    # verified against the model's reference (the default), the same particles come out far better:
    # noise-free, the map pins every pose the network got into the right basin, and the rest escalate
    r = cli("predict", "--particles", d / "test.star", "--model", d / "model", "--out", d / "verified.star")
    assert r.returncode == 0, r.stderr
    r = cli("evaluate", "--particles", d / "verified.star", "--reference", d / "test.star", "--out", d / "ev_v.json")
    assert r.returncode == 0, r.stderr
    ev_v = json.loads((d / "ev_v.json").read_text())["poses"]
    assert ev_v["median_deg"] < 1.0 and ev_v["pct_under_5deg"] > 97, ev_v
    assert ev_v["shift_error_median_angstrom"] < 0.3, ev_v
    verified = read_star(d / "verified.star").particles
    assert {"rlnCpmlMatchZ", "rlnMaxValueProbDistribution", "rlnCpmlEscalated"} <= set(verified.columns)
    matching = json.loads((d / "model" / "model.json").read_text())["runs"]["full"]["matching_validation"]
    assert matching["median_deg"] < 1.0, matching     # the held-out calibration split, verified
    # new good particles sit in the model's distribution of good match z-scores: their quantiles
    # spread over (0, 1) and few fall in the junk test's 1% tail
    q = verified["rlnCpmlMatchQuantile"].to_numpy()
    assert 0.25 < np.median(q) < 0.75 and np.mean(q < 0.01) < 0.05, np.percentile(q, [1, 10, 50, 90])


def test_the_streaming_worker_gives_what_one_shot_predict_gives(tiny_training, tmp_path):
    """``predict --spool``: one process, model and library loaded once, three batches served (one of
    them refused with the file named), then stopped; each batch's poses equal a one-shot ``predict``
    of the same file (deterministic), and nothing is written for the refused one."""
    from cryoposeml.data.star import write_star
    from cryoposeml.engine.spool import SpoolClient

    d = tiny_training
    test = read_star(d / "test.star")
    batches = []
    for k in range(2):
        b = test.copy()
        b.particles = test.particles.iloc[100 * k:100 * (k + 1)].reset_index(drop=True)
        batches.append(write_star(b, d / f"batch{k}.star"))   # beside the stacks: paths stay valid
    client = SpoolClient(tmp_path / "spool")
    client.submit("b0", batches[0], tmp_path / "w0.star")
    client.submit("b1", tmp_path / "missing.star", tmp_path / "wbad.star")
    client.submit("b2", batches[1], tmp_path / "w1.star")
    live = tmp_path / "live"
    worker = subprocess.Popen([sys.executable, "-m", "cryoposeml.cli", "predict", "--model", d / "model",
                               "--spool", client.folder, "--live-map", live, "--quiet"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        s0 = client.wait("b0", timeout_s=300)
        with pytest.raises(Exception, match="missing.star"):
            client.wait("b1", timeout_s=300)
        s1 = client.wait("b2", timeout_s=300)
        client.stop()
        out, err = worker.communicate(timeout=60)
    finally:
        worker.kill()
    assert worker.returncode == 0, err
    assert "2 batches predicted, 1 refused" in out
    assert s0["particles"] == s1["particles"] == 100 and s0["matching"] == "auto"
    assert not (tmp_path / "wbad.star").exists()
    for k in range(2):
        r = cli("predict", "--particles", batches[k], "--model", d / "model", "--out", tmp_path / f"o{k}.star")
        assert r.returncode == 0, r.stderr
        served, one_shot = read_star(tmp_path / f"w{k}.star").particles, read_star(tmp_path / f"o{k}.star").particles
        for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnCpmlMatchZ",
                    "rlnCpmlExpectedErrorDeg"):
            np.testing.assert_allclose(served[col].to_numpy(), one_shot[col].to_numpy(), atol=1e-6, err_msg=col)

    # the live map: the batches' particles that pass the junk test, inserted as they came; it is the
    # map `reconstruct --halves` makes of those particles, and its resolution is in the history
    history = json.loads((live / "history.json").read_text())["batches"]
    assert [h["batch"] for h in history] == ["b0", "b2"] and history[-1]["particles_seen"] == 200
    kept = [read_star(tmp_path / f"w{k}.star") for k in range(2)]
    for k in kept:
        k.particles = k.particles[k.particles["rlnCpmlMatchQuantile"] >= 0.01]
    assert history[-1]["particles_kept"] == sum(len(k) for k in kept) >= 180
    assert history[-1]["resolution_fsc0143_angstrom"] < 10, history
    both = kept[0].copy()
    both.particles = pd.concat([k.particles for k in kept], ignore_index=True)
    write_star(both, tmp_path / "kept.star")
    r = cli("reconstruct", "--particles", tmp_path / "kept.star", "--out", tmp_path / "kept_map.mrc", "--halves")
    assert r.returncode == 0, r.stderr
    from cryoposeml.core.metrics import pcc
    from cryoposeml.data.mrc import read_map

    for name in ("map.mrc", "map_half1.mrc", "map_half2.mrc"):
        other = name.replace("map", "kept_map")
        assert pcc(read_map(live / name)[0], read_map(tmp_path / other)[0]) > 0.999, name
    # a restarted worker carries on from the saved state: a batch served again (a protocol killed
    # and resumed) is not inserted twice, a new one is
    again = SpoolClient(tmp_path / "spool2")
    again.submit("b0", batches[0], tmp_path / "w0_again.star")
    again.submit("b3", batches[0], tmp_path / "w3.star")
    again.stop()
    r = subprocess.run([sys.executable, "-m", "cryoposeml.cli", "predict", "--model", d / "model", "--spool",
                        again.folder, "--live-map", live, "--quiet"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    history2 = json.loads((live / "history.json").read_text())["batches"]
    assert [h["batch"] for h in history2] == ["b0", "b2", "b3"]
    assert history2[-1]["particles_kept"] == history[-1]["particles_kept"] + len(kept[0])


def test_a_model_of_another_protein_does_not_transfer(tiny_training, tmp_path):
    """Particles of PTP1B given to the AdK model: warned, and refused with --strict."""
    d = tiny_training
    r = cli("simulate", "--map", "other_ptp1b", "--n", 200, "--no-noise", "--shift-sigma", 1.5, "--seed", 9,
            "--out", tmp_path / "ptp")
    assert r.returncode == 0, r.stderr
    r = cli("predict", "--particles", tmp_path / "ptp" / "particles.star", "--model", d / "model", "--out",
            tmp_path / "strict.star", "--strict")
    assert r.returncode == 1 and "does not seem to transfer" in r.stderr, r.stderr
    assert not (tmp_path / "strict.star").exists() and not (tmp_path / "strict.json").exists()
    r = cli("predict", "--particles", tmp_path / "ptp" / "particles.star", "--model", d / "model", "--out",
            tmp_path / "p.star")
    assert r.returncode == 0 and "does not seem to transfer" in r.stderr, r.stderr
    run = json.loads((tmp_path / "p.json").read_text())["runs"]["full"]
    assert not run["transfers"] and run["fraction_below_validation_p25"] > 0.5, run


def test_top_k_poses_are_distinct_and_ranked(tiny_training, tmp_path):
    d = tiny_training
    r = cli("predict", "--particles", d / "test.star", "--model", d / "model", "--out", tmp_path / "p.star",
            "--top-k", 3, "--matching", "none")
    assert r.returncode == 0, r.stderr
    main, top = read_star(tmp_path / "p.star"), read_star(tmp_path / "p_top3.star")
    n = len(main)
    assert len(top) == 3 * n
    ranks = top.particles["rlnCpmlPoseRank"].to_numpy().reshape(n, 3)
    assert (ranks == [1, 2, 3]).all()
    A = top.matrices().reshape(n, 3, 3, 3)
    # rank 1 is the main output's pose; the others are other peaks (15 deg apart before the local
    # refinement, which moves each by a fraction of a grid cell)
    assert geodesic_distance_deg(A[:, 0], main.matrices()).max() < 0.01
    for other in (1, 2):
        d_other = geodesic_distance_deg(A[:, 0], A[:, other])
        assert d_other.min() > 10 and np.median(d_other) > 30, np.sort(d_other)[:5]
    prob = top.particles["rlnCpmlPoseProbability"].to_numpy().reshape(n, 3)
    assert ((prob >= 0) & (prob <= 1)).all()
    assert np.median(prob[:, 0]) > np.median(prob[:, 1])
    # the true pose is among the top 3 at least as often as it is the best one
    truth = read_star(d / "test.star").matrices()
    err = geodesic_distance_deg(A, truth[:, None])
    assert np.mean(err.min(1) < 10) >= np.mean(err[:, 0] < 10)


def test_predict_refuses_a_model_for_another_box(tiny_training, tmp_path):
    d = tiny_training
    text = (d / "test.star").read_text()
    (d / "test.star").parent.joinpath("other_box.star").write_text(text.replace("1.500000\t64\t2", "1.500000\t96\t2"))
    r = cli("predict", "--particles", d / "other_box.star", "--model", d / "model", "--out", tmp_path / "x.star")
    assert r.returncode == 1 and "trained on 64 px" in r.stderr, r.stderr
    assert not (tmp_path / "x.star").exists()
    r = cli("predict", "--particles", d / "test.star", "--model", d / "model", "--sym", "D2", "--out",
            tmp_path / "x.star")
    assert r.returncode == 1 and "symmetry C1" in r.stderr


def test_resume_continues_a_killed_run(tiny_training, tmp_path):
    d = tiny_training
    out = tmp_path / "model"
    args = [sys.executable, "-m", "cryoposeml.cli", "train", "--particles", str(d / "train.star"), "--out", str(out),
            "--epochs", "4", "--quiet", *map(str, TINY)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "full" / "checkpoint.pt"
    deadline = time.time() + 300
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert ckpt.exists(), "no checkpoint was written"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model.json").exists()
    rows_before = (out / "full" / "metrics.csv").read_text().splitlines()
    # without --resume the half-finished folder is refused, not overwritten
    again = subprocess.run(args, capture_output=True, text=True)
    assert again.returncode == 1 and "--resume" in again.stderr
    r = subprocess.run(args + ["--resume"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows_after = (out / "full" / "metrics.csv").read_text().splitlines()
    assert len(rows_after) == 1 + 4
    assert rows_after[:len(rows_before)] == rows_before   # the epochs done before the kill are kept
    assert json.loads((out / "model.json").read_text())["runs"]["full"]["epochs_run"] == 4


def test_data_parallel_training_with_torchrun(tiny_training, tmp_path):
    """Two CPU processes (Gloo) train one model: rank 0 writes it, the ranks agree on every epoch."""
    d = tiny_training
    out = tmp_path / "ddp"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "cryoposeml.cli", "train", "--particles", str(d / "train.star"), "--out", str(out),
                        "--model", "equivariant", "--epochs", "2", "--quiet", *map(str, TINY)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("validation median") == 1, r.stdout   # one report, from rank 0
    meta = json.loads((out / "model.json").read_text())
    assert meta["runs"]["full"]["epochs_run"] == 2
    assert len((out / "full" / "metrics.csv").read_text().splitlines()) == 3


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned_by_pickle",))


def test_a_pickle_that_would_run_code_is_refused(sim_noise_free_ctf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "model"
    (out / "full").mkdir(parents=True)
    with open(out / "full" / "checkpoint.pt", "wb") as f:
        pickle.dump({"model": _Evil()}, f)
    r = cli("train", "--particles", sim_noise_free_ctf / "ground_truth.star", "--out", out, "--resume", "--epochs", 1, *TINY,
            cwd=tmp_path)
    assert r.returncode == 1 and "refused" in r.stderr, r.stderr
    assert not (tmp_path / "pwned_by_pickle").exists()


def test_halfsets_predict_their_own_half(tiny_training, tmp_path):
    """Gold standard: one network and one reference half-map per rlnRandomSubset; new particles of
    half k are proposed by the half-k network and matched against the half-k map. --cross-halves
    (CESPED's evaluation of a model on its own training particles) sends them to the other half."""
    d = tiny_training
    r = cli("train", "--particles", d / "train.star", "--out", tmp_path / "gs", "--model", "sixd", "--halfsets",
            "--epochs", 2, *TINY)
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "gs" / "model.json").read_text())
    assert set(meta["runs"]) == {"half1", "half2"}
    train = read_star(d / "train.star")
    subset = train.random_subset()
    for h in (1, 2):
        assert meta["runs"][f"half{h}"]["validation"]["particles"] == round(0.1 * (subset == h).sum())
        assert meta["runs"][f"half{h}"]["matching_validation"]["particles"] == round(0.1 * (subset == h).sum())
    ref = json.loads((tmp_path / "gs" / "reference" / "reference.json").read_text())
    # the reference leaves the calibration particles out
    assert sum(ref["half_counts"]) == len(train) - sum(round(0.1 * (subset == h).sum()) for h in (1, 2))
    r = cli("predict", "--particles", d / "test.star", "--model", tmp_path / "gs", "--out", tmp_path / "p.star",
            "--top-k", 2)
    assert r.returncode == 1 and "image2sphere" in r.stderr and not (tmp_path / "p.star").exists(), r.stderr
    test_subset = read_star(d / "test.star").random_subset()
    for flag, half_of_1 in (([], "half1"), (["--cross-halves"], "half2")):
        out = tmp_path / f"p{len(flag)}.star"
        r = cli("predict", "--particles", d / "test.star", "--model", tmp_path / "gs", "--out", out,
                "--matching", "none", *flag)
        assert r.returncode == 0, r.stderr
        runs = json.loads(out.with_suffix(".json").read_text())["runs"]
        other = {"half1": "half2", "half2": "half1"}[half_of_1]
        assert runs[half_of_1]["particles"] == (test_subset == 1).sum()
        assert runs[other]["particles"] == (test_subset == 2).sum()


def test_label_confidence_weights(sim_noise_free_ctf):
    """A unit test of the weights: simulated particles, no training."""
    from cryoposeml.core.errors import InputError
    from cryoposeml.engine.train import label_weights

    star = read_star(sim_noise_free_ctf / "ground_truth.star")
    w, col = label_weights(star, "auto", "x.star")
    assert col is None and (w == 1).all()
    conf = np.linspace(0.0, 1.0, len(star))
    star.particles["rlnMaxValueProbDistribution"] = conf
    star.particles["rlnParticleFigureOfMerit"] = 1.0
    w, col = label_weights(star, "auto", "x.star")
    assert col == "rlnMaxValueProbDistribution"
    np.testing.assert_allclose(w, conf / conf.mean())
    assert (label_weights(star, "none", "x.star")[0] == 1).all()
    with pytest.raises(InputError, match="rlnNoSuch"):
        label_weights(star, "rlnNoSuch", "x.star")
    star.particles["rlnMaxValueProbDistribution"] = -conf
    with pytest.raises(InputError, match="non-negative"):
        label_weights(star, "auto", "x.star")


def test_phase_flipped_particles_get_the_poses_of_their_originals(tiny_training, tmp_path):
    """The same particles (same noise) written plain and already phase-flipped
    (rlnCtfDataArePhaseFlipped 1): predict, verification included, gives the same poses for both (up
    to the background normalisation, which sees different real-space images), as accurate; the
    flipped set is not flipped a second time, which the same images without the flag show: read as
    plain, they come out far worse."""
    from cryoposeml.data.star import write_star

    d = tiny_training
    for name, extra in (("plain", []), ("flipped", ["--phase-flipped"])):
        r = cli("simulate", "--n", 120, "--snr", 1, "--shift-sigma", 1.5, "--seed", 21, *extra,
                "--out", tmp_path / name)
        assert r.returncode == 0, r.stderr
    wrong = read_star(tmp_path / "flipped" / "particles.star")
    wrong.optics = wrong.optics.drop(columns=["rlnCtfDataArePhaseFlipped"])
    write_star(wrong, tmp_path / "flipped" / "flag_lost.star")
    for name, star in (("plain", "plain/particles.star"), ("flipped", "flipped/particles.star"),
                       ("flag_lost", "flipped/flag_lost.star")):
        r = cli("predict", "--model", d / "model", "--particles", tmp_path / star, "--out", tmp_path / f"{name}.star")
        assert r.returncode == 0, r.stderr[-2000:]
    plain, flipped = read_star(tmp_path / "plain.star"), read_star(tmp_path / "flipped.star")
    assert flipped.phase_flipped().all() and not plain.phase_flipped().any()
    moved = geodesic_distance_deg(plain.matrices(), flipped.matrices())
    assert np.median(moved) < 0.25 and np.percentile(moved, 90) < 1.0, np.percentile(moved, [50, 90, 100])
    truth = read_star(tmp_path / "plain" / "ground_truth.star").matrices()
    err = {name: float(np.median(geodesic_distance_deg(read_star(tmp_path / f"{name}.star").matrices(), truth)))
           for name in ("plain", "flipped", "flag_lost")}
    assert abs(err["flipped"] - err["plain"]) < 0.3, err
    assert err["flag_lost"] > 3 * err["plain"] + 1, err


def test_every_registered_family_builds_and_trains_with_its_loss():
    """Each family of the registry builds from a PoseNetConfig, gives what its declared
    capabilities say (a ranked ``top_k`` for distributions, a confidence for every family) and its
    declared loss on its own output is finite and reaches the network's first layers."""
    from cryoposeml.core.symmetry import symmetry_group
    from cryoposeml.families import FAMILIES
    from cryoposeml.models import PoseNetConfig, build_model

    torch.manual_seed(0)
    x = torch.randn(4, 32, 32)
    A = torch.as_tensor(random_rotations(4, 0), dtype=torch.float32)
    group = torch.as_tensor(symmetry_group("C1"), dtype=torch.float32)
    for name, fam in FAMILIES.items():
        net = build_model(PoseNetConfig(family=name, box=32, widths=(8, 16), dropout=fam.dropout))
        out = net(x)
        assert out["matrix"].shape == (4, 3, 3) and out["confidence"].shape == (4,) and out["shift_px"].shape == (4, 2)
        assert hasattr(net, "top_k") == fam.distribution, name
        if fam.distribution:
            tk = net.top_k(out, 3, group)
            assert tk["matrix"].shape == (4, 3, 3, 3) and (tk["probability"].diff(dim=1) <= 0).all(), name
        loss = fam.loss_function()(out, A, torch.ones(4), group, beta1=0.5, siamese=True,
                                   confidence=fam.learns_confidence)
        assert torch.isfinite(loss), name
        loss.backward()
        first = next(p for p in net.parameters() if p.requires_grad)
        assert first.grad is not None and first.grad.abs().sum() > 0, name
