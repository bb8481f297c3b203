"""Make the small test density maps bundled in ``cryoposeml/resources/maps``.

The atomic models come from the PyPI package ``MDAnalysisTests``:

* ``adk_open.pdb`` / ``adk_closed.pdb``: adenylate kinase (AdK, 214 residues,
  CHARMM models of PDB 4AKE / 1AKE, with hydrogens, no element column);
* ``merge/2zmm/protein.pdb``: PTP1B (PDB 2ZMM, residues 2-298), the "other"
  protein used for junk particles;
* ``adk.psf`` + ``adk_dims.dcd``: a 98-frame closed -> open AdK transition
  (only with ``--transition N``).

Every map is an electron-scattering potential (``gemmi.DensityCalculatorE``)
computed on a 2x oversampled grid, Fourier-cropped to ``--box`` voxels of
``--apix`` A and low-passed with a cosine edge ending at 2 x apix (Nyquist),
so it is band-limited and not aliased.  It is then divided by its maximum
(the scale is written in the MRC labels).  All AdK models are superposed
(Kabsch on the CA atoms of the CORE domain) onto the open model and shifted
so that the open model's centre of mass sits on voxel ``box // 2`` (Relion's
centre), so AdK maps differ only by the domain motion.  ``d2_test.mrc`` is the
open map averaged over D2 (Relion convention: 2-folds about z, x and y).

Needs gemmi, MDAnalysis, MDAnalysisTests, mrcfile, numpy, scipy (not needed
by cryoposeml itself).  Usage::

    python scripts/make_maps.py [--out DIR] [--box 64] [--apix 1.5] [--transition N]
"""
import argparse
import os
import warnings

import gemmi
import MDAnalysis as mda
import mrcfile
import numpy as np
from MDAnalysisTests import datafiles as df
from scipy.ndimage import affine_transform

CORE = "name CA and (resid 1-29 or resid 60-121 or resid 160-214)"
OVERSAMPLE = 2    # density computed at apix / OVERSAMPLE, then Fourier-cropped
ATOM_BLUR = 60.0  # B (A^2) for every atom (file B-factors ignored): cryo-EM-like, little ringing


def elements(atoms):
    """Element symbols: the element column if present, else from atom names.

    Names are PDB/CHARMM protein names (N, CA, CB, OG1, SD, HB2, 1HB, ...);
    their first letter is the element (so 'CA' is C-alpha, not calcium).
    """
    if hasattr(atoms, "elements") and all(e.strip() for e in atoms.elements):
        return [e.strip().capitalize() for e in atoms.elements]
    syms = [n.lstrip("0123456789")[0].upper() for n in atoms.names]
    bad = set(syms) - set("CNOSH")
    if bad:
        raise ValueError(f"unexpected element(s) {bad} from atom names")
    return syms


def masses(els):
    return np.array([gemmi.Element(e).weight for e in els])


def kabsch(mobile, ref):
    """Rotation R and translation t minimising |mobile @ R.T + t - ref|."""
    mc, rc = mobile.mean(0), ref.mean(0)
    u, _, vt = np.linalg.svd((mobile - mc).T @ (ref - rc))
    d = np.sign(np.linalg.det(u @ vt))
    rot = (u @ np.diag([1.0, 1.0, d]) @ vt).T
    return rot, rc - mc @ rot.T


def compute_map(xyz, els, box, apix):
    """Band-limited potential map (z, y, x) of atoms at xyz (A, box frame)."""
    n2, side = box * OVERSAMPLE, box * apix
    st = gemmi.Structure()
    st.cell = gemmi.UnitCell(side, side, side, 90, 90, 90)
    st.spacegroup_hm = "P 1"
    model, chain, res = gemmi.Model("1"), gemmi.Chain("A"), gemmi.Residue()
    res.name, res.seqid = "UNK", gemmi.SeqId(1, " ")
    for p, e in zip(xyz, els):
        a = gemmi.Atom()
        a.name, a.element, a.pos, a.occ, a.b_iso = e, gemmi.Element(e), gemmi.Position(*p), 1.0, 0.0
        res.add_atom(a)
    chain.add_residue(res)
    model.add_chain(chain)
    st.add_model(model)
    dc = gemmi.DensityCalculatorE()
    dc.d_min, dc.blur = 0.0, ATOM_BLUR  # d_min=0: keep the grid size set below
    dc.grid.set_unit_cell(st.cell)
    dc.grid.spacegroup = gemmi.SpaceGroup("P 1")
    dc.grid.set_size(n2, n2, n2)
    dc.put_model_density_on_grid(st[0])
    fine = np.array(dc.grid, copy=True).transpose(2, 1, 0)  # gemmi is (x,y,z)
    # Fourier-crop to box and apply a cosine low-pass from 1.2x Nyquist res to Nyquist.
    f = np.fft.fftshift(np.fft.fftn(fine))
    lo = (n2 - box) // 2
    f = f[lo:lo + box, lo:lo + box, lo:lo + box]
    k = np.arange(box) - box // 2
    s = np.sqrt(k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2) / (box / 2)
    s0 = 1 / 1.2  # fraction of Nyquist where the edge starts
    filt = np.clip((1 - s) / (1 - s0), 0, 1)
    f *= 0.5 - 0.5 * np.cos(np.pi * filt)
    out = np.fft.ifftn(np.fft.ifftshift(f)).real * (box / n2) ** 3
    return out.astype(np.float32)


