"""BarrierGroup ``place_and_sync()`` with N children, against a raw floor (docs/design.md §6).

A parent that starts N workers waits, round after round, until every one of them is
ready. Each repetition forks N children *before* any loop runs; then every process
runs a fresh loop of the same kind and does the same number of rounds in lockstep
after a warm-up, and the parent times its rounds. Two contenders, alternated
repetition by repetition, for N = 1, 4, 16 and 64, on asyncio and uvloop, with every
process pinned to CPU 0 and unpinned:

* ``floor``: a minimal hand-written parent on raw eventfds: it writes the N eventfds
  it shares with the children, then awaits the N the children write, with one
  ``add_reader`` registration per child kept for the whole run. It does not use
  aiosync.
* ``aiosync``: ``await group.place_and_sync()`` on a `BarrierGroup` of N members.

The children are the same program in both: the raw floor of one Barrier side
(`_common.raw_place_and_sync`: write my eventfd, await the parent's), on the member's
own eventfds when the parent uses a group. So the difference between the two is the
parent's cost of placing on N barriers and waiting for all of them. (The Barrier wire
protocol is systemd's: each side writes its own eventfd and reads the other's, so a
raw child is a valid peer of a Barrier.)

Larger groups take longer per round: a run does fewer rounds for larger N
(`ROUNDS`), stated in each figure's configuration. Pinned and unpinned are two
figures (a table and a chart row each: sixteen configurations would not fit one).

Target: aiosync <= 1.25 x the floor. The group used to be compared with a hand-written
``asyncio.gather()`` of N ``Barrier.sync()`` calls; that comparison is gone: the floor
is below it and is what the target is about.

Usage: python -m benchmarks.bench_group [--quick] [--repetitions N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from aiosync import BarrierGroup

from ._common import (
    LOOP_KINDS,
    Step,
    alternate,
    cpu_label,
    fork_child,
    pin,
    raw_place_and_sync,
    run_on,
    table,
    verdict,
)
from ._results import Check, record

ROUNDS = {1: 4_000, 4: 2_000, 16: 800, 64: 200}  # rounds per run, by N
QUICK_SHARE = 8  # --quick: ROUNDS // QUICK_SHARE
REPETITIONS = 5
QUICK_REPETITIONS = 3
TARGET = 1.25
# Each process watches the others' pidfds (below). valgrind has no pidfd_open, so
# `benchmarks.instructions` turns this off for its callgrind runs.
WATCH_PIDS = True


def warmup(rounds: int) -> int:
    return max(10, rounds // 10)


class Contender(Protocol):
    """What the parent of N children uses; the children are the same for every one."""

    def wires(self, n: int) -> list[tuple[int, int]]:
        """Before the fork: per child, (the eventfd the parent writes, the child's)."""

    def in_child(self, index: int) -> None:
        """In child `index`, right after the fork, before it runs."""

    def attach(self, index: int, pid: int) -> None:
        """In the parent: child `index` is process `pid`."""

    def side(self) -> Step:
        """The parent's round on the running loop."""

    def finish(self) -> None:
        """Undo `side` (still on the running loop)."""

    def close(self) -> None:
        """Release what `wires` made (after every child exited)."""


class RawGroupFloor:
    """The hand-written floor: N pairs of raw eventfds, one reader per child kept."""

    def __init__(self) -> None:
        self.pairs: list[tuple[int, int]] = []

    def wires(self, n: int) -> list[tuple[int, int]]:
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        for _ in range(n):
            self.pairs.append((os.eventfd(0, flags), os.eventfd(0, flags)))
        return self.pairs

    def in_child(self, index: int) -> None:
        pass

    def attach(self, index: int, pid: int) -> None:
        pass

    def side(self) -> Step:
        loop = asyncio.get_running_loop()
        mine = [me for me, _ in self.pairs]
        ahead = [0] * len(self.pairs)  # per child: my writes minus its writes I have read
        behind = 0  # children with ahead > 0: their write of this round is still unread
        waiter: asyncio.Future[None] | None = None

        def readable(i: int, fd: int) -> None:
            nonlocal behind
            try:
                value = os.eventfd_read(fd)
            except BlockingIOError:
                return
            was = ahead[i]
            ahead[i] = was - value
            if was > 0 >= ahead[i]:
                behind -= 1
                if not behind and waiter is not None and not waiter.done():
                    waiter.set_result(None)

        async def place_and_sync() -> None:
            nonlocal behind, waiter
            for i, fd in enumerate(mine):
                os.eventfd_write(fd, 1)
                ahead[i] += 1
                if ahead[i] == 1:
                    behind += 1
            if behind:
                waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    waiter = None

        for i, (_, theirs) in enumerate(self.pairs):
            loop.add_reader(theirs, readable, i, theirs)
        return place_and_sync

    def finish(self) -> None:
        loop = asyncio.get_running_loop()
        for _, theirs in self.pairs:
            loop.remove_reader(theirs)

    def close(self) -> None:
        for pair in self.pairs:
            for fd in pair:
                os.close(fd)
        self.pairs.clear()


class AiosyncGroup:
    """``await group.place_and_sync()``; each child speaks to its member's eventfds."""

    def __init__(self) -> None:
        self.group: BarrierGroup | None = None

    def wires(self, n: int) -> list[tuple[int, int]]:
        self.group = BarrierGroup(n)
        # Before a role is set, a Barrier's _me is the side that becomes the parent's.
        return [(b._me, b._them) for b in self.group]

    def in_child(self, index: int) -> None:
        assert self.group is not None
        self.group.child(index)  # closes the siblings' members (their pipes) here

    def attach(self, index: int, pid: int) -> None:
        assert self.group is not None
        self.group.attach(index, pid)

    def side(self) -> Step:
        group = self.group
        assert group is not None

        async def place_and_sync() -> None:
            if not await group.place_and_sync():
                raise RuntimeError("a child aborted or died")

        return place_and_sync

    def finish(self) -> None:
        pass

    def close(self) -> None:
        if self.group is not None:
            self.group.close()


async def _child(me: int, them: int, rounds: int, parent: int) -> None:
    """The raw side of one Barrier, the same in both contenders.

    It also watches the parent's pidfd (a silent fd), so that a parent killed mid-run
    leaves no child waiting for ever.
    """
    loop = asyncio.get_running_loop()
    watch = os.pidfd_open(parent) if WATCH_PIDS else -1  # ProcessLookupError if gone
    if watch >= 0:
        loop.add_reader(watch, os._exit, 1)
    step = raw_place_and_sync(me, them)
    try:
        for _ in range(warmup(rounds) + rounds):
            await step()
    finally:
        loop.remove_reader(them)
        if watch >= 0:
            loop.remove_reader(watch)
            os.close(watch)


def _child_life(
    contender: Contender, index: int, kind: str, me: int, them: int, rounds: int, parent: int
) -> None:
    """Child `index`, from the fork to its exit."""
    contender.in_child(index)
    run_on(kind, _child(me, them, rounds, parent))


async def _parent(contender: Contender, pids: Sequence[int], rounds: int) -> float:
    """Warm up, then time `rounds` rounds; seconds elapsed.

    A child that fails (or is killed) ends the run with an error instead of leaving the
    floor's parent waiting for ever: each child's pidfd is watched, in both contenders
    alike (a silent fd costs a loop nothing).
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    failed: list[int] = []

    def exited(pid: int, pidfd: int) -> None:
        loop.remove_reader(pidfd)
        status = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        if status is None:  # pragma: no cover - readable means it exited
            return
        if status.si_code != os.CLD_EXITED or status.si_status != 0:
            failed.append(pid)
            task.cancel()

    watched = pids if WATCH_PIDS else []
    pidfds = [os.pidfd_open(pid) for pid in watched]
    for pid, pidfd in zip(watched, pidfds, strict=True):
        loop.add_reader(pidfd, exited, pid, pidfd)
    step = contender.side()
    try:
        for _ in range(warmup(rounds)):
            await step()
        start = time.perf_counter()
        for _ in range(rounds):
            await step()
        return time.perf_counter() - start
    except asyncio.CancelledError:
        if failed:
            raise RuntimeError(f"benchmark children failed: {failed}") from None
        raise
    finally:
        contender.finish()
        for pidfd in pidfds:
            loop.remove_reader(pidfd)
            os.close(pidfd)


def run_group(make: Callable[[], Contender], n: int, kind: str, rounds: int) -> float:
    """Fork `n` children and time `rounds` rounds of the parent: microseconds per round."""
    contender = make()
    parent = os.getpid()
    pids: list[int] = []
    try:
        wires = contender.wires(n)
        for i, (parent_fd, child_fd) in enumerate(wires):
            life = (contender, i, kind, child_fd, parent_fd, rounds, parent)
            pid = fork_child(functools.partial(_child_life, *life))
            pids.append(pid)
            contender.attach(i, pid)
        try:
            elapsed = run_on(kind, _parent(contender, pids, rounds))
        except BaseException:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            raise
    finally:
        failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
        contender.close()
    if failed:
        raise RuntimeError(f"benchmark children failed: {failed}")
    return elapsed / rounds * 1e6


CONTENDERS: dict[str, Callable[[], Contender]] = {"floor": RawGroupFloor, "aiosync": AiosyncGroup}


def _runner(make: Callable[[], Contender], n: int, kind: str, rounds: int) -> Callable[[], float]:
    return lambda: run_group(make, n, kind, rounds)


def measure(pinned: bool, rounds: dict[int, int], repetitions: int) -> list[list[object]]:
    pin(pinned)
    rows: list[list[object]] = []
    for n, r in rounds.items():
        for kind in LOOP_KINDS:
            runs = [(name, _runner(make, n, kind, r)) for name, make in CONTENDERS.items()]
            floor, group = (s.median for s in alternate(runs, repetitions))
            ratio = group / floor
            rows.append([n, r, kind, floor, group, ratio, verdict(ratio, TARGET)])
            record(
                "BarrierGroup",
                f"place_and_sync() with N children, {cpu_label(pinned)}",
                f"N={n} ({r} rounds), {kind}",
                "µs per round",
                {"floor": floor, "aiosync": group},
                [Check("aiosync / floor", ratio, TARGET)],
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_group")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    parser.add_argument("--repetitions", type=int, help=f"repetitions ({REPETITIONS})")
    args = parser.parse_args(argv)
    rounds = {n: r // QUICK_SHARE if args.quick else r for n, r in ROUNDS.items()}
    repetitions = args.repetitions or (QUICK_REPETITIONS if args.quick else REPETITIONS)
    saved = os.sched_getaffinity(0)
    try:
        for pinned in (True, False):
            rows = measure(pinned, rounds, repetitions)
            title = (
                f"BarrierGroup.place_and_sync() with N children, {cpu_label(pinned)} "
                f"(µs per round, median of {repetitions} runs)"
            )
            header = ["N", "rounds", "loop", "floor", "aiosync", "aiosync/floor", "target"]
            print(table(title, header, rows), end="\n\n", flush=True)
    finally:
        os.sched_setaffinity(0, saved)


if __name__ == "__main__":
    main()
