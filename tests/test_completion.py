"""Completion semantics within one process (docs/completion.md, design §3), both loops."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest
from support import BLOCKS, SOON, assert_blocks, run_on, soon

from aiosync import ClosedResourceError, Completion


def finishes_at_once(coro: Any) -> None:
    """Assert that `coro` returns without suspending (no loop round trip)."""
    with pytest.raises(StopIteration):
        coro.send(None)


async def test_complete_before_wait_returns_at_once() -> None:
    with Completion() as c:
        c.complete()
        finishes_at_once(c.wait())
        assert not c.try_wait()  # that one was taken


async def test_wait_blocks_until_complete() -> None:
    with Completion() as c:
        task = await assert_blocks(c.wait())
        c.complete()
        await soon(task)
        assert not c.done()


async def test_each_complete_releases_exactly_one_waiter_oldest_first() -> None:
    with Completion() as c:
        tasks = [asyncio.create_task(c.wait(), name=str(n)) for n in range(5)]
        await asyncio.sleep(0)  # every task parks, in creation order
        order = []
        for _ in range(5):
            c.complete()
            done, _ = await soon(asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED))
            assert len(done) == 1
            (task,) = done
            order.append(task.get_name())
            tasks.remove(task)
        assert order == ["0", "1", "2", "3", "4"]
        assert not c.done()


async def test_complete_all_releases_10000_waiters_and_every_later_wait() -> None:
    with Completion() as c:
        c.complete()  # a pending count is not taken while all are done
        tasks = [asyncio.create_task(c.wait()) for _ in range(10_000)]
        await asyncio.sleep(0)
        c.complete_all()
        await soon(asyncio.gather(*tasks))
        finishes_at_once(c.wait())
        assert c.try_wait()
        assert c.done()
        assert repr(c) == "<aiosync.Completion all_done>"
        c.reinit()
        assert not c.done()
        assert not c.try_wait()  # reinit dropped the pending count too


async def test_reinit_drops_pending_completions() -> None:
    with Completion() as c:
        for _ in range(3):
            c.complete()
        assert repr(c) == "<aiosync.Completion available=3 waiting=0>"
        c.reinit()
        assert not c.done()
        await assert_blocks(c.wait(), seconds=0.05)  # cancelled by assert_blocks' caller


async def test_reinit_with_a_waiter_of_this_process_raises() -> None:
    with Completion() as c:
        task = await assert_blocks(c.wait())
        with pytest.raises(RuntimeError, match="reinit"):
            c.reinit()
        c.complete()
        await soon(task)


async def test_reinit_while_a_woken_waiter_has_not_run_raises() -> None:
    # Woken for its turn, the waiter is no longer parked but has not taken its count
    # yet: it still waits, and reinit() must not drop the count from under it.
    with Completion() as c:
        task = await assert_blocks(c.wait())
        refused: list[BaseException] = []
        on_readable = c._on_readable

        def ring_then_reinit(slot: Any, fd: int) -> None:
            on_readable(slot, fd)
            try:
                c.reinit()
            except RuntimeError as exc:
                refused.append(exc)

        c._on_readable = ring_then_reinit  # type: ignore[method-assign]
        c.complete()
        await soon(task)
        assert refused
        assert all("reinit" in str(exc) for exc in refused)


async def test_try_wait_takes_and_done_does_not() -> None:
    with Completion() as c:
        assert not c.try_wait()
        assert not c.done()
        c.complete()
        c.complete()
        assert c.done()
        assert c.done()  # never consumes
        assert c.try_wait()
        assert c.try_wait()
        assert not c.try_wait()
        assert not c.done()


async def test_complete_from_another_thread() -> None:
    with Completion() as c:
        task = await assert_blocks(c.wait())
        thread = threading.Thread(target=c.complete)
        thread.start()
        await soon(task)
        thread.join()


async def test_complete_from_a_signal_handler() -> None:
    with Completion() as c:
        previous = signal.signal(signal.SIGUSR1, lambda signum, frame: c.complete())
        try:
            task = await assert_blocks(c.wait())
            os.kill(os.getpid(), signal.SIGUSR1)
            await soon(task)
        finally:
            signal.signal(signal.SIGUSR1, previous)


def test_wait_blocking() -> None:
    # A passed timeout raises TimeoutError (as asyncio.timeout does), having taken nothing.
    with Completion() as c:
        with pytest.raises(TimeoutError):
            c.wait_blocking(timeout=0.05)
        c.complete()
        assert c.wait_blocking(timeout=0)
        with pytest.raises(TimeoutError):
            c.wait_blocking(timeout=0)
        assert not c.done()
        thread = threading.Timer(0.01, c.complete)
        thread.start()
        assert c.wait_blocking(timeout=30)
        thread.join()
        c.complete_all()
        assert c.wait_blocking()


async def test_wait_blocking_refuses_a_running_loop() -> None:
    with Completion() as c, pytest.raises(RuntimeError, match="block the running event loop"):
        c.wait_blocking(timeout=0)


async def test_cancelled_wait_takes_nothing() -> None:
    with Completion() as c:
        task = await assert_blocks(c.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        c.complete()
        assert c.try_wait()
        assert not c.try_wait()


async def test_timed_out_wait_takes_nothing() -> None:
    with Completion() as c:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await c.wait()
        c.complete()
        assert c.try_wait()


async def test_count_handed_to_a_cancelled_waiter_goes_to_the_next() -> None:
    """The race: a count reached waiter A's future, then A was cancelled before resuming."""
    with Completion() as c:
        a = asyncio.create_task(c.wait())
        b = asyncio.create_task(c.wait())
        await asyncio.sleep(0)
        original: Callable[..., None] = c._on_readable

        def hand_out_then_cancel(*args: Any) -> None:
            original(*args)  # hands the count to A (oldest first) ...
            a.cancel()  # ... and A is cancelled before it resumes

        c._on_readable = hand_out_then_cancel  # type: ignore[method-assign,assignment]
        c.complete()
        with pytest.raises(asyncio.CancelledError):
            await soon(a)
        del c._on_readable
        await soon(b)  # the count came back and went to B
        assert not c.try_wait()  # exactly one count existed


