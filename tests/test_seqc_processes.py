"""SeqCount and SeqRecord across real processes.

Torn snapshots under a writer going flat out, writer death (killed, exited, zombie),
latch mode, one writer at a time across processes, and sharing: fork,
aiosync.create_subprocess_exec, multiprocessing spawn / forkserver / fork.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import PYTHON, Forked, assert_blocks, loop_kind, run_on, soon

import aiosync
from aiosync import (
    BrokenResourceError,
    BusyResourceError,
    SeqCount,
    SeqRecord,
    SharingError,
    WouldBlock,
)

FAST = SeqCount.Backoff(yields=1, first=0.001, cap=0.002, check_writer_after=0.01)

# ---------------------------------------------------------------------------------------
# Forked children without a loop of ours (the fork happens before any loop runs here)
# ---------------------------------------------------------------------------------------


class Pipe:
    """One-way messages (JSON lines) from a child to the parent."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    def send(self, message: object) -> None:
        os.write(self.w, json.dumps(message).encode() + b"\n")

    def recv(self, seconds: float = 10.0) -> Any:
        import select

        data = b""
        deadline = time.monotonic() + seconds
        while not data.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.r], [], [], max(0.0, left))
            assert ready, "the child did not report in time"
            chunk = os.read(self.r, 1)
            assert chunk, "the child closed the pipe without reporting"
            data += chunk
        return json.loads(data)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    p = Pipe()
    yield p
    p.close()


@pytest.fixture
def shm() -> Iterator[mmap.mmap]:
    m = mmap.mmap(-1, mmap.PAGESIZE)  # anonymous and MAP_SHARED: a fork shares it
    yield m
    m.close()


# ---------------------------------------------------------------------------------------
# A writer going flat out, readers in other processes: never a torn snapshot
# ---------------------------------------------------------------------------------------

FMT = "qqqd"
MIN_SECONDS = 0.25  # each reader reads for at least this long...
MIN_DISTINCT = 20  # ...and until it has seen this many different values


def payload(n: int) -> tuple[int, int, int, float]:
    """A self-checking record: every field is derived from the first."""
    return (n, (n * 0x9E37_79B9_7F4A_7C15) & (2**62 - 1), ~n, n / 7)


FIELDS = [(16 + 8 * i, code) for i, code in enumerate("qqqd")]  # bare mode layout


def bare_write(buf: mmap.mmap, n: int) -> None:
    for (offset, code), value in zip(FIELDS, payload(n), strict=True):
        struct.pack_into(code, buf, offset, value)  # field by field: tearable


def bare_read(buf: mmap.mmap) -> tuple[Any, ...]:
    return tuple(struct.unpack_from(code, buf, offset)[0] for offset, code in FIELDS)


def writer_flat_out(mode: str, record: SeqRecord | None, seqc: SeqCount | None,
                    buf: mmap.mmap, stop: mmap.mmap, pipe: Pipe) -> None:  # fmt: skip
    n = 1
    if record is not None:
        record.write(*payload(n))
    else:
        assert seqc is not None
        with seqc.write():
            bare_write(buf, n)
    pipe.send("started")
    while not stop[0]:
        n += 1
        if record is not None:
            record.write(*payload(n))
        else:
            assert seqc is not None
            with seqc.write():
                bare_write(buf, n)
            # Stored field by field from Python, a bare write keeps the counter odd for
            # a microsecond or so; back to back, that would starve every reader (the man
            # page's first caveat, tested on its own). Like a real writer, do something
            # else between updates.
            until = time.perf_counter() + 20e-6
            while time.perf_counter() < until:
                pass
    pipe.send({"writes": n})


async def reader_flat_out(
    record: SeqRecord | None, seqc: SeqCount | None, buf: mmap.mmap
) -> dict[str, int]:
    stats = {"reads": 0, "torn": 0, "backwards": 0, "retries": 0, "wouldblock": 0}
    seen: set[int] = set()
    last = 0
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < MIN_SECONDS or len(seen) < MIN_DISTINCT:
        assert time.monotonic() - start < 20, f"saw only {len(seen)} values"
        i += 1
        if record is not None:
            if i & 1:
                values = await record.read()
            else:
                try:
                    values = record.read_nowait()
                except WouldBlock:
                    stats["wouldblock"] += 1
                    await asyncio.sleep(0)
                    continue
        else:
            assert seqc is not None
            while True:
                seq = await seqc.read()
                values = bare_read(buf)
                if seqc.consistent(seq):
                    break
                stats["retries"] += 1
        stats["reads"] += 1
        n = values[0]
        if values != payload(n):
            stats["torn"] += 1
        if n < last:
            stats["backwards"] += 1
        last = n
        seen.add(n)
    stats["distinct"] = len(seen)
    return stats


