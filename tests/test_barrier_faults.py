"""Barrier faults: peer death, fd leaks, unclosed barriers, failed eventfd writes.

docs/design.md §7: a peer killed with SIGKILL at any moment resolves every pending await on the
barrier (False; ``wait_abortion()`` True) within 100 ms. Each test here makes the
moment exact: a hand-shake says the waiter is parked, the peer is killed, its death is
confirmed with ``waitid(WNOWAIT)`` (the kernel closed its fds before that returns, and
nothing is reaped), and only then does the 100 ms clock start.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
from support import SOON, Forked, Handshake, loop_kind, run_on, soon

from aiosync import Barrier, ClosedResourceError, Role

DEADLINE = 0.1  # docs/design.md §7: a dead peer's waits resolve within 100 ms
EVENTFD_MAX = 0xFFFF_FFFF_FFFF_FFFE  # the largest value an eventfd counter holds
INT64_MAX = 0x7FFF_FFFF_FFFF_FFFF


def idle_child(b: Barrier, hs: Handshake, *, places: int = 0) -> Callable[[], None]:
    """A CHILD side that places `places` barriers, says so, then waits to be killed."""

    def run() -> None:
        hs.as_child()
        b.set_role(Role.CHILD)
        for _ in range(places):
            assert b.place()
        hs.send("ready")
        hs.recv_blocking("never", seconds=SOON)  # killed long before this times out

    return run


def fork_child(b: Barrier, hs: Handshake, fn: Callable[[], object]) -> Forked:
    proc = Forked(fn)
    hs.as_parent()
    b.set_role(Role.PARENT)
    return proc


async def parked(task: asyncio.Task[object], b: Barrier, waiting: int) -> None:
    """Let `task` run up to its wait and check that `b` has `waiting` waiters parked."""
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()
    assert b._waitq.waiting == waiting


# ---------------------------------------------------------------------------------------
# The child dies while the parent waits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("wait", ["sync", "wait_next", "sync_next", "wait_abortion"])
def test_parent_wait_resolves_when_child_is_killed(kind: str, wait: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs))

    async def parent() -> None:
        await hs.recv("ready")
        if wait in ("sync", "sync_next"):
            assert b.place()
            assert b.place()
        task = asyncio.create_task(getattr(b, wait)())
        await parked(task, b, 1)
        proc.kill_and_confirm()
        async with asyncio.timeout(DEADLINE):
            result = await task
        assert result is (wait == "wait_abortion")
        assert b.they_aborted
        assert not b.i_aborted

    try:
        run_on(kind, parent())
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


def test_several_parent_waits_resolve_when_child_is_killed(kind: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs))

    async def parent() -> None:
        await hs.recv("ready")
        assert b.place()
        tasks = [
            asyncio.create_task(b.sync()),
            asyncio.create_task(b.sync()),
            asyncio.create_task(b.wait_next()),
            asyncio.create_task(b.wait_abortion()),
            asyncio.create_task(b.wait_abortion()),
        ]
        for _ in range(3):
            await asyncio.sleep(0)
        assert b._waitq.waiting == len(tasks)
        proc.kill_and_confirm()
        async with asyncio.timeout(DEADLINE):
            results = await asyncio.gather(*tasks)
        assert results == [False, False, False, True, True]

    try:
        run_on(kind, parent())
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


@pytest.mark.parametrize("wait", ["sync_blocking", "wait_next_blocking", "wait_abortion_blocking"])
def test_blocking_wait_resolves_when_child_is_killed(wait: str) -> None:
    """The blocking twins, in a thread with no loop; another thread kills the child.

    A blocking wait leaves no trace to hand-shake on, so the kill may land just before
    the wait starts or during it; the outcome is the same, and it comes within 100 ms
    of the confirmed death either way.
    """
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs))
    dead_at: list[float] = []

    def killer() -> None:
        proc.kill_and_confirm()
        dead_at.append(time.monotonic())

    try:
        hs.recv_blocking("ready")
        if wait == "sync_blocking":
            assert b.place()
        thread = threading.Thread(target=killer)
        thread.start()
        result = getattr(b, wait)(timeout=SOON)
        returned_at = time.monotonic()
        thread.join(SOON)
        assert result is (wait == "wait_abortion_blocking")
        assert returned_at - dead_at[0] < DEADLINE
        assert b.they_aborted
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


@pytest.mark.parametrize("rounds_before_kill", [0, 1, 7, 50])
def test_kill_at_an_arbitrary_moment_of_a_ping_pong(kind: str, rounds_before_kill: int) -> None:
    """The child is killed from another thread while both sides place_and_sync() flat out.

    The kill lands wherever the exchange happens to be (a wait, a place, between the
    two); whatever it was, the parent's round in progress or its next one returns False
    within 100 ms of the confirmed death, and every round before it returned True.
    """

    def child_main() -> None:
        hs.as_child()
        b.set_role(Role.CHILD)

        async def ping_pong() -> None:
            while await b.place_and_sync():
                pass
            raise AssertionError("the child's barrier aborted before it was killed")

        run_on(kind, ping_pong())

    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, child_main)
    go = threading.Event()
    dead_at: list[float] = []

    def killer() -> None:
        assert go.wait(SOON)
        proc.kill_and_confirm()
        dead_at.append(time.monotonic())

    async def parent() -> tuple[int, float]:
        rounds = 0
        while True:
            if rounds == rounds_before_kill:
                go.set()
            if not await soon(b.place_and_sync()):
                return rounds, time.monotonic()
            rounds += 1

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        rounds, returned_at = run_on(kind, parent())
        thread.join(SOON)
        assert rounds >= rounds_before_kill
        assert returned_at - dead_at[0] < DEADLINE
        assert b.they_aborted
        assert not b.i_aborted
        proc.join(killed=True)
    finally:
        go.set()
        thread.join(SOON)
        proc.reap()
        hs.close()
        b.close()


def test_wait_abortion_after_own_abort_resolves_when_child_is_killed(kind: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs))

    async def parent() -> None:
        await hs.recv("ready")
        assert b.abort() is True
        assert await b.sync() is False  # at once: I aborted
        task = asyncio.create_task(b.wait_abortion())
        await parked(task, b, 1)  # my own abort does not release it
        proc.kill_and_confirm()
        async with asyncio.timeout(DEADLINE):
            assert await task is False  # the peer is gone, but I aborted too
        assert b.both_aborted

    try:
        run_on(kind, parent())
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


# ---------------------------------------------------------------------------------------
# The parent side dies while the child waits
# ---------------------------------------------------------------------------------------


ChildSide = Callable[[Barrier, Handshake], Coroutine[Any, Any, None]]


def kill_parent_side(kind: str, child_side: ChildSide, *, parent_places: int = 0) -> None:
    """Run `child_side` as the CHILD side while a forked PARENT side is killed.

    The PARENT side is a forked process of its own, so that this test can kill it. Both
    sides are forked from here; this process then closes its copies of the fds, so the
    pipe's read end lives only in the PARENT side and its death is the CHILD's POLLERR.
    The PARENT side places `parent_places` barriers and says "ready". `child_side`
    receives "go", sends "waiting" when it wants the PARENT side killed, and then
    receives "parent side dead" (its cue to start a 100 ms clock).
    """
    b = Barrier()
    hs_parent, hs_child = Handshake(), Handshake()

    def parent_main() -> None:
        hs_child.close()  # this process's inherited copies: EOF reaches the test
        hs_parent.as_child()
        b.set_role(Role.PARENT)
        for _ in range(parent_places):
            assert b.place()
        hs_parent.send("ready")
        hs_parent.recv_blocking("never", seconds=SOON)  # killed long before

    def child_main() -> None:
        hs_parent.close()
        hs_child.as_child()
        b.set_role(Role.CHILD)
        run_on(kind, child_side(b, hs_child))

    parent_proc = Forked(parent_main)
    hs_parent.as_parent()
    child_proc = Forked(child_main)
    hs_child.as_parent()
    b.close()  # from here on, only the two sides hold the barrier's fds
    try:

        async def conduct() -> None:
            await hs_parent.recv("ready")
            hs_child.send("go")
            await hs_child.recv("waiting")
            parent_proc.kill_and_confirm()
            hs_child.send("parent side dead")

        run_on(kind, conduct())
        child_proc.join()
        parent_proc.join(killed=True)
    finally:
        child_proc.reap()
        parent_proc.reap()
        hs_parent.close()
        hs_child.close()


@pytest.mark.parametrize("wait", ["sync", "wait_next", "wait_abortion", "all"])
def test_child_wait_resolves_when_parent_side_is_killed(kind: str, wait: str) -> None:
    async def child_side(b: Barrier, hs: Handshake) -> None:
        await hs.recv("go")
        tasks: list[asyncio.Task[bool]] = []
        expected: list[bool] = []
        if wait in ("sync", "all"):
            assert b.place()
            tasks.append(asyncio.create_task(b.sync()))
            expected.append(False)
        if wait in ("wait_next", "all"):
            tasks.append(asyncio.create_task(b.wait_next()))
            expected.append(False)
        if wait in ("wait_abortion", "all"):
            tasks.append(asyncio.create_task(b.wait_abortion()))
            expected.append(True)
        for _ in range(3):
            await asyncio.sleep(0)
        assert b._waitq.waiting == len(tasks)
        assert not any(t.done() for t in tasks)
        hs.send("waiting")
        await hs.recv("parent side dead")
        async with asyncio.timeout(DEADLINE):
            results = await asyncio.gather(*tasks)
        assert results == expected, loop_kind()
        assert b.they_aborted

    kill_parent_side(kind, child_side)


def test_child_side_reads_what_the_killed_parent_side_placed(kind: str) -> None:
    async def child_side(b: Barrier, hs: Handshake) -> None:
        await hs.recv("go")
        hs.send("waiting")
        await hs.recv("parent side dead")
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_next() is True  # its barriers come before its death
        assert repr(b) == "<aiosync.Barrier role=CHILD barriers=-2 aborted=no>"
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_next() is False
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_abortion() is True

    kill_parent_side(kind, child_side, parent_places=2)


def test_child_side_notices_death_after_its_registration_was_dropped(kind: str) -> None:
    """uvloop reports a pipe write end's error once per registration (docs/design.md §8).

    The CHILD side's registration outlives a finished sync(); the PARENT side's death
    fires it while nobody waits, so it is dropped without reading (and the exit is not
    noticed: a sync() that needs no wait still returns True). A later wait registers
    afresh and must see the exit.
    """

    async def child_side(b: Barrier, hs: Handshake) -> None:
        await hs.recv("go")
        assert b.place()
        assert await soon(b.sync()) is True  # reads the PARENT side's one barrier
        assert [s.registered for s in b._waitq._slots.values()] == [True]
        hs.send("waiting")
        await hs.recv("parent side dead")
        for _ in range(3):
            await asyncio.sleep(0)  # the spent registration fires and is dropped
        assert [s.registered for s in b._waitq._slots.values()] == [False]
        assert not b.they_aborted
        assert await b.sync() is True  # no wait needed, so no I/O: exit not noticed
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_abortion() is True
        async with asyncio.timeout(DEADLINE):
            assert await b.sync_next() is False
        assert repr(b) == "<aiosync.Barrier role=CHILD barriers=0 aborted=they>"

    kill_parent_side(kind, child_side, parent_places=1)


# ---------------------------------------------------------------------------------------
# "It is safe to place a barrier and exit"
# ---------------------------------------------------------------------------------------


def test_barrier_placed_before_kill_is_consumed_first(kind: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs, places=1))

    async def parent() -> None:
        await hs.recv("ready")
        proc.kill_and_confirm()
        assert b.place()
        assert await soon(b.sync()) is True  # its barrier comes before its death
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=0 aborted=no>"
        assert await soon(b.wait_next()) is False  # and now the death
        assert b.they_aborted
        assert b.peer_exited
        assert b.peer_pid is None  # forked by hand: nobody told it the pid
        assert await soon(b.wait_abortion()) is True

    try:
        run_on(kind, parent())
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


def test_pending_wait_next_gets_both_barriers_of_a_killed_child(kind: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs, places=2))

    async def parent() -> None:
        await hs.recv("ready")
        # Placed, but not read yet: nobody waited, so nothing was read.
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=0 aborted=no>"
        proc.kill_and_confirm()
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_next() is True
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=-2 aborted=no>"
        async with asyncio.timeout(DEADLINE):
            assert await b.wait_next() is False
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=-2 aborted=they>"

    try:
        run_on(kind, parent())
        proc.join(killed=True)
    finally:
        proc.reap()
        hs.close()
        b.close()


# ---------------------------------------------------------------------------------------
# No fd leaks
# ---------------------------------------------------------------------------------------


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


def test_no_fd_leak_over_10000_create_close_cycles() -> None:
    before = open_fds()
    for i in range(10_000):
        b = Barrier()
        if i % 3 == 1:
            b.set_role(Role.PARENT)
        elif i % 3 == 2:
            b.set_role(Role.CHILD)
        b.close()
        b.close()  # idempotent
    with Barrier():
        pass
    gc.collect()
    assert open_fds() == before


def registered_fds(loop: asyncio.AbstractEventLoop) -> set[int]:
    """The fds with a reader on the standard loop (uvloop does not expose them)."""
    selector = getattr(loop, "_selector", None)
    if selector is None:
        return set()
    return {key.fd for key in selector.get_map().values()}


async def test_no_fd_leak_over_cycles_with_registrations() -> None:
    """create / set_role / wait (registering the fds) / close, a few hundred times.

    Alone in this process, a PARENT side's pipe is hung up at once (its write end was
    closed by set_role), so every wait registers, fires and returns False; closing then
    removes a live registration before the fds close (fd numbers are reused at once, so
    a stale registration would show up, or crash uvloop).
    """
    loop = asyncio.get_running_loop()
    before = open_fds()
    registered_before = registered_fds(loop)
    for i in range(300):
        b = Barrier()
        b.set_role(Role.PARENT if i % 2 else Role.CHILD)
        if i % 4 == 0:
            assert await soon(b.wait_abortion()) is True
        elif i % 4 == 1:
            assert b.place()
            assert await soon(b.sync()) is False
        elif i % 4 == 2:
            task = asyncio.create_task(b.wait_next())
            await asyncio.sleep(0)
            assert b._waitq.waiting == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            task = asyncio.create_task(b.wait_abortion())
            await asyncio.sleep(0)
            b.close()
            with pytest.raises(ClosedResourceError):
                await task
        b.close()
        assert registered_fds(loop) == registered_before
    await asyncio.sleep(0)
    assert open_fds() == before


# ---------------------------------------------------------------------------------------
# Dropped without close()
# ---------------------------------------------------------------------------------------


def drop(holder: list[Barrier]) -> None:
    """Drop the only reference to a barrier, and collect."""
    holder.clear()
    gc.collect()


def test_unclosed_barrier_warns_and_closes_its_fds() -> None:
    before = open_fds()
    b = Barrier()
    b.set_role(Role.PARENT)
    fds = {b._me, b._them, b._pipe_r}
    assert fds <= open_fds()
    holder = [b]
    del b
    with pytest.warns(ResourceWarning, match="unclosed <aiosync.Barrier role=PARENT"):
        drop(holder)
    assert open_fds() == before


async def test_unclosed_barrier_with_a_registration_warns_and_unregisters() -> None:
    loop = asyncio.get_running_loop()
    before = open_fds()
    registered_before = registered_fds(loop)
    b = Barrier()
    b.set_role(Role.PARENT)
    assert b.place()
    assert await soon(b.sync()) is False  # the registration stays (dropped lazily)
    if loop_kind() == "asyncio":
        assert registered_fds(loop) - registered_before == {b._them, b._pipe_r}
    holder = [b]
    del b
    with pytest.warns(ResourceWarning, match="unclosed"):
        drop(holder)
    assert registered_fds(loop) == registered_before
    await asyncio.sleep(0)  # the loop must not trip over the closed fds
    await asyncio.sleep(0)
    assert open_fds() == before


def test_unclosed_unset_barrier_warns() -> None:
    before = open_fds()
    with pytest.warns(ResourceWarning, match="role=unset"):
        drop([Barrier()])
    assert open_fds() == before


# ---------------------------------------------------------------------------------------
# The eventfd write fails
# ---------------------------------------------------------------------------------------


def fill(b: Barrier, value: int) -> None:
    """Add `value` to the eventfd this side writes (white box: only a test can)."""
    os.eventfd_write(b._me, value)


@pytest.mark.parametrize("role", [Role.PARENT, Role.CHILD])
def test_place_fails_when_the_eventfd_is_full(role: Role) -> None:
    with Barrier() as b:
        b.set_role(role)
        fill(b, EVENTFD_MAX - 1)  # room for exactly one more
        assert b.place() is True
        assert repr(b) == f"<aiosync.Barrier role={role.name} barriers=1 aborted=no>"
        assert b.place() is False  # counter + 1 > EVENTFD_MAX: EAGAIN
        assert repr(b) == f"<aiosync.Barrier role={role.name} barriers=1 aborted=both>"
        assert (b.i_aborted, b.they_aborted, b.both_aborted, b.is_aborted) == (True,) * 4
        assert b.place() is False
        assert b.abort() is False  # nothing more to write; they count as aborted


async def test_place_and_sync_fails_when_the_eventfd_is_full() -> None:
    with Barrier() as b:
        b.set_role(Role.PARENT)
        fill(b, EVENTFD_MAX)  # no room at all
        assert await b.place_and_sync() is False  # at once: nothing placed, no wait
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=0 aborted=both>"
        assert b._waitq.waiting == 0


def test_abort_fails_when_the_eventfd_is_nearly_full() -> None:
    with Barrier() as b:
        b.set_role(Role.PARENT)
        fill(b, EVENTFD_MAX - INT64_MAX + 1)  # INT64_MAX no longer fits
        assert b.place() is True
        assert b.abort() is False
        assert repr(b) == "<aiosync.Barrier role=PARENT barriers=1 aborted=both>"


def test_failed_place_releases_pending_waits(kind: str) -> None:
    b, hs = Barrier(), Handshake()
    proc = fork_child(b, hs, idle_child(b, hs))

    async def parent() -> None:
        await hs.recv("ready")
        fill(b, EVENTFD_MAX - 1)
        assert b.place() is True
        tasks = [asyncio.create_task(b.sync()), asyncio.create_task(b.wait_abortion())]
        for _ in range(3):
            await asyncio.sleep(0)
        assert b._waitq.waiting == 2
        assert b.place() is False
        async with asyncio.timeout(DEADLINE):
            # sync: the barrier is aborted; wait_abortion: False, as I "aborted" too.
            assert await asyncio.gather(*tasks) == [False, False]
        assert b.both_aborted
        assert await b.wait_abortion() is False
        assert await b.sync() is False

    try:
        run_on(kind, parent())
    finally:
        proc.reap()
        hs.close()
        b.close()
