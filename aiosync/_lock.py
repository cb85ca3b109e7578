"""Lock and Semaphore: awaitable across processes, robust to the death of a holder.

Theory of operation
-------------------
The state is a small file of shared memory (a memfd) that every process holding the
object maps: one word per **unit** (a Lock has one, a ``Semaphore(n)`` has n) and a
**line** of the processes that wait. Every change to a shared word is one atomic
instruction of ``_robust.c`` (sequentially consistent), so a process killed between
any two instructions leaves a state the others read as a whole.

*Who holds a unit.* A unit word is 0 (free), the **tag** of the holding process, the
tag with HANDED set (released to that process, which has not accepted yet), the tag
with INCONSISTENT set (a Lock taken over from a dead holder, not repaired yet), or
BROKEN plus a pid (a Lock made unrecoverable). A tag is a pid plus a
**process-image id** that the process takes from the shared memory at its first use
(a counter: no two images of one object ever get the same id). Units are owned by
the process, as POSIX robust mutexes are: any task or thread of it may release them.

*Who is alive.* At its first use a process opens a private file description of the
shared memory (close-on-exec, not inherited: a forked child closes its copy at once)
and sets its file offset to its image id. A holder is alive while its pid has our
memory open through a description at that offset: ``/proc/PID/fdinfo`` says so (a
reused pid, an exec'd or dead holder, a zombie all fail the test; a hint in the shared
memory names the fd to look at first). Every waiting process watches the shared
memory with inotify: the last close of any such description (an exit, a SIGKILL, an
exec, a ``close()``) is a close event in every waiting process, which then looks at
who holds what. Nothing polls.

*Transitions*, each one compare-and-swap on one word (``me`` = our tag):

- acquire: ``0 -> me`` (a free unit), or ``me|HANDED -> me`` (a hand-off accepted).
- release: ``me -> W|HANDED`` where W is the process in the line with the oldest
  ticket (not us), else ``me -> 0``; then *ring*: a one-byte read of the shared
  memory through our private description, which every watcher sees as an inotify
  event. So the releaser cannot barge back in, and no process starves: each process
  in the line is served in ticket order, and a served process that still has
  waiters goes to the back with a new ticket.
- a hand-off whose receiver left the line meanwhile: the releaser (after its CAS it
  looks at the line again) or the receiver (after leaving, it looks for units handed
  to it) moves it on, whoever's CAS wins: ``W|HANDED -> next|HANDED`` or ``0``.
- takeover of a Lock whose holder D is dead: ``D -> me|INCONSISTENT`` (or
  ``D|INCONSISTENT -> me|INCONSISTENT``); then the dead pid is noted beside it.
  A unit handed to a dead process, or a dead process's Semaphore unit: ``-> 0``, ring.
- ``mark_consistent()``: ``me|INCONSISTENT -> me``. ``release()`` while inconsistent:
  ``me|INCONSISTENT -> BROKEN|dead pid``, ring: every acquire since, everywhere, raises
  `BrokenResourceError`, and every waiter rung by it too.
- the line: ``entry.tag 0 -> me`` then a fresh ticket (killed in between: the entry has
  ticket 0, is passed over by releasers but still makes them ring, and is dropped as
  a dead process's); leaving stores 0 and then looks for a unit handed to us.

Ordering (Dekker pairs; one side of each always sees the other): a waiter joins the
line *then* looks at the units, a releaser changes a unit *then* looks at the line (to
ring), so a waiter never sleeps through a release; a process leaving the line stores
*then* looks for a hand-off to it, a releaser hands *then* checks that the receiver is
still in the line; and a process recovering from a death drops dead processes from the
line *then* looks at the units, so a hand-off to a process already dead is either taken
back by its releaser or freed by the recoverer (a process's death is one event: whoever
handles it must not miss a hand-off made just after).

Where each side of a pair is in ``_robust.c``: the releaser's store is the CAS in
``give()`` and its look the line scan after it (all three pairs); pair 1's waiter
stores in ``Shared_join()`` and looks in ``LockCore``'s ``_queue_up()``; pair 2's
leaver stores and looks in ``shared_leave()``; pair 3's recoverer stores in
``Shared_drop()`` and looks in `_Robust._recover` (below).

*In this process*, waiters follow the wait core's turns: a ring wakes the oldest
waiter of each loop (FIFO); the loop's reader drains the inotify fd, and the woken
task tries to take a unit with the queue's lock held, with no suspension point before
it returns (so a cancelled waiter never holds the lock); if it took, it leaves the line
in that same hold of the lock, and if it finds nothing it waits again, first in line.
Whoever in this process drains an event handles all it means (a hand-off to us, a
free unit, a death), so no other waiter of this process needs to see it. What runs
on every hand-off -- the reader, the turn, the line's bookkeeping, release's give and
the drain of its own ring -- is ``_robust.LockCore``, in C, the base class of
`_Robust`; a death among the events sends the turn to the Python `_Robust._recover`.
"""

