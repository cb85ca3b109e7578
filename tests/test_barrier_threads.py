"""A blocking twin is woken by whatever another thread of its process does.

A blocking twin (``sync_blocking()`` and so on) checks the state under the barrier's
lock, lets go of the lock and polls the fds. Another thread can change the state in
between: a loop's reader or another twin drains the eventfd (one read takes every
barrier the peer placed), ``abort()``, ``close()``. Polling the fds alone then misses
it: with ``timeout=None`` the twin would hang until the peer's next move. Each test
puts the twin exactly where it would miss the change -- held just before its poll with
the lock released (a hook on ``_fd.wait_readable``), or asleep inside poll() (as
/proc/self/task/TID/wchan says) -- lets the other thread act, and expects the twin to
return at once, with no further move of the peer.

The peer is in this process (`pair()`: the CHILD side over duplicates of the fds).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from support import SOON, run_on, soon

from aiosync import Barrier, ClosedResourceError, _fd


def eventfds() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:[eventfd]":
                found.add(int(name))
        except OSError:  # the listing's own fd
            pass
    return found


@pytest.fixture(autouse=True)
def twins_leave_nothing(request: pytest.FixtureRequest) -> Iterator[None]:
    """After the test and its `sides` are closed: no blocker left, and the twins' wake
    eventfds are closed."""
    before = eventfds()
    yield
    if (sides := request.node.funcargs.get("sides")) is not None:
        assert sides[0]._waitq.blockers == {}
    assert eventfds() == before


def wait_until_polling(thread: threading.Thread) -> None:
    """Wait (bounded) until `thread` sleeps inside poll(), as /proc tells it."""
    path = f"/proc/self/task/{thread.native_id}/wchan"
    deadline = time.monotonic() + SOON
    while True:
        with open(path, encoding="ascii") as f:
            if f.read().startswith("poll_schedule_timeout"):
                return
        assert time.monotonic() < deadline, f"{thread.name} never blocked in poll()"
        time.sleep(0.001)


class PauseBeforePoll:
    """Holds the blocking twin of the thread named `name` just before its first poll."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        real = _fd.wait_readable

        def hooked(fds: Any, timeout: float | None) -> bool:
            if threading.current_thread().name == name and not self.go.is_set():
                self.reached.set()
                assert self.go.wait(SOON)
            return real(fds, timeout)

        monkeypatch.setattr(_fd, "wait_readable", hooked)


class Twin:
    """``fn()`` in a thread of its own named `name`; its result or exception."""

    def __init__(self, name: str, fn: Callable[[], object]) -> None:
        self.outcome: list[object] = []

        def run() -> None:
            try:
                self.outcome.append(fn())
            except Exception as exc:
                self.outcome.append(exc)

        self.thread = threading.Thread(target=run, name=name)
        self.thread.start()

    def finished(self) -> bool:
        """Wait (bounded) for the thread; True if it finished."""
        self.thread.join(SOON)
        return not self.thread.is_alive()

    def result(self) -> object:
        assert len(self.outcome) == 1
        return self.outcome[0]


def unstick(c: Barrier, *twins: Twin) -> None:
    """After a failure: let the peer abort so that a stuck twin returns."""
    if not c._closed:
        c.abort()
    for twin in twins:
        twin.thread.join(SOON)


def test_twin_is_woken_when_a_loop_reads_for_it(
    kind: str, sides: tuple[Barrier, Barrier], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, c = sides
    pause = PauseBeforePoll(monkeypatch, "twin")
    assert p.place()
    twin = Twin("twin", p.sync_blocking)
    try:
        assert pause.reached.wait(SOON)

        async def loop_reads() -> None:
            task = asyncio.create_task(p.sync())
            for _ in range(3):
                await asyncio.sleep(0)
            assert c.place()  # the loop's reader takes it, for both waits
            assert await soon(task) is True

        run_on(kind, loop_reads())
        assert repr(p) == "<aiosync.Barrier role=PARENT barriers=0 aborted=no>"
        pause.go.set()  # the twin now polls an eventfd the loop drained
        assert twin.finished(), "the blocking twin missed the loop's read"
        assert twin.result() is True
    finally:
        pause.go.set()
        unstick(c, twin)


def test_twin_is_woken_when_another_twin_reads_for_it(
    sides: tuple[Barrier, Barrier], monkeypatch: pytest.MonkeyPatch
) -> None:
    p, c = sides
    pause = PauseBeforePoll(monkeypatch, "held")
    assert p.place()
    held = Twin("held", p.sync_blocking)
    other: Twin | None = None
    try:
        assert pause.reached.wait(SOON)
        other = Twin("other", p.sync_blocking)
        assert c.place()
        assert other.finished()
        assert other.result() is True  # it read the barrier, for both
        pause.go.set()
        assert held.finished(), "the blocking twin missed the other twin's read"
        assert held.result() is True
    finally:
        pause.go.set()
        unstick(c, held, *([other] if other else []))


@pytest.mark.parametrize("name", ["sync_blocking", "wait_next_blocking", "sync_next_blocking"])
def test_twin_in_poll_is_released_by_abort_in_another_thread(
    sides: tuple[Barrier, Barrier], name: str
) -> None:
    p, c = sides
    assert p.place()
    assert p.place()
    twin = Twin("twin", getattr(p, name))
    try:
        wait_until_polling(twin.thread)
        assert p.abort() is True
        assert twin.finished(), "the blocking twin missed this side's abort"
        assert twin.result() is False
    finally:
        unstick(c, twin)


@pytest.mark.parametrize("name", ["sync_blocking", "wait_abortion_blocking"])
@pytest.mark.parametrize("where", ["in-poll", "before-poll"])
def test_twin_is_interrupted_by_close_in_another_thread(
    sides: tuple[Barrier, Barrier], monkeypatch: pytest.MonkeyPatch, name: str, where: str
) -> None:
    """Closing an fd does not end a poll() on it (Linux); close() must wake the twin."""
    p, c = sides
    pause = PauseBeforePoll(monkeypatch, "twin" if where == "before-poll" else "nobody")
    assert p.place()
    twin = Twin("twin", getattr(p, name))
    try:
        if where == "before-poll":
            assert pause.reached.wait(SOON)
        else:
            wait_until_polling(twin.thread)
        p.close()
        pause.go.set()
        assert twin.finished(), "the blocking twin missed close()"
        result = twin.result()
        assert isinstance(result, ClosedResourceError), result
    finally:
        pause.go.set()
        unstick(c, twin)


def test_twin_still_times_out_and_cleans_up(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    for _ in range(3):
        with pytest.raises(TimeoutError):
            p.sync_blocking(timeout=0.01)
        assert p._waitq.blockers == {}
    assert c.place()
    assert p.sync_blocking(timeout=SOON) is True


def test_own_abort_in_another_thread_does_not_release_wait_abortion(
    sides: tuple[Barrier, Barrier],
) -> None:
    """The wake-up is only a prompt to re-check: a twin whose condition still does not
    hold goes back to its poll, and the peer's abort then releases it."""
    p, c = sides
    twin = Twin("twin", p.wait_abortion_blocking)
    try:
        wait_until_polling(twin.thread)
        assert p.abort() is True
        twin.thread.join(0.05)  # bounded: it must still be waiting ...
        assert twin.thread.is_alive()
        wait_until_polling(twin.thread)  # ... back in its poll
        assert c.abort() is True
        assert twin.finished()
        assert twin.result() is False  # both aborted
    finally:
        unstick(c, twin)
