"""The C half of the wait core (aiosync/_waitc.c): built, per interpreter, and strict.

Its behaviour is the wait core's and the primitives', tested through them
(test_waitqueue.py, test_barrier_*.py, test_completion*.py, test_group.py); here only
what is the extension's own. (Its -Werror compile is in test_seqc.py, beside _seqc's.)
"""

from __future__ import annotations

import asyncio
import importlib.util
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest

from aiosync import Barrier, ClosedResourceError, Completion, Role, _waitc, _waitq


def test_extension_is_built() -> None:
    assert Path(_waitc.__file__).suffix == ".so"
    assert issubclass(_waitq.WaitQueue, _waitc.Core)
    assert issubclass(Barrier, _waitc.BarrierCore)


def test_each_module_object_has_its_own_types() -> None:
    # Multi-phase initialisation, heap types, module state: loading the extension again
    # makes a second, independent module (as each subinterpreter gets).
    spec = importlib.util.spec_from_file_location("aiosync._waitc", _waitc.__file__)
    assert spec is not None
    assert spec.loader is not None
    other: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other is not _waitc
    for name in ("Waiter", "LoopSlot", "Core", "BarrierCore"):
        assert getattr(other, name) is not getattr(_waitc, name)
    # A Core of one module is not a WaitQueue to the other's LoopSlot.
    with pytest.raises(TypeError, match="WaitQueue"):
        other.LoopSlot(_waitc.Core(), None, False)


async def test_a_waiter_is_handed_its_result_once() -> None:
    loop = asyncio.get_running_loop()
    queue: Any = _waitc.Core()
    queue.lock = None
    slot = _waitc.LoopSlot(queue, loop, False)
    waiter = _waitc.Waiter(loop.create_future(), 0, slot)
    slot.waiters.append(waiter)
    slot.live = queue.waiting = 1
    assert queue.first(slot) is waiter
    assert queue.pending(slot) == [waiter]
    waiter.release(True)
    assert waiter.state == _waitc.RELEASED
    assert (slot.live, queue.waiting) == (0, 0)
    assert await waiter.future is True
    assert queue.pending(slot) == []


def test_fields_refuse_the_wrong_types() -> None:
    waitc: Any = _waitc  # wrong on purpose: the stub's types would refuse them
    queue: Any = _waitc.Core()
    with pytest.raises(TypeError, match="WaitQueue"):
        waitc.LoopSlot(object(), None, False)
    slot: Any = waitc.LoopSlot(queue, None, False)
    with pytest.raises(TypeError, match="LoopSlot"):
        waitc.Waiter(None, 0, object())
    with pytest.raises(TypeError, match="deque"):
        slot.waiters = []
    with pytest.raises(TypeError, match="Waiter"):
        slot.woken = object()
    with pytest.raises(TypeError, match="LoopSlot"):
        queue.first(object())
    with pytest.raises(TypeError, match="weakref"):
        queue._owner = object()
    waiter: Any = waitc.Waiter(None, 0, slot)
    with pytest.raises(ValueError, match="PENDING"):
        waiter.state = 7
    barrier: Any = _waitc.BarrierCore()
    with pytest.raises(TypeError, match="WaitQueue"):
        barrier._waitq = object()


def test_dispatch_of_a_dropped_primitive_removes_its_reader() -> None:
    # A primitive finalized without close() (its __del__ closes it, so this is only a
    # guard): the reader callback removes its own registration and does nothing else.
    removed: list[int] = []

    class Loop:
        def remove_reader(self, fd: int) -> bool:
            removed.append(fd)
            return True

    barrier = Barrier()
    barrier.set_role(Role.PARENT)
    queue = barrier._waitq
    slot: Any = _waitc.LoopSlot(queue, Loop(), False)  # type: ignore[arg-type]

    class Gone:
        pass

    dead = weakref.ref(Gone())
    _waitc.dispatch(dead, slot, 5)
    assert removed == [5]
    barrier.close()


async def test_completion_waits_still_go_through_the_c_core() -> None:
    with Completion() as c:
        task = asyncio.create_task(c.wait())
        await asyncio.sleep(0)
        assert c._waitq.waiting == 1
        c.complete()
        await asyncio.wait_for(task, 10)
        assert c._waitq.waiting == 0


