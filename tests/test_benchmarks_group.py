"""bench_group's machinery with real forked children, on both loops: no timing here.

What is checked: both contenders complete their rounds against the same raw children
and release every fd; a child that fails, or is SIGKILLed, before its first round ends
the run with an error instead of leaving the parent waiting (the floor's parent knows
nothing of its children but their eventfds: the pidfd watch is what ends its wait);
and the children of a parent killed mid-run exit instead of waiting for ever.
"""

from __future__ import annotations

import asyncio
import os
import select
import signal
import struct

import pytest
from support import LOOP_KINDS, SOON

from benchmarks._common import Step, run_on
from benchmarks.bench_group import AiosyncGroup, Contender, RawGroupFloor, run_group

Make = type[RawGroupFloor] | type[AiosyncGroup]
CONTENDERS: dict[str, Make] = {"floor": RawGroupFloor, "aiosync": AiosyncGroup}


def open_fds(kind: str) -> set[str]:
    """This process's fds, once a loop of `kind` ran (uvloop's first loop keeps a pipe)."""
    run_on(kind, asyncio.sleep(0))
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("name", CONTENDERS)
def test_both_contenders_run_their_rounds(name: str, kind: str) -> None:
    before = open_fds(kind)
    per_round = run_group(CONTENDERS[name], 3, kind, rounds=20)
    assert per_round > 0
    assert open_fds(kind) == before


def failing(make: Make, how: str) -> type[Contender]:
    """`make`, except that child 1 fails (raises, or is SIGKILLed) before its rounds."""

    class Failing(make):  # type: ignore[valid-type,misc]
        def in_child(self, index: int) -> None:
            super().in_child(index)
            if index == 1:
                if how == "SIGKILL":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError("child 1 fails on purpose")

    return Failing


@pytest.mark.parametrize("how", ["raises", "SIGKILL"])
@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("name", CONTENDERS)
def test_a_failing_child_ends_the_run_with_an_error(name: str, kind: str, how: str) -> None:
    before = open_fds(kind)
    with pytest.raises(RuntimeError, match=r"child|children"):
        run_group(failing(CONTENDERS[name], how), 3, kind, rounds=20)
    assert open_fds(kind) == before


class StopsAfterOneRound(RawGroupFloor):
    """The floor, telling `tell` its children's pids, then "1" after its first round.

    After that round every child is in its loop, watching the parent; the parent then
    waits for ever.
    """

    def __init__(self, tell: int) -> None:
        super().__init__()
        self.tell = tell

    def attach(self, index: int, pid: int) -> None:
        os.write(self.tell, struct.pack("=i", pid))

    def side(self) -> Step:
        first = super().side()

        async def step() -> None:
            await first()
            os.write(self.tell, struct.pack("=i", 1))
            await asyncio.get_running_loop().create_future()  # for ever

        return step


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_the_children_of_a_killed_parent_exit(kind: str) -> None:
    n = 3
    r, w = os.pipe()
    parent = os.fork()
    if parent == 0:  # pragma: no cover - the benchmark's parent, killed below
        try:
            os.close(r)
            run_group(lambda: StopsAfterOneRound(w), n, kind, rounds=20)
        finally:
            os._exit(1)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as told:
            children = [struct.unpack("=i", told.read(4))[0] for _ in range(n)]
            assert struct.unpack("=i", told.read(4))[0] == 1  # every child is in its loop
            pidfds = [os.pidfd_open(pid) for pid in children]
            os.kill(parent, signal.SIGKILL)
    finally:
        os.waitpid(parent, 0)
    try:
        poll = select.poll()
        for pidfd in pidfds:
            poll.register(pidfd, select.POLLIN)
        exited: set[int] = set()
        while len(exited) < n:
            ready = poll.poll(SOON * 1000)
            assert ready, "a child of the killed parent is still waiting"
            for fd, _ in ready:
                exited.add(fd)
                poll.unregister(fd)
    finally:
        for pidfd in pidfds:
            os.close(pidfd)
