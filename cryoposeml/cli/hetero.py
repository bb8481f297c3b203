"""Heterogeneity: poses and conformations together (HetACUMN), classes and a volume per class.

Writes DIR/particles.star (poses, rlnCpmlZ1..d, rlnCpmlPC1/2, rlnClassNumber), z.npy,
class_NNN.mrc (+ half-maps) reconstructed from each class, decoder_class_NNN.mrc, latent.png,
metrics.csv, curves.png, checkpoint.pt and hetero.json (last). With --reference (true poses and
rlnCpmlState, e.g. simulate's ground_truth.star) it logs the misclassification and pose errors.
"""
from ..engine.hetero import HeteroConfig, hetero
from ..options import add_options, from_args
from . import add_run_options


def add_args(p):
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR")
    p.add_argument("--out", required=True, help="output folder")
    add_options(p, HeteroConfig)
    add_run_options(p, "STAR with the true poses and rlnCpmlState (metrics only)",
                    "the true map of each state, in rlnCpmlState order (files or bundled names)", several_maps=True)


def main(args):
    cfg = from_args(HeteroConfig, args)
    s = hetero(args.particles, args.out, cfg, args.reference, args.reference_map, args.resume, args.overwrite,
               not args.quiet)
    sizes = ", ".join(str(c["particles"]) for c in s["classes"])
    line = f"wrote {args.out}: {len(s['classes'])} classes ({sizes} particles), entanglement {s['entanglement']:.2f}"
    if "reference" in s:
        r = s["reference"]
        line += f"; vs reference: median pose error {r['median_deg']:.1f} deg"
        if "misclassified" in r:
            line += f", {100 * r['misclassified']:.1f}% misclassified"
    print(line)
