"""Helpers shared by the Barrier conformance tests (test_barrier_systemd, test_barrier_model).

* `expect_state` checks a side's counter and abort state through its public face: the
  repr (role, counter, abort state) and the four abort properties, all at once.
* `finish_now` proves that a wait returns without suspending: no loop round trip, so
  no I/O wait (SPEC §5.5: "return at once" means exactly that).
* `BlockingChild` forks a child that runs *no* event loop, for the blocking twins
  (``sync_blocking()`` and so on); the parent runs a coroutine on a fresh loop.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
from conftest import Handshake, run_on

from aiosync import Barrier, Role

T = TypeVar("T")

ABORT_STATES = ("no", "i", "they", "both")


def expect_state(b: Barrier, barriers: int, aborted: str = "no") -> None:
    """Assert `b`'s counter and abort state ("no", "i", "they" or "both")."""
    assert aborted in ABORT_STATES
    role = b.role.name if b.role is not None else "unset"
    want = f"<aiosync.Barrier role={role} barriers={barriers} aborted={aborted}>"
    assert repr(b) == want, f"{b!r}, expected {want}"
    flags = (b.i_aborted, b.they_aborted, b.both_aborted, b.is_aborted)
    want_flags = (
        aborted in ("i", "both"),
        aborted in ("they", "both"),
        aborted == "both",
        aborted != "no",
    )
    assert flags == want_flags, f"(i, they, both, is)_aborted = {flags}, expected {want_flags}"


def finish_now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of `coro`, which must finish without suspending even once."""
    try:
        coro.send(None)
    except StopIteration as stop:
        result: T = stop.value
        return result
    coro.close()  # it suspended: let it clean up (a parked waiter leaves its queue)
    raise AssertionError("expected to return at once, but it suspended (waited)")


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel a pending wait and make sure it ended by that cancellation."""
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def exited(pid: int) -> None:
    """Wait until process `pid` has exited (all its fds are closed), without reaping it."""
    await asyncio.to_thread(os.waitid, os.P_PID, pid, os.WEXITED | os.WNOWAIT)


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a forked child: be killed when the test process dies (e.g. pytest-timeout
    ends it with ``os._exit``) rather than live on, maybe spinning in a broken wait."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


ParentSide = Callable[[Barrier, Handshake, int], Coroutine[Any, Any, None]]
BlockingSide = Callable[[Barrier, Handshake], None]


def run_with_blocking_child(kind: str, parent: ParentSide, child: BlockingSide) -> None:
    """Fork; run `child(b, hs)` in the child with no event loop at all, and
    `parent(b, hs, child_pid)` here on a fresh loop of `kind`.

    Like `conftest.ForkedPair`: roles are PARENT here and CHILD there, the child exits
    with ``os._exit`` right after `child` returns (closing its fds as a real exit does),
    and its failure fails the test with its traceback.
    """
    b = Barrier()
    hs = Handshake()
    report_r, report_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent_pid = os.getpid()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            die_with_parent(parent_pid)
            os.close(report_r)
            hs.as_child()
            b.set_role(Role.CHILD)
            child(b, hs)
        except BaseException:
            os.write(report_w, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(report_w)
    failed = False
    try:
        hs.as_parent()
        b.set_role(Role.PARENT)
        run_on(kind, parent(b, hs, pid))
    except BaseException:
        failed = True
        os.kill(pid, signal.SIGKILL)  # (if it is not gone already)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
        with os.fdopen(report_r, "rb") as f:
            report = f.read().decode()
        hs.close()
        b.close()
        if report:  # the child's failure, often the cause of the parent's
            pytest.fail(f"child failed (status {status}):\n{report}")
    if not failed and os.waitstatus_to_exitcode(status) != 0:
        pytest.fail(f"child failed (status {status})")
