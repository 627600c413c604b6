"""`pvtap simulate alphaess`: an AlphaESS battery talking to its cloud over TCP 7777.

It follows the session the reference describes (`shared/reference/alphaess.md` §3): login
(1-1-2), the empty 1-1-0, an event log (1-1-9), its serial (1-1-3, answered with the config
1-2-3), a config dump (1-1-4), then realtime data (1-1-16) every `interval` seconds and extended
data (1-1-5) every `extended_every`; each request waits for its acknowledgement. A `Resume`
command (1-1-8) from the cloud is acknowledged (1-2-8) and answered with CSV back-fill frames
(1-1-12, three rows each); any other command is acknowledged only. After a broken connection
it reconnects and streams on WITHOUT logging in again, as the real battery does.

Serial, password, licence, address and phone are placeholders (`PLACEHOLDER_*`) that tests can
search for in stored data to prove redaction. The device clock is the host's local time
(+ `clock_skew` seconds), like a battery set to local time.

Public API (used by the relay's end-to-end tests):

    result = await run_simulator(host, port, *, interval=10.0, extended_every=300.0,
                                 count=None, duration=None, serial=PLACEHOLDER_SERIAL,
                                 password=PLACEHOLDER_PASSWORD, break_after=None,
                                 backfill_rows=9, clock_skew=0.0, ack_timeout=5.0,
                                 reconnect_delay=0.5, reconnect_attempts=20, log=None)

stops after `count` realtime frames or `duration` seconds (whichever first; neither = forever)
and returns a `SimulatorResult`: `sessions` (one `SimulatorSession` per TCP connection, each
with the exact `sent` / `received` bytes, the parsed `frames_sent` / `frames_received`, and
`logged_in`), `sent` / `received` (all sessions joined), `counts` (frames sent by name, e.g.
`counts["1-1-16"]`), `acked`, `unanswered`, `commands` (bodies of the commands received),
`backfill_rows`, `reconnects`, and `summary()`. `break_after=N` makes the device drop its
connection after N realtime frames on it (a network break) and reconnect. `log` receives one
line per frame sent or received. The first connection failing raises ConnectionError.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pvtap.decode.alphaess import REQUEST, RESPONSE, AlphaFrame, Framer, device_time, encode_frame

PLACEHOLDER_SERIAL = "ALSIM0000000001"  # AL + 13 characters, like a real system serial
PLACEHOLDER_PASSWORD = "pvtap-test-password"
#: The personal data a real config carries, as placeholders (redaction tests search for them).
PLACEHOLDER_PERSONAL = {
    "Address": "1 Placeholder Street, Testtown",
    "ZipCode": "PVTAP-ZIP-0000",
    "Country": "Testland",
    "PhoneNumber": "+00-PVTAP-PHONE",
    "License": "PVTAP-TEST-LICENCE",
}

#: CSV back-fill header, as the reference quotes it (§2.4).
CSV_HEADER = (
    "Date,Time,SN,Ppv1,Ppv2,Vpv1,Vpv2,Ua,Ub,Uc,Fac,Ubus,PrealL1,PrealL2,PrealL3,Tinv,PacL1,PacL2,PacL3,"
    "InvWorkMode,EpvTotal,Einput,Eoutput,Echarge,PmeterL1,PmeterL2,PmeterL3,PmeterDC,Pbat,SOC,BatV,BatC,"
    "FlagBms,BmsWork,Pcharge,Pdischarge,BmsRelay,BmsNum,VcellLow,VcellHigh,TcellLow,TcellHigh,IdTempelover,"
    "IdTempEover,IdTempediffe,IdChargcurre,IdDischcurre,IdCellvolover,IdCellvollower,IdSoclower,"
    "IdCellvoldiffe,BatC1,BatC2,BatC3,BatC4,BatC5,BatC6,SOC1,SOC2,SOC3,SOC4,SOC5,SOC6,ErrInv,WarInv,ErrEms,"
    "ErrBms,ErrMeter,ErrBackupBox,EGridCharge,EDischarge,EmsStatus,BmsShutdown,InvBatV,BmuRelay,"
    "BmsHardVer1,BmsHardVer2,BmsHardVer3,DispatchSwitch,Pdispatch,DispatchSoc,DispatchMode"
)


def config_body(serial: str) -> dict[str, Any]:
    """A system configuration in the 1-2-3 / 1-1-4 schema, with placeholders for the personal keys."""
    return {
        "SN": serial, **PLACEHOLDER_PERSONAL, "Popv": "5.0", "Minv": "SMILE5-INV", "Poinv": "5",
        "Cobat": "10.3", "Mbat": "SMILE5-BAT", "BatterySN1": "BSIM00000000001", "InvSN": "ISIM00000000001",
        "EMSVersion": "SIM-EMS-1.0", "InvVersion": "SIM-INV-1.0", "BMSVersion": "SIM-BMS-1.0",
        "GridCharge": "0", "BatHighCap": "100", "BatUseCap": "10", "NetType": "E_Linker",
    }


# -- values -----------------------------------------------------------------------------------

class _Battery:
    """Plausible, deterministic values: PV follows the sun, the battery covers the difference."""

    capacity_wh = 10_300.0

    def __init__(self, serial: str) -> None:
        self.serial = serial
        self.soc = 55.0
        self.energy_pv = 1234.5

    def sample(self, t: datetime) -> dict[str, float]:
        hour = t.hour + t.minute / 60 + t.second / 3600
        sun = max(0.0, math.sin((hour - 6) / 12 * math.pi))
        pv1, pv2 = round(2600 * sun), round(2450 * sun)
        load = 420 + 180 * math.sin(hour / 24 * 4 * math.pi) ** 2
        grid = -4.0 if sun else 12.0
        pbat = load - pv1 - pv2 - grid  # positive = discharging
        if (self.soc <= 10 and pbat > 0) or (self.soc >= 100 and pbat < 0):
            grid, pbat = grid + pbat, 0.0
        self.soc = min(100.0, max(10.0, self.soc - pbat * (10 / 3600) / self.capacity_wh * 100))
        self.energy_pv += (pv1 + pv2) * 10 / 3_600_000
        return {"pv1": pv1, "pv2": pv2, "load": load, "grid": grid, "pbat": pbat, "soc": self.soc}

    def realtime(self, t: datetime) -> dict[str, str]:
        s = self.sample(t)
        return {
            "Time": t.strftime("%Y/%m/%d %H:%M:%S"), "SN": self.serial, "Ppv1": str(s["pv1"]), "Ppv2": str(s["pv2"]),
            "PrealL1": str(round(s["load"])), "PrealL2": "0.0", "PrealL3": "0.0", "PmeterL1": f"{s['grid']:.0f}",
            "PmeterL2": "0", "PmeterL3": "0", "PmeterDC": "0", "Pbat": f"{s['pbat']:.4f}", "Sva": "405",
            "VarAC": "-669", "VarDC": "96", "SOC": f"{s['soc']:.1f}",
        }

    def extended(self, t: datetime) -> dict[str, str]:
        s = self.sample(t)
        values = self._long(s)
        return {"Time": t.strftime("%Y/%m/%d %H:%M:%S"), "SN": self.serial, **values,
                "Eirp": "-63", "CSQ": "99,99"}

    def csv_row(self, t: datetime) -> str:
        s = self.sample(t)
        values = self._long(s)
        values["Vpv1"], values["Vpv2"] = values.pop("Upv1"), values.pop("Upv2")
        row = {"Date": t.strftime("%Y/%m/%d"), "Time": t.strftime("%H:%M:%S"), "SN": self.serial, **values}
        return ",".join(row[name] for name in CSV_HEADER.split(","))

    def _long(self, s: dict[str, float]) -> dict[str, str]:
        """The extended (1-1-5) / back-fill keys."""
        batc = s["pbat"] / 52.0
        values = {
            "Ppv1": str(s["pv1"]), "Ppv2": str(s["pv2"]), "Upv1": "278.2" if s["pv1"] else "0.0",
            "Upv2": "288.8" if s["pv2"] else "0.0", "Ua": "238.4", "Ub": "0.0", "Uc": "0.0", "Fac": "50.02",
            "Ubus": "380.1", "PrealL1": str(round(s["load"])), "PrealL2": "0", "PrealL3": "0", "Tinv": "31.5",
            "PacL1": str(round(s["load"] - s["grid"])), "PacL2": "0", "PacL3": "0", "InvWorkMode": "2",
            "EpvTotal": f"{self.energy_pv:.1f}", "Einput": "812.3", "Eoutput": "95.7", "Echarge": "640.2",
            "PmeterL1": f"{s['grid']:.0f}", "PmeterL2": "0", "PmeterL3": "0", "PmeterDC": "0",
            "Pbat": f"{s['pbat']:.4f}", "SOC": f"{s['soc']:.1f}", "BatV": "52.1", "BatC": f"{batc:.1f}",
            "FlagBms": "257", "BmsWork": "1", "Pcharge": "3000", "Pdischarge": "3000", "BmsRelay": "1",
            "BmsNum": "2", "VcellLow": "17042704", "VcellHigh": "17042716", "TcellLow": "16908309",
            "TcellHigh": "16908311",
        }
        for name in ("IdTempelover", "IdTempEover", "IdTempediffe", "IdChargcurre", "IdDischcurre",
                     "IdCellvolover", "IdCellvollower", "IdSoclower", "IdCellvoldiffe"):
            values[name] = "0"
        for i in range(1, 7):
            values[f"BatC{i}"] = f"{batc / 2:.1f}" if i <= 2 else "0.0"
        for i in range(1, 7):
            values[f"SOC{i}"] = f"{s['soc']:.1f}" if i <= 2 else "0.0"
        values.update({
            "ErrInv": "0", "WarInv": "0", "ErrEms": "0", "ErrBms": "0", "ErrMeter": "0", "ErrBackupBox": "0",
            "EGridCharge": "12.4", "EDischarge": "601.9", "EmsStatus": "Normal", "BmsShutdown": "0",
            "InvBatV": "52.0", "BmuRelay": "1", "BmsHardVer1": "1", "BmsHardVer2": "1", "BmsHardVer3": "0",
            "DispatchSwitch": "0", "Pdispatch": "0", "DispatchSoc": "0", "DispatchMode": "0",
        })
        return values


# -- results ----------------------------------------------------------------------------------

@dataclass
class SimulatorSession:
    """One TCP connection of the simulated device, with exactly the bytes that crossed it."""

    sent: bytearray = field(default_factory=bytearray)
    received: bytearray = field(default_factory=bytearray)
    frames_sent: list[AlphaFrame] = field(default_factory=list)
    frames_received: list[AlphaFrame] = field(default_factory=list)
    logged_in: bool = False


@dataclass
class SimulatorResult:
    sessions: list[SimulatorSession] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  # frames sent, by name ("1-1-16")
    acked: int = 0  # requests answered by a matching 1-2-x
    unanswered: int = 0  # requests whose answer did not come within ack_timeout
    commands: list[dict[str, Any]] = field(default_factory=list)
    backfill_rows: int = 0

    @property
    def sent(self) -> bytes:
        return b"".join(bytes(s.sent) for s in self.sessions)

    @property
    def received(self) -> bytes:
        return b"".join(bytes(s.received) for s in self.sessions)

    @property
    def reconnects(self) -> int:
        return max(0, len(self.sessions) - 1)

    def summary(self) -> str:
        sent = ", ".join(f"{_label(name)} {n}" for name, n in self.counts.items())
        return (f"sent {sum(self.counts.values())} frames ({sent}); {self.acked} answered, "
                f"{self.unanswered} unanswered; {len(self.commands)} commands, {self.backfill_rows} back-fill rows; "
                f"{len(self.sessions)} connections ({self.reconnects} reconnects, "
                f"{sum(s.logged_in for s in self.sessions)} logins); "
                f"{len(self.sent)} bytes sent, {len(self.received)} received")


_LABELS = {"1-1-0": "empty", "1-1-2": "login", "1-1-3": "serial", "1-1-4": "config", "1-1-5": "extended",
           "1-1-8": "command", "1-1-9": "event log", "1-1-12": "back-fill", "1-1-16": "realtime",
           "1-2-3": "config", "1-2-8": "command ack"}


def _label(name: str) -> str:
    """`realtime`, `ack`, … for a frame name, for the progress lines."""
    return _LABELS.get(name) or ("ack" if name.startswith("1-2-") else name)


class _Disconnected(Exception):
    pass


_CLOSED = object()


class _Connection:
    """One TCP connection: a reader task sorts what arrives into answers and commands."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, session: SimulatorSession,
                 log: Callable[[str], None]) -> None:
        self.reader, self.writer, self.session, self.log = reader, writer, session, log
        self.answers: asyncio.Queue[object] = asyncio.Queue()
        self.commands: asyncio.Queue[object] = asyncio.Queue()
        self._framer = Framer()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            while data := await self.reader.read(65536):
                self.session.received += data
                for item in self._framer.feed(data):
                    if not isinstance(item, AlphaFrame):
                        self.log(f"← {len(item.data)} bytes of garbage ({item.reason})")
                        continue
                    self.session.frames_received.append(item)
                    self.log(f"← {item.name} {_label(item.name)} ({len(item.body)} B)")
                    (self.answers if item.b1 == RESPONSE else self.commands).put_nowait(item)
        except (ConnectionError, OSError):
            pass
        finally:
            self.answers.put_nowait(_CLOSED)
            self.commands.put_nowait(_CLOSED)

    async def send(self, frame: bytes) -> None:
        if self.writer.is_closing():
            raise _Disconnected("connection closed")
        try:
            self.writer.write(frame)
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _Disconnected(str(exc)) from None
        parsed = AlphaFrame(frame[1], frame[2], frame[7:-2], int.from_bytes(frame[-2:], "big"))
        self.session.sent += frame
        self.session.frames_sent.append(parsed)
        self.log(f"→ {parsed.name} {_label(parsed.name)} ({len(parsed.body)} B)")

    async def answer(self, type_: int, timeout: float) -> AlphaFrame | None:
        """The cloud's answer to a request of this type; None after `timeout`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while (left := end - loop.time()) > 0:
            try:
                item = await asyncio.wait_for(self.answers.get(), left)
            except TimeoutError:
                return None
            if item is _CLOSED:
                self.answers.put_nowait(_CLOSED)
                raise _Disconnected("connection closed by the other side")
            assert isinstance(item, AlphaFrame)
            if item.type == type_:
                return item
        return None

    async def command(self, timeout: float) -> AlphaFrame | None:
        """A command from the cloud, waiting at most `timeout` seconds (0: only one already here)."""
        if self.commands.empty():
            if timeout <= 0:
                return None
            try:
                item = await asyncio.wait_for(self.commands.get(), timeout)
            except TimeoutError:
                return None
        else:
            item = self.commands.get_nowait()
        if item is _CLOSED:
            self.commands.put_nowait(_CLOSED)
            raise _Disconnected("connection closed by the other side")
        assert isinstance(item, AlphaFrame)
        return item

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    def abort(self) -> None:
        self.writer.transport.abort()


# -- the device -------------------------------------------------------------------------------

class _Device:
    def __init__(self, host: str, port: int, *, interval: float, extended_every: float, count: int | None,
                 duration: float | None, serial: str, password: str, break_after: int | None,
                 backfill_rows: int, clock_skew: float, ack_timeout: float, reconnect_delay: float,
                 reconnect_attempts: int, log: Callable[[str], None] | None) -> None:
        self.host, self.port = host, port
        self.interval, self.extended_every = interval, extended_every
        self.count, self.duration = count, duration
        self.serial, self.password = serial, password
        self.break_after, self.backfill_rows = break_after, backfill_rows
        self.clock_skew, self.ack_timeout = clock_skew, ack_timeout
        self.reconnect_delay, self.reconnect_attempts = reconnect_delay, reconnect_attempts
        self.log = log or (lambda line: None)
        self.battery = _Battery(serial)
        self.result = SimulatorResult()
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + duration if duration is not None else math.inf

    def now(self) -> datetime:
        """The device clock: host local time, whole seconds, plus the configured skew."""
        return (datetime.now() + timedelta(seconds=self.clock_skew)).replace(microsecond=0)

    def done(self) -> bool:
        return ((self.count is not None and self.result.counts["1-1-16"] >= self.count)
                or self.loop.time() >= self.deadline)

    async def run(self) -> SimulatorResult:
        failures = 0
        while not self.done():
            try:
                reader, writer = await asyncio.open_connection(self.host, self.port)
            except OSError as exc:
                if not self.result.sessions:
                    raise ConnectionError(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from None
                failures += 1
                if failures > self.reconnect_attempts:
                    self.log(f"giving up after {failures} failed reconnects: {exc}")
                    break
                await asyncio.sleep(self.reconnect_delay)
                continue
            failures = 0
            session = SimulatorSession()
            first = not self.result.sessions
            self.result.sessions.append(session)
            conn = _Connection(reader, writer, session, self.log)
            self.log(f"connected to {self.host}:{self.port}"
                     + ("" if first else " again (no login, as the battery does)"))
            try:
                if first:
                    await self.open_session(conn)
                await self.stream(conn)
            except _Disconnected as exc:
                self.log(f"connection lost: {exc}")
                if not self.done():
                    await asyncio.sleep(self.reconnect_delay)
            finally:
                await conn.close()
        return self.result

    async def request(self, conn: _Connection, type_: int, body: bytes) -> AlphaFrame | None:
        """Send a request and wait for its answer, handling commands that arrive meanwhile."""
        await conn.send(encode_frame(REQUEST, type_, body))
        self.result.counts[f"1-1-{type_}"] += 1
        answer = await conn.answer(type_, self.ack_timeout)
        if answer is None:
            self.result.unanswered += 1
            self.log(f"no answer to 1-1-{type_} within {self.ack_timeout:g} s")
        else:
            self.result.acked += 1
        return answer

    async def open_session(self, conn: _Connection) -> None:
        """Login and the frames that follow it (reference §3, steps 1–3 and 6)."""
        login = {"UserName": self.serial, "Password": self.password, "CompanyName": "AlphaESS"}
        await self.request(conn, 2, _json(login))
        conn.session.logged_in = True
        await self.request(conn, 0, b"")
        t = self.now()
        entries = "".join(f"{(t - timedelta(seconds=s)).strftime('%y/%m/%d %H:%M:%S')} {code};"
                          for s, code in ((40, 41), (94, 42)))
        await self.request(conn, 9, _json({"MsgType": "EventLog", "MsgContent": entries, "Description": "OK"}))
        await self.handle_commands(conn)
        await self.request(conn, 3, _json({"SN": self.serial}))
        await self.request(conn, 4, _json(config_body(self.serial)))

    async def stream(self, conn: _Connection) -> None:
        """Realtime every interval, extended every extended_every, commands in between."""
        next_realtime = self.loop.time()
        next_extended = self.loop.time() + self.extended_every
        on_this_connection = 0
        while not self.done():
            await self.handle_commands(conn)
            now = self.loop.time()
            if now >= next_extended:
                await self.request(conn, 5, _json(self.battery.extended(self.now())))
                next_extended = max(next_extended + self.extended_every, now)
            if now >= next_realtime:
                await self.request(conn, 16, _json(self.battery.realtime(self.now())))
                next_realtime = max(next_realtime + self.interval, now)
                on_this_connection += 1
                if self.break_after and on_this_connection >= self.break_after and not self.done():
                    conn.abort()
                    raise _Disconnected(f"dropped the connection after {on_this_connection} realtime frames")
                continue
            wait = min(next_realtime, next_extended, self.deadline) - self.loop.time()
            command = await conn.command(wait)
            if command is not None:
                await self.obey(conn, command)

    async def handle_commands(self, conn: _Connection) -> None:
        while (command := await conn.command(0)) is not None:
            await self.obey(conn, command)

    async def obey(self, conn: _Connection, frame: AlphaFrame) -> None:
        if frame.type != 8:
            self.log(f"ignoring {frame.name} from the cloud")
            return
        try:
            body = json.loads(frame.body)
        except ValueError:
            body = {}
        self.result.commands.append(body)
        ack = {"Command": body.get("Command", ""), "CmdIndex": body.get("CmdIndex", ""), "Status": "Success"}
        await conn.send(encode_frame(RESPONSE, 8, _json(ack)))
        self.result.counts["1-2-8"] += 1
        if body.get("Command") == "Resume":
            await self.backfill(conn, body.get("Parameter1", ""))

    async def backfill(self, conn: _Connection, since: str) -> None:
        """CSV rows one minute apart from just after `since` (else the last minutes), three per frame."""
        start = device_time(since)
        now = self.now()
        if start is None or start >= now:
            start = now - timedelta(minutes=self.backfill_rows + 1)
        times = [start + timedelta(minutes=i + 1) for i in range(self.backfill_rows)]
        for i in range(0, len(times), 3):
            rows = [self.battery.csv_row(t) for t in times[i:i + 3]]
            await self.request(conn, 12, ("\n".join([CSV_HEADER, *rows]) + "\n").encode())
            self.result.backfill_rows += len(rows)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


async def run_simulator(host: str, port: int, *, interval: float = 10.0, extended_every: float = 300.0,
                        count: int | None = None, duration: float | None = None,
                        serial: str = PLACEHOLDER_SERIAL, password: str = PLACEHOLDER_PASSWORD,
                        break_after: int | None = None, backfill_rows: int = 9, clock_skew: float = 0.0,
                        ack_timeout: float = 5.0, reconnect_delay: float = 0.5, reconnect_attempts: int = 20,
                        log: Callable[[str], None] | None = None) -> SimulatorResult:
    """Run the simulated battery; see the module docstring."""
    device = _Device(host, port, interval=interval, extended_every=extended_every, count=count, duration=duration,
                     serial=serial, password=password, break_after=break_after, backfill_rows=backfill_rows,
                     clock_skew=clock_skew, ack_timeout=ack_timeout, reconnect_delay=reconnect_delay,
                     reconnect_attempts=reconnect_attempts, log=log)
    return await device.run()


# -- command line -----------------------------------------------------------------------------

def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be greater than 0")
        return value
    return parse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "alphaess", help="an AlphaESS battery on TCP 7777 (login, realtime, extended, back-fill)",
        description="Simulate an AlphaESS battery talking to its cloud: login, realtime data every INTERVAL s, "
                    "extended data every EXTENDED_EVERY s, an event log, CSV back-fill when the cloud sends "
                    "Resume, and reconnection without a new login after a break. Point it at pvtap's relay "
                    "(or at the stand-in cloud: python -m pvtap.simulate.alphaess_cloud). Serial and password "
                    "are placeholders.")
    parser.add_argument("--host", default="127.0.0.1", help="where the 'cloud' listens (default 127.0.0.1)")
    parser.add_argument("--port", type=_positive(int), default=7777, help="its port (default 7777)")
    parser.add_argument("--interval", type=_positive(float), default=10.0,
                        help="seconds between realtime frames (default 10)")
    parser.add_argument("--extended-every", type=_positive(float), default=300.0,
                        help="seconds between extended frames (default 300)")
    parser.add_argument("--count", type=_positive(int), help="stop after this many realtime frames")
    parser.add_argument("--duration", type=_positive(float), help="stop after this many seconds")
    parser.add_argument("--serial", default=PLACEHOLDER_SERIAL, help=f"system serial (default {PLACEHOLDER_SERIAL})")
    parser.add_argument("--break-after", type=_positive(int), metavar="N",
                        help="drop the connection after N realtime frames and reconnect (without login)")
    parser.add_argument("--backfill-rows", type=int, default=9, help="CSV rows sent on a Resume command (default 9)")
    parser.add_argument("--quiet", action="store_true", help="print only the final count")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: object) -> int:
    log = None if args.quiet else (lambda line: print(f"alphaess-sim: {line}", flush=True))
    try:
        result = asyncio.run(run_simulator(
            args.host, args.port, interval=args.interval, extended_every=args.extended_every, count=args.count,
            duration=args.duration, serial=args.serial, break_after=args.break_after,
            backfill_rows=args.backfill_rows, log=log))
    except ConnectionError as exc:
        print(f"pvtap simulate alphaess: {exc}. Start the relay or the stand-in cloud "
              f"(python -m pvtap.simulate.alphaess_cloud --port {args.port}) first, or fix --host/--port.",
              file=sys.stderr)
        return 1
    print(f"alphaess-sim: {result.summary()}", flush=True)
    return 0
