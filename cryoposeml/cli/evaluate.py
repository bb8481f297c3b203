"""Evaluate poses against a reference (CESPED-style metrics), optionally with the true map.

Pose errors (symmetry-aware): MAnE (mean), median, confidence-weighted MAnE (by
rlnParticleFigureOfMerit), % under 5 and 10 deg, shift error. With --map: the map and half-maps
reconstructed from the poses, their FSC and PCC against the map. Writes REPORT.json and
REPORT.png (error histogram, FSC curves).
"""
from ..engine.evaluate import evaluate


def add_args(p):
    p.add_argument("--particles", required=True, help="STAR file with the poses to evaluate")
    p.add_argument("--reference", help="STAR file with the reference (e.g. ground-truth) poses")
    p.add_argument("--sym", default="C1", help="point group (default: %(default)s)")
    p.add_argument("--map", help="reference map (.mrc) for FSC / PCC")
    p.add_argument("--out", required=True, help="report (.json); the plot goes beside it (.png)")


def main(args):
    r = evaluate(args.particles, args.reference, args.sym, args.map, args.out, args.overwrite, not args.quiet)
    if "poses" in r:
        p = r["poses"]
        print(f"{p['matched_particles']} particles: median {p['median_deg']:.2f} deg, mean {p['mean_deg']:.2f} deg, "
              f"{p['pct_under_5deg']:.1f}% < 5 deg, {p['pct_under_10deg']:.1f}% < 10 deg, "
              f"shift error {p['shift_error_median_angstrom']:.2f} A (median)")
    if "maps" in r:
        m = r["maps"]
        print(f"map vs reference: FSC 0.5 at {m['resolution_vs_reference_fsc05_angstrom']:.2f} A, "
              f"PCC {m['pcc_vs_reference']:.3f}; half-maps: FSC 0.143 at {m['resolution_half_maps_fsc0143_angstrom']:.2f} A")
    print(f"wrote {args.out}")
