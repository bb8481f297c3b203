"""Ab initio: learn a map and the particles' poses together, from no poses (cryoPoseNet / cryoAI).

Writes DIR/poses.star, DIR/map.mrc (reconstructed from the predicted poses), DIR/decoder_map.mrc,
metrics.csv, curves.png, checkpoint.pt and abinitio.json (last). With --reference (true poses)
each epoch logs the pose error after the best global alignment (seed 004's MSE / MedSE).
"""
from ..engine.abinitio import ENCODERS, LOSSES, AbinitioConfig, abinitio
from ..models.decoders import DECODERS


def add_args(p):
    d = AbinitioConfig()
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR (poses not needed)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--encoder", default=d.encoder, choices=ENCODERS, help="(default: %(default)s)")
    p.add_argument("--decoder", default=d.decoder, choices=DECODERS, help="(default: %(default)s)")
    p.add_argument("--loss", default=d.loss, choices=LOSSES,
                   help="l2; symmetric: also the image turned by 180 deg, the smaller loss counts; mirror: also "
                        "its mirrors (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="encoder learning rate (default: %(default)s)")
    p.add_argument("--lr-decoder", type=float, default=d.lr_decoder, help="(default: %(default)s)")
    p.add_argument("--box-px", type=int, default=d.box_px, help="working box (default: %(default)s)")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths),
                   help="encoder widths (default: %(default)s)")
    p.add_argument("--no-frequency-marching", dest="frequency_marching", action="store_false",
                   help="compare all frequencies from the start")
    p.add_argument("--search-epochs", type=int, default=None,
                   help="epochs of global pose search at the start: the decoder learns from poses drawn from "
                        "each particle's posterior over a HEALPix grid, the encoder learns to predict the best "
                        "ones; the search goes on while the poses still move (--search-until-stable); then local "
                        "refinement of each particle's pose, the encoder still learning them. 0: "
                        "amortized from the start (the image loss alone), as cryoAI "
                        "(default: half of --epochs)")
    p.add_argument("--search-until-stable", type=float, default=d.search_until_stable,
                   help="after --search-epochs, keep searching while more than this fraction of the particles' "
                        "best poses moved by over a grid step in the last epoch, leaving 4 epochs to refine "
                        "(0: search until then; 1: never extend) (default: %(default)s)")
    p.add_argument("--search-temperature", type=float, default=d.search_temperature,
                   help="posterior temperature at the start of the search, annealed to 1 over --search-epochs; "
                        "higher explores longer (default: %(default)s)")
    p.add_argument("--search-order", type=int, default=d.search_order,
                   help="HEALPix order of the search grid: 1 (576 rotations, 30 deg), 2 (4,608, 15 deg) "
                        "(default: %(default)s)")
    p.add_argument("--search-shift-px", type=int, default=d.search_shift_px,
                   help="search origins up to this many pixels of the working box (default: %(default)s)")
    p.add_argument("--halves", action="store_true",
                   help="gold standard: one independent run per rlnRandomSubset (or a random split); half 2 is "
                        "brought into half 1's frame by the rotation between the two encoders' poses")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--reference", help="STAR with the true poses (metrics only)")
    p.add_argument("--reference-map",
                   help="the true map, a file or a bundled name (final FSC; needs --reference)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")


def main(args):
    cfg = AbinitioConfig(encoder=args.encoder, decoder=args.decoder, loss=args.loss, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, lr_decoder=args.lr_decoder, box_px=args.box_px,
                         widths=tuple(args.widths), frequency_marching=args.frequency_marching,
                         search_epochs=args.search_epochs, search_order=args.search_order,
                         search_shift_px=args.search_shift_px, search_until_stable=args.search_until_stable,
                         search_temperature=args.search_temperature, halves=args.halves, seed=args.seed,
                         device=args.device)
    s = abinitio(args.particles, args.out, cfg, args.reference, args.reference_map, args.resume, args.overwrite,
                 not args.quiet)
    line = f"wrote {args.out}: half-map FSC 0.143 {s['half_map_fsc_0143_angstrom']:.1f} A"
    if "reference" in s:
        r = s["reference"]
        line += f"; vs reference: MedSE {r['medse']:.4f}, median {r['median_deg']:.1f} deg"
        if "fsc_05_vs_map_angstrom" in r:
            line += f", FSC 0.5 vs map {r['fsc_05_vs_map_angstrom']:.1f} A"
    print(line)
