"""Ab initio building blocks: decoders render what the projector renders, global pose alignment
finds the frame and the hand."""
import pytest
import numpy as np
import torch

from cryoposeml.core.fourier import ifft2_centered
from cryoposeml.core.metrics import align_poses_globally
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import random_rotations
from cryoposeml.models.decoders import FourierNetDecoder, VoxelDecoder


def test_voxel_decoder_slices_equal_the_projector(adk_map):
    vol, _ = adk_map
    n = vol.shape[0]
    dec = VoxelDecoder(n)
    dec.set_radial_profile(torch.linspace(5.0, 0.1, n))      # the preconditioner does not change the map
    dec.load_map(vol)
    A = torch.as_tensor(random_rotations(5, 0), dtype=torch.float32)
    got = ifft2_centered(dec(A)).real
    expected = Projector(vol).project(A)
    assert torch.allclose(got, expected, atol=1e-4 * float(expected.abs().max()))
    # the map it reports is the map it was given
    np.testing.assert_allclose(dec.volume().numpy(), vol, atol=1e-5 * np.abs(vol).max())


def test_fouriernet_is_hermitian_so_its_images_are_real():
    torch.manual_seed(0)
    dec = FourierNetDecoder(16, hidden=32, layers=2)
    torch.nn.init.normal_(dec.out.weight, std=0.5)
    A = torch.as_tensor(random_rotations(3, 1), dtype=torch.float32)
    spec = dec(A).detach()
    img = ifft2_centered(spec)
    assert img.real.abs().max() > 1e-3
    assert img.imag.abs().max() < 1e-5 * img.real.abs().max()
    vol = dec.volume()
    assert vol.shape == (16, 16, 16) and torch.isfinite(vol).all()


def test_global_alignment_finds_the_frame_and_the_hand():
    true = random_rotations(300, 2)
    Q = random_rotations(1, 3)[0]
    M = np.diag([1.0, 1.0, -1.0])
    noise = random_rotations(300, 4)
    for mirrored in (False, True):
        pred = true @ Q.T
        if mirrored:
            pred = M @ pred @ M
        r = align_poses_globally(pred, true)
        assert r["mirrored"] == mirrored and r["mse"] < 1e-20
        np.testing.assert_allclose(r["aligned"], true, atol=1e-10)
    # unrelated poses: far from converged (random rotations give ||R - R'||^2 of about 6 on average)
    r = align_poses_globally(noise, true)
    assert r["medse"] > 4 and r["median_deg"] > 90


def test_the_rendering_explains_the_particles_at_their_true_poses(sim_noise_free_ctf):
    """The ab initio loss, with the true map in the decoder, is near zero at the true poses and
    large at wrong ones: CTF, shift and pose conventions of the renderer match the simulator."""
    from cryoposeml.core.ctf import ctf_2d
    from cryoposeml.core.fourier import fft2_centered, shift_phase_2d
    from cryoposeml.data.mrc import read_map
    from cryoposeml.data.star import read_star
    from cryoposeml.engine.amortized import working_set
    from conftest import MAPS

    star = read_star(sim_noise_free_ctf / "ground_truth.star")
    box = star.box
    images, pixel, _ = working_set(star, box, False)
    vol, _ = read_map(MAPS / "adk_open.mrc")
    dec = VoxelDecoder(box)
    dec.load_map(vol)
    idx = np.arange(min(len(star), 48))
    A = torch.as_tensor(star.matrices()[idx], dtype=torch.float32)
    origins = torch.as_tensor(star.shifts_px()[idx], dtype=torch.float32)
    ctf = ctf_2d(star.ctf_params().subset(idx), box, pixel)
    Y = fft2_centered(images[idx])

    def loss(poses):
        with torch.no_grad():
            S = dec(poses) * ctf * shift_phase_2d(-origins, box)
            scale = torch.sum((S.conj() * Y).real) / torch.sum(S.abs() ** 2)   # the images' global scale
            return float(((scale * S - Y).abs() ** 2).mean())

    right, wrong = loss(A), loss(torch.roll(A, 1, 0))
    assert right < 0.01 * wrong, (right, wrong)


