"""Heterogeneity: poses and conformations together (HetACUMN), classes and a volume per class.

Writes DIR/particles.star (poses, rlnCpmlZ1..d, rlnCpmlPC1/2, rlnClassNumber), z.npy,
class_NNN.mrc (+ half-maps) reconstructed from each class, decoder_class_NNN.mrc, latent.png,
metrics.csv, curves.png, checkpoint.pt and hetero.json (last). With --reference (true poses and
rlnCpmlState, e.g. simulate's ground_truth.star) it logs the misclassification and pose errors.
"""
from ..engine.hetero import POSE_SOURCES, HeteroConfig, hetero


def add_args(p):
    d = HeteroConfig()
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--zdim", type=int, default=d.zdim, help="dimension of the conformation latent (default: %(default)s)")
    p.add_argument("--classes", type=int, default=d.classes,
                   help="k-means classes of z, one volume each (default: %(default)s)")
    p.add_argument("--poses", default=d.poses, choices=POSE_SOURCES,
                   help="search: find the poses first (ab initio's global search, conformations frozen; from "
                        "no poses one conformation tends to take over); input: start from the STAR's poses, e.g. a "
                        "consensus refinement, and refine them; auto: input when the STAR has poses "
                        "(default: %(default)s)")
    p.add_argument("--encoder", default=d.encoder, choices=("cnn", "equivariant"),
                   help="pose encoder (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--search-epochs", type=int, default=None,
                   help="epochs of global pose search with the conformation frozen, extended while the poses "
                        "still move; with --poses input, epochs learning the consensus map at the given poses "
                        "(default: a third of --epochs; with --poses input 2)")
    p.add_argument("--restart-epochs", type=int, default=None,
                   help="from no poses with 2+ classes: epochs of the class restart (each class searched again "
                        "against its own low-passed map) when --epochs leave room; 0: none (default: as "
                        "--search-epochs)")
    p.add_argument("--no-task2", dest="task2", action="store_false",
                   help="without the conditional pose prediction task (the ablation)")
    p.add_argument("--beta", type=float, default=d.beta, help="weight of the KL of z (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="encoders' learning rate (default: %(default)s)")
    p.add_argument("--lr-decoder", type=float, default=d.lr_decoder, help="(default: %(default)s)")
    p.add_argument("--box-px", type=int, default=d.box_px, help="working box (default: %(default)s)")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="encoder widths (default: %(default)s)")
    p.add_argument("--search-temperature", type=float, default=d.search_temperature, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--reference", help="STAR with the true poses and rlnCpmlState (metrics only)")
    p.add_argument("--reference-map", nargs="+", default=[],
                   help="the true map of each state, in rlnCpmlState order (files or bundled names)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def main(args):
    cfg = HeteroConfig(zdim=args.zdim, classes=args.classes, encoder=args.encoder,
                       poses=args.poses, epochs=args.epochs, search_epochs=args.search_epochs,
                       restart_epochs=args.restart_epochs, task2=args.task2,
                       beta=args.beta, batch_size=args.batch_size, lr=args.lr, lr_decoder=args.lr_decoder,
                       box_px=args.box_px, widths=tuple(args.widths), search_temperature=args.search_temperature,
                       seed=args.seed, device=args.device)
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
