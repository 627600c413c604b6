"""Waiting on an event in tests: poll a condition until it holds, or fail saying what never happened.

The one place for this (the *_support modules re-export it under the names their tests use).
A test never sleeps to let something happen; it waits here for the thing itself, so it is as fast
as the machine allows and fails with a message instead of a confusing later assertion.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


def wait_until(predicate: Callable[..., Any], timeout: float = 30.0, interval: float = 0.02,
               what: str = "condition") -> Any:
    """Poll until `predicate()` is truthy and return its value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


async def until(predicate: Callable[..., Any], timeout: float = 10.0, interval: float = 0.01,
                what: str = "condition") -> Any:
    """`wait_until` for a test running on the event loop: the loop keeps turning while it polls."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)
