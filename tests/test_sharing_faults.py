"""Sharing is all or nothing, and touches only what is ours.

* Hostile descriptions: whatever ``AIOSYNC_SHARED`` holds (deep JSON, a list for a
  type, a memfd sealed against writing, ...), `inherited()` raises `SharingError` naming
  the entry, and only that.
* Two phases: every entry is checked before any fd is adopted, so a bad entry leaves the
  fds of the good ones (the application's, maybe) open and with their flags.
* A `SeqRecord` and its own ``seqcount`` travel together: one fd, passed once, and the
  receiving process gets the record and the record's ``seqcount``.
* The CHILD side of a Barrier goes to one child: a second hand-out is refused before
  the second child starts.
* "Cannot share this": `TypeError` for something that is not an aiosync object or a
  ``share`` that is not a mapping, `SharingError` with the reason for everything else.

`inherited()` caches its result per process; the in-process tests here set the variable
and reset the cache (``isolated_env``), and restore both afterwards.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import multiprocessing
import os
import pickle
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support import PYTHON, SOON, is_open, loop_kind, reap, run_on, soon

import aiosync
from aiosync import (
    Barrier,
    BarrierGroup,
    Completion,
    Role,
    SeqCount,
    SeqRecord,
    SharingError,
    _share,
)

ENV_VAR = _share.ENV_VAR
F_SEAL_FUTURE_WRITE = 0x0010  # not in Python's fcntl module before 3.12 or so

# ---------------------------------------------------------------------------------------
# In-process inherited(): the environment and the cache, set and restored
# ---------------------------------------------------------------------------------------


@pytest.fixture
def isolated_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[object], dict[str, object]]:
    """``inherited(description)``: run `aiosync.inherited()` on a fresh cache, with
    `description` (JSON-encoded unless it is already a str) in the environment."""

    def run(description: object) -> dict[str, object]:
        text = description if isinstance(description, str) else json.dumps(description)
        monkeypatch.setenv(ENV_VAR, text)
        monkeypatch.setattr(_share, "_inherited", None)
        return aiosync.inherited()

    return run


def fd_state(fd: int) -> tuple[int, int, int, int]:
    """What an fd is (device, inode) and its flags (FD_CLOEXEC, O_NONBLOCK and co.)."""
    st_ = os.fstat(fd)
    return (st_.st_dev, st_.st_ino, fcntl.fcntl(fd, fcntl.F_GETFD), fcntl.fcntl(fd, fcntl.F_GETFL))


def spoil(fd: int) -> int:
    """Give `fd` the flags aiosync would never leave: inheritable and blocking."""
    os.set_inheritable(fd, True)
    os.set_blocking(fd, True)
    return fd


def doc(**entries: object) -> dict[str, object]:
    return {"aiosync": 1, "objects": entries}


def record_entry(memfd: int, format: str = "qqd", *, latch: bool = False) -> dict[str, Any]:
    return {
        "type": "SeqRecord",
        "state": {"format": format, "latch": latch},
        "fds": {"memfd": memfd},
    }


def seqcount_entry(memfd: int, offset: int = 0, size: int = 24, copies: int = 1) -> dict[str, Any]:
    state = {"offset": offset, "size": size, "copies": copies}
    return {"type": "SeqCount", "state": state, "fds": {"memfd": memfd}}


def refused_untouched(
    inherit: Callable[[object], object], description: object, match: str, *fds: int
) -> None:
    """`inherit(description)` raises SharingError matching `match`, and leaves `fds`
    exactly as they were."""
    before = [fd_state(fd) for fd in fds]
    with pytest.raises(SharingError, match=match):
        inherit(description)
    assert [fd_state(fd) for fd in fds] == before


def join(p: Any) -> None:
    """Join a multiprocessing child; kill it if it is still running after SOON."""
    p.join(SOON)
    reap(p)


def close_all(objects: dict[str, object]) -> None:
    for obj in objects.values():
        obj.close()  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# 3. Hostile descriptions: SharingError naming the entry, nothing else
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 100_000])
def test_deeply_nested_json_is_a_sharing_error(
    isolated_env: Callable[[object], dict[str, object]], depth: int
) -> None:
    text = '{"aiosync": 1, "objects": {"gate": ' + "[" * depth + "]" * depth + "}}"
    with pytest.raises(SharingError, match=r"not valid JSON|'gate'"):
        isolated_env(text)


@pytest.mark.parametrize("where", ["type", "state", "fd", "format", "role", "name"])
def test_deep_values_are_shown_briefly(
    isolated_env: Callable[[object], dict[str, object]], where: str
) -> None:
    """Values nested almost as deep as JSON allows: the message shows them shortly
    (a full repr would overflow the stack)."""
    deep: object = 0
    for _ in range(sys.getrecursionlimit() // 2):
        deep = [deep]
    entry: dict[str, Any] = {"type": "Completion", "state": {}, "fds": {"count": 0, "all": 1}}
    if where == "type":
        entry["type"] = deep
    elif where == "state":
        entry["state"] = {"x": deep}
    elif where == "fd":
        entry["fds"]["count"] = deep
    elif where == "format":
        entry.update(type="SeqRecord", state={"format": deep, "latch": False}, fds={"memfd": 0})
    elif where == "role":
        entry.update(type="Barrier", state={"role": deep}, fds={})
    name = "gate" * 10_000 if where == "name" else "gate"
    if where == "name":
        entry["type"] = deep
    with pytest.raises(SharingError, match="gate") as info:
        isolated_env(doc(**{name: entry}))
    assert len(str(info.value)) < 500


@pytest.mark.parametrize(
    "entry",
    [
        {"type": "SeqCount", "state": {"offset": 0, "size": 2**70, "copies": 1}},
        {"type": "SeqCount", "state": {"offset": 0, "size": 2**62, "copies": 2}},
        {"type": "SeqCount", "state": {"offset": 2**70, "size": 8, "copies": 1}},
        {"type": "SeqRecord", "state": {"format": f"{2**62}x", "latch": False}},
        {"type": "SeqRecord", "state": {"format": f"{2**70}x", "latch": True}},
    ],
    ids=["size", "latch-size", "offset", "record", "record-overflow"],
)
def test_layouts_too_large_for_any_memory(
    isolated_env: Callable[[object], dict[str, object]], memfd: int, entry: dict[str, Any]
) -> None:
    description = doc(cfg={**entry, "fds": {"memfd": memfd}})
    refused_untouched(isolated_env, description, "'cfg': .*(too large|too long|are needed)", memfd)


@pytest.mark.parametrize("type_", [["Barrier"], {"Barrier": 1}, 7, None, True])
def test_a_type_that_is_not_a_string(
    isolated_env: Callable[[object], dict[str, object]], type_: object
) -> None:
    entry = {"type": type_, "state": {}, "fds": {}}
    with pytest.raises(SharingError, match=r"shared object 'gate': unknown type"):
        isolated_env(doc(gate=entry))


@pytest.mark.parametrize("version", [1.0, True, [1], {"1": 1}])
def test_only_the_integer_one_is_format_one(
    isolated_env: Callable[[object], dict[str, object]], version: object
) -> None:
    with pytest.raises(SharingError, match="not an aiosync description"):
        isolated_env({"aiosync": version, "objects": {}})


@pytest.fixture
def record() -> Iterator[SeqRecord]:
    with SeqRecord("qqd") as r:
        yield r


def sealed_memfd(size: int, seal: int) -> int:
    fd = os.memfd_create("sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seal)
    except OSError:  # pragma: no cover - F_SEAL_FUTURE_WRITE needs Linux 5.1
        os.close(fd)
        pytest.skip(f"this kernel does not know seal {seal:#x}")
    return fd


@pytest.mark.parametrize(
    "seal", [fcntl.F_SEAL_WRITE, F_SEAL_FUTURE_WRITE], ids=["write", "future-write"]
)
@pytest.mark.parametrize("type_", ["SeqRecord", "SeqCount"])
def test_a_memfd_sealed_against_writing_is_refused_untouched(
    isolated_env: Callable[[object], dict[str, object]], seal: int, type_: str
) -> None:
    fd = spoil(sealed_memfd(4096, seal))
    try:
        entry = record_entry(fd) if type_ == "SeqRecord" else seqcount_entry(fd, 0, 0, 0)
        refused_untouched(isolated_env, doc(cfg=entry), f"memfd {fd} is sealed against", fd)
    finally:
        os.close(fd)


def test_a_file_named_like_a_memfd_is_not_one(
    isolated_env: Callable[[object], dict[str, object]], tmp_path: Any
) -> None:
    """A regular file whose name looks like a memfd's is not one."""
    path = tmp_path / "memfd:x"
    path.write_bytes(bytes(4096))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        refused_untouched(isolated_env, doc(cfg=record_entry(fd)), f"fd {fd} should be a memfd", fd)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------
