"""Reference-verified prediction (core/matching.py, engine/verify.py) on small data, no training:
the map recovers perturbed poses, corrects a flip onto a near-symmetric mate, scores junk below
particles, and searches one asymmetric unit under symmetry."""
import numpy as np
import pytest
import torch

from cryoposeml.core.ctf import CtfParams, ctf_2d
from cryoposeml.core.matching import ReferenceMatcher, pseudo_symmetries
from cryoposeml.core.projection import Projector
from cryoposeml.core.rotations import random_rotations
from cryoposeml.core.symmetry import symmetric_distance_deg, to_asymmetric_unit
from cryoposeml.data.mrc import read_map
from cryoposeml.engine.calibration import auroc
from cryoposeml.engine.verify import MatchConfig, verify_batch
from conftest import MAPS

APIX = 1.5


def _ctf(n, seed):
    rng = np.random.default_rng(seed)
    d = rng.uniform(10000, 25000, n)
    return CtfParams(d, d * 0.97, rng.uniform(0, 180, n), np.full(n, 300.0), np.full(n, 2.7), np.full(n, 0.1))


def _particles(vol, n, seed, snr=None):
    """Projections at random poses with CTF and origins (px); white noise at ``snr`` (per pixel
    over the box) unless None."""
    A = random_rotations(n, seed)
    rng = np.random.default_rng(seed + 1)
    o = rng.normal(0, 1.5, (n, 2))
    ctf = ctf_2d(_ctf(n, seed), vol.shape[0], APIX)
    img = Projector(vol).project(torch.as_tensor(A, dtype=torch.float32), o, ctf).float()
    if snr is not None:
        sd = float(img.std()) / np.sqrt(snr)
        img = img + sd * torch.randn(img.shape, generator=torch.Generator().manual_seed(seed))
    return img, A, o, ctf


