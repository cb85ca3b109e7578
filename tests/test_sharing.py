"""Sharing a Barrier with other processes, and rebuilding it from an untrusted description.

Children started by ``aiosync.create_subprocess_exec(share=...)`` run
``tests/children/barrier_child.py``; its stdout lines are its side of the hand-shake.
multiprocessing children (fork, spawn, forkserver) get the Barrier as a Process
argument. ``inherited()`` caches its result per process, so every bad description is
tried in a fresh child that reports what it raised.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import pickle
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support import PYTHON, SOON, loop_kind, reap, run_on, soon

import aiosync
from aiosync import Barrier, Role, SharingError

CHILD = str(Path(__file__).parent / "children" / "barrier_child.py")
DEADLINE = 0.1  # docs/design.md §7: a dead peer's waits resolve within 100 ms


async def start(b: Barrier, *args: str) -> asyncio.subprocess.Process:
    return await aiosync.create_subprocess_exec(
        PYTHON, CHILD, *args, share={"gate": b}, stdout=asyncio.subprocess.PIPE
    )


async def line(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await soon(proc.stdout.readline())).decode().strip()


async def finish(proc: asyncio.subprocess.Process, code: int = 0) -> None:
    assert await soon(proc.wait()) == code


# ---------------------------------------------------------------------------------------
# Children started with aiosync.create_subprocess_exec
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("child_kind", ["asyncio", "uvloop"])
async def test_child_syncs(child_kind: str) -> None:
    with Barrier() as b:
        proc = await start(b, "sync", child_kind)
        assert b.role is Role.PARENT
        for _ in range(3):
            assert await soon(b.place_and_sync()) is True
        assert await line(proc) == f"synced {child_kind}"
        assert await soon(b.wait_abortion()) is True  # a plain exit counts as aborting
        await finish(proc)


@pytest.mark.parametrize("child_kind", ["asyncio", "uvloop"])
async def test_child_killed_mid_wait(child_kind: str) -> None:
    with Barrier() as b:
        proc = await start(b, "killed-mid-wait", child_kind)
        try:
            assert await line(proc) == "waiting"  # its wait_abortion() is parked
            assert b.place()
            assert b.place()  # it placed one: our sync() waits for a second
            tasks = [asyncio.create_task(b.sync()), asyncio.create_task(b.wait_abortion())]
            for _ in range(3):
                await asyncio.sleep(0)
            assert not any(t.done() for t in tasks)
            proc.kill()
        finally:
            await finish(proc, -9)  # dead, fds closed: the clock starts now
        async with asyncio.timeout(DEADLINE):
            assert await asyncio.gather(*tasks) == [False, True]
        assert b.peer_pid == proc.pid
        assert b.peer_exited  # killed, not aborted
        assert repr(b) == f"<aiosync.Barrier role=PARENT peer={proc.pid} barriers=1 aborted=they>"


async def test_child_without_a_loop_uses_the_blocking_twins() -> None:
    with Barrier() as b:
        proc = await start(b, "blocking")
        assert await soon(b.place_and_sync()) is True
        assert await line(proc) == "timed out"  # we had not placed: it could not sync
        assert b.place()
        assert await line(proc) == "synced"
        assert b.place()  # for its wait_next_blocking()
        assert await line(proc) == "done"
        assert await soon(b.wait_abortion()) is True
        await finish(proc)
        assert b.peer_exited  # it exited without aborting
        assert repr(b) == f"<aiosync.Barrier role=PARENT peer={proc.pid} barriers=1 aborted=they>"


async def test_child_whose_setup_fails_aborts() -> None:
    with Barrier() as b:
        proc = await start(b, "setup-fails")
        assert await line(proc) == "aborted"
        assert b.place()
        assert await soon(b.sync()) is False
        assert b.they_aborted
        assert not b.i_aborted
        assert await soon(b.wait_abortion()) is True
        await finish(proc, 3)
        assert not b.peer_exited  # it aborted, then exited: an abort


async def test_inherited_twice_returns_the_same_objects_and_clears_the_env() -> None:
    with Barrier() as b:
        proc = await start(b, "twice")
        report = json.loads(await line(proc))
        assert report == {
            "names": ["gate"],
            "inheritable": [False, False, False],
            "peer": os.getpid(),
        }
        await finish(proc)


@pytest.mark.parametrize("spoiled", [False, True])
async def test_passed_fds_are_not_inheritable_afterwards(spoiled: bool) -> None:
    """`spoiled`: the fds are made inheritable and blocking before the spawn, as some
    uvloop versions' ``pass_fds`` leave them; aiosync must put them right either way."""
    with Barrier() as b:
        me, them, pipe_r, pipe_w = b._me, b._them, b._pipe_r, b._pipe_w
        if spoiled:
            for fd in (me, them, pipe_w):
                os.set_inheritable(fd, True)
                os.set_blocking(fd, True)
        proc = await start(b, "sync", loop_kind())
        # The child's pipe end was closed here (it is the child's alone now).
        assert (b._me, b._them, b._pipe_r, b._pipe_w) == (me, them, pipe_r, -1)
        assert pipe_w >= 0
        assert not os.get_inheritable(me)
        assert not os.get_inheritable(them)
        assert not os.get_inheritable(pipe_r)
        assert not os.get_blocking(me)
        assert not os.get_blocking(them)
        for _ in range(3):
            assert await soon(b.place_and_sync()) is True
        await line(proc)
        await finish(proc)


