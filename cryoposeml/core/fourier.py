"""Fourier-space layout shared by the projector, the reconstructor, the CTF and the metrics.

*Centred layout*: an ``N``-pixel axis has its real-space origin at index ``N // 2`` (Relion's
centre) and its zero frequency at index ``N // 2``; frequency index ``i - N // 2`` means
``(i - N // 2) / (N * pixel_size)`` cycles per Angstrom. Arrays are ``(y, x)`` and ``(z, y, x)``.
"""
from __future__ import annotations

import torch

__all__ = ["fft2_centered", "ifft2_centered", "fftn_centered", "ifftn_centered", "frequency_index_2d",
           "frequency_grid_2d",
           "shift_phase_2d", "trilinear_apodization"]


def fft2_centered(images: torch.Tensor) -> torch.Tensor:
    """``(..., N, N)`` real-space images -> centred 2D Fourier transforms."""
    return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(images, dim=(-2, -1))), dim=(-2, -1))


def ifft2_centered(spectra: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft2_centered` (complex result; take ``.real`` for real images)."""
    return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(spectra, dim=(-2, -1))), dim=(-2, -1))


def fftn_centered(volume: torch.Tensor) -> torch.Tensor:
    """``(N, N, N)`` real-space volume -> centred 3D Fourier transform."""
    return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(volume)))


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


def shift_phase_2d(shifts_px: torch.Tensor, box: int) -> torch.Tensor:
    """Phase ramps ``(B, box, box)`` that translate images by ``+shifts_px`` ``(B, 2)`` (x, y).

    Multiplying a centred spectrum by it moves the real-space content towards +x, +y.
    """
    kx, ky = frequency_index_2d(box, shifts_px.dtype, shifts_px.device)
    arg = kx * shifts_px[:, 0, None, None] + ky * shifts_px[:, 1, None, None]
    return torch.polar(torch.ones_like(arg), -2 * torch.pi * arg / box)


def trilinear_apodization(box: int, padded_box: int, dtype=torch.float64, device=None) -> torch.Tensor:
    """Real-space attenuation ``(box,)*3`` caused by trilinear interpolation on a padded grid.

    ``sinc^2(x / padded_box)`` per axis, ``x`` measured from the centre voxel; dividing by it is the
    gridding correction.
    """
    x = (torch.arange(box, dtype=dtype, device=device) - box // 2) / padded_box
    s = torch.sinc(x) ** 2
    return s[:, None, None] * s[None, :, None] * s[None, None, :]
