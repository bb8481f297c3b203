"""Rotation grids on SO(3): HEALPix directions (healpy) x uniform in-plane angles.

Order ``k`` gives ``12 * 4**k`` viewing directions (HEALPix nside ``2**k``) times ``6 * 2**k``
psi angles (the Image2Sphere / Relion construction): 4,608 rotations at order 2, 36,864 at 3.
"""
from __future__ import annotations

import healpy as hp
import numpy as np

from .rotations import euler_to_matrix

__all__ = ["healpix_so3_grid", "healpix_so3_angles", "grid_spacing_deg"]


def healpix_so3_angles(order: int) -> np.ndarray:
    """Relion Euler angles ``(n, 3)`` (degrees) of the order-``order`` grid, psi varying fastest."""
    if order < 0:
        raise ValueError("HEALPix order must be >= 0")
    nside = 2**order
    tilt, rot = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), nest=True)
    psi = np.linspace(0.0, 360.0, 6 * nside, endpoint=False)
    n_dir, n_psi = len(rot), len(psi)
    return np.stack([np.repeat(np.rad2deg(rot), n_psi), np.repeat(np.rad2deg(tilt), n_psi),
                     np.tile(psi, n_dir)], axis=1)


def healpix_so3_grid(order: int) -> np.ndarray:
    """Rotation matrices ``(n, 3, 3)`` (Relion convention) of the order-``order`` grid."""
    return euler_to_matrix(healpix_so3_angles(order))


def grid_spacing_deg(order: int) -> float:
    """Approximate angular spacing of the order-``order`` grid (Relion's: 60 / 2**order deg)."""
    return 60.0 / 2**order
