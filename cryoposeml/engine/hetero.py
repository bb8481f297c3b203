"""``cryoposeml hetero``: poses and conformations together (HetACUMN, seed 003).

A VAE: a pose encoder (rotation and shift, as in :mod:`~cryoposeml.engine.abinitio`) and a
conformation encoder (the posterior of a latent ``z``, mean and variance) read each particle; a
decoder conditioned on ``z`` (:class:`~cryoposeml.models.decoders.ConditionalVoxelDecoder`: a mean
map plus one basis map per latent dimension, mixed linearly, ``V(z) = V_0 + sum_k z_k V_k``)
renders the particle's central slice. The pose search is :mod:`cryoposeml.core.search`'s, the
training loop :class:`~cryoposeml.engine.amortized.EpochLoop` (both shared with ab initio).

Training:

1. **Consensus (conformation frozen).** The first epochs are ab initio's global pose search against
   the mean map alone (HEALPix grid, posterior sampling, frequency marching, extended while the
   poses still move): the conformation head is frozen, ``z`` plays no part. With
   ``--poses input`` (the STAR's poses, e.g. a consensus refinement) the mean map learns at them.
   From no poses this search tends to lock onto one conformation; with 2+ classes a **class
   restart** follows the first conditional searches: each particle takes its k-means class, the
   maps are low-passed, and each class is searched again against its own map (see
   :func:`_restart_classes`).
2. **Heterogeneity.** Task 1, the VAE: each particle's pose is refined by local searches against
   its own map ``V(z)`` (z = the posterior mean), and the decoder and the conformation encoder learn
   from the image loss (a Gaussian likelihood whose noise level is the running mean residual, so
   the weight of the KL term adapts to the data) plus the KL of ``z``; the pose encoder learns to
   predict the refined poses. Task 2, conditional pose prediction (the encoder-decoder order
   inverted), alternates with it: poses drawn uniformly on SO(3), ``z`` drawn from the batch's
   posteriors and origins from the batch's are rendered by the frozen decoder, with the batch's
   CTFs and white noise at the data's estimated noise level (adaptive: the running residual); the
   pose encoder must recover the poses and the conformation encoder the ``z``. A pose encoder that
   works at any ``z``, and a ``z`` that does not depend on the pose, is what keeps the two apart.

After training: PCA of the particles' ``z`` (posterior means), k-means into ``--classes`` classes
(several starts, the best kept), the decoder's volume at each class centre, and each class
reconstructed from its particles at the input box (with half-maps and their FSC). The
entanglement score is the share of the variance of ``z`` that the pose explains (held-out R^2 of a
least-squares fit of ``z`` on the rotation matrix's entries and their pairwise products, i.e. the
Wigner functions of degree 1 and 2): 0 when ``z`` carries no pose, 1 when it is a function of the
pose. Seed 003's eq. 11 was not at hand; this is our definition, and it needs no ground truth.

The folder: ``hetero.json`` (written last), ``particles.star`` (the input with the poses,
``rlnCpmlZ1..d``, ``rlnCpmlPC1/2`` and ``rlnClassNumber``), ``z.npy``, ``class_NNN.mrc`` (and
``_half1/2``), ``decoder_class_NNN.mrc``, ``latent.png``, ``metrics.csv``, ``curves.png``,
``weights.safetensors``, ``checkpoint.pt`` (``--resume``). With ``--reference`` (a STAR with the
true poses and ``rlnCpmlState``, e.g. ``ground_truth.star`` from ``simulate --map A B``) the
misclassification, the Spearman correlation of PC1 with the state index and the pose errors are
logged; with ``--reference-map`` (one map per state) the FSC of each class against its state.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import roma
import torch

from ..core.errors import InputError
from ..core.fourier import fft2_centered, frequency_index_2d, ifft2_centered
from ..core.grids import grid_spacing_deg
from ..core.metrics import align_poses_globally, fsc, resolution_at, soft_sphere_mask
from ..core.rotations import geodesic_distance_deg
from ..core.search import GridSearch, image_loss, recentred
from ..data.bundled import resolve_map
from ..data.mrc import read_map, write_map
from ..data.star import read_star, write_star
from ..models.decoders import ConditionalVoxelDecoder
from ..models.encoders import ConformationEncoder
from ..options import option
from ._outputs import check_run_folder, stamp, write_json
from .amortized import (ENCODERS, MIN_REFINE_EPOCHS, EpochLoop, PoseBank, local_search, phase_flipped, pose_distance,
                        pose_encoder, radial_profile, reference_rows, render, working_set)
from .plots import hetero_figure, latent_figure, save_figure
from .reconstruct import half_set_labels, reconstruct_star
from .train import resolve_device

__all__ = ["HeteroConfig", "hetero", "POSE_SOURCES", "pca", "latent_analysis", "entanglement_score",
           "misclassification"]

log = logging.getLogger(__name__)

POSE_SOURCES = ("auto", "search", "input")


@dataclass
class HeteroConfig:
    zdim: int = option(8, "dimension of the conformation latent")
    classes: int = option(2, "k-means classes of z, one volume each")
    encoder: str = option("cnn", "pose encoder: cnn (6D head) or equivariant (escnn D4)", choices=ENCODERS)
    poses: str = option("auto", "search: find the poses first (ab initio's global search, conformations frozen; from "
                                "no poses one conformation tends to take over); input: start from the STAR's poses, "
                                "e.g. a consensus refinement, and refine them; auto: input when the STAR has poses",
                        choices=POSE_SOURCES)
    epochs: int = option(24)
    search_epochs: int | None = option(
        None, "epochs of global pose search with the conformation frozen, extended while the poses still move; with "
              "--poses input, epochs learning the consensus map at the given poses",
        none_means="a third of --epochs; with --poses input 2")
    frozen_epochs: int | None = option(
        None, "the conformation frozen for the first epochs (earlier, z absorbs pose errors and the search locks in)",
        none_means="--search-epochs")
    hetero_search_epochs: int = option(4, "the search (against each particle's own map V(z) once the conformation "
                                          "learns) goes on this many epochs after --search-epochs")
    restart_epochs: int | None = option(
        None, "from no poses with 2+ classes: epochs of the class restart (the maps low-passed, each class searched "
              "again against its own) when --epochs leave room; 0: none", none_means="as --search-epochs")
    restart_lowpass: float = option(0.25, "the maps are cut to this fraction of Nyquist at the restart")
    task2: bool = option(True, "the conditional pose prediction task (--no-task2: the ablation)")
    task2_every: int = option(1, "one task-2 step after every this many task-1 steps")
    beta: float = option(1.0, "weight of the prior of z (a beta-VAE's beta)")
    batch_size: int = option(32)
    lr: float = option(1e-3, "encoders' learning rate")
    lr_decoder: float = option(5e-2)
    box_px: int = option(64, "working box")
    widths: tuple = option((16, 32, 64, 128), "encoder widths")
    search_order: int = option(2, "HEALPix order of the search grid: 1 (576 rotations, 30 deg), 2 (4,608, 15 deg)")
    search_shift_px: int = option(1, "search origins on a (2k+1)^2 grid of whole pixels of the working box")
    search_temperature: float = option(10.0, "posterior temperature at the start of a search, annealed to 1")
    search_until_stable: float = option(0.1, "keep searching while more than this fraction of the best poses moved "
                                             "by over a grid step in the last epoch")
    search_refresh_steps: int = option(4, "render the search grid's slices every this many batches")
    seed: int = option(0)
    device: str = option("auto", "auto, cpu or cuda[:N]")

    def n_search_epochs(self) -> int:
        """Epochs of the first phase (pose search, or with input poses the consensus map at them)."""
        given = self.poses == "input"
        n = (2 if given else self.epochs // 3) if self.search_epochs is None else self.search_epochs
        return min(n, max(0, self.epochs - (1 if given else MIN_REFINE_EPOCHS)))

    def n_frozen_epochs(self) -> int:
        n = self.n_search_epochs()
        return min(n, n if self.frozen_epochs is None else self.frozen_epochs)

    def n_restart_epochs(self) -> int:
        """The class restart's epochs: from no poses with 2+ classes, when the epochs leave room for
        it after the first two phases (the conditional search then refines, and 4 local epochs)."""
        if self.poses == "input" or self.classes < 2:
            return 0
        n = self.n_search_epochs() if self.restart_epochs is None else self.restart_epochs
        room = self.epochs - (self.n_search_epochs() + self.hetero_search_epochs + 2 + MIN_REFINE_EPOCHS)
        return max(0, min(n, room))


class _HeteroNet(torch.nn.Module):
    def __init__(self, cfg: HeteroConfig, n: int):
        super().__init__()
        self.encoder = pose_encoder(cfg.encoder, cfg.box_px, cfg.widths)
        self.conformation = ConformationEncoder(cfg.zdim, tuple(cfg.widths[:3]))
        self.decoder = ConditionalVoxelDecoder(cfg.box_px, cfg.zdim)
        self.bank = PoseBank(n)
        self.register_buffer("z", torch.zeros(n, cfg.zdim))      # each particle's posterior mean of z
        # the class restart: each particle's class and the classes' codes (their centres in z)
        self.register_buffer("labels", torch.zeros(n, dtype=torch.long))
        self.register_buffer("codes", torch.zeros(max(1, cfg.classes), cfg.zdim))
        # the running per-pixel residual (the noise level of the likelihood and of task 2)
        self.register_buffer("noise_var", torch.tensor(-1.0))

    @torch.no_grad()
    def update_noise(self, residual: torch.Tensor) -> None:
        r = float(residual)
        self.noise_var.fill_(r if float(self.noise_var) < 0 else 0.95 * float(self.noise_var) + 0.05 * r)


class ConditionalGridSearch(GridSearch):
    """The global search against each particle's own map ``V(z) = V_0 + sum_k z_k V_k``, for several
    candidate conformations per particle (its own posterior mean, and the class centres: a particle
    posed wrongly against the wrong conformation's map can then move to its own), the best
    candidate at each pose counting. The maps' slices over the grid are rendered once (with the
    products of every pair, for the power term) and mixed per particle and candidate, so the cost
    grows with the latent's dimension squared, not with the batch or the candidates."""

    def _basis(self, decoder, band):
        S = decoder.render_basis(self.grid)[..., band]                                     # (1 + K, P, M)
        pairs = {(k, l): (S[k] * S[l].conj()).real * (1.0 if k == l else 2.0)
                 for k in range(len(S)) for l in range(k, len(S))}
        return S, pairs

    @torch.no_grad()
    def losses(self, decoder, Y, ctf, band, z) -> torch.Tensor:
        """``z`` ``(B, C, zdim)``: C candidate conformations per particle -> ``(B, C, O, P)``."""
        S, pairs = self.cached(int(band.sum()), lambda: self._basis(decoder, band))
        B, C = z.shape[:2]
        w = decoder.weights(z.reshape(B * C, -1)).reshape(B, C, -1)                         # (B, C, 1 + K)
        c = ctf[:, band]
        c2 = c**2
        power = sum((w[:, :, k] * w[:, :, l])[..., None] * (c2 @ g.T)[:, None]
                    for (k, l), g in pairs.items())                                         # (B, C, P)
        Yo = recentred(Y, self.origins, band)                                               # (B, O, M)
        Yc = Yo.conj() * c[:, None]
        cross = sum(w[:, :, k, None, None] * (Yc @ S[k].T).real[:, None] for k in range(len(S)))   # (B, C, O, P)
        return (Yo.abs() ** 2).sum(-1, keepdim=True)[:, None] + power[:, :, None] - 2 * cross

    def sample_z(self, decoder, Y, ctf, band, z, temperature: float, generator) -> tuple:
        """Drawn and best poses and origins, each pose scored with its best candidate."""
        return self.draw(self.losses(decoder, Y, ctf, band, z).min(1).values, band, temperature, generator)


