"""What every cryoposeml protocol shares: GPU selection with a CPU fallback, running
``cryoposeml <command>`` with runJob, and checks on the input particles."""
import os

import pyworkflow.protocol.params as params
from pyworkflow.protocol.constants import GPU_LIST, USE_GPU
from pwem.protocols import EMProtocol

from .. import Plugin


class CryoPoseMLProtBase(EMProtocol):
    """Base class: not shown in the GUI."""
    _label = None

    # -------------------------- params -------------------------------------
    def _defineGpuParams(self, form, default=True):
        form.addHidden(USE_GPU, params.BooleanParam, default=default, label="Use GPU?",
                       help="Run on a GPU (CUDA). If No, the CPU is used (much slower for training).")
        form.addHidden(GPU_LIST, params.StringParam, default="0", label="GPU ID",
                       help="The GPU to use (one id; cryoposeml uses one GPU per run).")

    def _defineRunParams(self, form, command: str):
        """The last parameters of a training protocol: continue a previous run of this protocol,
        extra arguments for ``cryoposeml <command>``, the GPU, the threads."""
        form.addParam("continueRun", params.PointerParam, pointerClass=self.getClassName(), allowsNull=True,
                      expertLevel=params.LEVEL_ADVANCED, label="Continue a previous run",
                      help="Resume this earlier (interrupted) run: its output folder is copied and the run "
                           "continues from its last checkpoint.")
        form.addParam("extraParams", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Additional arguments", help=f"Passed to `cryoposeml {command}` as they are.")
        self._defineGpuParams(form)
        form.addParallelSection(threads=1, mpi=0)

    # -------------------------- running -------------------------------------
    def _device(self) -> str:
        return "cuda" if self.usesGpu() else "cpu"

    def _commandLine(self, command: str, args: str) -> tuple:
        """``(program, arguments)`` of ``cryoposeml <command> <args>`` with this protocol's device (the
        GPU as runJob's ``%(GPU)s`` placeholder) and no progress bars."""
        program = Plugin.getProgram(command)
        args = f"{args} --device {self._device()}" if command in ("train", "predict", "abinitio", "hetero") else args
        if self.usesGpu():
            program = f"CUDA_VISIBLE_DEVICES=%(GPU)s {program}"
        return program, f"{args} --quiet"

    def runCryoposeml(self, command: str, args: str, cwd=None) -> None:
        """Run ``cryoposeml <command> <args>`` to its end with runJob (hosts.conf applies)."""
        program, args = self._commandLine(command, args)
        self.runJob(program, args, env=self._environ(), cwd=cwd, numberOfMpi=1)

    def startCryoposeml(self, command: str, args: str, logPath: str):
        """Start ``cryoposeml <command> <args>`` in the background on this machine (a long-lived
        worker that this protocol's steps talk to, not a job for a queue); its output goes to
        ``logPath``. Returns the ``subprocess.Popen``."""
        import subprocess

        program, args = self._commandLine(command, args)
        try:
            gpus = ",".join(map(str, self._stepsExecutor.getGpuList())) or "0"
        except Exception:   # no executor (a test calling the step directly) or no GPU for this step
            gpus = ",".join(map(str, self.getGpuList())) or "0"
        cmd = f"{program} {args}".replace("%(GPU)s", gpus)
        self.info(f"Starting (in the background): {cmd}")
        with open(logPath, "a") as logFile:
            # a child of this process: stopping the protocol (which kills its children) stops it too
            return subprocess.Popen(cmd, shell=True, env=self._environ(), stdout=logFile, stderr=subprocess.STDOUT)

    def _resumeArgs(self, previous, folder: str, marker: str = None) -> str:
        """Continue ``previous`` (an earlier run of this protocol): its ``extra/<folder>`` is copied
        here once (without the ``marker`` file of a finished run, so the copy runs to its end) and
        the command resumes from its checkpoints. Returns the arguments to add."""
        if previous is None:
            return ""
        import shutil

        dest = self._getExtraPath(folder)
        if not os.path.exists(dest):
            shutil.copytree(previous._getExtraPath(folder), dest)
            if marker and os.path.exists(os.path.join(dest, marker)):
                os.remove(os.path.join(dest, marker))
        return " --resume"

    def _environ(self):
        """The engine's environment (``Plugin.getEnviron``) with this protocol's threads for OpenMP."""
        env = Plugin.getEnviron()
        threads = self.numberOfThreads.get() if hasattr(self, "numberOfThreads") and self.numberOfThreads.get() else 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
        return env

    # -------------------------- outputs -------------------------------------
    @staticmethod
    def _halfMapVolume(mapPath: str, samplingRate: float):
        """A Volume for ``MAP.mrc`` with the half-maps the CLI writes beside it (``MAP_half1/2.mrc``)."""
        from pathlib import Path

        import pwem.objects as emobj

        from ..data.mrc import half_map_paths   # the owner of that naming

        half1, half2, _ = half_map_paths(Path(mapPath))
        vol = emobj.Volume(location=str(mapPath))
        vol.setSamplingRate(samplingRate)
        vol.setHalfMaps([str(half1), str(half2)])
        return vol

    # -------------------------- validation ----------------------------------
    def validate(self):
        """Scipion's check before a run (its own, then each protocol's ``_validate``), and: a GPU asked
        for must exist here, unless the protocol goes to a queue. (Whether the engine is installed is
        the plugin's check, ``Plugin.validateInstallation``.)"""
        errors = super().validate()
        if self.usesGpu() and not self.useQueue() and not Plugin.hasNvidiaGpu():
            errors.append("'Use GPU' is set but this machine has no NVIDIA driver (nvidia-smi not found): set it to "
                          "No to run on the CPU, or send the protocol to a queue with GPUs.")
        return errors

    @staticmethod
    def _particleErrors(particles, needAlignment=False) -> list:
        errors = []
        if particles is None:
            return ["No input particles."]
        if particles.getXDim() and particles.getXDim() % 2:
            errors.append(f"The particles are {particles.getXDim()} px, an odd box: cryoposeml needs an even box "
                          "(re-extract or resize them).")
        if needAlignment and not particles.hasAlignmentProj():
            errors.append("The particles have no 3D alignment (projection angles).")
        return errors


class MapLearningSteps:
    """The steps ab initio and heterogeneity share (a mixin of :class:`CryoPoseMLProtBase`): write the
    input particles, run ``cryoposeml <_command>`` into ``extra/<_command>`` (continuing a previous
    run's folder when asked), read its ``<_command>.json``."""
    _command = None

    def _insertMapLearningSteps(self, runStep):
        self._insertFunctionStep(self.convertInputStep, needsGPU=False)
        self._insertFunctionStep(runStep)
        self._insertFunctionStep(self.createOutputStep, needsGPU=False)

    def _outDir(self, *parts):
        return self._getExtraPath(self._command, *parts)

    def convertInputStep(self):
        from ..convert import writeParticlesStar

        writeParticlesStar(self.inputParticles.get(), self._getExtraPath("input_particles.star"), self._getExtraPath())

    def _runMapLearning(self, args: str) -> None:
        """``args``: the command's own options; the input, output, search epochs, resume and extra
        arguments are added here."""
        args = f"--particles {self._getExtraPath('input_particles.star')} --out {self._outDir()} {args}"
        if self.searchEpochs.get() >= 0:
            args += f" --search-epochs {self.searchEpochs.get()}"
        args += self._resumeArgs(self.continueRun.get(), self._command, f"{self._command}.json")
        self.runCryoposeml(self._command, f"{args} {self.extraParams.get() or ''}")

    def summaryJson(self):
        import json

        with open(self._outDir(f"{self._command}.json")) as f:
            return json.load(f)
