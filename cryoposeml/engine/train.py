"""``cryoposeml train``: supervised pose networks on particles with known poses.

A model folder holds ``model.json`` (written last: its presence means the training finished) with
the network configuration, preprocessing, symmetry, calibration and a summary of the training
data, and one sub-folder per trained network (``full/``, or ``half1/`` + ``half2/`` with
``--halfsets``), each with ``weights.safetensors`` (best validation epoch), ``checkpoint.pt``
(for ``--resume``), ``metrics.csv`` and ``curves.png``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.errors import InputError
from ..core.inplane import D4, transform_images, transform_poses
from ..core.symmetry import symmetric_distance_deg, symmetry_group
from ..data.dataset import ParticleDataset
from ..data.preprocess import Preprocessor
from ..data.star import ParticleStar, read_star
from ..families import FAMILIES, family
from ..options import option
from ..models import PoseNetConfig, build_model
from ._checkpoint import global_rng_state, restore, save_checkpoint, write_rows_csv
from ._outputs import check_run_folder, stamp, write_json
from .calibration import auroc, cross_fitted_ece, fit_calibration
from .plots import save_figure, training_figure

__all__ = ["TrainConfig", "train", "load_model", "preprocessor_for", "resolve_device"]

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    model: str = option("image2sphere", "model family: " + "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.values()),
                        choices=tuple(FAMILIES))
    sym: str = option("C1", "point group")
    epochs: int = option(30)
    batch_size: int = option(64)
    lr: float = option(2e-3, "peak learning rate, one-cycle")
    weight_decay: float = 1e-4
    box_px: int = option(64, "network box; particles are Fourier-rescaled to it, keeping their field of view")
    val_fraction: float = option(0.1, "particles held out for early stopping and the validation figures")
    patience: int = option(10, "early-stopping epochs (on the validation median error)")
    halfsets: bool = option(False, "one network per half-set (rlnRandomSubset)")
    augment: bool = option(True, "random in-plane D4 transforms with consistent labels")
    # on the 2,800-particle test set the distance loss cost bingham 2.6 deg of held-out median (9.6 against 7.0)
    siamese: bool = option(False, "add cryo-forum's pairwise-distance loss with its curriculum to the regression heads "
                                  "(bingham, sixd, equivariant); it slowed their learning in our tests")
    shift_weight: float = 0.1
    widths: tuple = option((32, 64, 128, 256), "encoder widths")
    dropout: float | None = option(None, "dropout in the encoder and head",
                                   none_means="the family's: " + ", ".join(f"{f.dropout:g} for {f.name}"
                                                                           for f in FAMILIES.values()))
    seed: int = option(0)
    device: str = option("auto", "auto, cpu or cuda[:N]")
    precision: str = option("auto", "auto: bfloat16 mixed precision on CUDA, float32 on CPU",
                            choices=("auto", "fp32", "bf16"))
    label_confidence: str = option("auto", "column weighting each particle's loss (a refinement's confidence in its "
                                           "pose); auto: rlnMaxValueProbDistribution, else rlnParticleFigureOfMerit, "
                                           "when present; none: equal weights")
    reference: bool = option(True, "keep the consensus reference (half-maps of the training particles, used by predict "
                                   "to verify the network's poses) and calibrate the matched uncertainty on it")
    calibration_fraction: float = option(0.1, "particles held out of training and of the reference, on which the "
                                              "matched uncertainty is calibrated")
    extra: dict = field(default_factory=dict)




def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda asked for but no CUDA device is available")
    return torch.device(name)


def preprocessor_for(star: ParticleStar, box_px: int, pixel_out: float) -> Preprocessor:
    return Preprocessor(star.pixel_size_angstrom, pixel_out, box_px,
                        star.ctf_params() if star.has_ctf() else None, do_phase_flip=True)


#: columns taken, in this order, as a per-particle confidence in the training labels
LABEL_CONFIDENCE_COLUMNS = ("rlnMaxValueProbDistribution", "rlnParticleFigureOfMerit")


def label_weights(star: ParticleStar, column: str, path) -> tuple[np.ndarray, str | None]:
    """Per-particle loss weights from a label-confidence column (CESPED weights its cross-entropy by
    Relion's rlnMaxValueProbDistribution), scaled to mean 1; all ones with ``none``."""
    p = star.particles
    if column == "none":
        return np.ones(len(p)), None
    if column == "auto":
        column = next((c for c in LABEL_CONFIDENCE_COLUMNS if c in p), None)
        if column is None:
            return np.ones(len(p)), None
    elif column not in p:
        raise InputError(f"--label-confidence {column}: no such column", path)
    w = np.asarray(p[column], dtype=float)
    if not np.all(np.isfinite(w)) or (w < 0).any() or w.sum() <= 0:
        raise InputError(f"column {column} must hold finite, non-negative confidences (not all zero)", path)
    return w / w.mean(), column


def _augment(images, A, origins, gen: torch.Generator):
    """One random D4 element per particle (images, poses and origins transformed together)."""
    which = torch.randint(0, len(D4), (images.shape[0],), generator=gen)
    images, A, origins = images.clone(), A.clone(), origins.clone()
    for k in which.unique().tolist():
        sel = which == k
        images[sel] = transform_images(images[sel], D4[k])
        A[sel], origins[sel] = transform_poses(A[sel], origins[sel], D4[k])
    return images, A, origins


@torch.no_grad()
def _predict(model, images: torch.Tensor, device, batch_size: int = 256) -> dict:
    model.eval()
    outs = {"matrix": [], "confidence": [], "shift_px": []}
    for s in range(0, len(images), batch_size):
        o = model(images[s:s + batch_size].to(device))
        for k in outs:
            outs[k].append(o[k].float().cpu())
    return {k: torch.cat(v) for k, v in outs.items()}


class _Distributed:
    """Data-parallel training under ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs, Gloo on CPUs.
    Every rank walks the same shuffled batches and takes its slice of each, so the effective batch
    and the schedule do not depend on the number of processes; rank 0 alone writes files."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device
        if self.world > 1:
            if device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[self.local_rank] if self.device.type == "cuda" else None)

    def shard(self, idx: np.ndarray) -> np.ndarray:
        return idx[self.rank::self.world]

    def from_main(self, obj):
        """``obj`` as rank 0 has it (keeps decisions such as early stopping identical on all ranks)."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self):
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def _batch_loss(model, loss_fn, x, a, o, w, group, cfg, net_cfg, beta1, autocast) -> torch.Tensor:
    with autocast:
        out = model(x)
    out = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}
    fam = family(net_cfg.family)
    loss = loss_fn(out, a, w, group, beta1=beta1, siamese=cfg.siamese, confidence=fam.learns_confidence)
    if net_cfg.predict_shifts:
        loss = loss + cfg.shift_weight * torch.nn.functional.smooth_l1_loss(out["shift_px"], o)
    return loss


