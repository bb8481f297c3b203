"""Particle preprocessing: Fourier rescaling to a pixel size and box, background normalisation,
circular masking, CTF phase flipping. Pure array functions plus a :class:`Preprocessor` that
chains them for a :class:`~cryoposeml.data.dataset.ParticleDataset`."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..core.ctf import CtfParams, ctf_2d
from ..core.fourier import fft2_centered, ifft2_centered
from ..core.metrics import soft_circle_mask

__all__ = ["rescale", "normalize_background", "phase_flip", "Preprocessor"]


def _crop_or_pad_centered(a: torch.Tensor, size: int) -> torch.Tensor:
    n = a.shape[-1]
    if size == n:
        return a
    out = torch.zeros(*a.shape[:-2], size, size, dtype=a.dtype, device=a.device)
    m = min(n, size)
    so, sn = size // 2 - m // 2, n // 2 - m // 2
    out[..., so:so + m, so:so + m] = a[..., sn:sn + m, sn:sn + m]
    return out


def rescale(images: np.ndarray, pixel_in: float, pixel_out: float, box_out: int) -> np.ndarray:
    """Resample ``(B, N, N)`` images to ``pixel_out`` by Fourier cropping/padding, then crop or pad
    (centred) to ``box_out``. Intensities keep their real-space scale."""
    x = torch.as_tensor(images, dtype=torch.float64)
    n = x.shape[-1]
    n_f = int(round(n * pixel_in / pixel_out / 2)) * 2
    if n_f != n:
        spectra = _crop_or_pad_centered(fft2_centered(x), n_f)
        x = ifft2_centered(spectra).real * (n_f / n) ** 2
    return _crop_or_pad_centered(x, box_out).numpy().astype(np.float32)


def normalize_background(images: np.ndarray, radius_px: float | None = None) -> np.ndarray:
    """Mean 0 and standard deviation 1 outside a circle of ``radius_px`` (default: box / 2 - 2)."""
    box = images.shape[-1]
    radius = box / 2 - 2 if radius_px is None else radius_px
    k = np.arange(box) - box // 2
    outside = (k[:, None] ** 2 + k[None, :] ** 2) > radius**2
    bg = images[:, outside]
    mean = bg.mean(1)[:, None, None]
    std = bg.std(1)[:, None, None]
    return ((images - mean) / np.where(std > 0, std, 1)).astype(np.float32)


def phase_flip(images: np.ndarray, ctf: np.ndarray) -> np.ndarray:
    """Multiply each image's spectrum by the sign of its CTF ``(B, N, N)`` (centred layout)."""
    spectra = fft2_centered(torch.as_tensor(images, dtype=torch.float64))
    flipped = spectra * torch.sign(torch.as_tensor(ctf, dtype=torch.float64))
    return ifft2_centered(flipped).real.numpy().astype(np.float32)


@dataclass
class Preprocessor:
    """Phase flip (at the input pixel size) -> rescale -> normalise background -> soft mask.

    Call with ``(images, indices)``; ``ctf`` holds the CTFs of all particles (``indices`` into it).
    """

    pixel_in: float
    pixel_out: float
    box_out: int
    ctf: CtfParams | None = None
    do_phase_flip: bool = True
    mask_radius_px: float | None = None

    def __call__(self, images: np.ndarray, indices: np.ndarray) -> np.ndarray:
        if self.do_phase_flip and self.ctf is not None:
            c = ctf_2d(self.ctf.subset(indices), images.shape[-1], self.pixel_in, dtype=torch.float64).numpy()
            images = phase_flip(images, c)
        images = rescale(images, self.pixel_in, self.pixel_out, self.box_out)
        radius = self.mask_radius_px if self.mask_radius_px is not None else self.box_out / 2 - 4
        images = normalize_background(images, radius)
        return images * soft_circle_mask(self.box_out, radius, 3.0)
