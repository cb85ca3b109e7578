"""File descriptors and their event-loop registrations.

This is the only module that creates or closes a file descriptor, and the only one
that calls ``loop.add_reader`` / ``loop.remove_reader``.

Theory of operation
-------------------
Every primitive that waits on fds owns one `WaitQueue`. The queue owns the primitive's
lock, the futures of everyone waiting on it (grouped per event loop, oldest first) and
the reader registrations of the fds it watches.

* One registration per (loop, fd) serves all of that loop's waiters (SPEC §5.1). A
  registration is made by the first waiter of a loop and kept while waiters come and
  go; it is dropped lazily, the first time the fd fires while nobody of that loop
  waits, and always before the fd is closed (§5.2). The loop's callback holds only a
  weak reference to the primitive, so a primitive dropped without ``close()`` is still
  finalized (and warns).
* The primitive decides what to read and whom to release in its ``_on_readable``
  callback, which the queue calls with its lock held. A released waiter's future gets
  the result computed at release time; a value read from an fd is applied to the
  primitive's state before any future is resolved, so a ``CancelledError`` can never
  lose it (§5.4).
* A waiter cancelled after it was handed something gives it back through the
  primitive's ``_give_back`` (``Task.cancel()`` still raises in a task whose future
  already holds a result). Waiters whose future is already done are skipped when
  handing things out, whatever order the loop runs callbacks in.
* A waiter of another thread's loop is released with ``call_soon_threadsafe``; its
  registrations are removed in that loop's thread, and the fds are closed only after
  the last removal (§5.6).
* In a forked child the parent's loops are not ours: every queue forgets its
  registrations (without touching the shared epoll instance) and gets a fresh lock.
"""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import select
import stat
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, Generic, Literal, Protocol, TypeVar

from ._errors import SharingError

T = TypeVar("T")

# ---------------------------------------------------------------------------------------
# Creating, checking and closing fds
# ---------------------------------------------------------------------------------------

EFD_FLAGS: Final = os.EFD_CLOEXEC | os.EFD_NONBLOCK


def eventfd(*, semaphore: bool = False) -> int:
    """A new eventfd with value 0, close-on-exec and non-blocking."""
    return os.eventfd(0, EFD_FLAGS | (os.EFD_SEMAPHORE if semaphore else 0))


def pipe() -> tuple[int, int]:
    """A new (read end, write end) pipe, both close-on-exec and non-blocking."""
    return os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)


def memfd(name: str, size: int) -> int:
    """A new anonymous shared-memory file of `size` bytes, close-on-exec."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def map_shared(fd: int, size: int) -> mmap.mmap:
    """Map the first `size` bytes of `fd` shared, readable and writable.

    CPython's mmap keeps a close-on-exec duplicate of `fd` of its own, which the
    mapping's ``close()`` closes; `fd` itself stays the caller's.
    """
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)


def file_size(fd: int) -> int:
    """The size in bytes of the file `fd` refers to (e.g. a memfd)."""
    return os.fstat(fd).st_size


def close(fd: int) -> None:
    """Close `fd`. The caller must have removed every reader registration first."""
    if fd >= 0:
        try:
            os.close(fd)
        except OSError as exc:  # pragma: no cover - only a bug elsewhere gets here
            if exc.errno != errno.EBADF:
                raise


def read_eventfd(fd: int) -> int:
    """Read (and so drain, or in semaphore mode take one from) an eventfd; 0 if empty."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def write_eventfd(fd: int, value: int) -> bool:
    """Add `value` to an eventfd; False if the kernel refused (e.g. it would overflow)."""
    try:
        os.eventfd_write(fd, value)
    except OSError:
        return False
    return True


def hung_up(fd: int) -> bool:
    """True if the other end of the pipe `fd` belongs to is closed (a zero-timeout poll)."""
    poller = select.poll()
    poller.register(fd, 0)  # POLLHUP, POLLERR and POLLNVAL are always reported
    return bool(poller.poll(0))


