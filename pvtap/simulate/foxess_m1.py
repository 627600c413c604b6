"""`pvtap simulate foxess-m1`: a FoxESS M1 microinverter, on every channel it uses.

- TLS data channel (TCP 14431): like the real inverter it accepts any server certificate and
  offers TLS 1.2 ECDHE-RSA-AES-GCM only; it runs the bootstrap (0x2A registration → 0xAA,
  0x2C → 0xAC, 0x2B → 0xAB, waiting for each acknowledgement), sends product (0x01) and module
  (0x06) info, then a 238-byte telemetry frame (0x02) every interval, and answers the cloud's
  Modbus reads/writes (0x11/0x12 → 0x91/0x92, echoing the stamp) from a small register map.
- Hub channel (TCP 6666): the two logins of the forum write-up (channels A and B), then periodic
  heartbeats, each expected back as a mirror.
- UDP broadcasts: the ESP-MESH `join_me_req` JSON (6364, every 2 s) and the 0xFF heartbeat
  frame (3334, every 12 s, its clock rising by 12).

Values follow a clear-sky day at the simulated time of day with some cloud noise; serials and
MAC are placeholders. Every byte sent and received on the data channel is kept (`sent`,
`received`) so tests can prove the relay changed nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import socket
import ssl
import time
from dataclasses import dataclass, field

from pvtap.config import split_host_port
from pvtap.decode import foxess
from pvtap.decode.foxess import Frame, FrameSplitter, build_frame, parse_frame

log = logging.getLogger("pvtap.simulate.foxess_m1")

SERIAL = "60MSIMULATED001"  # placeholder, same shape as a real M1 serial (15 chars, 60M…)
DATALOGGER_FIRMWARE = "v1.31"
MODEL = "M1-800-E"
FIRMWARE = "1.80"
MODULE_ID = "M10200"
MAC = "02:00:00:00:00:01"  # locally administered placeholder
MESH_VENDOR_ID = 45324
MESH_ID = 24
#: ActivePowerLimit (%, holding 0xCA5A on firmware ≥ 1.80), the one register the cloud is known to use.
ACTIVE_POWER_LIMIT = 0xCA5A
M1_CIPHERS = "ECDHE-RSA-AES128-GCM-SHA256:ECDHE-RSA-AES256-GCM-SHA384"


# -- payloads ---------------------------------------------------------------------------------

@dataclass
class M1Telemetry:
    """One telemetry block's values in engineering units (the layout's resolution applies)."""

    ac_power_w: int
    export_power_w: int
    ac_voltage_v: float
    ac_current_a: float
    frequency_hz: float
    pv: list[tuple[float, float, int]]  # per string: volts, amps, watts
    temperature_c: float
    sequence: int
    generation_total_kwh: float
    export_total_kwh: float
    fault_words: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    state: int = 4
    pv_strings: int = 2


def telemetry_payload(t: M1Telemetry) -> bytes:
    """The 238-byte block the decoder reads (foxess.decode_m1_telemetry is its inverse)."""
    p = bytearray(foxess.M1_TELEMETRY_LENGTH)

    def put(offset: int, value: int, signed: bool = False) -> None:
        p[offset:offset + 2] = value.to_bytes(2, "big", signed=signed)

    def put_u32_swapped(offset: int, value: int) -> None:
        put(offset, value & 0xFFFF)
        put(offset + 2, value >> 16)

    put(2, -t.export_power_w, signed=True)
    put(6, t.ac_power_w, signed=True)
    put(12, round(t.ac_voltage_v * 32))
    put(14, round(t.ac_current_a * 512))
    put(16, round(t.frequency_hz * 128))
    for n, (volts, amps, watts) in enumerate(t.pv[:4]):
        put(36 + 6 * n, round(volts * 256))
        put(38 + 6 * n, round(amps * 512))
        put(40 + 6 * n, watts)
    put(62, round(t.temperature_c * 32), signed=True)
    put(66, t.sequence & 0xFFFF)
    put_u32_swapped(70, round(t.generation_total_kwh * 128))
    put_u32_swapped(74, round(t.export_total_kwh * 128))
    for i, word in enumerate(t.fault_words):
        put(98 + 2 * i, word)
    put(154, t.state)
    put(156, t.pv_strings)
    return bytes(p)


def registration_payload(serial: str, firmware: str = DATALOGGER_FIRMWARE) -> bytes:
    """0x2A: `01 00 01 31`, length-prefixed serial and firmware, zero-padded to 28 bytes."""
    body = b"\x01\x00\x01\x31" + bytes([len(serial)]) + serial.encode() + bytes([len(firmware)]) + firmware.encode()
    return body.ljust(28, b"\0")


def product_info_payload(model: str = MODEL, firmware: str = FIRMWARE) -> bytes:
    """0x01: NUL-padded strings at 0 (`M1V180`), 32 (`M1`), 42 (model) and 76 (firmware)."""
    p = bytearray(108)
    for offset, text in ((0, "M1V" + firmware.replace(".", "")), (32, "M1"), (42, model), (76, firmware)):
        p[offset:offset + len(text)] = text.encode()
    return bytes(p)


def module_info_payload(module_id: str = MODULE_ID) -> bytes:
    return module_id.encode().ljust(38, b"\0")


def hub_login_payloads(serial: str, firmware: str = DATALOGGER_FIRMWARE) -> tuple[bytes, bytes]:
    """The two hub logins (channel A with serial and firmware, channel B shorter, same serial).
    The write-up gives their content, not their byte layout; this one is length-prefixed."""
    a = bytes([len(serial)]) + serial.encode() + bytes([len(firmware)]) + firmware.encode()
    return a, bytes([len(serial)]) + serial.encode()


def join_me_req(seq: int, monkey: int, mac: str = MAC, rssi: int = -74) -> bytes:
    """The ESP-MESH broadcast on UDP 6364, with the keys the write-up lists."""
    return json.dumps({"monkey": monkey, "type": "join_me_req", "seq": seq, "payload": {
        "router": rssi, "vendor_id": MESH_VENDOR_ID, "mesh_id": MESH_ID, "fix_root": 0, "node_number": 1,
        "max_node_number": 50, "temp_mesh_id": 0, "mac": mac}}).encode()


class SunModel:
    """Plausible M1 values for a time of day: a clear-sky bell from 06:00 to 18:00 with cloud
    noise, two 400 W panels, 230 V / 50 Hz grid, counters that only rise."""

    def __init__(self, seed: int | None = None, generation_kwh: float = 512.0) -> None:
        self.rng = random.Random(seed)
        self.generation_kwh = generation_kwh
        self.export_kwh = generation_kwh * 0.97
        self.sequence = 0
        self._last: float | None = None

    def sample(self, now: float) -> M1Telemetry:
        hour = time.localtime(now).tm_hour + time.localtime(now).tm_min / 60
        sun = max(0.0, math.sin(math.pi * (hour - 6) / 12))
        strings = []
        for _ in range(2):
            watts = int(max(0.0, 380 * sun * self.rng.uniform(0.7, 1.0)))
            volts = round(self.rng.uniform(33.0, 38.0) if watts else self.rng.uniform(0.0, 2.0), 2)
            strings.append((volts, round(watts / volts, 2) if watts else 0.0, watts))
        dc = sum(w for _, _, w in strings)
        ac = min(800, int(dc * 0.95))
        volts = round(self.rng.uniform(227.0, 235.0), 2)
        if self._last is not None:
            hours = max(0.0, now - self._last) / 3600
            self.generation_kwh += ac * hours / 1000
            self.export_kwh += ac * 0.97 * hours / 1000
        self._last = now
        self.sequence += 1
        return M1Telemetry(
            ac_power_w=ac, export_power_w=int(ac * 0.97), ac_voltage_v=volts, ac_current_a=round(ac / volts, 3),
            frequency_hz=round(self.rng.uniform(49.95, 50.05), 2), pv=strings,
            temperature_c=round(15 + 30 * sun + self.rng.uniform(-1, 1), 2), sequence=self.sequence,
            generation_total_kwh=self.generation_kwh, export_total_kwh=self.export_kwh, state=4 if ac else 2)


# -- the channels -----------------------------------------------------------------------------

def client_context() -> ssl.SSLContext:
    """What the M1 does: TLS 1.2, ECDHE-RSA-AES-GCM, no certificate check at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(M1_CIPHERS)
    return context


