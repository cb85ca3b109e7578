"""Faults at the edges of the wait core, each one found by a hostile trial.

* A waiting process killed while its loop is busy takes no count its tasks did not
  run to take (the loop's callback only wakes a waiter; the waiter takes for itself).
* A wait left pending in a loop that was closed without cancelling it is abandoned:
  it does not stop another loop's waiters from being released, and ``close()`` neither
  raises because of it nor leaks an fd.
* ``close()`` racing a wait from another thread: the wait raises
  `ClosedResourceError` (never ``OSError``) and leaves no registration behind.

Processes are real (``fork`` before any loop runs) and ordered by pipes; every test runs
on both loops.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest
from support import SOON, Forked, is_open, new_loop, pair, run_on, soon, until

from aiosync import Barrier, ClosedResourceError, Completion


def read_exactly(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# ---------------------------------------------------------------------------------------
# A killed waiting process takes no count that none of its tasks took
# ---------------------------------------------------------------------------------------


def test_a_killed_busy_waiter_loses_no_count(kind: str) -> None:
    """Two tasks of a child wait; two ``complete()`` arrive while its loop is busy; the
    first task resumes and then blocks the loop; the child is SIGKILLed. One wait
    succeeded, so exactly one count must be left."""
    c = Completion()
    report_r, report_w = os.pipe()
    go_r, go_w = os.pipe()

    def waiting_child() -> None:  # pragma: no cover - runs in the child
        async def first() -> None:
            await c.wait()
            os.write(report_w, b"1")  # took its count...
            os.read(go_r, 1)  # ...and keeps the loop busy until the SIGKILL

        async def main() -> None:
            tasks = [asyncio.create_task(first()), asyncio.create_task(c.wait())]
            await until(lambda: c._waitq.waiting == 2, "both parked")
            os.write(report_w, b"P")
            os.read(go_r, 1)  # the loop is busy while both completions arrive
            await asyncio.gather(*tasks)

        run_on(kind, main())

    child = Forked(waiting_child)
    try:
        os.close(report_w)
        assert read_exactly(report_r, 1) == b"P"
        c.complete()
        c.complete()
        os.write(go_w, b"g")  # the child's loop runs on: its first task resumes
        assert read_exactly(report_r, 1) == b"1"
        child.kill()
        child.join(killed=True)
    finally:
        child.reap()
        for fd in (report_r, go_r, go_w):
            os.close(fd)
    assert c.try_wait(), "the count of the task that never ran was lost with the process"
    assert not c.try_wait(), "a count was duplicated"
    c.close()


# ---------------------------------------------------------------------------------------
# A wait left pending in a closed loop
# ---------------------------------------------------------------------------------------


class Subject:
    """A primitive, a wait on it, and what releases every waiter of every loop."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.peer: Barrier | None = None
        if name == "completion":
            self.obj: Barrier | Completion = Completion()
        else:
            self.obj, self.peer = pair()

    @property
    def waiting(self) -> int:
        return self.obj._waitq.waiting

    def wait(self) -> Coroutine[Any, Any, object]:
        if isinstance(self.obj, Completion):
            return self.obj.wait()
        return self.obj.sync()

    def release_everyone(self) -> None:
        if isinstance(self.obj, Completion):
            self.obj.complete_all()
        else:
            assert self.peer is not None
            self.peer.place()  # catches up with the one barrier the parent placed

    def fds(self) -> list[int]:
        if isinstance(self.obj, Completion):
            return [self.obj._count, self.obj._all]
        return [self.obj._me, self.obj._them, self.obj._pipe_r]

    def close(self) -> None:
        self.obj.close()
        if self.peer is not None:
            self.peer.close()


@pytest.fixture(params=["completion", "barrier"])
def subject(request: pytest.FixtureRequest) -> Iterator[Subject]:
    s = Subject(str(request.param))
    yield s
    s.close()


