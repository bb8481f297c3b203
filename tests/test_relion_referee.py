"""Relion is the referee: our projector, simulator and reconstructor against Relion 3.1's programs."""
import numpy as np
import pandas as pd
import pytest
import torch

from cryoposeml.core.ctf import ctf_2d
from cryoposeml.core.metrics import fsc, pcc, resolution_at, soft_sphere_mask
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import matrix_to_euler, random_rotations
from cryoposeml.data.mrc import read_map
from cryoposeml.data.star import ParticleStar, read_star, write_star
from conftest import MAPS, cli, relion

N_256 = 200   # particles of the 256 px comparison with Relion


def _pose_star(n, apix, box, rng, shifts=True):
    ang = matrix_to_euler(random_rotations(n, rng))
    du = rng.uniform(8000, 25000, n)
    optics = pd.DataFrame(dict(rlnOpticsGroup=[1], rlnOpticsGroupName=["opticsGroup1"], rlnImagePixelSize=[apix],
                               rlnImageSize=[box], rlnImageDimensionality=[2], rlnVoltage=[300.0],
                               rlnSphericalAberration=[2.7], rlnAmplitudeContrast=[0.1]))
    sh = rng.normal(0, 3, (n, 2)) * apix if shifts else np.zeros((n, 2))
    parts = pd.DataFrame(dict(rlnAngleRot=ang[:, 0], rlnAngleTilt=ang[:, 1], rlnAnglePsi=ang[:, 2],
                              rlnOriginXAngst=sh[:, 0], rlnOriginYAngst=sh[:, 1], rlnDefocusU=du,
                              rlnDefocusV=du - rng.uniform(0, 600, n), rlnDefocusAngle=rng.uniform(0, 180, n),
                              rlnOpticsGroup=1))
    return ParticleStar(parts, optics)


@pytest.mark.parametrize("with_ctf_and_shifts", [False, True])
@pytest.mark.relion
def test_projection_matches_relion_project(tmp_path, adk_map, with_ctf_and_shifts):
    vol, apix = adk_map
    rng = np.random.default_rng(7)
    write_star(_pose_star(50, apix, vol.shape[0], rng, shifts=with_ctf_and_shifts), tmp_path / "poses.star")
    args = ["--ctf"] if with_ctf_and_shifts else []
    relion("relion_project", "--i", MAPS / "adk_open.mrc", "--ang", "poses.star", "--o", "rp", "--angpix", apix,
           *args, cwd=tmp_path)
    theirs = read_map_stack(tmp_path / "rp.mrcs")
    star = read_star(tmp_path / "poses.star")
    ctf = ctf_2d(star.ctf_params(), vol.shape[0], apix) if with_ctf_and_shifts else None
    ours = Projector(vol).project(torch.as_tensor(star.matrices(), dtype=torch.float32),
                                  torch.as_tensor(star.shifts_px(), dtype=torch.float32), ctf).numpy()
    cc = np.array([np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(ours, theirs)])
    assert cc.min() >= 0.99, cc.min()
    # same scale too (relion_project integrates along z like we do)
    assert abs(np.sum(ours * theirs) / np.sum(ours * ours) - 1) < 0.01


def read_map_stack(path):
    from cryoposeml.data.mrc import StackReader, stack_info

    info = stack_info(path)
    return StackReader().read(path, np.arange(info.n))


@pytest.mark.relion
def test_relion_reconstructs_our_simulation(sim_noise_free_ctf, adk_map, tmp_path):
    """Our STAR, poses, shifts and CTF are what Relion understands."""
    vol, apix = adk_map
    # Relion resolves image paths from its working directory (the project folder).
    relion("relion_reconstruct", "--i", "ground_truth.star", "--o", tmp_path / "rel.mrc", "--ctf", "--angpix", apix,
           cwd=sim_noise_free_ctf)
    rec, _ = read_map(tmp_path / "rel.mrc")
    freq, curve = fsc(vol, rec, apix)
    nyquist_shell = vol.shape[0] // 2
    upto = int(0.8 * nyquist_shell)
    assert curve[1:upto + 1].min() >= 0.9, np.round(curve, 3)