class SimulatorError(RuntimeError):
    """The other side did not behave as the cloud or hub would (no ack, closed early)."""


@dataclass
class HubResult:
    acks: dict[str, bytes] = field(default_factory=dict)  # channel → the ack frame received
    heartbeats_sent: int = 0
    heartbeats_mirrored: int = 0


class M1Simulator:
    """One simulated M1. Use the coroutines directly (tests, bench) or `pvtap simulate foxess-m1`."""

    def __init__(self, serial: str = SERIAL, *, seed: int | None = None, clock=time.time,
                 ack_timeout: float = 10.0) -> None:
        self.serial = serial
        self.model = SunModel(seed)
        self.clock = clock
        self.ack_timeout = ack_timeout
        self.registers = {ACTIVE_POWER_LIMIT: 100}
        self.sent = bytearray()  # application bytes on the data channel, as sent
        self.received = bytearray()  # … and as received
        self.telemetry: list[M1Telemetry] = []
        self.modbus_answered = 0
        self.frames_received: list[Frame] = []
        self._writer: asyncio.StreamWriter | None = None
        self._acks: dict[int, asyncio.Event] = {}

    def stamp(self) -> int:
        return int(self.clock()) & 0xFFFFFFFF

    # data channel

    async def run_cloud(self, host: str, port: int, *, count: int, interval: float, tls: bool = True,
                        linger: float = 0.0) -> int:
        """Connect, bootstrap, send `count` telemetry frames (0: until cancelled) `interval`
        seconds apart, stay `linger` seconds for late requests, close. Returns frames sent."""
        reader, self._writer = await asyncio.open_connection(host, port, ssl=client_context() if tls else None,
                                                             server_hostname="" if tls else None)
        receiving = asyncio.create_task(self._receive(reader))
        sent = 0
        try:
            for function, payload in ((foxess.REGISTRATION, registration_payload(self.serial)),
                                      (foxess.BOOTSTRAP_STEP2, bytes.fromhex("e1080500")),
                                      (foxess.BOOTSTRAP_STEP3, b"\x00")):
                await self._request(function, payload, receiving)
            await self._send(build_frame(foxess.PRODUCT_INFO, product_info_payload(), stamp=self.stamp()))
            await self._send(build_frame(foxess.MODULE_INFO, module_info_payload(), stamp=self.stamp()))
            while count == 0 or sent < count:
                if sent:
                    await asyncio.sleep(interval)
                values = self.model.sample(self.clock())
                await self._send(build_frame(foxess.REALTIME, telemetry_payload(values), stamp=self.stamp()))
                self.telemetry.append(values)
                sent += 1
                log.info("telemetry %d%s: %d W AC, %.1f V, %.2f Hz, %.2f kWh total", sent,
                         f"/{count}" if count else "", values.ac_power_w, values.ac_voltage_v, values.frequency_hz,
                         values.generation_total_kwh)
                if receiving.done():
                    raise SimulatorError("the cloud closed the connection")
            if linger:
                await asyncio.sleep(linger)
        finally:
            receiving.cancel()
            self._writer.close()
            try:
                await asyncio.wait_for(self._writer.wait_closed(), 5)
            except (OSError, TimeoutError, ssl.SSLError):
                pass
        return sent

    async def _request(self, function: int, payload: bytes, receiving: asyncio.Task) -> None:
        event = self._acks.setdefault(function | foxess.REPLY, asyncio.Event())
        await self._send(build_frame(function, payload, stamp=self.stamp()))
        waiting = asyncio.create_task(event.wait())
        done, _ = await asyncio.wait({waiting, receiving}, timeout=self.ack_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            raise SimulatorError(f"no {function | foxess.REPLY:#04x} acknowledgement of {function:#04x} "
                                 f"within {self.ack_timeout:g} s")

    async def _send(self, data: bytes) -> None:
        assert self._writer is not None
        self._writer.write(data)
        self.sent += data
        await self._writer.drain()

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        splitter = FrameSplitter()
        while data := await reader.read(65536):
            self.received += data
            for kind, chunk in splitter.feed(data):
                if kind == "frame":
                    await self._on_frame(parse_frame(chunk))

    async def _on_frame(self, frame: Frame) -> None:
        self.frames_received.append(frame)
        if frame.function in self._acks:
            self._acks[frame.function].set()
        elif frame.function in (foxess.MODBUS_READ, foxess.MODBUS_WRITE):
            await self._send(modbus_reply(frame, self.registers))
            self.modbus_answered += 1

    # hub channel

    async def run_hub(self, host: str, port: int, *, heartbeats: int, interval: float) -> HubResult:
        """Both logins, each acknowledged, then `heartbeats` heartbeats (0: until cancelled),
        each mirrored. SimulatorError when the hub does not answer as the write-up's did."""
        reader, writer = await asyncio.open_connection(host, port)
        result, splitter = HubResult(), FrameSplitter()
        pending: list[Frame] = []

        async def next_frame() -> Frame:
            while not pending:
                data = await asyncio.wait_for(reader.read(4096), self.ack_timeout)
                if not data:
                    raise SimulatorError("the hub closed the connection")
                pending.extend(parse_frame(c) for k, c in splitter.feed(data) if k == "frame")
            return pending.pop(0)

        try:
            for channel, marker, payload in zip("AB", (0xFFFFFF, 0xFEFEFE), hub_login_payloads(self.serial)):
                writer.write(build_frame(foxess.HEARTBEAT, payload, stamp=marker << 8 | foxess.HUB_LOGIN, family=0x7F))
                await writer.drain()
                ack = await next_frame()
                if foxess.hub_channel(ack) != channel or ack.payload != foxess.HUB_LOGIN_ACK:
                    raise SimulatorError(f"channel {channel} login answered with {ack.encode().hex()}")
                result.acks[channel] = ack.encode()
            beat = build_frame(foxess.HEARTBEAT, b"\x00", stamp=0xFFFFFF << 8 | foxess.HUB_HEARTBEAT, family=0x7F)
            while heartbeats == 0 or result.heartbeats_sent < heartbeats:
                if result.heartbeats_sent:
                    await asyncio.sleep(interval)
                writer.write(beat)
                await writer.drain()
                result.heartbeats_sent += 1
                if (await next_frame()).encode() != beat:
                    raise SimulatorError("a heartbeat was not mirrored byte for byte")
                result.heartbeats_mirrored += 1
        except TimeoutError:
            raise SimulatorError(f"the hub did not answer within {self.ack_timeout:g} s") from None
        finally:
            writer.close()
        return result

    # UDP broadcasts

    async def broadcast(self, host: str, *, mesh_port: int = 6364, heartbeat_port: int = 3334,
                        mesh_interval: float = 2.0, heartbeat_interval: float = 12.0,
                        duration: float) -> tuple[int, int]:
        """Send both broadcasts for `duration` seconds (first ones at once); (mesh, heartbeats) sent."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setblocking(False)
        monkey, clock = self.model.rng.randrange(1 << 31), self.stamp()
        counts = [0, 0]
        next_due = [loop.time(), loop.time()]
        end = loop.time() + duration
        try:
            while loop.time() < end:
                now = loop.time()
                if now >= next_due[0]:
                    await loop.sock_sendto(sock, join_me_req(counts[0], monkey), (host, mesh_port))
                    counts[0] += 1
                    next_due[0] += mesh_interval
                if now >= next_due[1]:
                    stamp = (clock + int(counts[1] * heartbeat_interval)) & 0xFFFFFFFF
                    await loop.sock_sendto(sock, build_frame(foxess.HEARTBEAT, b"\x01", stamp=stamp, family=0x7F),
                                           (host, heartbeat_port))
                    counts[1] += 1
                    next_due[1] += heartbeat_interval
                await asyncio.sleep(max(0.0, min(*next_due, end) - loop.time()))
        finally:
            sock.close()
        return counts[0], counts[1]


def modbus_reply(request: Frame, registers: dict[int, int]) -> bytes:
    """The inverter's answer to a tunnelled Modbus request: same stamp, function | 0x80; reads
    return the map's values (0 for unknown registers), writes are applied and echoed."""
    p = request.payload
    unit, fn, address = p[0], p[1], int.from_bytes(p[2:4], "big")
    if request.function == foxess.MODBUS_READ:
        count = int.from_bytes(p[4:6], "big")
        data = b"".join(registers.get(address + i, 0).to_bytes(2, "big") for i in range(count))
        body = bytes([unit, fn, len(data)]) + data
    elif fn == 0x06:
        registers[address] = int.from_bytes(p[4:6], "big")
        body = p[:6]
    else:  # 0x10 write multiple
        count = int.from_bytes(p[4:6], "big")
        for i in range(count):
            registers[address + i] = int.from_bytes(p[7 + 2 * i:9 + 2 * i], "big")
        body = p[:6]
    return build_frame(request.function | foxess.REPLY, body, stamp=request.stamp, family=request.family)


# -- command line -----------------------------------------------------------------------------

def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "foxess-m1", help="a FoxESS M1 microinverter (TLS 14431, hub 6666, UDP broadcasts)",
        description="Simulate a FoxESS M1 microinverter: a TLS data channel that bootstraps and sends "
                    "238-byte telemetry every --interval seconds (and answers the cloud's Modbus requests), "
                    "optionally the TCP 6666 hub channel and the UDP 6364/3334 broadcasts. Point it at pvtap's "
                    "relay (or at a stand-in cloud). Like the real inverter it accepts any certificate. "
                    "Serial and MAC are placeholders.",
        epilog="example: pvtap simulate foxess-m1 --cloud 127.0.0.1:14431 --hub 127.0.0.1:6666 --udp 127.0.0.1 "
               "--interval 5 --count 12")
    parser.add_argument("--cloud", default="127.0.0.1:14431", metavar="HOST:PORT",
                        help="where the data channel connects (default 127.0.0.1:14431); 'none' to skip it")
    parser.add_argument("--hub", metavar="HOST:PORT", help="also open the hub channel (the M1 uses port 6666)")
    parser.add_argument("--udp", metavar="HOST", help="send the UDP broadcasts to this address (e.g. 127.0.0.1 "
                                                       "or 255.255.255.255)")
    parser.add_argument("--udp-mesh-port", type=int, default=6364, metavar="PORT", help="ESP-MESH port (6364)")
    parser.add_argument("--udp-heartbeat-port", type=int, default=3334, metavar="PORT", help="heartbeat port (3334)")
    parser.add_argument("--interval", type=float, default=90.0, metavar="S",
                        help="seconds between telemetry frames and hub heartbeats (the M1 sends about every 90 s)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="telemetry frames to send, then stop (default 0: run until interrupted)")
    parser.add_argument("--serial", default=SERIAL, help=f"inverter serial to announce (default placeholder {SERIAL})")
    parser.add_argument("--plain", action="store_true", help="cleartext instead of TLS on the data channel")
    parser.add_argument("--seed", type=int, help="random seed for repeatable values")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: object) -> int:
    try:
        return asyncio.run(_main(args))
    except (SimulatorError, OSError) as exc:
        log.error("foxess-m1: %s", exc)
        return 1


