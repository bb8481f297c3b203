"""Reference-verified prediction: the network proposes, the map decides (semi-amortized inference).

For each particle (in batches, memory bounded):

1. **Proposals**: the network's top-K distinct poses (distribution families) or its pose
   (regression families), each with the map's pseudo-symmetric alternatives ``A @ g`` (rotations
   under which the reference nearly maps onto itself, :func:`~cryoposeml.core.matching.pseudo_symmetries`),
   at the network's shift.
2. **Neighbourhoods**: the ``neighbours`` library poses nearest each proposal, and the proposal
   itself, scored in the coarse band; the best (after step 3) is refined locally (a pattern search over
   rotation and sub-pixel origin, coarse band for the large steps, fine band for the small
   ones). The best basin more than ``basin_separation_deg`` away is refined too when it scores
   within ``alt_refine_sd`` noise SDs (a near-symmetric mate), and the better refined one wins.
3. **Escalation** (``auto``): a particle whose best proposal candidate's coarse score stands less
   than ``escalate_z`` noise standard deviations above its null mean (the match z) is searched
   exhaustively (the whole library of one asymmetric unit, two matrix products); its candidates
   are then its proposals' and the library's best together. The threshold comes from the
   calibration split: the match z under which ``escalate_right`` (20%) of the proposals that were
   right fall. Right and wrong proposals overlap at SNR 0.1 (measured on 1,000 C1 particles with a
   16-deg network: escalating 21% of particles gives 92% under 5 deg, 36% gives 96%, 61% gives the
   exhaustive search's 97%), so the share trades accuracy for time. Escalation is decided before the
   refinement, so every particle is refined once (on the CPU the refinement, not the library's
   matrix products, is what costs). The threshold is calibrated at training time from the match z
   of calibration particles whose proposals were right (within 5 degrees): its ``escalate_right``
   quantile, so by default 80% of right proposals are trusted. At SNR 0.1 a right and a wrong proposal differ by only a few
   noise SDs (measured: right 14, wrong 7.5 median), so a fixed threshold cannot be set a priori.
4. **Uncertainty**: a Laplace approximation of the posterior about the final pose
   (log-likelihood ``s^2`` at turns of 1 and 2 ``posterior_step_deg`` about each axis) gives the
   local spread; the competing basin's posterior weight ``p_alt`` the chance of a wrong basin;
   their combination is the raw expected error, calibrated on held-out particles. The match
   z-score (the final pose's coarse score against the particle's null distribution over 512
   fixed library poses) tells junk from particles.

``matching``: ``auto`` (1-3), ``proposals`` (1-2, never escalate), ``exhaustive`` (no network
proposals: every particle searched exhaustively, then 2 and 4), ``none`` (the network alone).

The reference: :class:`Reference` (the training particles' half-maps in the model folder, or a
user's map), each half masked around the particle and Wiener-filtered by the half-map FSC, with
working bands chosen from that FSC.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.ctf import ctf_2d
from ..core.errors import InputError
from ..core.fourier import fft2_centered, fftn_centered, ifftn_centered
from ..core.matching import SCORE_NOISE_SD, ReferenceMatcher, noise_power, pseudo_symmetries
from ..core.metrics import fsc, particle_radius_px, resolution_at, soft_sphere_mask
from ..core.symmetry import closest_mate_angle_deg, symmetry_group
from ..data.mrc import read_map, write_map
from ..options import option
from ._outputs import write_json

__all__ = ["MatchConfig", "Reference", "write_reference", "load_reference", "MATCHING_MODES", "verify_batch",
           "reference_dir"]

log = logging.getLogger(__name__)

MATCHING_MODES = ("auto", "proposals", "exhaustive", "none")


@dataclass
class MatchConfig:
    matching: str = "auto"
    order: int = 3                    # HEALPix order of the exhaustive library (36,864 rotations in C1)
    coarse_kmax_cap: int = 16         # coarse band: at most this many Fourier shells (a 32 px crop)
    fine_kmax_cap: int = 40           # fine band (local refinement): at most this many shells
    neighbours: int = 24              # library poses scored around each proposal
    top_k: int = 8                    # network proposals (distribution families)
    basin_separation_deg: float = 15.0
    escalate_z: float | None = option(None, "auto: search exhaustively the particles whose best proposal matches "
                                            "with a z-score below this (overrides --escalate-right)",
                                      none_means="from the model's calibration and --escalate-right")
    escalate_right: float = option(0.2, "auto: the share of right proposals (on the model's calibration particles) "
                                        "that are searched exhaustively too; the match-z threshold that gives it "
                                        "catches most wrong proposals. Higher: more accurate and slower")
    rescue_quantile: float = option(0.05, "auto: a particle whose proposal was trusted but whose refined pose "
                                          "matches worse than this share of the model's good calibration "
                                          "particles is searched exhaustively too (0: never)")
    rescue_z: float | None = None     # the match z of rescue_quantile (predict sets it from the model)
    refine_steps_deg: tuple = (3.75, 1.875, 0.94)   # then the posterior's parabolas place the peak
    refine_shift_steps_px: tuple = (1.0, 0.5, 0.25)
    fine_below_deg: float = 2.0       # refinement steps larger than this use the coarse band
    alt_refine_sd: float = 3.0        # refine the second basin too when it scores this close (noise SDs)
    pseudo_symmetry_threshold: float = 0.75
    mate_check: bool = True           # after refinement, refine the pose's near-symmetric mates too; best wins
    posterior_step_deg: float = 1.0   # turns of 1 and 2 steps about each axis fit the posterior's width

    def check(self) -> None:
        if self.matching not in MATCHING_MODES:
            raise InputError(f"--matching must be one of {', '.join(MATCHING_MODES)} (got {self.matching!r})")


def reference_dir(model_dir) -> Path:
    return Path(model_dir) / "reference"


def _filter(volume: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Multiply a map's spectrum by per-shell ``weights`` (shell = rounded radius)."""
    n = volume.shape[0]
    k = np.arange(n) - n // 2
    r = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2).round().astype(int)
    w = np.zeros(r.max() + 1)
    w[: len(weights)] = weights
    spec = fftn_centered(torch.as_tensor(volume, dtype=torch.float64)) * torch.as_tensor(w[r])
    return ifftn_centered(spec).real.numpy().astype(np.float32)


