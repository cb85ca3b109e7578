"""Per-test timeouts that need no thread in the test process (see tests/conftest.py).

Two lines of defence, both armed through pytest-timeout's own hooks (so ``timeout``,
``@pytest.mark.timeout`` and ``--timeout`` keep their meaning):

1. A SIGALRM when the test's time is up. Its handler raises `TestTimedOut`, a
   ``SystemExit``: the one kind of exception that both the standard loop and uvloop let
   out of a callback (pytest-timeout's own signal method raises an exception that both
   loops catch and log, so a test hung in ``run_until_complete`` on uvloop, or a
   callback stuck in the loop, would never end). pytest reports it as that test's
   failure, and the session goes on. The alarm repeats every `REPEAT` seconds while the
   test runs (a test that swallowed the first one).
2. A watchdog *process* (`watchdog.py`) for what no exception can stop (a loop stuck in
   C, SIGALRM blocked): it ends the test process and its children `GRACE` seconds after
   the test's timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import pytest

REPEAT = 5.0
# How long after a test's timeout the watchdog ends the test process.
GRACE = float(os.environ.get("AIOSYNC_TEST_WATCHDOG_GRACE", "30"))


class TestTimedOut(SystemExit):
    """The test ran past its timeout (a SystemExit, so no event loop swallows it)."""

    __test__ = False  # not a test class, despite the name


class Watchdog:
    """The client side of `watchdog.py`: one process per pytest session."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("watchdog.py")),
                str(os.getpid()),
                str(GRACE),
            ],
            stdin=subprocess.PIPE,
            close_fds=True,
        )
        assert self._proc.stdin is not None
        self._pipe = self._proc.stdin

    def arm(self, seconds: float, nodeid: str) -> None:
        self._send(f"arm {seconds} {nodeid}")

    def disarm(self) -> None:
        self._send("disarm")

    def _send(self, line: str) -> None:
        self._pipe.write(line.replace("\n", " ").encode() + b"\n")
        self._pipe.flush()

    def stop(self) -> None:
        self._pipe.close()
        self._proc.wait(timeout=10)


_watchdog: Watchdog | None = None


def start_watchdog() -> None:
    global _watchdog
    if _watchdog is None:
        _watchdog = Watchdog()


def stop_watchdog() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None


def arm(item: pytest.Item, seconds: float) -> None:
    """Start `item`'s clock: a SIGALRM after `seconds`, the watchdog's a while later."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        __tracebackhide__ = True
        raise TestTimedOut(f"Timeout: the test ran for more than {seconds:g} s")

    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds, REPEAT)
    if _watchdog is not None:
        _watchdog.arm(seconds, item.nodeid)


def disarm() -> None:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    if _watchdog is not None:
        _watchdog.disarm()
