"""The Grafana provisioning under grafana/, proven on real data.

Every simulator sends through the real proxies, each as a process of its own, to stand-in clouds:
the Envoy through mitmdump with the addon, an AlphaESS battery, a FoxESS M1 (TLS, its UDP
broadcasts) and an H-series dongle through the relay, and a T-series' RS485-to-TCP bridge into a
local relay listener. What they stored is exported as line
protocol into Debian's InfluxDB (1.6, InfluxQL; InfluxDB 2.x answers the same InfluxQL through a
bucket's virtual DBRP mapping). Then every query of every panel runs there after Grafana's
template expansion ($timeFilter, $__interval, the device variables, themselves queried first),
and each must return rows of the measurements it names.

Also, without data: the committed JSON is what the generator makes, and each dashboard's
datasource uids, panel ids, refIds and variable references are consistent.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from pvtap.certs import sha256_fingerprint
from pvtap.dashboards import DASHBOARD_PATH, files
from pvtap.dashboards.influxql import DATASOURCE_UID
from pvtap.simulate.enphase_cloud import EnphaseCloud
from tests.conftest import REPO, free_port
from tests.health_support import LoggedProcess
from tests.mitm_support import Mitmdump
from tests.servers import Influxd, ScriptedInflux

GRAFANA = REPO / "grafana"
PVTAP = [sys.executable, "-m", "pvtap"]
BUILTINS = {"timeFilter", "__interval"}
#: Grafana's escaping of a variable's values inside an InfluxQL /regex/
REGEX_SPECIAL = re.compile(r"([\\^$*+?.()|\[\]{}/])")


def dashboards() -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(board: dict) -> Iterator[dict]:
    for panel in board["panels"]:
        yield panel
        yield from panel.get("panels", [])


# -- without data --------------------------------------------------------------------------------

def test_the_committed_provisioning_is_what_the_generator_makes() -> None:
    result = subprocess.run([sys.executable, "scripts/gen-dashboards", "--check"], cwd=REPO, capture_output=True,
                            text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert {str(p.relative_to(GRAFANA)) for p in GRAFANA.rglob("*") if p.is_file()} == set(files())


def test_datasource_and_provider_provisioning() -> None:
    (source,) = yaml.safe_load((GRAFANA / "provisioning/datasources/pvtap-influxdb.yaml").read_text())["datasources"]
    assert source["uid"] == DATASOURCE_UID and source["type"] == "influxdb"
    assert source["jsonData"]["dbName"] == "${INFLUX_BUCKET}" and source["url"] == "${INFLUX_URL}"
    assert source["jsonData"]["httpHeaderName1"] == "Authorization"
    assert source["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]["grafana"]
    for name in ("INFLUX_URL", "INFLUX_BUCKET", "INFLUX_TOKEN"):
        assert name in compose["environment"]
    (provider,) = yaml.safe_load((GRAFANA / "provisioning/dashboards/pvtap.yaml").read_text())["providers"]
    assert provider["options"]["path"] == DASHBOARD_PATH
    assert f"./grafana/dashboards:{DASHBOARD_PATH}:ro" in compose["volumes"]
    home = compose["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{DASHBOARD_PATH}/pvtap-overview.json"


def test_every_dashboard_is_consistent() -> None:
    boards = dashboards()
    assert set(boards) == {"pvtap-overview", "pvtap-enphase", "pvtap-alphaess", "pvtap-foxess", "pvtap-health"}
    assert len({b["uid"] for b in boards.values()}) == 5
    for name, board in boards.items():
        assert board["uid"] == name
        variables = [v["name"] for v in board.get("templating", {}).get("list", [])]
        ids = [p["id"] for p in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat: {ids}"
        used: set[str] = set()
        for variable in board.get("templating", {}).get("list", []):
            assert variable["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}
            used |= set(re.findall(r"\$(\w+)", variable["query"]))
        for panel in panels(board):
            if panel["type"] == "row":
                continue
            assert panel["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}, (name, panel["title"])
            refs = [t["refId"] for t in panel["targets"]]
            assert refs and len(refs) == len(set(refs)), (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "influxdb", "uid": DATASOURCE_UID}
                assert target["rawQuery"] is True
                used |= set(re.findall(r"\$(\w+)", target["query"]))
        assert used - BUILTINS <= set(variables), f"{name}: undefined variables {used - BUILTINS - set(variables)}"
        assert set(variables) <= used, f"{name}: variables nothing uses: {set(variables) - used}"


# -- with data: the simulators through the real proxies --------------------------------------------

class Stack:
    """What the data fixture leaves: InfluxDB with everything the stores held, and its time range."""

    def __init__(self, influx: Influxd, start_ms: int, end_ms: int) -> None:
        self.influx, self.start_ms, self.end_ms = influx, start_ms, end_ms


def relay_config(path: Path, ports: list[int], alpha_cloud: int, m1_cloud: int, m1_pin: str, h1_cloud: int) -> Path:
    """AlphaESS, FoxESS M1 (TLS both ways, the stand-in pinned), FoxESS H-series, two UDP listeners, and a
    local listener for a FoxESS T-series bridge."""
    path.write_text(f"""
