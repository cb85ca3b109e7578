"""BarrierGroup: a parent and N real children, each with its own member Barrier.

Children are started with ``aiosync.create_subprocess_exec`` (and multiprocessing spawn)
and run ``tests/children/group_child.py``; its "up" line says it holds its barrier, and
its "go-" modes act only when the test writes a line to their stdin, so every test
orders the processes explicitly. "This blocks" is a bounded wait (`assert_blocks`).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import pickle
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from support import PYTHON, SOON, assert_blocks, loop_kind, run_on, soon

import aiosync
from aiosync import Barrier, BarrierGroup, ClosedResourceError, GroupResult, Role
from aiosync._barrier import queue_of

CHILD = str(Path(__file__).parent / "children" / "group_child.py")
DEADLINE = 0.1  # docs/design.md §7: a killed peer's pending waits resolve within 100 ms

Process = asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def children(group: BarrierGroup, *modes: str) -> AsyncIterator[list[Process]]:
    """Child i runs group_child.py in modes[i] with group[i]; all are "up" on entry.

    On exit, children still running are killed and every child is reaped.
    """
    procs: list[Process] = []
    try:
        for mode, gate in zip(modes, group, strict=True):
            proc = await aiosync.create_subprocess_exec(
                PYTHON,
                CHILD,
                mode,
                loop_kind(),
                share={"gate": gate},
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            procs.append(proc)
        for proc in procs:
            assert await line(proc) == "up"
        yield procs
    finally:
        for proc in procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            await soon(proc.communicate())


async def line(proc: Process) -> str:
    assert proc.stdout is not None
    return (await soon(proc.stdout.readline())).decode().strip()


async def go(proc: Process) -> None:
    """Let a "go-" child act."""
    assert proc.stdin is not None
    proc.stdin.write(b"go\n")
    await soon(proc.stdin.drain())


async def kill(proc: Process) -> None:
    """SIGKILL `proc` and reap it: from here on its fds are closed (the clock starts)."""
    proc.kill()
    assert await soon(proc.wait()) == -9


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (bounded: fails the test after SOON s).

    For a state the loop reaches by itself once an fd event that is already pending in
    the kernel is processed: a few iterations."""
    async with asyncio.timeout(SOON):
        while not condition():
            await asyncio.sleep(0)


def pids(procs: list[Process], *indices: int) -> tuple[int, ...]:
    return tuple(procs[i].pid for i in indices)


# ---------------------------------------------------------------------------------------
# Everyone syncs
# ---------------------------------------------------------------------------------------


async def test_all_children_sync() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "sync", "sync", "sync") as procs:
            assert group.pids == pids(procs, 0, 1, 2)
            result = await soon(group.place_and_sync())
            assert result == GroupResult(synced=pids(procs, 0, 1, 2))
            assert result.ok
            assert result
            assert result.failed == ()
            for proc in procs:
                assert await line(proc) == "synced True"
            assert all(repr(b).endswith("barriers=0 aborted=no>") for b in group)


async def test_sync_waits_for_the_slowest_child() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "go-sync", "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            await go(procs[0])
            await go(procs[2])
            assert await line(procs[0]) == "synced True"
            assert await line(procs[2]) == "synced True"
            await assert_blocks(asyncio.shield(task))  # child 1 has not placed yet
            await go(procs[1])
            assert await soon(task) == GroupResult(synced=pids(procs, 0, 1, 2))
            assert await line(procs[1]) == "synced True"


async def test_sync_needing_no_wait_returns_without_a_loop_round_trip() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-exit", "go-exit") as procs:
            coro = group.sync()  # nothing placed on either side: no wait needed
            with pytest.raises(StopIteration) as stopped:
                coro.send(None)  # finished without ever suspending
            assert stopped.value.value == GroupResult(synced=pids(procs, 0, 1))
            for proc in procs:
                await go(proc)


async def test_second_round_after_the_first() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "sync-twice", "sync-twice") as procs:
            for _ in range(2):
                assert await soon(group.place_and_sync()) == GroupResult(synced=pids(procs, 0, 1))
                for proc in procs:
                    assert await line(proc) == "synced True"


# ---------------------------------------------------------------------------------------
# A round holds every member (docs/design.md §11)
# ---------------------------------------------------------------------------------------


