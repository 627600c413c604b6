"""`pvtap simulate foxess-h1`: a FoxESS H1 hybrid inverter's WiFi dongle on cleartext TCP 10001.

As in the 2022–23 captures (foxess.md §3.2–3.6, §6): the dongle sends versions and model (0x01,
the 40-byte H1 layout), protocol version and inverter serial (0x06), battery serials (0x03) and a
226-byte realtime block (0x02) every interval, stamping frames with its clock 9 hours behind UTC
as the wiki observed. It answers the cloud's tunnelled Modbus reads (0x11 → 0x91) from an H1
register map that follows the realtime values, and applies and echoes writes (0x12 → 0x92).
No acknowledgement is expected from the cloud. Serials are placeholders.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import time
from dataclasses import dataclass

from pvtap.config import split_host_port
from pvtap.decode import foxess
from pvtap.decode.foxess import Frame, FrameSplitter, build_frame, parse_frame
from pvtap.simulate.foxess_m1 import SimulatorError, modbus_reply

log = logging.getLogger("pvtap.simulate.foxess_h1")

SERIAL = "H1SIMULATED0001"  # placeholder inverter serial (15 characters)
BATTERY_SERIALS = ("BATSIMULATED001", "BATSIMULATED002")
MODEL = "H1-3.7-E"
VERSIONS = ("1.24", "1.02", "1.17")  # master, slave, manager
RATED_POWER_W = 3680
CLOCK_OFFSET_S = -9 * 3600  # the wiki: "offset by −9 hours"
#: The H1 work-mode setting register (FoxESS Modbus map), readable and writable through the tunnel.
WORK_MODE = 41000


@dataclass
class H1Realtime:
    """The realtime words the decoder knows (foxess.decode_h1_realtime), in engineering units."""

    pv1_voltage_v: float
    pv1_current_a: float
    pv1_power_w: int
    pv2_voltage_v: float
    pv2_current_a: float
    pv2_power_w: int
    battery_voltage_v: float
    battery_current_a: float
    grid_voltage_v: float
    grid_current_a: float
    grid_power_w: int
    frequency_hz: float

    def words(self) -> list[int]:
        """Words 0–12 as the H1 input registers 11000–11012 would hold them (0.1 scaling)."""
        return [round(self.pv1_voltage_v * 10), round(self.pv1_current_a * 10), self.pv1_power_w,
                round(self.pv2_voltage_v * 10), round(self.pv2_current_a * 10), self.pv2_power_w,
                round(self.battery_voltage_v * 10), round(self.battery_current_a * 10), 0,
                round(self.grid_voltage_v * 10), round(self.grid_current_a * 10), self.grid_power_w,
                round(self.frequency_hz * 100)]


def realtime_payload(values: H1Realtime) -> bytes:
    head = b"".join(w.to_bytes(2, "big", signed=w < 0) for w in values.words())
    return head.ljust(foxess.H1_REALTIME_LENGTH, b"\0")


def product_info_payload() -> bytes:
    """0x01, 40 bytes: three 6-byte versions, `00 01 48 00`, the model padded to 16, rated W."""
    versions = b"".join(v.encode().ljust(6, b"\0") for v in VERSIONS)
    return versions + bytes.fromhex("00014800") + MODEL.encode().ljust(16) + RATED_POWER_W.to_bytes(2, "big")


def module_info_payload(serial: str = SERIAL) -> bytes:
    return b"H10600" + serial.encode()


def battery_serials_payload(serials: tuple[str, ...] = BATTERY_SERIALS) -> bytes:
    """0x03: nine 15-byte slots, zero-filled when empty."""
    return b"".join(s.encode().ljust(15, b"\0") for s in serials).ljust(9 * 15, b"\0")


class H1Simulator:
    """One simulated H1 dongle; `sent`/`received` keep every byte of the session."""

    def __init__(self, serial: str = SERIAL, *, seed: int | None = None, clock=time.time) -> None:
        self.serial = serial
        self.rng = random.Random(seed)
        self.clock = clock
        self.registers: dict[int, int] = {WORK_MODE: 0}
        self.sent = bytearray()
        self.received = bytearray()
        self.realtime: list[H1Realtime] = []
        self.modbus_answered = 0
        self.frames_received: list[Frame] = []

    def stamp(self) -> int:
        return (int(self.clock()) + CLOCK_OFFSET_S) & 0xFFFFFFFF

    def sample(self) -> H1Realtime:
        pv1 = self.rng.randint(800, 1600)
        pv2 = self.rng.randint(400, 900)
        grid = self.rng.randint(-1500, 300)
        values = H1Realtime(
            pv1_voltage_v=round(self.rng.uniform(280, 330), 1), pv1_current_a=0.0, pv1_power_w=pv1,
            pv2_voltage_v=round(self.rng.uniform(200, 260), 1), pv2_current_a=0.0, pv2_power_w=pv2,
            battery_voltage_v=round(self.rng.uniform(100, 108), 1), battery_current_a=round(self.rng.uniform(-8, 8), 1),
            grid_voltage_v=round(self.rng.uniform(235, 245), 1), grid_current_a=round(abs(grid) / 240, 1),
            grid_power_w=grid, frequency_hz=round(self.rng.uniform(49.95, 50.05), 2))
        values.pv1_current_a = round(pv1 / values.pv1_voltage_v, 1)
        values.pv2_current_a = round(pv2 / values.pv2_voltage_v, 1)
        for i, word in enumerate(values.words()):  # the input registers mirror the realtime block
            self.registers[11000 + i] = word & 0xFFFF
        return values

    async def run(self, host: str, port: int, *, count: int, interval: float, linger: float = 0.0) -> int:
        """Connect, announce, send `count` realtime frames (0: until cancelled), answer Modbus;
        stay `linger` seconds after the last one. Returns realtime frames sent."""
        reader, writer = await asyncio.open_connection(host, port)
        receiving = asyncio.create_task(self._receive(reader, writer))
        sent = 0
        try:
            for function, payload in ((foxess.PRODUCT_INFO, product_info_payload()),
                                      (foxess.MODULE_INFO, module_info_payload(self.serial)),
                                      (foxess.BATTERY_SERIALS, battery_serials_payload())):
                await self._send(writer, build_frame(function, payload, stamp=self.stamp()))
            while count == 0 or sent < count:
                if sent:
                    await asyncio.sleep(interval)
                if receiving.done():
                    raise SimulatorError("the cloud closed the connection")
                values = self.sample()
                await self._send(writer, build_frame(foxess.REALTIME, realtime_payload(values), stamp=self.stamp()))
                self.realtime.append(values)
                sent += 1
                log.info("realtime %d%s: PV %d + %d W, grid %d W, battery %.1f V", sent, f"/{count}" if count else "",
                         values.pv1_power_w, values.pv2_power_w, values.grid_power_w, values.battery_voltage_v)
            if linger:
                await asyncio.sleep(linger)
        finally:
            receiving.cancel()
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 5)
            except (OSError, TimeoutError):
                pass
        return sent

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        self.sent += data
        await writer.drain()

    async def _receive(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        splitter = FrameSplitter()
        while data := await reader.read(65536):
            self.received += data
            for kind, chunk in splitter.feed(data):
                if kind != "frame":
                    continue
                frame = parse_frame(chunk)
                self.frames_received.append(frame)
                if frame.function in (foxess.MODBUS_READ, foxess.MODBUS_WRITE):
                    await self._send(writer, modbus_reply(frame, self.registers))
                    self.modbus_answered += 1


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "foxess-h1", help="a FoxESS H1 inverter's WiFi dongle (cleartext TCP 10001)",
        description="Simulate a FoxESS H1/H3/KH WiFi dongle talking to the cloud on cleartext TCP 10001: versions "
                    "(0x01), protocol version and serial (0x06), battery serials (0x03) and a realtime block (0x02) "
                    "every --interval seconds; it answers the cloud's tunnelled Modbus reads and writes. Point it "
                    "at pvtap's relay or a stand-in cloud. Serials are placeholders.",
        epilog="example: pvtap simulate foxess-h1 --cloud 127.0.0.1:10001 --interval 30 --count 10")
    parser.add_argument("--cloud", default="127.0.0.1:10001", metavar="HOST:PORT",
                        help="where to connect (default 127.0.0.1:10001)")
    parser.add_argument("--interval", type=float, default=30.0, metavar="S",
                        help="seconds between realtime frames (the dongle sends about every 30 s)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="realtime frames to send, then stop (default 0: run until interrupted)")
    parser.add_argument("--serial", default=SERIAL, help=f"inverter serial to announce (default placeholder {SERIAL})")
    parser.add_argument("--seed", type=int, help="random seed for repeatable values")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: object) -> int:
    sim = H1Simulator(args.serial, seed=args.seed)
    host, port = split_host_port(args.cloud)
    try:
        sent = asyncio.run(sim.run(host, port, count=args.count, interval=args.interval))
    except (SimulatorError, OSError) as exc:
        log.error("foxess-h1: %s", exc)
        return 1
    log.info("foxess-h1: %d realtime frames, %d Modbus requests answered, %d B up, %d B down",
             sent, sim.modbus_answered, len(sim.sent), len(sim.received))
    return 0
