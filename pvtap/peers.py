"""How a device's network address appears in log lines and connection labels.

The README promises that LAN addresses are not kept without `privacy.store_network_identity`,
and logs are kept (journald, docker logs). So the relay and the addon never log a peer address
itself unless the user opted in; instead they log a name that still tells connections of one
device apart but cannot be turned back into the address:

- with `privacy.pseudonymize_serials` (a key exists): `peer-<HMAC of the address>`, stable across
  restarts like the serial pseudonyms (only the key holder could test guesses against it);
- else `peer#N`, numbered in the order this process first saw each address (forgotten, oldest
  first, beyond `capacity` addresses, so a scan of the LAN cannot grow it without bound).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections import OrderedDict

from pvtap.privacy import Privacy

#: addresses a process remembers for `peer#N` labels
CAPACITY = 4096


class PeerNames:
    """Names for peer addresses, as the privacy settings allow. Not thread-safe: each user (the
    relay's event loop, mitmproxy's event loop) keeps its own."""

    def __init__(self, privacy: Privacy | None = None, capacity: int = CAPACITY) -> None:
        self.privacy = privacy or Privacy()
        self.capacity = capacity
        self._numbers: OrderedDict[str, int] = OrderedDict()
        self._next = 1

    def name(self, host: str) -> str:
        """The address itself (opted in), its keyed pseudonym, or its per-process number."""
        if self.privacy.keep_network_identity:
            return host
        host = _unmapped(host)
        if self.privacy.pseudonym_key:
            digest = hmac.new(self.privacy.pseudonym_key, b"peer:" + host.encode(), hashlib.sha256).hexdigest()
            return f"peer-{digest[:10]}"
        number = self._numbers.pop(host, None)
        if number is None:
            number, self._next = self._next, self._next + 1
            if len(self._numbers) >= self.capacity:
                self._numbers.popitem(last=False)
        self._numbers[host] = number
        return f"peer#{number}"

    def endpoint(self, host: str, port: int) -> str:
        """`host:port` when the address may be shown, else the name alone (a source port says
        nothing about the device)."""
        if self.privacy.keep_network_identity:
            return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.name(host)


def _unmapped(host: str) -> str:
    """`::ffff:192.0.2.1` and `192.0.2.1` are one device (a dual-stack socket gives the first)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return str(address.ipv4_mapped)
    return str(address)
