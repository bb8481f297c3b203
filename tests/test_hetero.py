"""Heterogeneity (HetACUMN): the conformation-conditioned decoder."""
import pytest
import numpy as np
import torch

from cryoposeml.core.fourier import ifft2_centered
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import random_rotations
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map
from cryoposeml.models.decoders import ConditionalVoxelDecoder


def test_conditional_decoder_mixes_exact_slices_of_its_maps():
    """Mean map (open + closed) / 2 and one basis map (open - closed) / 2: at z = +1
    the slices are the open map's projections, at z = -1 the closed map's, the same through
    :meth:`render_basis` mixed per particle, and :meth:`volume` gives the maps back."""
    open_, _ = read_map(resolve_map("adk_open"))
    closed, _ = read_map(resolve_map("adk_closed"))
    dec = ConditionalVoxelDecoder(64, zdim=2)
    dec.maps[0].load_map((open_ + closed) / 2)
    dec.maps[1].load_map((open_ - closed) / 2)             # the second basis map stays 0
    A = torch.as_tensor(random_rotations(4, 1), dtype=torch.float32)
    for z, vol in ((1.0, open_), (-1.0, closed)):
        zz = torch.tensor([[z, 0.7]] * 4)             # z_2 moves nothing
        got = ifft2_centered(dec(A, zz)).real
        expected = Projector(vol).project(A)
        assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
        basis = dec.render_basis(A)                                         # (3, 4, N, N)
        mixed = (dec.weights(zz).T[:, :, None, None] * basis).sum(0)
        assert torch.allclose(ifft2_centered(mixed).real, expected, atol=1e-4 * float(expected.abs().max()))
        np.testing.assert_allclose(dec.volume(torch.tensor([z, 0.7])).numpy(), vol, atol=1e-5 * np.abs(vol).max())
    # a fresh decoder is one map whatever z (its basis maps are 0)
    fresh = ConditionalVoxelDecoder(16, zdim=3)
    fresh.maps[0].load_map(torch.randn(16, 16, 16).numpy())
    assert torch.allclose(fresh(A, torch.randn(4, 3)), fresh.maps[0](A))


@pytest.mark.train
def test_hetero_separates_two_states_from_consensus_poses(tmp_path):
    """600 noise-free particles (CTF, shifts), half AdK closed and half open, with consensus poses
    off by about 3 degrees (as a homogeneous refinement gives them), 24 px, about a minute on 2
    cores. The conformations separate (measured: 0.0% misclassified, the amortized encoder's z alone
    about 3%), PC1 follows the state, the latent carries no pose, and the poses get better."""
    import json

    from scipy.spatial.transform import Rotation

    from conftest import cli
    from cryoposeml.core.metrics import align_poses_globally
    from cryoposeml.data.star import read_star, write_star

    sim = tmp_path / "sim"
    r = cli("simulate", "--map", "adk_closed", "adk_open", "--n", 600, "--no-noise", "--shift-sigma", 3,
            "--seed", 3, "--stack-size", 300, "--out", sim)
    assert r.returncode == 0, r.stderr
    truth = read_star(sim / "ground_truth.star")
    consensus = read_star(sim / "particles.star")
    kick = Rotation.from_rotvec(np.random.default_rng(0).normal(0, np.radians(3) / np.sqrt(3), (600, 3)))
    consensus.set_poses(truth.matrices() @ kick.as_matrix(), truth.shifts_angstrom())
    write_star(consensus, sim / "consensus.star")
    before = align_poses_globally(consensus.matrices(), truth.matrices(), allow_mirror=False)["median_deg"]

    out = tmp_path / "het"
    r = cli("hetero", "--particles", sim / "consensus.star", "--poses", "input", "--out", out, "--box-px", 24,
            "--epochs", 8, "--zdim", 4, "--widths", 8, 16, 32, "--batch-size", 16,
            "--reference", sim / "ground_truth.star", "--reference-map", "adk_closed", "adk_open")
    assert r.returncode == 0, r.stderr
    s = json.loads((out / "hetero.json").read_text())
    ref = s["reference"]
    assert ref["misclassified"] < 0.05, ref
    assert ref["encoder_misclassified"] < 0.15, ref                    # amortized: new particles get z too
    assert ref["spearman_pc1_state"] > 0.8, ref      # two states: at most sqrt(3) / 2 = 0.866 (a perfect split)
    assert ref["median_deg"] < before, (ref, before)
    assert s["entanglement"] < 0.2, s
    assert sorted(c["particles"] for c in s["classes"])[0] > 250, s["classes"]
    for state, res in ref["fsc_05_per_state_angstrom"].items():
        assert res is not None and res < 8, ref                         # each class map is its state's
    star = read_star(out / "particles.star")
    assert {"rlnClassNumber", "rlnCpmlZ1", "rlnCpmlZ4", "rlnCpmlPC1"} <= set(star.particles.columns)
    assert "rlnCpmlState" not in star.particles                          # the reference stays a reference
    for k in (1, 2):
        assert (out / f"class_{k:03d}.mrc").is_file() and (out / f"decoder_class_{k:03d}.mrc").is_file()


