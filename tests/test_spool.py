"""The spool between a streaming client and its prediction worker (no model needed: the worker's
handler is a stand-in here; ``test_train_predict`` runs the real worker)."""
import json
import threading
import time

import pytest

from cryoposeml.core.errors import InputError
from cryoposeml.engine.spool import SpoolClient, WorkerGone, serve


def _handler(calls):
    def handle(particles, out, name):
        if particles.endswith("bad.star"):
            raise InputError("not a particle STAR file", particles)
        if particles.endswith("crash.star"):
            raise RuntimeError("bug")
        calls.append((particles, out))
        return {"particles": len(calls)}
    return handle


def _serve_in_thread(folder, handle, **kw):
    box = {}

    def run():
        try:
            box["record"] = serve(folder, handle, poll_s=0.02, **kw)
        except BaseException as e:   # noqa: B902 - the test inspects it
            box["error"] = e
    th = threading.Thread(target=run, daemon=True)
    th.start()
    return th, box


def test_requests_are_served_in_order_refusals_reported_and_stop_honoured(tmp_path):
    client = SpoolClient(tmp_path / "spool")
    calls = []
    # submitted before the worker starts (it may be slow to load): still served, in name order
    client.submit("b2", tmp_path / "two.star", tmp_path / "two_out.star")
    client.submit("b1", tmp_path / "one.star", tmp_path / "one_out.star")
    th, box = _serve_in_thread(client.folder, _handler(calls))
    assert client.wait("b1", poll_s=0.02, timeout_s=10) == {"particles": 1, "worker_wall_s": pytest.approx(0, abs=1)}
    assert client.wait("b2", poll_s=0.02, timeout_s=10)["particles"] == 2
    assert [c[0] for c in calls] == [str(tmp_path / "one.star"), str(tmp_path / "two.star")]
    client.submit("b3", tmp_path / "bad.star", tmp_path / "bad_out.star")
    with pytest.raises(InputError, match="bad.star: not a particle STAR file"):
        client.wait("b3", poll_s=0.02, timeout_s=10)
    client.submit("b4", tmp_path / "three.star", tmp_path / "three_out.star")   # the worker carried on
    assert client.wait("b4", poll_s=0.02, timeout_s=10)["particles"] == 3
    client.stop()
    th.join(10)
    assert box["record"] == {"status": "stopped", "served": 3, "failed": 1}
    assert client.worker_exit()["status"] == "stopped"
    assert json.loads((client.folder / "worker.json").read_text())["pid"] > 0
    assert not list((client.folder / "pending").iterdir())


def test_a_crashing_worker_tells_its_client(tmp_path):
    client = SpoolClient(tmp_path / "spool")
    th, box = _serve_in_thread(client.folder, _handler([]))
    client.submit("a", tmp_path / "crash.star", tmp_path / "out.star")
    client.submit("b", tmp_path / "fine.star", tmp_path / "out2.star")
    with pytest.raises(WorkerGone, match="RuntimeError: bug"):
        client.wait("a", poll_s=0.02, timeout_s=10)
    with pytest.raises(WorkerGone):   # the request after it will never be answered either
        client.result("b")
    th.join(10)
    assert isinstance(box["error"], RuntimeError)


def test_a_worker_whose_client_is_gone_exits(tmp_path):
    client = SpoolClient(tmp_path / "spool")
    t = time.monotonic()
    th, box = _serve_in_thread(client.folder, _handler([]), stale_after_s=0.3)
    th.join(10)
    assert not th.is_alive() and time.monotonic() - t < 5
    assert isinstance(box["error"], InputError) and "no heartbeat" in str(box["error"])
    assert client.worker_exit()["status"] == "stale"
    # a new execution resets the folder: the old exit record no longer speaks for the new worker
    client.reset()
    assert client.worker_exit() is None and client.result("anything") is None