@pytest.mark.parametrize("mode", ["record", "latch", "bare"])
def test_no_torn_snapshots(kind: str, mode: str, shm: mmap.mmap) -> None:
    stop = mmap.mmap(-1, mmap.PAGESIZE)
    record = SeqRecord(FMT, latch=mode == "latch") if mode != "bare" else None
    seqc = SeqCount(shm) if mode == "bare" else None
    writer_pipe, reader_pipe = Pipe(), Pipe()
    children: list[Forked] = []
    try:
        writer = Forked(lambda: writer_flat_out(mode, record, seqc, shm, stop, writer_pipe))
        children.append(writer)
        assert writer_pipe.recv() == "started"

        def reader() -> None:
            reader_pipe.send(run_on(kind, reader_flat_out(record, seqc, shm)))

        children += [Forked(reader), Forked(reader)]
        results = [reader_pipe.recv(seconds=30), reader_pipe.recv(seconds=30)]
        stop[0] = 1
        writes = writer_pipe.recv()["writes"]
        for child in children:
            child.join()
    finally:
        stop[0] = 1
        for child in children:
            child.reap()  # (those not joined above)
        writer_pipe.close()
        reader_pipe.close()
        stop.close()
        if record is not None:
            record.close()
        if seqc is not None:
            seqc.close()
    for stats in results:
        assert stats["torn"] == 0, stats
        assert stats["backwards"] == 0, stats
        assert stats["distinct"] >= MIN_DISTINCT, stats
    assert writes >= max(stats["distinct"] for stats in results)


# ---------------------------------------------------------------------------------------
# Writer death
# ---------------------------------------------------------------------------------------


def hold_write_then(seqc: SeqCount, pipe: Pipe, then: str) -> None:
    seqc.write_begin()
    pipe.send("begun")
    if then == "exit":
        os._exit(0)  # inside the write, without write_end
    time.sleep(60)  # until killed


@pytest.mark.parametrize("how", ["killed-zombie", "exited-zombie", "killed-reaped"])
async def test_writer_death_is_reported(how: str, pipe: Pipe, shm: mmap.mmap) -> None:
    with SeqCount(shm) as seqc:
        seqc.backoff = FAST
        child = Forked(lambda: hold_write_then(seqc, pipe, "exit" if "exited" in how else "hang"))
        assert pipe.recv() == "begun"
        assert seqc.read_any() == 1
        if "killed" in how:
            child.kill()
        if "reaped" in how:
            child.join(killed=True)
        # Otherwise the child stays a zombie (nobody reaps it) while we read.
        with pytest.raises(BrokenResourceError, match=f"pid {child.pid}") as broken:
            await soon(seqc.read())
        assert "died in the middle of a write" in str(broken.value)
        child.join(killed="killed" in how)
        # A new writer takes over; readers see its value.
        with seqc.write():
            assert seqc.read_any() == 1
        assert await seqc.read() == 2


async def test_record_writer_death(pipe: Pipe) -> None:
    with SeqRecord("qqd") as record:
        record.backoff = FAST
        record.write(1, 2, 3.0)
        child = Forked(lambda: hold_write_then(record.seqcount, pipe, "hang"))
        assert pipe.recv() == "begun"
        with pytest.raises(WouldBlock):
            record.read_nowait()
        reader = asyncio.ensure_future(record.read())
        child.kill()
        with pytest.raises(BrokenResourceError, match=f"pid {child.pid}"):
            await soon(reader)
        child.join(killed=True)
        record.write(4, 5, 6.0)  # takes over
        assert await record.read() == (4, 5, 6.0)