async def test_sharing_a_barrier_with_its_role_set_is_refused() -> None:
    with Barrier() as b:
        b.set_role(Role.PARENT)
        with pytest.raises(SharingError, match="only before its role is set"):
            await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share={"gate": b})
        assert b.role is Role.PARENT


@pytest.mark.parametrize("obj", [object(), 3, "gate", None])
async def test_sharing_something_else_is_a_type_error(obj: object) -> None:
    with pytest.raises(TypeError, match="not an aiosync object"):
        await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share={"x": obj})


async def test_share_names_must_be_nonempty_strings() -> None:
    with Barrier() as b:
        with pytest.raises(TypeError, match="non-empty strings"):
            await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share={"": b})
        assert b.role is None  # nothing happened to it


async def test_one_object_under_two_names_is_refused_before_the_spawn() -> None:
    with Barrier() as b:
        with pytest.raises(SharingError, match="same object"):
            await aiosync.create_subprocess_exec(
                PYTHON, CHILD, "sync", "asyncio", share={"gate": b, "again": b}
            )
        assert b.role is None  # nothing was spawned; it can still be shared
        proc = await start(b, "sync", loop_kind())
        for _ in range(3):
            assert await soon(b.place_and_sync()) is True
        await line(proc)
        await finish(proc)


async def test_a_failed_spawn_changes_nothing() -> None:
    with Barrier() as b:
        fds = (b._me, b._them, b._pipe_r, b._pipe_w)
        with pytest.raises(FileNotFoundError):
            await aiosync.create_subprocess_exec("/nonexistent/program", share={"gate": b})
        assert b.role is None
        assert (b._me, b._them, b._pipe_r, b._pipe_w) == fds
        assert not any(os.get_inheritable(fd) for fd in fds)
        proc = await start(b, "sync", loop_kind())
        for _ in range(3):
            assert await soon(b.place_and_sync()) is True
        await line(proc)
        await finish(proc)


def test_pickling_outside_a_multiprocessing_start_is_a_type_error() -> None:
    with Barrier() as b:
        with pytest.raises(TypeError, match="create_subprocess_exec"):
            pickle.dumps(b)
        b.set_role(Role.PARENT)
        with pytest.raises(TypeError):
            pickle.dumps(b)


# ---------------------------------------------------------------------------------------
# multiprocessing children: the Barrier as a Process argument
# ---------------------------------------------------------------------------------------


