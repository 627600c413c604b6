"""`pvtap run`: the main job. Starts pvtap's proxy services as child processes, says where each
listens and what to do next, passes their output on, and stops them all together.

The services are a list (`services()`): mitmproxy with the Enphase addon, and the TCP relay for
AlphaESS and FoxESS devices. Each embeds its own InfluxDB forwarder when `[influx] url` is set.
A `Supervisor` starts them one after another
(each must say it is listening before the next starts), forwards SIGINT/SIGTERM, stops the rest
when one dies and then exits non-zero. If `pvtap run` itself is killed (SIGKILL), the kernel
stops the services: each is started through `orphan_guard.py`, which sets a death signal.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from pvtap import datadir
from pvtap.cli.relay import default_listener_lines
from pvtap.config import Config, ConfigError, is_loopback, split_host_port, unknown_env

ADDON = Path(__file__).resolve().parents[2] / "addons" / "enphase.py"
#: starts a command that gets SIGTERM when this process dies (runs without importing pvtap)
ORPHAN_GUARD = Path(__file__).resolve().with_name("orphan_guard.py")
#: mitmdump's start-up line, e.g. "Transparent Proxy listening at *:8443."
MITM_READY = re.compile(r"listening at (?P<host>\S+):(?P<port>\d+)\.\s*$")
RELAY_PROG = "python -m proxy_tcp"
#: the relay's start-up line, once every listener is up
RELAY_READY = re.compile(r"relay ready: (?P<count>\d+) listener")
#: `pvtap web`'s start-up line (pvtap.cli.web.READY_LINE)
WEB_READY = re.compile(r"web view ready on http://(?P<host>\S+):(?P<port>\d+)/")
READY_TIMEOUT = 30.0
#: how long a service may take to stop before it is killed: more than the relay's own grace
#: (proxy_tcp.service.RELAY_STOP_GRACE, which adds up its steps), or a clean stop would be cut short
STOP_TIMEOUT = 30.0

EPILOG = """\
what it starts:
  mitmproxy (mitmdump) with addons/enphase.py, in enphase.mode on enphase.listen:
    transparent  the Envoy's port 443 is REDIRECTed to this host's listen port by a firewall
                 rule on this host (the original destination is read from the socket)
    reverse      a DNS override or a DNAT on the router sends the Envoy here; forwarded to
                 enphase.upstream (this host must resolve the real name)
    regular      the device is configured to use this host as its HTTP proxy
  the TCP relay (python -m proxy_tcp) with the [[relay.listeners]] of the config, else one
    listener per supported device on its usual port (see `pvtap relay --help`):
    {relay_defaults}
  Records go to <data_dir>/enphase.sqlite and <data_dir>/relay.sqlite; watch them with
  `pvtap tail --follow`. With [influx] url set, each service also delivers them to InfluxDB.
  All state lives in data_dir, mitmproxy's CA included (<data_dir>/mitmproxy).
  Each serves /healthz, /readyz and /metrics: the relay on health.relay_listen (127.0.0.1:9108),
  mitmproxy on health.enphase_listen (127.0.0.1:9109); `pvtap health` asks both (docs/health.md).
  the web view (pvtap web) on web.listen, http://127.0.0.1:8080/ by default: devices, live
    values, charts, health; read-only, a process of its own. If it cannot start (the port is
    taken), pvtap run says so and forwards without it; web.listen = "" turns it off.

examples:
  pvtap run                                   transparent proxy on 0.0.0.0:8443, store in ./data
  pvtap --config pvtap.toml run
  PVTAP_ENPHASE_MODE=reverse pvtap run
  PVTAP_ENPHASE_TLS_MIN_VERSION=TLS1 pvtap run   an old Envoy that speaks TLS 1.0 (the old
                                              cipher suites it needs are then allowed too)
  pvtap run --dry-run                         print the command lines and exit

