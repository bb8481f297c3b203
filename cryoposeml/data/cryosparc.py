"""cryoSPARC particles (``.cs`` files) read directly, as Relion 3.1 tables.

A ``.cs`` file is a NumPy structured array saved with ``numpy.save`` (one row per particle, fields
named ``group/field``). What is read, and how it maps to Relion's columns:

* ``blob/path`` (the stack, relative to the cryoSPARC project folder; a leading ``>`` is dropped),
  ``blob/idx`` (0-based slice) -> ``rlnImageName`` ``idx+1@path``; ``blob/shape`` -> the box;
  ``blob/psize_A`` -> the pixel size (one value for the file).
* ``ctf/accel_kv``, ``ctf/cs_mm``, ``ctf/amp_contrast`` -> the optics group(s); ``ctf/df1_A``,
  ``ctf/df2_A``, ``ctf/df_angle_rad``, ``ctf/phase_shift_rad`` (radians -> degrees), ``ctf/scale``,
  ``ctf/bfactor`` -> ``rlnDefocusU/V/Angle``, ``rlnPhaseShift``, ``rlnCtfScalefactor``, ``rlnCtfBfactor``.
* ``alignments3D/pose`` (a rotation vector) -> Relion's angles, with the matrix ``A`` of
  :mod:`cryoposeml.core.rotations` equal to the *transpose* of the rotation the vector describes
  (``Rotation.from_rotvec(pose).as_matrix().T``), as pyem's ``csparc2star`` converts them
  (its ``expmap`` builds that transpose); ``alignments3D/shift`` (pixels) times the alignment pixel
  size -> ``rlnOriginX/YAngst``, same sign (as ``csparc2star`` copies it);
  ``alignments3D/split`` (0/1) -> ``rlnRandomSubset`` (1/2).
* ``uid`` -> ``rlnCpmlCryosparcUid`` (kept, to match particles back).

cryoSPARC keeps CTF and poses of a job's particles in a separate "passthrough" file next to the main
one (``J12_passthrough_particles.cs``); fields missing from the file given are taken from a
``*passthrough*.cs`` beside it whose ``uid`` values are the same particles.

``blob/sign`` -1 marks particles whose contrast cryoSPARC flips when it uses them; Relion's (and
cryoposeml's) images are used as they are, light particles on a dark background. What exactly the
field promises has not been checked against a cryoSPARC installation here, so such a file is refused
with the field named rather than read with a guessed contrast (a map of the wrong contrast gives
meaningless poses); files with ``blob/sign`` +1 or without the field are read.
"""
from __future__ import annotations

import logging

from pathlib import Path

import numpy as np
import pandas as pd

from ..core.errors import InputError
from ..core.rotations import matrix_to_euler

__all__ = ["read_cs", "is_cs_file"]

log = logging.getLogger(__name__)

_REQUIRED = ["blob/path", "blob/idx", "blob/shape", "blob/psize_A"]
_CTF_OPTICS = {"ctf/accel_kv": "rlnVoltage", "ctf/cs_mm": "rlnSphericalAberration",
               "ctf/amp_contrast": "rlnAmplitudeContrast"}


def is_cs_file(path) -> bool:
    return Path(path).suffix.lower() == ".cs"


def _load(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise InputError("not a NumPy-format cryoSPARC .cs file (newer cryoSPARC versions may write a compressed "
                         "format: save it with cryosparc-tools as NumPy, or export a STAR with csparc2star)", path)
    try:
        data = np.load(path, allow_pickle=False)
    except ValueError:   # object (str) fields need pickle: a file we did not write, read as data only
        data = np.load(path, allow_pickle=True)
    except Exception as e:
        raise InputError(f"not a readable .cs file ({e})", path) from e
    if data.dtype.names is None or data.ndim != 1:
        raise InputError("not a cryoSPARC particle table (a 1-D structured array)", path)
    return data


def _text(values) -> np.ndarray:
    return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)


def _with_passthrough(data: np.ndarray, path: Path) -> tuple[dict, list[str]]:
    """The file's fields, completed from a passthrough file beside it (same uids)."""
    fields = {name: data[name] for name in data.dtype.names}
    used = []
    if "uid" not in fields:
        return fields, used
    for other in sorted(path.parent.glob("*passthrough*.cs")):
        if other.resolve() == path.resolve():
            continue
        try:
            extra = _load(other)
        except InputError:
            continue
        if "uid" not in extra.dtype.names:
            continue
        order = {int(u): i for i, u in enumerate(extra["uid"])}
        rows = [order.get(int(u)) for u in fields["uid"]]
        if any(r is None for r in rows):
            continue
        rows = np.array(rows)
        new = [n for n in extra.dtype.names if n not in fields]
        for name in new:
            fields[name] = extra[name][rows]
        if new:
            used.append(str(other))
    return fields, used