@pytest.fixture(scope="module")
def relion_noisy(tmp_path_factory):
    """2000 noisy CTF particles written by relion_project (white noise sd 4: SNR ~0.08)."""
    d = tmp_path_factory.mktemp("relion_noisy")
    write_star(_pose_star(2000, 1.5, 64, np.random.default_rng(11)), d / "poses.star")
    relion("relion_project", "--i", MAPS / "adk_open.mrc", "--ang", "poses.star",
           "--o", "noisy", "--ctf", "--add_noise", "--white_noise", 4, "--angpix", 1.5, cwd=d)
    return d


@pytest.mark.relion
def test_reconstruct_matches_relion_reconstruct(relion_noisy, adk_map):
    vol, apix = adk_map
    d = relion_noisy
    relion("relion_reconstruct", "--i", "noisy.star", "--o", "rel.mrc", "--ctf", "--angpix", apix, cwd=d)
    r = cli("reconstruct", "--particles", d / "noisy.star", "--out", d / "ours.mrc")
    assert r.returncode == 0, r.stderr
    theirs, _ = read_map(d / "rel.mrc")
    ours, _ = read_map(d / "ours.mrc")
    res_theirs = resolution_at(*fsc(vol, theirs, apix), 0.5)
    res_ours = resolution_at(*fsc(vol, ours, apix), 0.5)
    print(f"FSC-0.5 vs truth: relion {res_theirs:.2f} A, cryoposeml {res_ours:.2f} A")
    assert abs(res_ours - res_theirs) <= 0.10 * res_theirs
    assert pcc(ours, theirs, soft_sphere_mask(vol.shape[0])) > 0.9


@pytest.mark.relion
def test_reconstruct_d2_matches_relion(relion_noisy):
    d = relion_noisy
    relion("relion_reconstruct", "--i", "noisy.star", "--o", "rel_d2.mrc", "--ctf", "--angpix", 1.5, "--sym", "D2",
           cwd=d)
    r = cli("reconstruct", "--particles", d / "noisy.star", "--out", d / "ours_d2.mrc", "--sym", "D2")
    assert r.returncode == 0, r.stderr
    theirs, _ = read_map(d / "rel_d2.mrc")
    ours, _ = read_map(d / "ours_d2.mrc")
    assert pcc(ours, theirs) >= 0.98
    # Shell by shell they agree up to 0.9 x Nyquist; Relion symmetrises its Fourier grids by
    # interpolation, we insert every symmetry mate exactly, so the last shells differ a little.
    _, curve = fsc(ours, theirs)
    assert curve[1:int(0.9 * 32)].min() > 0.98, np.round(curve, 3)


@pytest.mark.relion
def test_phase_flipped_particles_reconstruct_as_relion_does(relion_noisy, adk_map):
    """Relion's noisy particles phase-flipped (as extraction with phase flipping writes them, the
    optics block saying so): cryoposeml reconstructs them as well as the originals, and as
    relion_reconstruct --ctf_phase_flipped does. Before the flag was read they were flipped again
    (FSC 0.5 at 21 A instead of 6 A)."""
    from cryoposeml.data.dataset import ParticleDataset
    from cryoposeml.data.mrc import write_stack
    from cryoposeml.data.preprocess import phase_flip

    vol, apix = adk_map
    d = relion_noisy
    star = read_star(d / "noisy.star")
    images = ParticleDataset(star).read_batch(np.arange(len(star)))
    ctf = ctf_2d(star.ctf_params(), star.box, apix, dtype=torch.float64).numpy()
    write_stack(d / "flipped.mrcs", phase_flip(images, ctf), apix)
    flipped = star.copy()
    flipped.particles["rlnImageName"] = [f"{i + 1:06d}@flipped.mrcs" for i in range(len(star))]
    flipped.optics["rlnCtfDataArePhaseFlipped"] = 1
    write_star(flipped, d / "flipped.star")
    assert read_star(d / "flipped.star").phase_flipped().all()
    relion("relion_reconstruct", "--i", "flipped.star", "--o", "rel_flipped.mrc", "--ctf", "--ctf_phase_flipped",
           "--angpix", apix, cwd=d)
    res = {}
    for name, src in (("original", "noisy.star"), ("flipped", "flipped.star")):
        r = cli("reconstruct", "--particles", d / src, "--out", d / f"ours_{name}.mrc")
        assert r.returncode == 0, r.stderr
        res[name] = resolution_at(*fsc(vol, read_map(d / f"ours_{name}.mrc")[0], apix), 0.5)
    res["relion"] = resolution_at(*fsc(vol, read_map(d / "rel_flipped.mrc")[0], apix), 0.5)
    print(res)
    assert abs(res["flipped"] - res["original"]) <= 0.05 * res["original"], res
    assert abs(res["flipped"] - res["relion"]) <= 0.10 * res["relion"], res