def _train_one(cfg: TrainConfig, net_cfg: PoseNetConfig, images, A, origins, weights, train_idx, val_idx,
               outdir: Path, resume: bool, progress: bool, ddp: _Distributed) -> dict:
    device = ddp.device
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    core = build_model(net_cfg).to(device)
    model = ddp.wrap(core)
    loss_fn = family(net_cfg.family).loss_function()
    # mixed precision (bfloat16: no loss scaling needed) on GPUs; the losses stay in float32
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    group = torch.as_tensor(symmetry_group(cfg.sym), dtype=torch.float32, device=device)
    steps_per_epoch = max(1, int(np.ceil(len(train_idx) / cfg.batch_size)))
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(core.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.2)
    state = {"epoch": 0, "best": float("inf"), "bad_epochs": 0, "rows": [], "micro_batch": cfg.batch_size}
    ckpt = outdir / "checkpoint.pt"
    if resume and ckpt.exists():
        state = {"micro_batch": cfg.batch_size, **restore(ckpt, device, core, opt, gen, sched)}
        log.info("resuming %s at epoch %d", outdir.name, state["epoch"])
    if ddp.main:
        outdir.mkdir(parents=True, exist_ok=True)
    A_t = torch.as_tensor(A, dtype=torch.float32)
    o_t = torch.as_tensor(origins, dtype=torch.float32)
    weights_t = torch.as_tensor(weights, dtype=torch.float32)
    val_imgs = images[val_idx]
    for epoch in range(state["epoch"], cfg.epochs):
        t_epoch = time.perf_counter()
        if state["bad_epochs"] >= cfg.patience:
            log.info("early stop: no validation improvement in %d epochs", cfg.patience)
            break
        model.train()
        perm = train_idx[torch.randperm(len(train_idx), generator=gen).numpy()]
        losses = []
        bar = tqdm(range(steps_per_epoch), desc=f"train {outdir.name} epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and ddp.main), leave=False)
        for step in bar:
            batch = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            x, a, o = images[batch], A_t[batch], o_t[batch]
            if cfg.augment:   # drawn for the whole batch on every rank: the generators stay in step
                x, a, o = _augment(x, a, o, gen)
            if len(batch) < 2 * ddp.world:   # decided from the whole batch: every rank skips it together
                continue
            mine = ddp.shard(np.arange(len(batch)))
            beta1 = ((epoch * steps_per_epoch + step + 1) / total) ** 0.5 if cfg.siamese else 1.0
            while True:   # on CUDA out-of-memory: same batch in smaller pieces, gradients accumulated
                try:
                    opt.zero_grad(set_to_none=True)
                    loss_sum = 0.0
                    # pieces of at least micro_batch particles (never a lone one: batch norm needs two);
                    # under DDP gradients are synchronised once, at the last piece
                    parts = np.array_split(mine, max(1, len(mine) // state["micro_batch"]))
                    for j, part in enumerate(parts):
                        sync = ddp.world == 1 or j == len(parts) - 1
                        with contextlib.nullcontext() if sync else model.no_sync():
                            loss = _batch_loss(model, loss_fn, x[part].to(device), a[part].to(device),
                                               o[part].to(device), weights_t[batch[part]].to(device), group, cfg,
                                               net_cfg, beta1, autocast) * (len(part) / len(mine))
                            loss.backward()
                        loss_sum += float(loss.detach())
                    break
                except torch.cuda.OutOfMemoryError:
                    if state["micro_batch"] <= 2:
                        raise
                    state["micro_batch"] //= 2
                    opt.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    log.warning("CUDA out of memory: continuing with pieces of %d particles per step "
                                "(gradients accumulated; same effective batch)", state["micro_batch"])
            torch.nn.utils.clip_grad_norm_(core.parameters(), 5.0)
            opt.step()
            sched.step()
            losses.append(loss_sum)
        pred = _predict(core, val_imgs, device)
        err = symmetric_distance_deg(pred["matrix"].double().numpy(), A[val_idx], cfg.sym)
        shift_err = np.linalg.norm(pred["shift_px"].numpy() - origins[val_idx], axis=1)
        row = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
               "val_median_deg": float(np.median(err)), "val_mean_deg": float(np.mean(err)),
               "val_shift_median_px": float(np.median(shift_err)), "lr": float(sched.get_last_lr()[0]),
               "epoch_s": time.perf_counter() - t_epoch}
        row = ddp.from_main(row)
        state["rows"].append(row)
        if ddp.main:
            log.info("%s epoch %d: loss %.4f, validation median %.2f deg, mean %.2f deg", outdir.name, epoch + 1,
                     row["train_loss"], row["val_median_deg"], row["val_mean_deg"])
        improved = row["val_median_deg"] < state["best"]
        if improved:
            state["best"], state["bad_epochs"] = row["val_median_deg"], 0
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch + 1
        if ddp.main:
            if improved:
                save_file({k: v.detach().cpu().contiguous() for k, v in core.state_dict().items()},
                          str(outdir / "weights.safetensors"))
            save_checkpoint(ckpt, {**global_rng_state(), "model": core.state_dict(), "optimizer": opt.state_dict(),
                                   "scheduler": sched.state_dict(), "generator": gen.get_state(),
                                   "state": json.dumps(state)})
            write_rows_csv(outdir / "metrics.csv", state["rows"])
            save_figure(training_figure({outdir.name: state["rows"]}), outdir / "curves.png")
        ddp.barrier()

    # Calibrate the best model on the validation particles (the final map is fitted on all of them).
    core.load_state_dict(load_file(str(outdir / "weights.safetensors"), device=str(device)))
    pred = _predict(core, val_imgs, device)
    score = pred["confidence"].double().numpy()
    err = symmetric_distance_deg(pred["matrix"].double().numpy(), A[val_idx], cfg.sym)
    # ECE cross-fitted: each fold's expected errors come from a calibration fitted on the others
    ece, _ = cross_fitted_ece(score, err, seed=cfg.seed)
    calib = fit_calibration(score, err)
    shift_err = np.linalg.norm(pred["shift_px"].numpy() - origins[val_idx], axis=1)
    return {
        "calibration": calib.to_dict(),
        "validation": {"particles": int(len(val_idx)), "median_deg": float(np.median(err)),
                       "mean_deg": float(np.mean(err)), "pct_under_5deg": float(100 * np.mean(err < 5)),
                       "pct_under_10deg": float(100 * np.mean(err < 10)),
                       "shift_median_px": float(np.median(shift_err)), "ece_deg": ece,
                       "auroc_error_over_10deg": auroc(-score, err > 10)},
        "epochs_run": state["epoch"], "best_val_median_deg": state["best"],
        "train_seconds": float(sum(r["epoch_s"] for r in state["rows"])),
    }


def train(particles, out, cfg: TrainConfig, resume: bool = False, overwrite: bool = False,
          progress: bool = True) -> dict:
    """Train (one model, or one per half-set) and write the model folder ``out``."""
    out = Path(out)
    check_run_folder(out, "model.json", "a trained model", resume, overwrite)
    symmetry_group(cfg.sym)
    ddp = _Distributed(resolve_device(cfg.device))
    ddp.barrier()   # every rank has checked the folder before rank 0 writes into it
    progress = progress and ddp.main
    if cfg.box_px % 2 or cfg.box_px < 16:
        raise InputError(f"--box-px must be even and >= 16 (got {cfg.box_px})")
    star = read_star(particles)
    star.require(["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"], "training (poses from a refinement)")
    if "rlnCpmlJunk" in star.particles:   # simulated junk carries no pose to learn
        star.particles = star.particles[star.particles["rlnCpmlJunk"] == 0].reset_index(drop=True)
    n = len(star)
    if n < 20:
        raise InputError(f"only {n} particles: too few to train and validate", particles)
    pixel_out = star.pixel_size_angstrom * star.box / cfg.box_px
    prep = preprocessor_for(star, cfg.box_px, pixel_out)
    images = ParticleDataset(star, transform=prep).read_all("train: preprocessing", progress)
    A = star.matrices()
    origins = star.shifts_angstrom() / pixel_out
    weights, weight_column = label_weights(star, cfg.label_confidence, particles)
    dropout = cfg.dropout if cfg.dropout is not None else family(cfg.model).dropout
    if not 0.0 <= dropout < 1.0:
        raise InputError(f"--dropout must be in [0, 1) (got {dropout})")
    net_cfg = PoseNetConfig(family=cfg.model, box=cfg.box_px, widths=tuple(cfg.widths), dropout=dropout)
    rng = np.random.default_rng(cfg.seed)
    cal_rng = np.random.default_rng(cfg.seed + 1)
    if not 0.0 <= cfg.calibration_fraction < 0.5:
        raise InputError(f"--calibration-fraction must be in [0, 0.5) (got {cfg.calibration_fraction})")

    def split(idx):
        """Validation (early stopping), then a calibration split of the rest that neither the
        network nor the reference sees (the matched uncertainty is calibrated on it)."""
        idx = rng.permutation(idx)
        n_val = max(2, int(round(cfg.val_fraction * len(idx))))
        tr, va = idx[n_val:], idx[:n_val]
        n_cal = int(round(cfg.calibration_fraction * len(idx)))
        tr = cal_rng.permutation(tr)
        return np.sort(tr[n_cal:]), np.sort(va), np.sort(tr[:n_cal])

    runs, calib_rows = {}, {}
    if cfg.halfsets:
        subset = star.random_subset()
        if subset is None:
            raise InputError("--halfsets needs rlnRandomSubset (1/2) in the particles", particles)
        for h in (1, 2):
            tr, va, calib_rows[f"half{h}"] = split(np.nonzero(subset == h)[0])
            runs[f"half{h}"] = _train_one(cfg, net_cfg, images, A, origins, weights, tr, va, out / f"half{h}", resume,
                                          progress, ddp)
    else:
        tr, va, calib_rows["full"] = split(np.arange(n))
        runs["full"] = _train_one(cfg, net_cfg, images, A, origins, weights, tr, va, out / "full", resume, progress,
                                  ddp)
    del images
    meta = {
        **stamp(particles=particles, **{k: v for k, v in asdict(cfg).items() if k != "extra"}),
        "network": net_cfg.to_dict(), "sym": cfg.sym.upper(),
        "preprocessing": {"box_px": cfg.box_px, "pixel_size_angstrom": pixel_out, "phase_flip": True,
                          "normalize_background": True, "mask_radius_px": prep.box_out / 2 - 4},
        "input": {"box": star.box, "pixel_size_angstrom": star.pixel_size_angstrom},
        "training_data": {"particles": n, "star": str(Path(particles).resolve()),
                          "label_confidence_column": weight_column},
        "runs": runs,
    }
    if ddp.main and cfg.reference:
        _consensus_reference(star, cfg, net_cfg, meta, calib_rows, out, progress)   # adds to meta["runs"]
    if ddp.main:
        write_json(out / "model.json", meta)
    return meta


def _consensus_reference(star: ParticleStar, cfg: TrainConfig, net_cfg: PoseNetConfig, meta: dict, calib_rows: dict,
                         out: Path, progress: bool) -> None:
    """Reconstruct the half-maps of the training particles (calibration split left out) into
    ``out/reference``, then verify the calibration particles' poses against them with the trained
    networks (same half) and fit the matched uncertainty's calibration (isotonic) on their errors."""
    from scipy.stats import spearmanr

    from .calibration import fit_isotonic_calibration
    from .predict import predict_arrays
    from .reconstruct import half_set_labels, reconstruct_star
    from .verify import MatchConfig, load_reference, reference_dir, write_reference

    runs = meta["runs"]
    held = np.concatenate([r for r in calib_rows.values()]) if calib_rows else np.zeros(0, int)
    keep = np.setdiff1d(np.arange(len(star)), held)
    subset, made_up = half_set_labels(star)
    ref_star = ParticleStar(star.particles.iloc[keep].reset_index(drop=True), star.optics, star.path,
                            star.other_blocks)
    ref_star.particles["rlnRandomSubset"] = subset[keep]
    log.info("reconstructing the consensus reference from %d particles (%d held out for calibration)", len(keep),
             len(held))
    rec = reconstruct_star(ref_star, cfg.sym, halves=True, progress=progress)
    info = write_reference(reference_dir(out), rec.half1, rec.half2, star.pixel_size_angstrom, cfg.sym,
                           {"particles": int(len(keep)), "half_counts": rec.info["half_counts"],
                            "halves_assigned_randomly": made_up})
    log.info("reference: half-map FSC 0.143 at %.2f A", info["resolution_fsc0143_angstrom"])
    ref = load_reference(out, sym=cfg.sym, box=star.box, apix=star.pixel_size_angstrom)
    device = resolve_device(cfg.device)
    for run, rows in calib_rows.items():
        if len(rows) < 20:
            log.warning("%s: only %d calibration particles; the matched uncertainty is not calibrated", run, len(rows))
            continue
        model = build_model(net_cfg)
        model.load_state_dict(load_file(str(out / run / "weights.safetensors"), device="cpu"))
        model = model.to(device).eval()
        ref_of = np.where(subset[rows] == 1, "half1", "half2")
        true_A = star.matrices()[rows]

        def run_matching(cfg_m):
            return predict_arrays(star, rows, {run: model}, meta, np.array([run] * len(rows)), ref, ref_of, cfg_m,
                                  device, progress=progress)

        # the escalation threshold: the match z of the proposals that turn out right (within 5 deg),
        # at the percentiles predict chooses from (--escalate-right: the share of right proposals
        # searched exhaustively anyway, because the wrong ones overlap them)
        prop = run_matching(MatchConfig(matching="proposals"))
        right = symmetric_distance_deg(prop["matrix"], true_A, cfg.sym) < 5.0
        quantiles = ({str(q): float(np.percentile(prop["z_proposals"][right], q)) for q in ESCALATE_PERCENTILES}
                     if right.sum() >= 10 else None)
        runs[run]["matching_right_z_percentiles"] = quantiles
        escalate_z = escalation_threshold(quantiles, MatchConfig.escalate_right)
        arr = run_matching(MatchConfig(matching="auto", escalate_z=escalate_z))
        err = symmetric_distance_deg(arr["matrix"], true_A, cfg.sym)
        net_err = symmetric_distance_deg(arr["net_matrix"], true_A, cfg.sym)
        shift_err = np.linalg.norm(arr["shift_px"] - star.shifts_px()[rows], axis=1) * star.pixel_size_angstrom
        score = -arr["expected_raw"]
        ece, oof = cross_fitted_ece(score, err, fit_isotonic_calibration, seed=cfg.seed)
        runs[run]["matching_calibration"] = fit_isotonic_calibration(score, err).to_dict()
        # what a good particle's match z looks like (the matched poses under 5 deg): predict places
        # each new particle in this distribution, and cleanup calls the bottom tail junk
        good_z = np.sort(arr["z"][err < 5.0])
        runs[run]["matching_good_z"] = [round(float(v), 4) for v in good_z] if len(good_z) >= 20 else None
        runs[run]["matching_validation"] = {
            "particles": int(len(rows)), "median_deg": float(np.median(err)), "mean_deg": float(np.mean(err)),
            "pct_under_5deg": float(100 * np.mean(err < 5)), "network_median_deg": float(np.median(net_err)),
            "shift_median_angstrom": float(np.median(shift_err)), "ece_deg": ece,
            "spearman_expected_vs_error": float(spearmanr(oof, err).correlation),
            "fraction_escalated": float(arr["escalated"].mean()),
            "poses_scored_per_particle": float(arr["n_scored"].mean()),
            "proposals_right_pct": float(100 * right.mean()), "escalate_z": escalate_z,
            "match_z_quantiles_5_25_50": np.percentile(arr["z"], [5, 25, 50]).tolist()}
        log.info("%s calibration split (%d particles): matched median %.2f deg (network %.2f), ECE %.2f deg, "
                 "%.0f%% escalated", run, len(rows), np.median(err), np.median(net_err), ece,
                 100 * arr["escalated"].mean())


#: percentiles of the right proposals' match z kept in model.json (predict interpolates between them)
ESCALATE_PERCENTILES = (1, 5, 10, 20, 30, 50, 70)


def match_quantile(good_z, z: np.ndarray) -> np.ndarray | None:
    """The share of the calibration split's good particles (``good_z``, sorted) that match the map
    worse than a match z of ``z``: the empirical distribution with plotting positions
    ``(i + 1/2) / n``, linear between them, clamped to ``[1/2n, 1 - 1/2n]``. None without a
    calibration."""
    if not good_z:
        return None
    g = np.asarray(good_z, np.float64)
    return np.interp(z, g, (np.arange(len(g)) + 0.5) / len(g))


def escalation_threshold(percentiles: dict | None, share: float) -> float | None:
    """The match z below which a share ``share`` of the calibration's right proposals fall: with
    ``auto``, particles under it are searched exhaustively. None without a calibration (then every
    particle is)."""
    if percentiles is None:
        return None
    q = np.array([float(k) for k in percentiles])
    v = np.array(list(percentiles.values()))
    order = np.argsort(q)
    return float(np.interp(100 * share, q[order], v[order]))


def load_model(model_dir, run: str, device) -> tuple[torch.nn.Module, dict]:
    """A trained network (weights only, no code executed) and the folder's metadata."""
    model_dir = Path(model_dir)
    meta_path = model_dir / "model.json"
    if not meta_path.exists():
        raise InputError("no model.json: not a finished cryoposeml model folder", model_dir)
    meta = json.loads(meta_path.read_text())
    weights = model_dir / run / "weights.safetensors"
    if not weights.exists():
        raise InputError(f"missing {run}/weights.safetensors", model_dir)
    model = build_model(PoseNetConfig.from_dict(meta["network"]))
    try:
        model.load_state_dict(load_file(str(weights), device="cpu"))
    except Exception as e:
        raise InputError(f"cannot load weights ({e})", weights) from e
    return model.to(device).eval(), meta
