"""`WaitQueue` (aiosync/_waitq.py) on its own, under a minimal primitive: what the
Barrier cannot show.

A Barrier's results are snapshots of its state, so a lost or duplicated hand-out would
not show in any Barrier test. `Tally`, a counting semaphore over one semaphore-mode
eventfd that waiters take turns at (the shape of a Completion), makes every unit count.
On both loops:

* the loop's callback only rings: it never takes a unit for a waiter; the woken
  waiter takes its own, in its task; a waiter cancelled after it was woken (whichever
  order the ring and the cancellation happen in) takes nothing and the next waiter
  gets its turn; a woken waiter that finds nothing waits again, first in line;
* a release from another thread reaches its loop (``call_soon_threadsafe``);
* each loop of several (in several threads) has its own single registration;
* ``close()`` from another thread removes the reader in the loop's own thread while
  the fd is still open, and closes it afterwards; a closed loop's registration is not
  touched; ``park()`` after (or racing) ``close()`` raises `ClosedResourceError`;
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
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import uvloop
from support import SOON, Forked, is_open, new_loop, soon, until

from aiosync import ClosedResourceError, _fd
from aiosync._waitq import LoopSlot, WaitQueue

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# Spy loops
# ---------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------
# Tally: the smallest primitive on a WaitQueue
# ---------------------------------------------------------------------------------------


class Tally:
    """A counting semaphore over one semaphore-mode eventfd; waiters take turns.

    ``post(n)`` adds units to the eventfd, as another process would. ``take()`` waits
    for its turn and takes one unit, in its own task. Hooks run around `_on_readable`,
    so that a test can act in exactly the loop callback that rings.
    """

    def __init__(self) -> None:
        self.fd = _fd.eventfd(semaphore=True)
        self._waitq: WaitQueue[None, bool] = WaitQueue(self, self._closed_error)
        self._waitq.watch(self.fd)
        self.rings = 0  # _on_readable calls
        self.took_nothing = 0  # turns that found the eventfd empty
        self.before_ring: Callable[[], object] = lambda: None
        self.after_ring: Callable[[], object] = lambda: None

    @staticmethod
    def _closed_error() -> ClosedResourceError:
        return ClosedResourceError("the Tally was closed")

    @property
    def queue(self) -> WaitQueue[None, bool]:
        return self._waitq

    @property
    def units(self) -> int:
        return _fd.eventfd_value(self.fd)

    def post(self, n: int = 1) -> None:
        os.eventfd_write(self.fd, n)

    async def take(self) -> int:
        queue = self._waitq
        if self.fd >= 0 and not (queue.waiting or queue.turns) and _fd.read_eventfd(self.fd):
            return 1  # the fast path: nobody in line, and a unit is there
        await queue.wait_turn(None, self._take)
        return 1

    def _take(self, ring: bool) -> bool:
        if _fd.read_eventfd(self.fd):
            return True
        self.took_nothing += 1
        return False

    def _on_readable(self, slot: LoopSlot[None, bool], fd: int) -> None:
        # Called with the lock held, as for every primitive.
        self.before_ring()
        self.rings += 1
        self._waitq.ring(slot, True)
        self.after_ring()

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            self._waitq.close([fd])


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
    tally.post(2)  # each loop's registration rings for its own waiter
    t0.join(SOON)
    t1.join(SOON)
    assert results == [1, 1]
    assert tally.units == 0
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
# Taking turns: the callback rings, the waiter takes
# ---------------------------------------------------------------------------------------


def test_the_callback_takes_nothing_for_a_waiter(kind: str, tally: Tally) -> None:
    """Two units for two waiters: each ring leaves the units where they are; each
    waiter takes its own when its task runs (so a busy loop, or a SIGKILL before the
    task runs, loses nothing)."""

    async def main(spy: Spy) -> None:
        tasks = [asyncio.create_task(tally.take()) for _ in range(2)]
        await parked(tally, 2)
        at_ring: list[int] = []
        tally.after_ring = lambda: at_ring.append(tally.units)
        tally.post(2)
        assert await soon(tasks[0]) == 1
        assert await soon(tasks[1]) == 1
        assert at_ring[:2] == [2, 1], at_ring  # the first ring found both units there
        assert (tally.units, tally.took_nothing, tally.queue.waiting) == (0, 0, 0)
        assert tally.queue.turns == 0

    run_spied(kind, main)


@pytest.mark.parametrize("order", ["woken-then-cancelled", "cancelled-then-woken"])
def test_cancellation_in_the_ringing_callback_loses_nothing(
    kind: str, tally: Tally, order: str
) -> None:
    """The task is cancelled in the very loop callback that rings: before or after.

    After the ring its future already holds a result, and ``Task.cancel()`` still makes
    the task raise: it took nothing. Before it, the waiter is skipped. Either way the
    unit is still there for the next `take()`.
    """

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        if order == "woken-then-cancelled":
            tally.after_ring = lambda: task.cancel()
        else:
            tally.before_ring = lambda: task.cancel()
        tally.post()
        with pytest.raises(asyncio.CancelledError):
            await soon(task)
        assert tally.rings >= 1
        assert (tally.units, tally.queue.waiting, tally.queue.turns) == (1, 0, 0)
        tally.after_ring = tally.before_ring = lambda: None
        assert await soon(tally.take()) == 1
        assert tally.units == 0

    run_spied(kind, main)


def test_a_cancelled_woken_waiter_passes_the_turn_on(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        tasks = [asyncio.create_task(tally.take()) for _ in range(3)]
        await parked(tally, 3)
        # The first one is woken, then cancelled before it runs: the second one takes.
        tally.after_ring = lambda: tasks[0].cancel()
        tally.post()
        with pytest.raises(asyncio.CancelledError):
            await soon(tasks[0])
        tally.after_ring = lambda: None
        assert await soon(tasks[1]) == 1
        assert not tasks[2].done()
        tally.post()
        assert await soon(tasks[2]) == 1
        assert (tally.units, tally.queue.waiting) == (0, 0)

    run_spied(kind, main)


def test_cancelled_waiters_are_skipped_when_ringing(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        tasks = [asyncio.create_task(tally.take()) for _ in range(3)]
        await parked(tally, 3)
        # The middle one is cancelled in the callback, before anyone is woken.
        tally.before_ring = lambda: tasks[1].cancel()
        tally.post(2)
        assert await soon(tasks[0]) == 1
        tally.before_ring = lambda: None
        assert await soon(tasks[2]) == 1
        with pytest.raises(asyncio.CancelledError):
            await tasks[1]
        assert (tally.units, tally.queue.waiting) == (0, 0)

    run_spied(kind, main)


def test_a_woken_waiter_that_finds_nothing_waits_again_first_in_line(
    kind: str, tally: Tally
) -> None:
    async def main(spy: Spy) -> None:
        first = asyncio.create_task(tally.take())
        await parked(tally, 1)
        second = asyncio.create_task(tally.take())
        await parked(tally, 2)
        # Another process takes the unit between the ring and the woken task's turn.
        tally.after_ring = lambda: _fd.read_eventfd(tally.fd)
        tally.post()
        await until(lambda: tally.took_nothing == 1, "the woken waiter found nothing")
        tally.after_ring = lambda: None
        await parked(tally, 2)
        assert not first.done()
        assert not second.done()
        tally.post()
        assert await soon(first) == 1  # it kept its place
        assert not second.done()
        tally.post()
        assert await soon(second) == 1

    run_spied(kind, main)


def test_a_newcomer_does_not_jump_the_line(kind: str, tally: Tally) -> None:
    """A unit that arrives while a waiter of this loop is parked is that waiter's, not
    a newcomer's that finds it on its fast path."""

    async def main(spy: Spy) -> None:
        first = asyncio.create_task(tally.take())
        await parked(tally, 1)
        tally.post()
        newcomer = asyncio.create_task(tally.take())  # runs before the ring
        assert await soon(first) == 1
        await parked(tally, 1)
        assert not newcomer.done()
        tally.post()
        assert await soon(newcomer) == 1

    run_spied(kind, main)


