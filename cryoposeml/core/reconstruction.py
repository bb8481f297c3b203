"""Direct Fourier reconstruction: CTF-weighted trilinear back-projection on a padded grid.

``V_hat = sum_i w_i CTF_i conj(shift_i) F_i / (sum_i w_i CTF_i^2 + lambda)`` accumulated by
trilinear scattering at ``A_i.T @ (kx, ky, 0)`` (the adjoint of :class:`~.projection.Projector`),
for every symmetry mate ``A_i @ g``; ``w_i`` is an optional per-particle weight (FOM weighting).
``lambda`` (Wiener-like regularisation) is ``regularization`` times the mean of the non-zero
weights. The real-space result is divided by the trilinear apodization (gridding correction) and,
as Relion does, the box corners outside the inscribed sphere are softly masked.
"""
from __future__ import annotations

import numpy as np
import torch

from .fourier import fft2_centered, ifftn_centered, shift_phase_2d, trilinear_apodization
from .metrics import mask_outside_sphere
from .projection import slice_coordinates
from .symmetry import symmetry_group

__all__ = ["BackProjector"]


class BackProjector:
    """Accumulates images, then reconstructs a ``(box,)*3`` map.

    Args:
        box: image size in pixels (even).
        sym: point group, Relion's name (the data are inserted at every symmetry mate).
        pad: Fourier padding factor (2, as Relion).
    """

    def __init__(self, box: int, sym: str = "C1", pad: int = 2, device=None):
        self.box, self.pad = box, pad
        self.group = torch.as_tensor(symmetry_group(sym), dtype=torch.float64, device=device)
        m = box * pad
        # Accumulated (real, imaginary, weight) per padded voxel. Only half of each image's
        # spectrum is inserted; Hermitian symmetry supplies the other half in reconstruct().
        self._acc = torch.zeros((m**3, 3), dtype=torch.float64, device=device)
        self.count = 0

    def insert(self, images, A, origins_px=None, ctf=None, weights=None) -> None:
        """Add images ``(B, N, N)`` (real space) at poses ``A`` ``(B, 3, 3)``.

        ``origins_px`` ``(B, 2)`` are the particles' Relion origins in pixels (undone here), ``ctf``
        the ``(B, N, N)`` CTFs in the centred layout, ``weights`` ``(B,)`` per-particle weights.
        """
        dev = self._acc.device
        images = torch.as_tensor(images, dtype=torch.float64, device=dev)
        A = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A, dtype=torch.float64, device=dev)
        spectra = fft2_centered(images)
        if origins_px is not None:
            origins = torch.as_tensor(origins_px, dtype=torch.float64, device=dev)
            spectra = spectra * shift_phase_2d(origins, self.box)   # re-centre the particle
        if ctf is not None:
            ctf = torch.as_tensor(ctf, dtype=torch.float64, device=dev)
            spectra, w2 = spectra * ctf, ctf**2
        else:
            w2 = torch.ones_like(images)
        if weights is not None:
            w = torch.as_tensor(weights, dtype=torch.float64, device=dev)[:, None, None]
            spectra, w2 = spectra * w, w2 * w
        values = torch.cat([torch.view_as_real(spectra), w2[..., None]], -1)
        kx = torch.arange(self.box, device=dev) - self.box // 2
        half = (kx[None, :] > 0) | ((kx[None, :] == 0) & (kx[:, None] >= 0))   # (ky, kx) half-plane
        for g in self.group:
            pts, inside = slice_coordinates(A @ g, self.box, self.pad)
            keep = inside & half
            self._scatter(pts[:, keep], values[:, keep])
        self.count += images.shape[0]

    def _scatter(self, pts, values) -> None:
        m = self.box * self.pad
        pts = pts.reshape(-1, 3) + m // 2
        values = values.reshape(-1, 3)
        base = torch.floor(pts)
        frac = pts - base
        base = base.long()
        for dz in (0, 1):
            for dy in (0, 1):
                for dx in (0, 1):
                    x, y, z = base[:, 0] + dx, base[:, 1] + dy, base[:, 2] + dz
                    w = ((frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
                         * (frac[:, 2] if dz else 1 - frac[:, 2]))
                    ok = (x >= 0) & (x < m) & (y >= 0) & (y < m) & (z >= 0) & (z < m)
                    idx = ((z * m + y) * m + x)[ok]
                    self._acc.index_add_(0, idx, values[ok] * w[ok, None])

    def merge(self, other: "BackProjector") -> None:
        """Add another accumulator's data (e.g. two half-sets -> the full map)."""
        self._acc += other._acc
        self.count += other.count

    def copy(self) -> "BackProjector":
        new = BackProjector.__new__(BackProjector)
        new.box, new.pad, new.group, new.count = self.box, self.pad, self.group, self.count
        new._acc = self._acc.clone()
        return new

    def reconstruct(self, regularization: float = 1e-3, mask_corners: bool = True) -> np.ndarray:
        """The map ``(N, N, N)`` float32, ``(z, y, x)``, centre at ``N // 2``.

        ``mask_corners``: as Relion, blend the box corners beyond the inscribed sphere to their mean
        (they hold only noise and aliasing)."""
        n, m = self.box, self.box * self.pad
        acc = self._acc.reshape(m, m, m, 3)
        # Hermitian completion: value(-p) = conj(value(p)); index i holds p = i - m//2, so -p is at
        # m - i, i.e. the flipped array rolled by one.
        mirror = torch.roll(torch.flip(acc, dims=(0, 1, 2)), shifts=(1, 1, 1), dims=(0, 1, 2))
        data = torch.complex(acc[..., 0] + mirror[..., 0], acc[..., 1] - mirror[..., 1])
        weight = acc[..., 2] + mirror[..., 2]
        positive = weight > 0
        if not bool(positive.any()):
            raise ValueError("no data were inserted")
        lam = regularization * weight[positive].mean()
        spectrum = data / (weight + lam)
        # Keep the Nyquist sphere of the original box only.
        k = torch.arange(m, dtype=torch.float64, device=weight.device) - m // 2
        r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
        spectrum = spectrum * (r2 <= (n // 2 * self.pad) ** 2)
        padded = ifftn_centered(spectrum).real
        lo = m // 2 - n // 2
        vol = padded[lo:lo + n, lo:lo + n, lo:lo + n] / trilinear_apodization(n, m, device=weight.device)
        vol = vol.cpu().numpy().astype(np.float32)
        return mask_outside_sphere(vol) if mask_corners else vol
