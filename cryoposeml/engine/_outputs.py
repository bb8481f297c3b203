"""Output discipline shared by every command: no silent overwrite, nothing that looks complete
after a failure, and the version, time and command line stamped into each run's metadata."""
from __future__ import annotations

import contextlib
import datetime
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import __version__
from ..core.errors import InputError
from ..data._atomic import atomic_path, current_umask

__all__ = ["staged_dir", "check_new_file", "check_run_folder", "stamp", "write_json"]


def check_new_file(path, overwrite: bool = False) -> Path:
    """Refuse to replace an existing output unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError("already exists; choose another output or pass --overwrite", path)
    return path


def check_run_folder(out: Path, marker: str, what: str, resume: bool, overwrite: bool) -> None:
    """Rules for a resumable run's folder: ``marker`` (written last) means a finished run, refused
    unless ``--overwrite`` or ``--resume``; other content means an interrupted run, refused unless
    ``--resume`` (or ``--overwrite``)."""
    finished = (out / marker).exists()
    if finished and not (overwrite or resume):
        raise InputError(f"already holds {what}; choose another folder, --overwrite or --resume", out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite or finished):
        raise InputError("exists and is not empty (an interrupted run? use --resume)", out)


@contextlib.contextmanager
def staged_dir(out, overwrite: bool = False):
    """Yield a temporary folder beside ``out``; move it to ``out`` only if the block succeeds.

    An existing non-empty ``out`` is refused unless ``overwrite`` (then it is replaced at the end).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise InputError("already exists and is not empty; choose another output folder or pass --overwrite", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".part", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o777 & ~current_umask())
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, Path):
        return str(x)
    return x


def stamp(**params) -> dict:
    """Provenance: version, UTC time, command line and the given parameters."""
    return {
        "cryoposeml_version": __version__,
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command_line": " ".join(sys.argv),
        "parameters": _jsonable(params),
    }


def write_json(path, data: dict) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_jsonable(data), indent=2) + "\n")
    return path