def _search_step(net, search, Y, ctf, band, temperature, gen_device, idx):
    """Phase 1: ab initio's search against the mean map (the conformation frozen)."""
    A, o, A_best, o_best = search.sample(net.decoder.maps[0].render_many, Y, ctf, band, temperature, gen_device)
    moved = geodesic_distance_deg(net.bank(idx)[0], A_best) > search.spacing_deg
    net.bank.set(idx, A_best, o_best)
    per = image_loss(render(net.decoder.maps[0](A), ctf, o), Y, band)
    return per.mean() + pose_distance(net.encoder(phase_flipped(Y, ctf)), A_best, o_best), moved


def _consensus_step(net, Y, ctf, band, idx):
    """Phase 1 with given poses: the mean map learns from the particles at their poses."""
    A, o = net.bank(idx)
    return image_loss(render(net.decoder.maps[0](A), ctf, o), Y, band).mean()


@torch.no_grad()
def _posterior_z(net, A, o, Y, ctf, band, beta: float):
    """Each particle's posterior of ``z`` at pose ``(A, o)``: the decoder is linear in ``z``, so with
    the prior ``N(0, I / beta)`` and white noise of the running residual's variance it is Gaussian:
    precision ``P = beta I + G / s`` and mean ``P^-1 h / s``, with ``G_kl = Re <B_k, B_l>``,
    ``h_k = Re <B_k, Y - B_0>`` over the band, ``B_k`` the k-th map's slice times CTF and shift
    phase, ``s = N^2 sigma^2`` (the noise per Fourier coefficient). Returns ``(mean, P)``."""
    box = Y.shape[-1]
    B_ = render(net.decoder.slices(A), ctf, o)                                    # (1 + K, B, N, N)
    B_ = B_[..., band]                                                            # (1 + K, B, M)
    r = Y[..., band] - B_[0]
    Bk = B_[1:]
    G = torch.einsum("kbm,lbm->bkl", Bk.conj(), Bk).real
    h = torch.einsum("kbm,bm->bk", Bk.conj(), r).real
    s = box**2 * net.noise_var.clamp(min=1e-12)
    K = Bk.shape[0]
    P = beta * torch.eye(K, device=Y.device) + G / s
    return torch.linalg.solve(P, h / s), P


