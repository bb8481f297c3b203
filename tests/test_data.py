"""STAR/MRC I/O, lazy datasets and preprocessing."""
import os

import numpy as np
import pandas as pd
import pytest
import starfile
import torch

from cryoposeml.core.ctf import ctf_2d
from cryoposeml.core.errors import InputError
from cryoposeml.core.fourier import fft2_centered
from cryoposeml.data.dataset import ParticleDataset
from cryoposeml.data.mrc import write_stack
from cryoposeml.data.preprocess import normalize_background, phase_flip, rescale
from cryoposeml.data.star import ParticleStar, read_star, write_star
from conftest import relion


def test_star_round_trip_keeps_unknown_columns(sim_noise_free_ctf, tmp_path):
    star = read_star(sim_noise_free_ctf / "ground_truth.star")
    star.particles["rlnSomethingNew"] = np.arange(len(star))
    star.particles["myToolScore"] = 0.5
    star.other_blocks["general"] = pd.DataFrame({"rlnFinalResolution": [3.2]})
    write_star(star, tmp_path / "deep" / "copy.star")
    back = read_star(tmp_path / "deep" / "copy.star")
    assert list(back.particles.columns) == list(star.particles.columns)
    assert (back.particles["rlnSomethingNew"] == np.arange(len(star))).all()
    assert "general" in back.other_blocks
    np.testing.assert_allclose(back.matrices(), star.matrices(), atol=1e-5)
    # the copy lives elsewhere: its image paths were rewritten and still reach the same images
    a = ParticleDataset(star).read_batch([0, 300, 599])
    b = ParticleDataset(back).read_batch([0, 300, 599])
    np.testing.assert_array_equal(a, b)
    assert back.image_keys() == star.image_keys()


