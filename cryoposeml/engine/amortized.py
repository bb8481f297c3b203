"""What ab initio and heterogeneity share: an encoder that amortizes poses, a decoder that is the map,
the particles at a working box, each particle's current pose (:class:`PoseBank`), the local search
against the decoder, and one training loop (:class:`EpochLoop`) with per-phase callbacks,
checkpoints that carry every random generator (``--resume`` continues exactly as an uninterrupted
run), the per-epoch log, ``metrics.csv`` and ``curves.png``.

The pose search itself is :mod:`cryoposeml.core.search` (shared with the reference matching of
verified prediction)."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..core.ctf import ctf_2d
from ..core.errors import InputError
from ..core.fourier import fft2_centered, frequency_index_2d, ifft2_centered, shift_phase_2d
from ..core.search import axis_moves, image_loss, pattern_search, shift_moves
from ..data.dataset import ParticleDataset
from ..data.preprocess import rescale
from ..data.star import read_star
from ..models import PoseNetConfig, build_model
from ._checkpoint import global_rng_state, restore, save_checkpoint, write_rows_csv
from .plots import save_figure

__all__ = ["ENCODERS", "MIN_REFINE_EPOCHS", "EpochLoop", "PoseBank", "pose_encoder", "working_set", "reference_rows",
           "radial_profile", "phase_flipped", "render", "pose_distance", "local_search"]

log = logging.getLogger(__name__)

ENCODERS = ("cnn", "equivariant")
#: epochs of local refinement that every schedule leaves at the end
MIN_REFINE_EPOCHS = 4


# -- data ------------------------------------------------------------------------------------------

def _load(star, box_px: int, progress: bool) -> tuple[torch.Tensor, float]:
    """Images rescaled to ``box_px`` (field of view kept), background mean removed, and one global
    scale for the whole set (so the decoder sees every particle at the same contrast)."""
    pixel_out = star.pixel_size_angstrom * star.box / box_px
    ds = ParticleDataset(star, transform=lambda imgs, idx: rescale(imgs, star.pixel_size_angstrom, pixel_out,
                                                                   box_px))
    out = ds.read_all("reading particles", progress)
    k = torch.arange(box_px) - box_px // 2
    outside = (k[:, None] ** 2 + k[None, :] ** 2) > (box_px / 2 - 2) ** 2
    out -= out[:, outside].mean(1)[:, None, None]
    out /= out[: min(len(out), 2048)].std().clamp(min=1e-12)
    return out, pixel_out


def working_set(star, box_px: int, progress: bool):
    """The particles at the working box (rescaled, background mean removed, one global scale), the
    pixel size there, and ``ctf_fn(idx)``: their CTFs at that box ``(len(idx), box_px, box_px)``
    (ones without CTF columns)."""
    images, pixel_out = _load(star, box_px, progress)
    ctf_params = star.ctf_params() if star.has_ctf() else None

    def ctf_fn(idx):
        if ctf_params is None:
            return torch.ones(len(idx), box_px, box_px)
        return ctf_2d(ctf_params.subset(idx), box_px, pixel_out)

    return images, pixel_out, ctf_fn


def reference_rows(star, reference):
    """The reference STAR (true poses) and, for each particle of ``star``, its row there."""
    ref = read_star(reference)
    ref.require(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "a pose reference")
    keys = {k: i for i, k in enumerate(ref.image_keys())}
    missing = [k for k in star.image_keys() if k not in keys]
    if missing:
        raise InputError(f"{len(missing)} particles are not in the reference (first: {missing[0]})", reference)
    return ref, np.array([keys[k] for k in star.image_keys()])


def radial_profile(images, ctf_fn, box: int, n: int = 1024) -> torch.Tensor:
    """Expected spectral amplitude of the map per shell: ``sqrt(<|Y|^2> / <CTF^2>)`` over (up to)
    ``n`` particles -- the decoder's preconditioner (central slices carry the map's amplitudes)."""
    idx = np.arange(min(len(images), n))
    kx, ky = frequency_index_2d(box)
    shell = torch.sqrt(kx**2 + ky**2).round().long().flatten()
    power = (fft2_centered(images[idx]).abs() ** 2).mean(0).flatten()
    ctf2 = (ctf_fn(idx) ** 2).mean(0).flatten()
    count = torch.bincount(shell).clamp(min=1)
    p = torch.zeros(len(count)).index_add_(0, shell, power) / count
    c = torch.zeros(len(count)).index_add_(0, shell, ctf2) / count
    # CTF zeros: a shell where the CTF is small everywhere says little; do not blow it up
    return torch.sqrt(p / c.clamp(min=0.05))


# -- networks and losses ---------------------------------------------------------------------------

def pose_encoder(encoder: str, box_px: int, widths) -> torch.nn.Module:
    """The pose encoder: ``cnn`` (6D head; the 4 x 4 pooled layout it was benchmarked with here) or
    ``equivariant`` (escnn D4)."""
    family = {"cnn": "sixd", "equivariant": "equivariant"}[encoder]
    return build_model(PoseNetConfig(family=family, box=box_px, widths=tuple(widths), dropout=0.0, pool_grid=4))


class PoseBank(torch.nn.Module):
    """Each particle's current best pose ``(n, 3, 3)`` and origin ``(n, 2)`` (px): set by the global
    search, then improved by local searches; buffers, so checkpoints carry them."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("matrix", torch.eye(3).repeat(n, 1, 1))
        self.register_buffer("origin", torch.zeros(n, 2))

    @torch.no_grad()
    def set(self, idx, A, origin) -> None:
        idx = torch.as_tensor(idx, device=self.matrix.device)
        self.matrix[idx] = A.to(self.matrix.dtype)
        self.origin[idx] = origin.to(self.origin.dtype)

    def forward(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.as_tensor(idx, device=self.matrix.device)
        return self.matrix[idx], self.origin[idx]


def phase_flipped(Y, ctf) -> torch.Tensor:
    """What the encoders see: the particle phase-flipped by its CTF, in real space."""
    return ifft2_centered(Y * torch.sign(ctf)).real


def render(slices: torch.Tensor, ctf, origins) -> torch.Tensor:
    """Slices ``(B, N, N)`` as the particles would show them: times CTF, shifted by the origins."""
    return slices * ctf * shift_phase_2d(-origins, slices.shape[-1])


def pose_distance(enc: dict, A_target, o_target) -> torch.Tensor:
    """An encoder's output ``enc`` against target poses: the squared Frobenius distance of the
    rotations plus the squared origin error in px, averaged over the batch."""
    return ((enc["matrix"] - A_target) ** 2).sum((-2, -1)).mean() + ((enc["shift_px"] - o_target) ** 2).sum(-1).mean()


@torch.no_grad()
def local_search(decoder: Callable, A, o, Y, ctf, band, delta_deg: float, repeats: int = 2):
    """Each particle's pose and origin refined against ``decoder`` (poses -> slices) by
    :func:`~cryoposeml.core.search.pattern_search`: turns by ``+-delta`` about x, y and z, origin steps
    of ``min(1, delta / 15)`` px along x and y, up to ``repeats`` rounds -> ``(A, o)``."""
    turns = axis_moves(delta_deg, A.device)
    moves = shift_moves(min(1.0, delta_deg / 15.0), diagonals=False, device=A.device)
    box = Y.shape[-1]

    def score(active, C, o_active):
        b, T = C.shape[:2]
        S = decoder(C.reshape(-1, 3, 3), active).reshape(b, T, box, box) * ctf[active, None]
        ph = shift_phase_2d(-(o_active[:, None] + moves[None]).reshape(-1, 2), box).reshape(b, len(moves), 1, box, box)
        return -image_loss(S[:, None] * ph, Y[active, None, None], band)                  # (b, O, T)

    res = pattern_search(score, A, o, turns, moves, repeats)
    return res["matrix"], res["origin"]


# -- the training loop -----------------------------------------------------------------------------

class EpochLoop:
    """The epochs of an ab initio or heterogeneity run.

    Each epoch: ``phase_of(epoch)`` names the phase (and may act, e.g. a class restart); the
    particles are shuffled; for each batch ``step(phase, epoch, step, idx)`` yields the losses of
    that batch in order, each followed by one optimiser step (backward, ``clip``, step) before the
    next is computed; ``finish(epoch, phase, row)`` adds the epoch's measurements to its row and
    returns a note for the log. Step callbacks add per-batch values to :attr:`acc` (``moved``: bool
    tensors, averaged into the row; anything else is theirs to read in ``finish``).

    After each epoch the checkpoint (model, optimiser, the shuffling generator, the device
    generator, torch's global random state, the loop's state), ``metrics.csv`` and ``curves.png`` are written; at the end the
    weights (without the pose bank) in ``weights.safetensors``."""

    def __init__(self, net, opt, *, n: int, batch_size: int, epochs: int, seed: int, device, out: Path,
                 name: str, figure: Callable, clip: Callable):
        self.net, self.opt, self.n, self.batch_size, self.epochs = net, opt, n, batch_size, epochs
        self.device, self.out, self.name, self.figure, self.clip = device, Path(out), name, figure, clip
        self.gen = torch.Generator().manual_seed(seed)
        self.gen_device = torch.Generator(device=device).manual_seed(seed + 1)
        self.state = {"epoch": 0, "rows": []}
        self.steps = max(1, n // batch_size)
        self.acc: dict = defaultdict(list)

    @property
    def rows(self) -> list[dict]:
        return self.state["rows"]

    @property
    def checkpoint(self) -> Path:
        return self.out / "checkpoint.pt"

    def resume(self) -> None:
        """Continue from the checkpoint in ``out``, if there is one."""
        if self.checkpoint.exists():
            self.state = restore(self.checkpoint, self.device, self.net, self.opt, self.gen,
                                 device_generator=self.gen_device)
            log.info("resuming %s at epoch %d", self.out, self.state["epoch"])

    def run(self, phase_of: Callable, step: Callable[..., Iterable[torch.Tensor]], finish: Callable,
            progress: bool, prefix: str = "") -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for epoch in range(self.state["epoch"], self.epochs):
            t_epoch = time.perf_counter()
            perm = torch.randperm(self.n, generator=self.gen).numpy()
            phase = phase_of(epoch)
            self.acc = defaultdict(list)
            losses = []
            bar = tqdm(range(self.steps), desc=f"{self.name} epoch {epoch + 1}/{self.epochs} ({phase})",
                       disable=not progress, leave=False)
            for s in bar:
                idx = np.sort(perm[s * self.batch_size:(s + 1) * self.batch_size])
                for k, loss in enumerate(step(phase, epoch, s, idx)):
                    if k == 0:
                        losses.append(float(loss.detach()))
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.clip()
                    self.opt.step()
            row = {"epoch": epoch + 1, "phase": phase, "loss": float(np.mean(losses)),
                   "epoch_s": time.perf_counter() - t_epoch}
            if self.acc["moved"]:
                # the fraction of particles whose best pose moved by more than a grid step since
                # their last visit (the whole set in the first epoch): the search's convergence measure
                row["moved"] = float(torch.cat(self.acc["moved"]).float().mean())
            note = finish(epoch, phase, row)
            self.rows.append(row)
            self.state["epoch"] = epoch + 1
            log.info("%sepoch %d (%s): loss %.4g%s%s", prefix, epoch + 1, phase, row["loss"],
                     f", {100 * row['moved']:.0f}% of best poses moved" if "moved" in row else "", note)
            save_checkpoint(self.checkpoint, {**global_rng_state(), "model": self.net.state_dict(),
                                              "optimizer": self.opt.state_dict(),
                                              "generator": self.gen.get_state(),
                                              "device_generator": self.gen_device.get_state(),
                                              "state": json.dumps(self.state)})
            write_rows_csv(self.out / "metrics.csv", self.rows)
            save_figure(self.figure(self.rows), self.out / "curves.png")
        save_file({k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items()
                   if not k.startswith("bank.")}, str(self.out / "weights.safetensors"))
