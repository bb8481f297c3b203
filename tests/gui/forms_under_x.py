"""Run under an X server (tests/test_gui.py starts Xvfb): opens a real Scipion ProjectWindow, then
every cryoposeml protocol's form in it, selects each tab, and writes a screenshot per tab; then the
live-map viewer's figure in a Tk window. Prints a JSON report: per form, the parameters without a
widget, per tab whether its content fits, and the files written.

Usage: python forms_under_x.py OUT_DIR PROJECT_NAME HOSTS_CONF [LIVE_MAP_FOLDER]"""
import json
import os
import sys
from pathlib import Path

out, proj_name, hosts = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
out.mkdir(parents=True, exist_ok=True)

from PIL import ImageGrab  # noqa: E402
from pyworkflow.gui.project import ProjectWindow  # noqa: E402  (before gui.form: pyworkflow's import order)
from pyworkflow.gui.form import FormWindow  # noqa: E402
from pyworkflow.project import Manager  # noqa: E402

from cryoposeml import protocols  # noqa: E402

MAIN = {"CryoPoseMLProtTrain": "train", "CryoPoseMLProtPredict": "predict", "CryoPoseMLProtCleanup": "cleanup",
        "CryoPoseMLProtLocalRefine": "refine"}


def grab(window, path):
    root = window.root if hasattr(window, "root") else window
    root.update()
    x, y, w, h = root.winfo_rootx(), root.winfo_rooty(), root.winfo_width(), root.winfo_height()
    ImageGrab.grab(bbox=(x, y, x + w, y + h), xdisplay=os.environ["DISPLAY"]).save(path)
    return str(path)


proj = Manager().createProject(proj_name, hostsConf=hosts)
pwin = ProjectWindow(proj.getPath())
pwin.root.geometry("1400x900+0+0")
pwin.root.deiconify()   # what show() does before its main loop
pwin.root.update()
report = {"project_window": grab(pwin, out / "project_window.png"), "forms": {}}
classes = [getattr(protocols, n) for n in dir(protocols) if n.startswith("CryoPoseMLProt")]
for cls in sorted(classes, key=lambda c: c.__name__):
    prot = proj.newProtocol(cls)
    form = FormWindow(f"Protocol Run: {cls.__name__}", prot, lambda *a, **k: None, pwin)
    form.adjustSize()
    form.root.deiconify()
    form.root.update()
    shown = [name for section in prot.iterDefinitionSections()
             if section.getLabel() not in ("General", "Parallelization")
             for name, _ in section.iterParams()]
    entry = {"label": cls._label, "params": shown, "missing_widgets": [n for n in shown if n not in form.widgetDict],
             "tabs": [], "screenshots": [], "wizards": sorted(form.wizards)}
    notebook = form._sections[0].master if form._sections else None
    for k, section in enumerate(form._sections):
        notebook.select(section)
        form.root.update()
        content = section.contentFrame
        entry["tabs"].append({"tab": notebook.tab(section, "text"), "content_height": content.winfo_reqheight(),
                              "window_height": form.root.winfo_height(),
                              "screen_height": form.root.winfo_screenheight()})
        if cls.__name__ in MAIN:
            entry["screenshots"].append(grab(form, out / f"{MAIN[cls.__name__]}_form_{k + 1}.png"))
    report["forms"][cls.__name__] = entry
    form.root.destroy()

# The live-map viewer's figure, as its window shows it.
import tkinter as tk  # noqa: E402

import numpy as np  # noqa: E402
from matplotlib.backends.backend_tkagg import FigureCanvasTkAgg  # noqa: E402

from cryoposeml.data.bundled import resolve_map  # noqa: E402
from cryoposeml.data.mrc import read_map  # noqa: E402
from cryoposeml.engine.plots import live_map_figure  # noqa: E402

live = Path(sys.argv[4]) if len(sys.argv) > 4 else None   # a live-map folder (history.json, map.mrc)
record = json.loads((live / "history.json").read_text()) if live else None
volume = read_map(live / "map.mrc" if live else resolve_map("adk_open"))[0]
if record is None:   # a stand-in history (and the bundled map) when no streaming run is given
    freq = np.linspace(0, 1 / 3.0, 33)
    record = {"batches": [{"batch": f"b{k}", "particles_seen": 1000 * k, "particles_kept": 970 * k,
                           "resolution_fsc0143_angstrom": 12 / np.sqrt(k), "time": 60.0 * k} for k in range(1, 6)],
              "fsc_frequency_per_angstrom": freq.tolist(), "fsc_half_maps": (1 / (1 + np.exp((freq - 0.2) * 40))).tolist()}
viewer = tk.Toplevel(pwin.root)
viewer.title("cryoposeml prediction viewer: live map")
canvas = FigureCanvasTkAgg(live_map_figure(record, volume), master=viewer)
canvas.draw()
canvas.get_tk_widget().pack(fill="both", expand=True)
report["live_map_viewer"] = grab(viewer, out / "live_map_viewer.png")

viewer.destroy()
pwin.root.destroy()
Manager().deleteProject(proj_name)
print(json.dumps(report))
