"""Reconstruct a map (and half-maps) from a particle STAR file with poses."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..core.ctf import ctf_2d
from ..core.errors import InputError
from ..core.metrics import fsc, resolution_at, soft_sphere_mask
from ..core.reconstruction import BackProjector
from ..data.dataset import ParticleDataset
from ..data.mrc import half_map_paths, write_map  # noqa: F401  (half_map_paths: re-exported)
from ..data.star import ParticleStar, read_star
from ._outputs import check_new_file, stamp, write_json

__all__ = ["ReconstructionResult", "reconstruct_star", "reconstruct", "half_map_paths", "half_set_labels",
           "insert_particles", "nested_half_reconstructions"]

log = logging.getLogger(__name__)


@dataclass
class ReconstructionResult:
    full: np.ndarray
    pixel_size_angstrom: float
    half1: np.ndarray | None = None
    half2: np.ndarray | None = None
    info: dict = field(default_factory=dict)

    def half_fsc(self, mask: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        return fsc(self.half1, self.half2, self.pixel_size_angstrom, mask)


def half_set_labels(star: ParticleStar) -> tuple[np.ndarray, bool]:
    """rlnRandomSubset (checked to be 1 or 2), or a fixed random split; the flag says which."""
    subset = star.random_subset()
    if subset is not None:
        bad = ~np.isin(subset, (1, 2))
        if bad.any():
            raise InputError(f"rlnRandomSubset must be 1 or 2 (row {int(np.nonzero(bad)[0][0]) + 1} has "
                             f"{subset[bad][0]})", star.path)
        return subset, False
    rng = np.random.default_rng(0)
    return np.where(rng.permutation(len(star)) < len(star) / 2, 1, 2), True


def _fom_weights(star: ParticleStar) -> np.ndarray:
    star.require(["rlnParticleFigureOfMerit"], "--fom-weighting")
    weights = star.particles["rlnParticleFigureOfMerit"].to_numpy(np.float64)
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise InputError("rlnParticleFigureOfMerit must be finite and >= 0", star.path)
    return weights


def insert_particles(star: ParticleStar, bps: dict, subset: np.ndarray, order: np.ndarray, weights, use_ctf: bool,
                     batch_size: int, bar=None) -> None:
    """Insert the particles ``order`` (in that order) into ``bps[subset[i]]``, updating the
    progress ``bar`` (if any)."""
    angles_A, origins = star.matrices(), star.shifts_px()
    ds = ParticleDataset(star)
    box, apix = star.box, star.pixel_size_angstrom
    ctf = star.ctf_params() if use_ctf else None
    # at large boxes fewer images at a time: the CTFs' float64 temporaries are (batch, box, box) each
    batch_size = max(8, min(batch_size, (1 << 22) // (box * box)))
    for idx, images in ds.batches(batch_size, order):
        c = ctf_2d(ctf.subset(idx), box, apix, dtype=torch.float64) if use_ctf else None
        for k, bp in bps.items():
            sel = subset[idx] == k
            if sel.any():
                bp.insert(images[sel], angles_A[idx[sel]], origins[idx[sel]],
                          None if c is None else c[sel], None if weights is None else weights[idx[sel]])
        if bar is not None:
            bar.update(len(idx))


def reconstruct_star(star: ParticleStar, sym: str = "C1", halves: bool = False, fom_weighting: bool = False,
                     use_ctf: bool = True, regularization: float = 1e-3, batch_size: int = 256,
                     progress: bool = True, device=None) -> ReconstructionResult:
    """Reconstruct the particles of ``star`` at their poses (CTF-corrected when it has CTFs)."""
    use_ctf = use_ctf and star.has_ctf()
    weights = _fom_weights(star) if fom_weighting else None
    subset, made_up = half_set_labels(star) if halves else (np.ones(len(star), np.int64), False)
    bps = {k: BackProjector(star.box, sym, device=device) for k in np.unique(subset)}
    with tqdm(total=len(star), desc="reconstruct", unit="img", disable=not progress) as bar:
        insert_particles(star, bps, subset, np.arange(len(star)), weights, use_ctf, batch_size, bar)
    apix = star.pixel_size_angstrom
    info = {"particles": len(star), "sym": sym, "ctf": use_ctf, "fom_weighting": fom_weighting,
            "regularization": regularization}
    if not halves:
        return ReconstructionResult(bps[1].reconstruct(regularization), apix, info=info)
    if len(bps) != 2:
        raise InputError("half-maps need particles in both rlnRandomSubset 1 and 2", star.path)
    half1, half2 = bps[1].reconstruct(regularization), bps[2].reconstruct(regularization)
    info.update(halves_assigned_randomly=made_up, half_counts=[bps[1].count, bps[2].count])
    full = bps[1].reconstruct(regularization, plus=bps[2])   # both halves' data, without a merged copy
    return ReconstructionResult(full, apix, half1, half2, info)


def nested_half_reconstructions(star: ParticleStar, order: np.ndarray, counts, sym: str = "C1",
                                use_ctf: bool = True, regularization: float = 1e-3, batch_size: int = 256,
                                progress: bool = True, device=None):
    """Half-maps of nested particle subsets in one pass over the images: for each ``n`` in
    ``counts`` (increasing), the first ``n`` particles of ``order``. Each half-set (rlnRandomSubset,
    or a fixed random split) keeps its own accumulator, so the halves stay independent.

    A generator: yields ``(result, full_map)`` per size, the :class:`ReconstructionResult` of the
    half-maps (``full`` is None) and a function that makes that subset's full map from both
    half-sets' data (called before the generator moves on: it reads the accumulators as they are),
    so only one pair of half-maps is held at a time and the full map only where it is wanted."""
    counts = sorted(int(c) for c in counts)
    if not counts or counts[0] < 1 or counts[-1] > len(order):
        raise ValueError(f"subset sizes must lie in 1..{len(order)}")
    use_ctf = use_ctf and star.has_ctf()
    subset, made_up = half_set_labels(star)
    bps = {k: BackProjector(star.box, sym, device=device) for k in (1, 2)}
    start = 0
    with tqdm(total=counts[-1], desc="reconstruct subsets", unit="img", disable=not progress) as bar:
        for n in counts:
            if n > start:
                insert_particles(star, bps, subset, order[start:n], None, use_ctf, batch_size, bar)
                start = n
            if min(bps[1].count, bps[2].count) == 0:
                raise InputError(f"the first {n} particles are all in one half-set; no half-map FSC", star.path)
            yield (ReconstructionResult(None, star.pixel_size_angstrom, bps[1].reconstruct(regularization),
                                        bps[2].reconstruct(regularization),
                                        {"particles": n, "half_counts": [bps[1].count, bps[2].count],
                                         "halves_assigned_randomly": made_up}),
                   lambda: bps[1].reconstruct(regularization, plus=bps[2]))


def reconstruct(particles, out, sym: str = "C1", halves: bool = False, fom_weighting: bool = False,
                use_ctf: bool = True, regularization: float = 1e-3, batch_size: int = 256,
                overwrite: bool = False, progress: bool = True, device=None) -> dict:
    """``cryoposeml reconstruct``: write the map (and half-maps + their FSC). Returns the summary."""
    out = Path(out)
    targets = [out, *half_map_paths(out)] if halves else [out]
    for t in targets:
        check_new_file(t, overwrite)
    star = read_star(particles)
    res = reconstruct_star(star, sym, halves, fom_weighting, use_ctf, regularization, batch_size, progress, device)
    summary = {**stamp(particles=particles, sym=sym, halves=halves, fom_weighting=fom_weighting,
                       regularization=regularization), **res.info}
    if halves:
        h1, h2, fsc_json = half_map_paths(out)
        mask = soft_sphere_mask(star.box)
        freq, curve = res.half_fsc(mask)
        summary.update(fsc_frequency_per_angstrom=freq, fsc_half_maps=curve,
                       resolution_fsc0143_angstrom=resolution_at(freq, curve, 0.143),
                       resolution_fsc05_angstrom=resolution_at(freq, curve, 0.5))
        write_map(h1, res.half1, res.pixel_size_angstrom)
        write_map(h2, res.half2, res.pixel_size_angstrom)
        write_json(fsc_json, summary)
    write_map(out, res.full, res.pixel_size_angstrom)
    return summary
