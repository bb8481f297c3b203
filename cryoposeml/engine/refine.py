"""The Relion handoff: a local auto-refinement started from predicted poses.

What a user would do by hand, made reproducible:

1. Copy the particles into ``OUT/input.star`` with the prior columns Relion centres its local
   searches on (``rlnAngleRot/Tilt/PsiPrior``, ``rlnOriginX/YPriorAngst`` = the predicted pose).
   With ``priors=False`` the predicted poses are only the starting point (Relion then centres each
   iteration on the pose of the previous one).
2. Build the starting reference: the reconstruction from the predicted poses (CTF-corrected),
   low-passed at ``lowpass`` Angstrom (default: its own half-map FSC-0.143 resolution, and no
   finer than 10 A), written as ``OUT/reference.mrc`` and passed with ``--ini_high``.
3. Choose the search from the predicted errors (``rlnCpmlExpectedErrorDeg``):
   ``sigma_ang`` = the 75th percentile of the expected geodesic error / 1.6 (a geodesic error of an
   isotropic Gaussian rotation of per-angle s.d. s averages 1.6 s), within [0.5, 30] deg; the
   HEALPix order is the coarsest whose step is at most ``sigma_ang / 2`` (Relion's own pairing of a
   local step with its prior width; at least 2, at most 5: 1.875 deg, where Relion starts local
   searches itself and from where it refines the sampling as the resolution improves; verified
   poses of 1-2 deg would otherwise start it at 0.23-0.47 deg, dozens of times the
   orientations), used for both
   ``--healpix_order`` and ``--auto_local_healpix_order`` so searches are local from iteration 1.
4. Run ``mpirun -n 3 relion_refine_mpi --auto_refine --split_random_halves`` in ``OUT`` (output
   ``OUT/relion/run*``), streaming Relion's output to the terminal and ``OUT/relion.log``.
5. Parse Relion's final map, half-maps, resolution and poses: ``OUT/refined.star`` (Relion's
   poses, with the input's extra columns restored if Relion dropped them, and
   ``rlnCpmlPoseChangeDeg``: how far Relion moved each particle from the predicted pose, modulo
   symmetry), ``OUT/map.mrc``, ``OUT/map_half1.mrc``, ``OUT/map_half2.mrc``, ``OUT/refine.png``
   (half-map FSC; pose change vs expected error) and ``OUT/refine.json`` (written last).
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import starfile
from scipy.stats import spearmanr

from ..core.errors import InputError
from ..core.fourier import lowpass_volume
from ..core.metrics import fsc, resolution_at, soft_sphere_mask
from ..core.symmetry import symmetric_distance_deg, symmetry_group
from ..data.mrc import read_map, write_map
from ..data.star import ANGLE_COLUMNS, SHIFT_COLUMNS, ParticleStar, read_star, write_star
from ..options import option
from ._outputs import check_run_folder, stamp, write_json
from .plots import refine_figure, save_figure
from .reconstruct import half_set_labels, reconstruct_star

__all__ = ["RefineConfig", "RelionError", "RelionTimeout", "refine", "prepare_refine", "finish_refine", "choose_search",
           "autorefine_args", "autorefine_command", "run_relion",
           "find_program", "final_resolution", "PRIOR_COLUMNS", "healpix_step_deg"]

log = logging.getLogger(__name__)

PRIOR_COLUMNS = ["rlnAngleRotPrior", "rlnAngleTiltPrior", "rlnAnglePsiPrior",
                 "rlnOriginXPriorAngst", "rlnOriginYPriorAngst"]
MARKER = "refine.json"


class RelionError(InputError):
    """Relion is missing or failed; the message carries the end of its log."""


class RelionTimeout(RelionError):
    """Relion ran past the time it was given and was stopped."""


@dataclass
class RefineConfig:
    sym: str = option("C1", "point group")
    reference: str | None = option(None, "starting map", none_means="reconstructed from the predicted poses")
    lowpass_angstrom: float | None = option(None, "low-pass of the starting map, A", flag="--lowpass",
                                            none_means="its half-map FSC-0.143, at least 10 A; 15 A for --reference")
    sigma_ang: float | None = option(None, "prior width, deg", none_means="from rlnCpmlExpectedErrorDeg, 10 deg "
                                                                          "without it")
    healpix_order: int | None = option(None, "initial (local) HEALPix order", none_means="from --sigma-ang")
    offset_range_px: float = option(3.0, "offset search range, px", flag="--offset-range")
    offset_step_px: float = option(1.0, "offset search step, px", flag="--offset-step")
    particle_diameter_angstrom: float | None = option(None, "mask diameter, A", flag="--particle-diameter",
                                                      none_means="90%% of the box")
    priors: bool = option(True, "prior columns from the predicted poses (--no-priors: the poses are only the start)")
    mpi_ranks: int = option(3, "MPI ranks, >= 3", flag="--mpi")
    threads: int = option(1, "threads per rank")
    extra_args: str = option("", "extra arguments appended to relion_refine_mpi's command line", flag="--relion-args")
    relion_refine: str = "relion_refine_mpi"
    mpirun: str = "mpirun"


def healpix_step_deg(order: int) -> float:
    """Angular step of a HEALPix order as Relion reports it (60 deg / 2^order)."""
    return 60.0 / 2 ** order


#: the finest HEALPix order a refinement starts at (1.875 deg); Relion goes finer by itself
MAX_START_ORDER = 5


def choose_search(expected_error_deg: np.ndarray | None) -> dict:
    """``sigma_ang`` and HEALPix order from the predicted expected errors (see the module doc)."""
    if expected_error_deg is None or len(expected_error_deg) == 0:
        sigma, basis = 10.0, "default (no rlnCpmlExpectedErrorDeg)"
    else:
        p75 = float(np.percentile(expected_error_deg, 75))
        sigma, basis = float(np.clip(p75 / 1.6, 0.5, 30.0)), f"75th percentile of the expected error {p75:.2f} deg / 1.6"
    order = 2   # Relion pairs a local step s with sigma 2 s; the same here, from 15 down to 1.875 deg
    while healpix_step_deg(order) > sigma / 2 and order < MAX_START_ORDER:
        order += 1
    return {"sigma_ang": sigma, "healpix_order": order, "basis": basis}


def relion_env() -> dict:
    """This environment, with what Open MPI needs to start Relion's MPI programs here (as root, and
    more ranks than cores)."""
    env = dict(os.environ)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    return env


def autorefine_args(input_star: str, reference: str, output_root: str, sym: str, ini_high: float,
                    particle_diameter: float, ctf: bool, healpix_order: int = 2, local_order: int = 4,
                    sigma_ang: float | None = None, offset_range_px: float = 5.0, offset_step_px: float = 1.0,
                    threads: int = 1, extra_args: str = "", random_seed: int = 0) -> list[str]:
    """The arguments of ``relion_refine(_mpi) --auto_refine --split_random_halves``.

    Global searches start at ``healpix_order`` and turn local at ``local_order`` (Relion's
    default 4); ``local_order == healpix_order`` with ``sigma_ang`` gives local searches from the
    first iteration. A plain (not CTF-corrupted) reference needs ``--ctf_corrected_ref``, which
    is always the case here. ``random_seed`` is fixed (Relion's default seeds from the clock), so a
    run can be repeated."""
    args = ["--o", output_root, "--i", input_star, "--ref", reference,
            "--auto_refine", "--split_random_halves", "--ini_high", f"{ini_high:.2f}",
            "--particle_diameter", f"{particle_diameter:.1f}", "--flatten_solvent", "--zero_mask",
            "--oversampling", "1", "--healpix_order", str(healpix_order), "--auto_local_healpix_order", str(local_order),
            "--offset_range", f"{offset_range_px:g}", "--offset_step", f"{offset_step_px:g}", "--sym", sym,
            "--low_resol_join_halves", "40", "--norm", "--scale", "--pad", "2", "--j", str(threads),
            "--dont_combine_weights_via_disc", "--pool", "3", "--random_seed", str(random_seed)]
    if sigma_ang is not None:
        args += ["--sigma_ang", f"{sigma_ang:.3f}"]
    if ctf:
        args += ["--ctf", "--ctf_corrected_ref"]
    return args + shlex.split(extra_args)


def autorefine_command(input_star: str, reference: str, output_root: str, sym: str, ini_high: float,
                       particle_diameter: float, ctf: bool, mpi_ranks: int = 3, mpirun: str = "mpirun",
                       relion_refine: str = "relion_refine_mpi", **kwargs) -> list[str]:
    """``mpirun --oversubscribe -n RANKS relion_refine_mpi`` + :func:`autorefine_args`."""
    return [mpirun, "--oversubscribe", "-n", str(mpi_ranks), relion_refine,
            *autorefine_args(input_star, reference, output_root, sym, ini_high, particle_diameter, ctf, **kwargs)]


def _stop(proc: subprocess.Popen) -> None:
    """Stop mpirun and every Relion process it started (they share its process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_relion(cmd: list[str], cwd: Path, log_path: Path, progress: bool, timeout_s: float | None = None) -> None:
    """Run ``cmd`` in ``cwd``; its output goes to ``log_path`` (and the terminal when ``progress``).
    A non-zero exit raises :class:`RelionError` with the last lines of the log; past ``timeout_s``
    seconds, Relion is stopped and :class:`RelionTimeout` raised."""
    tail: deque[str] = deque(maxlen=25)
    timed_out = threading.Event()
    with open(log_path, "w") as logf:
        logf.write("$ " + shlex.join(cmd) + "\n")
        logf.flush()
        try:
            proc = subprocess.Popen(cmd, cwd=cwd, env=relion_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, bufsize=1, errors="replace",
                                    start_new_session=True)
        except OSError as e:
            raise RelionError(f"could not start {cmd[0]} ({e})") from e

        def on_timeout():
            timed_out.set()
            _stop(proc)

        timer = threading.Timer(timeout_s, on_timeout) if timeout_s else None
        if timer:
            timer.daemon = True
            timer.start()
        try:
            for line in proc.stdout:
                logf.write(line)
                tail.append(line.rstrip("\n"))
                if progress:
                    sys.stdout.write(line)
                    sys.stdout.flush()
            rc = proc.wait()
        except BaseException:
            _stop(proc)
            raise
        finally:
            if timer:
                timer.cancel()
    name = next((Path(c).name for c in cmd if Path(c).name.startswith("relion_")), Path(cmd[0]).name)
    if timed_out.is_set():
        raise RelionTimeout(f"{name} did not finish within {timeout_s:.0f} s and was stopped; see {log_path}")
    if rc != 0:
        raise RelionError(f"{name} failed (exit {rc}); the last lines of {log_path}:\n" + "\n".join(tail))


def find_program(name: str, what: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise RelionError(f"{name} not found on PATH: {what} (Debian/Ubuntu: apt-get install relion openmpi-bin)")
    return found


def _with_priors(star: ParticleStar, priors: bool) -> ParticleStar:
    out = star.copy()
    p = out.particles
    for c in SHIFT_COLUMNS:
        if c not in p:
            p[c] = 0.0
    if priors:
        for src, dst in zip(ANGLE_COLUMNS + SHIFT_COLUMNS, PRIOR_COLUMNS):
            p[dst] = p[src].to_numpy(np.float64)
    else:
        out.particles = p.drop(columns=[c for c in PRIOR_COLUMNS if c in p])
    return out


def _restore_columns(refined: pd.DataFrame, given: pd.DataFrame, refined_path: Path, given_path: Path) -> pd.DataFrame:
    """Relion keeps rows in input order; add back any input column it dropped."""
    lost = [c for c in given.columns if c not in refined.columns]
    if not lost:
        return refined
    if len(refined) != len(given):
        raise RelionError(f"Relion returned {len(refined)} particles for {len(given)} given", refined_path)
    key_r = refined["rlnImageName"].map(lambda s: s.split("@")[0].lstrip("0") + "@" + os.path.basename(s.split("@")[1]))
    key_g = given["rlnImageName"].map(lambda s: s.split("@")[0].lstrip("0") + "@" + os.path.basename(s.split("@")[1]))
    if not (key_r.to_numpy() == key_g.to_numpy()).all():
        raise RelionError(f"Relion changed the particle order; cannot restore {', '.join(lost)}", refined_path)
    return refined.assign(**{c: given[c].to_numpy() for c in lost})


def final_resolution(model_star: Path) -> float:
    blocks = starfile.read(model_star, always_dict=True)
    general = blocks.get("model_general")
    if general is None:
        raise RelionError("no data_model_general block", model_star)
    row = general if isinstance(general, dict) else general.iloc[0].to_dict()
    return float(row["rlnCurrentResolution"])


JOB = "relion_job.json"


def prepare_refine(particles, out, cfg: RefineConfig | None = None, overwrite: bool = False, progress: bool = True,
                   device=None) -> dict:
    """Steps 1-3 (see the module doc): ``OUT/input.star``, ``OUT/reference.mrc`` and the search,
    then ``OUT/relion_job.json``: the Relion program, its arguments (run in ``OUT``) and the ranks
    and threads it wants. Whoever launches Relion (:func:`refine` with its own ``mpirun``, or
    Scipion's ``runJob`` with hosts.conf's MPI command and queue) runs
    ``[MPI launcher] program *args`` in ``OUT`` and then calls :func:`finish_refine`. Returns the job."""
    cfg = cfg or RefineConfig()
    out = Path(out)
    symmetry_group(cfg.sym)  # a clear error for an unknown point group, before anything runs
    check_run_folder(out, MARKER, "a finished refinement", resume=False, overwrite=overwrite)
    star = read_star(particles)
    if not star.has_poses():
        raise InputError("the particles have no poses; run cryoposeml predict first", star.path)
    if cfg.mpi_ranks < 3:
        raise InputError("relion_refine_mpi auto-refine needs at least 3 MPI ranks (1 leader + 2 half-sets)")
    if out.exists() and overwrite:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    # 1. particles with priors (and a half-set split Relion will use)
    given = _with_priors(star, cfg.priors)
    subset, made_up = half_set_labels(given)
    if made_up:
        given.particles["rlnRandomSubset"] = subset
    input_star = write_star(given, out / "input.star")

    # 2. starting reference
    apix, box = star.pixel_size_angstrom, star.box
    ref_info: dict = {}
    if cfg.reference is None:
        rec = reconstruct_star(given, cfg.sym, halves=True, progress=progress, device=device)
        freq, curve = rec.half_fsc(soft_sphere_mask(box))
        res_pred = resolution_at(freq, curve, 0.143)
        lowpass = cfg.lowpass_angstrom or max(res_pred, 10.0)
        ref_map = rec.full
        ref_info = {"source": "reconstructed from the predicted poses",
                    "predicted_poses_half_map_fsc0143_angstrom": res_pred}
    else:
        ref_map, ref_apix = read_map(cfg.reference)
        if ref_map.shape != (box, box, box):
            raise InputError(f"the reference is {ref_map.shape[0]} px, the particles {box} px", cfg.reference)
        if abs(ref_apix - apix) > 0.01 * apix:
            raise InputError(f"the reference has {ref_apix:.3f} A/px, the particles {apix:.3f} A/px", cfg.reference)
        lowpass = cfg.lowpass_angstrom or 15.0
        ref_info = {"source": str(cfg.reference)}
    ref_path = write_map(out / "reference.mrc", lowpass_volume(ref_map, apix, lowpass), apix)

    # 3. the search
    if "rlnCpmlExpectedErrorDeg" in star.particles:
        search = choose_search(star.particles["rlnCpmlExpectedErrorDeg"].to_numpy(np.float64))
    else:
        search = choose_search(None)
    sigma = cfg.sigma_ang if cfg.sigma_ang is not None else search["sigma_ang"]
    order = cfg.healpix_order if cfg.healpix_order is not None else search["healpix_order"]
    if cfg.sigma_ang is not None and cfg.healpix_order is None:
        order = choose_search(np.array([sigma * 1.6]))["healpix_order"]
    diameter = cfg.particle_diameter_angstrom or 0.9 * box * apix

    (out / "relion").mkdir(exist_ok=True)
    args = autorefine_args(input_star.name, ref_path.name, "relion/run", cfg.sym, lowpass, diameter,
                           given.has_ctf(), healpix_order=order, local_order=order, sigma_ang=sigma,
                           offset_range_px=cfg.offset_range_px, offset_step_px=cfg.offset_step_px,
                           threads=cfg.threads, extra_args=cfg.extra_args)
    job = {"program": cfg.relion_refine, "args": args, "cwd": str(out.resolve()), "mpi_ranks": cfg.mpi_ranks,
           "threads": cfg.threads, "log": str((out / "relion.log").resolve()),
           "state": {"particles": str(particles), "config": asdict(cfg), "halves_assigned_randomly": made_up,
                     "reference": {**ref_info, "lowpass_angstrom": lowpass, "path": str(ref_path)},
                     "search": {"sigma_ang_deg": sigma, "healpix_order": order,
                                "healpix_step_deg": healpix_step_deg(order),
                                "offset_range_px": cfg.offset_range_px, "offset_step_px": cfg.offset_step_px,
                                "chosen_from": search["basis"] if cfg.sigma_ang is None else "--sigma-ang"},
                     "prepare_seconds": time.perf_counter() - t_start}}
    write_json(out / JOB, job)
    return job


def finish_refine(out, relion_seconds: float | None = None, relion_command: str | None = None) -> dict:
    """Steps 5 (see the module doc) once Relion has run the job :func:`prepare_refine` wrote in
    ``OUT``: ``OUT/refined.star``, the maps, the plot and ``OUT/refine.json`` (written last).
    Returns the summary."""
    out = Path(out)
    t_start = time.perf_counter()
    try:
        with open(out / JOB) as f:
            job = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"no Relion job prepared here ({e}); run cryoposeml refine --prepare-only first",
                         out / JOB) from e
    state = job["state"]
    cfg = RefineConfig(**state["config"])
    input_star = out / "input.star"
    given = read_star(input_star)
    rel = out / "relion"
    needed = {"data": rel / "run_data.star", "model": rel / "run_model.star", "map": rel / "run_class001.mrc",
              "half1": rel / "run_half1_class001_unfil.mrc", "half2": rel / "run_half2_class001_unfil.mrc"}
    missing = [str(p) for p in needed.values() if not p.exists()]
    if missing:
        raise RelionError(f"Relion finished without its final outputs ({', '.join(missing)}); see {job['log']}")
    if relion_seconds is None:   # Relion run by someone else: from its first to its last output
        started = (out / "reference.mrc").stat().st_mtime
        relion_seconds = max(0.0, needed["data"].stat().st_mtime - started)
    refined = read_star(needed["data"])
    refined.particles = _restore_columns(refined.particles, given.particles, needed["data"], input_star)
    if len(refined) != len(given):
        raise RelionError(f"Relion returned {len(refined)} particles for {len(given)} given", needed["data"])
    moved = symmetric_distance_deg(given.matrices(), refined.matrices(), cfg.sym)   # rows in input order
    refined.particles["rlnCpmlPoseChangeDeg"] = moved
    refined_path = write_star(refined, out / "refined.star")
    apix, box = given.pixel_size_angstrom, given.box
    h1, h2 = read_map(needed["half1"])[0], read_map(needed["half2"])[0]
    freq, curve = fsc(h1, h2, apix, soft_sphere_mask(box))
    for name in ("map", "half1", "half2"):
        shutil.copyfile(needed[name], out / {"map": "map.mrc", "half1": "map_half1.mrc", "half2": "map_half2.mrc"}[name])
    expected = (given.particles["rlnCpmlExpectedErrorDeg"].to_numpy(np.float64)
                if "rlnCpmlExpectedErrorDeg" in given.particles else None)
    save_figure(refine_figure(freq, curve, expected, moved), out / "refine.png")
    summary = {
        **stamp(particles=state["particles"], **state["config"]),
        "particles": len(given), "halves_assigned_randomly": state["halves_assigned_randomly"], "priors": cfg.priors,
        "reference": state["reference"], "search": state["search"],
        "relion_command": relion_command or shlex.join([job["program"], *job["args"]]),
        "relion_resolution_angstrom": final_resolution(needed["model"]),
        "half_map_fsc0143_angstrom": resolution_at(freq, curve, 0.143),
        "half_map_fsc05_angstrom": resolution_at(freq, curve, 0.5),
        "fsc_frequency_per_angstrom": freq, "fsc_half_maps": curve,
        "pose_change_median_deg": float(np.median(moved)),
        "pose_change_vs_expected_error_spearman": (float(spearmanr(expected, moved)[0]) if expected is not None
                                                   and len(moved) > 2 else None),
        "relion_seconds": relion_seconds,
        "total_seconds": state["prepare_seconds"] + relion_seconds + time.perf_counter() - t_start,
        "outputs": {"particles": str(refined_path), "map": str(out / "map.mrc"), "plot": str(out / "refine.png"),
                    "half1": str(out / "map_half1.mrc"), "half2": str(out / "map_half2.mrc")},
    }
    write_json(out / MARKER, summary)
    return summary


def refine(particles, out, cfg: RefineConfig | None = None, overwrite: bool = False, progress: bool = True,
           device=None) -> dict:
    """``cryoposeml refine``: the Relion local refinement from predicted poses, Relion started here
    under ``mpirun`` (Scipion instead runs the prepared job through hosts.conf). Returns the summary."""
    cfg = cfg or RefineConfig()
    mpirun = find_program(cfg.mpirun, "the Relion handoff runs relion_refine_mpi under MPI")
    relion = find_program(cfg.relion_refine, "the Relion handoff needs Relion 3.1+")
    job = prepare_refine(particles, out, cfg, overwrite, progress, device)
    cmd = [mpirun, "--oversubscribe", "-n", str(job["mpi_ranks"]), relion, *job["args"]]
    t_relion = time.perf_counter()
    run_relion(cmd, Path(out), Path(job["log"]), progress)
    return finish_refine(out, time.perf_counter() - t_relion, shlex.join(cmd))