async def test_a_wait_closed_or_thrown_into_abandons_its_waiter() -> None:
    # What a coroutine closed while it waits (say its loop is dropped), or one a
    # cancellation is thrown into, leaves behind: nothing.
    with Completion() as c:
        queue = c._waitq
        for how in ("close", "throw", "throw-after-start"):
            with queue.lock:
                waiter = queue.park(None)
            assert queue.waiting == 1
            wait: Any = queue.wait(waiter)
            if how == "close":
                wait.close()
            elif how == "throw":
                with pytest.raises(asyncio.CancelledError):
                    wait.throw(asyncio.CancelledError())
            else:
                assert wait.send(None) is waiter.future  # what the task then awaits
                with pytest.raises(asyncio.CancelledError):
                    wait.throw(asyncio.CancelledError())
            assert waiter.state == _waitc.ABANDONED
            assert queue.waiting == 0
            wait.close()  # again: nothing more to abandon
            assert queue.waiting == 0


async def test_a_finished_wait_cannot_be_awaited_again() -> None:
    with Completion() as c:
        queue = c._waitq
        with queue.lock:
            waiter = queue.park(None)
        wait = queue.wait(waiter)
        waiter.release(c._ring_all)
        assert await wait is c._ring_all
        with pytest.raises(RuntimeError, match="reuse"):
            await wait
        assert waiter.state == _waitc.RELEASED


def test_the_queue_lock_is_reentrant_and_owned() -> None:
    lock = _waitc.RLock()
    assert not lock._is_owned()
    with lock, lock:  # re-entrant, as a pending task's cleanup under the lock needs
        assert lock._is_owned()
        owned_elsewhere: list[bool] = []
        thread = threading.Thread(target=lambda: owned_elsewhere.append(lock._is_owned()))
        thread.start()
        thread.join()
        assert owned_elsewhere == [False]
    assert not lock._is_owned()
    with pytest.raises(RuntimeError, match="un-acquired"):
        lock.release()


def test_the_queue_lock_excludes_other_threads() -> None:
    lock = _waitc.RLock()
    got = threading.Event()
    lock.acquire()

    def take() -> None:
        with lock:
            got.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert not got.wait(0.2)  # blocked while this thread holds it
    lock.release()
    assert got.wait(10)
    thread.join()


async def test_a_gather_wakes_its_task_once_every_share_is_resolved() -> None:
    gather = _waitc.Gather()
    shares = [gather.share() for _ in range(3)]
    woken = gather.arm()
    shares[0].set_result(True)
    shares[2].set_result(False)
    assert not woken.done()
    shares[1].set_result(True)
    assert woken.done()
    assert [s.result() for s in shares] == [True, True, False]
    with pytest.raises(RuntimeError, match="resolved already"):
        shares[1].set_result(False)


async def test_a_gather_wakes_at_the_first_share_or_the_first_failure() -> None:
    first = _waitc.Gather(True)
    a, b = first.share(), first.share()
    woken = first.arm()
    b.set_result(True)
    assert woken.done()
    assert b.done()
    assert not a.done()
    with pytest.raises(RuntimeError, match="not resolved"):
        a.result()
    every = _waitc.Gather()
    c, d = every.share(), every.share()
    woken = every.arm()
    d.set_exception(ClosedResourceError("closed meanwhile"))
    assert woken.done()  # a failure wakes at once
    assert not c.done()
    with pytest.raises(ClosedResourceError, match="meanwhile"):
        d.result()


async def test_a_gather_armed_after_its_wake_is_done_at_once() -> None:
    # The group arms only once it has nothing left to do but wait: shares released
    # before that (by its own abort, say, or while its task was running) must not
    # leave it waiting for ever, and must wake it only once.
    every = _waitc.Gather()
    a, b = every.share(), every.share()
    a.set_result(True)
    b.set_result(False)
    assert every.arm().done()
    assert not every.arm().done()  # that wake is spent
    first = _waitc.Gather(True)
    c, d = first.share(), first.share()
    woken = first.arm()
    assert not woken.done()
    c.set_result(True)
    assert woken.done()
    d.set_result(True)  # after the task was woken, before it armed again
    assert first.arm().done()


async def test_every_share_is_dead_once_the_gathers_task_stops_waiting() -> None:
    # A cancelled group wait: its members' waiters must not be handed anything, as a
    # cancelled waiter's own future is done (the wait core skips and settles them).
    gather = _waitc.Gather()
    share = gather.share()
    gather.arm().cancel()
    assert share.done()
