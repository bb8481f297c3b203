"""The Scipion plugin in real headless pyworkflow projects, driven by its two workflow templates:
(1) import -> train -> predict -> cleanup -> Relion local refine, and (2) streaming: STAR files
arriving in three batches -> predict in streaming -> cleanup. Also what a real client
(scipion-em-relion's writer) reads from our output."""
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("pwem")
pytest.importorskip("relion")   # scipion-em-relion (installed by bootstrap.sh)

from pyworkflow.tests import BaseTest  # noqa: E402

from conftest import ROOT, cli  # noqa: E402

TEMPLATES = ROOT / "cryoposeml" / "templates"
TRAIN_ARGS = "--widths 16 32 64"   # a small network: the test checks the plumbing, not the accuracy


def load_template(project, name, **values):
    """Fill a template's fields (by alias) the way `scipion template` does and load its protocols
    into ``project``; returns them in the template's order."""
    from pyworkflow.template import LocalTemplate

    t = LocalTemplate("cryoposeml", str(TEMPLATES / f"{name}.json.template"))
    t.replaceEnvVariables()
    t.parseContent()
    aliases = {p.getAlias() for p in t.getParams().values()}
    assert set(values) <= aliases, set(values) - aliases
    for alias, value in values.items():
        assert t.setParamValue(alias, str(value)) >= 1
    path = t.createTemplateFile()
    try:
        protocols = project.loadProtocols(path)
    finally:
        os.remove(path)
    return [project.getProtocol(p.getObjId()) for p in sorted(protocols.values(), key=lambda p: p.getObjId())]


def split_star(star, n_parts, out_dir):
    """``star`` cut into ``n_parts`` STAR files in a temporary folder (written later into the watched one)."""
    from cryoposeml.data.star import read_star, write_star

    full = read_star(star)
    parts = []
    for i, rows in enumerate(np.array_split(np.arange(len(full.particles)), n_parts)):
        part = full.copy()
        part.particles = full.particles.iloc[rows].reset_index(drop=True)
        parts.append(write_star(part, Path(out_dir) / f"batch_{i + 1}.star"))
    return parts


def set_size(sqlite: Path) -> int:
    """How many particles a protocol's output set holds now (0 before it exists)."""
    import pwem.objects as emobj

    if not sqlite.exists():
        return 0
    out = emobj.SetOfParticles(filename=str(sqlite))
    try:
        return out.getSize()
    finally:
        out.close()


def write_site_config(folder: Path) -> Path:
    """A hosts.conf as a facility writes one: its own MPI launcher (a wrapper that logs each call
    and runs Open MPI's mpirun) and a queue whose submit command is a fake scheduler (it logs the
    job script it is given, runs it in the background and answers with a job id). Returns its path."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    mpirun = folder / "site_mpirun"
    mpirun.write_text(f"#!/bin/bash\necho \"$@\" >> {folder}/mpirun.log\n"
                      f"exec {shutil.which('mpirun')} --oversubscribe \"$@\"\n")
    submit = folder / "fake_submit"
    submit.write_text(f"#!/bin/bash\necho \"$1\" >> {folder}/submitted.log\n"
                      "setsid nohup bash \"$1\" > \"$1.out\" 2>&1 < /dev/null &\n"
                      "echo \"Submitted batch job $!\"\n")
    for f in (mpirun, submit):
        f.chmod(0o755)
    hosts = folder / "hosts.conf"
    hosts.write_text(
        "[localhost]\n"
        f"PARALLEL_COMMAND = {mpirun} -np %_(JOB_NODES)d %_(COMMAND)s\n"
        "NAME = FakeQueue\nMANDATORY = 0\n"
        f"SUBMIT_COMMAND = {submit} %_(JOB_SCRIPT)s\n"
        "SUBMIT_TEMPLATE = #!/bin/bash\n"
        "    ### %_(JOB_NAME)s on queue %_(JOB_QUEUE)s: %_(JOB_NODES)d MPI x %_(JOB_THREADS)d threads\n"
        "    %_(JOB_COMMAND)s\n"
        "CANCEL_COMMAND = kill %_(JOB_ID)s\n"
        "CHECK_COMMAND = ps -p %_(JOB_ID)s -o pid= || true\n"
        'QUEUES = {"cpu": []}\n'
        'QUEUES_DEFAULT = {"JOB_GPUS": "0"}\n')
    return hosts


def wait_finished(test, prot, timeout_s=1800):
    """A protocol sent to a queue returns at once: poll the project until it ends."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        test.proj._updateProtocol(test.proj.getProtocol(prot.getObjId()))   # what the GUI's refresh does
        prot = test.proj.getProtocol(prot.getObjId())
        if prot.isFinished() or prot.isFailed() or prot.isAborted():
            break
        time.sleep(1)
    if not prot.isFinished():
        test.printLastLogLines(prot)
        raise AssertionError(f"{prot.getRunName()} ended {prot.getStatus()}: {prot.getErrorMessage()}")
    return prot


