"""Shared pieces of the benchmarks: loops, CPU pinning, repetitions, tables.

Every benchmark reports ratios against baselines measured in the same run (docs/design.md §6):
alternate the contenders over several repetitions and compare medians.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import uvloop

T = TypeVar("T")

LOOP_KINDS = ("asyncio", "uvloop")


def new_loop(kind: str) -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if kind == "uvloop" else asyncio.new_event_loop()


def run_on(kind: str, coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=lambda: new_loop(kind)) as runner:
        return runner.run(coro)


def pin(pinned: bool) -> None:
    """Pin this process (and the children it forks later) to CPU 0, or to all CPUs."""
    cpus = {0} if pinned else set(range(os.cpu_count() or 1))
    os.sched_setaffinity(0, cpus)


def cpu_label(pinned: bool) -> str:
    return "pinned" if pinned else "unpinned"


@dataclass
class Samples:
    """Per-repetition measurements (microseconds per operation) of one contender."""

    name: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)


def alternate(
    contenders: Sequence[tuple[str, Callable[[], float]]], repetitions: int
) -> list[Samples]:
    """Run each contender once per repetition, alternating, so drift hits all alike.

    Each callable returns microseconds per operation for one repetition.
    """
    samples = [Samples(name) for name, _ in contenders]
    for _ in range(repetitions):
        for (_, fn), s in zip(contenders, samples, strict=True):
            s.values.append(fn())
    return samples


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns sized to fit."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, ""]
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(cell: object) -> str:
    if isinstance(cell, float):
        return f"{cell:.2f}"
    return str(cell)


def verdict(ratio: float, target: float, *, at_most: bool = True) -> str:
    ok = ratio <= target if at_most else ratio >= target
    sign = "<=" if at_most else ">="
    return f"{'met' if ok else 'MISSED'} ({sign} {target:g})"


# ---------------------------------------------------------------------------------------
# Round trips between a parent and a forked child
# ---------------------------------------------------------------------------------------

WARMUP = 200  # round trips before timing starts

Step = Callable[[], Awaitable[Any]]


def raw_place_and_sync(me: int, them: int) -> Step:
    """The raw floor of a Barrier's ``place_and_sync()``, one side, on the running loop.

    Write my eventfd, then await the peer's (symmetric: neither side waits for the
    other to go first), with one ``add_reader`` registration on ``them`` kept for the
    whole run: the caller removes it with ``loop.remove_reader(them)``. It does not use
    aiosync.
    """
    loop = asyncio.get_running_loop()
    ahead = 0  # eventfd writes of mine minus the peer's I have read
    waiter: asyncio.Future[None] | None = None

    def readable() -> None:
        nonlocal ahead
        try:
            ahead -= os.eventfd_read(them)
        except BlockingIOError:
            return
        if waiter is not None and ahead <= 0 and not waiter.done():
            waiter.set_result(None)

    async def place_and_sync() -> None:
        nonlocal ahead, waiter
        os.eventfd_write(me, 1)
        ahead += 1
        if ahead > 0:
            waiter = loop.create_future()
            try:
                await waiter
            finally:
                waiter = None

    loop.add_reader(them, readable)
    return place_and_sync


class Contender(Protocol):
    """Something both processes do in lockstep, one round trip per ``step()``."""

    def side(self, parent: bool) -> Step:
        """Prepare this process's side on the running loop; return its round-trip step."""

    def finish(self) -> None:
        """Undo `side` (still on the running loop)."""

    def close(self) -> None:
        """Release what the constructor made (in the parent, after the child exited)."""


async def _run_side(contender: Contender, parent: bool, rounds: int) -> float:
    """Warm up, then time `rounds` round trips; seconds elapsed."""
    step = contender.side(parent)
    try:
        for _ in range(WARMUP):
            await step()
        start = time.perf_counter()
        for _ in range(rounds):
            await step()
        return time.perf_counter() - start
    finally:
        contender.finish()


def round_trip(make: Callable[[], Contender], kind: str, rounds: int) -> float:
    """Fork a child, run both sides on fresh loops of `kind`: microseconds per round trip."""
    contender = make()
    try:
        elapsed = forked_pair(kind, lambda parent: _run_side(contender, parent, rounds))
    finally:
        contender.close()
    return elapsed / rounds * 1e6


def forked_pair(kind: str, side: Callable[[bool], Coroutine[Any, Any, T]]) -> T:
    """Fork a child and run ``side(False)`` in it, ``side(True)`` here, each on a fresh
    loop of `kind`; what the parent's side returned.

    A child that fails makes it raise; if the parent's side fails, the child is killed.
    """
    pid = fork_child(lambda: run_on(kind, side(False)))
    try:
        result = run_on(kind, side(True))
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed (status {status})")
    return result


def fork_child(body: Callable[[], object]) -> int:
    """Fork a child that runs `body` and exits: 0 if it returned, 1 if it raised (with
    the traceback on stderr). Its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            body()
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            os._exit(code)
    return pid