def test_a_wait_left_in_a_closed_loop_breaks_nothing(kind: str, subject: Subject) -> None:
    """The first loop's waiter is older than the second's; the first loop is closed
    with its task still waiting. The second loop's waiter is released, and close()
    closes every fd without raising."""
    if subject.name == "barrier":
        assert isinstance(subject.obj, Barrier)
        subject.obj.place()  # a sync now has to wait for the peer
    dead, live = new_loop(kind), new_loop(kind)
    try:
        abandoned = dead.create_task(subject.wait())
        dead.run_until_complete(until(lambda: subject.waiting == 1, "first parked"))
        waiting = live.create_task(subject.wait())
        live.run_until_complete(until(lambda: subject.waiting == 2, "second parked"))
        dead.close()  # without cancelling `abandoned`
        subject.release_everyone()
        live.run_until_complete(soon(waiting))
        assert not abandoned.done()
        fds = subject.fds()
        subject.obj.close()  # must not raise because of the dead loop's waiter
        assert [fd for fd in fds if is_open(fd)] == []
        subject.obj.close()
    finally:
        live.close()
        dead.close()


def test_close_with_only_a_closed_loops_waiter(kind: str, subject: Subject) -> None:
    if subject.name == "barrier":
        assert isinstance(subject.obj, Barrier)
        subject.obj.place()
    dead = new_loop(kind)
    dead.create_task(subject.wait())
    dead.run_until_complete(until(lambda: subject.waiting == 1, "parked"))
    dead.close()
    fds = subject.fds()
    subject.obj.close()
    assert [fd for fd in fds if is_open(fd)] == []


# ---------------------------------------------------------------------------------------
# close() racing a wait from another thread
# ---------------------------------------------------------------------------------------


def close_while_waiting(loop: asyncio.AbstractEventLoop, name: str) -> list[BaseException]:
    """One round: another thread closes `name`'s object while this loop starts waits."""
    s = Subject(name)
    if isinstance(s.obj, Barrier):
        s.obj.place()
    start = threading.Event()

    def close() -> None:
        start.wait(SOON)
        s.close()

    closer = threading.Thread(target=close)
    closer.start()

    async def race() -> list[BaseException]:
        errors: list[BaseException] = []
        start.set()
        for _ in range(50):
            try:
                await asyncio.wait_for(s.wait(), 0.001)
            except (ClosedResourceError, TimeoutError):
                pass
            except BaseException as exc:
                errors.append(exc)
        return errors

    try:
        return loop.run_until_complete(race())
    finally:
        closer.join(SOON)
        assert s.waiting == 0
        s.close()


def test_close_racing_a_wait_raises_closed_and_registers_nothing(
    kind: str, subject: Subject
) -> None:
    """Another thread closes while this loop starts waits: every wait ends in
    `ClosedResourceError` (or its own timeout), none in OSError, and no fd is left
    registered."""
    loop = new_loop(kind)
    try:
        for _ in range(200):
            assert close_while_waiting(loop, subject.name) == []
        # Nothing of any closed object stays registered with the loop, once the loop
        # has run the removals other threads' close() queued for it.
        selector = getattr(loop, "_selector", None)
        if selector is not None:
            loop.run_until_complete(
                until(lambda: len(selector.get_map()) <= 1, "registrations removed")
            )
    finally:
        loop.close()


# ---------------------------------------------------------------------------------------
# Objects still open at interpreter exit
# ---------------------------------------------------------------------------------------


def test_objects_left_open_at_exit_say_nothing() -> None:
    """A child that takes its objects from inherited() and just exits is the usual
    pattern: collecting them while the interpreter tears its modules down must not
    print "Exception ignored" (the process closes its fds anyway)."""
    code = (
        "import aiosync\n"
        "c = aiosync.Completion()\n"
        "b = aiosync.Barrier()\n"
        "r = aiosync.SeqRecord('qq')\n"
        "g = aiosync.BarrierGroup(2)\n"
        "holder = [c, b, r, g]\n"
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        capture_output=True,
        text=True,
        timeout=SOON,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
