"""Bad input: a clear error naming the file and the problem, exit code 1, and no output files."""
import shutil

import numpy as np
import pytest

from cryoposeml.data.mrc import write_map
from conftest import MAPS, cli


def _snapshot(d):
    return sorted(p.relative_to(d) for p in d.rglob("*"))


@pytest.fixture
def dataset(sim_noise_free_ctf, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(sim_noise_free_ctf, d)
    return d


def _expect_failure(args, outdir, *needles):
    before = _snapshot(outdir)
    r = cli(*args)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)
    assert _snapshot(outdir) == before, "a failed run left files behind"
    return r.stderr


def test_truncated_stack(dataset):
    stack = dataset / "Particles" / "stack_0002.mrcs"
    data = stack.read_bytes()
    stack.write_bytes(data[: len(data) - 5000])
    _expect_failure(["reconstruct", "--particles", dataset / "ground_truth.star", "--out", dataset / "map.mrc"],
                    dataset, "stack_0002.mrcs", "truncated")


def test_star_without_optics(dataset):
    text = (dataset / "ground_truth.star").read_text()
    start = text.index("data_particles")
    (dataset / "old.star").write_text(text[start:])
    _expect_failure(["reconstruct", "--particles", dataset / "old.star", "--out", dataset / "map.mrc"],
                    dataset, "old.star", "no data_optics")


def test_star_without_angles(dataset):
    _expect_failure(["reconstruct", "--particles", dataset / "particles.star", "--out", dataset / "map.mrc"],
                    dataset, "particles.star", "rlnAngleRot")


def test_odd_box(dataset, tmp_path):
    text = (dataset / "ground_truth.star").read_text()
    (dataset / "odd.star").write_text(text.replace("1.500000\t64\t2", "1.500000\t63\t2"))
    _expect_failure(["reconstruct", "--particles", dataset / "odd.star", "--out", dataset / "map.mrc"],
                    dataset, "odd.star", "odd box")
    write_map(tmp_path / "odd_map.mrc", np.zeros((63, 63, 63), np.float32), 1.5)
    _expect_failure(["simulate", "--map", tmp_path / "odd_map.mrc", "--n", 10, "--out", dataset / "sim"],
                    dataset, "odd_map.mrc", "odd box")


def test_unknown_symmetry(dataset):
    _expect_failure(["reconstruct", "--particles", dataset / "ground_truth.star", "--out", dataset / "map.mrc",
                     "--sym", "X3"], dataset, "unknown symmetry", "X3")
    _expect_failure(["simulate", "--map", MAPS / "adk_open.mrc", "--n", 10, "--sym", "Q", "--out", dataset / "sim"],
                    dataset, "unknown symmetry")


def test_missing_stack_and_overwrite(dataset):
    (dataset / "Particles" / "stack_0001.mrcs").unlink()
    _expect_failure(["reconstruct", "--particles", dataset / "ground_truth.star", "--out", dataset / "map.mrc"],
                    dataset, "stack_0001.mrcs", "not found")
    _expect_failure(["simulate", "--n", 10, "--out", dataset], dataset, "already exists")


def test_hetero_bad_input(dataset):
    """Heterogeneity refuses, before any work: input poses from a STAR without angles, and
    reference maps that do not match the reference's states (two maps for a one-state set)."""
    _expect_failure(["hetero", "--particles", dataset / "particles.star", "--poses", "input", "--out", dataset / "het"],
                    dataset, "particles.star", "rlnAngleRot", "--poses input")
    _expect_failure(["hetero", "--particles", dataset / "particles.star", "--out", dataset / "het",
                     "--reference", dataset / "ground_truth.star", "--reference-map", "adk_open", "adk_closed"],
                    dataset, "ground_truth.star", "rlnCpmlState")
