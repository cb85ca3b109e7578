"""Completion across real processes: forked waiters, SIGKILL, stress, sharing."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from support import Children, loop_kind, reap, run_on, soon

import aiosync
from aiosync import Completion


def child_loop(kind: str, make: Callable[[], Coroutine[Any, Any, str]]) -> Callable[[], str]:
    """A child's body: run `make()` on a fresh loop of `kind`, report what it returns."""
    return lambda: run_on(kind, make())


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

        with Children() as children:
            pids = [children.fork(child_loop(kind, take_until_stopped)) for _ in range(2)]
            for _ in range(n):
                c.complete()
            for _ in range(n):
                assert got.wait_blocking(timeout=30)
            stop.complete_all()
            counts = [int(children.collect(pid)) for pid in pids]
        assert sum(counts) == n
        assert not c.try_wait()  # nothing left over
        assert not got.try_wait()  # and no wait was counted twice


def test_a_killed_waiting_process_takes_no_count(kind: str) -> None:
    with Completion() as c, Completion() as parked, Children() as children:
        pid = children.fork(child_loop(kind, park_for_ever(c, parked)))
        assert parked.wait_blocking(timeout=30)
        children.kill(pid)
        for _ in range(3):
            c.complete()
        assert [c.try_wait() for _ in range(4)] == [True, True, True, False]


def park_for_ever(c: Completion, parked: Completion) -> Callable[[], Coroutine[Any, Any, str]]:
    """A child's coroutine: park a `c.wait()` task, then say so on `parked`."""

    async def park() -> str:
        waiter = asyncio.ensure_future(c.wait())
        await asyncio.sleep(0)  # the task's first step runs: it parks
        assert not waiter.done()
        assert c._waitq.waiting == 1  # parked in the queue, watching the fds
        parked.complete()
        await waiter
        return "unreachable"

    return park


def test_a_stopped_then_killed_waiter_takes_no_count(kind: str) -> None:
    # The counts arrive while the parked waiter's process is frozen (SIGSTOP): its loop
    # watches the fd but cannot read it, and the kill then takes nothing with it.
    with Completion() as c, Completion() as parked, Children() as children:
        pid = children.fork(child_loop(kind, park_for_ever(c, parked)))
        assert parked.wait_blocking(timeout=30)
        os.kill(pid, signal.SIGSTOP)
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        for _ in range(3):
            c.complete()
        children.kill(pid)
        assert [c.try_wait() for _ in range(4)] == [True, True, True, False]


def test_a_count_handed_to_a_cancelled_wait_goes_back_to_another_process(kind: str) -> None:
    # The child's parked c.wait() is handed a count and cancelled before its task
    # resumes: the count must go back into the kernel for the parent. Ordering: the
    # child is frozen (SIGSTOP) while the parent completes c and then writes "cancel"
    # on a pipe; thawed, its loop sees both fds ready in one poll, in the order they
    # became ready (epoll's ready list), so c's callback hands the count over first
    # and the pipe's callback then cancels the task that holds it.
    cancel_r, cancel_w = os.pipe()
    try:
        with Completion() as c, Completion() as parked, Children() as children:

            async def hand_then_cancel() -> str:
                loop = asyncio.get_running_loop()
                take = asyncio.ensure_future(c.wait())
                await asyncio.sleep(0)  # the task's first step runs: it parks
                assert c._waitq.waiting == 1
                seen: list[int] = []

                def cancel() -> None:
                    loop.remove_reader(cancel_r)
                    seen.append(c._waitq.waiting)  # 0: the count was handed over
                    take.cancel()

                loop.add_reader(cancel_r, cancel)
                parked.complete()
                try:
                    await take
                except asyncio.CancelledError:
                    return f"cancelled waiting={seen}"
                return f"took waiting={seen}"

            pid = children.fork(child_loop(kind, hand_then_cancel))
            assert parked.wait_blocking(timeout=30)
            os.kill(pid, signal.SIGSTOP)
            _, status = os.waitpid(pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status)
            c.complete()
            os.write(cancel_w, b"x")
            os.kill(pid, signal.SIGCONT)
            assert children.collect(pid) == "cancelled waiting=[0]"
            assert [c.try_wait() for _ in range(2)] == [True, False]
    finally:
        os.close(cancel_r)
        os.close(cancel_w)


