"""Completion across real processes: forked waiters, SIGKILL, stress, sharing."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from conftest import run_on, soon

import aiosync
from aiosync import Completion


def fork_child(body: Callable[[int], None]) -> tuple[int, int]:
    """Fork a child that runs `body(report_fd)`; return (pid, read end of its report)."""
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.close(r)
            body(w)
        except BaseException:
            os.write(w, b"ERROR " + traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(w)
    return pid, r


def collect(pid: int, report: int) -> str:
    with os.fdopen(report, "rb") as f:
        text = f.read().decode()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert not text.startswith("ERROR"), text
    return text


def child_loop(kind: str, make: Callable[[], Coroutine[Any, Any, str]]) -> Callable[[int], None]:
    def body(report: int) -> None:
        os.write(report, run_on(kind, make()).encode())

    return body


def test_n_completes_release_exactly_n_waits_across_two_processes(kind: str) -> None:
    n = 200
    with Completion() as c, Completion() as got, Completion() as stop:

        async def take_until_stopped() -> str:
            taken = 0
            stopped = asyncio.ensure_future(stop.wait())
            while True:
                take = asyncio.ensure_future(c.wait())
                await asyncio.wait({take, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if take.done():
                    taken += 1
                    got.complete()
                    continue
                take.cancel()  # whatever it was handed goes back
                await asyncio.gather(take, return_exceptions=True)
                if take.done() and not take.cancelled():
                    taken += 1
                    got.complete()
                return str(taken)

        children = [fork_child(child_loop(kind, take_until_stopped)) for _ in range(2)]
        for _ in range(n):
            c.complete()
        for _ in range(n):
            assert got.wait_blocking(timeout=30)
        stop.complete_all()
        counts = [int(collect(pid, report)) for pid, report in children]
        assert sum(counts) == n
        assert not c.try_wait()  # nothing left over


def test_a_killed_waiting_process_takes_no_count(kind: str) -> None:
    with Completion() as c, Completion() as parked:

        async def park_for_ever() -> str:
            waiter = asyncio.ensure_future(c.wait())
            await asyncio.sleep(0)  # the wait is parked: its count is not taken yet
            parked.complete()
            await waiter
            return "unreachable"

        pid, report = fork_child(child_loop(kind, park_for_ever))
        assert parked.wait_blocking(timeout=30)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(report)
        for _ in range(3):
            c.complete()
        assert [c.try_wait() for _ in range(4)] == [True, True, True, False]


def test_stress_four_processes_complete_and_wait(kind: str) -> None:
    rounds = 1000
    with Completion() as c:

        async def pairs() -> str:
            for _ in range(rounds):
                c.complete()
                await c.wait()
            return str(rounds)

        children = [fork_child(child_loop(kind, pairs)) for _ in range(4)]
        assert [int(collect(pid, report)) for pid, report in children] == [rounds] * 4
        assert not c.try_wait()


CHILD = """
import asyncio, sys, aiosync
async def main():
    shared = aiosync.inherited()
    ready, answer = shared["ready"], shared["answer"]
    ready.complete()
    ready.complete()
    await answer.wait()   # the parent's answer
    ready.close()
    answer.close()
if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


async def test_create_subprocess_exec_child_completes_and_waits() -> None:
    from conftest import loop_kind

    with Completion() as ready, Completion() as answer:
        proc = await aiosync.create_subprocess_exec(
            sys.executable, "-c", CHILD, loop_kind(), share={"ready": ready, "answer": answer}
        )
        await soon(ready.wait())
        await soon(ready.wait())
        answer.complete()
        assert await soon(proc.wait()) == 0
        assert not ready.try_wait()
        assert not answer.try_wait()


def complete_once(c: Completion) -> None:
    c.complete()
    c.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_child_completes(method: str) -> None:
    with Completion() as c:
        context: Any = multiprocessing.get_context(method)
        process = context.Process(target=complete_once, args=(c,))
        process.start()
        assert c.wait_blocking(timeout=30)
        process.join(30)
        assert process.exitcode == 0
        assert not c.try_wait()


@pytest.mark.parametrize(
    ("fds", "state", "message"),
    [
        ({"count": "ALL", "all": "COUNT"}, {}, "semaphore eventfd"),
        ({"count": "COUNT"}, {}, "missing"),
        ({"count": "COUNT", "all": "ALL"}, {"x": 1}, "unexpected"),
    ],
)
def test_forged_descriptions_are_refused(
    fds: dict[str, str], state: dict[str, int], message: str
) -> None:
    import json

    with Completion() as c:
        numbers = {"COUNT": c._count, "ALL": c._all}
        desc = {
            "aiosync": 1,
            "objects": {
                "ready": {
                    "type": "Completion",
                    "state": state,
                    "fds": {k: numbers[v] for k, v in fds.items()},
                }
            },
        }
        code = (
            "import aiosync\n"
            "try:\n    aiosync.inherited()\n"
            "except aiosync.SharingError as e:\n    print('SharingError', e)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "AIOSYNC_SHARED": json.dumps(desc)},
            pass_fds=(c._count, c._all),
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert result.stdout.startswith("SharingError"), result.stdout + result.stderr
        assert message in result.stdout
