import enum
import os

import pyworkflow.protocol.params as params
from pyworkflow import BETA
import pwem.objects as emobj
from pwem.protocols import ProtClassify3D

from ..convert import fillParticles
from .protocol_base import CryoPoseMLProtBase, MapLearningSteps

ENCODERS = ["cnn", "equivariant"]


class HeteroOutputs(enum.Enum):
    outputParticles = emobj.SetOfParticles
    outputClasses = emobj.SetOfClasses3D
    outputVolumes = emobj.SetOfVolumes


class CryoPoseMLProtHetero(MapLearningSteps, CryoPoseMLProtBase, ProtClassify3D):
    """Poses and conformations together (HetACUMN): per-particle conformation z, classes, a volume each.

    A VAE: a pose encoder and a conformation encoder read each particle; the decoder is a mean map
    plus one basis map per latent dimension, V(z) = V0 + sum_k z_k V_k. Poses are found by a global
    search (the conformation frozen at first, then against each particle's own map V(z)) or taken
    from the input (a consensus refinement) and refined locally; each particle's z is its posterior
    at its pose, which the conformation encoder learns to predict (amortized). Task 2 (conditional
    pose prediction) renders random poses at the particles' z, adds noise at the data's level and
    makes the encoders recover them, which keeps pose and conformation apart. After training: PCA
    of z, k-means classes, a map reconstructed from each class's particles (with half-maps).
    """
    _label = "heterogeneity (HetACUMN)"
    _command = "hetero"
    _devStatus = BETA
    _possibleOutputs = HeteroOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Particles", help="Particles with CTF.")
        form.addParam("usePoses", params.BooleanParam, default=True, label="Start from the input poses?",
                      help="Yes (recommended): the particles' alignment (e.g. a consensus refinement) is the "
                           "starting pose, refined locally against each particle's conformation. No: poses are "
                           "searched from nothing (any input alignment is ignored); on mixtures one conformation "
                           "tends to take over that search (see the README's benchmark).")
        form.addParam("classes", params.IntParam, default=2, label="Classes",
                      help="k-means classes of the conformations, one volume each.")
        form.addParam("zdim", params.IntParam, default=4, label="Latent dimension",
                      help="Dimension of the conformation z (and number of basis maps).")
        form.addSection(label="Training")
        form.addParam("epochs", params.IntParam, default=24, label="Epochs",
                      help="Passes over the particles, the first phase included.")
        form.addParam("searchEpochs", params.IntParam, default=-1, label="First-phase epochs",
                      help="Without input poses: epochs of global pose search with the conformation frozen (-1: a "
                           "third of the epochs). With input poses: epochs learning the consensus map at them "
                           "(-1: 2).")
        form.addParam("task2", params.BooleanParam, default=True, label="Conditional pose prediction (task 2)?",
                      help="HetACUMN's auxiliary task, which keeps pose and conformation apart.")
        form.addParam("boxPx", params.IntParam, default=32, label="Working box (px)",
                      help="Particles are Fourier-rescaled to this box (same field of view).")
        form.addParam("encoder", params.EnumParam, choices=ENCODERS, default=0, label="Pose encoder",
                      expertLevel=params.LEVEL_ADVANCED, display=params.EnumParam.DISPLAY_COMBO,
                      help="The network that predicts each particle's pose: equivariant (D4-steerable, escnn) or "
                           "cnn (a Gaussian pyramid into a VGG CNN).")
        form.addParam("batchSize", params.IntParam, default=32, expertLevel=params.LEVEL_ADVANCED, label="Batch size",
                      help="Particles per optimisation step.")
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Another seed gives another start; compare two runs before trusting the classes.")
        self._defineRunParams(form, "hetero")

    # -------------------------- steps --------------------------------------
    def _insertAllSteps(self):
        self._insertMapLearningSteps(self.heteroStep)

    def heteroStep(self):
        self._runMapLearning(f"--poses {'input' if self.usePoses else 'search'} --classes {self.classes.get()} "
                             f"--zdim {self.zdim.get()} --epochs {self.epochs.get()} --box-px {self.boxPx.get()} "
                             f"--encoder {ENCODERS[self.encoder.get()]} --batch-size {self.batchSize.get()} "
                             f"--seed {self.seed.get()}" + ("" if self.task2 else " --no-task2"))

    def _classMap(self, k):
        return self._outDir(f"class_{k:03d}.mrc")

    def createOutputStep(self):
        inp = self.inputParticles.get()
        apix = inp.getSamplingRate()
        parts = self._createSetOfParticles()
        fillParticles(parts, inp, self._outDir("particles.star"))    # poses, _cryoposemlZ and the class id

        volumes = self._createSetOfVolumes()
        volumes.setSamplingRate(apix)
        for entry in self.summaryJson()["classes"]:
            k = entry["class"]
            if os.path.exists(self._classMap(k)):
                vol = self._halfMapVolume(self._classMap(k), apix)
                vol.setObjId(k)
                volumes.append(vol)

        def representative(cls):
            path = self._classMap(cls.getObjId())
            cls.getRepresentative().setLocation(path if os.path.exists(path) else None)
            cls.getRepresentative().setSamplingRate(apix)

        classes = self._createSetOfClasses3D(parts)
        classes.classifyItems(updateItemCallback=lambda item, row: None, updateClassCallback=representative,
                              doClone=True)
        self._defineOutputs(**{HeteroOutputs.outputParticles.name: parts, HeteroOutputs.outputClasses.name: classes,
                               HeteroOutputs.outputVolumes.name: volumes})
        for out in (parts, classes, volumes):
            self._defineSourceRelation(self.inputParticles, out)

    # -------------------------- infos --------------------------------------
    def _validate(self):
        errors = self._particleErrors(self.inputParticles.get(), needAlignment=bool(self.usePoses))
        if self.boxPx.get() % 2 or self.boxPx.get() < 16:
            errors.append("The working box must be even and at least 16 px.")
        if self.classes.get() < 1 or self.zdim.get() < 1:
            errors.append("Classes and latent dimension must be at least 1.")
        parts = self.inputParticles.get()
        if parts is not None and parts.getSize() < max(2 * self.batchSize.get(), 4 * self.classes.get()):
            errors.append(f"{parts.getSize()} particles are too few for batches of {self.batchSize.get()} and "
                          f"{self.classes.get()} classes.")
        return errors

    def _summary(self):
        try:
            s = self.summaryJson()
        except OSError:
            return ["Not finished yet."]
        p = s["parameters"]
        lines = [f"{s['particles']} particles, latent dimension {p['zdim']}, {p['epochs']} epochs, poses "
                 f"{'refined from the input' if p['poses'] == 'input' else 'searched from nothing'}.",
                 f"Entanglement of z with the pose: {s['entanglement']:.2f} (0: none, 1: z is a function of the pose)."]
        for c in s["classes"]:
            res = c.get("half_map_fsc_0143_angstrom")
            lines.append(f"Class {c['class']}: {c['particles']} particles"
                         + (f", half-map FSC 0.143 {res:.1f} A" if res else "") + ".")
        return lines

    def _methods(self):
        return [f"Conformations and poses were estimated with cryoposeml's amortized heterogeneous reconstruction "
                f"(HetACUMN; latent dimension {self.zdim.get()}, {self.classes.get()} classes, {self.epochs.get()} "
                f"epochs)."]

    def _citations(self):
        return ["Hetacumn2023"]
