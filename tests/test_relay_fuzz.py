"""Stream fuzzing through a running relay process: thousands of random and mutated streams,
randomly segmented, both directions at once, in cleartext (AlphaESS listener) and over TLS on
both sides (a FoxESS-M1-like listener terminating the device's TLS and re-encrypting to a
stand-in cloud pinned by its certificate's SHA-256).

Each stream starts with a 16-byte header (seed, bytes up, bytes down) so the stand-in cloud knows
what to expect and what to send; the rest are random bytes and valid frames of the listener's
protocol, whole or mutated (bits flipped, cut short, length fields changed, slices repeated,
noise inserted). Every byte must arrive unchanged and in order on the other side; afterwards the
relay still forwards a fresh connection, has as many fds open as before, its RSS has not grown
beyond a bound, and it logged no relay error. The real decoders, ingest worker and store run
behind it the whole time.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import ssl
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pvtap.certs import foxess_pair, self_signed, write_pair
from pvtap.decode.alphaess import REQUEST, RESPONSE
from pvtap.decode.alphaess import encode_frame as alphaess_frame
from pvtap.decode.foxess import build_frame as foxess_frame
from pvtap.store.local import LocalStore
from tests.conftest import RELAY_LOOPS
from tests.relay_support import RelayProcess, Resources
from tests.test_relay_hostile_process import settled

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

HEADER = struct.Struct(">QII")  # seed, bytes up after the header, bytes down
DOWN_SALT = 0x5EED
#: streams per listener, and how many run at once
PLAIN_STREAMS, TLS_STREAMS, CONCURRENCY = 1200, 200, 16
MiB = 1024 * 1024


# -- streams ------------------------------------------------------------------------------------

def alphaess_valid(rng: random.Random) -> bytes:
    body = json.dumps({"SN": f"ALSIM{rng.randrange(10**10):010d}", "Ppv1": str(rng.randrange(5000)),
                       "SOC": f"{rng.uniform(0, 100):.1f}"}).encode()
    return alphaess_frame(rng.choice((REQUEST, RESPONSE)), rng.choice((2, 3, 4, 5, 8, 9, 12, 16)), body)


def foxess_valid(rng: random.Random) -> bytes:
    return foxess_frame(rng.choice((0x01, 0x02, 0x11, 0x12, 0x2A, 0xFF, 0x82)), rng.randbytes(rng.randrange(300)),
                        stamp=rng.getrandbits(32), family=rng.choice((0x7E, 0x7F)))


def mutated(frame: bytes, rng: random.Random, length_at: int) -> bytes:
    data = bytearray(frame)
    match rng.randrange(5):
        case 0:  # bits flipped
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        case 1:  # cut short
            del data[rng.randrange(1, len(data)):]
        case 2:  # an absurd or wrong length field
            data[length_at:length_at + 2] = rng.randbytes(2)
        case 3:  # a slice repeated
            start = rng.randrange(len(data))
            data[start:start] = data[start:start + rng.randint(1, 40)]
        case _:  # noise inserted
            start = rng.randrange(len(data))
            data[start:start] = rng.randbytes(rng.randint(1, 16))
    return bytes(data)


FRAMES: dict[str, tuple[Callable[[random.Random], bytes], int]] = {
    "alphaess": (alphaess_valid, 5),  # u32 BE length at bytes 3–6: its low half
    "foxess": (foxess_valid, 7),  # u16 BE length at bytes 7–8
}


def fuzz_stream(rng: random.Random, protocol: str, size: int) -> bytes:
    valid, length_at = FRAMES[protocol]
    out = bytearray()
    while len(out) < size:
        roll = rng.random()
        if roll < 0.3:
            out += rng.randbytes(rng.randint(1, 2000))
        elif roll < 0.6:
            out += valid(rng)
        else:
            out += mutated(valid(rng), rng, length_at)
    return bytes(out[:size])


def sizes(rng: random.Random) -> tuple[int, int]:
    """Mostly small streams, some of a few hundred KiB, some empty one way."""
    def one() -> int:
        return rng.choice((0, rng.randint(1, 300), rng.randint(1, 20_000), rng.randint(1, 20_000),
                           rng.randint(20_000, 300_000) if rng.random() < 0.1 else 1000))
    return one(), one()


async def send_segmented(writer: asyncio.StreamWriter, data: bytes, rng: random.Random) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 2, 7, rng.randint(1, 64), rng.randint(1, 4096), rng.randint(4096, 65536)))
        writer.write(data[pos:pos + n])
        pos += n
        await writer.drain()
        if rng.random() < 0.3:
            await asyncio.sleep(0)  # let the loop send it as a segment of its own (TCP_NODELAY is on)


# -- the stand-in cloud and the devices ------------------------------------------------------------

@dataclass
class FuzzCloud:
    """Reads each stream's header, sends its down stream while reading its up stream, closes."""

    protocol: str
    tls: ssl.SSLContext | None = None
    received: dict[int, bytes] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    async def __aenter__(self) -> FuzzCloud:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            header = await reader.readexactly(HEADER.size)
            seed, up, down = HEADER.unpack(header)
            rng = random.Random(seed ^ DOWN_SALT)
            sending = asyncio.create_task(send_segmented(writer, fuzz_stream(rng, self.protocol, down), rng))
            self.received[seed] = header + await reader.readexactly(up)
            await sending
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()


@dataclass
class Tally:
    streams: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    mismatches: list[str] = field(default_factory=list)


