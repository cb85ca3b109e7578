"""The test suite's helpers, in one place: every test module imports them from here.

* Loops: `new_loop`, `run_on`, `loop_kind` (every async test runs on the standard loop
  and on uvloop; conftest parametrizes them).
* Waiting without racing the clock: `soon` (bounded), `assert_blocks` (a bounded "this
  does not finish"), `until` and `parked` (yield to the loop until a condition holds),
  `finish_now` (it returns without suspending at all), `cancel`, `exited`, `wait_gone`.
* Barriers in one process: `pair` (both sides over the same fds, the CHILD side over
  duplicates: exactly what two processes see), `expect_state`.
* Processes: `Handshake` (named steps over a socketpair) and the one fork-and-report
  harness, `Forked` (with `Children`, `run_pair` and `run_with_blocking_child` on top
  of it). See `Forked` for what it guarantees about threads, failures and leftovers.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from aiosync import Barrier, Role

T = TypeVar("T")

LOOP_KINDS = ("asyncio", "uvloop")
# Generous bound for "this should happen soon" in a test, on a loaded 2-core machine.
SOON = 10.0
# Bound for "this blocks": long enough that a wrong wake-up would have happened.
BLOCKS = 0.2
PYTHON = sys.executable

# ---------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        return uvloop.new_event_loop()
    if kind == "asyncio":
        return asyncio.new_event_loop()
    raise ValueError(kind)


def run_on(kind: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a fresh loop of `kind` (like asyncio.run)."""
    with asyncio.Runner(loop_factory=lambda: new_loop(kind)) as runner:
        return runner.run(coro)


def loop_kind() -> str:
    """The kind of the running loop ("asyncio" or "uvloop")."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


# ---------------------------------------------------------------------------------------
# Waiting, bounded
# ---------------------------------------------------------------------------------------


async def soon(aw: Awaitable[T], *, seconds: float = SOON) -> T:
    """Await `aw`, failing the test (instead of hanging) if it takes longer than `seconds`."""
    async with asyncio.timeout(seconds):
        return await aw


async def assert_blocks(aw: Awaitable[Any], *, seconds: float = BLOCKS) -> asyncio.Task[Any]:
    """Assert that `aw` does not finish within `seconds`; return it as a running task."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert not done, f"expected to block, but it finished: {task.result()!r}"
    return task


async def until(condition: Callable[[], bool], what: str = "the condition") -> None:
    """Yield to the loop (no sleeping) until `condition()` holds: something that is
    already pending, such as an fd event or a task's next step. Bounded."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"after 1000 loop iterations, still not: {what}")


async def parked(b: Any, n: int) -> None:
    """Yield to the loop until `n` waiters are parked on the primitive `b`."""
    await until(lambda: b._waitq.waiting == n, f"{n} waiters parked")


def finish_now(coro: Coroutine[Any, Any, T]) -> T:
    """The result of `coro`, which must finish without suspending even once.

    "Return at once" means no loop round trip at all (so no I/O wait): the coroutine is
    stepped by hand, inside or outside a running loop.
    """
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
    """Wait until process `pid` has exited (all its fds are closed), without reaping it
    (its pidfd turns readable; no thread)."""
    loop = asyncio.get_running_loop()
    pidfd = os.pidfd_open(pid)
    try:
        gone: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not gone.done():
                gone.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await gone
        finally:
            loop.remove_reader(pidfd)
    finally:
        os.close(pidfd)


def reap(process: Any) -> None:
    """Make sure a multiprocessing child is gone: killed if it still runs (after a
    failed assertion), then joined."""
    if process.exitcode is None:
        process.kill()
        process.join()


def wait_gone(pids: Iterable[int], *, seconds: float = SOON) -> None:
    """Wait until every process in `pids` (children or not) has exited."""
    pidfds = []
    for pid in pids:
        try:
            pidfds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue  # gone (and reaped) already
    try:
        for pidfd in pidfds:
            readable, _, _ = select.select([pidfd], [], [], seconds)
            assert readable, "a process is still running"
    finally:
        for pidfd in pidfds:
            os.close(pidfd)


def fd_count() -> int:
    """How many fds this process has open."""
    return len(os.listdir("/proc/self/fd"))


def is_open(fd: int) -> bool:
    """Whether `fd` is an open fd of this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ---------------------------------------------------------------------------------------
# Barriers in one process
# ---------------------------------------------------------------------------------------


