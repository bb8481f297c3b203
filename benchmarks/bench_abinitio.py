"""Ab initio convergence benchmark: seed 004's Table 1 at small scale.

    .venv/bin/python benchmarks/bench_abinitio.py [--n 1500] [--box-px 32] [--epochs 12] [--seeds 0 1 2]
        [--datasets noise-free snr1] [--configs cnn-symmetric equivariant-l2] [--amortized-only-too]

Data: AdK (bundled adk_open, 64 px at 1.5 A) projected at uniform random poses with CTF and
origin shifts (3 A s.d.), noise-free or at SNR 1; the network works at --box-px. Configurations:
``cnn-symmetric`` (the standard encoder with cryoAI's symmetric loss) and ``equivariant-l2`` (the
D4 escnn encoder, plain L2), each with several seeds. Every run is scored against the true poses
after the best global rotation (and hand): MedSE / MSE of ``||R - R_true||_F^2`` (seed 004,
appendix F), for the run's poses and for the encoder's alone (the amortized network applied to
the particles), converged = MedSE under 0.06 (a 10-degree median), the seconds to the first
converged epoch, and the FSC-0.5 resolution against the true map. ``--amortized-only-too`` adds
runs without the pose search (amortized from the start, as cryoAI is published) on the first
dataset. Prints a table per configuration (fraction converged over seeds, medians), writes JSON.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from _results import write_results
from cryoposeml.engine.abinitio import CONVERGED_MEDSE, AbinitioConfig, abinitio
from cryoposeml.engine.simulate import SimulationConfig, simulate

CONFIGS = {"cnn-symmetric": ("cnn", "symmetric"), "equivariant-l2": ("equivariant", "l2")}
DATASETS = {"noise-free": None, "snr1": 1.0}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--box-px", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--search-epochs", type=int, default=None, help="default: half of --epochs")
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--amortized-only-too", action="store_true",
                    help="also run without the pose search (--search-epochs 0) on the first dataset")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bench_abinitio", help="the results file: <out>/<name>.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpml_bench_ab_"))
    rows = []
    try:
        for ds in args.datasets:
            data = work / ds
            simulate(SimulationConfig(map="adk_open", n=args.n, snr=DATASETS[ds], ctf=True,
                                      shift_sigma_angstrom=3.0, seed=11), data, progress=False)
            modes = [("search", args.search_epochs)]
            if args.amortized_only_too and ds == args.datasets[0]:
                modes.append(("amortized-only", 0))
            for mode, search_epochs in modes:
                for name in args.configs:
                    encoder, loss = CONFIGS[name]
                    for seed in args.seeds:
                        out = work / f"{ds}_{mode}_{name}_{seed}"
                        cfg = AbinitioConfig(encoder=encoder, loss=loss, epochs=args.epochs, box_px=args.box_px,
                                             widths=tuple(args.widths), search_epochs=search_epochs,
                                             batch_size=args.batch_size, seed=seed, device=args.device)
                        t = time.perf_counter()
                        s = abinitio(data / "particles.star", out, cfg, reference=data / "ground_truth.star",
                                     reference_map="adk_open", progress=False)
                        wall = time.perf_counter() - t
                        run = s["runs"]["full"]
                        rows.append(_row(ds, mode, name, seed, s, run, wall, out))
                        print(json.dumps(rows[-1]), flush=True)
                        _write(args, rows)
    finally:
        shutil.rmtree(work)
    _table(rows)
    print(f"wrote {_write(args, rows)}")


def _row(ds, mode, name, seed, s, run, wall, out) -> dict:
    import csv

    with open(out / "metrics.csv") as f:
        epochs = list(csv.DictReader(f))
    enc = [float(r["encoder_medse"]) for r in epochs if r.get("encoder_medse")]
    t_enc = None
    if enc and min(enc) < CONVERGED_MEDSE:
        first = next(i for i, v in enumerate(enc) if v < CONVERGED_MEDSE)
        t_enc = float(sum(float(r["epoch_s"]) for r in epochs[:first + 1]))
    ref = s["reference"]
    final_enc = float(epochs[-1]["encoder_medse"]) if epochs[-1].get("encoder_medse") else ref["medse"]
    final_enc_deg = float(epochs[-1]["encoder_median_deg"]) if epochs[-1].get("encoder_median_deg") else ref["median_deg"]
    return dict(dataset=ds, mode=mode, config=name, seed=seed, converged=bool(ref["converged"]),
                medse=ref["medse"], mse=ref["mse"], median_deg=ref["median_deg"],
                encoder_medse=final_enc, encoder_median_deg=final_enc_deg,
                encoder_converged=bool(final_enc < CONVERGED_MEDSE),
                seconds_to_convergence=run.get("seconds_to_convergence"), encoder_seconds_to_convergence=t_enc,
                fsc05_vs_true_map_A=ref.get("fsc_05_vs_map_angstrom"), train_s=run["train_seconds"], wall_s=wall)


def _table(rows):
    head = ["dataset", "mode", "config", "runs", "converged", "encoder converged", "median s to conv.",
            "median MedSE", "median encoder MedSE", "median deg", "median FSC0.5 vs true (A)", "median train s"]
    print(" | ".join(head))
    keys = sorted({(r["dataset"], r["mode"], r["config"]) for r in rows}, key=lambda k: [str(x) for x in k])
    for k in keys:
        g = [r for r in rows if (r["dataset"], r["mode"], r["config"]) == k]
        conv_t = [r["seconds_to_convergence"] for r in g if r["seconds_to_convergence"] is not None]
        fsc = [r["fsc05_vs_true_map_A"] for r in g if r["fsc05_vs_true_map_A"] is not None]
        cells = [*k, len(g), f"{sum(r['converged'] for r in g)}/{len(g)}",
                 f"{sum(r['encoder_converged'] for r in g)}/{len(g)}",
                 f"{np.median(conv_t):.0f}" if conv_t else "-",
                 f"{np.median([r['medse'] for r in g]):.3f}", f"{np.median([r['encoder_medse'] for r in g]):.3f}",
                 f"{np.median([r['median_deg'] for r in g]):.1f}", f"{np.median(fsc):.1f}" if fsc else "-",
                 f"{np.median([r['train_s'] for r in g]):.0f}"]
        print(" | ".join(str(c) for c in cells))


def _write(args, rows) -> Path:
    return write_results(args.out, args.name, args, rows)


if __name__ == "__main__":
    main()
