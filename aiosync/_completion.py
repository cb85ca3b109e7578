"""Completion: the Linux kernel's ``struct completion``, across tasks, threads and processes.

Theory of operation
-------------------
The kernel's completion is a counter ``done`` and a wait queue: ``complete()`` adds one
and wakes one exclusive waiter, ``wait_for_completion()`` sleeps until ``done > 0`` and
takes one, ``complete_all()`` sets ``done`` to "infinite" so that every waiter, now and
later, passes without taking anything, and ``reinit_completion()`` resets it to zero.

Here the counter lives in the kernel too, so that every process holding the fds shares
it, in two eventfds:

* ``count``, in **semaphore mode**: ``complete()`` writes 1; a waiter takes a count with
  one non-blocking read, which the kernel performs atomically and which takes exactly
  one. (A single plain eventfd would have to be read whole and the rest written back:
  other processes would see 0 in between, and a process killed in between would lose
  the rest.)
* ``all``, a plain eventfd used as a flag: ``complete_all()`` writes 1 to it, and while
  its value is non-zero the completion is "all done". Nobody reads it except
  ``reinit()``, which drains both.

**Who takes a count.** As in the kernel, a waiter takes its count itself, when it runs:
the read that takes it happens inside the task that then returns from ``wait()`` (or
the thread that returns from ``wait_blocking()``), with no suspension point in
between. The loop's fd callback never reads ``count``: it only wakes ("rings") the
oldest waiter of its loop, one at a time, and the woken task takes its turn in
`WaitQueue.wait_turn`. So a waiting process killed at any instruction, even while its
loop is busy for seconds with woken tasks that have not run, takes nothing with it. A
woken waiter that finds nothing (a waiter in another process was faster) waits again,
first in its loop's line; one cancelled before it ran took nothing, and ``count``, still
readable, rings for the next. While ``all`` is set, the callback releases every waiter
of its loop at once, taking nothing.

``complete()`` and ``complete_all()`` only write to an eventfd: they take no lock, so
they are safe from any thread and from a signal handler.

What runs on every hand-off (the callback's rings, a waiter's take, ``complete()``'s
write, the zero-timeout poll of both eventfds) is in C: the base class
`_waitc.CompletionCore`. This class keeps the rest.
"""

from __future__ import annotations

import enum
import time
from typing import Any, Self

from . import _fd, _share, _waitc, _waitq
from ._errors import ClosedResourceError
from ._resource import Resource
from ._share import Adoption

__all__ = ["Completion"]


class Ring(enum.Enum):
    """Why a waiter was woken."""

    TURN = "a count may be there: take it"
    ALL = "complete_all() is in force: go, taking nothing"


