"""Image2Sphere (Klee et al. 2023; CESPED's supervised baseline), built on e3nn.

CNN feature map -> orthographic projection onto the upper hemisphere (z > 0, the viewing side)
-> spherical-harmonic coefficients -> S2 convolution (to an SO(3) signal in Wigner-D
coefficients) -> SO(3) activation -> SO(3) convolution -> a distribution over a HEALPix SO(3) grid.

A grid rotation ``R = e3nn.o3.angles_to_matrix(alpha, beta, gamma)`` *is* the pose matrix ``A``
(Relion convention, :mod:`cryoposeml.core.rotations`); the network learns the map, the convention
only fixes the labels. Inference takes the best grid cell, then refines locally by evaluating the
band-limited SO(3) signal at finer rotations around it (deterministic).
"""
from __future__ import annotations

import math

import healpy as hp
import numpy as np
import torch
from e3nn import o3
from torch import nn

from ..core.rotations import matrix_to_quaternion
from ..core.search import axis_moves
from .encoders import BlurStack, VGGEncoder

__all__ = ["Image2Sphere", "so3_healpix_grid_e3nn", "flat_wigner"]


def s2_irreps(lmax: int) -> o3.Irreps:
    return o3.Irreps([(1, (l, 1)) for l in range(lmax + 1)])


def so3_irreps(lmax: int) -> o3.Irreps:
    return o3.Irreps([(2 * l + 1, (l, 1)) for l in range(lmax + 1)])


def flat_wigner(lmax: int, alpha, beta, gamma) -> torch.Tensor:
    """``(..., sum_l (2l+1)^2)``: Wigner-D matrices of rotations (e3nn angles), flattened."""
    return torch.cat([(2 * l + 1) ** 0.5 * o3.wigner_D(l, alpha, beta, gamma).flatten(-2)
                      for l in range(lmax + 1)], dim=-1)


def _healpix_xyz(order: int) -> torch.Tensor:
    """Unit vectors ``(n, 3)`` of the HEALPix directions of an order (nested)."""
    nside = 2**order
    theta, phi = hp.pix2ang(nside, np.arange(hp.nside2npix(nside)), nest=True)
    return torch.as_tensor(hp.ang2vec(theta, phi), dtype=torch.float32)


def _s2_healpix_angles(order: int) -> tuple[torch.Tensor, torch.Tensor]:
    """e3nn (alpha, beta) of the HEALPix directions of an order."""
    return o3.xyz_to_angles(_healpix_xyz(order))


def so3_healpix_grid_e3nn(order: int) -> torch.Tensor:
    """``(3, n)`` e3nn angles (alpha, beta, gamma) of the HEALPix SO(3) grid of an order."""
    alpha, beta = _s2_healpix_angles(order)
    gamma = torch.linspace(0, 2 * math.pi, 6 * 2**order + 1)[:-1]
    n_dir, n_g = len(alpha), len(gamma)
    return torch.stack([alpha.repeat_interleave(n_g), beta.repeat_interleave(n_g), gamma.repeat(n_dir)])


class _ImageToSphere(nn.Module):
    """Samples a feature map at the orthographic projections of hemisphere points; returns their
    spherical-harmonic coefficients ``(B, C, (lmax+1)^2)``."""

    def __init__(self, in_channels: int, out_channels: int, lmax: int, order: int = 3):
        super().__init__()
        xyz_t = _healpix_xyz(order)
        xyz_t = xyz_t[xyz_t[:, 2] > 0]                              # the side facing the viewer
        alpha, beta = o3.xyz_to_angles(xyz_t)
        self.register_buffer("Y", o3.spherical_harmonics_alpha_beta(range(lmax + 1), alpha, beta,
                                                                   normalization="component"))
        # grid_sample coordinates: image x -> point x, image y -> point y (both in [-1, 1])
        self.register_buffer("grid", xyz_t[None, None, :, :2].contiguous())
        taper = torch.clamp(xyz_t[:, 2] / 0.2, max=1.0)             # soften the rim of the hemisphere
        self.register_buffer("taper", taper)
        self.conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = self.conv(feats)
        s = nn.functional.grid_sample(x, self.grid.expand(x.shape[0], -1, -1, -1), align_corners=False)[:, :, 0]
        s = s * self.taper
        return torch.einsum("bcp,pi->bci", s, self.Y) / self.Y.shape[0] ** 0.5


class _S2Conv(nn.Module):
    def __init__(self, f_in: int, f_out: int, lmax: int, kernel_order: int = 1):
        super().__init__()
        alpha, beta = _s2_healpix_angles(kernel_order)
        self.w = nn.Parameter(torch.randn(f_in, f_out, len(alpha)))
        self.register_buffer("Y", o3.spherical_harmonics_alpha_beta(range(lmax + 1), alpha, beta,
                                                                   normalization="component"))
        self.lin = o3.Linear(s2_irreps(lmax), so3_irreps(lmax), f_in=f_in, f_out=f_out, internal_weights=False)

    def forward(self, x):
        psi = torch.einsum("ni,xyn->xyi", self.Y, self.w) / self.Y.shape[0] ** 0.5
        return self.lin(x, weight=psi)


