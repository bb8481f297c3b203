"""``cryoposeml abinitio``: unsupervised amortized reconstruction (cryoPoseNet / cryoAI).

An encoder maps each particle image to a pose (s2s2 rotation) and a shift; a decoder holds the
volume and renders the central slice at that pose; the loss compares the rendered slice, times
the particle's CTF and shift phase, with the particle's spectrum. Nothing is known about the poses
beforehand: the map and the poses are learned together from random initialisation.

Training runs in two phases (``--search-epochs``, default half of the epochs):

1. **Pose search.** Each batch is compared with the decoder's slices at every rotation of a
   HEALPix grid (order 2: 4,608 rotations) and whole-pixel origins; each particle's pose is drawn
   from its posterior (noise level from the best match, times a temperature annealed from 10 to 1)
   and the decoder learns from the drawn poses, while the compared band grows from 1/5 of Nyquist
   to Nyquist (frequency marching). The encoder learns to predict each particle's best pose. After
   ``search_epochs`` the search goes on while the poses still move: while more than
   ``search_until_stable`` (10%) of the particles' best poses moved by over a grid step in the last
   epoch, leaving 4 epochs for the refinement.
2. **Refinement.** Each particle's pose (kept per particle) is improved by local searches whose
   step shrinks by 0.6 every epoch; the decoder learns from the refined poses; the encoder keeps learning
   to predict them. A particle's output pose is the encoder's or the refined one, whichever the
   map explains better.

With ``--search-epochs 0`` training is amortized from the start, as cryoAI is published: the
image loss alone trains encoder and decoder. On small sets (thousands of particles) that rarely
converges in a CPU budget; the search is what makes the small-scale runs converge (see the
README's benchmark). Measured on 2,000 noise-free particles at 32 px: with the true map fixed in
the decoder, the CNN encoder trained on the image loss collapsed to one viewing direction, and
per-particle gradient descent from random poses came within 5 degrees for 16% of 200 particles.

Encoders: ``cnn`` (a Gaussian pyramid -- the image plus blurred copies -- into a VGG/GeM CNN, 6D
head) or ``equivariant`` (the escnn D4 network of :mod:`cryoposeml.models.equivariant`).
Decoders: ``voxel`` (explicit volume, Fourier-preconditioned) or ``fouriernet`` (SIREN), see
:mod:`cryoposeml.models.decoders`. Losses (the amortized image loss): ``l2``; ``symmetric``
(cryoAI: the smaller of the losses of the image and of its copy turned by 180 degrees, each
encoded separately -- it lets the encoder escape the in-plane pi-ambiguity of projections);
``mirror`` (the same over the image, its 180-degree turn and its two mirrors). With the D4 encoder
the copies' losses are equal by construction, so ``l2`` is enough (seed 004).

The folder: ``abinitio.json`` (written last), ``poses.star`` (the input particles with the
predicted poses), ``map.mrc`` and ``map_half1/2.mrc`` (reconstructed from them, at the input box),
``decoder_map.mrc`` (the decoder's own volume), ``metrics.csv``, ``curves.png``,
``weights.safetensors``, ``checkpoint.pt`` (``--resume``). With ``--reference`` (a STAR with the
true poses, e.g. ``ground_truth.star`` from ``simulate``) every epoch logs seed 004's pose error
after the best global alignment (MSE / MedSE of ``||R - R_true||_F^2``), for the output poses and
for the encoder's alone, and with ``--reference-map`` the final FSC against the true map.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..core.ctf import ctf_2d
from ..core.errors import InputError
from ..core.grids import grid_spacing_deg, healpix_so3_grid
from ..core.fourier import fft2_centered, frequency_index_2d, ifft2_centered, shift_phase_2d
from ..core.inplane import D4, transform_images, transform_poses
from ..core.metrics import align_poses_globally, fsc, resolution_at, soft_sphere_mask
from ..core.rotations import geodesic_distance_deg
from ..data.bundled import resolve_map
from ..data.dataset import ParticleDataset
from ..data.mrc import read_map, write_map
from ..data.preprocess import rescale
from ..data.star import read_star, write_star
from ..models import PoseNetConfig, build_model
from ..models.decoders import DECODERS, build_decoder
from ._checkpoint import restore, save_checkpoint, write_rows_csv
from ._outputs import check_run_folder, stamp, write_json
from .plots import abinitio_figure, save_figure
from .reconstruct import half_map_paths, half_set_labels, reconstruct_star
from .train import resolve_device

__all__ = ["AbinitioConfig", "abinitio", "ENCODERS", "LOSSES"]

log = logging.getLogger(__name__)

ENCODERS = ("cnn", "equivariant")
LOSSES = ("l2", "symmetric", "mirror")
#: in-plane copies compared by each loss (indices into core.inplane.D4: 0 identity, 2 = 180-degree
#: turn, 4 = mirror in x, 6 = mirror in y)
_COPIES = {"l2": (0,), "symmetric": (0, 2), "mirror": (0, 2, 4, 6)}
#: converged: median pose error under ~10 degrees (||R - R'||_F^2 = 8 sin^2(theta / 2))
CONVERGED_MEDSE = 8 * np.sin(np.radians(10) / 2) ** 2


@dataclass
class AbinitioConfig:
    encoder: str = "equivariant"
    decoder: str = "voxel"
    loss: str = "l2"
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3               # encoder
    lr_decoder: float = 5e-2
    box_px: int = 64
    widths: tuple = (16, 32, 64, 128)
    frequency_marching: bool = True
    search_epochs: int | None = None   # global pose search during the first epochs (None: half of them)
    search_order: int = 2              # HEALPix order of the search grid (4,608 rotations, ~15 degrees)
    search_shift_px: int = 1           # search origins on a (2k+1)^2 grid of whole pixels
    search_temperature: float = 10.0   # posterior temperature at the start, annealed to 1
    search_until_stable: float = 0.1   # after search_epochs, go on searching while more than this
                                       # fraction of best poses moved by over a grid step in an epoch
    search_refresh_steps: int = 4      # render the search grid's slices every this many batches
    halves: bool = False           # one independent run per half-set (gold standard)
    seed: int = 0
    device: str = "auto"

    def n_search_epochs(self) -> int:
        return self.epochs // 2 if self.search_epochs is None else min(self.search_epochs, self.epochs)


def _load(star, box_px: int, progress: bool) -> tuple[torch.Tensor, float]:
    """Images rescaled to ``box_px`` (field of view kept), background mean removed, and one global
    scale for the whole set (so the decoder sees every particle at the same contrast)."""
    pixel_out = star.pixel_size_angstrom * star.box / box_px
    ds = ParticleDataset(star, transform=lambda imgs, idx: rescale(imgs, star.pixel_size_angstrom, pixel_out,
                                                                   box_px))
    out = ds.read_all("abinitio: reading", progress)
    k = torch.arange(box_px) - box_px // 2
    outside = (k[:, None] ** 2 + k[None, :] ** 2) > (box_px / 2 - 2) ** 2
    out -= out[:, outside].mean(1)[:, None, None]
    out /= out[: min(len(out), 2048)].std().clamp(min=1e-12)
    return out, pixel_out


def _working_set(star, box_px: int, progress: bool):
    """The particles at the working box (:func:`_load`), the pixel size there, and ``ctf_fn(idx)``:
    their CTFs at that box ``(len(idx), box_px, box_px)`` (ones without CTF columns)."""
    images, pixel_out = _load(star, box_px, progress)
    ctf_params = star.ctf_params() if star.has_ctf() else None

    def ctf_fn(idx):
        if ctf_params is None:
            return torch.ones(len(idx), box_px, box_px)
        return ctf_2d(ctf_params.subset(idx), box_px, pixel_out)

    return images, pixel_out, ctf_fn


def _reference_rows(star, reference):
    """The reference STAR (true poses) and, for each particle of ``star``, its row there."""
    ref = read_star(reference)
    ref.require(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "a pose reference")
    keys = {k: i for i, k in enumerate(ref.image_keys())}
    missing = [k for k in star.image_keys() if k not in keys]
    if missing:
        raise InputError(f"{len(missing)} particles are not in the reference (first: {missing[0]})", reference)
    return ref, np.array([keys[k] for k in star.image_keys()])


class _AbinitioNet(torch.nn.Module):
    def __init__(self, cfg: AbinitioConfig):
        super().__init__()
        family = {"cnn": "sixd", "equivariant": "equivariant"}[cfg.encoder]
        # the cnn encoder keeps the 4 x 4 pooled layout it was benchmarked with here
        self.encoder = build_model(PoseNetConfig(family=family, box=cfg.box_px, widths=tuple(cfg.widths),
                                                 dropout=0.0, pool_grid=4))
        self.decoder = build_decoder(cfg.decoder, cfg.box_px)
        self.bank = None

    def add_bank(self, n: int) -> None:
        self.bank = _PoseBank(n)


class _PoseBank(torch.nn.Module):
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


def _local_moves(delta_deg: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Small moves for a local search: the identity and turns by ``delta`` about +-x, +-y, +-z
    ``(7, 3, 3)``; origin steps of ``delta / 15`` px (0 and +-x, +-y) ``(5, 2)``."""
    from scipy.spatial.transform import Rotation

    vecs = np.vstack([np.zeros(3), np.eye(3), -np.eye(3)]) * np.radians(delta_deg)
    turns = torch.as_tensor(Rotation.from_rotvec(vecs).as_matrix(), dtype=torch.float32, device=device)
    step = min(1.0, delta_deg / 15.0)
    moves = torch.tensor([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=torch.float32, device=device) * step
    return turns, moves


@torch.no_grad()
def _local_search(decoder, A, o, Y, ctf, band, delta_deg: float):
    """Each particle's best of its pose and origin moved by :func:`_local_moves` -> ``(A, o)``."""
    turns, moves = _local_moves(delta_deg, A.device)
    B, box = len(A), Y.shape[-1]
    cand = (A[:, None] @ turns[None]).reshape(-1, 3, 3)                              # (B*7, 3, 3)
    S = decoder(cand).reshape(B, len(turns), box, box) * ctf[:, None]
    origins = o[:, None] + moves[None]                                               # (B, 5, 2)
    ph = shift_phase_2d(-origins.reshape(-1, 2), box).reshape(B, len(moves), 1, box, box)
    loss = _image_loss(S[:, None] * ph, Y[:, None, None], band)                      # (B, 5, 7)
    best = loss.reshape(B, -1).argmin(1)
    bo, bt = best // len(turns), best % len(turns)
    ar = torch.arange(B, device=A.device)
    return cand.reshape(B, len(turns), 3, 3)[ar, bt], origins[ar, bo]


def _radial_profile(images, ctf_fn, box: int, n: int = 1024) -> torch.Tensor:
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


def _render(net, enc_in, ctf):
    out = net.encoder(enc_in)
    spec = net.decoder(out["matrix"]) * ctf * shift_phase_2d(-out["shift_px"], enc_in.shape[-1])
    return spec, out


def _image_loss(spec, Y, band) -> torch.Tensor:
    """Per-particle mean squared spectral difference inside ``band`` (divided by N^2, Parseval: a
    per-pixel mean squared error of the band-passed images)."""
    return ((spec - Y).abs() ** 2 * band).sum((-2, -1)) / (band.sum() * Y.shape[-1] ** 2)


def _copy_losses(net, raw, ctf, copies, band) -> tuple[torch.Tensor, list[dict]]:
    """Per-copy, per-particle losses ``(len(copies), B)`` -- the mean squared spectral difference
    inside ``band`` -- and the encoder's outputs for each copy (poses of the transformed image)."""
    per_copy, outs = [], []
    for c in copies:
        x = raw if c == 0 else transform_images(raw, D4[c])
        cc = ctf if c == 0 else transform_images(ctf, D4[c])
        Y = fft2_centered(x)
        enc_in = ifft2_centered(Y * torch.sign(cc)).real          # the encoder sees phase-flipped images
        spec, out = _render(net, enc_in, cc)
        per_copy.append(_image_loss(spec, Y, band))
        outs.append(out)
    return torch.stack(per_copy), outs


class _PoseSearch:
    """Global search over a HEALPix SO(3) grid x whole-pixel origins against the decoder's current
    map: the posterior of each particle's pose, with the noise level taken from the best match
    (``2 sigma^2 = 2 min loss / M`` per pixel, times an annealed temperature)."""

    def __init__(self, cfg: AbinitioConfig, device):
        self.grid = torch.as_tensor(healpix_so3_grid(cfg.search_order), dtype=torch.float32, device=device)
        k = torch.arange(-cfg.search_shift_px, cfg.search_shift_px + 1, dtype=torch.float32, device=device)
        self.origins = torch.stack(torch.meshgrid(k, k, indexing="xy"), -1).reshape(-1, 2)
        self.box = cfg.box_px
        self.spacing_deg = grid_spacing_deg(cfg.search_order)
        self.refresh_steps = max(1, cfg.search_refresh_steps)
        self._slices, self._calls = None, 0

    @torch.no_grad()
    def sample(self, decoder, Y, ctf, band, temperature: float, generator) -> tuple:
        """``Y`` ``(B, N, N)`` spectra, ``ctf`` ``(B, N, N)``, ``band`` ``(N, N)`` bool -> a pose
        ``(B, 3, 3)`` and origin ``(B, 2)`` drawn from each posterior, and the best ones. The grid's
        slices are rendered again every ``search_refresh_steps`` calls (rendering is most of the
        cost; the map moves little in a few steps -- an EM iteration keeps it for a whole pass)."""
        if self._slices is None or self._calls % self.refresh_steps == 0:
            self._slices = decoder.render_many(self.grid)                                          # (P, N, N)
        self._calls += 1
        S = self._slices[:, band]                                                                     # (P, M)
        c = ctf[:, band]                                                                              # (B, M)
        power = (c**2) @ (S.abs() ** 2).T                                                            # (B, P)
        Yo = Y[:, None] * shift_phase_2d(self.origins, self.box)[None]          # |Y - c S ph(-o)| = |Y ph(o) - c S|
        Yo = Yo[..., band]                                                                            # (B, O, M)
        cross = ((Yo.conj() * c[:, None]) @ S.T).real                                                 # (B, O, P)
        loss = (Yo.abs() ** 2).sum(-1, keepdim=True) + power[:, None] - 2 * cross
        return self.draw(loss, band, temperature, generator)

    def draw(self, loss, band, temperature: float, generator) -> tuple:
        """``loss`` ``(B, O, P)`` over origins x grid poses -> drawn and best poses and origins."""
        B = len(loss)
        loss = loss.reshape(B, -1)
        lmin = loss.min(1, keepdim=True).values
        tau = temperature * 2 * lmin.clamp(min=1e-12) / band.sum()
        pick = torch.multinomial(torch.softmax(-(loss - lmin) / tau, 1), 1, generator=generator)[:, 0]
        best = loss.argmin(1)
        n_pose = len(self.grid)
        return (self.grid[pick % n_pose], self.origins[pick // n_pose],
                self.grid[best % n_pose], self.origins[best // n_pose])


def _pose_distance(enc: dict, A_target, o_target) -> torch.Tensor:
    """An encoder's output ``enc`` against target poses: the squared Frobenius distance of the
    rotations plus the squared origin error in px, averaged over the batch."""
    return ((enc["matrix"] - A_target) ** 2).sum((-2, -1)).mean() + ((enc["shift_px"] - o_target) ** 2).sum(-1).mean()


def _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A_target, o_target) -> torch.Tensor:
    """The decoder's image loss at poses ``(A, o)`` plus the encoder's distance to ``(A_target,
    o_target)`` (squared Frobenius of the rotations + squared origin error in px)."""
    dec_loss = _image_loss(net.decoder(A) * ctf * shift_phase_2d(-o, Y.shape[-1]), Y, band).mean()
    enc = net.encoder(ifft2_centered(Y * torch.sign(ctf)).real)
    return dec_loss + _pose_distance(enc, A_target, o_target)


@torch.no_grad()
def _predict_poses(net, images, ctf_fn, device, copies=(0,), batch: int = 256, bank: bool = False):
    """Poses and origins (px) of ``images``. With several copies (symmetric / mirror losses) each
    particle takes the copy that the decoder explains best, its pose mapped back to the original
    image (``A = T3^T A_copy``, ``origin = T^T origin_copy``), as cryoAI does at inference. With
    ``bank`` (``images`` are the run's own particles, in order), a particle whose refined pose from
    the bank explains it better takes that one instead."""
    net.eval()
    box = images.shape[-1]
    band = torch.ones(box, box, device=device)
    mats, shifts = [], []
    for s in range(0, len(images), batch):
        x = images[s:s + batch].to(device)
        ctf = ctf_fn(np.arange(s, min(len(images), s + batch))).to(device)
        losses, outs = _copy_losses(net, x, ctf, copies, band)
        best = losses.argmin(0)
        A = torch.empty(len(x), 3, 3, device=device)
        o = torch.empty(len(x), 2, device=device)
        for j, c in enumerate(copies):
            sel = best == j
            back = D4[c].T                                             # the inverse turn / mirror
            A[sel], o[sel] = transform_poses(outs[j]["matrix"][sel], outs[j]["shift_px"][sel], back)
        if bank and net.bank is not None:
            Ab, ob = net.bank(torch.arange(s, s + len(x), device=device))
            lb = _image_loss(net.decoder(Ab) * ctf * shift_phase_2d(-ob, box), fft2_centered(x), band)
            take = lb < losses.min(0).values
            A[take], o[take] = Ab[take], ob[take]
        mats.append(A.double().cpu())
        shifts.append(o.double().cpu())
    net.train()
    return torch.cat(mats).numpy(), torch.cat(shifts).numpy()


def abinitio(particles, out, cfg: AbinitioConfig, reference=None, reference_map=None, resume: bool = False,
             overwrite: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    for name, allowed in (("encoder", ENCODERS), ("decoder", DECODERS), ("loss", LOSSES)):
        if getattr(cfg, name) not in allowed:
            raise InputError(f"--{name} must be one of {', '.join(allowed)} (got {getattr(cfg, name)!r})")
    check_run_folder(out, "abinitio.json", "a finished run", resume, overwrite)
    if cfg.box_px % 2 or cfg.box_px < 16:
        raise InputError(f"--box-px must be even and >= 16 (got {cfg.box_px})")
    star = read_star(particles)
    if "rlnCpmlJunk" in star.particles:
        log.info("rlnCpmlJunk present: every particle is used (ab initio does not know the junk)")
    truth = None
    if reference is not None:
        ref, order = _reference_rows(star, reference)
        truth = ref.matrices()[order]
    true_map = None
    if reference_map is not None:
        reference_map = resolve_map(reference_map)
        true_map = read_map(reference_map)[0].astype(np.float64)
        if true_map.shape != (star.box,) * 3:
            raise InputError(f"the map is {true_map.shape[0]} px, the particles {star.box} px", reference_map)

    device = resolve_device(cfg.device)
    images, pixel_out, ctf_fn = _working_set(star, cfg.box_px, progress)
    n = len(images)
    summary = {**stamp(particles=particles, reference=reference, reference_map=reference_map, **asdict(cfg)),
               "particles": n, "runs": {}}
    if cfg.halves:
        subset, _ = half_set_labels(star)
        if len(set(subset.tolist())) < 2 or min((subset == 1).sum(), (subset == 2).sum()) < 2 * cfg.batch_size:
            raise InputError("--halves needs two half-sets of at least two batches each", particles)
        groups = {"half1": np.nonzero(subset == 1)[0], "half2": np.nonzero(subset == 2)[0]}
    else:
        groups = {"full": np.arange(n)}
    out.mkdir(parents=True, exist_ok=True)
    nets = {}
    for name, idx in groups.items():
        nets[name], summary["runs"][name] = _run(cfg, images[idx], lambda i, idx=idx: ctf_fn(idx[i]),
                                                 None if truth is None else truth[idx], device,
                                                 out / name if cfg.halves else out, resume, progress)
    mats = np.empty((n, 3, 3))
    shifts = np.empty((n, 2))
    for name, idx in groups.items():
        mats[idx], shifts[idx] = _predict_poses(nets[name], images[idx], lambda i, idx=idx: ctf_fn(idx[i]), device,
                                                _COPIES[cfg.loss], bank=True)
    result = star.copy()
    if cfg.halves:
        # Each half lives in the frame (and hand) of its own map. Half 1's encoder also poses the
        # half-2 particles; the rotation (and hand) between the two pose sets brings half 2 into
        # half 1's frame. Only these 3 numbers are shared: the half-maps stay independent.
        idx2 = groups["half2"]
        cross, _ = _predict_poses(nets["half1"], images[idx2], lambda i: ctf_fn(idx2[i]), device, _COPIES[cfg.loss])
        al = align_poses_globally(mats[idx2], cross)
        mats[idx2] = al["aligned"]
        summary["half_alignment"] = {"mirrored": al["mirrored"], "median_deg_between_halves": al["median_deg"]}
        result.particles["rlnRandomSubset"] = np.where(np.isin(np.arange(n), idx2), 2, 1)
    result.set_poses(mats, shifts * pixel_out)
    write_star(result, out / "poses.star")
    for name, net in nets.items():
        write_map(out / (f"decoder_map_{name}.mrc" if cfg.halves else "decoder_map.mrc"),
                  net.decoder.volume().cpu().numpy().astype(np.float32), pixel_out)
    rec = reconstruct_star(result, halves=True, progress=progress)
    half1_path, half2_path, _ = half_map_paths(out / "map.mrc")
    write_map(out / "map.mrc", rec.full.astype(np.float32), star.pixel_size_angstrom)
    write_map(half1_path, rec.half1.astype(np.float32), star.pixel_size_angstrom)
    write_map(half2_path, rec.half2.astype(np.float32), star.pixel_size_angstrom)
    mask = soft_sphere_mask(star.box)
    freq, curve = rec.half_fsc(mask)
    summary["half_map_fsc_0143_angstrom"] = resolution_at(freq, curve, 0.143)
    summary["half_maps_independent"] = bool(cfg.halves)
    if truth is not None:
        al = align_poses_globally(mats, truth)
        summary["reference"] = {"mse": al["mse"], "medse": al["medse"], "median_deg": al["median_deg"],
                                "mirrored": al["mirrored"], "converged": al["medse"] < CONVERGED_MEDSE}
        if true_map is not None:
            # the map from the aligned poses overlays the true map (right hand, same frame)
            aligned = star.copy()
            aligned.set_poses(al["aligned"], shifts * pixel_out)
            rec_al = reconstruct_star(aligned, progress=False)
            f, c = fsc(rec_al.full, true_map, star.pixel_size_angstrom, mask)
            summary["reference"]["fsc_05_vs_map_angstrom"] = resolution_at(f, c, 0.5)
    write_json(out / "abinitio.json", summary)
    return summary


_MIN_REFINE_EPOCHS = 4


def _searching(cfg: AbinitioConfig, epoch: int, rows: list[dict]) -> bool:
    """Whether ``epoch`` (0-based) searches: the first ``search_epochs`` do, and then the search goes
    on while the last epoch moved more than ``search_until_stable`` of the best poses (the map is
    still finding itself), as long as ``_MIN_REFINE_EPOCHS`` remain for the refinement."""
    n_search = cfg.n_search_epochs()
    if epoch < n_search:
        return True
    if n_search == 0 or not rows or rows[-1]["phase"] != "search":
        return False
    return rows[-1].get("moved", 0.0) > cfg.search_until_stable and epoch < cfg.epochs - _MIN_REFINE_EPOCHS


def _run(cfg: AbinitioConfig, images, ctf_fn, truth, device, out: Path, resume: bool, progress: bool):
    """One network trained on ``images``: returns it and its summary (also checkpointed in ``out``)."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    n = len(images)
    n_search = cfg.n_search_epochs()
    net = _AbinitioNet(cfg)
    if n_search:
        net.add_bank(n)
    net = net.to(device)
    if hasattr(net.decoder, "set_radial_profile"):
        net.decoder.set_radial_profile(_radial_profile(images, ctf_fn, cfg.box_px).to(device))
    opt = torch.optim.Adam([{"params": net.encoder.parameters(), "lr": cfg.lr},
                            {"params": net.decoder.parameters(), "lr": cfg.lr_decoder}])
    steps = max(1, n // cfg.batch_size)
    gen_device = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    state = {"epoch": 0, "rows": []}
    ckpt = out / "checkpoint.pt"
    if resume and ckpt.exists():
        state = restore(ckpt, device, net, opt, gen)
        log.info("resuming %s at epoch %d", out, state["epoch"])
    out.mkdir(parents=True, exist_ok=True)
    kx, ky = frequency_index_2d(cfg.box_px, device=device)
    radius = torch.sqrt(kx**2 + ky**2)
    copies = _COPIES[cfg.loss]
    search = _PoseSearch(cfg, device) if n_search else None
    r_max = cfg.box_px / 2
    for epoch in range(state["epoch"], cfg.epochs):
        t_epoch = time.perf_counter()
        perm = torch.randperm(n, generator=gen).numpy()
        losses, moved = [], []
        searching = _searching(cfg, epoch, state["rows"])
        n_searched = sum(r["phase"] == "search" for r in state["rows"])   # the refinement starts after them
        bar = tqdm(range(steps), desc=f"abinitio {out.name} epoch {epoch + 1}/{cfg.epochs}"
                   f"{' (pose search)' if searching else ''}", disable=not progress, leave=False)
        for step in bar:
            idx = np.sort(perm[step * cfg.batch_size:(step + 1) * cfg.batch_size])
            raw, ctf = images[idx].to(device), ctf_fn(idx).to(device)
            if searching:
                # the decoder learns from poses drawn from the search's posterior; the encoder
                # learns to predict the best ones; the band and the temperature anneal over the
                # first search_epochs (later search epochs run at full band and temperature 1)
                t = min(1.0, (epoch * steps + step) / (n_search * steps))
                r = r_max * min(1.0, 0.2 + 0.8 * t) if cfg.frequency_marching else r_max
                band = radius <= r
                Y = fft2_centered(raw)
                A, o, A_best, o_best = search.sample(net.decoder, Y, ctf, band,
                                                     cfg.search_temperature ** (1 - t), gen_device)
                moved.append(geodesic_distance_deg(net.bank(idx)[0], A_best) > search.spacing_deg)
                net.bank.set(idx, A_best, o_best)
                loss = _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A_best, o_best)
            elif net.bank is not None:
                # semi-amortized refinement: local searches around each particle's pose (the step
                # starts at half the grid spacing and shrinks by 0.6 every epoch), the map learns
                # from the refined poses, the encoder keeps learning to predict them
                delta = grid_spacing_deg(cfg.search_order) / 2 * 0.6 ** (epoch - n_searched)
                Y = fft2_centered(raw)
                band = radius <= r_max
                A, o = net.bank(idx)
                for _ in range(2):
                    A, o = _local_search(net.decoder, A, o, Y, ctf, band, delta)
                net.bank.set(idx, A, o)
                loss = _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A, o)
            else:
                # amortized from the start (no search, no bank): the band grows over the first half
                t = (epoch * steps + step) / (cfg.epochs * steps)
                r = r_max * min(1.0, 0.25 + 1.5 * t) if cfg.frequency_marching else r_max
                band = (radius <= r).float()
                per_copy, _ = _copy_losses(net, raw, ctf, copies, band)
                loss = per_copy.min(0).values.mean()
            losses.append(float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.encoder.parameters(), 5.0)
            opt.step()
        row = {"epoch": epoch + 1, "phase": "search" if searching else ("refine" if net.bank is not None else "amortized"),
               "loss": float(np.mean(losses)), "epoch_s": time.perf_counter() - t_epoch}
        if moved:
            # the fraction of particles whose best pose moved by more than a grid step since their
            # last visit (the whole set in the first epoch): the search's own convergence measure
            row["moved"] = float(torch.cat(moved).float().mean())
        if truth is not None:
            # the run's poses (the bank's where they explain a particle better) and the encoder's alone
            sub = np.arange(min(n, 1000))
            mats, _ = _predict_poses(net, images[sub], lambda i: ctf_fn(sub[i]), device, copies, bank=True)
            al = align_poses_globally(mats, truth[sub])
            row.update(mse=al["mse"], medse=al["medse"], median_deg=al["median_deg"])
            if net.bank is not None:
                mats, _ = _predict_poses(net, images[sub], lambda i: ctf_fn(sub[i]), device, copies)
                al = align_poses_globally(mats, truth[sub])
                row.update(encoder_medse=al["medse"], encoder_median_deg=al["median_deg"])
        state["rows"].append(row)
        state["epoch"] = epoch + 1
        log.info("%sepoch %d (%s): loss %.4g%s%s%s", f"{out.name} " if out.name.startswith("half") else "", epoch + 1,
                 row["phase"], row["loss"],
                 f", {100 * row['moved']:.0f}% of best poses moved" if "moved" in row else "",
                 f", MedSE {row['medse']:.4f} (median {row['median_deg']:.1f} deg)" if "medse" in row else "",
                 f", encoder alone {row['encoder_median_deg']:.1f} deg" if "encoder_median_deg" in row else "")
        save_checkpoint(ckpt, {"model": net.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                               "state": json.dumps(state)})
        write_rows_csv(out / "metrics.csv", state["rows"])
        save_figure(abinitio_figure(state["rows"], CONVERGED_MEDSE), out / "curves.png")
    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items() if not k.startswith("bank.")},
              str(out / "weights.safetensors"))
    rows = state["rows"]
    run = {"particles": n, "epochs_run": state["epoch"], "train_seconds": float(sum(r["epoch_s"] for r in rows)),
           "final_loss": rows[-1]["loss"] if rows else None}
    if rows and "medse" in rows[-1]:
        conv = [r["epoch"] for r in rows if r["medse"] < CONVERGED_MEDSE]
        run["first_converged_epoch"] = conv[0] if conv else None
        run["seconds_to_convergence"] = (float(sum(r["epoch_s"] for r in rows if r["epoch"] <= conv[0]))
                                         if conv else None)
    return net, run
