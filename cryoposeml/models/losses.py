"""Pose losses, symmetry-aware (labels are expanded over the point group, the closest mate counts)."""
from __future__ import annotations

import torch

from ..core.rotations import matrix_to_quaternion
from ..core.symmetry import closest_mate_angle_deg

__all__ = ["symmetric_quaternion_loss", "siamese_distance_loss", "confidence_regression_loss", "grid_cross_entropy"]


def symmetric_quaternion_loss(q_pred: torch.Tensor, A_label: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Per-particle chordal quaternion loss ``min_g (1 - |<q_pred, q(A g)>|)`` = ``1 - cos(theta / 2)``
    (sign-invariant), ``theta`` the angle to the closest symmetry mate ``A_label @ g``. Unlike
    ``1 - <q, q'>^2`` its gradient does not vanish for poses far from the label."""
    mates = A_label.unsqueeze(1) @ group                       # (B, G, 3, 3)
    q_mates = matrix_to_quaternion(mates)                     # (B, G, 4)
    dots = torch.einsum("bi,bgi->bg", q_pred, q_mates).abs()
    return 1 - dots.max(dim=1).values


def siamese_distance_loss(A_pred: torch.Tensor, A_label: torch.Tensor, group: torch.Tensor,
                          n_bins: int = 6, generator: torch.Generator | None = None) -> torch.Tensor:
    """cryo-forum's distance loss: for random pairs (i, j) of the batch, the predicted poses must
    be as far apart as the labels are: ``|d(Ri, Rj) - d(Li, Lj)| / 180``. Pairs are stratified: each
    bin of label distance weighs the same, so rare near and far pairs are not drowned out."""
    b = A_pred.shape[0]
    i = torch.arange(b, device=A_pred.device).repeat(4)
    j = torch.randint(0, b, (4 * b,), device=A_pred.device, generator=generator)
    keep = i != j
    i, j = i[keep], j[keep]
    with torch.no_grad():
        d_label = closest_mate_angle_deg(A_label[i], A_label[j], group)
        max_d = float(d_label.max().clamp(min=1e-6))
        bins = (d_label / max_d * n_bins).long().clamp(max=n_bins - 1)
        counts = torch.bincount(bins, minlength=n_bins).float()
        w = 1.0 / counts[bins]
        w = w / w.sum()
    d_pred = closest_mate_angle_deg(A_pred[i], A_pred[j], group)
    return (w * (d_pred - d_label).abs()).sum() / 180.0



def confidence_regression_loss(confidence: torch.Tensor, q_loss: torch.Tensor) -> torch.Tensor:
    """Teach a head's ``confidence`` to be ``-log(angular error)``: ``q_loss`` is the per-particle
    ``1 - cos(theta / 2)`` of :func:`symmetric_quaternion_loss` (detached here, so only the
    confidence output learns from it)."""
    theta = 2 * torch.acos((1 - q_loss.detach()).clamp(-1.0, 1.0 - 1e-7))
    return torch.nn.functional.smooth_l1_loss(confidence, -torch.log(theta + 1e-3))


def grid_cross_entropy(logits: torch.Tensor, grid_matrix: torch.Tensor, A_label: torch.Tensor,
                       group: torch.Tensor) -> torch.Tensor:
    """CESPED's loss: cross-entropy against the grid cells nearest to each symmetry mate of the
    label, each mate weighing ``1/|G|``. Returns per-particle losses ``(B,)``."""
    mates = A_label.unsqueeze(1) @ group                               # (B, G, 3, 3)
    tr = torch.einsum("bgij,nij->bgn", mates, grid_matrix)              # trace(M^T R_n)
    target = tr.argmax(-1)                                             # (B, G)
    logp = logits.log_softmax(-1)
    return -logp.gather(1, target).mean(1)