def test_stress_four_processes_complete_and_wait(kind: str) -> None:
    rounds = 1000
    with Completion() as c:

        async def pairs() -> str:
            for _ in range(rounds):
                c.complete()
                await c.wait()
            return str(rounds)

        with Children() as children:
            pids = [children.fork(child_loop(kind, pairs)) for _ in range(4)]
            assert [int(children.collect(pid)) for pid in pids] == [rounds] * 4
        assert not c.try_wait()


CHILD = str(Path(__file__).parent / "children" / "completion_child.py")


async def test_create_subprocess_exec_child_completes_and_waits() -> None:
    with Completion() as ready, Completion() as answer:
        proc = await aiosync.create_subprocess_exec(
            sys.executable,
            CHILD,
            "hand-off",
            loop_kind(),
            share={"ready": ready, "answer": answer},
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await soon(ready.wait())
            await soon(ready.wait())
            answer.complete()
            _, err = await soon(proc.communicate())
            assert proc.returncode == 0, err.decode()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert not ready.try_wait()  # exactly two
        assert not answer.try_wait()  # the child took the parent's one


def complete_once(c: Completion) -> None:
    c.complete()
    c.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_child_completes(method: str) -> None:
    with Completion() as c:
        context: Any = multiprocessing.get_context(method)
        process = context.Process(target=complete_once, args=(c,))
        process.start()
        try:
            assert c.wait_blocking(timeout=30)
            process.join(30)
            assert process.exitcode == 0
        finally:
            reap(process)
            process.close()
        assert not c.try_wait()


@pytest.mark.parametrize(
    ("fds", "state", "message"),
    [
        # A plain eventfd where the semaphore one is expected: reading it whole would
        # take every pending count at once.
        ({"count": "PLAIN", "all": "ALL"}, {}, "should be a semaphore eventfd"),
        # The semaphore one where the plain flag is expected.
        ({"count": "COUNT", "all": "SEMAPHORE"}, {}, "should be a plain eventfd"),
        ({"count": "COUNT", "all": "PIPE"}, {}, "should be an eventfd"),
        ({"count": "COUNT"}, {}, "missing ['all']"),
        ({"count": "COUNT", "all": "ALL"}, {"x": 1}, "unexpected ['x']"),
        ({"count": "COUNT", "all": "ALL", "more": "PLAIN"}, {}, "unexpected ['more']"),
        ({"count": "COUNT", "all": "CLOSED"}, {}, "is not open in this process"),
        ({"count": "COUNT", "all": "ALL"}, {}, "accepted"),  # the control: a true one
    ],
)
def test_forged_descriptions_are_refused(
    fds: dict[str, str], state: dict[str, int], message: str
) -> None:
    r, w = os.pipe()
    plain, semaphore = os.eventfd(0), os.eventfd(0, os.EFD_SEMAPHORE)
    try:
        with Completion() as c:
            numbers = {
                "COUNT": c._count,
                "ALL": c._all,
                "PIPE": r,
                "PLAIN": plain,
                "SEMAPHORE": semaphore,
                "CLOSED": w,  # open here, but not passed to the child
            }
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
            result = subprocess.run(
                [sys.executable, CHILD, "inherit"],
                env={**os.environ, "AIOSYNC_SHARED": json.dumps(desc)},
                pass_fds=(c._count, c._all, r, plain, semaphore),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
    finally:
        for fd in (r, w, plain, semaphore):
            os.close(fd)
    assert result.returncode == 0, result.stderr
    assert message in result.stdout, result.stdout + result.stderr
    if message != "accepted":
        assert result.stdout.startswith("SharingError "), result.stdout
        assert "ready" in result.stdout  # names the object it refused
