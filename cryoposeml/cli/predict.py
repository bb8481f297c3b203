"""Predict poses, shifts and calibrated uncertainties for particles with a trained model.

Writes OUT.star (input columns kept; poses replaced; rlnParticleFigureOfMerit and
rlnCpmlExpectedErrorDeg added), OUT.json (summary, transferability check) and OUT.png
(angular distribution, expected-error histogram, held-out error vs confidence). With --strict, a
model that does not transfer to these particles is an error instead of a warning.
"""
from ..engine.predict import predict


def add_args(p):
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR file")
    p.add_argument("--model", required=True, help="model folder from cryoposeml train")
    p.add_argument("--out", required=True, help="output STAR file")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--sym", help="check that the model was trained with this point group")
    p.add_argument("--keep-original", action="store_true", help="keep the input poses as ...Original columns")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also write OUT_topK.star with the K most probable distinct poses per particle "
                        "(image2sphere models)")
    p.add_argument("--strict", action="store_true", help="fail when the model does not transfer")


def main(args):
    s = predict(args.particles, args.model, args.out, args.batch_size, args.device, args.sym, args.keep_original,
                args.strict, args.overwrite, not args.quiet, args.top_k)
    if args.top_k:
        print(f"wrote {s['top_k']['star']}")
    print(f"wrote {args.out}: {s['particles']} particles, median expected error {s['median_expected_error_deg']:.2f} deg")