def registered(barrier: Barrier) -> tuple[int, ...]:
    """The fds of `barrier` registered with some loop now (white box)."""
    queue = queue_of(barrier)
    return tuple(fd for slot in queue.slots() for fd in queue._registered(slot))


async def test_a_child_one_round_ahead_is_read_while_the_round_waits_for_another() -> None:
    """Child 0 syncs and places its next barrier while the group still waits for child
    1: the round reads it (nobody waits on member 0 any more, but the round holds it),
    so member 0 keeps its registration and the next round needs no wait for it."""
    with BarrierGroup(2) as group:
        async with children(group, "go-sync-twice", "go-sync-twice") as procs:
            task = await assert_blocks(group.place_and_sync())
            assert [queue_of(b).held for b in group] == [1, 1]
            await go(procs[0])
            assert await line(procs[0]) == "synced True"  # then it places its second
            await until(lambda: group[0]._barriers == -1)  # read, its waiter long released
            assert group[0]._waitq.waiting == 0
            assert group[0]._them in registered(group[0])  # kept for the next round
            await go(procs[1])
            assert await soon(task) == GroupResult(synced=pids(procs, 0, 1))
            assert [queue_of(b).held for b in group] == [0, 0]  # a round holds until its end
            assert await soon(group.place_and_sync()) == GroupResult(synced=pids(procs, 0, 1))
            assert [await line(p) for p in procs] == ["synced True", "synced True"]
            assert await line(procs[1]) == "synced True"


async def test_a_round_holding_a_member_never_notices_its_child_exit() -> None:
    """ "Place a barrier and exit" stays safe under a round's hold: what the child placed
    is read, its exit is left to a wait of that member (design §10)."""
    with BarrierGroup(2) as group:
        async with children(group, "go-sync-place-exit", "go-sync-twice") as procs:
            task = await assert_blocks(group.place_and_sync())
            await go(procs[0])
            assert [await line(procs[0]) for _ in range(2)] == ["synced True", "placed True"]
            assert await soon(procs[0].wait()) == 0  # its end of the pipe is closed
            await until(lambda: group[0]._barriers == -1)
            # The hang-up fired under the hold: nothing more read, its registrations
            # dropped (a loop calls a reader again and again for a hung-up pipe).
            await until(lambda: registered(group[0]) == ())
            assert not group[0].they_aborted
            await go(procs[1])
            assert await soon(task) == GroupResult(synced=pids(procs, 0, 1))
            # Child 0 placed before it exited: the next round needs no wait for it.
            assert await soon(group.place_and_sync()) == GroupResult(synced=pids(procs, 0, 1))
            assert [await line(procs[1]) for _ in range(2)] == ["synced True"] * 2
            # A wait of member 0 itself notices the exit.
            assert group[0].place()
            assert await soon(group[0].sync()) is False
            assert group[0].peer_exited


async def test_a_cancelled_round_gives_every_hold_back() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            assert [queue_of(b).held for b in group] == [1, 1]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [queue_of(b).held for b in group] == [0, 0]
            assert [b._waitq.waiting for b in group] == [0, 0]
            for proc in procs:
                await go(proc)
            assert await soon(group.sync()) == GroupResult(synced=pids(procs, 0, 1))


async def test_a_round_closed_unfinished_gives_every_hold_back() -> None:
    """A group sync whose coroutine is closed while it waits (its task dropped, say)
    leaves no waiter parked and no member held."""
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            coro = group.place_and_sync()
            coro.send(None)  # suspended in the round's wait
            assert [queue_of(b).held for b in group] == [1, 1]
            assert [b._waitq.waiting for b in group] == [1, 1]
            coro.close()
            assert [queue_of(b).held for b in group] == [0, 0]
            assert [b._waitq.waiting for b in group] == [0, 0]
            for proc in procs:
                await go(proc)
            assert await soon(group.sync()) == GroupResult(synced=pids(procs, 0, 1))


def test_a_forked_child_holds_nothing() -> None:
    """A round's hold is its process's own: a forked child starts with none."""
    with BarrierGroup(1) as group:
        queue = queue_of(group[0])
        queue.held = 1  # as a round pending in this process would (white box)
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                os._exit(0 if queue.held == 0 else 1)
            assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
        finally:
            queue.held = 0


