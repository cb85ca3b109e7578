"""`make matrix`: the test suite on every supported interpreter found here.

Stdlib only; run with any Python 3 (``python3 tests/support/matrix.py``). Interpreters:

* ``$MATRIX_PYTHONS`` (space-separated commands or paths) if set: exactly those, and
  one that is missing or unsupported fails the run (CI relies on this);
* otherwise every CPython 3.11-3.15 found: pyenv's (``~/.pyenv/versions/*``), the
  system's ``python3``, any ``python3.X`` on PATH, and ``python3.X`` inside the Debian
  root ``$MATRIX_DEBROOT`` (default /work/debroot, see docs/contributing.md), run there
  through ``chroot`` with this checkout bind-mounted at the same path.

Each gets its own venv in the checkout (``.venv-<origin>-<X.Y>``, with the package
installed editable with its test and docs extras), runs the plain pytest suite (no lint, no
docs), and prints one line: version, origin, passed/failed/skipped/errors, minutes.
The full output is kept in ``.venv-<origin>-<X.Y>/pytest.log``. Exit status: 0 if every
run passed.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parents[2]
SUPPORTED = [(3, minor) for minor in range(11, 16)]
PROBE = "import sys, sysconfig; print(sys.version_info[0], sys.version_info[1], \
sys.executable, sys.version.split()[0], int(bool(sysconfig.get_config_var('Py_GIL_DISABLED'))))"


@dataclass
class Interpreter:
    command: list[str]  # how to run it here (through chroot for the Debian root)
    origin: str  # pyenv, system, path, debian, given
    version: tuple[int, int] = (0, 0)
    full_version: str = ""
    executable: str = ""
    free_threaded: bool = False
    chroot: str | None = None

    @property
    def tag(self) -> str:
        t = "t" if self.free_threaded else ""
        return f"{self.origin}-{self.version[0]}.{self.version[1]}{t}"

    @property
    def venv(self) -> Path:
        return REPO / f".venv-{self.tag}"

    def run(
        self,
        argv: list[str],
        *,
        capture: bool = True,
        log: IO[str] | None = None,
        timeout: float | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """`argv` (paths in this checkout) in the interpreter's own root; its output
        captured, or written to `log`."""
        if self.chroot is not None:
            # The checkout is bind-mounted into the root only once the runs start; the
            # probe that comes before runs from the root's /.
            script = f"cd {shlex.quote(str(REPO))} 2>/dev/null || cd /; exec {shlex.join(argv)}"
            argv = ["chroot", self.chroot, "/bin/sh", "-c", script]
        if log is not None:
            return subprocess.run(
                argv, text=True, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
            )
        return subprocess.run(argv, text=True, capture_output=capture, timeout=timeout, check=False)

    def probe(self) -> bool:
        try:
            out = self.run([*self.command, "-c", PROBE], timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return False
        if out.returncode != 0:
            return False
        major, minor, self.executable, self.full_version, ft = out.stdout.split()
        self.version = (int(major), int(minor))
        self.free_threaded = ft == "1"
        return True


def discover() -> tuple[list[Interpreter], list[str]]:
    """The interpreters to run, and problems that must fail the run."""
    given = os.environ.get("MATRIX_PYTHONS", "").split()
    found: list[Interpreter] = []
    problems: list[str] = []
    if given:
        for command in given:
            interp = Interpreter([command], "given")
            if not interp.probe():
                problems.append(f"{command}: not found or does not run")
            elif interp.version not in SUPPORTED:
                problems.append(f"{command}: Python {interp.full_version} is not supported")
            else:
                interp.origin = origin_of(interp.executable)
                found.append(interp)
        return found, problems
    candidates: list[Interpreter] = []
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    for python in sorted(glob.glob(str(pyenv / "*" / "bin" / "python3"))):
        candidates.append(Interpreter([python], "pyenv"))
    for name in ["python3"] + [f"python3.{minor}" for _, minor in SUPPORTED]:
        if (path := shutil.which(name)) is not None:
            candidates.append(Interpreter([path], "path"))
    if Path("/usr/bin/python3").exists():
        candidates.append(Interpreter(["/usr/bin/python3"], "system"))
    debroot = os.environ.get("MATRIX_DEBROOT", "/work/debroot")
    if Path(debroot, "usr/bin").is_dir():
        for _, minor in SUPPORTED:
            if Path(debroot, f"usr/bin/python3.{minor}").exists():
                candidates.append(
                    Interpreter([f"/usr/bin/python3.{minor}"], "debian", chroot=debroot)
                )
    seen: set[tuple[str | None, str]] = set()
    for interp in candidates:
        if interp.chroot is not None and os.geteuid() != 0:
            print(f"skipped: {interp.command[0]} in {interp.chroot} (chroot needs root)")
            continue
        if not interp.probe():
            continue
        key = (
            interp.chroot,
            os.path.realpath(interp.executable) if interp.chroot is None else interp.executable,
        )
        if key in seen:
            continue
        seen.add(key)
        if interp.version not in SUPPORTED:
            continue
        if interp.origin == "path":
            interp.origin = origin_of(interp.executable)
        found.append(interp)
    return found, problems


def origin_of(executable: str) -> str:
    return "pyenv" if "/.pyenv/" in executable else "system"


def mount_repo(root: str) -> list[str]:
    """Bind-mount /proc, /dev and this checkout into `root` where they are missing;
    return what was mounted (to undo)."""
    mounted = []
    for source, target in (("/proc", "proc"), ("/dev", "dev"), (str(REPO), str(REPO).lstrip("/"))):
        where = Path(root, target)
        where.mkdir(parents=True, exist_ok=True)
        if subprocess.run(["mountpoint", "-q", str(where)], check=False).returncode != 0:
            subprocess.run(["mount", "--bind", source, str(where)], check=True)
            mounted.append(str(where))
    return mounted


def run_suite(interp: Interpreter) -> tuple[bool, str]:
    """Install and run the suite on `interp`: did it pass, and its one-line result."""
    start = time.monotonic()
    log_path = interp.venv / "pytest.log"
    venv_python = str(interp.venv / "bin" / "python")
    if not Path(interp.venv, "bin", "python").exists():
        made = interp.run([*interp.command, "-m", "venv", str(interp.venv)])
        if made.returncode != 0:
            return False, f"venv failed: {made.stderr.strip().splitlines()[-1:]}"
    installed = interp.run([venv_python, "-m", "pip", "install", "--quiet", "-e", ".[test,docs]"])
    if installed.returncode != 0:
        log_path.write_text(installed.stdout + installed.stderr)
        return False, f"install failed (see {log_path.relative_to(REPO)})"
    with open(log_path, "w") as log:
        ran = interp.run([venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider"], log=log)
    minutes = (time.monotonic() - start) / 60
    tail = log_path.read_text().strip().splitlines()[-1:] or [""]
    counts = {
        word: int(n)
        for n, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", tail[0])
    }
    errors = counts.get("error", 0) + counts.get("errors", 0)
    verdict = "ok" if ran.returncode == 0 else f"FAILED (exit {ran.returncode})"
    return ran.returncode == 0, (
        f"passed={counts.get('passed', 0)} failed={counts.get('failed', 0)} "
        f"skipped={counts.get('skipped', 0)} errors={errors}  {minutes:.1f} min  {verdict}"
    )


def main() -> int:
    interpreters, problems = discover()
    for problem in problems:
        print(f"matrix: {problem}", file=sys.stderr)
    if problems or not interpreters:
        print("matrix: nothing to run" if not problems else "matrix: failed", file=sys.stderr)
        return 1
    print(
        "matrix: " + ", ".join(f"{i.full_version} ({i.origin})" for i in interpreters), flush=True
    )
    mounted: list[str] = []
    failed = 0
    try:
        for interp in interpreters:
            if interp.chroot is not None:
                mounted += mount_repo(interp.chroot)
            ok, line = run_suite(interp)
            failed += not ok
            print(f"{interp.full_version:<8} {interp.tag:<16} {line}", flush=True)
    finally:
        for where in reversed(mounted):
            subprocess.run(["umount", where], check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