from __future__ import annotations

import functools
import os
import time
import weakref
from types import TracebackType
from typing import Any, ClassVar, Literal, NoReturn

from . import _fd, _robust, _share, _waitq
from ._errors import BrokenResourceError, ClosedResourceError, WouldBlock
from ._resource import Resource
from ._share import Adoption

__all__ = ["Lock", "Semaphore"]

_TAG, _BROKEN, _INCONSISTENT, _HANDED = _robust.BITS
_PID_MASK = (1 << _robust.PID_BITS) - 1
_IMAGE_MASK = (1 << _robust.IMAGE_BITS) - 1

_live: weakref.WeakSet[_Robust] = weakref.WeakSet()


def _forget_parent() -> None:
    for obj in list(_live):
        obj._after_fork()


os.register_at_fork(after_in_child=_forget_parent)


class _Robust(_robust.LockCore, Resource):
    """What Lock and Semaphore share: units in shared memory that outlive their holder.

    Every event and turn of a hand-off is `_robust.LockCore`'s, in C: the loop's reader
    (``_on_readable``), a woken waiter's turn (``_turn``), taking (``_try_take``), the
    line's bookkeeping (``_queue_up``, ``_leave_line``), release's give (``_give``),
    and the look at our events (``_look``). This class keeps the rest: the first use,
    joining the line, deaths, errors, sharing and closing.
    """

    _kind: ClassVar[str]
    _robust_lock: ClassVar[bool]  # a Lock: takeover is INCONSISTENT, release may break
    _not_held: ClassVar[tuple[type[Exception], str]]  # release() by a process holding none

    def __init__(self, units: int) -> None:
        self._closed = True  # until everything exists, for __del__
        self._init_process()
        size = _size(units)
        memfd = _fd.memfd(f"aiosync-{self._kind.lower()}", size)
        try:
            self._attach(memfd, size, units, create=True)
        except BaseException:
            _fd.close(memfd)
            raise

    def _attach(self, memfd: int, size: int, units: int, *, create: bool) -> None:
        mapping = _fd.map_shared(memfd, size)
        try:
            self._shared = _robust.Shared(mapping, units, create)
        except BaseException:
            mapping.close()
            raise
        self._memfd = memfd
        self._map = mapping
        self._units = units
        st = os.fstat(memfd)
        self._ident = (st.st_dev, st.st_ino)
        # The error factory must not hold `self` (a cycle would keep a dropped object's
        # fds until the cyclic collector runs).
        closed = functools.partial(ClosedResourceError, f"the {self._kind} was closed")
        self._waitq: _waitq.WaitQueue[None, None] = _waitq.WaitQueue(self, closed)
        self._closed = False
        _live.add(self)

    def _init_process(self) -> None:
        """This process's own state (none of it is shared; a forked child starts over).

        The fields are LockCore's (see its stub for what each one is)."""
        self._tag = 0
        self._priv = self._ino = self._entry = -1
        self._joined = False
        self._in_line = self._seen = 0
        self._held = []

    def _after_fork(self) -> None:
        # The parent's private description and inotify fd are the parent's: closing our
        # copies is what lets the parent's death be seen. Nothing held is ours.
        priv, ino = self._priv, self._ino
        self._init_process()
        # The wait queue forgot its parent's lock before this runs (its at-fork handler
        # was registered first, when this module imported it; they run in that order):
        # LockCore takes note of the new one.
        self._waitq = self._waitq
        _fd.close(priv)
        _fd.close(ino)

    # -- this process's identity ------------------------------------------------------

    def _me(self) -> int:
        """Our tag; the first call opens our private description (lock held)."""
        if self._tag:
            return self._tag
        pid = os.getpid()
        priv = _fd.private_description(self._memfd, 0)
        try:
            image = self._shared.image(pid, priv)
            os.lseek(priv, image, os.SEEK_SET)
        except BaseException:
            _fd.close(priv)
            raise
        self._priv = priv
        self._tag = image << _robust.PID_BITS | pid
        return self._tag

    # -- taking --------------------------------------------------------------------------

    # _try_take() -> bool is LockCore's: take a unit handed to us or a free one (our
    # tag from _first_use() at the first call); never waits. BrokenResourceError or
    # ClosedResourceError (from _broken() and _closed_error()) if so.

    def _first_use(self) -> int:
        with self._waitq.lock:
            if self._closed:
                raise self._closed_error()
            return self._me()

    async def acquire(self) -> Literal[True]:
        """Wait until this process holds the lock (a unit of the semaphore).

        Returns at once, without a loop round trip, when it is free and no other task or
        thread of this process waits for it. Waiters of one loop are served oldest
        first; across processes a release hands it to the process that has waited
        longest. Cancellation or a timeout (``async with asyncio.timeout(...)``) leaves
        nothing behind: a cancelled acquire never holds it. A Lock whose holder died is
        taken over at once, with `Lock.inconsistent` True.

        Returns:
            True.

        Raises:
            BrokenResourceError: the Lock is unrecoverable (also if it becomes so while
                waiting).
            ClosedResourceError: closed, before or during the wait.
        """
        # The fast path, without a lock or a loop round trip: nobody of this process is
        # in line, and a unit is free (or was handed to us).
        if self._closed:
            raise self._closed_error()
        if not self._in_line and self._try_take():
            return True
        # In line (the first of this process joins the shared line, then looks; later
        # ones queue behind the waiters already there); on failure it has left it. A
        # take (here, or in a turn) leaves the line with the lock held for it.
        if self._queue_up():
            return True
        try:
            await self._waitq.wait_turn(None, self._turn)
        except BaseException:
            self._leave_line(False)
            raise
        return True

    # _turn(ring) -> bool is LockCore's: a woken waiter's turn (lock held). The loop's
    # reader drained the events that woke it: it takes if it can, and looks into a
    # death among those events with _recover(); if it took, it has left the line.

    def acquire_nowait(self) -> None:
        """Take it if that needs no wait (a Lock whose holder died is taken over).

        Raises:
            WouldBlock: it is held (by this process too), or other tasks or threads of
                this process wait for it.
            BrokenResourceError: the Lock is unrecoverable.
            ClosedResourceError: it was closed.
        """
        if self._closed:
            raise self._closed_error()
        if not self._in_line and self._try_take():
            return
        with self._waitq.lock:
            if not self._in_line and self._recover():
                return
        raise WouldBlock(f"the {self._kind} is held")

    def acquire_blocking(self, timeout: float | None = None) -> Literal[True]:
        """`acquire()` for code without a running loop: block this thread in poll.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            True (a timeout raises; it is never a return value).

        Raises:
            TimeoutError: `timeout` seconds passed first; nothing is held.
            RuntimeError: an event loop is running in this thread (await `acquire()`).
            BrokenResourceError: the Lock is unrecoverable.
            ClosedResourceError: it was closed, also by another thread meanwhile.
        """
        if self._closed:
            raise self._closed_error()
        _waitq.no_running_loop("acquire_blocking()", "await acquire()")
        if not self._in_line and self._try_take():
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self._waitq
        acquired = self._queue_up()  # a take leaves the line (here and in _turn)
        try:
            while not acquired:
                with queue.lock:
                    if self._closed:
                        raise self._closed_error()
                    # The events since our last look: what a loop's reader does, then
                    # what a woken waiter does.
                    self._look()
                    if self._turn(None):
                        acquired = True
                        break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"the {self._kind} acquire timed out")
                queue.block((self._ino,), remaining)
        finally:
            if not acquired:
                self._leave_line(False)
            queue.unblock()
        return True

    # _on_readable(slot, fd) is LockCore's: the loop's reader (lock held). It takes
    # nothing: it drains the events (notifications, not resources; a death among them
    # is kept for the waiter to look into) and wakes the oldest waiter of this loop
    # only if that waiter would find something (a ring that handed the lock to another
    # process, our own release's ring included, wakes nobody here).
    #
    # _look() -> bool (drain our events; would a waiter of ours find something now) is
    # LockCore's too. So is waking the next waiter of each loop and every blocked
    # thread of ours, after a waiter woken for something gave up without looking, or
    # after our own release rang and there is something for us (in _leave_line and
    # _give).

    # -- the line (lock held) ----------------------------------------------------------

    # _queue_up() -> bool (one more waiter of ours, in line; the first joins the shared
    # line with _join_line(), then tries to take, and if it took, it has left the
    # line again, as _turn does) and _leave_line(acquired) (one
    # waiter fewer; the last leaves the shared line, an acquirer whose process still
    # has waiters goes to the back of it, a waiter that gives up passes on what it was
    # woken for) are LockCore's; each takes the lock itself.

    def _join_line(self) -> bool:
        """The first waiter of ours joins the shared line (lock held, already counted
        in ``_in_line``). Returns whether it took a unit (recovering it from a holder
        that died before we watched); on failure it has left the line."""
        try:
            me = self._me()
            new_watch = self._ino < 0
            if new_watch:
                self._ino = _fd.watch(self._memfd)
                self._waitq.watch(self._ino)
            self._entry = self._shared.join(me)
            self._joined = True
            # Deaths from now on are events; one before now, we look for ourselves.
            return new_watch and self._recover()
        except BaseException:
            self._leave_line(False)
            raise

    # -- deaths (lock held) -------------------------------------------------------------

    def _recover(self) -> bool:
        """Look for units held by, or handed to, dead processes and recover them; drop
        dead processes from the line. Returns whether we took a unit meanwhile."""
        alive = _Liveness(self._ident, self._shared)
        # The line first, then the units: a releaser hands a unit and then checks that
        # the receiver is still in the line, so a hand-off to a process we drop here is
        # either seen by that releaser (it takes the unit back) or by our look below.
        self._recover_line(alive)
        return self._free_dead(alive, take_over=True) or self._try_take()

    def _free_dead(self, alive: _Liveness, *, take_over: bool) -> bool:
        """Free the units dead processes hold (a Semaphore's) or were handed; take over
        a Lock a dead process holds if `take_over`. Returns whether we took it."""
        me = self._me()
        shared = self._shared
        took = False
        for i, word in enumerate(shared.units()):
            holder = word & _TAG
            freeable = word & _HANDED or not self._robust_lock
            if not holder or word & _BROKEN or holder == me:
                continue
            if not (freeable or (take_over and not took)) or alive(holder):
                continue  # (a Lock held by a live or, unasked, a dead process: left)
            if freeable:
                shared.free_dead(i, word, self._priv)
            elif shared.take_over(i, word, me, True):
                self._held.append(i)
                took = True
        return took

    def _observe(self) -> None:
        """Before telling the state: units of dead processes come back (or, handed to
        a dead process, are free), as an acquire would find them. Looks at /proc only
        when some unit is held or handed by another process."""
        self._check_open()
        me, lock = self._tag, self._robust_lock
        if any(
            w & _TAG and w & _TAG != me and not w & _BROKEN and (w & _HANDED or not lock)
            for w in self._shared.units()
        ):
            with self._waitq.lock:
                if not self._closed:
                    self._free_dead(_Liveness(self._ident, self._shared), take_over=False)

    def _recover_line(self, alive: _Liveness) -> None:
        for entry, tag in self._shared.line():
            if tag != self._tag and not alive(tag):
                self._shared.drop(entry, tag)

    # -- releasing ------------------------------------------------------------------------

    def release(self) -> None:
        """Release it (any task or thread of the holding process may).

        The process that has waited longest gets it next. A Lock released while
        `Lock.inconsistent` (taken over from a dead holder, never marked consistent)
        becomes unrecoverable: every acquire since, in every process, and every pending
        one raises `BrokenResourceError`.

        Raises:
            RuntimeError: a Lock this process does not hold.
            ValueError: a Semaphore of which this process holds no unit.
            ClosedResourceError: it was closed.
        """
        if self._closed:
            raise self._closed_error()
        try:
            unit = self._held.pop()
        except IndexError:
            error, message = self._not_held
            raise error(message) from None
        # Handed to the process that waited longest, or freed; our own ring is read
        # at once (LockCore's _give).
        if self._give(unit):
            return
        try:
            if self._robust_lock and self._shared.break_(unit, self._tag, self._priv):
                return  # released inconsistent: unrecoverable from now on
        except ValueError:  # closed by another thread meanwhile
            raise self._closed_error() from None
        raise RuntimeError(f"this process's unit of the {self._kind} was taken from it")

    # -- async with; no with ------------------------------------------------------------

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __enter__(self) -> NoReturn:
        what = type(self).__name__.lower()
        raise TypeError(
            f"use 'async with {what}:' to acquire an aiosync.{type(self).__name__} "
            f"(or acquire_blocking() and release() without a loop); 'with' does not acquire it"
        )

    # -- errors ---------------------------------------------------------------------------

    def _closed_error(self) -> ClosedResourceError:
        return ClosedResourceError(f"the {self._kind} was closed")

    def _broken(self) -> BrokenResourceError:
        word = self._shared.word(0)
        pid = word & _PID_MASK
        exc = BrokenResourceError(
            f"the Lock is unrecoverable: its holder (pid {pid}) died, and the process that "
            "took it over released it without mark_consistent()"
        )
        # Every waiter of this process learns it now: nobody will ring again.
        queue = self._waitq
        with queue.lock:
            for slot in queue.slots():
                for waiter in queue.pending(slot):
                    waiter.fail(BrokenResourceError(*exc.args))
            queue.wake_blockers()
        return exc

    # -- sharing --------------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        return {"units": self._units}, {"memfd": self._memfd}

    def _after_share(self, pid: int) -> None:
        pass

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption:
        _share.expect_keys(name, state, {"units"})
        _share.expect_keys(name, fds, {"memfd"})
        units = state["units"]
        if (
            not isinstance(units, int)
            or isinstance(units, bool)
            or not 1 <= units <= _robust.MAX_UNITS
            or (cls is Lock and units != 1)
        ):
            raise _share.invalid(name, f"bad units {_share.show(units)}")
        fd = _fd.check(fds["memfd"], "memfd", name=name)
        size = _size(units)
        have = _fd.file_size(fd)
        if have < size:
            raise _share.invalid(name, f"memfd {fd} holds {have} bytes, {size} are needed")

        def adopt() -> _Robust:
            self = cls.__new__(cls)
            self._closed = True
            self._init_process()
            try:
                self._attach(fd, size, units, create=False)
            except ValueError as exc:
                raise _share.invalid(name, str(exc)) from None
            _fd.own(fd)
            return self

        return Adoption(cls, (fd,), adopt)

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Close it in this process. Idempotent.

        Pending acquires of this process raise `ClosedResourceError`, and so does any
        later use. A unit this process still holds is not released: to the other
        processes it is as if this process had died (a Lock is taken over, with
        ``inconsistent`` set; a Semaphore's units come back).
        """
        queue: _waitq.WaitQueue[None, None] | None = getattr(self, "_waitq", None)
        if queue is None:  # __init__ failed before it existed
            return
        with queue.lock:
            if self._closed:
                return
            self._closed = True
            _live.discard(self)
            if self._joined:
                entry, self._entry, self._joined = self._entry, -1, False
                self._shared.leave(entry, self._tag, self._priv, True)
            self._shared._release()
            fds = [self._ino, self._priv, self._memfd]
            self._ino = self._priv = self._memfd = -1
        self._map.close()
        queue.close(fd for fd in fds if fd >= 0)

    def _unclosed_description(self) -> str:
        return f"<aiosync.{type(self).__name__} memfd={self._memfd}>"


class _Liveness:
    """Whether a tag's process image still exists (cached for one look around)."""

    __slots__ = ("_cache", "_ident", "_shared")

    def __init__(self, ident: tuple[int, int], shared: _robust.Shared) -> None:
        self._ident = ident
        self._shared = shared
        self._cache: dict[int, bool] = {}

    def __call__(self, tag: int) -> bool:
        known = self._cache.get(tag)
        if known is None:
            pid = tag & _PID_MASK
            image = (tag >> _robust.PID_BITS) & _IMAGE_MASK
            known = self._cache[tag] = _holds(pid, image, self._ident, self._shared.hint(pid))
        return known


def _holds(pid: int, image: int, ident: tuple[int, int], hint: int) -> bool:
    """Whether process `pid` has our memory open through a description at offset `image`.

    A process we may not look at counts as alive: we never take from it.
    """
    try:
        if hint >= 0 and _description_is(pid, hint, image, ident):
            return True
        names = os.listdir(f"/proc/{pid}/fdinfo")
    except PermissionError:
        return True
    except OSError:  # no such process (a zombie's fds are gone too)
        return False
    try:
        return any(_description_is(pid, int(name), image, ident) for name in names)
    except PermissionError:
        return True


def _description_is(pid: int, fd: int, image: int, ident: tuple[int, int]) -> bool:
    try:
        st = os.stat(f"/proc/{pid}/fd/{fd}")
        if (st.st_dev, st.st_ino) != ident:
            return False
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            first = f.readline()  # b"pos:\t<offset>\n"
    except PermissionError:
        raise
    except OSError:
        return False
    key, _, value = first.partition(b":")
    return key == b"pos" and value.strip() == str(image).encode()


def _size(units: int) -> int:
    page = os.sysconf("SC_PAGE_SIZE")
    need = _robust.HEADER + 8 * units
    return -(-need // page) * page


@_share.shareable
class Lock(_Robust):
    """A lock shared by processes that does not stay held when its holder dies.

    Use it where several processes (and their tasks and threads) must take turns with
    something they share: a file, a device, a directory. ``async with lock:`` waits on
    the event loop (an fd; nothing polls), and the processes are served in the order
    they began to wait. The lock is held by a *process*: any task or thread of the
    holding process may release it, as with `asyncio.Lock`.

    If the holding process dies (exits, is killed, execs another program, or closes the
    lock) while it holds the lock, the lock does not stay held: the next acquirer (a
    waiting one first, at once) gets it with `inconsistent` True. It repairs whatever the
    dead holder left half done and calls `mark_consistent()`; releasing without that
    makes the lock unrecoverable (`BrokenResourceError` in every process).

    Sharing: like every aiosync object (``aiosync.create_subprocess_exec(share=...)``,
    multiprocessing arguments, fork). A forked child does not hold what its parent
    holds. ``with lock:`` raises `TypeError` (use ``async with``).
    """

    _kind = "Lock"
    _robust_lock = True

    def __init__(self) -> None:
        super().__init__(1)

    _not_held = RuntimeError, "release() of a Lock this process does not hold"

    def locked(self) -> bool:
        """Whether the lock is held now (by any process), or unrecoverable.

        A lock whose holder died stays locked until the next acquirer takes it over.
        """
        self._observe()
        return self._shared.word(0) != 0

    @property
    def owner_pid(self) -> int | None:
        """The pid of the process that holds the lock now, or None.

        After the holder's death, its pid until the next acquirer takes the lock over.
        """
        self._observe()
        word = self._shared.word(0)
        if word == 0 or word & _BROKEN:
            return None
        return int(word & _PID_MASK)

    @property
    def inconsistent(self) -> bool:
        """True while the lock is held after being taken over from a dead holder.

        The holder repairs what the dead one left half done, then calls
        `mark_consistent()`.
        """
        if self._closed:  # (read on every acquire by a careful holder: no call when open)
            self._check_open()
        return self._shared.word(0) & _INCONSISTENT != 0

    def mark_consistent(self) -> None:
        """Say that what the dead holder left is repaired (after an inconsistent acquire).

        Does nothing if the lock is consistent already.

        Raises:
            RuntimeError: this process does not hold the lock.
            ClosedResourceError: the lock was closed.
        """
        self._check_open()
        if not self._held:
            raise RuntimeError("mark_consistent() by a process that does not hold the Lock")
        self._shared.mark_consistent(self._tag)

    def __repr__(self) -> str:
        if self._closed:
            return "<aiosync.Lock closed>"
        word = self._shared.word(0)
        if word & _BROKEN:
            return f"<aiosync.Lock unrecoverable (pid {word & _PID_MASK} died)>"
        if word == 0:
            return "<aiosync.Lock unlocked>"
        flags = " inconsistent" if word & _INCONSISTENT else ""
        return f"<aiosync.Lock locked by pid {word & _PID_MASK}{flags}>"


@_share.shareable
class Semaphore(_Robust):
    """A bounded counting semaphore shared by processes; a dead holder's units come back.

    Use it to let at most `value` tasks, of any process, in at a time (connections to a
    server, GPU jobs, ...). Each `acquire()` takes one unit and each `release()` gives
    one back; `release()` by a process that holds no unit raises `ValueError` (as
    `asyncio.BoundedSemaphore` does). The units a process holds come back by themselves
    when it dies (exits, is killed, execs, or closes the semaphore), at once, like
    System V's ``SEM_UNDO``.

    Waiting is an fd on the event loop; processes are served in the order they began
    to wait. ``with sem:`` raises `TypeError` (use ``async with``).

    Args:
        value: how many units (1 to 65536).
    """

    _kind = "Semaphore"
    _robust_lock = False

    def __init__(self, value: int = 1) -> None:
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"value must be an int, not {type(value).__name__}")
        if not 1 <= value <= _robust.MAX_UNITS:
            raise ValueError(f"value must be from 1 to {_robust.MAX_UNITS}, not {value}")
        super().__init__(value)

    _not_held = ValueError, "release() of a Semaphore by a process that holds none of its units"

    @property
    def value(self) -> int:
        """How many units are free now (a dead process's units are free again)."""
        self._observe()
        return int(self._shared.free_units())

    def locked(self) -> bool:
        """Whether no unit is free now."""
        return self.value == 0

    def __repr__(self) -> str:
        if self._closed:
            return "<aiosync.Semaphore closed>"
        free = self._shared.free_units()
        return f"<aiosync.Semaphore value={free}/{self._units} held here={len(self._held)}>"
