"""Test harness shared by every test module.

* Every async test runs on the standard asyncio loop and on uvloop, through
  pytest-asyncio's loop-factory parametrization (uvloop is required, not optional).
* Cross-process tests use real processes. Processes are ordered with explicit
  hand-shakes (`Handshake`), never with sleeps; "this blocks" is asserted with a
  bounded wait (`assert_blocks`).
* `forked_pair` runs a parent and a child coroutine on either side of a real
  ``fork()``, each on a fresh loop of the parametrized kind; the fork happens before
  any loop runs (SPEC §5.7).
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import socket
import subprocess
import sys
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterable
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


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


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


@pytest.fixture(params=LOOP_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """For synchronous tests that run loops themselves (e.g. around a fork)."""
    return str(request.param)


async def assert_blocks(aw: Awaitable[Any], *, seconds: float = BLOCKS) -> asyncio.Task[Any]:
    """Assert that `aw` does not finish within `seconds`; return it as a running task."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert not done, f"expected to block, but it finished: {task.result()!r}"
    return task


async def soon(aw: Awaitable[T], *, seconds: float = SOON) -> T:
    """Await `aw`, failing the test (instead of hanging) if it takes longer than `seconds`."""
    async with asyncio.timeout(seconds):
        return await aw


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


class ForkedChild:
    """`fn()` in a forked child, which exits right after it; its failure fails the test.

    Fork before any loop runs in this thread (SPEC §5.7).
    """

    def __init__(self, fn: Callable[[], object]) -> None:
        self._report_r, report_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.close(self._report_r)
                fn()
            except BaseException:
                os.write(report_w, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(report_w)
        self.status: int | None = None

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)

    def kill_and_confirm(self) -> None:
        """SIGKILL the child and return once it is dead (its fds closed), without reaping."""
        self.kill()
        info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        assert info is not None
        assert info.si_pid == self.pid

    def join(self, *, killed: bool = False) -> None:
        """Reap the child; fail the test if it failed (or, with `killed`, was not killed)."""
        if self.status is not None:
            return
        _, self.status = os.waitpid(self.pid, 0)
        with os.fdopen(self._report_r, "rb") as f:
            report = f.read().decode()
        code = os.waitstatus_to_exitcode(self.status)
        if killed:
            assert code == -signal.SIGKILL, f"child exit {code}:\n{report}"
        elif report or code != 0:
            pytest.fail(f"child {self.pid} failed (exit {code}):\n{report}")

    def reap(self) -> None:
        """Make sure the child is gone (after a failure elsewhere), quietly."""
        if self.status is None:
            try:
                self.kill()
            except ProcessLookupError:  # pragma: no cover
                pass
            _, self.status = os.waitpid(self.pid, 0)
            os.close(self._report_r)


Side = Callable[[Barrier, Handshake], Coroutine[Any, Any, None]]


class ForkedPair:
    """Runs `parent` and `child` coroutines on two sides of a real fork."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def run(
        self,
        parent: Side,
        child: Side,
        *,
        barrier: Barrier | None = None,
    ) -> None:
        """Fork; run `child` in the child and `parent` here, each on a fresh loop.

        The child's failure (an exception, or a non-zero exit) fails the test with the
        child's traceback. The child exits with ``os._exit`` right after its coroutine,
        which closes its fds as a real exit does.
        """
        b = barrier if barrier is not None else Barrier()
        hs = Handshake()
        report_r, report_w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 0
            try:
                os.close(report_r)
                hs.as_child()
                b.set_role(Role.CHILD)
                run_on(self.kind, child(b, hs))
            except BaseException:
                os.write(report_w, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(report_w)
        failure: BaseException | None = None
        try:
            hs.as_parent()
            b.set_role(Role.PARENT)
            run_on(self.kind, parent(b, hs))
        except BaseException as exc:
            failure = exc
            # Give a failing child a moment to write its traceback (the report pipe
            # turns readable when it does, or when it exits), then make sure it is gone.
            select.select([report_r], [], [], 2.0)
            os.kill(pid, signal.SIGKILL)
        finally:
            _, status = os.waitpid(pid, 0)
            with os.fdopen(report_r, "rb") as f:
                report = f.read().decode()
            hs.close()
            b.close()
        if failure is not None:
            if report:
                failure.add_note(f"The child failed too:\n{report}")
            raise failure
        if report or os.waitstatus_to_exitcode(status) != 0:
            pytest.fail(f"child failed (status {status}):\n{report}")


@pytest.fixture
def forked_pair(kind: str) -> ForkedPair:
    return ForkedPair(kind)


@pytest.fixture
def fd_count() -> Callable[[], int]:
    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    return count


PYTHON = sys.executable


def run_example(example: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run an example program as a user would, warnings as errors; capture its output."""
    return subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(example), *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )


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