def test_phase_schedule_with_and_without_the_class_restart():
    """From no poses with 2+ classes: search, conditional search, the class restart (its own
    frequency marching), 2 more conditional-search epochs (longer while poses move), then local
    refinement. Given poses, one class, or too few epochs: no restart. Decided from the logged rows
    alone (so --resume decides the same)."""
    from cryoposeml.engine.hetero import HeteroConfig, _phase

    def schedule(cfg, given=False, moved=0.0):
        rows = []
        for e in range(cfg.epochs):
            rows.append({"phase": _phase(cfg, e, rows, given), "moved": moved})
        return [r["phase"] for r in rows]

    cfg = HeteroConfig(poses="search", classes=2, epochs=26, search_epochs=8)
    assert cfg.n_restart_epochs() == 8
    assert schedule(cfg) == (["search"] * 8 + ["hetero search"] * 4 + ["class search"] * 8
                             + ["hetero search"] * 2 + ["hetero"] * 4)
    # poses still moving: the conditional search goes on, leaving 4 local epochs
    assert schedule(cfg, moved=0.5) == (["search"] * 8 + ["hetero search"] * 4 + ["class search"] * 8
                                        + ["hetero search"] * 2 + ["hetero"] * 4)
    longer = HeteroConfig(poses="search", classes=2, epochs=30, search_epochs=8)
    assert schedule(longer, moved=0.5).count("hetero search") == 4 + 2 + 4
    # too few epochs for a restart: the schedule without it
    short = HeteroConfig(poses="search", classes=2, epochs=16, search_epochs=8)
    assert short.n_restart_epochs() == 0
    assert schedule(short) == ["search"] * 8 + ["hetero search"] * 4 + ["hetero"] * 4
    assert HeteroConfig(poses="search", classes=1, epochs=26, search_epochs=8).n_restart_epochs() == 0
    given = HeteroConfig(poses="input", classes=2, epochs=8)
    assert given.n_restart_epochs() == 0
    assert schedule(given, given=True) == ["consensus"] * 2 + ["hetero"] * 6


@pytest.mark.train
def test_a_killed_and_resumed_hetero_run_equals_an_uninterrupted_one(sim_noise_free_ctf, tmp_path, monkeypatch):
    """From no poses: killed after the search epoch and resumed, the run (conditional search, local
    refinement, task 2's random poses and noise) ends where an uninterrupted one does, to 1e-6."""
    from test_abinitio import assert_same_weights, run_killed_and_resumed, small_subset

    from cryoposeml.engine.hetero import HeteroConfig, hetero

    particles = small_subset(sim_noise_free_ctf / "particles.star", 96, tmp_path / "p.star")
    cfg = HeteroConfig(poses="search", zdim=2, classes=2, box_px=16, widths=(8, 16, 32), batch_size=16, epochs=5,
                       search_epochs=1, hetero_search_epochs=1, restart_epochs=0, device="cpu")
    logged = run_killed_and_resumed(monkeypatch, lambda out, resume: hetero(particles, out, cfg, resume=resume,
                                                                            progress=False),
                                    tmp_path / "full", tmp_path / "resumed", kill_after=1)
    assert logged == 1
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert_same_weights(full / "weights.safetensors", resumed / "weights.safetensors")
    np.testing.assert_allclose(np.load(resumed / "z.npy"), np.load(full / "z.npy"), atol=1e-6)
    phases = [r.split(",")[1] for r in (resumed / "metrics.csv").read_text().splitlines()[1:]]
    assert phases == ["search", "hetero search", "hetero", "hetero", "hetero"]