def filtered_halves(half1: np.ndarray, half2: np.ndarray, apix: float) -> dict:
    """What a half-map reference is matched as: each half masked by a soft sphere around the
    particle (radius from the maps, :func:`~cryoposeml.core.metrics.particle_radius_px`) and
    Wiener-filtered by the masked half-map FSC (a half-map's SNR per shell is ``FSC / (1 - FSC)``,
    so its Wiener filter is the FSC itself). Measured on 2,700 AdK particles at SNR 0.1: matched
    from the true poses, the median error is 2.32 deg against the unmasked map weighted by
    sqrt(2 FSC / (1 + FSC)), 1.71 deg masked (radius 20 px) and Wiener-filtered, 1.43 deg against
    the true map. Returns the filtered maps, the masked FSC and the mask radius."""
    radius = particle_radius_px((half1 + half2) / 2, apix)
    mask = soft_sphere_mask(half1.shape[0], radius, 3.0)
    freq, curve = fsc(half1, half2, apix, mask)
    w = np.clip(curve, 0.0, 1.0)
    return {"half1": _filter(half1 * mask, w), "half2": _filter(half2 * mask, w), "frequency": freq,
            "fsc": curve, "mask_radius_px": radius}


def write_reference(folder: Path, half1: np.ndarray, half2: np.ndarray, apix: float, sym: str, info: dict) -> dict:
    """Write the consensus reference: half-maps, their masked FSC, and each half's filtered map."""
    folder.mkdir(parents=True, exist_ok=True)
    f = filtered_halves(half1, half2, apix)
    write_map(folder / "half1.mrc", half1, apix)
    write_map(folder / "half2.mrc", half2, apix)
    write_map(folder / "half1_filtered.mrc", f["half1"], apix)
    write_map(folder / "half2_filtered.mrc", f["half2"], apix)
    freq, curve = f["frequency"], f["fsc"]
    pseudo, cc = find_pseudo_symmetries(f["half1"], sym)
    meta = {**info, "sym": sym.upper(), "box": int(half1.shape[0]), "pixel_size_angstrom": apix,
            "mask_radius_px": f["mask_radius_px"], "pseudo_symmetries": pseudo.tolist(),
            "pseudo_symmetry_correlations": cc.tolist(), "fsc_frequency_per_angstrom": freq, "fsc_half_maps": curve,
            "resolution_fsc0143_angstrom": resolution_at(freq, curve, 0.143),
            "resolution_fsc05_angstrom": resolution_at(freq, curve, 0.5)}
    write_json(folder / "reference.json", meta)
    return meta


