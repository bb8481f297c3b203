import enum
import glob
import os
import time

import pyworkflow.object as pwobj
import pyworkflow.protocol.params as params
from pyworkflow import BETA
from pyworkflow.object import Set
from pwem.constants import ALIGN_NONE, ALIGN_PROJ
import pwem.objects as emobj
from pwem.protocols import ProtImport

SOURCE_ATTR = "_cryoposemlSourceStar"


class ImportOutputs(enum.Enum):
    outputParticles = emobj.SetOfParticles


class CryoPoseMLProtImportParticles(ProtImport):
    """Import particles from Relion 3.1 STAR files, once or **in streaming**.

    Give a file or a pattern (`/data/live/*/particles.star`). Without streaming, every matching
    STAR is imported and the output is closed. With streaming, the pattern is watched: each new
    STAR (once it has stopped changing) is appended to an open output set, so that a streaming
    **predict** downstream picks its particles up while the microscope is still collecting. The
    output is closed when the end-marker file appears or when no new STAR has come for the timeout.

    Poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst), CTF, optics and rlnRandomSubset are taken from
    the STAR (Scipion's Relion converter). Each particle remembers the STAR it came from
    (`_cryoposemlSourceStar`), so a run resumed after a kill skips what it already imported.
    """
    _label = "import particles (STAR, streaming)"
    _devStatus = BETA
    _possibleOutputs = ImportOutputs

    def _defineParams(self, form):
        form.addSection(label="Import")
        form.addParam("filesPattern", params.PathParam, important=True, label="STAR file or pattern",
                      help="A Relion 3.1 particle STAR, or a glob pattern of them (e.g. /data/live/Extract/*/*.star). "
                           "Relative image paths are resolved against the STAR's folder and then its parents "
                           "(Relion writes them relative to its project folder).")
        form.addParam("importAlignment", params.BooleanParam, default=True, label="Import the poses?",
                      help="Keep the STAR's angles and shifts as the particles' 3D alignment (needed to train). "
                           "No: the particles are imported without alignment (e.g. new particles to predict).")
        form.addParam("haveDataBeenPhaseFlipped", params.BooleanParam, default=False,
                      label="Have the images been phase flipped?",
                      help="Yes when the particle images already had the CTF's phases flipped (e.g. extracted with "
                           "phase flipping); recorded on the output set.")
        form.addSection(label="Streaming")
        form.addParam("dataStreaming", params.BooleanParam, default=False, label="Process data in streaming?",
                      help="Keep watching the pattern for new STAR files and append their particles to an open "
                           "output.")
        form.addParam("fileTimeout", params.IntParam, default=30, condition="dataStreaming", label="File timeout (s)",
                      help="A STAR is read only once it has not changed for this long (so half-written files are "
                           "not read).")
        form.addParam("timeout", params.IntParam, default=3600, condition="dataStreaming",
                      label="Timeout (s)", help="The output is closed when no new STAR has come for this long.")
        form.addParam("endMarker", params.StringParam, default="", condition="dataStreaming",
                      label="End-marker file (optional)",
                      help="The output is closed as soon as this file exists (and every STAR before it has been "
                           "imported). A pipeline writes it when the session is over.")
        form.addParam("sleepSeconds", params.IntParam, default=10, condition="dataStreaming",
                      expertLevel=params.LEVEL_ADVANCED, label="Check every (s)",
                      help="Streaming: how often the pattern is looked at for new STAR files.")

    # -------------------------- steps --------------------------------------
    def _insertAllSteps(self):
        self._insertFunctionStep(self.importStep, needsGPU=False)

    def _outputSqlite(self):
        return self._getPath("particles.sqlite")

    def _importedStars(self):
        """The STAR files already in the output (a resumed run does not import them twice)."""
        if not os.path.exists(self._outputSqlite()):
            return set()
        out = emobj.SetOfParticles(filename=self._outputSqlite())
        try:
            values = out.getUniqueValues(SOURCE_ATTR) if out.getSize() else []
        finally:
            out.close()
        return set(values)

    def _matches(self):
        """Absolute paths of the files matching the pattern (never the end marker)."""
        marker = (self.endMarker.get() or "").strip()
        marker = os.path.abspath(os.path.expanduser(marker)) if marker else None
        found = (os.path.abspath(f) for f in glob.glob(os.path.expanduser(self.filesPattern.get())))
        return [f for f in found if f != marker and os.path.isfile(f)]

    def _readyFiles(self, done):
        """Matching STAR files not yet imported, oldest first; in streaming only those unchanged for fileTimeout."""
        now = time.time()
        files = []
        for f in self._matches():
            if f in done:
                continue
            mtime = os.path.getmtime(f)
            if self.dataStreaming and now - mtime < self.fileTimeout.get():
                continue
            files.append((mtime, f))
        return [f for _, f in sorted(files)]

    def importStep(self):
        done = self._importedStars()
        last_new = time.time()
        while True:
            files = self._readyFiles(done)
            if files:
                self._appendStars(files)
                done.update(files)
                last_new = time.time()
            if not self.dataStreaming:
                break
            marker = (self.endMarker.get() or "").strip()
            if marker and os.path.exists(marker) and not self._readyFiles(done) and not self._pendingFiles(done):
                self.info(f"End marker {marker} found: closing the output.")
                break
            if time.time() - last_new > self.timeout.get():
                self.info(f"No new STAR file for {self.timeout.get()} s: closing the output.")
                break
            time.sleep(max(1, self.sleepSeconds.get()))
        if not os.path.exists(self._outputSqlite()):
            raise ValueError(f"No particles imported: nothing matched {self.filesPattern.get()}.")
        out = self._openOutput()
        self._updateOutputSet(ImportOutputs.outputParticles.name, out, state=Set.STREAM_CLOSED)

    def _pendingFiles(self, done):
        """Matching files not imported yet, ready or not."""
        return [f for f in self._matches() if f not in done]

    def _openOutput(self, like=None):
        """The output set, reopened for appending, or a new one with the properties of ``like``."""
        exists = os.path.exists(self._outputSqlite())
        out = emobj.SetOfParticles(filename=self._outputSqlite())
        if exists:
            out.loadAllProperties()
            out.enableAppend()
        else:
            out.copyInfo(like)
        return out

    def _appendStars(self, files):
        for star in files:
            batch = self._readStar(star)
            out = self._openOutput(like=batch)
            self._checkCompatible(star, batch, out)
            for p in batch.iterItems():
                q = p.clone()
                q.setObjId(None)
                setattr(q, SOURCE_ATTR, pwobj.String(star))
                out.append(q)
            self.info(f"Imported {batch.getSize()} particles from {star} ({out.getSize()} in all).")
            batch.close()
            state = Set.STREAM_OPEN if self.dataStreaming else Set.STREAM_CLOSED
            self._updateOutputSet(ImportOutputs.outputParticles.name, out, state=state)

    def _readStar(self, star):
        """One STAR -> a temporary SetOfParticles, through scipion-em-relion's reader."""
        from relion.convert import readSetOfParticles

        tmp = self._getTmpPath(f"batch_{abs(hash(star))}.sqlite")
        if os.path.exists(tmp):
            os.remove(tmp)
        batch = emobj.SetOfParticles(filename=tmp)
        from ..data.star import read_star

        parsed = read_star(star)   # our reader: a clear error for a broken STAR
        columns = parsed.particles.columns
        parsed.image_locations()   # every stack must exist (the error names the STAR and the stack)
        resolved = {}

        def absolutePaths(particle, row):
            index, fn = particle.getLocation()
            if fn not in resolved:
                resolved[fn] = str(parsed.resolve_image_path(fn).resolve())
            particle.setLocation(index, resolved[fn])
        alignType = ALIGN_PROJ if self.importAlignment else ALIGN_NONE
        if alignType == ALIGN_PROJ and not {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"} <= set(columns):
            raise ValueError(f"{star}: has no poses (rlnAngleRot/Tilt/Psi); import it with 'Import the poses?' = No.")
        try:
            readSetOfParticles(star, batch, alignType=alignType, postprocessImageRow=absolutePaths)
        except Exception as e:
            raise ValueError(f"{star}: not a readable Relion 3.1 particle STAR ({type(e).__name__}: {e}).") from e
        # the STAR's own record (rlnCtfDataArePhaseFlipped) counts as much as the form's answer
        batch.setIsPhaseFlipped(bool(self.haveDataBeenPhaseFlipped) or bool(parsed.phase_flipped().any()))
        batch.write()
        return batch

    @staticmethod
    def _checkCompatible(star, batch, out):
        if not out.getSize():
            return
        if abs(batch.getSamplingRate() - out.getSamplingRate()) > 1e-4:
            raise ValueError(f"{star}: pixel size {batch.getSamplingRate():.4f} A differs from the particles already "
                             f"imported ({out.getSamplingRate():.4f} A).")
        if batch.getXDim() != out.getXDim():
            raise ValueError(f"{star}: box {batch.getXDim()} px differs from the particles already imported "
                             f"({out.getXDim()} px).")

    # -------------------------- infos --------------------------------------
    def _validate(self):
        pattern = self.filesPattern.get()
        if not pattern:
            return ["Give a STAR file or pattern."]
        if not self.dataStreaming and not glob.glob(os.path.expanduser(pattern)):
            return [f"No file matches {pattern}."]
        return []

    def _warnings(self):
        if self.dataStreaming and not (self.endMarker.get() or "").strip() and self.timeout.get() >= 3600:
            return [f"Without an end-marker file the output stays open until no new STAR has come for "
                    f"{self.timeout.get() / 3600:.1f} h; protocols that need a closed set (cleanup) wait until then."]
        return []

    def _summary(self):
        if not hasattr(self, ImportOutputs.outputParticles.name):
            return ["No particles imported yet."]
        out = getattr(self, ImportOutputs.outputParticles.name)
        state = " (streaming, still open)" if out.isStreamOpen() else ""
        return [f"{out.getSize()} particles imported from {self.filesPattern.get()}{state}."]

    def _methods(self):
        return ["Particles were imported from Relion STAR files."]

