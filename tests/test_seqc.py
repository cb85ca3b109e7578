"""SeqCount and SeqRecord within one process: API, waiting, writers, bad input, life cycle.

Cross-process behaviour (torn snapshots, writer death, sharing) is in
test_seqc_processes.py.
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import mmap
import os
import struct
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from support import Forked, assert_blocks, soon

import aiosync
from aiosync import (
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SeqCount,
    SeqRecord,
    WouldBlock,
)

ROOT = Path(__file__).parent.parent
FAST = SeqCount.Backoff(yields=1, first=0.001, cap=0.002, check_writer_after=0.01)


@pytest.fixture
def shm() -> Iterator[mmap.mmap]:
    """A page of anonymous shared memory (MAP_SHARED: a fork shares it)."""
    m = mmap.mmap(-1, mmap.PAGESIZE)
    yield m
    m.close()


@pytest.fixture
def record() -> Iterator[SeqRecord]:
    with SeqRecord("qqd") as r:
        yield r


def set_word(buf: mmap.mmap, offset: int, value: int) -> None:
    struct.pack_into("Q", buf, offset, value)


# ---------------------------------------------------------------------------------------
# The C extension
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_seqc", "_waitc"])
def test_extension_compiles_without_warnings(tmp_path: Path, name: str) -> None:
    include = sysconfig.get_paths()["include"]
    flags = ["-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-O2", "-fPIC"]
    source = ROOT / "aiosync" / f"{name}.c"
    result = subprocess.run(
        ["gcc", *flags, f"-I{include}", "-c", str(source), "-o", str(tmp_path / f"{name}.o")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_extension_is_built() -> None:
    from aiosync import _seqc

    assert _seqc.HEADER == SeqCount.size == 16
    assert Path(_seqc.__file__).suffix == ".so"


def test_each_module_object_has_its_own_types() -> None:
    # Multi-phase initialisation, heap types, module state: loading the extension again
    # makes a second, independent module (as each subinterpreter gets), not a copy of
    # the first one's statics.
    from aiosync import _seqc

    spec = importlib.util.spec_from_file_location("aiosync._seqc", _seqc.__file__)
    assert spec is not None
    assert spec.loader is not None
    other: Any = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(other)
    assert other is not _seqc
    assert other.Counter is not _seqc.Counter
    assert other.Record is not _seqc.Record
    memory = mmap.mmap(-1, mmap.PAGESIZE)
    layout = struct.Struct("qqd")
    record = other.Record(memory, 0, layout.size, 1, layout.unpack)
    assert record._write(layout.pack(1, 2, 3.0), 1 << 32) is None
    assert record.read_nowait() == (1, 2, 3.0)
    with pytest.raises(StopIteration) as done:
        record.read().send(None)  # the Ready type of the other module's state
    assert done.value.value == (1, 2, 3.0)
    record._release()
    memory.close()


@pytest.mark.skipif(
    not sysconfig.get_config_var("Py_GIL_DISABLED"), reason="not a free-threaded build"
)
def test_importing_aiosync_keeps_the_gil_disabled() -> None:
    # The extension declares Py_mod_gil = Py_MOD_GIL_NOT_USED: importing it must not
    # turn the GIL back on (which CPython would announce with a RuntimeWarning).
    env = {k: v for k, v in os.environ.items() if k != "PYTHON_GIL"}
    code = "import sys, aiosync; assert not sys._is_gil_enabled(), 'the GIL is enabled'"
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr


# ---------------------------------------------------------------------------------------
# SeqCount: the bare counter
# ---------------------------------------------------------------------------------------


async def test_seqcount_counts_writes(shm: mmap.mmap) -> None:
    with SeqCount(shm, 8) as s:
        assert s.read_any() == 0
        assert await s.read() == 0
        s.write_begin()
        assert s.read_any() == 1
        s.write_end()
        assert s.read_any() == 2
        with s.write():
            assert s.read_any() == 3
        assert await s.read() == 4
        # The counter is where it says it is, 64 bits, native order.
        assert struct.unpack_from("Q", shm, 8)[0] == 4


async def test_consistent(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        seq = await s.read()
        assert s.consistent(seq)
        with s.write():
            assert not s.consistent(seq)
        assert not s.consistent(seq)
        assert s.consistent(await s.read())


async def test_read_loop_from_the_man_page(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        with s.write():
            struct.pack_into("qq", shm, 16, 1, 2)
        while True:
            seq = await s.read()
            pair = struct.unpack_from("qq", shm, 16)
            if s.consistent(seq):
                break
        assert pair == (1, 2)


async def test_read_returns_without_a_loop_round_trip(shm: mmap.mmap) -> None:
    # docs/design.md §5.5: when no wait is needed, read() finishes on its first step.
    with SeqCount(shm) as s:
        coro = s.read()
        with pytest.raises(StopIteration) as stop:
            coro.send(None)
        assert stop.value.value == 0
    with SeqRecord("q") as r:
        r.write(7)
        ready = r.read()
        with pytest.raises(StopIteration) as stop:
            ready.send(None)
        assert stop.value.value == (7,)


async def test_read_waits_out_a_write_and_keeps_the_loop_responsive(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        s.backoff = FAST
        s.write_begin()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        reader = await assert_blocks(s.read())
        assert ticks > 10  # other tasks ran while the reader waited
        s.write_end()
        assert await soon(reader) == 2
        tick_task.cancel()


async def test_record_read_waits_out_a_bracketed_write(record: SeqRecord) -> None:
    record.backoff = FAST
    record.write(1, 2, 3.0)
    with record.seqcount.write():
        record.write(4, 5, 6.0)
        with pytest.raises(WouldBlock):
            record.read_nowait()
        reader = await assert_blocks(record.read())
        record.write(7, 8, 9.0)  # several writes, one publication
    assert await soon(reader) == (7, 8, 9.0)
    assert record.read_nowait() == (7, 8, 9.0)


async def test_read_honours_timeout(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        s.backoff = FAST
        with s.write():
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await s.read()
            assert s.read_any() == 1  # the cancelled reader held nothing


async def test_read_can_be_cancelled(record: SeqRecord, monkeypatch: pytest.MonkeyPatch) -> None:
    # The reader says when it is backing off on the clock (past its loop round trips):
    # it tried, found the write open, and waits; that is where it is cancelled.
    backing_off = asyncio.Event()
    real_sleep = asyncio.sleep

    async def reader_sleep(delay: float) -> None:
        if delay > 0:
            backing_off.set()
        await real_sleep(delay)

    monkeypatch.setattr(asyncio, "sleep", reader_sleep)
    with record.seqcount.write():
        reader = asyncio.create_task(record.read())
        await soon(backing_off.wait())
        assert not reader.done()
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
    assert await record.read() == (0, 0, 0.0)


async def test_bounded_attempts(shm: mmap.mmap, record: SeqRecord) -> None:
    with SeqCount(shm) as s:
        s.backoff = FAST
        with s.write():
            with pytest.raises(BusyResourceError, match="gave up after 5 attempts"):
                await soon(s.read(max_attempts=5))
            with pytest.raises(BusyResourceError, match="gave up after 1 attempts"):
                await s.read(max_attempts=1)
        assert await s.read(max_attempts=1) == 2
    record.backoff = FAST
    with (
        record.seqcount.write(),
        pytest.raises(BusyResourceError, match="gave up after 3 attempts"),
    ):
        await soon(record.read(max_attempts=3))
    assert await record.read(max_attempts=1) == (0, 0, 0.0)


def test_backoff_policy_is_validated() -> None:
    b = SeqCount.Backoff()
    assert b.yields >= 1
    assert 0 < b.first <= b.cap
    assert SeqCount.Backoff(yields=0, first=0.0, cap=0.0).cap == 0.0
    for bad in ({"yields": -1}, {"yields": 1.5}, {"first": -1.0}, {"factor": 0.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SeqCount.Backoff(**bad)
    with pytest.raises(ValueError, match="cap"):
        SeqCount.Backoff(first=0.1, cap=0.01)
    with pytest.raises(ValueError, match="check_writer_after"):
        SeqCount.Backoff(check_writer_after="soon")  # type: ignore[arg-type]


async def test_backoff_sleeps_grow_to_the_cap(
    shm: mmap.mmap, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    with SeqCount(shm) as s:
        s.backoff = SeqCount.Backoff(yields=2, first=0.001, factor=2.0, cap=0.005)
        with s.write(), pytest.raises(BusyResourceError):
            await s.read(max_attempts=8)
    assert sleeps == [0, 0, 0.001, 0.002, 0.004, 0.005, 0.005]


# ---------------------------------------------------------------------------------------
# A dead or missing writer, forged in the counter's memory
# ---------------------------------------------------------------------------------------


@pytest.fixture
def other() -> Iterator[int]:
    """The pid of another live process (a child of ours that sleeps)."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc.pid
    proc.kill()
    proc.wait()


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    return int(data[data.rindex(b")") + 2 :].split()[19])