def test_half_space_float32_accumulators(adk_map):
    """The reconstruction keeps only the half-space p_x >= 0 of the padded grid, in float32 (as
    Relion keeps its grids): the map equals the float64 one, with and without symmetry, and a
    256 px box's accumulators take under 0.85 GB (the full float64 grid took 3.2 GB)."""
    from cryoposeml.core.reconstruction import BackProjector

    vol, apix = adk_map
    A = random_rotations(200, 8)
    o = np.random.default_rng(8).normal(0, 1.5, (200, 2))
    img = Projector(vol).project(torch.as_tensor(A, dtype=torch.float32), o, None).double().numpy()
    for sym in ("C1", "D2"):
        maps = []
        for dtype in (torch.float64, torch.float32):
            bp = BackProjector(64, sym, dtype=dtype)
            bp.insert(img, A, o)
            maps.append(bp.reconstruct())
        assert np.abs(maps[0] - maps[1]).max() <= 1e-5 * np.abs(maps[0]).max()
        # the inverse transform in small blocks (as at a 256 px box, where a block is a few slabs)
        bp.BLOCK_BYTES = 200_000
        assert np.abs(bp.reconstruct() - maps[1]).max() <= 1e-6 * np.abs(maps[1]).max()
        # two half-sets' accumulators read together give the map of all the data (no merged copy)
        halves = [BackProjector(64, sym) for _ in range(2)]
        for k, bp_half in enumerate(halves):
            bp_half.insert(img[k::2], A[k::2], o[k::2])
        halves[0].BLOCK_BYTES = 200_000
        both = halves[0].reconstruct(plus=halves[1])
        assert np.abs(both - maps[1]).max() <= 1e-6 * np.abs(maps[1]).max()
    with pytest.raises(ValueError, match="differ"):
        halves[0].reconstruct(plus=BackProjector(64, "C1"))
    assert BackProjector(256).nbytes < 0.85e9


@pytest.mark.relion
def test_resampled_map_matches_relion_image_handler(tmp_path, adk_map):
    """``simulate --box-px`` resamples the map as ``relion_image_handler --rescale_angpix`` does (64 px
    at 1.5 A/px -> 32 px at 3 A/px); zero-padding to 96 px and cropping back returns the map."""
    from cryoposeml.core.fourier import resample_volume

    vol, apix = adk_map
    relion("relion_image_handler", "--i", MAPS / "adk_open.mrc", "--o", tmp_path / "r32.mrc", "--angpix", apix,
           "--rescale_angpix", 2 * apix)
    theirs, their_apix = read_map(tmp_path / "r32.mrc")
    ours = resample_volume(vol, 32)
    assert theirs.shape == ours.shape == (32, 32, 32) and their_apix == pytest.approx(2 * apix)
    assert pcc(ours, theirs) > 0.99, pcc(ours, theirs)
    assert abs(ours.std() / theirs.std() - 1) < 0.05      # the same intensity scale
    back = resample_volume(resample_volume(vol, 96), 64)
    np.testing.assert_allclose(back, vol, atol=1e-4 * np.abs(vol).max())


