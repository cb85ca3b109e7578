"""Completion: cross-process hand-off and complete_all() fan-out (SPEC §6).

1. ``complete()`` -> ``wait()`` hand-off between two processes, each completing for the
   other in turn (one Completion per direction), vs the floor: the same exchange
   hand-written on raw eventfds with one ``add_reader`` registration kept for the run.
   Target: aiosync <= 1.25 x the floor.
2. ``complete_all()`` waking 10,000 waiting tasks (until all have resumed) vs
   ``asyncio.Event.set()`` waking 10,000 tasks. Target: <= 2 x.

Both on asyncio and uvloop, with the processes pinned to CPU 0 and unpinned; contenders
alternate repetition by repetition; medians.

Usage: python -m benchmarks.bench_completion [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Callable, Coroutine
from functools import partial
from typing import Any

from aiosync import Completion

from ._common import LOOP_KINDS, alternate, cpu_label, pin, run_on, table, verdict

WAITERS = 10_000


def _forked(
    kind: str, parent: Callable[[], Coroutine[Any, Any, float]], child: Callable[[], Any]
) -> float:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child side
        code = 0
        try:
            run_on(kind, child())
        except BaseException:
            code = 1
        os._exit(code)
    try:
        return run_on(kind, parent())
    finally:
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError("benchmark child failed")


def floor_round_trip(kind: str, rounds: int) -> float:
    """µs per round trip on raw eventfds + add_reader (the hand-written floor)."""
    ab = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    ba = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)

    def side(me: int, them: int, first: bool) -> Callable[[], Coroutine[Any, Any, float]]:
        async def run() -> float:
            loop = asyncio.get_running_loop()
            got = 0
            waiter: asyncio.Future[None] | None = None

            def readable() -> None:
                nonlocal got
                got += os.eventfd_read(them)
                if waiter is not None and not waiter.done():
                    waiter.set_result(None)

            async def take() -> None:
                nonlocal got, waiter
                if not got:
                    waiter = loop.create_future()
                    await waiter
                    waiter = None
                got -= 1

            loop.add_reader(them, readable)
            start = time.perf_counter()
            for _ in range(rounds):
                if first:
                    os.eventfd_write(me, 1)
                    await take()
                else:
                    await take()
                    os.eventfd_write(me, 1)
            elapsed = time.perf_counter() - start
            loop.remove_reader(them)
            return elapsed / rounds * 1e6

        return run

    try:
        return _forked(kind, side(ab, ba, True), side(ba, ab, False))
    finally:
        os.close(ab)
        os.close(ba)


def aiosync_round_trip(kind: str, rounds: int) -> float:
    """µs per round trip with two Completions, one per direction."""
    with Completion() as ab, Completion() as ba:

        async def parent() -> float:
            start = time.perf_counter()
            for _ in range(rounds):
                ab.complete()
                await ba.wait()
            return (time.perf_counter() - start) / rounds * 1e6

        async def child() -> None:
            for _ in range(rounds):
                await ab.wait()
                ba.complete()

        return _forked(kind, parent, child)


def fan_out(kind: str, use_aiosync: bool) -> float:
    """µs from waking 10,000 waiting tasks until all of them resumed."""

    async def run() -> float:
        if use_aiosync:
            c = Completion()
            wait, wake = c.wait, c.complete_all
        else:
            event = asyncio.Event()
            wait, wake = event.wait, event.set  # type: ignore[assignment]
        tasks = [asyncio.ensure_future(wait()) for _ in range(WAITERS)]
        await asyncio.sleep(0)  # all parked
        start = time.perf_counter()
        wake()
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
        if use_aiosync:
            c.close()
        return elapsed * 1e6

    return run_on(kind, run())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_completion")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, reps = (2_000, 3) if args.quick else (10_000, 5)
    handoff_rows = []
    fan_rows = []
    for pinned in (True, False):
        pin(pinned)
        for kind in LOOP_KINDS:
            floor, ours = alternate(
                [
                    ("floor", partial(floor_round_trip, kind, rounds)),
                    ("aiosync", partial(aiosync_round_trip, kind, rounds)),
                ],
                reps,
            )
            ratio = ours.median / floor.median
            handoff_rows.append(
                [cpu_label(pinned), kind, floor.median, ours.median, ratio, verdict(ratio, 1.25)]
            )
            event, completion = alternate(
                [
                    ("Event.set", partial(fan_out, kind, False)),
                    ("complete_all", partial(fan_out, kind, True)),
                ],
                reps,
            )
            ratio = completion.median / event.median
            fan_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    event.median / 1000,
                    completion.median / 1000,
                    ratio,
                    verdict(ratio, 2.0),
                ]
            )
    pin(False)
    print(
        table(
            f"Completion complete() -> wait() round trip between two processes, µs "
            f"(median of {reps} x {rounds})",
            ["cpus", "loop", "floor", "aiosync", "aiosync/floor", "target"],
            handoff_rows,
        )
    )
    print()
    print(
        table(
            f"Waking {WAITERS:,} waiting tasks, ms (median of {reps})",
            ["cpus", "loop", "Event.set", "complete_all", "ratio", "target"],
            fan_rows,
        )
    )


if __name__ == "__main__":
    main()
