"""SeqCount and SeqRecord: FreeBSD's seqc(9) over shared memory, for asyncio.

Theory of operation
-------------------
A sequence counter lets one writer update shared data while any number of readers, in
any number of processes, take consistent snapshots of it without ever blocking the
writer. The counter is 64 bits (it cannot wrap during a read, the man page's second
caveat) and sits beside a second 64-bit word, the *holder*:

    +0  seq      even: stable; odd: a write is in progress
    +8  holder   0, or the token of the writer inside a write: pid << 32 | the low 32
                 bits of its start time (so a recycled pid is not mistaken for it)

* **Memory ordering is in C** (``aiosync/_seqc.c``, C11 atomics), and only there:
  acquire loads and release stores of the counter, the fences, and the payload copies
  of a `SeqRecord` (8-byte relaxed atomic words, never split). Python code here only
  decides what to do with the values: wait, retry, raise.
* **Writer.** ``write_begin`` claims the holder word with a compare-and-swap (0 ->
  token), makes the counter odd (store-release) and fences; ``write_end`` makes it even
  (store-release) and clears the holder. The compare-and-swap makes a second writer
  fail with `BusyResourceError` instead of corrupting the counter, in this process or
  any other (FreeBSD leaves that to the caller's lock; it costs nothing here).
* **Reader.** ``read()`` is an acquire load; while the counter is odd it backs off
  asynchronously (`Backoff`: a few loop round trips, then growing, capped sleeps) and
  tries again. ``consistent(seq)`` is an acquire fence and a comparison. A `SeqRecord`
  does the whole snapshot (load, copy, fence, re-check, unpack) in one C call, so its
  ``read_nowait()`` costs about one ``struct.unpack_from``.
* **Writer death.** A writer killed inside a write leaves the counter odd for ever.
  A reader that keeps finding the *same* odd value for `Backoff.check_writer_after`
  seconds looks the holder up in ``/proc`` (``kill(pid, 0)`` succeeds on a zombie, so
  the state letter after the last ``)`` of ``/proc/PID/stat`` decides: Z or X is dead;
  so is another start time). If it is gone and the counter still holds the same odd
  value and the same holder, ``read()`` raises `BrokenResourceError` naming the pid. A
  later writer takes the counter over from a dead holder (compare-and-swap again).
* **Starvation** (the man page's first caveat): ``read()`` honours
  ``asyncio.timeout``, and ``read(max_attempts=n)`` raises `BusyResourceError` after n
  unsuccessful looks instead of trying for ever.
* **Latch mode** (Linux's seqcount_latch): a `SeqRecord` keeps two copies of the
  payload; readers read copy ``seq & 1``. While copy 0 is being written (counter odd)
  they read copy 1, the previous value, so a reader never waits for a writer, not even
  one that holds a write open or died inside it.

* **Who wrote last** (records only): a third word after the payload keeps the token of
  the writer that began the latest write; ``write_end`` leaves it. A reader that sees
  no write in progress learns from it whether the process that published the values
  still lives (`SeqRecord.last_writer`, `SeqRecord.writer_alive`), with the same
  ``/proc`` test as above.
* **Threads** (free-threaded builds included): the C methods read an object's fields
  inside its critical section; here, the state of a bracketed write and of closing
  changes under the object's lock, so two threads never both end one write or both
  close one memfd.

Layout of a SeqRecord's memfd: the 16-byte header above, then the payload (padded to 8
bytes), then in latch mode its second copy, then the last writer's token (8 bytes).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Final, NoReturn, TypeAlias

from . import _fd, _seqc, _share
from ._errors import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SharingError,
)
from ._resource import Resource
from ._share import Adoption

__all__ = ["Backoff", "SeqCount", "SeqRecord"]

HEADER: Final = _seqc.HEADER  # counter + holder, bytes
_LOW32: Final = 0xFFFF_FFFF

# ---------------------------------------------------------------------------------------
# Who is writing: tokens, and whether their process still lives
# ---------------------------------------------------------------------------------------

_pid = os.getpid()
_token = 0  # this process's writer token, computed on first use


# Guards the few check-then-act steps on an object's Python state (ending a bracketed
# write, closing, making a record's SeqCount) against other threads, with or without a
# GIL. Held for a few attribute accesses only, never across a call that can block; a
# child starts with a fresh one (a fork can happen while another thread holds it).
# Reentrant: a finalizer (close() of an unreachable object) may run while it is held.
_state_lock = threading.RLock()


def _forget_token() -> None:
    global _pid, _token, _state_lock
    _pid = os.getpid()
    _token = 0
    _seqc.set_token(0)  # the child computes its own before its first fast write
    _state_lock = threading.RLock()


os.register_at_fork(after_in_child=_forget_token)


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command name (state first), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2 :].split()


def _my_token() -> int:
    global _token
    if not _token:
        fields = _stat_fields("self")
        start = int(fields[19]) if fields else 0
        _token = (_pid << 32) | (start & _LOW32)
        _seqc.set_token(_token)
    return _token


def _writer_gone(token: int) -> bool:
    """Has the process that wrote `token` exited (zombies included) or been replaced?

    The one test of a writer's life: the reader of a stuck write and
    `SeqRecord.writer_alive` both use it.
    """
    pid = token >> 32
    if pid == _pid:
        return False
    if pid <= 0:
        return True  # no process has that pid: the word was overwritten
    fields = _stat_fields(pid)
    if fields is None:
        # Not in /proc: gone, unless /proc hides other users' processes (hidepid).
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    if fields[0] in (b"Z", b"X"):
        return True
    return (int(fields[19]) & _LOW32) != (token & _LOW32)


def _current_writer() -> tuple[int, int, object]:
    """Who is asking: (pid, thread, task or None)."""
    try:
        task: object = asyncio.current_task()
    except RuntimeError:
        task = None
    return (_pid, threading.get_ident(), task)


def _claim(counter: _seqc.Counter | _seqc.Record, holder: int | None) -> None:
    """Finish claiming `counter` for this process after an attempt found `holder`."""
    token = _token or _my_token()
    for _ in range(100):
        if holder is None:
            return
        if holder == 0:  # the other writer finished meanwhile
            holder = counter._try_begin(token, 0)
        elif holder == token:
            raise BusyResourceError(
                "another writer in this process is inside a write of this counter; "
                "writers must take turns"
            )
        elif not _writer_gone(holder):
            raise BusyResourceError(
                f"process {holder >> 32} is inside a write of this counter; writers in "
                "different processes must be serialized by the caller"
            )
        else:  # its writer died inside a write: take the counter over
            holder = counter._try_begin(token, holder)
    raise BusyResourceError("other writers kept claiming this counter")


# ---------------------------------------------------------------------------------------
# Backing off while a write is in progress
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """How ``read()`` waits while a write is in progress (the counter is odd).

    First `yields` round trips through the event loop (``asyncio.sleep(0)``: other
    tasks run, and a short write is usually over by then), then sleeps of `first`
    seconds, growing by `factor` up to `cap`. Event loops round timer waits up to about
    a millisecond, so a `first` below that is not what it seems.

    A counter that stays at the same odd value for `check_writer_after` seconds makes
    the reader check whether the writer still lives (see ``SeqCount.read``).

    Set it per object (``seqcount.backoff = SeqCount.Backoff(cap=0.002)``) or for a
    whole class (``SeqRecord.backoff = ...``).
    """

    yields: int = 2
    first: float = 0.0005
    factor: float = 2.0
    cap: float = 0.01
    check_writer_after: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.yields, int) or isinstance(self.yields, bool) or self.yields < 0:
            raise ValueError(f"yields must be an int >= 0, not {self.yields!r}")
        for name in ("first", "factor", "cap", "check_writer_after"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a number >= 0, not {value!r}")
        if self.factor < 1:
            raise ValueError(f"factor must be >= 1, not {self.factor!r}")
        if self.cap < self.first:
            raise ValueError(f"cap ({self.cap!r}) must be >= first ({self.first!r})")


_Policy: TypeAlias = Backoff


def _check_attempts(max_attempts: object) -> None:
    if not isinstance(max_attempts, int) or isinstance(max_attempts, bool):
        raise TypeError(f"max_attempts must be an int or None, not {max_attempts!r}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be >= 1, not {max_attempts}")


class _Patience:
    """The waiting between a reader's unsuccessful attempts."""

    __slots__ = ("_attempts", "_backoff", "_delay", "_load", "_max", "_odd", "_since", "_writer")

    def __init__(
        self,
        backoff: Backoff,
        max_attempts: int | None,
        load: Callable[[], int],
        writer: Callable[[], int],
    ) -> None:
        self._backoff = backoff
        self._max = max_attempts
        self._attempts = 0
        self._delay = backoff.first
        self._load = load
        self._writer = writer
        self._odd = -1
        self._since = 0.0

    async def pause(self, seq: int, *, writing: bool) -> None:
        """An attempt failed with the counter at `seq`; wait before the next one.

        `writing`: the attempt failed because a write is in progress (not because the
        counter kept changing under the copy).
        """
        self._attempts += 1
        if self._max is not None and self._attempts >= self._max:
            raise BusyResourceError(
                f"gave up after {self._attempts} attempts: writes kept the counter busy "
                f"(last seen at {seq})"
            )
        if writing:
            self._watch(seq)
        backoff = self._backoff
        if self._attempts <= backoff.yields:
            await asyncio.sleep(0)
            return
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * backoff.factor, backoff.cap)

    def _watch(self, seq: int) -> None:
        now = time.monotonic()
        if seq != self._odd:
            self._odd, self._since = seq, now
            return
        if now - self._since < self._backoff.check_writer_after:
            return
        token = self._writer()
        if token == 0:
            if self._load() == seq and self._writer() == 0:
                raise BrokenResourceError(
                    f"the counter is stuck at the odd value {seq} and no writer is recorded: "
                    "the memory was not set up by a SeqCount, or was overwritten"
                )
        elif _writer_gone(token) and self._load() == seq and self._writer() == token:
            raise BrokenResourceError(
                f"the writer (pid {token >> 32}) died in the middle of a write; "
                f"the counter is stuck at {seq}"
            )


