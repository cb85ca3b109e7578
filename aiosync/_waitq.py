"""The wait core: who waits on a primitive, in which event loop, for what.

This is the only module that calls ``loop.add_reader`` / ``loop.remove_reader``.
(Creating and closing fds is `_fd`'s.)

Theory of operation
-------------------
Every primitive that waits on fds owns one `WaitQueue`. The queue owns the primitive's
lock, its closed state, the waiters (grouped per event loop in a `LoopSlot`, oldest
first) and the loop registrations of the fds they wait on.

* **One registration per (loop, fd)** serves all of that loop's waiters. The first
  waiter of a loop makes it; it is kept while waiters come and go, dropped lazily the
  first time the fd fires while nobody of that loop waits (that fd's alone: the
  others stay until they fire too, and the next waiter adds back only what was
  dropped; a Barrier held by a BarrierGroup's round is read instead, docs/design.md
  §11), and always before the fd is closed. (The standard loop may report an
  event after a woken waiter took what it announced: the first event after a turn is
  checked with a zero-timeout poll.)
  The loop's callback holds only a weak reference to the queue, so a primitive dropped
  without ``close()`` is still finalized (and warns).
* **The primitive decides** what an event means in its ``_on_readable(slot, fd)``,
  which the queue calls in the loop's thread with the lock held. There are two ways to
  let waiters go, one per kind of primitive:

  - *snapshots* (Barrier): the callback reads the fds, applies what it read to the
    primitive's state, and `Waiter.release`\\ s every waiter whose condition now holds,
    with a result computed at that moment. Nothing is consumed, so a waiter that stops
    waiting after its release has nothing to give back.
  - *turns* (Completion): something is there to be *taken*, and only a waiter that
    runs may take it (a busy loop can keep a woken task from running for seconds; a
    process killed meanwhile must not take anything with it). The callback only
    `ring`\\ s: it wakes the oldest waiter of its loop, at most one at a time per loop.
    The woken waiter takes for itself in `wait_turn`, with the lock held and no
    suspension point before it returns; if it finds nothing (another process was
    faster) it waits again at the head of the queue. A woken waiter cancelled before
    it runs took nothing, and the fd, still readable, rings for the next one.

* **A waiter owns its transitions**: PENDING (in its slot's queue) -> RELEASED (handed
  its result, or woken for its turn) or ABANDONED (its task stopped waiting, or its
  loop was closed). Every transition happens with the lock held; ``live`` counts the
  PENDING waiters of a slot, ``waiting`` those of all slots.
* **Closed is the queue's**: `close` sets it under the lock, fails every waiter with
  the primitive's `ClosedResourceError`, removes every registration and only then
  closes the fds. `park` checks it under the same lock, so a wait that races a
  ``close()`` from another thread raises `ClosedResourceError` and registers nothing
  (an fd number, once closed, belongs to someone else).
* **Loops come and go.** A waiter of another thread's loop is released with
  ``call_soon_threadsafe``; its registrations are removed in that loop's thread and
  the fds closed after the last removal. A loop closed with a waiter still parked is
  simply abandoned: releasing or failing that waiter is a silent no-op, never an error
  that stops the release of other loops' waiters or a ``close()``.
* In a forked child the parent's loops are not ours: every queue forgets its
  registrations (without touching the shared epoll instance) and gets a fresh lock.

What runs on every event and every wait is in C, in `_waitc` (docs/design.md §2): the
`Waiter` and its transitions, the `LoopSlot`, the queue's fields with `park`, `first`,
`pending` and `ring` (its base class `_waitc.Core`), and the loop's callback
(`_waitc.dispatch`); the primitives' own per-event work is there too (a Barrier's read
loop, a Completion's takes). This module keeps the rest: loops coming and going,
registrations, waiting in line for a turn, abandoning, the blocking twins, closing and
fork.
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

from . import _fd, _waitc
from ._errors import ClosedResourceError
from ._waitc import ABANDONED, PENDING, RELEASED, Core, LoopSlot, RLock, Waiter, dispatch

__all__ = ["ABANDONED", "PENDING", "RELEASED", "LoopSlot", "Owner", "WaitQueue", "Waiter"]

C = TypeVar("C")  # what a waiter waits for (the primitive's own type)
R = TypeVar("R")  # what it is handed when released


class Owner(Protocol):
    """What a primitive provides to its `WaitQueue`."""

    def _on_readable(self, slot: Any, fd: int) -> None:
        """One of the watched fds fired in `slot`'s loop, where someone waits.

        Called in that loop's thread, with the queue's lock held.
        """


_queues: weakref.WeakSet[WaitQueue[Any, Any]] = weakref.WeakSet()


def _forget_parent_loops() -> None:
    _waitc._forked()  # waits and holds taken so far are the parent's
    for queue in list(_queues):
        queue._after_fork()


os.register_at_fork(after_in_child=_forget_parent_loops)


class WaitQueue(Core[C, R]):
    """The waiters of one primitive, per event loop, and the fds they wait on.

    The primitive checks its condition and parks a waiter under ``lock`` (so a release
    can never slip between the two), then awaits `wait` (or the whole of `wait_turn`).

    The fields, `park` and the releasing side (`first`, `pending`, `ring`, and
    `Waiter.release`) are `_waitc.Core`'s, in C: they run on every wait and event.
    """

    __slots__ = ("__weakref__", "_partly")

    def __init__(self, owner: Owner, closed_error: Callable[[], ClosedResourceError]) -> None:
        # Re-entrant: a pending task of a closed loop that is garbage-collected while
        # this thread holds the lock (an allocation can trigger the collector anywhere)
        # closes its coroutine, which abandons its waiter under the lock again. The C
        # code takes it without a Python call.
        self.lock = RLock()
        self._owner = weakref.ref(owner)
        self._closed_error = closed_error
        # The fds still registered in a loop whose slot is not `registered` (some of
        # its fds fired with nobody waiting there and were dropped alone): slot -> fds.
        self._partly: dict[LoopSlot[C, R], tuple[int, ...]] = {}
        # And from Core: _fds = (), _slots = {} (loop -> LoopSlot), _closed = False,
        # waiting = 0 (pending waiters over all loops), turns = 0 (waiters woken for
        # their turn that have not run yet, all loops), blockers = {} (thread -> wake
        # eventfd of its blocking wait).
        _queues.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def watch(self, *fds: int) -> None:
        """Set the fds waiters wait on (before anyone waits)."""
        assert not self._slots, "watch() after waiting began"
        self._fds = fds

    # -- the waiting side -------------------------------------------------------------

    # wait(waiter) is Core's, in C: await it to wait for `waiter` to be released; on any
    # exception (cancellation, a timeout, the coroutine closed) it calls `abandon`.

    def abandon(self, waiter: Waiter[C, R]) -> None:
        """`waiter`'s task stopped waiting (cancelled, timed out, failed)."""
        with self.lock:
            waiter._abandon()
            if waiter.state == ABANDONED:
                self._compact(waiter.slot)

    # wait_turn(cond, take) is Core's too: await it to wait in line until `take`
    # succeeds in this task. The caller has tried its fast path already (a take when
    # nobody of this process is in line: ``waiting`` and ``turns`` both 0). It parks a
    # waiter at the end of its loop's line; each time a ring wakes it, ``take(result)``
    # runs in this task with the lock held; if it finds nothing, the waiter waits again
    # at the head of the line. On cancellation nothing is left behind, and nothing was
    # taken.

    # -- the releasing side (lock held) ----------------------------------------------

    def slots(self) -> Iterator[LoopSlot[C, R]]:
        """Every loop's slot (releasing never adds or removes one)."""
        return iter(self._slots.values())

    def reregister(self, slot: LoopSlot[C, R]) -> None:
        """Register `slot`'s fds afresh (in its loop's thread, lock held).

        For an fd whose loop reports an event only once per registration (uvloop and a
        pipe's write end): drop the spent registration; keep a new one if anyone waits.
        """
        self._unregister(slot)
        if slot.live:
            self._register(slot)

    def _compact(self, slot: LoopSlot[C, R]) -> None:
        # Abandoned waiters are normally dropped when things are handed out; if nothing
        # ever is, don't let them pile up.
        if len(slot.waiters) > 2 * slot.live + 16:
            slot.waiters = deque(w for w in slot.waiters if w.state == PENDING)

    # -- threads waiting without a loop (the blocking twins) ---------------------------

    def block(self, fds: tuple[int, ...], timeout: float | None) -> None:
        """Sleep in this thread until one of `fds` is readable, another thread calls
        `wake_blockers` (or `close`), or `timeout` seconds pass. Call without ``lock``;
        the caller re-checks its condition afterwards, and calls `unblock` when done.

        A change another thread makes to the state without touching `fds` (it drained
        them for a loop's waiters, aborted, closed) reaches this thread through its own
        wake eventfd. The first call only registers that eventfd and returns at once,
        so a change made since the caller's check is not missed.
        """
        me = threading.get_ident()
        with self.lock:
            if self._closed:
                raise self._closed_error()
            wake = self.blockers.get(me)
            if wake is None:
                self.blockers[me] = _fd.eventfd()
                return
        _fd.wait_readable((*fds, wake), timeout)
        _fd.read_eventfd(wake)

    def unblock(self) -> None:
        """This thread's blocking wait is over: close its wake eventfd, if it has one."""
        with self.lock:
            wake = self.blockers.pop(threading.get_ident(), -1)
        _fd.close(wake)

    def wake_blockers(self) -> None:
        """Wake every other thread sleeping in `block`. Call with ``lock`` held."""
        me = threading.get_ident()
        for thread, wake in self.blockers.items():
            if thread != me:
                _fd.write_eventfd(wake, 1)

    # -- registrations ----------------------------------------------------------------

    def _new_slot(self, loop: asyncio.AbstractEventLoop) -> LoopSlot[C, R]:
        # Forget loops that were closed since (e.g. an earlier asyncio.run()); closing a
        # loop drops its registrations with it.
        for old in [old for old in self._slots if old.is_closed()]:
            dead = self._slots.pop(old)
            self._partly.pop(dead, None)
            self.waiting -= dead.live
            self.turns -= dead.woken is not None
        # The standard loop runs callbacks already scheduled (a woken waiter's task)
        # before the handles of the fd events it just collected: an event may then
        # report what that waiter has since taken. uvloop runs fd callbacks first.
        stale_events = isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        slot: LoopSlot[C, R] = LoopSlot(self, loop, stale_events)
        self._slots[loop] = slot
        return slot

    def _register(self, slot: LoopSlot[C, R]) -> None:
        """Register every fd of `slot`'s loop that is not (all, or those dropped alone)."""
        queue_ref = weakref.ref(self)
        kept = self._partly.pop(slot, ())
        for fd in self._fds:
            if fd not in kept:
                slot.loop.add_reader(fd, dispatch, queue_ref, slot, fd)
        slot.registered = True

    def _registered(self, slot: LoopSlot[C, R]) -> tuple[int, ...]:
        """The fds registered in `slot`'s loop now."""
        return self._fds if slot.registered else self._partly.get(slot, ())

    def _unregister(self, slot: LoopSlot[C, R], fd: int | None = None) -> None:
        """Drop `slot`'s registrations, or only `fd`'s (it fired with nobody of that
        loop waiting: the others stay, until they fire too or the queue closes; a group
        whose member's peer runs a round ahead then re-adds one reader, not all). Call
        in its loop's thread, ``lock`` held."""
        kept = self._fds if slot.registered else self._partly.pop(slot, ())
        slot.registered = False
        if fd is None:
            gone, kept = kept, ()
        elif fd in kept:
            gone, kept = (fd,), tuple([f for f in kept if f != fd])
        else:
            gone = ()
        if kept:
            self._partly[slot] = kept
        if gone and not slot.loop.is_closed():
            for f in gone:
                slot.loop.remove_reader(f)

    # -- closing ----------------------------------------------------------------------

    def close(self, fds: Iterable[int]) -> None:
        """Close the queue: fail every waiter, wake blocked threads, drop every
        registration, then close `fds` (the primitive's, taken under ``lock``).

        Registrations of a loop running in another thread are removed in that thread,
        by a callback queued *before* its waiters' failures (so their tasks cannot end,
        and the loop close, first); the fds are closed after the last removal (or, if
        such a loop is closed with the callback still queued, when that callback is
        dropped). Waiters of closed loops are abandoned silently. Idempotent.
        """
        with self.lock:
            if self._closed:
                return
            self._closed = True
            fds = list(fds)
            self.wake_blockers()
            me = threading.get_ident()
            remote: list[LoopSlot[C, R]] = []
            for slot in self._slots.values():
                if not self._registered(slot) or slot.loop.is_closed():
                    self._partly.pop(slot, None)
                    slot.registered = False
                elif slot.thread == me or not slot.loop.is_running():
                    self._unregister(slot)
                else:
                    remote.append(slot)
            countdown = _Countdown(len(remote), fds)
            for slot in remote:
                try:
                    slot.loop.call_soon_threadsafe(self._unregister_remote, slot, countdown)
                except RuntimeError:  # closed meanwhile: its registrations are gone
                    countdown.done()
            for slot in self._slots.values():
                for waiter in slot.waiters:
                    if waiter.state == PENDING:
                        waiter.fail(self._closed_error())
                slot.waiters.clear()
            self._slots = {}
            self.waiting = self.turns = 0
        if not remote:
            countdown.close_fds()

    def _unregister_remote(self, slot: LoopSlot[C, R], countdown: _Countdown) -> None:
        try:
            with self.lock:
                self._unregister(slot)
        finally:
            countdown.done()

    def _after_fork(self) -> None:
        self.lock = RLock()
        self._slots = {}
        self._partly = {}
        self.waiting = self.turns = self.held = 0  # the parent's group rounds are not here
        for wake in self.blockers.values():  # the parent's threads are not here
            _fd.close(wake)
        self.blockers = {}


class _Countdown:
    """Closes fds once every remote loop has dropped its registrations.

    Should such a loop be closed with the removal still queued, the queued callback is
    dropped with it, and so is the last reference to this object: the fds are closed
    then (a finalizer), never twice.
    """

    __slots__ = ("__weakref__", "fds", "left", "lock")

    def __init__(self, left: int, fds: list[int]) -> None:
        self.left = left
        self.fds = fds
        self.lock = threading.Lock()
        weakref.finalize(self, _close_fds, fds)

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            self.close_fds()

    def close_fds(self) -> None:
        _close_fds(self.fds)


def _close_fds(fds: list[int]) -> None:
    """Close `fds` and empty the list (so that a second call closes nothing)."""
    while fds:
        _fd.close(fds.pop())


def no_running_loop(call: str, instead: str) -> None:
    """Refuse a blocking twin inside a running loop, which it would block."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{call} would block the running event loop; {instead} instead")
