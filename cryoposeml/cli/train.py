"""Train a pose network on particles whose poses a refinement already found.

The model folder gets model.json (configuration, preprocessing, symmetry, calibration, validation
metrics: median error, ECE, AUROC), reference/ (the consensus half-maps of the training
particles, their FSC and FSC-weighted maps, which predict verifies poses against; a calibration
split held out of both calibrates the verified uncertainty), and per network weights.safetensors, checkpoint.pt,
metrics.csv and curves.png. --halfsets trains one network per rlnRandomSubset (gold standard).
An interrupted run continues with --resume. Several GPUs (or CPU processes): launch with
``torchrun --nproc_per_node K -m cryoposeml.cli train ...`` (data-parallel, same effective batch).
"""
import os

from ..engine.train import TrainConfig, train
from ..options import add_options, from_args


def add_args(p):
    p.add_argument("--particles", required=True, help="Relion 3.1+ STAR with poses")
    p.add_argument("--out", required=True, help="model folder")
    add_options(p, TrainConfig)
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out")


def main(args):
    cfg = from_args(TrainConfig, args)
    if not cfg.reference:
        cfg.calibration_fraction = 0.0
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
