"""Lock and Semaphore in one process: the API, bad use, close, fds, FIFO, cancellation,
threads. (Other processes: test_lock_processes.py; dead holders: test_lock_faults.py.)"""

from __future__ import annotations

import asyncio
import gc
import os
import random
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import closing

import pytest
from support import SOON, assert_blocks, cancel, finish_now, new_loop, run_on, soon

from aiosync import ClosedResourceError, Lock, Semaphore, WouldBlock

Primitive = Lock | Semaphore


def owner(lock: Lock) -> int | None:
    """`lock.owner_pid`, read afresh (mypy would narrow the property between reads)."""
    return lock.owner_pid


def inconsistent(lock: Lock) -> bool:
    """`lock.inconsistent`, read afresh."""
    return lock.inconsistent


@pytest.fixture
def lock() -> Iterator[Lock]:
    obj = Lock()
    yield obj
    obj.close()


@pytest.fixture
def sem() -> Iterator[Semaphore]:
    s = Semaphore(2)
    yield s
    s.close()


async def settle(rounds: int = 5) -> None:
    """Let already-pending steps (wake-ups, a grant passed on) run; no sleeping."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def assert_free(obj: Primitive, what: str = "") -> None:
    """Once pending steps ran, nobody holds it, and it can be taken at once."""
    await settle()
    assert not obj.locked(), f"left held by nobody {what}"
    obj.acquire_nowait()
    obj.release()


# ---------------------------------------------------------------------------------------
# The API
# ---------------------------------------------------------------------------------------


async def test_acquire_release_locked_owner_pid(lock: Lock) -> None:
    assert not lock.locked()
    assert owner(lock) is None
    assert not inconsistent(lock)
    assert await lock.acquire() is True
    assert lock.locked()
    assert owner(lock) == os.getpid()
    assert not inconsistent(lock)
    lock.release()
    assert not lock.locked()
    assert owner(lock) is None


async def test_acquire_of_a_free_lock_returns_at_once(lock: Lock) -> None:
    assert finish_now(lock.acquire()) is True  # no loop round trip
    lock.release()


async def test_acquire_nowait(lock: Lock) -> None:
    lock.acquire_nowait()
    with pytest.raises(WouldBlock):
        lock.acquire_nowait()  # held by this very process: still WouldBlock
    lock.release()
    lock.acquire_nowait()
    lock.release()


async def test_acquire_blocks_until_release(lock: Lock) -> None:
    await lock.acquire()
    waiter = await assert_blocks(lock.acquire())
    lock.release()
    assert await soon(waiter) is True
    assert owner(lock) == os.getpid()
    lock.release()


def test_acquire_blocking(lock: Lock) -> None:
    assert lock.acquire_blocking() is True
    with pytest.raises(TimeoutError):
        lock.acquire_blocking(timeout=0.05)
    with pytest.raises(TimeoutError):
        lock.acquire_blocking(timeout=0)
    lock.release()
    assert lock.acquire_blocking(timeout=0) is True
    lock.release()


async def test_acquire_blocking_refuses_a_running_loop(lock: Lock) -> None:
    with pytest.raises(RuntimeError, match="running event loop"):
        lock.acquire_blocking(timeout=0)
    assert not lock.locked()  # and took nothing
    sem = Semaphore()
    with pytest.raises(RuntimeError, match="running event loop"):
        sem.acquire_blocking(timeout=0)
    assert sem.value == 1
    sem.close()


async def test_release_by_a_non_holder_raises(lock: Lock) -> None:
    with pytest.raises(RuntimeError):
        lock.release()
    with pytest.raises(RuntimeError):
        lock.mark_consistent()
    await lock.acquire()
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()  # twice
    assert not lock.locked()


async def test_any_task_or_thread_of_the_holding_process_may_release(lock: Lock) -> None:
    await lock.acquire()

    async def other_task() -> None:
        lock.release()

    await asyncio.create_task(other_task())
    assert not lock.locked()
    await lock.acquire()
    await asyncio.to_thread(lock.release)
    assert not lock.locked()


async def test_mark_consistent_on_a_consistent_lock_keeps_it_consistent(lock: Lock) -> None:
    await lock.acquire()
    lock.mark_consistent()
    assert not inconsistent(lock)
    lock.release()
    await lock.acquire()  # not broken
    lock.release()


async def test_async_with(lock: Lock) -> None:
    async with lock:
        assert lock.locked()
        assert owner(lock) == os.getpid()
    assert not lock.locked()
    with pytest.raises(ZeroDivisionError):
        async with lock:
            1 / 0  # noqa: B018
    assert not lock.locked()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_plain_with_raises_type_error(cls: type[Primitive]) -> None:
    obj = cls()
    try:
        with pytest.raises(TypeError, match="async with"), obj:
            pytest.fail("the body ran")  # pragma: no cover
        # Neither acquired nor closed.
        assert not obj.locked()
        obj.acquire_nowait()
        obj.release()
    finally:
        obj.close()


def test_lock_repr() -> None:
    lock = Lock()
    assert repr(lock) == "<aiosync.Lock unlocked>"
    lock.acquire_nowait()
    assert repr(lock) == f"<aiosync.Lock locked by pid {os.getpid()}>"
    lock.release()
    lock.close()
    assert repr(lock) == "<aiosync.Lock closed>"


def test_semaphore_repr() -> None:
    sem = Semaphore(3)
    assert repr(sem) == "<aiosync.Semaphore value=3/3 held here=0>"
    sem.acquire_nowait()
    assert repr(sem) == "<aiosync.Semaphore value=2/3 held here=1>"
    sem.release()
    sem.close()
    assert repr(sem) == "<aiosync.Semaphore closed>"


# ---------------------------------------------------------------------------------------
# Semaphore
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0, -1, 65537, 2**40])
def test_semaphore_value_out_of_range(value: int) -> None:
    with pytest.raises(ValueError, match="from 1 to 65536"):
        Semaphore(value)


@pytest.mark.parametrize("value", ["3", 2.0, None])
def test_semaphore_value_of_a_wrong_type(value: object) -> None:
    with pytest.raises(TypeError):
        Semaphore(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [1, 2, 65536])
def test_semaphore_value_bounds_accepted(value: int) -> None:
    with closing(Semaphore(value)) as sem:
        assert sem.value == value
        assert not sem.locked()


def test_semaphore_default_value_is_one() -> None:
    with closing(Semaphore()) as sem:
        assert sem.value == 1
        sem.acquire_nowait()
        assert sem.locked()
        with pytest.raises(WouldBlock):
            sem.acquire_nowait()
        sem.release()


async def test_semaphore_counts(sem: Semaphore) -> None:
    assert sem.value == 2
    assert await sem.acquire() is True
    assert sem.value == 1
    assert not sem.locked()
    sem.acquire_nowait()
    assert sem.value == 0
    assert sem.locked()
    with pytest.raises(WouldBlock):
        sem.acquire_nowait()
    waiter = await assert_blocks(sem.acquire())
    sem.release()
    assert await soon(waiter) is True
    assert sem.value == 0
    sem.release()
    sem.release()
    assert sem.value == 2
    with pytest.raises(ValueError, match="holds none of its units"):
        sem.release()  # bounded: this process holds no unit
    assert sem.value == 2


def test_semaphore_acquire_blocking(sem: Semaphore) -> None:
    assert sem.acquire_blocking() is True
    assert sem.acquire_blocking(timeout=0) is True
    with pytest.raises(TimeoutError):
        sem.acquire_blocking(timeout=0.05)
    assert sem.value == 0
    sem.release()
    sem.release()
    with pytest.raises(ValueError, match="holds none of its units"):
        sem.release()


async def test_semaphore_async_with(sem: Semaphore) -> None:
    async with sem:
        assert sem.value == 1
        async with sem:
            assert sem.value == 0
    assert sem.value == 2


# ---------------------------------------------------------------------------------------
# close()
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_close_is_idempotent_and_use_after_close_raises(cls: type[Primitive]) -> None:
    obj = cls()
    obj.close()
    obj.close()
    for call in (obj.acquire_nowait, obj.release):
        with pytest.raises(ClosedResourceError):
            call()
    with pytest.raises(ClosedResourceError):
        await obj.acquire()
    with pytest.raises(ClosedResourceError):
        await asyncio.to_thread(obj.acquire_blocking, 0)
    with pytest.raises(ClosedResourceError):
        async with obj:
            pytest.fail("the body ran")  # pragma: no cover
    if isinstance(obj, Lock):
        with pytest.raises(ClosedResourceError):
            obj.mark_consistent()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_close_fails_pending_waiters(cls: type[Primitive]) -> None:
    obj = cls()
    await obj.acquire()
    waiters = [asyncio.ensure_future(obj.acquire()) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    obj.close()
    for w in waiters:
        with pytest.raises(ClosedResourceError):
            await soon(w)


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_close_from_another_thread_ends_acquire_blocking(cls: type[Primitive]) -> None:
    obj = cls()
    obj.acquire_nowait()
    started = threading.Event()
    outcome: list[BaseException] = []

    def blocked() -> None:
        started.set()
        try:
            obj.acquire_blocking(timeout=SOON)
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=blocked)
    thread.start()
    try:
        assert started.wait(SOON)
        thread.join(0.1)  # it blocks (or is about to)
        assert thread.is_alive()
        obj.close()
        thread.join(SOON)
        assert not thread.is_alive()
    finally:
        obj.close()
        thread.join()
    assert len(outcome) == 1
    assert isinstance(outcome[0], ClosedResourceError), outcome


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_dropped_unclosed_warns_and_closes(
    cls: type[Primitive], fd_count: Callable[[], int]
) -> None:
    before = fd_count()

    def create_and_drop() -> None:
        obj = cls()
        obj.acquire_nowait()
        obj.release()

    def drop() -> None:
        create_and_drop()
        gc.collect()  # (in case a reference cycle keeps it)

    with pytest.warns(ResourceWarning, match=f"unclosed <aiosync.{cls.__name__}"):
        drop()
    assert fd_count() == before


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_dropped_unclosed_is_closed_at_once(
    cls: type[Primitive], fd_count: Callable[[], int]
) -> None:
    gc.disable()
    try:
        before = fd_count()
        with pytest.warns(ResourceWarning, match="unclosed"):
            cls()
        assert fd_count() == before
    finally:
        gc.enable()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_no_fd_leak_over_1000_objects(cls: type[Primitive], fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for _ in range(1000):
        obj = cls()
        obj.acquire_nowait()
        obj.release()
        assert obj.acquire_blocking(timeout=0)
        obj.release()
        obj.close()
    assert fd_count() == before


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_no_fd_leak_after_waits(
    cls: type[Primitive], fd_count: Callable[[], int], kind: str
) -> None:
    before = fd_count()

    async def wait_once(obj: Primitive) -> None:
        await obj.acquire()
        waiter = await assert_blocks(obj.acquire(), seconds=0.01)
        obj.release()
        await soon(waiter)
        obj.release()

    async def main() -> None:
        for _ in range(30):
            obj = cls()
            await wait_once(obj)
            obj.close()
        obj = cls()  # closed while a waiter is parked
        await obj.acquire()
        waiter = await assert_blocks(obj.acquire(), seconds=0.01)
        obj.close()
        with pytest.raises(ClosedResourceError):
            await waiter

    run_on(kind, main())
    assert fd_count() == before


# ---------------------------------------------------------------------------------------
# FIFO in a loop; a newcomer queues behind
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_fifo_within_a_loop(cls: type[Primitive]) -> None:
    obj = cls()
    order: list[int] = []

    async def take(i: int) -> None:
        await obj.acquire()
        order.append(i)
        await asyncio.sleep(0)
        obj.release()

    try:
        await obj.acquire()
        tasks = [asyncio.create_task(take(i)) for i in range(20)]
        await settle()
        assert not order
        obj.release()
        await soon(asyncio.gather(*tasks))
        assert order == list(range(20))
        assert not obj.locked()
    finally:
        obj.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_a_newcomer_queues_behind_the_waiters(cls: type[Primitive]) -> None:
    obj = cls()
    order: list[str] = []

    async def take(name: str) -> None:
        await obj.acquire()
        order.append(name)
        obj.release()

    try:
        await obj.acquire()
        first = asyncio.create_task(take("waiter"))
        await settle()
        obj.release()
        # Released with a waiter parked: a newcomer, even one that does not wait, does
        # not barge in ahead of it.
        with pytest.raises(WouldBlock):
            obj.acquire_nowait()
        newcomer = asyncio.create_task(take("newcomer"))
        await soon(asyncio.gather(first, newcomer))
        assert order == ["waiter", "newcomer"]
        assert not obj.locked()
    finally:
        obj.close()


async def test_semaphore_release_wakes_the_oldest_waiter_only(sem: Semaphore) -> None:
    await sem.acquire()
    await sem.acquire()
    got: list[int] = []

    async def take(i: int) -> None:
        await sem.acquire()
        got.append(i)

    tasks = [asyncio.create_task(take(i)) for i in range(3)]
    await settle()
    sem.release()
    await soon(until_len(got, 1))
    await settle()
    assert got == [0]
    sem.release()
    await soon(until_len(got, 2))
    await settle()
    assert got == [0, 1]
    assert sem.value == 0
    tasks[2].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    sem.release()
    sem.release()
    assert sem.value == 2


async def until_len(items: list[int], n: int) -> None:
    while len(items) < n:
        await asyncio.sleep(0)


# ---------------------------------------------------------------------------------------
# Cancellation
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_a_cancelled_waiter_takes_nothing(cls: type[Primitive]) -> None:
    obj = cls()
    try:
        await obj.acquire()
        waiter = asyncio.ensure_future(obj.acquire())
        after = asyncio.ensure_future(obj.acquire())
        await settle()
        await cancel(waiter)
        obj.release()
        assert await soon(after) is True
        obj.release()
        await assert_free(obj)
    finally:
        obj.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_a_waiter_handed_the_lock_and_cancelled_before_it_ran_passes_it_on(
    cls: type[Primitive],
) -> None:
    obj = cls()
    try:
        await obj.acquire()
        handed = asyncio.ensure_future(obj.acquire())
        nxt = asyncio.ensure_future(obj.acquire())
        await settle()
        obj.release()  # handed to `handed`, which has not run yet...
        handed.cancel()  # ...and is cancelled now
        with pytest.raises(asyncio.CancelledError):
            await handed
        assert await soon(nxt) is True  # passed on
        obj.release()
        await assert_free(obj)
    finally:
        obj.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_a_lone_waiter_cancelled_after_the_grant_leaves_it_free(
    cls: type[Primitive],
) -> None:
    obj = cls()
    try:
        await obj.acquire()
        handed = asyncio.ensure_future(obj.acquire())
        await settle()
        obj.release()
        await asyncio.sleep(0)  # maybe the wake-up runs, not the task
        handed.cancel()
        try:
            got = await handed
        except asyncio.CancelledError:
            await settle()
            assert not obj.locked(), "left held by a cancelled task"
            obj.acquire_nowait()
        else:
            assert got is True  # it ran before the cancel: it holds it
            assert obj.locked()
        obj.release()
        assert not obj.locked()
    finally:
        obj.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_cancellation_at_every_point_of_an_acquire(cls: type[Primitive]) -> None:
    """A holder releases after `r` loop steps, a waiter is cancelled after `c`, a second
    waiter stands behind it: whatever the interleaving, the lock ends held by exactly the
    tasks whose acquire returned, and the next acquire gets it."""
    for r in range(6):
        for c in range(6):
            obj = cls()
            try:
                await obj.acquire()
                first = asyncio.ensure_future(obj.acquire())
                second = asyncio.ensure_future(obj.acquire())
                for step in range(max(r, c) + 1):
                    if step == r:
                        obj.release()
                    if step == c and not first.done():
                        first.cancel()
                    await asyncio.sleep(0)
                try:
                    await soon(first)
                except asyncio.CancelledError:
                    pass
                if not first.cancelled():
                    assert obj.locked()
                    obj.release()
                assert await soon(second) is True, (r, c)
                assert obj.locked()
                obj.release()
                await assert_free(obj, f"(release at {r}, cancel at {c})")
            finally:
                obj.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
async def test_timeouts_at_random_points_lose_nothing(cls: type[Primitive]) -> None:
    rng = random.Random(1212)
    obj = cls()
    inside = 0

    async def worker(i: int) -> None:
        nonlocal inside
        for _ in range(30):
            try:
                async with asyncio.timeout(rng.choice([0, 0, 0.0005, 0.001, 0.003])):
                    await obj.acquire()
            except TimeoutError:
                continue
            inside += 1
            assert inside == 1
            for _ in range(rng.randrange(3)):
                await asyncio.sleep(0)
            inside -= 1
            obj.release()

    try:
        await soon(asyncio.gather(*(worker(i) for i in range(6))), seconds=60)
        await assert_free(obj)
    finally:
        obj.close()


# ---------------------------------------------------------------------------------------
# Threads and loops in several threads
# ---------------------------------------------------------------------------------------


class Counter:
    """A read-yield-write increment that loses counts unless it is mutually exclusive."""

    def __init__(self, limit: int = 1) -> None:
        self.count = 0
        self.inside = 0
        self.most = 0
        self.limit = limit
        self.guard = threading.Lock()

    def enter(self) -> None:
        with self.guard:
            self.inside += 1
            self.most = max(self.most, self.inside)
            assert self.inside <= self.limit, f"{self.inside} inside"

    def leave(self) -> None:
        with self.guard:
            self.inside -= 1


def blocking_worker(obj: Primitive, counter: Counter, rounds: int) -> None:
    for _ in range(rounds):
        assert obj.acquire_blocking(timeout=SOON)
        counter.enter()
        value = counter.count
        os.sched_yield()
        counter.count = value + 1
        counter.leave()
        obj.release()


async def loop_worker(obj: Primitive, counter: Counter, rounds: int) -> None:
    for _ in range(rounds):
        async with obj:
            counter.enter()
            value = counter.count
            await asyncio.sleep(0)
            counter.count = value + 1
            counter.leave()


def run_threads(targets: list[Callable[[], object]]) -> None:
    errors: list[BaseException] = []

    def run(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread hangs"
    if errors:
        raise errors[0]


def test_blocking_twins_in_several_threads() -> None:
    lock = Lock()
    counter = Counter()
    try:
        run_threads([lambda: blocking_worker(lock, counter, 300) for _ in range(4)])
        assert counter.count == 1200
        assert not lock.locked()
    finally:
        lock.close()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_loops_in_several_threads_and_blocking_twins(cls: type[Primitive], kind: str) -> None:
    obj = cls()
    counter = Counter()
    rounds = 150

    def one_loop(kind: str) -> None:
        async def tasks() -> None:
            await asyncio.gather(*(loop_worker(obj, counter, rounds) for _ in range(3)))

        loop = new_loop(kind)
        try:
            loop.run_until_complete(tasks())
        finally:
            loop.close()

    try:
        run_threads(
            [
                lambda: one_loop(kind),
                lambda: one_loop("uvloop" if kind == "asyncio" else "asyncio"),
                lambda: blocking_worker(obj, counter, rounds),
            ]
        )
        assert counter.count == 7 * rounds
        assert not obj.locked()
    finally:
        obj.close()


def test_semaphore_k_inside_across_threads(kind: str) -> None:
    sem = Semaphore(3)
    counter = Counter(limit=3)
    done = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal done
        for _ in range(200):
            assert sem.acquire_blocking(timeout=SOON)
            counter.enter()
            os.sched_yield()
            counter.leave()
            with guard:
                done += 1
            sem.release()

    async def loop_work() -> None:
        nonlocal done
        for _ in range(200):
            async with sem:
                counter.enter()
                await asyncio.sleep(0)
                counter.leave()
                with guard:
                    done += 1

    try:
        run_threads([work, work, work, lambda: run_on(kind, loop_work())])
        assert done == 800
        assert sem.value == 3
    finally:
        sem.close()


def test_a_later_asyncio_run_and_another_thread(kind: str) -> None:
    lock = Lock()
    try:

        async def hold_and_wait() -> None:
            await lock.acquire()
            lock.release()

        run_on(kind, hold_and_wait())
        run_on(kind, hold_and_wait())  # a second loop later
        lock.acquire_nowait()
        results: list[bool] = []
        thread = threading.Thread(target=lambda: results.append(run_on(kind, lock.acquire())))
        thread.start()
        thread.join(0.1)
        assert thread.is_alive()  # it waits in its own loop
        lock.release()
        thread.join(SOON)
        assert not thread.is_alive()
        assert results == [True]
        lock.release()
    finally:
        lock.close()
