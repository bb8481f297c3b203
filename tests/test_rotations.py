"""Pose conventions: round trips, scipy equivalence, Scipion's Transform (convert31's formula)."""
import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from cryoposeml.core import rotations as R


def _angles(n, rng):
    return np.c_[rng.uniform(-180, 180, n), rng.uniform(0, 180, n), rng.uniform(-180, 180, n)]


def test_relion_matrix_is_scipy_zyz_transposed(rng):
    ang = _angles(1000, rng)
    expected = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    assert np.abs(R.euler_to_matrix(ang) - expected).max() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trips_torch(dtype, rng):
    A = torch.as_tensor(R.random_rotations(500, rng), dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert (R.euler_to_matrix(R.matrix_to_euler(A)) - A).abs().max() < tol * 10
    assert (R.quaternion_to_matrix(R.matrix_to_quaternion(A)) - A).abs().max() < tol
    assert (R.sixd_to_matrix(R.matrix_to_sixd(A)) - A).abs().max() < tol
    assert R.euler_to_matrix(R.matrix_to_euler(A)).dtype == dtype


def test_euler_round_trip_and_singularities(rng):
    ang = _angles(200, rng)
    back = R.matrix_to_euler(R.euler_to_matrix(ang))
    assert np.abs(back - ang).max() < 1e-8
    # tilt 0 and 180: only rot+psi (or rot-psi) is defined; the matrix must survive.
    for tilt in (0.0, 180.0):
        a = np.array([[30.0, tilt, 40.0]])
        assert np.abs(R.euler_to_matrix(R.matrix_to_euler(R.euler_to_matrix(a))) - R.euler_to_matrix(a)).max() < 1e-9


def test_sixd_is_differentiable():
    x = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    A = R.sixd_to_matrix(x)
    assert torch.allclose(A @ A.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(8, 3, 3), atol=1e-12)
    A.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_geodesic_distance_matches_scipy(rng):
    A, B = R.random_rotations(300, rng), R.random_rotations(300, rng)
    expected = np.rad2deg((Rotation.from_matrix(A).inv() * Rotation.from_matrix(B)).magnitude())
    assert np.abs(R.geodesic_distance_deg(A, B) - expected).max() < 1e-8
    small = Rotation.from_rotvec([[1e-7, 0, 0]]).as_matrix()
    assert abs(R.geodesic_distance_deg(np.eye(3)[None], small)[0] - np.rad2deg(1e-7)) < 1e-12


def test_random_rotations_are_uniform():
    A = R.random_rotations(20000, 0)
    # Haar measure: the rotation angle has density (1 - cos t) / pi, mean pi/2 + 2/pi.
    t = np.deg2rad(R.geodesic_distance_deg(np.eye(3)[None], A))
    assert abs(t.mean() - (np.pi / 2 + 2 / np.pi)) < 0.02
    # The viewing direction (third row of A) is uniform on the sphere: mean of z ~ 0, of z^2 ~ 1/3.
    z = A[:, 2, 2]
    assert abs(z.mean()) < 0.02 and abs((z**2).mean() - 1 / 3) < 0.01


def test_scipion_transform_equals_convert31(rng):
    """1000 random poses: our Relion <-> Transform equals scipion-em-relion convert31's code path
    (pwem's transformations module, as its Reader and Writer use it)."""
    tfs = pytest.importorskip("pwem.convert.transformations")
    ang = _angles(1000, rng)
    shifts_px = rng.normal(0, 5, (1000, 3))
    shifts_px[:, 2] = 0
    ours = R.relion_to_scipion_matrix(ang, shifts_px[:, :2])
    for i in range(1000):
        # convert31.Reader.__setParticleTransformProj
        rad = -np.deg2rad(ang[i])
        M = tfs.euler_matrix(rad[0], rad[1], rad[2], "szyz")
        M[:3, 3] = -shifts_px[i]
        M = np.linalg.inv(M)
        assert np.abs(ours[i] - M).max() < 1e-9
        # convert31.Writer._alignProjToRow
        Minv = np.linalg.inv(M)
        back_shifts = -tfs.translation_from_matrix(Minv)
        back_angles = -np.rad2deg(tfs.euler_from_matrix(Minv, axes="szyz"))
        our_angles, our_shifts = R.scipion_matrix_to_relion(ours[i])
        assert np.abs(our_shifts - back_shifts).max() < 1e-9
        assert np.abs(R.euler_to_matrix(our_angles) - R.euler_to_matrix(back_angles)).max() < 1e-9
    # and the full round trip is exact
    a2, s2 = R.scipion_matrix_to_relion(ours)
    assert np.abs(R.euler_to_matrix(a2) - R.euler_to_matrix(ang)).max() < 1e-9
    assert np.abs(s2 - shifts_px).max() < 1e-9
