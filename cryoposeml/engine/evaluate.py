"""Evaluate a pose set against a reference (CESPED-style): symmetry-aware angular errors, shift
errors, and, with a reference map, FSC and PCC of the map the poses give and of its half-maps.

Particles are matched by image (stack file and slice). Reference rows with ``rlnCpmlJunk != 0`` (simulated
junk) are left out of the pose errors and counted apart.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from ..core.errors import InputError
from ..core.metrics import angular_error_stats, fsc, pcc, resolution_at, soft_sphere_mask
from ..core.symmetry import symmetry_group
from ..data.mrc import read_map
from ..data.star import read_star
from ._outputs import check_new_file, stamp, write_json
from .plots import plot_fsc_curves, pyplot, save_figure
from .reconstruct import reconstruct_star

log = logging.getLogger(__name__)

__all__ = ["evaluate", "match_particles"]


def match_particles(pred, ref) -> tuple[np.ndarray, np.ndarray]:
    """Row indices ``(i_pred, i_ref)`` of the particles both STAR files share (the same image of
    the same stack, wherever each STAR file lives). When a file's stacks are not on this machine
    (poses exported from elsewhere), the same slice of a stack with the same file name; a name
    that two stacks share is then refused as ambiguous."""
    try:
        a, b = pred.image_keys(), ref.image_keys()
    except InputError as e:
        log.info("matching by stack file name and slice: %s", e)
        a, b = pred.image_keys(resolve=False), ref.image_keys(resolve=False)
        for star, keys in ((pred, a), (ref, b)):
            if len(set(keys)) != len(keys):
                raise InputError("its image stacks are not on this machine and two of its stacks share a file "
                                 "name, so its particles cannot be matched by name; copy the stacks here",
                                 star.path) from e
    where = {name: i for i, name in enumerate(b)}
    ip = np.array([i for i, name in enumerate(a) if name in where], np.int64)
    ir = np.array([where[a[i]] for i in ip], np.int64)
    if len(ip) == 0:
        raise InputError(f"no particle of {pred.path} is in the reference {ref.path} (matched by image)",
                         pred.path)
    return ip, ir


def _plots(out_png: Path, errors: np.ndarray | None, curves: dict, sym: str) -> None:
    panels = (errors is not None) + bool(curves)
    fig, axes = pyplot().subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax_i = 0
    if errors is not None:
        ax = axes[0, ax_i]
        ax_i += 1
        top = max(10.0, float(np.percentile(errors, 99)))
        ax.hist(errors, bins=60, range=(0, top), color="tab:blue")
        ax.axvline(np.median(errors), color="k", ls="--", label=f"median {np.median(errors):.2f} deg")
        ax.set_xlabel(f"angular error (deg, {sym}-aware)")
        ax.set_ylabel("particles")
        ax.legend()
    if curves:
        plot_fsc_curves(axes[0, ax_i], curves)
    save_figure(fig, out_png)


def evaluate(particles, reference=None, sym: str = "C1", map_path=None, out="report.json",
             overwrite: bool = False, progress: bool = True) -> dict:
    """``cryoposeml evaluate``: write ``out`` (JSON) and a PNG beside it; return the report."""
    out = Path(out)
    png = out.with_suffix(".png")
    for t in (out, png):
        check_new_file(t, overwrite)
    if reference is None and map_path is None:
        raise InputError("nothing to compare with: give --reference GT.star and/or --map GT.mrc")
    symmetry_group(sym)
    pred = read_star(particles)
    report: dict = stamp(particles=particles, reference=reference, sym=sym, map=map_path)
    errors = None
    if reference is not None:
        ref = read_star(reference)
        ip, ir = match_particles(pred, ref)
        junk = ref.particles["rlnCpmlJunk"].to_numpy()[ir] if "rlnCpmlJunk" in ref.particles else np.zeros(len(ir))
        good = junk == 0
        ip, ir = ip[good], ir[good]
        A_pred, A_ref = pred.matrices()[ip], ref.matrices()[ir]
        fom = (pred.particles["rlnParticleFigureOfMerit"].to_numpy(np.float64)[ip]
               if "rlnParticleFigureOfMerit" in pred.particles else None)
        stats = angular_error_stats(A_pred, A_ref, sym, fom)
        errors = stats.pop("errors_deg")
        shift_err = np.linalg.norm(pred.shifts_angstrom()[ip] - ref.shifts_angstrom()[ir], axis=1)
        report["poses"] = {
            "matched_particles": int(len(ip)), "junk_left_out": int((~good).sum()),
            "unmatched_predictions": int(len(pred) - len(good)),
            **stats,
            "shift_error_mean_angstrom": float(shift_err.mean()),
            "shift_error_median_angstrom": float(np.median(shift_err)),
        }
    curves = {}
    if map_path is not None:
        truth, apix = read_map(map_path)
        if truth.shape[0] != pred.box or abs(apix - pred.pixel_size_angstrom) > 1e-3:
            raise InputError(f"the map is {truth.shape[0]} px at {apix:.3f} A/px but the particles are {pred.box} px "
                             f"at {pred.pixel_size_angstrom:.3f} A/px", map_path)
        res = reconstruct_star(pred, sym, halves=True, progress=progress)
        mask = soft_sphere_mask(pred.box)
        f_true = fsc(res.full, truth, apix, mask)
        f_half = res.half_fsc(mask)
        curves = {"map vs reference": f_true, "half-map 1 vs 2": f_half}
        report["maps"] = {
            "fsc_frequency_per_angstrom": f_true[0],
            "fsc_vs_reference": f_true[1],
            "fsc_half_maps": f_half[1],
            "resolution_vs_reference_fsc05_angstrom": resolution_at(*f_true, 0.5),
            "resolution_vs_reference_fsc0143_angstrom": resolution_at(*f_true, 0.143),
            "resolution_half_maps_fsc0143_angstrom": resolution_at(*f_half, 0.143),
            "resolution_half_maps_fsc05_angstrom": resolution_at(*f_half, 0.5),
            "pcc_vs_reference": pcc(res.full, truth, mask),
            "pcc_half_maps": pcc(res.half1, res.half2, mask),
        }
    _plots(png, errors, curves, sym)
    report["plot"] = str(png)
    write_json(out, report)
    return report
