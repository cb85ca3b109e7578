"""Barrier conformance: systemd's own test cases and the rules' consequences, across a fork.

The rules: docs/barrier.md.

The first part has one test per case of systemd's ``src/test/test-barrier.c`` (same
names, same assertions, same roles: the CHILD code runs in the forked child, the PARENT
code here). systemd orders the two processes with 20 ms sleeps and proves "this
blocks" with an alarm that kills the process; here the order is an explicit hand-shake
(``hs.send`` / ``hs.recv``) and "this blocks" is `assert_blocks` (a bounded wait),
after which the wait is cancelled and the state checked: nothing lost.

systemd's "the other side exited" is `Barrier.close()` followed by a hand-shake (the
closed side's fds are gone, exactly what the peer sees of an exit), or a real exit
where the test needs nothing after it; `test_pending_exit_real_exit` uses a real exit
and waits for the process to be gone.

Every test runs on both loops (the `kind` fixture). Every side
checks its counter and abort state (`expect_state`: repr and the four properties) after
each step that could change them.
"""

from __future__ import annotations

import asyncio

import pytest
from support import (
    BLOCKS,
    SOON,
    Handshake,
    assert_blocks,
    cancel,
    exited,
    expect_state,
    finish_now,
    run_pair,
    run_with_blocking_child,
    soon,
)

from aiosync import Barrier, ClosedResourceError, Role

# ---------------------------------------------------------------------------------------
# systemd's 16 cases
# ---------------------------------------------------------------------------------------


def test_sync(kind: str) -> None:
    """Both place and sync; the parent exits right after, and its pending hang-up does
    not overwrite the barrier it placed before: the child's sync still succeeds."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        await hs.recv("parent synced and exited")
        assert await soon(b.sync())  # the eventfd is read before the hang-up
        expect_state(b, 0)

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert await soon(b.sync())
        expect_state(b, 0)
        b.close()
        hs.send("parent synced and exited")

    run_pair(kind, parent, child)


def test_wait_next(kind: str) -> None:
    """wait_next succeeds on a barrier placed before the call (not read yet)."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed")
        assert await soon(b.wait_next())
        expect_state(b, -1)
        assert b.place()
        assert finish_now(b.sync())
        expect_state(b, 0)

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        hs.send("placed")
        assert await soon(b.sync())
        expect_state(b, 0)

    run_pair(kind, parent, child)


def test_wait_next_twice(kind: str) -> None:
    """One wait_next reads both barriers the parent placed; the second one stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed twice")
        assert await soon(b.wait_next())
        expect_state(b, -2)
        await cancel(await assert_blocks(b.wait_next()))
        expect_state(b, -2)
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        hs.send("placed twice")
        await hs.recv("done")
        expect_state(b, 2)

    run_pair(kind, parent, child)


def test_wait_next_twice_local(kind: str) -> None:
    """Local barriers between the two waits change nothing: the second one stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed twice")
        assert await soon(b.wait_next())
        assert b.place()
        assert b.place()
        expect_state(b, 0)
        await cancel(await assert_blocks(b.wait_next()))
        expect_state(b, 0)
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        hs.send("placed twice")
        await hs.recv("done")
        expect_state(b, 2)

    run_pair(kind, parent, child)


def test_wait_next_twice_sync(kind: str) -> None:
    """After wait_next took both barriers, sync_next needs no wait: it returns True at
    once, without I/O, and so does not notice that the parent already exited."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed twice and exited")
        assert await soon(b.wait_next())  # the barriers come before the hang-up
        expect_state(b, -2)
        assert finish_now(b.sync_next())
        expect_state(b, -2)

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        b.close()
        hs.send("placed twice and exited")

    run_pair(kind, parent, child)


def test_wait_next_twice_local_sync(kind: str) -> None:
    """As wait_next_twice_sync, with two local barriers: the sides are level, so
    sync_next returns True at once."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed twice and exited")
        assert await soon(b.wait_next())
        assert b.place()
        assert b.place()
        expect_state(b, 0)
        assert finish_now(b.sync_next())
        expect_state(b, 0)

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        b.close()
        hs.send("placed twice and exited")

    run_pair(kind, parent, child)