class _SO3Conv(nn.Module):
    def __init__(self, f_in: int, f_out: int, lmax: int, kernel_order: int = 0):
        super().__init__()
        grid = so3_healpix_grid_e3nn(kernel_order)
        self.w = nn.Parameter(torch.randn(f_in, f_out, grid.shape[1]))
        self.register_buffer("D", flat_wigner(lmax, *grid))
        self.lin = o3.Linear(so3_irreps(lmax), so3_irreps(lmax), f_in=f_in, f_out=f_out, internal_weights=False)

    def forward(self, x):
        psi = torch.einsum("ni,xyn->xyi", self.D, self.w) / self.D.shape[0] ** 0.5
        return self.lin(x, weight=psi)


class _GridActivation(nn.Module):
    """A pointwise nonlinearity on an SO(3) signal: evaluate it on a HEALPix SO(3) grid, apply the
    nonlinearity, and project back to Wigner-D coefficients by least squares. (e3nn's
    SO3Activation does the same on its own grid, several times slower on a CPU.)

    The grid is HEALPix directions ``(alpha, beta)`` times in-plane angles ``gamma``, and each
    Wigner matrix factors as ``D(alpha, beta, gamma) = D(alpha, beta, 0) D(0, 0, gamma)``, whose
    second factor holds only ``cos(j gamma)`` and ``sin(j gamma)``, ``j <= lmax``. So the signal on
    the grid is, for each direction, a trigonometric polynomial in ``gamma`` with ``2 lmax + 1``
    coefficients, each a small linear map of the Wigner coefficients: one batched matrix product
    gives them for every direction, one more evaluates them at the grid's angles. The least-squares
    projection is those steps transposed, then ``(D^T D)^-1``. The same linear maps as the dense
    ``D`` and ``pinv(D)`` (to float rounding: tests/test_training_runs.py), at about a seventh of
    their multiplications, forward and backward."""

    def __init__(self, lmax: int, order: int = 2, act=torch.relu):
        super().__init__()
        alpha, beta = _s2_healpix_angles(order)
        gamma = so3_healpix_grid_e3nn(order)[2, :6 * 2**order]       # the grid's in-plane angles
        self.n_dir, self.n_gamma = len(alpha), len(gamma)
        if self.n_gamma <= 2 * lmax:
            raise ValueError(f"an order-{order} SO(3) grid ({self.n_gamma} in-plane angles) cannot hold degree {lmax}")
        freq = torch.arange(1, lmax + 1, dtype=torch.float64)
        g64 = gamma.double()
        trig = torch.cat([torch.ones(1, len(gamma), dtype=torch.float64),       # (2 lmax + 1, n_gamma)
                          torch.cos(freq[:, None] * g64), torch.sin(freq[:, None] * g64)])
        n_terms = len(trig)
        rows = [[] for _ in range(n_terms)]     # per trigonometric term: (coefficient index, weighted P row)
        zero_d, zero_g = torch.zeros_like(alpha), torch.zeros_like(gamma)
        offset = 0
        for l in range(lmax + 1):
            w = 2 * l + 1
            Z = o3.wigner_D(l, zero_g.double(), zero_g.double(), g64)              # (n_gamma, w, w)
            # each entry of the in-plane factor in the trigonometric terms (exact: n_gamma > 2 lmax + 1)
            coef = torch.linalg.lstsq(trig.T, Z.reshape(len(gamma), -1)).solution   # (n_terms, w * w)
            if (trig.T @ coef - Z.reshape(len(gamma), -1)).abs().max() > 1e-5:   # e3nn keeps J in float32
                raise RuntimeError("the in-plane Wigner factor is not a trigonometric polynomial of degree lmax")
            P = (w ** 0.5) * o3.wigner_D(l, alpha.double(), beta.double(), zero_d.double())   # (n_dir, m, k)
            for term in range(n_terms):
                for kn in torch.nonzero(coef[term].abs() > 1e-5).flatten().tolist():
                    k, n = divmod(kn, w)
                    for m in range(w):   # D_mn = sum_k P_mk Z_kn: coefficient x_mn meets P[:, m, k] Z_kn
                        rows[term].append((offset + m * w + n, coef[term, kn] * P[:, m, k]))
            offset += w * w
        width = max(len(r) for r in rows)
        index = torch.zeros(n_terms, width, dtype=torch.long)
        weights = torch.zeros(n_terms, width, self.n_dir, dtype=torch.float64)    # padding rows stay 0
        for term, r in enumerate(rows):
            for j, (i, row) in enumerate(r):
                index[term, j], weights[term, j] = i, row
        self.dim = offset
        self.register_buffer("index", index, persistent=False)
        self.register_buffer("weights", weights.float(), persistent=False)            # (terms, width, n_dir)
        self.register_buffer("trig", trig.float(), persistent=False)                  # (terms, n_gamma)
        D = flat_wigner(lmax, *so3_healpix_grid_e3nn(order)).double()   # (n, dim), n > dim
        self.register_buffer("gram_inv", torch.linalg.inv(D.T @ D).float(), persistent=False)
        self.act = act

    def to_grid(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., sum_l (2l+1)^2)`` coefficients -> ``(..., n_dir * n_gamma)`` grid values (the
        grid's order: directions outer, in-plane angles inner)."""
        lead = x.shape[:-1]
        x = x.reshape(-1, self.dim)
        picked = x[:, self.index].transpose(0, 1)                                    # (terms, B, width)
        series = torch.bmm(picked, self.weights)                                     # (terms, B, n_dir)
        f = series.permute(1, 2, 0).reshape(-1, len(self.trig)) @ self.trig         # (B * n_dir, n_gamma)
        return f.reshape(*lead, self.n_dir * self.n_gamma)

    def from_grid(self, g: torch.Tensor) -> torch.Tensor:
        """The least-squares coefficients ``(..., sum_l (2l+1)^2)`` of grid values ``g``."""
        lead = g.shape[:-1]
        u = g.reshape(-1, self.n_gamma) @ self.trig.T                               # (B * n_dir, terms)
        u = u.reshape(-1, self.n_dir, len(self.trig)).permute(2, 0, 1)              # (terms, B, n_dir)
        part = torch.bmm(u, self.weights.transpose(1, 2))                           # (terms, B, width)
        h = part.new_zeros(part.shape[1], self.dim).index_add_(
            1, self.index.flatten(), part.transpose(0, 1).reshape(part.shape[1], -1))
        return (h @ self.gram_inv).reshape(*lead, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_grid(self.act(self.to_grid(x)))


class Image2Sphere(nn.Module):
    """``forward(images (B, N, N))`` -> ``logits`` over the training grid, plus (in eval mode) the
    refined ``matrix`` ``(B, 3, 3)``, ``quaternion`` and ``confidence`` (log of the probability
    mass within ``confidence_radius_deg`` of the best rotation)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.lmax = cfg.lmax
        self.blur = BlurStack(cfg.blur_sigmas)
        self.encoder = VGGEncoder(self.blur.out_channels, cfg.widths, cfg.dropout)
        c = cfg.widths[-1]
        self.project = _ImageToSphere(c, cfg.sphere_channels, self.lmax)
        self.s2conv = _S2Conv(cfg.sphere_channels, cfg.so3_channels, self.lmax)
        self.act = _GridActivation(self.lmax)
        self.so3conv = _SO3Conv(cfg.so3_channels, 1, self.lmax)
        grid = so3_healpix_grid_e3nn(cfg.grid_order)
        self.register_buffer("grid_D", flat_wigner(self.lmax, *grid), persistent=False)
        self.register_buffer("grid_matrix", o3.angles_to_matrix(*grid), persistent=False)
        self.shift = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * c, 128), nn.PReLU(128),
                                   nn.Linear(128, 2)) if cfg.predict_shifts else None
        self.confidence_radius_deg = 10.0

    def so3_signal(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encoder.features(self.blur(images[:, None]))
        x = self.project(f)
        x = self.act(self.s2conv(x))
        return self.so3conv(x)[:, 0], f                          # (B, sum (2l+1)^2)

    def forward(self, images: torch.Tensor) -> dict:
        coeffs, f = self.so3_signal(images)
        logits = coeffs @ self.grid_D.T                            # (B, n_grid)
        out = {"logits": logits, "grid_matrix": self.grid_matrix, "coeffs": coeffs}
        out["shift_px"] = (self.shift(f) if self.shift is not None
                           else torch.zeros(images.shape[0], 2, device=images.device))
        with torch.no_grad():
            prob = logits.softmax(-1)
            best = logits.argmax(-1)
            R = self.grid_matrix[best]
            if not self.training:
                R = self._refine(coeffs, R)
            # probability mass near the best cell: how peaked the distribution is
            cos_r = math.cos(math.radians(self.confidence_radius_deg))
            tr = torch.einsum("bij,nij->bn", R, self.grid_matrix)        # trace(R^T G)
            near = ((tr - 1) / 2) > cos_r
            mass = (prob * near).sum(-1).clamp(min=1e-8)
        out.update(matrix=R, quaternion=matrix_to_quaternion(R), confidence=torch.log(mass))
        return out

    def _grid_neighbours(self, radius_deg: float) -> torch.Tensor:
        """``(n, K)`` indices of the grid cells within ``radius_deg`` of each cell (padded with the
        cell itself); computed once, in chunks."""
        if getattr(self, "_neighbours", None) is None or self._neighbours[0] != radius_deg:
            G = self.grid_matrix
            cos_r = math.cos(math.radians(radius_deg))
            rows = []
            for s in range(0, len(G), 2048):
                near = ((torch.einsum("aij,bij->ab", G[s:s + 2048], G) - 1) / 2) > cos_r
                rows.extend(torch.nonzero(r).flatten() for r in near)
            k = max(len(r) for r in rows)
            nb = torch.stack([torch.cat([r, r[:1].expand(k - len(r))]) for r in rows])
            self._neighbours = (radius_deg, nb)
        return self._neighbours[1]

    @torch.no_grad()
    def top_k(self, out: dict, k: int, group: torch.Tensor, separation_deg: float = 15.0) -> dict:
        """The ``k`` most probable distinct poses from a forward pass's output: the highest local
        maxima of the grid distribution (no cell within 25 deg is higher), each refined like the main
        pose (rank 1 is the main pose) and at least ``separation_deg`` from the earlier ones and their
        symmetry mates (``group`` ``(G, 3, 3)``) after refinement: a peak whose refinement climbs
        onto an earlier pose is passed over for the next one. Returns ``matrix`` ``(B, k, 3, 3)`` and
        ``probability`` ``(B, k)``: the mass within ``confidence_radius_deg``. A particle with fewer
        than ``k`` distinct peaks repeats its last one with probability 0."""
        prob = out["logits"].softmax(-1)
        G = self.grid_matrix
        group = group.to(G.dtype)
        nb = self._grid_neighbours(25.0)
        avail = prob >= prob[:, nb].amax(-1)                          # local maxima
        cos_sep = math.cos(math.radians(separation_deg))
        cos_r = math.cos(math.radians(self.confidence_radius_deg))
        mats, probs = [], []
        for rank in range(k):
            R, best, found = self._next_peak(out["coeffs"], prob, avail, mats, group, separation_deg)
            if rank:   # no peak left: repeat the previous pose with probability 0
                R = torch.where(found[:, None, None], R, mats[-1])
            tr = torch.einsum("bij,nij->bn", R, G)
            probs.append((prob * (((tr - 1) / 2) > cos_r)).sum(-1) * found)
            mats.append(R)
            mates = G[best][:, None] @ group[None]                                # (B, |G|, 3, 3)
            tr_m = torch.einsum("bgij,nij->bgn", mates, G)
            avail &= ~(((tr_m - 1) / 2) > cos_sep).any(1)
        return {"matrix": torch.stack(mats, 1), "probability": torch.stack(probs, 1)}

    def _next_peak(self, coeffs, prob, avail, earlier: list, group, separation_deg: float, tries: int = 8):
        """The best available peak of each particle, refined, that stays ``separation_deg`` from the
        ``earlier`` poses (peaks that climb onto one are struck off ``avail``, in place) ->
        ``(R, best cell, found)``."""
        from ..core.symmetry import closest_mate_angle_deg

        G = self.grid_matrix
        R = best = found = None
        pending = torch.ones(len(prob), dtype=torch.bool, device=prob.device)
        for _ in range(tries):
            f = avail.any(-1)
            b = prob.masked_fill(~avail, -1.0).argmax(-1)
            r = self._refine(coeffs, G[b])
            if R is None:
                R, best, found = r, b, f
            else:
                R[pending], best[pending], found[pending] = r[pending], b[pending], f[pending]
            near = torch.zeros_like(pending)
            for M in earlier:
                near |= closest_mate_angle_deg(R, M, group) < separation_deg
            near &= found
            if not near.any():
                return R, best, found
            avail[near, best[near]] = False
            pending = near
        return R, best, found & ~near

    def _refine(self, coeffs: torch.Tensor, R: torch.Tensor, steps: int = 4) -> torch.Tensor:
        """Hill-climb the SO(3) signal from the best grid rotation with shrinking rotations about
        the 3 axes (deterministic)."""
        step = 60.0 / 2**self.cfg.grid_order / 2
        for _ in range(steps):
            D = axis_moves(step, R.device, R.dtype)                     # (7, 3, 3), the identity first
            cand = R[:, None] @ D[None]                                 # (B, K, 3, 3)
            ang = o3.matrix_to_angles(cand.reshape(-1, 3, 3).float())
            W = flat_wigner(self.lmax, *ang).reshape(cand.shape[0], cand.shape[1], -1)
            val = torch.einsum("bki,bi->bk", W, coeffs)
            R = cand[torch.arange(len(R)), val.argmax(-1)]
            step /= 2
        return R
