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

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.fourier import fft2_centered, frequency_index_2d
from ..core.grids import grid_spacing_deg
from ..core.inplane import D4, transform_images, transform_poses
from ..core.metrics import align_poses_globally, fsc, resolution_at, soft_sphere_mask
from ..core.rotations import geodesic_distance_deg
from ..core.search import GridSearch, image_loss
from ..data.bundled import resolve_map
from ..data.mrc import half_map_paths, read_map, write_map
from ..data.star import read_star, write_star
from ..models.decoders import DECODERS, build_decoder
from ..options import option
from ._outputs import check_run_folder, stamp, write_json
from .amortized import (ENCODERS, MIN_REFINE_EPOCHS, EpochLoop, PoseBank, local_search, phase_flipped, pose_distance,
                        pose_encoder, radial_profile, reference_rows, render, working_set)
from .plots import abinitio_figure
from .reconstruct import half_set_labels, reconstruct_star
from .train import resolve_device

__all__ = ["AbinitioConfig", "abinitio", "ENCODERS", "LOSSES"]

log = logging.getLogger(__name__)

LOSSES = ("l2", "symmetric", "mirror")
#: in-plane copies compared by each loss (indices into core.inplane.D4: 0 identity, 2 = 180-degree
#: turn, 4 = mirror in x, 6 = mirror in y)
_COPIES = {"l2": (0,), "symmetric": (0, 2), "mirror": (0, 2, 4, 6)}
#: converged: median pose error under ~10 degrees (||R - R'||_F^2 = 8 sin^2(theta / 2))
CONVERGED_MEDSE = 8 * np.sin(np.radians(10) / 2) ** 2


@dataclass
class AbinitioConfig:
    encoder: str = option("equivariant", choices=ENCODERS)
    decoder: str = option("voxel", choices=DECODERS)
    loss: str = option("l2", "l2; symmetric: also the image turned by 180 deg, the smaller loss counts; mirror: also "
                             "its mirrors", choices=LOSSES)
    epochs: int = option(20)
    batch_size: int = option(32)
    lr: float = option(1e-3, "encoder learning rate")
    lr_decoder: float = option(5e-2)
    box_px: int = option(64, "working box")
    widths: tuple = option((16, 32, 64, 128), "encoder widths")
    frequency_marching: bool = option(True, "compare a band that grows from 1/5 of Nyquist (--no-frequency-marching: "
                                            "all frequencies from the start)")
    search_epochs: int | None = option(
        None, "epochs of global pose search at the start: the decoder learns from poses drawn from each particle's "
              "posterior over a HEALPix grid, the encoder learns to predict the best ones; the search goes on while "
              "the poses still move (--search-until-stable); then local refinement of each particle's pose, the "
              "encoder still learning them. 0: amortized from the start (the image loss alone), as cryoAI",
        none_means="half of --epochs")
    search_order: int = option(2, "HEALPix order of the search grid: 1 (576 rotations, 30 deg), 2 (4,608, 15 deg)")
    search_shift_px: int = option(1, "search origins on a (2k+1)^2 grid of whole pixels of the working box")
    search_temperature: float = option(10.0, "posterior temperature at the start of the search, annealed to 1 over "
                                             "--search-epochs; higher explores longer")
    search_until_stable: float = option(0.1, "after --search-epochs, keep searching while more than this fraction of "
                                             "the particles' best poses moved by over a grid step in the last epoch, "
                                             "leaving 4 epochs to refine (0: search until then; 1: never extend)")
    search_refresh_steps: int = option(4, "render the search grid's slices every this many batches (the map moves "
                                          "little in a few steps)")
    halves: bool = option(False, "gold standard: one independent run per rlnRandomSubset (or a random split); half 2 "
                                 "is brought into half 1's frame by the rotation between the two encoders' poses")
    seed: int = option(0)
    device: str = option("auto", "auto, cpu or cuda[:N]")

    def n_search_epochs(self) -> int:
        return self.epochs // 2 if self.search_epochs is None else min(self.search_epochs, self.epochs)


class _AbinitioNet(torch.nn.Module):
    def __init__(self, cfg: AbinitioConfig):
        super().__init__()
        self.encoder = pose_encoder(cfg.encoder, cfg.box_px, cfg.widths)
        self.decoder = build_decoder(cfg.decoder, cfg.box_px)
        self.bank = None

    def add_bank(self, n: int) -> None:
        self.bank = PoseBank(n)


