import enum

import pyworkflow.protocol.params as params
from pyworkflow import BETA
from pwem.protocols import ProtRefine3D

from ..convert import writeParticlesStar
from ..families import FAMILIES as _REGISTRY
from ..objects import CryoPoseMLModel
from .protocol_base import CryoPoseMLProtBase

#: the choices of the form, in the registry's order (a saved project keeps its index)
FAMILIES = list(_REGISTRY)


class TrainOutputs(enum.Enum):
    outputModel = CryoPoseMLModel


class CryoPoseMLProtTrain(CryoPoseMLProtBase, ProtRefine3D):
    """Train a pose network on particles whose poses a refinement already found.

    The network learns image -> pose (and in-plane shift) and a calibrated uncertainty, so that
    **predict** can give new particles of the same protein a pose in milliseconds. With half-sets,
    one network is trained per rlnRandomSubset and each predicts the other half (gold standard).
    """
    _label = "train pose network"
    _devStatus = BETA
    _possibleOutputs = TrainOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles",
                      pointerCondition="hasAlignmentProj", label="Aligned particles", important=True,
                      help="Particles with 3D poses (e.g. from a Relion 3D auto-refine) and CTF.")
        form.addParam("modelFamily", params.EnumParam, choices=FAMILIES, default=0, label="Model family",
                      display=params.EnumParam.DISPLAY_COMBO,
                      help="\n".join(f"{f.name}: {f.summary}." for f in _REGISTRY.values()))
        form.addParam("symmetry", params.StringParam, default="C1", label="Symmetry",
                      help="Point group in Relion's convention: Cn, Dn, T, O, I.")
        form.addParam("halfSets", params.BooleanParam, default=False, label="Gold-standard half-sets?",
                      help="Train one network per half-set (rlnRandomSubset). New half-k particles are then "
                           "proposed by network k and matched against half-map k, so the half-sets stay "
                           "independent (gold standard).")
        form.addSection(label="Training")
        form.addParam("epochs", params.IntParam, default=30, label="Epochs",
                      help="Most passes over the training particles; training stops earlier when the held-out "
                           "error stops improving.")
        form.addParam("boxPx", params.IntParam, default=64, label="Network box (px)",
                      help="Particles are Fourier-rescaled to this box (same field of view).")
        form.addParam("batchSize", params.IntParam, default=64, expertLevel=params.LEVEL_ADVANCED, label="Batch size",
                      help="Particles per optimisation step (on a GPU out of memory, steps are split automatically).")
        self._defineRunParams(form, "train")

    # -------------------------- steps --------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(self.trainStep)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _modelDir(self):
        return self._getExtraPath("model")

    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("input_particles.star"), self._getExtraPath())

    def trainStep(self):
        args = (f"--particles {self._getExtraPath('input_particles.star')} --out {self._modelDir()} "
                f"--model {FAMILIES[self.modelFamily.get()]} --sym {self.symmetry.get()} --epochs {self.epochs.get()} "
                f"--box-px {self.boxPx.get()} --batch-size {self.batchSize.get()}")
        if self.halfSets:
            args += " --halfsets"
        args += self._resumeArgs(self.continueRun.get(), "model")
        self.runCryoposeml("train", f"{args} {self.extraParams.get() or ''}")

    def createOutputStep(self):
        model = CryoPoseMLModel(path=self._modelDir())
        model.loadMetadata()
        self._defineOutputs(**{TrainOutputs.outputModel.name: model})
        self._defineSourceRelation(self.inputParticles, model)

    # -------------------------- infos --------------------------------------
    def _validate(self):
        errors = self._particleErrors(self.inputParticles.get(), needAlignment=True)
        from ..core.symmetry import symmetry_group

        try:
            symmetry_group(self.symmetry.get())
        except Exception as e:
            errors.append(str(e))
        if self.boxPx.get() % 2 or self.boxPx.get() < 16:
            errors.append("The network box must be even and at least 16 px.")
        return errors

    def _warnings(self):
        warns = []
        parts = self.inputParticles.get()
        if parts is not None and parts.getSize() < 2000:
            warns.append(f"Only {parts.getSize()} particles: a pose network usually needs 10,000 or more.")
        if not self.usesGpu():
            warns.append("Training on the CPU is slow (minutes per epoch for a few thousand particles).")
        return warns

    def _summary(self):
        if not hasattr(self, TrainOutputs.outputModel.name):
            return ["Training not finished yet."]
        m = getattr(self, TrainOutputs.outputModel.name)
        s = [f"Model: {m.getFamily()}, symmetry {m.getSymmetry()}, {m.getBox()} px at {m.getSamplingRate():.3f} A/px."]
        if m._validationMedianError.get() is not None:
            s.append(f"Validation median angular error: {m._validationMedianError.get():.2f} deg.")
        return s

    def _methods(self):
        return [f"A {FAMILIES[self.modelFamily.get()]} pose network was trained with cryoposeml on "
                f"{self.inputParticles.get().getSize()} aligned particles (symmetry {self.symmetry.get()}, "
                f"{self.epochs.get()} epochs, {self.boxPx.get()} px network box)."]

    def _citations(self):
        return list(_REGISTRY[FAMILIES[self.modelFamily.get()]].citations)
