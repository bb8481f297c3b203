"""Checkpoints and per-epoch logs shared by the training loops (``train``, ``abinitio``, ``hetero``)."""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from ..core.errors import InputError

__all__ = ["load_checkpoint", "restore", "save_checkpoint", "write_rows_csv", "global_rng_state"]


def global_rng_state() -> dict:
    """torch's global random state (dropout, and any draw without a generator of its own): the CPU's and,
    where CUDA is used, every device's. Goes into every checkpoint; :func:`restore` sets it back."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda_rng"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def load_checkpoint(path: Path, device) -> dict:
    """Load with ``weights_only``: tensors and plain containers. A pickle that would run code is
    refused with a clear error instead of being executed."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise InputError(f"refused: not a plain checkpoint of tensors ({type(e).__name__}); loading it could "
                         "run code. Delete it to start over", path) from e


def restore(path: Path, device, model, optimizer, generator: torch.Generator, scheduler=None,
            device_generator: torch.Generator | None = None) -> dict:
    """Load a checkpoint written with :func:`save_checkpoint` into the training objects (the random
    generators too: a resumed run draws what an uninterrupted one would); returns the loop's saved
    ``state`` (a JSON string in the checkpoint, decoded)."""
    import json

    saved = load_checkpoint(path, device)
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(saved["scheduler"])
    generator.set_state(saved["generator"].to("cpu"))   # generator states are CPU byte tensors
    if "torch_rng" in saved:
        torch.set_rng_state(saved["torch_rng"].to("cpu"))
    if "torch_cuda_rng" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(saved["torch_cuda_rng"].to("cpu")))
    if device_generator is not None:
        if "device_generator" not in saved:
            raise InputError("this checkpoint has no device generator state (written by an older version): "
                             "a resumed run would not continue as the interrupted one. Delete it to start over", path)
        device_generator.set_state(saved["device_generator"].to("cpu"))
    return json.loads(saved["state"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write beside, then rename: a kill never leaves a half-written checkpoint."""
    tmp = path.with_name(path.name + ".part")
    torch.save(payload, tmp)
    tmp.replace(path)


def write_rows_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))   # every row's columns, first seen first
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
