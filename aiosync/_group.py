"""One parent, many children: a group of two-party Barriers, one per child.

Theory of operation
-------------------
systemd's barrier has exactly two parties, and a group does not change that: it is N
`Barrier` objects, member ``i`` shared with child ``i`` (who sees a plain Barrier),
plus the pid of each child. Its calls are the Barrier calls applied to every member:

* ``place()`` and ``abort()`` place or abort on every member; they never block.
* ``sync()`` starts a sync on every member. A member that needs no wait answers at
  once, without I/O, exactly as `Barrier.sync` would; for each of the others a waiter
  is parked on that member's wait queue (the very waiter its own ``sync()`` would
  park, released by its own read loop), and the group awaits those futures together:
  no task per child. From its start to its end, a sync holds every member: what a
  child writes meanwhile is read, as a wait of that member would read it (but an exit
  is noticed only by a member's own wait), so a child one round ahead does not cost a
  dropped and re-added registration. The round runs in C (`_waitc.sync_round`).
* Each member's outcome comes from its own result and state: True is *synced*; False
  with `Barrier.peer_exited` is *died* (the child exited or was killed without
  aborting); False with `Barrier.they_aborted` is *aborted* (the child aborted); any
  other False came from this side's own abort: *synced* if the child had caught up
  (the counter says no wait is needed), else *stopped*. Each member is sorted when
  the group's task resumes after its release (what was read meanwhile, under the
  round's hold or for another waiter, can only turn a False into the peer's own
  abort or exit, which is then what happened).
* ``wait_abortion()`` parks a ``wait_abortion()`` waiter on every member and returns
  at the first release, naming every child known by then to have aborted or died.

* A child forked with the whole group keeps only its own member (``child()``): a
  sibling's pipe end held open there would hide that sibling's death.

Invariants: the group owns its members (closing it closes them); a member's counter
and abort flags are only ever changed by that member's own code (the group sets only
the pid it reports), so everything the Barrier guarantees
(values applied before anyone is released, nothing lost to a cancellation) holds per
member. A cancelled or failed group wait abandons every waiter it parked, as a
cancelled ``Barrier.sync()`` abandons its own: whatever the members read stays counted.

Departures: systemd has no group. ``sync(abort_on_failure=True)`` aborts the whole
group as soon as one child aborts or dies, which releases the other members' syncs
with False (a Barrier's own abort releases its own syncs).
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

from . import _share, _waitc
from ._barrier import (
    UNTIL_ABORTED,
    Barrier,
    Role,
    Waiter,
    check_ready,
    queue_of,
    set_peer_pid,
    start_wait,
)
from ._resource import Resource
from ._waitc import Gather, Share, sync_round

__all__ = ["BarrierGroup", "GroupResult"]


@dataclasses.dataclass(frozen=True)
class GroupResult:
    """What a `BarrierGroup` wait found out, child by child.

    True in a boolean context when every child synced (``ok``). After
    `BarrierGroup.sync`, every child is in exactly one of the four tuples; after
    `BarrierGroup.wait_abortion`, only ``aborted`` and ``died`` are filled: the
    children known by then to have aborted or died.

    The four tuples name children by pid, in group order; the ``*_members`` properties
    name the same children by member index (``group[i]``), for code that thinks in
    the order it started them.
    """

    synced: tuple[int, ...] = ()
    """Children whose sync succeeded (or that had caught up when this side aborted)."""
    aborted: tuple[int, ...] = ()
    """Children that aborted (called ``abort()``) before syncing."""
    died: tuple[int, ...] = ()
    """Children that exited, were killed, or exec'd without passing their fds on,
    without aborting, before syncing."""
    stopped: tuple[int, ...] = ()
    """Children still behind when this side aborted (`BarrierGroup.abort`, or
    ``abort_on_failure``)."""
    pids: tuple[int, ...] = dataclasses.field(default=(), compare=False)
    """Every child's pid, in member order: ``pids[i]`` holds member ``i``."""

    def member(self, pid: int) -> int:
        """The member index of the child `pid` (``ValueError`` if it is not one)."""
        try:
            return self.pids.index(pid)
        except ValueError:
            raise ValueError(f"pid {pid} is not a child of this group") from None

    @property
    def synced_members(self) -> tuple[int, ...]:
        """`synced`, as member indices."""
        return tuple(map(self.member, self.synced))

    @property
    def aborted_members(self) -> tuple[int, ...]:
        """`aborted`, as member indices."""
        return tuple(map(self.member, self.aborted))

    @property
    def died_members(self) -> tuple[int, ...]:
        """`died`, as member indices."""
        return tuple(map(self.member, self.died))

    @property
    def stopped_members(self) -> tuple[int, ...]:
        """`stopped`, as member indices."""
        return tuple(map(self.member, self.stopped))

    @property
    def ok(self) -> bool:
        """Nobody aborted, died or was stopped: after a sync, every child synced."""
        return self.__bool__()

    @property
    def failed(self) -> tuple[int, ...]:
        """Children that failed on their own: they aborted or died."""
        return self.aborted + self.died

    def __bool__(self) -> bool:  # `ok`, in one call: every round asks it
        return not (self.aborted or self.died or self.stopped)