async def test_odd_counter_without_a_writer_is_broken(shm: mmap.mmap) -> None:
    set_word(shm, 0, 7)  # odd, holder 0: not something a SeqCount writer leaves
    with SeqCount(shm) as s:
        s.backoff = FAST
        with pytest.raises(BrokenResourceError, match="no writer is recorded"):
            await soon(s.read())


async def test_recycled_pid_is_not_the_writer(shm: mmap.mmap, other: int) -> None:
    # The holder names a live process's pid with another start time: the writer that
    # recorded it is gone, and the pid now belongs to someone else.
    set_word(shm, 0, 9)
    set_word(shm, 8, other << 32 | ((start_time(other) + 1) & 0xFFFF_FFFF))
    with SeqCount(shm) as s:
        s.backoff = FAST
        with pytest.raises(BrokenResourceError, match=f"pid {other}"):
            await soon(s.read())


async def test_live_writer_is_waited_for(shm: mmap.mmap, other: int) -> None:
    set_word(shm, 0, 9)
    set_word(shm, 8, other << 32 | (start_time(other) & 0xFFFF_FFFF))
    with SeqCount(shm) as s:
        s.backoff = FAST
        reader = await assert_blocks(s.read())  # well past check_writer_after
        set_word(shm, 0, 10)
        assert await soon(reader) == 10


