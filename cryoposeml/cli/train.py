"""Train a pose network on particles whose poses a refinement already found.

The model folder gets model.json (configuration, preprocessing, symmetry, calibration, validation
metrics: median error, ECE, AUROC), reference/ (the consensus half-maps of the training
particles, their FSC and FSC-weighted maps, which predict verifies poses against; a calibration
split held out of both calibrates the verified uncertainty), and per network weights.safetensors, checkpoint.pt,
metrics.csv and curves.png. --halfsets trains one network per rlnRandomSubset (gold standard).
An interrupted run continues with --resume. Several GPUs (or CPU processes): launch with
``torchrun --nproc_per_node K -m cryoposeml.cli train ...`` (data-parallel, same effective batch).
"""
import argparse
import os

from ..engine.train import TrainConfig, train
from ..families import FAMILIES


def add_args(p):
    d = TrainConfig()
    p.add_argument("--particles", required=True, help="Relion 3.1+ STAR with poses")
    p.add_argument("--out", required=True, help="model folder")
    p.add_argument("--model", default=d.model, choices=list(FAMILIES),
                   help="model family (default: %(default)s): " + "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.values()))
    p.add_argument("--sym", default=d.sym, help="point group (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate, one-cycle (default: %(default)s)")
    p.add_argument("--box-px", type=int, default=d.box_px,
                   help="network box; particles are Fourier-rescaled to it, keeping their field of view "
                        "(default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="(default: %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping epochs (default: %(default)s)")
    p.add_argument("--halfsets", action="store_true", help="one network per half-set")
    p.add_argument("--no-augment", dest="augment", action="store_false", help="no in-plane D4 augmentation")
    p.add_argument("--siamese", action=argparse.BooleanOptionalAction, default=d.siamese,
                   help="add cryo-forum's pairwise-distance loss with its curriculum to the regression heads "
                        "(bingham, sixd, equivariant); it slowed their learning in our tests (default: off)")
    p.add_argument("--widths", type=int, nargs="+", default=list(d.widths), help="encoder widths (default: %(default)s)")
    p.add_argument("--dropout", type=float, default=None,
                   help="dropout in the encoder and head (default: 0 for bingham and sixd, 0.1 for the others)")
    p.add_argument("--label-confidence", default=d.label_confidence,
                   help="column weighting each particle's loss (a refinement's confidence in its pose); auto: "
                        "rlnMaxValueProbDistribution, else rlnParticleFigureOfMerit, when present; none: equal "
                        "weights (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16"],
                   help="auto: bfloat16 mixed precision on CUDA, float32 on CPU (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="do not keep the consensus reference (half-maps of the training particles, used by predict "
                        "to verify the network's poses) nor calibrate the matched uncertainty")
    p.add_argument("--calibration-fraction", type=float, default=d.calibration_fraction,
                   help="particles held out of training and of the reference, on which the matched uncertainty "
                        "is calibrated (default: %(default)s)")


def main(args):
    cfg = TrainConfig(model=args.model, sym=args.sym, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      box_px=args.box_px, val_fraction=args.val_fraction, patience=args.patience,
                      halfsets=args.halfsets, augment=args.augment, siamese=args.siamese, widths=tuple(args.widths),
                      dropout=args.dropout,
                      seed=args.seed, device=args.device,
                      label_confidence=args.label_confidence, precision=args.precision, reference=args.reference,
                      calibration_fraction=args.calibration_fraction if args.reference else 0.0)
    meta = train(args.particles, args.out, cfg, resume=args.resume, overwrite=args.overwrite,
                 progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) != 0:   # torchrun: rank 0 reports
        return
    for run, r in meta["runs"].items():
        v = r["validation"]
        print(f"{run}: validation median {v['median_deg']:.2f} deg, mean {v['mean_deg']:.2f} deg, "
              f"ECE {v['ece_deg']:.2f} deg, AUROC(>10 deg) {v['auroc_error_over_10deg']:.3f}")
        if "matching_validation" in r:
            m = r["matching_validation"]
            print(f"{run}: verified against the reference, calibration split median {m['median_deg']:.2f} deg "
                  f"(network {m['network_median_deg']:.2f}), ECE {m['ece_deg']:.2f} deg, "
                  f"{100 * m['fraction_escalated']:.0f}% escalated")
    print(f"wrote {args.out}/model.json")
