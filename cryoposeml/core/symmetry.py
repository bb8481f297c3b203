"""The one owner of point-group symmetry: Cn, Dn, T, O, I in Relion's axis conventions.

A group is a ``(|G|, 3, 3)`` array of rotation matrices ``g`` acting on volume coordinates: a
symmetric map satisfies ``V(g @ r) == V(r)``. A pose ``A`` (Relion matrix, see
:mod:`cryoposeml.core.rotations`) and its *symmetry mates* ``A @ g`` give the same projection.

Generators are Relion 3.1's (``src/symmetries.cpp``): Cn about z; Dn adds a 2-fold about x;
T has its 3-fold on z; O its 4-fold on z; I is Relion's default I2 (a 2-fold on z, a 5-fold in the
xz plane); I1, I3 and I4 are Relion's other icosahedral settings. They are checked against
``relion_image_handler --sym`` in the tests.
"""
from __future__ import annotations

import functools
import re

import numpy as np
from scipy.spatial.transform import Rotation

from ._lazy import LazyModule, is_tensor
from .errors import InputError
from .rotations import rotation_angle_deg

torch = LazyModule("torch", __name__)

__all__ = ["symmetry_group", "symmetric_distance_deg", "closest_mate_angle_deg", "expand_over_group", "to_asymmetric_unit",
           "symmetrize_map"]

_PHI = (1 + 5**0.5) / 2
_S3 = 3**0.5
_GENERATORS = {  # (fold, axis) pairs: Relion's settings, its 6-10 digit axes written exactly
    "T": [(3, (0, 0, 1)), (2, (0, (2 / 3) ** 0.5, (1 / 3) ** 0.5))],
    "O": [(3, (1, 1, 1)), (4, (0, 0, 1))],
    "I1": [(2, (1, 0, 0)), (5, (_PHI, 0, -1)), (3, (_PHI, 1 / _PHI, 0))],
    "I2": [(2, (0, 0, 1)), (5, (1, 0, _PHI)), (3, (0, 1 / _PHI, _PHI))],
    "I3": [(2, (-1, 0, _PHI)), (5, (0, 0, 1)),
           (3, (-0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
    "I4": [(2, (1, 0, _PHI)), (5, (0.8944271932547096, 0, 0.4472135909903704)),
           (3, (0.4911234778630044, 0.3568220764705179, 0.7946544753759428))],
}
_ORDERS = {"T": 12, "O": 24, "I": 60}


def _axis_rotation(fold: int, axis) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64)
    return Rotation.from_rotvec(2 * np.pi / fold * axis / np.linalg.norm(axis)).as_matrix()


def _close(generators: list[np.ndarray]) -> np.ndarray:
    """All products of the generators, to numerical tolerance."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for g in frontier:
            for h in generators:
                p = h @ g
                if not any(np.abs(p - q).max() < 1e-4 for q in group):
                    group.append(p)
                    new.append(p)
        frontier = new
        if len(group) > 60:
            raise AssertionError("symmetry closure did not terminate")
    return np.stack(group)


@functools.lru_cache(maxsize=None)
def _group(name: str) -> np.ndarray:
    m = re.fullmatch(r"([CD])(\d+)", name)
    if m:
        n = int(m.group(2))
        gens = [_axis_rotation(n, (0, 0, 1))] if n > 1 else []
        if m.group(1) == "D":
            gens.append(_axis_rotation(2, (1, 0, 0)))
        return _close(gens) if gens else np.eye(3)[None]
    key = "I2" if name == "I" else name
    group = _close([_axis_rotation(f, a) for f, a in _GENERATORS[key]])
    assert len(group) == _ORDERS[key[0]], (name, len(group))
    return group


def symmetry_group(sym: str) -> np.ndarray:
    """Rotation matrices ``(|G|, 3, 3)`` of a point group: C1..Cn, D2..Dn, T, O, I (I1-I4).

    The identity is first. Raises :class:`InputError` for an unknown or improper group.
    """
    name = str(sym).strip().upper()
    ok = re.fullmatch(r"C([1-9]\d*)|D([2-9]|[1-9]\d+)|T|O|I[1-4]?", name)
    if not ok:
        raise InputError(f"unknown symmetry {sym!r}: use Cn (n >= 1), Dn (n >= 2), T, O or I "
                         "(I1-I4); improper groups (Ci, Cs, Cnv, Cnh, Dnh, ...) are not supported")
    return _group(name).copy()


def _as_torch(x):
    return x if is_tensor(x) else torch.as_tensor(np.ascontiguousarray(x, dtype=np.float64))


def closest_mate_angle_deg(A1: torch.Tensor, A2: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``min_g angle(A1.T @ A2 @ g)`` in degrees for a group given as a ``(|G|, 3, 3)`` tensor;
    torch, broadcast, differentiable (the choice of mate is not)."""
    R = A1.transpose(-1, -2) @ A2
    # trace(R @ g) = sum_ij R_ij g_ji; the best mate has the largest trace (smallest angle).
    best = torch.einsum("...ij,gji->...g", R, group).argmax(-1)
    return rotation_angle_deg(R @ group[best])


def symmetric_distance_deg(A1, A2, sym: str = "C1"):
    """Symmetry-aware angular distance (degrees): ``min_g angle(A1.T @ A2 @ g)``, broadcast.

    Accepts numpy arrays or torch tensors ``(..., 3, 3)`` and returns the same kind.
    """
    is_numpy = not is_tensor(A1)
    A1, A2 = _as_torch(A1), _as_torch(A2)
    G = torch.as_tensor(symmetry_group(sym), dtype=A1.dtype, device=A1.device)
    out = closest_mate_angle_deg(A1, A2, G)
    return out.numpy() if is_numpy else out


def expand_over_group(A, sym: str = "C1"):
    """All symmetry mates ``A @ g``: ``(..., 3, 3)`` -> ``(..., |G|, 3, 3)`` (numpy or torch)."""
    is_numpy = not is_tensor(A)
    A = _as_torch(A)
    G = torch.as_tensor(symmetry_group(sym), dtype=A.dtype, device=A.device)
    out = A.unsqueeze(-3) @ G
    return out.numpy() if is_numpy else out


def to_asymmetric_unit(A, sym: str = "C1"):
    """The canonical mate of each pose: the ``A @ g`` closest to the identity.

    This picks one representative per orbit (a Voronoi cell of the group around the identity),
    so equal poses up to symmetry map to the same matrix.
    """
    is_numpy = not is_tensor(A)
    mates = expand_over_group(_as_torch(A), sym)
    tr = mates.diagonal(dim1=-2, dim2=-1).sum(-1)
    idx = tr.argmax(-1)
    out = torch.gather(mates, -3, idx[..., None, None, None].expand(*idx.shape, 1, 3, 3)).squeeze(-3)
    return out.numpy() if is_numpy else out


def symmetrize_map(volume: np.ndarray, sym: str, order: int = 1) -> np.ndarray:
    """Average a cubic map ``(z, y, x)`` over the group, about the centre voxel ``N // 2``."""
    from scipy.ndimage import map_coordinates

    n = volume.shape[0]
    c = n // 2
    zyx = np.indices(volume.shape, dtype=np.float64).reshape(3, -1) - c
    xyz = zyx[::-1]
    group = symmetry_group(sym)
    out = np.zeros(volume.size)
    for g in group:
        p = (g @ xyz)[::-1] + c
        out += map_coordinates(volume, p, order=order, mode="constant", cval=0.0)
    return (out / len(group)).reshape(volume.shape).astype(volume.dtype)
