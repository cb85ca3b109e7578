"""`SeqRecord.read()` without `await`: the usual slip must be loud, as with coroutines.

Both shapes of what read() returns: the finished "ready" object (no write in progress)
and the coroutine of the slow path (a write in progress).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from aiosync import SeqRecord


@pytest.fixture
def record() -> Iterator[SeqRecord]:
    with SeqRecord("qq") as r:
        r.write(1, 2)
        yield r


def forget_await(record: SeqRecord, writing: bool) -> Any:
    """What ``record.read()`` returns, called as if `await` had been forgotten."""
    with record.seqcount.write() if writing else contextlib.nullcontext():
        return record.read()


def drop(record: SeqRecord, writing: bool) -> None:
    """Call ``record.read()``, drop what it returns, and let it be collected."""
    forget_await(record, writing)
    gc.collect()


def unpack(record: SeqRecord, writing: bool) -> None:
    """The usual slip: ``a, b = record.read()`` (then the collection of what it was)."""
    try:
        _a, _b = forget_await(record, writing)
    finally:
        gc.collect()


@pytest.mark.parametrize("writing", [False, True])
def test_a_dropped_read_warns_never_awaited(record: SeqRecord, writing: bool) -> None:
    with pytest.warns(RuntimeWarning, match="was never awaited"):
        drop(record, writing)


def test_unpacking_a_read_says_to_await_it(record: SeqRecord) -> None:
    with pytest.raises(TypeError, match=r"must be awaited: `await record\.read\(\)`"):
        unpack(record, writing=False)


def test_unpacking_a_waiting_read_fails_and_warns(record: SeqRecord) -> None:
    with (
        pytest.warns(RuntimeWarning, match="was never awaited"),
        pytest.raises(TypeError, match="non-iterable coroutine"),
    ):
        unpack(record, writing=True)


async def test_awaited_reads_do_not_warn(record: SeqRecord) -> None:
    assert await record.read() == (1, 2)
    gc.collect()
