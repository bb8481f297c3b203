"""Direct Fourier reconstruction: CTF-weighted trilinear back-projection on a padded grid.

Memory: as Relion keeps its Fourier grids, only the half-space ``p_x >= 0`` of the padded
spectrum is stored (the rest is its Hermitian mirror), in float32: ``(M, M, M/2 + 1, 3)`` values
for ``M = pad * box``, about 0.8 GB at a 256 px box (the full float64 grid was 3.2 GB). Images are
inserted in chunks, and the map is made block by block (see :meth:`BackProjector.reconstruct`), so
temporaries stay bounded whatever the batch: 2.6 GB peak for two half-sets at 256 px.

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

from .fourier import fft2_centered, shift_phase_2d, trilinear_apodization
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
        dtype: of the accumulators (float32; float64 for tests of the arithmetic).
    """

    #: image frequencies handled at once by :meth:`insert` (bounds its temporaries, ~300 MB)
    CHUNK_POINTS = 1 << 21

    def __init__(self, box: int, sym: str = "C1", pad: int = 2, device=None, dtype=torch.float32):
        self.box, self.pad = box, pad
        self.group = torch.as_tensor(symmetry_group(sym), dtype=torch.float64, device=device)
        m = box * pad
        self._half = m // 2 + 1
        # Accumulated (real, imaginary, weight) per voxel of the half-space p_x >= 0: index
        # ((z * m) + y) * (m/2 + 1) + x with z, y centred (index i <-> p = i - m/2) and x = p_x.
        # Each image's half-plane of frequencies is inserted; a point landing at p_x < 0 goes to
        # -p with the conjugate value (its Hermitian mirror), so the x = 0 plane alone needs
        # completing in reconstruct().
        self._acc = torch.zeros((m * m * self._half, 3), dtype=dtype, device=device)
        self.count = 0

    @property
    def nbytes(self) -> int:
        """Memory held by the accumulators."""
        return self._acc.element_size() * self._acc.nelement()

    def insert(self, images, A, origins_px=None, ctf=None, weights=None) -> None:
        """Add images ``(B, N, N)`` (real space) at poses ``A`` ``(B, 3, 3)``.

        ``origins_px`` ``(B, 2)`` are the particles' Relion origins in pixels (undone here), ``ctf``
        the ``(B, N, N)`` CTFs in the centred layout, ``weights`` ``(B,)`` per-particle weights.
        """
        dev = self._acc.device
        images = torch.as_tensor(images, device=dev)
        A = torch.as_tensor(np.asarray(A) if not isinstance(A, torch.Tensor) else A, dtype=torch.float64, device=dev)
        step = max(1, self.CHUNK_POINTS // (self.box * self.box))
        for s in range(0, images.shape[0], step):
            sl = slice(s, s + step)
            self._insert(images[sl], A[sl], None if origins_px is None else origins_px[sl],
                         None if ctf is None else ctf[sl], None if weights is None else weights[sl])
        self.count += images.shape[0]

    def _insert(self, images, A, origins_px, ctf, weights) -> None:
        dev, real = self._acc.device, self._acc.dtype   # the spectra in the accumulators' precision
        images = torch.as_tensor(images, device=dev).to(real)
        spectra = fft2_centered(images)
        if origins_px is not None:
            origins = torch.as_tensor(origins_px, dtype=torch.float64, device=dev)
            spectra = spectra * shift_phase_2d(origins, self.box, real)   # re-centre the particle
        if ctf is not None:
            ctf = torch.as_tensor(ctf, device=dev).to(real)
            spectra, w2 = spectra * ctf, ctf**2
        else:
            w2 = torch.ones_like(images)
        if weights is not None:
            w = torch.as_tensor(weights, device=dev).to(real)[:, None, None]
            spectra, w2 = spectra * w, w2 * w
        values = torch.cat([torch.view_as_real(spectra), w2[..., None]], -1)
        kx = torch.arange(self.box, device=dev) - self.box // 2
        half = (kx[None, :] > 0) | ((kx[None, :] == 0) & (kx[:, None] >= 0))   # (ky, kx) half-plane
        for g in self.group:
            pts, inside = slice_coordinates(A @ g, self.box, self.pad)
            keep = inside & half
            p, v = pts[:, keep].reshape(-1, 3), values[:, keep].reshape(-1, 3)
            mirror = p[:, 0] < 0
            p = torch.where(mirror[:, None], -p, p)
            v = torch.where(mirror[:, None], v * torch.tensor([1.0, -1.0, 1.0], dtype=v.dtype, device=dev), v)
            self._scatter(p, v)

    def _scatter(self, pts, values) -> None:
        """Trilinear scattering of points ``(P, 3)`` with ``p_x >= 0`` into the half-space grid."""
        m, h = self.box * self.pad, self._half
        pts = pts + torch.tensor([0.0, m // 2, m // 2], dtype=pts.dtype, device=pts.device)
        values = values.to(self._acc.dtype)
        base = torch.floor(pts)
        frac = (pts - base).to(self._acc.dtype)
        base = base.long()
        # per axis: the lower and upper corner's weight, and whether that corner is on the grid (a
        # corner off it gets weight 0 at index 0 rather than a compacted copy of every array)
        wx, wy, wz = ((1 - frac[:, i], frac[:, i]) for i in range(3))
        x0, y0, z0 = base[:, 0], base[:, 1], base[:, 2]
        in_y = ((y0 >= 0) & (y0 < m), (y0 + 1 >= 0) & (y0 + 1 < m))
        in_z = ((z0 >= 0) & (z0 < m), (z0 + 1 >= 0) & (z0 + 1 < m))
        in_x = (x0 < h, x0 + 1 < h)
        for dz in (0, 1):
            for dy in (0, 1):
                wzy = wz[dz] * wy[dy]
                zy = ((z0 + dz) * m + (y0 + dy)) * h + x0
                for dx in (0, 1):
                    ok = in_z[dz] & in_y[dy] & in_x[dx]
                    w = torch.where(ok, wzy * wx[dx], 0)
                    idx = torch.where(ok, zy + dx, 0)
                    self._acc.index_add_(0, idx, values * w[:, None])

    #: bytes of complex spectrum handled per block in :meth:`reconstruct` (bounds its temporaries)
    BLOCK_BYTES = 16 << 20

    def reconstruct(self, regularization: float = 1e-3, mask_corners: bool = True,
                    plus: "BackProjector | None" = None) -> np.ndarray:
        """The map ``(N, N, N)`` float32, ``(z, y, x)``, centre at ``N // 2``.

        ``mask_corners``: as Relion, blend the box corners beyond the inscribed sphere to their mean
        (they hold only noise and aliasing). ``plus``: the map of this accumulator's data and
        ``plus``'s together (the two half-sets' full map), read block by block from both, without a
        merged copy: the same map as one accumulator that held both sets' data.

        Memory: besides the accumulators, one ``(N, M, M/2 + 1)`` complex buffer (a quarter of the
        padded half-grid: 0.27 GB at a 256 px box) and blocks of :attr:`BLOCK_BYTES`. The spectrum
        is normalised block by block straight from the accumulators, and the inverse transform is
        separable: along z for blocks of y columns, keeping only the N output rows the cropped map
        needs, then along y and x for blocks of those rows."""
        n, m, h = self.box, self.box * self.pad, self._half
        if plus is not None and ((plus.box, plus.pad) != (self.box, self.pad) or not torch.equal(plus.group, self.group)):
            raise ValueError("the accumulators differ in box, padding or symmetry")
        mine = self._acc.reshape(m, m, h, 3)
        theirs = None if plus is None else plus._acc.reshape(m, m, h, 3)

        def acc(*index):   # a block of the data: this accumulator's, plus ``plus``'s
            return mine[index] if theirs is None else mine[index] + theirs[index]

        rdt, dev = mine.dtype, mine.device
        cdt = torch.complex64 if rdt == torch.float32 else torch.complex128
        # The x = 0 plane holds p and -p both: complete it, value(q) + conj(value(-q)); index i holds
        # p = i - m/2, so -p is at m - i, the flipped plane rolled by one.
        plane_data = acc(slice(None), slice(None), 0)
        plane, wplane = torch.complex(plane_data[..., 0], plane_data[..., 1]), plane_data[..., 2]
        del plane_data
        plane = plane + torch.roll(torch.flip(plane, (0, 1)), (1, 1), (0, 1)).conj()
        wplane = wplane + torch.roll(torch.flip(wplane, (0, 1)), (1, 1), (0, 1))
        per_y = max(1, self.BLOCK_BYTES // (m * h * torch.empty((), dtype=cdt).element_size()))
        blocks = [slice(y0, min(m, y0 + per_y)) for y0 in range(0, m, per_y)]

        def weights(ys):
            w = acc(slice(None), ys, slice(None), 2).clone()
            w[:, :, 0] = wplane[:, ys]
            return w

        # the mean positive weight over the whole (Hermitian-completed) grid: off the x = 0 plane each
        # stored voxel stands for two
        twice = torch.full((h,), 2.0, dtype=torch.float64, device=dev)
        twice[0] = 1
        total_w, total_n = 0.0, 0.0
        for ys in blocks:
            w = weights(ys).to(torch.float64)
            pos = (w > 0).to(torch.float64)
            total_w += float((w * pos * twice).sum())
            total_n += float((pos * twice).sum())
        if total_n == 0:
            raise ValueError("no data were inserted")
        lam = regularization * total_w / total_n
        # Crop indices: centred output J in [lo, lo + n) is FFT index (J + m/2) mod m; the centred
        # (z, y) input gives the factor (-1)^j on each of those axes (an ifftshift undone by hand).
        lo = m // 2 - n // 2
        keep = (torch.arange(lo, lo + n, device=dev) + m // 2) % m
        sign = (1 - 2 * (keep % 2)).to(rdt)
        k = torch.arange(m, dtype=rdt, device=dev) - m // 2
        kx = torch.arange(h, dtype=rdt, device=dev)
        nyquist2 = (n // 2 * self.pad) ** 2   # keep the Nyquist sphere of the original box only
        rows = torch.empty((n, m, h), dtype=cdt, device=dev)   # after the z transform: kept z rows, all y
        for ys in blocks:
            block = acc(slice(None), ys)
            data = torch.complex(block[..., 0], block[..., 1])
            del block
            data[:, :, 0] = plane[:, ys]
            spectrum = data / (weights(ys) + lam)
            del data
            inside = (k[:, None, None] ** 2 + k[ys][None, :, None] ** 2 + kx[None, None, :] ** 2) <= nyquist2
            spectrum = spectrum * inside
            rows[:, ys] = torch.fft.ifft(spectrum, dim=0)[keep] * sign[:, None, None]
            del spectrum, inside
        vol = torch.empty((n, n, n), dtype=rdt, device=dev)
        per_z = max(1, self.BLOCK_BYTES // (m * h * torch.empty((), dtype=cdt).element_size()))
        for z0 in range(0, n, per_z):
            zs = slice(z0, min(n, z0 + per_z))
            cols = torch.fft.ifft(rows[zs], dim=1)[:, keep] * sign[None, :, None]
            vol[zs] = torch.fft.irfft(cols, n=m, dim=2)[:, :, keep]
        del rows
        vol /= trilinear_apodization(n, m, dtype=rdt, device=dev)
        vol = vol.cpu().numpy().astype(np.float32)
        return mask_outside_sphere(vol) if mask_corners else vol
