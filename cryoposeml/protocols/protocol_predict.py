import os
import time

import pyworkflow.protocol.params as params
from pyworkflow import BETA
from pyworkflow.object import Set
from pyworkflow.protocol import ProtStreamingBase, STEPS_PARALLEL
import pwem.objects as emobj
from pwem.protocols import ProtRefine3D

from ..convert import fillParticles, writeParticlesStar
from ..objects import readModelMetadata
from .protocol_base import CryoPoseMLProtBase

SOURCE_RUN, SOURCE_FOLDER = 0, 1
#: the choices of the "Verify against the map" field, as `cryoposeml predict --matching` names them
MATCHING_CHOICES = ("auto", "proposals", "exhaustive", "none")


# A dict, not an Enum: two outputs of the same class would be aliases in an Enum.
OUT_PARTICLES, OUT_JUNK, OUT_VOLUME = "outputParticles", "outputJunk", "outputVolume"
PREDICT_OUTPUTS = {OUT_PARTICLES: emobj.SetOfParticles, OUT_JUNK: emobj.SetOfParticles, OUT_VOLUME: emobj.Volume}


class CryoPoseMLProtPredict(CryoPoseMLProtBase, ProtStreamingBase, ProtRefine3D):
    """Predict the pose (rotation, shift) of every particle with a trained network, verified
    against the consensus map the model keeps (or a map you give): the network proposes poses, the
    map scores them, refines them locally and searches exhaustively where they do not explain the
    particle. Each output particle carries `_cryoposemlExpectedError` (calibrated expected angular
    error, degrees), `_cryoposemlFigureOfMerit` (0..1), `_cryoposemlMatchZ` (how much better the
    pose matches than a random view, in noise SDs: junk scores low), `_cryoposemlMaxProb`
    (Relion's rlnMaxValueProbDistribution), `_cryoposemlEscalated` and `_cryoposemlConfidence`.

    Junk: a particle whose verified pose matches the map worse than all but a small fraction of the
    model's own good particles (`_cryoposemlMatchQuantile` under the threshold, 1% by default, fixed
    when the model was trained) goes to `outputJunk` instead, batch by batch.

    Streaming: while the input set is still open (particles arriving from the microscope), new
    particles are predicted in batches as they come and appended to an open output, which is
    closed when the input closes. One worker process (``cryoposeml predict --spool``) keeps the
    network, the map and its projection library loaded for every batch; its log is
    ``extra/spool/<start>/worker.log``. The map grows with each batch (its particles that pass
    the junk test go into running half-maps, ``extra/live``), so the output volume and its
    resolution are there while the microscope collects; or, without that, a volume with
    half-maps is reconstructed from all predicted poses at the end.
    """
    _label = "predict poses"
    _devStatus = BETA
    _possibleOutputs = PREDICT_OUTPUTS
    stepsExecutionMode = STEPS_PARALLEL

    def _defineParams(self, form):
        form.addSection(label="Input")
        form.addParam("inputParticles", params.PointerParam, pointerClass="SetOfParticles", important=True,
                      label="Particles", help="Particles to give a pose (same box and pixel size as the training).")
        form.addParam("modelSource", params.EnumParam, choices=["a previous training run", "a model folder"],
                      default=SOURCE_RUN, display=params.EnumParam.DISPLAY_HLIST, label="Model from",
                      help="A training run of this project, or a model folder written by `cryoposeml train` "
                           "(another project, another machine).")
        form.addParam("inputModel", params.PointerParam, pointerClass="CryoPoseMLModel", allowsNull=True,
                      condition=f"modelSource == {SOURCE_RUN}", label="Trained model",
                      help="The output of a 'train pose network' run (its networks and consensus map).")
        form.addParam("modelFolder", params.PathParam, condition=f"modelSource == {SOURCE_FOLDER}",
                      label="Model folder", help="A folder written by `cryoposeml train` (with model.json).")
        form.addParam("batchSize", params.IntParam, default=1000, label="Particles per batch",
                      help="In streaming, particles are predicted as soon as this many new ones have arrived "
                           "(and the rest when the input closes).")
        form.addParam("reconstruct", params.BooleanParam, default=True, label="Reconstruct a volume?",
                      help="A map and half-maps from the predicted poses (see 'Grow the map with each batch').")
        form.addParam("liveMap", params.BooleanParam, default=True, condition="reconstruct",
                      label="Grow the map with each batch?",
                      help="Yes: after each batch, its particles that pass the junk test (they match the map at "
                           "least as well as 1% of the model's good particles) go into running half-maps, so "
                           "the volume and its resolution grow while the microscope collects (extra/live: "
                           "history.json and live.png give the resolution against particles kept). Earlier "
                           "batches are not read again; the output volume is this map. No: one reconstruction of "
                           "all predicted particles once the input closes."),
        form.addParam("dropJunk", params.BooleanParam, default=True, label="Drop junk as it comes?",
                      help="Yes: particles whose verified pose matches the model's map worse than the given "
                           "fraction of the model's own good training particles (their match-score quantile, "
                           "fixed when the model was trained) go to a separate output, 'outputJunk', and not "
                           "into the map. Needs verification against the model's own map (not 'none', no other "
                           "reference); otherwise every particle is kept. No: every particle is kept.")
        form.addParam("junkQuantile", params.FloatParam, default=0.01, condition="dropJunk",
                      label="Junk threshold (quantile)",
                      help="Drop a particle that matches the map worse than this fraction of the model's good "
                           "particles: 0.01 loses about 1% of good particles; 0.02-0.03 removes more junk "
                           "(measured: docs/verified_prediction.md).")
        form.addParam("matching", params.EnumParam, choices=list(MATCHING_CHOICES), default=0,
                      label="Verify against the map",
                      help="auto: the network proposes, the map decides; particles the proposals do not explain "
                           "are searched exhaustively (the threshold was calibrated when the model was trained). "
                           "proposals: never search exhaustively (fastest). exhaustive: ignore the network's "
                           "rotations and search every particle against the map. none: the network alone (use it "
                           "for a model trained before references were kept, or to compare).")
        form.addParam("referenceVolume", params.PointerParam, pointerClass="Volume", allowsNull=True,
                      condition="matching != 3", label="Reference map (optional)",
                      help="Match against this map (same box and pixel size as the particles; with half-maps, "
                           "half k particles go to half-map k and the working resolution comes from their FSC). "
                           "Empty: the consensus map of the training particles kept in the model.")
        form.addParam("symmetry", params.StringParam, default="", expertLevel=params.LEVEL_ADVANCED,
                      label="Symmetry check", help="If given, the model must have been trained with this symmetry.")
        self._defineGpuParams(form)
        form.addParallelSection(threads=3, mpi=0)
        self._defineStreamingParams(form)

    # -------------------------- helpers ------------------------------------
    def _modelPath(self):
        if self.modelSource.get() == SOURCE_RUN:
            model = self.inputModel.get()
            return None if model is None else model.getPath()
        return self.modelFolder.get()

    def _outputSqlite(self):
        return self._getPath("particles.sqlite")

    def _junkSqlite(self):
        return self._getPath("junk.sqlite")

    def _junkThreshold(self):
        """The match-score quantile under which a particle is junk (0: none is)."""
        return float(self.junkQuantile.get()) if self.dropJunk.get() else 0.0

    def _loadInput(self):
        """The input set reloaded from its database (it may have grown since the last look)."""
        inp = self.inputParticles.get()
        fresh = emobj.SetOfParticles(filename=inp.getFileName())
        fresh.loadAllProperties()
        return fresh

    def _doneIds(self):
        """Ids already in an output (kept or junk)."""
        ids = set()
        for path in (self._outputSqlite(), self._junkSqlite()):
            if os.path.exists(path):
                out = emobj.SetOfParticles(filename=path)
                ids.update(out.getIdSet())
                out.close()
        return ids

    # -------------------------- steps --------------------------------------
    def stepsGeneratorStep(self):
        """Schedule one prediction step per batch of new particles until the input closes. Particles
        already in the output (from before a kill) are not predicted again."""
        done = self._doneIds()
        scheduled, steps = set(), []
        batch = max(1, self.batchSize.get())
        while True:
            inp = self._loadInput()
            closed = not inp.isStreamOpen()
            new = sorted(i for i in inp.getIdSet() if i not in done and i not in scheduled)
            inp.close()
            while new and (len(new) >= batch or closed):
                chunk, new = new[:batch], new[batch:]
                steps.append(self._insertFunctionStep(self.predictBatchStep, chunk, prerequisites=[]))
                scheduled.update(chunk)
            if closed:
                break
            if getattr(self, "_worker", None) is not None:
                self._spoolClient.heartbeat()   # the worker stays while the input may still grow
            self._streamingSleepOnWait()
        self._insertFunctionStep(self.closeOutputStep, prerequisites=steps, needsGPU=False)

    def predictBatchStep(self, ids):
        tag = f"{ids[0]:08d}_{ids[-1]:08d}"
        inp = self._loadInput()
        subset = emobj.SetOfParticles(filename=self._getTmpPath(f"batch_{tag}.sqlite"))
        subset.copyInfo(inp)
        wanted = set(ids)
        # only this batch's id range is read from the database, not the whole (growing) input
        for p in inp.iterItems(where=f"id >= {min(ids)} AND id <= {max(ids)}"):
            if p.getObjId() in wanted:
                subset.append(p.clone())
        subset.write()
        # One folder per batch: batches run in parallel, and the converter links stacks into it.
        folder = self._getExtraPath(f"batch_{tag}")
        os.makedirs(folder, exist_ok=True)
        star_in, star_out = os.path.join(folder, "particles.star"), os.path.join(folder, "predicted.star")
        writeParticlesStar(subset, star_in, folder)
        for old in (star_out, star_out.replace(".star", ".json"), star_out.replace(".star", ".png")):
            if os.path.exists(old):   # left by a run of this batch that was killed
                os.remove(old)
        self._predictWithWorker(tag, star_in, star_out)
        with self._lock:
            done = self._doneIds()
            out, junk = self._openOutput(inp), None
            fresh = emobj.SetOfParticles(filename=self._getTmpPath(f"batch_{tag}_out.sqlite"))
            fillParticles(fresh, subset, star_out)
            threshold = self._junkThreshold()
            for p in fresh.iterItems():
                if p.getObjId() in done:   # never twice, even when a batch is redone after a kill
                    continue
                if threshold > 0 and hasattr(p, "_cryoposemlMatchQuantile") and p._cryoposemlMatchQuantile.get() < threshold:
                    junk = junk or self._openOutput(inp, self._junkSqlite())
                    junk.append(p.clone())
                else:
                    out.append(p.clone())
            self._updateOutputSet(OUT_PARTICLES, out, state=Set.STREAM_OPEN)
            if junk is not None:
                self._updateOutputSet(OUT_JUNK, junk, state=Set.STREAM_OPEN)
            if self._growsLiveMap():
                self._defineLiveVolume(inp.getSamplingRate())
        inp.close()
        subset.close()

    # -------------------------- the worker ---------------------------------
    def _workerArgs(self):
        args = f"--model {self._modelPath()} --matching {MATCHING_CHOICES[self.matching.get()]}"
        if self.symmetry.get():
            args += f" --sym {self.symmetry.get()}"
        if self._growsLiveMap():   # the map takes exactly the particles this protocol keeps
            args += f" --live-map {self._livePath()} --junk-quantile {self._junkThreshold()}"
        return args + self._referenceArgs()

    def _growsLiveMap(self):
        return bool(self.reconstruct.get()) and bool(self.liveMap.get())

    def _livePath(self, *names):
        return self._getExtraPath("live", *names)

    def _defineLiveVolume(self, samplingRate):
        """The live map as the output volume, once it exists (its files change under it as batches
        come; Scipion shows the latest)."""
        if hasattr(self, OUT_VOLUME) or not os.path.exists(self._livePath("map.mrc")):
            return
        vol = self._halfMapVolume(self._livePath("map.mrc"), samplingRate)
        self._defineOutputs(**{OUT_VOLUME: vol})
        self._defineSourceRelation(self.inputParticles, vol)

    def _ensureWorker(self):
        """The prediction worker of this execution, started at the first batch. A worker left
        by an earlier execution (the protocol was killed) is told to stop; each execution has its
        own spool folder, so the two never share a request."""
        from ..engine.spool import SpoolClient

        with self._lock:
            worker = getattr(self, "_worker", None)
            if worker is not None and worker.poll() is None:
                return self._spoolClient
            root = self._getExtraPath("spool")
            os.makedirs(root, exist_ok=True)
            for old in os.listdir(root):
                SpoolClient(os.path.join(root, old)).stop()
            folder = os.path.join(root, f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{len(os.listdir(root))}")
            client = SpoolClient(folder)
            client.heartbeat()
            # the worker gives up on a client silent for 10 streaming sleeps (at least 2 min): a protocol
            # killed without its children leaves no worker behind for long
            stale = max(120, 10 * self._getStreamingSleepOnWait())
            args = f"{self._workerArgs()} --spool {folder} --stale-after {stale}"
            self._worker = self.startCryoposeml("predict", args, os.path.join(folder, "worker.log"))
            self._spoolClient = client
            return client

    def _predictWithWorker(self, tag, star_in, star_out):
        """Hand one batch to the worker and wait for it. A refused batch (bad input) or a worker
        that exits fails the step with the worker's message."""
        client = self._ensureWorker()
        worker = self._worker
        client.submit(tag, star_in, star_out)
        while True:
            summary = client.result(tag)   # raises when the batch was refused or the worker is gone
            if summary is not None:
                return summary
            if worker.poll() is not None and client.result(tag) is None:
                raise RuntimeError(f"the prediction worker exited (code {worker.returncode}) before batch {tag}; "
                                   f"see {os.path.join(client.folder, 'worker.log')}")
            client.heartbeat()
            time.sleep(0.5)

    def _stopWorker(self):
        worker = getattr(self, "_worker", None)
        if worker is None:
            return
        self._spoolClient.stop()
        try:
            worker.wait(timeout=120)
        except Exception:
            worker.kill()
        self._worker = None

    def _openOutput(self, inp, path=None):
        path = path or self._outputSqlite()
        if os.path.exists(path):
            out = emobj.SetOfParticles(filename=path)
            out.loadAllProperties()
            out.enableAppend()
        else:
            out = emobj.SetOfParticles(filename=path)
            out.copyInfo(inp)
            out.setAlignmentProj()
        return out

    def closeOutputStep(self):
        self._stopWorker()
        with self._lock:
            out = self._openOutput(self._loadInput())
            self._updateOutputSet(OUT_PARTICLES, out, state=Set.STREAM_CLOSED)
            if os.path.exists(self._junkSqlite()):
                junk = self._openOutput(self._loadInput(), self._junkSqlite())
                self._updateOutputSet(OUT_JUNK, junk, state=Set.STREAM_CLOSED)
        self._defineSourceRelation(self.inputParticles, getattr(self, OUT_PARTICLES))
        if not self.reconstruct:
            return
        outSet = getattr(self, OUT_PARTICLES)
        if self._growsLiveMap() and os.path.exists(self._livePath("map.mrc")):
            with self._lock:
                self._defineLiveVolume(outSet.getSamplingRate())   # the live map is the volume
            return
        star = self._getExtraPath("predicted.star")
        writeParticlesStar(outSet, star, self._getExtraPath())
        vol_path = self._getExtraPath("map.mrc")
        self.runCryoposeml("reconstruct", f"--particles {star} --out {vol_path} --halves --sym "
                                          f"{self._modelSymmetry()}")
        vol = self._halfMapVolume(vol_path, outSet.getSamplingRate())
        self._defineOutputs(**{OUT_VOLUME: vol})
        self._defineSourceRelation(self.inputParticles, vol)

    def _referenceArgs(self):
        """``--reference`` (and ``--half-maps`` when the volume has them) for a user's map."""
        vol = self.referenceVolume.get() if MATCHING_CHOICES[self.matching.get()] != "none" else None
        if vol is None:
            return ""
        args = f" --reference {os.path.abspath(vol.getFileName())}"
        if vol.hasHalfMaps():
            h1, h2 = list(vol.getHalfMaps(asList=True))[:2]
            args += f" --half-maps {os.path.abspath(h1)} {os.path.abspath(h2)}"
        return args

    def _modelSymmetry(self):
        return readModelMetadata(self._modelPath())["sym"]

    # -------------------------- infos --------------------------------------
    def _validate(self):
        errors = []
        self._validateThreads(errors)
        parts = self.inputParticles.get()
        errors += self._particleErrors(parts)
        path = self._modelPath()
        if not path:
            return errors + ["Choose a trained model."]
        try:
            meta = readModelMetadata(path)
        except (OSError, ValueError) as e:
            return errors + [str(e)]
        if parts is not None:
            box, apix = meta["input"]["box"], meta["input"]["pixel_size_angstrom"]
            if parts.getXDim() != box or abs(parts.getSamplingRate() - apix) > 1e-3:
                errors.append(f"The model was trained on {box} px particles at {apix:.3f} A/px; these are "
                              f"{parts.getXDim()} px at {parts.getSamplingRate():.3f} A/px.")
        vol = self.referenceVolume.get() if MATCHING_CHOICES[self.matching.get()] != "none" else None
        if vol is not None and parts is not None and (vol.getXDim() != parts.getXDim()
                                                      or abs(vol.getSamplingRate() - parts.getSamplingRate()) > 1e-2):
            errors.append(f"The reference map is {vol.getXDim()} px at {vol.getSamplingRate():.3f} A/px; the "
                          f"particles are {parts.getXDim()} px at {parts.getSamplingRate():.3f} A/px.")
        if self.symmetry.get() and self.symmetry.get().upper() != meta["sym"]:
            errors.append(f"The model was trained with symmetry {meta['sym']}, not {self.symmetry.get()}.")
        return errors

    def _warnings(self):
        warnings = []
        path = self._modelPath()
        try:
            meta = readModelMetadata(path) if path else None
        except (OSError, ValueError):
            meta = None
        medians = [r["validation"]["median_deg"] for r in (meta or {}).get("runs", {}).values() if "validation" in r]
        if medians and min(medians) > 15:
            warnings.append(f"This model's held-out median error is {min(medians):.0f} deg: its poses are a coarse "
                            "start. Follow with cleanup and a Relion local refinement.")
        parts = self.inputParticles.get()
        if parts is not None and not self.usesGpu() and parts.getSize() > 50000:
            rate = 150 if MATCHING_CHOICES[self.matching.get()] == "none" else 100
            warnings.append(f"{parts.getSize()} particles on the CPU: expect roughly {parts.getSize() / rate / 60:.0f} "
                            f"min (about {rate} particles/s on 2 cores for a 64 px box). Use a GPU if you can.")
        return warnings

    def _summary(self):
        if not hasattr(self, OUT_PARTICLES):
            return ["No particles predicted yet."]
        out = getattr(self, OUT_PARTICLES)
        junk = getattr(self, OUT_JUNK, None)
        n_junk = junk.getSize() if junk is not None else 0
        s = [f"{out.getSize() + n_junk} particles predicted" + (" (streaming, open)" if out.isStreamOpen() else "")
             + (f"; {n_junk} dropped as junk (match-score quantile < {self._junkThreshold():g})." if n_junk else ".")]
        import numpy as np

        err, esc = [], []
        for p in out.iterItems():
            if hasattr(p, "_cryoposemlExpectedError"):
                err.append(p._cryoposemlExpectedError.get())
            if hasattr(p, "_cryoposemlEscalated"):
                esc.append(p._cryoposemlEscalated.get())
        if err:
            s.append(f"Expected angular error: median {np.median(err):.1f} deg (10-90%: "
                     f"{np.percentile(err, 10):.1f}-{np.percentile(err, 90):.1f} deg).")
        if esc:
            s.append(f"Verified against the map; {100 * np.mean(esc):.0f}% of the particles needed the exhaustive "
                     "search.")
        if os.path.exists(self._livePath("history.json")):
            import json

            with open(self._livePath("history.json")) as f:
                rows = json.load(f)["batches"]
            if rows and rows[-1]["resolution_fsc0143_angstrom"]:
                s.append(f"Live map after {len(rows)} batches: {rows[-1]['particles_kept']} of "
                         f"{rows[-1]['particles_seen']} particles kept, half-map FSC 0.143 at "
                         f"{rows[-1]['resolution_fsc0143_angstrom']:.2f} A.")
        return s

    def _methods(self):
        if MATCHING_CHOICES[self.matching.get()] == "none":
            return ["Particle poses were predicted with a cryoposeml network, each with a calibrated expected "
                    "angular error."]
        return ["Particle poses were proposed by a cryoposeml network and verified against a reference map "
                "(CTF-aware, noise-whitened matching, local refinement, exhaustive search where the proposals "
                "did not explain the particle; semi-amortized inference as in cryoPARES), each with a calibrated "
                "expected angular error."]

    def _citations(self):
        return ["Cesped2024"]
