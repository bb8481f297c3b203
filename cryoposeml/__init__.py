"""cryoposeml: amortized particle pose estimation for cryo-EM.

The package is also a Scipion plugin (entry point ``pyworkflow.plugin: cryoposeml``). Its
``Plugin`` class is imported lazily, so ``import cryoposeml`` pulls in neither pyworkflow/pwem
(the library and CLI work without Scipion) nor torch (Scipion's start-up stays light).
"""
__version__ = "0.1.0"


def __getattr__(name):
    if name == "Plugin":
        from ._plugin import Plugin

        return Plugin
    raise AttributeError(f"module 'cryoposeml' has no attribute {name!r}")
