"""Drop the particles whose predicted poses are least certain (3D cleanup).

--method auto (default) sweeps the fraction kept, reconstructs the two half-maps of each subset and
keeps the one with the best half-map FSC-0.143 resolution (ties go to more particles), after dropping
as junk the verified particles that match the map worse than 99% (--junk-quantile) of the model's
good calibration particles (rlnCpmlMatchQuantile); quantile
drops the --quantile most uncertain; max-error drops expected errors above --max-error degrees.
Writes KEPT.star, KEPT_discarded.star, KEPT_cleanup.json, KEPT_cleanup.png (resolution vs
particles kept) and the kept set's KEPT_map.mrc with half-maps.
"""
from ..engine.cleanup import CleanupConfig, cleanup
from ..options import add_options, from_args


def add_args(p):
    p.add_argument("--particles", required=True, help="STAR file from cryoposeml predict (poses + uncertainty)")
    p.add_argument("--out", required=True, help="STAR file of the kept particles; the other outputs go beside it")
    add_options(p, CleanupConfig)


def main(args):
    cfg = from_args(CleanupConfig, args)
    s = cleanup(args.particles, args.out, cfg, args.overwrite, not args.quiet)
    print(f"kept {s['particles_kept']} of {s['particles_in']} particles ({s['fraction_kept']:.0%}, "
          f"{s['column']} {'>=' if s['larger_is_better'] else '<='} {s['score_threshold']:.3g}); half-map FSC 0.143: "
          f"{s['resolution_all_fsc0143_angstrom']:.2f} A (all) -> {s['resolution_kept_fsc0143_angstrom']:.2f} A (kept)")
    if s.get("junk_test"):
        print(f"junk test: {s['junk_test']['particles']} particles match the map worse than "
              f"{100 * (1 - s['junk_test']['below']):.0f}% of the model's good ones")
    print(f"wrote {args.out} and {s['outputs']['summary']}")
