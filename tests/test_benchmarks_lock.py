"""bench_lock's machinery with real forked processes, on both loops: no timing here.

What is checked: every uncontended contender runs and leaves no fd or thread behind;
two processes take strict turns through the Lock (every turn taken, none out of order
after the warm-up: a release hands the lock to the waiting process) and release every
fd; every acquire of every contending process is recorded; a side that dies holding
the lock, one that never takes a turn, and a contender that dies holding the lock (an
aiosync Lock is taken over, a multiprocessing.Lock is held for ever) each end the run
with an error instead of a hang; and a short run records the Lock and Semaphore
figures the report shows.
"""

from __future__ import annotations

import asyncio
import multiprocessing.resource_tracker
import os
import signal
import threading
from collections.abc import Awaitable, Callable

import pytest
from support import LOOP_KINDS

from benchmarks import _results, bench_lock, report
from benchmarks._common import WARMUP, forked_pair, run_on
from benchmarks.bench_lock import (
    CONTENDED_LOCKS,
    UNCONTENDED,
    AiosyncContended,
    Contended,
    LockTurns,
    MpContended,
    contend,
)


def open_fds(kind: str) -> set[str]:
    """This process's fds, once a loop of `kind` ran (uvloop's first loop keeps a pipe)."""
    run_on(kind, asyncio.sleep(0))
    return set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("name", UNCONTENDED)
def test_every_uncontended_contender_runs(name: str, kind: str) -> None:
    # From 3.14 a multiprocessing.Lock starts multiprocessing's resource tracker, whose
    # pipe stays open for the life of the process: start it first, it is not ours.
    multiprocessing.resource_tracker.ensure_running()
    before, threads = open_fds(kind), threading.active_count()
    timed, _ = UNCONTENDED[name]
    assert run_on(kind, timed(20)) > 0
    assert open_fds(kind) == before
    assert threading.active_count() == threads  # the executor's thread is gone


@pytest.mark.parametrize("kind", LOOP_KINDS)
def test_two_processes_take_strict_turns(kind: str) -> None:
    before = open_fds(kind)
    turns = LockTurns()
    try:
        elapsed = forked_pair(kind, lambda parent: turns.side(parent, WARMUP + 20))
        taken = turns.counts[0]
    finally:
        out_of_order = turns.close()
    assert elapsed > 0
    assert taken == 2 * (WARMUP + 20)
    assert out_of_order == 0
    assert open_fds(kind) == before


class DiesHolding(LockTurns):
    """The child takes the lock and is SIGKILLed holding it."""

    async def side(self, parent: bool, turns: int) -> float:
        if not parent:
            await self.lock.acquire()
            os.kill(os.getpid(), signal.SIGKILL)
        return await super().side(parent, turns)


class NeverTakesATurn(LockTurns):
    """The child fails before its first turn; the parent gives up after PATIENCE."""

    PATIENCE = 0.2

    async def side(self, parent: bool, turns: int) -> float:
        if not parent:
            raise RuntimeError("the child fails on purpose")
        return await super().side(parent, turns)


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize(
    ("make", "message"),
    [(DiesHolding, "died holding the lock"), (NeverTakesATurn, "took no turn")],
)
def test_a_side_that_stops_ends_the_run(make: type[LockTurns], message: str, kind: str) -> None:
    before = open_fds(kind)
    turns = make()
    try:
        with pytest.raises(RuntimeError, match=message):
            forked_pair(kind, lambda parent: turns.side(parent, WARMUP + 20))
    finally:
        turns.close()
    assert open_fds(kind) == before


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("name", CONTENDED_LOCKS)
def test_every_acquire_of_every_contender_is_recorded(name: str, kind: str) -> None:
    before = open_fds(kind)
    waits = contend(CONTENDED_LOCKS[name], kind, processes=4, acquires=30)
    assert len(waits.handoffs) == len(waits.micros) == 4 * 30
    assert min(waits.handoffs) >= 0
    assert min(waits.micros) >= 0
    assert open_fds(kind) == before


def dies_holding(make: Callable[[], Contended]) -> type[Contended]:
    """`make`'s lock, except that child 1 is SIGKILLed holding it at its 3rd acquire."""

    class DiesHolding(make):  # type: ignore[valid-type,misc]
        def in_child(
            self, index: int
        ) -> tuple[Callable[[], Awaitable[object]], Callable[[], None]]:
            acquire, release = super().in_child(index)
            acquired = 0

            async def acquire_and_die() -> object:
                nonlocal acquired
                got = await acquire()
                acquired += 1
                if index == 1 and acquired == 3:
                    os.kill(os.getpid(), signal.SIGKILL)
                return got

            return acquire_and_die, release

    return DiesHolding


@pytest.mark.parametrize("kind", LOOP_KINDS)
@pytest.mark.parametrize("make", [AiosyncContended, MpContended])
def test_a_contender_that_dies_holding_the_lock_ends_the_run(
    make: Callable[[], Contended], kind: str
) -> None:
    before = open_fds(kind)
    with pytest.raises(RuntimeError, match="benchmark contenders failed"):
        contend(dies_holding(make), kind, processes=4, acquires=30)
    assert open_fds(kind) == before


def test_a_short_run_records_what_the_report_shows() -> None:
    kept = list(_results.RECORDED)
    _results.RECORDED.clear()
    try:
        bench_lock.main(
            ["--rounds", "10", "--ops", "40", "--repetitions", "1", "--contended", "10"]
        )
        found = list(_results.RECORDED)
    finally:
        _results.RECORDED[:] = kept
    configs = [f"{cpus}, {kind}" for cpus in ("pinned", "unpinned") for kind in LOOP_KINDS]
    measures = {
        ("Lock", "acquire + release, uncontended, one process"),
        ("Lock", "hand-off between two processes taking turns"),
        ("Lock", "worst wait under contention of 4 processes, in hand-offs"),
        ("Lock", "wait under contention of 4 processes, wall clock"),
        ("Semaphore", "acquire + release, uncontended, one process"),
    }
    assert {(f.primitive, f.measure) for f in found} == measures
    for primitive, measure in measures:
        assert [f.config for f in found if (f.primitive, f.measure) == (primitive, measure)] == (
            configs
        )
    assert all(value >= 0 for f in found for value in f.values.values())
    text = report.tables(_results.merge({"runs": {}, "figures": []}, found, quick=True))
    assert text.index("### Lock: acquire + release") < text.index("### Semaphore")
    assert "| configuration | floor | aiosync | ratio (target) |" in text
