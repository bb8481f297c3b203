"""The pipeline end to end on bundled data, with a report (DIR/report.md).

For now: simulate AdK particles (CTF, shifts, noise) -> reconstruct half-maps from the true poses
-> evaluate the true poses and poses perturbed by a known error against the truth.
"""
from ..engine.demo import run_demo


def add_args(p):
    p.add_argument("--out", default="demo_out", help="output folder (default: %(default)s)")
    p.add_argument("--n", type=int, default=2000, help="particles to simulate (default: %(default)s)")
    p.add_argument("--snr", type=float, default=0.1, help="(default: %(default)s)")


def main(args):
    report = run_demo(args.out, n=args.n, snr=args.snr, overwrite=args.overwrite, progress=not args.quiet)
    print(f"demo finished: {report}")