def pair() -> tuple[Barrier, Barrier]:
    """A PARENT and a CHILD side of one barrier, both in this process.

    The CHILD side holds duplicates of the fds, which behave exactly as two processes
    would; "the peer exits" is then the CHILD side's ``close()``.
    """
    parent = Barrier()
    child = Barrier._adopt(
        os.dup(parent._me), os.dup(parent._them), os.dup(parent._pipe_r), os.dup(parent._pipe_w)
    )
    parent.set_role(Role.PARENT)
    child.set_role(Role.CHILD)
    return parent, child


ABORT_STATES = ("no", "i", "they", "both")


def expect_state(b: Barrier, barriers: int, aborted: str = "no") -> None:
    """Assert `b`'s counter and abort state ("no", "i", "they" or "both") through its
    public face: the repr (role, counter, abort state) and the four abort properties."""
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


# ---------------------------------------------------------------------------------------
# Hand-shakes between processes
# ---------------------------------------------------------------------------------------


class Handshake:
    """Explicit ordering between two processes: named steps over a socketpair.

    One side ``send("placed")``; the other ``await recv("placed")`` (or the blocking
    ``recv_blocking``). Steps must arrive in the order they are expected.
    """

    def __init__(self) -> None:
        self._a, self._b = socket.socketpair()
        self._sock = self._a
        self._buf = b""

    def as_child(self) -> None:
        self._a.close()
        self._sock = self._b

    def as_parent(self) -> None:
        self._b.close()

    def send(self, step: str) -> None:
        self._sock.setblocking(True)
        self._sock.sendall(step.encode() + b"\n")

    async def recv(self, step: str, *, seconds: float = SOON) -> None:
        loop = asyncio.get_running_loop()
        self._sock.setblocking(False)
        async with asyncio.timeout(seconds):
            while b"\n" not in self._buf:
                chunk = await loop.sock_recv(self._sock, 256)
                if not chunk:
                    raise EOFError(f"peer closed the handshake before {step!r}")
                self._buf += chunk
        self._check(step)

    def recv_blocking(self, step: str, *, seconds: float = SOON) -> None:
        self._sock.setblocking(True)
        self._sock.settimeout(seconds)
        while b"\n" not in self._buf:
            chunk = self._sock.recv(256)
            if not chunk:
                raise EOFError(f"peer closed the handshake before {step!r}")
            self._buf += chunk
        self._check(step)

    def _check(self, step: str) -> None:
        line, _, self._buf = self._buf.partition(b"\n")
        got = line.decode()
        assert got == step, f"hand-shake out of order: expected {step!r}, got {got!r}"

    def close(self) -> None:
        self._a.close()
        self._b.close()


# ---------------------------------------------------------------------------------------
# The fork-and-report harness
# ---------------------------------------------------------------------------------------


class ForkError(RuntimeError):
    """The harness could not (or would not) fork; no child is left behind."""


def other_threads(*, seconds: float = SOON, known: Collection[threading.Thread] = ()) -> list[str]:
    """The threads of this process, other than the calling one and the `known` ones,
    that are still running after `seconds`, by name ([] if none).

    A thread that is ending is waited for: one that delivered its result a moment ago
    (3.11's asyncio starts a thread per child process to wait for it), or one that
    Python joined but that is still leaving the kernel (the kernel's count is what
    fork() checks).
    """
    deadline = time.monotonic() + seconds
    me = threading.current_thread()
    for thread in threading.enumerate():
        if thread is not me and thread not in known:
            try:
                thread.join(max(0.0, deadline - time.monotonic()))
            except (AssertionError, RuntimeError):  # pragma: no cover - not joinable
                pass  # (a thread started outside `threading`)
    others = [t for t in threading.enumerate() if t is not me]
    if alive := [t.name for t in others if t not in known]:
        return alive
    while (tasks := len(os.listdir("/proc/self/task"))) > 1 + len(others):
        if time.monotonic() > deadline:  # pragma: no cover - a thread Python does not know
            return [f"{tasks - 1 - len(others)} thread(s) unknown to the threading module"]
        time.sleep(0.001)
    return []


PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """In a forked child: be killed when the test process dies (e.g. its watchdog kills
    it) rather than live on, maybe spinning in a broken wait."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:  # pragma: no cover
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:  # it died before the prctl
        os._exit(1)


class Forked:
    """`fn()` in a forked child, which exits (``os._exit``) right after it; its failure
    fails the test with the child's traceback; what `fn` returns (a str) is the child's
    report (`join` returns it).

    Every forking test in the suite forks here, and this is what makes forking safe:

    * It forks only from a single-threaded process: with another thread alive it raises
      `ForkError` before forking (a fork with a live thread can deadlock in the child,
      and Python 3.12+ warns about it; 3.15 turns that warning into an error under
      ``-W error``). The test process has no thread of its own: conftest's timeout is a
      signal, its watchdog another process.
    * The child waits for the parent's go before it runs anything. If the fork fails
      in the parent after the child exists (3.15 raises *after* forking, so the parent
      never learns the pid), the parent withholds the go, learns the pid from the
      child's first report line, and reaps it before raising: no child is left behind.
    * The child dies with the test process (``PR_SET_PDEATHSIG``), so a watchdog that
      kills a stuck test takes its children with it.

    Fork before any loop runs in this thread (a running loop cannot be forked); the
    child starts its own loops. `with_threads`: fork even with other threads alive, for
    a test that does so on purpose (it needs conftest's warning filter on 3.15).
    """

    def __init__(self, fn: Callable[[], object], *, with_threads: bool = False) -> None:
        if not with_threads and (others := other_threads(seconds=1.0)):
            raise ForkError(
                f"refusing to fork with other threads alive: {others}; a forking test "
                "must join its threads first (see tests/conftest.py)"
            )
        report_r, report_w = os.pipe()
        go_r, go_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        try:
            pid = os.fork()
        except BaseException as exc:
            os.close(go_w)  # no go: a child that exists exits without running `fn`
            os.close(go_r)
            os.close(report_w)
            self._reap_unknown_child(report_r)
            raise ForkError(f"fork failed: {exc!r}") from exc
        if pid == 0:  # pragma: no cover - runs in the child
            self._child(fn, parent, report_r, report_w, go_r, go_w)
        os.close(report_w)
        os.close(go_r)
        os.write(go_w, b"g")
        os.close(go_w)
        self.pid = pid
        self._report_r: int | None = report_r
        self._text = ""
        self.status: int | None = None

    @staticmethod
    def _child(
        fn: Callable[[], object], parent: int, report_r: int, report_w: int, go_r: int, go_w: int
    ) -> None:  # pragma: no cover - runs in the child
        code = 0
        try:
            die_with_parent(parent)
            os.close(report_r)
            os.close(go_w)
            os.write(report_w, f"{os.getpid()}\n".encode())
            if os.read(go_r, 1) != b"g":
                os._exit(0)  # the parent's fork failed: run nothing
            os.close(go_r)
            result = fn()
            os.write(report_w, b"ok\n" + (result if isinstance(result, str) else "").encode())
        except BaseException:
            os.write(report_w, b"failed\n" + traceback.format_exc().encode())
            code = 1
        os._exit(code)

    @staticmethod
    def _reap_unknown_child(report_r: int) -> None:
        """After a fork that raised: the child (if one exists) wrote its pid first."""
        try:
            readable, _, _ = select.select([report_r], [], [], SOON)
            line = os.read(report_r, 64) if readable else b""
        finally:
            os.close(report_r)
        if line:  # EOF (b""): no child was created
            pid = int(line.split(b"\n", 1)[0])
            os.waitpid(pid, 0)  # it exits at once: it saw no go

    def _read_report(self) -> tuple[bool, str]:
        """(failed, text) once the child is gone: its traceback if `fn` raised, else
        what `fn` returned ("" if it never returned: killed, or its own ``os._exit``)."""
        assert self._report_r is not None
        with os.fdopen(self._report_r, "rb") as f:
            raw = f.read().decode()
        self._report_r = None
        _pid, _, rest = raw.partition("\n")
        verdict, _, text = rest.partition("\n")
        return verdict == "failed", text

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def kill_and_confirm(self) -> None:
        """SIGKILL the child and return once it is dead (its fds closed), without reaping."""
        self.kill()
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        assert info is not None
        assert info.si_pid == self.pid

    def join(self, *, killed: bool = False) -> str:
        """Reap the child and return its report; fail the test if it failed (or, with
        `killed`, if it was not killed)."""
        if self.status is not None:
            return self._text
        _, self.status = os.waitpid(self.pid, 0)
        failed, self._text = self._read_report()
        code = os.waitstatus_to_exitcode(self.status)
        if killed:
            assert code == -signal.SIGKILL, f"child exit {code}:\n{self._text}"
        elif failed or code != 0:
            pytest.fail(f"child {self.pid} failed (exit {code}):\n{self._text}")
        return self._text

    def reap(self) -> str:
        """Make sure the child is gone (after a failure elsewhere), quietly; return its
        traceback if it wrote one."""
        if self.status is not None:
            return ""
        try:
            self.kill()
        except ProcessLookupError:  # pragma: no cover
            pass
        _, self.status = os.waitpid(self.pid, 0)
        failed, self._text = self._read_report()
        return self._text if failed else ""


class Children:
    """Forked children (`Forked`); all of them are reaped when the block is left, a
    child that still runs (after a failed assertion in the parent) SIGKILLed first."""

    def __init__(self) -> None:
        self.running: dict[int, Forked] = {}

    def fork(self, fn: Callable[[], object]) -> int:
        """Fork a child that runs `fn()` and exits; return its pid."""
        child = Forked(fn)
        self.running[child.pid] = child
        return child.pid

    def collect(self, pid: int) -> str:
        """Its report, once it has exited successfully (its failure fails the test)."""
        return self.running.pop(pid).join()

    def kill(self, pid: int) -> None:
        child = self.running.pop(pid)
        child.kill()
        child.join(killed=True)

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for child in self.running.values():
            child.reap()
        self.running.clear()


Side = Callable[[Barrier, Handshake], Coroutine[Any, Any, None]]
ParentSide = Callable[[Barrier, Handshake, int], Coroutine[Any, Any, None]]
BlockingSide = Callable[[Barrier, Handshake], None]


def _run_forked_barrier(
    child_main: Callable[[Barrier, Handshake], object],
    parent_main: Callable[[Barrier, Handshake, int], object],
    barrier: Barrier | None,
) -> None:
    """Fork; `child_main(b, hs)` runs in the child as Role.CHILD, `parent_main(b, hs,
    child_pid)` here as Role.PARENT. A failure on either side fails the test with both
    tracebacks; the child never outlives the call."""
    b = barrier if barrier is not None else Barrier()
    hs = Handshake()

    def child() -> None:  # pragma: no cover - runs in the child
        hs.as_child()
        b.set_role(Role.CHILD)
        child_main(b, hs)

    try:
        proc = Forked(child)
    except BaseException:
        hs.close()
        b.close()
        raise
    try:
        hs.as_parent()
        b.set_role(Role.PARENT)
        parent_main(b, hs, proc.pid)
    except BaseException as exc:
        # Give a failing child a moment to write its traceback (the report pipe turns
        # readable when it does, or when it exits), then make sure it is gone.
        if proc.status is None and proc._report_r is not None:
            select.select([proc._report_r], [], [], 2.0)
        if report := proc.reap():
            exc.add_note(f"The child failed too:\n{report}")
        raise
    else:
        proc.join()
    finally:
        hs.close()
        b.close()


def run_pair(kind: str, parent: Side, child: Side, *, barrier: Barrier | None = None) -> None:
    """Fork; run `child` in the child and `parent` here, each on a fresh loop of `kind`.

    Roles are PARENT here and CHILD there. The child's failure (an exception, or a
    non-zero exit) fails the test with the child's traceback. The child exits with
    ``os._exit`` right after its coroutine, which closes its fds as a real exit does.
    """
    _run_forked_barrier(
        lambda b, hs: run_on(kind, child(b, hs)),
        lambda b, hs, _pid: run_on(kind, parent(b, hs)),
        barrier,
    )


def run_with_blocking_child(kind: str, parent: ParentSide, child: BlockingSide) -> None:
    """Fork; run `child(b, hs)` in the child with no event loop at all, and
    `parent(b, hs, child_pid)` here on a fresh loop of `kind` (as `run_pair`)."""
    _run_forked_barrier(child, lambda b, hs, pid: run_on(kind, parent(b, hs, pid)), None)


# ---------------------------------------------------------------------------------------
# Examples and children run as programs
# ---------------------------------------------------------------------------------------


# asyncio's debug mode (on with -X dev) logs every callback that took over 0.1 s: on a
# shared machine that is the machine's load, not the program's fault.
SLOW_CALLBACK = re.compile(r"^Executing <.*> took \d+\.\d+ seconds\n", re.M)


def run_example(example: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example program as a user would, warnings as errors; capture its output
    (its stderr without asyncio's slow-callback notes)."""
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(example), *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    result.stderr = SLOW_CALLBACK.sub("", result.stderr)
    return result