def ring_from_another_thread(tally: Tally) -> None:
    """Ring for this loop's oldest waiter from another thread (call_soon_threadsafe)."""
    (slot,) = tally.queue.slots()

    def ring() -> None:
        with tally.queue.lock:
            tally.queue.ring(slot, True)

    thread = threading.Thread(target=ring)
    thread.start()
    thread.join()


def test_ring_from_another_thread(kind: str, tally: Tally) -> None:
    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        tally.post()
        ring_from_another_thread(tally)  # the wake-up is queued with call_soon_threadsafe
        assert tally.queue.waiting == 0
        assert not task.done()
        assert await soon(task) == 1
        assert tally.units == 0

    run_spied(kind, main)


def test_cross_thread_ring_to_a_cancelled_waiter_takes_nothing(kind: str, tally: Tally) -> None:
    """Woken from another thread, cancelled before the wake-up ran in its loop."""

    async def main(spy: Spy) -> None:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        ring_from_another_thread(tally)  # the wake-up is queued, not run: this task holds the loop
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        (slot,) = tally.queue.slots()
        assert (tally.units, tally.queue.waiting, slot.woken) == (0, 0, None)
        assert tally.queue.turns == 0
        tally.post()
        assert await soon(tally.take()) == 1

    run_spied(kind, main)


def test_park_after_close_raises_and_registers_nothing(kind: str) -> None:
    """A wait that starts after (or while) another thread closes the queue."""
    tally = Tally()
    fd = tally.fd
    closer = threading.Thread(target=tally.close)
    closer.start()
    closer.join()

    async def main(spy: Spy) -> None:
        with pytest.raises(ClosedResourceError, match="the Tally was closed"):
            await tally.take()
        with tally.queue.lock, pytest.raises(ClosedResourceError):
            tally.queue.park(None)
        assert spy.adds[fd] == 0
        assert tally.queue.waiting == 0

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
            tally.queue.park(None)

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


# Forks with a thread alive on purpose (it holds the queue's lock at the fork).
@pytest.mark.filterwarnings(
    r"ignore:This process \(pid=\d+\) is multi-threaded, use of fork\(\):DeprecationWarning"
)
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
        child = Forked(lambda: forked_child(tally, kind), with_threads=True)
        release_holder.set()
        h.join()
        child.join()
        # The parent's registration still works: its waiter gets the next unit.
        tally.post()
        assert loop.run_until_complete(soon(task)) == 1
    finally:
        loop.close()


def forked_child(tally: Tally, kind: str) -> None:  # pragma: no cover - runs in a child
    queue = tally.queue
    assert queue.waiting == 0, "the parent's waiter is counted in the child"
    assert not list(queue.slots()), "the parent's loop is known in the child"

    async def main() -> int:
        task = asyncio.create_task(tally.take())
        await parked(tally, 1)
        tally.post()
        return await soon(task)

    loop = new_loop(kind)
    try:
        assert loop.run_until_complete(main()) == 1
    finally:
        loop.close()
    tally.close()  # with the parent's slot forgotten, this touches no parent loop
