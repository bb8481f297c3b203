"""Scipion wizards of the cryoposeml forms (found by Scipion in this module)."""
import pyworkflow.object as pwobj
from pyworkflow.wizard import DESKTOP_TKINTER, Wizard

from .protocols import CryoPoseMLProtCleanup, CryoPoseMLProtLocalRefine, CryoPoseMLProtPredict, CryoPoseMLProtTrain


def symmetryChoices() -> list:
    """``(name, description)`` of the point groups cryoposeml and Relion take, in Relion's spelling
    (every name is one :func:`cryoposeml.core.symmetry.symmetry_group` accepts)."""
    choices = [("C1", "no symmetry")]
    choices += [(f"C{n}", f"{n}-fold axis along z ({n} mates)") for n in range(2, 9)]
    choices += [(f"D{n}", f"{n}-fold along z, 2-fold along x ({2 * n} mates)") for n in range(2, 9)]
    choices += [("T", "tetrahedral (12 mates)"), ("O", "octahedral (24 mates)"),
                ("I", "icosahedral, Relion's default setting I2 (60 mates)")]
    choices += [(f"I{k}", f"icosahedral, Relion's setting {k} (60 mates)") for k in (1, 2, 3, 4)]
    return choices


class CryoPoseMLSymmetryWizard(Wizard):
    """Pick the point group from a list (name, axes, number of mates) instead of typing it."""
    _targets = [(CryoPoseMLProtTrain, ["symmetry"]), (CryoPoseMLProtPredict, ["symmetry"]),
                (CryoPoseMLProtCleanup, ["symmetry"]), (CryoPoseMLProtLocalRefine, ["symmetry"])]
    _environments = [DESKTOP_TKINTER]

    def show(self, form, *params):
        from pyworkflow.gui.dialog import ListDialog
        from pyworkflow.gui.tree import ListTreeProviderString

        items = [pwobj.String(f"{name}  -  {text}") for name, text in symmetryChoices()]
        for i, item in enumerate(items, 1):
            item.setObjId(i)
        dlg = ListDialog(form.root, "Symmetry (point group)", ListTreeProviderString(items),
                         "Choose the point group of the particle", selectmode="browse")
        if dlg.resultYes() and dlg.values:
            form.setVar(getattr(form, "wizParamName", "symmetry"), dlg.values[0].get().split()[0])
