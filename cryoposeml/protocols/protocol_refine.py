import enum
import json
import os
import shlex
import shutil

import pyworkflow.protocol.params as params
from pyworkflow import BETA
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU
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
    relion_refine_mpi --auto_refine with local searches from the first iteration, through
    Scipion's runJob: the MPI command of hosts.conf and its queue apply. Relion is taken from
    scipion-em-relion's RELION_HOME when that plugin is installed and has it, else from the PATH.
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
        form.addHidden(USE_GPU, params.BooleanParam, default=False, label="Use GPU for Relion?",
                       help="Pass --gpu to relion_refine_mpi (a Relion built with CUDA). The reconstruction "
                            "and the choices before Relion run on the CPU.")
        form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU IDs",
                       help="GPUs for Relion, as Relion's --gpu takes them (e.g. 0:1); Scipion fills them in "
                            "when it allocates GPUs.")
        form.addParam("relionResources", params.LabelParam, important=True,
                      label="Relion runs with the MPIs and Threads above (and the GPU, if set)",
                      help="relion_refine_mpi gets this protocol's MPI processes (at least 3: a leader and one per "
                           "half-set) and threads per process, launched by hosts.conf's MPI command; with 'Use a "
                           "queue engine', on the queue's node. The steps before and after Relion (the starting "
                           "map, the search width, reading Relion's results) are single-process.")
        form.addParallelSection(threads=1, mpi=3)

    def _insertAllSteps(self):
        self._insertFunctionStep(self.convertInputStep)
        self._insertFunctionStep(self.prepareStep)
        self._insertFunctionStep(self.relionStep)
        self._insertFunctionStep(self.finishStep)
        self._insertFunctionStep(self.createOutputStep)

    def convertInputStep(self):
        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("input.star"), self._getExtraPath())
        ref = self.referenceVolume.get()
        if ref is not None:
            shutil.copyfile(ref.getFileName(), self._getExtraPath("reference_given.mrc"))

    def prepareStep(self):
        """Particles with priors, starting map and search: ``extra/refine/relion_job.json``."""
        out = self._getExtraPath("refine")
        if os.path.exists(out):   # a restarted run prepares again from the start
            shutil.rmtree(out)
        args = (f"--particles {self._getExtraPath('input.star')} --out {out} --sym {self.symmetry.get()} "
                f"--mpi {self.numberOfMpi.get()} --threads {self.numberOfThreads.get()} --prepare-only")
        if self.referenceVolume.get() is not None:
            args += f" --reference {self._getExtraPath('reference_given.mrc')}"
        if self.sigmaAng.get() > 0:
            args += f" --sigma-ang {self.sigmaAng.get()}"
        if not self.usePriors:
            args += " --no-priors"
        if self.extraParams.get():
            args += f" --relion-args {shlex.quote(self.extraParams.get())}"
        self.runCryoposeml("refine", args)

    def relionStep(self):
        """relion_refine_mpi with this protocol's MPI ranks and threads, through runJob (hosts.conf's
        MPI command; the queue when the protocol is sent to one)."""
        with open(self._getExtraPath("refine", "relion_job.json")) as f:
            job = json.load(f)
        args = shlex.join(job["args"])
        if self.usesGpu():
            args += ' --gpu "%(GPU)s"'
        # runJob resolves the program on this environment's PATH for its MPI command
        self.runJob(job["program"], args, cwd=job["cwd"], env=self._relionEnviron(),
                    numberOfMpi=self.numberOfMpi.get(), numberOfThreads=self.numberOfThreads.get())

    def finishStep(self):
        self.runCryoposeml("refine", f"--out {self._getExtraPath('refine')} --finish")

    # -------------------------- Relion ---------------------------------------
    def _relionEnviron(self):
        """scipion-em-relion's environment when that plugin is installed (its RELION_HOME/bin first on
        the PATH), else this one."""
        import pyworkflow.utils as pwutils

        try:
            from relion import Plugin as RelionPlugin
            env = RelionPlugin.getEnviron()
        except Exception:   # not installed, or its variables cannot be read
            env = pwutils.Environ(os.environ)
        if hasattr(os, "geteuid") and os.geteuid() == 0:   # Open MPI refuses root unless told
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
            env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        if not self.useQueue():   # a workstation: more ranks than cores is slow, not wrong
            env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
        return env

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
        path = self._relionEnviron().get("PATH")
        if shutil.which("relion_refine_mpi", path=path) is None:
            errors.append("relion_refine_mpi not found: install scipion-em-relion with Relion (RELION_HOME), or put "
                          "Relion 3.1+ with MPI on the PATH.")
        if self.numberOfMpi.get() < 3:
            errors.append("Relion's auto-refinement needs at least 3 MPI processes (1 leader + 2 half-sets).")
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
