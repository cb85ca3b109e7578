"""examples/barrier_subprocess.py runs end to end, on both loops, in all three outcomes."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_example

EXAMPLE = Path(__file__).parent.parent / "examples" / "barrier_subprocess.py"


def test_both_sides_ready(kind: str) -> None:
    result = run_example(EXAMPLE, "--loop", kind)
    assert result.returncode == 0, result.stderr
    assert "parent: both sides ready; the child listens on port" in result.stdout
    assert "parent: the child answered 'hello back'" in result.stdout
    assert "child: got 'hello from the parent" in result.stderr
    assert "Traceback" not in result.stderr


def test_child_setup_fails(kind: str) -> None:
    result = run_example(EXAMPLE, "--loop", kind, "--fail", "child")
    assert result.returncode == 1
    assert "child: setup failed; aborting the start-up" in result.stderr
    assert "parent: the child failed its setup (exit status 1)" in result.stdout
    assert "Traceback" not in result.stderr


def test_parent_setup_fails(kind: str) -> None:
    result = run_example(EXAMPLE, "--loop", kind, "--fail", "parent")
    assert result.returncode == 1
    assert "child: the parent aborted; exiting" in result.stderr
    assert "parent: the child stopped too (exit status 1)" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("flag", ["--help"])
def test_usage(flag: str) -> None:
    result = run_example(EXAMPLE, flag)
    assert result.returncode == 0
    assert "--loop" in result.stdout