# ---------------------------------------------------------------------------------------
# Shared memory of our own
# ---------------------------------------------------------------------------------------


class _Memfd:
    """A memfd and its shared mapping (created here, or received from another process)."""

    __slots__ = ("fd", "map")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self.map = _fd.map_shared(fd, size)

    @classmethod
    def create(cls, size: int) -> _Memfd:
        fd = _fd.memfd("aiosync-seqc", size)
        try:
            return cls(fd, size)
        except BaseException:
            _fd.close(fd)
            raise

    def close(self) -> None:
        """Unmap and close. Every counter over the mapping must be released first."""
        self.map.close()
        _fd.close(self.fd)
        self.fd = -1


# Memory received from another process, by fd. A SeqRecord and its own seqcount shared
# together name one memfd, passed once: whichever of them is adopted second finds the
# first here, and the counter becomes the record's `seqcount`, over the same mapping.
_received: dict[int, weakref.ref[SeqCount | SeqRecord]] = {}


def _received_over(fd: int) -> SeqCount | SeqRecord | None:
    """The open object that adopted the memfd `fd` in this process, if any."""
    ref = _received.get(fd)
    obj = None if ref is None else ref()
    if obj is None or obj._closed or obj._memory is None or obj._memory.fd != fd:
        _received.pop(fd, None)
        return None
    return obj


