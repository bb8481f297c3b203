"""Relion particle STAR files (``data_optics`` + ``data_particles``; Relion 3.0's single block is
converted on reading), read and written with the ``starfile`` library. Unknown columns and extra
blocks survive a round trip.

Image paths (``rlnImageName = "N@stack.mrcs"``, 1-based) resolve relative to the STAR file's
folder first, then to its parent folders (a Relion project's root, for job outputs), then to the
current directory.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..core.ctf import CtfParams
from ..core.errors import InputError
from ..core.rotations import euler_to_matrix, matrix_to_euler
from ._atomic import atomic_path

__all__ = ["ParticleStar", "read_star", "write_star", "ANGLE_COLUMNS", "SHIFT_COLUMNS"]

ANGLE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
SHIFT_COLUMNS = ["rlnOriginXAngst", "rlnOriginYAngst"]
_OPTICS_REQUIRED = ["rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize"]
_CTF_OPTICS = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]
_CTF_PARTICLE = ["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"]


@dataclass
class ParticleStar:
    """A particle STAR file in memory: the optics table, the particle table, other blocks."""

    particles: pd.DataFrame
    optics: pd.DataFrame
    path: Path | None = None
    other_blocks: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.particles)

    # -- validation -------------------------------------------------------------------------
    def _where(self) -> str:
        return str(self.path) if self.path else "<STAR in memory>"

    def require(self, columns: list[str], what: str) -> None:
        """Raise :class:`InputError` if the particle table lacks any of ``columns``."""
        missing = [c for c in columns if c not in self.particles.columns]
        if missing:
            raise InputError(f"the particle table has no {', '.join(missing)} column(s), needed for {what}",
                             self._where())

    def has_poses(self) -> bool:
        return all(c in self.particles.columns for c in ANGLE_COLUMNS)

    def has_ctf(self) -> bool:
        return (all(c in self.particles.columns for c in _CTF_PARTICLE)
                and all(c in self._optics_per_particle().columns for c in _CTF_OPTICS))

    # -- optics ---------------------------------------------------------------------------------
    def _optics_per_particle(self) -> pd.DataFrame:
        groups = self.particles["rlnOpticsGroup"].astype(int).to_numpy()
        table = self.optics.set_index(self.optics["rlnOpticsGroup"].astype(int))
        unknown = set(groups) - set(table.index)
        if unknown:
            raise InputError(f"particles refer to optics group(s) {sorted(unknown)} missing from data_optics",
                             self._where())
        return table.loc[groups].reset_index(drop=True)

    def optics_value(self, column: str) -> np.ndarray:
        """A ``data_optics`` column expanded to one value per particle (a particle column wins)."""
        if column in self.particles.columns:
            return self.particles[column].to_numpy()
        table = self._optics_per_particle()
        if column not in table.columns:
            raise InputError(f"no {column} in data_optics", self._where())
        return table[column].to_numpy()

    @property
    def pixel_size_angstrom(self) -> float:
        """The particles' pixel size (one value: mixed pixel sizes are refused)."""
        sizes = np.unique(np.round(self.optics["rlnImagePixelSize"].astype(float).to_numpy(), 5))
        if len(sizes) != 1:
            raise InputError(f"optics groups have different pixel sizes {sizes.tolist()}; rescale first",
                             self._where())
        return float(sizes[0])

    @property
    def box(self) -> int:
        sizes = np.unique(self.optics["rlnImageSize"].astype(int).to_numpy())
        if len(sizes) != 1:
            raise InputError(f"optics groups have different box sizes {sizes.tolist()}", self._where())
        return int(sizes[0])

    # -- poses ---------------------------------------------------------------------------------
    def angles_deg(self) -> np.ndarray:
        """``(N, 3)`` Relion Euler angles (rot, tilt, psi) in degrees."""
        self.require(ANGLE_COLUMNS, "poses")
        return self.particles[ANGLE_COLUMNS].to_numpy(dtype=np.float64)

    def matrices(self) -> np.ndarray:
        """``(N, 3, 3)`` Relion rotation matrices of the particles' poses."""
        return euler_to_matrix(self.angles_deg())

    def shifts_angstrom(self) -> np.ndarray:
        """``(N, 2)`` origins (rlnOriginX/YAngst); zeros where the columns are absent."""
        out = np.zeros((len(self), 2))
        for i, c in enumerate(SHIFT_COLUMNS):
            if c in self.particles.columns:
                out[:, i] = self.particles[c].to_numpy(dtype=np.float64)
        return out

    def shifts_px(self) -> np.ndarray:
        return self.shifts_angstrom() / self.pixel_size_angstrom

    def set_poses(self, matrices: np.ndarray | None = None, shifts_angstrom: np.ndarray | None = None) -> None:
        """Write poses (``(N, 3, 3)`` matrices -> Relion angles) and/or shifts into the table."""
        if matrices is not None:
            self.particles[ANGLE_COLUMNS] = matrix_to_euler(np.asarray(matrices, np.float64))
        if shifts_angstrom is not None:
            self.particles[SHIFT_COLUMNS] = np.asarray(shifts_angstrom, np.float64)

    def ctf_params(self) -> CtfParams:
        """The particles' CTF parameters (Relion columns; optics values per particle)."""
        self.require(_CTF_PARTICLE, "the CTF")
        p = self.particles

        def opt(col, default=0.0):
            try:
                return self.optics_value(col).astype(np.float64)
            except InputError:
                if default is None:
                    raise
                return np.full(len(p), default)

        return CtfParams(
            defocus_u_angstrom=p["rlnDefocusU"].to_numpy(np.float64),
            defocus_v_angstrom=p["rlnDefocusV"].to_numpy(np.float64),
            defocus_angle_deg=p["rlnDefocusAngle"].to_numpy(np.float64),
            voltage_kv=opt("rlnVoltage", None),
            cs_mm=opt("rlnSphericalAberration", None),
            amplitude_contrast=opt("rlnAmplitudeContrast", None),
            phase_shift_deg=opt("rlnPhaseShift"),
            bfactor=opt("rlnCtfBfactor"),
            scale=opt("rlnCtfScalefactor", 1.0),
            phase_flipped=self.phase_flipped(),
        )

    def phase_flipped(self) -> np.ndarray:
        """Per particle: were the images phase-flipped already (``rlnCtfDataArePhaseFlipped``, an
        optics column in Relion 3.1; absent: no)?"""
        try:
            v = self.optics_value("rlnCtfDataArePhaseFlipped")
        except InputError:
            return np.zeros(len(self.particles), bool)
        try:
            v = v.astype(np.float64)
        except ValueError:
            raise InputError("rlnCtfDataArePhaseFlipped must be 0 or 1", self._where()) from None
        if not np.isin(v, (0, 1)).all():
            raise InputError(f"rlnCtfDataArePhaseFlipped must be 0 or 1, found {sorted(set(v.tolist()))}",
                             self._where())
        return v.astype(bool)

    def random_subset(self) -> np.ndarray | None:
        """``rlnRandomSubset`` (1 or 2) per particle, or None when the column is absent."""
        if "rlnRandomSubset" not in self.particles.columns:
            return None
        return self.particles["rlnRandomSubset"].to_numpy(np.int64)

    # -- images ---------------------------------------------------------------------------------
    def image_locations(self, resolve: bool = True) -> tuple[list, np.ndarray, np.ndarray]:
        """``(stacks, stack_index, slice_index)``: the unique resolved stack paths (the names as
        written with ``resolve=False``: nothing needs to exist), and per particle which stack it is
        in and its 0-based slice in it."""
        self.require(["rlnImageName"], "the images")
        names = self.particles["rlnImageName"].astype(str).to_numpy()
        slices = np.empty(len(names), np.int64)
        stack_of = np.empty(len(names), np.int64)
        unique: dict[str, int] = {}
        for i, name in enumerate(names):
            if "@" in name:
                num, stack = name.split("@", 1)
                try:
                    slices[i] = int(num) - 1
                except ValueError:
                    raise InputError(f"row {i + 1}: rlnImageName {name!r} is not 'N@stack.mrcs'", self._where())
            else:
                slices[i], stack = 0, name
            if slices[i] < 0:
                raise InputError(f"row {i + 1}: image number in {name!r} must be >= 1", self._where())
            stack_of[i] = unique.setdefault(stack, len(unique))
        return [self.resolve_image_path(s) if resolve else s for s in unique], stack_of, slices

    def image_keys(self, resolve: bool = True) -> list[str]:
        """One key per particle, ``"slice@/resolved/stack.mrcs"``, equal for the same image whatever
        folder each STAR file lives in (used to match particles between files). ``resolve=False``:
        ``"slice@stack.mrcs"`` with the stack's file name only, for files whose stacks are not on
        this machine."""
        stacks, stack_of, slices = self.image_locations(resolve)
        names = [str(s.resolve()) if resolve else Path(s).name for s in stacks]
        return [f"{i}@{names[k]}" for k, i in zip(stack_of, slices)]

    def resolve_image_path(self, name: str) -> Path:
        """An image stack named in the STAR, as an existing path (see the module docstring)."""
        p = Path(name)
        if p.is_absolute():
            candidates = [p]
        else:
            base = self.path.resolve().parent if self.path else Path.cwd()
            candidates = [base / p, *[parent / p for parent in base.parents], Path.cwd() / p]
        for c in candidates:
            if c.exists():
                return c
        raise InputError(f"image stack {name!r} not found (looked next to the STAR file, in its parent "
                         "folders and in the current directory)", self._where())

    def copy(self) -> "ParticleStar":
        return ParticleStar(self.particles.copy(), self.optics.copy(), self.path, dict(self.other_blocks))