def _copy_losses(net, raw, ctf, copies, band) -> tuple[torch.Tensor, list[dict]]:
    """Per-copy, per-particle losses ``(len(copies), B)`` -- the mean squared spectral difference
    inside ``band`` -- and the encoder's outputs for each copy (poses of the transformed image)."""
    per_copy, outs = [], []
    for c in copies:
        x = raw if c == 0 else transform_images(raw, D4[c])
        cc = ctf if c == 0 else transform_images(ctf, D4[c])
        Y = fft2_centered(x)
        out = net.encoder(phase_flipped(Y, cc))                     # the encoder sees phase-flipped images
        per_copy.append(image_loss(render(net.decoder(out["matrix"]), cc, out["shift_px"]), Y, band))
        outs.append(out)
    return torch.stack(per_copy), outs


def _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A_target, o_target) -> torch.Tensor:
    """The decoder's image loss at poses ``(A, o)`` plus the encoder's distance to ``(A_target,
    o_target)`` (squared Frobenius of the rotations + squared origin error in px)."""
    dec_loss = image_loss(render(net.decoder(A), ctf, o), Y, band).mean()
    return dec_loss + pose_distance(net.encoder(phase_flipped(Y, ctf)), A_target, o_target)


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
            lb = image_loss(render(net.decoder(Ab), ctf, ob), fft2_centered(x), band)
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
        ref, order = reference_rows(star, reference)
        truth = ref.matrices()[order]
    true_map = None
    if reference_map is not None:
        reference_map = resolve_map(reference_map)
        true_map = read_map(reference_map)[0].astype(np.float64)
        if true_map.shape != (star.box,) * 3:
            raise InputError(f"the map is {true_map.shape[0]} px, the particles {star.box} px", reference_map)

    device = resolve_device(cfg.device)
    images, pixel_out, ctf_fn = working_set(star, cfg.box_px, progress)
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




def _searching(cfg: AbinitioConfig, epoch: int, rows: list[dict]) -> bool:
    """Whether ``epoch`` (0-based) searches: the first ``search_epochs`` do, and then the search goes
    on while the last epoch moved more than ``search_until_stable`` of the best poses (the map is
    still finding itself), as long as ``MIN_REFINE_EPOCHS`` remain for the refinement."""
    n_search = cfg.n_search_epochs()
    if epoch < n_search:
        return True
    if n_search == 0 or not rows or rows[-1]["phase"] != "search":
        return False
    return rows[-1].get("moved", 0.0) > cfg.search_until_stable and epoch < cfg.epochs - MIN_REFINE_EPOCHS


