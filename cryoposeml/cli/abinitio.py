"""Ab initio: learn a map and the particles' poses together, from no poses (cryoPoseNet / cryoAI).

Writes DIR/poses.star, DIR/map.mrc (reconstructed from the predicted poses), DIR/decoder_map.mrc,
metrics.csv, curves.png, checkpoint.pt and abinitio.json (last). With --reference (true poses)
each epoch logs the pose error after the best global alignment (seed 004's MSE / MedSE).
"""
from ..engine.abinitio import AbinitioConfig, abinitio
from ..options import add_options, from_args
from . import add_run_options


def add_args(p):
    p.add_argument("--particles", required=True, help="Relion 3.1+ particle STAR (poses not needed)")
    p.add_argument("--out", required=True, help="output folder")
    add_options(p, AbinitioConfig)
    add_run_options(p, "STAR with the true poses (metrics only)",
                    "the true map, a file or a bundled name (final FSC; needs --reference)")


def main(args):
    cfg = from_args(AbinitioConfig, args)
    s = abinitio(args.particles, args.out, cfg, args.reference, args.reference_map, args.resume, args.overwrite,
                 not args.quiet)
    line = f"wrote {args.out}: half-map FSC 0.143 {s['half_map_fsc_0143_angstrom']:.1f} A"
    if "reference" in s:
        r = s["reference"]
        line += f"; vs reference: MedSE {r['medse']:.4f}, median {r['median_deg']:.1f} deg"
        if "fsc_05_vs_map_angstrom" in r:
            line += f", FSC 0.5 vs map {r['fsc_05_vs_map_angstrom']:.1f} A"
    print(line)
