"""The one owner of pose conventions: Relion Euler angles, matrices, quaternions, 6D, Scipion.

Conventions (proved against relion_project / relion_reconstruct in tests/test_relion_referee.py):

* Euler angles are Relion's ``(rlnAngleRot, rlnAngleTilt, rlnAnglePsi)`` in degrees, ZYZ.
* The rotation matrix ``A`` of a pose is Relion's ``Euler_angles2matrix``: it maps volume
  coordinates to image coordinates, ``r_image = A @ r_volume`` (column vectors, x y z order).
  A projection samples the volume's Fourier transform at ``A.T @ (kx, ky, 0)``.
  ``A == scipy.spatial.transform.Rotation.from_euler('ZYZ', [rot, tilt, psi], degrees=True)
  .as_matrix().T``.
* Shifts are Relion's ``rlnOriginX/YAngst``: the particle's centre sits at
  ``box_centre - origin`` in the image (translating the image by +origin centres it), as
  relion_project writes them.
* Quaternions are unit and scalar-last ``(x, y, z, w)`` (roma's convention), of the matrix ``A``.
* 6D is the first two columns of ``A``, ``(..., 3, 2)`` flattened column-major to ``(..., 6)``
  (Zhou et al.; cryoPoseNet's s2s2), mapped back by Gram-Schmidt.
* Scipion's ``Transform`` (4x4, shifts in pixels) follows scipion-em-relion's convert31:
  ``M = inv([[A, -shift_px], [0, 1]]) = [[A.T, A.T @ shift_px], [0, 1]]``.

Every function takes numpy arrays or torch tensors and returns the same kind; the torch paths
are batched and differentiable (except at the Euler singularities).
"""
from __future__ import annotations

import functools

import numpy as np

from ._lazy import LazyModule, is_tensor

roma = LazyModule("roma", __name__)
torch = LazyModule("torch", __name__)

__all__ = [
    "euler_to_matrix",
    "matrix_to_euler",
    "matrix_to_quaternion",
    "quaternion_to_matrix",
    "matrix_to_sixd",
    "sixd_to_matrix",
    "geodesic_distance_deg",
    "rotation_angle_deg",
    "random_rotations",
    "relion_to_scipion_matrix",
    "scipion_matrix_to_relion",
]