def _run(cfg: AbinitioConfig, images, ctf_fn, truth, device, out: Path, resume: bool, progress: bool):
    """One network trained on ``images``: returns it and its summary (also checkpointed in ``out``)."""
    torch.manual_seed(cfg.seed)
    n = len(images)
    n_search = cfg.n_search_epochs()
    net = _AbinitioNet(cfg)
    if n_search:
        net.add_bank(n)
    net = net.to(device)
    if hasattr(net.decoder, "set_radial_profile"):
        net.decoder.set_radial_profile(radial_profile(images, ctf_fn, cfg.box_px).to(device))
    opt = torch.optim.Adam([{"params": net.encoder.parameters(), "lr": cfg.lr},
                            {"params": net.decoder.parameters(), "lr": cfg.lr_decoder}])
    loop = EpochLoop(net, opt, n=n, batch_size=cfg.batch_size, epochs=cfg.epochs, seed=cfg.seed, device=device,
                     out=out, name=f"abinitio {out.name}",
                     figure=lambda rows: abinitio_figure(rows, CONVERGED_MEDSE),
                     clip=lambda: torch.nn.utils.clip_grad_norm_(net.encoder.parameters(), 5.0))
    if resume:
        loop.resume()
    kx, ky = frequency_index_2d(cfg.box_px, device=device)
    radius = torch.sqrt(kx**2 + ky**2)
    copies = _COPIES[cfg.loss]
    search = (GridSearch(cfg.search_order, cfg.search_shift_px, cfg.box_px, cfg.search_refresh_steps, device)
              if n_search else None)
    r_max = cfg.box_px / 2
    steps = loop.steps
    n_searched = 0

    def phase_of(epoch: int) -> str:
        nonlocal n_searched
        n_searched = sum(r["phase"] == "search" for r in loop.rows)   # the refinement starts after them
        if search is not None:
            search.new_epoch()
        if _searching(cfg, epoch, loop.rows):
            return "search"
        return "refine" if net.bank is not None else "amortized"

    def step(phase: str, epoch: int, s: int, idx):
        raw, ctf = images[idx].to(device), ctf_fn(idx).to(device)
        if phase == "search":
            # the decoder learns from poses drawn from the search's posterior; the encoder learns to
            # predict the best ones; the band and the temperature anneal over the first
            # search_epochs (later search epochs run at full band and temperature 1)
            t = min(1.0, (epoch * steps + s) / (n_search * steps))
            r = r_max * min(1.0, 0.2 + 0.8 * t) if cfg.frequency_marching else r_max
            band = radius <= r
            Y = fft2_centered(raw)
            A, o, A_best, o_best = search.sample(net.decoder.render_many, Y, ctf, band,
                                                 cfg.search_temperature ** (1 - t), loop.gen_device)
            loop.acc["moved"].append(geodesic_distance_deg(net.bank(idx)[0], A_best) > search.spacing_deg)
            net.bank.set(idx, A_best, o_best)
            yield _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A_best, o_best)
        elif phase == "refine":
            # semi-amortized refinement: local searches around each particle's pose (the step starts
            # at half the grid spacing and shrinks by 0.6 every epoch), the map learns from the
            # refined poses, the encoder keeps learning to predict them
            delta = grid_spacing_deg(cfg.search_order) / 2 * 0.6 ** (epoch - n_searched)
            Y = fft2_centered(raw)
            band = radius <= r_max
            A, o = net.bank(idx)
            A, o = local_search(lambda R, active: net.decoder(R), A, o, Y, ctf, band, delta)
            net.bank.set(idx, A, o)
            yield _decoder_and_distillation_loss(net, Y, ctf, band, A, o, A, o)
        else:
            # amortized from the start (no search, no bank): the band grows over the first half
            t = (epoch * steps + s) / (cfg.epochs * steps)
            r = r_max * min(1.0, 0.25 + 1.5 * t) if cfg.frequency_marching else r_max
            per_copy, _ = _copy_losses(net, raw, ctf, copies, (radius <= r).float())
            yield per_copy.min(0).values.mean()

    def finish(epoch: int, phase: str, row: dict) -> str:
        if truth is None:
            return ""
        # the run's poses (the bank's where they explain a particle better) and the encoder's alone
        sub = np.arange(min(n, 1000))
        mats, _ = _predict_poses(net, images[sub], lambda i: ctf_fn(sub[i]), device, copies, bank=True)
        al = align_poses_globally(mats, truth[sub])
        row.update(mse=al["mse"], medse=al["medse"], median_deg=al["median_deg"])
        note = f", MedSE {row['medse']:.4f} (median {row['median_deg']:.1f} deg)"
        if net.bank is not None:
            mats, _ = _predict_poses(net, images[sub], lambda i: ctf_fn(sub[i]), device, copies)
            al = align_poses_globally(mats, truth[sub])
            row.update(encoder_medse=al["medse"], encoder_median_deg=al["median_deg"])
            note += f", encoder alone {row['encoder_median_deg']:.1f} deg"
        return note

    loop.run(phase_of, step, finish, progress, prefix=f"{out.name} " if out.name.startswith("half") else "")
    rows = loop.rows
    run = {"particles": n, "epochs_run": loop.state["epoch"], "train_seconds": float(sum(r["epoch_s"] for r in rows)),
           "final_loss": rows[-1]["loss"] if rows else None}
    if rows and "medse" in rows[-1]:
        conv = [r["epoch"] for r in rows if r["medse"] < CONVERGED_MEDSE]
        run["first_converged_epoch"] = conv[0] if conv else None
        run["seconds_to_convergence"] = (float(sum(r["epoch_s"] for r in rows if r["epoch"] <= conv[0]))
                                         if conv else None)
    return net, run
