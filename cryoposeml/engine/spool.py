"""A spool folder between a client (the Scipion streaming protocol, a script) and one long-lived
``cryoposeml predict --spool DIR`` worker that keeps the model, the reference and its projection
library loaded across batches.

Layout of ``DIR`` (one owner: this module; no torch here, the protocols import it):

- ``pending/NAME.json``: a request ``{"particles": STAR, "out": STAR}``, written atomically by
  the client; the worker takes requests in name order.
- ``done/NAME.json``: the request and the prediction's summary, written after its outputs.
- ``failed/NAME.json``: the request and ``"error"`` (the message a one-shot ``predict`` would
  have printed); the batch's outputs are not written.
- ``worker.json``: written by the worker once the model is loaded (pid, model, start time).
- ``heartbeat``: touched by the client while it may still submit; a worker whose client has been
  silent for ``stale_after_s`` exits with an error (a killed protocol leaves no orphan worker).
- ``stop``: the client has no more requests; the worker finishes the pending ones and exits.
- ``worker_exit.json``: the worker's last word (``{"status": "stopped"|"stale"|"error", ...}``),
  so a client waiting on a batch learns that nothing will answer it.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Callable

from ..core.errors import InputError
from ..data._atomic import atomic_path

__all__ = ["SpoolClient", "serve", "WorkerGone"]

log = logging.getLogger(__name__)

PENDING, DONE, FAILED = "pending", "done", "failed"


class WorkerGone(RuntimeError):
    """The worker exited (or was never started) while a request was waiting for it."""


def _write_json(path: Path, obj: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=1, default=str))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


class SpoolClient:
    """The client side: submit batches, learn their fate, keep the worker alive, stop it."""

    def __init__(self, folder):
        self.folder = Path(folder)
        for sub in (PENDING, DONE, FAILED):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)

    def reset(self) -> None:
        """Forget a previous worker's state (a protocol restarted after a kill): stale requests,
        results, the stop and exit markers. Results already collected by the client are its own."""
        for sub in (PENDING, DONE, FAILED):
            for f in (self.folder / sub).glob("*.json"):
                f.unlink()
        for name in ("stop", "worker_exit.json", "worker.json"):
            (self.folder / name).unlink(missing_ok=True)
        self.heartbeat()

    def submit(self, name: str, particles, out) -> None:
        self.heartbeat()
        _write_json(self.folder / PENDING / f"{name}.json",
                    {"name": name, "particles": str(Path(particles).absolute()), "out": str(Path(out).absolute())})

    def result(self, name: str) -> dict | None:
        """The summary of a finished request, ``None`` while it is pending. Raises
        :class:`InputError` for a failed request and :class:`WorkerGone` when the worker has exited
        without answering it."""
        done = self.folder / DONE / f"{name}.json"
        if done.exists():
            return _read_json(done)["summary"]
        failed = self.folder / FAILED / f"{name}.json"
        if failed.exists():
            raise InputError(_read_json(failed)["error"])   # the message already names the file
        exit_file = self.folder / "worker_exit.json"
        if exit_file.exists() and not done.exists():
            info = _read_json(exit_file)
            raise WorkerGone(f"the prediction worker exited ({info.get('status')}: {info.get('message', '')}) "
                             f"before batch {name} was predicted; see {self.folder}")
        return None

    def wait(self, name: str, poll_s: float = 0.5, timeout_s: float | None = None) -> dict:
        t0 = time.monotonic()
        while True:
            r = self.result(name)
            if r is not None:
                return r
            if timeout_s is not None and time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"batch {name} not predicted after {timeout_s:.0f} s ({self.folder})")
            self.heartbeat()
            time.sleep(poll_s)

    def heartbeat(self) -> None:
        (self.folder / "heartbeat").touch()

    def stop(self) -> None:
        (self.folder / "stop").touch()

    def worker_exit(self) -> dict | None:
        f = self.folder / "worker_exit.json"
        return _read_json(f) if f.exists() else None


def serve(folder, handle: Callable[[str, str, str], dict], poll_s: float = 0.5, stale_after_s: float = 600.0,
          info: dict | None = None) -> dict:
    """The worker loop: ``handle(particles, out, name)`` for each pending request, in name order, until
    ``stop`` is present and nothing is pending (returns the exit record), or the client's
    ``heartbeat`` is older than ``stale_after_s`` (exits with ``status: stale``). A request whose
    ``handle`` raises :class:`InputError` goes to ``failed/`` and the worker carries on; any other
    exception ends the worker (recorded in ``worker_exit.json``) and propagates."""
    folder = Path(folder)
    for sub in (PENDING, DONE, FAILED):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "worker_exit.json").unlink(missing_ok=True)
    if not (folder / "heartbeat").exists():
        (folder / "heartbeat").touch()
    _write_json(folder / "worker.json", {"pid": os.getpid(), "started": time.time(), **(info or {})})
    served = failed = 0
    try:
        while True:
            pending = sorted((folder / PENDING).glob("*.json"))
            if pending:
                req_path = pending[0]
                req = _read_json(req_path)
                t = time.perf_counter()
                try:
                    summary = handle(req["particles"], req["out"], req["name"])
                except InputError as e:
                    _write_json(folder / FAILED / req_path.name, {**req, "error": str(e)})
                    log.error("batch %s failed: %s", req["name"], e)
                    failed += 1
                else:
                    summary = {**summary, "worker_wall_s": time.perf_counter() - t}
                    _write_json(folder / DONE / req_path.name, {**req, "summary": summary})
                    served += 1
                req_path.unlink()
                continue
            if (folder / "stop").exists():
                record = {"status": "stopped", "served": served, "failed": failed}
                break
            age = time.time() - (folder / "heartbeat").stat().st_mtime
            if age > stale_after_s:
                record = {"status": "stale", "served": served, "failed": failed,
                          "message": f"no heartbeat from the client for {age:.0f} s"}
                break
            time.sleep(poll_s)
    except BaseException as e:
        _write_json(folder / "worker_exit.json", {"status": "error", "served": served, "failed": failed,
                                                  "message": f"{type(e).__name__}: {e}"})
        raise
    _write_json(folder / "worker_exit.json", record)
    if record["status"] == "stale":
        raise InputError(f"stopped: {record['message']} (its client is gone)", folder)
    return record
