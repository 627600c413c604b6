"""`pvtap mqtt`: publish the local stores to an MQTT broker, with Home Assistant discovery.

The same publisher runs inside the relay's and the addon's ingest workers when [mqtt] url is
set; this command runs it on its own (a separate container, or for stores written elsewhere),
and `--forget SERIAL` removes a device from Home Assistant.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import aiomqtt

from pvtap.config import Config
from pvtap.mqtt.catalog import VENDORS, DeviceRef
from pvtap.mqtt.discovery import Topics, clearing
from pvtap.mqtt.follow import request_forget
from pvtap.mqtt.publisher import Publisher, client_for, send
from pvtap.store.local import store_paths

EPILOG = """\
topics (docs/mqtt.md):
  <prefix>/<vendor>/<serial>/state           retained JSON: each sensor's newest value and "time"
  <prefix>/<vendor>/<serial>/availability    online while pvtap hears from the device
  <prefix>/bridge/<publisher>/availability   online; offline as the last will (publisher: relay,
                                             enphase, or mqtt for this command)
  homeassistant/sensor/.../config            Home Assistant discovery, one per sensor

A store already published by pvtap run (its ingest worker, when [mqtt] url is set there too) is
left to it; this command takes it up when it is free."""


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "mqtt", help="publish the devices' state to an MQTT broker, with Home Assistant discovery",
        description="Follow every local store in the data directory and publish each device's latest state, its "
                    "availability and Home Assistant discovery configs to the broker in [mqtt] url (docs/mqtt.md). "
                    "What was stored while the broker was away is folded in: after an outage the latest state is "
                    "published, not the backlog. Stop with Ctrl-C or SIGTERM (publishes offline first).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forget", action="append", default=[], metavar="SERIAL",
                        help="remove a device from Home Assistant: clear its retained discovery configs, state and "
                             "availability, and drop its saved state; repeatable. It comes back when pvtap hears "
                             "from it again: add it to mqtt.exclude to keep it away")
    parser.add_argument("--store", action="append", default=[], metavar="NAME",
                        help="only this store (e.g. relay or relay.sqlite); repeatable")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace, config: Config) -> int:
    if not config.mqtt.url:
        print("pvtap mqtt: mqtt.url is not set, so there is no broker to publish to. Fix: set [mqtt] url (and "
              "username, password) in the config file, or PVTAP_MQTT_URL=mqtt://host (docs/mqtt.md)", file=sys.stderr)
        return 2
    if args.forget:
        return asyncio.run(forget(config, args.forget))
    wanted = {name.removesuffix(".sqlite") for name in args.store}

    def stores() -> list:
        return [p for p in store_paths(config.data_dir) if not wanted or p.stem in wanted]

    if not stores():
        print(f"pvtap mqtt: no local stores in {config.data_dir} yet" + (" matching --store" if wanted else "")
              + "; waiting for one to appear", file=sys.stderr)
    publisher = Publisher(config.mqtt, "mqtt", stores, rescan=True)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, publisher.stop)
        await publisher.run()

    asyncio.run(main())
    return 0


async def forget(config: Config, serials: list[str]) -> int:
    """Clear the serials' retained topics and ask the stores' publishers to drop them."""
    topics = Topics(config.mqtt.topic_prefix, config.mqtt.discovery_prefix, "mqtt")
    messages: list[tuple[str, str | None]] = []
    for serial in serials:
        known: dict[DeviceRef, set[str]] = {}
        for path in store_paths(config.data_dir):
            for ref, keys in request_forget(path, serial).items():
                known.setdefault(ref, set()).update(keys)
        if not known:  # not in any store (pruned, or another data_dir): clear whatever a vendor may have left
            print(f"pvtap mqtt: {serial} is not in the stores of {config.data_dir}; clearing its topics for every "
                  "vendor", file=sys.stderr)
            known = {DeviceRef(vendor, serial): set() for vendor in VENDORS}
        for ref, keys in known.items():
            messages += clearing(topics, ref, keys)
    try:
        async with client_for(config.mqtt, "forget") as client:
            await send(client, messages)
    except aiomqtt.MqttError as exc:
        print(f"pvtap mqtt: cannot reach {config.mqtt.url}: {exc}. Fix: check mqtt.url, mqtt.username and "
              "mqtt.password; the saved state was dropped, run --forget again to clear the broker", file=sys.stderr)
        return 1
    print(f"pvtap mqtt: cleared {len(messages)} retained topics of {', '.join(serials)}; "
          "add a serial to mqtt.exclude to keep it from coming back")
    return 0