# 4. Every entry is checked before any fd is adopted
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "Barrier", "state": {"role": "CHILD"}, "fds": {"me": 987, "them": 988}},
        {"type": "Lock", "state": {}, "fds": {}},
        {"type": "Completion", "state": {}, "fds": {"count": -1, "all": 0}},
        [],
    ],
    ids=["fields", "type", "fd", "entry"],
)
def test_the_applications_fds_survive_a_bad_second_entry(
    isolated_env: Callable[[object], dict[str, object]], bad: object
) -> None:
    """The application's own eventfds, named by a valid first entry: a bad second entry
    leaves them open, with exactly their flags (they used to be adopted, then closed)."""
    count = spoil(os.eventfd(0, os.EFD_SEMAPHORE))
    all_ = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)  # flags of our own, too
    try:
        first = {"type": "Completion", "state": {}, "fds": {"count": count, "all": all_}}
        description = doc(first=first, second=bad)
        refused_untouched(isolated_env, description, r"'second'|second:", count, all_)
        assert ENV_VAR in os.environ  # nothing was taken: a second call fails the same way
        refused_untouched(lambda _: aiosync.inherited(), None, r"'second'|second:", count, all_)
    finally:
        os.close(count)
        os.close(all_)


def test_a_good_description_adopts_every_fd(
    isolated_env: Callable[[object], dict[str, object]],
) -> None:
    """The other side of the same coin: when every entry is good, each fd is made ours
    (close-on-exec, non-blocking) and the objects work."""
    count = spoil(os.eventfd(0, os.EFD_SEMAPHORE))
    all_ = spoil(os.eventfd(0))
    objects = isolated_env(
        doc(done={"type": "Completion", "state": {}, "fds": {"count": count, "all": all_}})
    )
    done = objects["done"]
    assert isinstance(done, Completion)
    try:
        for fd in (count, all_):
            assert not os.get_inheritable(fd)
            assert not os.get_blocking(fd)
        done.complete()
        assert done.try_wait()
        assert ENV_VAR not in os.environ
    finally:
        done.close()
    for fd in (count, all_):
        assert not is_open(fd)