Ctrl-C (SIGINT) or SIGTERM stops every service cleanly; if one service dies, the others are
stopped and pvtap exits with status 1; a setting that keeps a service from starting is named in
one line, with the fix (status 2). If pvtap itself is killed (SIGKILL, the OOM killer), the
kernel sends each service SIGTERM: none is left running on its port. See docs/enphase.md."""


class SetupError(Exception):
    """Something needed to start is missing; the message says what and how to fix it."""


@dataclass
class Service:
    """One child process pvtap keeps running."""

    name: str
    argv: list[str]
    #: a line of its output that says it is ready (listening); None: ready once started
    ready: re.Pattern[str] | None = None
    #: what to print once it is ready (given its ready line): where it listens, what to do next
    next_steps: Callable[[re.Match[str] | None], list[str]] = lambda ready: []
    #: which of its output lines to pass on (all by default)
    show: Callable[[str], bool] = lambda line: True
    #: given its last output after it exited before it was ready, the config error to report (None: unknown)
    explain: Callable[[list[str]], str | None] = lambda tail: None
    env: dict[str, str] = field(default_factory=dict)
    #: pvtap keeps forwarding without it: a failure to start or an exit is reported, not fatal
    optional: bool = False
    proc: subprocess.Popen | None = None
    ready_match: re.Match[str] | None = None
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=20))

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def child_environment() -> dict[str, str]:
    """This process's environment without the `PVTAP_*` variables that name no setting: pvtap
    warned about them once; its services need not repeat it."""
    unknown = set(unknown_env())
    return {name: value for name, value in os.environ.items() if name not in unknown}


class ConfigMistake(SetupError):
    """A service could not start because of a setting; the message names it and the fix."""


class StopRequested(Exception):
    """A signal arrived while services were starting."""


class Supervisor:
    """Starts services, passes their output on, and stops all of them together."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.services: list[Service] = []
        self.stop_signal: int | None = None
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._print_lock = threading.Lock()

    # -- signals ---------------------------------------------------------------------------

    def handle_signals(self) -> Callable[[], None]:
        """Turn SIGINT/SIGTERM into a stop request; returns a function restoring the old handlers."""
        def on_signal(signum: int, _frame: object) -> None:
            if self.stop_signal is None:
                self.stop_signal = signum
            self._stop.set()
        old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}

        def restore() -> None:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        return restore

    # -- running ---------------------------------------------------------------------------

    def say(self, text: str) -> None:
        with self._print_lock:
            self.out.write(text + "\n")
            self.out.flush()

    def start(self, service: Service, timeout: float = READY_TIMEOUT) -> re.Match[str] | None:
        """Start a service and wait until it says it is ready. Raises SetupError if it exits
        first (ConfigMistake when its `explain` names the setting at fault) or takes longer than
        `timeout`, StopRequested on a signal."""
        ready = threading.Event()
        service.proc = subprocess.Popen(
            [sys.executable, "-I", str(ORPHAN_GUARD), str(os.getpid()), "--", *service.argv],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**child_environment(), "PYTHONUNBUFFERED": "1", **service.env}, text=True, errors="replace", bufsize=1,
            process_group=0,  # Ctrl-C reaches pvtap only; pvtap forwards it once, in order
        )
        self.services.append(service)
        pump = threading.Thread(target=self._pump, args=(service, ready), name=f"output-{service.name}", daemon=True)
        pump.start()
        self._pumps.append(pump)
        if service.ready is None:
            ready.set()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.05):
            if self._stop.is_set():
                raise StopRequested()
            if service.proc.poll() is not None:
                pump.join(2)
                if (mistake := service.explain(list(service.tail))) is not None:
                    raise ConfigMistake(mistake)
                raise SetupError(f"{service.name} exited with status {service.proc.returncode} before it was ready. "
                                 f"Its last output:\n  " + "\n  ".join(service.tail))
            if time.monotonic() > deadline:
                raise SetupError(f"{service.name} did not report ready within {timeout:.0f} s. Its last output:\n  "
                                 + "\n  ".join(service.tail))
        return service.ready_match

    def wait(self) -> Service | None:
        """Block until a stop is requested (None) or a service exits (that service); an optional
        service that exits is reported once and left stopped."""
        reported: set[str] = set()
        while not self._stop.wait(0.2):
            for service in self.services:
                if service.proc is None or service.proc.poll() is None or service.name in reported:
                    continue
                if not service.optional:
                    return service
                reported.add(service.name)
                self.say(f"pvtap run: {service.name} exited with status {service.proc.returncode}; the proxies go on "
                         "without it. Its last output:\n  " + "\n  ".join(service.tail))
        return None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the services, last started first, with the signal that was received (SIGTERM
        if none); SIGKILL whatever has not exited after `timeout` seconds."""
        signum = self.stop_signal or signal.SIGTERM
        for service in reversed(self.services):
            proc = service.proc
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signum)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.say(f"pvtap: {service.name} did not stop within {timeout:.0f} s; killing it")
                proc.kill()
                proc.wait()
        for pump in self._pumps:
            pump.join(2)

    def drop(self, service: Service, timeout: float = STOP_TIMEOUT) -> None:
        """Stop one service that failed to start and forget it."""
        if service.proc is not None and service.proc.poll() is None:
            service.proc.terminate()
            try:
                service.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                service.proc.kill()
                service.proc.wait()
        self.services.remove(service)

    def _pump(self, service: Service, ready: threading.Event) -> None:
        assert service.proc is not None and service.proc.stdout is not None
        for raw in service.proc.stdout:
            line = raw.rstrip("\n")
            service.tail.append(line)
            if not ready.is_set() and service.ready is not None and (match := service.ready.search(line)):
                service.ready_match = match
                ready.set()
            if service.show(line):
                self.say(f"{service.name:>9} | {line}")


# -- the services -----------------------------------------------------------------------------

def find_mitmdump() -> str:
    """mitmdump from pvtap's own environment (next to the Python running pvtap), else from PATH."""
    beside = Path(sys.executable).parent / "mitmdump"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mitmdump")
    if found:
        return found
    raise SetupError(
        f"mitmdump (mitmproxy) is not installed: not next to {sys.executable} and not on PATH. "
        f"Fix: `make install`, or `{sys.executable} -m pip install mitmproxy==12.2.3`.")


