"""A child of a BarrierGroup for tests/test_group.py, started with create_subprocess_exec.

    python group_child.py MODE LOOP-KIND

It takes its member of the group (shared as "gate", a plain Barrier) and acts out MODE.
It prints "up" once it has the barrier; after that, "go" modes wait for a line on stdin
from the test before they act, so the test decides the order of events. Every result
is printed on stdout.
"""

from __future__ import annotations

import asyncio
import os
import sys

import uvloop

import aiosync
from aiosync import Barrier, Role


def say(line: str) -> None:
    print(line, flush=True)


def go() -> None:
    """Wait for the test's go-ahead (this process runs no loop yet)."""
    if sys.stdin.readline() == "":
        raise SystemExit("the test closed stdin before saying go")


async def act(mode: str, gate: Barrier) -> None:
    if mode in ("sync", "go-sync"):
        say(f"synced {await gate.place_and_sync()}")
    elif mode in ("sync-twice", "go-sync-twice"):
        say(f"synced {await gate.place_and_sync()}")
        say(f"synced {await gate.place_and_sync()}")
    elif mode == "go-sync-place-exit":  # sync, place the next barrier, exit at once
        say(f"synced {await gate.place_and_sync()}")
        say(f"placed {gate.place()}")
    elif mode == "go-abort":
        gate.abort()
        say("aborted")
    elif mode == "go-exit":
        say("exiting")
    elif mode == "watch":
        say(f"abortion {await gate.wait_abortion()}")
    else:
        raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    mode, kind = sys.argv[1], sys.argv[2]
    gate = aiosync.inherited()["gate"]
    assert isinstance(gate, Barrier), gate
    assert gate.role is Role.CHILD
    assert gate.peer_pid == os.getppid()
    say("up")
    if mode.startswith("go-"):
        go()
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(act(mode, gate))
    gate.close()


if __name__ == "__main__":
    main()
