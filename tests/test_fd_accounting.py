"""Each object holds exactly the fds the design's table says (docs/design.md §9)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import pytest

from aiosync import Barrier, BarrierGroup, Completion, Lock, Role, Semaphore, SeqRecord


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def with_role() -> Barrier:
    b = Barrier()
    b.set_role(Role.PARENT)
    return b


RECORD_FDS = 1 if sys.version_info >= (3, 13) else 2  # the mmap's own duplicate before 3.13

CASES: dict[str, tuple[Callable[[], object], int]] = {
    "Barrier before set_role": (Barrier, 4),
    "Barrier after set_role": (with_role, 3),
    "Completion": (Completion, 2),
    "SeqRecord": (lambda: SeqRecord("qqd"), RECORD_FDS),
    "SeqRecord latch": (lambda: SeqRecord("qqd", latch=True), RECORD_FDS),
    "BarrierGroup(3)": (lambda: BarrierGroup(3), 12),
    "Lock": (Lock, RECORD_FDS),
    "Semaphore(3)": (lambda: Semaphore(3), RECORD_FDS),
}


@pytest.mark.parametrize("name", CASES)
def test_fds_per_object(name: str) -> None:
    make, want = CASES[name]
    before = open_fds()
    obj = make()
    try:
        assert open_fds() - before == want
    finally:
        obj.close()  # type: ignore[attr-defined]
    assert open_fds() == before


def test_a_lock_opens_its_private_description_at_first_use_and_inotify_at_first_wait() -> None:
    before = open_fds()
    lock = Lock()
    try:
        lock.acquire_blocking()  # first use: the private description
        assert open_fds() - before == RECORD_FDS + 1
        lock.release()
        lock.acquire_blocking()
        assert open_fds() - before == RECORD_FDS + 1  # once per process
        with pytest.raises(TimeoutError):  # first wait: the inotify fd
            lock.acquire_blocking(timeout=0)
        assert open_fds() - before == RECORD_FDS + 2
        lock.release()
    finally:
        lock.close()
    assert open_fds() == before
