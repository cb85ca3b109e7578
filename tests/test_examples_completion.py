"""examples/completion_ready.py runs end to end on both loops: all ready, and not."""

from __future__ import annotations

from pathlib import Path

from support import run_example

EXAMPLE = Path(__file__).parent.parent / "examples" / "completion_ready.py"


def test_all_children_ready(kind: str) -> None:
    result = run_example(EXAMPLE, "--loop", kind, "--children", "3", "--timeout", "30")
    assert result.returncode == 0, result.stderr
    assert "parent: 3 of 3 ready" in result.stdout
    expected = sum(i * i for i in range(3000))
    assert f"parent: all ready; the shards add up to {expected}" in result.stdout
    assert "never got ready" not in result.stdout
    assert result.stderr == ""


def test_names_the_children_that_never_got_ready(kind: str) -> None:
    result = run_example(EXAMPLE, "--loop", kind, "--fail", "1", "--hang", "2", "--timeout", "5")
    assert result.returncode == 1
    named = [line for line in result.stdout.splitlines() if "never got ready" in line]
    assert named == [
        "parent: never got ready: child 1 (failed, exit status 1)",
        "parent: never got ready: child 2 (still setting up; killed)",
    ]
    assert "parent: 2 of 4 ready" in result.stdout
    assert "child 1: setup failed" in result.stderr
    assert "Traceback" not in result.stderr
