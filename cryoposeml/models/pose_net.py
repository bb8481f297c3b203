"""Supervised pose networks: image -> rotation (+ confidence) and in-plane shift."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .encoders import BlurStack, VGGEncoder
from .heads import BinghamHead, ShiftHead, SixDHead

__all__ = ["PoseNetConfig", "PoseNet", "build_model"]


@dataclass
class PoseNetConfig:
    family: str = "bingham"
    box: int = 64
    widths: tuple = (32, 64, 128, 256)
    dropout: float = 0.1
    blur_sigmas: tuple = (1.0, 2.0, 4.0)
    predict_shifts: bool = True
    # bingham and sixd only (see the encoder and the head)
    pool_grid: int = 8
    head_form: str = "symmetric"
    # image2sphere only
    lmax: int = 6
    sphere_channels: int = 32
    so3_channels: int = 16
    grid_order: int = 2

    def to_dict(self) -> dict:
        d = asdict(self)
        d["widths"], d["blur_sigmas"] = list(self.widths), list(self.blur_sigmas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PoseNetConfig":
        d = dict(d)
        d["widths"], d["blur_sigmas"] = tuple(d["widths"]), tuple(d["blur_sigmas"])
        # models written before these fields existed had a 4 x 4 pooled layout and a Cholesky head
        d.setdefault("pool_grid", 4)
        d.setdefault("head_form", "cholesky")
        return cls(**d)


class PoseNet(nn.Module):
    """cryo-forum's network: blurring layer -> VGG/GeM encoder -> Bingham (QCQP) head + shift head.

    ``forward(images (B, N, N))`` returns the head's dict plus ``shift_px`` ``(B, 2)`` (zeros when
    the model does not predict shifts).
    """

    def __init__(self, cfg: PoseNetConfig):
        super().__init__()
        self.cfg = cfg
        self.blur = BlurStack(cfg.blur_sigmas)
        self.encoder = VGGEncoder(self.blur.out_channels, cfg.widths, cfg.dropout, grid=cfg.pool_grid)
        if cfg.family == "bingham":
            self.rotation = BinghamHead(self.encoder.out_features, dropout=cfg.dropout, form=cfg.head_form)
        else:
            self.rotation = SixDHead(self.encoder.out_features, dropout=cfg.dropout)
        self.shift = ShiftHead(self.encoder.out_features) if cfg.predict_shifts else None

    def forward(self, images: torch.Tensor) -> dict:
        feats = self.encoder(self.blur(images[:, None]))
        out = self.rotation(feats)
        out["shift_px"] = self.shift(feats) if self.shift is not None else torch.zeros(
            images.shape[0], 2, dtype=feats.dtype, device=feats.device)
        return out


def build_model(cfg: PoseNetConfig) -> nn.Module:
    """The network of ``cfg.family`` (:mod:`cryoposeml.families`)."""
    from ..families import family

    return family(cfg.family).network_class()(cfg)