@pytest.mark.parametrize("type_", ["SeqCount", "SeqRecord", "huge SeqRecord"])
def test_adopting_what_this_process_cannot_hold_is_a_sharing_error(
    isolated_env: Callable[[object], dict[str, object]], type_: str
) -> None:
    """Phase two can still fail: a memfd of 2**61 or 2**62 bytes passes every check, but
    no process can map that much; a record of 2**46 bytes may be mapped, but its values
    cannot be counted in memory (half the address space each). SharingError naming the
    entry; the entries adopted before it are closed (their fds were adopted), and the
    memfd is exactly as it was."""
    big = spoil(os.memfd_create("big", os.MFD_CLOEXEC))
    count = spoil(os.eventfd(0, os.EFD_SEMAPHORE))
    all_ = spoil(os.eventfd(0))
    try:
        os.ftruncate(big, 2**62)  # sparse: costs nothing
        if type_ == "SeqCount":
            entry = seqcount_entry(big, offset=2**62 - 16, size=0, copies=0)
        elif type_ == "SeqRecord":
            entry = record_entry(big, f"{2**61}x")
        else:
            entry = record_entry(big, f"{2**46}x")
        first = {"type": "Completion", "state": {}, "fds": {"count": count, "all": all_}}
        description = doc(first=first, big=entry)
        refused_untouched(isolated_env, description, "'big': cannot adopt its fds: ", big)
        assert not is_open(count)
        assert not is_open(all_)
    finally:
        for fd in (big, count, all_):
            if is_open(fd):
                os.close(fd)