def _pseudo_atoms(box: int, n_atoms: int, radius_px: float, sigma_px: float, seed: int) -> np.ndarray:
    """A map with content up to Nyquist: ``n_atoms`` Gaussian blobs of ``sigma_px`` spread through a
    ball of ``radius_px`` (the bundled maps, Fourier-padded to 256 px, stop at their 64 px Nyquist)."""
    rng = np.random.default_rng(seed)
    d = rng.normal(size=(n_atoms, 3))
    pos = d / np.linalg.norm(d, axis=1, keepdims=True) * radius_px * rng.uniform(0, 1, (n_atoms, 1)) ** (1 / 3)
    vol = np.zeros((box,) * 3, np.float32)
    h = int(np.ceil(4 * sigma_px))
    for p in pos + box // 2:
        c = np.round(p).astype(int)
        sl = tuple(slice(ci - h, ci + h + 1) for ci in c[::-1])   # (z, y, x) array order
        z, y, x = np.meshgrid(*(np.arange(ci - h, ci + h + 1) - pi for ci, pi in zip(c[::-1], p[::-1])),
                              indexing="ij")
        vol[sl] += np.exp(-(x * x + y * y + z * z) / (2 * sigma_px ** 2))
    return vol


@pytest.mark.relion
def test_reconstruction_at_256_px_matches_relion_reconstruct(tmp_path):
    """A facility's box: 200 particles of 256 px (a pseudo-atomic map with content to Nyquist, CTF,
    origins of 2 A s.d., noise-free so that every shell carries signal) reconstructed by us and by
    ``relion_reconstruct --ctf --skip_gridding`` agree shell by shell, FSC >= 0.99 up to 0.8 Nyquist,
    and both are as close to the truth (the float32 half-space accumulators, the chunked insertion
    and the blocked inverse transform at the size they were built for).

    ``--skip_gridding`` is Relion's estimator without its Pipe-Menon density-compensation
    iterations (which take minutes at this box): the same sum of CTF-weighted trilinear
    contributions over their weights as ours. With the iterations, the two differ where 200
    particles leave the padded Fourier grid sparse (fewer than one sample per voxel beyond
    half Nyquist); the default-Relion comparison is the 64 px test above and ``bench_scale.py``."""
    from cryoposeml.data.mrc import write_map

    truth = _pseudo_atoms(256, 400, 70.0, 1.0, seed=0)
    write_map(tmp_path / "atoms.mrc", truth, 1.0)
    sim = tmp_path / "sim"
    r = cli("simulate", "--map", tmp_path / "atoms.mrc", "--n", N_256, "--no-noise", "--shift-sigma", 2,
            "--seed", 3, "--out", sim)
    assert r.returncode == 0, r.stderr
    assert read_star(sim / "ground_truth.star").box == 256
    relion("relion_reconstruct", "--i", "ground_truth.star", "--o", tmp_path / "rel.mrc", "--ctf", "--angpix", 1.0,
           "--skip_gridding", cwd=sim)
    r = cli("reconstruct", "--particles", sim / "ground_truth.star", "--out", tmp_path / "ours.mrc")
    assert r.returncode == 0, r.stderr
    ours, theirs = read_map(tmp_path / "ours.mrc")[0], read_map(tmp_path / "rel.mrc")[0]
    shells = slice(1, int(0.8 * 128) + 1)
    between = fsc(ours, theirs)[1][shells]
    to_truth = {name: fsc(m, truth)[1][shells] for name, m in (("ours", ours), ("relion", theirs))}
    print(f"256 px, shells 1-102: FSC ours vs Relion min {between.min():.4f}; vs the truth at 0.8 Nyquist: "
          f"ours {to_truth['ours'][-1]:.3f}, Relion {to_truth['relion'][-1]:.3f}")
    assert between.min() >= 0.99, between.min()
    assert np.all(to_truth["ours"] >= to_truth["relion"] - 0.01), (to_truth["ours"] - to_truth["relion"]).min()
