"""Copy Enphase Envoy cloud reports into pvtap while mitmproxy forwards them untouched.

    mitmdump -s addons/enphase.py --mode transparent --set pvtap_config=pvtap.toml

The Envoy POSTs zlib-compressed XML to reports.enphaseenergy.com/emu_reports/performance_report.
For every POST to an `/emu_reports/` path on one of `enphase_hosts`, the request and response
hooks hand the raw bytes to pvtap's ingest worker, a process of its own (started in `running`)
that redacts and archives them at once and decodes them after: the hooks only queue the bytes
on a socket (never waiting), read `raw_content` and never change a request or a response, so
the cloud and the Envoy see exactly the bytes that were sent. No hook blocks: a changed store
or privacy setting hands the old worker its last payloads and starts a new one. With
`enphase_local_mode` the addon answers the reports itself, as the cloud would, and no
connection to the cloud is made. With `enphase_fallback_after` it does so only once the cloud
has been unreachable that long (enphase_fallback.py watches the cloud).

Unset options take their value from the pvtap config (`pvtap_config`, else $PVTAP_CONFIG and
PVTAP_* variables, else the built-in defaults). See docs/enphase.md.

The Envoy's LAN address appears in no log line unless `privacy.store_network_identity` is set:
the addon's own lines name it as pvtap/peers.py does, and a filter does the same for the client
address mitmproxy's proxy server puts in front of its lines ("[peer#1:50122] client connect") and
the line that replaces mitmproxy's "Transparent mode failure" (NotRedirectedLine).
"""

import asyncio
import contextlib
import dataclasses
import functools
import logging
import socket
from collections.abc import Callable, Sequence
from pathlib import Path

from enphase_fallback import CloudFallback  # beside this script (mitmproxy puts its directory on sys.path)
from mitmproxy import ctx, exceptions, http, platform
from mitmproxy.net import tls as net_tls
from OpenSSL import SSL

from pvtap import datadir
from pvtap.config import Config, ConfigError, env_warnings, load_config, parse_duration
from pvtap.decode.enphase import build_response, event_ids, report_kind
from pvtap.health import Health
from pvtap.ingest.channel import Channel
from pvtap.ingest.settings import WorkerSettings
from pvtap.metrics import FlowTraffic, WorkerStats
from pvtap.peers import PeerNames
from pvtap.privacy import Privacy
from pvtap.records import DOWN, UP, Origin, RawPayload, Record, now_utc
from pvtap.store.local import LocalStore

log = logging.getLogger("pvtap.enphase")

OPTIONS = {"pvtap_config", "enphase_data_dir", "enphase_local_mode", "enphase_hosts", "enphase_tls_min_version",
           "enphase_fallback_after", "enphase_cloud_timeout", "connection_strategy"}
TLS_VERSIONS = ("TLS1", "TLS1_1", "TLS1_2", "TLS1_3")
DEFAULT_TLS_MIN = "TLS1_2"  # mitmproxy's own default
#: the logger whose records carry the client address (`extra={"client": peername}`)
MITMPROXY_SERVER_LOG = "mitmproxy.proxy.server"
LOCAL_RESPONSE_HEADERS = {"Content-Type": "application/x-deflate; charset=utf-8", "Connection": "close"}


@dataclasses.dataclass(frozen=True)
class Settings:
    """The options after merging with the pvtap config: what the hooks act on."""

    data_dir: Path
    local_mode: bool
    hosts: frozenset[str]
    tls_min_version: str
    fallback_after: float  # seconds; 0: never answer locally because the cloud is unreachable
    cloud_timeout: float
    config: Config  # with data_dir as above; privacy is built from it when the store opens