@pytest.mark.train
def test_abinitio_runs_with_independent_halves(sim_noise_free_ctf, tmp_path):
    """End to end on a tiny set (not to convergence): both halves train, half 2 is put in half 1's
    frame, and the outputs a user expects are there; a second run into the folder is refused."""
    import json

    from conftest import cli

    d = sim_noise_free_ctf
    out = tmp_path / "ab"
    args = ["abinitio", "--particles", d / "particles.star", "--out", out, "--box-px", 16, "--epochs", 2,
            "--widths", 8, 16, "--batch-size", 16, "--halves", "--reference", d / "ground_truth.star",
            "--reference-map", "adk_open"]
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    for f in ("poses.star", "map.mrc", "map_half1.mrc", "map_half2.mrc", "decoder_map_half1.mrc", "half1/metrics.csv",
              "half2/curves.png", "half2/checkpoint.pt", "abinitio.json"):
        assert (out / f).exists(), f
    s = json.loads((out / "abinitio.json").read_text())
    assert s["half_maps_independent"] and set(s["runs"]) == {"half1", "half2"}
    assert [s["runs"][h]["epochs_run"] for h in ("half1", "half2")] == [2, 2]
    assert s["runs"]["half1"]["particles"] + s["runs"]["half2"]["particles"] == 600
    assert np.isfinite(s["half_alignment"]["median_deg_between_halves"])
    assert {"medse", "median_deg", "fsc_05_vs_map_angstrom"} <= set(s["reference"])
    # each particle keeps its half-set: the gold standard goes on downstream
    from cryoposeml.data.star import read_star

    np.testing.assert_array_equal(read_star(out / "poses.star").random_subset(),
                                  read_star(d / "particles.star").random_subset())
    r = cli(*args)
    assert r.returncode == 1 and "already holds" in r.stderr


@pytest.mark.train
def test_abinitio_converges_on_a_tiny_noise_free_set(sim_noise_free_ctf, tmp_path):
    """600 noise-free particles (CTF, shifts), 24 px, D4 encoder with L2, about a minute on 2 cores:
    the pose search finds the map and the poses from random initialisation, the local refinement
    sharpens them. Measured: median 0.95 deg (MedSE 0.0006); the map reconstructed from the poses at
    the input's 64 px has FSC 0.5 against the true map at 3.2 A (Nyquist 3.0 A); the encoder alone
    30 deg (it keeps learning; random poses give about 110)."""
    import csv
    import json

    from conftest import cli

    d = sim_noise_free_ctf
    out = tmp_path / "ab"
    r = cli("abinitio", "--particles", d / "particles.star", "--out", out, "--box-px", 24, "--epochs", 12,
            "--search-epochs", 8, "--encoder", "equivariant", "--loss", "l2", "--widths", 8, 16, 32,
            "--batch-size", 16, "--reference", d / "ground_truth.star", "--reference-map", "adk_open")
    assert r.returncode == 0, r.stderr
    ref = json.loads((out / "abinitio.json").read_text())["reference"]
    assert ref["converged"] and ref["medse"] < 0.01 and ref["median_deg"] < 5, ref
    assert ref["fsc_05_vs_map_angstrom"] < 5, ref
    with open(out / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["phase"] for r in rows] == ["search"] * 8 + ["refine"] * 4
    assert float(rows[0]["median_deg"]) > 60                        # it really started from nothing
    assert float(rows[-1]["encoder_median_deg"]) < 45, rows[-1]      # the amortized encoder learned the poses