def _sample_posterior(mean, P, generator):
    """Draws from ``N(mean, P^-1)``: ``mean + L^-T eps`` with ``P = L L^T``."""
    L = torch.linalg.cholesky(P)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device)
    return mean + torch.linalg.solve_triangular(L.transpose(-2, -1), eps[..., None], upper=True)[..., 0]


def _task1_step(net, cfg, Y, ctf, band, idx, gen_device, delta=None, search=None, temperature: float = 1.0,
                centres=None):
    """Task 1 (the VAE).

    1. Each particle's pose is searched against its own map V(z), z being the posterior mean at its
       current pose (with the class ``centres`` as other candidates): globally with ``search`` (a
       pose drawn from the posterior for the decoder, the best one kept), else locally with steps
       of ``delta``.
    2. The posterior of z at the new pose (exact: the decoder is linear in z); the decoder's image
       loss at z drawn from it.
    3. The encoders amortize both: KL(q(z | image) || posterior) for the conformation encoder, the
       distance to the best pose for the pose encoder.

    Returns the loss, the per-particle image loss and KL, the posterior (for task 2) and, with
    ``search``, which best poses moved."""
    A, o = net.bank(idx)
    if float(net.noise_var) < 0:                                  # the first step: a noise level first
        with torch.no_grad():
            net.update_noise(image_loss(render(net.decoder.maps[0](A), ctf, o), Y, band).mean())
    mean, P = _posterior_z(net, A, o, Y, ctf, band, cfg.beta)
    moved = None
    if search is not None:
        A_prev = A
        cand = mean[:, None] if centres is None else torch.cat([mean[:, None], centres[None].expand(len(mean), -1, -1)], 1)
        A, o, A_best, o_best = search.sample_z(net.decoder, Y, ctf, band, cand, temperature, gen_device)
        moved = geodesic_distance_deg(A_prev, A_best) > search.spacing_deg
        net.bank.set(idx, A_best, o_best)
        mean, P = _posterior_z(net, A_best, o_best, Y, ctf, band, cfg.beta)
        net.z[torch.as_tensor(idx, device=net.z.device)] = mean
        mean_s, P_s = _posterior_z(net, A, o, Y, ctf, band, cfg.beta)     # the decoder learns at the drawn pose
        z = _sample_posterior(mean_s, P_s, gen_device)
    else:
        A, o = local_search(lambda R, active: net.decoder(R, mean[active].repeat_interleave(len(R) // len(active), 0)),
                            A, o, Y, ctf, band, delta)
        net.bank.set(idx, A, o)
        A_best, o_best = A, o
        mean, P = _posterior_z(net, A, o, Y, ctf, band, cfg.beta)
        net.z[torch.as_tensor(idx, device=net.z.device)] = mean
        z = _sample_posterior(mean, P, gen_device)
    per = image_loss(render(net.decoder(A, z), ctf, o), Y, band)
    net.update_noise(per.detach().mean())
    enc_in = phase_flipped(Y, ctf)
    mu, logvar = net.conformation(enc_in)
    d = (mu - mean)[..., None]
    kl = 0.5 * ((torch.diagonal(P, dim1=-2, dim2=-1) * logvar.exp()).sum(-1) + (d.transpose(-2, -1) @ P @ d)[:, 0, 0]
                - mean.shape[1] - torch.logdet(P) - logvar.sum(-1))
    enc_loss = pose_distance(net.encoder(enc_in), A_best, o_best)
    return per.mean() + kl.mean() / cfg.zdim + enc_loss, per.detach(), kl.detach(), (mean, P, o_best), moved


def _task2_loss(net, ctf, posterior, gen_device):
    """Task 2 (conditional pose prediction): render random poses at z drawn from the batch's
    posteriors with the frozen decoder (the batch's CTFs, its origins shuffled), add white noise at
    the data's level (the running residual), and regress the poses and the z back."""
    mean, P, o = posterior
    B = len(mean)
    with torch.no_grad():
        A = roma.random_rotmat(B, device=mean.device, generator=gen_device)
        z = _sample_posterior(mean, P, gen_device)
        perm = torch.randperm(B, generator=gen_device, device=mean.device)
        origin = o[perm]
        clean = ifft2_centered(render(net.decoder(A, z), ctf, origin)).real
        noise = torch.randn(clean.shape, generator=gen_device, device=mean.device)
        x = clean + noise * net.noise_var.clamp(min=0).sqrt()
        enc_in = phase_flipped(fft2_centered(x), ctf)
    mu2, _ = net.conformation(enc_in)
    return pose_distance(net.encoder(enc_in), A, origin) + ((mu2 - z) ** 2).sum(-1).mean()


@torch.no_grad()
def _posterior_all(net, images, ctf_fn, cfg, device, batch: int = 256) -> np.ndarray:
    """Every particle's posterior mean of ``z`` at its final pose."""
    out = []
    kx, ky = frequency_index_2d(cfg.box_px, device=device)
    band = torch.sqrt(kx**2 + ky**2) <= cfg.box_px / 2          # the band the training compared
    for s in range(0, len(images), batch):
        idx = np.arange(s, min(len(images), s + batch))
        A, o = net.bank(idx)
        mean, _ = _posterior_z(net, A, o, fft2_centered(images[idx].to(device)), ctf_fn(idx).to(device), band,
                               cfg.beta)
        out.append(mean.double().cpu())
    return torch.cat(out).numpy()


@torch.no_grad()
def _encode(net, images, ctf_fn, device, batch: int = 256):
    """The posterior means ``z`` (n, zdim) and the pose encoder's poses (n, 3, 3) and origins."""
    net.eval()
    zs, mats, shifts = [], [], []
    for s in range(0, len(images), batch):
        x = images[s:s + batch].to(device)
        ctf = ctf_fn(np.arange(s, min(len(images), s + batch))).to(device)
        enc_in = phase_flipped(fft2_centered(x), ctf)
        zs.append(net.conformation(enc_in)[0].double().cpu())
        out = net.encoder(enc_in)
        mats.append(out["matrix"].double().cpu())
        shifts.append(out["shift_px"].double().cpu())
    net.train()
    return torch.cat(zs).numpy(), torch.cat(mats).numpy(), torch.cat(shifts).numpy()


# -- latent analysis (numpy/scipy; no torch) --------------------------------------------------------

def pca(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``z`` (n, d) -> its coordinates on the principal axes (n, d) and their variance shares (d,)."""
    z = np.asarray(z, np.float64)
    zc = z - z.mean(0)
    _, s, vt = np.linalg.svd(zc, full_matrices=False)
    var = s**2
    return zc @ vt.T, (var / var.sum() if var.sum() > 0 else np.zeros_like(var))


def latent_analysis(z: np.ndarray, classes: int, seed: int = 0, starts: int = 10) -> dict:
    """PCA of ``z`` (n, d) and k-means into ``classes``: ``pcs`` (n, d) the coordinates on the
    principal axes, ``explained`` their variance shares, ``labels`` (n,) 0-based, ``centres``
    (classes, d) in z. Classes are numbered by their mean PC1 (so a motion reads in order)."""
    from scipy.cluster.vq import kmeans2

    z = np.asarray(z, np.float64)
    pcs, explained = pca(z)
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(starts):
        centres, labels = kmeans2(z, classes, minit="++", seed=rng)
        inertia = ((z - centres[labels]) ** 2).sum()
        if best is None or inertia < best[0]:
            best = (inertia, centres, labels)
    _, centres, labels = best
    order = np.argsort([pcs[labels == k, 0].mean() if (labels == k).any() else np.inf for k in range(classes)])
    relabel = np.empty(classes, np.int64)
    relabel[order] = np.arange(classes)
    return {"pcs": pcs, "explained": explained, "labels": relabel[labels], "centres": centres[order]}


def misclassification(labels: np.ndarray, states: np.ndarray) -> dict:
    """The share of particles whose class is not their state's, under the best one-to-one match of
    classes to states (Hungarian); ``states`` 1-based, 0 (junk) left out."""
    from scipy.optimize import linear_sum_assignment

    keep = states > 0
    labels, states = labels[keep], states[keep] - 1
    table = np.zeros((labels.max() + 1, states.max() + 1), np.int64)
    np.add.at(table, (labels, states), 1)
    rows, cols = linear_sum_assignment(-table)
    return {"misclassified": float(1 - table[rows, cols].sum() / max(1, len(labels))),
            "class_of_state": {int(c) + 1: int(r) + 1 for r, c in zip(rows, cols)}}


def _wigner_features(A: np.ndarray) -> np.ndarray:
    """Functions of the pose spanning the Wigner D of degree 0-2: 1, the 9 entries, their products."""
    e = A.reshape(len(A), 9)
    iu = np.triu_indices(9)
    return np.hstack([np.ones((len(A), 1)), e, (e[:, :, None] * e[:, None, :])[:, iu[0], iu[1]]])


def entanglement_score(z: np.ndarray, A: np.ndarray) -> float:
    """The share of the variance of ``z`` explained by the pose ``A``: R^2 of a least-squares fit of
    ``z`` on :func:`_wigner_features`, fitted on every other particle and scored on the rest
    (so a fit to noise scores about 0). 0: z carries no pose; 1: z is a function of it."""
    z, F = np.asarray(z, np.float64), _wigner_features(np.asarray(A, np.float64))
    fit, test = np.arange(0, len(z), 2), np.arange(1, len(z), 2)
    if len(fit) <= F.shape[1]:
        return float("nan")
    coef, *_ = np.linalg.lstsq(F[fit], z[fit], rcond=None)
    resid = ((z[test] - F[test] @ coef) ** 2).sum()
    total = ((z[test] - z[fit].mean(0)) ** 2).sum()
    return float(max(0.0, 1 - resid / total)) if total > 0 else 0.0


def _spearman_pc1(pc1: np.ndarray, states: np.ndarray) -> float:
    from scipy.stats import spearmanr

    keep = states > 0
    if len(np.unique(states[keep])) < 2:
        return float("nan")
    return float(abs(spearmanr(pc1[keep], states[keep]).statistic))


# -- the run ------------------------------------------------------------------------------------

def hetero(particles, out, cfg: HeteroConfig, reference=None, reference_maps=(), resume: bool = False,
           overwrite: bool = False, progress: bool = True) -> dict:
    out = Path(out)
    if cfg.encoder not in ENCODERS:
        raise InputError(f"--encoder must be cnn or equivariant (got {cfg.encoder!r})")
    if cfg.poses not in POSE_SOURCES:
        raise InputError(f"--poses must be one of {', '.join(POSE_SOURCES)} (got {cfg.poses!r})")
    if cfg.zdim < 1:
        raise InputError(f"--zdim must be at least 1 (got {cfg.zdim})")
    if cfg.classes < 1:
        raise InputError(f"--classes must be at least 1 (got {cfg.classes})")
    if cfg.box_px % 2 or cfg.box_px < 16:
        raise InputError(f"--box-px must be even and >= 16 (got {cfg.box_px})")
    check_run_folder(out, "hetero.json", "a finished run", resume, overwrite)
    star = read_star(particles)
    if cfg.poses == "auto":
        # from no poses the first search locks onto one conformation (README): a consensus is better
        cfg = replace(cfg, poses="input" if star.has_poses() else "search")
        log.info("poses: %s", "the STAR's, refined" if cfg.poses == "input" else "searched (the STAR has none)")
    if cfg.epochs <= cfg.n_search_epochs():
        raise InputError(f"--epochs ({cfg.epochs}) must leave epochs after the first phase for the conformations")
    if cfg.poses == "input":
        star.require(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "--poses input")
    if len(star) < max(2 * cfg.batch_size, 4 * cfg.classes):
        raise InputError(f"{len(star)} particles are too few (at least {max(2 * cfg.batch_size, 4 * cfg.classes)} "
                         f"for batches of {cfg.batch_size} and {cfg.classes} classes)", particles)
    truth, states = None, None
    if reference is not None:
        ref, order = reference_rows(star, reference)
        truth = ref.matrices()[order]
        true_shifts = ref.shifts_angstrom()[order]
        if "rlnCpmlState" in ref.particles:
            states = ref.particles["rlnCpmlState"].to_numpy(np.int64)[order]
    true_maps = []
    for k, m in enumerate(reference_maps):
        path = resolve_map(m)
        vol = read_map(path)[0].astype(np.float64)
        if vol.shape != (star.box,) * 3:
            raise InputError(f"the map of state {k + 1} is {vol.shape[0]} px, the particles {star.box} px", path)
        true_maps.append(vol)
    if true_maps and (states is None or len(true_maps) != states.max()):
        raise InputError(f"--reference-map needs one map per state of the --reference STAR's rlnCpmlState "
                         f"(got {len(true_maps)} maps"
                         f"{'' if states is None else f' for {states.max()} states'})", reference)

    device = resolve_device(cfg.device)
    images, pixel_out, ctf_fn = working_set(star, cfg.box_px, progress)
    n = len(images)
    out.mkdir(parents=True, exist_ok=True)
    initial = (star.matrices(), star.shifts_angstrom() / pixel_out) if cfg.poses == "input" else None
    net, run = _run(cfg, images, ctf_fn, initial, truth, states, device, out, resume, progress)

    # -- analysis and outputs ---------------------------------------------------------------------
    z = _posterior_all(net, images, ctf_fn, cfg, device)
    z_enc, enc_mats, _ = _encode(net, images, ctf_fn, device)
    mats = net.bank.matrix.double().cpu().numpy()
    shifts = net.bank.origin.double().cpu().numpy()
    lat = latent_analysis(z, cfg.classes, cfg.seed)
    labels = lat["labels"]
    np.save(out / "z.npy", z.astype(np.float32))
    np.save(out / "z_encoder.npy", z_enc.astype(np.float32))
    result = star.copy()
    result.set_poses(mats, shifts * pixel_out)
    for j in range(cfg.zdim):
        result.particles[f"rlnCpmlZ{j + 1}"] = z[:, j]
    for j in range(min(2, cfg.zdim)):
        result.particles[f"rlnCpmlPC{j + 1}"] = lat["pcs"][:, j]
    result.particles["rlnClassNumber"] = labels + 1
    write_star(result, out / "particles.star")
    summary = {**stamp(particles=particles, reference=reference, reference_maps=list(map(str, reference_maps)),
                       **asdict(cfg)),
               "particles": n, "run": run, "pca_explained": lat["explained"][:min(4, cfg.zdim)].tolist(),
               "entanglement": entanglement_score(z, mats), "classes": []}
    mask = soft_sphere_mask(star.box)
    for k in range(cfg.classes):
        sel = np.nonzero(labels == k)[0]
        entry = {"class": k + 1, "particles": int(len(sel)), "z_centre": lat["centres"][k].tolist()}
        write_map(out / f"decoder_class_{k + 1:03d}.mrc",
                  net.decoder.volume(torch.as_tensor(lat["centres"][k])).cpu().numpy().astype(np.float32), pixel_out)
        if len(sel) >= 2:
            sub = result.copy()
            sub.particles = result.particles.iloc[sel].reset_index(drop=True)
            halves = len(np.unique(half_set_labels(sub)[0])) == 2     # a small class may lie in one half
            rec = reconstruct_star(sub, halves=halves, progress=progress)
            write_map(out / f"class_{k + 1:03d}.mrc", rec.full.astype(np.float32), star.pixel_size_angstrom)
            if rec.half1 is not None:
                write_map(out / f"class_{k + 1:03d}_half1.mrc", rec.half1.astype(np.float32), star.pixel_size_angstrom)
                write_map(out / f"class_{k + 1:03d}_half2.mrc", rec.half2.astype(np.float32), star.pixel_size_angstrom)
                f, c = rec.half_fsc(mask)
                entry["half_map_fsc_0143_angstrom"] = resolution_at(f, c, 0.143)
        summary["classes"].append(entry)
    if truth is not None:
        ref_summary = {}
        al = align_poses_globally(mats, truth)
        ref_summary.update(medse=al["medse"], median_deg=al["median_deg"], mirrored=al["mirrored"],
                           median_shift_error_angstrom=float(np.median(np.linalg.norm(shifts * pixel_out - true_shifts,
                                                                                      axis=1))))
        ref_summary["encoder_median_deg"] = align_poses_globally(enc_mats, truth)["median_deg"]
        if states is not None:
            mis = misclassification(labels, states)
            ref_summary.update(misclassified=mis["misclassified"], class_of_state=mis["class_of_state"],
                               spearman_pc1_state=_spearman_pc1(lat["pcs"][:, 0], states))
            # the amortized encoder's z alone, clustered the same way
            lat_enc = latent_analysis(z_enc, cfg.classes, cfg.seed)
            ref_summary["encoder_misclassified"] = misclassification(lat_enc["labels"], states)["misclassified"]
            if true_maps:
                aligned = result.copy()
                aligned.set_poses(al["aligned"], shifts * pixel_out)
                per_state = {}
                for s, vol in enumerate(true_maps, start=1):
                    c = mis["class_of_state"].get(s)
                    sel = np.nonzero(labels == c - 1)[0] if c is not None else []
                    if len(sel) < 2:
                        per_state[s] = None
                        continue
                    sub = aligned.copy()
                    sub.particles = aligned.particles.iloc[sel].reset_index(drop=True)
                    f, cc = fsc(reconstruct_star(sub, progress=False).full, vol, star.pixel_size_angstrom, mask)
                    per_state[s] = resolution_at(f, cc, 0.5)
                ref_summary["fsc_05_per_state_angstrom"] = per_state
        summary["reference"] = ref_summary
    save_figure(latent_figure(lat["pcs"], labels, states), out / "latent.png")
    write_json(out / "hetero.json", summary)
    return summary


def _phase(cfg: HeteroConfig, epoch: int, rows: list[dict], given_poses: bool) -> str:
    """The phase of ``epoch`` (0-based): ``consensus`` (given poses: the mean map learns at them),
    ``search`` (the conformation frozen: ab initio's global search against the mean map),
    ``hetero search`` (the global search against each particle's own map V(z): from
    ``frozen_epochs`` to ``hetero_search_epochs`` after ``search_epochs``), ``class search`` (the
    class restart, :meth:`HeteroConfig.n_restart_epochs`, then 2 more epochs of ``hetero search``),
    ``hetero search`` going on while more than ``search_until_stable`` of the best poses moved,
    leaving 4 epochs, and ``hetero`` (local refinement). Reads only the logged rows, so
    ``--resume`` decides the same."""
    n_search = cfg.n_search_epochs()
    if given_poses:
        return "consensus" if epoch < n_search else "hetero"
    if epoch < cfg.n_frozen_epochs():
        return "search"
    restart = cfg.n_restart_epochs()
    r0 = n_search + cfg.hetero_search_epochs
    if restart and r0 <= epoch < r0 + restart:
        return "class search"
    if epoch < min(r0 + (restart + 2 if restart else 0), cfg.epochs - 2):
        return "hetero search"
    last = rows[-1] if rows else {}
    if (last.get("phase") == "hetero search" and last.get("moved", 0.0) > cfg.search_until_stable
            and epoch < cfg.epochs - MIN_REFINE_EPOCHS):
        return "hetero search"
    return "hetero"


@torch.no_grad()
def _restart_classes(net, cfg: HeteroConfig) -> np.ndarray:
    """The class restart. From no poses the first search locks onto one conformation: the other
    one's particles take wrong poses, and its map (learned from them) is consistent with them. The
    conformations still separate in z (how badly a particle fits). So each particle takes its k-means
    class, every map is cut to ``restart_lowpass`` of Nyquist (a low-passed reference, shared frame)
    and each class is searched again against its own map from low to high frequencies, the classes'
    maps learning only from their own particles (the codes are the classes' centres in z)."""
    lat = latent_analysis(net.z.double().cpu().numpy(), cfg.classes, cfg.seed)
    net.labels.copy_(torch.as_tensor(lat["labels"], dtype=torch.long))
    net.codes.copy_(torch.as_tensor(lat["centres"], dtype=torch.float32))
    cut = cfg.restart_lowpass * cfg.box_px / 2
    for m in net.decoder.maps:
        m.coeffs.mul_((m.shell <= cut).to(m.coeffs.dtype))
    return np.bincount(lat["labels"], minlength=cfg.classes)


def _class_search_step(net, cfg, search, Y, ctf, band, temperature, gen_device, idx):
    """The class restart's step: each particle's pose drawn from its posterior against its class's
    map ``V(code)``, the decoder learning there; the posterior of z at the best pose kept."""
    z = net.codes[net.labels[torch.as_tensor(idx, device=net.labels.device)]]
    A, o, A_best, o_best = search.sample_z(net.decoder, Y, ctf, band, z[:, None], temperature, gen_device)
    moved = geodesic_distance_deg(net.bank(idx)[0], A_best) > search.spacing_deg
    net.bank.set(idx, A_best, o_best)
    per = image_loss(render(net.decoder(A, z), ctf, o), Y, band)
    net.update_noise(per.detach().mean())
    net.z[torch.as_tensor(idx, device=net.z.device)] = _posterior_z(net, A_best, o_best, Y, ctf, band, cfg.beta)[0]
    return per.mean() + pose_distance(net.encoder(phase_flipped(Y, ctf)), A_best, o_best), moved


def _class_centres(net, cfg: HeteroConfig):
    """The k-means centres of the particles' current z ``(classes, zdim)`` (None while z is still 0)."""
    z = net.z.double().cpu().numpy()
    if cfg.classes < 2 or not np.isfinite(z).all() or z.std(0).max() < 1e-8:
        return None
    centres = latent_analysis(z, cfg.classes, cfg.seed, starts=3)["centres"]
    return torch.as_tensor(centres, dtype=torch.float32, device=net.z.device)


def _run(cfg: HeteroConfig, images, ctf_fn, initial, truth, states, device, out: Path, resume: bool,
         progress: bool):
    torch.manual_seed(cfg.seed)
    n = len(images)
    net = _HeteroNet(cfg, n)
    if initial is not None:
        net.bank.set(torch.arange(n), torch.as_tensor(initial[0], dtype=torch.float32),
                     torch.as_tensor(initial[1], dtype=torch.float32))
    net = net.to(device)
    net.decoder.set_radial_profile(radial_profile(images, ctf_fn, cfg.box_px).to(device))
    encoders = list(net.encoder.parameters()) + list(net.conformation.parameters())

    def clip():   # each encoder on its own: the KL's scale follows the noise level, the poses' does not
        torch.nn.utils.clip_grad_norm_(net.encoder.parameters(), 5.0)
        torch.nn.utils.clip_grad_norm_(net.conformation.parameters(), 5.0)

    opt = torch.optim.Adam([{"params": encoders, "lr": cfg.lr},
                            {"params": net.decoder.parameters(), "lr": cfg.lr_decoder}])
    loop = EpochLoop(net, opt, n=n, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, device=device,
                     out=out, name="hetero", figure=hetero_figure, clip=clip)
    if resume:
        loop.resume()
    kx, ky = frequency_index_2d(cfg.box_px, device=device)
    radius = torch.sqrt(kx**2 + ky**2)
    r_max = cfg.box_px / 2
    n_search = cfg.n_search_epochs()
    grid = (cfg.search_order, cfg.search_shift_px, cfg.box_px, cfg.search_refresh_steps, device)
    search = GridSearch(*grid) if n_search and initial is None else None
    csearch = ConditionalGridSearch(*grid) if initial is None else None
    spacing = grid_spacing_deg(cfg.search_order)
    steps = loop.steps
    r0 = n_search + cfg.hetero_search_epochs                      # the class restart's first epoch
    epoch_state = {}

    def phase_of(epoch: int) -> str:
        for s in (search, csearch):
            if s is not None:
                s.new_epoch()
        phase = _phase(cfg, epoch, loop.rows, initial is not None)
        if phase == "class search" and epoch == r0:
            sizes = _restart_classes(net, cfg)
            for p in net.decoder.parameters():                         # Adam's moments are the old maps'
                opt.state.pop(p, None)
            log.info("class restart: classes of %s particles, maps low-passed to %.2f of Nyquist",
                     ", ".join(map(str, sizes)), cfg.restart_lowpass)
        epoch_state["centres"] = _class_centres(net, cfg) if phase == "hetero search" else None
        epoch_state["n_first"] = sum(r["phase"] != "hetero" for r in loop.rows)
        return phase

    def step(phase: str, epoch: int, s: int, idx):
        raw, ctf = images[idx].to(device), ctf_fn(idx).to(device)
        Y = fft2_centered(raw)
        gen = loop.gen_device
        if phase in ("search", "hetero search", "class search"):
            # the band grows and the temperature falls over search_epochs (both searches share one
            # schedule), and again over the class restart's epochs
            if phase == "class search":
                t = min(1.0, ((epoch - r0) * steps + s) / (cfg.n_restart_epochs() * steps))
            else:
                t = min(1.0, (epoch * steps + s) / (max(1, n_search) * steps))
            band = radius <= r_max * min(1.0, 0.2 + 0.8 * t)
            temperature = cfg.search_temperature ** (1 - t)
        if phase == "search":
            loss, mv = _search_step(net, search, Y, ctf, band, temperature, gen, idx)
            loop.acc["moved"].append(mv)
            yield loss
            return
        if phase == "consensus":
            yield _consensus_step(net, Y, ctf, radius <= r_max, idx)
            return
        if phase == "class search":
            loss, mv = _class_search_step(net, cfg, csearch, Y, ctf, band, temperature, gen, idx)
            loop.acc["moved"].append(mv)
            yield loss
            return
        if phase == "hetero search":
            loss, per, kl, posterior, mv = _task1_step(net, cfg, Y, ctf, band, idx, gen, search=csearch,
                                                       temperature=temperature, centres=epoch_state["centres"])
            loop.acc["moved"].append(mv)
        else:
            # the local step starts at half the grid spacing (a quarter from given poses) and shrinks
            # by 0.8 every epoch, down to 1 degree
            start = spacing / 2 if initial is None else spacing / 4
            delta = max(1.0, start * 0.8 ** (epoch - epoch_state["n_first"]))
            loss, per, kl, posterior, _ = _task1_step(net, cfg, Y, ctf, radius <= r_max, idx, gen, delta=delta)
        loop.acc["image_loss"].append(float(per.mean()))
        loop.acc["kl"].append(float(kl.mean()))
        yield loss
        if cfg.task2 and s % cfg.task2_every == 0:
            loss2 = _task2_loss(net, ctf, posterior, gen)
            loop.acc["task2_loss"].append(float(loss2.detach()))
            yield loss2

    def finish(epoch: int, phase: str, row: dict) -> str:
        for key in ("image_loss", "kl", "task2_loss"):
            if loop.acc[key]:
                row[key] = float(np.mean(loop.acc[key]))
        if truth is None:
            return ""
        sub = np.arange(min(n, 1000))
        al = align_poses_globally(net.bank.matrix[:len(sub)].double().cpu().numpy(), truth[sub])
        row.update(medse=al["medse"], median_deg=al["median_deg"])
        per_state = ""
        if states is not None and states.max() <= 4:
            per_state = " (per state: " + ", ".join(
                f"{np.median(al['errors_deg'][states[sub] == s]):.0f}" for s in np.unique(states[sub])) + ")"
        if phase == "class search" and states is not None:
            row["misclassified"] = misclassification(net.labels[:len(sub)].cpu().numpy(), states[sub])["misclassified"]
        if phase.startswith("hetero") and states is not None:
            # the run's z (each particle's posterior mean at its last visit) and the encoder's
            lat = latent_analysis(net.z[:len(sub)].double().cpu().numpy(), cfg.classes, cfg.seed, starts=3)
            row["misclassified"] = misclassification(lat["labels"], states[sub])["misclassified"]
            z, _, _ = _encode(net, images[sub], lambda i: ctf_fn(sub[i]), device)
            lat = latent_analysis(z, cfg.classes, cfg.seed, starts=3)
            row["encoder_misclassified"] = misclassification(lat["labels"], states[sub])["misclassified"]
        return "".join([f", median pose error {row['median_deg']:.1f} deg{per_state}",
                        f", {100 * row['misclassified']:.1f}% misclassified" if "misclassified" in row else "",
                        f" (encoder alone {100 * row['encoder_misclassified']:.1f}%)"
                        if "encoder_misclassified" in row else ""])

    loop.run(phase_of, step, finish, progress)
    rows = loop.rows
    run = {"epochs_run": loop.state["epoch"], "first_phase_epochs_run": sum(r["phase"] != "hetero" for r in rows),
           "train_seconds": float(sum(r["epoch_s"] for r in rows)), "final_loss": rows[-1]["loss"] if rows else None,
           "noise_var": float(net.noise_var)}
    return net, run
