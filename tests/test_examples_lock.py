"""examples/robust_log.py runs end to end on both loops: the worker SIGKILLed in the
middle of a record leaves a torn record, the next holder of the Lock repairs it; and,
with --forget-repair, an unrepaired release breaks the lock in every process.

The log is kept (--log) and checked here too, independently of the example's own check.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
from support import run_example

EXAMPLE = Path(__file__).parent.parent / "examples" / "robust_log.py"
KILLED = re.compile(r"parent: worker (\d) \(pid (\d+)\) is mid-record: SIGKILL")


def line(n: int, seq: int) -> bytes:
    """Worker n's record seq, as the example writes it."""
    digest = hashlib.sha256(f"{n} {seq}".encode()).hexdigest()[:32]
    return f"w{n} {seq:04d} {digest}\n".encode()


@pytest.mark.parametrize("victim", [0, 2])
def test_the_next_holder_repairs_the_torn_record(kind: str, victim: int, tmp_path: Path) -> None:
    log = tmp_path / "log"
    flags = ["--workers", "3", "--records", "10", "--kill", str(victim), "--log", str(log)]
    result = run_example(EXAMPLE, "--loop", kind, *flags)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"parent: 3 workers append 10 records each; "
        f"worker {victim} will be killed in the middle of its record 6"
    )
    killed = KILLED.fullmatch(lines[1])
    assert killed is not None, lines
    assert int(killed.group(1)) == victim
    # Exactly one worker took the lock over, and what it cut is the head of the torn
    # record: the first half of the victim's record 6.
    torn = line(victim, 6)
    repairs = [text for text in lines if "took the lock over" in text]
    assert len(repairs) == 1, lines
    repair = re.fullmatch(r"worker (\d): took the lock over; cut (.*); repaired", repairs[0])
    assert repair is not None, repairs
    assert int(repair.group(1)) != victim
    assert repair.group(2) == repr(torn[: len(torn) // 2])
    survivors = [n for n in range(3) if n != victim]
    for n in survivors:
        assert f"worker {n}: wrote 10 records" in lines
    assert lines[-1] == (
        f"parent: every record is whole: 25 records, 10 from each worker "
        f"and 5 from worker {victim}, which was killed"
    )

    # The log itself: every line a whole record, each worker's in order, nothing torn.
    data = log.read_bytes()
    records = data.splitlines(keepends=True)
    assert b"".join(records) == data
    assert data.endswith(b"\n")
    assert len(records) == 25
    for n in range(3):
        mine = [r for r in records if r.startswith(f"w{n} ".encode())]
        count = 5 if n == victim else 10
        assert mine == [line(n, seq) for seq in range(1, count + 1)]
    assert torn[: len(torn) // 2] not in data  # the torn head is gone


def test_an_unrepaired_release_breaks_the_lock_everywhere(kind: str, tmp_path: Path) -> None:
    log = tmp_path / "log"
    flags = ["--workers", "3", "--records", "10", "--log", str(log), "--forget-repair"]
    result = run_example(EXAMPLE, "--loop", kind, *flags)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    killed = KILLED.fullmatch(lines[1])
    assert killed is not None, lines
    dead_pid = killed.group(2)
    taken = [text for text in lines if "took the lock over" in text]
    assert len(taken) == 1
    assert re.fullmatch(r"worker [12]: took the lock over; releasing it unrepaired", taken[0])
    # Both surviving workers had records left to write: each of their next acquires
    # raised, naming the dead holder's pid.
    broken = [text for text in lines if "BrokenResourceError" in text]
    assert len(broken) == 2, lines
    for n, text in zip((1, 2), broken, strict=True):
        assert text.startswith(f"worker {n}: BrokenResourceError: ")
        assert re.search(rf"\b{dead_pid}\b", text), text
    assert "parent: workers 1, 2 failed" in lines
    # The unrepaired log: the record written after the torn head was glued onto it.
    assert any(text.startswith("parent: bad log: not a record: b'w0 0006 ") for text in lines)
    assert not any(text.startswith("parent: every record is whole") for text in lines)


def test_usage() -> None:
    result = run_example(EXAMPLE, "--help")
    assert result.returncode == 0
    for flag in ("--loop", "--forget-repair", "--kill", "--log"):
        assert flag in result.stdout
    for args, message in [
        (["--workers", "1"], "--workers must be >= 2"),
        (["--records", "1"], "--records must be >= 2"),
        (["--kill", "4"], "--kill must name a worker"),
    ]:
        bad = run_example(EXAMPLE, *args)
        assert bad.returncode == 2
        assert message in bad.stderr
