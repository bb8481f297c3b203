import enum

import pyworkflow.protocol.params as params
from pyworkflow import BETA
import pwem.objects as emobj
from pwem.protocols import ProtInitialVolume

from ..convert import fillParticles
from .protocol_base import CryoPoseMLProtBase, MapLearningSteps

ENCODERS = ["equivariant", "cnn"]
DECODERS = ["voxel", "fouriernet"]
LOSSES = ["l2", "symmetric", "mirror"]


class AbinitioOutputs(enum.Enum):
    outputVolume = emobj.Volume
    outputParticles = emobj.SetOfParticles


class CryoPoseMLProtAbinitio(MapLearningSteps, CryoPoseMLProtBase, ProtInitialVolume):
    """A map and the particles' poses from scratch (no poses, no reference).

    An encoder (the D4-equivariant escnn network, or a CNN) maps each image to a pose and a shift;
    a decoder holds the volume and renders the central slice at that pose, times the particle's
    CTF. The first epochs search each particle's pose over a HEALPix grid against the current map
    (annealed posterior sampling, with frequency marching) while the encoder learns to predict the
    search's poses; then the encoder and the map are refined together, as in cryoAI. With half-sets,
    each half is reconstructed independently (gold standard).
    """
    _label = "ab initio (amortized)"
    _command = "abinitio"
    _devStatus = BETA
    _possibleOutputs = AbinitioOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Particles", help="Particles with CTF; poses, if any, are ignored.")
        form.addParam("encoder", params.EnumParam, choices=ENCODERS, default=0, label="Encoder",
                      display=params.EnumParam.DISPLAY_COMBO,
                      help="equivariant: D4-equivariant escnn network (the pose turns with the image); "
                           "cnn: a Gaussian pyramid into a VGG CNN.")
        form.addParam("loss", params.EnumParam, choices=LOSSES, default=0, label="Loss",
                      display=params.EnumParam.DISPLAY_COMBO,
                      help="l2; symmetric: also the image turned by 180 deg, the smaller loss counts (use it with "
                           "the cnn encoder); mirror: also its mirrors.")
        form.addParam("halfSets", params.BooleanParam, default=True, label="Gold-standard half-sets?",
                      help="One independent run per half-set, for an honest half-map FSC.")
        form.addSection(label="Training")
        form.addParam("epochs", params.IntParam, default=20, label="Epochs",
                      help="Passes over the particles, the pose-search epochs included.")
        form.addParam("searchEpochs", params.IntParam, default=-1, label="Pose-search epochs",
                      help="Epochs of global pose search at the start; -1: half of the epochs; 0: amortized "
                           "from the start (cryoAI as published; converges far less often). The search goes on "
                           "past them while over 10% of the particles' best poses still move in an epoch "
                           "(leaving 4 epochs to refine).")
        form.addParam("boxPx", params.IntParam, default=32, label="Working box (px)",
                      help="Particles are Fourier-rescaled to this box (same field of view); ab initio needs "
                           "only low resolution.")
        form.addParam("decoder", params.EnumParam, choices=DECODERS, default=0, label="Decoder",
                      expertLevel=params.LEVEL_ADVANCED, display=params.EnumParam.DISPLAY_COMBO,
                      help="voxel: an explicit volume (cryoPoseNet); fouriernet: an implicit SIREN volume (cryoAI).")
        form.addParam("batchSize", params.IntParam, default=64, expertLevel=params.LEVEL_ADVANCED, label="Batch size",
                      help="Particles per optimisation step.")
        form.addParam("seed", params.IntParam, default=0, expertLevel=params.LEVEL_ADVANCED, label="Random seed",
                      help="Ab initio can converge to different maps from different starts: run two seeds and "
                           "compare them to trust the result.")
        self._defineRunParams(form, "abinitio")

    # -------------------------- steps --------------------------------------
    def _insertAllSteps(self):
        self._insertMapLearningSteps(self.abinitioStep)

    def abinitioStep(self):
        self._runMapLearning(f"--encoder {ENCODERS[self.encoder.get()]} --decoder {DECODERS[self.decoder.get()]} "
                             f"--loss {LOSSES[self.loss.get()]} --epochs {self.epochs.get()} --box-px {self.boxPx.get()} "
                             f"--batch-size {self.batchSize.get()} --seed {self.seed.get()}"
                             + (" --halves" if self.halfSets else ""))

    def createOutputStep(self):
        inp = self.inputParticles.get()
        vol = self._halfMapVolume(self._outDir("map.mrc"), inp.getSamplingRate())
        parts = self._createSetOfParticles()
        fillParticles(parts, inp, self._outDir("poses.star"))
        self._defineOutputs(**{AbinitioOutputs.outputVolume.name: vol, AbinitioOutputs.outputParticles.name: parts})
        self._defineSourceRelation(self.inputParticles, vol)
        self._defineSourceRelation(self.inputParticles, parts)

    # -------------------------- infos --------------------------------------
    def _validate(self):
        errors = self._particleErrors(self.inputParticles.get())
        if self.boxPx.get() % 2 or self.boxPx.get() < 16:
            errors.append("The working box must be even and at least 16 px.")
        if self.searchEpochs.get() > self.epochs.get():
            errors.append("The pose-search epochs cannot exceed the epochs.")
        parts = self.inputParticles.get()
        if self.halfSets and parts is not None and parts.getSize() < 4 * self.batchSize.get():
            errors.append(f"{parts.getSize()} particles are too few for two half-sets of at least two batches.")
        return errors

    def _warnings(self):
        warns = []
        if self.searchEpochs.get() == 0:
            warns.append("Amortized from the start (no pose search): on small sets this rarely converges "
                         "(see the README's ab initio benchmark).")
        if not self.usesGpu():
            warns.append("On the CPU, keep the working box small (32 px): the pose search renders thousands "
                         "of projections per batch.")
        return warns

    def _summary(self):
        try:
            s = self.summaryJson()
        except OSError:
            return ["Not finished yet."]
        p = s["parameters"]
        lines = [f"{s['particles']} particles, encoder {p['encoder']}, loss {p['loss']}, {p['epochs']} epochs "
                 f"({p['box_px']} px working box)."]
        if s.get("half_maps_independent"):
            lines.append(f"Gold-standard half-map FSC 0.143: {s['half_map_fsc_0143_angstrom']:.1f} A "
                         f"(median {s['half_alignment']['median_deg_between_halves']:.1f} deg between the "
                         "two halves' poses).")
        else:
            lines.append(f"Half-map FSC 0.143 (halves not independent): {s['half_map_fsc_0143_angstrom']:.1f} A.")
        return lines

    def _methods(self):
        return [f"An initial map and poses were obtained with cryoposeml's amortized ab initio reconstruction "
                f"({ENCODERS[self.encoder.get()]} encoder, {self.epochs.get()} epochs)."]

    def _citations(self):
        return ["Nashed2021"] + (["Equivariant2025"] if self.encoder.get() == 0 else [])
