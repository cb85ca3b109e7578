"""`make docs` passes: the docs check (links, code, names) and the strict site build.

The site build is also checked to fail on a broken API reference, so that "it built"
means something.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
CHECK = ROOT / "docs" / "check.py"
MKDOCS = Path(sys.executable).parent / "mkdocs"


def test_docs_are_consistent() -> None:
    spec = importlib.util.spec_from_file_location("docs_check", CHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.problems() == []


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(MKDOCS), "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_the_site_builds_strictly(tmp_path: Path) -> None:
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    for name in (
        "aiosync.BarrierGroup.place_and_sync",
        "aiosync.SeqRecord.read_nowait",
        "aiosync.Lock.mark_consistent",
        "aiosync.Lock.acquire_blocking",
        "aiosync.Semaphore.value",
    ):
        assert name in api
    examples = (tmp_path / "site" / "examples" / "index.html").read_text()
    assert 'id="prefork_server"' in examples
    assert 'id="robust_log"' in examples


@pytest.mark.parametrize(
    ("page", "broken", "named"),
    [
        ("api.md", "\n::: aiosync.NoSuchThing\n", "NoSuchThing"),
        ("children.md", "\nSee [the missing page](missing.md).\n", "missing.md"),
        ("barrier.md", "\nSee [a section](seqc.md#no-such-heading).\n", "no-such-heading"),
    ],
)
def test_a_broken_reference_fails_the_build(
    tmp_path: Path, page: str, broken: str, named: str
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copytree(ROOT / "examples", copy / "examples")
    spoiled = copy / "docs" / page
    spoiled.write_text(spoiled.read_text() + broken)
    result = build(copy, tmp_path / "site")
    assert result.returncode != 0
    assert named in result.stderr
