"""The model families: the one place a supervised pose network is declared.

A family names its network (a module of :mod:`cryoposeml.models` with a class built from a
:class:`~cryoposeml.models.PoseNetConfig`), its training loss (a function of
:mod:`cryoposeml.models.losses` with the signature of :func:`cryoposeml.models.losses.distribution_loss`),
what it can do (a distribution over poses, whose ``top_k`` gives several proposals per particle; a
learned confidence), its default dropout, its citations and the text the Scipion form shows. The
CLI's choices, ``train``, ``predict`` and the Scipion protocols read this table.

Adding a family: one new module in ``cryoposeml/models/`` and one :class:`Family` line below
(CONTRIBUTING.md). The order is the Scipion form's: a saved project keeps the index it chose, so
new families go at the end.

This module imports nothing heavy: Scipion's side reads it without torch.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Family", "FAMILIES", "family", "family_names"]


@dataclass(frozen=True)
class Family:
    name: str
    network: str                 # "module:Class" of the torch module, built as Class(PoseNetConfig)
    loss: str                    # "module:function" of the training loss
    summary: str                 # one line for the Scipion form and the CLI's help
    citations: tuple = ()        # keys of cryoposeml/protocols.bib
    distribution: bool = False   # a distribution over poses: ``top_k`` proposals, cross-entropy training
    learns_confidence: bool = False   # a confidence output trained to predict the angular error
    dropout: float = 0.1         # the default dropout. The regression heads underfit with it: bingham on the
                                 # 2,800-particle test set, 17.5 deg held-out median without, 21 deg with 0.1

    def _load(self, ref: str):
        module, attr = ref.split(":")
        return getattr(importlib.import_module(module), attr)

    def network_class(self):
        return self._load(self.network)

    def loss_function(self):
        return self._load(self.loss)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("image2sphere", "cryoposeml.models.image2sphere:Image2Sphere", "cryoposeml.models.losses:distribution_loss",
           "an SO(3) distribution from the image projected onto the sphere (CESPED / Image2Sphere); best accuracy",
           citations=("Cesped2024",), distribution=True),
    Family("equivariant", "cryoposeml.models.equivariant:EquivariantPoseNet", "cryoposeml.models.losses:regression_loss",
           "a D4-equivariant escnn encoder with a quaternion and confidence head",
           citations=("Cesped2024", "Equivariant2025"), learns_confidence=True),
    Family("bingham", "cryoposeml.models.pose_net:PoseNet", "cryoposeml.models.losses:regression_loss",
           "cryo-forum's blurring layer, VGG/GeM encoder and 10-parameter Bingham (QCQP) quaternion head "
           "(its confidence is the Bingham concentration)",
           citations=("Fang2025",), dropout=0.0),
    Family("sixd", "cryoposeml.models.pose_net:PoseNet", "cryoposeml.models.losses:regression_loss",
           "the same encoder with a 6D (Gram-Schmidt) rotation head and a learned confidence: a baseline",
           citations=("Cesped2024",), learns_confidence=True, dropout=0.0),
)}


def family_names() -> tuple[str, ...]:
    return tuple(FAMILIES)


def family(name: str) -> Family:
    """The family called ``name``; a clear error naming the choices otherwise."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r} (available: {', '.join(FAMILIES)})") from None
