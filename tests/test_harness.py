"""The harness itself: a hung test ends, and forking leaves nothing behind.

* Timeouts (tests/conftest.py, `support.timeouts`): pytest runs the deliberately stuck
  tests of `support/stuck_tests.py` in a subprocess, on both loops. A test waiting for
  ever and a callback stuck in the loop each fail as a timeout and the session goes
  on; a test that no signal reaches (SIGALRM blocked) is ended by the watchdog
  process, with its child process.
* `support.Forked`: it refuses to fork while another thread runs, a fork that fails in
  the parent (as 3.15's warning-turned-error does, after the child exists) leaves no
  child, and a failure on either side ends the other side and fails the test with
  the child's traceback.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support import (
    SOON,
    Children,
    Forked,
    ForkError,
    Handshake,
    run_on,
    run_pair,
)

from aiosync import Barrier

TESTS = Path(__file__).parent
STUCK = TESTS / "support" / "stuck_tests.py"


def children() -> set[int]:
    """The pids of this process's children (zombies included)."""
    found: set[int] = set()
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/children", encoding="ascii") as f:
            found.update(int(pid) for pid in f.read().split())
    return found


def is_dead(pid: int) -> bool:
    """`pid` is gone, or a zombie (Z) or dead (X) (its fds are closed)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    return stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3] in (b"Z", b"X")


def run_stuck(select: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """pytest on the stuck tests matching `select`, with a one-second watchdog grace."""
    env = {
        **os.environ,
        "AIOSYNC_TEST_WATCHDOG_GRACE": "1",
        "STUCK_CHILD_PID_FILE": str(tmp_path / "child.pid"),
    }
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", str(STUCK), "-k", select],
        cwd=TESTS.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# ---------------------------------------------------------------------------------------
# Timeouts
# ---------------------------------------------------------------------------------------


def test_a_hung_test_and_a_stuck_callback_time_out_on_both_loops(tmp_path: Path) -> None:
    result = run_stuck("not no_signal", tmp_path)
    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    for loop in ("asyncio", "uvloop"):
        for name in ("test_waits_for_ever", "test_callback_stuck_in_the_loop"):
            assert re.search(rf"^FAILED .*::{name}\[{loop}\]", out, re.M), out
        assert re.search(rf"^PASSED .*::test_passes_after_the_stuck_ones\[{loop}\]", out, re.M)
    assert out.count("Timeout: the test ran for more than 1 s") >= 4, out
    assert "4 failed, 2 passed" in out, out
    assert "watchdog" not in result.stderr  # the signal was enough


def test_the_watchdog_ends_what_no_signal_reaches(tmp_path: Path) -> None:
    result = run_stuck("no_signal", tmp_path)
    assert result.returncode in (-signal.SIGABRT, -signal.SIGKILL), result
    assert "+++ watchdog: " in result.stderr, result.stderr
    assert "test_stuck_where_no_signal_reaches is still running" in result.stderr
    child = int((tmp_path / "child.pid").read_text())
    assert is_dead(child), f"the stuck test's child {child} outlived it"


# ---------------------------------------------------------------------------------------
# Forking
# ---------------------------------------------------------------------------------------


def test_forks_from_a_single_threaded_process_only() -> None:
    before = children()
    ran = threading.Event()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(SOON,), name="in the way")
    thread.start()
    try:
        with pytest.raises(ForkError, match="in the way"):
            Forked(ran.set)
        assert children() == before
    finally:
        stop.set()
        thread.join()
    assert not ran.is_set()
    assert Forked(lambda: "forked").join() == "forked"  # once the thread is gone


def fork_then_raise() -> int:
    """os.fork() as 3.15 behaves with a thread alive: the child exists, and the parent
    gets the fork-with-threads DeprecationWarning as an error instead of the pid."""
    pid = real_fork()
    if pid:
        raise DeprecationWarning("This process is multi-threaded, use of fork() ...")
    return pid


real_fork = os.fork


@pytest.mark.parametrize("how", ["injected", "3.15"])
def test_a_fork_that_fails_in_the_parent_leaves_no_child(
    how: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child exists but the parent's fork() raises and never learns the pid. Either
    injected (any version), or the real thing: 3.15 with a thread alive (forking with
    threads on purpose, and without the warning filter that such a test needs)."""
    marker = tmp_path / "ran"
    before = children()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, args=(SOON,))
    if how == "injected":
        monkeypatch.setattr(os, "fork", fork_then_raise)
    elif sys.version_info < (3, 15):
        pytest.skip("before 3.15, a fork with a thread alive only warns (and not as an error)")
    else:
        thread.start()
    try:
        with pytest.raises(ForkError, match="multi-threaded"):
            Forked(marker.touch, with_threads=True)
    finally:
        monkeypatch.undo()
        stop.set()
        if thread.is_alive():
            thread.join()
    assert children() == before  # reaped
    assert not marker.exists()  # and it never ran the test's code


def test_the_childs_failure_fails_the_test_with_its_traceback() -> None:
    def fail() -> None:
        raise LookupError("in the child")

    child = Forked(fail)
    with pytest.raises(pytest.fail.Exception, match=r"(?s)LookupError: in the child"):
        child.join()


def test_the_parents_failure_ends_the_child(kind: str) -> None:
    before = children()
    pids: list[int] = []

    async def parent(b: Barrier, hs: Handshake) -> None:
        await hs.recv("waiting")
        pids.extend(children() - before)
        raise LookupError("in the parent")

    async def child(b: Barrier, hs: Handshake) -> None:
        hs.send("waiting")
        await b.wait_abortion()  # until the parent side is gone; then killed
        await hs.recv("never")

    with pytest.raises(LookupError, match="in the parent"):
        run_pair(kind, parent, child)
    assert len(pids) == 1
    assert children() == before


def test_a_child_that_hangs_after_the_parent_is_done_is_reaped() -> None:
    """`Children` SIGKILLs and reaps whatever still runs when its block is left."""
    before = children()
    go = Handshake()

    def hang() -> None:  # pragma: no cover - runs in the child
        go.as_child()
        go.recv_blocking("never", seconds=3 * SOON)

    def give_up() -> None:
        with Children() as family:
            family.fork(hang)
            go.as_parent()
            raise LookupError("the parent gives up")

    with pytest.raises(LookupError):
        give_up()
    go.close()
    assert children() == before


def test_join_returns_the_childs_report(kind: str) -> None:
    async def answer() -> str:
        return f"{kind} ok"

    assert Forked(lambda: run_on(kind, answer())).join() == f"{kind} ok"
    assert Forked(lambda: None).join() == ""