def find_addon() -> Path:
    if not ADDON.is_file():
        raise SetupError(f"the mitmproxy addon {ADDON} is missing: pvtap must run from its source tree "
                         "(`pip install -e .`), which holds addons/enphase.py.")
    return ADDON


def mitmdump_command(config: Config, *, config_path: Path | None = None,
                     extra_sets: Sequence[str] = ()) -> list[str]:
    """The mitmdump command line `pvtap run` uses for the Enphase path."""
    e = config.enphase
    host, port = split_host_port(e.listen)
    mode = f"reverse:{e.upstream}" if e.mode == "reverse" else e.mode
    argv = [find_mitmdump(), "--mode", mode, "--listen-host", host, "--listen-port", str(port),
            "-s", str(find_addon())]
    if not any(item.startswith("confdir=") for item in extra_sets):  # mitmdump refuses an option set twice
        argv += ["--set", f"confdir={mitmproxy_confdir(config)}"]
    argv += ["--set", f"enphase_data_dir={Path(config.data_dir).resolve()}",
             "--set", f"termlog_verbosity={'warn' if config.log_level == 'warning' else config.log_level}"]
    if config_path is not None:
        argv += ["--set", f"pvtap_config={config_path.resolve()}"]
    if e.mode == "reverse":
        argv += ["--set", "keep_host_header=true"]
    if e.local_mode:
        argv += ["--set", "enphase_local_mode=true", "--set", "connection_strategy=lazy"]
    for item in extra_sets:
        argv += ["--set", item]
    return argv


#: mitmproxy's lines when it cannot listen: "… failed to listen on 0.0.0.0:8443 with [Errno 98] …: address
#: already in use", then its own hint (`--mode transparent@8445`), which names no pvtap setting
MITM_LISTEN_FAILED = re.compile(r"failed to listen on \S+ with \[Errno (?P<errno>\d+)\].*?(?P<reason>[^:]+)$")
MITM_PORT_HINT = re.compile(r"^Try specifying a different port by using `--mode")
LISTEN_FIXES = {
    errno.EADDRINUSE: "stop what listens there, or set {key} ({env}) to a free port",
    errno.EACCES: "ports below 1024 need root or CAP_NET_BIND_SERVICE: listen on a higher port (8443) and let the "
                  "firewall REDIRECT 443 to it, or grant the capability",
    errno.EADDRNOTAVAIL: "use an address of this host, or 0.0.0.0 for all of them",
}