class EnphaseTap:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.channel: Channel | None = None  # to the ingest worker; None while the store cannot be opened
        self.store_path: Path | None = None
        self.peers = PeerNames()  # the Envoy's address in the log, as the privacy settings allow
        self.fallback = CloudFallback(self._store_record)
        self.health: Health | None = None  # /healthz, /readyz, /metrics (health.enphase_listen)
        self.traffic = FlowTraffic("enphase")

    def load(self, loader) -> None:
        logging.getLogger(MITMPROXY_SERVER_LOG).addFilter(self._name_client)
        _not_redirected.install(self._peer_endpoint)
        loader.add_option(
            "pvtap_config", str | None, None,
            "Path to the pvtap TOML config. Unset: $PVTAP_CONFIG, else the built-in defaults.",
        )
        loader.add_option(
            "enphase_data_dir", str | None, None,
            "Directory for the local store (enphase.sqlite). Unset: data_dir from the pvtap config (./data).",
        )
        loader.add_option(
            "enphase_local_mode", bool, False,
            """
            Answer /emu_reports/ posts here, as the cloud would, instead of forwarding them; needs
            connection_strategy=lazy. Also on when the pvtap config sets enphase.local_mode.
            """,
        )
        loader.add_option(
            "enphase_tls_min_version", str | None, None,
            "Oldest TLS version accepted from the Envoy (TLS1, TLS1_1, TLS1_2, TLS1_3); sets tls_version_client_min "
            "safely. Unset: enphase.tls_min_version from the pvtap config (TLS1_2).",
        )
        loader.add_option(
            "enphase_hosts", Sequence[str], list(Config().enphase.hosts),
            "Hosts (Host header) whose /emu_reports/ posts are copied and decoded. "
            "Unset: enphase.hosts from the pvtap config.",
        )
        loader.add_option(
            "enphase_fallback_after", str | None, None,
            """
            Answer performance reports here once the cloud has been unreachable this long (e.g. 90s,
            15m, 2h; 0: never). For a cloud that is gone, not one that blinks: the Envoy drops what
            it got an answer for. Unset: enphase.fallback_after from the pvtap config (off).
            """,
        )
        loader.add_option(
            "enphase_cloud_timeout", str | None, None,
            "How long the cloud may take to accept a connection or a TLS handshake before it counts as "
            "unreachable (e.g. 30s). Unset: enphase.cloud_timeout from the pvtap config (30s).",
        )

    def configure(self, updated: set[str]) -> None:
        """Validate and merge the options with the pvtap config; touches no file (so that
        `mitmdump -s addons/enphase.py --options` writes nothing). A change of store or privacy
        settings while running reopens the store."""
        if not updated & OPTIONS:
            return
        if updated == {"connection_strategy"} and self.settings and not self.settings.local_mode:
            return  # nothing here depends on it (the fallback switches it while the cloud is gone)
        settings, old = self._settings(), self.settings
        if old is None:  # once: pvtap run's children get an environment without the unknown variables
            for warning in env_warnings():
                log.warning("enphase: %s", warning)
        reopen = self.channel is not None and old is not None and \
            (settings.data_dir, settings.config.privacy) != (old.data_dir, old.config.privacy)
        self.settings = settings
        log.info("enphase: decoding /emu_reports/ posts to %s into %s%s", ", ".join(sorted(settings.hosts)),
                 settings.data_dir / "enphase.sqlite",
                 "; LOCAL MODE: answering them here" if settings.local_mode else "")
        if reopen:
            self._stop_ingest()
            self._start_ingest()
        _tls_minimum.apply(settings.tls_min_version)
        self.fallback.apply_settings(settings.fallback_after, settings.cloud_timeout, settings.hosts)

    def running(self) -> None:
        """Open the store and start the ingest worker: before the first request can complete
        (mitmproxy runs this right after its servers start listening). Then serve the health
        endpoints; an address that cannot be used stops mitmproxy, as a busy listen port does."""
        if self.channel is None:
            self._start_ingest()
        if self.health is None and self.settings is not None:
            health_config = self.settings.config.health
            try:
                self.health = Health("enphase", health_config).serve(health_config.enphase_listen,
                                                                     "health.enphase_listen")
            except ConfigError as exc:
                log.error("enphase: %s", exc)
                ctx.master.shutdown()
                return
            self.health.providers.traffic.append(self.traffic.snapshot)
            self._attach_health()
            self.health.listening("mitmproxy listening")
            with contextlib.suppress(RuntimeError):  # no loop when a test calls the hook directly
                loop = asyncio.get_running_loop()
                self.health.watch_loop(loop)
                self.health.record_stats(self._store_record, loop.call_soon_threadsafe)

    def client_connected(self, client) -> None:
        self.traffic.connected()

    def client_disconnected(self, client) -> None:
        self.traffic.disconnected("error" if client.error else "closed")

    async def request(self, flow: http.HTTPFlow) -> None:
        kind = self._report_kind(flow)
        if kind is None:
            return
        flow.metadata["enphase_kind"] = kind
        self._submit(_payload(flow, flow.request, UP, kind))
        assert self.settings is not None  # _report_kind found a kind: the settings are loaded
        if self.settings.local_mode:
            flow.metadata["enphase_local"] = True
            flow.response = await _local_answer(flow, kind)
        elif kind == "performance_report" and (why := await self.fallback.answer_locally(flow)):
            flow.metadata["enphase_local"] = True
            flow.metadata["enphase_cloud_unreachable"] = why
            flow.response = await _local_answer(flow, kind)

    def response(self, flow: http.HTTPFlow) -> None:
        kind = flow.metadata.get("enphase_kind")
        if kind is None:
            return
        assert flow.response is not None  # mitmproxy calls this hook with the response
        self._submit(_payload(flow, flow.response, DOWN, f"{kind}_response"))
        self.traffic.report(len(flow.request.raw_content or b""), len(flow.response.raw_content or b""))
        outcome = "answered locally" if flow.metadata.get("enphase_local") else "forwarded"
        if why := flow.metadata.get("enphase_cloud_unreachable"):
            outcome += f" (cloud unreachable: {why})"
        log.info("enphase: %s from %s (flow %s): %d bytes up, %s, %d %d bytes down",
                 kind, self._peer(flow), flow.id, len(flow.request.raw_content or b""), outcome,
                 flow.response.status_code, len(flow.response.raw_content or b""))

    def error(self, flow: http.HTTPFlow) -> None:
        kind = flow.metadata.get("enphase_kind")
        if kind is not None:
            assert flow.error is not None  # mitmproxy calls this hook with the error
            self.traffic.report(len(flow.request.raw_content or b""), 0)
            log.warning("enphase: %s from %s (flow %s): %d bytes up, no response: %s (the request is stored)",
                        kind, self._peer(flow), flow.id, len(flow.request.raw_content or b""), flow.error.msg)

    def done(self) -> None:
        if self.health is not None:
            self.health.stop()  # its last pvtap_stats payload goes to the worker before the channel closes
            self.health = None
        self._stop_ingest()
        logging.getLogger(MITMPROXY_SERVER_LOG).removeFilter(self._name_client)
        _not_redirected.uninstall()

    # -- helpers ---------------------------------------------------------------------------

    def _peer(self, flow: http.HTTPFlow) -> str:
        peer = flow.client_conn.peername
        return self.peers.name(str(peer[0])) if peer else "?"

    def _peer_endpoint(self, sockname: tuple) -> str:
        """A socket's peer for a log line, as the privacy settings allow (pvtap/peers.py)."""
        return self.peers.endpoint(str(sockname[0]), sockname[1])

    def _name_client(self, record: logging.LogRecord) -> bool:
        """A logging filter: mitmproxy's `client` (host, port) becomes (name, port)."""
        client = getattr(record, "client", None)
        if client:
            record.client = (self.peers.name(str(client[0])), client[1])
        return True

    def _report_kind(self, flow: http.HTTPFlow) -> str | None:
        if flow.request.method != "POST" or self.settings is None:
            return None
        if flow.request.pretty_host.lower() not in self.settings.hosts:
            return None
        return report_kind(flow.request.path.partition("?")[0])

    def _settings(self) -> Settings:
        opts = ctx.options
        try:
            config = load_config(opts.pvtap_config)
        except ConfigError as exc:
            raise exceptions.OptionsError(
                f"pvtap_config = {opts.pvtap_config!r}: {exc}") from None
        data_dir = Path(opts.enphase_data_dir).expanduser() if opts.enphase_data_dir else config.data_dir
        hosts = opts.enphase_hosts if opts.has_changed("enphase_hosts") else config.enphase.hosts
        local_mode = opts.enphase_local_mode or config.enphase.local_mode
        source = "enphase_hosts" if opts.has_changed("enphase_hosts") else "enphase.hosts (pvtap config)"
        if not hosts or not all(h.strip() for h in hosts):
            raise exceptions.OptionsError(
                f"{source} = {list(hosts)!r}: needs at least one non-empty host name. "
                "Fix: --set enphase_hosts=reports.enphaseenergy.com (repeat --set for more hosts).")
        _check_data_dir(data_dir, "enphase_data_dir" if opts.enphase_data_dir else "data_dir (pvtap config)")
        fallback_after = _duration(opts, "enphase_fallback_after", config.enphase.fallback_after, "90s")
        cloud_timeout = _duration(opts, "enphase_cloud_timeout", config.enphase.cloud_timeout, "30s")
        if not cloud_timeout:
            raise exceptions.OptionsError("enphase_cloud_timeout = '0': must be greater than 0. "
                                          "Fix: --set enphase_cloud_timeout=30s")
        if local_mode and fallback_after:
            raise exceptions.OptionsError(
                f"enphase_fallback_after = {fallback_after:g} s with local mode on: local mode already answers every "
                "report. Fix: turn one of them off (--set enphase_fallback_after=0, or enphase_local_mode=false).")
        if local_mode and opts.connection_strategy != "lazy":
            raise exceptions.OptionsError(
                f"connection_strategy = {opts.connection_strategy!r}: local mode must not connect to the cloud, "
                "but the eager strategy connects before the addon can answer. Fix: --set connection_strategy=lazy.")
        tls_min = opts.enphase_tls_min_version or config.enphase.tls_min_version
        if tls_min not in TLS_VERSIONS:
            raise exceptions.OptionsError(f"enphase_tls_min_version = {tls_min!r}: not a TLS version. Fix: one of "
                                          f"{', '.join(TLS_VERSIONS)}.")
        return Settings(data_dir=data_dir, local_mode=local_mode, hosts=frozenset(h.strip().lower() for h in hosts),
                        tls_min_version=tls_min, fallback_after=fallback_after, cloud_timeout=cloud_timeout,
                        config=dataclasses.replace(config, data_dir=data_dir))

    def _store_record(self, record: Record) -> None:
        """A record of the addon's own (enphase_fallback, pvtap_stats), stored by the ingest worker."""
        if self.channel is not None:
            self.channel.record(record)

    def _submit(self, raw: RawPayload) -> None:
        if self.channel is not None:  # None only if the store could not be opened: forwarding goes on
            self.channel.payload(raw)

    def _start_ingest(self) -> None:
        """Check that the store opens (a clear error now rather than in the worker's log), then
        start the worker that writes it, and its InfluxDB forwarder when [influx] url is set."""
        settings = self.settings
        assert settings is not None  # configure() runs before running() and before a reopen
        try:
            store = LocalStore.for_process(settings.data_dir, "enphase")
            store.close()
            privacy = Privacy.from_config(settings.config)
        except Exception as exc:
            log.error("enphase: cannot open the store in %s (%s): reports are forwarded but NOT stored. "
                      "Fix: point enphase_data_dir (or data_dir in the pvtap config) at a writable directory.",
                      settings.data_dir, exc)
            return
        worker = WorkerSettings.of_config(store.path, privacy, settings.config)
        self.channel = Channel.process(worker, name="enphase ingest").start()
        self.peers = PeerNames(privacy)
        self.store_path = store.path
        self._attach_health()

    def _attach_health(self) -> None:
        if self.health is not None and self.settings is not None:
            channel = self.channel
            self.health.attach([self.settings.data_dir / "enphase.sqlite"],
                               (lambda: WorkerStats.of(channel.stats(poll=False))) if channel is not None else None)

    def _stop_ingest(self) -> None:
        """Hand the worker its last payloads and let it finish by itself (it archives them and
        exits; what it has not decoded is decoded at the next start). Never waits here."""
        if self.channel is None:
            return
        stats = self.channel.stats()
        self.channel.close_soon()
        log.info("enphase: %d payloads handed to the ingest worker for %s, %d dropped (worker busy or down)",
                 stats["copies_sent"], self.store_path, stats["copies_dropped"])
        self.channel = None


