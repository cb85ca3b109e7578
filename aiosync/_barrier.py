"""The two-party inter-process Barrier, after systemd's ``src/shared/barrier.c``.

Theory of operation
-------------------
State of one side: two eventfds (``me``, which I write, and ``them``, which I read),
one end of a pipe, and a signed counter ``barriers`` = barriers I placed minus
barriers of theirs I have read. Positive: I am ahead; negative: they are ahead.

* ``place()`` adds 1 to ``me`` and to the counter. ``abort()`` adds INT64_MAX to
  ``me``. The eventfds are not in semaphore mode, so one read of ``them`` drains all
  the peer placed so far; a value >= INT64_MAX (pending barriers add to it) means the
  peer aborted, which wipes out the barriers it placed before.
* The pipe tells us the peer is gone: nothing is ever written to it, and when the peer
  exits (or execs without passing the fds on) its end closes. A hang-up counts as the
  peer aborting *only when ``them`` holds nothing*, so barriers placed before exit are
  consumed first ("it is safe to place a barrier and exit").
* Abort states are two flags, ``i_aborted`` and ``they_aborted`` (systemd encodes them
  as special counter values). Once either is set the counter no longer moves.
* Waits follow systemd's ``barrier_read(threshold)``: wait while ``barriers >
  threshold`` and the peer has not aborted. Here the read loop is run by the fd
  callback on behalf of every waiter at once (the `WaitQueue` of `_waitq`): it reads
  only while someone waits (or a BarrierGroup's round holds the barrier: then the
  eventfd alone, never the pipe; docs/design.md §10), applies what it read to the
  state under the lock, then releases every waiter whose condition now holds, with
  the result computed at that moment (a snapshot: nothing is consumed, so a cancelled
  waiter gives nothing back).
  A waiter's condition is a threshold, or `UNTIL_ABORTED` for ``wait_abortion()``.

The state (counter, flags, fds), the read loop, what a wait's condition says now
(``_verdict``, the only statement of it) and ``place()``'s write run on every round
trip, so they are in C: the base class `_waitc.BarrierCore`. This class keeps the rest.

Departures from systemd: ``place()`` returns False when the eventfd write fails (the
barrier is then both-aborted); my own ``abort()`` releases my pending ``sync()``-style
waits with False (systemd cannot wait and abort at once); ``barrier_we_aborted()`` is
called ``both_aborted``.
"""

from __future__ import annotations

import enum
import os
import time
import weakref
from typing import Any, Final, Self, TypeAlias

from . import _fd, _share, _waitc, _waitq
from ._errors import ClosedResourceError, SharingError
from ._resource import Resource
from ._share import Adoption

__all__ = ["Barrier", "Role"]

ABORTION: Final = 0x7FFF_FFFF_FFFF_FFFF  # INT64_MAX; what abort() writes


class _Until(enum.Enum):
    ABORTED = "until the peer aborts or exits"


UNTIL_ABORTED: Final = _Until.ABORTED
Cond: TypeAlias = int | _Until  # what a waiter waits for: barriers <= threshold, or abortion
Waiter: TypeAlias = _waitq.Waiter[Cond, bool]


class Role(enum.Enum):
    """Which side of a `Barrier` this process is. Set once per side with `set_role`."""

    PARENT = "parent"
    CHILD = "child"


# The multiprocessing child (its Popen) each role-less Barrier was pickled for. Kept
# until the Barrier goes: once that child has a pid, the Barrier is not handed out again.
_children: weakref.WeakKeyDictionary[Barrier, object] = weakref.WeakKeyDictionary()


