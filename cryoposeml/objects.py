"""Scipion objects of cryoposeml: a trained pose network (a model folder written by ``cryoposeml train``)."""
import json
import os

import pyworkflow.object as pwobj
from pwem.objects import EMObject


class CryoPoseMLModel(EMObject):
    """A trained model folder, with what it was trained for (box, pixel size, symmetry, family)."""

    def __init__(self, path=None, **kwargs):
        EMObject.__init__(self, **kwargs)
        self._path = pwobj.String(path)
        self._family = pwobj.String()
        self._symmetry = pwobj.String()
        self._box = pwobj.Integer()
        self._samplingRate = pwobj.Float()
        self._validationMedianError = pwobj.Float()

    def getPath(self) -> str:
        return self._path.get()

    def setPath(self, path: str) -> None:
        self._path.set(path)

    def getFamily(self) -> str:
        return self._family.get()

    def getSymmetry(self) -> str:
        return self._symmetry.get()

    def getBox(self) -> int:
        return self._box.get()

    def getSamplingRate(self) -> float:
        return self._samplingRate.get()

    def loadMetadata(self) -> dict:
        """Fill the attributes from ``model.json`` (what ``cryoposeml train`` wrote) and return it."""
        meta = readModelMetadata(self.getPath())
        self._family.set(meta["network"]["family"])
        self._symmetry.set(meta["sym"])
        self._box.set(meta["input"]["box"])
        self._samplingRate.set(meta["input"]["pixel_size_angstrom"])
        run = meta["runs"].get("full") or meta["runs"].get("half1") or {}
        if "validation" in run:
            self._validationMedianError.set(run["validation"]["median_deg"])
        return meta

    def __str__(self):
        return (f"{self.getClassName()} ({self.getFamily()}, {self.getSymmetry()}, {self.getBox()} px at "
                f"{self.getSamplingRate():.3f} A/px)")


def readModelMetadata(path) -> dict:
    meta = os.path.join(str(path), "model.json")
    if not os.path.exists(meta):
        raise FileNotFoundError(f"{path}: not a cryoposeml model folder (no model.json)")
    with open(meta) as f:
        return json.load(f)
