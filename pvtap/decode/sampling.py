"""A bounded sample of what a connection's framer rejected (issue 9: bounds on everything).

Rejected bytes are kept only as evidence (and, by default, only as size + SHA-256, see
`pvtap.decode.withhold`), so a connection that sends nothing but noise must not turn into a
stream of payloads: its Tap hands out the first `payloads` runs up to `size` bytes, and counts
the rest.
"""

from __future__ import annotations

#: Rejected-byte payloads a Tap hands out per connection, and their bytes in total.
SAMPLE_PAYLOADS = 16
SAMPLE_BYTES = 64 * 1024


class RejectedSample:
    """Decides which runs of rejected bytes a Tap passes on; `dropped` counts the others."""

    def __init__(self, payloads: int = SAMPLE_PAYLOADS, size: int = SAMPLE_BYTES) -> None:
        self.payloads_left = payloads
        self.bytes_left = size
        self.dropped = 0  # runs not passed on (their bytes are in the Tap's `rejected` count)

    def take(self, size: int) -> bool:
        if self.payloads_left <= 0 or self.bytes_left <= 0:
            self.dropped += 1
            return False
        self.payloads_left -= 1
        self.bytes_left -= size
        return True
