"""The Scipion ``Plugin`` class: the engine environment and the command that runs it (imported
only by Scipion).

The plugin Scipion imports is light (numpy, pandas, starfile, mrcfile, matplotlib: STAR and MRC
files, poses, plots); the engine (torch, e3nn, escnn, ...) runs as the ``cryoposeml`` command in
an environment of its own, as Scipion's deep-learning plugins do:

* ``scipion installb cryoposeml`` runs :meth:`Plugin.defineBinaries`: a venv under Scipion's
  ``software/em/cryoposeml-<version>`` with torch for this machine (the CUDA build where
  ``nvidia-smi`` answers, else the CPU build; ``CRYOPOSEML_TORCH`` / ``CRYOPOSEML_TORCH_INDEX``
  choose another) and cryoposeml's engine;
* ``CRYOPOSEML_ENGINE_PYTHON`` (scipion.conf or the environment) points at an existing Python that has
  the engine (a site's shared environment, or a checkout set up with ``bootstrap.sh``) instead;
* without either, the engine is looked for in Scipion's own Python (``pip install -e .[engine]``,
  what the tests and the README's developer set-up do).
"""
import os
import shutil
import sys

import pwem

from . import __version__

CRYOPOSEML_HOME = "CRYOPOSEML_HOME"
CRYOPOSEML_ENGINE_PYTHON = "CRYOPOSEML_ENGINE_PYTHON"
CRYOPOSEML_TORCH = "CRYOPOSEML_TORCH"
CRYOPOSEML_TORCH_INDEX = "CRYOPOSEML_TORCH_INDEX"

#: the torch the engine is tested with (bootstrap.sh installs the same)
DEFAULT_TORCH = "torch==2.13.0"
TORCH_INDEX_CPU = "https://download.pytorch.org/whl/cpu"
TORCH_INDEX_CUDA = "https://download.pytorch.org/whl/cu128"
#: written last by the install commands: the environment is complete
ENV_DONE = "cryoposeml-env.done"


