"""A real `mitmdump` for end-to-end tests and the bench.

    with EnphaseCloud() as cloud, Mitmdump.reverse(tmp_path, cloud, data_dir=tmp_path / "data") as proxy:
        post_report("https://reports.enphaseenergy.com/...", body, connect=("127.0.0.1", proxy.port))

mitmdump runs from the venv (next to the running Python), in reverse mode in front of a stand-in
cloud, keeps the Host header (so the addon sees reports.enphaseenergy.com), verifies the stand-in's
self-signed certificate (`ssl_verify_upstream_trusted_ca`, not `ssl_insecure`), listens on an
ephemeral port of 127.0.0.1 (read back from its start-up line) and uses its own temporary confdir.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from tests.waiting import wait_until as wait_for  # noqa: F401  (re-exported: the name its tests import)

REPO = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"
ADDON = REPO / "addons" / "enphase.py"
READY = re.compile(r"listening at \S+:(\d+)\.")  # 127.0.0.1:N, or *:N in transparent mode
START_TIMEOUT = 30.0


class MitmdumpError(RuntimeError):
    pass


class Cloud(Protocol):
    """What mitmdump needs of the stand-in cloud it is put in front of (EnphaseCloud, or the
    bench's cloud in its own process)."""

    @property
    def url(self) -> str: ...
    @property
    def cafile(self) -> str | Path: ...


class Mitmdump:
    """One mitmdump process; `port` is where it listens, `output()` what it printed so far."""

    def __init__(self, workdir: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.argv = argv
        self.env = dict(env or {})  # PVTAP_* settings for the addon, on top of this process's environment
        self.log_path = self.workdir / f"mitmdump-{time.monotonic_ns()}.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @classmethod
    def reverse(cls, workdir: Path, cloud: Cloud, *, data_dir: Path | None, local_mode: bool = False,
                extra: Sequence[str] = (), env: dict[str, str] | None = None) -> Mitmdump:
        """mitmdump in reverse mode in front of `cloud`, with the Enphase addon storing in
        `data_dir` (None: without the addon, for the bench's baseline)."""
        confdir = Path(workdir) / "mitmproxy-conf"
        argv = [str(MITMDUMP), "--mode", f"reverse:{cloud.url}", "--listen-host", "127.0.0.1", "--listen-port", "0",
                "--set", f"confdir={confdir}", "--set", "keep_host_header=true",
                "--set", f"ssl_verify_upstream_trusted_ca={cloud.cafile}", "--set", "flow_detail=0"]
        if data_dir is not None:
            argv += ["-s", str(ADDON), "--set", f"enphase_data_dir={data_dir}"]
        if local_mode:
            argv += ["--set", "enphase_local_mode=true", "--set", "connection_strategy=lazy"]
        return cls(workdir, [*argv, *extra], env)

    @property
    def confdir(self) -> Path:
        return Path(next(a.split("=", 1)[1] for a in self.argv if a.startswith("confdir=")))

    @property
    def ca_cert(self) -> Path:
        """The CA mitmdump signs its certificates with (to verify it from a client)."""
        return self.confdir / "mitmproxy-ca-cert.pem"

    def start(self) -> Mitmdump:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PVTAP_CONFIG", None)
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=self.workdir)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            match = READY.search(self.output())
            if match:
                self.port = int(match.group(1))
                return self
            if self.proc.poll() is not None:
                raise MitmdumpError(f"mitmdump exited with {self.proc.returncode}:\n{self.output()}")
            time.sleep(0.05)
        self.stop()
        raise MitmdumpError(f"mitmdump did not listen within {START_TIMEOUT} s:\n{self.output()}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 15.0) -> int:
        """SIGINT (as Ctrl-C), wait; returns the exit status."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