async def test_a_forked_child_that_ends_an_inherited_round_gives_nothing_back() -> None:
    """A process forked while a round waits inherits the awaiting task; if the child
    ends it (its coroutine closed), nothing is given back to the child's counts, which
    started at zero: the round's holds and waiters are the parent's. The parent's
    round goes on as if nothing happened."""
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            round_ = await assert_blocks(group.place_and_sync())
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 1
                try:
                    queues = [queue_of(member) for member in group]
                    before = [(q.held, q.waiting) for q in queues]
                    round_.get_coro().close()
                    after = [(q.held, q.waiting) for q in queues]
                    code = 0 if before == after == [(0, 0), (0, 0)] else 3
                finally:
                    os._exit(code)
            _, status = await asyncio.to_thread(os.waitpid, pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            for proc in procs:
                await go(proc)
            assert await soon(round_) == GroupResult(synced=pids(procs, 0, 1))


# ---------------------------------------------------------------------------------------
# Children that abort, exit or are killed
# ---------------------------------------------------------------------------------------


async def test_children_that_abort_or_exit_are_named() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "go-sync", "go-abort", "go-exit") as procs:
            task = await assert_blocks(group.place_and_sync())
            for proc in procs:
                await go(proc)
            result = await soon(task)
            assert result == GroupResult(
                synced=pids(procs, 0), aborted=pids(procs, 1), died=pids(procs, 2)
            )
            assert not result
            assert not result.ok
            assert result.failed == pids(procs, 1, 2)
            assert group[1].they_aborted
            assert not group[1].peer_exited  # it aborted
            assert group[2].they_aborted
            assert group[2].peer_exited  # it exited without aborting


async def test_child_sigkilled_mid_sync_is_named_as_died() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "go-sync", "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            await kill(procs[1])
            await go(procs[0])
            await go(procs[2])
            result = await soon(task)
            assert result == GroupResult(synced=pids(procs, 0, 2), died=pids(procs, 1))
            assert [await line(procs[i]) for i in (0, 2)] == ["synced True"] * 2


async def test_abort_on_failure_a_killed_child_ends_the_sync_at_once() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "go-sync", "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync(abort_on_failure=True))
            await kill(procs[1])
            async with asyncio.timeout(DEADLINE):
                result = await task
            assert result == GroupResult(died=pids(procs, 1), stopped=pids(procs, 0, 2))
            assert result.failed == pids(procs, 1)
            assert all(b.i_aborted for b in group)
            for i in (0, 2):  # the others learn of the abort at their next wait
                await go(procs[i])
                assert await line(procs[i]) == "synced False"


async def test_abort_on_failure_an_aborting_child_stops_the_others() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "go-sync", "go-abort", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync(abort_on_failure=True))
            await go(procs[1])
            assert await line(procs[1]) == "aborted"
            assert await soon(task) == GroupResult(
                aborted=pids(procs, 1), stopped=pids(procs, 0, 2)
            )
            for i in (0, 2):
                await go(procs[i])
                assert await line(procs[i]) == "synced False"


async def test_abort_on_failure_when_a_child_is_already_known_to_have_failed() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-abort", "go-sync") as procs:
            await go(procs[0])
            assert await soon(group.wait_abortion()) == GroupResult(aborted=pids(procs, 0))
            # Member 0 is known aborted: the group aborts before anyone waits.
            result = await soon(group.place_and_sync(abort_on_failure=True))
            assert result == GroupResult(aborted=pids(procs, 0), stopped=pids(procs, 1))
            await go(procs[1])
            assert await line(procs[1]) == "synced False"


async def test_without_abort_on_failure_the_others_still_sync() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-abort", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            await go(procs[0])
            await assert_blocks(asyncio.shield(task))  # child 1 is still to come
            await go(procs[1])
            result = await soon(task)
            assert result == GroupResult(synced=pids(procs, 1), aborted=pids(procs, 0))
            assert await line(procs[1]) == "synced True"


OUTCOMES = ("sync", "abort", "exit", "kill")


