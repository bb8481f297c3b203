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


#: what the [engine] extra installs: Scipion's own environment need not have any of it
ENGINE_PACKAGES = ("torch", "e3nn", "escnn", "healpy", "roma", "safetensors", "sklearn")


def test_scipion_side_runs_without_the_engine(tmp_path):
    """What Scipion's process does itself (protocol modules, viewers, STAR/MRC files, pose conversion
    to and from Scipion, form checks, figures) works in a Python where the engine packages cannot be
    imported: the plugin is light, and the engine runs in its own environment (Plugin.getProgram)."""
    pytest.importorskip("pwem")
    from conftest import cli

    r = cli("simulate", "--n", 12, "--no-noise", "--seed", 1, "--out", tmp_path / "sim")
    assert r.returncode == 0, r.stderr
    code = f"""
import sys
for name in {ENGINE_PACKAGES!r}:
    sys.modules[name] = None   # import fails, as in an environment without them
import numpy as np
import cryoposeml, cryoposeml.protocols, cryoposeml.viewers, cryoposeml.convert, cryoposeml.objects
from cryoposeml.core.rotations import euler_to_matrix, relion_to_scipion_matrix, scipion_matrix_to_relion
from cryoposeml.core.symmetry import symmetry_group
from cryoposeml.data.mrc import half_map_paths
from cryoposeml.data.star import read_star, write_star
from cryoposeml.engine.calibration import Calibration
from cryoposeml.engine.plots import live_map_figure, pose_figure
from cryoposeml.engine.spool import SpoolClient
star = read_star({str(tmp_path / "sim" / "ground_truth.star")!r})
angles = star.particles[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
a, s = scipion_matrix_to_relion(relion_to_scipion_matrix(angles, np.zeros((len(angles), 2))))
assert np.abs(euler_to_matrix(a) - star.matrices()).max() < 1e-9
assert symmetry_group("D7").shape == (14, 3, 3) and len(star.ctf_params()) == 12
write_star(star, {str(tmp_path / "copy.star")!r})
pose_figure(a, np.ones(len(a)), None, None)
live_map_figure({{"batches": []}}, np.zeros((16, 16, 16), np.float32))
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT / "tests")
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


def test_symmetry_wizard_covers_every_symmetry_field():
    """The symmetry wizard is registered for every protocol with a 'symmetry' field, and every choice
    it offers is a point group the core accepts."""
    pytest.importorskip("pwem")
    from pwem import Domain
    from pyworkflow.wizard import DESKTOP_TKINTER

    from cryoposeml import protocols
    from cryoposeml.core.symmetry import symmetry_group
    from cryoposeml.wizards import CryoPoseMLSymmetryWizard, symmetryChoices

    for name, _ in symmetryChoices():
        assert len(symmetry_group(name)) >= 1, name
    with_symmetry = [getattr(protocols, n) for n in dir(protocols) if n.startswith("CryoPoseMLProt")
                     and hasattr(getattr(protocols, n)(), "symmetry")]
    assert len(with_symmetry) >= 4
    for cls in with_symmetry:
        found = Domain.findWizards(cls(), DESKTOP_TKINTER)
        assert found.get("symmetry") is CryoPoseMLSymmetryWizard, (cls.__name__, found)


def test_validation_catches_a_missing_engine_and_a_missing_gpu(monkeypatch):
    """Before a run: 'Use GPU' on a machine without an NVIDIA driver is refused (unless the protocol
    goes to a queue); an engine Python that does not exist makes Scipion's installation check fail
    (the protocols show as not installed) with the way to install it."""
    pytest.importorskip("pwem")
    import shutil

    from pwem import Domain

    Plugin = Domain.getPluginModule("cryoposeml").Plugin
    cls = Domain.getProtocols()["CryoPoseMLProtTrain"]
    prot = cls()   # as Scipion creates it
    assert cls.validateInstallation() == [] and cls.isInstalled()   # a classmethod, as the GUI's tree calls it

    def gpu_errors():
        return [e for e in prot.validate() if "nvidia-smi" in e]

    prot.useGpu.set(False)
    assert not gpu_errors()
    prot.useGpu.set(True)
    assert bool(gpu_errors()) == (shutil.which("nvidia-smi") is None)
    prot._useQueue.set(True)   # a queue may have GPUs this machine lacks
    assert not gpu_errors()
    monkeypatch.setitem(Plugin._vars, "CRYOPOSEML_ENGINE_PYTHON", "/nonexistent/engine/bin/python")
    (error,) = cls.validateInstallation()
    assert "/nonexistent/engine/bin/python" in error and "installb cryoposeml" in error and not cls.isInstalled()


def test_possible_outputs_have_distinct_names():
    """A protocol's _possibleOutputs names every output once: in an Enum, two outputs of the same
    class are aliases of one name (the second output would silently overwrite the first)."""
    pytest.importorskip("pwem")
    import enum

    from cryoposeml import protocols

    for name in dir(protocols):
        outputs = getattr(getattr(protocols, name), "_possibleOutputs", None)
        if isinstance(outputs, type) and issubclass(outputs, enum.Enum):
            assert len(outputs.__members__) == len(list(outputs)), (name, list(outputs.__members__))


def test_model_families_come_from_one_registry():
    """One table declares the families: the CLI offers its names, the Scipion train form its names
    in its order (a saved project's index keeps its meaning) with one help line each, and cites
    what it cites; every citation is in the plugin's bibliography."""
    pytest.importorskip("pwem")
    from cryoposeml import bibtex
    from cryoposeml.families import FAMILIES, family
    from cryoposeml.protocols import protocol_train

    assert protocol_train.FAMILIES == ["image2sphere", "equivariant", "bingham", "sixd"] == list(FAMILIES)
    keys = set(re.findall(r"@\w+\{(\w+),", bibtex.__doc__))
    for i, name in enumerate(FAMILIES):
        f = family(name)
        assert f.citations and set(f.citations) <= keys, (name, f.citations)
        prot = protocol_train.CryoPoseMLProtTrain.__new__(protocol_train.CryoPoseMLProtTrain)
        prot.modelFamily = type("P", (), {"get": lambda self, i=i: i})()
        assert prot._citations() == list(f.citations)
    with pytest.raises(ValueError, match="available: image2sphere, equivariant, bingham, sixd"):
        family("resnet")
    r = subprocess.run([sys.executable, "-m", "cryoposeml.cli", "train", "--help"], capture_output=True, text=True)
    for name in FAMILIES:
        assert name in r.stdout


def test_cli_options_are_declared_once_on_the_configs():
    """Each command's options come from its configuration dataclass: parsed with nothing but the
    required arguments they give the dataclass's defaults, and every option has help."""
    pytest.importorskip("torch")
    import dataclasses

    from cryoposeml.cli import build_parser
    from cryoposeml.engine.abinitio import AbinitioConfig
    from cryoposeml.engine.cleanup import CleanupConfig
    from cryoposeml.engine.hetero import HeteroConfig
    from cryoposeml.engine.refine import RefineConfig
    from cryoposeml.engine.simulate import SimulationConfig
    from cryoposeml.engine.train import TrainConfig
    from cryoposeml.engine.verify import MatchConfig
    from cryoposeml.options import from_args

    parser = build_parser()
    cases = {"abinitio": (AbinitioConfig, ["--particles", "p.star", "--out", "o"]),
             "hetero": (HeteroConfig, ["--particles", "p.star", "--out", "o"]),
             "train": (TrainConfig, ["--particles", "p.star", "--out", "o"]),
             "cleanup": (CleanupConfig, ["--particles", "p.star", "--out", "o.star"]),
             "refine": (RefineConfig, ["--particles", "p.star", "--out", "o"]),
             "predict": (MatchConfig, ["--particles", "p.star", "--model", "m", "--out", "o.star"]),
             "simulate": (SimulationConfig, ["--out", "o"])}
    for command, (cls, required) in cases.items():
        args = parser.parse_args([command, *required])
        assert from_args(cls, args, **({"map": "adk_open"} if cls is SimulationConfig else {})) == cls(), command
        for f in dataclasses.fields(cls):
            if f.metadata.get("cli"):
                assert f.metadata["help"] or f.name in {"epochs", "batch_size", "lr_decoder", "seed",
                                                        "amplitude_contrast", "method", "encoder", "decoder"}, (command, f.name)
    # a value given on the command line reaches the dataclass, tuples and negated booleans included
    args = parser.parse_args(["abinitio", "--particles", "p", "--out", "o", "--widths", "8", "16",
                              "--no-frequency-marching", "--search-epochs", "3"])
    cfg = from_args(AbinitioConfig, args)
    assert cfg.widths == (8, 16) and cfg.frequency_marching is False and cfg.search_epochs == 3


def test_a_command_loads_only_its_own_module():
    """``cryoposeml reconstruct ...`` builds its own parser only: the other commands' modules (and
    what they import: e3nn, escnn, roma ...) are not loaded, which saves seconds per call; the full
    parser (``cryoposeml --help``) still lists every command."""
    code = """
import sys
from cryoposeml.cli import COMMANDS, build_parser, _command_of
assert _command_of(["reconstruct", "--particles", "p.star"]) == "reconstruct" and _command_of(["--help"]) is None
p = build_parser("reconstruct")
p.parse_args(["reconstruct", "--particles", "p.star", "--out", "m.mrc"])
loaded = sorted(c for c in COMMANDS if f"cryoposeml.cli.{c}" in sys.modules)
assert loaded == ["reconstruct"], loaded
assert not {"e3nn", "escnn", "roma", "cryoposeml.engine.train"} & set(sys.modules), sorted(sys.modules)[:5]
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "cryoposeml.cli", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and all(c in r.stdout for c in ("simulate", "predict", "hetero", "demo")), r.stdout
