"""The cryoposeml protocols (Scipion skin): thin wrappers that run ``cryoposeml <command>``."""
from .protocol_import import CryoPoseMLProtImportParticles
from .protocol_train import CryoPoseMLProtTrain
from .protocol_predict import CryoPoseMLProtPredict
from .protocol_cleanup import CryoPoseMLProtCleanup
from .protocol_refine import CryoPoseMLProtLocalRefine
from .protocol_abinitio import CryoPoseMLProtAbinitio
from .protocol_hetero import CryoPoseMLProtHetero