@settings(
    max_examples=12,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # no shrinking: see the model
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    outcomes=st.lists(st.sampled_from(OUTCOMES), min_size=1, max_size=4),
    order=st.randoms(use_true_random=False),
)
def test_any_mix_of_outcomes_is_reported_child_by_child(
    kind: str, outcomes: list[str], order: random.Random
) -> None:
    """Children that sync, abort, exit or are killed, acting in any order."""
    modes = {"sync": "go-sync", "abort": "go-abort", "exit": "go-exit", "kill": "go-sync"}
    turns = list(range(len(outcomes)))
    order.shuffle(turns)

    async def run() -> None:
        with BarrierGroup(len(outcomes)) as group:
            async with children(group, *(modes[o] for o in outcomes)) as procs:
                task = await assert_blocks(group.place_and_sync(), seconds=0.01)
                for i in turns:
                    if outcomes[i] == "kill":
                        await kill(procs[i])
                    else:
                        await go(procs[i])
                result = await soon(task)
                named = {"sync": "synced", "abort": "aborted", "exit": "died", "kill": "died"}
                expected: dict[str, list[int]] = {"synced": [], "aborted": [], "died": []}
                for i, outcome in enumerate(outcomes):
                    expected[named[outcome]].append(procs[i].pid)
                assert result == GroupResult(**{k: tuple(v) for k, v in expected.items()})

    run_on(kind, run())


# ---------------------------------------------------------------------------------------
# Aborting and watching for abortion
# ---------------------------------------------------------------------------------------


async def test_group_abort_reaches_every_child() -> None:
    with BarrierGroup(3) as group:
        async with children(group, "watch", "watch", "watch") as procs:
            assert group.place() is True  # the children (watching only) are behind now
            assert group.abort() is True  # nobody known to have aborted
            assert group.abort() is True  # again: nothing changes
            for proc in procs:
                assert await line(proc) == "abortion True"
            assert group.place() is False  # aborted: nothing placed
            # Aborted before it read anything: nothing is known of the children, which
            # were still behind.
            assert await soon(group.sync()) == GroupResult(stopped=pids(procs, 0, 1, 2))


async def test_a_sync_after_our_abort_still_names_who_had_synced() -> None:
    """As a parent that gives up on a slow start-up does: abort, then sort them out."""
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            await go(procs[0])
            assert await line(procs[0]) == "synced True"
            await until(lambda: group[0]._barriers <= 0)  # we read its barrier
            task.cancel()  # a timeout, say
            with pytest.raises(asyncio.CancelledError):
                await task
            group.abort()
            result = await soon(group.sync())
            assert result == GroupResult(synced=pids(procs, 0), stopped=pids(procs, 1))


async def test_wait_abortion_names_the_first_child_gone() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-exit") as procs:
            task = await assert_blocks(group.wait_abortion())
            group.abort()  # our own abort does not release it
            await assert_blocks(asyncio.shield(task))
            await go(procs[1])
            result = await soon(task)
            assert result == GroupResult(died=pids(procs, 1))
            assert not result
            # Known now: it returns at once.
            assert await group.wait_abortion() == GroupResult(died=pids(procs, 1))
            assert group.abort() is False  # a child is known to be gone
            await go(procs[0])
            assert await line(procs[0]) == "synced False"  # it sees our abort


async def test_wait_abortion_for_a_killed_child() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            task = await assert_blocks(group.wait_abortion())
            await kill(procs[0])
            async with asyncio.timeout(DEADLINE):
                assert await task == GroupResult(died=pids(procs, 0))


async def test_wait_abortion_beside_a_pending_sync() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-abort", "go-sync") as procs:
            sync = await assert_blocks(group.place_and_sync())
            watch = await assert_blocks(group.wait_abortion())
            await go(procs[0])
            assert await soon(watch) == GroupResult(aborted=pids(procs, 0))
            assert not sync.done()  # child 1 has not placed yet
            await go(procs[1])
            result = await soon(sync)
            assert result == GroupResult(synced=pids(procs, 1), aborted=pids(procs, 0))


# ---------------------------------------------------------------------------------------
# Cancellation, timeouts, close
# ---------------------------------------------------------------------------------------