def write_then(record: SeqRecord, pipe: Pipe, go: int, then: str) -> None:
    record.write(7, 8, 9.0)
    pipe.send("written")
    if then == "exit":
        os.read(go, 1)  # until the parent has seen us alive
        os._exit(0)  # between writes: the record is complete, nothing is held
    time.sleep(60)  # until killed


def wait_dead(child: Forked) -> None:
    """Return once the child has exited, leaving it a zombie (not reaped)."""
    info = os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert info is not None


@pytest.mark.parametrize("how", ["exited-zombie", "killed-zombie", "killed-reaped"])
def test_reader_learns_the_writer_died_between_writes(how: str, pipe: Pipe) -> None:
    # read() cannot notice this death (the counter is even, the record reads fine);
    # last_writer and writer_alive() can.
    go_r, go_w = os.pipe()
    with SeqRecord("qqd") as record:
        record.write(1, 2, 3.0)
        assert record.last_writer == os.getpid()
        child = Forked(lambda: write_then(record, pipe, go_r, "exit" if "exit" in how else "hang"))
        try:
            assert pipe.recv() == "written"
            assert record.last_writer == child.pid
            assert record.writer_alive() is True
            if "killed" in how:
                child.kill()
            else:
                os.write(go_w, b"x")
            wait_dead(child)  # a zombie now: dead, not yet reaped
            assert record.writer_alive() is False
            if "reaped" in how:
                child.join(killed=True)
                assert record.writer_alive() is False
            assert record.last_writer == child.pid  # who it was stays known
            assert record.read_nowait() == (7, 8, 9.0)  # the last values stay readable
            record.write(4, 5, 6.0)  # a new writer replaces it
            assert record.last_writer == os.getpid()
            assert record.writer_alive() is True
        finally:
            child.reap()
            os.close(go_r)
            os.close(go_w)


async def test_last_writer_of_a_record_shared_with_an_exec_child() -> None:
    # The child learns who wrote last in its parent, and the parent who wrote in it.
    with SeqRecord("qqd") as record:
        record.write(1, 2, 3.0)
        proc = await exec_child(loop_kind(), {"last": record})
        try:
            line = await soon(readline(proc))
            assert line == f"{os.getpid()} True"
            assert await soon(proc.wait()) == 0
        finally:
            if proc.returncode is None:  # pragma: no cover - after a failure above
                proc.kill()
                await proc.wait()
        assert record.last_writer == proc.pid
        assert record.writer_alive() is False  # exited (and reaped by asyncio)
        assert record.read_nowait() == (4, 5, 6.0)


async def test_latch_readers_never_wait_for_another_process(pipe: Pipe) -> None:
    with SeqRecord("qqd", latch=True) as record:
        record.write(1, 2, 3.0)

        def child() -> None:
            with record.seqcount.write():
                record.write(4, 5, 6.0)
                pipe.send("begun")
                time.sleep(60)  # until killed

        writer = Forked(child)
        try:
            assert pipe.recv() == "begun"
            assert record.seqcount.read_any() == 3  # a write is open
            assert record.read_nowait() == (1, 2, 3.0)
            assert await record.read() == (1, 2, 3.0)
            with pytest.raises(BusyResourceError, match=f"process {writer.pid}"):
                record.write(7, 8, 9.0)
        finally:
            writer.kill()
            writer.join(killed=True)
        assert await record.read() == (1, 2, 3.0)  # the dead write never shows
        record.write(7, 8, 9.0)
        assert record.read_nowait() == (7, 8, 9.0)


async def test_second_writer_in_another_process_is_busy(pipe: Pipe, shm: mmap.mmap) -> None:
    with SeqCount(shm) as seqc:
        child = Forked(lambda: hold_write_then(seqc, pipe, "hang"))
        try:
            assert pipe.recv() == "begun"
            with pytest.raises(BusyResourceError, match=f"process {child.pid} is inside"):
                seqc.write_begin()
            seqc.backoff = FAST
            reader = await assert_blocks(seqc.read(max_attempts=1_000_000))
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
        finally:
            child.kill()
            child.join(killed=True)


# ---------------------------------------------------------------------------------------
# Sharing: create_subprocess_exec
# ---------------------------------------------------------------------------------------

