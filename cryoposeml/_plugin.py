"""The Scipion ``Plugin`` class: environment and binaries (imported only by Scipion)."""
import os

import pwem

from . import __version__

CRYOPOSEML_HOME = "CRYOPOSEML_HOME"


class Plugin(pwem.Plugin):
    """cryoposeml needs no binaries of its own: its CLI lives in the Python environment that runs
    Scipion (``pip install -e .``). Relion (for the local-refinement handoff) is found on PATH."""

    _supportedVersions = [__version__]

    @classmethod
    def _defineVariables(cls):
        cls._defineVar(CRYOPOSEML_HOME, os.environ.get(CRYOPOSEML_HOME, ""))

    @classmethod
    def getProgram(cls, command: str) -> str:
        """The command line that runs ``cryoposeml <command>`` with Scipion's Python."""
        python = os.environ.get("SCIPION_PYTHON", "python")
        return f"{python} -m cryoposeml.cli {command}"

    @classmethod
    def defineBinaries(cls, env):
        pass

    def getName(self):
        """The plugin's name, as Scipion shows it (the class lives in ``cryoposeml._plugin``)."""
        return "cryoposeml"

    def getPath(self):
        """The package folder (the class lives in a submodule so that ``import cryoposeml`` stays light)."""
        return os.path.dirname(os.path.abspath(__file__))