def find_pseudo_symmetries(volume: np.ndarray, sym: str, threshold: float = MatchConfig.pseudo_symmetry_threshold):
    """The map's near-symmetries (:func:`~cryoposeml.core.matching.pseudo_symmetries` at 24 px)."""
    return pseudo_symmetries(volume, threshold=threshold, size=min(volume.shape[0], 24), group=sym)


class Reference:
    """The maps particles are matched against: one per half-set (``half1``, ``half2``) or one
    for all (``full``), each already filtered; the working bands from the half-map FSC."""

    def __init__(self, maps: dict, apix: float, sym: str, resolution_angstrom: float, source: str):
        self.maps, self.apix, self.sym, self.source = maps, apix, sym.upper(), source
        self.box = next(iter(maps.values())).shape[0]
        self.resolution_angstrom = resolution_angstrom
        self._matchers: dict = {}
        self._pseudo = None
        self.known_pseudo = None   # (n, 3, 3) as recorded in the model's reference.json

    def bands(self, cfg: MatchConfig) -> tuple[float, float]:
        """``(coarse_kmax, fine_kmax)`` in Fourier shells of the box: the fine band reaches the
        half-map FSC 0.143 resolution (capped), the coarse band is at most ``coarse_kmax_cap``."""
        k_res = self.box * self.apix / max(self.resolution_angstrom, 2 * self.apix)
        fine = float(min(k_res, cfg.fine_kmax_cap, self.box // 2 - 1))
        return float(min(fine, cfg.coarse_kmax_cap)), fine

    def matcher(self, which: str, cfg: MatchConfig, device) -> ReferenceMatcher:
        key = which if which in self.maps else "full"
        if key not in self._matchers:
            coarse, fine = self.bands(cfg)
            self._matchers[key] = ReferenceMatcher(self.maps[key], self.sym, coarse, fine, cfg.order, device=device)
        return self._matchers[key]

    def pseudo_symmetries(self, cfg: MatchConfig) -> np.ndarray:
        """The map's near-symmetries (from the first map; the halves share them), as the model's
        reference recorded them or found now."""
        if self._pseudo is None and self.known_pseudo is not None:
            self._pseudo = np.asarray(self.known_pseudo, np.float64).reshape(-1, 3, 3)
        if self._pseudo is None:
            self._pseudo, cc = find_pseudo_symmetries(next(iter(self.maps.values())), self.sym,
                                                      cfg.pseudo_symmetry_threshold)
            if len(cc):
                log.info("the reference has %d near-symmetries (correlation %s): their mates are proposed too",
                         len(cc), ", ".join(f"{c:.2f}" for c in cc))
        return self._pseudo


def load_reference(model_dir=None, reference=None, half_maps=None, sym: str = "C1", box: int | None = None,
                   apix: float | None = None) -> Reference | None:
    """The model folder's reference, or the user's ``reference`` map (and optional ``half_maps``),
    checked against the particles' ``box`` and pixel size ``apix`` and the symmetry."""
    if reference is None and half_maps is None:
        folder = reference_dir(model_dir) if model_dir is not None else None
        if folder is None or not (folder / "reference.json").exists():
            return None
        meta = json.loads((folder / "reference.json").read_text())
        if meta["sym"] != sym.upper():
            raise InputError(f"the reference was made with symmetry {meta['sym']}, not {sym}", folder)
        maps = {h: read_map(folder / f"{h}_filtered.mrc")[0] for h in ("half1", "half2")}
        rec_apix = meta["pixel_size_angstrom"]
        _check_map(folder / "half1_filtered.mrc", maps["half1"], rec_apix, box, apix)
        ref = Reference(maps, rec_apix, sym, meta["resolution_fsc0143_angstrom"], str(folder))
        ref.known_pseudo = meta.get("pseudo_symmetries")
        return ref
    symmetry_group(sym)
    maps, res = {}, None
    if half_maps is not None:
        if len(half_maps) != 2:
            raise InputError("--half-maps takes two maps (half 1, half 2)")
        vols = []
        for p in half_maps:
            v, a = read_map(p)
            _check_map(p, v, a, box, apix)
            vols.append(v)
        f = filtered_halves(vols[0], vols[1], apix)
        res = resolution_at(f["frequency"], f["fsc"], 0.143)
        maps = {"half1": f["half1"], "half2": f["half2"]}
    if reference is not None:
        v, a = read_map(reference)
        _check_map(reference, v, a, box, apix)
        maps = {"full": v.astype(np.float32)} if not maps else {**maps, "full": v.astype(np.float32)}
        if res is None:
            # no half-maps: the map is taken as it is (a user's filtered map), matched to 2 px
            res = 2 * apix
    return Reference(maps, apix, sym, res, str(reference or half_maps[0]))


def _check_map(path, vol: np.ndarray, map_apix: float, box, apix) -> None:
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise InputError(f"a reference map must be cubic; this one is {vol.shape}", path)
    if box is not None and vol.shape[0] != box:
        raise InputError(f"the map is {vol.shape[0]} px but the particles are {box} px (same box and pixel size "
                         "needed: rescale the map, e.g. relion_image_handler --new_box/--rescale_angpix)", path)
    if apix is not None and abs(map_apix - apix) > 1e-2 * apix:
        raise InputError(f"the map's pixel size is {map_apix:.3f} A but the particles' is {apix:.3f} A", path)
    if not np.isfinite(vol).all() or float(np.abs(vol).max()) == 0:
        raise InputError("the map is empty or holds non-finite values", path)


# -- the matching of one batch ---------------------------------------------------------------------
def _two_basins(scores: torch.Tensor, poses: torch.Tensor, group: torch.Tensor, separation_deg: float):
    """Each particle's best candidate and the best one more than ``separation_deg`` from it (up to
    symmetry). ``scores`` ``(B, C)``, ``poses`` ``(B, C, 3, 3)`` -> ``(A1, s1, A2, s2)``; ``s2`` is
    -inf where no candidate is that far."""
    b = torch.arange(len(scores), device=scores.device)
    i1 = scores.argmax(1)
    A1 = poses[b, i1]
    far = closest_mate_angle_deg(A1[:, None], poses, group) > separation_deg
    s2 = scores.masked_fill(~far, -float("inf"))
    i2 = s2.argmax(1)
    return A1, scores[b, i1], poses[b, i2], s2[b, i2]


def _refine_basins(m: ReferenceMatcher, dc, df, A1, s1, A2, s2, origins, cfg: MatchConfig) -> dict:
    """Refine each particle's best basin; the second basin too where its coarse score comes
    within ``alt_refine_sd`` noise SDs of the best (a near-symmetric mate, say), and the better
    refined one wins. Returns the winner's ``matrix``, ``origin``, ``score``, ``power``, the
    competing basin's ``alt_matrix`` and ``alt_score`` (-inf where it was not refined) and
    ``n_scored``."""
    steps = cfg.refine_steps_deg
    datas = [dc if st > cfg.fine_below_deg else df for st in steps]
    r = m.refine(datas, A1, origins, steps, cfg.refine_shift_steps_px)
    # a second basin that was not refined scored over alt_refine_sd noise SDs below the best: its
    # posterior weight, exp(s2^2 - s1^2), is negligible
    out = dict(r, alt_matrix=A2, alt_score=torch.full_like(s2, -float("inf")))
    close = torch.nonzero(s2 > s1 - cfg.alt_refine_sd * SCORE_NOISE_SD).flatten()
    if len(close):
        r2 = m.refine([d.subset(close) for d in datas], A2[close], origins[close], steps, cfg.refine_shift_steps_px)
        out["n_scored"] = out["n_scored"].clone()
        out["n_scored"][close] += r2["n_scored"]
        second = r2["score"] > r["score"][close]
        win = close[second]
        for k in ("matrix", "origin", "score", "power"):
            out[k] = out[k].clone()
        out["alt_matrix"], out["alt_score"] = out["alt_matrix"].clone(), out["alt_score"].clone()
        # where the second basin wins, the first becomes the competitor; else the refined second is
        out["alt_matrix"][close] = torch.where(second[:, None, None], r["matrix"][close], r2["matrix"])
        out["alt_score"][close] = torch.where(second, r["score"][close], r2["score"])
        for k in ("matrix", "origin", "score", "power"):
            out[k][win] = r2[k][second]
    return out


def _check_mates(m: ReferenceMatcher, dc, df, res: dict, pseudo: np.ndarray, cfg: MatchConfig) -> dict:
    """The refined pose's near-symmetric mates (``A @ g`` for each near-symmetry ``g`` of the map),
    each refined as the pose was; the best-scoring one wins and the runner-up becomes the competing
    basin. On a nearly symmetric map the mates score within noise of each other in the coarse
    band, so the exhaustive search's top two basins need not contain the right one; scoring every
    mate to the fine band is what separates them."""
    steps = cfg.refine_steps_deg
    datas = [dc if st > cfg.fine_below_deg else df for st in steps]
    g = torch.as_tensor(pseudo, dtype=torch.float32, device=m.device)
    out = {k: v.clone() if torch.is_tensor(v) else v for k, v in res.items()}
    out["n_mates"] = torch.zeros_like(res["score"])
    for j in range(len(g)):
        r = m.refine(datas, res["matrix"] @ g[j], res["origin"], steps, cfg.refine_shift_steps_px)
        out["n_mates"] += r["n_scored"]
        win = r["score"] > out["score"]
        # the competing basin: the loser of (current best, this mate) if it beats the old competitor
        loser_s = torch.where(win, out["score"], r["score"])
        loser_A = torch.where(win[:, None, None], out["matrix"], r["matrix"])
        alt = loser_s > out["alt_score"]
        out["alt_score"] = torch.where(alt, loser_s, out["alt_score"])
        out["alt_matrix"] = torch.where(alt[:, None, None], loser_A, out["alt_matrix"])
        for k in ("matrix", "origin", "score", "power"):
            shape = (-1,) + (1,) * (r[k].dim() - 1)
            out[k] = torch.where(win.view(shape), r[k], out[k])
    return out


@torch.no_grad()
def verify_batch(m: ReferenceMatcher, images: torch.Tensor, ctf: torch.Tensor | None, proposals: torch.Tensor | None,
                 shifts_px: torch.Tensor, cfg: MatchConfig, pseudo: np.ndarray, mask_radius_px: float) -> dict:
    """Match one batch. ``images`` ``(B, N, N)`` raw particles, ``ctf`` ``(B, N, N)`` (centred;
    None without CTF), ``proposals`` ``(B, K, 3, 3)`` (None in ``exhaustive`` mode), ``shifts_px``
    ``(B, 2)`` starting origins (px). Returns per-particle tensors: ``matrix``, ``origin``,
    ``score``, ``z`` (the match z-score), ``z_proposals`` (the same for the best proposal candidate,
    before any escalation), ``escalated``, ``expected_raw`` (uncalibrated expected error, deg),
    ``max_prob``, ``p_alt`` and the number of poses scored ``n_scored``."""
    dev = m.device
    B = len(images)
    images = images.to(dev, torch.float32)
    spectra = fft2_centered(images - images.mean((-2, -1), keepdim=True))
    sigma2 = noise_power(images, m.fine, mask_radius_px)
    dc = m.prepare(spectra, ctf, sigma2, m.coarse)
    df = m.prepare(spectra, ctf, sigma2, m.fine)
    origins = shifts_px.to(dev, torch.float32)
    mu, _ = m.null_stats(dc, origins)
    lib_poses = m.library["poses"]
    group = m.group

    def library_top(sel: torch.Tensor):
        """The 64 best library poses of particles ``sel`` and their coarse scores (the exhaustive
        search: two matrix products)."""
        s = m.score_library(dc.subset(sel), origins[sel])
        top = s.topk(min(64, s.shape[1]), 1)
        return top.values, lib_poses[top.indices], s.shape[1]

    def coarse_z(A, o):
        return (m.score_poses(dc, A[:, None], o)[:, 0] - mu) / SCORE_NOISE_SD

    def library_basins(sel: torch.Tensor):
        """The two basins of particles ``sel`` among their proposals' candidates and the whole
        library's best (counted in ``n_scored``)."""
        top_s, top_A, n_lib = library_top(sel)
        n_scored[sel] += n_lib
        return _two_basins(torch.cat([scores[sel], top_s], 1), torch.cat([poses[sel], top_A], 1), group,
                           cfg.basin_separation_deg)

    n_scored = torch.zeros(B, device=dev)
    if proposals is None:
        scores, poses, n_lib = library_top(torch.arange(B, device=dev))
        n_scored += n_lib
        escalated = torch.ones(B, dtype=torch.bool, device=dev)
        z_prop = None
    else:
        props = proposals.to(dev, torch.float32)
        if len(pseudo):
            g = torch.as_tensor(pseudo, dtype=torch.float32, device=dev)
            props = torch.cat([props, (props[:, :1, None] @ g[None, None])[:, 0]], 1)       # A @ g
        near = m.nearest_library(props, cfg.neighbours).reshape(B, -1)                     # (B, K*n)
        scores = torch.cat([m.score_poses(dc, props, origins), m.score_library_subset(dc, origins, near)], 1)
        poses = torch.cat([props, lib_poses[near]], 1)
        n_scored += scores.shape[1]
        z_prop = (scores.amax(1) - mu) / SCORE_NOISE_SD
        escalated = torch.zeros(B, dtype=torch.bool, device=dev)
        if cfg.matching == "auto":
            escalated = torch.ones_like(escalated) if cfg.escalate_z is None else z_prop < cfg.escalate_z
    A1, s1, A2, s2 = _two_basins(scores, poses, group, cfg.basin_separation_deg)
    if proposals is not None and bool(escalated.any()):
        # the escalated particles' candidates: their proposals' and the whole library's best
        sel = torch.nonzero(escalated).flatten()
        e1, es1, e2, es2 = library_basins(sel)
        A1, s1, A2, s2 = A1.clone(), s1.clone(), A2.clone(), s2.clone()
        A1[sel], s1[sel], A2[sel], s2[sel] = e1, es1, e2, es2
    res = _refine_basins(m, dc, df, A1, s1, A2, s2, origins, cfg)
    n_scored += res["n_scored"]
    if cfg.mate_check and len(pseudo):
        res = _check_mates(m, dc, df, res, pseudo, cfg)
        n_scored += res.pop("n_mates")
    # match z: the final pose's coarse score above the particle's null mean, in noise SDs (junk:
    # noise or another protein matches no view much better than a random one)
    z = coarse_z(res["matrix"], res["origin"])
    if proposals is not None and cfg.matching == "auto" and cfg.rescue_z is not None:
        # a trusted proposal that refined to a pose matching like the bottom tail of good particles
        # was most likely a wrong basin above the escalation threshold: search those exhaustively
        # too, and keep whichever refined pose scores better
        redo = torch.nonzero(~escalated & (z < cfg.rescue_z)).flatten()
        if len(redo):
            e1, es1, e2, es2 = library_basins(redo)
            dcs, dfs = dc.subset(redo), df.subset(redo)
            r2 = _refine_basins(m, dcs, dfs, e1, es1, e2, es2, origins[redo], cfg)
            n_scored[redo] += r2["n_scored"]
            if cfg.mate_check and len(pseudo):
                r2 = _check_mates(m, dcs, dfs, r2, pseudo, cfg)
                n_scored[redo] += r2.pop("n_mates")
            better = r2["score"] > res["score"][redo]
            win = redo[better]
            for k in ("matrix", "origin", "score", "power", "alt_matrix", "alt_score"):
                res[k] = res[k].clone()
                res[k][win] = r2[k][better]
            escalated = escalated.clone()
            escalated[redo] = True
            z = coarse_z(res["matrix"], res["origin"])
    # the posterior about the final pose (Laplace), and the competing basin's weight
    post = m.posterior(df, res["matrix"], res["origin"], cfg.posterior_step_deg)
    res["matrix"] = post["peak_matrix"]
    d_alt = closest_mate_angle_deg(res["matrix"], res["alt_matrix"], group)
    p_alt = torch.sigmoid(res["alt_score"].clamp(min=0) ** 2 - res["score"].clamp(min=0) ** 2)
    p_alt = torch.where(torch.isfinite(res["alt_score"]) & (d_alt > cfg.basin_separation_deg / 2), p_alt,
                        torch.zeros_like(p_alt))
    expected = (1 - p_alt) * post["expected_deg"] + p_alt * d_alt
    n_scored = n_scored + len(m.library["null"]) + post["n_scored"] + 1
    return {"matrix": res["matrix"], "origin": res["origin"], "score": res["score"], "z": z,
            "z_proposals": z if z_prop is None else z_prop, "escalated": escalated, "expected_raw": expected,
            "max_prob": post["max_probability"] * (1 - p_alt), "p_alt": p_alt, "n_scored": n_scored}


def particle_ctf(ctf_params, idx, box: int, apix: float):
    """The CTFs ``(B, box, box)`` the matching multiplies the projections by (``|CTF|`` for
    phase-flipped particles, as :func:`ctf_2d` gives); None without CTF parameters."""
    if ctf_params is None:
        return None
    return ctf_2d(ctf_params.subset(idx), box, apix)


def match_config_dict(cfg: MatchConfig) -> dict:
    d = asdict(cfg)
    d["refine_steps_deg"], d["refine_shift_steps_px"] = list(cfg.refine_steps_deg), list(cfg.refine_shift_steps_px)
    return d
