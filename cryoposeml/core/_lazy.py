"""Heavy modules imported on first use, so that the Scipion side of the plugin (which reads and
writes STAR files, converts poses and validates forms in Scipion's own environment, where torch
need not be installed) can use the numpy paths of the core without torch."""
from __future__ import annotations

import importlib
import sys


class LazyModule:
    """Stands for ``import NAME`` at module level: the first attribute access imports the module
    and puts it in place of this object in the owner's globals (no cost afterwards)."""

    def __init__(self, name: str, owner: str, alias: str | None = None):
        self._name, self._owner, self._alias = name, owner, alias or name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        try:
            module = importlib.import_module(self._name)
        except ImportError as e:
            raise ImportError(f"{self._name} is needed here but not installed: this is engine work; install the "
                              f"engine (pip install 'scipion-em-cryoposeml[engine]') or run it through the "
                              f"cryoposeml command of the engine environment") from e
        vars(sys.modules[self._owner])[self._alias] = module
        return getattr(module, attr)


def is_tensor(x) -> bool:
    """``isinstance(x, torch.Tensor)`` without importing torch (nothing can be a tensor before it is)."""
    torch = sys.modules.get("torch")
    return torch is not None and not isinstance(torch, LazyModule) and isinstance(x, torch.Tensor)