def _duration(opts, name: str, configured: float, example: str) -> float:
    """An option holding a duration, else the config's value."""
    value = getattr(opts, name)
    if value is None:
        return float(configured)
    try:
        return float(parse_duration(value))
    except ValueError as exc:
        raise exceptions.OptionsError(f"{name} = {value!r}: {exc}. Fix: --set {name}={example}") from None


def _check_data_dir(path: Path, name: str) -> None:
    """The directory is writable, or can be created (nothing is touched: see configure)."""
    problem = datadir.problem(path)
    if problem is not None:
        raise exceptions.OptionsError(
            f"{name} = {str(path)!r}: {problem}. Fix: set {name} to a directory pvtap may write to.")


def _payload(flow: http.HTTPFlow, message: http.Message, direction: str, kind: str) -> RawPayload:
    """The bytes as they were sent, with the context a decoder needs again on replay."""
    path, _, query = flow.request.path.partition("?")
    meta: dict[str, str | int | bool] = {
        "method": flow.request.method, "host": flow.request.pretty_host, "path": path, "query": query,
        "content_type": message.headers.get("Content-Type", ""),
    }
    if isinstance(message, http.Response):
        meta["status_code"] = message.status_code
        if flow.metadata.get("enphase_local"):
            meta["answered_locally"] = True
        if why := flow.metadata.get("enphase_cloud_unreachable"):
            meta["cloud_unreachable"] = why
    return RawPayload(origin=Origin("enphase", device="", connection=flow.id, direction=direction),
                      kind=kind, payload=message.raw_content or b"", received=now_utc(), meta=meta)


