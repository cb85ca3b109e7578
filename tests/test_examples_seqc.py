"""examples/seqc_config.py runs end to end on both loops, plain and latch."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support import run_example

EXAMPLE = Path(__file__).parent.parent / "examples" / "seqc_config.py"
REPORT = re.compile(
    r"child (\d): (\d+) snapshots of versions (\d+)\.\.(\d+), (\d+) retries \([\d.]+ %\), "
    r"(\d+) inconsistent"
)


@pytest.mark.parametrize("latch", [False, True])
def test_children_read_consistent_snapshots(kind: str, latch: bool) -> None:
    flags = ["--loop", kind, "--children", "2", "--seconds", "0.3", "--period", "2"]
    result = run_example(EXAMPLE, *flags, *(["--latch"] if latch else []))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"parent: publishing a {'latch' if latch else 'plain'} record to 2 children"
    published = re.fullmatch(r"parent: published (\d+) versions, .*", lines[1])
    assert published is not None, lines[1]
    stop_version = int(published.group(1)) + 1
    reports = [REPORT.fullmatch(line) for line in lines[2:4]]
    for n, report in enumerate(reports, 1):
        assert report is not None, lines
        child, snapshots, first, last, retries, bad = map(int, report.groups())
        assert child == n
        assert snapshots >= 1
        assert 1 <= first <= last == stop_version  # every child saw the stop version
        assert bad == 0
        if latch:
            assert retries == 0  # latch readers never wait
    assert lines[4:] == ["parent: every snapshot was consistent"]


def test_one_call_writes(kind: str) -> None:
    result = run_example(
        EXAMPLE, "--loop", kind, "--children", "1", "--seconds", "0.1", "--hold", "0"
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parent: every snapshot was consistent" in result.stdout


def test_usage() -> None:
    result = run_example(EXAMPLE, "--help")
    assert result.returncode == 0
    assert "--loop" in result.stdout
    assert "--latch" in result.stdout
    bad = run_example(EXAMPLE, "--children", "0")
    assert bad.returncode == 2
    assert "--children must be >= 1" in bad.stderr
