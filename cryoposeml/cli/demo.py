"""The whole pipeline end to end on bundled data, with a report (DIR/report.md).

Simulates a training set and new particles with 20% junk (adenylate kinase, CTF, shifts, noise),
trains an image2sphere model, predicts the new particles, cleans them up (--method auto), hands them
to a Relion local refinement, and evaluates every stage against the ground truth and the true map.
Its report gives each stage's time (the defaults train on 4,000 particles: minutes on 2 CPU cores).
"""
from ..engine.demo import run_demo


def add_args(p):
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=4000, help="training particles (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="new particles, junk included (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=12, help="training epochs (default: %(default)s)")
    p.add_argument("--snr", type=float, default=0.1, help="(default: %(default)s)")
    p.add_argument("--junk-fraction", type=float, default=0.2, help="(default: %(default)s)")


def main(args):
    report = run_demo(args.out, n_train=args.n_train, n=args.n, snr=args.snr, epochs=args.epochs,
                      junk_fraction=args.junk_fraction, overwrite=args.overwrite, progress=not args.quiet)
    print(f"demo finished: {report}")