def fake_engine_env(folder: Path) -> Path:
    """What ``scipion installb cryoposeml`` leaves in CRYOPOSEML_HOME, with a ``venv/bin/python``
    that logs each call (then runs this test's Python, which has the engine)."""
    import sys

    from cryoposeml._plugin import ENV_DONE

    (folder / "venv" / "bin").mkdir(parents=True, exist_ok=True)
    python = folder / "venv" / "bin" / "python"
    python.write_text(f"#!/bin/bash\necho \"$@\" >> {folder}/calls.log\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    (folder / ENV_DONE).touch()
    return folder


def test_define_binaries_builds_the_engine_environment(monkeypatch):
    """scipion-app's real installer Environment gets one default target, cryoposeml-<version>, whose
    commands create a venv in CRYOPOSEML_HOME, install torch from the index this machine needs and
    the engine (this checkout), check it runs, and mark the environment done last; the variables
    choose torch; until the environment is done, the engine is Scipion's own Python."""
    from scipion.install.funcs import Environment
    from pwem import Domain

    from cryoposeml import __version__
    from cryoposeml._plugin import ENV_DONE, TORCH_INDEX_CPU

    Plugin = Domain.getPluginModule("cryoposeml").Plugin
    env = Environment(args=[])
    Plugin.defineBinaries(env)
    target = env.getTarget(f"cryoposeml-{__version__}")
    assert target.isDefault() and env.getTarget("cryoposeml") is not None
    home = Plugin.getHome()
    assert home.endswith(f"software/em/cryoposeml-{__version__}")
    (install,) = [c for c in target.getCommands() if "venv" in str(c._cmd)]
    steps = install._cmd.split(" && ")
    assert install._cwd == home and install._targets == [os.path.join(home, ENV_DONE)]
    assert steps[0].endswith("-m venv --clear venv") and steps[-1] == f"touch {ENV_DONE}"
    torch_step = next(s for s in steps if "torch" in s)
    expected_index = TORCH_INDEX_CPU if not __import__("shutil").which("nvidia-smi") else "cu128"
    assert expected_index in torch_step and "'torch==2.13.0'" in torch_step
    assert any(s.endswith(f"'{ROOT}[engine]'") for s in steps)          # this checkout, with its engine extra
    assert "venv/bin/python -m cryoposeml.cli --version" in steps
    # a site's choice of torch
    monkeypatch.setitem(Plugin._vars, "CRYOPOSEML_TORCH", "torch==2.5.1")
    monkeypatch.setitem(Plugin._vars, "CRYOPOSEML_TORCH_INDEX", "https://mirror.example/torch")
    assert Plugin.torchRequirement() == ("torch==2.5.1", "https://mirror.example/torch")
    # no environment built yet: the engine is this (Scipion's) Python
    monkeypatch.setitem(Plugin._vars, "CRYOPOSEML_ENGINE_PYTHON", "")
    assert not os.path.exists(os.path.join(home, ENV_DONE))
    assert Plugin.getProgram("train").split()[1:] == ["-m", "cryoposeml.cli", "train"]
    assert not Plugin.usesOwnEnvironment()
    monkeypatch.setitem(Plugin._vars, "CRYOPOSEML_ENGINE_PYTHON", "/opt/site/engine/bin/python")
    assert Plugin.getProgram("predict") == "/opt/site/engine/bin/python -m cryoposeml.cli predict"
    assert Plugin.usesOwnEnvironment()


class TestCryoposemlTemplates(BaseTest):
    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        cls.data = Path(tempfile.mkdtemp(prefix="cpml_scipion_"))
        # Every protocol of this class runs the engine from an installed engine environment.
        cls.engine = fake_engine_env(cls.data / "engine")
        cls._home = os.environ.get("CRYOPOSEML_HOME")
        os.environ["CRYOPOSEML_HOME"] = str(cls.engine)
        # 32 px particles (AdK at 3 A/px): the tests check the plumbing; Relion's refinement costs ~8x less
        for name, n, seed in (("train", 800, 1), ("new", 300, 2)):
            r = cli("simulate", "--n", n, "--no-noise", "--shift-sigma", 2, "--seed", seed, "--box-px", 32,
                    "--out", cls.data / name)
            assert r.returncode == 0, r.stderr
        r = cli("simulate", "--map", "adk_closed", "adk_open", "--n", 300, "--no-noise", "--shift-sigma", 2,
                "--seed", 3, "--out", cls.data / "two_states")
        assert r.returncode == 0, r.stderr
        import pyworkflow as pw

        from pyworkflow.project import Manager

        cls.site = cls.data / "site"
        hosts = write_site_config(cls.site)
        cls.proj = Manager().createProject(cls.__name__, hostsConf=str(hosts))
        cls.outputPath, cls.projName = cls.proj.path, cls.__name__
        os.chdir(cls.outputPath)

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)
        if cls._home is None:
            os.environ.pop("CRYOPOSEML_HOME", None)
        else:
            os.environ["CRYOPOSEML_HOME"] = cls._home

    def test_templates_load(self):
        """Every template parses, names only existing protocols, and wires outputs that exist."""
        from pwem import Domain

        protocols = Domain.getProtocols()
        from pyworkflow.template import LocalTemplate

        from pyworkflow.viewer import DESKTOP_TKINTER

        for prot in ("CryoPoseMLProtTrain", "CryoPoseMLProtPredict", "CryoPoseMLProtCleanup",
                     "CryoPoseMLProtLocalRefine", "CryoPoseMLProtAbinitio", "CryoPoseMLProtHetero"):
            found = Domain.findViewers(prot, DESKTOP_TKINTER)
            assert any(v.__module__ == "cryoposeml.viewers" for v in found), (prot, found)
        paths = sorted(TEMPLATES.glob("*.json.template"))
        assert [p.name for p in paths] == ["cryoposeml_abinitio_hetero.json.template", "cryoposeml_pipeline.json.template",
                                           "cryoposeml_streaming.json.template"]
        for path in paths:
            t = LocalTemplate("cryoposeml", str(path))
            assert t.description and t.description != "Not provided", path
            t.replaceEnvVariables()
            t.parseContent()
            for p in t.getParams().values():
                assert p.getAlias(), (path, p.getTitle())
            filled = t.createTemplateFile()   # every field replaced by its default, as `scipion template` does
            try:
                content = json.loads(Path(filled).read_text())
            finally:
                os.remove(filled)
            ids = {d["object.id"]: d["object.className"] for d in content}
            for d in content:
                assert d["object.className"] in protocols, d["object.className"]
                for key, value in d.items():
                    if isinstance(value, str) and value.split(".")[0] in ids and "." in value:
                        src, out = value.split(".", 1)
                        possible = getattr(protocols[ids[src]], "_possibleOutputs", None) or {}
                        names = possible.__members__ if hasattr(possible, "__members__") else possible
                        assert out in names, (path, key, value)

    def test_import_refuses_bad_star(self):
        """A STAR without poses imported as aligned particles fails with the file named, and leaves no output."""
        from cryoposeml.protocols import CryoPoseMLProtImportParticles

        star = self.data / "new" / "particles.star"
        prot = self.newProtocol(CryoPoseMLProtImportParticles, filesPattern=str(star), importAlignment=True)
        with pytest.raises(Exception):
            self.launchProtocol(prot)
        prot = self.proj.getProtocol(prot.getObjId())
        assert prot.isFailed() and str(star) in prot.getErrorMessage() and "no poses" in prot.getErrorMessage()
        assert not prot.hasAttribute("outputParticles")

    @pytest.mark.relion
    def test_pipeline_template(self):
        from cryoposeml.data.star import read_star

        imp_train, train, imp_new, predict, cleanup, refine = load_template(
            self.proj, "cryoposeml_pipeline", train_star=self.data / "train" / "ground_truth.star",
            new_star=self.data / "new" / "particles.star", epochs=3, box=32, train_args=TRAIN_ARGS, gpu="false",
            batch=120, sym="C1")
        for prot in (imp_train, train, imp_new, predict, cleanup):
            prot = self.launchProtocol(prot)
        # The handoff goes through the site's queue, and Relion through the site's MPI command.
        refine._useQueue.set(True)
        refine._queueParams.set(json.dumps(["cpu", {}]))
        self.proj.saveProtocol(refine)
        self.launchProtocol(refine)
        refine = wait_finished(self, refine)
        (submitted,) = (self.site / "submitted.log").read_text().split()   # one protocol went to the queue
        script = Path(self.proj.path) / submitted
        assert script.samefile(Path(self.proj.path) / refine._getLogsPath(f"{refine.strId()}.job"))
        assert "3 MPI x 1 threads" in script.read_text()
        (launched,) = (self.site / "mpirun.log").read_text().splitlines()   # only Relion runs under MPI
        assert launched.startswith("-np 3 ") and "relion_refine_mpi" in launched and "--auto_refine" in launched
        # ... and every engine command ran in the engine environment (CRYOPOSEML_HOME), none in Scipion's.
        calls = [line.split()[2:4] for line in (self.engine / "calls.log").read_text().splitlines()]
        for command in ("train", "predict", "cleanup", "refine"):
            assert any(c[0] == command for c in calls), (command, calls)
        refine_calls = [line for line in (self.engine / "calls.log").read_text().splitlines() if " refine " in line]
        assert len(refine_calls) == 2 and "--prepare-only" in refine_calls[0] and "--finish" in refine_calls[1]
        imp_train, train, imp_new, predict, cleanup, refine = (self.proj.getProtocol(p.getObjId()) for p in
                                                                (imp_train, train, imp_new, predict, cleanup, refine))
        train_parts = imp_train.outputParticles
        assert train_parts.hasAlignmentProj() and train_parts.getSize() == 800
        assert abs(train_parts.getSamplingRate() - 3.0) < 1e-6 and train_parts.hasCTF()
        new_parts = imp_new.outputParticles
        assert new_parts.getSize() == 300 and not new_parts.hasAlignment()
        model = train.outputModel
        assert model.getBox() == 32 and model.getSymmetry() == "C1" and os.path.isdir(model.getPath())

        out = predict.outputParticles
        junk = getattr(predict, "outputJunk", None)
        n_junk = junk.getSize() if junk is not None else 0
        assert out.getSize() + n_junk == 300 and n_junk <= 15 and not out.isStreamOpen() and out.hasAlignmentProj()
        ids = sorted([p.getObjId() for p in out] + ([p.getObjId() for p in junk] if junk is not None else []))
        assert ids == sorted(p.getObjId() for p in new_parts)       # every particle, exactly once
        first = out.getFirstItem()
        for attr in ("_cryoposemlExpectedError", "_cryoposemlFigureOfMerit", "_cryoposemlConfidence",
                     "_cryoposemlMatchZ", "_cryoposemlMaxProb", "_cryoposemlEscalated"):
            assert first.hasAttribute(attr), attr   # verified against the model's reference by default
        assert predict.outputVolume.hasHalfMaps()

        # A real client: scipion-em-relion's writer gives the poses of our own STAR files.
        from relion.convert import writeSetOfParticles

        exported = Path(self.proj.path) / "exported.star"
        writeSetOfParticles(out, str(exported), outputDir=str(Path(self.proj.path)))
        theirs = read_star(exported).particles.set_index("rlnImageId")
        ours = []
        for f in Path(predict._getExtraPath()).glob("batch_*/predicted.star"):
            ours.append(read_star(f).particles.set_index("rlnImageId"))
        assert len(ours) == 3   # 300 particles in batches of 120
        ours = pd.concat(ours).loc[theirs.index]
        from cryoposeml.core.rotations import euler_to_matrix, geodesic_distance_deg

        cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
        d = geodesic_distance_deg(euler_to_matrix(theirs[cols].to_numpy()), euler_to_matrix(ours[cols].to_numpy()))
        assert np.max(d) < 0.01, np.max(d)
        for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
            np.testing.assert_allclose(theirs[c].to_numpy(), ours[c].to_numpy(), atol=0.01)

        kept, gone = cleanup.outputParticles, getattr(cleanup, "outputDiscarded", None)
        n_gone = gone.getSize() if gone is not None else 0
        assert kept.getSize() + n_gone == out.getSize() and kept.getSize() >= 150   # auto keeps >= 50%
        if n_gone:   # verified poses are ranked by their match z (junk matches no view of the map)
            worst_kept = min(p._cryoposemlMatchZ.get() for p in kept)
            best_gone = max(p._cryoposemlMatchZ.get() for p in gone)
            assert worst_kept >= best_gone
        assert os.path.exists(cleanup._getExtraPath("kept_cleanup.png"))
        assert cleanup.summaryJson()["particles_in"] == out.getSize()

        assert refine.outputParticles.getSize() == kept.getSize() and refine.outputVolume.hasHalfMaps()
        s = refine.summaryJson()
        # the search width comes from the kept particles' (verified, calibrated) expected errors
        from cryoposeml.engine.refine import choose_search

        expected = np.array([p._cryoposemlExpectedError.get() for p in kept])
        assert abs(s["search"]["sigma_ang_deg"] - choose_search(expected)["sigma_ang"]) < 1e-6
        # (Whether Relion converges from such poses is not this test's business; the CLI tests check
        # the refinement itself.) The Scipion set carries exactly Relion's poses and shifts:
        from cryoposeml.core.rotations import scipion_matrix_to_relion

        relion_rows = read_star(Path(refine._getExtraPath("refine", "refined.star"))).particles.set_index("rlnImageId")
        parts = list(refine.outputParticles)
        angles, shifts_px = scipion_matrix_to_relion(np.array([p.getTransform().getMatrix() for p in parts]))
        rel = relion_rows.loc[[p.getObjId() for p in parts]]
        d = geodesic_distance_deg(euler_to_matrix(angles), euler_to_matrix(rel[cols].to_numpy()))
        assert np.max(d) < 0.01, np.max(d)
        np.testing.assert_allclose(shifts_px[:, 0] * 3.0, rel["rlnOriginXAngst"].to_numpy(), atol=0.01)
        # ... and Relion searched around the priors we wrote, which it kept.
        np.testing.assert_allclose(rel["rlnAngleTiltPrior"].to_numpy(),
                                   read_star(Path(refine._getExtraPath("refine", "input.star"))).particles
                                   .set_index("rlnImageId").loc[rel.index, "rlnAngleTilt"].to_numpy(), atol=1e-3)

        # The viewers draw each protocol's results from its files and output sets.
        from cryoposeml.viewers import (CryoPoseMLViewerCleanup, CryoPoseMLViewerPredict, CryoPoseMLViewerRefine,
                                        CryoPoseMLViewerTrain)

        def figure(viewer_class, prot):
            viewer = viewer_class(project=self.proj, protocol=prot)
            return viewer.figure(next(iter(viewer_class._figures)))   # the first plot of each viewer

        fig = figure(CryoPoseMLViewerTrain, train)
        assert [len(line.get_xdata()) for line in fig.axes[1].lines] == [3, 3]        # 3 epochs: median, mean
        fig = figure(CryoPoseMLViewerPredict, predict)
        assert fig.axes[0].collections[0].get_array().sum() == out.getSize()         # every particle's direction
        assert sum(p.get_height() for p in fig.axes[2].patches) == out.getSize()     # expected-error histogram
        live = CryoPoseMLViewerPredict(project=self.proj, protocol=predict).figure("showLiveMap")
        assert len(live.axes[4].lines[0].get_xdata()) == 3                          # 3 batches of 120, 120, 60
        fig = figure(CryoPoseMLViewerCleanup, cleanup)
        assert len(fig.axes[0].lines[0].get_xdata()) == len(cleanup.summaryJson()["sweep"])
        fig = figure(CryoPoseMLViewerRefine, refine)
        assert len(fig.axes[1].collections[0].get_offsets()) == kept.getSize()        # pose change per particle
        assert np.all(rel["rlnCpmlPoseChangeDeg"].to_numpy() >= 0)

    def test_abinitio_hetero_template(self):
        """The third template, particles without poses -> ab initio -> conformations: ab initio gives a
        volume with its half-maps and aligned particles (every particle once); a second run continues
        the first from its checkpoints; heterogeneity starts from the ab initio poses and gives particles
        with their z and class, 3D classes with a volume each, and the class volumes with half-maps (the
        Scipion classes are the CLI's); the viewers draw the curves and z by class. (Plumbing only, a few
        epochs at 16 px: convergence and separation are tested in test_abinitio.py / test_hetero.py.)"""
        from cryoposeml.data.star import read_star
        from cryoposeml.protocols import CryoPoseMLProtAbinitio
        from cryoposeml.viewers import CryoPoseMLViewerAbinitio, CryoPoseMLViewerHetero

        imp, ab, het = load_template(self.proj, "cryoposeml_abinitio_hetero",
                                     particles_star=self.data / "two_states" / "particles.star", abinitio_epochs=2,
                                     box=16, abinitio_args="--widths 8 16", gpu="false", classes=2, hetero_epochs=4,
                                     hetero_args="--widths 8 16")
        for name, value in (("encoder", 1), ("loss", 1), ("searchEpochs", 1), ("batchSize", 32)):
            getattr(ab, name).set(value)
        het.zdim.set(3)
        het.batchSize.set(16)
        for prot in (imp, ab, het):
            self.proj.saveProtocol(prot)
            self.launchProtocol(prot)
        imp, ab, het = (self.proj.getProtocol(p.getObjId()) for p in (imp, ab, het))
        assert not imp.outputParticles.hasAlignmentProj()

        vol, parts = ab.outputVolume, ab.outputParticles
        assert vol.getDim() == (64, 64, 64) and vol.getSamplingRate() == pytest.approx(1.5)
        assert all(os.path.exists(h) for h in vol.getHalfMaps().split(","))
        assert parts.getSize() == 300 and parts.hasAlignmentProj()
        assert sorted(p.getObjId() for p in parts) == sorted(p.getObjId() for p in imp.outputParticles)
        s = ab.summaryJson()
        assert s["half_maps_independent"] and set(s["runs"]) == {"half1", "half2"}
        assert any("Gold-standard half-map FSC" in line for line in ab.summary())
        fig = CryoPoseMLViewerAbinitio(project=self.proj, protocol=ab).figure("showCurves")
        assert len(fig.axes[0].lines[0].get_xdata()) == 2

        parts, classes, volumes = het.outputParticles, het.outputClasses, het.outputVolumes
        assert parts.getSize() == 300 and parts.hasAlignmentProj()
        star = read_star(Path(het._getExtraPath("hetero", "particles.star"))).particles.set_index("rlnImageId")
        for p in parts:
            assert len(p._cryoposemlZ) == 3
            assert p.getClassId() == star.loc[p.getObjId(), "rlnClassNumber"]
            assert float(p._cryoposemlZ[0]) == pytest.approx(star.loc[p.getObjId(), "rlnCpmlZ1"], abs=1e-5)
        assert classes.getSize() == 2 and sum(c.getSize() for c in classes) == 300
        for c in classes:
            assert os.path.exists(c.getRepresentative().getFileName())
        assert volumes.getSize() == 2 and all(v.hasHalfMaps() for v in volumes)
        assert any("Entanglement" in line for line in het.summary())
        fig = CryoPoseMLViewerHetero(project=self.proj, protocol=het).figure("showLatent")
        assert len(fig.axes[0].collections[0].get_offsets()) == 300

        # continue ab initio: the copy resumes from the checkpoints, so no epoch is trained again
        kwargs = {name: getattr(ab, name).get() for name in ("encoder", "loss", "epochs", "searchEpochs", "boxPx",
                                                              "batchSize", "extraParams", "useGpu")}
        more = self.launchProtocol(self.newProtocol(CryoPoseMLProtAbinitio, continueRun=ab,
                                                    inputParticles=imp.outputParticles, **kwargs))
        assert more.summaryJson()["runs"]["half1"]["epochs_run"] == 2
        assert "resuming" in open(more.getLogPaths()[0]).read() + open(more.getLogPaths()[1]).read()

    @classmethod
    def _model(cls):
        """A small model folder trained with the CLI (once per class)."""
        model = cls.data / "model"
        if not (model / "model.json").exists():
            r = cli("train", "--particles", cls.data / "train" / "ground_truth.star", "--out", model, "--epochs", 2,
                    "--box-px", 32, *TRAIN_ARGS.split(), "--device", "cpu")
            assert r.returncode == 0, r.stderr
        return model

    def _waitFinished(self, protocols, timeout=900, until=None):
        """Poll scheduled protocols until all finish (or ``until()`` is true); fail on a failure."""
        t0 = time.time()
        while time.time() - t0 < timeout:
            fresh = [self.proj.getProtocol(p.getObjId()) for p in protocols]
            for p in fresh:
                self.proj._updateProtocol(p)
            fresh = [self.proj.getProtocol(p.getObjId()) for p in protocols]
            for p in fresh:
                if p.isFailed() or p.isAborted():
                    self.printLastLogLines(p)
                    raise AssertionError(f"{p.getRunName()} failed: {p.getErrorMessage()}")
            if until is not None and until():
                return fresh
            if until is None and all(p.isFinished() for p in fresh):
                return fresh
            time.sleep(1)
        for p in protocols:
            self.printLastLogLines(p)
        raise AssertionError(f"timed out after {timeout} s")

    def _keptAndJunk(self, predict):
        """The ids predict kept and dropped as junk: each particle in exactly one, once; the live map
        holds exactly the kept ones; the junk failed the match-score test, the kept passed it."""
        kept = [p.getObjId() for p in predict.outputParticles]
        junk_set = getattr(predict, "outputJunk", None)
        junk = [p.getObjId() for p in junk_set] if junk_set is not None else []
        assert len(kept) + len(junk) == len(set(kept) | set(junk)) == 300, (len(kept), len(junk))
        threshold = predict.junkQuantile.get()
        assert all(p._cryoposemlMatchQuantile.get() >= threshold for p in predict.outputParticles)
        if junk_set is not None:
            assert all(p._cryoposemlMatchQuantile.get() < threshold for p in junk_set)
            assert not junk_set.isStreamOpen()
        live = json.loads(Path(predict._getExtraPath("live", "history.json")).read_text())["batches"]
        assert live[-1]["particles_kept"] == len(kept) and sum(r["junk_dropped_batch"] for r in live) == len(junk)
        return kept, junk

    def test_streaming_template(self):
        """Three STAR files arrive one after another; predict works on each while the input is still
        open; every particle appears exactly once; outputs close; cleanup runs at the end."""
        model = self._model()
        staging, watched = self.data / "staging", self.data / "incoming"
        staging.mkdir(), watched.mkdir()
        parts = split_star(self.data / "new" / "particles.star", 3, staging)
        imp, predict, cleanup = load_template(
            self.proj, "cryoposeml_streaming", pattern=watched / "*.star", file_timeout=1, timeout=600,
            end_marker=watched / "DONE", sleep=2, model=model, batch=100, gpu="false", sym="C1")
        for prot in (imp, predict, cleanup):
            self.proj.scheduleProtocol(prot)

        folder = Path(self.proj.getProtocol(predict.getObjId())._getPath())

        def n_predicted():   # kept + junk
            return set_size(folder / "particles.sqlite") + set_size(folder / "junk.sqlite")

        for k, star in enumerate(parts):
            # Written into the watched folder only now (same folder as the stacks' STAR: paths stay valid).
            os.replace(star, watched / star.name)
            if k < len(parts) - 1:   # predicted while the import is still open
                self._waitFinished([imp, predict, cleanup], timeout=600, until=lambda: n_predicted() >= 100 * (k + 1))
                fresh_imp = self.proj.getProtocol(imp.getObjId())
                assert fresh_imp.outputParticles.isStreamOpen()
                # the running map is there after each batch, with that batch's row, while the input is open
                rows = json.loads((folder / "extra" / "live" / "history.json").read_text())["batches"]
                assert len(rows) >= k + 1 and (folder / "extra" / "live" / "map.mrc").exists(), rows
        (watched / "DONE").touch()
        imp, predict, cleanup = self._waitFinished([imp, predict, cleanup], timeout=900)

        assert imp.outputParticles.getSize() == 300 and not imp.outputParticles.isStreamOpen()
        out = predict.outputParticles
        assert not out.isStreamOpen()
        kept, junk = self._keptAndJunk(predict)
        assert set(kept) | set(junk) == set(imp.outputParticles.getIdSet())
        assert len(list(Path(predict._getExtraPath()).glob("batch_*/predicted.star"))) == 3   # one per arrival
        # the live map grew with each arrival, holds exactly the kept particles, and is the output volume
        live = json.loads(Path(predict._getExtraPath("live", "history.json")).read_text())["batches"]
        assert [r["particles_seen"] for r in live] == [100, 200, 300], live
        assert all(r["resolution_fsc0143_angstrom"] for r in live), live      # a resolution after every batch
        assert 250 <= live[-1]["particles_kept"] <= 300 and live[-1]["resolution_fsc0143_angstrom"] < 20, live
        assert predict.outputVolume.hasHalfMaps() and "live" in predict.outputVolume.getFileName()
        from cryoposeml.viewers import CryoPoseMLViewerPredict

        fig = CryoPoseMLViewerPredict(project=self.proj, protocol=predict).figure("showLiveMap")
        assert [len(ax.lines[0].get_xdata()) for ax in fig.axes[4:6]] == [3, 3]   # resolution vs particles, time
        fig.savefig(Path(self.proj.path) / "live_map_viewer.png")
        sources = imp.outputParticles.getUniqueValues("_cryoposemlSourceStar")
        assert sorted(Path(s).name for s in sources) == ["batch_1.star", "batch_2.star", "batch_3.star"]
        assert cleanup.summaryJson()["particles_in"] == len(kept)

    def test_streaming_kill_and_resume(self):
        """Import and predict are killed mid-stream (after the first of three STAR files), more files
        arrive, both are resumed: every particle is imported and predicted exactly once."""
        from pyworkflow.protocol.constants import MODE_RESUME

        staging, watched = self.data / "staging_kill", self.data / "incoming_kill"
        staging.mkdir(), watched.mkdir()
        parts = split_star(self.data / "new" / "particles.star", 3, staging)
        imp, predict, _ = load_template(
            self.proj, "cryoposeml_streaming", pattern=watched / "*.star", file_timeout=1, timeout=600,
            end_marker=watched / "DONE", sleep=2, model=self._model(), batch=100, gpu="false", sym="C1")
        folder = Path(predict._getPath())

        def n_predicted():   # kept + junk
            return set_size(folder / "particles.sqlite") + set_size(folder / "junk.sqlite")

        os.replace(parts[0], watched / parts[0].name)
        for prot in (imp, predict):
            self.proj.scheduleProtocol(prot)
        self._waitFinished([imp, predict], timeout=600, until=lambda: n_predicted() >= 100)
        for prot in (predict, imp):
            self.proj.stopProtocol(self.proj.getProtocol(prot.getObjId()))
        assert n_predicted() == 100
        for star in parts[1:]:
            os.replace(star, watched / star.name)
        (watched / "DONE").touch()

        for prot in (imp, predict):   # Continue, as the GUI does: the import first, so predict sees it close
            prot = self.proj.getProtocol(prot.getObjId())
            prot.runMode.set(MODE_RESUME)
            self.proj.launchProtocol(prot, wait=True)
            prot = self.proj.getProtocol(prot.getObjId())
            assert prot.isFinished(), (prot.getRunName(), prot.getStatus(), prot.getErrorMessage())
        imp, predict = (self.proj.getProtocol(p.getObjId()) for p in (imp, predict))
        imported = [p.getObjId() for p in imp.outputParticles]
        assert len(imported) == len(set(imported)) == 300 and not imp.outputParticles.isStreamOpen()
        sources = [p._cryoposemlSourceStar.get() for p in imp.outputParticles]
        assert sorted(Path(s).name for s in set(sources)) == ["batch_1.star", "batch_2.star", "batch_3.star"]
        assert all(sources.count(s) == 100 for s in set(sources))
        kept, junk = self._keptAndJunk(predict)
        assert set(kept) | set(junk) == set(imported)
        assert not predict.outputParticles.isStreamOpen()
        live = json.loads(Path(predict._getExtraPath("live", "history.json")).read_text())["batches"]
        assert len({r["batch"] for r in live}) == len(live) == 3 and live[-1]["particles_seen"] == 300, live