@_share.shareable
class Barrier(_waitc.BarrierCore, Resource):
    """A two-party barrier between a parent process and its child.

    Use it when two processes must wait on each other: "don't exec until the parent
    wrote the cgroup", "don't connect until the child has bound its socket". Create it
    before the child starts, set each side's role, then each side places numbered sync
    points (`place()`) and awaits the other's. Either side can `abort()` (for instance
    when its setup failed), and the other side learns of it at its next wait; a peer
    that exits or is killed counts as aborting, and is noticed at once.

    Every wait is an fd registered with the running loop: nothing blocks the loop and no
    thread is parked. Timeouts are the caller's (``async with asyncio.timeout(...)``).
    Cancelling a wait loses nothing: what was read before the cancellation is in the
    counter, and a later wait sees the same counter. Waits from several tasks (say a
    ``sync()`` and a ``wait_abortion()``) may be pending at once.

    For a process that runs no loop (a child about to exec, say) every wait has a
    blocking twin with a ``timeout=`` (``sync_blocking()`` and so on).

    Sharing: hand it, before either role is set, to one child, through
    ``aiosync.create_subprocess_exec(share=...)`` (this side becomes PARENT, the child's
    CHILD) or as a multiprocessing ``Process`` argument under spawn or forkserver (each
    side then calls `set_role`). A second child, a role already set or a closed barrier
    is refused with `SharingError` before that child starts; pickling it anywhere else
    raises `TypeError`. (Under fork, Process arguments are inherited, not handed out:
    aiosync cannot see a second fork child.)

    Raises:
        OSError: the kernel refused the fds (two eventfds and a pipe), e.g. too many
            open files.
    """

    def __init__(self) -> None:
        self._closed = True  # until every fd exists, for __del__
        self._waitq: _waitq.WaitQueue[Cond, bool] = _waitq.WaitQueue(self, _closed_error)
        self._role: Role | None = None
        self._barriers = 0
        self._i_aborted = False
        self._they_aborted = False
        self._peer_exited = False
        self._peer_pid: int | None = None
        self._me = self._them = self._pipe_r = self._pipe_w = -1
        self._me = _fd.eventfd()
        try:
            self._them = _fd.eventfd()
            self._pipe_r, self._pipe_w = _fd.pipe()
        except BaseException:
            self._release_fds()
            raise
        self._closed = False

    @classmethod
    def _adopt(cls, me: int, them: int, pipe_r: int, pipe_w: int) -> Self:
        """A Barrier over fds received from another process (already checked)."""
        self = cls.__new__(cls)
        self._closed = False
        self._waitq = _waitq.WaitQueue(self, _closed_error)
        self._role = None
        self._barriers = 0
        self._i_aborted = self._they_aborted = self._peer_exited = False
        self._peer_pid = None
        self._me, self._them, self._pipe_r, self._pipe_w = me, them, pipe_r, pipe_w
        return self

    # -- roles ------------------------------------------------------------------------

    def set_role(self, role: Role) -> None:
        """Say which side this is; call it exactly once per side, after the fork or spawn.

        PARENT keeps the pipe's read end; CHILD keeps its write end and swaps the
        eventfds. ``aiosync.create_subprocess_exec(share=...)`` and
        ``aiosync.inherited()`` set the roles for you.

        Args:
            role: `Role.PARENT` or `Role.CHILD`.

        Raises:
            TypeError: `role` is not a `Role`.
            RuntimeError: the role is already set.
            ClosedResourceError: the barrier was closed.
        """
        self._check_open()
        if not isinstance(role, Role):
            raise TypeError(f"role must be aiosync.Role.PARENT or Role.CHILD, not {role!r}")
        if self._role is not None:
            raise RuntimeError(f"the barrier's role is already set ({self._role.name})")
        if role is Role.PARENT:
            _fd.close(self._pipe_w)
            self._pipe_w = -1
            self._waitq.watch(self._them, self._pipe_r)
        else:
            _fd.close(self._pipe_r)
            self._pipe_r = -1
            self._me, self._them = self._them, self._me
            self._waitq.watch(self._them, self._pipe_w)
        self._role = role

    @property
    def role(self) -> Role | None:
        """This side's role, or None before `set_role`."""
        return self._role

    @property
    def peer_pid(self) -> int | None:
        """The pid of the process on the other side, when this side knows it.

        Known in a parent that started the child with
        ``aiosync.create_subprocess_exec(share=...)`` (or told a `BarrierGroup` with
        ``attach``), and in a child that got the barrier from `aiosync.inherited()` (its
        parent). None otherwise.
        """
        return self._peer_pid

    # -- abort state ------------------------------------------------------------------

    @property
    def is_aborted(self) -> bool:
        """Either side aborted (as far as this side knows)."""
        return self._i_aborted or self._they_aborted

    @property
    def i_aborted(self) -> bool:
        """This side aborted (or a write to the peer failed)."""
        return self._i_aborted

    @property
    def they_aborted(self) -> bool:
        """The peer aborted or exited, as seen by a wait of this side."""
        return self._they_aborted

    @property
    def peer_exited(self) -> bool:
        """The peer exited (or was killed) without aborting, as seen by a wait of this side.

        Implies `they_aborted`: an exit counts as an abort. False when the peer called
        `abort()` before it went away.
        """
        return self._peer_exited

    @property
    def both_aborted(self) -> bool:
        """Both sides aborted (systemd's ``barrier_we_aborted()``)."""
        return self._i_aborted and self._they_aborted

    # -- placing and aborting (never block) -------------------------------------------

    def place(self) -> bool:
        """Place a barrier for the peer to wait for; never blocks.

        Use it to say "I reached this point" without waiting for the peer; a later
        `sync()` waits for the peer to reach it too.

        Returns:
            True once placed. False without placing anything if either side aborted, and
            False if the write failed (the barrier is then aborted on both sides).

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed.
        """
        self._check_ready()
        with self._waitq.lock:
            return self._place()

    # _place() (place() with the lock held) is _waitc.BarrierCore's, in C: it is half
    # of every place_and_sync().

    def abort(self) -> bool:
        """Abort: the peer's waits return False from now on, and so do this side's.

        Use it when this side's setup failed and the peer must not go on. The abort
        supersedes every barrier this side placed and the peer has not read yet. Pending
        ``sync()``-style waits of this side return False; its ``wait_abortion()`` keeps
        waiting for the peer. Calling it again does nothing.

        Returns:
            False if the peer is known to have aborted too, else True.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed.
        """
        self._check_ready()
        with self._waitq.lock:
            if not self._i_aborted:
                if _fd.write_eventfd(self._me, ABORTION):
                    self._i_aborted = True
                    self._wake()
                else:
                    self._broken()
            return not self._they_aborted

    # _broken() (a write failed: both sides count as aborted, as systemd makes it
    # fatal) is _waitc.BarrierCore's too.

    # -- waiting ----------------------------------------------------------------------

    async def wait_next(self) -> bool:
        """Wait until the peer placed a barrier this side has not seen yet.

        Consumes every barrier the peer placed so far (all in one read). On cancellation
        (or an ``asyncio.timeout``) nothing is lost: what was read stays counted.

        Returns:
            True once the peer placed a new barrier. False at once if either side aborted,
            and False if the peer aborts, exits or is killed meanwhile.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed, before or during the wait.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return await self._read(self._barriers - 1)

    async def sync_next(self) -> bool:
        """Wait until the peer caught up with all but this side's last barrier.

        Use it to keep at most one sync point ahead of the peer. On cancellation (or an
        ``asyncio.timeout``) nothing is lost: what was read stays counted.

        Returns:
            True once the peer is at most one barrier behind: at once, without any I/O, if
            no wait is needed (so it does not notice a peer that already exited). False if
            either side aborted, or if the peer aborts, exits or is killed meanwhile.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed, before or during the wait.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return await self._read(max(0, self._barriers - 1))

    async def sync(self) -> bool:
        """Wait until the peer placed as many barriers as this side (full sync).

        On cancellation (or an ``asyncio.timeout``) nothing is lost: what was read stays
        counted, and a later ``sync()`` waits for the same thing.

        Returns:
            True once the peer caught up: at once, without any I/O, if the peer is not
            behind (so it does not notice a peer that already exited). False if either side
            aborted, or if the peer aborts, exits or is killed before catching up.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed, before or during the wait.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return await self._read(0)

    async def place_and_sync(self) -> bool:
        """`place()`, then `sync()`: the usual "I am ready, are you?" step.

        On cancellation (or an ``asyncio.timeout``) the barrier stays placed; the sync is
        undone as ``sync()``'s is (nothing read is lost).

        Returns:
            True once both sides reached this point. False if either side aborted, or if the
            peer aborts, exits or is killed before reaching it.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed, before or during the wait.
        """
        # place() and the first half of sync() in one step under the lock: this is the
        # round trip every benchmark times, so it makes no call it can do without.
        if self._role is None or self._closed:
            self._check_ready()
        started = self._start_wait(0, True)
        if type(started) is bool:
            return started
        return await self._waitq.wait(started)

    async def wait_abortion(self) -> bool:
        """Wait until the peer aborts or exits.

        Use it to watch the peer while doing something else, e.g. beside a
        `Completion` wait whose completer may die. Works after this side aborted too (this
        side's own abort never releases it). Cancellation loses nothing.

        Returns:
            True if only the peer aborted (or exited, or was killed); False if this side
            aborted as well.

        Raises:
            RuntimeError: no role was set (`set_role`).
            ClosedResourceError: the barrier was closed, before or during the wait.
        """
        self._check_ready()
        started = start_wait(self, UNTIL_ABORTED)
        if type(started) is bool:
            return started
        return await self._waitq.wait(started)

    async def _read(self, threshold: int) -> bool:
        started = start_wait(self, threshold)
        if type(started) is bool:
            return started
        return await self._waitq.wait(started)

    # -- blocking twins ---------------------------------------------------------------

    def wait_next_blocking(self, timeout: float | None = None) -> bool:
        """`wait_next()` for code without a running loop: blocks this thread.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            As `wait_next()`.

        Raises:
            TimeoutError: `timeout` seconds passed first (nothing read is lost, as when the
                async call is cancelled).
            RuntimeError: an event loop is running in this thread (await `wait_next()`
                instead), or no role was set.
            ClosedResourceError: the barrier was closed, also by another thread meanwhile.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return self._read_blocking(self._barriers - 1, timeout)

    def sync_next_blocking(self, timeout: float | None = None) -> bool:
        """`sync_next()` for code without a running loop: blocks this thread.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            As `sync_next()`.

        Raises:
            TimeoutError: `timeout` seconds passed first (nothing read is lost, as when the
                async call is cancelled).
            RuntimeError: an event loop is running in this thread (await `sync_next()`
                instead), or no role was set.
            ClosedResourceError: the barrier was closed, also by another thread meanwhile.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return self._read_blocking(max(0, self._barriers - 1), timeout)

    def sync_blocking(self, timeout: float | None = None) -> bool:
        """`sync()` for code without a running loop: blocks this thread.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            As `sync()`.

        Raises:
            TimeoutError: `timeout` seconds passed first (nothing read is lost, as when the
                async call is cancelled).
            RuntimeError: an event loop is running in this thread (await `sync()`
                instead), or no role was set.
            ClosedResourceError: the barrier was closed, also by another thread meanwhile.
        """
        self._check_ready()
        if self._i_aborted or self._they_aborted:
            return False
        return self._read_blocking(0, timeout)

    def place_and_sync_blocking(self, timeout: float | None = None) -> bool:
        """`place_and_sync()` for code without a running loop: blocks this thread.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            As `place_and_sync()`.

        Raises:
            TimeoutError: `timeout` seconds passed first (nothing read is lost, as when the
                async call is cancelled).
            RuntimeError: an event loop is running in this thread (await `place_and_sync()`
                instead), or no role was set.
            ClosedResourceError: the barrier was closed, also by another thread meanwhile.
        """
        self.place()
        return self.sync_blocking(timeout)

    def wait_abortion_blocking(self, timeout: float | None = None) -> bool:
        """`wait_abortion()` for code without a running loop: blocks this thread.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            True if only the peer aborted (or exited); False if this side aborted as well.

        Raises:
            TimeoutError: `timeout` seconds passed first.
            RuntimeError: an event loop is running in this thread (await
                `wait_abortion()` instead), or no role was set.
            ClosedResourceError: the barrier was closed, also by another thread meanwhile.
        """
        self._check_ready()
        return self._block_until(UNTIL_ABORTED, timeout)

    def _read_blocking(self, threshold: int, timeout: float | None) -> bool:
        return self._block_until(threshold, timeout)

    def _block_until(self, cond: Cond, timeout: float | None) -> bool:
        """Block this thread until a wait for `cond` has its result (`_verdict`)."""
        _waitq.no_running_loop("a blocking barrier wait", "await the async method")
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self._waitq
        try:
            while True:
                with queue.lock:
                    if self._closed:  # by another thread, which woke us
                        raise _closed_error()
                    self._pump(cond)
                    result = self._verdict(cond)
                    if result is not None:
                        return result
                    fds = (self._them, self._pipe_end)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("the barrier wait timed out")
                # Also woken when another thread changes the state (a loop's reader or
                # another twin drains `them`; abort(); close()): see _wake.
                queue.block(fds, remaining)
        finally:
            queue.unblock()

    # -- the read loop (runs with the lock held) --------------------------------------
    #
    # In C (_waitc.BarrierCore), as it runs on every event: _on_readable(slot, fd) (the
    # loop's reader: the read loop, then a fresh registration after a pipe event that
    # did not end the wait, as uvloop reports a pipe write end's error only once per
    # registration), _pump(cond) (systemd's read loop, run once for everyone waiting
    # now: read while someone waits and the peer has not aborted, apply each value,
    # release whoever it frees), _wake() (release every waiter whose condition holds,
    # with its result as of now) and _verdict(cond) (what a wait for `cond` returns
    # now, or None while it must wait: the one statement of every wait's condition).

    # -- sharing ----------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        # Its CHILD side goes to one process: refuse a second child, before it starts.
        pid = self.peer_pid if self._role is Role.PARENT else None
        if pid is None:
            pid = getattr(_children.get(self), "pid", None)  # set once that child started
        if pid is not None:
            raise SharingError(
                f"this Barrier was already handed to the child process {pid}; a Barrier "
                "has two parties, so create one per child (or use a BarrierGroup)"
            )
        if self._role is not None:
            raise SharingError(
                "a Barrier can be shared only before its role is set "
                f"(this one is already the {self._role.name} side)"
            )
        fds = {"me": self._me, "them": self._them, "pipe_w": self._pipe_w}
        if for_exec:
            return {"role": Role.CHILD.name}, fds
        # Pickled for a multiprocessing child being started. Until it has started (it
        # may fail to), that child is remembered, not counted.
        _children[self] = _share.spawning()
        return {"role": None}, {**fds, "pipe_r": self._pipe_r}

    def _after_share(self, pid: int) -> None:
        self.set_role(Role.PARENT)
        self._peer_pid = pid

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption:
        _share.expect_keys(name, state, {"role"})
        role = state["role"]
        if role is not None and role != Role.CHILD.name:
            raise _share.invalid(name, f"unknown role {_share.show(role)}")
        # No role yet (pickled for multiprocessing): the child may take either role, so
        # both pipe ends come along.
        required = {"me", "them", "pipe_w"} | ({"pipe_r"} if role is None else set())
        _share.expect_keys(name, fds, required, optional={"pipe_r"})
        me = _fd.check(fds["me"], "eventfd", name=name)
        them = _fd.check(fds["them"], "eventfd", name=name)
        pipe_w = _fd.check(fds["pipe_w"], "pipe-write", name=name)
        pipe_r = -1
        if "pipe_r" in fds:
            pipe_r = _fd.check(fds["pipe_r"], "pipe-read", name=name)
        mine = [fd for fd in (me, them, pipe_w, pipe_r) if fd >= 0]

        def adopt() -> Barrier:
            for fd in mine:
                _fd.own(fd)
            self = cls._adopt(me, them, pipe_r, pipe_w)
            if role is not None:  # a child of create_subprocess_exec: the peer is its parent
                self.set_role(Role.CHILD)
                self._peer_pid = os.getppid()
            return self

        return Adoption(cls, mine, adopt)

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the barrier's fds. Idempotent.

        Pending waits of this process raise `ClosedResourceError`; the peer sees this
        side exit (its waits return False) once no process holds this side's fds.
        """
        if self._closed:
            return
        self._closed = True
        with self._waitq.lock:  # not while another thread's read loop uses them
            fds = self._take_fds()
        self._waitq.close(fds)

    def _take_fds(self) -> list[int]:
        fds = [self._them, self._pipe_r, self._pipe_w, self._me]
        self._me = self._them = self._pipe_r = self._pipe_w = -1
        return [fd for fd in fds if fd >= 0]

    def _release_fds(self) -> None:
        for fd in self._take_fds():
            _fd.close(fd)

    def _check_ready(self) -> None:
        if self._role is None:
            self._check_open()
            raise RuntimeError("call set_role(Role.PARENT) or set_role(Role.CHILD) first")
        if self._closed:
            raise ClosedResourceError("this Barrier was closed")

    def __repr__(self) -> str:
        role = self._role.name if self._role is not None else "unset"
        if self._closed:
            return f"<aiosync.Barrier role={role} closed>"
        if self.both_aborted:
            aborted = "both"
        elif self._i_aborted:
            aborted = "i"
        elif self._they_aborted:
            aborted = "they"
        else:
            aborted = "no"
        peer = "" if self._peer_pid is None else f" peer={self._peer_pid}"
        return f"<aiosync.Barrier role={role}{peer} barriers={self._barriers} aborted={aborted}>"


def _closed_error() -> ClosedResourceError:
    return ClosedResourceError("the Barrier was closed while waiting")


# What BarrierGroup needs of its members (it uses no Barrier internals).


# start_wait(barrier, cond, place=False, future=None) -> bool | Waiter: the first half of
# a wait: its result at once, or a waiter parked on the queue. The caller awaits
# ``queue_of(barrier).wait(waiter)`` (or the waiter's future, and then abandons it if it
# stops waiting). BarrierGroup parks one per member and awaits them together, each
# waiter's future a share of one `_waitc.Gather` (`future`); the barrier's own waits go
# through here too. With `place`, place() first in the same step under the lock
# (place_and_sync). Raises `ClosedResourceError` once closed. (The C method itself:
# called once per member and round, it makes no Python call on the way.)
start_wait: Final = _waitc.BarrierCore._start_wait


def check_ready(barriers: tuple[Barrier, ...]) -> None:
    """Raise as a wait of the first of `barriers` not ready would: no role yet, or
    closed. (One call for a whole group, every round: the test is Barrier._check_ready's
    own, made without a call per barrier when all is well.)"""
    for barrier in barriers:
        if barrier._role is None or barrier._closed:
            barrier._check_ready()


def queue_of(barrier: Barrier) -> _waitq.WaitQueue[Cond, bool]:
    """The barrier's wait queue (to await or abandon what `start_wait` parked)."""
    return barrier._waitq


def set_peer_pid(barrier: Barrier, pid: int) -> None:
    """Record the pid of the process holding the other side (see `Barrier.peer_pid`)."""
    barrier._peer_pid = pid
