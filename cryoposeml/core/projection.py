"""Fourier-slice projection (Relion's relion_project: padding 2, trilinear, gridding pre-correction).

An image of pose ``A`` (see :mod:`cryoposeml.core.rotations`) is the inverse 2D transform of the
central slice ``V_hat(A.T @ (kx, ky, 0))``, times the CTF, times the phase ramp of the shift.
Differentiable with respect to the volume and to ``A``, so decoders can reuse it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .fourier import fftn_centered, frequency_index_2d, ifft2_centered, shift_phase_2d, trilinear_apodization

__all__ = ["Projector", "slice_coordinates", "sample_slices"]


def slice_coordinates(A: torch.Tensor, box: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded-grid coordinates (x, y, z) ``(B, box, box, 3)`` of each image frequency, relative to the
    centre, and the mask ``(box, box)`` of frequencies inside Nyquist (``|k| <= box / 2``)."""
    kx, ky = frequency_index_2d(box, A.dtype, A.device)
    k = torch.stack([kx, ky, torch.zeros_like(kx)], -1)                 # (N, N, 3)
    pts = torch.einsum("bji,yxj->byxi", A, k) * pad                     # A.T @ k
    inside = (kx**2 + ky**2) <= (box // 2) ** 2
    return pts, inside


def sample_slices(grid: torch.Tensor, A: torch.Tensor, box: int, pad: int) -> torch.Tensor:
    """Central slices ``(B, box, box)`` complex, trilinearly interpolated from a centred padded
    spectrum ``grid`` ``(1, 2, M, M, M)`` (real and imaginary parts as channels, ``M = pad * box``);
    zero beyond Nyquist. Differentiable with respect to ``grid`` and ``A``."""
    m = box * pad
    pts, inside = slice_coordinates(A, box, pad)
    # grid_sample wants (x, y, z) normalised to [-1, 1] over (W, H, D), align_corners=True.
    norm = (pts + m // 2) * (2.0 / (m - 1)) - 1.0
    b = A.shape[0]
    out = F.grid_sample(grid, norm.reshape(1, 1, b * box, box, 3), mode="bilinear",
                        padding_mode="zeros", align_corners=True)          # (1, 2, 1, B*N, N)
    out = out.reshape(2, b, box, box) * inside
    return torch.complex(out[0], out[1])


class Projector:
    """Projects one volume at many poses.

    Args:
        volume: ``(N, N, N)`` map, ``(z, y, x)``, centre at ``N // 2`` (numpy or torch).
        pad: Fourier padding factor (Relion's default 2).
    """

    def __init__(self, volume, pad: int = 2, dtype=torch.float32, device=None):
        vol = torch.as_tensor(np.asarray(volume) if not isinstance(volume, torch.Tensor) else volume,
                              dtype=torch.float64, device=device)
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"expected a cubic volume, got shape {tuple(vol.shape)}")
        self.box = n = vol.shape[0]
        self.pad = pad
        m = pad * n
        vol = vol / trilinear_apodization(n, m, device=device)
        # The padded transform in the grid's own precision (float32: a quarter of float64's memory,
        # which at a 256 px box is 1 GB per padded grid instead of 4), intermediates freed as soon as
        # they are used.
        work = torch.float64 if dtype == torch.float64 else torch.float32
        padded = torch.zeros((m, m, m), dtype=work, device=device)
        lo = m // 2 - n // 2
        padded[lo:lo + n, lo:lo + n, lo:lo + n] = vol.to(work)
        del vol
        spectrum = fftn_centered(padded)
        del padded
        # (1, 2, D, H, W): real and imaginary parts as channels for grid_sample.
        self._grid = torch.empty((1, 2, m, m, m), dtype=dtype, device=device)
        self._grid[0, 0] = spectrum.real
        self._grid[0, 1] = spectrum.imag
        del spectrum
        self.dtype = dtype

    def central_slices(self, A: torch.Tensor) -> torch.Tensor:
        """Centred 2D spectra ``(B, N, N)`` complex of the volume at poses ``A`` ``(B, 3, 3)``."""
        A = torch.as_tensor(A, dtype=self.dtype, device=self._grid.device)
        return sample_slices(self._grid, A, self.box, self.pad)

    def project(self, A, origins_px=None, ctf=None) -> torch.Tensor:
        """Real images ``(B, N, N)``: slices at ``A`` ``(B, 3, 3)``, optionally multiplied by the CTF
        ``(B, N, N)`` (centred layout) and shifted so that Relion reads ``origins_px`` ``(B, 2)``
        (rlnOriginX/Y in pixels): the particle's centre lands at ``box // 2 - origin``."""
        spectra = self.central_slices(A)
        if ctf is not None:
            spectra = spectra * torch.as_tensor(ctf, device=spectra.device).to(spectra.real.dtype)
        if origins_px is not None:
            origins = torch.as_tensor(origins_px, dtype=self.dtype, device=spectra.device)
            spectra = spectra * shift_phase_2d(-origins, self.box)
        return ifft2_centered(spectra).real
