"""Pose scoring against a reference map: the one owner of "how well does this pose explain this
particle" (semi-amortized verification, cryoPARES / cryoSPIN).

Model. A particle's spectrum is ``Y = a * CTF * S(A) * ph(-o) + n`` with ``S(A)`` the reference's
central slice at pose ``A`` (:mod:`.projection`'s convention), ``o`` the Relion origin (px),
``a`` an unknown contrast scale and ``n`` complex Gaussian noise of variance ``sigma2(|k|)`` per
Fourier point. Only the half-plane of frequencies (``0 < |k| <= kmax``) is used: a real image's
Fourier coefficients are independent there. With the scale fitted per particle, the
log-likelihood of a pose is ``s(A)^2`` with the *match score*

    s(A) = cross / sqrt(power),  cross = Re sum conj(Y ph(o)) CTF S(A) / sigma2,
                                 power = sum CTF^2 |S(A)|^2 / sigma2,

whose noise has standard deviation ``1/sqrt(2)`` whatever the particle. For a batch of particles
and a library of poses both sums are matrix products (one GEMM each), so an exhaustive search
over a HEALPix SO(3) grid is two matrix products per batch; a local search computes its slices
on the fly.

Everything here is numpy/torch on arrays: no files, no Scipion.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .fourier import (fft2_centered, fftn_centered, frequency_index_2d, ifftn_centered, padded_spectrum_centre,
                      trilinear_apodization)
from .rotations import rotation_angle_deg
from .search import axis_moves, cube_moves, pattern_search, shift_moves, so3_grid
from .symmetry import symmetry_group

__all__ = ["Band", "ReferenceMatcher", "noise_power", "pseudo_symmetries",
           "MatchBatch"]

#: standard deviation of the match score's noise (complex Gaussian noise, real part)
SCORE_NOISE_SD = 1.0 / math.sqrt(2.0)


class Band:
    """Frequency points of a working band: the half-plane ``(ky > 0) or (ky == 0 and kx > 0)`` with
    ``0 < |k| <= kmax`` (index units of a ``box`` image; Fourier cropping is choosing ``kmax``).

    ``k`` ``(M, 2)`` float (kx, ky); ``flat`` ``(M,)`` indices into a centred ``(box, box)``
    spectrum; ``shell`` ``(M,)`` rounded radius."""

    def __init__(self, box: int, kmax: float, device=None):
        kmax = float(min(kmax, box // 2 - 1))
        kx, ky = frequency_index_2d(box, torch.float32, device)
        r = torch.sqrt(kx**2 + ky**2)
        half = (ky > 0) | ((ky == 0) & (kx > 0))
        keep = half & (r <= kmax)
        self.box, self.kmax = box, kmax
        self.flat = torch.nonzero(keep.flatten()).flatten()
        self.k = torch.stack([kx.flatten()[self.flat], ky.flatten()[self.flat]], -1)
        self.shell = r.flatten()[self.flat].round().long()

    def __len__(self) -> int:
        return len(self.flat)

    def take(self, spectra: torch.Tensor) -> torch.Tensor:
        """``(..., box, box)`` centred spectra (or CTFs) -> ``(..., M)`` values at the band."""
        return spectra.flatten(-2)[..., self.flat]

    def phase(self, origins_px: torch.Tensor) -> torch.Tensor:
        """``(..., 2)`` origins -> ``(..., M)`` phase factors that re-centre a particle whose Relion
        origin is ``o`` (multiply the data by it: ``exp(-2 pi i k.o / box)``)."""
        arg = origins_px[..., 0:1] * self.k[:, 0] + origins_px[..., 1:2] * self.k[:, 1]
        return torch.polar(torch.ones_like(arg), -2 * math.pi * arg / self.box)


def noise_power(images: torch.Tensor, band: Band, radius_px: float) -> torch.Tensor:
    """Noise power per shell ``(kmax + 1,)`` from the images' background: the power spectrum of
    the pixels beyond ``radius_px`` (the particle's), scaled by the fraction of the box they cover.
    Pose-free, so it can be estimated for every batch of new particles."""
    box = images.shape[-1]
    c = torch.arange(box, dtype=torch.float32) - box // 2
    outside = ((c[:, None] ** 2 + c[None, :] ** 2) > radius_px**2).to(images.dtype)
    frac = float(outside.mean())
    x = images - (images * outside).sum((-2, -1), keepdim=True) / outside.sum()
    p = band.take(fft2_centered(x * outside).abs() ** 2).mean(0) / max(frac, 1e-3)
    # floor: 1e-4 of the images' whole power (noise-free data would otherwise divide by ~0)
    p = torch.maximum(p, 1e-4 * band.take(fft2_centered(x).abs() ** 2).mean())
    n_shell = int(band.shell.max()) + 1
    num = torch.zeros(n_shell, dtype=p.dtype).index_add_(0, band.shell, p)
    cnt = torch.zeros(n_shell, dtype=p.dtype).index_add_(0, band.shell, torch.ones_like(p))
    prof = num / cnt.clamp(min=1)
    prof[0] = prof[1] if n_shell > 1 else 1.0
    return prof


@dataclass
class MatchBatch:
    """A batch of particles prepared for scoring in one band: whitened, CTF-weighted data."""

    Y: torch.Tensor       # (B, M) complex: the particles' spectra at the band (not yet re-centred)
    w: torch.Tensor       # (B, M) real: CTF / sigma2 (the data's weight per point)
    c2: torch.Tensor      # (B, M) real: CTF^2 / sigma2 (the power weight)
    band: Band

    def subset(self, sel) -> "MatchBatch":
        """The particles ``sel`` (indices, repeats allowed) of this batch."""
        return MatchBatch(self.Y[sel], self.w[sel], self.c2[sel], self.band)


class ReferenceMatcher:
    """Scores poses of particles against one reference map.

    Args:
        volume: ``(N, N, N)`` reference (``(z, y, x)``, centre ``N // 2``), already filtered as wanted.
        sym: point group; the exhaustive library covers one asymmetric unit.
        coarse_kmax / fine_kmax: the bands (Fourier shells of the ``N`` box) of the exhaustive
            library and of local refinement.
        order: HEALPix order of the exhaustive library (3: 36,864 rotations in C1).
    """

    def __init__(self, volume, sym: str = "C1", coarse_kmax: float = 16, fine_kmax: float = 24, order: int = 3,
                 pad: int = 2, device=None, null_poses: int = 512):
        vol = torch.as_tensor(np.asarray(volume), dtype=torch.float64)
        n = vol.shape[0]
        if vol.ndim != 3 or len(set(vol.shape)) != 1:
            raise ValueError(f"expected a cubic volume, got shape {tuple(vol.shape)}")
        self.box, self.pad, self.sym, self.order = n, pad, sym.upper(), order
        self.device = torch.device("cpu") if device is None else torch.device(device)
        m = pad * n
        vol = (vol / trilinear_apodization(n, m)).float()
        self.coarse = Band(n, coarse_kmax, self.device)
        self.fine = Band(n, max(fine_kmax, coarse_kmax), self.device)
        # Only the cube the widest band's slices can reach is kept (a few MB even at 400 px), and
        # only it is computed: never the whole padded spectrum (1 GB complex at a 256 px box).
        self._reach = min(self._band_reach(self.fine), m // 2 - 1)
        crop = padded_spectrum_centre(vol, m, self._reach)
        del vol
        self._grid = torch.stack([crop.real, crop.imag])[None].contiguous().to(self.device)
        self.group = torch.as_tensor(symmetry_group(sym), dtype=torch.float32, device=self.device)
        self._library = None
        self._crops: dict = {}
        self.n_null = null_poses

    # -- slices ------------------------------------------------------------------------------
    def slices(self, A: torch.Tensor, band: Band) -> torch.Tensor:
        """Central slices of the reference at poses ``A`` ``(..., 3, 3)``: ``(..., 2M)`` real, the
        real parts of the band's ``M`` points then the imaginary parts."""
        lead = A.shape[:-2]
        A = A.reshape(-1, 3, 3).to(self.device, torch.float32)
        M = len(band)
        if len(A) == 0:
            return torch.zeros(*lead, 2 * M, device=self.device)
        grid, half = self._band_grid(band)
        # A.T @ (kx, ky, 0): the first two columns of A.T times the band's (kx, ky)
        pts = (A.transpose(1, 2)[:, :, :2] @ band.k.T).transpose(1, 2) * self.pad            # (B, M, 3)
        norm = pts * (1.0 / half)           # the crop's centre voxel is at 0, its edges at +-1
        def sample(lo: int, hi: int) -> torch.Tensor:
            g = norm[lo:hi]
            v = F.grid_sample(grid, g.reshape(1, 1, len(g), M, 3), mode="bilinear",
                              padding_mode="zeros", align_corners=True)                     # (1, 2, 1, b, M)
            return v[0, :, 0].permute(1, 0, 2).reshape(len(g), 2 * M)

        # torch's 3D grid_sample runs on one CPU thread: split the poses over the intra-op threads
        # (it releases the GIL; the pieces are joined in order, so the result is the same)
        n_threads = torch.get_num_threads() if self.device.type == "cpu" and len(A) * M > 50_000 else 1
        bounds = np.linspace(0, len(A), n_threads + 1).round().astype(int)
        chunks = [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        if len(chunks) > 1:
            out = torch.cat(list(_pool(len(chunks)).map(lambda c: sample(*c), chunks)))
        else:
            out = torch.cat([sample(lo, min(len(A), lo + 4096)) for lo in range(0, len(A), 4096)])
        return out.reshape(*lead, 2 * M)

    def _band_grid(self, band: Band) -> tuple[torch.Tensor, int]:
        """The padded spectrum cropped to the cube a band's slices can reach (``+-(kmax pad + 2)``
        voxels about the centre): the same values, a smaller array that stays in cache."""
        key = self._band_reach(band)
        if key not in self._crops:
            half = min(key, self._reach)
            c = self._reach   # the kept cube's centre voxel
            self._crops[key] = (self._grid[..., c - half:c + half + 1, c - half:c + half + 1,
                                           c - half:c + half + 1].contiguous(), half)
        return self._crops[key]

    def _band_reach(self, band: Band) -> int:
        """Voxels about the centre a band's slices (trilinear) can touch on the padded grid."""
        return round(band.kmax * self.pad) + 2

    # -- library -------------------------------------------------------------------------------
    @property
    def library(self) -> dict:
        """The exhaustive library (built on first use): grid poses of one asymmetric unit
        ``(P, 3, 3)``, their coarse-band slices ``S`` ``(P, 2M)`` and ``|S|^2`` ``(P, M)``, and the
        fixed poses whose scores are every particle's null distribution."""
        if self._library is None:
            grid = so3_grid(self.order, self.sym, self.device)
            S = self.slices(grid, self.coarse)
            gen = torch.Generator().manual_seed(0)
            null = torch.randperm(len(grid), generator=gen)[: min(self.n_null, len(grid))].to(self.device)
            self._library = {"poses": grid, "S": S, "power": _power(S), "null": null, "quat": _quaternions(grid)}
        return self._library

    # -- data ----------------------------------------------------------------------------------
    def prepare(self, spectra: torch.Tensor, ctf: torch.Tensor | None, sigma2: torch.Tensor, band: Band) -> MatchBatch:
        """``spectra`` ``(B, N, N)`` centred spectra of the raw particles, ``ctf`` ``(B, N, N)``
        (None: no CTF), ``sigma2`` per shell (:func:`noise_power`) -> a :class:`MatchBatch`."""
        Y = band.take(spectra.to(self.device)).to(torch.complex64)
        s2 = sigma2.to(self.device, torch.float32)[band.shell.clamp(max=len(sigma2) - 1)]
        c = band.take(ctf.to(self.device)).float() if ctf is not None else torch.ones(len(Y), len(band), device=self.device)
        return MatchBatch(Y, c / s2, c**2 / s2, band)

    # -- scoring -------------------------------------------------------------------------------
    @staticmethod
    def _weighted(data: MatchBatch, idx, origins: torch.Tensor, moves: torch.Tensor | None = None) -> torch.Tensor:
        """The re-centred, weighted data ``(b, O, 2M)`` of particles ``idx`` at origins ``(b, O, 2)``
        (or, with ``moves`` ``(O, 2)``, at ``origins`` ``(b, 2)`` plus each move: the moves' phases are
        computed once), laid out so that its dot product with a slice ``[Re S, Im S]`` is
        ``Re sum conj(Y) w S``."""
        if moves is None:
            W = data.Y[idx, None] * data.band.phase(origins)
        else:
            W = (data.Y[idx] * data.band.phase(origins))[:, None] * data.band.phase(moves)[None]
        W = W.conj() * data.w[idx, None]
        return torch.cat([W.real, -W.imag], -1)

    def _scores(self, data: MatchBatch, idx, origins: torch.Tensor, S: torch.Tensor, with_power: bool = False,
                moves: torch.Tensor | None = None):
        """Match scores of particles ``idx`` at origins ``(b, O, 2)`` (or ``(b, 2)`` plus ``moves``
        ``(O, 2)``) against their own slices ``S`` ``(b, C, 2M)`` -> ``(b, O, C)`` (and the power
        ``(b, C)`` with ``with_power``)."""
        cross = torch.bmm(self._weighted(data, idx, origins, moves), S.transpose(1, 2))
        power = torch.bmm(_power(S), data.c2[idx, :, None])[..., 0]
        s = cross / power.clamp(min=1e-20).sqrt()[:, None]
        return (s, power) if with_power else s

    def score_poses(self, data: MatchBatch, A: torch.Tensor, origins: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, C)`` of each particle at its own poses ``A`` ``(B, C, 3, 3)`` and origin
        ``(B, 2)``."""
        S = self.slices(A, data.band)
        idx = torch.arange(len(A), device=self.device)
        return self._scores(data, idx, origins[:, None].to(self.device), S)[:, 0]

    def score_library(self, data: MatchBatch, origins: torch.Tensor, columns=None) -> torch.Tensor:
        """Scores ``(B, P)`` of every particle against the library poses (all, or ``columns``),
        at one origin per particle ``(B, 2)``: two matrix products."""
        lib = self.library
        S, P2 = (lib["S"], lib["power"]) if columns is None else (lib["S"][columns], lib["power"][columns])
        b = torch.arange(len(origins), device=self.device)
        cross = self._weighted(data, b, origins.to(self.device)[:, None])[:, 0] @ S.T
        power = data.c2 @ P2.T
        return cross / power.clamp(min=1e-20).sqrt()

    def score_library_subset(self, data: MatchBatch, origins: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Scores ``(B, C)`` of each particle against its own library entries ``idx`` ``(B, C)``."""
        b = torch.arange(len(idx), device=self.device)
        return self._scores(data, b, origins[:, None].to(self.device), self.library["S"][idx])[:, 0]

    def nearest_library(self, A: torch.Tensor, n: int) -> torch.Tensor:
        """Indices ``(..., n)`` of the ``n`` library poses nearest to each pose ``A`` ``(..., 3, 3)``
        (up to symmetry)."""
        lib = self.library
        lead = A.shape[:-2]
        mates = A.reshape(-1, 1, 3, 3).to(self.device, torch.float32) @ self.group[None]     # (b, G, 3, 3)
        q = _quaternions(mates.reshape(-1, 3, 3))                                            # (b*G, 4)
        sim = (q @ lib["quat"].T).abs().reshape(-1, len(self.group), len(lib["poses"])).amax(1)
        return sim.topk(min(n, sim.shape[1]), -1).indices.reshape(*lead, -1)

    def null_stats(self, data: MatchBatch, origins: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and standard deviation ``(B,)`` of each particle's scores over the fixed null poses
        (a random sample of the library): what a pose unrelated to the particle scores."""
        s = self.score_library(data, origins, self.library["null"])
        return s.mean(1), s.std(1).clamp(min=1e-6)

    # -- local refinement ------------------------------------------------------------------------
    def refine(self, datas, A: torch.Tensor, origins: torch.Tensor, steps_deg, shift_steps_px,
               repeats: int = 3) -> dict:
        """Local refinement of each particle's pose and origin by a pattern search: at each step,
        the pose and its turns by ``+-step`` about x, y and z (image frame) times the origin and
        its moves by ``shift_step`` (3 x 3); the best becomes the centre, again (up to ``repeats``
        times) for the particles that moved. ``datas`` gives the band of each step (a
        :class:`MatchBatch` per step: coarse for the large steps, fine for the small ones).
        Returns the final ``matrix`` ``(B, 3, 3)``, ``origin`` ``(B, 2)``, ``score`` ``(B,)`` and
        ``power`` (``sum CTF^2 |S|^2 / sigma2`` at the final pose) in the last step's band, and
        ``n_scored`` ``(B,)``, the poses x origins each particle scored."""
        A = A.to(self.device, torch.float32)
        o = origins.to(self.device, torch.float32)
        n_scored = torch.zeros(len(A), device=self.device)
        for data, step, sstep in zip(datas, steps_deg, shift_steps_px):
            moves = shift_moves(sstep, device=self.device)                                 # (9, 2)

            def score(active, C, o_active, data=data, moves=moves):
                return self._scores(data, active, o_active, self.slices(C, data.band), True, moves)  # (b, 9, 7)

            res = pattern_search(score, A, o, axis_moves(step, self.device), moves, repeats)
            A, o = res["matrix"], res["origin"]
            n_scored += res["n_scored"]
        return {"matrix": A, "origin": o, "score": res["score"], "power": res["extra"], "n_scored": n_scored}

    def posterior(self, data: MatchBatch, A: torch.Tensor, origins: torch.Tensor, step_deg: float = 1.0) -> dict:
        """A Laplace approximation of the posterior about each (refined) pose: the log-likelihood
        ``s^2`` at turns by ``+-step`` and ``+-2 step`` about x, y and z, a parabola fitted per axis
        (``LL(0) - LL(t) = t^2 / (2 sigma^2)``). Returns ``sigma_deg`` ``(B, 3)`` (capped at 30
        degrees for flat directions), ``expected_deg`` (the mean angular error of that Gaussian,
        ``sqrt(8 / pi) * sqrt(mean sigma^2)``), ``max_probability`` (the mass of a ``step``-wide cell at
        the peak, Relion's rlnMaxValueProbDistribution at that sampling), ``peak_matrix`` (each pose
        turned to the parabolas' vertex: a sub-step refinement for free) and ``n_scored``."""
        t = torch.tensor([1.0, -1.0, 2.0, -2.0], device=self.device) * math.radians(step_deg)
        from scipy.spatial.transform import Rotation

        vecs = torch.zeros(13, 3)
        for axis in range(3):
            vecs[1 + 4 * axis:5 + 4 * axis, axis] = t.cpu()
        T = torch.as_tensor(Rotation.from_rotvec(vecs.numpy()).as_matrix(), dtype=torch.float32, device=self.device)
        s = self.score_poses(data, T[None] @ A.to(self.device, torch.float32)[:, None], origins)
        ll = s.clamp(min=0) ** 2
        drop = (ll[:, :1] - ll[:, 1:]).reshape(-1, 3, 4)                                   # (B, 3, 4)
        t2 = t**2
        # per axis LL(t) = LL(0) + b t - a t^2 (least squares; the points are symmetric, so the
        # odd part gives b and the even part a)
        a = (drop * t2).sum(-1) / (t2**2).sum()
        b = -(drop * t).sum(-1) / t2.sum()
        sigma = (1.0 / (2 * a.clamp(min=1e-12))).sqrt().rad2deg().clamp(max=30.0)
        expected = math.sqrt(8 / math.pi) * (sigma**2).mean(1).sqrt()
        cell = torch.erf(step_deg / (2 * math.sqrt(2) * sigma)).prod(1)
        # the parabolas' vertex (within 1.5 steps, and only where the curvature is positive)
        vertex = torch.where(a > 0, b / (2 * a.clamp(min=1e-12)), torch.zeros_like(a)).clamp(
            -1.5 * float(t[0]), 1.5 * float(t[0]))
        turn = torch.as_tensor(Rotation.from_rotvec(vertex.double().cpu().numpy()).as_matrix(), dtype=torch.float32,
                               device=self.device)
        return {"sigma_deg": sigma, "expected_deg": expected, "max_probability": cell,
                "peak_matrix": turn @ A.to(self.device, torch.float32),
                "n_scored": torch.full((len(A),), 13.0, device=self.device)}


_POOLS: dict = {}


def _pool(n: int):
    """A thread pool of ``n`` workers, made once per process."""
    import concurrent.futures

    if n not in _POOLS:
        _POOLS[n] = concurrent.futures.ThreadPoolExecutor(n, thread_name_prefix="cryoposeml-slices")
    return _POOLS[n]


def _power(S: torch.Tensor) -> torch.Tensor:
    """``|S|^2`` ``(..., M)`` of slices ``(..., 2M)`` laid out as ``[Re, Im]``."""
    M = S.shape[-1] // 2
    return S[..., :M] ** 2 + S[..., M:] ** 2


def _quaternions(A: torch.Tensor) -> torch.Tensor:
    import roma

    return roma.rotmat_to_unitquat(A.float())


def pseudo_symmetries(volume, order: int = 2, threshold: float = 0.75, exclude_deg: float = 20.0,
                      size: int = 24, group: str = "C1", max_count: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Rotations ``g`` under which the map nearly maps onto itself (``V(g x) ~ V(x)``): the local
    maxima of the real-space correlation of the map with its rotated copy over a HEALPix SO(3)
    grid, refined locally, above ``threshold`` and more than ``exclude_deg`` from the identity and
    from the true symmetry operators. A pose ``A`` and ``A @ g`` then give nearly the same image,
    which is where a regression network's single pose can land on the wrong mate. Returns
    ``(rotations (n, 3, 3), correlations (n,))``, best first."""
    from scipy.spatial.transform import Rotation

    v = torch.as_tensor(np.asarray(volume), dtype=torch.float32)
    n = v.shape[0]
    if n != size:   # Fourier-crop to a small box: the comparison is at low resolution anyway
        spec = fftn_centered(v.double())
        lo = n // 2 - size // 2
        spec = spec[lo:lo + size, lo:lo + size, lo:lo + size]
        v = ifftn_centered(spec).real.float()
    v = v - v.mean()
    c = torch.arange(size, dtype=torch.float32) - size // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    inside = (xx**2 + yy**2 + zz**2) <= (size / 2 - 1) ** 2
    xyz = torch.stack([xx[inside], yy[inside], zz[inside]], -1)                  # (V, 3)
    ref = v[inside]
    ref = (ref - ref.mean()) / ref.norm()
    vol5 = v[None, None]
    sym = torch.as_tensor(symmetry_group(group), dtype=torch.float32)

    def corr(R: torch.Tensor) -> torch.Tensor:
        out = []
        for s in range(0, len(R), 256):
            # sample V at R @ x: grid_sample's (x, y, z) in [-1, 1], voxel i at -1 + 2 i / (size - 1)
            p = (torch.einsum("rij,vj->rvi", R[s:s + 256], xyz) + size // 2) * (2.0 / (size - 1)) - 1.0
            smp = F.grid_sample(vol5.expand(1, -1, -1, -1, -1), p.reshape(1, 1, 1, -1, 3), align_corners=True)
            smp = smp.reshape(len(R[s:s + 256]), -1)
            smp = smp - smp.mean(1, keepdim=True)
            out.append((smp @ ref) / smp.norm(dim=1).clamp(min=1e-12))
        return torch.cat(out)

    grid = so3_grid(order)
    cc = corr(grid)
    # local maxima over 25-degree neighbourhoods
    tr = torch.einsum("aij,bij->ab", grid, grid)
    near = ((tr - 1) / 2) > math.cos(math.radians(25.0))
    peaks = [i for i in torch.nonzero(cc >= torch.where(near, cc[None, :], torch.tensor(-2.0)).amax(1)).flatten().tolist()]
    found = []
    for i in sorted(peaks, key=lambda i: -float(cc[i])):
        R, best = grid[i:i + 1], float(cc[i])
        step = 60.0 / 2**order / 2
        for _ in range(6):   # hill-climb with shrinking steps
            C = cube_moves(step) @ R
            v_c = corr(C)
            j = int(v_c.argmax())
            if float(v_c[j]) > best:
                R, best = C[j:j + 1], float(v_c[j])
            else:
                step /= 2
        ang_to_sym = rotation_angle_deg(sym.transpose(-1, -2) @ R).min()
        if best < threshold or float(ang_to_sym) < exclude_deg:
            continue
        if any(float(rotation_angle_deg(f.T @ R[0])) < exclude_deg for f, _ in found):
            continue
        found.append((R[0], best))
        if len(found) >= max_count:
            break
    if not found:
        return np.zeros((0, 3, 3)), np.zeros(0)
    mats = torch.stack([f for f, _ in found]).double().numpy()
    return Rotation.from_matrix(mats).as_matrix(), np.array([c for _, c in found])