EXEC_CHILD = r"""
import asyncio, sys
import aiosync

async def main() -> None:
    shared = aiosync.inherited()
    if "last" in shared:
        record = shared["last"]
        print(record.last_writer, record.writer_alive(), flush=True)
        record.write(4, 5, 6.0)
        record.close()
    elif "cfg" in shared:
        record = shared["cfg"]
        assert isinstance(record, aiosync.SeqRecord), record
        print("got", *(await record.read()), flush=True)
        record.write(4, 5, 6.0)
        with record.seqcount.write():
            record.write(7, 8, 9.0)
            print("holding", record.seqcount.read_any(), flush=True)
            sys.stdin.readline()
        record.close()
    else:
        seqc = shared["seqc"]
        assert isinstance(seqc, aiosync.SeqCount), seqc
        print("got", await seqc.read(), flush=True)
        with seqc.write():
            print("holding", seqc.read_any(), flush=True)
            sys.stdin.readline()
        seqc.close()

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


async def exec_child(kind: str, share: dict[str, object]) -> asyncio.subprocess.Process:
    return await aiosync.create_subprocess_exec(
        PYTHON,
        "-X",
        "dev",
        "-W",
        "error",
        "-c",
        EXEC_CHILD,
        kind,
        share=share,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def readline(proc: asyncio.subprocess.Process) -> str:
    assert proc.stdout is not None
    return (await soon(proc.stdout.readline())).decode().strip()


@pytest.mark.parametrize("latch", [False, True])
async def test_record_shared_with_exec_child(latch: bool) -> None:
    kind = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    with SeqRecord("qqd", latch=latch) as record:
        record.backoff = FAST
        record.write(1, 2, 3.0)
        proc = await exec_child(kind, {"cfg": record})
        assert proc.stdin is not None
        assert await readline(proc) == "got 1 2 3.0"
        assert await readline(proc) == "holding 5"
        # The child holds a write open.
        with pytest.raises(BusyResourceError, match=f"process {proc.pid}"):
            record.write(0, 0, 0.0)
        if latch:
            assert await record.read() == (4, 5, 6.0)
        else:
            with pytest.raises(WouldBlock):
                record.read_nowait()
            reader = await assert_blocks(record.read())
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        assert await soon(proc.wait()) == 0
        if not latch:
            assert await soon(reader) == (7, 8, 9.0)
        assert record.read_nowait() == (7, 8, 9.0)
        assert record.seqcount.read_any() == 6


async def test_seqcount_shared_with_exec_child() -> None:
    kind = "uvloop" if "uvloop" in type(asyncio.get_running_loop()).__module__ else "asyncio"
    with SeqRecord("q", latch=True) as record:
        record.write(1)
        proc = await exec_child(kind, {"seqc": record.seqcount})
        assert proc.stdin is not None
        assert await readline(proc) == "got 2"
        assert await readline(proc) == "holding 3"
        assert record.read_nowait() == (1,)
        with pytest.raises(BusyResourceError):
            record.write(2)
        proc.stdin.write(b"\n")
        await proc.stdin.drain()
        assert await soon(proc.wait()) == 0
        assert record.seqcount.read_any() == 4
        record.write(2)
        assert record.read_nowait() == (2,)


async def test_a_seqcount_over_your_own_buffer_cannot_be_shared(shm: mmap.mmap) -> None:
    with SeqCount(shm) as seqc, pytest.raises(SharingError, match="buffer of your own"):
        await aiosync.create_subprocess_exec(PYTHON, "-c", "pass", share={"s": seqc})


# ---------------------------------------------------------------------------------------
# Sharing: multiprocessing (every start method) and plain fork
# ---------------------------------------------------------------------------------------


def mp_record_child(record: SeqRecord) -> None:
    assert isinstance(record, SeqRecord)
    assert record.read_nowait() == (1, 2, 3.0)
    record.write(4, 5, 6.0)
    with record.seqcount.write():
        record.write(7, 8, 9.0)
    assert asyncio.run(record.read()) == (7, 8, 9.0)
    record.close()


def mp_seqcount_child(seqc: SeqCount) -> None:
    assert isinstance(seqc, SeqCount)
    assert seqc.read_any() == 2
    with seqc.write():
        pass
    seqc.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_children(method: str) -> None:
    ctx: Any = multiprocessing.get_context(method)  # BaseContext's stub has no Process
    for latch in (False, True):
        with SeqRecord("qqd", latch=latch) as record:
            record.write(1, 2, 3.0)
            p = ctx.Process(target=mp_record_child, args=(record,))
            p.start()
            p.join(30)
            assert p.exitcode == 0
            assert record.read_nowait() == (7, 8, 9.0)
            assert record.seqcount.read_any() == 6
    with SeqRecord("q") as record:
        record.write(1)
        p = ctx.Process(target=mp_seqcount_child, args=(record.seqcount,))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        assert record.seqcount.read_any() == 4


def test_fork_shares_a_seqcount_over_an_inherited_mapping(shm: mmap.mmap) -> None:
    with SeqCount(shm, 64) as seqc:

        def child() -> None:
            with seqc.write():
                struct.pack_into("q", shm, 80, 42)
            seqc.close()

        Forked(child).join()
        assert seqc.read_any() == 2
        assert struct.unpack_from("q", shm, 80) == (42,)


# ---------------------------------------------------------------------------------------
# Forged or corrupted descriptions
# ---------------------------------------------------------------------------------------


def rebuild(entries: dict[str, dict[str, Any]]) -> dict[str, object]:
    from aiosync import _share

    return _share._rebuild_all(json.dumps({"aiosync": 1, "objects": entries}))


def test_forged_descriptions_are_refused() -> None:
    from aiosync import _fd

    with SeqRecord("qqd") as record:
        memfd = _fd.dup(record._memory.fd)
        small = _fd.memfd("small", 8)
        efd = _fd.eventfd()
        try:
            good = {"format": "qqd", "latch": False}
            cases: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
                ("SeqRecord", {"format": "qqz", "latch": False}, {"memfd": memfd}, "format"),
                ("SeqRecord", {"format": 7, "latch": False}, {"memfd": memfd}, "format"),
                ("SeqRecord", {"format": "qqd", "latch": 1}, {"memfd": memfd}, "latch"),
                ("SeqRecord", {"format": "qqd"}, {"memfd": memfd}, "missing"),
                ("SeqRecord", {**good, "x": 1}, {"memfd": memfd}, "unexpected"),
                ("SeqRecord", good, {"fd": memfd}, "fields"),
                ("SeqRecord", good, {"memfd": efd}, "should be a memfd"),
                ("SeqRecord", good, {"memfd": 999}, "not open"),
                ("SeqRecord", good, {"memfd": small}, "bytes, 48 are needed"),
                ("SeqRecord", {"format": "1000q", "latch": True}, {"memfd": memfd}, "needed"),
                ("SeqCount", {"offset": 4, "size": 0, "copies": 0}, {"memfd": memfd}, "layout"),
                ("SeqCount", {"offset": -8, "size": 0, "copies": 0}, {"memfd": memfd}, "offset"),
                ("SeqCount", {"offset": 0, "size": 8, "copies": 3}, {"memfd": memfd}, "layout"),
                ("SeqCount", {"offset": 0, "size": 0, "copies": 1}, {"memfd": memfd}, "layout"),
                ("SeqCount", {"offset": 0, "size": True, "copies": 0}, {"memfd": memfd}, "size"),
                ("SeqCount", {"offset": 4096, "size": 0, "copies": 0}, {"memfd": memfd}, "needed"),
                ("SeqCount", {"offset": 0, "size": 0, "copies": 0}, {"memfd": efd}, "memfd"),
            ]
            for type_name, state, fds, why in cases:
                with pytest.raises(SharingError, match=why):
                    rebuild({"x": {"type": type_name, "state": state, "fds": fds}})
            # The genuine article works, over the same memory.
            record.write(1, 2, 3.0)
            built = rebuild({"x": {"type": "SeqRecord", "state": good, "fds": {"memfd": memfd}}})
            memfd = -1  # adopted
            twin = built["x"]
            assert isinstance(twin, SeqRecord)
            assert twin.read_nowait() == (1, 2, 3.0)
            twin.write(4, 5, 6.0)
            assert record.read_nowait() == (4, 5, 6.0)
            twin.close()
        finally:
            for fd in (memfd, small, efd):
                _fd.close(fd)
