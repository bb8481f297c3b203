"""Scale benchmark: the whole pipeline at a facility's box size, time and peak memory per stage.

AdK (64 px at 1.5 A/px) is simulated at ``--box`` px over the same field of view (``simulate
--box-px``: the map's spectrum zero-padded, ``1.5 * 64 / box`` A/px), ``--n`` particles at SNR 0.1
with CTF and origins of 2 A s.d., written stack by stack. Then, each stage in its own process with
its peak resident memory polled (one after the other, nothing else running):

- ``simulate``;
- ``train``: one epoch of ``--model`` at the default 64 px network box (the particles are
  Fourier-cropped on the fly), the consensus reference (half-maps at the full box) included;
- ``predict``: the particles without poses, verified against that reference (``--matching auto``);
  after one epoch most escalate to the exhaustive search, so this is prediction's slow case;
- ``reconstruct --halves`` of the true poses, and ``relion_reconstruct --ctf`` of the same file
  (the full map only: Relion's program makes no half-maps), FSC 0.5 of each against the true map;
  Relion gets both cores as ours does (``mpirun -n 2 relion_reconstruct_mpi``, ``--relion-ranks``;
  1 runs the serial program);
- ``cleanup`` of the predicted particles (its FSC sweep reconstructs at the full box);
- ``refine --prepare-only``: the Relion handoff (priors, reference), without running Relion.

Stages already measured in ``--work`` are kept (``rows.json`` there), so a long run can be resumed
and ``--n`` changed for another work folder; ``--stages`` picks some. Reported per stage: wall time,
particles/s, peak RSS (GB), and for the reconstructions the FSC 0.5 against the truth.

``--memory-vs-n N1 N2 ...``: then predict and reconstruct ``--halves`` again on the first N1, N2, ...
simulated particles (the same particles, nested), to show that their peak memory does not grow
with N; ``--model-dir`` predicts with another run's model (same box and pixel size) instead of
training one here.

Usage: python benchmarks/bench_scale.py [--box 256] [--n 20000] [--work DIR] [--stages ...]
       [--model image2sphere] [--model-dir DIR] [--memory-vs-n N ...] [--out benchmarks/results] [--name NAME]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cryoposeml.core.fourier import resample_volume
from cryoposeml.core.metrics import fsc, resolution_at, soft_sphere_mask
from cryoposeml.data.bundled import resolve_map
from cryoposeml.data.mrc import read_map, write_map
from cryoposeml.engine.refine import relion_env

sys.path.insert(0, str(Path(__file__).parent))
from _results import write_results  # noqa: E402
from _run import cli, run_measured  # noqa: E402

STAGES = ("simulate", "train", "predict", "reconstruct", "relion_reconstruct", "cleanup", "handoff")


def padded_map(box: int, path: Path) -> tuple:
    """AdK at ``box`` px over the same field of view (its spectrum zero-padded)."""
    vol, apix = read_map(resolve_map("adk_open"))
    out, new_apix = resample_volume(vol, box), apix * vol.shape[0] / box
    write_map(path, out, new_apix)
    return out, new_apix


def model_dir(args, work: Path) -> Path:
    return Path(args.model_dir) if args.model_dir else work / "model"


def memory_vs_n(args, work: Path, done: dict) -> None:
    """predict and reconstruct on nested subsets of the simulated particles (rows ``predict@N``,
    ``reconstruct@N`` in ``done``)."""
    from cryoposeml.data.star import read_star, write_star

    for n in args.memory_vs_n:
        for stage in ("predict", "reconstruct"):
            key = f"{stage}@{n}"
            if key in done and not args.redo:
                continue
            if n == args.n and stage in done:   # the whole set: the stage's own row, not a second run
                done[key] = dict(done[stage], stage=key)
                continue
            sub = work / f"subset_{n}"
            sub.mkdir(exist_ok=True)
            for kind in ("particles", "ground_truth"):
                star = read_star(work / "sim" / f"{kind}.star")
                star.particles = star.particles.iloc[:n].reset_index(drop=True)
                write_star(star, sub / f"{kind}.star")
            if stage == "predict":
                cmd = cli("predict", "--particles", sub / "particles.star", "--model", model_dir(args, work),
                          "--out", sub / "predicted.star", "--overwrite")
            else:
                cmd = cli("reconstruct", "--particles", sub / "ground_truth.star", "--out", sub / "ours.mrc",
                          "--halves", "--overwrite")
            wall, gb, r = run_measured(cmd)
            if r.returncode != 0:
                raise SystemExit(f"{key} failed ({' '.join(map(str, cmd))}):\n{r.stderr[-3000:]}")
            done[key] = {"stage": key, "box": args.box, "particles": n, "wall_s": wall, "particles_per_s": n / wall,
                         "peak_rss_gb": gb}
            (work / "rows.json").write_text(json.dumps(done, indent=2))
            print(done[key], flush=True)


def relion_reconstruct(ranks: int) -> list[str]:
    """Relion's reconstruction on ``ranks`` MPI processes (``relion_reconstruct_mpi`` shares the
    particles among them), or its serial program for 1."""
    if ranks == 1:
        return ["relion_reconstruct"]
    return ["mpirun", "--oversubscribe", "-n", str(ranks), "relion_reconstruct_mpi"]


def commands(args, work: Path, apix: float) -> dict:
    sim = work / "sim"
    return {
        "simulate": (cli("simulate", "--map", "adk_open", "--box-px", args.box, "--n", args.n, "--snr", 0.1,
                         "--shift-sigma", 2, "--seed", 1, "--out", sim), None, sim / "ground_truth.star"),
        "train": (cli("train", "--particles", sim / "ground_truth.star", "--out", work / "model", "--model", args.model,
                      "--epochs", 1, "--overwrite"), None, work / "model" / "model.json"),
        "predict": (cli("predict", "--particles", sim / "particles.star", "--model", model_dir(args, work), "--out",
                        work / "predicted.star", "--overwrite"), None, work / "predicted.star"),
        "reconstruct": (cli("reconstruct", "--particles", sim / "ground_truth.star", "--out", work / "ours.mrc",
                            "--halves", "--overwrite"), None, work / "ours.mrc"),
        "relion_reconstruct": (relion_reconstruct(args.relion_ranks) + [
            "--i", "ground_truth.star", "--o", str((work / "relion.mrc").resolve()), "--ctf", "--angpix", str(apix)],
            sim, work / "relion.mrc"),
        "cleanup": (cli("cleanup", "--particles", work / "predicted.star", "--out", work / "kept.star", "--overwrite"),
                    None, work / "kept.star"),
        "handoff": (cli("refine", "--particles", work / "kept.star", "--out", work / "refine", "--prepare-only",
                        "--overwrite"), None, work / "refine" / "relion_job.json"),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--box", type=int, default=256)
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--model", default="image2sphere")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--redo", action="store_true", help="measure the chosen stages again")
    ap.add_argument("--relion-ranks", type=int, default=2,
                    help="MPI processes for relion_reconstruct_mpi (1: the serial relion_reconstruct)")
    ap.add_argument("--model-dir", default=None, help="predict with this model folder instead of training one")
    ap.add_argument("--memory-vs-n", type=int, nargs="*", default=[],
                    help="then predict and reconstruct on the first N1, N2, ... particles")
    ap.add_argument("--work", default="bench_scale_work")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default=None, help="results file name (default bench_scale_<box>px_<n>)")
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    truth, apix = padded_map(args.box, work / "map.mrc")
    mask = soft_sphere_mask(args.box)
    done_path = work / "rows.json"
    done = json.loads(done_path.read_text()) if done_path.exists() else {}
    cmds = commands(args, work, apix)
    for stage in STAGES:
        if stage not in args.stages or (stage in done and not args.redo):
            continue
        cmd, cwd, product = cmds[stage]
        wall, gb, r = run_measured(cmd, cwd=cwd, env=relion_env() if stage == "relion_reconstruct" else None)
        if r.returncode != 0 or not product.exists():
            raise SystemExit(f"{stage} failed ({' '.join(map(str, cmd))}):\n{r.stderr[-3000:]}")
        row = {"stage": stage, "box": args.box, "particles": args.n, "wall_s": wall,
               "particles_per_s": args.n / wall, "peak_rss_gb": gb}
        if stage in ("reconstruct", "relion_reconstruct"):
            vol, _ = read_map(product)
            row["fsc05_vs_true_A"] = resolution_at(*fsc(vol, truth, apix, mask), 0.5)
        done[stage] = row
        done_path.write_text(json.dumps(done, indent=2))
        print(row, flush=True)
    if args.memory_vs_n:
        memory_vs_n(args, work, done)
    rows = [done[s] for s in STAGES if s in done] + [done[k] for k in done if "@" in k]
    path = write_results(args.out, args.name or f"bench_scale_{args.box}px_{args.n}", args, rows)
    print("| stage | box | particles | wall (s) | particles/s | peak RSS (GB) | FSC 0.5 vs truth (A) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f = f"{r['fsc05_vs_true_A']:.2f}" if "fsc05_vs_true_A" in r else ""
        print(f"| {r['stage']} | {r['box']} | {r['particles']} | {r['wall_s']:.0f} | {r['particles_per_s']:.1f} | "
              f"{r['peak_rss_gb']:.2f} | {f} |")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
