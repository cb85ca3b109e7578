"""docs/completion.md's "when the completer may die" program runs as the page says.

The page's Python block is run as a user would run it (warnings as errors), on both
loops: a worker that completes makes the parent say "ready"; a worker SIGKILLed before
it completes makes the parent say so at once, through the Barrier shared beside the
Completion, instead of waiting for ever.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import SLOW_CALLBACK

PAGE = Path(__file__).parent.parent / "docs" / "completion.md"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
# Runs the page's program with asyncio.run standing for the loop under test.
RUNNER = """
import asyncio, runpy, sys
if sys.argv[1] == "uvloop":
    import uvloop

    def run(main, **_):  # not uvloop.run: from 3.12 it calls asyncio.run itself
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)

    asyncio.run = run
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    blocks = [b for b in FENCE.findall(PAGE.read_text()) if "def ready_or_exited" in b]
    assert len(blocks) == 1, "docs/completion.md has one ready_or_exited program"
    path = tmp_path_factory.mktemp("completion-doc") / "ready_or_exited.py"
    path.write_text(blocks[0])
    return path


def run(program: Path, kind: str, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-c", RUNNER, kind, str(program), *args],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    result.stderr = SLOW_CALLBACK.sub("", result.stderr)  # the machine's load, not ours
    return result


def test_the_worker_completes(program: Path, kind: str) -> None:
    result = run(program, kind)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "parent: the worker is ready\n"
    assert result.stderr == ""


def test_a_killed_worker_ends_the_wait(program: Path, kind: str) -> None:
    result = run(program, kind, "kill")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"parent: the worker exited first \(pid \d+\)\n", result.stdout)
    assert result.stderr == ""
