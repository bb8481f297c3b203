import enum
import json
import shutil

import pyworkflow.protocol.params as params
from pyworkflow import BETA
import pwem.objects as emobj
from pwem.protocols import ProtRefine3D

from ..convert import fillParticles, writeParticlesStar
from .protocol_base import CryoPoseMLProtBase


class RefineOutputs(enum.Enum):
    outputParticles = emobj.SetOfParticles
    outputVolume = emobj.Volume


class CryoPoseMLProtLocalRefine(CryoPoseMLProtBase, ProtRefine3D):
    """Relion local auto-refinement started from the predicted poses.

    Writes Relion's prior columns from the predicted poses, reconstructs and low-passes a starting
    map, chooses --sigma_ang and the HEALPix order from the predicted errors, and runs
    relion_refine_mpi --auto_refine with local searches from the first iteration.
    """
    _label = "local refine (Relion)"
    _devStatus = BETA
    _possibleOutputs = RefineOutputs

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      pointerCondition="hasAlignmentProj", label="Predicted particles",
                      help="Output of 'predict poses' or 'cleanup by uncertainty'.")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume", allowsNull=True,
                      label="Starting map (optional)",
                      help="Default: reconstructed from the predicted poses and low-passed.")
        form.addParam("symmetry", params.StringParam, default="C1", label="Symmetry",
                      help="Point group for Relion (--sym): Cn, Dn, T, O, I.")
        form.addParam("sigmaAng", params.FloatParam, default=-1, label="Prior width (deg)",
                      help="Relion's --sigma_ang; -1: chosen from the predicted expected errors.")
        form.addParam("usePriors", params.BooleanParam, default=True, label="Centre searches on the predictions?",
                      help="Yes: write Relion's prior columns (searches stay around the predicted poses). "
                           "No: the predicted poses are only the starting point.")
        form.addParam("extraParams", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Additional Relion arguments",
                      help="Passed to relion_refine_mpi as they are (e.g. --maxsig 500).")
        form.addParallelSection(threads=1, mpi=3)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.refineStep)
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("input.star"), self._getExtraPath())
        ref = self.referenceVolume.get()
        if ref is not None:
            shutil.copyfile(ref.getFileName(), self._getExtraPath("reference_given.mrc"))

    def refineStep(self):
        args = (f"--particles {self._getExtraPath('input.star')} --out {self._getExtraPath('refine')} "
                f"--sym {self.symmetry.get()} --mpi {max(3, self.numberOfMpi.get())} --threads {self.numberOfThreads.get()}")
        if self.referenceVolume.get() is not None:
            args += f" --reference {self._getExtraPath('reference_given.mrc')}"
        if self.sigmaAng.get() > 0:
            args += f" --sigma-ang {self.sigmaAng.get()}"
        if not self.usePriors:
            args += " --no-priors"
        if self.extraParams.get():
            args += f" --relion-args '{self.extraParams.get()}'"
        # relion_refine_mpi runs under its own mpirun: this job itself is one process.
        self.runJob(self._program(), f"{args} --quiet", numberOfMpi=1, numberOfThreads=1, env=self._environ())

    def _program(self):
        from .. import Plugin

        return Plugin.getProgram("refine")

    def summaryJson(self):
        with open(self._getExtraPath("refine", "refine.json")) as f:
            return json.load(f)

    def createOutputStep(self):
        inp = self.inputParticles.get()
        parts = self._createSetOfParticles()
        fillParticles(parts, inp, self._getExtraPath("refine", "refined.star"))
        vol = self._halfMapVolume(self._getExtraPath("refine", "map.mrc"), inp.getSamplingRate())
        self._defineOutputs(**{RefineOutputs.outputParticles.name: parts, RefineOutputs.outputVolume.name: vol})
        self._defineSourceRelation(self.inputParticles, parts)
        self._defineSourceRelation(self.inputParticles, vol)

    def _validate(self):
        errors = self._particleErrors(self.inputParticles.get(), needAlignment=True)
        if shutil.which("relion_refine_mpi") is None or shutil.which("mpirun") is None:
            errors.append("relion_refine_mpi and mpirun must be on the PATH (Relion 3.1+ with MPI).")
        ref, parts = self.referenceVolume.get(), self.inputParticles.get()
        if ref is not None and parts is not None and ref.getXDim() != parts.getXDim():
            errors.append(f"The starting map is {ref.getXDim()} px, the particles {parts.getXDim()} px.")
        return errors

    def _warnings(self):
        warnings = []
        parts = self.inputParticles.get()
        if (parts is not None and self.sigmaAng.get() <= 0
                and not parts.getFirstItem().hasAttribute("_cryoposemlExpectedError")):
            warnings.append("The particles have no predicted expected error (_cryoposemlExpectedError): the prior "
                            "width falls back to 30 deg, a wide and slow search. Set 'Prior width' if you know better.")
        if parts is not None and parts.getSize() < 1000:
            warnings.append(f"Only {parts.getSize()} particles: Relion's resolution estimate and its convergence "
                            "from a low-passed reference are fragile with so few.")
        return warnings

    def _summary(self):
        try:
            s = self.summaryJson()
        except OSError:
            return ["Not finished yet."]
        return [f"Relion local refinement of {s['particles']} particles: sigma_ang {s['search']['sigma_ang_deg']:.2f} "
                f"deg, HEALPix order {s['search']['healpix_order']}, {s['relion_seconds'] / 60:.1f} min.",
                f"Resolution {s['relion_resolution_angstrom']:.2f} A (Relion); half-map FSC 0.143 "
                f"{s['half_map_fsc0143_angstrom']:.2f} A."]

    def _methods(self):
        return ["Poses predicted by cryoposeml were refined with a Relion 3D auto-refinement using local "
                "searches centred on the predictions."]

    def _citations(self):
        return ["Cesped2024"]