def test_sync_next(kind: str) -> None:
    """sync_next / sync when the local side is level, ahead by two, then by one."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert finish_now(b.sync_next())  # level: nothing to wait for
        assert finish_now(b.sync())
        assert b.place()
        assert b.place()
        waiting = await assert_blocks(b.sync_next())  # for the parent's 1st barrier
        hs.send("child ahead by two")
        assert await soon(waiting)
        expect_state(b, 1)
        waiting = await assert_blocks(b.sync_next())  # for the parent's 2nd barrier
        hs.send("child ahead by one")
        assert await soon(waiting)
        expect_state(b, 0)
        assert finish_now(b.sync())

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("child ahead by two")
        assert b.place()
        await hs.recv("child ahead by one")
        assert b.place()
        assert await soon(b.sync())
        expect_state(b, 0)

    run_pair(kind, parent, child)


def test_sync_next_local(kind: str) -> None:
    """A local barrier the parent never matches: sync_next stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        await cancel(await assert_blocks(b.sync_next()))
        expect_state(b, 1)
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("done")
        expect_state(b, 0)

    run_pair(kind, parent, child)


def test_sync_next_local_abort(kind: str) -> None:
    """As sync_next_local, but the parent aborts: the stalled sync_next returns False."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        waiting = await assert_blocks(b.sync_next())
        hs.send("waiting")
        assert await soon(waiting) is False
        expect_state(b, 1, "they")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")
        assert b.abort()
        expect_state(b, 0, "i")

    run_pair(kind, parent, child)


def test_wait_abortion(kind: str) -> None:
    """wait_abortion returns True when the parent aborts."""

    async def child(b: Barrier, hs: Handshake) -> None:
        waiting = await assert_blocks(b.wait_abortion())
        hs.send("waiting")
        assert await soon(waiting) is True
        expect_state(b, 0, "they")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")
        assert b.abort()
        expect_state(b, 0, "i")

    run_pair(kind, parent, child)


def test_wait_abortion_unmatched(kind: str) -> None:
    """No abort on the other side: wait_abortion stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await cancel(await assert_blocks(b.wait_abortion()))
        expect_state(b, 0)
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("done")
        expect_state(b, 0)

    run_pair(kind, parent, child)


def test_wait_abortion_local(kind: str) -> None:
    """Both abort: wait_abortion returns (False: this side aborted too)."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.abort()
        expect_state(b, 0, "i")
        waiting = await assert_blocks(b.wait_abortion())  # my own abort is not theirs
        hs.send("child aborted and waits")
        assert await soon(waiting) is False
        expect_state(b, 0, "both")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("child aborted and waits")
        assert b.abort()  # True: this side has read nothing, so knows of no abort
        expect_state(b, 0, "i")
        assert await soon(b.wait_abortion()) is False  # reads the child's abort
        expect_state(b, 0, "both")

    run_pair(kind, parent, child)


def test_wait_abortion_local_unmatched(kind: str) -> None:
    """Only the local side aborts: its wait_abortion stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.abort()
        await cancel(await assert_blocks(b.wait_abortion()))
        expect_state(b, 0, "i")
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("done")
        expect_state(b, 0)

    run_pair(kind, parent, child)


def test_exit(kind: str) -> None:
    """The child just exits (for real): an implicit abort that wakes the parent's sync."""

    async def child(b: Barrier, hs: Handshake) -> None:
        pass

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert await soon(b.sync()) is False
        expect_state(b, 1, "they")

    run_pair(kind, parent, child)


def test_no_exit(kind: str) -> None:
    """As exit, but the child stays: the parent's sync stalls."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        await cancel(await assert_blocks(b.sync()))
        expect_state(b, 1)
        hs.send("done")

    run_pair(kind, parent, child)


async def pending_exit_steps(b: Barrier) -> None:
    """The reading side of systemd's pending_exit, once the peer placed one and exited.

    The peer's barrier comes before its exit; the sides stay level while this side
    places one; only when this side is ahead does a wait read the hang-up.
    """
    assert await soon(b.wait_next())
    expect_state(b, -1)
    assert finish_now(b.sync_next())
    assert b.place()
    expect_state(b, 0)
    assert finish_now(b.sync_next())
    assert b.place()
    expect_state(b, 1)
    assert await soon(b.sync_next()) is False
    expect_state(b, 1, "they")


def test_pending_exit(kind: str) -> None:
    """The parent places a barrier and exits; both are pending when the child reads."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed and exited")
        await pending_exit_steps(b)

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        b.close()
        hs.send("placed and exited")

    run_pair(kind, parent, child)


