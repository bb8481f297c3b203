"""Heterogeneity benchmark (HetACUMN, seed 003, at small scale): AdK open/closed and a 10-state
closed -> open transition.

    .venv/bin/python benchmarks/bench_hetero.py [--datasets two-state transition] [--transition-maps DIR]
        [--n 1500] [--box-px 32] [--snr 1] [--poses search input] [--seeds 0 1]

Data: the bundled adk_closed / adk_open maps (64 px at 1.5 A), 50/50, or the 10 frames of the
MDAnalysis closed -> open transition made by ``scripts/make_maps.py --transition 10 --out DIR``
(equal shares), projected at uniform random poses with CTF and origin shifts (3 A s.d.), at
``--snr`` (0: noise-free). Poses: ``search`` (from nothing: the global search with the conformation
frozen, then against each particle's V(z)) or ``input`` (consensus poses: the true ones turned by
about 3 degrees and the origins moved by 1 A s.d., as a homogeneous refinement would give). Every configuration runs with and
without task 2 (the ablation). Reported per run: misclassification (classes matched to states,
Hungarian), the same for the amortized encoder's z alone, median rotation error after the best
global alignment, median shift error, FSC 0.5 of each state's class map against its true map,
|Spearman| of PC1 against the state index, the entanglement score, training seconds. Prints a
table, writes JSON.
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
from cryoposeml.data.star import read_star, write_star
from cryoposeml.engine.hetero import HeteroConfig, hetero
from cryoposeml.engine.simulate import SimulationConfig, simulate


def _maps(ds: str, args) -> list[str]:
    if ds == "two-state":
        return ["adk_closed", "adk_open"]
    d = Path(args.transition_maps or "")
    maps = sorted(str(p) for p in d.glob("adk_transition_*.mrc"))
    if not maps:
        raise SystemExit(f"no adk_transition_*.mrc in {d}: run scripts/make_maps.py --transition 10 --out {d}")
    return maps


def _consensus(data: Path, seed: int) -> Path:
    """The true poses turned by about 3 degrees (rms) and the true origins moved by 1 A (s.d. per
    axis), as a homogeneous refinement would give, without the truth's state column."""
    from scipy.spatial.transform import Rotation

    truth = read_star(data / "ground_truth.star")
    star = read_star(data / "particles.star")
    rng = np.random.default_rng(seed)
    kick = Rotation.from_rotvec(rng.normal(0, np.radians(3) / np.sqrt(3), (len(star), 3)))
    star.set_poses(truth.matrices() @ kick.as_matrix(), truth.shifts_angstrom() + rng.normal(0, 1.0, (len(star), 2)))
    write_star(star, data / "consensus.star")
    return data / "consensus.star"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", nargs="+", default=["two-state"], choices=["two-state", "transition"])
    ap.add_argument("--transition-maps", help="folder with adk_transition_*.mrc (scripts/make_maps.py --transition)")
    ap.add_argument("--n", type=int, default=1500)
    ap.add_argument("--snr", type=float, default=1.0, help="0: noise-free")
    ap.add_argument("--box-px", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=16)
    ap.add_argument("--search-epochs", type=int, default=8)
    ap.add_argument("--zdim", type=int, default=4)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--encoder", default="equivariant", choices=["cnn", "equivariant"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--poses", nargs="+", default=["search", "input"], choices=["search", "input"])
    ap.add_argument("--no-ablation", action="store_true", help="only with task 2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="bench_hetero", help="the results file: <out>/<name>.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cpml_bench_het_"))
    rows = []
    try:
        for ds in args.datasets:
            maps = _maps(ds, args)
            data = work / ds
            simulate(SimulationConfig(map=tuple(maps), n=args.n, snr=args.snr or None, ctf=True,
                                      shift_sigma_angstrom=3.0, seed=11), data, progress=False)
            for poses in args.poses:
                particles = data / "particles.star" if poses == "search" else _consensus(data, 0)
                for task2 in ([True] if args.no_ablation else [True, False]):
                    for seed in args.seeds:
                        out = work / f"{ds}_{poses}_{task2}_{seed}"
                        # input poses: 2 epochs of consensus map, the rest heterogeneity
                        epochs = args.epochs if poses == "search" else max(6, args.epochs // 2)
                        cfg = HeteroConfig(zdim=args.zdim, classes=len(maps), encoder=args.encoder, poses=poses,
                                           epochs=epochs, search_epochs=args.search_epochs if poses == "search" else None,
                                           task2=task2, batch_size=args.batch_size, box_px=args.box_px,
                                           widths=tuple(args.widths), seed=seed, device=args.device)
                        t = time.perf_counter()
                        s = hetero(particles, out, cfg, reference=data / "ground_truth.star", reference_maps=maps,
                                   progress=False)
                        rows.append(_row(ds, poses, task2, seed, s, time.perf_counter() - t))
                        print(json.dumps(rows[-1]), flush=True)
                        write_results(args.out, args.name, args, rows)
    finally:
        shutil.rmtree(work)
    _table(rows)
    print(f"wrote {write_results(args.out, args.name, args, rows)}")


def _row(ds, poses, task2, seed, s, wall) -> dict:
    ref = s["reference"]
    fsc = [v for v in ref.get("fsc_05_per_state_angstrom", {}).values() if v is not None]
    return dict(dataset=ds, poses=poses, task2=task2, seed=seed, misclassified=ref["misclassified"],
                encoder_misclassified=ref["encoder_misclassified"], median_rotation_deg=ref["median_deg"],
                encoder_median_rotation_deg=ref["encoder_median_deg"],
                median_shift_error_A=ref["median_shift_error_angstrom"],
                fsc05_per_state_A=ref.get("fsc_05_per_state_angstrom"),
                median_fsc05_A=float(np.median(fsc)) if fsc else None,
                spearman_pc1_state=ref["spearman_pc1_state"], entanglement=s["entanglement"],
                train_s=s["run"]["train_seconds"], wall_s=wall)


def _table(rows):
    head = ["dataset", "poses", "task 2", "runs", "misclassified %", "encoder misclassified %", "rotation deg",
            "shift A", "FSC0.5 per state A (median)", "|Spearman PC1|", "entanglement", "train s"]
    print(" | ".join(head))
    keys = sorted({(r["dataset"], r["poses"], r["task2"]) for r in rows}, key=lambda k: [str(x) for x in k])
    for k in keys:
        g = [r for r in rows if (r["dataset"], r["poses"], r["task2"]) == k]
        med = lambda key: np.median([r[key] for r in g if r[key] is not None])  # noqa: E731
        cells = [*k, len(g), f"{100 * med('misclassified'):.1f}", f"{100 * med('encoder_misclassified'):.1f}",
                 f"{med('median_rotation_deg'):.1f}", f"{med('median_shift_error_A'):.2f}",
                 f"{med('median_fsc05_A'):.1f}" if any(r["median_fsc05_A"] for r in g) else "-",
                 f"{med('spearman_pc1_state'):.2f}", f"{med('entanglement'):.2f}", f"{med('train_s'):.0f}"]
        print(" | ".join(str(c) for c in cells))


if __name__ == "__main__":
    main()
