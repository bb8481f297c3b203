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


#: test files by their measured time, longest first (bootstrap.sh runs two xdist workers, a file at
#: a time). xdist's ``loadfile`` would hand files out by their number of tests and give each worker
#: two up front, so the longest files used to end up queued on one worker while the other sat idle;
#: the scheduler below hands them out in this order instead (files not listed follow, in xdist's
#: order), one file per worker at a time.
FILE_ORDER = ("test_train_predict.py", "test_scipion.py", "test_families.py", "test_cleanup_refine.py",
              "test_evaluate_cli.py", "test_training_runs.py", "test_abinitio.py", "test_hetero.py",
              "test_matching.py", "test_relion_referee.py", "test_gui.py", "test_data.py")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in ("test_scipion.py", "test_gui.py"):
            item.add_marker(pytest.mark.scipion)
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) or item.path.name == "test_scipion.py":
            item.add_marker(pytest.mark.train)


def _file_rank(scope: str) -> int:
    name = scope.rsplit("/", 1)[-1]
    return FILE_ORDER.index(name) if name in FILE_ORDER else len(FILE_ORDER)


try:
    from xdist.scheduler import LoadFileScheduling
except ImportError:            # pytest without xdist: one process, nothing to schedule
    LoadFileScheduling = None

if LoadFileScheduling is not None:
    class _LongestFileFirst(LoadFileScheduling):
        """``--dist loadfile`` with the files in :data:`FILE_ORDER`, each handed out only when the
        worker is down to the last test of its file (a worker holds that one back until it knows
        what follows), so that no file waits behind a long one on a busy worker while another is free."""

        def schedule(self):
            if self.collection is None and self.collection_is_completed:
                self._order_pending = True
            super().schedule()

        def _assign_work_unit(self, node):
            if getattr(self, "_order_pending", False):
                ordered = sorted(self.workqueue.items(), key=lambda kv: _file_rank(kv[0]))  # stable
                self.workqueue.clear()
                self.workqueue.update(ordered)
                self._order_pending = False
            super()._assign_work_unit(node)

        def _reschedule(self, node):
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            if self._pending_of(self.assigned_work[node]) > 1:
                return
            self._assign_work_unit(node)

    @pytest.hookimpl(optionalhook=True)       # also loads under ``-p no:xdist``
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") == "loadfile":
            return _LongestFileFirst(config, log)
        return None


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