@_share.unshareable(
    "a BarrierGroup stays in the parent: share each member (group[i]) with its own "
    "child instead, as share={'gate': group[i]} or as a multiprocessing Process argument"
)
class BarrierGroup(Resource):
    """A parent's barriers with its N children, synced, aborted and watched as one.

    Use it when a parent starts several workers and must wait until every one of them
    is ready (or learn at once which one failed). Create the group, share member ``i``
    with child ``i``, then place and sync with all of them at once::

        group = aiosync.BarrierGroup(4)
        procs = [
            await aiosync.create_subprocess_exec(
                sys.executable, "worker.py", share={"gate": gate}
            )
            for gate in group
        ]
        result = await group.place_and_sync(abort_on_failure=True)
        if not result:
            ...  # result.aborted and result.died say who failed

    Each child uses the plain `Barrier` it inherited. The group learns each child's
    pid from `aiosync.create_subprocess_exec`; for children started otherwise (fork,
    multiprocessing) call `attach` with the pid.

    Waits follow `Barrier`: nothing blocks the loop, timeouts are the caller's
    (``async with asyncio.timeout(...)``), and a cancelled wait loses nothing (every
    member keeps what it read). A child that dies, or is killed, releases its member's
    waits at once: it shows up in ``died``.

    The group itself is never shared: passing it to ``create_subprocess_exec(share=)``
    or to a multiprocessing child raises `SharingError` (share ``group[i]``), and
    pickling it anywhere else raises `TypeError`.
    """

    def __init__(self, n: int) -> None:
        self._closed = True  # until every member exists, for __del__
        if not isinstance(n, int) or isinstance(n, bool):
            raise TypeError(f"the number of children must be an int, not {n!r}")
        if n < 1:
            raise ValueError(f"a BarrierGroup needs at least one child, not {n}")
        barriers: list[Barrier] = []
        try:
            for _ in range(n):
                barriers.append(Barrier())
        except BaseException:
            for barrier in barriers:
                barrier.close()
            raise
        self._members = tuple(barriers)
        self._ready = False  # every member has its child (see _check_ready)
        # Every child's pid, then the result of a round every child synced in: made
        # once (a GroupResult is immutable), dropped when attach() changes a pid.
        self._pids: tuple[int, ...] = ()
        self._all_synced: GroupResult | None = None
        self._closed = False

    # -- the members ------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._members)

    def __getitem__(self, index: int) -> Barrier:
        """Member ``index``: the Barrier to share with child ``index``."""
        return self._members[index]

    def __iter__(self) -> Iterator[Barrier]:
        return iter(self._members)

    @property
    def pids(self) -> tuple[int | None, ...]:
        """Each member's child pid, in group order (None while unknown)."""
        return tuple(b.peer_pid for b in self._members)

    def attach(self, index: int, pid: int) -> None:
        """Tell the group that process `pid` holds the other side of member `index`.

        Only for children not started by `aiosync.create_subprocess_exec` (which does
        this itself): after ``os.fork()`` or ``multiprocessing.Process.start()``. Sets
        the member's role to PARENT if it is not set yet. A forked child must call
        `child` (see there); a spawn or forkserver child gets only its own member.

        Args:
            index: the member, 0 to n - 1.
            pid: the child process holding the member's other side.

        Raises:
            ValueError: `pid` is not a positive int.
            IndexError: no member `index`.
            RuntimeError: member `index` was made the CHILD side.
            ClosedResourceError: the group was closed.
        """
        self._check_open()
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"pid must be a positive int, not {pid!r}")
        barrier = self._members[index]
        if barrier.role is None:
            barrier.set_role(Role.PARENT)
        elif barrier.role is not Role.PARENT:
            raise RuntimeError(f"member {index} is the CHILD side; a group is the parent's")
        set_peer_pid(barrier, pid)
        self._all_synced = None  # its pids changed

    def child(self, index: int) -> Barrier:
        """In a child forked with the whole group: keep member `index`, close the rest.

        After ``os.fork()``, or ``multiprocessing`` with the fork start method (the
        default on Linux before Python 3.14), a child inherits every member's fds. Held
        open there, a sibling's pipe end would hide that sibling's death from the
        parent. Call this first thing in the child: it closes every other member here,
        sets member `index` to the CHILD role and returns it. The group object itself
        is spent in this process (closed); the parent's is untouched.

        Args:
            index: this child's member, 0 to n - 1.

        Returns:
            Member `index`, a `Barrier` with role CHILD whose peer is the parent.

        Raises:
            IndexError: no member `index`.
            RuntimeError: the member already has a role (not called in a forked child,
                or called twice).
            ClosedResourceError: the group was closed.
        """
        self._check_open()
        mine = self._members[index]
        if mine.role is not None:
            raise RuntimeError(
                f"member {index} already has a role ({mine.role.name}): call child() in "
                "the forked child, before anything else"
            )
        for barrier in self._members:
            if barrier is not mine:
                barrier.close()
        mine.set_role(Role.CHILD)
        set_peer_pid(mine, os.getppid())
        self._closed = True
        return mine

    # -- placing and aborting (never block) -------------------------------------------

    def place(self) -> bool:
        """Place a barrier for every child; never blocks.

        Returns:
            True if it was placed with every child; False if some member is aborted
            (nothing is placed on those), as `Barrier.place` does for one.

        Raises:
            RuntimeError: a member has no child yet (share it with
                `aiosync.create_subprocess_exec`, or call `attach`).
            ClosedResourceError: the group (or a member) was closed.
        """
        self._check_ready()
        placed = True
        for barrier in self._members:
            placed = barrier.place() and placed
        return placed

    def abort(self) -> bool:
        """Abort with every child: their waits return False from now on.

        Use it when the parent gives up on the start-up. Pending `sync` calls of the
        group (and of the members) return, with the children that had not synced yet in
        ``stopped``; `wait_abortion` keeps waiting for a child.

        Returns:
            False if some child is known to have aborted or died, else True.

        Raises:
            RuntimeError: a member has no child yet (share it with
                `aiosync.create_subprocess_exec`, or call `attach`).
            ClosedResourceError: the group (or a member) was closed.
        """
        self._check_ready()
        unaborted = True
        for barrier in self._members:
            unaborted = barrier.abort() and unaborted
        return unaborted

    # -- waiting ----------------------------------------------------------------------

    async def sync(self, *, abort_on_failure: bool = False) -> GroupResult:
        """Wait until every child placed as many barriers as this side, or failed.

        Returns when each child has synced, aborted or died. A child that needs no wait
        counts as synced at once, without I/O (so a child that already exited is not
        noticed, as with `Barrier.sync`). A child that dies or is killed while waited for
        is noticed at once.

        With ``abort_on_failure=True`` the first child that aborts or dies (or one
        already known to have) aborts the whole group: the children still behind stop
        waiting and are reported as ``stopped`` (they see the abort at their next
        wait). Cancellation or a timeout takes back every wait still parked; what the
        members read stays counted, so a later `sync` carries on from there. (An abort
        that ``abort_on_failure`` already made stays made.)

        Args:
            abort_on_failure: abort the group as soon as one child aborts or dies.

        Returns:
            A `GroupResult` naming the children that synced, aborted, died or were
            stopped; true in a boolean context when every child synced. A failed child is
            an outcome, not an exception.

        Raises:
            RuntimeError: a member has no child yet (share it with
                `aiosync.create_subprocess_exec`, or call `attach`).
            ClosedResourceError: the group (or a member) was closed, before or during the wait.
        """
        if self._closed or not self._ready:
            self._check_ready()  # (a closed member raises in sync_round, before any I/O)
        return self._result(await sync_round(self, self._members, False, abort_on_failure))

    async def place_and_sync(self, *, abort_on_failure: bool = False) -> GroupResult:
        """`place`, then `sync`: the usual "I am ready, are you all?" step.

        Args:
            abort_on_failure: abort the group as soon as one child aborts or dies.

        Returns:
            As `sync`: a `GroupResult`, true when every child synced.

        Raises:
            RuntimeError: a member has no child yet (share it with
                `aiosync.create_subprocess_exec`, or call `attach`).
            ClosedResourceError: the group (or a member) was closed, before or during the wait.
        """
        if self._closed or not self._ready:
            self._check_ready()  # (a closed member raises in sync_round, before any I/O)
        # Each member places and starts its sync in one step (an aborted member places
        # nothing, and its sync says so), as place() then sync() would.
        return self._result(await sync_round(self, self._members, True, abort_on_failure))

    async def wait_abortion(self) -> GroupResult:
        """Wait until any child aborts or exits (this side's own abort does not count).

        Use it to watch the workers once they run: a worker that dies, even by SIGKILL,
        is noticed at once. Cancellation or a timeout leaves every member as it was.

        Returns:
            A `GroupResult` with the children known by then to have aborted or died (at
            least one) in ``aborted`` and ``died``; ``synced`` is empty.

        Raises:
            RuntimeError: a member has no child yet (share it with
                `aiosync.create_subprocess_exec`, or call `attach`).
            ClosedResourceError: the group (or a member) was closed, before or during the wait.
        """
        self._check_ready()
        if not any(b.they_aborted for b in self._members):
            gather = Gather(True)  # first
            parked: dict[Share, tuple[int, Waiter]] = {}
            try:
                for i, barrier in enumerate(self._members):
                    share = gather.share()
                    started = start_wait(barrier, UNTIL_ABORTED, False, share)
                    if type(started) is bool:
                        break  # a wait of another task or thread just found one
                    parked[share] = (i, started)
                else:
                    await gather.arm()
                    for share in [share for share in parked if share.done()]:
                        del parked[share]
                        share.result()  # ClosedResourceError if closed meanwhile
            finally:
                if parked:
                    _abandon(self._members, parked.values())
        return self._result([_abortion(b) for b in self._members])

    def _result(self, outcomes: Sequence[int | None] | None) -> GroupResult:
        """The children by outcome (None: not reported), in group order; `outcomes`
        None: every child synced."""
        if self._all_synced is None:
            pids = []
            for barrier in self._members:
                pid = barrier.peer_pid
                assert pid is not None  # _check_ready
                pids.append(pid)
            self._pids = tuple(pids)
            self._all_synced = GroupResult(self._pids, (), (), (), self._pids)
        if outcomes is None:  # the usual round: one result for all
            return self._all_synced
        by: tuple[list[int], ...] = ([], [], [], [], [])  # per Outcome, then None
        for pid, outcome in zip(self._pids, outcomes, strict=True):
            by[UNREPORTED if outcome is None else outcome].append(pid)
        # synced, aborted, died, stopped, pids (positional: no keyword dict each round)
        return GroupResult(
            tuple(by[SYNCED]),
            tuple(by[ABORTED]),
            tuple(by[DIED]),
            tuple(by[STOPPED]),
            self._pids,
        )

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close every member. Idempotent.

        Pending waits of this process raise `ClosedResourceError`; each child sees
        this side exit once no process holds the parent's fds.
        """
        if self._closed:
            return
        self._closed = True
        for barrier in self._members:
            barrier.close()

    def _check_ready(self) -> None:
        self._check_open()
        if not self._ready:  # once every member has its child (a pid, PARENT), it stays so
            for i, barrier in enumerate(self._members):
                if barrier.peer_pid is None or barrier.role is not Role.PARENT:
                    raise RuntimeError(
                        f"member {i} has no child yet: share it with "
                        "aiosync.create_subprocess_exec(..., share={...}), or start the "
                        f"child otherwise and call attach({i}, pid)"
                    )
            self._ready = True
        check_ready(self._members)  # ClosedResourceError if a member was closed alone

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    def __repr__(self) -> str:
        if self._closed:
            return f"<aiosync.BarrierGroup n={len(self._members)} closed>"
        return f"<aiosync.BarrierGroup n={len(self._members)} pids={list(self.pids)}>"


class Outcome(enum.IntEnum):
    """What became of one child, in the order of GroupResult's fields (the values are
    the ones `_waitc.sync_round` sorts the members into)."""

    SYNCED = _waitc.SYNCED
    ABORTED = _waitc.ABORTED
    DIED = _waitc.DIED
    STOPPED = _waitc.STOPPED


SYNCED, ABORTED, DIED, STOPPED = Outcome
UNREPORTED: Final = len(Outcome)  # where _result files a child without an outcome


def _abortion(barrier: Barrier) -> Outcome | None:
    """A member's outcome for wait_abortion(): only children that aborted or died."""
    if barrier.peer_exited:
        return DIED
    if barrier.they_aborted:
        return ABORTED
    return None


def _abandon(members: tuple[Barrier, ...], parked: Iterable[tuple[int, Waiter]]) -> None:
    """Take back the waiters still parked (on the group's way out), as a cancelled
    `Barrier.sync` takes back its own."""
    for i, waiter in parked:
        queue_of(members[i]).abandon(waiter)
