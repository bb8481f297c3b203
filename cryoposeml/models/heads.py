"""Rotation and shift heads (torch modules only).

``BinghamHead`` (cryo-forum / QCQP, Peretroukhin et al.): a 10-dim output fills a symmetric 4x4
matrix ``M`` whose eigenvector of the smallest eigenvalue is the unit quaternion (differentiable
through ``eigh``). ``M`` also defines a Bingham distribution: the eigen-gaps ``lambda_i - lambda_1``
are its dispersions, and their sum is the confidence score. The 10 numbers are ``M``'s upper
triangle (Peretroukhin's parameterisation, ``form="symmetric"``); the first networks filled a
Cholesky factor ``L`` with ``M = L L^T`` (``form="cholesky"``, kept to load them), which learned
more slowly: 43 deg against 35 deg held-out median on the 2,800-particle test set.
"""
from __future__ import annotations

import torch
from torch import nn

from ..core.rotations import quaternion_to_matrix

__all__ = ["BinghamHead", "ShiftHead"]

_TRIL = torch.tril_indices(4, 4)
_TRIU = torch.triu_indices(4, 4)
HEAD_FORMS = ("symmetric", "cholesky")


def _mlp(in_features: int, hidden: int, out_features: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.PReLU(hidden), nn.Dropout(dropout),
                         nn.Linear(hidden, out_features))


class BinghamHead(nn.Module):
    """``(B, F)`` features -> dict with ``quaternion`` ``(B, 4)`` (x, y, z, w), ``matrix``
    ``(B, 3, 3)``, ``dispersion`` ``(B, 3)`` and ``confidence`` ``(B,)`` = log(sum of dispersions)."""

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.1, form: str = "symmetric"):
        super().__init__()
        if form not in HEAD_FORMS:
            raise ValueError(f"unknown Bingham head form {form!r} (available: {', '.join(HEAD_FORMS)})")
        self.form = form
        self.mlp = _mlp(in_features, hidden, 10, dropout)

    def forward(self, features: torch.Tensor) -> dict:
        v = self.mlp(features)
        M = torch.zeros(v.shape[0], 4, 4, dtype=v.dtype, device=v.device)
        if self.form == "symmetric":
            M[:, _TRIU[0], _TRIU[1]] = v
            M = M + M.transpose(-1, -2) - torch.diag_embed(torch.diagonal(M, dim1=-2, dim2=-1))
        else:
            M[:, _TRIL[0], _TRIL[1]] = v
            M = M @ M.transpose(-1, -2) + 1e-5 * torch.eye(4, dtype=v.dtype, device=v.device)
        evals, evecs = torch.linalg.eigh(M.float() if M.dtype in (torch.float16, torch.bfloat16) else M)
        q = evecs[..., 0]
        q = q * torch.where(q[..., 3:] < 0, -1.0, 1.0)  # canonical sign (w >= 0)
        disp = (evals[..., 1:] - evals[..., :1]).clamp(min=1e-8)
        return {"quaternion": q, "matrix": quaternion_to_matrix(q), "dispersion": disp,
                "confidence": torch.log(disp.sum(-1))}


class ShiftHead(nn.Module):
    """``(B, F)`` -> ``(B, 2)`` Relion origins in pixels of the network's box."""

    def __init__(self, in_features: int, hidden: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, hidden), nn.PReLU(hidden), nn.Linear(hidden, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class SixDHead(nn.Module):
    """``(B, F)`` -> 6D rotation (Gram-Schmidt to ``matrix``), a quaternion of it, and a learned
    ``confidence``, trained to predict ``-log(error in radians)`` (see the training loss)."""

    def __init__(self, in_features: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.mlp = _mlp(in_features, hidden, 7, dropout)

    def forward(self, features: torch.Tensor) -> dict:
        from ..core.rotations import matrix_to_quaternion, sixd_to_matrix

        v = self.mlp(features)
        R = sixd_to_matrix(v[:, :6])
        return {"matrix": R, "quaternion": matrix_to_quaternion(R), "confidence": v[:, 6]}
