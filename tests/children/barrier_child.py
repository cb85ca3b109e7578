"""A child program for tests/test_sharing.py, started with aiosync.create_subprocess_exec.

    python barrier_child.py MODE [LOOP-KIND]

It takes the barrier shared as "gate" with ``aiosync.inherited()`` and acts out MODE.
Lines on stdout are its side of the hand-shake with the test; a failed check exits
non-zero with a traceback on stderr.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Coroutine
from typing import Any

import uvloop

import aiosync
from aiosync import Barrier, Role

SOON = 10.0


def say(line: str) -> None:
    print(line, flush=True)


def gate() -> Barrier:
    b = aiosync.inherited()["gate"]
    assert isinstance(b, Barrier), b
    assert b.role is Role.CHILD, b.role
    return b


def run(kind: str, main: Coroutine[Any, Any, None]) -> None:
    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main)


def sync(kind: str) -> None:
    """Three place_and_sync() rounds with the parent, on a loop of `kind`."""
    b = gate()

    async def main() -> None:
        for _ in range(3):
            assert await asyncio.wait_for(b.place_and_sync(), SOON) is True
        say(f"synced {type(asyncio.get_running_loop()).__module__.split('.')[0]}")

    run(kind, main())
    b.close()


def killed_mid_wait(kind: str) -> None:
    """Place one barrier, park a wait_abortion(), say so, and wait to be killed.

    (Not a sync(): the parent places barriers of its own, which would end it.)
    """
    b = gate()

    async def main() -> None:
        assert b.place()
        task = asyncio.create_task(b.wait_abortion())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not task.done()
        say("waiting")
        await asyncio.wait_for(task, SOON)  # the test kills us long before
        raise AssertionError("not killed")

    run(kind, main())


def blocking() -> None:
    """No event loop at all: the blocking twins, a timeout among them, then exit."""
    b = gate()
    assert b.place_and_sync_blocking(timeout=SOON) is True
    assert b.place()
    try:
        b.sync_blocking(timeout=0.05)  # the parent places only after our next line
    except TimeoutError:
        say("timed out")
    else:
        raise AssertionError("sync_blocking did not time out")
    assert b.sync_blocking(timeout=SOON) is True
    say("synced")
    assert b.wait_next_blocking(timeout=SOON) is True  # the parent places once more
    say("done")
    sys.exit(0)  # without close(): exiting ends our side anyway


def setup_fails() -> None:
    """Our "setup" fails: abort, so that the parent stops waiting for us."""
    b = gate()
    assert b.abort() is True
    say("aborted")
    sys.exit(3)


def twice() -> None:
    """inherited() twice: the same objects, and the variable is gone after the first."""
    assert aiosync._share.ENV_VAR in os.environ
    first = aiosync.inherited()
    assert aiosync._share.ENV_VAR not in os.environ
    second = aiosync.inherited()
    assert first == second
    assert first["gate"] is second["gate"]
    assert first is not second  # a fresh dict each time: the caller may change it
    b = gate()
    assert b is first["gate"]
    fds = [b._me, b._them, b._pipe_w]
    inheritable = [os.get_inheritable(f) for f in fds]
    say(json.dumps({"names": sorted(first), "inheritable": inheritable, "peer": b.peer_pid}))
    b.close()


def probe() -> None:
    """Call inherited() on whatever the test put in the environment; report as JSON.

    Arguments after the mode are fds whose state (open or not) to report afterwards.
    """
    watch = [int(arg) for arg in sys.argv[2:]]
    report: dict[str, object]
    try:
        objects = aiosync.inherited()
    except Exception as exc:
        report = {"type": type(exc).__name__, "message": str(exc)}
    else:
        report = {"type": None, "names": sorted(objects)}
    report["open"] = [fd for fd in watch if _is_open(fd)]
    report["env"] = aiosync._share.ENV_VAR in os.environ
    say(json.dumps(report))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "sync":
        sync(sys.argv[2])
    elif mode == "killed-mid-wait":
        killed_mid_wait(sys.argv[2])
    elif mode == "blocking":
        blocking()
    elif mode == "setup-fails":
        setup_fails()
    elif mode == "twice":
        twice()
    elif mode == "probe":
        probe()
    else:
        raise SystemExit(f"unknown mode {mode!r}")
