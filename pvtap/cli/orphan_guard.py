"""Run a command that ends with its parent: `python -I orphan_guard.py PARENT_PID -- COMMAND...`.

`pvtap run` starts each service through this, so that the kernel sends the service SIGTERM when
`pvtap run` dies, however it dies — SIGKILL and the OOM killer included, when no handler of
its own can run. The services sit in process groups of their own (Ctrl-C must reach `pvtap run`
only, which stops them in order), so without this they would outlive it as orphans holding the
ports.

The death signal (`PR_SET_PDEATHSIG`) is set here, in a process of its own that then execs the
command, rather than in a `preexec_fn`: `pvtap run` has threads when it starts a service, and
Python code between fork and exec in a threaded process can deadlock. The setting survives
exec. The kernel sends the signal when the *thread* that forked the child ends: `pvtap run`
starts its services from its main thread, which lives until it exits. This file imports nothing
of pvtap (run with `-I`, it starts in milliseconds).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--" or not argv[1].isdigit():
        print("usage: orphan_guard.py PARENT_PID -- COMMAND [ARG...]", file=sys.stderr)
        return 2
    parent, command = int(argv[1]), argv[3:]
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            print(f"orphan_guard: prctl(PR_SET_PDEATHSIG) failed: {os.strerror(ctypes.get_errno())}",
                  file=sys.stderr)
            return 1
        if os.getppid() != parent:  # the parent died before the death signal was set: it will never come
            return 1
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        print(f"orphan_guard: cannot run {command[0]}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv))
