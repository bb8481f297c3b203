"""Shared fixtures and the markers (pytest.ini): ``relion`` (runs Relion's programs: skipped, with
the reason, where they are not installed; bootstrap.sh installs them), ``scipion`` (a headless
Scipion project or its GUI), ``train`` (trains a network or a decoder). ``-m "not train"`` and the
like select parts of the suite."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
# Headless Scipion, for the tests that import pyworkflow/pwem (bootstrap.sh exports the same).
os.environ.setdefault("SCIPION_DOMAIN", "pwem")
os.environ.setdefault("SCIPION_HOME", str(ROOT / "scipion_home"))
os.environ.setdefault("SCIPION_USER_DATA", os.path.join(os.environ["SCIPION_HOME"], "data"))
os.environ.setdefault("SCIPION_TESTS", os.path.join(os.environ["SCIPION_HOME"], "tests"))
os.environ.setdefault("SCIPION_PYTHON", sys.executable)

MAPS = ROOT / "cryoposeml" / "resources" / "maps"


#: the Relion programs the ``relion`` tests run
RELION_PROGRAMS = ("relion_project", "relion_reconstruct", "relion_refine_mpi", "relion_image_handler",
                   "relion_convert_star")
#: fixtures that train a network: a test using one is a ``train`` test
TRAINING_FIXTURES = {"tiny_training"}


#: the longest files first, so that two xdist workers (bootstrap.sh) end together instead of one of
#: them starting a 10-minute file last
LONGEST_FIRST = ("test_train_predict.py", "test_scipion.py", "test_families.py", "test_cleanup_refine.py",
                 "test_evaluate_cli.py", "test_training_runs.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))      # stable: the order within a file is kept
    for item in items:
        if item.path.name in ("test_scipion.py", "test_gui.py"):
            item.add_marker(pytest.mark.scipion)
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name == "test_scipion.py":
            item.add_marker(pytest.mark.train)


def pytest_runtest_setup(item):
    if item.get_closest_marker("relion"):
        missing = [p for p in RELION_PROGRAMS if shutil.which(p) is None]
        if missing:
            pytest.skip(f"Relion is not installed ({', '.join(missing)} not on PATH): apt-get install relion "
                        "openmpi-bin, or bash bootstrap.sh setup")


def relion(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """Run a Relion program (``relion`` tests only: they are skipped where Relion is missing)."""
    exe = shutil.which(args[0])
    assert exe, f"{args[0]} not found: Relion must be installed (bash bootstrap.sh setup)"
    r = subprocess.run([exe, *map(str, args[1:])], cwd=cwd, capture_output=True, text=True)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args))} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    """Run ``cryoposeml`` as a user would (a subprocess of this interpreter)."""
    return subprocess.run([sys.executable, "-m", "cryoposeml.cli", *map(str, args), "--quiet"],
                          cwd=cwd, capture_output=True, text=True)


def write_rows(star_path, rows, out) -> Path:
    """The particles ``rows`` (a slice or indices) of a STAR, written to ``out`` (image paths kept valid)."""
    from cryoposeml.data.star import read_star, write_star

    star = read_star(star_path)
    star.particles = star.particles.iloc[rows].reset_index(drop=True)
    return write_star(star, out)


def simulate_split(d: Path, n_train: int, *simulate_args) -> Path:
    """``cryoposeml simulate`` into ``d/sim``, its ground truth split into ``d/train.star`` (the first
    ``n_train`` particles) and ``d/test.star`` (the rest, held out)."""
    r = cli("simulate", *simulate_args, "--out", d / "sim")
    assert r.returncode == 0, r.stderr
    truth = d / "sim" / "ground_truth.star"
    write_rows(truth, slice(0, n_train), d / "train.star")
    write_rows(truth, slice(n_train, None), d / "test.star")
    return d


#: the network every training test uses: 32 px, small encoder (2 cores; docs/benchmarks.md has the big ones)
SMALL_NETWORK = ["--box-px", 32, "--widths", 16, 32, 64, "--batch-size", 64]


def noisy_split(d: Path) -> Path:
    """1,500 AdK particles at SNR 1 (per pixel of the 64 px box), CTF, 1.5 A shifts: ``d/train.star``
    (1,300 to train on) and ``d/test.star`` (200 held out). test_train_predict.py and
    test_families.py train on it."""
    return simulate_split(d, 1300, "--n", 1500, "--snr", 1, "--shift-sigma", 1.5, "--seed", 5)


@pytest.fixture(scope="session")
def adk_map():
    from cryoposeml.data.mrc import read_map

    vol, apix = read_map(MAPS / "adk_open.mrc")
    return vol, apix


@pytest.fixture(scope="session")
def sim_noise_free_ctf(tmp_path_factory):
    """600 noise-free AdK particles with CTF and shifts, from ``cryoposeml simulate``."""
    out = tmp_path_factory.mktemp("sim") / "noise_free"
    r = cli("simulate", "--map", "adk_open", "--n", 600, "--no-noise", "--shift-sigma", 3, "--seed", 3,
            "--stack-size", 250, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="session")
def rng():
    return np.random.default_rng(12345)