async def test_cancelled_sync_loses_nothing() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync-twice", "go-sync-twice") as procs:
            task = await assert_blocks(group.place_and_sync())
            await go(procs[0])
            assert await line(procs[0]) == "synced True"  # child 0's barrier is placed
            # Read: member 0 released (-1 if its second barrier came along already).
            await until(lambda: group[0]._barriers <= 0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert [b._waitq.waiting for b in group] == [0, 0]
            assert group[0]._barriers <= 0  # what was read stays read
            assert group[1]._barriers == 1
            await go(procs[1])
            assert await line(procs[1]) == "synced True"
            # Whatever the cancelled sync read is counted; the rest is read now.
            assert await soon(group.sync()) == GroupResult(synced=pids(procs, 0, 1))
            assert await soon(group.place_and_sync()) == GroupResult(synced=pids(procs, 0, 1))
            assert [await line(p) for p in procs] == ["synced True"] * 2


async def test_timeout_is_the_callers() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await group.place_and_sync()
            assert [b._waitq.waiting for b in group] == [0, 0]
            for proc in procs:
                await go(proc)
            assert await soon(group.sync()) == GroupResult(synced=pids(procs, 0, 1))


async def test_cancelled_sync_of_a_one_child_group() -> None:
    """One parked member is awaited directly: the cancellation reaches its future."""
    with BarrierGroup(1) as group:
        async with children(group, "go-sync") as procs:
            task = await assert_blocks(group.place_and_sync())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert group[0]._waitq.waiting == 0
            await go(procs[0])
            assert await soon(group.sync()) == GroupResult(synced=pids(procs, 0))
            assert await line(procs[0]) == "synced True"


async def test_cancelled_sync_with_abort_on_failure_aborts_nothing() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-sync", "go-sync") as procs:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await group.place_and_sync(abort_on_failure=True)
            assert [b._waitq.waiting for b in group] == [0, 0]
            assert not any(b.is_aborted for b in group)
            for proc in procs:
                await go(proc)
            assert await soon(group.sync(abort_on_failure=True)) == GroupResult(
                synced=pids(procs, 0, 1)
            )


async def test_cancelled_wait_abortion_leaves_no_waiter() -> None:
    with BarrierGroup(2) as group:
        async with children(group, "go-exit", "go-exit") as procs:
            task = await assert_blocks(group.wait_abortion())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert all(b._waitq.waiting == 0 for b in group)
            await go(procs[0])
            assert await soon(group.wait_abortion()) == GroupResult(died=pids(procs, 0))
            await go(procs[1])


async def test_close_while_syncing_raises_and_the_children_see_us_go() -> None:
    group = BarrierGroup(2)
    async with children(group, "watch", "watch") as procs:
        task = await assert_blocks(group.place_and_sync())
        group.close()
        with pytest.raises(ClosedResourceError):
            await soon(task)
        for proc in procs:
            assert await line(proc) == "abortion True"
        group.close()  # idempotent
        with pytest.raises(ClosedResourceError):
            await group.sync()
        with pytest.raises(ClosedResourceError):
            group.place()
        assert repr(group) == "<aiosync.BarrierGroup n=2 closed>"


# ---------------------------------------------------------------------------------------
# multiprocessing children: attach
# ---------------------------------------------------------------------------------------


def _mp_child(gate: Barrier, kind: str) -> None:
    gate.set_role(Role.CHILD)
    ok = run_on(kind, gate.place_and_sync())
    gate.close()
    raise SystemExit(0 if ok else 1)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_multiprocessing_children_attached_by_pid(method: str, kind: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with BarrierGroup(2) as group:
        procs = [ctx.Process(target=_mp_child, args=(gate, kind)) for gate in group]
        try:
            for i, proc in enumerate(procs):
                proc.start()
                assert proc.pid is not None
                group.attach(i, proc.pid)
            assert group[0].role is Role.PARENT
            result = run_on(kind, soon(group.place_and_sync()))
            assert result == GroupResult(synced=tuple(p.pid for p in procs if p.pid))
        finally:
            for proc in procs:
                proc.join(SOON)
        assert [p.exitcode for p in procs] == [0, 0]


def _forked_child(group: BarrierGroup, index: int, kind: str, hang: bool) -> None:
    gate = group.child(index)  # closes the siblings' members in this process
    if not hang:
        run_on(kind, gate.place_and_sync())
    time.sleep(SOON * 3)  # alive (holding whatever it holds) until the parent kills it


def test_forked_children_hide_no_sibling_death(kind: str) -> None:
    """multiprocessing with fork: every child inherits the whole group. With child(),
    child 0 holds none of child 1's fds, so child 1's death reaches the parent."""
    ctx: Any = multiprocessing.get_context("fork")
    with BarrierGroup(2) as group:
        procs = [ctx.Process(target=_forked_child, args=(group, i, kind, i == 1)) for i in range(2)]
        try:
            for i, proc in enumerate(procs):
                proc.start()
                group.attach(i, proc.pid)

            async def parent() -> GroupResult:
                task = await assert_blocks(group.place_and_sync())
                procs[1].kill()
                return await soon(task)

            result = run_on(kind, parent())
            assert result == GroupResult(synced=(procs[0].pid,), died=(procs[1].pid,))
        finally:
            for proc in procs:
                proc.kill()
                proc.join(SOON)


def test_child_refuses_a_member_with_a_role() -> None:
    with BarrierGroup(2) as group:
        group.attach(0, 100)
        with pytest.raises(RuntimeError, match="already has a role"):
            group.child(0)
        assert repr(group[1]).startswith("<aiosync.Barrier role=unset")  # nothing closed


# ---------------------------------------------------------------------------------------
# Bad use
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "error"), [(0, ValueError), (-1, ValueError), (2.0, TypeError)])
def test_bad_sizes(n: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        BarrierGroup(n)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        BarrierGroup(True)


async def test_a_member_without_a_child_is_refused_by_name() -> None:
    with BarrierGroup(2) as group:
        group.attach(0, 12345)
        message = r"member 1 has no child yet.*attach\(1, pid\)"
        with pytest.raises(RuntimeError, match=message):
            await group.sync()
        with pytest.raises(RuntimeError, match=message):
            await group.wait_abortion()
        with pytest.raises(RuntimeError, match=message):
            group.place()
        with pytest.raises(RuntimeError, match=message):
            group.abort()


async def test_a_member_closed_alone_is_refused() -> None:
    with BarrierGroup(2) as group:
        group.attach(0, 12345)
        group.attach(1, 12346)
        group[1].close()
        with pytest.raises(ClosedResourceError):
            await group.sync()
        with pytest.raises(ClosedResourceError):
            await group.wait_abortion()
        with pytest.raises(ClosedResourceError):
            group.place()
        assert group[0]._barriers == 0  # refused before anything was placed


def test_attach_checks_its_arguments() -> None:
    with BarrierGroup(2) as group:
        for pid in (0, -5, "7", True):
            with pytest.raises(ValueError, match="pid must be a positive int"):
                group.attach(0, pid)  # type: ignore[arg-type]
        with pytest.raises(IndexError):
            group.attach(2, 100)
        group[1].set_role(Role.CHILD)
        with pytest.raises(RuntimeError, match="CHILD side"):
            group.attach(1, 100)
        group.attach(0, 100)
        group.attach(0, 101)  # corrects the pid; the role stays PARENT
        assert group.pids == (101, None)


async def test_a_round_everyone_synced_in_names_the_pids_attach_set_last() -> None:
    # Such a result is made once per group and kept: attach() must drop it. (Nothing is
    # placed, so no sync needs a wait, and no child is asked anything.)
    with BarrierGroup(2) as group:
        group.attach(0, 100)
        group.attach(1, 200)
        assert await group.sync() == GroupResult(synced=(100, 200))
        group.attach(1, 201)
        result = await group.sync()
        assert result == GroupResult(synced=(100, 201))
        assert result.pids == (100, 201)
        assert result.member(201) == 1


def test_members_and_repr() -> None:
    with BarrierGroup(3) as group:
        assert len(group) == 3
        members = list(group)
        assert all(isinstance(b, Barrier) for b in members)
        assert len({id(b) for b in members}) == 3
        assert group[2] is members[2]
        assert group.pids == (None, None, None)
        assert repr(group) == "<aiosync.BarrierGroup n=3 pids=[None, None, None]>"
    assert all(repr(b).endswith("closed>") for b in members)


def test_a_group_does_not_pickle() -> None:
    with BarrierGroup(1) as group, pytest.raises(TypeError, match="share each member"):
        pickle.dumps(group)


def test_no_fd_leaks(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for _ in range(500):
        with BarrierGroup(4) as group:
            group.attach(0, 1)
    assert fd_count() == before


def test_unclosed_group_warns_once_and_is_closed(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    group = BarrierGroup(3)
    with pytest.warns(ResourceWarning, match="unclosed <aiosync.BarrierGroup") as caught:
        del group  # CPython finalizes it here (reference counting)
    assert len(caught) == 1  # the group's own warning; its members were closed by it
    assert fd_count() == before