def _turn(A, deg, seed):
    """``A`` turned by a random axis through exactly ``deg`` degrees."""
    from scipy.spatial.transform import Rotation

    axes = np.random.default_rng(seed).normal(size=(len(A), 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    return Rotation.from_rotvec(axes * np.radians(deg)).as_matrix() @ A


@pytest.fixture(scope="module")
def adk():
    return read_map(MAPS / "adk_open.mrc")[0]


@pytest.mark.parametrize("n,half", [(32, 20), (33, 9)])
def test_the_padded_spectrum_centre_is_the_crop_of_the_whole_padded_transform(n, half):
    """What the matcher keeps of its reference's padded spectrum, computed axis by axis, equals the
    central cube of the whole padded transform (float32 rounding)."""
    from cryoposeml.core.fourier import fftn_centered, padded_spectrum_centre

    vol = torch.randn(n, n, n, generator=torch.Generator().manual_seed(n))
    m = 2 * n
    padded = torch.zeros(m, m, m)
    lo, c = m // 2 - n // 2, m // 2
    padded[lo:lo + n, lo:lo + n, lo:lo + n] = vol
    whole = fftn_centered(padded)[c - half:c + half + 1, c - half:c + half + 1, c - half:c + half + 1]
    got = padded_spectrum_centre(vol, m, half)
    assert got.shape == whole.shape
    assert float((got - whole).abs().max() / whole.abs().max()) < 1e-5


def test_proposals_20_degrees_off_are_refined_to_under_one_degree(adk):
    img, A, o, ctf = _particles(adk, 24, 3)
    m = ReferenceMatcher(adk, "C1", coarse_kmax=16, fine_kmax=28)
    props = torch.as_tensor(_turn(A, 20.0, 5), dtype=torch.float32)[:, None]
    start = torch.as_tensor(o + 1.0, dtype=torch.float32)        # origins 1.4 px off too
    r = verify_batch(m, img, ctf, props, start, MatchConfig(matching="proposals"), np.zeros((0, 3, 3)), 24)
    err = symmetric_distance_deg(r["matrix"].double().numpy(), A)
    shift_err = np.linalg.norm(r["origin"].numpy() - o, axis=1)
    assert np.median(err) < 0.5 and err.max() < 1.0, err          # measured: median 0.2, max 0.5
    assert shift_err.max() < 0.2, shift_err
    assert not r["escalated"].any()
    # noise-free: the expected error is small, the posterior's best pose takes most of the mass
    assert float(r["expected_raw"].median()) < 1.0


def test_a_trusted_wrong_proposal_that_matches_poorly_is_searched_exhaustively(adk):
    """``auto`` trusts a proposal whose match z clears the escalation threshold; one that clears it
    from a wrong basin refines to a pose that matches like no good particle, and the rescue (final
    match z below ``rescue_z``) searches it exhaustively: the right pose is found, the right
    proposals are left alone (but the few at the bottom of the good particles' match z)."""
    img, A, o, ctf = _particles(adk, 16, 11, snr=1.0)
    m = ReferenceMatcher(adk, "C1", coarse_kmax=16, fine_kmax=28)
    wrong = np.arange(16) % 2 == 1
    props = np.where(wrong[:, None, None], _turn(A, 90.0, 12), _turn(A, 3.0, 13))
    props = torch.as_tensor(props, dtype=torch.float32)[:, None]
    origins = torch.as_tensor(o, dtype=torch.float32)
    none = np.zeros((0, 3, 3))
    good = verify_batch(m, img, ctf, props, origins, MatchConfig(matching="proposals"), none, 24)
    good_z = good["z"].numpy()[~wrong]
    trusting = MatchConfig(matching="auto", escalate_z=-1e9)      # every proposal clears the threshold
    kept = verify_batch(m, img, ctf, props, origins, trusting, none, 24)
    err_kept = symmetric_distance_deg(kept["matrix"].double().numpy(), A)
    assert (err_kept[wrong] > 20).all() and not kept["escalated"].any(), err_kept   # the wrong basins stay
    rescue_z = float(np.quantile(good_z, 0.05))
    assert kept["z"].numpy()[wrong].max() < rescue_z, (kept["z"], good_z)
    trusting.rescue_z = rescue_z
    r = verify_batch(m, img, ctf, props, origins, trusting, none, 24)
    err = symmetric_distance_deg(r["matrix"].double().numpy(), A)
    assert err.max() < 2.0, err
    # every wrong one searched; of the right ones only those at the bottom of the good z's (the 5%
    # quantile of 8: the lowest)
    esc = r["escalated"].numpy()
    assert esc[wrong].all() and esc[~wrong].sum() <= 1, esc
    np.testing.assert_allclose(r["matrix"].numpy()[~wrong & ~esc], kept["matrix"].numpy()[~wrong & ~esc])


def test_a_flip_onto_a_near_symmetric_mate_is_corrected(adk):
    """A map nearly D2-symmetric (AdK's D2 average, 20% of one copy left as it is): a regression
    network's typical failure is the pose of a symmetry mate. The map's near-symmetries are found,
    their mates proposed, and the refined scores pick the true pose."""
    d2 = read_map(MAPS / "d2_test.mrc")[0]
    vol = 0.8 * d2 / np.abs(d2).max() + 0.2 * adk / np.abs(adk).max()
    ops, cc = pseudo_symmetries(vol)
    assert len(ops) == 3 and (cc > 0.8).all() and (cc < 0.999).all(), cc
    img, A, o, ctf = _particles(vol, 16, 7, snr=1.0)
    flipped = A @ ops[np.arange(16) % 3]                           # each particle proposed as a mate
    assert symmetric_distance_deg(flipped, A).min() > 150
    m = ReferenceMatcher(vol, "C1", coarse_kmax=16, fine_kmax=28)
    r = verify_batch(m, img, ctf, torch.as_tensor(flipped, dtype=torch.float32)[:, None],
                     torch.as_tensor(o, dtype=torch.float32), MatchConfig(matching="proposals"), ops, 24)
    err = symmetric_distance_deg(r["matrix"].double().numpy(), A)
    assert np.mean(err < 3) >= 15 / 16, err
    # without the map's near-symmetries the flip stays
    r0 = verify_batch(m, img, ctf, torch.as_tensor(flipped, dtype=torch.float32)[:, None],
                      torch.as_tensor(o, dtype=torch.float32), MatchConfig(matching="proposals"), np.zeros((0, 3, 3)), 24)
    assert np.mean(symmetric_distance_deg(r0["matrix"].double().numpy(), A) < 3) < 0.5


def test_junk_matches_below_particles(adk):
    """SNR 0.1 with CTF: AdK particles against pure noise and another protein (PTP1B), all searched
    exhaustively: the match z-score separates them (AUROC measured 0.99+ on the simulate set)."""
    other = read_map(MAPS / "other_ptp1b.mrc")[0]
    good, A, o, ctf_g = _particles(adk, 48, 11, snr=0.1)
    prot, _, o_p, ctf_p = _particles(other, 16, 12, snr=0.1)
    noise = torch.randn(16, 64, 64, generator=torch.Generator().manual_seed(13)) * float(good.std())
    img = torch.cat([good, prot, noise])
    ctf = torch.cat([ctf_g, ctf_p, ctf_2d(_ctf(16, 14), 64, APIX)])
    origins = torch.as_tensor(np.concatenate([o, o_p, np.zeros((16, 2))]), dtype=torch.float32)
    m = ReferenceMatcher(adk, "C1", coarse_kmax=16, fine_kmax=28)
    r = verify_batch(m, img, ctf, None, origins, MatchConfig(matching="exhaustive"), np.zeros((0, 3, 3)), 24)
    is_good = np.r_[np.ones(48, bool), np.zeros(32, bool)]
    z = r["z"].numpy()
    assert auroc(z, is_good) > 0.95, (np.sort(z[is_good])[:5], np.sort(z[~is_good])[-5:])
    err = symmetric_distance_deg(r["matrix"][:48].double().numpy(), A)
    assert np.median(err) < 3, np.sort(err)                    # the exhaustive search finds them at SNR 0.1


def test_d2_search_covers_one_asymmetric_unit():
    d2 = read_map(MAPS / "d2_test.mrc")[0]
    m = ReferenceMatcher(d2, "D2", coarse_kmax=16, fine_kmax=28)
    n_lib = len(m.library["poses"])
    assert abs(n_lib - 36864 / 4) < 0.02 * 36864 / 4, n_lib
    lib = m.library["poses"].double().numpy()
    np.testing.assert_allclose(to_asymmetric_unit(lib, "D2"), lib, atol=1e-4)
    img, A, o, ctf = _particles(d2, 16, 21, snr=1.0)
    r = verify_batch(m, img, ctf, None, torch.as_tensor(o, dtype=torch.float32), MatchConfig(matching="exhaustive"),
                     np.zeros((0, 3, 3)), 24)
    err = symmetric_distance_deg(r["matrix"].double().numpy(), A, "D2")
    assert np.median(err) < 1.5 and err.max() < 3, err


def test_half_set_particles_are_matched_against_their_own_half_map(tmp_path, adk):
    """Gold standard: a particle of rlnRandomSubset k is matched against half-map k only. The model
    folder's half-2 map is AdK turned by 90 degrees about z, so half-2 particles come out 90 degrees
    off and half-1 particles right; --cross-halves (CESPED's evaluation protocol) swaps that. The
    networks are untrained: --matching exhaustive ignores their rotations."""
    import json

    from safetensors.torch import save_file

    from cryoposeml.data.mrc import write_map
    from cryoposeml.data.star import read_star
    from cryoposeml.engine.calibration import fit_calibration
    from cryoposeml.models import PoseNetConfig, build_model
    from conftest import cli

    r = cli("simulate", "--n", 24, "--no-noise", "--shift-sigma", 1.5, "--seed", 8, "--out", tmp_path / "sim")
    assert r.returncode == 0, r.stderr
    model = tmp_path / "model"
    net = PoseNetConfig(family="sixd", box=32, widths=(8, 16))
    calib = fit_calibration(np.linspace(0, 1, 50), np.linspace(30, 1, 50)).to_dict()
    for h in ("half1", "half2"):
        (model / h).mkdir(parents=True)
        torch.manual_seed(0)
        save_file({k: v.contiguous() for k, v in build_model(net).state_dict().items()},
                  str(model / h / "weights.safetensors"))
    (model / "model.json").write_text(json.dumps({
        "network": net.to_dict(), "sym": "C1", "input": {"box": 64, "pixel_size_angstrom": APIX},
        "preprocessing": {"box_px": 32, "pixel_size_angstrom": 2 * APIX},
        "runs": {h: {"calibration": calib} for h in ("half1", "half2")}}))
    ref = model / "reference"
    ref.mkdir()
    write_map(ref / "half1_filtered.mrc", adk, APIX)
    write_map(ref / "half2_filtered.mrc", np.ascontiguousarray(np.rot90(adk, 1, axes=(1, 2))), APIX)
    (ref / "reference.json").write_text(json.dumps({"sym": "C1", "box": 64, "pixel_size_angstrom": APIX,
                                                    "resolution_fsc0143_angstrom": 4.0}))
    truth = read_star(tmp_path / "sim" / "ground_truth.star")
    subset = truth.random_subset()
    assert set(subset) == {1, 2}
    for flag, right_half in (([], 1), (["--cross-halves"], 2)):
        out = tmp_path / f"p{len(flag)}.star"
        r = cli("predict", "--particles", tmp_path / "sim" / "particles.star", "--model", model, "--out", out,
                "--matching", "exhaustive", *flag)
        assert r.returncode == 0, r.stderr
        err = symmetric_distance_deg(read_star(out).matrices(), truth.matrices())
        assert np.all(err[subset == right_half] < 2), err[subset == right_half]
        assert np.all(np.abs(err[subset != right_half] - 90) < 5), err[subset != right_half]