def save(path, data, apix, label):
    """Write float32 MRC, origin 0, normalised to max 1; returns the scale."""
    scale = 1.0 / float(data.max())
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data((data * scale).astype(np.float32))
        m.voxel_size = apix
        m.header.origin = (0.0, 0.0, 0.0)
        m.header.nxstart = m.header.nystart = m.header.nzstart = 0
        m.header.nlabl = 0  # drop mrcfile's timestamp label: reproducible files
        m.header.label[:] = b""
        m.add_label(label[:80])
        m.add_label(f"cryoposeml make_maps.py: values = potential * {scale:.6g}")
    print(f"{path}: scale {scale:.6g}")
    return scale


def d2_average(vol, c):
    """Average over D2 (Relion: identity, 180 deg about z, x, y) about voxel c.

    Array axes are (z, y, x); a 180 deg turn flips the two other axes."""
    acc = np.zeros_like(vol, dtype=np.float64)
    for flips in ([1, 1, 1], [1, -1, -1], [-1, -1, 1], [-1, 1, -1]):  # I, z, x, y
        m = np.diag(flips).astype(float)
        acc += affine_transform(vol, m, offset=c - m @ np.full(3, c), order=1, cval=0.0)
    return (acc / 4).astype(np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="cryoposeml/resources/maps")
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--apix", type=float, default=1.5)
    ap.add_argument("--transition", type=int, default=0, metavar="N",
                    help="also write N maps along the DCD closed->open transition")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    warnings.filterwarnings("ignore")  # MDAnalysis PDB-parsing chatter
    centre = a.box // 2 * a.apix  # A; voxel box//2 is Relion's centre

    ref = mda.Universe(df.PDB_small).atoms  # adk_open.pdb
    els = elements(ref)
    shift = centre - np.average(ref.positions, axis=0, weights=masses(els))
    ref_core = ref.select_atoms(CORE).positions

    def adk_map(atoms, name, label):
        rot, t = kabsch(atoms.select_atoms(CORE).positions, ref_core)
        xyz = atoms.positions @ rot.T + t + shift
        save(os.path.join(a.out, name), compute_map(xyz, elements(atoms), a.box, a.apix),
             a.apix, label)

    adk_map(ref, "adk_open.mrc", "AdK open (MDAnalysisTests adk_open.pdb, PDB 4AKE)")
    adk_map(mda.Universe(df.PDB_closed).atoms, "adk_closed.mrc",
            "AdK closed (MDAnalysisTests adk_closed.pdb, PDB 1AKE), CORE on open")

    other = mda.Universe(df.merge_protein).select_atoms("protein")
    oel = elements(other)
    xyz = other.positions - np.average(other.positions, axis=0, weights=masses(oel)) + centre
    save(os.path.join(a.out, "other_ptp1b.mrc"), compute_map(xyz, oel, a.box, a.apix), a.apix,
         "PTP1B (MDAnalysisTests merge/2zmm/protein.pdb, PDB 2ZMM)")

    with mrcfile.open(os.path.join(a.out, "adk_open.mrc")) as m:
        d2 = d2_average(m.data.copy(), a.box // 2)
    save(os.path.join(a.out, "d2_test.mrc"), d2, a.apix, "adk_open.mrc averaged over D2 (Relion)")

    if a.transition:
        u = mda.Universe(df.PSF, df.DCD)
        for i, fr in enumerate(np.linspace(0, len(u.trajectory) - 1, a.transition).round()):
            u.trajectory[int(fr)]
            adk_map(u.atoms, f"adk_transition_{i:02d}.mrc",
                    f"AdK adk_dims.dcd frame {int(fr)} (closed->open), CORE on open")


if __name__ == "__main__":
    main()
