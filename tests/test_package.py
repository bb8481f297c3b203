"""Packaging and layering: the plugin entry point, a light import, protocols.conf, no Scipion below the skin."""
import configparser
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_is_light():
    code = ("import sys, cryoposeml; "
            "bad = [m for m in ('torch', 'pyworkflow', 'pwem', 'numpy') if m in sys.modules]; "
            "assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("layer", ["core", "data", "models", "engine", "cli"])
def test_layers_do_not_import_scipion(layer):
    for py in (ROOT / "cryoposeml" / layer).rglob("*.py"):
        text = py.read_text()
        assert not re.search(r"^\s*(import|from)\s+(pyworkflow|pwem)\b", text, re.M), py


def test_core_and_data_run_without_scipion():
    code = ("import sys; sys.modules['pyworkflow'] = None; sys.modules['pwem'] = None; "
            "import cryoposeml.engine.simulate, cryoposeml.engine.evaluate, cryoposeml.cli; "
            "cryoposeml.cli.build_parser()")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_entry_points():
    eps = importlib.metadata.entry_points()
    assert any(e.name == "cryoposeml" and e.value == "cryoposeml" for e in eps.select(group="pyworkflow.plugin"))
    assert any(e.name == "cryoposeml" for e in eps.select(group="console_scripts"))


def test_protocols_conf_parses():
    for path in (ROOT / "protocols.conf", ROOT / "cryoposeml" / "protocols.conf"):
        cp = configparser.ConfigParser()
        cp.optionxform = str
        cp.read(path)
        tree = json.loads(cp["PROTOCOLS"]["Protocols SPA"])
        assert {s["text"] for s in tree} == {"Imports", "3D", "Particles"}


def _protocols_named(node):
    if node.get("tag") == "protocol":
        yield node["value"]
    for child in node.get("children", []):
        yield from _protocols_named(child)


def test_protocols_conf_names_existing_protocols():
    pytest.importorskip("pwem")
    from pwem import Domain

    cp = configparser.ConfigParser()
    cp.optionxform = str
    cp.read(ROOT / "cryoposeml" / "protocols.conf")
    named = {n for section in json.loads(cp["PROTOCOLS"]["Protocols SPA"]) for n in _protocols_named(section)}
    ours = {k for k in Domain.getProtocols() if k.startswith("CryoPoseML")}
    assert named == ours == {"CryoPoseMLProtImportParticles", "CryoPoseMLProtTrain", "CryoPoseMLProtPredict", "CryoPoseMLProtCleanup",
                             "CryoPoseMLProtLocalRefine", "CryoPoseMLProtAbinitio", "CryoPoseMLProtHetero"}


def test_plugin_class_in_scipion():
    pwem = pytest.importorskip("pwem")
    import cryoposeml

    assert issubclass(cryoposeml.Plugin, pwem.Plugin)
    assert "cryoposeml.cli" in cryoposeml.Plugin.getProgram("simulate")


def test_every_protocol_parameter_has_help():
    """A user fills the forms without the README: every parameter of every protocol says what it
    does (Scipion's own hidden GPU and parallel parameters included)."""
    pytest.importorskip("pwem")
    from pwem import Domain

    missing = []
    for name, cls in Domain.getProtocols().items():
        if not name.startswith("CryoPoseML"):
            continue
        for pname, param in cls()._definition.iterParams():
            if not (param.help.get() if getattr(param, "help", None) is not None else ""):
                missing.append(f"{name}.{pname}")
    assert not missing, missing
