"""Simulate particles with known poses: projections of a map with CTF, shifts, noise and junk.

Writes DIR/particles.star (images + CTF, no poses), DIR/ground_truth.star (the same with the true
poses, rlnCpmlJunk: 0 particle, 1 pure noise, 2 another protein, and rlnCpmlState: the 1-based map
of the particle when several are given, 0 for junk), DIR/Particles/*.mrcs and
DIR/simulation.json. SNR = var(signal) / var(noise), per pixel over the box.
"""
from ..engine.simulate import SimulationConfig, simulate
from ..options import add_options, from_args


def add_args(p):
    d = SimulationConfig()
    p.add_argument("--map", nargs="+", default=[d.map],
                   help="map (.mrc) or bundled map name; several maps (same box and pixel size) make a "
                        "heterogeneous set, one conformational state per map, recorded as rlnCpmlState "
                        "(1-based) in ground_truth.star (default: %(default)s)")
    p.add_argument("--state-weights", type=float, nargs="+",
                   help="with several maps: the share of particles from each (default: equal)")
    p.add_argument("--no-noise", action="store_true", help="noise-free images (same as --snr 0)")
    p.add_argument("--defocus-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   default=(d.defocus_min_angstrom, d.defocus_max_angstrom), help="defocus, Angstrom (default: %(default)s)")
    add_options(p, SimulationConfig)
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")


def main(args):
    snr = None if (args.no_noise or not args.snr) else args.snr
    cfg = from_args(SimulationConfig, args, map=args.map[0] if len(args.map) == 1 else tuple(args.map),
                    state_weights=tuple(args.state_weights) if args.state_weights else None, snr=snr,
                    defocus_min_angstrom=args.defocus_range[0], defocus_max_angstrom=args.defocus_range[1])
    out = simulate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}/particles.star and {out}/ground_truth.star")