def _numpy_in_numpy_out(fn):
    """Let a torch implementation accept numpy arrays (computed in float64, returned as numpy)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if is_tensor(args[0]):
            return fn(*args, **kwargs)
        out = fn(*(torch.as_tensor(np.ascontiguousarray(a, dtype=np.float64)) for a in args), **kwargs)
        return out.detach().cpu().numpy()

    return wrapper


def _xp(x):
    """The array namespace of ``x``: torch for tensors, numpy otherwise (the Euler conversions are
    written once for both, so that numpy callers never need torch)."""
    return torch if is_tensor(x) else np


def _rz(a):
    """Active rotation about z by angle ``a`` (radians): (..., 3, 3)."""
    xp = _xp(a)
    c, s = xp.cos(a), xp.sin(a)
    z, o = xp.zeros_like(a), xp.ones_like(a)
    return xp.stack([c, -s, z, s, c, z, z, z, o], -1).reshape(*a.shape, 3, 3)


def _ry(a):
    """Active rotation about y by angle ``a`` (radians): (..., 3, 3)."""
    xp = _xp(a)
    c, s = xp.cos(a), xp.sin(a)
    z, o = xp.zeros_like(a), xp.ones_like(a)
    return xp.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*a.shape, 3, 3)


def _as_float64(x):
    return x if is_tensor(x) else np.asarray(x, dtype=np.float64)


def euler_to_matrix(angles_deg):
    """Relion Euler angles ``(..., 3)`` [rot, tilt, psi] in degrees -> matrices ``A`` ``(..., 3, 3)``."""
    angles_deg = _as_float64(angles_deg)
    xp = _xp(angles_deg)
    a = xp.deg2rad(angles_deg)
    rot, tilt, psi = a[..., 0], a[..., 1], a[..., 2]
    return (_rz(rot) @ _ry(tilt) @ _rz(psi)).swapaxes(-1, -2)


#: below this |sin(tilt)| Relion treats a matrix as gimbal-locked (16 float32 epsilons)
_GIMBAL_EPS = 16 * 1.1920928955078125e-07


def matrix_to_euler(A):
    """Matrices ``A`` ``(..., 3, 3)`` -> Relion Euler angles ``(..., 3)`` in degrees, tilt in [0, 180].

    Follows Relion's Euler_matrix2angles, including its choice at tilt 0 / 180 (rot = 0).
    """
    A = _as_float64(A)
    xp = _xp(A)
    sb = xp.sqrt(A[..., 0, 2] ** 2 + A[..., 1, 2] ** 2)
    regular = sb > _GIMBAL_EPS
    psi = xp.arctan2(A[..., 1, 2], -A[..., 0, 2])
    rot = xp.arctan2(A[..., 2, 1], A[..., 2, 0])
    tilt = xp.arctan2(sb, A[..., 2, 2])
    up = A[..., 2, 2] > 0
    psi_deg = xp.where(up, xp.arctan2(-A[..., 1, 0], A[..., 0, 0]), xp.arctan2(A[..., 1, 0], -A[..., 0, 0]))
    tilt_deg = xp.where(up, xp.zeros_like(tilt), xp.full_like(tilt, np.pi))
    rot = xp.where(regular, rot, xp.zeros_like(rot))
    tilt = xp.where(regular, tilt, tilt_deg)
    psi = xp.where(regular, psi, psi_deg)
    return xp.rad2deg(xp.stack([rot, tilt, psi], -1))


@_numpy_in_numpy_out
def matrix_to_quaternion(A):
    """Matrices ``(..., 3, 3)`` -> unit quaternions ``(..., 4)``, scalar-last (x, y, z, w)."""
    return roma.rotmat_to_unitquat(A)


@_numpy_in_numpy_out
def quaternion_to_matrix(q):
    """Quaternions ``(..., 4)`` scalar-last (normalised here) -> matrices ``(..., 3, 3)``."""
    return roma.unitquat_to_rotmat(q / q.norm(dim=-1, keepdim=True))


@_numpy_in_numpy_out
def matrix_to_sixd(A):
    """Matrices ``(..., 3, 3)`` -> 6D ``(..., 6)``: first two columns, column-major."""
    return A[..., :, :2].transpose(-1, -2).reshape(*A.shape[:-2], 6)


@_numpy_in_numpy_out
def sixd_to_matrix(x):
    """6D ``(..., 6)`` -> matrices ``(..., 3, 3)`` by Gram-Schmidt (s2s2); differentiable."""
    cols = x.reshape(*x.shape[:-1], 2, 3).transpose(-1, -2)
    return roma.special_gramschmidt(cols)


def rotation_angle_deg(R: torch.Tensor) -> torch.Tensor:
    """Rotation angle (degrees) of matrices ``(..., 3, 3)``, in the atan2 form that stays accurate
    near 0 and 180 degrees where ``arccos((trace - 1) / 2)`` does not."""
    cos = ((R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2).clamp(-1, 1)
    skew = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, cos))


@_numpy_in_numpy_out
def geodesic_distance_deg(A1, A2):
    """Angle (degrees) of the rotation ``A1.T @ A2``, broadcast over leading dims; no symmetry.

    For symmetry-aware distances use :func:`cryoposeml.core.symmetry.symmetric_distance_deg`.
    """
    return rotation_angle_deg(A1.transpose(-1, -2) @ A2)


def random_rotations(n: int, seed: int | np.random.Generator | None = None) -> np.ndarray:
    """``n`` rotation matrices drawn uniformly (Haar measure) on SO(3): ``(n, 3, 3)`` float64."""
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    return Rotation.random(n, random_state=rng).as_matrix()


def relion_to_scipion_matrix(angles_deg: np.ndarray, shifts_px: np.ndarray) -> np.ndarray:
    """Relion ``(..., 3)`` angles (degrees) and ``(..., 2|3)`` origin shifts (pixels) -> Scipion 4x4.

    Same result as scipion-em-relion convert31's reader: ``inv([[A, -s], [0, 1]])``.
    """
    angles_deg = np.asarray(angles_deg, dtype=np.float64)
    shifts_px = np.asarray(shifts_px, dtype=np.float64)
    A = euler_to_matrix(angles_deg)
    s = np.zeros(angles_deg.shape[:-1] + (3,))
    s[..., : shifts_px.shape[-1]] = shifts_px
    M = np.zeros(angles_deg.shape[:-1] + (4, 4))
    At = np.swapaxes(A, -1, -2)
    M[..., :3, :3] = At
    M[..., :3, 3] = np.einsum("...ij,...j->...i", At, s)
    M[..., 3, 3] = 1.0
    return M


def scipion_matrix_to_relion(M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scipion 4x4 ``(..., 4, 4)`` -> (Relion angles ``(..., 3)`` degrees, shifts ``(..., 3)`` pixels)."""
    M = np.asarray(M, dtype=np.float64)
    A = np.swapaxes(M[..., :3, :3], -1, -2)
    shifts = np.einsum("...ij,...j->...i", A, M[..., :3, 3])
    return matrix_to_euler(A), shifts
