"""In-plane D4 transforms of particle images (90-degree turns and mirrors) and what they do to poses.

Each element is an integer 2x2 matrix ``T`` acting on image coordinates (x, y) about the centre
pixel ``N // 2``: the transformed image is ``new(T @ r) = old(r)``. The pose and the origin
transform with it (seed 004, eq. 4): ``A' = T3 @ A`` with ``T3 = [[T, 0], [0, det T]]`` (a proper
rotation: a mirror in x becomes a 180-degree turn about y, since the projection does not see z),
and ``origin' = T @ origin``. Checked against the projector in the tests.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["D4", "transform_images", "pose_matrix", "transform_poses"]

_R90 = np.array([[0, -1], [1, 0]])
_FLIP = np.array([[-1, 0], [0, 1]])
#: The 8 elements of D4 as integer matrices: k quarter turns, then optionally a mirror in x.
D4 = [np.linalg.matrix_power(_R90, k) @ (_FLIP if f else np.eye(2, dtype=int)) for f in (0, 1) for k in range(4)]


def pose_matrix(T: np.ndarray) -> np.ndarray:
    """The 3x3 rotation that left-multiplies a pose when its image is transformed by ``T``."""
    T3 = np.zeros((3, 3))
    T3[:2, :2] = T
    T3[2, 2] = round(np.linalg.det(T))
    return T3


def transform_images(images: torch.Tensor, T: np.ndarray) -> torch.Tensor:
    """Apply ``T`` to images ``(..., N, N)`` exactly (a pixel permutation about ``N // 2``)."""
    n = images.shape[-1]
    c = n // 2
    k = torch.arange(n, device=images.device) - c
    yy, xx = torch.meshgrid(k, k, indexing="ij")
    Tinv = np.round(np.linalg.inv(T)).astype(int)
    # source of output pixel r' is r = T^-1 r'
    xs = Tinv[0, 0] * xx + Tinv[0, 1] * yy
    ys = Tinv[1, 0] * xx + Tinv[1, 1] * yy
    return images[..., (ys + c) % n, (xs + c) % n]


def transform_poses(A, origins, T: np.ndarray):
    """Poses ``(B, 3, 3)`` and origins ``(B, 2)`` of the transformed images."""
    T3 = torch.as_tensor(pose_matrix(T), dtype=A.dtype, device=A.device)
    T2 = torch.as_tensor(T, dtype=origins.dtype, device=origins.device)
    return T3 @ A, origins @ T2.T