def test_pending_exit_real_exit(kind: str) -> None:
    """pending_exit with the roles swapped and a real process exit: the child places one
    and exits; the parent reads once the child is gone (a hang-up, not an error, on the
    parent's end of the pipe)."""

    def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        await exited(pid)
        await pending_exit_steps(b)

    run_with_blocking_child(kind, parent, child)


# ---------------------------------------------------------------------------------------
# The rules' consequences (docs/barrier.md), each worth a test
# ---------------------------------------------------------------------------------------


def test_sync_does_no_io_and_misses_an_exit(kind: str) -> None:
    """sync / sync_next that need no wait return True without reading, so they do not
    notice that the peer is gone; the first wait that must read does."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("placed twice and exited")
        for _ in range(2):
            assert finish_now(b.sync())
            assert finish_now(b.sync_next())
        expect_state(b, 0)  # nothing read: the peer's barriers and exit are unseen
        assert await soon(b.wait_next())
        expect_state(b, -2)
        assert finish_now(b.sync())
        assert b.place()
        assert b.place()
        assert finish_now(b.sync())  # level again
        expect_state(b, 0)
        assert b.place()
        assert await soon(b.sync()) is False  # now it reads: the hang-up
        expect_state(b, 1, "they")
        assert b.place() is False

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        b.close()
        hs.send("placed twice and exited")

    run_pair(kind, parent, child)


def test_wait_next_before_the_peer_places(kind: str) -> None:
    """wait_next blocks until the peer's next barrier however far ahead this side is,
    and one read consumes every barrier the peer placed by then."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.place()
        waiting = await assert_blocks(b.wait_next())
        hs.send("waiting")
        assert await soon(waiting)
        expect_state(b, 1)
        hs.send("got one")
        await hs.recv("placed twice more")
        assert await soon(b.wait_next())  # both at once
        expect_state(b, -1)
        assert finish_now(b.sync())
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")
        assert b.place()
        await hs.recv("got one")
        assert b.place()
        assert b.place()
        hs.send("placed twice more")
        await hs.recv("done")
        expect_state(b, 3)

    run_pair(kind, parent, child)


def test_own_abort_never_releases_wait_abortion(kind: str) -> None:
    """My abort releases my pending sync() (with False) but not my wait_abortion(),
    which returns only when the peer aborts (False: I aborted too). An abort wipes the
    barriers placed before it: the peer's counter does not move."""

    async def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        syncing = await assert_blocks(b.sync())
        waiting = await assert_blocks(b.wait_abortion())
        assert b.abort()
        assert await soon(syncing) is False
        done, _ = await asyncio.wait({waiting}, timeout=BLOCKS)
        assert not done
        expect_state(b, 1, "i")
        hs.send("aborted")
        assert await soon(waiting) is False
        expect_state(b, 1, "both")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("aborted")
        assert await soon(b.wait_abortion()) is True
        expect_state(b, 0, "they")  # the child's barrier went with its abort
        assert b.abort() is False  # they aborted first
        expect_state(b, 0, "both")

    run_pair(kind, parent, child)


def test_peer_exit_releases_wait_abortion_with_true(kind: str) -> None:
    """A plain exit of the parent (no abort) releases the child's wait_abortion: True."""

    async def child(b: Barrier, hs: Handshake) -> None:
        waiting = await assert_blocks(b.wait_abortion())
        hs.send("waiting")
        assert await soon(waiting) is True
        expect_state(b, 0, "they")
        assert b.place() is False
        assert finish_now(b.sync()) is False
        assert finish_now(b.wait_abortion()) is True
        assert b.abort() is False
        expect_state(b, 0, "both")
        assert finish_now(b.wait_abortion()) is False

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")
        b.close()

    run_pair(kind, parent, child)


