"""The streaming worker (``cryoposeml predict --spool``) driven as the Scipion protocol drives it:
one process, batches handed one after another, each waited for. Shared by the benchmarks."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from cryoposeml.engine.spool import SpoolClient

from _run import cli


def feed_worker(model: Path, batches: list[Path], folder: Path, extra_args: tuple = ()) -> dict:
    """Start a worker for ``model`` in ``folder`` (emptied first) and hand it ``batches``; returns its
    start-up (process, model, reference, library) in s, each batch's wall time (submission -> outputs
    on disk) and the output STAR of each batch."""
    if folder.exists():
        shutil.rmtree(folder)
    client = SpoolClient(folder / "spool")
    t0 = time.perf_counter()
    cmd = cli("predict", "--model", model, "--spool", client.folder, *extra_args)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not (client.folder / "worker.json").exists():
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read())
        time.sleep(0.05)
    startup = time.perf_counter() - t0
    walls, outs = [], []
    for k, path in enumerate(batches):
        outs.append(folder / f"out{k:04d}.star")
        t = time.perf_counter()
        client.submit(f"b{k:04d}", path, outs[-1])
        client.wait(f"b{k:04d}", poll_s=0.02)
        walls.append(time.perf_counter() - t)
        client.heartbeat()
    client.stop()
    proc.communicate(timeout=120)
    return {"startup_s": startup, "batch_wall_s": walls, "outputs": outs}