# ---------------------------------------------------------------------------------------
# SeqCount
# ---------------------------------------------------------------------------------------


class _WriteSection:
    __slots__ = ("_seqcount",)

    def __init__(self, seqcount: SeqCount) -> None:
        self._seqcount = seqcount

    def __enter__(self) -> None:
        self._seqcount.write_begin()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._seqcount.write_end()


@_share.shareable
class SeqCount(_seqc.Counter, Resource):
    """A FreeBSD seqc(9) sequence counter in shared memory, for asyncio readers.

    Use it when one process updates data in shared memory (a `mmap`, a
    ``multiprocessing.shared_memory.SharedMemory``) that others read, and readers must
    never see a half-made update, without a lock that would make the writer wait for
    them. The writer brackets each update::

        with seqcount.write():       # or write_begin() ... write_end()
            ...store the data...

    and a reader copies what it needs, then checks nothing changed meanwhile::

        while True:
            seq = await seqcount.read()      # waits (asynchronously) out a write
            a, b = struct.unpack_from("qq", buf, 16)
            if seqcount.consistent(seq):
                break                        # (a, b) is a consistent pair

    The counter takes `SeqCount.size` (16) bytes at an 8-byte aligned `offset` of a
    writable buffer: the 64-bit counter and the token of the writer inside a write.
    Fresh zeroed memory is a valid, idle counter. The buffer stays exported (it cannot
    be closed or resized) until this object is closed.

    Everything a SeqCount knows lives in that memory, so another process shares it by
    building a SeqCount over the same bytes: inherit it across ``fork()``, or map the
    same memory and use the same offset. A SeqCount that lives in aiosync's own memory
    (`SeqRecord.seqcount`) can also be passed to
    ``aiosync.create_subprocess_exec(share=...)`` and to multiprocessing children, alone
    or with its record (the child's is then its record's ``seqcount``). One over a
    buffer of your own, or a closed one, is refused with `SharingError` before the child
    starts; pickling it anywhere else raises `TypeError`.
    """

    size: ClassVar[int] = HEADER
    Backoff: ClassVar[type[_Policy]] = Backoff
    backoff: _Policy = Backoff()
    """How `read` waits while a write is in progress; settable per object."""

    _closed: bool
    _writing: tuple[int, int, object] | None
    _memory: _Memfd | None
    _owns: bool
    _offset: int
    _geometry: tuple[int, int]

    def __init__(self, buffer: object, offset: int = 0) -> None:
        self._closed = True  # until fully built, for __del__
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        if offset % 8:
            raise ValueError(
                f"offset must be a multiple of 8 (the counter is 64-bit), not {offset}"
            )
        try:
            view = memoryview(buffer)  # type: ignore[arg-type]
        except TypeError:
            raise TypeError(
                "SeqCount needs a writable shared buffer (an mmap, SharedMemory.buf, ...), "
                f"not {type(buffer).__name__}"
            ) from None
        with view:
            if view.readonly:
                raise TypeError("the buffer is read-only; a SeqCount must be able to write it")
            if not view.c_contiguous:
                raise TypeError("the buffer is not contiguous")
            if view.nbytes < offset + HEADER:
                raise ValueError(
                    f"the buffer is too small: {HEADER} bytes from offset {offset} are "
                    f"needed, it has {view.nbytes}"
                )
        _seqc.Counter.__init__(self, buffer, offset)
        self._set_up(None, offset, (0, 0), owns=False)

    @classmethod
    def _over(
        cls, memory: _Memfd, offset: int, geometry: tuple[int, int], *, owns: bool
    ) -> SeqCount:
        """A SeqCount in aiosync's own memory (a record's, or received from a parent)."""
        self = cls.__new__(cls)
        self._closed = True
        _seqc.Counter.__init__(self, memory.map, offset, *geometry)
        self._set_up(memory, offset, geometry, owns=owns)
        return self

    def _set_up(
        self, memory: _Memfd | None, offset: int, geometry: tuple[int, int], *, owns: bool
    ) -> None:
        self._writing = None
        self._memory = memory
        self._owns = owns
        self._offset = offset
        self._geometry = geometry
        self._closed = False

    # -- reading ----------------------------------------------------------------------

    # read_any() and consistent(seq) are the C methods of _seqc.Counter.

    async def read(self, *, max_attempts: int | None = None) -> int:
        """The counter's value once no write is in progress (an even value).

        Returns at once, without a loop round trip, when the counter is even. While it
        is odd, backs off asynchronously (`backoff`: a few loop round trips, then sleeps
        growing up to ``backoff.cap``, 10 ms by default) and looks again; the loop stays
        free for other tasks. Then read the data and call `consistent` with the value.

        Starvation: wrap it in ``asyncio.timeout(...)`` (cancellation is clean: nothing
        is held), or pass `max_attempts`. Writer death is noticed only inside a write:
        a writer that died between writes leaves an even counter, and `read` returns it.

        Args:
            max_attempts: give up after this many looks at an odd counter (None: never).

        Returns:
            The counter's even value, to pass to `consistent` after reading the data.

        Raises:
            BusyResourceError: `max_attempts` looks found a write in progress.
            BrokenResourceError: the writer died inside a write (the counter stays at
                the same odd value and its process is gone or a zombie), naming its pid;
                after about ``backoff.check_writer_after + backoff.cap`` seconds.
            TypeError: `max_attempts` is not an int or None.
            ValueError: `max_attempts` is below 1.
            ClosedResourceError: the SeqCount was closed, before or during the wait.
        """
        if max_attempts is not None:
            _check_attempts(max_attempts)
        seq = self.read_any()
        if not seq & 1:
            return seq
        patience = _Patience(self.backoff, max_attempts, self.read_any, self._writer)
        while True:
            await patience.pause(seq, writing=True)
            seq = self.read_any()
            if not seq & 1:
                return seq

    # -- writing ----------------------------------------------------------------------

    def write_begin(self) -> None:
        """Start a write: the counter becomes odd, and readers wait until `write_end`.

        Never blocks. A write left unfinished by a process that died is taken over.

        Raises:
            BusyResourceError: a write is already in progress: begun by this object, by
                another writer of this process, or by a live process (writers must take
                turns; the compare-and-swap makes sure they do).
            ClosedResourceError: the SeqCount was closed.
        """
        if self._closed:
            raise ClosedResourceError("this SeqCount was closed")
        writing = self._writing
        if writing is not None and writing[0] == _pid:
            raise BusyResourceError(
                "this SeqCount is already inside a write (write_begin() twice without write_end())"
            )
        _claim(self, self._try_begin(_token or _my_token(), 0))
        self._writing = _current_writer()

    def write_end(self) -> None:
        """End the write begun by `write_begin`: the counter becomes even again.

        Everything stored since `write_begin` is visible to a reader that sees the new
        value.

        Raises:
            RuntimeError: this object is not inside a write.
            ClosedResourceError: the SeqCount was closed (with no write of its own open).
        """
        with _state_lock:  # one write_end() per write, whatever other threads do
            writing = self._writing
            if writing is not None and writing[0] == _pid:
                self._writing = None
        if writing is None or writing[0] != _pid:
            if self._closed:
                raise ClosedResourceError("this SeqCount was closed")
            raise RuntimeError("write_end() without write_begin() on this SeqCount")
        self._end()

    def write(self) -> _WriteSection:
        """``with seqcount.write(): ...`` brackets the block with `write_begin` and `write_end`.

        The write ends however the block is left, exception included: a reader then
        sees whatever the block stored, so a block that can fail half-way should undo
        or finish its changes itself.

        Returns:
            A context manager; entering it raises what `write_begin` raises.
        """
        return _WriteSection(self)

    # -- sharing ----------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        if self._memory is None:
            raise SharingError(
                "a SeqCount over a buffer of your own cannot be shared by itself: everything "
                "it knows lives in that buffer, so share the memory (SharedMemory by name, "
                "an mmap inherited across fork, ...) and build a SeqCount over the same "
                "offset in the other process"
            )
        size, copies = self._geometry
        state = {"offset": self._offset, "size": size, "copies": copies}
        return state, {"memfd": self._memory.fd}

    def _after_share(self, pid: int) -> None:
        pass

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption:
        _share.expect_keys(name, state, {"offset", "size", "copies"})
        _share.expect_keys(name, fds, {"memfd"})
        offset, size, copies = state["offset"], state["size"], state["copies"]
        for key, value in state.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _share.invalid(name, f"bad {key} {_share.show(value)}")
        layout = f"offset {_share.show(offset)}, size {_share.show(size)}, {_share.show(copies)}"
        if offset % 8 or copies > 2 or (copies == 0) != (size == 0):
            raise _share.invalid(name, f"bad layout ({layout})")
        fd = _fd.check(fds["memfd"], "memfd", name=name)
        try:
            needed = offset + _seqc.span(size, copies)
        except OverflowError:
            raise _share.invalid(name, f"bad layout ({layout}): too large") from None
        have = _fd.file_size(fd)
        if have < needed:
            raise _share.invalid(name, f"memfd {fd} holds {have} bytes, {needed} are needed")
        geometry = (size, copies)

        def adopt() -> SeqCount:
            partner = _received_over(fd)
            if partner is not None:  # a record's own counter, sent along with the record
                if not isinstance(partner, SeqRecord) or partner._geometry() != (offset, *geometry):
                    raise _share.invalid(name, f"memfd {fd} was adopted by another object")
                return partner.seqcount
            memory = _Memfd(fd, needed)  # maps it; nothing about the fd changes
            try:
                self = cls._over(memory, offset, geometry, owns=True)
            except BaseException:
                memory.map.close()
                raise
            _received[fd] = weakref.ref(self)
            _fd.own(fd)
            return self

        memory = (fd, offset, *geometry) if offset == 0 else None
        return Adoption(cls, (fd,), adopt, memory)

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Let go of the memory (a buffer of yours can be closed or resized again).

        Idempotent. A write this object began in this process is ended first. Later
        calls raise `ClosedResourceError`, and so does a ``read()`` waiting meanwhile.
        """
        with _state_lock:  # one close() does the work, whatever other threads do
            if self._closed:
                return
            self._closed = True
            writing = self._writing
            self._writing = None
        if writing is not None and writing[0] == _pid:
            self._end()
        self._release()
        if self._owns and self._memory is not None:
            self._memory.close()

    def _warns_unclosed(self) -> bool:
        return self._memory is None or self._owns  # a record's own SeqCount goes with it

    def __repr__(self) -> str:
        if getattr(self, "_closed", True):
            return "<aiosync.SeqCount closed>"
        seq = self.read_any()
        if seq & 1:
            holder = self._writer()
            by = f" by pid {holder >> 32}" if holder else ""
            return f"<aiosync.SeqCount seq={seq} (write in progress{by})>"
        return f"<aiosync.SeqCount seq={seq}>"


# ---------------------------------------------------------------------------------------
# SeqRecord
# ---------------------------------------------------------------------------------------


def _closed_pack(*values: Any) -> NoReturn:
    raise ClosedResourceError("this SeqRecord was closed")


@_share.shareable
class SeqRecord(_seqc.Record, Resource):
    """A typed record in shared memory that one process writes and many read.

    Use it to publish a small, frequently changing state (a configuration, counters,
    a position) to other processes: readers always get a consistent snapshot, readers
    never slow the writer down, and nothing is left behind in ``/dev/shm``::

        record = SeqRecord("qqd")          # struct format: native sizes and alignment
        record.write(1, 2, 3.0)            # one writer at a time
        a, b, c = await record.read()      # in any process it was shared with
        a, b, c = record.read_nowait()     # or: WouldBlock if a write is in progress

    The record lives in its own anonymous shared memory (a memfd), guarded by a
    `SeqCount` (`seqcount`). It passes to children through
    ``aiosync.create_subprocess_exec(share={"cfg": record})`` / ``aiosync.inherited()``
    and as a multiprocessing argument (fork, spawn, forkserver); shared together with its
    `seqcount`, the memory goes once and the child's counter is its record's
    ``seqcount``. A closed record is refused with `SharingError` before the child starts;
    pickling it anywhere else raises `TypeError`.

    With ``latch=True`` (Linux's seqcount_latch) the record keeps two copies: readers
    never wait at all, not even while a write is held open; they get the latest
    complete value.

    A writer that dies inside a write is reported by ``read()``; one that dies between
    writes leaves a record that reads fine and never changes again: `last_writer` and
    `writer_alive` tell a reader who published last and whether it still runs.
    """

    backoff: Backoff = Backoff()
    """How `read` waits while a write is in progress; settable per object."""

    _closed: bool
    _memory: _Memfd
    _format: str
    _size: int
    _latch: bool
    _pack: Callable[..., bytes]
    _nvalues: int
    _view: SeqCount | None

    def __init__(self, format: str, *, latch: bool = False) -> None:
        self._closed = True  # until fully built, for __del__
        compiled = _compile(format)
        if not isinstance(latch, bool):
            raise TypeError(f"latch must be True or False, not {latch!r}")
        memory = _Memfd.create(_record_bytes(compiled.size, latch))
        try:
            self._set_up(memory, format, compiled, latch)
        except BaseException:
            memory.close()
            raise

    def _set_up(self, memory: _Memfd, format: str, compiled: struct.Struct, latch: bool) -> None:
        """Build the record over `memory`. If that fails, nothing uses `memory` and it is
        the caller's to close (or to keep: it may be a received fd, not yet adopted)."""
        nvalues = len(compiled.unpack(bytes(compiled.size)))  # MemoryError for a huge one
        _seqc.Record.__init__(
            self,
            memory.map,
            0,
            compiled.size,
            2 if latch else 1,
            compiled.unpack,
            compiled.pack_into,
        )
        self._memory = memory
        self._format = format
        self._size = compiled.size
        self._latch = latch
        self._pack = compiled.pack
        self._nvalues = nvalues
        self._view = None
        self._closed = False

    @property
    def format(self) -> str:
        """The record's `struct` format."""
        return self._format

    @property
    def latch(self) -> bool:
        """True if the record keeps two copies so that readers never wait."""
        return self._latch

    @property
    def seqcount(self) -> SeqCount:
        """The record's `SeqCount`, for writers who bracket several `write` calls.

        ``with record.seqcount.write(): record.write(...); ...; record.write(...)``:
        readers see only the last value, once the block ends. Inside the block,
        `write` only stores the values. It closes with the record.
        """
        with _state_lock:  # one SeqCount per record, whatever other threads do
            if self._closed:
                raise ClosedResourceError("this SeqRecord was closed")
            view = self._view
            if view is None or view._closed:
                geometry = (self._size, 2 if self._latch else 1)
                view = self._view = SeqCount._over(self._memory, 0, geometry, owns=False)
        return view

    # -- writing ----------------------------------------------------------------------

    # write() is a C method of _seqc.Record: the whole write in one call (claim, pack into
    # a private buffer, copy, end) when nothing stands in the way; everything else comes
    # here (see _seqc.c, "Record.write").

    def _write_slow(self, *values: Any) -> None:
        """`write()` when the C path steps aside: first write, held, bad values, closed."""
        try:
            data = self._pack(*values)
        except struct.error as exc:
            raise self._bad_values(values, exc) from None
        view = self._view
        if view is not None and view._writing is not None and view._writing == _current_writer():
            self._store(data)
            return
        holder = self._write(data, _token or _my_token())
        if holder is not None:
            _claim(self, holder)
            try:
                self._store(data)
            finally:
                self._end()

    def _bad_values(self, values: tuple[Any, ...], exc: struct.error) -> Exception:
        if len(values) != self._nvalues:
            return TypeError(
                f"SeqRecord({self._format!r}).write() takes {self._nvalues} values, "
                f"not {len(values)}"
            )
        text = str(exc)
        wrong_type = any(s in text for s in ("not a", "must be", "requires a bytes"))
        cls = TypeError if wrong_type else ValueError
        return cls(f"cannot write {values!r} as {self._format!r}: {exc}")

    # -- reading ----------------------------------------------------------------------

    # read_nowait() and read() are C methods of _seqc.Record: read() finishes in C when
    # no wait is needed (see _seqc.c, "Ready") and returns _read_slow()'s coroutine
    # otherwise.

    @property
    def last_writer(self) -> int | None:
        """The pid of the process that wrote last, or None if nothing was written yet.

        Use it, with `writer_alive`, when a reader must notice that its publisher died
        *between* writes: ``read()`` only notices a writer that died inside a write
        (the counter stays odd), while a publisher killed after its last write leaves
        a record that reads perfectly well, only never changes again. While a write is
        in progress it is the writer's pid; it stays when the write ends, and a
        writer that takes over from a dead one replaces it.

        The pid may be reused once that process is gone: ask `writer_alive`, which
        tells the two apart.

        Returns:
            The writer's pid, or None before the first write.

        Raises:
            ClosedResourceError: the record was closed.
        """
        token = self._last_writer()
        return token >> 32 if token else None

    def writer_alive(self) -> bool | None:
        """Whether the process that wrote last (`last_writer`) is still running.

        Use it where a reader must not go on trusting values whose publisher is gone.
        The writer is identified by its pid and its start time, as in the
        writer-death check of ``read()``, so a recycled pid is not mistaken for it.
        The answer is as of the call: a reader polls it where it already wakes up, or
        pairs the writer with a `Barrier` to be told at once; the last values stay
        readable either way. Never blocks (it reads ``/proc``).

        Returns:
            True while that process runs (this process included); False once it has
            exited or been killed (a zombie nobody reaped yet counts as dead, and so
            does a recycled pid); None before the first write.

        Raises:
            ClosedResourceError: the record was closed.
        """
        token = self._last_writer()
        if not token:
            return None
        return not _writer_gone(token)

    async def _read_slow(self, max_attempts: int | None) -> tuple[Any, ...]:
        if max_attempts is not None:
            _check_attempts(max_attempts)
        values = self._try_read()
        if values is not None:
            return values
        patience = _Patience(self.backoff, max_attempts, self._load, self._writer)
        while True:
            seq = self._load()
            await patience.pause(seq, writing=bool(seq & 1) and not self._latch)
            values = self._try_read()
            if values is not None:
                return values

    # -- sharing ----------------------------------------------------------------------

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
        return {"format": self._format, "latch": self._latch}, {"memfd": self._memory.fd}

    def _after_share(self, pid: int) -> None:
        pass

    def _geometry(self) -> tuple[int, int, int]:
        """(offset, size, copies) of the record's counter and payload in its memory."""
        return (0, self._size, 2 if self._latch else 1)

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption:
        _share.expect_keys(name, state, {"format", "latch"})
        _share.expect_keys(name, fds, {"memfd"})
        format, latch = state["format"], state["latch"]
        if not isinstance(latch, bool):
            raise _share.invalid(name, f"bad latch {_share.show(latch)}")
        if not isinstance(format, str):
            raise _share.invalid(name, f"bad format {_share.show(format)}")
        try:
            compiled = _compile(format)
        except (TypeError, ValueError) as exc:
            raise _share.invalid(name, _share.show(str(exc))) from None
        fd = _fd.check(fds["memfd"], "memfd", name=name)
        try:
            needed = _record_bytes(compiled.size, latch)
        except OverflowError:
            raise _share.invalid(name, f"the record {_share.show(format)} is too large") from None
        have = _fd.file_size(fd)
        if have < needed:
            raise _share.invalid(name, f"memfd {fd} holds {have} bytes, {needed} are needed")
        geometry = (0, compiled.size, 2 if latch else 1)

        def adopt() -> SeqRecord:
            self = cls.__new__(cls)
            self._closed = True
            partner = _received_over(fd)
            if partner is None:
                memory = _Memfd(fd, needed)  # maps it; nothing about the fd changes
                try:
                    self._set_up(memory, format, compiled, latch)
                except BaseException:
                    memory.map.close()  # and the fd stays as it was
                    raise
                _fd.own(fd)
            elif (
                isinstance(partner, SeqCount)
                and partner._owns
                and (
                    partner._offset,
                    *partner._geometry,
                )
                == geometry
            ):
                # Its own counter arrived first: the record takes its memory over.
                self._set_up(partner._memory, format, compiled, latch)  # type: ignore[arg-type]
                partner._owns = False
                self._view = partner
            else:
                raise _share.invalid(name, f"memfd {fd} was adopted by another object")
            _received[fd] = weakref.ref(self)
            return self

        return Adoption(cls, (fd,), adopt, (fd, *geometry))

    def __reduce__(self) -> tuple[Any, ...]:
        return _share.reduce(self)

    # -- life cycle -------------------------------------------------------------------

    def close(self) -> None:
        """Unmap the record and close its memfd here; idempotent.

        Other processes keep their own mappings. Later calls raise
        `ClosedResourceError`, and so does a ``read()`` waiting meanwhile.
        """
        with _state_lock:  # one close() does the work, whatever other threads do
            if self._closed:
                return
            self._closed = True
            self._pack = _closed_pack
            view = self._view
            self._view = None
        if view is not None:
            view.close()
        self._release()
        self._memory.close()

    def __repr__(self) -> str:
        latch = ", latch=True" if getattr(self, "_latch", False) else ""
        if getattr(self, "_closed", True):
            return f"<aiosync.SeqRecord({getattr(self, '_format', '?')!r}{latch}) closed>"
        seq = self._load()
        busy = " (write in progress)" if seq & 1 else ""
        return f"<aiosync.SeqRecord({self._format!r}{latch}) seq={seq}{busy}>"


def _compile(format: object) -> struct.Struct:
    if not isinstance(format, str):
        raise TypeError(f"the record format must be a struct format str, not {format!r}")
    try:
        compiled = struct.Struct(format)
    except struct.error as exc:
        raise ValueError(f"bad struct format {format!r}: {exc}") from None
    if compiled.size == 0:
        raise ValueError(f"the struct format {format!r} describes no data")
    return compiled


def _record_bytes(size: int, latch: bool) -> int:
    return _seqc.span(size, 2 if latch else 1)
