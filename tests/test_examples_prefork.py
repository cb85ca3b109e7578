"""examples/prefork_server.py end to end on both loops: a good run, and its faults."""

from __future__ import annotations

import contextlib
import os
import pty
import re
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from support import SLOW_CALLBACK, SOON, run_example, wait_gone

EXAMPLE = Path(__file__).parent.parent / "examples" / "prefork_server.py"


def worker_pids(stdout: str) -> dict[int, int]:
    """Worker index -> pid, from the "worker I (pid P)" the parent prints."""
    return {int(i): int(p) for i, p in re.findall(r"worker (\d+) \(pid (\d+)\)", stdout)}


def assert_the_others_were_stopped_or_synced(
    stdout: str, pids: dict[int, int], failed: int
) -> None:
    """Each other worker synced before the failure was seen, or the abort stopped it:
    which one is a race the example reports, not one it decides."""
    assert sorted(pids) == [0, 1, 2]
    for i in sorted(set(pids) - {failed}):
        said = re.findall(
            rf"^parent: start-up aborted: worker {i} \(pid {pids[i]}\) (.*)$", stdout, re.M
        )
        assert said in (["had synced"], ["was stopped"]), stdout


def test_a_good_run(kind: str) -> None:
    result = run_example(
        EXAMPLE, "--loop", kind, "--workers", "3", "--requests", "200", "--connections", "4"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert result.stderr == ""
    assert re.search(r"^parent: ready: 3 workers synced \(pids \[\d+, \d+, \d+\]\)$", out, re.M)
    assert re.search(r"^summary: 200 requests in [\d.]+ s \(\d+/s\), 0 errors$", out, re.M)
    assert re.search(r"^latency: p50 [\d.]+ ms, p99 [\d.]+ ms$", out, re.M)
    # The configuration changes between the two halves of the requests: every request
    # of the first half saw version 1 and every request of the second half version 2.
    assert "config versions seen: v1: 100, v2: 100\n" in out
    counts = re.search(r"^requests per worker: 0: (\d+), 1: (\d+), 2: (\d+)$", out, re.M)
    assert counts is not None
    assert sum(int(c) for c in counts.groups()) == 200
    assert "shutdown: 3 of 3 workers drained; killed: none\n" in out
    assert "connections closed by the workers: 4\n" in out
    assert "client: 200/200 requests\n" in out
    assert "\r" not in out  # not a terminal: plain lines, no progress updated in place
    # The order of the story.
    steps = ["ready", "configuration changed", "asking the workers to drain", "summary"]
    assert [out.index(step) for step in steps] == sorted(out.index(step) for step in steps)


def test_the_progress_line_on_a_terminal(kind: str) -> None:
    """On a terminal the progress line is updated in place, and the parent's messages
    during the run start a line of their own."""
    primary, secondary = pty.openpty()
    with os.fdopen(primary, "rb", buffering=0) as terminal:
        proc = subprocess.Popen(
            [sys.executable, "-X", "dev", "-W", "error", str(EXAMPLE), "--loop", kind,
             "--workers", "2", "--requests", "200", "--connections", "2"],
            stdout=secondary,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        os.close(secondary)
        chunks = []
        with contextlib.suppress(OSError):  # EIO: the program exited, the terminal closed
            while chunk := terminal.read(4096):
                chunks.append(chunk)
        _, err = proc.communicate(timeout=SOON)
    out = b"".join(chunks).decode()
    assert proc.returncode == 0, out + err.decode()
    assert SLOW_CALLBACK.sub("", err.decode()) == ""
    # The terminal turns each "\n" into "\r\n"; a bare "\r" goes back to the line start.
    assert "\rclient: 100/200 requests\r\nparent: configuration changed to version 2\r\n" in out
    assert "\rclient: 200/200 requests\r\nparent: asking the workers to drain\r\n" in out
    assert "summary: 200 requests" in out


@pytest.mark.parametrize(
    ("flag", "worker", "outcome", "stderr"),
    [
        ("--fail-worker", 1, "aborted", "worker 1: setup failed\n"),  # it aborts
        ("--kill-worker", 2, "died", ""),  # SIGKILLed in its setup
    ],
)
def test_a_failing_worker_stops_the_start_up(
    kind: str, flag: str, worker: int, outcome: str, stderr: str
) -> None:
    result = run_example(EXAMPLE, "--loop", kind, "--workers", "3", flag, str(worker))
    assert result.returncode == 1
    pids = worker_pids(result.stdout)
    assert f"parent: start-up failed: worker {worker} (pid {pids[worker]}) {outcome}\n" in (
        result.stdout
    )
    assert_the_others_were_stopped_or_synced(result.stdout, pids, failed=worker)
    assert "ready" not in result.stdout
    assert "summary" not in result.stdout
    assert result.stderr == stderr


def test_a_worker_that_never_drains_is_killed(kind: str) -> None:
    result = run_example(EXAMPLE,
        "--loop", kind, "--workers", "2", "--requests", "40", "--slow-drain", "0",
        "--drain-timeout", "1",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    pids = worker_pids(result.stdout)
    assert f"parent: worker 0 (pid {pids[0]}) did not drain: killed\n" in result.stdout
    assert "summary: 40 requests" in result.stdout
    assert "shutdown: 1 of 2 workers drained; killed: worker 0\n" in result.stdout
    assert result.stderr == ""


def start_server(
    kind: str, *, wrapper: Sequence[str] = ()
) -> tuple[subprocess.Popen[str], list[int]]:
    """A long-running server of 2 workers in its own session: the parent and the workers'
    pids, once it is ready."""
    argv = [*wrapper, sys.executable, str(EXAMPLE), "--loop", kind, "--workers", "2"]
    proc = subprocess.Popen(
        [*argv, "--requests", "10000000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(2)]
    ready = re.match(r"parent: ready: 2 workers synced \(pids \[(\d+), (\d+)\]\)", lines[1])
    if ready is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(lines)
    return proc, [int(pid) for pid in ready.groups()]


def test_workers_exit_when_the_parent_is_killed(kind: str) -> None:
    """A worker's barrier tells it the parent is gone: it exits instead of serving on."""
    proc, workers = start_server(kind)
    try:
        proc.send_signal(signal.SIGKILL)
        wait_gone(workers)
    finally:
        proc.kill()
        proc.communicate()


def test_ctrl_c_stops_everything_quietly(kind: str) -> None:
    """SIGINT to the whole process group, as a terminal's Ctrl-C sends it."""
    # Start with SIGINT at its default whatever this process inherited (a background
    # shell ignores it).
    reset = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    reset += "os.execv(sys.argv[1], sys.argv[1:])"
    proc, workers = start_server(kind, wrapper=[sys.executable, "-c", reset])
    try:
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=SOON)
        wait_gone(workers)
        assert proc.returncode == 130
        assert err == "\nparent: interrupted; the workers exit on their own\n"
    finally:
        if proc.returncode is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
