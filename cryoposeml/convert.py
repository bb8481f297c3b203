"""Scipion sets <-> the Relion 3.1 STAR files the CLI reads and writes.

Writing uses scipion-em-relion's converter (the one Scipion's Relion protocols use). Reading back
matches rows to particles by ``rlnImageId`` (the particle's Scipion id, which the converter writes
and every cryoposeml command and Relion keep), and takes the pose from the Relion columns through
:func:`cryoposeml.core.rotations.relion_to_scipion_matrix`, the single owner of that convention.
"""
import numpy as np

from pwem.constants import ALIGN_PROJ
import pwem.objects as emobj
import pyworkflow.object as pwobj

# Relion columns cryoposeml writes -> Scipion attributes on each particle.
ATTRIBUTES = {
    "rlnCpmlConfidence": "_cryoposemlConfidence",
    "rlnCpmlExpectedErrorDeg": "_cryoposemlExpectedError",
    "rlnParticleFigureOfMerit": "_cryoposemlFigureOfMerit",
    # the verified prediction (predict with a reference)
    "rlnCpmlMatchZ": "_cryoposemlMatchZ",
    "rlnCpmlMatchQuantile": "_cryoposemlMatchQuantile",
    "rlnMaxValueProbDistribution": "_cryoposemlMaxProb",
    "rlnCpmlEscalated": "_cryoposemlEscalated",
}
#: ``rlnCpmlZ1..d`` (a conformation from ``cryoposeml hetero``) -> one comma-separated list
Z_ATTRIBUTE = "_cryoposemlZ"


def writeParticlesStar(partSet, starFile, outputDir, alignType=None):
    """Write ``partSet`` as a Relion 3.1 STAR (stacks linked into ``outputDir`` when needed), with
    the cryoposeml attributes as their columns."""
    from relion.convert import writeSetOfParticles

    def addOurColumns(particle, row):
        for column, attr in ATTRIBUTES.items():
            if particle.hasAttribute(attr):
                row[column] = getattr(particle, attr).get()

    kwargs = {"outputDir": outputDir, "postprocessImageRow": addOurColumns}
    if alignType is not None:
        kwargs["alignType"] = alignType
    writeSetOfParticles(partSet, starFile, **kwargs)
    if partSet.isPhaseFlipped():
        # Scipion keeps the CTF state on the set; Relion 3.1 (and cryoposeml) read it from the optics block
        from cryoposeml.data.star import read_star, write_star

        star = read_star(starFile)
        star.optics["rlnCtfDataArePhaseFlipped"] = 1
        write_star(star, starFile)


def readStarRows(starFile):
    """``{rlnImageId: row dict}`` of a cryoposeml/Relion particle STAR and its pixel size."""
    from cryoposeml.data.star import read_star

    star = read_star(starFile)
    if "rlnImageId" not in star.particles:
        raise ValueError(f"{starFile}: no rlnImageId column; cannot match rows to Scipion particles")
    p = star.particles
    angles = star.angles_deg()
    shifts_px = star.shifts_px()
    from cryoposeml.core.rotations import relion_to_scipion_matrix

    M = relion_to_scipion_matrix(angles, shifts_px)
    rows = {}
    extra = [c for c in ATTRIBUTES if c in p]
    values = {c: p[c].to_numpy(np.float64) for c in extra}
    subset = p["rlnRandomSubset"].to_numpy() if "rlnRandomSubset" in p else None
    zcols = sorted((c for c in p if c.startswith("rlnCpmlZ") and c[8:].isdigit()), key=lambda c: int(c[8:]))
    z = p[zcols].to_numpy(np.float64) if zcols else None
    classes = p["rlnClassNumber"].to_numpy().astype(int) if "rlnClassNumber" in p else None
    for i, objId in enumerate(p["rlnImageId"].to_numpy().astype(int)):
        rows[int(objId)] = {"matrix": M[i], **{c: values[c][i] for c in extra},
                            **({"rlnRandomSubset": int(subset[i])} if subset is not None else {}),
                            **({"z": z[i].tolist()} if z is not None else {}),
                            **({"rlnClassNumber": int(classes[i])} if classes is not None else {})}
    return rows


def updateParticle(particle, row):
    """Set the pose (ALIGN_PROJ transform) and the cryoposeml attributes of one particle."""
    particle.setTransform(emobj.Transform(np.asarray(row["matrix"])))
    for column, attr in ATTRIBUTES.items():
        if column in row:
            setattr(particle, attr, pwobj.Float(float(row[column])))
    if "rlnRandomSubset" in row:
        particle._rlnRandomSubset = pwobj.Integer(row["rlnRandomSubset"])
    if "z" in row:
        z = pwobj.CsvList(pType=float)
        z.set(row["z"])
        setattr(particle, Z_ATTRIBUTE, z)
    if "rlnClassNumber" in row:
        particle.setClassId(row["rlnClassNumber"])


def fillParticles(outputSet, inputSet, starFile):
    """Copy the particles of ``inputSet`` listed in ``starFile`` into ``outputSet`` with their new
    poses and attributes (particles not in the STAR are skipped). Returns the number copied."""
    rows = readStarRows(starFile)
    outputSet.copyInfo(inputSet)
    outputSet.setAlignment(ALIGN_PROJ)
    n = 0
    for particle in inputSet.iterItems():
        row = rows.get(particle.getObjId())
        if row is None:
            continue
        p = particle.clone()
        updateParticle(p, row)
        outputSet.append(p)
        n += 1
    return n