async def one_stream(port: int, seed: int, cloud: FuzzCloud, tls: ssl.SSLContext | None, tally: Tally) -> None:
    rng = random.Random(seed)
    up_size, down_size = sizes(rng)
    up = HEADER.pack(seed, up_size, down_size) + fuzz_stream(rng, cloud.protocol, up_size)
    down_rng = random.Random(seed ^ DOWN_SALT)
    expected_down = fuzz_stream(down_rng, cloud.protocol, down_size)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls)
    try:
        sending = asyncio.create_task(send_segmented(writer, up, rng))
        got = await reader.readexactly(down_size)
        await sending
        rest = await reader.read()  # the cloud closes once it has read everything: the EOF comes through
    finally:
        writer.close()
    tally.streams += 1
    tally.bytes_up += len(up)
    tally.bytes_down += len(got)
    if got + rest != expected_down:
        tally.mismatches.append(f"seed {seed}: down differs ({len(got) + len(rest)} of {down_size} B)")
    if cloud.received.get(seed) != up:
        received = cloud.received.get(seed, b"")
        tally.mismatches.append(f"seed {seed}: up differs (sha256 {hashlib.sha256(received).hexdigest()[:12]}, "
                                f"{len(received)} of {len(up)} B)")


async def fuzz(port: int, seeds: range, cloud: FuzzCloud, tls: ssl.SSLContext | None) -> Tally:
    tally, queue = Tally(), list(seeds)

    async def worker() -> None:
        while queue:
            await one_stream(port, queue.pop(), cloud, tls, tally)

    async with asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(worker())
    return tally


# -- the test -------------------------------------------------------------------------------------

def device_tls() -> ssl.SSLContext:
    """As the M1: no certificate check at all."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def cloud_tls(directory: Path) -> tuple[ssl.SSLContext, str]:
    cert, key = self_signed("fuzz-cloud", ["127.0.0.1"], organization="pvtap stand-in cloud")
    cert_path, key_path = write_pair(directory, "fuzz-cloud", cert, key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    der = ssl.PEM_cert_to_DER_cert(cert.decode())
    return context, hashlib.sha256(der).hexdigest()


@pytest.mark.parametrize("loop", RELAY_LOOPS)
async def test_random_and_mutated_streams_cross_the_relay_unchanged_plain_and_tls(tmp_path, loop):
    relay_cert, relay_key = foxess_pair(tmp_path / "certs")
    server_tls, pin = cloud_tls(tmp_path / "cloud")
    async with FuzzCloud("alphaess") as plain_cloud, FuzzCloud("foxess", server_tls) as tls_cloud:
        config = tmp_path / "pvtap.toml"
        config.write_text(
            f'[relay]\nevent_loop = "{loop}"\n'
            f'[[relay.listeners]]\nprotocol = "alphaess"\nlisten = "127.0.0.1:0"\npolicy = "fixed"\n'
            f'upstream = "127.0.0.1:{plain_cloud.port}"\n'
            f'[[relay.listeners]]\nprotocol = "foxess"\nlisten = "127.0.0.1:0"\npolicy = "fixed"\n'
            f'upstream = "127.0.0.1:{tls_cloud.port}"\ntls_cert = "{relay_cert}"\ntls_key = "{relay_key}"\n'
            f'upstream_tls = true\nupstream_pin_sha256 = "{pin}"\n')
        relay = RelayProcess(["--config", str(config)], tmp_path / "data").start()
        try:
            plain_port, tls_port = relay.port_of(0), relay.port_of(1)
            idle = Resources.of(relay.pid)
            warm = [await fuzz(plain_port, range(0, 100), plain_cloud, None),  # caches, threads, arenas
                    await fuzz(tls_port, range(0, 30), tls_cloud, device_tls())]
            before = await settled(relay, idle.fds)
            plain = await fuzz(plain_port, range(100, 100 + PLAIN_STREAMS), plain_cloud, None)
            tls = await fuzz(tls_port, range(30, 30 + TLS_STREAMS), tls_cloud, device_tls())
            after = await settled(relay, idle.fds)
            fresh = [await fuzz(plain_port, range(10**9, 10**9 + 1), plain_cloud, None),
                     await fuzz(tls_port, range(10**9, 10**9 + 1), tls_cloud, device_tls())]
        finally:
            status = relay.stop()
    tallies = {"warm-up": warm, "plain": [plain], "tls": [tls], "fresh": fresh}
    for name, runs in tallies.items():
        print(f"\n{name}: {sum(t.streams for t in runs)} streams, {sum(t.bytes_up for t in runs)} B up, "
              f"{sum(t.bytes_down for t in runs)} B down", end="")
    print(f"\nrelay: idle {idle}; after the warm-up {before}; after the fuzz {after}")
    assert status == 0, relay.text[-3000:]
    for runs in tallies.values():
        for tally in runs:
            assert tally.mismatches == []
    assert plain.streams == PLAIN_STREAMS and tls.streams == TLS_STREAMS
    assert [t.streams for t in fresh] == [1, 1]  # still healthy: a fresh connection forwards on both
    assert plain_cloud.errors == [] and tls_cloud.errors == []
    assert after.fds == before.fds == idle.fds
    assert after.rss_kib - before.rss_kib < 32 * 1024
    assert "relay error" not in relay.text and "Traceback" not in relay.text
    with LocalStore(tmp_path / "data" / "relay.sqlite", readonly=True) as store:
        outcomes = {s.record.tags["outcome"] for s in store.records(measurements=["pvtap_connection"])}
    assert outcomes <= {"cloud_closed", "device_closed"}
