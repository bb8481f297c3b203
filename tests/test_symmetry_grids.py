"""Symmetry groups against Relion (relion_image_handler --sym), symmetric distances, SO(3) grids."""
import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cryoposeml.core.grids import healpix_so3_angles, healpix_so3_grid
from cryoposeml.core.metrics import pcc, soft_sphere_mask
from cryoposeml.core.rotations import geodesic_distance_deg, random_rotations
from cryoposeml.core.symmetry import (expand_over_group, symmetric_distance_deg, symmetrize_map, symmetry_group,
                                      to_asymmetric_unit)
from cryoposeml.data.mrc import read_map, write_map
from conftest import relion

ORDERS = {"C1": 1, "C2": 2, "C7": 7, "D2": 4, "D5": 10, "T": 12, "O": 24, "I": 60, "I1": 60, "I3": 60, "I4": 60}


@pytest.mark.parametrize("sym", list(ORDERS))
def test_group_is_a_group(sym):
    G = symmetry_group(sym)
    assert len(G) == ORDERS[sym]
    assert np.allclose(G[0], np.eye(3))
    assert np.allclose(G @ G.transpose(0, 2, 1), np.eye(3), atol=1e-9)
    assert np.allclose(np.linalg.det(G), 1)
    prods = (G[:, None] @ G[None]).reshape(-1, 9)
    # closed under products: every product is (numerically) an element
    d = np.abs(prods[:, None, :] - G.reshape(-1, 9)[None]).max(-1).min(-1)
    assert d.max() < 1e-5


@pytest.mark.parametrize("sym", ["C3", "D2", "D3", "T", "O", "I"])
@pytest.mark.relion
def test_groups_match_relion(sym, tmp_path):
    """Our group must symmetrise a random map exactly as relion_image_handler --sym does."""
    rng = np.random.default_rng(1)
    vol = (gaussian_filter(rng.normal(size=(48, 48, 48)), 2.0) * soft_sphere_mask(48, 18)).astype(np.float32)
    write_map(tmp_path / "in.mrc", vol, 2.0)
    relion("relion_image_handler", "--i", tmp_path / "in.mrc", "--sym", sym, "--o", tmp_path / "out.mrc")
    theirs, _ = read_map(tmp_path / "out.mrc")
    ours = symmetrize_map(vol, sym, order=3)
    mask = soft_sphere_mask(48, 16)
    assert pcc(ours, theirs, mask) > 0.99
    # a wrong setting would not match: the other icosahedral setting must correlate much less
    if sym == "I":
        assert pcc(symmetrize_map(vol, "I1", order=3), theirs, mask) < 0.9


def test_symmetric_distance(rng):
    A = random_rotations(200, rng)
    for sym in ["C4", "D2", "T", "O", "I"]:
        mates = expand_over_group(A, sym)
        assert symmetric_distance_deg(A[:, None], mates, sym).max() < 1e-6
        B = random_rotations(200, rng)
        d_sym = symmetric_distance_deg(A, B, sym)
        brute = geodesic_distance_deg(A[:, None], expand_over_group(B, sym)).min(1)
        assert np.abs(d_sym - brute).max() < 1e-6
        # the asymmetric-unit representative is the same for every mate
        canon = to_asymmetric_unit(mates.reshape(-1, 3, 3), sym).reshape(mates.shape)
        assert np.abs(canon - canon[:, :1]).max() < 1e-9
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetry_group("X5")
    with pytest.raises(ValueError, match="unknown symmetry"):
        symmetry_group("D1")


def test_healpix_grid():
    for order, n in [(0, 72), (1, 576), (2, 4608)]:
        A = healpix_so3_grid(order)
        assert len(A) == n == len(healpix_so3_angles(order))
    # order 2 covers SO(3): every random rotation is within ~the grid spacing of a grid point
    A = healpix_so3_grid(2)
    probe = random_rotations(300, 0)
    nearest = geodesic_distance_deg(probe[:, None], A[None]).min(1)
    assert nearest.max() < 15.0 and np.median(nearest) < 10.0
