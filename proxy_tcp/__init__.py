"""The raw-TCP relay: forwards device traffic to the cloud unmodified and hands a copy to the
decoders.

Each listener has a protocol, an address and an upstream policy (fixed, transparent, local,
auto; see docs/relay.md). The relay knows protocols only through `pvtap.decode.codec_for`:
a `Tap` per connection decodes the copies, a `LocalAnswerer` stands in for the cloud.

Entry points: `python -m proxy_tcp` and `pvtap relay` (`run`), `serve(config)` to run it inside
another asyncio program, `relay_running(listeners, sink=...)` for tests and embedding.
"""

from .listeners import DEFAULT_LISTENERS, default_listeners
from .service import READY, Relay, relay_running, run, serve

__all__ = ["DEFAULT_LISTENERS", "READY", "Relay", "default_listeners", "relay_running", "run", "serve"]
