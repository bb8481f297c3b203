"""Drop the particles whose predicted poses are least certain (3D cleanup).

--method auto (default) sweeps the fraction kept, reconstructs the two half-maps of each subset and
keeps the one with the best half-map FSC-0.143 resolution (ties go to more particles), after dropping
as junk the verified particles that match the map worse than 99% (--junk-quantile) of the model's
good calibration particles (rlnCpmlMatchQuantile); quantile
drops the --quantile most uncertain; max-error drops expected errors above --max-error degrees.
Writes KEPT.star, KEPT_discarded.star, KEPT_cleanup.json, KEPT_cleanup.png (resolution vs
particles kept) and the kept set's KEPT_map.mrc with half-maps.
"""
from ..engine.cleanup import DEFAULT_COLUMN, CleanupConfig, cleanup


def add_args(p):
    p.add_argument("--particles", required=True, help="STAR file from cryoposeml predict (poses + uncertainty)")
    p.add_argument("--out", required=True, help="STAR file of the kept particles; the other outputs go beside it")
    p.add_argument("--method", choices=["auto", "quantile", "max-error"], default="auto",
                   help="(default: %(default)s)")
    p.add_argument("--quantile", type=float, default=0.25,
                   help="quantile: fraction of most uncertain particles dropped (default: %(default)s)")
    p.add_argument("--max-error", type=float, dest="max_error_deg",
                   help="max-error: drop particles whose expected error exceeds this (degrees)")
    p.add_argument("--column", default=DEFAULT_COLUMN, help="uncertainty column (default: %(default)s)")
    p.add_argument("--larger-is-better", action="store_true", default=None,
                   help="the column is a confidence (known confidence columns are recognised)")
    p.add_argument("--sym", default="C1", help="point group for the reconstructions (default: %(default)s)")
    p.add_argument("--min-keep", type=float, default=0.5,
                   help="auto: smallest fraction of particles tried (default: %(default)s)")
    p.add_argument("--step", type=float, default=0.05, help="auto: step of the fraction kept (default: %(default)s)")
    p.add_argument("--tie-shells", type=float, default=0.25,
                   help="auto: resolutions within this many Fourier shells tie; ties keep more particles "
                        "(default: %(default)s)")
    p.add_argument("--junk-quantile", type=float, default=0.01,
                   help="auto: particles with rlnCpmlMatchQuantile below this are junk (the share of good particles "
                        "the test loses); 0: no junk test (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")


def main(args):
    cfg = CleanupConfig(method=args.method, quantile=args.quantile, max_error_deg=args.max_error_deg,
                        column=args.column, larger_is_better=args.larger_is_better, sym=args.sym,
                        min_keep=args.min_keep, step=args.step, tie_shells=args.tie_shells,
                        junk_quantile=args.junk_quantile, batch_size=args.batch_size)
    s = cleanup(args.particles, args.out, cfg, args.overwrite, not args.quiet)
    print(f"kept {s['particles_kept']} of {s['particles_in']} particles ({s['fraction_kept']:.0%}, "
          f"{s['column']} {'>=' if s['larger_is_better'] else '<='} {s['score_threshold']:.3g}); half-map FSC 0.143: "
          f"{s['resolution_all_fsc0143_angstrom']:.2f} A (all) -> {s['resolution_kept_fsc0143_angstrom']:.2f} A (kept)")
    if s.get("junk_test"):
        print(f"junk test: {s['junk_test']['particles']} particles match the map worse than "
              f"{100 * (1 - s['junk_test']['below']):.0f}% of the model's good ones")
    print(f"wrote {args.out} and {s['outputs']['summary']}")
