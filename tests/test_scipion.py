"""The Scipion plugin in a real headless pyworkflow project: import -> train -> predict -> cleanup
-> Relion local refine, and what a real client (scipion-em-relion's writer) reads from our output."""
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pwem")
pytest.importorskip("relion")   # scipion-em-relion (installed by bootstrap.sh)

from pyworkflow.tests import BaseTest, setupTestProject  # noqa: E402

from conftest import cli  # noqa: E402


class TestCryoposemlPipeline(BaseTest):
    @classmethod
    def setUpClass(cls):
        cls._cwd = os.getcwd()
        cls.data = Path(tempfile.mkdtemp(prefix="cpml_scipion_"))
        for name, n, seed in (("train", 800, 1), ("new", 300, 2)):
            r = cli("simulate", "--n", n, "--no-noise", "--shift-sigma", 2, "--seed", seed, "--out", cls.data / name)
            assert r.returncode == 0, r.stderr
        import pyworkflow as pw

        os.makedirs(os.path.dirname(pw.Config.SCIPION_HOSTS), exist_ok=True)
        setupTestProject(cls, writeLocalConfig=True)

    @classmethod
    def tearDownClass(cls):
        os.chdir(cls._cwd)

    def _import(self, star, label):
        from pwem.protocols import ProtImportParticles

        prot = self.newProtocol(ProtImportParticles, objLabel=label, importFrom=ProtImportParticles.IMPORT_FROM_RELION,
                                starFile=str(star), samplingRate=1.5, magnification=10000,
                                haveDataBeenPhaseFlipped=False)
        self.launchProtocol(prot)
        return prot.outputParticles

    def test_pipeline(self):
        from cryoposeml.protocols import (CryoPoseMLProtCleanup, CryoPoseMLProtLocalRefine, CryoPoseMLProtPredict,
                                          CryoPoseMLProtTrain)
        from cryoposeml.data.star import read_star

        train_parts = self._import(self.data / "train" / "ground_truth.star", "training particles")
        assert train_parts.hasAlignmentProj() and train_parts.getSize() == 800
        new_parts = self._import(self.data / "new" / "particles.star", "new particles")

        train = self.newProtocol(CryoPoseMLProtTrain, inputParticles=train_parts, epochs=3, boxPx=32, useGpu=False,
                                 extraParams="--widths 16 32 64")
        self.launchProtocol(train)
        model = train.outputModel
        assert model.getBox() == 64 and model.getSymmetry() == "C1" and os.path.isdir(model.getPath())

        predict = self.newProtocol(CryoPoseMLProtPredict, inputParticles=new_parts, inputModel=model, useGpu=False,
                                   batchSize=120, numberOfThreads=3, streamingSleepOnWait=0)
        self.launchProtocol(predict)
        out = predict.outputParticles
        assert out.getSize() == 300 and not out.isStreamOpen() and out.hasAlignmentProj()
        ids = sorted(p.getObjId() for p in out)
        assert ids == sorted(p.getObjId() for p in new_parts)       # every particle, exactly once
        first = out.getFirstItem()
        for attr in ("_cryoposemlExpectedError", "_cryoposemlFigureOfMerit", "_cryoposemlConfidence"):
            assert first.hasAttribute(attr), attr
        assert predict.outputVolume.hasHalfMaps()

        # A real client: scipion-em-relion's writer gives the poses of our own STAR files.
        from relion.convert import writeSetOfParticles

        exported = Path(self.proj.path) / "exported.star"
        writeSetOfParticles(out, str(exported), outputDir=str(Path(self.proj.path)))
        theirs = read_star(exported).particles.set_index("rlnImageId")
        ours = []
        for f in Path(predict._getExtraPath()).glob("batch_*/predicted.star"):
            ours.append(read_star(f).particles.set_index("rlnImageId"))
        import pandas as pd

        assert len(ours) == 3   # 300 particles in batches of 120
        ours = pd.concat(ours).loc[theirs.index]
        from cryoposeml.core.rotations import euler_to_matrix, geodesic_distance_deg

        cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
        d = geodesic_distance_deg(euler_to_matrix(theirs[cols].to_numpy()), euler_to_matrix(ours[cols].to_numpy()))
        assert np.max(d) < 0.01, np.max(d)
        for c in ("rlnOriginXAngst", "rlnOriginYAngst"):
            np.testing.assert_allclose(theirs[c].to_numpy(), ours[c].to_numpy(), atol=0.01)

        cleanup = self.newProtocol(CryoPoseMLProtCleanup, inputParticles=out, method=1, quantile=0.2)
        self.launchProtocol(cleanup)
        kept = cleanup.outputParticles
        assert kept.getSize() == 240 and cleanup.outputDiscarded.getSize() == 60
        worst_kept = max(p._cryoposemlExpectedError.get() for p in kept)
        best_gone = min(p._cryoposemlExpectedError.get() for p in cleanup.outputDiscarded)
        assert worst_kept <= best_gone

        refine = self.newProtocol(CryoPoseMLProtLocalRefine, inputParticles=kept, numberOfMpi=3)
        self.launchProtocol(refine)
        assert refine.outputParticles.getSize() == 240 and refine.outputVolume.hasHalfMaps()
        s = refine.summaryJson()
        assert s["search"]["sigma_ang_deg"] == 30.0   # a 3-epoch network: the widest prior
        # (Whether Relion converges from such poses is not this test's business; the CLI tests check
        # the refinement itself.) The Scipion set carries exactly Relion's poses and shifts:
        from cryoposeml.core.rotations import scipion_matrix_to_relion

        relion_rows = read_star(Path(refine._getExtraPath("refine", "refined.star"))).particles.set_index("rlnImageId")
        parts = list(refine.outputParticles)
        angles, shifts_px = scipion_matrix_to_relion(np.array([p.getTransform().getMatrix() for p in parts]))
        rel = relion_rows.loc[[p.getObjId() for p in parts]]
        d = geodesic_distance_deg(euler_to_matrix(angles), euler_to_matrix(rel[cols].to_numpy()))
        assert np.max(d) < 0.01, np.max(d)
        np.testing.assert_allclose(shifts_px[:, 0] * 1.5, rel["rlnOriginXAngst"].to_numpy(), atol=0.01)
        # ... and Relion searched around the priors we wrote, which it kept.
        np.testing.assert_allclose(rel["rlnAngleTiltPrior"].to_numpy(),
                                   read_star(Path(refine._getExtraPath("refine", "input.star"))).particles
                                   .set_index("rlnImageId").loc[rel.index, "rlnAngleTilt"].to_numpy(), atol=1e-3)
