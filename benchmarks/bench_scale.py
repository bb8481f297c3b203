"""Scale benchmark (first part): reconstruction time and peak memory at facility box sizes.

AdK is Fourier-padded from its 64 px at 1.5 A/px to ``--box`` px at ``1.5 * 64 / box`` A/px (the
same field of view, finer sampling), ``--n`` particles are simulated from it (SNR 0.1, CTF, origins
of 2 A s.d.), then ``cryoposeml reconstruct --halves`` and ``relion_reconstruct --ctf`` (the full
map only) run on them, one after the other, each in its own process with its peak resident memory
polled. Reported: wall time, peak RSS, FSC 0.5 against the padded true map. The rest of the
issue's list (train, predict, cleanup and the handoff on 20,000 particles at 256 px) is still to
come.

Usage: python benchmarks/bench_scale.py [--box 256] [--n 1000] [--work DIR] [--out benchmarks/results]
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

from cryoposeml.core.fourier import resample_volume
from cryoposeml.core.metrics import fsc, resolution_at, soft_sphere_mask
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map, write_map

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402
from bench_predict import run_measured  # noqa: E402


def padded_map(box: int, path: Path) -> tuple[np.ndarray, float]:
    """AdK at ``box`` px over the same field of view (its spectrum zero-padded)."""
    vol, apix = read_map(resolve_map("adk_open"))
    out, new_apix = resample_volume(vol, box), apix * vol.shape[0] / box
    write_map(path, out, new_apix)
    return out, new_apix


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--work", default="bench_scale_work")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bench_scale")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    truth, apix = padded_map(args.box, work / "map.mrc")
    sim = work / "sim"
    if not (sim / "ground_truth.star").exists():
        shutil.rmtree(sim, ignore_errors=True)
        wall, gb, r = run_measured([str(c) for c in (sys.executable, "-m", "cryoposeml.cli", "simulate", "--map",
                                                     work / "map.mrc", "--n", args.n, "--snr", 0.1, "--shift-sigma",
                                                     2, "--seed", 1, "--out", sim, "--quiet")])
        assert r.returncode == 0, r.stderr
        print(f"simulate: {wall:.0f} s, peak {gb:.2f} GB")
    mask = soft_sphere_mask(args.box)
    rows = []
    runs = {
        "cryoposeml reconstruct --halves": [sys.executable, "-m", "cryoposeml.cli", "reconstruct", "--particles",
                                            sim / "ground_truth.star", "--out", work / "ours.mrc", "--halves",
                                            "--overwrite", "--quiet"],
        "relion_reconstruct --ctf (full map only)": ["relion_reconstruct", "--i", "ground_truth.star", "--o",
                                                     (work / "relion.mrc").absolute(), "--ctf", "--angpix", apix],
    }
    for name, cmd in runs.items():
        cwd = sim if cmd[0] == "relion_reconstruct" else None
        wall, gb, r = run_measured([str(c) for c in cmd]) if cwd is None else _in(cwd, cmd)
        assert r.returncode == 0, r.stderr[-2000:]
        out = work / ("ours.mrc" if "cryoposeml" in name else "relion.mrc")
        vol, _ = read_map(out)
        row = {"box": args.box, "particles": args.n, "method": name, "wall_s": wall, "peak_rss_gb": gb,
               "fsc05_vs_true_A": resolution_at(*fsc(vol, truth, apix, mask), 0.5)}
        rows.append(row)
        print(row)
    path = write_results(args.out, args.name, args, rows)
    print("| box | particles | program | wall (s) | peak RSS (GB) | FSC 0.5 vs truth (A) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['box']} | {r['particles']} | {r['method']} | {r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | "
              f"{r['fsc05_vs_true_A']:.2f} |")
    print(f"wrote {path}")


def _in(cwd: Path, cmd: list) -> tuple:
    """``run_measured`` in another working directory (Relion resolves image paths from it)."""
    import os

    old = os.getcwd()
    os.chdir(cwd)
    try:
        return run_measured([str(c) for c in cmd])
    finally:
        os.chdir(old)


if __name__ == "__main__":
    main()