async def test_cancelling_one_waiter_leaves_the_others_alone() -> None:
    with Completion() as c:
        tasks = [asyncio.create_task(c.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()
        c.complete()
        c.complete()
        await soon(asyncio.gather(tasks[0], tasks[2]))
        assert tasks[1].cancelled()
        assert not c.try_wait()


async def test_close_fails_pending_waiters_and_later_use() -> None:
    c = Completion()
    task = await assert_blocks(c.wait())
    c.close()
    with pytest.raises(ClosedResourceError):
        await soon(task)
    c.close()  # idempotent
    for call in (c.complete, c.complete_all, c.try_wait, c.done, c.reinit):
        with pytest.raises(ClosedResourceError):
            call()
    with pytest.raises(ClosedResourceError):
        await c.wait()
    with pytest.raises(ClosedResourceError):
        c.wait_blocking(timeout=0)
    with pytest.raises(ClosedResourceError), c:
        pass
    assert repr(c) == "<aiosync.Completion closed>"


def test_dropped_unclosed_completion_warns_and_closes(fd_count: Callable[[], int]) -> None:
    before = fd_count()

    def create_and_drop() -> None:
        c = Completion()
        assert fd_count() == before + 2
        c.complete()

    with pytest.warns(ResourceWarning, match="unclosed"):
        create_and_drop()
    gc.collect()
    assert fd_count() == before


def test_no_fd_leak_over_10000_cycles(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for _ in range(10_000):
        with Completion() as c:
            c.complete()
    assert fd_count() == before


async def test_no_fd_leak_with_registrations(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for _ in range(200):
        with Completion() as c:
            task = asyncio.create_task(c.wait())
            await asyncio.sleep(0)
            c.complete()
            await task
    assert fd_count() == before


def test_awaited_from_a_later_asyncio_run_and_another_thread(kind: str) -> None:
    with Completion() as c:

        async def one_wait() -> None:
            waiter = asyncio.create_task(c.wait())
            await asyncio.sleep(0)
            c.complete()
            await soon(waiter)

        run_on(kind, one_wait())
        run_on(kind, one_wait())  # a second loop; the first one is closed
        errors: list[BaseException] = []

        def in_thread() -> None:
            try:
                run_on(kind, one_wait())
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=in_thread)
        thread.start()
        thread.join(30)
        assert not errors


def test_waiters_in_two_threads_each_get_one(kind: str) -> None:
    with Completion() as c:
        parked = threading.Barrier(3)
        results: list[str] = []

        async def wait_in_thread(name: str) -> None:
            waiter = asyncio.create_task(c.wait())
            await asyncio.sleep(0)
            await asyncio.to_thread(parked.wait, 30)
            await soon(waiter)
            results.append(name)

        threads = [threading.Thread(target=run_on, args=(kind, wait_in_thread(n))) for n in "ab"]
        for t in threads:
            t.start()
        parked.wait(30)
        c.complete()
        c.complete()
        for t in threads:
            t.join(30)
        assert sorted(results) == ["a", "b"]
        assert not c.try_wait()


def test_close_from_another_thread_ends_wait_blocking() -> None:
    # close() does not end another thread's poll() of the fds it closes: the blocked
    # thread must be woken on purpose (it slept out its whole timeout before).
    c = Completion()
    outcome: list[object] = []

    def block() -> None:
        try:
            outcome.append(c.wait_blocking(timeout=3 * SOON))
        except (ClosedResourceError, TimeoutError) as e:
            outcome.append(e)

    thread = threading.Thread(target=block)
    thread.start()
    thread.join(BLOCKS)
    assert thread.is_alive(), f"wait_blocking() returned without a completion: {outcome}"
    c.close()
    thread.join(SOON)
    assert not thread.is_alive(), "close() did not wake the thread blocked in wait_blocking()"
    assert len(outcome) == 1, outcome
    assert isinstance(outcome[0], ClosedResourceError), outcome