@_share.shareable
class Completion(_waitc.CompletionCore, Resource):
    """A counted "this happened" signal between tasks, threads and processes.

    Use it when one side must tell another that something is done, any number of
    times: a child's "I am ready", a worker's "one job finished". Each `complete()` lets
    exactly one `wait()` through, whichever came first; `complete_all()` lets every
    current and future `wait()` through until `reinit()`. The waiter may be in another
    task, thread or process (share it with `aiosync.create_subprocess_exec(share=...)`
    or as a `multiprocessing.Process` argument).

    Cancelling or timing out a `wait()` loses nothing: a count leaves the completion
    only inside the task that returns it from `wait()`. A waiting process that is
    killed, at any moment, takes nothing with it.

    A Completion does not notice that the process that was to complete it died: pair it
    with a `Barrier` (whose `Barrier.wait_abortion` does) where that matters.

    Sharing: any number of processes may have it, through
    ``aiosync.create_subprocess_exec(share=...)`` or as a multiprocessing ``Process``
    argument (fork, spawn, forkserver). A closed completion is refused with
    `SharingError` before the child starts; pickling it anywhere else raises `TypeError`.
    """

    def __init__(self) -> None:
        self._closed = True  # until every fd exists, for __del__
        self._waitq: _waitq.WaitQueue[None, Ring] = _waitq.WaitQueue(self, _closed_error)
        self._ring_turn, self._ring_all = Ring.TURN, Ring.ALL
        self._count = self._all = -1
        self._count = _fd.eventfd(semaphore=True)
        try:
            self._all = _fd.eventfd()
        except BaseException:
            _fd.close(self._count)
            raise
        self._waitq.watch(self._count, self._all)
        self._closed = False

    @classmethod
    def _adopt(cls, count: int, all_: int) -> Self:
        self = cls.__new__(cls)
        self._waitq = _waitq.WaitQueue(self, _closed_error)
        self._ring_turn, self._ring_all = Ring.TURN, Ring.ALL
        self._count, self._all = count, all_
        self._waitq.watch(count, all_)
        self._closed = False
        return self

    # -- completing (never blocks, takes no lock) -------------------------------------

    def complete(self) -> None:
        """Signal one completion: exactly one `wait()`, now or later, gets through.

        Use it once per thing that happened ("this worker is ready"). Safe to call from
        any thread, from a signal handler, or from another process holding the
        completion; it never blocks and takes no lock.

        Raises:
            OverflowError: too many completions are pending (the eventfd's counter is
                full: about 2**64 of them).
            ClosedResourceError: the completion was closed in this process.
        """
        self._complete()  # in C: raises ClosedResourceError once closed, too

    def complete_all(self) -> None:
        """Let every current and future `wait()` through, until `reinit()`.

        Use it for a state that stays done ("shut down now"); waits pass without taking
        anything. Never blocks.

        Raises:
            ClosedResourceError: the completion was closed in this process.
        """
        self._check_open()
        _fd.write_eventfd(self._all, 1)

    # -- taking --------------------------------------------------------------------------

    def try_wait(self) -> bool:
        """Take one completion if one is available (or all are done); never blocks.

        Returns:
            True if it took one, or if all are done (then it takes nothing); False if
            nothing was available.

        Raises:
            ClosedResourceError: the completion was closed in this process.
        """
        self._check_open()
        return self._try_take()

    def done(self) -> bool:
        """Whether a `wait()` would get through now. Never takes anything.

        Returns:
            True if a completion is available or all are done.

        Raises:
            ClosedResourceError: the completion was closed in this process.
        """
        self._check_open()
        return any(self._poll())

    async def wait(self) -> None:
        """Wait for a completion and take it (take nothing while all are done).

        Returns at once, without a loop round trip, when one is available and no other
        task of this process is in line for it. Waiters of one event loop are served oldest first.
        Cancellation or a timeout (``async with asyncio.timeout(...)``) loses nothing:
        the count is taken only by the task that returns. A completer that dies is not
        noticed: pair the wait with a `Barrier`'s `wait_abortion()` where that matters.

        Raises:
            ClosedResourceError: the completion was closed, before or during the wait.
        """
        queue = self._waitq
        # The fast path, without a lock or a loop round trip: nobody of this process is
        # in line (pending, or woken and not run yet) and a count is there (try_wait()
        # past its check: _try_take raises ClosedResourceError once closed, too).
        if not (queue.waiting or queue.turns) and self._try_take():
            return
        await queue.wait_turn(None, self._take)

    # _take(ring) (a woken waiter's turn, lock held: take a count, or pass while all
    # are done) is _waitc.CompletionCore's, in C, as are _try_take() (try_wait() past
    # its check), _complete() (complete()'s write), _poll() and _on_readable: they run
    # on every hand-off.

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """`wait()` for code without a running loop: block this thread until it takes one.

        Args:
            timeout: seconds to wait at most; None waits for ever.

        Returns:
            True: a completion was taken, or all are done. (A timeout raises; it is never
            a return value.)

        Raises:
            TimeoutError: `timeout` seconds passed first, having taken nothing.
            RuntimeError: an event loop is running in this thread (await `wait()`
                instead).
            ClosedResourceError: the completion was closed, also by another thread
                meanwhile.
        """
        self._check_open()
        _waitq.no_running_loop("wait_blocking()", "await wait()")
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self._waitq
        try:
            while not self.try_wait():  # raises ClosedResourceError once closed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError("the completion wait timed out")
                # close() in another thread does not end a poll() of these fds; the
                # queue wakes this thread instead.
                queue.block((self._count, self._all), remaining)
            return True
        finally:
            queue.unblock()

    def reinit(self) -> None:
        """Back to "nothing completed": drop pending completions and the all-done state.

        Use it between rounds, when everyone agrees nobody waits. As in the kernel, the
        caller must make sure nobody waits (in any process) while it reinitializes:
        completions that arrive meanwhile may be dropped.

        Raises:
            RuntimeError: tasks of this process wait on it.
            ClosedResourceError: the completion was closed in this process.
        """
        self._check_open()
        queue = self._waitq
        with queue.lock:
            if queue.waiting or queue.turns:  # parked, or woken and not run yet
                raise RuntimeError("reinit() while tasks of this process wait on it")
            _fd.read_eventfd(self._all)
            while _fd.read_eventfd(self._count):
                pass

    def _all_done(self) -> bool:
        return self._poll()[0]

    # -- ringing (the fd callback) ----------------------------------------------------
    #
    # _on_readable(slot, fd) is _waitc.CompletionCore's. Called with the lock held, it
    # reads nothing (see the module doc): an event of `count` rings the oldest waiter
    # of the slot's loop for its turn (`WaitQueue.ring`, with Ring.TURN); one of `all`
    # releases every waiter of that loop with Ring.ALL, taking nothing.

    # -- sharing ----------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        return {}, {"count": self._count, "all": self._all}

    def _after_share(self, pid: int) -> None:
        pass

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption:
        _share.expect_keys(name, state, set())
        _share.expect_keys(name, fds, {"count", "all"})
        count = _fd.check(fds["count"], "semaphore-eventfd", name=name)
        all_ = _fd.check(fds["all"], "eventfd", name=name)

        def adopt() -> Completion:
            return cls._adopt(_fd.own(count), _fd.own(all_))

        return Adoption(cls, (count, all_), adopt)

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the completion's fds. Idempotent.

        Pending waits of this process raise `ClosedResourceError`, and so does any later
        use. Other processes holding the completion are not affected.
        """
        if self._closed:
            return
        self._closed = True
        with self._waitq.lock:
            fds = [self._count, self._all]
            self._count = self._all = -1
        self._waitq.close(fds)

    def _unclosed_description(self) -> str:
        return f"<aiosync.Completion fds={self._count},{self._all}>"

    def __repr__(self) -> str:
        if self._closed:
            return "<aiosync.Completion closed>"
        if self._all_done():
            return "<aiosync.Completion all_done>"
        available = _fd.eventfd_value(self._count)
        return f"<aiosync.Completion available={available} waiting={self._waitq.waiting}>"


def _closed_error() -> ClosedResourceError:
    return ClosedResourceError("the Completion was closed while waiting")