async def _local_answer(flow: http.HTTPFlow, kind: str) -> http.Response:
    """What the cloud would answer: a perf_report_response acknowledging every posted event; an
    empty 200 for task_complete and the other /emu_reports/ posts (their real answer is unknown).
    The report is parsed on a worker thread so a large one holds up only its own flow."""
    if kind != "performance_report":
        return http.Response.make(200, b"", {"Content-Type": "text/plain", "Connection": "close"})
    body = flow.request.raw_content or b""
    try:
        ids = await asyncio.to_thread(event_ids, body, flow.request.headers.get("Content-Type", ""))
    except Exception as exc:  # unreadable: acknowledge nothing, so the Envoy sends it again later
        log.warning("enphase: local mode: flow %s: report unreadable (%s: %s); acknowledging no events",
                    flow.id, type(exc).__name__, exc)
        ids = []
    return http.Response.make(200, build_response(ids), LOCAL_RESPONSE_HEADERS)


class TlsMinimum:
    """Sets mitmproxy's tls_version_client_min (for an old Envoy) once its version probe is safe:
    mitmproxy 12.2 probes every TLS version when that option changes, and its probe raises for SSL 3
    on an OpenSSL without it (cryptography 48 bundles OpenSSL 4), which ends mitmdump. Below TLS 1.2
    mitmproxy then adds @SECLEVEL=0 and the old suites to its cipher list itself."""

    def __init__(self) -> None:
        self.names = {"TLS1": "1.0", "TLS1_1": "1.1", "TLS1_2": "1.2", "TLS1_3": "1.3"}
        self.probe_patched = False

    def apply(self, version: str) -> None:
        if "tls_version_client_min" not in ctx.options:  # mitmproxy's TLS addon is not loaded (addon tests)
            return
        if version == ctx.options.tls_version_client_min or (version == DEFAULT_TLS_MIN and not self.probe_patched):
            return  # nothing asked for, or already so (a --set tls_version_client_min is left alone)
        if not self.probe_patched:
            probe = net_tls.is_supported_version

            @functools.cache
            def is_supported_version(v: net_tls.Version) -> bool:
                try:
                    return probe(v)
                except SSL.Error:  # this OpenSSL cannot even be asked about it
                    return False

            net_tls.is_supported_version = is_supported_version
            self.probe_patched = True
        ctx.options.update(tls_version_client_min=version)
        log.info("enphase: accepting TLS %s and newer from the Envoy (enphase.tls_min_version)", self.names[version])


