"""Streaming benchmark: N particles arriving in B batches through the prediction worker, as the
Scipion predict protocol feeds them, against one batch of all N.

``--n`` particles (SNR 0.1, CTF, shifts) are simulated from AdK, cut into ``--batches`` STAR
files, and handed one by one to one worker (``cryoposeml predict --spool --live-map``: verified
prediction, the junk test and the live map's running half-maps and FSC after every batch). Then a
fresh worker gets all N in one batch (with the live map too). Reported: the worker's start-up,
each batch's wall time (submission -> outputs and live map on disk), the mean of the first and last
ten batches and their ratio (flat per-batch overhead: no batch re-reads earlier ones), the total,
and the one-batch total; the live map's particles and resolution at the end of each run.

Usage: python benchmarks/bench_streaming.py --model MODEL [--n 20000] [--batches 40] [--work DIR]
           [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cryoposeml.data.star import read_star, write_star

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402
from _run import cli  # noqa: E402
from _worker import feed_worker  # noqa: E402


def run_worker(model: Path, batches: list[Path], folder: Path) -> dict:
    """One worker with the live map fed ``batches`` one after another (as the protocol does)."""
    run = feed_worker(model, batches, folder, ("--live-map", folder / "live"))
    live = json.loads((folder / "live" / "history.json").read_text())["batches"]
    return {"startup_s": run["startup_s"], "batch_wall_s": run["batch_wall_s"], "total_s": float(sum(run["batch_wall_s"])),
            "live_particles_kept": live[-1]["particles_kept"], "live_particles_seen": live[-1]["particles_seen"],
            "live_fsc0143_angstrom": live[-1]["resolution_fsc0143_angstrom"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="a model folder (cryoposeml train) for AdK at 64 px")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--work", type=Path, default=Path("/tmp/cpml_bench_streaming"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)

    sim = args.work / "sim"
    if not (sim / "particles.star").exists():
        t = time.perf_counter()
        r = subprocess.run(cli("simulate", "--map", "adk_open", "--n", args.n, "--snr", 0.1, "--shift-sigma", 2, "--seed", 11,
                               "--out", sim), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr)
        print(f"simulated {args.n} particles in {time.perf_counter() - t:.0f} s")
    star = read_star(sim / "particles.star")
    paths = []
    for k, rows in enumerate(np.array_split(np.arange(len(star)), args.batches)):
        b = star.copy()
        b.particles = star.particles.iloc[rows].reset_index(drop=True)
        paths.append(write_star(b, sim / f"batch_{k:04d}.star"))

    stream = run_worker(args.model, paths, args.work / "stream")
    one = run_worker(args.model, [sim / "particles.star"], args.work / "one")
    w = np.array(stream["batch_wall_s"])
    k = min(10, len(w) // 2)
    first, last = float(w[:k].mean()), float(w[-k:].mean())
    rows = [{"run": f"{args.batches} batches of {args.n // args.batches}", **stream,
             "first_batches_mean_s": first, "last_batches_mean_s": last, "last_over_first": last / first},
            {"run": f"1 batch of {args.n}", **one}]
    print(f"\n{'run':<26}{'start s':>9}{'total s':>9}{'p/s':>7}{'first10 s':>11}{'last10 s':>10}{'ratio':>7}"
          f"{'kept':>7}{'FSC.143 A':>10}")
    for r in rows:
        print(f"{r['run']:<26}{r['startup_s']:>9.1f}{r['total_s']:>9.1f}{args.n / r['total_s']:>7.0f}"
              f"{r.get('first_batches_mean_s', float('nan')):>11.2f}{r.get('last_batches_mean_s', float('nan')):>10.2f}"
              f"{r.get('last_over_first', float('nan')):>7.2f}{r['live_particles_kept']:>7}"
              f"{r['live_fsc0143_angstrom']:>10.2f}")
    print(f"streaming total / one batch: {stream['total_s'] / one['total_s']:.2f}")
    rows.append({"run": "ratio", "streaming_over_one_batch": stream["total_s"] / one["total_s"]})
    print("wrote", write_results(args.out, "bench_streaming", args, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