def mitmproxy_listen_error(config: Config, tail: list[str]) -> str | None:
    """mitmproxy could not listen: say so in terms of enphase.listen, not of mitmproxy's options."""
    for line in tail:
        if match := MITM_LISTEN_FAILED.search(line):
            key, env = "enphase.listen", "PVTAP_ENPHASE_LISTEN"
            fix = LISTEN_FIXES.get(int(match["errno"]), "set {key} ({env}) to an address and port of this host")
            return str(ConfigError(key, config.enphase.listen,
                                   f"mitmproxy cannot listen there ({match['reason'].strip()})",
                                   fix.format(key=key, env=env), env if env in os.environ else ""))
    return None


def mitmproxy_tls_option_error(extra_sets: Sequence[str], tail: list[str]) -> str | None:
    """mitmproxy 12.2 dies when tls_version_client_min changes on an OpenSSL without SSL 3; the
    addon's enphase.tls_min_version sets it safely."""
    given = next((item for item in extra_sets if item.startswith("tls_version_client_min=")), None)
    if given is None or not any("_warn_unsupported_version" in line for line in tail):
        return None
    version = given.partition("=")[2]
    return str(ConfigError("--mitmproxy-set", given, "mitmproxy fails on this option with this OpenSSL build",
                           f'use the pvtap setting instead: enphase.tls_min_version = "{version}" '
                           f"(PVTAP_ENPHASE_TLS_MIN_VERSION={version})"))


def relay_config_error(tail: list[str]) -> str | None:
    """The relay's own one-line config error (it exits 2 after printing it)."""
    prefix = f"{RELAY_PROG}: "
    return next((line.removeprefix(prefix) for line in tail if line.startswith(prefix + "config error:")), None)


def mitmproxy_shows(line: str) -> bool:
    """mitmproxy's own listen failure and port hint are replaced by pvtap's line."""
    return not (MITM_LISTEN_FAILED.search(line) or MITM_PORT_HINT.search(line))


def mitmproxy_confdir(config: Config) -> Path:
    """Where mitmproxy keeps its CA (whose key signs every certificate the Envoy sees): in the
    data directory, so that one directory (one volume) holds all of pvtap's state."""
    return Path(config.data_dir).resolve() / "mitmproxy"


def enphase_next_steps(config: Config, ready: re.Match[str] | None) -> list[str]:
    e = config.enphase
    port = ready["port"] if ready else split_host_port(e.listen)[1]
    steps = {
        "transparent": [
            "Send the Envoy's HTTPS here with a REDIRECT on this host (192.0.2.10 = your Envoy's address):",
            f"  iptables -t nat -A PREROUTING -s 192.0.2.10 -p tcp --dport 443 -j REDIRECT --to-port {port}",
            "  (nftables, routers and DNS overrides: docs/enphase.md)",
        ],
        "reverse": [
            f"Forwarding to {e.upstream}. Point {e.hosts[0]} at this host in your LAN's DNS (this host must",
            f"  still resolve the real name), or DNAT the Envoy's port 443 to this host's port {port} "
            "(docs/enphase.md).",
        ],
        "regular": [f"Configure the device to use this host, port {port}, as its HTTP proxy."],
    }[e.mode]
    if e.local_mode:
        steps.append("LOCAL MODE: reports are answered here as the cloud would; nothing reaches Enphase.")
    return steps


def relay_command(config: Config, config_path: Path | None) -> list[str]:
    """`python -m proxy_tcp` with the same config and data directory: the configured
    `[[relay.listeners]]`, else one listener per supported device on its usual port."""
    argv = [sys.executable, "-m", "proxy_tcp", "--data-dir", str(Path(config.data_dir).resolve())]
    if config_path is not None:
        argv += ["--config", str(Path(config_path).resolve())]
    return argv


def relay_next_steps(config: Config) -> list[str]:
    return ["send AlphaESS/FoxESS traffic to the ports above (NAT redirect or DNS override): see docs/relay.md",
            f"records go to {Path(config.data_dir).resolve() / 'relay.sqlite'}"]