#: Relion 3.0 per-particle columns that 3.1 moved to data_optics
_OPTICS_FROM_30 = ["rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"]


def _from_relion30(table: pd.DataFrame, path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A Relion 3.0 particle table (one data block, optics values per particle, origins in pixels,
    the pixel size as ``rlnDetectorPixelSize * 1e4 / rlnMagnification``) as Relion 3.1's optics and
    particles tables, as ``relion_convert_star`` makes them: one optics group per distinct
    (voltage, Cs, amplitude contrast, pixel size), the box from the first image stack's header."""
    from .mrc import stack_info

    p = table.reset_index(drop=True).copy()
    if not {"rlnMagnification", "rlnDetectorPixelSize"} <= set(p.columns):
        raise InputError("a Relion 3.0 STAR (no data_optics block) without rlnMagnification and "
                         "rlnDetectorPixelSize: the pixel size is unknown; convert it with relion_convert_star "
                         "(or add the optics block of Relion 3.1)", path)
    try:
        apix = p["rlnDetectorPixelSize"].astype(float) * 1e4 / p["rlnMagnification"].astype(float)
    except (ValueError, ZeroDivisionError):
        raise InputError("rlnDetectorPixelSize and rlnMagnification must be numbers", path) from None
    if not (np.isfinite(apix) & (apix > 0)).all():
        raise InputError("rlnDetectorPixelSize * 1e4 / rlnMagnification is not a positive pixel size in every row",
                         path)
    p["_apix"] = apix.round(6)
    keys = [c for c in _OPTICS_FROM_30 if c in p.columns] + ["_apix"]
    groups = p[keys].drop_duplicates().reset_index(drop=True)
    groups["rlnOpticsGroup"] = np.arange(1, len(groups) + 1)
    p = p.merge(groups, on=keys, how="left")
    first = ParticleStar(p.iloc[:1].copy(), pd.DataFrame({"rlnOpticsGroup": [1]}), path)
    stacks, _, _ = first.image_locations()
    box = stack_info(stacks[0]).nx
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in groups["rlnOpticsGroup"]],
        "rlnOpticsGroup": groups["rlnOpticsGroup"].to_numpy(),
        **{c: groups[c].to_numpy() for c in _OPTICS_FROM_30 if c in groups},
        "rlnMicrographOriginalPixelSize": groups["_apix"].to_numpy(),
        "rlnImagePixelSize": groups["_apix"].to_numpy(), "rlnImageSize": box, "rlnImageDimensionality": 2})
    for axis in ("X", "Y"):
        if f"rlnOrigin{axis}" in p.columns:
            p[f"rlnOrigin{axis}Angst"] = p[f"rlnOrigin{axis}"].astype(float) * p["_apix"]
    drop = [c for c in _OPTICS_FROM_30 + ["rlnOriginX", "rlnOriginY", "rlnMagnification", "rlnDetectorPixelSize",
                                          "_apix"] if c in p.columns]
    return optics, p.drop(columns=drop)


