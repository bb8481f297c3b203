"""Reconstruct a map from particles with poses (direct Fourier inversion, CTF-weighted).

With --halves, also MAP_half1.mrc / MAP_half2.mrc from rlnRandomSubset 1 / 2 and MAP_fsc.json
(half-map FSC inside a soft spherical mask, resolution at 0.143 and 0.5).
"""
from ..engine.reconstruct import reconstruct


def add_args(p):
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR file with poses")
    p.add_argument("--out", required=True, help="output map (.mrc)")
    p.add_argument("--sym", default="C1", help="point group: Cn, Dn, T, O, I (default: %(default)s)")
    p.add_argument("--halves", action="store_true", help="also write the two half-maps and their FSC")
    p.add_argument("--fom-weighting", action="store_true",
                   help="weight each particle by rlnParticleFigureOfMerit (as relion_reconstruct --fom_weighting)")
    p.add_argument("--no-ctf", dest="ctf", action="store_false", help="ignore the CTF columns")
    p.add_argument("--regularization", type=float, default=1e-3,
                   help="Wiener-like constant, as a fraction of the mean Fourier weight (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")


def main(args):
    s = reconstruct(args.particles, args.out, args.sym, args.halves, args.fom_weighting, args.ctf,
                    args.regularization, args.batch_size, args.overwrite, not args.quiet)
    msg = f"wrote {args.out} ({s['particles']} particles, {args.sym})"
    if args.halves:
        msg += f"; half-map FSC 0.143: {s['resolution_fsc0143_angstrom']:.2f} A"
    print(msg)
