"""The on-the-fly map: half-maps that grow as predicted batches arrive (the streaming worker's
``--live-map DIR``), as a facility watching a session wants them (cryoSPARC Live does this).

After each batch, its particles that pass the junk test (``rlnCpmlMatchQuantile`` at or above
``junk_quantile``, the cleanup's test; all of them without the column) are inserted into two
running half-set accumulators (``rlnRandomSubset``); earlier batches are never read again. Then
``DIR`` holds:

- ``map.mrc``, ``map_half1.mrc``, ``map_half2.mrc``: the maps so far;
- ``history.json``: one row per batch (particles seen and kept, junk dropped, the half-map FSC
  0.143 and 0.5 resolutions, the time), and the last FSC curve;
- ``live.png``: resolution against particles kept, and the FSC;
- ``state.pt``: the accumulators and the batches already inserted, written after each batch, so a
  restarted worker carries on where the last one stopped (a batch served twice is inserted once).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError
from ..core.metrics import fsc, resolution_at, soft_sphere_mask
from ..core.reconstruction import BackProjector
from ..data._atomic import atomic_path
from ..data.mrc import write_map
from ..data.star import read_star
from .plots import live_map_figure, save_figure
from .reconstruct import insert_particles, half_map_paths, half_set_labels

__all__ = ["LiveMap"]

log = logging.getLogger(__name__)


class LiveMap:
    """Running half-maps in ``folder`` for particles of ``box`` px at ``apix`` A/px, point group ``sym``."""

    def __init__(self, folder, box: int, apix: float, sym: str = "C1", junk_quantile: float = 0.01):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.box, self.apix, self.sym, self.junk_quantile = box, apix, sym, junk_quantile
        self.bps = {k: BackProjector(box, sym) for k in (1, 2)}
        self.history: list[dict] = []
        self._fsc = None   # the last half-map FSC (frequency, curve), once both halves have particles
        self._map = None   # the last full map (for the figure)
        state = self.folder / "state.pt"
        if state.exists():
            s = torch.load(state, weights_only=True)
            if (s["box"], round(s["apix"], 4), s["sym"]) != (box, round(apix, 4), sym):
                raise InputError(f"holds a live map of {s['box']} px at {s['apix']:.3f} A/px in {s['sym']}, not "
                                 f"{box} px at {apix:.3f} A/px in {sym}", self.folder)
            for k in (1, 2):
                self.bps[k]._acc.copy_(s[f"acc{k}"])
                self.bps[k].count = int(s[f"count{k}"])
            self.history = json.loads(s["history"])   # with the accumulators: never out of step
            log.info("live map: carrying on from %d batches (%d particles kept)", len(self.history),
                     self.bps[1].count + self.bps[2].count)

    def add(self, predicted_star, name: str | None = None) -> dict:
        """Insert one predicted batch (a STAR written by ``predict``) under ``name`` (default: the
        file's stem; a name already inserted is skipped); returns its history row."""
        name = name or Path(predicted_star).stem
        done = {row["batch"]: row for row in self.history}
        if name in done:
            log.info("live map: batch %s was inserted already", name)
            return done[name]
        star = read_star(predicted_star)
        if star.box != self.box or abs(star.pixel_size_angstrom - self.apix) > 1e-3:
            raise InputError(f"particles are {star.box} px at {star.pixel_size_angstrom:.3f} A/px, the live map "
                             f"{self.box} px at {self.apix:.3f} A/px", predicted_star)
        keep = np.ones(len(star), bool)
        if "rlnCpmlMatchQuantile" in star.particles and self.junk_quantile > 0:
            keep = star.particles["rlnCpmlMatchQuantile"].to_numpy(np.float64) >= self.junk_quantile
        subset, _ = half_set_labels(star)
        insert_particles(star, self.bps, subset, np.nonzero(keep)[0], None, star.has_ctf(), 256)
        row = {"batch": name, "particles_seen": (self.history[-1]["particles_seen"] if self.history else 0)
               + len(star), "particles_kept": self.bps[1].count + self.bps[2].count,
               "junk_dropped_batch": int((~keep).sum()), "time": time.time()}
        row.update(self._write_maps())
        self.history.append(row)
        self._save()
        return row

    def _write_maps(self) -> dict:
        if min(self.bps[1].count, self.bps[2].count) == 0:
            return {"resolution_fsc0143_angstrom": None, "resolution_fsc05_angstrom": None}
        half1, half2 = self.bps[1].reconstruct(), self.bps[2].reconstruct()
        full = self.bps[1].reconstruct(plus=self.bps[2])   # without a merged copy of the accumulators
        h1, h2, _ = half_map_paths(self.folder / "map.mrc")
        write_map(h1, half1, self.apix)
        write_map(h2, half2, self.apix)
        write_map(self.folder / "map.mrc", full, self.apix)
        self._map = full
        freq, curve = fsc(half1, half2, self.apix, soft_sphere_mask(self.box))
        self._fsc = (freq, curve)
        return {"resolution_fsc0143_angstrom": resolution_at(freq, curve, 0.143),
                "resolution_fsc05_angstrom": resolution_at(freq, curve, 0.5)}

    def _save(self) -> None:
        with atomic_path(self.folder / "state.pt") as tmp:
            torch.save({"box": self.box, "apix": self.apix, "sym": self.sym,
                        **{f"acc{k}": self.bps[k]._acc for k in (1, 2)},
                        **{f"count{k}": self.bps[k].count for k in (1, 2)},
                        "history": json.dumps(self.history)}, tmp)
        record = {"box": self.box, "pixel_size_angstrom": self.apix, "sym": self.sym,
                  "junk_quantile": self.junk_quantile, "batches": self.history}
        if self._fsc is not None:
            record["fsc_frequency_per_angstrom"], record["fsc_half_maps"] = (self._fsc[0].tolist(),
                                                                             self._fsc[1].tolist())
        with atomic_path(self.folder / "history.json") as tmp:
            tmp.write_text(json.dumps(record, indent=1))
        self._plot(record, self._map)

    def _plot(self, record: dict, volume) -> None:
        save_figure(live_map_figure(record, volume), self.folder / "live.png")
