"""Fourier-space layout shared by the projector, the reconstructor, the CTF and the metrics.

*Centred layout*: an ``N``-pixel axis has its real-space origin at index ``N // 2`` (Relion's
centre) and its zero frequency at index ``N // 2``; frequency index ``i - N // 2`` means
``(i - N // 2) / (N * pixel_size)`` cycles per Angstrom. Arrays are ``(y, x)`` and ``(z, y, x)``.
"""
from __future__ import annotations

import torch

__all__ = ["fft2_centered", "ifft2_centered", "fftn_centered", "ifftn_centered", "padded_spectrum_centre",
           "frequency_index_2d",
           "frequency_grid_2d",
           "shift_phase_2d", "trilinear_apodization", "lowpass_volume", "resample_volume"]


def fft2_centered(images: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` real-space images -> centred 2D Fourier transforms."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=(-2, -1))), dim=(-2, -1))


def ifft2_centered(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_centered` (complex result; take ``.real`` for real images)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))), dim=(-2, -1))


def fftn_centered(volume: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` real-space volume -> centred 3D Fourier transform."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume)))


def padded_spectrum_centre(volume: torch.Tensor, padded_box: int, half: int) -> torch.Tensor:
    """The central ``(2 half + 1)^3`` voxels of :func:`fftn_centered` of ``volume`` ``(N, N, N)``
    zero-padded (centred) to ``padded_box``, without the whole padded transform: one axis at a time,
    each padded, transformed and cropped before the next (the 3D transform is separable, so this is
    exact). At a 256 px box padded twice, a few hundred MB instead of the 1 GB complex grid and its
    shifted copies."""
    n, m = volume.shape[0], padded_box
    lo, c = m // 2 - n // 2, m // 2
    x = volume
    for dim in range(3):
        shape = list(x.shape)
        shape[dim] = m
        p = x.new_zeros(shape)
        p.narrow(dim, lo, n).copy_(x)
        f = torch.fft.fftshift(torch.fft.fft(torch.fft.ifftshift(p, dim=dim), dim=dim), dim=dim)
        del p
        x = f.narrow(dim, c - half, 2 * half + 1).contiguous()
        del f
    return x


def ifftn_centered(spectrum: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fftn_centered`."""
    return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(spectrum)))


def frequency_index_2d(box: int, dtype=torch.float32, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer frequency indices ``(kx, ky)``, each ``(box, box)``, in the centred layout."""
    k = torch.arange(box, dtype=dtype, device=device) - box // 2
    ky, kx = torch.meshgrid(k, k, indexing="ij")
    return kx, ky


def frequency_grid_2d(box: int, pixel_size_angstrom: float, dtype=torch.float32, device=None):
    """Spatial frequencies ``(kx, ky)`` in 1/Angstrom, each ``(box, box)``, centred layout."""
    kx, ky = frequency_index_2d(box, dtype, device)
    scale = 1.0 / (box * pixel_size_angstrom)
    return kx * scale, ky * scale


def shift_phase_2d(shifts_px: torch.Tensor, box: int, dtype=None) -> torch.Tensor:
    """Phase ramps ``(B, box, box)`` that translate images by ``+shifts_px`` ``(B, 2)`` (x, y).

    Multiplying a centred spectrum by it moves the real-space content towards +x, +y. ``dtype``:
    the real precision of the phases (default the shifts'); the turns are computed in the shifts'
    precision and reduced to [0, 1) first, so float32 phases lose nothing to large turns.
    """
    kx, ky = frequency_index_2d(box, shifts_px.dtype, shifts_px.device)
    arg = kx * shifts_px[:, 0, None, None] + ky * shifts_px[:, 1, None, None]
    if dtype is None or dtype == arg.dtype:
        return torch.polar(torch.ones_like(arg), -2 * torch.pi * arg / box)
    turns = arg / box
    turns = (turns - torch.floor(turns)).to(dtype)
    return torch.polar(torch.ones_like(turns), -2 * torch.pi * turns)


def trilinear_apodization(box: int, padded_box: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Real-space attenuation ``(box,)*3`` caused by trilinear interpolation on a padded grid.

    ``sinc^2(x / padded_box)`` per axis, ``x`` measured from the centre voxel; dividing by it is the
    gridding correction.
    """
    x = (torch.arange(box, dtype=dtype, device=device) - box // 2) / padded_box
    s = torch.sinc(x) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]


def lowpass_volume(volume, pixel_size_angstrom: float, resolution_angstrom: float, edge_shells: float = 2.0):
    """Low-pass a ``(N, N, N)`` volume (numpy or torch) at ``resolution_angstrom`` with a raised-cosine
    edge ``edge_shells`` Fourier shells wide (as Relion's ``--ini_high``). Returns the same type."""
    import numpy as np

    is_np = isinstance(volume, np.ndarray)
    v = torch.as_tensor(volume, dtype=torch.float64)
    n = v.shape[0]
    k = torch.arange(n, dtype=torch.float64) - n // 2
    r = torch.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    cutoff = n * pixel_size_angstrom / resolution_angstrom
    x = ((r - cutoff) / edge_shells + 0.5).clamp(0.0, 1.0)
    filt = 0.5 * (1.0 + torch.cos(torch.pi * x))
    out = ifftn_centered(fftn_centered(v) * filt).real.to(torch.float32)
    return out.numpy() if is_np else out


def resample_volume(volume, box: int):
    """A ``(N, N, N)`` volume (numpy or torch) resampled to ``(box,)*3`` over the same field of view:
    its centred spectrum cropped (``box < N``: a low-pass at the new Nyquist) or zero-padded
    (``box > N``), real-space intensities kept. The pixel size becomes ``pixel * N / box``.
    Returns the same type (float32 for numpy)."""
    import numpy as np

    is_np = isinstance(volume, np.ndarray)
    v = torch.as_tensor(volume, dtype=torch.float64)
    n = v.shape[0]
    if box % 2 or n % 2:
        raise ValueError(f"resampling needs even boxes (got {n} -> {box})")
    if box == n:
        return volume
    spec = fftn_centered(v)
    out = torch.zeros((box,) * 3, dtype=spec.dtype)
    m = min(n, box)
    so, sn = box // 2 - m // 2, n // 2 - m // 2
    out[so:so + m, so:so + m, so:so + m] = spec[sn:sn + m, sn:sn + m, sn:sn + m]
    res = ifftn_centered(out).real * (box / n) ** 3
    return res.numpy().astype(np.float32) if is_np else res.to(torch.as_tensor(volume).dtype)