[[relay.listeners]]
protocol = "alphaess"
listen = "127.0.0.1:{ports[0]}"
upstream = "127.0.0.1:{alpha_cloud}"

[[relay.listeners]]
protocol = "foxess"
listen = "127.0.0.1:{ports[1]}"
upstream = "127.0.0.1:{m1_cloud}"
tls_cert = "certs/foxess-monitor.crt"
tls_key = "certs/foxess-monitor.key"
upstream_tls = true
upstream_pin_sha256 = "{m1_pin}"

[[relay.listeners]]
protocol = "foxess"
listen = "127.0.0.1:{ports[2]}"
upstream = "127.0.0.1:{h1_cloud}"

[[relay.listeners]]
protocol = "foxess"
listen = "127.0.0.1:{ports[3]}"
transport = "udp"
policy = "local"

[[relay.listeners]]
protocol = "foxess"
listen = "127.0.0.1:{ports[4]}"
transport = "udp"
policy = "local"

[[relay.listeners]]
protocol = "foxess"
listen = "127.0.0.1:{ports[5]}"
policy = "local"
""")
    return path


def run(*args: str, timeout: float = 60) -> str:
    result = subprocess.run([*PVTAP, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"pvtap {' '.join(args)}: {result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("stack")
    data = tmp / "data"
    # pvtap_stats records for the health dashboard, with a forwarder at work (its backlog, its failures):
    # a stand-in that accepts every write
    accepting = ScriptedInflux().start()
    env = {"PVTAP_HEALTH_STATS_EVERY_S": "0.5", "PVTAP_INFLUX_URL": accepting.url, "PVTAP_INFLUX_ORG": "-"}
    processes: list[LoggedProcess] = []
    cleanups: list[Callable[[], object]] = [accepting.stop]

    def start(argv: list[str], ready: str) -> tuple[LoggedProcess, re.Match[str]]:
        process = LoggedProcess(argv, env=env, cwd=REPO)
        processes.append(process)
        return process, process.expect(ready)

    try:
        _, alpha = start([sys.executable, "-m", "pvtap.simulate.alphaess_cloud", "--port", "0"],
                         r"listening on [\d.]+:(\d+)")
        _, m1 = start([sys.executable, "-m", "pvtap.simulate.foxess_cloud", "--port", "0", "--cert-dir",
                       str(tmp / "m1-cloud")], r"listening \S+:(\d+) sha256 (\w+)")
        _, h1 = start([sys.executable, "-m", "pvtap.simulate.foxess_cloud", "--port", "0", "--plain"],
                      r"listening \S+:(\d+)")
        assert m1[2] == sha256_fingerprint((tmp / "m1-cloud" / "foxess-cloud.crt").read_bytes())
        ports = [free_port() for _ in range(6)]
        config = relay_config(tmp / "relay.toml", ports, int(alpha[1]), int(m1[1]), m1[2], int(h1[1]))
        relay = LoggedProcess([sys.executable, "-m", "proxy_tcp", "--config", str(config), "--data-dir", str(data)],
                              env=env, cwd=REPO)
        processes.append(relay)
        relay.expect("relay ready: 6 listener")
        with EnphaseCloud(cert_dir=tmp / "enphase-cloud") as enphase_cloud, pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():  # mitmdump takes this process's environment
                patch.setenv(key, value)
            mitm = Mitmdump.reverse(tmp / "mitm", enphase_cloud, data_dir=data).start()
            cleanups.append(mitm.stop)
            start_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1800))
            run("simulate", "enphase", "--url", "https://reports.enphaseenergy.com", "--connect",
                f"127.0.0.1:{mitm.port}", "--micros", "3", "--reports", "3", "--every", "0", "--start", start_at)
            run("simulate", "alphaess", "--port", str(ports[0]), "--interval", "0.05", "--extended-every", "0.2",
                "--count", "12", "--quiet")
            run("simulate", "foxess-m1", "--cloud", f"127.0.0.1:{ports[1]}", "--udp", "127.0.0.1",
                "--udp-mesh-port", str(ports[3]), "--udp-heartbeat-port", str(ports[4]), "--interval", "0.2",
                "--count", "4")
            run("simulate", "foxess-h1", "--cloud", f"127.0.0.1:{ports[2]}", "--interval", "0.05", "--count", "4")
            relay.expect(r"foxess .* device_closed .*frames", timeout=30)
            for version in ("0", "1"):  # both payload versions, one bridge connection each
                run("simulate", "foxess-t", "--connect", f"127.0.0.1:{ports[5]}", "--interval", "0.05", "--count",
                    "4", "--payload-version", version)
                relay.expect(r"foxess .*\[local: local\] device_closed .*frames 4,", timeout=30)
            assert mitm.stop() == 0, mitm.output()
        assert relay.stop() == 0, relay.output
        lines = run("--data-dir", str(data), "export", "--format", "lp")
        with Influxd(tmp) as influx:
            status, body = influx.write(lines)
            assert status == 204, body
            stamps = [int(line.rsplit(" ", 1)[1]) for line in lines.splitlines() if line]
            yield Stack(influx, min(stamps) // 1_000_000 - 60_000, max(stamps) // 1_000_000 + 60_000)
    finally:
        for process in reversed(processes):
            process.stop()
        for cleanup in cleanups:
            cleanup()


def regex_values(values: list[str]) -> str:
    return "(" + "|".join(REGEX_SPECIAL.sub(r"\\\1", v) for v in values) + ")"


def expand(query: str, stack: Stack, variables: dict[str, list[str]], interval: str) -> str:
    """What Grafana sends for a query: macros and variables replaced."""
    query = query.replace("$timeFilter", f"time >= {stack.start_ms}ms and time <= {stack.end_ms}ms")
    query = query.replace("$__interval", interval)
    for name in sorted(variables, key=len, reverse=True):
        query = query.replace(f"${name}", regex_values(variables[name]))
    assert not re.search(r"\$(?!col\b)[A-Za-z_]", query), f"a variable left in {query}"
    return query


def resolve_variables(board: dict, stack: Stack) -> dict[str, list[str]]:
    """Each variable's values as Grafana would list them (All selected), in definition order."""
    values: dict[str, list[str]] = {}
    for variable in board.get("templating", {}).get("list", []):
        results = stack.influx.query(expand(variable["query"], stack, values, "10s"))
        found = sorted({row[1] for r in results for s in r.get("series", []) for row in s["values"]})
        assert found, f"{board['uid']}: variable {variable['name']} has no values: {variable['query']}"
        values[variable["name"]] = found
    return values


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["pvtap-overview", "pvtap-enphase", "pvtap-alphaess", "pvtap-foxess",
                                  "pvtap-health"])
def test_every_panel_query_returns_rows_of_its_measurements(stack: Stack, name: str) -> None:
    board = dashboards()[name]
    variables = resolve_variables(board, stack)
    failures, ran = [], 0
    for panel in panels(board):
        for target in panel.get("targets", []):
            query = expand(target["query"], stack, variables, panel.get("interval") or "1s")
            named = set(re.findall(r'FROM "(\w+)"', query))
            ran += 1
            try:
                results = stack.influx.query(query)
            except Exception as exc:
                failures.append(f"{panel['title']} {target['refId']}: {exc}")
                continue
            series = [s for r in results for s in r.get("series", [])]
            rows = [row for s in series for row in s["values"] if any(v is not None for v in row[1:])]
            if not rows:
                failures.append(f"{panel['title']} {target['refId']}: no rows for {query}")
            elif not {s["name"] for s in series} <= named:
                failures.append(f"{panel['title']} {target['refId']}: series {[s['name'] for s in series]}, "
                                f"expected {sorted(named)}")
    assert ran >= 3 and not failures, "\n".join(failures)
