"""Foundation benchmark: reconstruction speed and quality against relion_reconstruct, and the memory
of streaming particles from disk as the dataset grows.

    .venv/bin/python benchmarks/bench_foundation.py [--sizes 2000 10000] [--out benchmarks/results]

For each dataset size N it simulates N AdK particles (64 px, CTF, SNR 0.1), then side by side:
  * cryoposeml reconstruct vs relion_reconstruct --ctf (wall clock, FSC-0.5 against the true map);
  * the growth of resident memory (sampled after each batch, above the level after loading the
    STAR file) of a process that streams all N images in batches of 256 through ParticleDataset;
    it should not grow with N.
Prints a table and writes bench_foundation.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from cryoposeml.core.metrics import fsc, resolution_at
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map
from cryoposeml.engine.reconstruct import reconstruct
from cryoposeml.engine.simulate import SimulationConfig, simulate

STREAM = """
import sys, psutil
from cryoposeml.data.dataset import ParticleDataset
from cryoposeml.data.star import read_star
ds = ParticleDataset(read_star(sys.argv[1]))
proc = psutil.Process()
base = peak = proc.memory_info().rss
for idx, images in ds.batches(256):
    images.sum()
    peak = max(peak, proc.memory_info().rss)
print((peak - base) / 2**20)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    truth, apix = read_map(resolve_map("adk_open"))
    rows = []
    work = Path(tempfile.mkdtemp(prefix="cpml_bench_"))
    try:
        for n in args.sizes:
            d = work / f"n{n}"
            simulate(SimulationConfig(n=n, snr=0.1, shift_sigma_angstrom=2.0, seed=1), d, progress=False)
            star = d / "ground_truth.star"
            t = time.perf_counter()
            reconstruct(star, d / "ours.mrc", progress=False)
            t_ours = time.perf_counter() - t
            t = time.perf_counter()
            subprocess.run(["relion_reconstruct", "--i", "ground_truth.star", "--o", "relion.mrc", "--ctf",
                            "--angpix", str(apix)], cwd=d, check=True, capture_output=True)
            t_relion = time.perf_counter() - t
            res = {k: resolution_at(*fsc(truth, read_map(d / f"{k}.mrc")[0], apix), 0.5) for k in ("ours", "relion")}
            rss = float(subprocess.run([sys.executable, "-c", STREAM, str(star)], capture_output=True, text=True,
                                       check=True).stdout.strip())
            rows.append(dict(n=n, ours_s=t_ours, relion_s=t_relion, speed_ratio=t_relion / t_ours,
                             ours_fsc05_A=res["ours"], relion_fsc05_A=res["relion"], stream_peak_rss_mib=rss))
    finally:
        shutil.rmtree(work)
    print(f"{'N':>7} {'ours s':>8} {'relion s':>9} {'relion/ours':>11} {'ours FSC0.5 A':>13} "
          f"{'relion FSC0.5 A':>15} {'stream +RSS MiB':>15}")
    for r in rows:
        print(f"{r['n']:>7} {r['ours_s']:>8.1f} {r['relion_s']:>9.1f} {r['speed_ratio']:>11.2f} "
              f"{r['ours_fsc05_A']:>13.2f} {r['relion_fsc05_A']:>15.2f} {r['stream_peak_rss_mib']:>15.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_foundation.json").write_text(json.dumps(
        {"machine": platform.platform(), "cpus": __import__("os").cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out / 'bench_foundation.json'}")


if __name__ == "__main__":
    main()
