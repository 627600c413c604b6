"""`pvtap run` starts the web view as a process of its own, and keeps forwarding when it cannot."""

from __future__ import annotations

import json
import signal
import socket
import urllib.request
from pathlib import Path

import pytest

from tests.test_run_demo import _run


@pytest.mark.slow
def test_run_starts_the_web_view_on_the_same_stores(tmp_path: Path) -> None:
    run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0"})
    port = int(run.expect(r"pvtap run: web is up on 127\.0\.0\.1:(\d+) \(pid \d+\)").group(1))
    run.expect(rf"open http://127\.0\.0\.1:{port}/ in a browser on this machine")
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/live", timeout=30) as response:
        live = json.load(response)
    assert live["data_dir"] == str((tmp_path / "data").resolve()) and live["devices"] == []
    assert run.stop(signal.SIGTERM) == 0
    assert run.lines[-1] == "pvtap run: stopped"


@pytest.mark.slow
def test_run_forwards_without_the_web_view_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run = _run(tmp_path, {"PVTAP_ENPHASE_LISTEN": "127.0.0.1:0", "PVTAP_WEB_LISTEN": f"127.0.0.1:{port}"})
        run.expect(r"web exited with status 1 before it was ready")
        run.expect(r"going on without web \(forwarding is not affected\)")
        run.expect(r"pvtap tail --follow")  # the proxies run on
        assert run.proc.poll() is None
        assert run.stop(signal.SIGINT) == 0
    assert f"cannot listen on 127.0.0.1:{port}" in run.output
