"""The fd plumbing (aiosync._fd), through what a loop and the kernel can observe.

* One registration per (loop, fd), however many waiters (docs/design.md §5.1).
* Registrations are kept while waiters come and go, and dropped lazily: the first
  time the fd fires with nobody waiting, without reading it (§5 pitfalls).
* Readers are removed before the fds are closed (§5.2).
* `_fd.check` accepts exactly the fds it claims to and names what it found otherwise.

Loops here are subclasses of the two real loops that count (and check) every
``add_reader`` / ``remove_reader`` and every callback they run for a reader.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import uvloop
from support import pair, parked, soon

from aiosync import Barrier, ClosedResourceError, SharingError, _fd


class Counting:
    """Mixed into a loop class: counts registrations and reader callbacks per fd."""

    def _init_counts(self) -> None:
        self.adds: Counter[int] = Counter()
        self.removes: Counter[int] = Counter()
        self.calls: Counter[int] = Counter()
        self.closed_at_remove: list[int] = []

    def add_reader(self, fd: Any, callback: Callable[..., object], *args: Any) -> None:
        self.adds[fd] += 1

        def counted(*args: Any) -> None:
            self.calls[fd] += 1
            callback(*args)

        super().add_reader(fd, counted, *args)  # type: ignore[misc]

    def remove_reader(self, fd: Any) -> bool:
        self.removes[fd] += 1
        try:
            os.fstat(fd)
        except OSError:
            self.closed_at_remove.append(fd)
        return bool(super().remove_reader(fd))  # type: ignore[misc]


class CountingAsyncio(Counting, asyncio.SelectorEventLoop):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._init_counts()


class CountingUvloop(Counting, uvloop.Loop):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._init_counts()


LOOPS: dict[str, Callable[[], Counting]] = {"asyncio": CountingAsyncio, "uvloop": CountingUvloop}


def run_counting(kind: str, main: Callable[[Counting], Any]) -> None:
    loop = LOOPS[kind]()
    assert isinstance(loop, asyncio.AbstractEventLoop)
    with asyncio.Runner(loop_factory=lambda: loop) as runner:
        runner.run(main(loop))


def eventfd_count(fd: int) -> int:
    """An eventfd's value, read from /proc without touching the eventfd itself."""
    with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "eventfd-count":
                return int(value.strip(), 16)
    raise AssertionError("no eventfd-count")