def test_peer_real_exit_releases_wait_abortion_with_true(kind: str) -> None:
    """The child really exits while the parent waits for an abort: True."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")

    async def parent(b: Barrier, hs: Handshake) -> None:
        waiting = await assert_blocks(b.wait_abortion())
        hs.send("waiting")
        assert await soon(waiting) is True
        expect_state(b, 0, "they")

    run_pair(kind, parent, child)


def test_place_and_waits_after_abort(kind: str) -> None:
    """After my abort: place() and every sync-style wait return False at once, and the
    counter no longer moves, not even for barriers the peer placed unaware of it. The
    peer learns of the abort at its next read, not before."""

    async def child(b: Barrier, hs: Handshake) -> None:
        await hs.recv("aborted")
        assert b.place()  # nothing read yet: this side knows of no abort
        assert b.place()
        expect_state(b, 2)
        hs.send("placed twice")
        await hs.recv("checked")
        assert await soon(b.wait_next()) is False  # reads the abort
        expect_state(b, 2, "they")
        assert b.place() is False
        for wait in (b.wait_next, b.sync_next, b.sync, b.place_and_sync):
            assert finish_now(wait()) is False
        assert finish_now(b.wait_abortion()) is True
        assert b.abort() is False
        expect_state(b, 2, "both")
        assert finish_now(b.wait_abortion()) is False

    async def parent(b: Barrier, hs: Handshake) -> None:
        assert b.abort()
        expect_state(b, 0, "i")
        assert b.place() is False
        for wait in (b.wait_next, b.sync_next, b.sync, b.place_and_sync):
            assert finish_now(wait()) is False
        expect_state(b, 0, "i")
        waiting = await assert_blocks(b.wait_abortion())
        hs.send("aborted")
        await hs.recv("placed twice")
        done, _ = await asyncio.wait({waiting}, timeout=BLOCKS)  # reads the two barriers
        assert not done
        expect_state(b, 0, "i")  # ... which do not move an aborted counter
        hs.send("checked")
        assert await soon(waiting) is False  # the child's abort; I aborted too
        expect_state(b, 0, "both")

    run_pair(kind, parent, child)


def test_abort_twice(kind: str) -> None:
    """abort() again is a no-op (returning True while the peer is not known to have
    aborted): were INT64_MAX written each time, the third write would overflow the
    eventfd and break the barrier on both sides."""

    async def child(b: Barrier, hs: Handshake) -> None:
        for _ in range(3):
            assert b.abort() is True
            expect_state(b, 0, "i")
        hs.send("aborted thrice")

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("aborted thrice")
        assert await soon(b.wait_abortion()) is True
        expect_state(b, 0, "they")
        for _ in range(2):
            assert b.abort() is False
            expect_state(b, 0, "both")

    run_pair(kind, parent, child)


def test_place_and_sync_rounds(kind: str) -> None:
    """Many lock-step rounds. After each, this side has read all of the peer's barriers
    of that round and maybe (if the peer is quick) the peer's next one: 0 or -1."""

    async def side(b: Barrier, hs: Handshake) -> None:
        assert b.role is not None
        for _ in range(200):
            assert await soon(b.place_and_sync())
            assert repr(b) in (
                f"<aiosync.Barrier role={b.role.name} barriers={n} aborted=no>" for n in (0, -1)
            )
        hs.send("done")
        await hs.recv("done")
        expect_state(b, 0)

    run_pair(kind, side, side)


def test_repr_and_flags_without_a_peer() -> None:
    """repr before a role is set, and after close."""
    b = Barrier()
    assert repr(b) == "<aiosync.Barrier role=unset barriers=0 aborted=no>"
    expect_state(b, 0)
    b.set_role(Role.CHILD)
    expect_state(b, 0)
    assert b.place()
    expect_state(b, 1)
    b.close()
    assert repr(b) == "<aiosync.Barrier role=CHILD closed>"
    b.close()
    with pytest.raises(ClosedResourceError):
        b.place()


# ---------------------------------------------------------------------------------------
# The blocking twins, on a side that runs no event loop
# ---------------------------------------------------------------------------------------


def test_blocking_twins_refuse_a_running_loop(kind: str) -> None:
    async def side(b: Barrier, hs: Handshake) -> None:
        for wait in (
            b.sync_blocking,
            b.sync_next_blocking,
            b.wait_next_blocking,
            b.wait_abortion_blocking,
        ):
            with pytest.raises(RuntimeError, match="would block the running event loop"):
                wait(0)
        expect_state(b, 0)

    run_pair(kind, side, side)


