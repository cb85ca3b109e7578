"""Barrier ``place_and_sync()`` round trip between a parent and a child process (docs/design.md §6).

Each repetition forks a child *before* any loop runs; parent and child then each run a
fresh loop of the same kind and do `ROUNDS` round trips in lockstep after a short
warm-up. The parent times its rounds. Three contenders, alternated repetition by
repetition, on asyncio and uvloop alike, with both processes pinned to CPU 0 and
unpinned:

* ``floor``: a minimal hand-written program on raw eventfds: each side writes its
  eventfd and then awaits the other's (symmetric, as ``place_and_sync()`` is), with one
  ``add_reader`` registration kept for the whole run (`_common.raw_place_and_sync`,
  which is also the children's side in bench_group). It does not use aiosync.
* ``aiosync``: ``await barrier.place_and_sync()``.
* ``mp.Barrier``: ``multiprocessing.Barrier(2).wait`` awaited through
  ``loop.run_in_executor`` with a one-thread executor in each process (fewer rounds:
  it is much slower).

Targets: aiosync <= 1.25 x the floor; mp.Barrier >= 4 x aiosync; aiosync on uvloop no
slower than on asyncio.

Usage: python -m benchmarks.bench_barrier [--quick] [--rounds N] [--repetitions N]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiosync import Barrier, Role

from ._common import (
    LOOP_KINDS,
    Contender,
    Step,
    alternate,
    cpu_label,
    pin,
    raw_place_and_sync,
    round_trip,
    table,
    verdict,
)
from ._results import Check, record

ROUNDS = 20_000
QUICK_ROUNDS = 2_000
REPETITIONS = 5
QUICK_REPETITIONS = 3
MP_SHARE = 4  # mp.Barrier runs ROUNDS // MP_SHARE round trips (it is far slower)


class RawFloor:
    """The hand-written floor: two raw eventfds, one reader kept for the whole run."""

    def __init__(self) -> None:
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.fds = (os.eventfd(0, flags), os.eventfd(0, flags))
        self.them = -1

    def side(self, parent: bool) -> Step:
        me, them = self.fds if parent else self.fds[::-1]
        self.them = them
        return raw_place_and_sync(me, them)

    def finish(self) -> None:
        asyncio.get_running_loop().remove_reader(self.them)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


class AiosyncBarrier:
    def __init__(self) -> None:
        self.barrier = Barrier()

    def side(self, parent: bool) -> Step:
        self.barrier.set_role(Role.PARENT if parent else Role.CHILD)
        return self.barrier.place_and_sync

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.barrier.close()


class MpBarrier:
    def __init__(self) -> None:
        self.barrier = multiprocessing.get_context("fork").Barrier(2)
        self.executor: ThreadPoolExecutor | None = None

    def side(self, parent: bool) -> Step:
        loop = asyncio.get_running_loop()
        executor = self.executor = ThreadPoolExecutor(max_workers=1)
        wait = self.barrier.wait

        def step() -> Awaitable[Any]:
            return loop.run_in_executor(executor, wait)

        return step

    def finish(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)  # no thread may outlive a repetition (fork)

    def close(self) -> None:
        pass


@dataclass
class Result:
    floor: float
    aiosync: float
    mp: float


def measure(pinned: bool, rounds: int, repetitions: int) -> dict[str, Result]:
    """Medians per loop kind, all six (loop, contender) pairs alternated."""
    makers: dict[str, tuple[Callable[[], Contender], int]] = {
        "floor": (RawFloor, rounds),
        "aiosync": (AiosyncBarrier, rounds),
        "mp": (MpBarrier, max(1, rounds // MP_SHARE)),
    }
    contenders = [
        (f"{kind}/{name}", _bind(make, kind, n))
        for kind in LOOP_KINDS
        for name, (make, n) in makers.items()
    ]
    pin(pinned)
    samples = {s.name: s for s in alternate(contenders, repetitions)}
    return {
        kind: Result(*(samples[f"{kind}/{name}"].median for name in makers)) for kind in LOOP_KINDS
    }


def _bind(make: Callable[[], Contender], kind: str, rounds: int) -> Callable[[], float]:
    return lambda: round_trip(make, kind, rounds)


def report(results: dict[bool, dict[str, Result]], rounds: int, repetitions: int) -> str:
    rows: list[list[object]] = []
    for pinned, per_kind in results.items():
        for kind, r in per_kind.items():
            over_floor = r.aiosync / r.floor
            vs_mp = r.mp / r.aiosync
            rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    r.floor,
                    r.aiosync,
                    r.mp,
                    over_floor,
                    verdict(over_floor, 1.25),
                    vs_mp,
                    verdict(vs_mp, 4, at_most=False),
                ]
            )
    main_table = table(
        f"Barrier place_and_sync() round trip, parent <-> child, us per round trip "
        f"(median of {repetitions}; {rounds} round trips, mp.Barrier {rounds // MP_SHARE})",
        [
            "cpus",
            "loop",
            "floor",
            "aiosync",
            "mp.Barrier",
            "aiosync/floor",
            "target",
            "mp/aiosync",
            "target",
        ],
        rows,
    )
    uv_rows: list[list[object]] = []
    for pinned, per_kind in results.items():
        ratio = per_kind["uvloop"].aiosync / per_kind["asyncio"].aiosync
        for kind, r in per_kind.items():
            checks = [
                Check("aiosync / floor", r.aiosync / r.floor, 1.25),
                Check("mp.Barrier / aiosync", r.mp / r.aiosync, 4, at_most=False),
            ]
            if kind == "uvloop":
                checks.append(Check("uvloop / asyncio", ratio, 1.0))
            record(
                "Barrier",
                "place_and_sync() round trip",
                f"{cpu_label(pinned)}, {kind}",
                "µs per round trip",
                {"floor": r.floor, "aiosync": r.aiosync, "mp.Barrier": r.mp},
                checks,
            )
        uv_rows.append(
            [
                cpu_label(pinned),
                per_kind["asyncio"].aiosync,
                per_kind["uvloop"].aiosync,
                ratio,
                verdict(ratio, 1.0),
            ]
        )
    uv_table = table(
        "aiosync on uvloop vs asyncio (us per round trip)",
        ["cpus", "asyncio", "uvloop", "uvloop/asyncio", "target"],
        uv_rows,
    )
    return f"{main_table}\n\n{uv_table}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_barrier")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help=f"round trips per repetition ({ROUNDS})")
    parser.add_argument("--repetitions", type=int, help=f"repetitions ({REPETITIONS})")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    repetitions = args.repetitions or (QUICK_REPETITIONS if args.quick else REPETITIONS)
    saved = os.sched_getaffinity(0)
    try:
        results = {pinned: measure(pinned, rounds, repetitions) for pinned in (True, False)}
    finally:
        os.sched_setaffinity(0, saved)
    print(report(results, rounds, repetitions), flush=True)


if __name__ == "__main__":
    main()
