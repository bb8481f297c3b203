"""Simulated particle datasets with known poses: the forward model of :mod:`cryoposeml.core`.

image = shift(-origin) * CTF * central slice of the map at pose A, plus white Gaussian noise at
``snr = var(signal) / var(noise)`` (signal variance: the mean over the first 1024 clean particle
images).
Junk particles are pure noise or projections of another map (scaled to the same signal variance).
Several maps (``map`` a list: conformational states, same box and pixel size) give a
heterogeneous set: each particle images one state, drawn with ``state_weights`` (default equal).

Writes ``particles.star`` (images, CTF, optics, rlnRandomSubset, no poses: what extraction gives),
``ground_truth.star`` (the same plus the true poses and ``rlnCpmlJunk``: 0 particle, 1 pure noise,
2 another map) and ``rlnCpmlState`` (the 1-based index of the particle's map; 0 for junk),
``Particles/stack_NNNN.mrcs`` and ``simulation.json``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ..core.ctf import CtfParams, ctf_2d
from ..core.fourier import resample_volume
from ..core.errors import InputError
from ..core.projection import Projector
from ..core.rotations import matrix_to_euler, random_rotations
from ..core.symmetry import symmetry_group
from ..data.bundled import resolve_map
from ..data.mrc import read_map, write_stack
from ..data.preprocess import phase_flip
from ..data.star import ParticleStar, read_star, write_star
from ..options import option
from ._outputs import stamp, staged_dir, write_json

__all__ = ["SimulationConfig", "simulate"]

JUNK_NONE, JUNK_NOISE, JUNK_OTHER_MAP = 0, 1, 2


@dataclass
class SimulationConfig:
    map: str | tuple = "adk_open"         # path or bundled map name; several: one per state (the CLI's --map)
    state_weights: tuple | None = None    # with several maps: their shares (default equal)
    n: int = option(1000, "number of particles")
    snr: float | None = option(0.1, "signal-to-noise ratio, var(signal)/var(noise); 0 for noise-free")   # None: noise-free
    ctf: bool = option(True, "apply a CTF")
    sym: str = option("C1", "the map's point group, recorded")
    shift_sigma_angstrom: float = option(0.0, "per-axis standard deviation of the origin shifts, Angstrom",
                                         flag="--shift-sigma")
    junk_fraction: float = option(0.0, "fraction of junk particles")
    junk_map: str = option("other_ptp1b", "map for 'other protein' junk")
    junk_noise_share: float = option(0.5, "share of the junk that is pure noise; the rest images the junk map")
    poses: str | None = option(None, "STAR file whose poses (and shifts) to use", none_means="uniform random poses")
    defocus_min_angstrom: float = 10000.0   # the CLI's --defocus-range MIN MAX
    defocus_max_angstrom: float = 25000.0
    astigmatism_sd_angstrom: float = option(200.0, "standard deviation of the astigmatism, Angstrom",
                                            flag="--astigmatism-sd")
    voltage_kv: float = option(300.0, "kV", flag="--voltage")
    cs_mm: float = option(2.7, "spherical aberration, mm", flag="--cs")
    amplitude_contrast: float = option(0.1)
    phase_flipped: bool = option(False, "write phase-flipped images (rlnCtfDataArePhaseFlipped 1 in the optics block)")
    stack_size: int = option(1000, "images per .mrcs")
    box_px: int | None = option(None, "box of the particles: the maps Fourier-cropped or padded to it (same field of "
                                "view, pixel size scaled)", none_means="the map's box")
    seed: int = option(0, "random seed")
    batch_size: int = 256


def _projector(path, what: str, box_px: int | None = None) -> tuple[Projector, float, int]:
    """The map at ``path`` ready to project: ``(projector, pixel size, box)``, Fourier-resampled to
    ``box_px`` (same field of view) when given. Its own box and pixel size are checked by the caller."""
    vol, apix = read_map(path)
    if vol.shape[0] % 2:
        raise InputError(f"odd box size {vol.shape[0]} px in the {what}: an even box is needed", path)
    if not np.isfinite(vol).all():
        raise InputError(f"the {what} contains NaN or infinite values", path)
    if box_px is not None and box_px != vol.shape[0]:
        apix = apix * vol.shape[0] / box_px
        vol = resample_volume(vol, box_px)
    return Projector(vol), apix, vol.shape[0]


def _given_poses(path) -> tuple[np.ndarray, np.ndarray | None]:
    star = read_star(path)
    return star.matrices(), (star.shifts_angstrom() if "rlnOriginXAngst" in star.particles else None)


def simulate(cfg: SimulationConfig, out, overwrite: bool = False, progress: bool = True) -> Path:
    """Simulate a dataset into the folder ``out`` (created atomically). Returns ``out``."""
    if cfg.snr is not None and not cfg.snr > 0:
        raise InputError(f"--snr must be positive (got {cfg.snr}); omit it for noise-free images")
    if not 0 <= cfg.junk_fraction < 1:
        raise InputError(f"--junk-fraction must be in [0, 1) (got {cfg.junk_fraction})")
    symmetry_group(cfg.sym)  # validates the name
    map_paths = [resolve_map(m) for m in ([cfg.map] if isinstance(cfg.map, (str, Path)) else cfg.map)]
    if not map_paths:
        raise InputError("no map given")
    if cfg.box_px is not None and (cfg.box_px < 16 or cfg.box_px % 2):
        raise InputError(f"--box-px must be even and at least 16 (got {cfg.box_px})")
    loaded = [_projector(path, "map" if len(map_paths) == 1 else f"map of state {k + 1}", cfg.box_px)
              for k, path in enumerate(map_paths)]
    projs = [p for p, _, _ in loaded]
    _, apix, box = loaded[0]
    for k, (path, (_, apix_k, box_k)) in enumerate(zip(map_paths, loaded)):
        if box_k != box or abs(apix_k - apix) > 1e-3:
            raise InputError(f"the map of state {k + 1} is {box_k} px at {apix_k:.3f} A/px but the first map is "
                             f"{box} px at {apix:.3f} A/px", path)
    weights = np.ones(len(projs)) if cfg.state_weights is None else np.asarray(cfg.state_weights, dtype=float)
    if len(weights) != len(projs) or not (weights >= 0).all() or not weights.sum() > 0:
        raise InputError(f"--state-weights must be {len(projs)} non-negative numbers, not all 0 "
                         f"(got {list(cfg.state_weights)})")
    rng = np.random.default_rng(cfg.seed)

    if cfg.poses:
        A, origins = _given_poses(cfg.poses)
        n = len(A)
    else:
        n = cfg.n
        if n < 1:
            raise InputError(f"--n must be at least 1 (got {n})")
        A, origins = random_rotations(n, rng), None
    if origins is None:
        origins = rng.normal(0.0, cfg.shift_sigma_angstrom, (n, 2)) if cfg.shift_sigma_angstrom > 0 else np.zeros((n, 2))

    junk = np.zeros(n, np.int64)
    n_junk = int(round(cfg.junk_fraction * n))
    if n_junk:
        which = rng.choice(n, n_junk, replace=False)
        n_noise = int(round(cfg.junk_noise_share * n_junk))
        junk[which[:n_noise]] = JUNK_NOISE
        junk[which[n_noise:]] = JUNK_OTHER_MAP
    # 1-based state per particle (0: junk); drawn after the junk so one-map sets keep their numbers
    state = np.where(junk == JUNK_NONE, 1, 0)
    if len(projs) > 1:
        state = np.where(junk == JUNK_NONE, rng.choice(len(projs), n, p=weights / weights.sum()) + 1, 0)
    junk_proj = None
    if (junk == JUNK_OTHER_MAP).any():
        jpath = resolve_map(cfg.junk_map)
        junk_proj, japix, jbox = _projector(jpath, "junk map", cfg.box_px)
        if jbox != box or abs(japix - apix) > 1e-3:
            raise InputError(f"the junk map is {jbox} px at {japix:.3f} A/px but the map is {box} px at "
                             f"{apix:.3f} A/px", jpath)

    defocus = rng.uniform(cfg.defocus_min_angstrom, cfg.defocus_max_angstrom, n)
    astig = np.abs(rng.normal(0.0, cfg.astigmatism_sd_angstrom, n))
    ctf = CtfParams(defocus + astig / 2, defocus - astig / 2, rng.uniform(0, 180, n),
                    cfg.voltage_kv, cfg.cs_mm, cfg.amplitude_contrast)
    subset = np.where(rng.permutation(n) < n / 2, 1, 2)

    def render(sl: slice) -> np.ndarray:
        """Clean images of particles ``sl`` (other-map junk unscaled, noise junk zero)."""
        c = ctf_2d(ctf.subset(sl), box, apix) if cfg.ctf else None
        A_t = torch.as_tensor(A[sl], dtype=torch.float32)
        o_t = torch.as_tensor(origins[sl] / apix, dtype=torch.float32)
        img = np.zeros((len(A_t), box, box), np.float32)
        for k, proj in enumerate(projs):
            mine = state[sl] == k + 1
            if mine.any():
                img[mine] = proj.project(A_t[mine], o_t[mine], None if c is None else c[mine]).numpy()
        other = junk[sl] == JUNK_OTHER_MAP
        if other.any():
            img[other] = junk_proj.project(A_t[other], o_t[other], None if c is None else c[other]).numpy()
        img[junk[sl] == JUNK_NOISE] = 0.0
        return img

    # The signal variance (for the SNR and to scale other-map junk) comes from a pilot of up to
    # 1024 particles, so the images can then be streamed to disk one stack at a time.
    pilot = np.concatenate([render(slice(b, min(n, 1024, b + cfg.batch_size)))
                            for b in range(0, min(n, 1024), cfg.batch_size)])
    pj = junk[:len(pilot)]
    signal_var = float(pilot[pj == JUNK_NONE].var(axis=(1, 2)).mean()) if (pj == JUNK_NONE).any() \
        else float(pilot.var(axis=(1, 2)).mean())
    other_scale = 1.0
    if junk_proj is not None:
        k = min(256, cfg.batch_size)
        probe = junk_proj.project(torch.as_tensor(A[:k], dtype=torch.float32), None,
                                  ctf_2d(ctf.subset(slice(0, k)), box, apix) if cfg.ctf else None).numpy()
        other_scale = float(np.sqrt(signal_var / probe.var(axis=(1, 2)).mean()))
    noise_sd = float(np.sqrt(signal_var / cfg.snr)) if cfg.snr else 0.0
    good = junk == JUNK_NONE

    optics = pd.DataFrame({
        "rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"], "rlnMicrographOriginalPixelSize": [apix],
        "rlnVoltage": [cfg.voltage_kv], "rlnSphericalAberration": [cfg.cs_mm],
        "rlnAmplitudeContrast": [cfg.amplitude_contrast], "rlnImagePixelSize": [apix], "rlnImageSize": [box],
        "rlnImageDimensionality": [2],
        **({"rlnCtfDataArePhaseFlipped": [1]} if cfg.phase_flipped and cfg.ctf else {}),
    })
    names = [f"{i % cfg.stack_size + 1:06d}@Particles/stack_{i // cfg.stack_size + 1:04d}.mrcs" for i in range(n)]
    base = pd.DataFrame({
        "rlnImageName": names,
        "rlnMicrographName": [f"Micrographs/sim_{i // cfg.stack_size + 1:04d}.mrc" for i in range(n)],
        "rlnDefocusU": ctf.defocus_u_angstrom, "rlnDefocusV": ctf.defocus_v_angstrom,
        "rlnDefocusAngle": ctf.defocus_angle_deg, "rlnCtfBfactor": 0.0, "rlnPhaseShift": 0.0,
        "rlnOpticsGroup": 1, "rlnRandomSubset": subset,
    })
    angles = matrix_to_euler(A)
    truth = base.assign(rlnAngleRot=angles[:, 0], rlnAngleTilt=angles[:, 1], rlnAnglePsi=angles[:, 2],
                        rlnOriginXAngst=origins[:, 0], rlnOriginYAngst=origins[:, 1], rlnCpmlJunk=junk,
                        rlnCpmlState=state)

    with staged_dir(out, overwrite) as tmp:
        (tmp / "Particles").mkdir()
        bar = tqdm(total=n, desc="simulate", unit="img", disable=not progress)
        for k, start in enumerate(range(0, n, cfg.stack_size)):
            stop = min(n, start + cfg.stack_size)
            stack = np.empty((stop - start, box, box), np.float32)
            for b in range(start, stop, cfg.batch_size):
                sl = slice(b, min(stop, b + cfg.batch_size))
                img = render(sl)
                img[junk[sl] == JUNK_OTHER_MAP] *= other_scale
                if noise_sd:
                    img += rng.normal(0.0, noise_sd, img.shape).astype(np.float32)
                if cfg.phase_flipped and cfg.ctf:   # as extraction with phase flipping does: noise included
                    img = phase_flip(img, ctf_2d(ctf.subset(sl), box, apix, dtype=torch.float64).numpy())
                stack[b - start:sl.stop - start] = img
                bar.update(sl.stop - sl.start)
            write_stack(tmp / "Particles" / f"stack_{k + 1:04d}.mrcs", stack, apix)
        bar.close()
        write_star(ParticleStar(base, optics), tmp / "particles.star")
        write_star(ParticleStar(truth, optics.copy()), tmp / "ground_truth.star")
        write_json(tmp / "simulation.json", {
            **stamp(**asdict(cfg)), "map_path": str(map_paths[0]), "map_paths": [str(p) for p in map_paths],
            "pixel_size_angstrom": apix, "box": box,
            "signal_variance": signal_var, "noise_sd": noise_sd,
            "counts": {"particles": int(good.sum()), "junk_noise": int((junk == JUNK_NOISE).sum()),
                       "junk_other_map": int((junk == JUNK_OTHER_MAP).sum()),
                       "per_state": [int((state == k + 1).sum()) for k in range(len(projs))]},
        })
    return Path(out)
