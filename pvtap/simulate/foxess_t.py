"""`pvtap simulate foxess-t`: a FoxESS T-series inverter's RS485 broadcast, as an RS485-to-TCP
bridge in TCP-client mode delivers it to pvtap's relay.

The T-series cannot be polled: it broadcasts one 0x02 realtime frame every 90–120 s on RS485
(9600 8N1), and owners bridge the bus to TCP (foxess.md §3.5, docs/foxess.md). The simulator
connects like such a bridge and writes the frames as the bus carried them; nothing comes back.
`t_realtime_payload` builds the block from values (both payload versions: version 1, newer
firmware, inserts 6 bytes at the start), so tests can check the decoder against the values.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import random
import struct
import time
from dataclasses import dataclass, field

from pvtap.config import split_host_port
from pvtap.decode import foxess

log = logging.getLogger("pvtap.simulate.foxess_t")

#: What version 1 inserts before the version-0 block (its meaning is not public: zeros here).
VERSION_1_PREFIX = bytes(6)


@dataclass
class TRealtime:
    """One realtime block in engineering units, at the wire's resolution (0.1 V, 0.1 A, 0.01 Hz,
    1 W, 1 °C, 0.1 kWh)."""

    grid_power_w: int
    generation_power_w: int
    load_power_w: int
    phases: list[tuple[float, float, float, int]]  # R, S, T: volts, amps, hertz, watts
    pv: list[tuple[float, float]]  # PV1–PV4: volts, amps
    boost_temperature_c: int
    inverter_temperature_c: int
    ambient_temperature_c: int
    today_yield_kwh: float
    total_yield_kwh: float
    fault_words: tuple[int, ...] = field(default=(0,) * 8)


def t_realtime_payload(t: TRealtime, version: int = 0) -> bytes:
    """The 0x02 payload the decoder reads (`foxess.decode_t_realtime` is its inverse): 31 signed
    words and the s32 total yield, zero padding, the 8 fault words at frame bytes 125–156."""
    if version not in (0, 1):
        raise ValueError(f"payload version is 0 or 1, not {version}")
    words = [t.grid_power_w, t.generation_power_w, t.load_power_w]
    for volts, amps, hertz, watts in t.phases:
        words += [round(volts * 10), round(amps * 10), round(hertz * 100), watts]
    for volts, amps in t.pv:
        words += [round(volts * 10), round(amps * 10), 0]  # the wire's PV power reads 0
    words += [t.boost_temperature_c, t.inverter_temperature_c, t.ambient_temperature_c, round(t.today_yield_kwh * 10)]
    block = bytearray(152)
    struct.pack_into(">31hi", block, 0, *words, round(t.total_yield_kwh * 10))
    struct.pack_into(">8I", block, 125 - 9, *t.fault_words)
    return (VERSION_1_PREFIX if version else b"") + bytes(block)


class ThreePhaseSun:
    """Plausible values for a 10 kW three-phase inverter on four strings, following the sun."""

    def __init__(self, seed: int | None = None, total_kwh: float = 12_345.6) -> None:
        self.random = random.Random(seed)
        self.total_kwh = total_kwh
        self.today_kwh = 0.0

    def sample(self, now: float) -> TRealtime:
        hour = time.gmtime(now).tm_hour + time.gmtime(now).tm_min / 60
        sun = max(0.0, math.sin((hour - 6) / 12 * math.pi))
        pv = [(round(560 + 40 * sun + self.random.uniform(-3, 3), 1) if sun else 0.0,
               round(4.5 * sun * self.random.uniform(0.95, 1.05), 1)) for _ in range(4)]
        generation = round(sum(v * a for v, a in pv) * 0.97)
        load = round(900 + self.random.uniform(-50, 50))
        phases = [(round(230 + self.random.uniform(-2, 2), 1), round(generation / 3 / 230, 1),
                   round(50 + self.random.uniform(-0.02, 0.02), 2), round(generation / 3)) for _ in range(3)]
        energy = generation * 100 / 3_600_000
        self.today_kwh += energy
        self.total_kwh += energy
        return TRealtime(grid_power_w=generation - load, generation_power_w=generation, load_power_w=load,
                         phases=phases, pv=pv, boost_temperature_c=round(35 + 15 * sun),
                         inverter_temperature_c=round(38 + 12 * sun), ambient_temperature_c=22,
                         today_yield_kwh=round(self.today_kwh, 1), total_yield_kwh=round(self.total_kwh, 1))


class Bridge:
    """One simulated bridge; `sent` counts the frames written so far, also after an interrupt."""

    def __init__(self, *, version: int = 0, seed: int | None = None, clock=time.time) -> None:
        self.version, self.clock = version, clock
        self.sun = ThreePhaseSun(seed)
        self.sent = 0

    async def run(self, host: str, port: int, *, count: int, interval: float) -> int:
        """Connect and write `count` realtime frames (0: until cancelled), logging the values of
        each; returns the count."""
        _reader, writer = await asyncio.open_connection(host, port)
        try:
            while not count or self.sent < count:
                now = self.clock()
                values = self.sun.sample(now)
                writer.write(foxess.build_frame(foxess.REALTIME, t_realtime_payload(values, self.version),
                                                stamp=int(now) & 0xFFFFFFFF))
                self.sent += 1
                log.info("realtime %d%s: generation %d W, grid %d W, load %d W, PV1 %.1f V %.1f A, "
                         "total yield %.1f kWh", self.sent, f"/{count}" if count else "", values.generation_power_w,
                         values.grid_power_w, values.load_power_w, *values.pv[0], values.total_yield_kwh)
                await writer.drain()
                if not count or self.sent < count:
                    await asyncio.sleep(interval)
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return self.sent


async def run_bridge(host: str, port: int, *, count: int, interval: float, version: int = 0,
                     seed: int | None = None, clock=time.time) -> int:
    """Connect as a bridge and write `count` realtime frames (0: until cancelled); returns the count."""
    return await Bridge(version=version, seed=seed, clock=clock).run(host, port, count=count, interval=interval)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "foxess-t", help="a FoxESS T-series inverter's RS485 broadcast through an RS485-to-TCP bridge",
        description="Simulate a FoxESS T-series (three-phase, grid-tied) as an RS485-to-TCP bridge in TCP-client "
                    "mode delivers it: one 0x02 realtime frame every --interval seconds, nothing expected back. "
                    "Point it at a relay listener with protocol foxess and policy local (docs/foxess.md).",
        epilog="example: pvtap simulate foxess-t --connect 127.0.0.1:10002 --interval 5 --count 10")
    parser.add_argument("--connect", default="127.0.0.1:10002", metavar="HOST:PORT",
                        help="the relay listener the bridge connects to (default 127.0.0.1:10002)")
    parser.add_argument("--interval", type=float, default=100.0, metavar="S",
                        help="seconds between frames (the inverter broadcasts every 90–120 s; default 100)")
    parser.add_argument("--count", type=int, default=0, metavar="N",
                        help="frames to send, then stop (default 0: run until interrupted)")
    parser.add_argument("--payload-version", type=int, choices=(0, 1), default=0,
                        help="0: the 152-byte block; 1: newer firmware, 6 bytes inserted at the start")
    parser.add_argument("--seed", type=int, help="random seed for repeatable values")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: object) -> int:
    host, port = split_host_port(args.connect)
    bridge = Bridge(version=args.payload_version, seed=args.seed)
    try:
        asyncio.run(bridge.run(host, port, count=args.count, interval=args.interval))
    except OSError as exc:
        log.error("foxess-t: cannot reach %s: %s; is a relay listener (protocol foxess, policy local) there?",
                  args.connect, exc)
        return 1
    except KeyboardInterrupt:
        log.info("foxess-t: interrupted")
    log.info("foxess-t: %d realtime frames sent to %s", bridge.sent, args.connect)
    return 0
