"""Completion: cross-process `complete()` -> `wait()` hand-off, `complete_all()` fan-out.

Targets and method: docs/design.md §6.

**Hand-off.** Each repetition forks a child *before* any loop runs; parent and child
then each run a fresh loop of the same kind and, after a short warm-up, do `ROUNDS`
round trips over two completions, one per direction: the parent completes ``ab`` and
awaits ``ba``; the child awaits ``ab`` and then completes ``ba``. The parent times its
rounds. Two contenders, alternated repetition by repetition, on asyncio and uvloop
alike, with both processes pinned to CPU 0 and unpinned:

* ``floor``: a minimal hand-written program on two raw eventfds: one ``add_reader``
  registration per process kept for the whole run, the eventfd read in the callback,
  which resolves the waiting future. It does not use aiosync.
* ``aiosync``: ``ab.complete()`` / ``await ba.wait()`` on two `aiosync.Completion`.

Target: aiosync <= 1.25 x the floor.

**Fan-out.** `WAITERS` tasks wait (all parked), then one call wakes them; timed from
that call until ``asyncio.gather`` of all of them returns. ``complete_all()`` on a
`Completion` vs ``asyncio.Event.set()``, alternated, each repetition on a fresh loop.
Target: complete_all() <= 2 x Event.set().

Usage: python -m benchmarks.bench_completion [--quick] [--rounds N] [--repetitions N]
       [--waiters N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiosync import Completion

from ._common import (
    LOOP_KINDS,
    Contender,
    Step,
    alternate,
    cpu_label,
    pin,
    round_trip,
    run_on,
    table,
    verdict,
)
from ._results import Check, record

ROUNDS = 20_000
QUICK_ROUNDS = 2_000
REPETITIONS = 5
QUICK_REPETITIONS = 3
WAITERS = 10_000

# -- 1. hand-off between two processes -------------------------------------------------


class RawFloor:
    """The hand-written floor: two raw eventfds, one reader per process kept for the run."""

    def __init__(self) -> None:
        flags = os.EFD_CLOEXEC | os.EFD_NONBLOCK
        self.ab = os.eventfd(0, flags)
        self.ba = os.eventfd(0, flags)
        self.inbox = -1

    def side(self, parent: bool) -> Step:
        outbox, inbox = (self.ab, self.ba) if parent else (self.ba, self.ab)
        self.inbox = inbox
        loop = asyncio.get_running_loop()
        available = 0  # completions read from inbox, not yet taken
        waiter: asyncio.Future[None] | None = None

        def readable() -> None:
            nonlocal available
            try:
                available += os.eventfd_read(inbox)
            except BlockingIOError:
                return
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        async def take() -> None:
            nonlocal available, waiter
            while not available:
                waiter = loop.create_future()
                try:
                    await waiter
                finally:
                    waiter = None
            available -= 1

        async def parent_step() -> None:
            os.eventfd_write(outbox, 1)
            await take()

        async def child_step() -> None:
            await take()
            os.eventfd_write(outbox, 1)

        loop.add_reader(inbox, readable)
        return parent_step if parent else child_step

    def finish(self) -> None:
        asyncio.get_running_loop().remove_reader(self.inbox)

    def close(self) -> None:
        os.close(self.ab)
        os.close(self.ba)


class AiosyncHandoff:
    def __init__(self) -> None:
        self.ab = Completion()
        self.ba = Completion()

    def side(self, parent: bool) -> Step:
        ab, ba = self.ab, self.ba

        async def parent_step() -> None:
            ab.complete()
            await ba.wait()

        async def child_step() -> None:
            await ab.wait()
            ba.complete()

        return parent_step if parent else child_step

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.ab.close()
        self.ba.close()


# -- 2. waking many tasks at once --------------------------------------------------------


async def _fan_out(use_aiosync: bool, waiters: int) -> float:
    """Microseconds from the wake-up call until all `waiters` tasks have resumed."""
    completion = Completion() if use_aiosync else None
    event = asyncio.Event()
    try:
        wait = completion.wait if completion is not None else event.wait
        tasks = [asyncio.ensure_future(wait()) for _ in range(waiters)]
        await asyncio.sleep(0)  # every task has run up to its wait and parked
        if any(t.done() for t in tasks):
            raise RuntimeError("a waiter got through before the wake-up")
        gc.collect()
        start = time.perf_counter()
        if completion is not None:
            completion.complete_all()
        else:
            event.set()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    finally:
        if completion is not None:
            completion.close()
    return elapsed * 1e6


def fan_out(kind: str, use_aiosync: bool, waiters: int) -> float:
    return run_on(kind, _fan_out(use_aiosync, waiters))


# -- measuring and reporting ------------------------------------------------------------


@dataclass
class Result:
    floor: float  # us per round trip
    aiosync: float
    event_set: float  # us to wake all waiters
    complete_all: float


def measure(pinned: bool, rounds: int, repetitions: int, waiters: int) -> dict[str, Result]:
    """Medians per loop kind, all (loop, contender) pairs of each part alternated."""
    handoff = [
        (f"{kind}/{name}", _bind_round_trip(make, kind, rounds))
        for kind in LOOP_KINDS
        for name, make in (("floor", RawFloor), ("aiosync", AiosyncHandoff))
    ]
    wake = [
        (f"{kind}/{name}", _bind_fan_out(kind, use_aiosync, waiters))
        for kind in LOOP_KINDS
        for name, use_aiosync in (("event_set", False), ("complete_all", True))
    ]
    pin(pinned)
    samples = {s.name: s.median for s in alternate(handoff, repetitions)}
    samples.update({s.name: s.median for s in alternate(wake, repetitions)})
    return {
        kind: Result(
            samples[f"{kind}/floor"],
            samples[f"{kind}/aiosync"],
            samples[f"{kind}/event_set"],
            samples[f"{kind}/complete_all"],
        )
        for kind in LOOP_KINDS
    }


def _bind_round_trip(make: Callable[[], Contender], kind: str, rounds: int) -> Callable[[], float]:
    return lambda: round_trip(make, kind, rounds)


def _bind_fan_out(kind: str, use_aiosync: bool, waiters: int) -> Callable[[], float]:
    return lambda: fan_out(kind, use_aiosync, waiters)


def report(
    results: dict[bool, dict[str, Result]], rounds: int, repetitions: int, waiters: int
) -> str:
    handoff_rows: list[list[object]] = []
    wake_rows: list[list[object]] = []
    for pinned, per_kind in results.items():
        for kind, r in per_kind.items():
            over_floor = r.aiosync / r.floor
            handoff_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    r.floor,
                    r.aiosync,
                    over_floor,
                    verdict(over_floor, 1.25),
                ]
            )
            over_event = r.complete_all / r.event_set
            config = f"{cpu_label(pinned)}, {kind}"
            record(
                "Completion",
                "complete() -> wait() hand-off",
                config,
                "µs per round trip",
                {"floor": r.floor, "aiosync": r.aiosync},
                [Check("aiosync / floor", over_floor, 1.25)],
            )
            record(
                "Completion",
                f"waking {waiters:,} waiting tasks",
                config,
                "ms",
                {"Event.set()": r.event_set / 1000, "complete_all()": r.complete_all / 1000},
                [Check("complete_all / Event.set", over_event, 2)],
            )
            wake_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    r.event_set / 1000,
                    r.complete_all / 1000,
                    over_event,
                    verdict(over_event, 2),
                ]
            )
    handoff_table = table(
        f"Completion complete() -> wait() round trip, parent <-> child (one Completion "
        f"per direction), us per round trip (median of {repetitions}; {rounds} round trips)",
        ["cpus", "loop", "floor", "aiosync", "aiosync/floor", "target"],
        handoff_rows,
    )
    wake_table = table(
        f"Waking {waiters:,} waiting tasks, ms from the call until gather() returns "
        f"(median of {repetitions})",
        ["cpus", "loop", "Event.set", "complete_all", "complete_all/Event", "target"],
        wake_rows,
    )
    return f"{handoff_table}\n\n{wake_table}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_completion")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help=f"round trips per repetition ({ROUNDS})")
    parser.add_argument("--repetitions", type=int, help=f"repetitions ({REPETITIONS})")
    parser.add_argument("--waiters", type=int, help=f"tasks woken at once ({WAITERS})")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    repetitions = args.repetitions or (QUICK_REPETITIONS if args.quick else REPETITIONS)
    waiters = args.waiters or WAITERS
    saved = os.sched_getaffinity(0)
    try:
        results = {
            pinned: measure(pinned, rounds, repetitions, waiters) for pinned in (True, False)
        }
    finally:
        os.sched_setaffinity(0, saved)
    print(report(results, rounds, repetitions, waiters), flush=True)


if __name__ == "__main__":
    main()
