"""CPU time of the processes a bench starts, for its "where the time goes" figures.

- `cpu_s(pid)`: a running process's CPU time, every thread of it (ended ones too), to the
  nanosecond: its POSIX CPU clock (clock_getcpuclockid(3)). Not its children's.
- `reaped_cpu_s(pid)`: from /proc/<pid>/stat, in clock ticks (10 ms): its own and that of the
  children it has reaped. socat forks a child per connection, whose time its parent collects when
  the child ends (`wait_childless` first).
- `children(pid)`: its child processes, from /proc/<pid>/task/<tid>/children (psutil is not a
  dependency, and three functions do not need it).
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a running process (ProcessLookupError when there is none)."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)):  # returns the error number itself
        raise ProcessLookupError(pid)
    return time.clock_gettime(clock.value)


def _stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command's name (the state is [0], the parent [1])."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()


def reaped_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and of the children it has reaped (clock ticks)."""
    return sum(int(v) for v in _stat(pid)[11:15]) / _TICK


def children(pid: int, command: str = "") -> list[int]:
    """The child processes of `pid` not yet reaped, those whose command line contains `command`
    when one is given."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # a thread that ended meanwhile
            continue
    if command:
        found = [child for child in found if _command_has(child, command)]
    return found


def _command_has(pid: int, command: str) -> bool:
    try:
        return command.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # ended meanwhile
        return False


def wait_childless(pid: int, timeout: float = 5.0) -> bool:
    """Wait until `pid` has no child (each one's time is then in its parent's); False on timeout."""
    deadline = time.monotonic() + timeout
    while children(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