# ---------------------------------------------------------------------------------------
# 5. A SeqRecord and its own seqcount, shared together
# ---------------------------------------------------------------------------------------

PAIR_CHILD = r"""
import asyncio, json, sys
import aiosync

async def main() -> None:
    shared = aiosync.inherited()
    record, seqcount = shared["rec"], shared["sc"]
    report = {
        "types": [type(record).__name__, type(seqcount).__name__],
        "same": seqcount is record.seqcount,
        "values": list(await record.read()),
        "seq": await seqcount.read(),
    }
    with seqcount.write():  # the record's own seqcount: write() only stores inside it
        record.write(report["values"][0] + 1, 0, 0.5)
        record.write(report["values"][0] + 2, 0, 0.5)
    print(json.dumps(report), flush=True)
    record.close()
    assert seqcount._closed  # it closed with its record

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


def pair(record: SeqRecord, order: str) -> dict[str, object]:
    if order == "record-first":
        return {"rec": record, "sc": record.seqcount}
    return {"sc": record.seqcount, "rec": record}


ORDERS = ["record-first", "seqcount-first"]


@pytest.mark.parametrize("latch", [False, True])
@pytest.mark.parametrize("order", ORDERS)
async def test_a_record_and_its_seqcount_go_to_an_exec_child(latch: bool, order: str) -> None:
    with SeqRecord("qqd", latch=latch) as record:
        record.write(41, 0, 0.0)
        proc = await aiosync.create_subprocess_exec(
            PYTHON,
            "-X",
            "dev",
            "-W",
            "error",
            "-c",
            PAIR_CHILD,
            loop_kind(),
            share=pair(record, order),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await soon(proc.communicate())
        assert proc.returncode == 0
        assert json.loads(out) == {
            "types": ["SeqRecord", "SeqCount"],
            "same": True,
            "values": [41, 0, 0.0],
            "seq": 2,
        }
        assert record.read_nowait() == (43, 0, 0.5)
        assert record.seqcount.read_any() == 4  # one bracketed write: two values, one seq


def mp_pair_child(first: object, second: object, kind: str) -> None:
    record, seqcount = (first, second) if isinstance(first, SeqRecord) else (second, first)
    assert isinstance(record, SeqRecord)
    assert isinstance(seqcount, SeqCount)
    assert seqcount is record.seqcount

    async def main() -> None:
        assert await record.read() == (41,)
        with seqcount.write():
            record.write(42)

    run_on(kind, main())
    record.close()


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_a_record_and_its_seqcount_go_to_a_multiprocessing_child(
    kind: str, method: str, order: str
) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with SeqRecord("q") as record:
        record.write(41)
        p = ctx.Process(target=mp_pair_child, args=(*pair(record, order).values(), kind))
        p.start()  # used to fail: "bad value(s) in fds_to_keep" (the memfd twice)
        join(p)
        assert p.exitcode == 0
        assert record.read_nowait() == (42,)
        assert record.seqcount.read_any() == 4


@pytest.fixture
def memfd(record: SeqRecord) -> Iterator[int]:
    """A duplicate of `record`'s memfd, inheritable and blocking (as a parent may leave
    it), closed afterwards unless something adopted (and closed) it."""
    fd = spoil(os.dup(record._memory.fd))
    yield fd
    if is_open(fd):
        os.close(fd)


@pytest.mark.parametrize("order", ORDERS)
def test_one_memfd_for_a_record_and_its_seqcount_is_adopted_once(
    isolated_env: Callable[[object], dict[str, object]], record: SeqRecord, memfd: int, order: str
) -> None:
    rec, sc = record_entry(memfd), seqcount_entry(memfd)
    entries = {"rec": rec, "sc": sc} if order == "record-first" else {"sc": sc, "rec": rec}
    objects = isolated_env(doc(**entries))
    twin = objects["rec"]
    assert isinstance(twin, SeqRecord)
    assert objects["sc"] is twin.seqcount
    assert not os.get_inheritable(memfd)
    record.write(1, 2, 3.0)
    assert twin.read_nowait() == (1, 2, 3.0)
    twin.seqcount.close()  # the record's counter: its memory stays the record's
    assert twin.read_nowait() == (1, 2, 3.0)
    twin.close()
    assert not is_open(memfd)


@pytest.mark.parametrize(
    "second",
    [
        {"type": "SeqRecord", "state": {"format": "qqd", "latch": False}},
        {"type": "SeqRecord", "state": {"format": "q", "latch": True}},
        {"type": "SeqCount", "state": {"offset": 0, "size": 8, "copies": 1}},
        {"type": "SeqCount", "state": {"offset": 0, "size": 0, "copies": 0}},
        {"type": "SeqCount", "state": {"offset": 24, "size": 0, "copies": 0}},
    ],
    ids=["two-records", "record-other-layout", "seqcount-other-size", "bare-seqcount", "offset"],
)
def test_only_a_record_and_its_own_seqcount_may_name_one_memfd(
    isolated_env: Callable[[object], dict[str, object]], memfd: int, second: dict[str, Any]
) -> None:
    description = doc(rec=record_entry(memfd), other={**second, "fds": {"memfd": memfd}})
    refused_untouched(isolated_env, description, f"'other': fd {memfd} is claimed twice", memfd)


def test_a_record_seqcount_and_another_seqcount_on_one_memfd(
    isolated_env: Callable[[object], dict[str, object]], memfd: int
) -> None:
    sc = seqcount_entry(memfd)
    description = doc(rec=record_entry(memfd), sc=sc, again=sc)
    refused_untouched(isolated_env, description, f"'again': fd {memfd} is claimed twice", memfd)


# ---------------------------------------------------------------------------------------
# 6. The CHILD side of a Barrier goes to one child
# ---------------------------------------------------------------------------------------


def mp_barrier_child(b: Barrier, kind: str) -> None:
    b.set_role(Role.CHILD)

    async def main() -> None:
        assert await soon(b.place_and_sync()) is True

    run_on(kind, main())
    b.close()


async def sync_once(b: Barrier) -> None:
    assert await soon(b.place_and_sync()) is True


NEVER_STARTS = "import os, sys; os.write(int(sys.argv[1]), b'started')"


async def refused_before_start(share: dict[str, object], match: str) -> None:
    """create_subprocess_exec(share=share) raises SharingError, and no child started:
    the would-be child writes to a pipe whose read end we hold."""
    r, w = os.pipe()
    try:
        with pytest.raises(SharingError, match=match):
            await aiosync.create_subprocess_exec(
                PYTHON, "-c", NEVER_STARTS, str(w), share=share, pass_fds=[w]
            )
        os.close(w)
        w = -1
        # EOF at once if no child has our write end; a child would have written first.
        assert await soon(asyncio.to_thread(os.read, r, 100)) == b""
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_barrier_goes_to_one_multiprocessing_child(kind: str, method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)
    with Barrier() as b:
        first = ctx.Process(target=mp_barrier_child, args=(b, kind))
        second = ctx.Process(target=mp_barrier_child, args=(b, kind))
        first.start()
        try:
            handed = f"already handed to the child process {first.pid}"
            with pytest.raises(SharingError, match=handed):
                second.start()
            assert second.pid is None  # it never started
            run_on(kind, refused_before_start({"gate": b}, handed))
            assert b.role is None
            b.set_role(Role.PARENT)
            run_on(kind, sync_once(b))
        finally:
            if second.pid is not None:  # pragma: no cover - only if the test failed
                second.kill()
                join(second)
            join(first)
        assert first.exitcode == 0


def test_a_start_that_failed_hands_nothing_out(kind: str) -> None:
    """Pickling failed after the Barrier (a lambda does not pickle): no child got it,
    so the next start may have it."""
    ctx: Any = multiprocessing.get_context("spawn")
    with Barrier() as b:
        bad = ctx.Process(target=mp_barrier_child, args=(b, lambda: kind))
        with pytest.raises((pickle.PicklingError, AttributeError)):
            bad.start()
        good = ctx.Process(target=mp_barrier_child, args=(b, kind))
        good.start()
        try:
            b.set_role(Role.PARENT)
            run_on(kind, sync_once(b))
        finally:
            join(good)
        assert good.exitcode == 0


SYNC_CHILD = """
import aiosync
b = aiosync.inherited()["gate"]
assert b.place_and_sync_blocking(timeout=10) is True
"""


async def test_a_barrier_goes_to_one_exec_child() -> None:
    with Barrier() as b:
        proc = await aiosync.create_subprocess_exec(PYTHON, "-c", SYNC_CHILD, share={"gate": b})
        try:
            handed = f"already handed to the child process {proc.pid}"
            await refused_before_start({"gate": b}, handed)
            ctx: Any = multiprocessing.get_context("spawn")
            p = ctx.Process(target=mp_barrier_child, args=(b, loop_kind()))
            with pytest.raises(SharingError, match=handed):
                p.start()
            await sync_once(b)
            assert await soon(proc.wait()) == 0
        finally:
            if proc.returncode is None:  # pragma: no cover - only if the test failed
                proc.kill()
                await proc.wait()


# ---------------------------------------------------------------------------------------
# 7. "Cannot share this": TypeError or SharingError, before anything starts
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "share", [[1], "gate", [("gate", 1)], 17], ids=["list", "str", "pairs", "int"]
)
async def test_share_must_be_a_mapping(share: object) -> None:
    with Barrier() as b:
        if isinstance(share, list):
            share = [b] if share == [1] else [("gate", b)]
        with pytest.raises(TypeError, match="share must be a mapping of names to aiosync objects"):
            await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share=share)  # type: ignore[arg-type]
        assert b.role is None


async def test_something_else_is_a_type_error_saying_what_is_expected() -> None:
    with pytest.raises(TypeError, match=r"share\['x'\]: .* a Barrier, Completion, SeqCount or"):
        await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share={"x": object()})


async def test_a_group_is_shared_member_by_member() -> None:
    with BarrierGroup(2) as group:
        await refused_before_start({"group": group}, r"share\['group'\]: .*group\[i\]")
        ctx: Any = multiprocessing.get_context("spawn")
        p = ctx.Process(target=mp_barrier_child, args=(group, loop_kind()))
        with pytest.raises(SharingError, match=r"share each member \(group\[i\]\)"):
            p.start()
        assert group.pids == (None, None)


@pytest.mark.parametrize("make", [Barrier, Completion, lambda: SeqRecord("q")])
async def test_a_closed_object_is_refused(make: Callable[[], Any]) -> None:
    obj = make()
    obj.close()
    name = type(obj).__name__
    with Completion() as fine:
        await refused_before_start(
            {"fine": fine, "obj": obj}, rf"share\['obj'\]: this {name} was closed"
        )
        ctx: Any = multiprocessing.get_context("spawn")
        p = ctx.Process(target=print, args=(obj,))
        with pytest.raises(SharingError, match=f"this {name} was closed"):
            p.start()


async def test_a_record_seqcount_after_its_record_closed() -> None:
    record = SeqRecord("q")
    seqcount = record.seqcount
    record.close()
    await refused_before_start({"sc": seqcount}, r"share\['sc'\]: this SeqCount was closed")


async def test_a_barrier_with_its_role_set_is_a_sharing_error() -> None:
    with Barrier() as b:
        b.set_role(Role.CHILD)
        await refused_before_start({"gate": b}, "only before its role is set")
        ctx: Any = multiprocessing.get_context("spawn")
        p = ctx.Process(target=mp_barrier_child, args=(b, loop_kind()))
        with pytest.raises(SharingError, match="only before its role is set"):
            p.start()


def test_pickling_anywhere_else_stays_a_type_error() -> None:
    with Barrier() as b, BarrierGroup(1) as group:
        with pytest.raises(TypeError, match="create_subprocess_exec"):
            pickle.dumps(b)
        with pytest.raises(TypeError, match="share each member"):
            pickle.dumps(group)


# ---------------------------------------------------------------------------------------
# Any description at all (Hypothesis)
# ---------------------------------------------------------------------------------------


class Pool:
    """Real fds of every kind a description may name, some with flags we would not set."""

    # Indexes in `fds` of each kind.
    KINDS: ClassVar[dict[str, list[int]]] = {
        "eventfd": [0, 1],
        "semaphore": [2, 3],
        "pipe_r": [4, 6],
        "pipe_w": [5, 7],
        "memfd": [8],
        "sealed": [9],
        "read-only memfd": [10],
        "/dev/null": [11],
    }

    def __init__(self) -> None:
        self.memfd = os.memfd_create("pool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.memfd, 4096)
        pipe_r, pipe_w = os.pipe()
        pipe_r2, pipe_w2 = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        fds = [
            os.eventfd(0),
            os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK),
            os.eventfd(0, os.EFD_SEMAPHORE),
            os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC | os.EFD_NONBLOCK),
            pipe_r,
            pipe_w,
            pipe_r2,
            pipe_w2,
            self.memfd,
            sealed_memfd(4096, fcntl.F_SEAL_WRITE),
            os.open(f"/proc/self/fd/{self.memfd}", os.O_RDONLY | os.O_CLOEXEC),
            os.open("/dev/null", os.O_RDWR),
        ]
        for fd in fds[::2]:
            spoil(fd)
        self.fds = fds
        assert len(fds) == sum(map(len, self.KINDS.values()))
        self.before = {fd: fd_state(fd) for fd in fds}

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass  # adopted by an object that was closed


def json_values() -> st.SearchStrategy[Any]:
    leaves = (
        st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8)
    )
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
        ),
        max_leaves=12,
    )


def mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` nine times in ten, `odd` otherwise (``|`` would pick each half the time,
    and so a well-formed description, several levels down, almost never)."""
    return st.integers(0, 9).flatmap(lambda i: odd if i == 5 else usual)