async def test_a_new_writer_takes_over_from_a_dead_one(shm: mmap.mmap, other: int) -> None:
    set_word(shm, 0, 9)
    set_word(shm, 8, other << 32 | ((start_time(other) + 1) & 0xFFFF_FFFF))
    with SeqCount(shm) as s:
        with s.write():
            assert s.read_any() == 9  # stays odd: the dead write is finished by us
        assert await s.read() == 10


async def test_a_live_writer_elsewhere_makes_us_busy(shm: mmap.mmap, other: int) -> None:
    set_word(shm, 0, 9)
    set_word(shm, 8, other << 32 | (start_time(other) & 0xFFFF_FFFF))
    with SeqCount(shm) as s:
        with pytest.raises(BusyResourceError, match=f"process {other} is inside a write"):
            s.write_begin()
        assert s.read_any() == 9


def test_latch_takeover_repairs_the_second_copy(other: int) -> None:
    dead = other << 32 | ((start_time(other) + 1) & 0xFFFF_FFFF)
    with SeqRecord("qq", latch=True) as r:
        r.write(1, 2)
        # Forge a writer that died after publishing (3, 4) in copy 0 and making the
        # counter even again, half-way through bringing copy 1 up to date.
        memory = r._memory.map
        struct.pack_into("qq", memory, 16, 3, 4)  # copy 0: complete
        struct.pack_into("q", memory, 32, 3)  # copy 1: (3, 2), torn
        set_word(memory, 0, 4)
        set_word(memory, 8, dead)
        assert r.read_nowait() == (3, 4)
        with r.seqcount.write():  # takes over; readers switch to copy 1...
            assert r.read_nowait() == (3, 4)  # ...which was repaired first
            r.write(5, 6)
            assert r.read_nowait() == (3, 4)
        assert r.read_nowait() == (5, 6)


# ---------------------------------------------------------------------------------------
# One writer at a time
# ---------------------------------------------------------------------------------------