def mp_child(b: Barrier, kind: str) -> None:
    assert b.role is None
    b.set_role(Role.CHILD)

    async def main() -> None:
        for _ in range(3):
            assert await soon(b.place_and_sync()) is True
        # No abort() here: it would wipe out the last barrier if the parent had not read
        # it yet. Exiting does not ("it is safe to place a barrier and exit").

    run_on(kind, main())
    b.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_child(kind: str, method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with Barrier() as b:
        p = ctx.Process(target=mp_child, args=(b, kind))
        p.start()
        try:
            b.set_role(Role.PARENT)

            async def parent() -> None:
                for _ in range(3):
                    assert await soon(b.place_and_sync()) is True
                assert await soon(b.wait_abortion()) is True
                assert await b.sync() is False

            run_on(kind, parent())
        finally:
            p.join(SOON)
            reap(p)
        assert p.exitcode == 0


# ---------------------------------------------------------------------------------------
# Bad descriptions: each gets a clear SharingError in the child
# ---------------------------------------------------------------------------------------


class Fds:
    """Real fds of every kind, to be passed to a probing child."""

    def __init__(self) -> None:
        self.me = os.eventfd(0, os.EFD_CLOEXEC)
        self.them = os.eventfd(0, os.EFD_CLOEXEC)
        self.pipe_r, self.pipe_w = os.pipe2(os.O_CLOEXEC)
        self.semaphore = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_SEMAPHORE)
        self.file = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        self.me2 = os.eventfd(0, os.EFD_CLOEXEC)
        self.them2 = os.eventfd(0, os.EFD_CLOEXEC)
        self.pipe_r2, self.pipe_w2 = os.pipe2(os.O_CLOEXEC)

    def all(self) -> list[int]:
        return [
            self.me,
            self.them,
            self.pipe_r,
            self.pipe_w,
            self.semaphore,
            self.file.fileno(),
            self.me2,
            self.them2,
            self.pipe_w2,
        ]

    def close(self) -> None:
        for fd in self.all():
            if fd != self.file.fileno():
                os.close(fd)
        os.close(self.pipe_r2)
        self.file.close()


@pytest.fixture
def fds() -> Iterator[Fds]:
    f = Fds()
    yield f
    f.close()


def barrier_entry(f: Fds) -> dict[str, Any]:
    return {
        "type": "Barrier",
        "state": {"role": "CHILD"},
        "fds": {"me": f.me, "them": f.them, "pipe_w": f.pipe_w},
    }


def doc(*entries: tuple[str, Any]) -> dict[str, Any]:
    return {"aiosync": 1, "objects": dict(entries)}


def probe(f: Fds, description: object, *, raw: bool = False) -> dict[str, Any]:
    """Run the probing child with `description` in AIOSYNC_SHARED and `f`'s fds passed."""
    env = {k: v for k, v in os.environ.items() if k != "AIOSYNC_SHARED"}
    if description is not None:
        env["AIOSYNC_SHARED"] = description if raw else json.dumps(description)  # type: ignore[assignment]
    fds = f.all()
    out = subprocess.run(
        [PYTHON, CHILD, "probe", *map(str, fds)],
        env=env,
        pass_fds=fds,
        capture_output=True,
        timeout=SOON,
        check=True,
    )
    report: dict[str, Any] = json.loads(out.stdout)
    return report


def edit(f: Fds, change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    d = doc(("gate", barrier_entry(f)))
    change(d["objects"]["gate"])
    return d


def test_a_good_description_is_accepted(fds: Fds) -> None:
    report = probe(fds, doc(("gate", barrier_entry(fds))))
    assert report["type"] is None
    assert report["names"] == ["gate"]
    assert not report["env"]


def expect_error(report: dict[str, Any], *fragments: str) -> None:
    assert report["type"] == "SharingError", report
    for fragment in fragments:
        assert fragment in report["message"], report


def test_no_description(fds: Fds) -> None:
    expect_error(probe(fds, None), "AIOSYNC_SHARED is not set", "create_subprocess_exec")


@pytest.mark.parametrize("text", ["{", "", "not json", "[1, 2"])
def test_not_json(fds: Fds, text: str) -> None:
    expect_error(probe(fds, text, raw=True), "not valid JSON")


@pytest.mark.parametrize(
    "description",
    [
        {"aiosync": 2, "objects": {}},
        {"aiosync": "1", "objects": {}},
        {"objects": {}},
        [1, {}],
        "aiosync",
        17,
        None,
    ],
    ids=["version-2", "version-str", "no-version", "list", "str", "int", "null"],
)
def test_wrong_format(fds: Fds, description: object) -> None:
    text = json.dumps(description)
    expect_error(probe(fds, text, raw=True), "not an aiosync description")


@pytest.mark.parametrize(
    "description",
    [
        {"aiosync": 1},
        {"aiosync": 1, "objects": []},
        {"aiosync": 1, "objects": {}, "extra": 1},
    ],
    ids=["no-objects", "objects-list", "extra-key"],
)
def test_wrong_structure(fds: Fds, description: object) -> None:
    expect_error(probe(fds, description), "bad 'objects'")


@pytest.mark.parametrize(
    "entry",
    [
        [],
        {"type": "Barrier", "state": {}},
        {"type": "Barrier", "state": {}, "fds": {}, "more": 1},
    ],
    ids=["list", "missing-fds", "extra-field"],
)
def test_malformed_entry(fds: Fds, entry: object) -> None:
    expect_error(probe(fds, doc(("gate", entry))), "'gate'", "malformed entry")


def test_state_or_fds_not_objects(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e.update(fds=[fds.me])))
    expect_error(report, "'gate'", "malformed state or fds")
    report = probe(fds, edit(fds, lambda e: e.update(state="CHILD")))
    expect_error(report, "'gate'", "malformed state or fds")


