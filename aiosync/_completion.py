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
  one. A process that is only waiting holds nothing of the count until that read
  returns, so killing it (even with SIGKILL) loses nothing. (A single plain eventfd
  would have to be read whole and the rest written back: other processes would see 0
  in between, and a process killed in between would lose the rest.)
* ``all``, a plain eventfd used as a flag: ``complete_all()`` writes 1 to it, and while
  its value is non-zero the completion is "all done". Nobody reads it except
  ``reinit()``, which drains both.

A waiter checks ``all`` (a zero-timeout poll), then tries to take a count; if neither
lets it through it parks in the `WaitQueue`, whose loop registrations watch both fds.
When ``count`` fires, the callback takes one count per waiter, oldest first among this
loop's waiters, and releases each with True ("took a count"); when ``all`` is set, it
releases every waiter with False ("took nothing"). A count handed to a waiter whose task
was cancelled in the meantime comes back through ``_give_back``, which writes it back
to ``count`` for the next waiter in any process: no count is lost or duplicated.

``complete()`` and ``complete_all()`` only write to an eventfd: they take no lock, so
they are safe from any thread and from a signal handler.

The one window the kernel shares: a process killed after its read of ``count``
returned but before its task resumed has consumed that count, as a kernel waiter woken
and then killed has.
"""

from __future__ import annotations

import asyncio
import select
import threading
import time
from typing import Any, Self

from . import _fd, _share
from ._errors import ClosedResourceError
from ._resource import Resource

__all__ = ["Completion"]


@_share.shareable
class Completion(Resource):
    """A counted "this happened" signal between tasks, threads and processes.

    Use it when one side must tell another that something is done, any number of
    times: a child's "I am ready", a worker's "one job finished". Each `complete()` lets
    exactly one `wait()` through, whichever came first; `complete_all()` lets every
    current and future `wait()` through until `reinit()`. The waiter may be in another
    task, thread or process (share it with `aiosync.create_subprocess_exec(share=...)`
    or as a `multiprocessing.Process` argument).

    Cancelling or timing out a `wait()` loses nothing: a count it had already taken is
    put back for the next waiter. A waiting process that is killed takes nothing with it.
    """

    def __init__(self) -> None:
        self._closed = True  # until every fd exists, for __del__
        self._pollers = threading.local()
        self._waitq: _fd.WaitQueue[bool] = _fd.WaitQueue(self)
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
        self._pollers = threading.local()
        self._waitq = _fd.WaitQueue(self)
        self._count, self._all = count, all_
        self._waitq.watch(count, all_)
        self._closed = False
        return self

    # -- completing (never blocks, takes no lock) -------------------------------------

    def complete(self) -> None:
        """Signal one completion: exactly one `wait()`, now or later, gets through.

        Safe to call from any thread, from a signal handler, or from another process
        holding the completion.
        """
        self._check_open()
        if not _fd.write_eventfd(self._count, 1):
            raise OverflowError("too many completions are pending (the eventfd is full)")

    def complete_all(self) -> None:
        """Let every current and future `wait()` through, until `reinit()`."""
        self._check_open()
        _fd.write_eventfd(self._all, 1)

    # -- taking --------------------------------------------------------------------------

    def try_wait(self) -> bool:
        """Take one completion if one is available (or all are done); never blocks."""
        self._check_open()
        all_done, available = self._poll()
        if all_done:
            return True
        return available and _fd.read_eventfd(self._count) != 0

    def done(self) -> bool:
        """Whether a `wait()` would get through now. Never takes anything."""
        self._check_open()
        return any(self._poll())

    async def wait(self) -> None:
        """Wait for a completion and take it (take nothing while all are done).

        Returns at once, without a loop round trip, when one is available. Waiters of
        one event loop are served oldest first. Cancellation or a timeout
        (``async with asyncio.timeout(...)``) loses nothing: a completion already taken
        for this wait is put back for the next waiter. ``close()`` meanwhile raises
        `ClosedResourceError`.
        """
        if self.try_wait():
            return
        queue = self._waitq
        with queue.lock:
            waiter = queue.park()
        await queue.wait(waiter)

    def wait_blocking(self, timeout: float | None = None) -> bool:
        """`wait()` for code without a running loop; False if `timeout` seconds passed."""
        self._check_open()
        _no_running_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        queue = self._waitq
        try:
            while not self.try_wait():  # raises ClosedResourceError once closed
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                # close() in another thread does not end a poll() of these fds; the
                # queue wakes this thread instead.
                queue.block((self._count, self._all), remaining)
            return True
        finally:
            queue.unblock()

    def reinit(self) -> None:
        """Back to "nothing completed": drop pending completions and the all-done state.

        As in the kernel, the caller must make sure nobody waits (in any process) while
        it reinitializes; waiters of this process make it raise `RuntimeError`.
        """
        self._check_open()
        with self._waitq.lock:
            if self._waitq.waiting:
                raise RuntimeError("reinit() while tasks of this process wait on it")
            _fd.read_eventfd(self._all)
            while _fd.read_eventfd(self._count):
                pass

    def _all_done(self) -> bool:
        return self._poll()[0]

    def _poll(self) -> tuple[bool, bool]:
        """(all done, a count is available) now: one zero-timeout poll, nothing read."""
        # One poll object per thread (one refuses concurrent polls), kept: building one
        # per call costs more than the poll(2) itself, and this is every wait's path.
        try:
            poller: select.poll = self._pollers.poller
        except AttributeError:
            poller = self._pollers.poller = select.poll()
            poller.register(self._count, select.POLLIN)
            poller.register(self._all, select.POLLIN)
        all_done = available = False
        for fd, events in poller.poll(0):
            if events & select.POLLIN:
                if fd == self._all:
                    all_done = True
                else:
                    available = True
        return all_done, available

    # -- handing out (the fd callback) ----------------------------------------------------

    def _on_readable(self, slot: _fd.LoopSlot[bool], fd: int) -> None:
        # Called with the lock held (see _fd.Owner).
        queue = self._waitq
        if self._closed:
            return
        if fd == self._all:  # complete_all() is in force: everyone goes, taking nothing
            for any_slot in queue.slots():
                for everyone in queue.pending(any_slot):
                    queue.release(everyone, False)
            return
        # A count: oldest first among this loop's waiters; another loop's registration
        # serves its own waiters. (No look at the all-done flag first, which would cost
        # a poll per hand-off: if complete_all() is in force too, its fd's callback
        # releases everyone else, and a count taken meanwhile is one reinit() drops.)
        while (oldest := queue.first(slot)) is not None:
            if not _fd.read_eventfd(self._count):
                break
            queue.release(oldest, True)

    def _give_back(self, took_count: bool) -> None:
        # A waiter that stopped waiting had been handed a count: put it back.
        if took_count and not self._closed:
            _fd.write_eventfd(self._count, 1)

    # -- sharing ----------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        self._check_open()
        return {}, {"count": self._count, "all": self._all}

    def _after_share(self, pid: int) -> None:
        pass

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Self:
        _share.expect_keys(name, state, set())
        _share.expect_keys(name, fds, {"count", "all"})
        count = _fd.check(fds["count"], "semaphore-eventfd", name=name)
        all_ = _fd.check(fds["all"], "eventfd", name=name)
        return cls._adopt(_fd.own(count), _fd.own(all_))

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Close the completion's fds. Idempotent; pending waits raise `ClosedResourceError`.

        Other processes holding the completion are not affected.
        """
        if self._closed:
            return
        self._closed = True
        with self._waitq.lock:
            fds = [self._count, self._all]
            self._count = self._all = -1
        self._waitq.close(fds, _closed_error)

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


def _no_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError("wait_blocking() would block the running event loop; await wait() instead")