def test_write_begin_twice_is_busy(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        s.write_begin()
        with pytest.raises(BusyResourceError, match="already inside a write"):
            s.write_begin()
        with pytest.raises(BusyResourceError), s.write():
            pass
        s.write_end()
        assert s.read_any() == 2


def test_second_seqcount_over_the_same_memory_is_busy(shm: mmap.mmap) -> None:
    with SeqCount(shm) as a, SeqCount(shm) as b:
        with a.write(), pytest.raises(BusyResourceError, match="another writer in this process"):
            b.write_begin()
        with b.write():
            pass
        assert a.read_any() == 4


def test_writer_in_another_thread_is_busy(record: SeqRecord) -> None:
    errors: list[BaseException] = []

    def other() -> None:
        try:
            record.write(1, 2, 3.0)
        except BaseException as exc:
            errors.append(exc)

    with record.seqcount.write():
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1
    assert isinstance(errors[0], BusyResourceError)
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert len(errors) == 1
    assert record.read_nowait() == (1, 2, 3.0)


async def test_writer_in_another_task_is_busy(record: SeqRecord) -> None:
    opened = asyncio.Event()
    done = asyncio.Event()

    async def bracket() -> None:
        with record.seqcount.write():
            record.write(1, 1, 1.0)
            opened.set()
            await done.wait()

    task = asyncio.create_task(bracket())
    await opened.wait()
    with pytest.raises(BusyResourceError):
        record.write(2, 2, 2.0)  # not this task's bracket
    done.set()
    await task
    assert record.read_nowait() == (1, 1, 1.0)


def test_write_end_without_begin(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        with pytest.raises(RuntimeError, match="without write_begin"):
            s.write_end()
        assert s.read_any() == 0


def test_write_section_ends_on_exception(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        with pytest.raises(ZeroDivisionError), s.write():
            1 / 0  # noqa: B018
        assert s.read_any() == 2
        with s.write():
            pass


# ---------------------------------------------------------------------------------------
# SeqRecord
# ---------------------------------------------------------------------------------------


async def test_record_round_trip(record: SeqRecord) -> None:
    assert record.read_nowait() == (0, 0, 0.0)
    assert await record.read() == (0, 0, 0.0)
    record.write(-1, 2**63 - 1, 1.5)
    assert record.read_nowait() == (-1, 2**63 - 1, 1.5)
    assert await record.read() == (-1, 2**63 - 1, 1.5)
    assert record.seqcount.read_any() == 2
    assert record.format == "qqd"
    assert not record.latch


@pytest.mark.parametrize(
    ("fmt", "values"),
    [
        ("b", (-3,)),
        ("?", (True,)),
        ("5s", (b"hello",)),
        ("hxi", (1, 2)),
        ("@bq", (1, 2)),
        ("<bq", (1, 2)),
        ("100d", tuple(float(i) for i in range(100))),
        ("3sI", (b"abc", 7)),
    ],
)
def test_record_formats(fmt: str, values: tuple[Any, ...]) -> None:
    for latch in (False, True):
        with SeqRecord(fmt, latch=latch) as r:
            r.write(*values)
            assert r.read_nowait() == values


async def test_latch_readers_never_wait(record: SeqRecord) -> None:
    with SeqRecord("qqd", latch=True) as r:
        r.write(1, 2, 3.0)
        with r.seqcount.write():
            r.write(4, 5, 6.0)
            # A write is held open: readers get the last complete value at once.
            assert r.read_nowait() == (1, 2, 3.0)
            assert await r.read() == (1, 2, 3.0)
            assert await r.read(max_attempts=1) == (1, 2, 3.0)
            r.write(7, 8, 9.0)
            assert r.read_nowait() == (1, 2, 3.0)
        assert r.read_nowait() == (7, 8, 9.0)
        r.write(10, 11, 12.0)
        assert await r.read() == (10, 11, 12.0)
        assert r.latch


def test_bracketed_write_of_another_record_is_independent() -> None:
    with SeqRecord("q") as a, SeqRecord("q") as b, a.seqcount.write():
        b.write(1)
        a.write(2)
        assert b.read_nowait() == (1,)
        with pytest.raises(WouldBlock):
            a.read_nowait()


# ---------------------------------------------------------------------------------------
# The awaitable of SeqRecord.read()
# ---------------------------------------------------------------------------------------


async def test_read_is_a_coroutine(record: SeqRecord) -> None:
    record.write(1, 2, 3.0)
    ready = record.read()
    assert asyncio.iscoroutine(ready)
    task = asyncio.create_task(ready)
    assert "SeqRecord.read()" in repr(task)
    assert await task == (1, 2, 3.0)
    assert list(await asyncio.gather(record.read(), record.read())) == [(1, 2, 3.0)] * 2
    assert await asyncio.wait_for(record.read(), 1) == (1, 2, 3.0)
    with record.seqcount.write():
        slow = record.read()
        assert asyncio.iscoroutine(slow)
        slow.close()


async def test_read_awaitable_protocol(record: SeqRecord) -> None:
    ready = record.read()
    assert await ready == (0, 0, 0.0)
    with pytest.raises(RuntimeError, match="cannot reuse"):
        await ready
    ready = record.read()
    with pytest.raises(KeyError):
        ready.throw(KeyError("x"))
    with pytest.raises(RuntimeError, match="cannot reuse"):
        ready.send(None)
    ready = record.read()
    with pytest.raises(ValueError):  # noqa: PT011 - any exception class is thrown in
        ready.throw(ValueError)
    ready = record.read()
    ready.close()
    with pytest.raises(RuntimeError, match="cannot reuse"):
        ready.send(None)


# ---------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------


def test_seqcount_bad_buffers(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="writable shared buffer"):
        SeqCount(123)
    with pytest.raises(TypeError, match="read-only"):
        SeqCount(bytes(64))
    with pytest.raises(TypeError, match="read-only"):
        SeqCount(memoryview(bytearray(64)).toreadonly())
    path = tmp_path / "ro"
    path.write_bytes(bytes(64))
    with (
        open(path, "rb") as f,
        mmap.mmap(f.fileno(), 64, prot=mmap.PROT_READ) as ro,
        pytest.raises(TypeError, match="read-only"),
    ):
        SeqCount(ro)
    with pytest.raises(TypeError, match="contiguous"):
        SeqCount(memoryview(bytearray(64))[::2])
    with pytest.raises(ValueError, match="too small"):
        SeqCount(bytearray(15))
    with pytest.raises(ValueError, match="too small"):
        SeqCount(bytearray(64), 56)
    aligned = mmap.mmap(-1, 64)
    with pytest.raises(ValueError, match="aligned"):
        SeqCount(memoryview(aligned)[4:])
    aligned.close()  # nothing kept it exported


def test_seqcount_bad_offsets(shm: mmap.mmap) -> None:
    with pytest.raises(ValueError, match=">= 0"):
        SeqCount(shm, -8)
    with pytest.raises(ValueError, match="multiple of 8"):
        SeqCount(shm, 4)
    with pytest.raises(TypeError, match="offset"):
        SeqCount(shm, 8.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="offset"):
        SeqCount(shm, True)
    with pytest.raises(TypeError, match="offset"):
        SeqCount(shm, "8")  # type: ignore[arg-type]


def test_seqcount_bad_arguments(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        with pytest.raises(TypeError, match="seq"):
            s.consistent("0")  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="seq"):
            s.consistent(0.0)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="seq"):
            s.consistent(-1)
        with pytest.raises(ValueError, match="seq"):
            s.consistent(2**64)
        assert s.consistent(0)


@pytest.mark.parametrize("bad", [0, -1])
async def test_bad_max_attempts_value(shm: mmap.mmap, record: SeqRecord, bad: int) -> None:
    with SeqCount(shm) as s, pytest.raises(ValueError, match="max_attempts"):
        await s.read(max_attempts=bad)
    with pytest.raises(ValueError, match="max_attempts"):
        await record.read(max_attempts=bad)


@pytest.mark.parametrize("bad", [1.0, "3", True])
async def test_bad_max_attempts_type(shm: mmap.mmap, record: SeqRecord, bad: object) -> None:
    with SeqCount(shm) as s, pytest.raises(TypeError, match="max_attempts"):
        await s.read(max_attempts=bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="max_attempts"):
        await record.read(max_attempts=bad)  # type: ignore[arg-type]


def test_record_read_arguments(record: SeqRecord) -> None:
    with pytest.raises(TypeError, match="max_attempts"):
        record.read(1)  # type: ignore[call-arg,unused-coroutine]
    with pytest.raises(TypeError, match="max_attempts"):
        record.read(timeout=1)  # type: ignore[call-arg,unused-coroutine]


def test_record_bad_formats() -> None:
    with pytest.raises(TypeError, match="struct format"):
        SeqRecord(b"qq")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="struct format"):
        SeqRecord(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="bad struct format"):
        SeqRecord("qqz")
    with pytest.raises(ValueError, match="describes no data"):
        SeqRecord("")
    with pytest.raises(ValueError, match="describes no data"):
        SeqRecord("0q")
    with pytest.raises(TypeError, match="latch"):
        SeqRecord("q", latch=1)  # type: ignore[arg-type]


def test_record_bad_values(record: SeqRecord) -> None:
    with pytest.raises(TypeError, match="takes 3 values, not 2"):
        record.write(1, 2)
    with pytest.raises(TypeError, match="takes 3 values, not 4"):
        record.write(1, 2, 3.0, 4)
    with pytest.raises(TypeError, match="cannot write"):
        record.write("1", 2, 3.0)
    with pytest.raises(TypeError, match="cannot write"):
        record.write(1, 2, "3.0")
    with pytest.raises(ValueError, match="cannot write"):
        record.write(2**63, 2, 3.0)
    with SeqRecord("hc") as r:
        with pytest.raises(ValueError, match="cannot write"):
            r.write(2**15, b"x")
        with pytest.raises(TypeError, match="cannot write"):
            r.write(1, "x")
    assert record.read_nowait() == (0, 0, 0.0)
    assert record.seqcount.read_any() == 0  # nothing was begun


# ---------------------------------------------------------------------------------------
# Life cycle
# ---------------------------------------------------------------------------------------


async def test_seqcount_use_after_close(shm: mmap.mmap) -> None:
    s = SeqCount(shm)
    s.close()
    s.close()  # idempotent
    with pytest.raises(ClosedResourceError):
        s.read_any()
    with pytest.raises(ClosedResourceError):
        s.consistent(0)
    with pytest.raises(ClosedResourceError):
        await s.read()
    with pytest.raises(ClosedResourceError):
        s.write_begin()
    with pytest.raises(ClosedResourceError):
        s.write_end()
    with pytest.raises(ClosedResourceError), s.write():
        pass
    with pytest.raises(ClosedResourceError), s:
        pass
    assert repr(s) == "<aiosync.SeqCount closed>"


async def test_record_use_after_close(record: SeqRecord) -> None:
    view = record.seqcount
    record.close()
    record.close()
    for call in (
        record.read_nowait,
        lambda: record.write(1, 2, 3.0),
        lambda: record.write(),
        lambda: record.seqcount,
        view.read_any,
    ):
        with pytest.raises(ClosedResourceError):
            call()
    with pytest.raises(ClosedResourceError):
        await record.read()
    with pytest.raises(ClosedResourceError):
        await record.read(max_attempts=3)
    assert repr(record) == "<aiosync.SeqRecord('qqd') closed>"


async def test_close_while_a_reader_waits(record: SeqRecord) -> None:
    record.backoff = FAST
    record.seqcount.write_begin()
    reader = await assert_blocks(record.read())
    record.close()
    with pytest.raises(ClosedResourceError):
        await soon(reader)


def test_close_ends_an_open_write(shm: mmap.mmap) -> None:
    s = SeqCount(shm)
    s.write_begin()
    s.close()
    with SeqCount(shm) as again:
        assert again.read_any() == 2
        with again.write():
            pass


def test_seqcount_exports_the_buffer_until_closed() -> None:
    m = mmap.mmap(-1, 64)
    s = SeqCount(m)
    with pytest.raises(BufferError):
        m.close()  # the counter would point at unmapped memory
    s.close()
    m.close()


def test_record_seqcount_is_the_records(record: SeqRecord) -> None:
    view = record.seqcount
    assert record.seqcount is view
    view.close()  # closes the view only
    assert record.read_nowait() == (0, 0, 0.0)
    fresh = record.seqcount
    assert fresh is not view
    with fresh.write():
        record.write(1, 2, 3.0)
    assert record.read_nowait() == (1, 2, 3.0)


def test_unclosed_objects_warn(shm: mmap.mmap) -> None:
    # Dropped at once (reference counting): each warns and cleans up.
    with pytest.warns(ResourceWarning, match="unclosed <aiosync.SeqRecord"):
        SeqRecord("q")
    with pytest.warns(ResourceWarning, match="unclosed <aiosync.SeqCount"):
        SeqCount(shm)
    shm.close()  # the dropped SeqCount let go of it


def test_record_seqcount_does_not_warn(record: SeqRecord) -> None:
    record.seqcount  # noqa: B018
    record._view = None  # drop the record's own view without closing it
    gc.collect()  # warnings are errors: nothing may warn here


def test_repr(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s:
        assert repr(s) == "<aiosync.SeqCount seq=0>"
        with s.write():
            assert repr(s) == f"<aiosync.SeqCount seq=1 (write in progress by pid {os.getpid()})>"
    with SeqRecord("qqd", latch=True) as r:
        assert repr(r) == "<aiosync.SeqRecord('qqd', latch=True) seq=0>"
        with r.seqcount.write():
            assert repr(r) == "<aiosync.SeqRecord('qqd', latch=True) seq=1 (write in progress)>"


def test_no_fd_leaks(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for i in range(10_000):
        r = SeqRecord("qqd", latch=bool(i & 1))
        if i % 100 == 0:
            r.write(i, i, 0.0)
            r.seqcount.read_any()
        r.close()
    assert fd_count() == before


def test_failed_constructions_leak_nothing(fd_count: Callable[[], int]) -> None:
    before = fd_count()
    for _ in range(100):
        with pytest.raises(ValueError, match="bad struct format"):
            SeqRecord("z")
        with pytest.raises(ValueError, match="too small"):
            SeqCount(bytearray(8))
    gc.collect()
    assert fd_count() == before


def test_pickling_outside_a_process_start_is_refused(record: SeqRecord) -> None:
    import pickle

    with pytest.raises(TypeError, match="multiprocessing"):
        pickle.dumps(record)
    with pytest.raises(TypeError, match="multiprocessing"):
        pickle.dumps(record.seqcount)


def test_a_seqcount_over_your_own_buffer_is_not_shared(shm: mmap.mmap) -> None:
    with SeqCount(shm) as s, pytest.raises(aiosync.SharingError, match="same offset"):
        s._share(True)


# ---------------------------------------------------------------------------------------
# Interleavings against a model (Hypothesis)
# ---------------------------------------------------------------------------------------

VALUES = st.tuples(st.integers(-(2**63), 2**63 - 1), st.integers(0, 255))


class SeqModel(RuleBasedStateMachine):
    """Writes, bracketed writes and reads, checked against a plain-Python model."""

    @initialize(latch=st.booleans())
    def start(self, latch: bool) -> None:
        self.record = SeqRecord("qB", latch=latch)
        self.latch = latch
        self.seq = 0
        self.published: tuple[int, int] = (0, 0)
        self.pending: tuple[int, int] | None = None
        self.open = False
        self.saved: list[int] = []

    def teardown(self) -> None:
        if hasattr(self, "record"):
            self.record.close()

    @rule(values=VALUES)
    def write(self, values: tuple[int, int]) -> None:
        self.record.write(*values)
        if self.open:
            self.pending = values
        else:
            self.published = values
            self.seq += 2

    @precondition(lambda self: not self.open)
    @rule()
    def begin(self) -> None:
        self.record.seqcount.write_begin()
        self.open = True
        self.seq += 1

    @precondition(lambda self: self.open)
    @rule()
    def begin_again(self) -> None:
        with pytest.raises(BusyResourceError):
            self.record.seqcount.write_begin()

    @precondition(lambda self: self.open)
    @rule()
    def end(self) -> None:
        self.record.seqcount.write_end()
        self.open = False
        self.seq += 1
        if self.pending is not None:
            self.published, self.pending = self.pending, None

    @rule()
    def read_nowait(self) -> None:
        if self.open and not self.latch:
            with pytest.raises(WouldBlock):
                self.record.read_nowait()
        else:
            assert self.record.read_nowait() == self.published

    @rule()
    def read(self) -> None:
        awaitable = self.record.read()
        if self.open and not self.latch:
            awaitable.close()  # it would wait: a real coroutine, not started
            return
        with pytest.raises(StopIteration) as stop:
            awaitable.send(None)
        assert stop.value.value == self.published

    @rule()
    def save(self) -> None:
        self.saved.append(self.record.seqcount.read_any())

    @invariant()
    def counter_matches(self) -> None:
        if hasattr(self, "record"):
            view = self.record.seqcount
            assert view.read_any() == self.seq
            for seq in self.saved[-5:]:
                assert view.consistent(seq) == (seq == self.seq)


SeqModel.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
test_seqc_model = SeqModel.TestCase


def test_fork_child_does_not_end_the_parents_write(shm: mmap.mmap) -> None:
    # A write begun before a fork belongs to the parent: the child's close() of the
    # inherited object must not end it.
    s = SeqCount(shm)
    s.write_begin()

    def child() -> None:
        s.close()
        assert s_read(shm) == 1

    Forked(child).join()
    assert s.read_any() == 1
    s.write_end()
    s.close()


def s_read(buf: mmap.mmap) -> int:
    return int(struct.unpack_from("Q", buf, 0)[0])


# ---------------------------------------------------------------------------------------
# Who wrote last (the process-level checks are in test_seqc_processes.py)
# ---------------------------------------------------------------------------------------


def set_last_writer(record: SeqRecord, token: int) -> None:
    """Forge the token of the record's last writer (the word after the payload copies)."""
    from aiosync import _seqc

    size = struct.calcsize(record.format)
    offset = _seqc.span(size, 2 if record.latch else 1) - 8
    set_word(record._memory.map, offset, token)


@pytest.mark.parametrize("latch", [False, True])
def test_last_writer_is_who_began_the_latest_write(latch: bool) -> None:
    with SeqRecord("qqd", latch=latch) as record:
        before = (record.last_writer, record.writer_alive())
        assert before == (None, None)  # nothing written yet
        record.write(1, 2, 3.0)
        assert record.last_writer == os.getpid()
        assert record.writer_alive() is True
        assert record.read_nowait() == (1, 2, 3.0)  # the word does not touch the payload


def test_last_writer_is_set_by_a_bracketed_write(record: SeqRecord) -> None:
    with record.seqcount.write():
        assert record.last_writer == os.getpid()  # during the write: the writer
        record.write(4, 5, 6.0)
    assert record.last_writer == os.getpid()  # it stays when the write ends
    assert record.read_nowait() == (4, 5, 6.0)


def test_writer_alive_tells_a_recycled_pid_apart(record: SeqRecord, other: int) -> None:
    # The same pid + start time identity, and the same /proc test, as the check of a
    # writer that died inside a write.
    set_last_writer(record, other << 32 | (start_time(other) & 0xFFFF_FFFF))
    assert record.last_writer == other
    assert record.writer_alive() is True
    set_last_writer(record, other << 32 | ((start_time(other) + 1) & 0xFFFF_FFFF))
    assert record.last_writer == other
    assert record.writer_alive() is False  # that pid belongs to another process now


def test_a_new_writer_replaces_a_dead_last_writer(record: SeqRecord, other: int) -> None:
    set_last_writer(record, other << 32 | ((start_time(other) + 1) & 0xFFFF_FFFF))
    assert record.writer_alive() is False
    record.write(1, 2, 3.0)
    assert record.last_writer == os.getpid()
    assert record.writer_alive() is True


def test_last_writer_after_close(record: SeqRecord) -> None:
    record.close()
    with pytest.raises(ClosedResourceError):
        _ = record.last_writer
    with pytest.raises(ClosedResourceError):
        record.writer_alive()


# ---------------------------------------------------------------------------------------
# Threads against one object (without a GIL on free-threaded builds)
# ---------------------------------------------------------------------------------------


def close_while_threads_read_and_write(latch: bool) -> None:
    record = SeqRecord("qqd", latch=latch)
    start = threading.Barrier(5)
    errors: list[BaseException] = []

    def reader() -> None:
        start.wait()
        try:
            while True:
                values = record.read_nowait()
                assert values[0] == values[1]
                assert record.last_writer == os.getpid()
        except (ClosedResourceError, WouldBlock):
            pass
        except BaseException as exc:  # pragma: no cover - the failure shows
            errors.append(exc)

    def writer() -> None:
        start.wait()
        try:
            n = 0
            while True:
                n += 1
                record.write(n, n, 0.0)
        except (ClosedResourceError, BusyResourceError):
            pass
        except BaseException as exc:  # pragma: no cover - the failure shows
            errors.append(exc)

    record.write(0, 0, 0.0)
    threads = [threading.Thread(target=reader) for _ in range(3)]
    threads.append(threading.Thread(target=writer))
    for thread in threads:
        thread.start()
    start.wait()
    record.close()
    for thread in threads:
        thread.join(timeout=10)
        assert not thread.is_alive()
    assert errors == []


@pytest.mark.parametrize("latch", [False, True])
def test_close_while_threads_read_and_write(latch: bool) -> None:
    # Every call either does its work on the open record or raises ClosedResourceError:
    # the memory never goes away under a snapshot or a store (the C methods read the
    # object's fields inside its critical section).
    for _ in range(20):
        close_while_threads_read_and_write(latch)


def close_in_three_threads(latch: bool, closed: list[int]) -> None:
    record = SeqRecord("qqd", latch=latch)
    fd = record._memory.fd
    view = record.seqcount
    view.write_begin()
    start = threading.Barrier(4)
    errors: list[BaseException] = []

    def close(obj: SeqRecord | SeqCount) -> None:
        start.wait()
        try:
            obj.close()
        except BaseException as exc:  # pragma: no cover - the failure shows
            errors.append(exc)

    threads = [threading.Thread(target=close, args=(obj,)) for obj in (record, record, view)]
    for thread in threads:
        thread.start()
    start.wait()
    for thread in threads:
        thread.join(timeout=10)
    assert errors == []
    assert record._memory.fd == -1
    assert closed.count(fd) == 1  # closed once: never a number reused meanwhile
    with pytest.raises(ClosedResourceError):  # the view is closed with the record
        view.read_any()


@pytest.mark.parametrize("latch", [False, True])
def test_threads_closing_at_once_close_once(
    latch: bool, fd_count: Callable[[], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    # One close() does the work: the memfd is closed once, never a number that another
    # thread may have been given meanwhile.
    from aiosync import _fd

    closed: list[int] = []
    close = _fd.close

    def counted(fd: int) -> None:
        closed.append(fd)
        close(fd)

    monkeypatch.setattr(_fd, "close", counted)
    before = fd_count()
    for _ in range(200):
        close_in_three_threads(latch, closed)
        closed.clear()
    assert fd_count() == before


def test_one_seqcount_per_record_across_threads(record: SeqRecord) -> None:
    start = threading.Barrier(4)
    seen: list[SeqCount] = []

    def get() -> None:
        start.wait()
        seen.append(record.seqcount)

    threads = [threading.Thread(target=get) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert len(seen) == 4
    assert all(view is seen[0] for view in seen)