class Plugin(pwem.Plugin):
    _homeVar = CRYOPOSEML_HOME
    _supportedVersions = [__version__]
    _url = "https://github.com/cryoposeml/scipion-em-cryoposeml"

    @classmethod
    def _defineVariables(cls):
        cls._defineEmVar(CRYOPOSEML_HOME, f"cryoposeml-{__version__}",
                         description="Folder of the engine environment that 'scipion installb cryoposeml' creates")
        cls._defineVar(CRYOPOSEML_ENGINE_PYTHON, "",
                       description="A Python that already has the cryoposeml engine (empty: the one installed "
                                   "under CRYOPOSEML_HOME, else Scipion's own)")
        cls._defineVar(CRYOPOSEML_TORCH, DEFAULT_TORCH, description="pip requirement for torch in the engine")
        cls._defineVar(CRYOPOSEML_TORCH_INDEX, "",
                       description="pip index for torch (empty: the CUDA build if nvidia-smi is found, else CPU)")

    # -------------------------- the engine -----------------------------------
    @classmethod
    def getEnginePython(cls) -> str:
        """The Python that runs the engine: ``CRYOPOSEML_ENGINE_PYTHON``, else the installed environment's,
        else Scipion's own."""
        explicit = cls.getVar(CRYOPOSEML_ENGINE_PYTHON)
        if explicit:
            return explicit
        installed = cls.getEnvPython()
        if os.path.exists(os.path.join(cls.getHome(), ENV_DONE)) and os.path.exists(installed):
            return installed
        return cls._scipionPython()

    @staticmethod
    def _scipionPython() -> str:
        return os.environ.get("SCIPION_PYTHON") or sys.executable

    @staticmethod
    def hasNvidiaGpu() -> bool:
        """Whether this machine has an NVIDIA driver (``nvidia-smi`` on the PATH)."""
        return shutil.which("nvidia-smi") is not None

    @classmethod
    def getEnvPython(cls) -> str:
        """The interpreter of the environment ``defineBinaries`` creates."""
        return os.path.join(cls.getHome(), "venv", "bin", "python")

    @classmethod
    def usesOwnEnvironment(cls) -> bool:
        """Whether the engine runs in another Python than Scipion's (then Scipion's PYTHONPATH is not passed on)."""
        python = cls.getEnginePython()
        return os.path.realpath(python) != os.path.realpath(cls._scipionPython())

    @classmethod
    def getProgram(cls, command: str) -> str:
        """The command line that runs ``cryoposeml <command>`` in the engine's Python."""
        return f"{cls.getEnginePython()} -m cryoposeml.cli {command}"

    @classmethod
    def getEnviron(cls):
        """The environment for the engine: this one, without Scipion's PYTHONPATH when the engine has
        its own Python (its packages must not mix with Scipion's)."""
        import pyworkflow.utils as pwutils

        env = pwutils.Environ(os.environ)
        if cls.usesOwnEnvironment():
            env.pop("PYTHONPATH", None)
        return env

    @classmethod
    def validateInstallation(cls):
        """Scipion's installation check (protocols show as not installed while it fails): the engine's
        Python exists, and, when it is Scipion's own, has torch (looked up, not imported)."""
        import importlib.util

        python = cls.getEnginePython()
        if cls.usesOwnEnvironment():
            if not os.path.exists(python):
                return [f"The cryoposeml engine's Python ({python}) does not exist: run 'scipion installb cryoposeml' "
                        "or set CRYOPOSEML_ENGINE_PYTHON to a Python with the engine."]
            return []
        if importlib.util.find_spec("torch") is None:
            return ["The cryoposeml engine is not installed: run 'scipion installb cryoposeml' (its own environment), "
                    "or set CRYOPOSEML_ENGINE_PYTHON to a Python with the engine."]
        return []

    # -------------------------- installation -----------------------------------
    @classmethod
    def torchRequirement(cls) -> tuple:
        """``(pip requirement, index URL)`` for torch on this machine."""
        index = cls.getVar(CRYOPOSEML_TORCH_INDEX)
        if not index:
            index = TORCH_INDEX_CUDA if cls.hasNvidiaGpu() else TORCH_INDEX_CPU
        return cls.getVar(CRYOPOSEML_TORCH) or DEFAULT_TORCH, index

    @classmethod
    def engineRequirement(cls) -> str:
        """What pip installs for the engine: this checkout when the plugin runs from one (``pip install
        -e``), else the released package of the same version."""
        source = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.exists(os.path.join(source, "setup.py")):
            return f"{source}[engine]"
        return f"scipion-em-cryoposeml[engine]=={__version__}"

    @classmethod
    def installCommands(cls) -> list:
        """``(command, targets)`` pairs that build the engine environment in ``CRYOPOSEML_HOME``
        (run there): a venv, torch for this machine, then the engine; ``ENV_DONE`` last."""
        torch, index = cls.torchRequirement()
        python = sys.executable   # Scipion's Python: a version the plugin runs on
        pip = "venv/bin/python -m pip install --no-cache-dir"
        cmd = " && ".join([
            f"{python} -m venv --clear venv",
            "venv/bin/python -m pip install --upgrade pip",
            f"{pip} --index-url {index} '{torch}'",   # as PyTorch's own instructions install it
            f"{pip} '{cls.engineRequirement()}'",
            "venv/bin/python -m cryoposeml.cli --version",
            f"touch {ENV_DONE}",
        ])
        return [(cmd, [ENV_DONE])]

    @classmethod
    def defineBinaries(cls, env):
        env.addPackage("cryoposeml", version=__version__, tar="void.tgz", commands=cls.installCommands(),
                       default=True)

    # -------------------------- identity -----------------------------------
    def getName(self):
        """The plugin's name, as Scipion shows it (the class lives in ``cryoposeml._plugin``)."""
        return "cryoposeml"

    def getPath(self):
        """The package folder (the class lives in a submodule so that ``import cryoposeml`` stays light)."""
        return os.path.dirname(os.path.abspath(__file__))