async def _main(args: argparse.Namespace) -> int:
    sim = M1Simulator(args.serial, seed=args.seed)
    duration = args.count * args.interval if args.count else float("inf")
    tasks: dict[str, asyncio.Task] = {}
    if args.cloud != "none":
        host, port = split_host_port(args.cloud)
        tasks["cloud"] = asyncio.create_task(sim.run_cloud(host, port, count=args.count, interval=args.interval,
                                                           tls=not args.plain))
    if args.hub:
        host, port = split_host_port(args.hub)
        tasks["hub"] = asyncio.create_task(sim.run_hub(host, port, heartbeats=args.count, interval=args.interval))
    if args.udp:
        tasks["udp"] = asyncio.create_task(sim.broadcast(args.udp, mesh_port=args.udp_mesh_port,
                                                         heartbeat_port=args.udp_heartbeat_port,
                                                         duration=max(duration, 1.0)))
    if not tasks:
        log.error("foxess-m1: nothing to do: give --cloud, --hub or --udp")
        return 2
    results = await asyncio.gather(*tasks.values(), return_exceptions=True)
    failed = 0
    for name, result in zip(tasks, results):
        if isinstance(result, BaseException):
            log.error("foxess-m1 %s: %s", name, result)
            failed += 1
        elif name == "cloud":
            log.info("foxess-m1 data channel: %d telemetry frames, %d Modbus requests answered, %d B up, %d B down",
                     result, sim.modbus_answered, len(sim.sent), len(sim.received))
        elif name == "hub":
            log.info("foxess-m1 hub: both logins acknowledged, %d/%d heartbeats mirrored",
                     result.heartbeats_mirrored, result.heartbeats_sent)
        else:
            log.info("foxess-m1 UDP: %d join_me_req and %d heartbeat datagrams sent", *result)
    return 1 if failed else 0