def test_paths_resolve_relative_to_star_not_cwd(sim_noise_free_ctf, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    star = read_star(sim_noise_free_ctf / "ground_truth.star")
    stacks, _, _ = star.image_locations()
    assert all(s.is_relative_to(sim_noise_free_ctf) for s in stacks)


def test_dataset_bounds_open_stacks(tmp_path):
    n_stacks, per = 40, 5
    names = []
    for k in range(n_stacks):
        write_stack(tmp_path / f"s{k:02d}.mrcs", np.full((per, 16, 16), k, np.float32), 2.0)
        names += [f"{i + 1}@s{k:02d}.mrcs" for i in range(per)]
    optics = pd.DataFrame(dict(rlnOpticsGroup=[1], rlnImagePixelSize=[2.0], rlnImageSize=[16]))
    write_star(ParticleStar(pd.DataFrame(dict(rlnImageName=names, rlnOpticsGroup=1)), optics), tmp_path / "p.star")
    ds = ParticleDataset(read_star(tmp_path / "p.star"), max_open_stacks=4)
    fds_before = len(os.listdir("/proc/self/fd"))
    order = np.random.default_rng(0).permutation(len(ds))
    seen = []
    for idx, imgs in ds.batches(7, order):
        seen.append((idx, imgs[:, 0, 0]))
        assert len(ds.reader._maps) <= 4
    assert len(os.listdir("/proc/self/fd")) <= fds_before + 4
    for idx, vals in seen:
        np.testing.assert_array_equal(vals, idx // per)  # each image holds its stack number
    assert float(ds[17][0, 0]) == 3


def test_rescale_normalize_phase_flip(adk_map):
    from cryoposeml.core.projection import Projector
    from cryoposeml.core.rotations import random_rotations

    vol, apix = adk_map
    A = torch.as_tensor(random_rotations(4, 0), dtype=torch.float32)
    img = Projector(vol).project(A).numpy()
    small = rescale(img, apix, 2 * apix, 32)
    # Fourier cropping keeps the low frequencies exactly (all but the new Nyquist row/column)
    f_big = fft2_centered(torch.as_tensor(img, dtype=torch.float64))[:, 17:48, 17:48]
    f_small = fft2_centered(torch.as_tensor(small, dtype=torch.float64))[:, 1:, 1:]
    assert torch.allclose(f_small, f_big / 4, atol=1e-3 * f_big.abs().max())
    # same box at another pixel size: crop after resampling
    assert rescale(img, apix, 1.0, 64).shape == (4, 64, 64)

    noisy = img + np.random.default_rng(0).normal(3.0, 2.0, img.shape).astype(np.float32)
    norm = normalize_background(noisy, 28)
    k = np.arange(64) - 32
    out = (k[:, None] ** 2 + k[None, :] ** 2) > 28**2
    np.testing.assert_allclose(norm[:, out].mean(1), 0, atol=1e-5)
    np.testing.assert_allclose(norm[:, out].std(1), 1, atol=1e-5)

    from cryoposeml.core.ctf import CtfParams
    ctf = ctf_2d(CtfParams(np.full(4, 15000.0), np.full(4, 14000.0), np.zeros(4), 300.0, 2.7, 0.1), 64, apix)
    np.testing.assert_allclose(phase_flip(phase_flip(img, ctf.numpy()), ctf.numpy()), img, atol=1e-4)


def test_streaming_memory_is_flat(tmp_path):
    """Streaming a 64 MB stack holds only a batch in memory, not the touched pages."""
    psutil = __import__("pytest").importorskip("psutil")
    n = 4000
    write_stack(tmp_path / "big.mrcs", np.random.default_rng(0).normal(size=(n, 64, 64)).astype(np.float32), 1.5)
    optics = pd.DataFrame(dict(rlnOpticsGroup=[1], rlnImagePixelSize=[1.5], rlnImageSize=[64]))
    names = [f"{i + 1}@big.mrcs" for i in range(n)]
    write_star(ParticleStar(pd.DataFrame(dict(rlnImageName=names, rlnOpticsGroup=1)), optics), tmp_path / "b.star")
    ds = ParticleDataset(read_star(tmp_path / "b.star"))
    proc = psutil.Process()
    base = peak = proc.memory_info().rss
    total = 0.0
    for _, imgs in ds.batches(256):
        total += float(imgs[:, 0, 0].sum())
        peak = max(peak, proc.memory_info().rss)
    assert (peak - base) / 2**20 < 24, f"resident memory grew by {(peak - base) / 2**20:.0f} MiB"


def test_simulate_two_states_images_each_particle_from_its_own_map(tmp_path):
    """``simulate --map A B``: every particle is the projection of the map of its recorded state
    (rlnCpmlState, 1-based) at its true pose, the shares follow --state-weights, junk is state 0,
    and maps of different sizes are refused."""
    import json

    from conftest import cli
    from cryoposeml.core.projection import Projector
    from cryoposeml.data.bundled import resolve_map
    from cryoposeml.data.mrc import read_map

    out = tmp_path / "two"
    r = cli("simulate", "--map", "adk_closed", "adk_open", "--state-weights", 1, 3, "--n", 400, "--no-noise",
            "--no-ctf", "--junk-fraction", 0.1, "--seed", 5, "--out", out)
    assert r.returncode == 0, r.stderr
    truth = read_star(out / "ground_truth.star")
    state = truth.particles["rlnCpmlState"].to_numpy()
    junk = truth.particles["rlnCpmlJunk"].to_numpy()
    assert ((state == 0) == (junk != 0)).all()
    good = state > 0
    assert abs((state[good] == 2).mean() - 0.75) < 0.07, (state[good] == 2).mean()
    assert json.loads((out / "simulation.json").read_text())["counts"]["per_state"] == \
        [int((state == 1).sum()), int((state == 2).sum())]
    idx = np.flatnonzero(good)[:40]
    ds = ParticleDataset(truth)
    images = np.stack([ds[int(i)].numpy() for i in idx])
    A = torch.as_tensor(truth.matrices()[idx], dtype=torch.float32)
    o = torch.as_tensor(truth.shifts_angstrom()[idx] / 1.5, dtype=torch.float32)
    proj = [Projector(read_map(resolve_map(m))[0]).project(A, o).numpy() for m in ("adk_closed", "adk_open")]
    own = np.stack([proj[s - 1][k] for k, s in enumerate(state[idx])])
    other = np.stack([proj[2 - s][k] for k, s in enumerate(state[idx])])
    scale = np.abs(own).max()
    assert np.abs(images - own).max() < 1e-4 * scale            # exactly its own state's projection
    assert np.abs(images - other).max(axis=(1, 2)).min() > 1e-2 * scale   # and not the other's
    # a second map of another size is refused, and nothing is left behind
    from cryoposeml.data.mrc import write_map

    small = tmp_path / "small.mrc"
    write_map(small, np.zeros((32, 32, 32), np.float32), 1.5)
    r = cli("simulate", "--map", "adk_open", small, "--n", 10, "--out", tmp_path / "bad")
    assert r.returncode != 0 and "state 2" in r.stderr and "64 px" in r.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.relion
def test_relion_30_star_is_read_as_relion_convert_star_converts_it(sim_noise_free_ctf, tmp_path):
    """A Relion 3.0 particle STAR (one block, optics values per particle, origins in pixels, the
    pixel size from the detector and magnification) reads as the Relion 3.1 file that Relion's own
    relion_convert_star makes of it."""
    src = read_star(sim_noise_free_ctf / "ground_truth.star")
    p = src.particles.copy()
    stacks, stack_of, slices = src.image_locations()
    p["rlnImageName"] = [f"{i + 1:06d}@{stacks[k]}" for k, i in zip(stack_of, slices)]   # absolute: the file lives elsewhere
    apix = src.pixel_size_angstrom
    for c in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        p[c] = float(src.optics[c].iloc[0])
    p["rlnMagnification"], p["rlnDetectorPixelSize"] = 10000.0, apix   # 1.5 um at 10,000x: 1.5 A/px
    p["rlnOriginX"], p["rlnOriginY"] = p.pop("rlnOriginXAngst") / apix, p.pop("rlnOriginYAngst") / apix
    p = p.drop(columns=["rlnOpticsGroup"])
    starfile.write({"": p}, tmp_path / "relion30.star", overwrite=True)
    relion("relion_convert_star", "--i", "relion30.star", "--o", "converted.star", cwd=tmp_path)
    ours = read_star(tmp_path / "relion30.star")
    theirs = read_star(tmp_path / "converted.star")
    assert ours.pixel_size_angstrom == theirs.pixel_size_angstrom == apix and ours.box == theirs.box == src.box
    np.testing.assert_allclose(ours.shifts_angstrom(), theirs.shifts_angstrom(), atol=1e-4)
    np.testing.assert_allclose(ours.shifts_angstrom(), src.shifts_angstrom(), atol=1e-4)
    np.testing.assert_allclose(ours.matrices(), theirs.matrices(), atol=1e-6)
    for a, b in ((ours.ctf_params(), theirs.ctf_params()),):
        for f in ("defocus_u_angstrom", "voltage_kv", "cs_mm", "amplitude_contrast"):
            np.testing.assert_allclose(np.broadcast_to(getattr(a, f), len(ours)), np.broadcast_to(getattr(b, f), len(ours)))
    np.testing.assert_array_equal(ours.image_keys(), src.image_keys())
    # without the pixel size there is nothing to convert from: a clear error naming the file
    starfile.write({"": p.drop(columns=["rlnMagnification"])}, tmp_path / "nopix.star", overwrite=True)
    with pytest.raises(InputError, match="nopix.star.*rlnMagnification and rlnDetectorPixelSize"):
        read_star(tmp_path / "nopix.star")


def _pyem_expmap(e):
    """pyem's geom.expmap (what csparc2star turns alignments3D/pose into, the matrix Relion's Euler
    angles describe), written out here as the reference for the convention."""
    theta = np.linalg.norm(e)
    w = e / theta
    k = np.array([[0, w[2], -w[1]], [-w[2], 0, w[0]], [w[1], -w[0], 0]])
    return np.eye(3) + np.sin(theta) * k + (1 - np.cos(theta)) * k @ k


def test_cryosparc_cs_files_are_read_as_relion_particles(sim_noise_free_ctf, tmp_path):
    """A cryoSPARC job's particles (J5_particles.cs with the blobs, J5_passthrough_particles.cs with CTF
    and poses, stacks under J3/ relative to the project folder) read as the Relion STAR they came
    from: same images, CTF, poses (by pyem's csparc2star convention) and shifts, half-sets; bad files
    are refused naming the file and the field."""
    from scipy.spatial.transform import Rotation

    src = read_star(sim_noise_free_ctf / "ground_truth.star")
    n = len(src)
    project = tmp_path / "CS-project"
    (project / "J3").mkdir(parents=True)
    stacks, stack_of, slices = src.image_locations()
    for s in stacks:
        os.symlink(s, project / "J3" / s.name)
    (project / "J5").mkdir()
    apix = src.pixel_size_angstrom
    A = src.matrices()
    pose = Rotation.from_matrix(np.swapaxes(A, 1, 2)).as_rotvec()
    ctf = src.ctf_params()
    blobs = np.zeros(n, dtype=[("uid", "<u8"), ("blob/path", "S64"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
                               ("blob/psize_A", "<f4"), ("blob/sign", "<f4")])
    blobs["uid"] = np.arange(n) + 10 ** 15
    blobs["blob/path"] = [f">J3/{stacks[k].name}".encode() for k in stack_of]
    blobs["blob/idx"], blobs["blob/shape"], blobs["blob/psize_A"], blobs["blob/sign"] = slices, src.box, apix, 1.0
    passthrough = np.zeros(n, dtype=[("uid", "<u8"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
                                     ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
                                     ("ctf/df_angle_rad", "<f4"), ("alignments3D/pose", "<f4", (3,)),
                                     ("alignments3D/shift", "<f4", (2,)), ("alignments3D/psize_A", "<f4"),
                                     ("alignments3D/split", "<u4")])
    order = np.random.default_rng(0).permutation(n)   # the passthrough rows come in another order
    passthrough["uid"] = blobs["uid"][order]
    for field, value in (("ctf/accel_kv", ctf.voltage_kv), ("ctf/cs_mm", ctf.cs_mm),
                         ("ctf/amp_contrast", ctf.amplitude_contrast), ("ctf/df1_A", ctf.defocus_u_angstrom),
                         ("ctf/df2_A", ctf.defocus_v_angstrom), ("ctf/df_angle_rad", np.deg2rad(ctf.defocus_angle_deg))):
        passthrough[field] = np.broadcast_to(value, n)[order]
    passthrough["alignments3D/pose"] = pose[order]
    passthrough["alignments3D/shift"] = (src.shifts_angstrom() / apix)[order]
    passthrough["alignments3D/psize_A"] = apix
    passthrough["alignments3D/split"] = (np.arange(n) % 2)[order]
    for name, table in (("J5_particles.cs", blobs), ("J5_passthrough_particles.cs", passthrough)):
        with open(project / "J5" / name, "wb") as f:   # numpy.save, as cryoSPARC writes them
            np.save(f, table)

    cs = read_star(project / "J5" / "J5_particles.cs")
    assert len(cs) == n and cs.box == src.box and cs.pixel_size_angstrom == pytest.approx(apix, abs=1e-5)
    np.testing.assert_allclose(cs.matrices(), np.stack([_pyem_expmap(p) for p in pose]), atol=1e-5)
    np.testing.assert_allclose(cs.matrices(), A, atol=1e-5)
    np.testing.assert_allclose(cs.shifts_angstrom(), src.shifts_angstrom(), atol=1e-4)
    for f in ("defocus_u_angstrom", "defocus_v_angstrom", "defocus_angle_deg", "voltage_kv", "cs_mm"):
        np.testing.assert_allclose(np.broadcast_to(getattr(cs.ctf_params(), f), n),
                                   np.broadcast_to(getattr(ctf, f), n), rtol=1e-5, atol=1e-3, err_msg=f)
    assert (cs.particles["rlnRandomSubset"].to_numpy() == np.arange(n) % 2 + 1).all()
    assert cs.image_keys() == src.image_keys()   # the very same images
    np.testing.assert_array_equal(ParticleDataset(cs).read_batch([0, 599]), ParticleDataset(src).read_batch([0, 599]))
    back = read_star(write_star(cs, tmp_path / "from_cs.star"))   # and written as a Relion 3.1 STAR
    np.testing.assert_allclose(back.matrices(), A, atol=1e-5)

    # refused, naming the file and the problem
    dark = blobs.copy()
    dark["blob/sign"] = -1
    with open(project / "J5" / "dark.cs", "wb") as f:
        np.save(f, dark)
    with pytest.raises(InputError, match="dark.cs.*blob/sign is -1"):
        read_star(project / "J5" / "dark.cs")
    with open(project / "J5" / "noblob.cs", "wb") as f:
        np.save(f, passthrough)
    with pytest.raises(InputError, match="noblob.cs.*no blob/path"):
        read_star(project / "J5" / "noblob.cs")
    (project / "J5" / "text.cs").write_text("not numpy")
    with pytest.raises(InputError, match="text.cs.*not a NumPy-format"):
        read_star(project / "J5" / "text.cs")


def test_star_flavours_relion_4_and_5_and_optics_groups(sim_noise_free_ctf, tmp_path):
    """Relion 4.0/5.0 particle STAR files (a version line, a data_general block, columns we do not
    know) read and round-trip with all of it kept; several optics groups of one pixel size and box
    read with each particle's own optics; groups of different pixel sizes or boxes are refused,
    naming the file."""
    src = read_star(sim_noise_free_ctf / "ground_truth.star")
    stacks, stack_of, slices = src.image_locations()
    p = src.particles.copy()
    p["rlnImageName"] = [f"{i + 1:06d}@{stacks[k]}" for k, i in zip(stack_of, slices)]
    p["rlnCtfMaxResolution"] = 4.2
    p["rlnImageOriginalName"] = p["rlnImageName"]
    p["rlnOpticsGroup"] = np.arange(len(p)) % 2 + 1          # two optics groups
    optics = pd.concat([src.optics, src.optics], ignore_index=True)
    optics["rlnOpticsGroup"] = [1, 2]
    optics["rlnOpticsGroupName"] = ["opticsGroup1", "opticsGroup2"]
    optics.loc[1, "rlnVoltage"] = 200.0
    optics["rlnOddEvenMtf"] = "mtf_k3.star"                 # an optics column we do not use
    general = {"rlnTomoSubTomosAre2DStacks": 0}               # Relion 5 writes a data_general block
    for version in ("40000", "50001"):
        path = tmp_path / f"relion{version}.star"
        starfile.write({"general": general, "optics": optics, "particles": p}, path, overwrite=True)
        path.write_text(f"# version {version}\n\n" + path.read_text().replace("data_optics", f"# version {version}\n\ndata_optics"))
        star = read_star(path)
        assert len(star) == len(src) and star.box == src.box and "general" in star.other_blocks
        volt = np.broadcast_to(star.ctf_params().voltage_kv, len(star))
        assert (volt == np.where(np.arange(len(star)) % 2 == 0, src.optics["rlnVoltage"].iloc[0], 200.0)).all()
        back = read_star(write_star(star, tmp_path / f"copy{version}.star"))
        assert "general" in back.other_blocks and "rlnOddEvenMtf" in back.optics.columns
        assert (back.particles["rlnCtfMaxResolution"] == 4.2).all()
        np.testing.assert_allclose(back.matrices(), src.matrices(), atol=1e-5)
    for column, value, message in (("rlnImagePixelSize", 1.2, "different pixel sizes"),
                                   ("rlnImageSize", 96, "different box sizes")):
        bad = optics.copy()
        bad.loc[1, column] = value
        path = tmp_path / f"mixed_{column}.star"
        starfile.write({"optics": bad, "particles": p}, path, overwrite=True)
        with pytest.raises(InputError, match=f"mixed_{column}.star.*{message}"):
            star = read_star(path)
            star.pixel_size_angstrom, star.box
