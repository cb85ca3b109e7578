"""The Barrier as an asyncio citizen: cancellation, timeouts, many waiters, many loops, misuse.

Most tests here are about one process's tasks and loops, so the peer is in the same
process: `pair()` gives the two sides over the same fds (the CHILD side holds
duplicates), which behave exactly as two processes would, and let a test order every
step without a hand-shake. "The peer exits" is then the CHILD side's ``close()``.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import pytest
from support import (
    LOOP_KINDS,
    SOON,
    assert_blocks,
    cancel,
    finish_now,
    loop_kind,
    pair,
    parked,
    run_on,
    soon,
    until,
)

from aiosync import Barrier, ClosedResourceError, Role


def state(b: Barrier) -> str:
    return repr(b).split(" ", 2)[2].rstrip(">")  # "barriers=N aborted=X"


# ---------------------------------------------------------------------------------------
# Cancellation and timeouts lose nothing
# ---------------------------------------------------------------------------------------


async def test_cancelled_sync_keeps_what_it_read(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    assert p.place()
    assert c.place()
    task = asyncio.create_task(p.sync())
    await until(lambda: state(p) == "barriers=1 aborted=no", "the peer's barrier read")
    assert not task.done()
    await cancel(task)
    assert state(p) == "barriers=1 aborted=no"
    assert p._waitq.waiting == 0
    assert c.place()
    assert await soon(p.sync()) is True
    assert state(p) == "barriers=0 aborted=no"


async def test_cancelled_wait_next_before_any_read(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    task = asyncio.create_task(p.wait_next())
    await parked(p, 1)
    assert c.place()
    assert c.place()
    task.cancel()  # before the loop ever saw the eventfd
    with pytest.raises(asyncio.CancelledError):
        await task
    assert state(p) == "barriers=0 aborted=no"  # not read: still in the eventfd
    assert await soon(p.wait_next()) is True  # and this one reads both
    assert state(p) == "barriers=-2 aborted=no"


async def test_timeout_around_sync(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await p.sync()
    assert state(p) == "barriers=1 aborted=no"
    assert p._waitq.waiting == 0
    assert c.place()
    async with asyncio.timeout(SOON):
        assert await p.sync() is True
    assert await soon(c.sync()) is True
    assert state(p) == state(c) == "barriers=0 aborted=no"


@pytest.mark.parametrize("order", ["released-then-cancelled", "cancelled-then-released"])
async def test_cancel_in_the_iteration_that_releases(
    sides: tuple[Barrier, Barrier], order: str
) -> None:
    """The fd callback releases the waiter and the task is cancelled before it resumes.

    The cancel runs inside the barrier's own fd callback (just after or just before it
    does its work), so both orders are exact on both loops whatever order the loop runs
    callbacks in. Either way the task ends cancelled and the barrier it read stays read.
    """
    p, c = sides
    assert p.place()
    task = asyncio.create_task(p.sync())
    await parked(p, 1)
    on_readable = p._on_readable
    seen: list[bool] = []

    def wrapped(slot: Any, fd: int) -> None:
        if order == "cancelled-then-released":
            seen.append(task.cancel())
        on_readable(slot, fd)
        if order == "released-then-cancelled":
            fut = task._fut_waiter  # type: ignore[attr-defined]
            assert fut is not None
            assert fut.done()
            assert not fut.cancelled()  # it was handed True...
            seen.append(task.cancel())  # ...and is cancelled before it could resume

    p._on_readable = wrapped  # type: ignore[method-assign]
    assert c.place()
    with pytest.raises(asyncio.CancelledError):
        await soon(task)
    assert seen == [True]
    assert state(p) == "barriers=0 aborted=no"  # the barrier was read and applied
    assert p._waitq.waiting == 0
    assert finish_now(p.sync()) is True  # no wait needed: nothing lost
    assert c.place()
    assert await soon(p.wait_next()) is True
    assert state(p) == "barriers=-1 aborted=no"


async def test_cancel_scheduled_next_to_the_fd_event(sides: tuple[Barrier, Barrier]) -> None:
    """Black box: the peer places and a cancel is queued before the loop polls again.

    The standard loop runs the queued cancel before the fd callback, uvloop may not;
    in both orders the task ends cancelled, and the barrier, read then or later, is
    counted exactly once.
    """
    p, c = sides
    assert p.place()
    task = asyncio.create_task(p.sync())
    await parked(p, 1)
    assert c.place()
    asyncio.get_running_loop().call_soon(task.cancel)
    with pytest.raises(asyncio.CancelledError):
        await soon(task)
    assert await soon(p.sync()) is True
    assert state(p) == "barriers=0 aborted=no"


async def test_cancelling_one_waiter_leaves_the_others(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    syncs = [asyncio.create_task(p.sync()) for _ in range(3)]
    abortion = asyncio.create_task(p.wait_abortion())
    await parked(p, 4)
    await cancel(syncs[1])
    assert p._waitq.waiting == 3
    assert c.place()
    assert await soon(syncs[0]) is True
    assert await soon(syncs[2]) is True
    assert not abortion.done()
    await cancel(abortion)
    assert p._waitq.waiting == 0
    abortion = asyncio.create_task(p.wait_abortion())
    await parked(p, 1)
    assert c.abort() is True
    assert await soon(abortion) is True


# ---------------------------------------------------------------------------------------
# Several waits at once
# ---------------------------------------------------------------------------------------


async def test_sync_and_wait_abortion_at_once(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    sync = asyncio.create_task(p.sync())
    abortion = asyncio.create_task(p.wait_abortion())
    await parked(p, 2)
    assert c.place()
    assert await soon(sync) is True
    await assert_blocks(asyncio.shield(abortion))
    c.close()  # the peer "exits"
    assert await soon(abortion) is True


async def test_two_syncs_at_once(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    tasks = [asyncio.create_task(p.sync()), asyncio.create_task(p.sync())]
    await parked(p, 2)
    assert c.place()
    assert await soon(asyncio.gather(*tasks)) == [True, True]
    assert state(p) == "barriers=0 aborted=no"


async def test_wait_next_sync_next_and_sync_at_once(sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides
    assert p.place()
    assert p.place()  # counter 2: sync_next and wait_next need one, sync two
    sync_next = asyncio.create_task(p.sync_next())
    wait_next = asyncio.create_task(p.wait_next())
    sync = asyncio.create_task(p.sync())
    await parked(p, 3)
    assert c.place()
    assert list(await soon(asyncio.gather(sync_next, wait_next))) == [True, True]
    assert not sync.done()
    await parked(p, 1)
    assert c.place()
    assert await soon(sync) is True


async def test_own_abort_releases_syncs_but_not_wait_abortion(
    sides: tuple[Barrier, Barrier],
) -> None:
    p, c = sides
    assert p.place()
    sync = asyncio.create_task(p.sync())
    wait_next = asyncio.create_task(p.wait_next())
    abortion = asyncio.create_task(p.wait_abortion())
    await parked(p, 3)
    assert p.abort() is True
    assert list(await soon(asyncio.gather(sync, wait_next))) == [False, False]
    await assert_blocks(asyncio.shield(abortion))
    assert state(p) == "barriers=1 aborted=i"
    assert c.abort() is True  # it does not know of ours yet
    assert await soon(abortion) is False  # both aborted
    assert state(p) == "barriers=1 aborted=both"


# ---------------------------------------------------------------------------------------
# Several loops
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("second", LOOP_KINDS)
def test_awaited_from_a_second_loop_after_the_first_closed(kind: str, second: str) -> None:
    p, c = pair()
    try:

        async def first() -> None:
            assert p.place()
            assert c.place()
            assert await soon(p.sync()) is True
            # The registration outlives the wait (it is dropped lazily).
            assert [s.registered for s in p._waitq._slots.values()] == [True]

        async def then() -> None:
            assert p.place()
            task = asyncio.create_task(p.sync())
            await parked(p, 1)
            assert c.place()
            assert await soon(task) is True
            abortion = asyncio.create_task(p.wait_abortion())
            await parked(p, 1)
            c.close()
            assert await soon(abortion) is True

        run_on(kind, first())
        run_on(second, then())
        assert len(p._waitq._slots) == 1  # the closed loop was forgotten
    finally:
        c.close()
        p.close()


def test_awaited_from_a_loop_in_another_thread(kind: str) -> None:
    p, c = pair()
    parked_event = threading.Event()
    results: list[object] = []

    async def waiter() -> None:
        task = asyncio.create_task(p.sync())
        await parked(p, 1)
        parked_event.set()
        results.append(await soon(task))

    def thread_main() -> None:
        try:
            run_on(kind, waiter())
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)
            parked_event.set()

    try:
        assert p.place()
        thread = threading.Thread(target=thread_main)
        thread.start()
        assert parked_event.wait(SOON)
        assert c.place()
        thread.join(SOON)
        assert not thread.is_alive()
        assert results == [True]
    finally:
        c.close()
        p.close()


def test_waiters_in_two_loops_in_two_threads(kind: str) -> None:
    """One peer barrier releases a waiter in this thread's loop and one in another's."""
    p, c = pair()
    other_kind = LOOP_KINDS[1 - LOOP_KINDS.index(kind)]
    ready = threading.Event()
    results: list[object] = []

    async def remote() -> None:
        task = asyncio.create_task(p.sync())
        await until(lambda: not task.done() and bool(p._waitq.waiting), "parked")
        ready.set()
        results.append(await soon(task))

    def thread_main() -> None:
        try:
            run_on(other_kind, remote())
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)
            ready.set()

    async def local() -> None:
        assert p.place()
        thread = threading.Thread(target=thread_main)
        thread.start()
        try:
            await asyncio.to_thread(ready.wait, SOON)
            task = asyncio.create_task(p.sync())
            await parked(p, 2)
            assert c.place()
            assert await soon(task) is True
        finally:
            await asyncio.to_thread(thread.join, SOON)
        assert results == [True]

    try:
        run_on(kind, local())
    finally:
        c.close()
        p.close()


def test_close_while_another_threads_loop_waits(kind: str) -> None:
    before = set(os.listdir("/proc/self/fd"))
    p, c = pair()
    parked_event = threading.Event()
    results: list[object] = []

    async def waiter() -> None:
        assert p.place()
        sync = asyncio.create_task(p.sync())
        abortion = asyncio.create_task(p.wait_abortion())
        await parked(p, 2)
        parked_event.set()
        for task in (sync, abortion):
            try:
                await soon(task)
            except ClosedResourceError as exc:
                results.append(type(exc))
        await asyncio.sleep(0)  # the loop runs on after the fds were unregistered
        await asyncio.sleep(0)

    def thread_main() -> None:
        try:
            run_on(kind, waiter())
        except BaseException as exc:  # pragma: no cover - reported below
            results.append(exc)
            parked_event.set()

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:
        assert parked_event.wait(SOON)
        p.close()
        thread.join(SOON)
        assert not thread.is_alive()
        assert results == [ClosedResourceError, ClosedResourceError]
    finally:
        c.close()
        p.close()
    assert set(os.listdir("/proc/self/fd")) == before  # closed after the unregistration


# ---------------------------------------------------------------------------------------
# Misuse
# ---------------------------------------------------------------------------------------


def test_set_role_twice() -> None:
    with Barrier() as b:
        b.set_role(Role.CHILD)
        with pytest.raises(RuntimeError, match="already set"):
            b.set_role(Role.CHILD)
        with pytest.raises(RuntimeError, match="already set"):
            b.set_role(Role.PARENT)
        assert b.role is Role.CHILD


@pytest.mark.parametrize("role", ["PARENT", "parent", 0, None, True])
def test_set_role_with_something_else(role: Any) -> None:
    with Barrier() as b:
        with pytest.raises(TypeError, match=r"Role\.PARENT or Role\.CHILD"):
            b.set_role(role)
        assert b.role is None
        b.set_role(Role.PARENT)  # still possible


WAITS = ["wait_next", "wait_abortion", "sync_next", "sync", "place_and_sync"]
BLOCKING = [f"{name}_blocking" for name in WAITS]


async def test_nothing_before_set_role() -> None:
    with Barrier() as b:
        for name in ("place", "abort", *BLOCKING):
            with pytest.raises(RuntimeError, match="set_role"):
                getattr(b, name)()
        for name in WAITS:
            with pytest.raises(RuntimeError, match="set_role"):
                await getattr(b, name)()
        assert b._waitq.waiting == 0


async def test_nothing_after_close(sides: tuple[Barrier, Barrier]) -> None:
    p, _ = sides
    p.close()
    with pytest.raises(ClosedResourceError):
        p.set_role(Role.PARENT)
    for name in ("place", "abort", *BLOCKING):
        with pytest.raises(ClosedResourceError):
            getattr(p, name)()
    for name in WAITS:
        with pytest.raises(ClosedResourceError):
            await getattr(p, name)()
    with pytest.raises(ClosedResourceError), p:
        pass
    assert repr(p) == "<aiosync.Barrier role=PARENT closed>"


def test_closed_before_set_role() -> None:
    b = Barrier()
    b.close()
    with pytest.raises(ClosedResourceError):
        b.set_role(Role.PARENT)
    with pytest.raises(ClosedResourceError):
        b.place()
    assert repr(b) == "<aiosync.Barrier role=unset closed>"


def test_close_is_idempotent_and_with_closes() -> None:
    before = set(os.listdir("/proc/self/fd"))
    with Barrier() as b:
        assert b.role is None
        b.set_role(Role.PARENT)
        assert b.place()
    assert repr(b) == "<aiosync.Barrier role=PARENT closed>"
    b.close()
    b.close()
    with pytest.raises(ValueError, match="inside"), Barrier() as b2:
        raise ValueError("inside")
    assert repr(b2) == "<aiosync.Barrier role=unset closed>"
    assert set(os.listdir("/proc/self/fd")) == before


async def test_pending_waits_fail_on_close(sides: tuple[Barrier, Barrier]) -> None:
    p, _ = sides
    assert p.place()
    tasks = [asyncio.create_task(p.sync()), asyncio.create_task(p.wait_abortion())]
    await parked(p, 2)
    p.close()
    for task in tasks:
        with pytest.raises(ClosedResourceError, match="closed while waiting"):
            await soon(task)


async def test_blocking_twin_inside_a_running_loop(sides: tuple[Barrier, Barrier]) -> None:
    p, _ = sides
    assert p.place()
    for name in BLOCKING:
        with pytest.raises(RuntimeError, match="would block the running event loop"):
            getattr(p, name)(timeout=0)
    assert loop_kind() in LOOP_KINDS


@pytest.mark.parametrize("name", ["sync_blocking", "wait_next_blocking", "wait_abortion_blocking"])
def test_close_while_another_thread_blocks(name: str) -> None:
    """A blocking twin in another thread fails with ClosedResourceError, not a bad fd.

    Closing does not interrupt the thread's poll(); the peer's next move does. Whether
    the close lands before the twin starts or while it polls, the outcome is the same.
    """
    p, c = pair()
    results: list[object] = []

    def blocked() -> None:
        try:
            results.append(getattr(p, name)(timeout=SOON))
        except Exception as exc:
            results.append(exc)

    try:
        assert p.place()
        thread = threading.Thread(target=blocked)
        thread.start()
        p.close()
        assert c.place()  # wakes the poll, if it is in one
        assert c.abort() is True
        thread.join(SOON)
        assert not thread.is_alive()
        assert len(results) == 1
        assert isinstance(results[0], ClosedResourceError), results
    finally:
        c.close()
        p.close()
