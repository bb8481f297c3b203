"""The forms in the real Scipion GUI, under a virtual X server (Xvfb): every cryoposeml form opens
in a real ProjectWindow, every parameter of every tab has its widget, no tab is taller than the
screen, and screenshots of the four main forms (each tab) and of the live-map viewer are written
(to $CRYOPOSEML_TEST_OUTPUT/gui, default: the test's temporary folder)."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("pwem")
pytest.importorskip("tkinter")

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def display():
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        pytest.skip("Xvfb is not installed (apt-get install xvfb; bootstrap.sh installs it): the GUI check needs "
                    "an X server")
    for n in range(91, 120):
        if not Path(f"/tmp/.X{n}-lock").exists():
            break
    proc = subprocess.Popen([xvfb, f":{n}", "-screen", "0", "1600x1200x24", "-nolisten", "tcp"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{n}").exists():
            break
        if proc.poll() is not None:
            pytest.skip(f"Xvfb could not start: {proc.stderr.read().decode()[-500:]}")
        time.sleep(0.05)
    yield f":{n}"
    proc.terminate()
    proc.wait(timeout=10)


def test_forms_open_in_the_real_gui(display, tmp_path):
    import pyworkflow.protocol as pwprot

    out = Path(os.environ.get("CRYOPOSEML_TEST_OUTPUT", tmp_path)) / "gui"
    hosts = tmp_path / "hosts.conf"
    pwprot.HostConfig.writeBasic(str(hosts))
    env = {**os.environ, "DISPLAY": display}
    r = subprocess.run([sys.executable, str(HERE / "gui" / "forms_under_x.py"), str(out), f"GuiForms{os.getpid()}",
                        str(hosts)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    forms = report["forms"]
    assert len(forms) == 7, sorted(forms)
    for name, form in forms.items():
        assert form["params"] and not form["missing_widgets"], (name, form["missing_widgets"])
        assert ("symmetry" in form["wizards"]) == ("symmetry" in form["params"]), (name, form["wizards"])
        for tab in form["tabs"]:
            assert tab["content_height"] <= tab["screen_height"], (name, tab)
    for name in ("CryoPoseMLProtTrain", "CryoPoseMLProtPredict", "CryoPoseMLProtCleanup", "CryoPoseMLProtLocalRefine"):
        shots = forms[name]["screenshots"]
        assert len(shots) == len(forms[name]["tabs"]) >= 1, name
        for shot in shots:
            _assert_drawn(shot)
    _assert_drawn(report["live_map_viewer"])
    _assert_drawn(report["project_window"])


def _assert_drawn(path):
    """A screenshot that shows something (not one flat colour) of a real window's size."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(path).convert("L"), dtype=np.float64)
    assert img.shape[0] > 200 and img.shape[1] > 300, (path, img.shape)
    assert img.std() > 10, (path, img.std())