def test_the_search_goes_on_while_the_poses_move():
    """The search lasts its planned epochs, then goes on while more than ``search_until_stable`` of
    the best poses moved in the last epoch, leaving 4 epochs to refine; ``--search-epochs 0`` never
    searches. The decision reads only the logged rows, so a resumed run decides the same."""
    from cryoposeml.engine.abinitio import AbinitioConfig, _searching

    cfg = AbinitioConfig(epochs=12, search_epochs=4, search_until_stable=0.1)
    search = lambda moved: {"phase": "search", "moved": moved}  # noqa: E731
    assert _searching(cfg, 3, [search(1.0)] * 3)
    assert not _searching(cfg, 4, [search(0.9)] * 3 + [search(0.05)])         # settled: refine
    assert _searching(cfg, 4, [search(0.9)] * 4)                               # still moving
    assert _searching(cfg, 7, [search(0.9)] * 7)
    assert not _searching(cfg, 8, [search(0.9)] * 8)                           # 4 epochs left to refine
    assert not _searching(cfg, 6, [search(0.9)] * 4 + [{"phase": "refine"}] * 2)  # no search after refining
    assert not _searching(AbinitioConfig(epochs=12, search_epochs=0), 0, [])


class _Killed(BaseException):
    """Stands for a kill: nothing in the run catches it."""


def run_killed_and_resumed(monkeypatch, run, out_full, out_resumed, kill_after: int):
    """``run(out, resume)`` once uninterrupted into ``out_full``; once killed right after the
    checkpoint of epoch ``kill_after`` and resumed into ``out_resumed``. Returns the epochs the
    killed run had checkpointed."""
    import json

    from cryoposeml.engine import amortized

    run(out_full, False)
    real, saved = amortized.save_checkpoint, []

    def dying(path, payload):
        real(path, payload)
        saved.append(path)
        if len(saved) == kill_after:
            raise _Killed

    monkeypatch.setattr(amortized, "save_checkpoint", dying)
    try:
        run(out_resumed, False)
        raise AssertionError("the run was not killed")
    except _Killed:
        pass
    monkeypatch.setattr(amortized, "save_checkpoint", real)
    ckpt = torch.load(next(out_resumed.rglob("checkpoint.pt")), weights_only=True)
    logged = json.loads(ckpt["state"])["epoch"]
    run(out_resumed, True)
    return logged


def assert_same_weights(a, b, atol=1e-6):
    from safetensors.torch import load_file

    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].double(), wb[k].double(), atol=atol, rtol=0), (k, (wa[k] - wb[k]).abs().max())


def small_subset(star_path, n, out):
    from conftest import write_rows

    return write_rows(star_path, slice(0, n), out)


@pytest.mark.train
def test_a_killed_and_resumed_abinitio_run_equals_an_uninterrupted_one(sim_noise_free_ctf, tmp_path, monkeypatch):
    """Killed after its first search epoch and resumed, a run ends where an uninterrupted one does
    (weights, poses and map to 1e-6): the checkpoint carries the shuffling and the device generators
    (the posterior draws), and the search renders its grid where an uninterrupted run does."""
    from cryoposeml.data.mrc import read_map
    from cryoposeml.data.star import read_star
    from cryoposeml.engine.abinitio import AbinitioConfig, abinitio

    particles = small_subset(sim_noise_free_ctf / "particles.star", 96, tmp_path / "p.star")
    cfg = AbinitioConfig(encoder="cnn", box_px=16, widths=(8, 16), batch_size=16, epochs=4, search_epochs=2,
                         search_refresh_steps=4, device="cpu")
    logged = run_killed_and_resumed(monkeypatch, lambda out, resume: abinitio(particles, out, cfg, resume=resume,
                                                                              progress=False),
                                    tmp_path / "full", tmp_path / "resumed", kill_after=1)
    assert logged == 1
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    assert_same_weights(full / "weights.safetensors", resumed / "weights.safetensors")
    np.testing.assert_allclose(read_star(resumed / "poses.star").matrices(), read_star(full / "poses.star").matrices(),
                               atol=1e-6)
    np.testing.assert_allclose(read_map(resumed / "map.mrc")[0], read_map(full / "map.mrc")[0], atol=1e-6)
    phases = [r.split(",")[1] for r in (resumed / "metrics.csv").read_text().splitlines()[1:]]
    assert phases == ["search", "search", "refine", "refine"]