def descriptions(pool_size: int) -> st.SearchStrategy[Any]:
    """Descriptions near the real ones (so that checks deep inside are reached), with
    anything JSON here and there. Fds are indexes into the pool (``("pool", i)``),
    numbers that are surely not open, or junk."""
    anything = json_values()
    fd = mostly(
        st.tuples(st.just("pool"), st.integers(0, pool_size - 1)),
        st.integers(100_000, 2**40) | st.integers(-(2**40), -1) | anything,
    )

    def right_kind(key: str) -> st.SearchStrategy[Any]:
        """An fd of the kind `key` wants (mostly; the pool's kinds are in `Pool.KINDS`)."""
        kinds = {"me": "eventfd", "them": "eventfd", "all": "eventfd", "count": "semaphore"}
        wanted = kinds.get(key, key)
        return mostly(st.sampled_from([("pool", i) for i in Pool.KINDS[wanted]]), fd)

    size = mostly(st.sampled_from([0, 8, 16, 24, 40, 4096, 2**62]), anything)

    def entry(type_: str, state: dict[str, Any], fds: list[str]) -> st.SearchStrategy[Any]:
        return st.fixed_dictionaries(
            {
                "type": mostly(st.just(type_), anything),
                "state": mostly(
                    st.fixed_dictionaries(state),
                    st.dictionaries(st.text(max_size=6), anything, max_size=3) | anything,
                ),
                "fds": mostly(
                    st.fixed_dictionaries(
                        {key: right_kind(key) for key in fds},
                        optional={"pipe_r": right_kind("pipe_r")} if type_ == "Barrier" else {},
                    ),
                    st.dictionaries(st.text(max_size=5), fd, max_size=4) | anything,
                ),
            }
        )

    entries = mostly(
        entry(
            "Barrier",
            {"role": mostly(st.just("CHILD"), st.none() | anything)},
            ["me", "them", "pipe_w"],
        )
        | entry("Completion", {}, ["count", "all"])
        | entry("SeqCount", {"offset": size, "size": size, "copies": size}, ["memfd"])
        | entry(
            "SeqRecord",
            {
                "format": mostly(st.sampled_from(["q", "qqd", "7q", "500q", "z", ""]), anything),
                "latch": mostly(st.booleans(), anything),
            },
            ["memfd"],
        ),
        anything,
    )
    envelope = st.fixed_dictionaries(
        {
            "aiosync": mostly(st.just(1), anything),
            "objects": mostly(
                st.dictionaries(st.text(max_size=6), entries, min_size=1, max_size=3), anything
            ),
        }
    )
    return mostly(envelope, anything)


