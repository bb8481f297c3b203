"""Relion local refinement started from predicted poses (the handoff).

Writes OUT/input.star with the prior columns (rlnAngleRot/Tilt/PsiPrior, rlnOriginX/YPriorAngst),
a starting reference reconstructed from the predicted poses and low-passed (OUT/reference.mrc),
chooses --sigma_ang and the HEALPix order from rlnCpmlExpectedErrorDeg, runs
`mpirun -n 3 relion_refine_mpi --auto_refine` with local searches from the first iteration, and
writes OUT/refined.star, OUT/map.mrc, OUT/map_half1.mrc, OUT/map_half2.mrc and OUT/refine.json.
Relion's own output is in OUT/relion/ and OUT/relion.log.

To launch Relion yourself (a queue, another MPI launcher; the Scipion protocol does this):
`--prepare-only` stops after writing OUT/relion_job.json (program, arguments, ranks, threads;
run it in OUT), and `--finish` reads Relion's results from OUT afterwards.
"""
import shlex

from ..core.errors import InputError
from ..engine.refine import RefineConfig, finish_refine, prepare_refine, refine


def add_args(p):
    p.add_argument("--particles", help="STAR file with predicted poses (cryoposeml predict/cleanup)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--sym", default="C1", help="point group (default: %(default)s)")
    p.add_argument("--reference", help="starting map (default: reconstructed from the predicted poses)")
    p.add_argument("--lowpass", type=float, dest="lowpass_angstrom",
                   help="low-pass of the starting map, A (default: its half-map FSC-0.143, at least 10 A; "
                        "15 A for --reference)")
    p.add_argument("--sigma-ang", type=float, help="prior width, deg (default: from rlnCpmlExpectedErrorDeg)")
    p.add_argument("--healpix-order", type=int, help="initial (local) HEALPix order (default: from sigma)")
    p.add_argument("--offset-range", type=float, default=3.0, dest="offset_range_px",
                   help="offset search range, px (default: %(default)s)")
    p.add_argument("--offset-step", type=float, default=1.0, dest="offset_step_px",
                   help="offset search step, px (default: %(default)s)")
    p.add_argument("--particle-diameter", type=float, dest="particle_diameter_angstrom",
                   help="mask diameter, A (default: 90%% of the box)")
    p.add_argument("--no-priors", dest="priors", action="store_false",
                   help="use the predicted poses only as the start (no prior columns)")
    p.add_argument("--mpi", type=int, default=3, dest="mpi_ranks", help="MPI ranks, >= 3 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="threads per rank (default: %(default)s)")
    p.add_argument("--relion-args", default="", dest="extra_args",
                   help="extra arguments appended to relion_refine_mpi's command line")
    step = p.add_mutually_exclusive_group()
    step.add_argument("--prepare-only", action="store_true",
                      help="write OUT/relion_job.json (and the inputs it names) and stop; Relion is not run")
    step.add_argument("--finish", action="store_true",
                      help="read the results of the Relion job prepared in OUT (run by you) and write the outputs")


def main(args):
    if args.finish:
        s = finish_refine(args.out)
        _report(s)
        return
    if not args.particles:
        raise InputError("--particles is required (except with --finish)")
    cfg = RefineConfig(sym=args.sym, reference=args.reference, lowpass_angstrom=args.lowpass_angstrom,
                       sigma_ang=args.sigma_ang, healpix_order=args.healpix_order,
                       offset_range_px=args.offset_range_px, offset_step_px=args.offset_step_px,
                       particle_diameter_angstrom=args.particle_diameter_angstrom, priors=args.priors,
                       mpi_ranks=args.mpi_ranks, threads=args.threads, extra_args=args.extra_args)
    if args.prepare_only:
        job = prepare_refine(args.particles, args.out, cfg, args.overwrite, not args.quiet)
        print(f"prepared {args.out}/relion_job.json; run in {job['cwd']} with {job['mpi_ranks']} MPI ranks:")
        print(shlex.join([job["program"], *job["args"]]))
        return
    _report(refine(args.particles, args.out, cfg, args.overwrite, not args.quiet))


def _report(s):
    print(f"Relion local refinement of {s['particles']} particles (sigma_ang {s['search']['sigma_ang_deg']:.2f} deg, "
          f"HEALPix order {s['search']['healpix_order']}) took {s['relion_seconds'] / 60:.1f} min; "
          f"resolution {s['relion_resolution_angstrom']:.2f} A (Relion), half-map FSC 0.143 "
          f"{s['half_map_fsc0143_angstrom']:.2f} A; median pose change {s['pose_change_median_deg']:.2f} deg")
    print(f"wrote {s['outputs']['particles']} and {s['outputs']['map']}")
