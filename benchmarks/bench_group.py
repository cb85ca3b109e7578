"""BarrierGroup ``place_and_sync()`` with N children, against N Barriers gathered by hand.

Each repetition forks N children *before* any loop runs; child i takes member i of a
fresh `BarrierGroup` and does plain ``Barrier.place_and_sync()`` round trips. The parent
times the same number of rounds with one of two contenders, alternated repetition by
repetition, for N = 1, 4 and 16, on asyncio and uvloop, pinned to CPU 0 and unpinned:

* ``gather``: what a user writes without the group: place on every Barrier, then
  ``await asyncio.gather(*(b.sync() for b in barriers))`` (a task per child per round).
* ``group``: ``await group.place_and_sync()`` (one waiter per member, no tasks).

The children do identical work in both, so the difference is the parent's cost of
waiting on N barriers at once. Target (ours): the group no slower than the
hand-written gather (ratio <= 1).

Usage: python -m benchmarks.bench_group [--quick] [--rounds N] [--repetitions N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import traceback
from collections.abc import Awaitable, Callable

from aiosync import Barrier, BarrierGroup, Role

from ._common import LOOP_KINDS, alternate, cpu_label, pin, run_on, table, verdict
from ._results import Check, record

SIZES = (1, 4, 16)
ROUNDS = 4_000
QUICK_ROUNDS = 500
REPETITIONS = 5
QUICK_REPETITIONS = 3
WARMUP = 100
TARGET = 1.0

Sync = Callable[[BarrierGroup], Awaitable[bool]]


async def by_group(group: BarrierGroup) -> bool:
    return bool(await group.place_and_sync())


async def by_gather(group: BarrierGroup) -> bool:
    barriers = list(group)
    for barrier in barriers:
        barrier.place()
    return all(await asyncio.gather(*(b.sync() for b in barriers)))


CONTENDERS: dict[str, Sync] = {"gather": by_gather, "group": by_group}


async def _child(gate: Barrier, rounds: int) -> None:
    for _ in range(rounds):
        if not await gate.place_and_sync():
            raise RuntimeError("the parent's side aborted")


async def _parent(group: BarrierGroup, sync: Sync, rounds: int) -> float:
    for _ in range(WARMUP):
        await sync(group)
    start = time.perf_counter()
    for _ in range(rounds):
        if not await sync(group):
            raise RuntimeError("a child aborted")
    return time.perf_counter() - start


def run_group(n: int, kind: str, sync: Sync, rounds: int) -> float:
    """Fork `n` children and time `rounds` group syncs: microseconds per round."""
    group = BarrierGroup(n)
    pids: list[int] = []
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        for i in range(n):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child
                code = 0
                try:
                    for j, other in enumerate(group):
                        if j != i:
                            other.close()  # siblings' fds: not ours to hold
                    group[i].set_role(Role.CHILD)
                    run_on(kind, _child(group[i], WARMUP + rounds))
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            pids.append(pid)
            group.attach(i, pid)
        try:
            elapsed = run_on(kind, _parent(group, sync, rounds))
        except BaseException:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            raise
    finally:
        failed = [pid for pid in pids if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])]
        group.close()
    if failed:
        raise RuntimeError(f"benchmark children failed: {failed}")
    return elapsed / rounds * 1e6


def _runner(n: int, kind: str, sync: Sync, rounds: int) -> Callable[[], float]:
    return lambda: run_group(n, kind, sync, rounds)


def measure(pinned: bool, rounds: int, repetitions: int) -> list[list[object]]:
    pin(pinned)
    rows: list[list[object]] = []
    for n in SIZES:
        for kind in LOOP_KINDS:
            runs = [(name, _runner(n, kind, sync, rounds)) for name, sync in CONTENDERS.items()]
            samples = alternate(runs, repetitions)
            gather, group = (s.median for s in samples)
            ratio = group / gather
            rows.append([n, kind, gather, group, ratio, verdict(ratio, TARGET)])
            record(
                "BarrierGroup",
                "place_and_sync() with N children",
                f"N={n}, {cpu_label(pinned)}, {kind}",
                "µs per round",
                {"gather by hand": gather, "BarrierGroup": group},
                [Check("group / gather", ratio, TARGET)],
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_group")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repetitions")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--repetitions", type=int)
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    repetitions = args.repetitions or (QUICK_REPETITIONS if args.quick else REPETITIONS)
    saved = os.sched_getaffinity(0)
    try:
        for pinned in (True, False):
            rows = measure(pinned, rounds, repetitions)
            title = (
                f"BarrierGroup.place_and_sync() with N children, {cpu_label(pinned)} "
                f"(µs per round, median of {repetitions} x {rounds})"
            )
            header = ["N", "loop", "gather", "group", "group/gather", "target"]
            print(table(title, header, rows), end="\n\n", flush=True)
    finally:
        os.sched_setaffinity(0, saved)


if __name__ == "__main__":
    main()
