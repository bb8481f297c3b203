"""Predict poses, shifts and calibrated uncertainties for particles with a trained model.

Writes OUT.star (input columns kept; poses replaced; rlnParticleFigureOfMerit and
rlnCpmlExpectedErrorDeg added), OUT.json (summary, transferability check) and OUT.png
(angular distribution, expected-error histogram, held-out error vs confidence). With --strict, a
model that does not transfer to these particles is an error instead of a warning.

With --spool DIR instead of --particles/--out, the command is a streaming worker: it loads the
model, the reference and its projection library once, then predicts each request a client drops
in DIR/pending (see cryoposeml.engine.spool; the Scipion protocol is such a client) until the
client writes DIR/stop, or stops sending heartbeats for --stale-after seconds. With --live-map LIVE,
each batch's particles that pass the junk test also go into running half-maps in LIVE (the map
growing as the session goes; cryoposeml.engine.live).
"""
from ..core.errors import InputError
from ..engine.predict import Predictor, predict
from ..engine.verify import MATCHING_MODES, MatchConfig
from ..options import add_options, from_args


def add_args(p):
    p.add_argument("--particles", help="Relion 3.1+ particle STAR file")
    p.add_argument("--model", required=True, help="model folder from cryoposeml train")
    p.add_argument("--out", help="output STAR file")
    p.add_argument("--spool", metavar="DIR", help="serve the batches a client drops in DIR (instead of "
                   "--particles/--out): the model and the reference stay loaded between batches")
    p.add_argument("--live-map", metavar="LIVE", help="--spool: after each batch, insert its particles that pass "
                   "the junk test into running half-maps in the folder LIVE (map, half-maps, FSC, history; a restarted "
                   "worker carries on)")
    p.add_argument("--junk-quantile", type=float, default=0.01,
                   help="--live-map: particles with rlnCpmlMatchQuantile below this are left out, as cleanup does "
                        "(default: %(default)s)")
    p.add_argument("--stale-after", type=float, default=600, metavar="S",
                   help="--spool: exit when the client has sent no heartbeat for S seconds (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--sym", help="check that the model was trained with this point group")
    p.add_argument("--keep-original", action="store_true", help="keep the input poses as ...Original columns")
    p.add_argument("--top-k", type=int, default=0, metavar="K",
                   help="also write OUT_topK.star with the K most probable distinct poses per particle "
                        "(image2sphere models)")
    p.add_argument("--strict", action="store_true", help="fail when the model does not transfer")
    p.add_argument("--matching", default="auto", choices=MATCHING_MODES,
                   help="verify the network against the reference map: auto (proposals, then an exhaustive "
                        "search for particles they do not explain), proposals (never exhaustive), exhaustive "
                        "(no network proposals), none (the network alone) (default: %(default)s)")
    p.add_argument("--reference", metavar="MAP", help="match against this map (same box and pixel size as the "
                   "particles) instead of the model folder's reference")
    p.add_argument("--half-maps", nargs=2, metavar=("HALF1", "HALF2"),
                   help="match half-set k particles against half-map k (FSC-weighted; the working resolution "
                        "from their FSC)")
    p.add_argument("--cross-halves", action="store_true",
                   help="CESPED's evaluation protocol: half-1 particles go to the half-2 network and map (for "
                        "scoring a model on its own training particles); default: same half (gold standard)")
    add_options(p, MatchConfig)


def main(args):
    cfg = from_args(MatchConfig, args)
    if args.spool:
        if args.particles or args.out:
            raise InputError("give either --spool (a streaming worker) or --particles and --out, not both")
        from ..engine.spool import serve

        worker = Predictor(args.model, args.device, args.sym, args.matching, args.reference, args.half_maps,
                           args.cross_halves, cfg, args.batch_size, args.top_k, args.keep_original, args.strict,
                           progress=False)
        worker.warm_up()
        live = None
        if args.live_map:
            from ..engine.live import LiveMap

            inp = worker.meta["input"]
            live = LiveMap(args.live_map, inp["box"], inp["pixel_size_angstrom"], worker.meta["sym"],
                           args.junk_quantile)

        def handle(particles, out, name):
            summary = worker.predict(particles, out, args.overwrite)
            if live is not None:
                summary["live"] = live.add(out, name)   # the request's name: a batch served again is skipped
            return summary

        record = serve(args.spool, handle, stale_after_s=args.stale_after,
                       info={"model": str(args.model), "matching": worker.cfg.matching, "live_map": args.live_map})
        print(f"worker stopped: {record['served']} batches predicted, {record['failed']} refused")
        return
    if not (args.particles and args.out):
        raise InputError("give --particles and --out (or --spool DIR for a streaming worker)")
    s = predict(args.particles, args.model, args.out, args.batch_size, args.device, args.sym, args.keep_original,
                args.strict, args.overwrite, not args.quiet, args.top_k, args.matching, args.reference, args.half_maps,
                args.cross_halves, cfg)
    if args.top_k:
        print(f"wrote {s['top_k']['star']}")
    extra = (f", {100 * s['fraction_escalated']:.0f}% escalated, median match z {s['median_match_z']:.1f}"
             if "fraction_escalated" in s else "")
    print(f"wrote {args.out}: {s['particles']} particles, median expected error "
          f"{s['median_expected_error_deg']:.2f} deg{extra}")