def wait_readable(fds: Iterable[int], timeout: float | None) -> bool:
    """Block the calling thread until one of `fds` is readable (or hung up).

    Returns False if `timeout` seconds passed first. Only for the blocking twins of
    the async waits; never called with a running event loop.
    """
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
    return bool(poller.poll(ms))


def readable(*fds: int) -> list[int]:
    """Which of `fds` are readable right now (a zero-timeout poll; nothing is read)."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, events in poller.poll(0) if events & select.POLLIN]


def eventfd_value(fd: int) -> int:
    """An eventfd's current value, read from /proc without consuming it (for repr)."""
    return int(_fdinfo(fd).get("eventfd-count", "0"), 16)


def own(fd: int) -> int:
    """Make an fd received from another process ours: close-on-exec and non-blocking.

    Never rely on anyone else (a parent, uvloop's ``pass_fds``) to have set these.
    """
    os.set_inheritable(fd, False)
    os.set_blocking(fd, False)
    return fd


def dup(fd: int) -> int:
    """A close-on-exec duplicate of `fd`."""
    return os.dup(fd)  # os.dup returns a non-inheritable fd


FdKind = Literal["eventfd", "semaphore-eventfd", "pipe-read", "pipe-write", "memfd"]


def check(fd: object, kind: FdKind, *, name: str) -> int:
    """Check that `fd` (from an untrusted description) is an open fd of `kind`.

    Raises `SharingError` naming the object and what was found instead.
    """
    if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
        raise SharingError(f"{name}: {fd!r} is not a file descriptor number")
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
        mode = os.fstat(fd).st_mode
        flags = os.get_blocking(fd), _access_mode(fd)
    except OSError:
        raise SharingError(f"{name}: fd {fd} is not open in this process") from None
    _, access = flags
    if kind in ("eventfd", "semaphore-eventfd"):
        if target != "anon_inode:[eventfd]":
            raise SharingError(f"{name}: fd {fd} should be an eventfd but is {target!r}")
        semaphore = _fdinfo(fd).get("eventfd-semaphore")
        want = "1" if kind == "semaphore-eventfd" else "0"
        if semaphore is not None and semaphore != want:
            mode_name = "semaphore" if want == "1" else "plain"
            raise SharingError(f"{name}: fd {fd} should be a {mode_name} eventfd")
        if access != os.O_RDWR:
            raise SharingError(f"{name}: eventfd {fd} is not open for reading and writing")
    elif kind in ("pipe-read", "pipe-write"):
        if not stat.S_ISFIFO(mode) or not target.startswith("pipe:"):
            raise SharingError(f"{name}: fd {fd} should be a pipe but is {target!r}")
        want_access = os.O_RDONLY if kind == "pipe-read" else os.O_WRONLY
        if access != want_access:
            end = "read" if kind == "pipe-read" else "write"
            raise SharingError(f"{name}: fd {fd} is not the {end} end of a pipe")
    else:
        if not stat.S_ISREG(mode) or not target.startswith("/memfd:"):
            raise SharingError(f"{name}: fd {fd} should be a memfd but is {target!r}")
        if access != os.O_RDWR:
            raise SharingError(f"{name}: memfd {fd} is not open for reading and writing")
    return fd


