"""AlphaESS vendor facts (shared/reference/alphaess.md §5): where the battery's EMS connects."""

from __future__ import annotations

#: The cloud the EMS keeps one cleartext TCP connection to.
CLOUD = "www.alphaess.com:7777"
PORT = 7777
