"""File descriptors: creating, checking and closing them.

This is the only module that creates or closes a file descriptor. (Waiting on them from
an event loop is `_waitq`'s.) Every fd is created close-on-exec and non-blocking, and
one received from another process is made so (`own`): nobody else (a parent, uvloop's
``pass_fds``) is relied on to have set these.
"""

from __future__ import annotations

import errno
import mmap
import os
import reprlib
import select
import stat
import sys
from collections.abc import Iterable
from typing import Final, Literal

from ._errors import ClosedResourceError, SharingError

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


def private_description(fd: int, offset: int) -> int:
    """A new open file description of the file `fd` refers to, close-on-exec, read-only,
    its file offset set to `offset`.

    Other processes see it in ``/proc/PID/fdinfo`` (``pos``), and its last close (exit,
    exec, close) is an inotify close event on the file.
    """
    new = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.lseek(new, offset, os.SEEK_SET)
    except BaseException:
        os.close(new)
        raise
    return new


def watch(fd: int) -> int:
    """A new non-blocking, close-on-exec inotify fd that reports reads and closes of the
    file `fd` refers to, by any process. (Closing it costs milliseconds: make it lazily.)"""
    from . import _robust

    return _robust.watch(fd)


def map_shared(fd: int, size: int) -> mmap.mmap:
    """Map the first `size` bytes of `fd` shared, readable and writable.

    `fd` stays the caller's. Before 3.13, CPython's mmap keeps a close-on-exec duplicate
    of `fd` of its own (closed by the mapping's ``close()``); from 3.13 it is asked not
    to (``trackfd=False``), so a mapping costs no fd.
    """
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):
        return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot, trackfd=False)
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)


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
    except OSError as exc:
        raise _closed(exc) from None
    except ValueError:  # -1: the object was closed (by another thread) meanwhile
        raise _closed(OSError(errno.EBADF, "closed")) from None


def write_eventfd(fd: int, value: int) -> bool:
    """Add `value` to an eventfd; False if the kernel refused (e.g. it would overflow)."""
    try:
        os.eventfd_write(fd, value)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise _closed(exc) from None
        return False
    except ValueError:  # -1: the object was closed (by another thread) meanwhile
        raise _closed(OSError(errno.EBADF, "closed")) from None
    return True


def _closed(exc: OSError) -> BaseException:
    """EBADF on an fd of ours: another thread closed the object meanwhile."""
    if exc.errno == errno.EBADF:
        return ClosedResourceError("the object was closed (by another thread) during this call")
    return exc


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
        raise SharingError(f"{name}: {reprlib.repr(fd)} is not a file descriptor number")
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
        try:
            seals = _seals(fd)
        except OSError:  # EINVAL: a file that cannot have seals is no memfd
            raise SharingError(f"{name}: fd {fd} should be a memfd but is {target!r}") from None
        if seals & _WRITE_SEALS:  # mapping it writable would fail (EPERM)
            raise SharingError(f"{name}: memfd {fd} is sealed against writing")
    return fd


_WRITE_SEALS: Final = 0x0008 | 0x0010  # F_SEAL_WRITE | F_SEAL_FUTURE_WRITE (Linux 5.1)


def _seals(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


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