def test_blocking_sync_wait_next_and_timeout(kind: str) -> None:
    """sync_blocking / wait_next_blocking / sync_next_blocking against an async parent;
    a timed-out wait loses nothing; timeout=0 is enough when no wait is needed."""

    def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        with pytest.raises(TimeoutError):
            b.sync_blocking(timeout=BLOCKS)
        expect_state(b, 1)
        hs.send("timed out")
        assert b.sync_blocking(timeout=SOON)
        expect_state(b, 0)
        hs.send("synced")
        hs.recv_blocking("placed twice")
        assert b.wait_next_blocking(timeout=SOON)
        expect_state(b, -2)
        with pytest.raises(TimeoutError):
            b.wait_next_blocking(timeout=BLOCKS)
        expect_state(b, -2)
        assert b.sync_next_blocking(timeout=0)
        assert b.sync_blocking(timeout=0)
        assert b.place()
        with pytest.raises(TimeoutError):
            b.wait_next_blocking(timeout=0)
        expect_state(b, -1)
        hs.send("done")

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        await hs.recv("timed out")
        assert await soon(b.place_and_sync())
        await hs.recv("synced")  # not before: the child's sync must read just one
        assert b.place()
        assert b.place()
        hs.send("placed twice")
        await hs.recv("done")
        expect_state(b, 2)

    run_with_blocking_child(kind, parent, child)


def test_blocking_place_and_sync(kind: str) -> None:
    def child(b: Barrier, hs: Handshake) -> None:
        assert b.place_and_sync_blocking(timeout=SOON)
        expect_state(b, 0)
        with pytest.raises(TimeoutError):
            b.place_and_sync_blocking(timeout=BLOCKS)
        expect_state(b, 1)
        hs.send("timed out")
        assert b.sync_blocking(timeout=SOON)
        expect_state(b, 0)

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        assert await soon(b.place_and_sync())
        await hs.recv("timed out")
        assert await soon(b.place_and_sync())
        expect_state(b, 0)

    run_with_blocking_child(kind, parent, child)


def test_blocking_wait_abortion_own_abort(kind: str) -> None:
    """My own abort does not release wait_abortion_blocking; the peer's abort does
    (False: I aborted too)."""

    def child(b: Barrier, hs: Handshake) -> None:
        assert b.abort()
        with pytest.raises(TimeoutError):
            b.wait_abortion_blocking(timeout=BLOCKS)
        expect_state(b, 0, "i")
        hs.send("aborted")
        assert b.wait_abortion_blocking(timeout=SOON) is False
        expect_state(b, 0, "both")

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        await hs.recv("aborted")
        assert b.abort()
        expect_state(b, 0, "i")

    run_with_blocking_child(kind, parent, child)


def test_blocking_wait_abortion_peer_exit(kind: str) -> None:
    """The parent's plain exit releases the child's wait_abortion_blocking with True."""

    def child(b: Barrier, hs: Handshake) -> None:
        with pytest.raises(TimeoutError):
            b.wait_abortion_blocking(timeout=BLOCKS)
        hs.send("waiting")
        assert b.wait_abortion_blocking(timeout=SOON) is True
        expect_state(b, 0, "they")

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        await hs.recv("waiting")
        b.close()

    run_with_blocking_child(kind, parent, child)


def test_blocking_pending_exit(kind: str) -> None:
    """systemd's pending_exit with the reading side on blocking twins."""

    def child(b: Barrier, hs: Handshake) -> None:
        hs.recv_blocking("placed and exited")
        assert b.wait_next_blocking(timeout=SOON)
        expect_state(b, -1)
        assert b.sync_next_blocking(timeout=0)
        assert b.place()
        assert b.sync_next_blocking(timeout=0)
        assert b.place()
        assert b.sync_next_blocking(timeout=SOON) is False
        expect_state(b, 1, "they")

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        assert b.place()
        b.close()
        hs.send("placed and exited")

    run_with_blocking_child(kind, parent, child)


def test_blocking_exit(kind: str) -> None:
    """systemd's exit with the waiting side on a blocking twin: the child places and
    syncs; the parent exits (closes) without placing, which ends the child's sync."""

    def child(b: Barrier, hs: Handshake) -> None:
        assert b.place()
        assert b.sync_blocking(timeout=SOON) is False
        expect_state(b, 1, "they")

    async def parent(b: Barrier, hs: Handshake, pid: int) -> None:
        b.close()

    run_with_blocking_child(kind, parent, child)