async def spin(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_one_registration_for_many_waiters(kind: str, sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides

    async def main(loop: Counting) -> None:
        assert p.place()
        tasks = [asyncio.create_task(p.sync()) for _ in range(50)]
        tasks += [asyncio.create_task(p.wait_abortion()) for _ in range(50)]
        await parked(p, 100)
        assert loop.adds == {p._them: 1, p._pipe_r: 1}
        if kind == "asyncio":
            selector = loop._selector  # type: ignore[attr-defined]
            assert {p._them, p._pipe_r} <= set(selector.get_map())
        assert c.place()
        assert await soon(asyncio.gather(*tasks[:50])) == [True] * 50
        # Waiters come and go: the registration stays, nothing is added again.
        more = [asyncio.create_task(p.wait_next()) for _ in range(20)]
        await parked(p, 70)
        assert c.place()
        assert await soon(asyncio.gather(*more)) == [True] * 20
        assert loop.adds == {p._them: 1, p._pipe_r: 1}
        assert not loop.removes
        c.close()
        assert await soon(asyncio.gather(*tasks[50:])) == [True] * 50
        # One callback run per event, for all 100 waiters at once.
        assert sum(loop.calls.values()) <= 4

    run_counting(kind, main)


def test_lazy_deregistration_without_reading(kind: str, sides: tuple[Barrier, Barrier]) -> None:
    p, c = sides

    async def main(loop: Counting) -> None:
        task = asyncio.create_task(p.wait_next())
        await parked(p, 1)
        assert loop.adds == {p._them: 1, p._pipe_r: 1}
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await spin()
        # The last waiter left: the registration is still there (dropped lazily).
        assert not loop.removes
        assert p._waitq.waiting == 0
        assert c.place()
        await spin()
        # It fired with nobody waiting: dropped (that fd alone: the pipe, silent, stays
        # registered), and the eventfd was not read.
        assert loop.removes == {p._them: 1}
        assert eventfd_count(p._them) == 1
        assert repr(p) == "<aiosync.Barrier role=PARENT barriers=0 aborted=no>"
        assert sum(loop.calls.values()) == 1
        c.close()  # the pipe hangs up too, for ever: called once, then dropped as well
        await spin(100)
        assert loop.removes == {p._them: 1, p._pipe_r: 1}
        assert sum(loop.calls.values()) == 2
        assert not p.they_aborted  # nobody waited: the exit was not noticed
        # The next waiter registers afresh and reads.
        assert await soon(p.wait_next()) is True
        assert loop.adds == {p._them: 2, p._pipe_r: 2}
        assert eventfd_count(p._them) == 0
        assert await soon(p.wait_next()) is False  # and now the exit counts

    run_counting(kind, main)


def test_an_fd_dropped_alone_is_added_again_alone_and_the_rest_removed_on_close(
    kind: str, sides: tuple[Barrier, Barrier]
) -> None:
    p, c = sides

    async def fire_unwatched() -> None:
        # A waiter registers, then leaves; the peer places: nobody waits when it fires.
        task = asyncio.create_task(p.wait_next())
        await parked(p, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert c.place()
        await spin()

    async def main(loop: Counting) -> None:
        await fire_unwatched()
        assert loop.removes == {p._them: 1}  # fired with nobody waiting; the pipe stays
        task = asyncio.create_task(p.wait_next())
        await spin()
        assert await soon(task) is True  # the next waiter re-adds the eventfd alone
        assert loop.adds == {p._them: 2, p._pipe_r: 1}
        await fire_unwatched()
        them, pipe_r = p._them, p._pipe_r
        assert loop.removes == {them: 2}
        p.close()  # the pipe's registration, kept, goes before the fds close
        assert loop.removes == {them: 2, pipe_r: 1}
        assert loop.closed_at_remove == []
        await spin()

    run_counting(kind, main)


def test_readers_are_removed_before_the_fds_close(
    kind: str, sides: tuple[Barrier, Barrier]
) -> None:
    p, _ = sides

    async def main(loop: Counting) -> None:
        assert p.place()
        task = asyncio.create_task(p.sync())
        await parked(p, 1)
        them, pipe_r = p._them, p._pipe_r
        p.close()
        assert loop.removes == {them: 1, pipe_r: 1}
        assert loop.closed_at_remove == []
        with pytest.raises(ClosedResourceError, match="closed while waiting"):
            await task
        await spin()

    run_counting(kind, main)


def test_a_spent_registration_is_dropped_on_close(kind: str) -> None:
    p, c = pair()

    async def main(loop: Counting) -> None:
        assert p.place()
        assert c.place()
        assert await soon(p.sync()) is True  # registered, then nobody waits
        them, pipe_r = p._them, p._pipe_r
        c.close()
        p.close()
        assert loop.removes == {them: 1, pipe_r: 1}
        assert loop.closed_at_remove == []
        await spin()

    run_counting(kind, main)


# ---------------------------------------------------------------------------------------
# _fd.check
# ---------------------------------------------------------------------------------------


@pytest.fixture
def kinds() -> Iterator[dict[str, int]]:
    r, w = os.pipe2(os.O_CLOEXEC)
    fds = {
        "eventfd": _fd.eventfd(),
        "semaphore-eventfd": _fd.eventfd(semaphore=True),
        "pipe-read": r,
        "pipe-write": w,
        "memfd": _fd.memfd("test", 64),
    }
    yield fds
    for fd in fds.values():
        os.close(fd)


KINDS = ["eventfd", "semaphore-eventfd", "pipe-read", "pipe-write", "memfd"]


@pytest.mark.parametrize("want", KINDS)
@pytest.mark.parametrize("have", KINDS)
def test_check_accepts_only_its_kind(kinds: dict[str, int], want: Any, have: str) -> None:
    fd = kinds[have]
    if want == have:
        assert _fd.check(fd, want, name="x") == fd
    else:
        with pytest.raises(SharingError, match=rf"^x: .*fd {fd}"):
            _fd.check(fd, want, name="x")


def test_check_names_what_it_found(kinds: dict[str, int]) -> None:
    with pytest.raises(SharingError, match=r"should be an eventfd but is 'pipe:\["):
        _fd.check(kinds["pipe-read"], "eventfd", name="x")
    with pytest.raises(SharingError, match="should be a plain eventfd"):
        _fd.check(kinds["semaphore-eventfd"], "eventfd", name="x")
    with pytest.raises(SharingError, match="should be a semaphore eventfd"):
        _fd.check(kinds["eventfd"], "semaphore-eventfd", name="x")
    with pytest.raises(SharingError, match="not the write end of a pipe"):
        _fd.check(kinds["pipe-read"], "pipe-write", name="x")
    with pytest.raises(SharingError, match="not the read end of a pipe"):
        _fd.check(kinds["pipe-write"], "pipe-read", name="x")
    with pytest.raises(SharingError, match="should be a memfd but is 'anon_inode:"):
        _fd.check(kinds["eventfd"], "memfd", name="x")


@pytest.mark.parametrize("bad", [-1, True, False, "3", 3.0, None, b"3"])
def test_check_rejects_non_numbers(bad: object) -> None:
    with pytest.raises(SharingError, match="is not a file descriptor number"):
        _fd.check(bad, "eventfd", name="x")


def test_check_rejects_closed_fds() -> None:
    fd = _fd.eventfd()
    os.close(fd)
    with pytest.raises(SharingError, match=f"fd {fd} is not open in this process"):
        _fd.check(fd, "eventfd", name="x")


def test_check_rejects_files_and_read_only_memfds(kinds: dict[str, int]) -> None:
    with tempfile.TemporaryFile() as f:
        with pytest.raises(SharingError, match="should be a memfd"):
            _fd.check(f.fileno(), "memfd", name="x")
        with pytest.raises(SharingError, match="should be an eventfd"):
            _fd.check(f.fileno(), "eventfd", name="x")
    ro = os.open(f"/proc/self/fd/{kinds['memfd']}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(SharingError, match="not open for reading and writing"):
            _fd.check(ro, "memfd", name="x")
    finally:
        os.close(ro)


def test_own_makes_an_fd_ours() -> None:
    r, w = os.pipe()
    try:
        os.set_inheritable(r, True)
        assert os.get_blocking(r)
        assert _fd.own(r) == r
        assert not os.get_inheritable(r)
        assert not os.get_blocking(r)
    finally:
        os.close(r)
        os.close(w)


def test_write_eventfd_reports_overflow() -> None:
    fd = _fd.eventfd()
    try:
        assert _fd.write_eventfd(fd, 0xFFFF_FFFF_FFFF_FFFE)
        assert not _fd.write_eventfd(fd, 1)
        assert _fd.read_eventfd(fd) == 0xFFFF_FFFF_FFFF_FFFE
        assert _fd.read_eventfd(fd) == 0  # empty, not an error
    finally:
        _fd.close(fd)
