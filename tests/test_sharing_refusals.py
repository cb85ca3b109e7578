"""Sharing a Barrier: two refusals that once came too late or not at all.

* One object under two names in ``share=``: the parent used to start the child and
  only then fail (taking the PARENT role twice), losing the Process while the child
  was told "fd N is claimed twice". It is refused before anything starts, and the
  barrier is as good as new.
* The ``state`` of a Barrier description must be exactly ``{"role": ...}``: a missing
  role used to give the child a Barrier without a role, and extra keys passed. A
  description with no role yet (the pickled, multiprocessing form) must bring the
  pipe's read end too, since that child may take either role.

``inherited()`` caches its result per process, so every description is tried in a
fresh child, which reports what it got as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from support import PYTHON, SOON, soon

import aiosync
from aiosync import Barrier, Role, SharingError

SYNC_ONCE = """
import aiosync
b = aiosync.inherited()["gate"]
assert b.role is aiosync.Role.CHILD
assert b.place_and_sync_blocking(timeout=10) is True
"""

REPORT = """
import json, aiosync
try:
    objects = aiosync.inherited()
except aiosync.AiosyncError as exc:
    print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
else:
    print(json.dumps({name: [type(o).__name__, getattr(o, "role", None) and o.role.name]
                      for name, o in objects.items()}))
"""


async def test_one_object_under_two_names_is_refused_before_the_start() -> None:
    with Barrier() as b:
        with pytest.raises(SharingError, match=r"share\['b'\] is the same object as share\['a'\]"):
            await aiosync.create_subprocess_exec(
                PYTHON, "-c", "raise SystemExit(7)", share={"a": b, "b": b}
            )
        # Nothing happened to it: no role, every fd open and ours.
        assert repr(b) == "<aiosync.Barrier role=unset barriers=0 aborted=no>"
        fds = (b._me, b._them, b._pipe_r, b._pipe_w)
        assert all(fd >= 0 and not os.get_inheritable(fd) for fd in fds)
        # It can still be shared (once), and works.
        proc = await aiosync.create_subprocess_exec(PYTHON, "-c", SYNC_ONCE, share={"gate": b})
        assert repr(b) == f"<aiosync.Barrier role=PARENT peer={proc.pid} barriers=0 aborted=no>"
        assert await soon(b.place_and_sync()) is True
        assert await soon(proc.wait()) == 0


async def test_the_duplicate_is_found_among_other_objects() -> None:
    with Barrier() as b1, Barrier() as b2:
        with pytest.raises(SharingError, match=r"share\['c'\] is the same object as share\['a'\]"):
            await aiosync.create_subprocess_exec(
                PYTHON, "-c", "raise SystemExit(7)", share={"a": b1, "b": b2, "c": b1}
            )
        assert (b1.role, b2.role) == (None, None)


async def test_two_different_barriers_are_shared() -> None:
    with Barrier() as b1, Barrier() as b2:
        proc = await aiosync.create_subprocess_exec(
            PYTHON, "-c", REPORT, share={"one": b1, "two": b2}, stdout=subprocess.PIPE
        )
        out, _ = await soon(proc.communicate())
        assert proc.returncode == 0
        assert json.loads(out) == {"one": ["Barrier", "CHILD"], "two": ["Barrier", "CHILD"]}
        assert (b1.role, b2.role) == (Role.PARENT, Role.PARENT)


# ---------------------------------------------------------------------------------------
# The state of a Barrier description
# ---------------------------------------------------------------------------------------


class Fds:
    """The fds of one barrier description, to be passed to a probing child."""

    def __init__(self) -> None:
        self.me = os.eventfd(0, os.EFD_CLOEXEC)
        self.them = os.eventfd(0, os.EFD_CLOEXEC)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)

    def all(self) -> list[int]:
        return [self.me, self.them, self.pipe_r, self.pipe_w]

    def close(self) -> None:
        for fd in self.all():
            os.close(fd)


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    yield f
    f.close()


def probe(f: Fds, state: object, *, pipe_r: bool) -> dict[str, Any]:
    entry_fds = {"me": f.me, "them": f.them, "pipe_w": f.pipe_w}
    if pipe_r:
        entry_fds["pipe_r"] = f.pipe_r
    description = {
        "aiosync": 1,
        "objects": {"gate": {"type": "Barrier", "state": state, "fds": entry_fds}},
    }
    env = dict(os.environ)
    env[aiosync._share.ENV_VAR] = json.dumps(description)
    out = subprocess.run(
        [PYTHON, "-c", REPORT],
        env=env,
        pass_fds=f.all(),
        capture_output=True,
        timeout=SOON,
        check=True,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


@pytest.mark.parametrize(
    ("state", "pipe_r", "fragment"),
    [
        ({}, False, "missing ['role']"),
        ({}, True, "missing ['role']"),
        ({"role": "CHILD", "extra": 1}, False, "unexpected ['extra']"),
        ({"role": None, "spare": "x"}, True, "unexpected ['spare']"),
        ({"role": None}, False, "missing ['pipe_r']"),
    ],
    ids=["no-role", "no-role-with-read-end", "extra-key", "extra-key-no-role", "no-read-end"],
)
def test_bad_state_is_refused(fds: Fds, state: object, pipe_r: bool, fragment: str) -> None:
    report = probe(fds, state, pipe_r=pipe_r)
    assert report == {
        "error": "SharingError",
        "message": f"shared object 'gate': fields: {fragment}",
    }


@pytest.mark.parametrize(
    ("state", "pipe_r", "role"),
    [({"role": "CHILD"}, False, "CHILD"), ({"role": None}, True, None)],
    ids=["exec-form", "pickled-form"],
)
def test_good_state_is_accepted(fds: Fds, state: object, pipe_r: bool, role: str | None) -> None:
    assert probe(fds, state, pipe_r=pipe_r) == {"gate": ["Barrier", role]}
