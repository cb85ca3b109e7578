"""Tests that are stuck on purpose, run only by test_harness.py (in a pytest subprocess).

Not collected by the suite itself (the name does not match ``test_*.py``). Each test
gets one second (the ``timeout`` mark); see test_harness.py for what must happen.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1)


async def test_waits_for_ever() -> None:
    """Hung in the loop, waiting for a future nothing completes."""
    await asyncio.get_running_loop().create_future()


async def test_callback_stuck_in_the_loop() -> None:
    """A callback that never returns, inside the loop (which catches what it raises)."""

    def stuck() -> None:
        while True:
            pass

    loop = asyncio.get_running_loop()
    loop.call_soon(stuck)
    await loop.create_future()


async def test_passes_after_the_stuck_ones() -> None:
    """The session goes on after a timed-out test."""


def test_stuck_where_no_signal_reaches() -> None:
    """SIGALRM blocked, a child process of its own: only the watchdog can end this.

    The child's pid goes to the file named by $STUCK_CHILD_PID_FILE.
    """
    child = subprocess.Popen(["sleep", "3600"])
    Path(os.environ["STUCK_CHILD_PID_FILE"]).write_text(str(child.pid))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    while True:
        time.sleep(3600)
