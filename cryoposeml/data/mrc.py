"""MRC maps and .mrcs stacks: checked headers, atomic writes, bounded memory-mapped reading."""
from __future__ import annotations

import collections
import mmap
import threading
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from ..core.errors import InputError
from ._atomic import atomic_path

__all__ = ["read_map", "write_map", "write_stack", "StackInfo", "stack_info", "StackReader", "half_map_paths"]

_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16, 12: np.float16}


@dataclass(frozen=True)
class StackInfo:
    """What the header of an .mrc/.mrcs file says, checked against the file's size."""

    path: Path
    n: int
    ny: int
    nx: int
    dtype: np.dtype
    offset: int
    pixel_size_angstrom: float


def stack_info(path) -> StackInfo:
    """Read and check a header: known mode, and a file long enough for all its images."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with mrcfile.open(path, header_only=True, permissive=True) as m:
            h = m.header
            nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
            mode = int(h.mode)
            offset = 1024 + int(h.nsymbt)
            byte_order = "<" if m.header.mode.dtype.byteorder in "<=|" else ">"
            apix = float(m.voxel_size.x)
    except Exception as e:
        raise InputError(f"not a readable MRC file ({e})", path) from e
    if mode not in _MODES:
        raise InputError(f"unsupported MRC mode {mode} (supported: {sorted(_MODES)})", path)
    if min(nx, ny, nz) <= 0:
        raise InputError(f"bad dimensions {nx} x {ny} x {nz} in the header", path)
    dtype = np.dtype(_MODES[mode]).newbyteorder(byte_order)
    need = offset + nx * ny * nz * dtype.itemsize
    size = path.stat().st_size
    if size < need:
        raise InputError(f"truncated: the header declares {nz} images of {nx} x {ny} ({need} bytes) "
                         f"but the file has {size} bytes", path)
    return StackInfo(path, nz, ny, nx, dtype, offset, apix)


def read_map(path) -> tuple[np.ndarray, float]:
    """A 3D map as float32 ``(z, y, x)`` and its pixel size (Angstrom)."""
    info = stack_info(path)
    if not (info.n == info.ny == info.nx):
        raise InputError(f"expected a cubic map, got {info.nx} x {info.ny} x {info.n}", path)
    data = np.fromfile(info.path, dtype=info.dtype, count=info.n * info.ny * info.nx, offset=info.offset)
    return data.reshape(info.n, info.ny, info.nx).astype(np.float32), info.pixel_size_angstrom


def _write(path, data: np.ndarray, pixel_size_angstrom: float, stack: bool) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(data, dtype=np.float32))
            if stack:
                m.set_image_stack()
            m.voxel_size = pixel_size_angstrom
    return path


def write_map(path, volume: np.ndarray, pixel_size_angstrom: float) -> Path:
    """Write a ``(z, y, x)`` map as float32 MRC, atomically."""
    return _write(path, volume, pixel_size_angstrom, stack=False)


def write_stack(path, images: np.ndarray, pixel_size_angstrom: float) -> Path:
    """Write ``(n, y, x)`` images as a float32 .mrcs stack, atomically."""
    return _write(path, images, pixel_size_angstrom, stack=True)


class _MappedStack:
    """One stack mapped read-only with the standard library's ``mmap`` (its ``madvise`` and ``close``
    are public, unlike numpy.memmap's)."""

    def __init__(self, info: StackInfo):
        self.info = info
        with open(info.path, "rb") as f:
            self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)

    def read(self, slices: np.ndarray) -> np.ndarray:
        i = self.info
        images = np.frombuffer(self.mm, dtype=i.dtype, count=i.n * i.ny * i.nx, offset=i.offset).reshape(i.n, i.ny, i.nx)
        out = np.array(images[slices], dtype=np.float32)
        del images     # no view may outlive the map (close() refuses while one exists)
        # Give the mapped pages back (they stay in the page cache): resident memory stays flat
        # however large the stacks are and however many particles pass through.
        self.mm.madvise(mmap.MADV_DONTNEED)
        return out

    def close(self) -> None:
        self.mm.close()


class StackReader:
    """Reads images from many stacks through memory maps, keeping at most ``max_open`` mapped at
    once (least recently used are closed) and releasing the pages each read touched, so neither
    memory nor open file handles grow with the number of stacks or particles. Thread-safe."""

    def __init__(self, max_open: int = 32):
        self.max_open = max_open
        self._maps: collections.OrderedDict[Path, _MappedStack] = collections.OrderedDict()
        self._infos: dict[Path, StackInfo] = {}
        self._lock = threading.Lock()

    def info(self, path: Path) -> StackInfo:
        if path not in self._infos:
            self._infos[path] = stack_info(path)
        return self._infos[path]

    def _map(self, path: Path) -> _MappedStack:
        mm = self._maps.get(path)
        if mm is not None:
            self._maps.move_to_end(path)
            return mm
        mm = self._maps[path] = _MappedStack(self.info(path))
        while len(self._maps) > self.max_open:
            _, old = self._maps.popitem(last=False)
            old.close()
        return mm

    def read(self, path: Path, slices: np.ndarray) -> np.ndarray:
        """Images ``slices`` (0-based) of one stack, as float32 ``(len(slices), y, x)``."""
        with self._lock:
            info = self.info(path)
            bad = (slices < 0) | (slices >= info.n)
            if bad.any():
                raise InputError(f"image {int(slices[bad][0]) + 1} requested but the stack has {info.n}", path)
            return self._map(path).read(slices)

    def close(self) -> None:
        with self._lock:
            for mm in self._maps.values():
                mm.close()
            self._maps.clear()


def half_map_paths(out: Path) -> tuple[Path, Path, Path]:
    """``MAP.mrc`` -> ``MAP_half1.mrc``, ``MAP_half2.mrc``, ``MAP_fsc.json``."""
    stem = out.with_suffix("")
    return (stem.parent / f"{stem.name}_half1.mrc", stem.parent / f"{stem.name}_half2.mrc",
            stem.parent / f"{stem.name}_fsc.json")
