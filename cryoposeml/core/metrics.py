"""Map and pose metrics: FSC, resolution at a threshold, real-space PCC, soft masks, angular errors."""
from __future__ import annotations

import numpy as np

from .symmetry import symmetric_distance_deg

__all__ = ["fsc", "resolution_at", "pcc", "soft_sphere_mask", "soft_circle_mask", "mask_outside_sphere",
           "angular_error_stats", "align_poses_globally", "particle_radius_px"]


def _shell_index(box: int) -> np.ndarray:
    """Radius (rounded) of every voxel of an ``rfftn`` of a ``(box,)*3`` map."""
    kz = np.fft.fftfreq(box) * box
    kx = np.fft.rfftfreq(box) * box
    r = np.sqrt(kz[:, None, None] ** 2 + kz[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return np.round(r).astype(np.int64)


def fsc(map1: np.ndarray, map2: np.ndarray, pixel_size_angstrom: float = 1.0,
        mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation of two cubic maps.

    Returns ``(frequency, fsc)``, both ``(box // 2 + 1,)``: shell ``i`` is at ``i / (box * pixel)``
    1/Angstrom. Shells are one voxel thick, centred on integer radii.
    """
    map1, map2 = np.asarray(map1, np.float64), np.asarray(map2, np.float64)
    if map1.shape != map2.shape or map1.ndim != 3:
        raise ValueError(f"FSC needs two maps of the same cubic shape, got {map1.shape} and {map2.shape}")
    if mask is not None:
        map1, map2 = map1 * mask, map2 * mask
    box = map1.shape[0]
    f1, f2 = np.fft.rfftn(map1), np.fft.rfftn(map2)
    shell = _shell_index(box).ravel()
    nshell = box // 2 + 1
    keep = shell < nshell
    shell = shell[keep]
    num = np.bincount(shell, (f1 * f2.conj()).real.ravel()[keep], nshell)
    d1 = np.bincount(shell, (np.abs(f1) ** 2).ravel()[keep], nshell)
    d2 = np.bincount(shell, (np.abs(f2) ** 2).ravel()[keep], nshell)
    with np.errstate(invalid="ignore", divide="ignore"):
        curve = np.where((d1 > 0) & (d2 > 0), num / np.sqrt(d1 * d2), 0.0)
    freq = np.arange(nshell) / (box * pixel_size_angstrom)
    return freq, curve


def resolution_at(frequency: np.ndarray, curve: np.ndarray, threshold: float = 0.143) -> float:
    """Resolution (Angstrom) where the FSC first drops below ``threshold`` (linear interpolation
    between shells). If it never does, the Nyquist resolution; the DC shell is skipped."""
    below = np.nonzero(curve[1:] < threshold)[0]
    if len(below) == 0:
        return float(1.0 / frequency[-1])
    i = below[0] + 1
    if i == 1:
        return float(1.0 / frequency[1])
    f0, f1, c0, c1 = frequency[i - 1], frequency[i], curve[i - 1], curve[i]
    f = f0 + (c0 - threshold) / (c0 - c1) * (f1 - f0)
    return float(1.0 / f)


def pcc(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson correlation of two arrays (inside ``mask``, a boolean or weight array, if given)."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    w = np.ones_like(a) if mask is None else np.asarray(mask, np.float64).ravel()
    a = a - np.average(a, weights=w)
    b = b - np.average(b, weights=w)
    return float(np.sum(w * a * b) / np.sqrt(np.sum(w * a * a) * np.sum(w * b * b)))


def _soft_edge(r: np.ndarray, radius: float, width: float) -> np.ndarray:
    if width <= 0:
        return (r <= radius).astype(np.float32)
    t = np.clip((r - radius) / width, 0.0, 1.0).astype(np.float32, copy=False)
    return (0.5 + 0.5 * np.cos(np.float32(np.pi) * t)).astype(np.float32, copy=False)


def particle_radius_px(volume: np.ndarray, pixel_size_angstrom: float, lowpass_angstrom: float = 15.0,
                       fraction: float = 0.1) -> float:
    """The radius (px, about the centre voxel) that holds a map's particle: the farthest voxel of
    the map low-passed to ``lowpass_angstrom`` whose density (above the median of the box's
    corners) exceeds ``fraction`` of the peak; at least a quarter of the box, at most its half
    less 4 px (room for a soft edge)."""
    from .fourier import lowpass_volume

    n = volume.shape[0]
    lp = lowpass_volume(np.asarray(volume, np.float32), pixel_size_angstrom, max(lowpass_angstrom,
                                                                                 2.5 * pixel_size_angstrom))
    k = np.arange(n) - n // 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    lp = lp - np.median(lp[r > n // 2 - 1])
    above = lp > fraction * lp.max()
    radius = float(r[above].max()) if above.any() else n / 2 - 4
    return float(np.clip(radius, n / 4, n / 2 - 4))


def soft_sphere_mask(box: int, radius_px: float | None = None, width_px: float = 3.0) -> np.ndarray:
    """Spherical mask ``(box,)*3`` about ``box // 2``: 1 inside ``radius_px``, raised-cosine edge of
    ``width_px`` beyond it (default radius: ``box / 2 - width_px``)."""
    radius = box / 2 - width_px if radius_px is None else radius_px
    k = np.arange(box) - box // 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    return _soft_edge(r, radius, width_px)


def soft_circle_mask(box: int, radius_px: float | None = None, width_px: float = 3.0) -> np.ndarray:
    """The 2D ``(box, box)`` counterpart of :func:`soft_sphere_mask`."""
    radius = box / 2 - width_px if radius_px is None else radius_px
    k = np.arange(box) - box // 2
    r = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return _soft_edge(r, radius, width_px)


def mask_outside_sphere(volume: np.ndarray, radius_px: float | None = None, width_px: float = 3.0) -> np.ndarray:
    """Relion's ``softMaskOutsideMap``: beyond ``radius_px`` (default ``box / 2``, the inscribed
    sphere) blend to the mean value found there over a raised-cosine edge of ``width_px``, so the
    box corners carry no noise or aliasing. Relion applies it to every reconstruction."""
    box = volume.shape[0]
    radius = box / 2 if radius_px is None else radius_px
    k = (np.arange(box) - box // 2).astype(np.float32)   # float32 throughout: a 256^3 map stays small
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    outside = r > radius
    background = float(volume[outside].mean(dtype=np.float64)) if outside.any() else 0.0
    keep = _soft_edge(r, radius, width_px)
    del r, outside
    out = volume.astype(np.result_type(volume.dtype, np.float32), copy=True)
    out -= background          # background + keep * (volume - background), in place
    out *= keep
    out += background
    return out.astype(volume.dtype, copy=False)


def angular_error_stats(pred: np.ndarray, true: np.ndarray, sym: str = "C1",
                        weights: np.ndarray | None = None) -> dict:
    """Symmetry-aware angular errors between predicted and true matrices ``(B, 3, 3)``.

    Returns per-particle ``errors_deg`` and MAnE (mean), median, confidence-weighted MAnE (when
    ``weights`` are given), and the percentages under 5 and 10 degrees.
    """
    err = np.asarray(symmetric_distance_deg(np.asarray(pred), np.asarray(true), sym))
    out = {
        "errors_deg": err,
        "mean_deg": float(err.mean()),
        "median_deg": float(np.median(err)),
        "pct_under_5deg": float(100 * np.mean(err < 5)),
        "pct_under_10deg": float(100 * np.mean(err < 10)),
    }
    if weights is not None:
        w = np.asarray(weights, np.float64)
        out["weighted_mean_deg"] = float(np.sum(w * err) / np.sum(w)) if w.sum() > 0 else float("nan")
    return out


#: ``N`` and ``M`` of the mirrored solution: a map mirrored in z projects at pose ``A`` as the
#: original map at ``N @ A @ M`` (both diag(1, 1, -1); see :func:`align_poses_globally`).
_MIRROR = np.diag([1.0, 1.0, -1.0])


def align_poses_globally(pred: np.ndarray, true: np.ndarray, allow_mirror: bool = True) -> dict:
    """Poses from ab initio reconstruction live in the frame (and maybe the hand) of their own map:
    ``pred_i ~ true_i @ Q.T``, or ``N @ true_i @ Q.T @ M`` for the mirrored map. Finds the rotation
    ``Q`` (orthogonal Procrustes) and the hand that bring them closest to ``true`` and reports
    seed 004's pose error ``||pred_i' - true_i||_F^2`` (0 = exact, 8 = opposite): its mean (MSE)
    and median (MedSE), and the geodesic errors in degrees. ``aligned`` are the poses in the true
    frame (a map reconstructed from them overlays the true map, with the right hand)."""
    pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
    best = None
    for mirrored in ((False, True) if allow_mirror else (False,)):
        P = _MIRROR @ pred @ _MIRROR if mirrored else pred
        u, _, vt = np.linalg.svd(np.einsum("bji,bjk->ik", P, true))     # sum_i P_i^T T_i
        d = np.sign(np.linalg.det(u @ vt))
        Q = u @ np.diag([1.0, 1.0, d]) @ vt
        aligned = P @ Q
        se = ((aligned - true) ** 2).sum((-2, -1))
        if best is None or se.mean() < best["mse"]:
            best = {"mse": float(se.mean()), "medse": float(np.median(se)), "mirrored": mirrored,
                    "rotation": Q, "aligned": aligned, "squared_errors": se}
    cos = np.clip((np.einsum("bij,bij->b", best["aligned"], true) - 1) / 2, -1, 1)
    best["errors_deg"] = np.degrees(np.arccos(cos))
    best["median_deg"] = float(np.median(best["errors_deg"]))
    return best
