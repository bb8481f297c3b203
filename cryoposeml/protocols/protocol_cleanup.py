import json

import pyworkflow.protocol.params as params
from pyworkflow import BETA
import pwem.objects as emobj
from pwem.protocols import ProtProcessParticles

from ..convert import fillParticles, writeParticlesStar
from .protocol_base import CryoPoseMLProtBase

METHODS = ["auto", "quantile", "max-error"]


# A dict, not an Enum: two outputs of the same class would be aliases in an Enum.
OUT_KEPT, OUT_DISCARDED, OUT_VOLUME = "outputParticles", "outputDiscarded", "outputVolume"
CLEANUP_OUTPUTS = {OUT_KEPT: emobj.SetOfParticles, OUT_DISCARDED: emobj.SetOfParticles, OUT_VOLUME: emobj.Volume}


class CryoPoseMLProtCleanup(CryoPoseMLProtBase, ProtProcessParticles):
    """Drop the particles whose predicted poses are least certain.

    auto: sweep the fraction kept, reconstruct the two half-maps of each subset and keep the one with
    the best half-map FSC-0.143 resolution (ties keep more particles); quantile: drop a fixed
    fraction of the most uncertain; max-error: drop expected errors above a bound.
    """
    _label = "cleanup by uncertainty"
    _devStatus = BETA
    _possibleOutputs = CLEANUP_OUTPUTS

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      pointerCondition="hasAlignmentProj", label="Predicted particles",
                      help="Output of 'predict poses' (particles with _cryoposemlExpectedError).")
        form.addParam("method", params.EnumParam, choices=METHODS, default=0, label="Method",
                      display=params.EnumParam.DISPLAY_HLIST,
                      help="auto: the map decides. Verified particles that match the map worse than 99% of the "
                           "model's good particles are dropped as junk first (see 'Junk test'). Then the particles "
                           "are ranked (by the match z-score when verified, else by the expected error) and, for "
                           "each fraction kept from 100% down to 'Smallest fraction kept' in 5% steps, the two "
                           "half-maps are reconstructed; the fraction with the best half-map FSC 0.143 resolution "
                           "is kept (resolutions within a quarter of a Fourier shell tie, and ties keep more "
                           "particles). quantile: drop a fixed fraction of the most uncertain. max-error: drop the "
                           "particles whose expected error is above a bound.")
        form.addParam("quantile", params.FloatParam, default=0.25, condition="method == 1",
                      label="Fraction dropped", help="The most uncertain fraction of the particles is dropped.")
        form.addParam("maxError", params.FloatParam, default=15.0, condition="method == 2",
                      label="Largest expected error (deg)",
                      help="Particles whose calibrated expected angular error is above this are dropped.")
        form.addParam("minKeep", params.FloatParam, default=0.5, condition="method == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Smallest fraction kept",
                      help="auto: the sweep stops at this fraction of the particles (after the junk test).")
        form.addParam("junkQuantile", params.FloatParam, default=0.01, condition="method == 0",
                      expertLevel=params.LEVEL_ADVANCED, label="Junk test",
                      help="auto, verified particles: a particle is junk when fewer than this share of the model's "
                           "good calibration particles matched the map worse (_cryoposemlMatchQuantile). It is the "
                           "share of good particles the test loses. 0: no junk test.")
        form.addParam("symmetry", params.StringParam, default="C1", label="Symmetry",
                      help="Point group of the reconstructions (Relion's convention: Cn, Dn, T, O, I); the model's.")

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.cleanupStep)
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("input.star"), self._getExtraPath())

    def cleanupStep(self):
        method = METHODS[self.method.get()]
        args = (f"--particles {self._getExtraPath('input.star')} --out {self._getExtraPath('kept.star')} "
                f"--method {method} --sym {self.symmetry.get()}")
        if method == "quantile":
            args += f" --quantile {self.quantile.get()}"
        elif method == "max-error":
            args += f" --max-error {self.maxError.get()}"
        else:
            args += f" --min-keep {self.minKeep.get()} --junk-quantile {self.junkQuantile.get()}"
        self.runCryoposeml("cleanup", args)

    def createOutputStep(self):
        inp = self.inputParticles.get()
        kept = self._createSetOfParticles()
        fillParticles(kept, inp, self._getExtraPath("kept.star"))
        outputs = {OUT_KEPT: kept}
        import os

        if os.path.exists(self._getExtraPath("kept_discarded.star")):
            gone = self._createSetOfParticles(suffix="discarded")
            fillParticles(gone, inp, self._getExtraPath("kept_discarded.star"))
            outputs[OUT_DISCARDED] = gone
        vol = self._halfMapVolume(self._getExtraPath("kept_map.mrc"), inp.getSamplingRate())
        outputs[OUT_VOLUME] = vol
        self._defineOutputs(**outputs)
        for out in outputs.values():
            self._defineSourceRelation(self.inputParticles, out)

    def summaryJson(self):
        with open(self._getExtraPath("kept_cleanup.json")) as f:
            return json.load(f)

    def _validate(self):
        errors = self._particleErrors(self.inputParticles.get(), needAlignment=True)
        parts = self.inputParticles.get()
        if parts is not None and not parts.getFirstItem().hasAttribute("_cryoposemlExpectedError"):
            errors.append("The particles have no _cryoposemlExpectedError: use the output of 'predict poses'.")
        return errors

    def _warnings(self):
        parts = self.inputParticles.get()
        if parts is not None and self.method.get() == 0 and parts.getSize() < 500:
            return [f"Only {parts.getSize()} particles: the half-map FSC of small subsets is noisy, so the fraction "
                    "chosen by 'auto' may not be stable. Consider 'quantile'."]
        return []

    def _summary(self):
        try:
            s = self.summaryJson()
        except OSError:
            return ["Not finished yet."]
        lines = [f"Kept {s['particles_kept']} of {s['particles_in']} particles ({s['fraction_kept']:.0%}), expected "
                 f"error <= {s['score_threshold']:.2f} deg.",
                 f"Half-map FSC 0.143: {s['resolution_all_fsc0143_angstrom']:.2f} A with all particles, "
                 f"{s['resolution_kept_fsc0143_angstrom']:.2f} A with those kept."]
        junk = s.get("junk_test")
        if junk:
            lines.insert(1, f"{junk['particles']} failed the junk test first (match-score quantile < {junk['below']:g}).")
        return lines

    def _methods(self):
        return ["Particles were cleaned up by the uncertainty of their predicted poses with cryoposeml "
                f"(method {METHODS[self.method.get()]})."]

    def _citations(self):
        return ["Fang2025"]
