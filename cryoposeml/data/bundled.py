"""Maps shipped with the package (see resources/maps/README.md for how they were made)."""
from __future__ import annotations

from pathlib import Path

from ..core.errors import InputError

__all__ = ["MAPS_DIR", "bundled_maps", "resolve_map"]

MAPS_DIR = Path(__file__).resolve().parent.parent / "resources" / "maps"


def bundled_maps() -> list[str]:
    """Names of the bundled maps (``adk_open``, ``adk_closed``, ``other_ptp1b``, ``d2_test``)."""
    return sorted(p.stem for p in MAPS_DIR.glob("*.mrc"))


def resolve_map(name_or_path) -> Path:
    """A path to a map file, or the bundled map of that name."""
    p = Path(name_or_path)
    if p.exists():
        return p
    if (MAPS_DIR / f"{name_or_path}.mrc").exists():
        return MAPS_DIR / f"{name_or_path}.mrc"
    raise InputError(f"no such map file, and not a bundled map ({', '.join(bundled_maps())})", p)
