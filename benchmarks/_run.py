"""How benchmarks run the command line: the ``cryoposeml`` command of this interpreter, and a run
with its wall time and peak memory."""
from __future__ import annotations

import subprocess
import sys
import threading
import time


def cli(*args) -> list[str]:
    """``cryoposeml ARGS --quiet`` with this interpreter (the checkout's virtual environment)."""
    return [sys.executable, "-m", "cryoposeml.cli", *map(str, args), "--quiet"]


def run_measured(cmd: list[str], cwd=None, env=None) -> tuple[float, float, subprocess.CompletedProcess]:
    """Run ``cmd`` (in ``cwd``, with ``env``); its wall time (s) and peak RSS (GB: the process and
    its children, summed, polled every 0.1 s)."""
    import psutil

    t = time.perf_counter()
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)
    peak = [0]

    def poll():
        p = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                rss = p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
                peak[0] = max(peak[0], rss)
            except psutil.Error:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=poll, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    return time.perf_counter() - t, peak[0] / 1e9, subprocess.CompletedProcess(cmd, proc.returncode, out, err)
