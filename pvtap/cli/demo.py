"""`pvtap demo`: pvtap at work with no devices, on this machine only (127.0.0.1).

Each demo device brings a stand-in cloud (a real local server speaking the vendor protocol), the
real proxy piece in front of it, and a simulator talking through it: the Envoy through mitmproxy
with the addon, and the AlphaESS battery, the FoxESS M1 microinverter (TLS, pinned upstream) and
the FoxESS H1 dongle through one relay, as `pvtap run` has them, and a FoxESS T-series whose
RS485-to-TCP bridge connects to the same relay (it has no cloud). The decoded records are printed
as they reach the store, like `pvtap tail --follow`; Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pvtap.certs import foxess_pair
from pvtap.cli.run import (
    MITM_READY,
    RELAY_READY,
    WEB_READY,
    Service,
    SetupError,
    StopRequested,
    Supervisor,
    find_addon,
    find_mitmdump,
)
from pvtap.cli.tail import format_record
from pvtap.config import Config, describe
from pvtap.store.local import LocalStore

if TYPE_CHECKING:
    from pvtap.simulate.enphase_cloud import EnphaseCloud

EPILOG = """\
what runs (all on 127.0.0.1, nothing leaves this machine):
  Enphase Envoy     stand-in reports.enphaseenergy.com (HTTPS, self-signed)
                    <- mitmdump -s addons/enphase.py in reverse mode (its own temporary confdir)
                    <- `pvtap simulate enphase`: a report every --every seconds, starting 6 hours
                       back, then, caught up with the clock, every 5 minutes as an Envoy does
  AlphaESS battery  stand-in www.alphaess.com:7777 (python -m pvtap.simulate.alphaess_cloud)
  FoxESS M1         stand-in FoxESS cloud, TLS as on port 14431, its certificate pinned by the relay
  FoxESS H1         stand-in FoxESS cloud, cleartext as on port 10001
  FoxESS T-series   no cloud: its RS485 broadcast, bridged to TCP, ends at a listener with policy local
                    <- one relay (python -m proxy_tcp) with a listener for each, forwarding and
                       decoding a copy
                    <- `pvtap simulate alphaess`, `foxess-m1`, `foxess-h1`, `foxess-t` (the
                       T-series' RS485-to-TCP bridge): data every --every seconds

  the web view    `pvtap web` on the demo's records, on web.listen (127.0.0.1:8080) or, when
                  that is taken, on a free port: the demo prints the address to open

Records go to <data_dir>/demo (e.g. ./data/demo), not to your real store; look at them again
afterwards with `pvtap --data-dir data/demo tail` (or `devices`, `export`, `web`)."""

#: the demo's proxies serve their health endpoints on free ports, beside a `pvtap run` on the defaults
DEMO_HEALTH = {"PVTAP_HEALTH_RELAY_LISTEN": "127.0.0.1:0", "PVTAP_HEALTH_ENPHASE_LISTEN": "127.0.0.1:0"}
#: mitmproxy's per-connection lines, which would drown the demo's output
_CONNECTION_CHATTER = re.compile(r"\] (client|server) (connect|disconnect)")


@dataclass
class DemoContext:
    supervisor: Supervisor
    workdir: Path  # temporary: certificates, mitmproxy confdir; removed at the end
    data_dir: Path  # where the demo's records go
    every: float  # seconds between simulated reports
    config: Config
    config_path: Path | None


class DemoDevice(Protocol):
    name: str
    store: str  # the local store its records land in (`<store>.sqlite`)

    def start(self, ctx: DemoContext) -> None:
        """Start the stand-in cloud, then the proxy and the simulator as supervised services."""

    def stop(self) -> None:
        """Stop what `start` runs in this process (the supervised services stop separately)."""


def _start_ready(supervisor: Supervisor, service: Service) -> re.Match[str]:
    """Start a service that has a ready pattern; the line that matched it."""
    match = supervisor.start(service)
    assert match is not None, f"{service.name} has no ready pattern"
    return match


class EnphaseDemo:
    name = "Enphase Envoy"
    store = "enphase"

    def __init__(self) -> None:
        self.cloud: EnphaseCloud | None = None

    def start(self, ctx: DemoContext) -> None:
        from pvtap.simulate.enphase_cloud import HOSTNAME, EnphaseCloud

        self.cloud = cloud = EnphaseCloud(cert_dir=ctx.workdir / "enphase-cloud").start()
        ctx.supervisor.say(f"     demo | {self.name}: stand-in {HOSTNAME} on {cloud.url}")
        proxy = Service("mitmproxy", self.mitmdump_command(ctx, cloud), ready=MITM_READY, env=DEMO_HEALTH,
                        show=lambda line: not _CONNECTION_CHATTER.search(line))
        port = _start_ready(ctx.supervisor, proxy)["port"]
        assert proxy.proc is not None  # started
        ctx.supervisor.say(f"     demo | {self.name}: mitmproxy with addons/enphase.py on 127.0.0.1:{port} "
                           f"(pid {proxy.proc.pid})")
        start = int(time.time()) - ENPHASE_HISTORY  # replayed at --every, then as a real Envoy posts
        ctx.supervisor.start(Service("envoy", [
            sys.executable, "-m", "pvtap", "simulate", "enphase", "--url", f"https://{HOSTNAME}",
            "--connect", f"127.0.0.1:{port}", "--micros", "2", "--reports", "0", "--every", f"{ctx.every:g}",
            "--start", str(start)]))

    def mitmdump_command(self, ctx: DemoContext, cloud: EnphaseCloud) -> list[str]:
        argv = [find_mitmdump(), "--mode", f"reverse:{cloud.url}", "--listen-host", "127.0.0.1",
                "--listen-port", "0", "-s", str(find_addon()),
                "--set", f"confdir={ctx.workdir / 'mitmproxy'}", "--set", "keep_host_header=true",
                "--set", f"ssl_verify_upstream_trusted_ca={cloud.cafile}",
                "--set", f"enphase_data_dir={ctx.data_dir}", "--set", "enphase_hosts=reports.enphaseenergy.com",
                "--set", "flow_detail=0"]
        if ctx.config_path is not None:
            argv += ["--set", f"pvtap_config={ctx.config_path.resolve()}"]
        if ctx.config.enphase.local_mode:  # the config asks for it; the addon then needs a lazy strategy
            argv += ["--set", "connection_strategy=lazy"]
        return argv

    def stop(self) -> None:
        if self.cloud is not None:
            self.cloud.stop()


class RelayDevice(Protocol):
    """A device behind the demo's relay: its stand-in cloud, its listener, its simulator."""

    name: str

    def start_cloud(self, ctx: DemoContext) -> None:
        """Start the stand-in cloud as a supervised service."""

    def listener(self, ctx: DemoContext) -> dict[str, Any]:
        """Its `[[relay.listeners]]` table (listen on 127.0.0.1:0), in front of the cloud."""

    def start_device(self, ctx: DemoContext, port: int) -> None:
        """Start the simulator, talking to the relay's listener on `port`."""


class AlphaDevice:
    name = "AlphaESS battery"
    READY = re.compile(r"cloud listening on (?P<host>[\d.]+):(?P<port>\d+)")

    def start_cloud(self, ctx: DemoContext) -> None:
        self.cloud = _start_ready(ctx.supervisor, Service("alphaess-cloud", [
            sys.executable, "-m", "pvtap.simulate.alphaess_cloud", "--port", "0"], ready=self.READY,
            show=lambda line: False))  # its frame-by-frame lines repeat the battery's
        ctx.supervisor.say(f"     demo | {self.name}: stand-in www.alphaess.com on 127.0.0.1:{self.cloud['port']}")

    def listener(self, ctx: DemoContext) -> dict[str, Any]:
        return {"protocol": "alphaess", "listen": "127.0.0.1:0", "upstream": f"127.0.0.1:{self.cloud['port']}"}

    def start_device(self, ctx: DemoContext, port: int) -> None:
        ctx.supervisor.start(Service("battery", [
            sys.executable, "-m", "pvtap", "simulate", "alphaess", "--host", "127.0.0.1", "--port", str(port),
            "--interval", f"{ctx.every:g}", "--extended-every", f"{ctx.every * 5:g}"]))


class FoxDevice:
    """A FoxESS device and a stand-in FoxESS cloud: the M1 over TLS (the relay terminates the
    M1's TLS and pins the cloud's certificate), the H1 dongle in cleartext."""

    READY = re.compile(r"^listening (?P<host>[\d.]+):(?P<port>\d+) sha256 (?P<sha256>\S+)")

    def __init__(self, model: str) -> None:
        self.model = model  # "m1" or "h1"
        self.name = f"FoxESS {model.upper()}" + (" microinverter" if model == "m1" else " inverter's dongle")
        self.tls = model == "m1"

    def start_cloud(self, ctx: DemoContext) -> None:
        argv = [sys.executable, "-m", "pvtap.simulate.foxess_cloud", "--port", "0"]
        argv += ["--cert-dir", str(ctx.workdir / "foxess-cloud")] if self.tls else ["--plain"]
        self.cloud = _start_ready(ctx.supervisor, Service(f"{self.model}-cloud", argv, ready=self.READY,
                                                          show=lambda line: False))
        how = f"TLS, certificate sha256 {self.cloud['sha256'][:16]}…" if self.tls else "cleartext"
        ctx.supervisor.say(f"     demo | {self.name}: stand-in FoxESS cloud ({how}) on 127.0.0.1:{self.cloud['port']}")

    def listener(self, ctx: DemoContext) -> dict[str, Any]:
        table: dict[str, Any] = {"protocol": "foxess", "listen": "127.0.0.1:0",
                                 "upstream": f"127.0.0.1:{self.cloud['port']}"}
        if self.tls:  # as the default 14431 listener: terminate the M1's TLS, re-encrypt, pin the cloud
            cert, key = foxess_pair(ctx.workdir / "relay-certs")
            table.update(tls_cert=str(cert), tls_key=str(key), upstream_tls=True,
                         upstream_pin_sha256=self.cloud["sha256"])
        return table

    def start_device(self, ctx: DemoContext, port: int) -> None:
        ctx.supervisor.start(Service(self.model, [
            sys.executable, "-m", "pvtap", "simulate", f"foxess-{self.model}", "--cloud", f"127.0.0.1:{port}",
            "--interval", f"{ctx.every:g}"]))


class TSeriesDevice:
    """A FoxESS T-series behind an RS485-to-TCP bridge: no cloud, a listener with policy local
    (docs/foxess.md), the bridge connecting to it."""

    name = "FoxESS T-series inverter"

    def start_cloud(self, ctx: DemoContext) -> None:
        pass  # the T-series only broadcasts: there is no cloud to stand in for

    def listener(self, ctx: DemoContext) -> dict[str, Any]:
        return {"protocol": "foxess", "listen": "127.0.0.1:0", "policy": "local"}

    def start_device(self, ctx: DemoContext, port: int) -> None:
        ctx.supervisor.start(Service("t-series", [
            sys.executable, "-m", "pvtap", "simulate", "foxess-t", "--connect", f"127.0.0.1:{port}",
            "--interval", f"{ctx.every:g}"]))


class RelayDemo:
    """The relay devices behind one relay process, as `pvtap run` runs it."""

    name = "relay"
    store = "relay"
    LISTENING = re.compile(r"relay listening: (?P<protocol>\S+) on (?P<host>[\d.]+):(?P<port>\d+)")

    def __init__(self) -> None:
        self.devices: list[RelayDevice] = [AlphaDevice(), FoxDevice("m1"), FoxDevice("h1"), TSeriesDevice()]

    def start(self, ctx: DemoContext) -> None:
        for device in self.devices:
            device.start_cloud(ctx)
        config = ctx.workdir / "relay.toml"
        config.write_text(relay_config(ctx.config, [device.listener(ctx) for device in self.devices]))
        relay = Service("relay", [sys.executable, "-m", "proxy_tcp", "--data-dir", str(ctx.data_dir),
                                  "--config", str(config)], ready=RELAY_READY, env=DEMO_HEALTH)
        ctx.supervisor.start(relay)
        ports = [int(m["port"]) for line in relay.tail if (m := self.LISTENING.search(line))]
        assert len(ports) == len(self.devices), f"the relay listed {ports}"  # it logs them in config order
        for device, port in zip(self.devices, ports):
            ctx.supervisor.say(f"     demo | {device.name}: relay (python -m proxy_tcp) on 127.0.0.1:{port}")
            device.start_device(ctx, port)

    def stop(self) -> None:
        pass  # its pieces are all supervised services


def relay_config(config: Config, listeners: Sequence[Mapping[str, Any]]) -> str:
    """A TOML config with the user's settings (but data_dir, which --data-dir gives) and the
    demo's listeners instead of theirs."""
    lines: list[str] = []
    section = ""
    for key, *_ in describe():
        if key.startswith("relay.") or key == "data_dir":
            continue
        value: Any = config
        for part in key.split("."):
            value = getattr(value, part)
        if value is None:  # not set
            continue
        table, _, name = key.rpartition(".")
        if table != section:
            lines.append(f"\n[{table}]")
            section = table
        lines.append(f"{name} = {_toml_value(value)}")
    for listener in listeners:
        lines.append("\n[[relay.listeners]]")
        lines.extend(f"{name} = {_toml_value(value)}" for name, value in listener.items())
    return "\n".join(lines).lstrip("\n") + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a JSON string is a TOML basic string


#: how far back the Envoy simulator starts: six hours replayed at --every, then live
ENPHASE_HISTORY = 6 * 3600
DEVICES: list[type] = [EnphaseDemo, RelayDemo]


class RecordPrinter:
    """Prints records as they reach the demo's stores, from where they stood at the start."""

    def __init__(self, supervisor: Supervisor, data_dir: Path, stores: list[str], interval: float = 0.5) -> None:
        self.supervisor, self.interval = supervisor, interval
        self.paths = [data_dir / f"{name}.sqlite" for name in stores]
        self.cursors = {path: self._last_id(path) for path in self.paths}
        self.printed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-records", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # what arrived while the services stopped

    def poll(self) -> None:
        for path in self.paths:
            if not path.exists():
                continue
            with LocalStore(path, readonly=True) as store:
                for stored in store.records(after_id=self.cursors[path]):
                    self.supervisor.say(f"   record | {format_record(stored.record)}")
                    self.cursors[path] = stored.id
                    self.printed += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    @staticmethod
    def _last_id(path: Path) -> int:
        if not path.exists():
            return 0
        with LocalStore(path, readonly=True) as store:
            last = next(store.records(newest_first=True, limit=1), None)
            return last.id if last else 0


def start_web(ctx: DemoContext) -> None:
    """The web view on the demo's records: on web.listen, or on a free port when that is taken
    (a `pvtap run` beside the demo has it); none when web.listen is empty."""
    listen = ctx.config.web.listen
    if not listen:
        return
    host = listen.rpartition(":")[0]
    for where in dict.fromkeys([listen, f"{host}:0"]):
        argv = [sys.executable, "-m", "pvtap", "--data-dir", str(ctx.data_dir), "web", "--listen", where]
        if ctx.config_path is not None:
            argv[3:3] = ["--config", str(ctx.config_path.resolve())]
        service = Service("web", argv, ready=WEB_READY, optional=True, show=lambda line: False)
        try:
            ready = ctx.supervisor.start(service)
        except SetupError:
            ctx.supervisor.drop(service)
            continue
        assert ready is not None  # it has a ready pattern
        ctx.supervisor.say(f"     demo | web view: open http://{ready['host']}:{ready['port']}/ for charts of the "
                           "demo's records")
        return
    ctx.supervisor.say(f"     demo | the web view could not start on {listen} (see web.listen); the demo goes on")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "demo", help="see pvtap work with simulated devices and stand-in clouds (no devices needed)",
        description="Start stand-in vendor clouds, the real proxy in front of them and device simulators "
                    "posting through it, all on this machine, and print each forwarded report and the "
                    "decoded records as they are stored. Ctrl-C stops everything.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--every", type=_seconds, default=3.0, metavar="SECONDS",
                        help="seconds between simulated reports (default: 3)")
    parser.add_argument("--demo-dir", type=Path, metavar="DIR",
                        help="where the demo's records go (default: <data_dir>/demo)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    data_dir = (args.demo_dir or Path(config.data_dir) / "demo").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="pvtap-demo-"))
    supervisor = Supervisor()
    restore = supervisor.handle_signals()
    devices = [device() for device in DEVICES]
    printer = RecordPrinter(supervisor, data_dir, [d.store for d in devices])
    ctx = DemoContext(supervisor, workdir, data_dir, args.every, config, args.config)
    status = 0
    try:
        supervisor.say(f"     demo | records go to {data_dir} (your real store is not touched); Ctrl-C stops the demo")
        printer.start()
        for device in devices:
            device.start(ctx)
        start_web(ctx)
        died = supervisor.wait()
        if died is not None:
            assert died.proc is not None  # wait() returns only a service that ran and exited
            supervisor.say(f"     demo | {died.name} exited with status {died.proc.returncode}; stopping the demo")
            status = 1
    except StopRequested:
        pass
    except SetupError as exc:
        print(f"pvtap demo: {exc}", file=sys.stderr)
        status = 1
    finally:
        supervisor.stop()
        for device in devices:
            device.stop()
        printer.stop()
        restore()
        shutil.rmtree(workdir, ignore_errors=True)
    supervisor.say(f"     demo | stopped; {printer.printed} records shown. Again: pvtap --data-dir {data_dir} tail")
    return status


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of seconds greater than 0")
    return value