@pytest.mark.parametrize("type_name", ["RLock", "barrier", "object", "Role", "SharingError"])
def test_unknown_type(fds: Fds, type_name: str) -> None:
    report = probe(fds, edit(fds, lambda e: e.update(type=type_name)))
    expect_error(report, "'gate'", f"unknown type {type_name!r}")


def test_unknown_role(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e.update(state={"role": "PARENT"})))
    expect_error(report, "'gate'", "unknown role 'PARENT'")


def test_missing_fd_field(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].pop("pipe_w")))
    expect_error(report, "'gate'", "missing ['pipe_w']")


def test_extra_fd_field(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(spare=fds.me2)))
    expect_error(report, "'gate'", "unexpected ['spare']")


def test_fd_not_open(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(them=987)))
    expect_error(report, "fd 987 is not open")


def test_regular_file_for_an_eventfd(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(me=fds.file.fileno())))
    expect_error(report, f"fd {fds.file.fileno()} should be an eventfd")


def test_pipe_for_an_eventfd(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(them=fds.pipe_r)))
    expect_error(report, f"fd {fds.pipe_r} should be an eventfd", "pipe:")


def test_eventfd_for_a_pipe(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(pipe_w=fds.me2)))
    expect_error(report, f"fd {fds.me2} should be a pipe", "eventfd")


def test_wrong_pipe_end(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(pipe_w=fds.pipe_r)))
    expect_error(report, f"fd {fds.pipe_r} is not the write end of a pipe")


def test_wrong_pipe_end_for_the_read_end(fds: Fds) -> None:
    # A description for a multiprocessing child carries the read end too.
    report = probe(fds, edit(fds, lambda e: e["fds"].update(pipe_r=fds.pipe_w2)))
    expect_error(report, f"fd {fds.pipe_w2} is not the read end of a pipe")


def test_semaphore_eventfd_for_a_plain_one(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(them=fds.semaphore)))
    expect_error(report, f"fd {fds.semaphore} should be a plain eventfd")


def test_same_fd_claimed_twice_in_one_object(fds: Fds) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(them=fds.me)))
    expect_error(report, f"fd {fds.me} is claimed twice")


def test_same_fd_claimed_twice_by_two_objects(fds: Fds) -> None:
    second = barrier_entry(fds)
    second["fds"] = {"me": fds.me2, "them": fds.them2, "pipe_w": fds.pipe_w}
    report = probe(fds, doc(("gate", barrier_entry(fds)), ("other", second)))
    expect_error(report, "'other'", f"fd {fds.pipe_w} is claimed twice")


@pytest.mark.parametrize("bad", [-1, -100, True, False, "5", 3.0, None, [3]])
def test_not_an_fd_number(fds: Fds, bad: object) -> None:
    report = probe(fds, edit(fds, lambda e: e["fds"].update(them=bad)))
    expect_error(report, f"{bad!r} is not a file descriptor number")


def test_a_bad_entry_leaves_the_good_ones_unadopted(fds: Fds) -> None:
    second = barrier_entry(fds)
    second["fds"] = {"me": fds.me2, "them": fds.them2, "pipe_w": fds.semaphore}
    report = probe(fds, doc(("gate", barrier_entry(fds)), ("other", second)))
    expect_error(report, "other: ", f"fd {fds.semaphore} should be a pipe")
    # Every entry is checked before any is adopted: "gate" never was, its fds stay open.
    for fd in (fds.me, fds.them, fds.pipe_w):
        assert fd in report["open"], report
