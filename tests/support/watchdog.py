"""The test process's watchdog: a separate process that ends a test nothing else can end.

Run as ``python watchdog.py PID GRACE`` with a pipe on stdin; stdlib only. The test
process (PID) writes one line per test: ``arm SECONDS NODEID`` when the test starts,
``disarm`` when it ends. If a test is still armed GRACE seconds after its own timeout
(the in-process timeout could not stop it: a callback stuck in C, a signal blocked, an
exception swallowed), the watchdog says so on stderr, collects PID's descendants (forked
children, maybe stuck in ``epoll_wait``), sends PID SIGABRT (faulthandler, which pytest
enables, prints every thread's traceback), SIGKILLs it if it is still there after a few
seconds, then SIGKILLs the descendants, and exits 1. At EOF on stdin (the session ended,
or the test process died) it exits 0.

It holds a pidfd for each process it will kill, so a recycled pid is never signalled.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time


def descendants(root: int) -> list[int]:
    """Every live descendant of `root`, parents before children."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(name))
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def kill_all(pid: int, nodeid: str, timeout: float, grace: float) -> None:
    sys.stderr.write(
        f"\n+++ watchdog: {nodeid} is still running {grace:g} s after its {timeout:g} s "
        f"timeout; ending the test process {pid} and its children +++\n"
    )
    sys.stderr.flush()
    kids = [pidfd(kid) for kid in descendants(pid) if kid != os.getpid()]  # not me
    main = pidfd(pid)
    if main is not None:
        signal.pidfd_send_signal(main, signal.SIGABRT)
        gone, _, _ = select.select([main], [], [], 5.0)
        if not gone:
            signal.pidfd_send_signal(main, signal.SIGKILL)
    for fd in kids:
        if fd is None:
            continue  # gone already
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass


def main() -> int:
    pid, grace = int(sys.argv[1]), float(sys.argv[2])
    commands = os.fdopen(sys.stdin.fileno(), "rb", buffering=0)
    buf = b""
    deadline: float | None = None
    nodeid, timeout = "", 0.0
    while True:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        readable, _, _ = select.select([commands], [], [], wait)
        if not readable:
            kill_all(pid, nodeid, timeout, grace)
            return 1
        chunk = commands.read(4096)
        if not chunk:
            return 0
        buf += chunk
        while b"\n" in buf:
            line, _, buf = buf.partition(b"\n")
            word, _, rest = line.decode().partition(" ")
            if word == "arm":
                seconds, _, nodeid = rest.partition(" ")
                timeout = float(seconds)
                deadline = time.monotonic() + timeout + grace
            elif word == "disarm":
                deadline = None


if __name__ == "__main__":
    sys.exit(main())