def resolve(value: Any, fds: list[int]) -> Any:
    """Replace the pool references in a drawn description by the pool's fd numbers."""
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "pool":
        return fds[value[1]]
    if isinstance(value, dict):
        return {k: resolve(v, fds) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve(v, fds) for v in value]
    return value


def named_fds(description: Any) -> set[int]:
    """Every int in the objects' fds mappings (what a success adopted)."""
    named: set[int] = set()
    objects = description.get("objects") if isinstance(description, dict) else None
    for entry in objects.values() if isinstance(objects, dict) else ():
        fds = entry.get("fds") if isinstance(entry, dict) else None
        if isinstance(fds, dict):
            named.update(v for v in fds.values() if type(v) is int)
    return named


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_description_gives_objects_or_a_sharing_error(
    isolated_env: Callable[[object], dict[str, object]], data: st.DataObject
) -> None:
    pool = Pool()
    try:
        description = resolve(data.draw(descriptions(len(pool.fds)), label="description"), pool.fds)
        try:
            objects = isolated_env(description)
        except SharingError as exc:
            event("refused: " + str(exc).split(": ")[-1][:20])
            adopted: set[int] = set()  # all or nothing: nothing
        else:
            event(f"built {len(objects)}")
            adopted = named_fds(description)
            assert adopted <= set(pool.fds)  # the other numbers are not open
            close_all(objects)
        for fd in pool.fds:
            if fd not in adopted:
                assert fd_state(fd) == pool.before[fd], f"fd {fd} was changed"
    finally:
        pool.close()


def test_a_probing_child_gets_a_sharing_error_for_a_deep_description() -> None:
    """The same in a real child, as a user's program would see it: one line of error."""
    env = {**os.environ, ENV_VAR: '{"aiosync": 1, "objects": ' + "[" * 50_000 + "]" * 50_000 + "}"}
    code = (
        "import aiosync\n"
        "try:\n"
        "    aiosync.inherited()\n"
        "except aiosync.SharingError as e:\n"
        "    print(type(e).__name__)\n"
    )
    out = subprocess.run(
        [PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=SOON, check=True
    )
    assert out.stdout == "SharingError\n"
