"""What every benchmark writes: ``<out>/<name>.json`` with the machine, the arguments and the rows."""
from __future__ import annotations

import json
import platform
from pathlib import Path


def write_results(out, name: str, args, rows: list[dict]) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps({"machine": platform.platform(), "args": vars(args), "rows": rows}, indent=2, default=str))
    return path
