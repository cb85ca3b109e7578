"""`WaitQueue` (aiosync/_fd.py) on its own, under a minimal primitive: what the
Barrier cannot show.

A Barrier's results are snapshots of its state, so its ``_give_back`` does nothing and
a lost or duplicated hand-out would not show in any Barrier test. `Tally`, a counting
semaphore over one eventfd (the shape of a Completion), makes every hand-out count.
On both loops:

* a unit handed to a waiter that was cancelled before it could take it is given back,
  whichever order the release and the cancellation happen in, also when the release
  comes from another thread; a waiter cancelled before the release is skipped;
* a release from another thread reaches its loop (``call_soon_threadsafe``);
* each loop of several (in several threads) has its own single registration;
* ``close()`` from another thread removes the reader in the loop's own thread while
  the fd is still open, and closes it afterwards; a closed loop's registration is not
  touched;
* a loop that was closed with a waiter still parked is forgotten by the next loop;
* cancelled waiters do not pile up; the loop's callback does not keep the primitive
  alive;
* a forked child forgets the parent's registrations without touching the shared epoll
  instance (the parent's paused loop still gets its event), and gets a fresh lock even
  if a parent thread held it at the fork.

(One registration per (loop, fd), lazy deregistration and `_fd.check` are in
test_fd_plumbing.py, on a real Barrier.) Spy loops (subclasses of the standard loop
and of uvloop's) count ``add_reader`` / ``remove_reader`` calls and the callbacks each
registration got, and record whether the fd was still open at each removal. Nothing
waits on the clock: fd events are already pending when a test yields to the loop, and
`until()` yields a bounded number of loop iterations.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop
from conftest import SOON, soon

from aiosync import ClosedResourceError, _fd

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Spy loops
# ---------------------------------------------------------------------------------------


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


class Spy:
    """What one loop was asked to do with readers."""

    def __init__(self) -> None:
        self.adds: Counter[int] = Counter()
        self.removes: Counter[int] = Counter()
        self.fired: Counter[int] = Counter()  # callbacks run, per fd
        # (fd, was it still open, thread) for every remove_reader call
        self.removals: list[tuple[int, bool, int]] = []

    def on_add(self, fd: int, callback: Callable[..., object]) -> Callable[..., object]:
        self.adds[fd] += 1

        def fired(*args: Any) -> None:
            self.fired[fd] += 1
            callback(*args)

        return fired

    def on_remove(self, fd: int) -> None:
        self.removes[fd] += 1
        self.removals.append((fd, is_open(fd), threading.get_ident()))

    def registered(self, fd: int) -> int:
        """How many registrations of `fd` this loop has now (by the calls it saw)."""
        return self.adds[fd] - self.removes[fd]


class Spied:
    """Mixed into a loop class: reports every reader call to its `Spy`."""

    spy: Spy

    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        super().add_reader(fd, self.spy.on_add(fd, callback), *args)  # type: ignore[misc]

    def remove_reader(self, fd: Any) -> bool:
        self.spy.on_remove(fd)
        return bool(super().remove_reader(fd))  # type: ignore[misc]


class SpyAsyncioLoop(Spied, asyncio.SelectorEventLoop):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.spy = Spy()


class SpyUvloop(Spied, uvloop.Loop):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self.spy = Spy()


def spy_loop(kind: str) -> SpyAsyncioLoop | SpyUvloop:
    return SpyUvloop() if kind == "uvloop" else SpyAsyncioLoop()


def run_spied(kind: str, main: Callable[[Spy], Coroutine[Any, Any, T]]) -> tuple[T, Spy]:
    """Run ``main(spy)`` on a fresh spy loop of `kind`; return its result and the spy."""
    loop = spy_loop(kind)
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        result = runner.run(main(loop.spy))
    return result, loop.spy


async def until(done: Callable[[], bool], what: str) -> None:
    """Yield to the loop until `done()` (an fd event that is already pending)."""
    for _ in range(1000):
        if done():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"after 1000 loop iterations, still not: {what}")


# ---------------------------------------------------------------------------------------
# Tally: the smallest primitive on a WaitQueue
# ---------------------------------------------------------------------------------------


class Tally:
    """A counting semaphore over one eventfd.

    ``post(n)`` adds to the eventfd, as another process would; ``put()`` adds one unit
    from any thread of this process. ``take()`` waits for a unit and consumes it.
    Hooks run around `_on_readable`, so that a test can act in exactly the loop
    callback that reads the fd.
    """

    def __init__(self) -> None:
        self.fd = _fd.eventfd()
        self._waitq: _fd.WaitQueue[int] = _fd.WaitQueue(self)
        self._waitq.watch(self.fd)
        self.units = 0
        self.readable = 0  # _on_readable calls
        self.given_back = 0
        self.before_read: Callable[[], object] = lambda: None
        self.after_read: Callable[[], object] = lambda: None

    @property
    def queue(self) -> _fd.WaitQueue[int]:
        return self._waitq

    def post(self, n: int = 1) -> None:
        os.eventfd_write(self.fd, n)

    def put(self) -> None:
        with self._waitq.lock:
            self.units += 1
            self._hand_out()

    async def take(self) -> int:
        queue = self._waitq
        with queue.lock:
            if self.units:
                self.units -= 1
                return 1
            waiter = queue.park()
        return await queue.wait(waiter)

    def _hand_out(self) -> None:
        queue = self._waitq
        for slot in queue.slots():
            while self.units and (waiter := queue.first(slot)) is not None:
                self.units -= 1
                queue.release(waiter, 1)

    def _on_readable(self, slot: _fd.LoopSlot[int], fd: int) -> None:
        # Called with the lock held, as for every primitive.
        self.before_read()
        self.readable += 1
        self.units += _fd.read_eventfd(self.fd)
        self._hand_out()
        self.after_read()

    def _give_back(self, result: int) -> None:
        # Not under the lock: the tests that give back run in one thread at a time.
        self.given_back += 1
        self.units += result

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._waitq.close([fd], lambda: ClosedResourceError("the Tally was closed"))


@pytest.fixture
def tally() -> Iterator[Tally]:
    t = Tally()
    yield t
    t.close()


async def parked(tally: Tally, n: int) -> None:
    await until(lambda: tally.queue.waiting == n, f"{n} waiters parked")


# ---------------------------------------------------------------------------------------
# One registration per (loop, fd)
# ---------------------------------------------------------------------------------------


def test_each_loop_has_its_own_registration(kind: str, tally: Tally) -> None:
    """Two loops in two threads wait at once: one registration on each, none shared."""
    ready = [threading.Event(), threading.Event()]
    results: list[object] = [None, None]
    spies: list[Spy | None] = [None, None]

    def thread(i: int) -> None:
        async def main(spy: Spy) -> int:
            task = asyncio.create_task(tally.take())
            await until(lambda: tally.queue.waiting >= i + 1, "parked")
            ready[i].set()
            return await soon(task)

        try:
            results[i], spies[i] = run_spied(kind, main)
        except BaseException as exc:  # pragma: no cover - reported below
            results[i] = exc

    t0 = threading.Thread(target=thread, args=(0,))
    t0.start()
    assert ready[0].wait(SOON)
    t1 = threading.Thread(target=thread, args=(1,))
    t1.start()
    assert ready[1].wait(SOON)
    tally.put()  # the oldest waiter first: loop 0's
    t0.join(SOON)
    assert results[0] == 1
    tally.put()
    t1.join(SOON)
    assert results[1] == 1
    for spy in spies:
        assert spy is not None
        assert spy.adds[tally.fd] == 1


# ---------------------------------------------------------------------------------------
# Removal before close
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["waiting", "lingering", "never-registered"])
def test_reader_is_removed_before_the_fd_is_closed(kind: str, state: str) -> None:
    tally = Tally()
    fd = tally.fd

    async def main(spy: Spy) -> None:
        task = None
        if state != "never-registered":
            task = asyncio.create_task(tally.take())
            await parked(tally, 1)
        if state == "lingering":
            tally.post()
            assert await soon(task) == 1  # type: ignore[arg-type]
            assert spy.registered(fd) == 1
        tally.close()
        assert not is_open(fd)
        if state == "never-registered":
            assert spy.removals == []
        else:
            assert spy.removals == [(fd, True, threading.get_ident())]
        if state == "waiting":
            with pytest.raises(ClosedResourceError, match="the Tally was closed"):
                await soon(task)  # type: ignore[arg-type]
        for _ in range(3):  # the loop must not trip over the closed fd
            await asyncio.sleep(0)

    try:
        run_spied(kind, main)
    finally:
        tally.close()


def test_close_from_another_thread_removes_in_the_loops_thread(kind: str) -> None:
    """The loop runs in a thread; this thread closes: removal there, then the close."""
    tally = Tally()
    fd = tally.fd
    parked_event = threading.Event()
    outcome: list[object] = []
    loop_thread: list[int] = []

    def thread() -> None:
        async def main(spy: Spy) -> Spy:
            loop_thread.append(threading.get_ident())
            task = asyncio.create_task(tally.take())
            await parked(tally, 1)
            parked_event.set()
            try:
                await soon(task)
            except ClosedResourceError as exc:
                outcome.append(exc)
            return spy

        try:
            outcome.append(run_spied(kind, main)[0])
        except BaseException as exc:  # pragma: no cover - reported below
            outcome.append(exc)

    t = threading.Thread(target=thread)
    t.start()
    try:
        assert parked_event.wait(SOON)
        tally.close()
    finally:
        t.join(SOON)
    assert not t.is_alive()
    assert len(outcome) == 2, outcome
    assert isinstance(outcome[0], ClosedResourceError)
    spy = outcome[1]
    assert isinstance(spy, Spy)
    assert spy.removals == [(fd, True, loop_thread[0])]  # in its thread, fd still open
    assert not is_open(fd)


def test_close_with_a_closed_loops_registration_removes_nothing(kind: str) -> None:
    tally = Tally()

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        tally.post()
        assert await soon(task) == 1

    _, spy = run_spied(kind, main)  # the loop is closed, its registration with it
    fd = tally.fd
    tally.close()
    assert spy.removals == []
    assert not is_open(fd)


# ---------------------------------------------------------------------------------------
# Handing out, giving back
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["released-then-cancelled", "cancelled-then-released"])
def test_cancellation_in_the_reading_callback_loses_nothing(
    kind: str, tally: Tally, order: str
) -> None:
    """The task is cancelled in the very loop callback that reads the fd: before or after.

    After the release the future already holds the unit, and ``Task.cancel()`` still
    makes the task raise: the unit must be given back. Before it, the waiter must be
    skipped. Either way the unit is there for the next `take()`.
    """

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        if order == "released-then-cancelled":
            tally.after_read = lambda: task.cancel()
        else:
            tally.before_read = lambda: task.cancel()
        tally.post()
        with pytest.raises(asyncio.CancelledError):
            await soon(task)
        assert tally.readable == 1
        assert tally.given_back == (1 if order == "released-then-cancelled" else 0)
        assert tally.units == 1
        assert tally.queue.waiting == 0
        tally.after_read = tally.before_read = lambda: None
        assert await soon(tally.take()) == 1
        assert tally.units == 0

    run_spied(kind, main)


def test_cancelled_waiters_are_skipped_when_handing_out(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        tasks = [asyncio.create_task(tally.take()) for _ in range(3)]
        await parked(tally, 3)
        # The middle one is cancelled in the callback, before the units are handed out.
        tally.before_read = lambda: tasks[1].cancel()
        tally.post(2)
        assert await soon(tasks[0]) == 1
        assert await soon(tasks[2]) == 1
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert (tally.units, tally.given_back, tally.queue.waiting) == (0, 0, 0)

    run_spied(kind, main)


def test_release_from_another_thread(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        put = threading.Thread(target=tally.put)
        put.start()
        put.join()  # the release is queued with call_soon_threadsafe
        assert tally.queue.waiting == 0
        assert not task.done()
        assert await soon(task) == 1
        assert (tally.units, tally.given_back) == (0, 0)

    run_spied(kind, main)


def test_cross_thread_release_to_a_cancelled_waiter_is_given_back(kind: str, tally: Tally) -> None:
    """Released from another thread, cancelled before the delivery ran in its loop."""

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        put = threading.Thread(target=tally.put)
        put.start()
        put.join()  # the delivery is queued, not run: this task holds the loop
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (tally.units, tally.given_back, tally.queue.waiting) == (1, 1, 0)
        assert await soon(tally.take()) == 1

    run_spied(kind, main)


def test_abandoned_waiters_do_not_pile_up(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        keeper = asyncio.create_task(tally.take())
        await parked(tally, 1)
        for _ in range(20):
            tasks = [asyncio.create_task(tally.take()) for _ in range(50)]
            await parked(tally, 51)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert tally.queue.waiting == 1
        (slot,) = tally.queue.slots()
        assert slot.live == 1
        assert len(slot.waiters) <= 2 * slot.live + 16 + 1  # 1000 were cancelled
        tally.post()
        assert await soon(keeper) == 1

    run_spied(kind, main)


def test_a_closed_loops_waiters_are_forgotten(kind: str, tally: Tally) -> None:
    """A waiter left parked in a loop that was closed does not count as waiting."""
    first = spy_loop(kind)

    async def park() -> None:
        with tally.queue.lock:
            tally.queue.park()

    first.run_until_complete(park())
    first.close()
    assert tally.queue.waiting == 1

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await until(lambda: tally.queue.waiting == 1 and spy.adds[tally.fd] == 1, "parked")
        assert len(list(tally.queue.slots())) == 1  # the closed loop's slot is gone
        tally.post()
        assert await soon(task) == 1

    run_spied(kind, main)
    assert tally.queue.waiting == 0


def test_a_dropped_primitive_is_not_kept_alive_by_its_registration(kind: str) -> None:
    tally = Tally()
    fd = tally.fd

    async def main(spy: Spy) -> None:
        nonlocal tally
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        os.eventfd_write(fd, 1)
        assert await soon(task) == 1
        assert spy.registered(fd) == 1
        ref = weakref.ref(tally)
        del tally, task
        assert ref() is None  # the loop's callback holds only a weak reference
        os.eventfd_write(fd, 1)
        await until(lambda: spy.removes[fd] == 1, "the orphan registration dropped")
        assert spy.removals == [(fd, True, threading.get_ident())]

    try:
        run_spied(kind, main)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# fork
# ---------------------------------------------------------------------------------------


def test_forked_child_forgets_the_parents_registrations(kind: str, tally: Tally) -> None:
    """The child closes the primitive and uses it on a loop of its own; the parent's
    paused loop still gets its event (the shared epoll instance was not touched), and
    the child could take the queue's lock although a parent thread held it at the fork.
    """
    loop = new_loop(kind)
    try:

        async def start() -> asyncio.Task[int]:
            task = asyncio.create_task(tally.take())
            await parked(tally, 1)
            return task

        task = loop.run_until_complete(start())
        holder_has_lock, release_holder = threading.Event(), threading.Event()

        def holder() -> None:
            with tally.queue.lock:
                holder_has_lock.set()
                release_holder.wait(SOON)

        h = threading.Thread(target=holder)
        h.start()
        assert holder_has_lock.wait(SOON)
        report_r, report_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 1
            try:
                os.close(report_r)
                code = forked_child(tally, kind)
                os.write(report_w, b"ok")
            finally:
                os._exit(code)
        os.close(report_w)
        release_holder.set()
        h.join()
        try:
            ready, _, _ = select.select([report_r], [], [], SOON)
            assert ready, "the forked child hung"
            assert os.read(report_r, 16) == b"ok"
        finally:
            _, status = os.waitpid(pid, 0)
            os.close(report_r)
        assert os.waitstatus_to_exitcode(status) == 0
        # The parent's registration still works: its waiter gets the next unit.
        tally.post()
        assert loop.run_until_complete(soon(task)) == 1
    finally:
        loop.close()


def forked_child(tally: Tally, kind: str) -> int:  # pragma: no cover - runs in a child
    queue = tally.queue
    if queue.waiting != 0 or list(queue.slots()):
        return 2

    async def main() -> int:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        tally.post()
        return await soon(task)

    loop = new_loop(kind)
    try:
        if loop.run_until_complete(main()) != 1:
            return 3
    finally:
        loop.close()
    tally.close()  # with the parent's slot forgotten, this touches no parent loop
    return 0


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()