def web_command(config: Config, config_path: Path | None) -> list[str]:
    """`pvtap web` on the same stores: the read-only web view, a process of its own so that its
    queries never run on a forwarding process's event loop."""
    argv = [sys.executable, "-m", "pvtap"]
    if config_path is not None:
        argv += ["--config", str(Path(config_path).resolve())]
    return [*argv, "--data-dir", str(Path(config.data_dir).resolve()), "web"]


def web_next_steps(config: Config, ready: re.Match[str] | None) -> list[str]:
    host, port = (ready["host"], ready["port"]) if ready else split_host_port(config.web.listen)
    if is_loopback(host.strip("[]")):
        return [f"open http://{host}:{port}/ in a browser on this machine: devices, live values, charts"]
    return [f"open http://<this host>:{port}/ from the LAN (user name: any; password: web.password)"]


def services(config: Config, args: argparse.Namespace) -> list[Service]:
    """Everything `pvtap run` keeps running, in start order."""
    planned = [
        Service("mitmproxy",
                mitmdump_command(config, config_path=args.config, extra_sets=args.mitmproxy_set),
                ready=MITM_READY, next_steps=lambda ready: enphase_next_steps(config, ready),
                show=mitmproxy_shows, explain=lambda tail: mitmproxy_listen_error(config, tail)
                or mitmproxy_tls_option_error(args.mitmproxy_set, tail)),
        Service("relay", relay_command(config, args.config), ready=RELAY_READY,
                next_steps=lambda ready: relay_next_steps(config), explain=relay_config_error),
    ]
    if config.web.listen:
        planned.append(Service("web", web_command(config, args.config), ready=WEB_READY, optional=True,
                               next_steps=lambda ready: web_next_steps(config, ready)))
    return planned


# -- the command ------------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "run", help="run the proxy services (mitmproxy with the Enphase addon, the TCP relay) until stopped",
        description="Start pvtap's proxy services, forward every byte to the vendor clouds and store "
                    "a decoded copy in the local store, until Ctrl-C or SIGTERM.",
        epilog=EPILOG.format(relay_defaults="\n    ".join(default_listener_lines())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mitmproxy-set", action="append", default=[], metavar="OPTION=VALUE",
                        help="pass an extra --set to mitmdump (repeatable), e.g. ignore_hosts=REGEX")
    parser.add_argument("--dry-run", action="store_true", help="print each service's command line and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    try:
        planned = services(config, args)
    except SetupError as exc:
        print(f"pvtap run: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for service in planned:
            print(f"{service.name}: {service.command}")
        return 0
    try:
        data_dir = datadir.prepare(config.data_dir)
    except ConfigError as exc:
        print(f"pvtap run: {exc}", file=sys.stderr)
        return 2
    mitmproxy_confdir(config).mkdir(mode=0o700, exist_ok=True)
    supervisor = Supervisor()
    restore = supervisor.handle_signals()
    try:
        supervisor.say(f"pvtap run: storing in {data_dir}")
        for service in planned:
            supervisor.say(f"pvtap run: starting {service.name}: {service.command}")
            try:
                match = supervisor.start(service)
            except SetupError as exc:
                if not service.optional:
                    raise
                supervisor.drop(service)
                supervisor.say(f"pvtap run: {exc}\npvtap run: going on without {service.name} (forwarding is not "
                               "affected); fix the cause and restart pvtap run")
                continue
            assert service.proc is not None  # start() ran it
            where = f" on {match['host']}:{match['port']}" if match and "port" in match.groupdict() else ""
            supervisor.say(f"pvtap run: {service.name} is up{where} (pid {service.proc.pid})")
            for step in service.next_steps(match):
                supervisor.say(f"  {step}")
        supervisor.say("pvtap run: watch records arrive with `pvtap tail --follow`; Ctrl-C stops everything.")
        died = supervisor.wait()
    except StopRequested:
        died = None
    except SetupError as exc:
        supervisor.stop()  # first, so that the reason is the last line
        restore()
        print(f"pvtap run: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigMistake) else 1
    if died is not None:
        assert died.proc is not None  # wait() returns only a service that ran and exited
        supervisor.say(f"pvtap run: {died.name} exited with status {died.proc.returncode}; stopping the others")
    supervisor.stop()
    restore()
    if died is not None:
        return 1
    supervisor.say("pvtap run: stopped")
    return 0