_tls_minimum = TlsMinimum()


class NotRedirected(Exception):
    """A connection reached the transparent listener without a REDIRECT on this host, so it has no
    original destination. Its repr is what mitmproxy logs ("Transparent mode failure: {e!r}")."""

    def __init__(self, peer: str, detail: str) -> None:
        super().__init__(peer, detail)
        self.text = (f"connection from {peer} was not redirected here by a firewall rule on this host, so its "
                     f"destination is unknown ({detail}); closed it. Fix: REDIRECT the Envoy's port 443 to this "
                     "listener on this host (docs/enphase.md, firewall/README.md); if a DNS override or a DNAT on "
                     'the router sends it here, set enphase.mode = "reverse"')

    def __repr__(self) -> str:
        return self.text


class NotRedirectedLine(logging.Filter):
    """mitmproxy's transparent mode asks the kernel for each connection's original destination
    (`mitmproxy.platform.original_addr`) and logs a failure as `Transparent mode failure:
    FileNotFoundError(2, ...)`. While installed, the lookup names the peer and the fix instead,
    also refuses a destination that is the listener itself (a connection to it would loop), and
    the line is a warning from the addon rather than an error."""

    LOGGER = "mitmproxy.proxy.mode_servers"
    PREFIX = "Transparent mode failure: "

    def __init__(self) -> None:
        super().__init__()
        self._lookup: Callable[[socket.socket], tuple[str, int]] | None = None

    def install(self, name_peer: Callable[[tuple], str]) -> None:
        """`name_peer`: how a peer (host, port) appears in the line (its address only if opted in)."""
        if self._lookup is not None or platform.original_addr is None:
            return
        self._lookup = lookup = platform.original_addr

        def original_addr(sock: socket.socket) -> tuple[str, int]:
            peer = name_peer(sock.getpeername())
            try:
                dest = lookup(sock)
            except OSError as exc:
                raise NotRedirected(peer, f"{type(exc).__name__}: {exc.strerror or exc}") from exc
            if _address(dest) == _address(sock.getsockname()):
                raise NotRedirected(peer, "its original destination is this listener")
            return dest

        platform.original_addr = original_addr
        logging.getLogger(self.LOGGER).addFilter(self)

    def uninstall(self) -> None:
        if self._lookup is not None:
            platform.original_addr = self._lookup
            self._lookup = None
            logging.getLogger(self.LOGGER).removeFilter(self)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX) and "was not redirected" in message:
            record.msg, record.args = f"enphase: {message.removeprefix(self.PREFIX)}", ()
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
        return True


def _address(sockname: tuple) -> str:
    host, port = str(sockname[0]).removeprefix("::ffff:"), sockname[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_not_redirected = NotRedirectedLine()
tap = EnphaseTap()
addons = [tap, tap.fallback]