def read_star(path) -> ParticleStar:
    """Read and check a Relion particle STAR file (clear :class:`InputError` when it is not). Relion
    3.1-5.0 files are read as they are; a Relion 3.0 file (no optics block) is converted on the fly
    as ``relion_convert_star`` would (see :func:`_from_relion30`); a cryoSPARC ``.cs`` file is read
    by :func:`cryoposeml.data.cryosparc.read_cs`; outputs are written as 3.1."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    if path.suffix.lower() == ".cs":   # cryoSPARC particles, read directly
        from .cryosparc import read_cs

        return read_cs(path)
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as e:  # starfile raises a variety of parser errors
        raise InputError(f"not a readable STAR file ({e})", path) from e
    if "optics" not in blocks:
        legacy = [k for k, v in blocks.items() if isinstance(v, pd.DataFrame) and "rlnImageName" in v.columns]
        if len(legacy) != 1:
            raise InputError("no data_optics block, and not a Relion 3.0 particle STAR either (one data block "
                             "with rlnImageName): a Relion particle STAR file is needed", path)
        table = blocks.pop(legacy[0])
        optics, particles = _from_relion30(table, path)
        blocks = {"optics": optics, "particles": particles, **blocks}
    if "particles" not in blocks:
        raise InputError(f"no data_particles block (blocks: {', '.join(blocks) or 'none'})", path)
    optics, particles = blocks.pop("optics"), blocks.pop("particles")
    if not isinstance(optics, pd.DataFrame) or not isinstance(particles, pd.DataFrame):
        raise InputError("data_optics and data_particles must be loop_ tables", path)
    missing = [c for c in _OPTICS_REQUIRED if c not in optics.columns]
    if missing:
        raise InputError(f"data_optics lacks {', '.join(missing)}", path)
    if len(particles) == 0:
        raise InputError("data_particles is empty", path)
    if "rlnOpticsGroup" not in particles.columns:
        if len(optics) != 1:
            raise InputError("particles have no rlnOpticsGroup but there are several optics groups", path)
        particles["rlnOpticsGroup"] = int(optics["rlnOpticsGroup"].iloc[0])
    star = ParticleStar(particles.reset_index(drop=True), optics.reset_index(drop=True), path, blocks)
    box = star.box
    if box % 2:
        raise InputError(f"odd box size {box} px: cryoposeml needs an even box (rescale or re-extract)", path)
    return star


def _relocated_image_names(star: ParticleStar, dest_dir: Path) -> pd.Series:
    """rlnImageName rewritten relative to ``dest_dir`` (the stacks stay where they are)."""
    stacks, stack_of, slices = star.image_locations()
    rel = [os.path.relpath(s, dest_dir) for s in stacks]
    return pd.Series([f"{i + 1:06d}@{rel[k]}" for k, i in zip(stack_of, slices)], index=star.particles.index)


def write_star(star: ParticleStar, path) -> Path:
    """Write ``star`` to ``path`` atomically (a partial file never appears under the final name).

    When ``star`` was read from another folder, image paths are rewritten relative to ``path``'s
    folder so they still resolve.
    """
    path = Path(path)
    particles = star.particles
    if (star.path is not None and "rlnImageName" in particles
            and star.path.resolve().parent != path.resolve().parent):
        particles = particles.assign(rlnImageName=_relocated_image_names(star, path.resolve().parent))
    blocks = {"optics": star.optics, "particles": particles, **star.other_blocks}
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, float_format="%.6f", overwrite=True)
    return path
