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
from ..options import add_options, from_args


def add_args(p):
    p.add_argument("--particles", help="STAR file with predicted poses (cryoposeml predict/cleanup)")
    p.add_argument("--out", required=True, help="output folder")
    add_options(p, RefineConfig)
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
    cfg = from_args(RefineConfig, args)
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