def read_cs(path):
    """A cryoSPARC ``.cs`` particle file as a :class:`~cryoposeml.data.star.ParticleStar` (Relion
    3.1 columns; see the module doc for the mapping)."""
    from .star import ParticleStar

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    data = _load(path)
    if len(data) == 0:
        raise InputError("the .cs file has no particles", path)
    fields, passthrough = _with_passthrough(data, path)
    missing = [f for f in _REQUIRED if f not in fields]
    if missing:
        raise InputError(f"no {', '.join(missing)} field(s): not a cryoSPARC particle file with images", path)
    if "blob/sign" in fields and np.any(np.asarray(fields["blob/sign"]) < 0):
        raise InputError("blob/sign is -1 for some particles: cryoSPARC flips their contrast when it uses them, "
                         "cryoposeml reads images as they are (light particles on a dark background, as Relion "
                         "extracts them). Export the particles with their contrast as Relion expects (e.g. "
                         "csparc2star and relion_image_handler --multiply_constant -1 on the stacks) and give the "
                         "STAR file", path)
    shapes = np.asarray(fields["blob/shape"]).reshape(len(data), -1)
    boxes = np.unique(shapes[:, -1])
    psizes = np.unique(np.round(np.asarray(fields["blob/psize_A"], np.float64), 5))
    if len(boxes) != 1 or shapes[:, 0].tolist() != shapes[:, -1].tolist():
        raise InputError(f"particles of several or non-square boxes {np.unique(shapes, axis=0).tolist()}", path)
    if len(psizes) != 1:
        raise InputError(f"particles of several pixel sizes {psizes.tolist()}; rescale first", path)
    box, apix = int(boxes[0]), float(psizes[0])

    stacks = [s[1:] if s.startswith(">") else s for s in _text(fields["blob/path"])]
    idx = np.asarray(fields["blob/idx"], np.int64)
    particles = pd.DataFrame({"rlnImageName": [f"{i + 1:06d}@{s}" for i, s in zip(idx, stacks)]})
    optics_cols = {}
    if all(k in fields for k in _CTF_OPTICS):
        keys = np.stack([np.round(np.asarray(fields[k], np.float64), 5) for k in _CTF_OPTICS], 1)
        groups, group_of = np.unique(keys, axis=0, return_inverse=True)
        particles["rlnOpticsGroup"] = group_of.reshape(-1) + 1
        optics_cols = {name: groups[:, j] for j, name in enumerate(_CTF_OPTICS.values())}
        n_groups = len(groups)
    else:
        particles["rlnOpticsGroup"] = 1
        n_groups = 1
    optics = pd.DataFrame({"rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
                           "rlnOpticsGroup": np.arange(1, n_groups + 1), **optics_cols,
                           "rlnImagePixelSize": apix, "rlnImageSize": box, "rlnImageDimensionality": 2})
    ctf = {"ctf/df1_A": ("rlnDefocusU", 1.0), "ctf/df2_A": ("rlnDefocusV", 1.0),
           "ctf/df_angle_rad": ("rlnDefocusAngle", 180 / np.pi), "ctf/phase_shift_rad": ("rlnPhaseShift", 180 / np.pi),
           "ctf/scale": ("rlnCtfScalefactor", 1.0), "ctf/bfactor": ("rlnCtfBfactor", 1.0)}
    for field, (column, factor) in ctf.items():
        if field in fields:
            particles[column] = np.asarray(fields[field], np.float64) * factor
    if "alignments3D/pose" in fields:
        pose = np.asarray(fields["alignments3D/pose"], np.float64).reshape(len(data), 3)
        from scipy.spatial.transform import Rotation

        A = np.swapaxes(Rotation.from_rotvec(pose).as_matrix(), -1, -2)
        angles = matrix_to_euler(A)
        for j, c in enumerate(("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")):
            particles[c] = angles[:, j]
        if "alignments3D/shift" in fields:
            ali_apix = (np.asarray(fields["alignments3D/psize_A"], np.float64) if "alignments3D/psize_A" in fields
                        else np.full(len(data), apix))
            ali_apix = np.where(ali_apix > 0, ali_apix, apix)
            shift = np.asarray(fields["alignments3D/shift"], np.float64).reshape(len(data), 2)
            particles["rlnOriginXAngst"] = shift[:, 0] * ali_apix
            particles["rlnOriginYAngst"] = shift[:, 1] * ali_apix
    if "alignments3D/split" in fields:
        particles["rlnRandomSubset"] = np.asarray(fields["alignments3D/split"], np.int64) + 1
    if "uid" in fields:
        particles["rlnCpmlCryosparcUid"] = np.asarray(fields["uid"]).astype(np.uint64).astype(str)
    if passthrough:
        log.info("%s: fields completed from %s", path, ", ".join(passthrough))
    star = ParticleStar(particles, optics, path, {})
    if box % 2:
        raise InputError(f"odd box size {box} px: cryoposeml needs an even box (rescale or re-extract)", path)
    return star
