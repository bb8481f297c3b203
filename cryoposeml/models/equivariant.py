"""D4-equivariant pose network (seed 004, equivariant amortized inference), built on escnn.

A steerable CNN on the group of 90-degree turns and mirrors of the image plane. Its output fields
are chosen so that the pose follows the image exactly (seed 004, eq. 4; :mod:`cryoposeml.core.inplane`):

* two 3-vectors of type ``phi_r = (standard 2-d irrep) + (the sign of the mirror)``: a turn of the
  image turns them about z, a mirror maps them by ``diag(-1, 1, -1)``; Gram-Schmidt (s2s2) makes
  the pose matrix ``A`` from them, so ``A' = T3 @ A``;
* the shift, a planar vector: ``origin' = T @ origin``;
* a confidence, invariant (trained to predict ``-log`` of the angular error, like the 6D head).

Exactness on a pixel grid: the network sees the image cropped to the odd box ``N - 1`` (dropping
row and column 0, so the particle centre ``N // 2`` is the grid's centre) and zero-padded by one
pixel; it downsamples only while the centre stays on a sampled pixel, and its last layer is one
convolution over the whole remaining map. Every operation then commutes with D4 and the
equivariance holds to rounding (tested).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..core.inplane import D4, transform_images
from ..core.rotations import matrix_to_quaternion, sixd_to_matrix
from .encoders import BlurStack

__all__ = ["EquivariantPoseNet"]


def _match_group_elements(gspace) -> list[tuple[object, np.ndarray]]:
    """Pair each escnn D4 element with our integer matrix ``T`` that moves pixels the same way
    (found by transforming a random odd-sized image both ways)."""
    from escnn import nn as enn

    ftype = enn.FieldType(gspace, [gspace.trivial_repr])
    img = torch.randn(1, 1, 7, 7, generator=torch.Generator().manual_seed(0))
    pairs = []
    for g in gspace.fibergroup.elements:
        moved = enn.GeometricTensor(img, ftype).transform(g).tensor
        match = [T for T in D4 if torch.allclose(transform_images(img, T), moved)]
        if len(match) != 1:
            raise RuntimeError(f"escnn element {g} matches {len(match)} in-plane transforms")
        pairs.append((g, match[0]))
    return pairs


def _intertwiner(rep, pairs, target) -> np.ndarray:
    """``Q`` with ``Q rep(g) = target(T) Q`` for all pairs (Schur averaging), orthonormalised."""
    X = np.random.default_rng(0).standard_normal((target(D4[0]).shape[0], rep.size))
    Q = sum(target(T) @ X @ np.linalg.inv(rep(g)) for g, T in pairs) / len(pairs)
    u, _, vt = np.linalg.svd(Q)
    return u @ vt


class EquivariantPoseNet(nn.Module):
    """``forward(images (B, N, N))`` -> dict with ``matrix``, ``quaternion``, ``confidence``,
    ``shift_px`` (as the other families)."""

    def __init__(self, cfg):
        super().__init__()
        from escnn import gspaces
        from escnn import nn as enn

        self.cfg = cfg
        gs = gspaces.flipRot2dOnR2(N=4)
        G = gs.fibergroup
        pairs = _match_group_elements(gs)
        std = G.irrep(1, 1)
        # the 1-d irrep equal to det(T): +1 on turns, -1 on mirrors
        sign = next(r for r in G.irreps() if r.size == 1 and
                    all(np.isclose(r(g)[0, 0], round(np.linalg.det(T))) for g, T in pairs))
        self.register_buffer("q2", torch.as_tensor(_intertwiner(std, pairs, lambda T: T.astype(float)),
                                                   dtype=torch.float32), persistent=False)

        self.blur = BlurStack(cfg.blur_sigmas)
        ftype = enn.FieldType(gs, self.blur.out_channels * [gs.trivial_repr])
        self.in_type = ftype
        size = cfg.box + 1             # crop to N - 1, pad by one on each side
        layers = []
        for i, w in enumerate(cfg.widths):
            hidden = enn.FieldType(gs, max(1, w // 8) * [gs.regular_repr])
            layers += [enn.R2Conv(ftype, hidden, 3, padding=1, bias=False), enn.InnerBatchNorm(hidden),
                       enn.ReLU(hidden, inplace=True),
                       enn.R2Conv(hidden, hidden, 3, padding=1, bias=False), enn.InnerBatchNorm(hidden),
                       enn.ReLU(hidden, inplace=True)]
            ftype = hidden
            centre = size // 2
            if i < len(cfg.widths) - 1 and centre % 2 == 0 and size > 5:
                layers += [enn.PointwiseMaxPool2D(hidden, kernel_size=3, stride=2, padding=1),
                           enn.PointwiseDropout(hidden, p=cfg.dropout)]
                size = centre + 1
        head_type = enn.FieldType(gs, 32 * [gs.regular_repr])
        out_reps = [std, sign, std, sign]                      # two phi_r
        if cfg.predict_shifts:
            out_reps += [std]
        out_reps += [gs.trivial_repr]                          # confidence
        self.out_type = enn.FieldType(gs, out_reps)
        layers += [enn.R2Conv(ftype, head_type, size, padding=0), enn.InnerBatchNorm(head_type),
                   enn.ReLU(head_type, inplace=True), enn.PointwiseDropout(head_type, p=cfg.dropout),
                   enn.R2Conv(head_type, self.out_type, 1)]
        self.net = enn.SequentialModule(*layers)

    def forward(self, images: torch.Tensor) -> dict:
        from escnn import nn as enn

        x = self.blur(images[:, None, 1:, 1:])
        x = nn.functional.pad(x, (1, 1, 1, 1))
        h = self.net(enn.GeometricTensor(x, self.in_type)).tensor[:, :, 0, 0]
        q2 = self.q2.to(h.dtype)
        v1 = torch.cat([h[:, 0:2] @ q2.T, h[:, 2:3]], 1)
        v2 = torch.cat([h[:, 3:5] @ q2.T, h[:, 5:6]], 1)
        R = sixd_to_matrix(torch.cat([v1, v2], 1))
        if self.cfg.predict_shifts:
            shift = h[:, 6:8] @ q2.T
        else:
            shift = torch.zeros(h.shape[0], 2, dtype=h.dtype, device=h.device)
        return {"matrix": R, "quaternion": matrix_to_quaternion(R), "confidence": h[:, -1], "shift_px": shift}