def _access_mode(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE


def _fdinfo(fd: int) -> dict[str, str]:
    info: dict[str, str] = {}
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            info[key.strip()] = value.strip()
    return info


def open_fd_count() -> int:
    """How many fds this process has open (for leak checks)."""
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------------------------
# Waiting on fds from event loops
# ---------------------------------------------------------------------------------------

PENDING: Final = 0  # in the queue, future not yet resolved by us
RELEASED: Final = 1  # handed its result (maybe via another thread's loop)
ABANDONED: Final = 2  # its task stopped waiting (cancelled, timed out) before release


class Waiter(Generic[T]):
    """One task waiting on a `WaitQueue`. `arg` is the primitive's own data."""

    __slots__ = ("arg", "future", "slot", "state")

    def __init__(self, future: asyncio.Future[T], arg: Any, slot: LoopSlot[T]) -> None:
        self.future = future
        self.arg = arg
        self.slot = slot
        self.state = PENDING


class LoopSlot(Generic[T]):
    """The waiters and registrations of one event loop."""

    __slots__ = ("live", "loop", "registered", "thread", "waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.thread = threading.get_ident()
        self.waiters: deque[Waiter[T]] = deque()
        self.live = 0  # waiters in state PENDING
        self.registered = False


class Owner(Protocol):
    """What a primitive provides to its `WaitQueue`."""

    def _on_readable(self, slot: Any, fd: int) -> None:
        """One of the watched fds fired in `slot`'s loop, whose waiters are not all gone.

        Called in that loop's thread, with the queue's lock held (one lock round trip
        per event: the check that someone waits and the primitive's work are one step).
        """

    def _give_back(self, result: Any) -> None:
        """A result was handed to a waiter that stopped waiting; take it back."""


_queues: weakref.WeakSet[WaitQueue[Any]] = weakref.WeakSet()


def _forget_parent_loops() -> None:
    for queue in list(_queues):
        queue._after_fork()


os.register_at_fork(after_in_child=_forget_parent_loops)


def _dispatch(owner_ref: weakref.ref[Owner], slot: LoopSlot[Any], fd: int) -> None:
    owner = owner_ref()
    if owner is None:  # finalized without close(); __del__ normally prevents this
        slot.loop.remove_reader(fd)
        return
    queue: WaitQueue[Any] = owner._waitq  # type: ignore[attr-defined]
    with queue.lock:
        if not slot.live or queue.first(slot) is None:
            # Nobody of this loop waits: drop the registration now (lazily) rather than
            # read an fd nobody asked about or be called again and again for it. A waiter
            # whose task was cancelled but has not resumed yet (uvloop runs fd callbacks
            # before it) does not count: `first` settles it.
            queue._unregister(slot)
            return
        owner._on_readable(slot, fd)


def _deliver(queue: WaitQueue[T], waiter: Waiter[T], result: T) -> None:
    """Resolve a waiter released from another thread, in its own loop's thread."""
    if waiter.future.done():
        queue._owner_give_back(result)
    else:
        waiter.future.set_result(result)


class WaitQueue(Generic[T]):
    """The waiters of one primitive, per event loop, and the fds they wait on.

    The primitive checks its condition and parks a waiter under ``lock`` (so a release
    can never slip between the two), then awaits `wait`.
    """

    __slots__ = (
        "__weakref__",
        "_closing",
        "_fds",
        "_owner",
        "_slots",
        "blockers",
        "lock",
        "waiting",
    )

    def __init__(self, owner: Owner) -> None:
        self.lock = threading.Lock()
        self._owner = weakref.ref(owner)
        self._fds: tuple[int, ...] = ()
        self._slots: dict[asyncio.AbstractEventLoop, LoopSlot[T]] = {}
        self._closing = False
        self.waiting = 0  # pending waiters over all loops
        self.blockers: dict[int, int] = {}  # thread -> wake eventfd of its blocking wait
        _queues.add(self)

    # -- setup ------------------------------------------------------------------------

    def watch(self, *fds: int) -> None:
        """Set the fds waiters wait on (once, before anyone waits)."""
        assert not self._slots, "watch() after waiting began"
        self._fds = fds

    # -- the waiting side (called by the primitive) -----------------------------------

    def park(self, arg: Any = None) -> Waiter[T]:
        """Queue a waiter of the running loop. Call with ``lock`` held."""
        loop = asyncio.get_running_loop()
        slot = self._slots.get(loop)
        if slot is None:
            slot = self._new_slot(loop)
        waiter: Waiter[T] = Waiter(loop.create_future(), arg, slot)
        slot.waiters.append(waiter)
        slot.live += 1
        self.waiting += 1
        if not slot.registered:
            self._register(slot)
        return waiter

    async def wait(self, waiter: Waiter[T]) -> T:
        """Wait for `waiter` to be released; on cancellation, leave nothing behind."""
        try:
            return await waiter.future
        except BaseException:
            self._abandon(waiter)
            raise

    def _abandon(self, waiter: Waiter[T]) -> None:
        future = waiter.future
        with self.lock:
            state = waiter.state
            if state == PENDING:
                waiter.state = ABANDONED
                self._gone(waiter.slot)
                self._compact(waiter.slot)
                return
        # Released, and the result reached the future: the task was cancelled after it
        # (Task.cancel() still raises then), so give the result back. If it had not
        # reached the future yet, _deliver gives it back.
        if (
            state == RELEASED
            and future.done()
            and not future.cancelled()
            and future.exception() is None
        ):
            self._owner_give_back(future.result())

    def _compact(self, slot: LoopSlot[T]) -> None:
        # Abandoned waiters are normally skipped and dropped when things are handed out;
        # if nothing ever is, don't let them pile up.
        if len(slot.waiters) > 2 * slot.live + 16:
            slot.waiters = deque(w for w in slot.waiters if w.state == PENDING)

    # -- the releasing side (called by the primitive with ``lock`` held) --------------

    def slots(self) -> Iterator[LoopSlot[T]]:
        return iter(list(self._slots.values()))

    def first(self, slot: LoopSlot[T]) -> Waiter[T] | None:
        """The oldest pending waiter of `slot` (dropping dead ones before it), or None."""
        waiters = slot.waiters
        while waiters:
            waiter = waiters[0]
            if waiter.state == PENDING and not waiter.future.done():
                return waiter
            waiters.popleft()
            self._settle(waiter)
        return None

    def pending(self, slot: LoopSlot[T]) -> list[Waiter[T]]:
        """All pending waiters of `slot`, oldest first; dead ones are dropped."""
        if not slot.live:  # nothing to hand out here; dead ones go with the next hand-out
            return []
        waiters = slot.waiters
        if len(waiters) == 1:  # the usual case, without a list comprehension's frame
            waiter = waiters[0]
            if waiter.state == PENDING and not waiter.future.done():
                return [waiter]
        alive = [w for w in waiters if w.state == PENDING and not w.future.done()]
        if len(alive) != len(slot.waiters):
            for waiter in slot.waiters:
                self._settle(waiter)
            slot.waiters = deque(alive)
        return alive

    def _settle(self, waiter: Waiter[T]) -> None:
        # A waiter whose future is done but which we never released was cancelled and
        # its task has not resumed yet: it must not be handed anything.
        if waiter.state == PENDING and waiter.future.done():
            waiter.state = ABANDONED
            self._gone(waiter.slot)

    def _gone(self, slot: LoopSlot[T]) -> None:
        slot.live -= 1
        self.waiting -= 1

    def release(self, waiter: Waiter[T], result: T) -> None:
        """Hand `result` to `waiter` (from any thread)."""
        slot = waiter.slot
        waiter.state = RELEASED
        slot.live -= 1  # self._gone(slot), inlined: this runs once per wait
        self.waiting -= 1
        if slot.thread == threading.get_ident():
            waiter.future.set_result(result)
        else:
            try:
                slot.loop.call_soon_threadsafe(_deliver, self, waiter, result)
            except RuntimeError:  # that loop is closed: nobody will ever take it
                self._owner_give_back(result)

    def fail(self, waiter: Waiter[T], exc: BaseException) -> None:
        """Raise `exc` in `waiter` (from any thread)."""
        slot = waiter.slot
        waiter.state = RELEASED
        self._gone(slot)
        future = waiter.future
        if slot.thread == threading.get_ident():
            if not future.done():
                future.set_exception(exc)
        else:
            try:
                slot.loop.call_soon_threadsafe(_fail_if_pending, future, exc)
            except RuntimeError:
                pass

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
            wake = self.blockers.get(me)
            if wake is None:
                self.blockers[me] = eventfd()
                return
        wait_readable((*fds, wake), timeout)
        read_eventfd(wake)

    def unblock(self) -> None:
        """This thread's blocking wait is over: close its wake eventfd, if it has one."""
        with self.lock:
            wake = self.blockers.pop(threading.get_ident(), -1)
        close(wake)

    def wake_blockers(self) -> None:
        """Wake every other thread sleeping in `block`. Call with ``lock`` held."""
        me = threading.get_ident()
        for thread, wake in self.blockers.items():
            if thread != me:
                write_eventfd(wake, 1)

    # -- registrations ----------------------------------------------------------------

    def _new_slot(self, loop: asyncio.AbstractEventLoop) -> LoopSlot[T]:
        # Forget loops that were closed since (e.g. an earlier asyncio.run()); closing a
        # loop drops its registrations with it.
        for old in [old for old in self._slots if old.is_closed()]:
            self.waiting -= self._slots.pop(old).live
        slot: LoopSlot[T] = LoopSlot(loop)
        self._slots[loop] = slot
        return slot

    def _register(self, slot: LoopSlot[T]) -> None:
        owner_ref = self._owner
        for fd in self._fds:
            slot.loop.add_reader(fd, _dispatch, owner_ref, slot, fd)
        slot.registered = True

    def _unregister(self, slot: LoopSlot[T]) -> None:
        """Drop `slot`'s registrations. Call in its loop's thread, ``lock`` held."""
        if slot.registered:
            slot.registered = False
            if not slot.loop.is_closed():
                for fd in self._fds:
                    slot.loop.remove_reader(fd)

    def unregister(self, slot: LoopSlot[T]) -> None:
        """Drop `slot`'s registrations (in its loop's thread); the next waiter re-adds them.

        For an fd whose loop may report an event only once per registration.
        """
        with self.lock:
            self._unregister(slot)

    # -- closing ----------------------------------------------------------------------

    def close(self, fds: Iterable[int], exc: Callable[[], BaseException]) -> None:
        """Fail every waiter with ``exc()``, wake blocked threads, drop all registrations,
        then close `fds`.

        Registrations of a loop running in another thread are removed in that thread;
        the fds are closed after the last of them (SPEC §5.2).
        """
        fds = list(fds)
        me = threading.get_ident()
        remote: list[LoopSlot[T]] = []
        with self.lock:
            self._closing = True
            self.wake_blockers()
            for slot in self._slots.values():
                for waiter in list(slot.waiters):
                    if waiter.state == PENDING:
                        self.fail(waiter, exc())
                slot.waiters.clear()
                if not slot.registered or slot.loop.is_closed():
                    slot.registered = False
                elif slot.thread == me or not slot.loop.is_running():
                    self._unregister(slot)
                else:
                    remote.append(slot)
            self._slots = {}
            self.waiting = 0
        if not remote:
            for fd in fds:
                close(fd)
            return
        countdown = _Countdown(len(remote), fds)
        for slot in remote:
            try:
                slot.loop.call_soon_threadsafe(self._unregister_remote, slot, countdown)
            except RuntimeError:  # closed meanwhile: its registrations are gone
                countdown.done()

    def _unregister_remote(self, slot: LoopSlot[T], countdown: _Countdown) -> None:
        try:
            with self.lock:
                self._unregister(slot)
        finally:
            countdown.done()

    def _after_fork(self) -> None:
        self.lock = threading.Lock()
        self._slots = {}
        self.waiting = 0
        for wake in self.blockers.values():  # the parent's threads are not here
            close(wake)
        self.blockers = {}

    def _owner_give_back(self, result: T) -> None:
        owner = self._owner()
        if owner is not None and not self._closing:
            owner._give_back(result)


def _fail_if_pending(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class _Countdown:
    """Closes fds once every remote loop has dropped its registrations."""

    __slots__ = ("fds", "left", "lock")

    def __init__(self, left: int, fds: list[int]) -> None:
        self.left = left
        self.fds = fds
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.left -= 1
            last = self.left == 0
        if last:
            for fd in self.fds:
                close(fd)
