"""aiosync in a subinterpreter with its own GIL (3.14's `concurrent.interpreters`).

The C extension declares per-interpreter GIL support (multi-phase initialisation,
heap types, module state: nothing shared between interpreters but the memory the
user shares on purpose). Here a subinterpreter imports aiosync, uses every primitive
on its own event loop, and reads a counter that the main interpreter writes in
shared memory. Where the interpreter has no `concurrent.interpreters` (before 3.14),
the test is skipped.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from typing import Any

import pytest

from aiosync import SeqCount

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("concurrent.interpreters") is None,
    reason="this Python has no concurrent.interpreters (subinterpreters came with 3.14)",
)

IN_SUBINTERPRETER = """
import asyncio, mmap, os, struct
import aiosync
from aiosync import Barrier, Completion, Role, SeqCount, SeqRecord

async def main() -> None:
    with SeqRecord("qqd", latch=LATCH) as record:
        assert record.last_writer is None
        record.write(1, 2, 3.0)
        assert await record.read() == (1, 2, 3.0)
        assert record.read_nowait() == (1, 2, 3.0)
        assert record.last_writer == os.getpid() and record.writer_alive()
        with record.seqcount.write():
            record.write(4, 5, 6.0)
        assert await record.read() == (4, 5, 6.0)
    with Completion() as done:
        asyncio.get_running_loop().call_soon(done.complete)
        await asyncio.wait_for(done.wait(), 10)
    with Barrier() as barrier:
        barrier.set_role(Role.PARENT)
        assert barrier.place()
    lock, sem = aiosync.Lock(), aiosync.Semaphore(2)
    try:
        async with lock:
            assert lock.owner_pid == os.getpid()
            waiter = asyncio.ensure_future(lock.acquire())  # waits: inotify, the line
            await asyncio.sleep(0)
            assert not waiter.done()
        await asyncio.wait_for(waiter, 10)
        lock.release()
        async with sem:
            sem.acquire_nowait()
            assert sem.value == 0
            sem.release()
    finally:
        lock.close()
        sem.close()

asyncio.run(main())

# The main interpreter's counter, through the same memory.
shared = mmap.mmap(FD, mmap.PAGESIZE)
with SeqCount(shared) as seqcount:
    seq = seqcount.read_any()
    assert seq == SEQ, (seq, SEQ)
    assert struct.unpack_from("q", shared, 16)[0] == 42
    with seqcount.write():
        struct.pack_into("q", shared, 16, 43)
shared.close()
"""


@pytest.mark.parametrize("latch", [False, True])
def test_aiosync_works_in_a_subinterpreter_with_its_own_gil(latch: bool) -> None:
    interpreters: Any = pytest.importorskip("concurrent.interpreters")
    fd = os.memfd_create("aiosync-test")
    try:
        os.ftruncate(fd, mmap.PAGESIZE)
        shared = mmap.mmap(fd, mmap.PAGESIZE)
        with SeqCount(shared) as seqcount:
            with seqcount.write():
                struct.pack_into("q", shared, 16, 42)
            seq = seqcount.read_any()
            interp = interpreters.create()  # isolated: its own GIL, its own modules
            try:
                code = IN_SUBINTERPRETER.replace("LATCH", repr(latch))
                interp.exec(code.replace("FD", str(fd)).replace("SEQ", str(seq)))
            finally:
                interp.close()
            assert seqcount.read_any() == seq + 2  # its write, seen here
            assert struct.unpack_from("q", shared, 16)[0] == 43
        shared.close()
    finally:
        os.close(fd)
