"""Simulate particles with known poses: projections of a map with CTF, shifts, noise and junk.

Writes DIR/particles.star (images + CTF, no poses), DIR/ground_truth.star (the same with the true
poses, rlnCpmlJunk: 0 particle, 1 pure noise, 2 another protein, and rlnCpmlState: the 1-based map
of the particle when several are given, 0 for junk), DIR/Particles/*.mrcs and
DIR/simulation.json. SNR = var(signal) / var(noise), per pixel over the box.
"""
from ..engine.simulate import SimulationConfig, simulate


def add_args(p):
    d = SimulationConfig()
    p.add_argument("--map", nargs="+", default=[d.map],
                   help="map (.mrc) or bundled map name; several maps (same box and pixel size) make a "
                        "heterogeneous set, one conformational state per map, recorded as rlnCpmlState "
                        "(1-based) in ground_truth.star (default: %(default)s)")
    p.add_argument("--state-weights", type=float, nargs="+",
                   help="with several maps: the share of particles from each (default: equal)")
    p.add_argument("--n", type=int, default=d.n, help="number of particles (default: %(default)s)")
    p.add_argument("--snr", type=float, default=d.snr,
                   help="signal-to-noise ratio, var(signal)/var(noise); 0 for noise-free (default: %(default)s)")
    p.add_argument("--no-noise", action="store_true", help="noise-free images (same as --snr 0)")
    p.add_argument("--ctf", dest="ctf", action="store_true", default=True, help="apply a CTF (default)")
    p.add_argument("--no-ctf", dest="ctf", action="store_false", help="no CTF")
    p.add_argument("--sym", default=d.sym, help="the map's point group, recorded (default: %(default)s)")
    p.add_argument("--shift-sigma", type=float, default=d.shift_sigma_angstrom,
                   help="per-axis standard deviation of the origin shifts, Angstrom (default: %(default)s)")
    p.add_argument("--junk-fraction", type=float, default=d.junk_fraction,
                   help="fraction of junk particles (default: %(default)s)")
    p.add_argument("--junk-map", default=d.junk_map, help="map for 'other protein' junk (default: %(default)s)")
    p.add_argument("--junk-noise-share", type=float, default=d.junk_noise_share,
                   help="share of the junk that is pure noise; the rest images the junk map (default: %(default)s)")
    p.add_argument("--poses", help="STAR file whose poses (and shifts) to use instead of uniform random ones")
    p.add_argument("--defocus-range", type=float, nargs=2, metavar=("MIN", "MAX"),
                   default=(d.defocus_min_angstrom, d.defocus_max_angstrom), help="defocus, Angstrom (default: %(default)s)")
    p.add_argument("--voltage", type=float, default=d.voltage_kv, help="kV (default: %(default)s)")
    p.add_argument("--cs", type=float, default=d.cs_mm, help="spherical aberration, mm (default: %(default)s)")
    p.add_argument("--amplitude-contrast", type=float, default=d.amplitude_contrast, help="(default: %(default)s)")
    p.add_argument("--phase-flipped", action="store_true",
                   help="write phase-flipped images (rlnCtfDataArePhaseFlipped 1 in the optics block)")
    p.add_argument("--stack-size", type=int, default=d.stack_size, help="images per .mrcs (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")


def main(args):
    snr = None if (args.no_noise or not args.snr) else args.snr
    cfg = SimulationConfig(map=args.map[0] if len(args.map) == 1 else tuple(args.map),
                           state_weights=tuple(args.state_weights) if args.state_weights else None,
                           n=args.n, snr=snr, ctf=args.ctf, sym=args.sym,
                           shift_sigma_angstrom=args.shift_sigma, junk_fraction=args.junk_fraction,
                           junk_map=args.junk_map, junk_noise_share=args.junk_noise_share, poses=args.poses,
                           defocus_min_angstrom=args.defocus_range[0], defocus_max_angstrom=args.defocus_range[1],
                           voltage_kv=args.voltage, cs_mm=args.cs, amplitude_contrast=args.amplitude_contrast,
                           phase_flipped=args.phase_flipped, stack_size=args.stack_size, seed=args.seed)
    out = simulate(cfg, args.out, overwrite=args.overwrite, progress=not args.quiet)
    print(f"wrote {out}/particles.star and {out}/ground_truth.star")
