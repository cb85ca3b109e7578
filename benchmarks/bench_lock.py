"""Lock and Semaphore: the cost of an uncontended acquire, a two-process hand-off, the
worst wait under contention (docs/design.md §6).

**Uncontended**, one process, one task: ``async with`` on a free `aiosync.Lock`
against ``async with`` on an ``asyncio.Lock``, and ``await acquire()`` + ``release()``
against the same calls on an ``asyncio.Lock`` (target: <= 3 x each); against
``multiprocessing.Lock`` acquired through ``loop.run_in_executor`` with a one-thread
executor and released in the loop's thread (what you would write without aiosync;
target: aiosync's calls >= 10 x faster); ``async with`` on an `aiosync.Semaphore(3)`
against ``asyncio.Semaphore(3)`` (<= 3 x). Each repetition runs on a fresh loop, a
tenth of the rounds as a warm-up.

**Hand-off.** Two processes take turns holding the Lock: a strict alternation driven
by the lock itself. In each process two tasks loop: acquire, check in a shared count
of turns that it is this process's turn (the count's parity says whose it is), bump
the count, release. While one task holds the lock the other waits for it, so each
process stays in the lock's line of waiting processes, and a release hands the lock to
the other process, which has waited longer: the hand-off is the only wait. (With one
task per side the releaser would have to queue again after its release, and the
process it woke, on the same CPU, runs first: it would find nobody waiting and take
the lock back out of turn.) Until both sides wait, a task can get the lock out of
turn: it yields the CPU while it holds it, so that the other side queues, and
releases. That happens only while the two start, in the warm-up; turns out of order
after it are counted and printed. The parent times its turns after a warm-up of
`_common.WARMUP`: a round trip is two hand-offs. The floor is the Completion
benchmark's raw eventfd + ``add_reader`` ping-pong on the same loop, which does not
use aiosync (`bench_completion.RawFloor`). Target: aiosync <= 1.25 x the floor.

**Contention.** `PROCESSES` processes, started together, each loop ``acquire()`` ->
critical section (bump a shared count of grants, yield the CPU and then the loop
once, so that the others queue even on one CPU) -> ``release()`` `CONTENDED` times.
Each acquire records how many grants to others passed while it waited (the shared
count read when it starts waiting and when it is granted) and how long it waited.
Reported: the p99 and the maximum in hand-offs. A line served oldest first bounds
them to ``PROCESSES - 1`` (each other process at most once) from the moment a process
joins the line; a process descheduled between reading the count and joining the line
can count more. Target: p99 <= ``PROCESSES - 1``. The median and p99 wait in µs are
for information; the same for ``multiprocessing.Lock`` through ``run_in_executor``,
which promises no order.

Everything runs on asyncio and uvloop, every process pinned to CPU 0 and unpinned, as
the other benchmarks do.

Usage: python -m benchmarks.bench_lock [--quick] [--rounds N] [--ops N]
       [--repetitions N] [--contended N]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import math
import mmap
import multiprocessing
import os
import signal
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from aiosync import Lock, Semaphore

from ._common import (
    LOOP_KINDS,
    WARMUP,
    alternate,
    cpu_label,
    fork_child,
    forked_pair,
    pin,
    round_trip,
    run_on,
    table,
    verdict,
)
from ._results import Check, record
from .bench_completion import RawFloor

ROUNDS = 20_000  # two-process round trips per repetition
QUICK_ROUNDS = 2_000
OPS = 50_000  # uncontended acquire + release per repetition
QUICK_OPS = 5_000
MP_SHARE = 20  # mp.Lock through the executor: OPS // MP_SHARE (it is far slower)
REPETITIONS = 5
QUICK_REPETITIONS = 3
PROCESSES = 4
CONTENDED = 2_000  # acquires per process under contention
QUICK_CONTENDED = 300

TARGET_OVER_ASYNCIO = 3.0
TARGET_MP = 10.0
TARGET_FLOOR = 1.25


def per_op(seconds: float, n: int) -> float:
    return seconds / n * 1e6


# -- 1. uncontended, one process ---------------------------------------------------------

Body = Callable[[int], Awaitable[None]]


async def _timed(body: Body, ops: int) -> float:
    """µs per round of `body` (which runs n rounds), after a warm-up of a tenth."""
    await body(max(1, ops // 10))
    start = time.perf_counter()
    await body(ops)
    return per_op(time.perf_counter() - start, ops)


async def uncontended(make: Callable[[], Any], calls: bool, ops: int) -> float:
    """µs per ``async with`` (or ``await acquire()`` + ``release()``, if `calls`) of a
    free lock or semaphore that `make` makes."""
    lock = make()
    acquire, release = lock.acquire, lock.release

    async def with_body(n: int) -> None:
        for _ in range(n):
            async with lock:
                pass

    async def calls_body(n: int) -> None:
        for _ in range(n):
            await acquire()
            release()

    try:
        return await _timed(calls_body if calls else with_body, ops)
    finally:
        if isinstance(lock, Lock | Semaphore):
            lock.close()


async def mp_lock(ops: int) -> float:
    lock = multiprocessing.Lock()
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1)
    acquire, release = lock.acquire, lock.release

    async def body(n: int) -> None:
        for _ in range(n):
            await loop.run_in_executor(executor, acquire)
            release()

    try:
        return await _timed(body, ops)
    finally:
        executor.shutdown(wait=True)  # no thread may outlive a repetition (fork)


def _semaphore_3() -> Semaphore:
    return Semaphore(3)


def _asyncio_semaphore_3() -> asyncio.Semaphore:
    return asyncio.Semaphore(3)


ASYNCIO_WITH, ASYNCIO_CALLS = "asyncio.Lock: async with", "asyncio.Lock: acquire() + release()"
WITH, CALLS = "aiosync: async with", "aiosync: acquire() + release()"
MP = "mp.Lock via executor"
ASYNCIO_SEM, SEM = "asyncio.Semaphore(3)", "Semaphore(3)"
# name -> (what it times, the share of OPS it runs); each form against the same form
UNCONTENDED: dict[str, tuple[Callable[[int], Coroutine[Any, Any, float]], int]] = {
    ASYNCIO_WITH: (functools.partial(uncontended, asyncio.Lock, False), 1),
    ASYNCIO_CALLS: (functools.partial(uncontended, asyncio.Lock, True), 1),
    WITH: (functools.partial(uncontended, Lock, False), 1),
    CALLS: (functools.partial(uncontended, Lock, True), 1),
    MP: (mp_lock, MP_SHARE),
    ASYNCIO_SEM: (functools.partial(uncontended, _asyncio_semaphore_3, False), 1),
    SEM: (functools.partial(uncontended, _semaphore_3, False), 1),
}
LOCK_CONTENDERS = (ASYNCIO_WITH, ASYNCIO_CALLS, WITH, CALLS, MP)


def _bind_uncontended(kind: str, name: str, ops: int) -> Callable[[], float]:
    timed, share = UNCONTENDED[name]
    return lambda: run_on(kind, timed(max(1, ops // share)))


# -- 2. two processes taking turns ---------------------------------------------------------


class LockTurns:
    """Two processes taking turns holding an `aiosync.Lock` (the module docstring)."""

    PATIENCE = 10.0  # s without a turn of the other side: it is gone

    def __init__(self) -> None:
        self.lock = Lock()
        self.memory = mmap.mmap(-1, mmap.PAGESIZE)  # shared with the forked child
        # [0]: turns taken by both sides; [1], [2]: the parent's and the child's turns
        # out of order after the warm-up.
        self.counts = memoryview(self.memory).cast("q")

    async def side(self, parent: bool, turns: int) -> float:
        """Take `turns` turns; seconds from the end of the warm-up to the last one."""
        lock, counts = self.lock, self.counts
        mine = 0 if parent else 1  # my turn when the count of turns has this parity
        taken = 0
        start = end = 0.0
        stalled: float | None = None  # since when the other side took no turn

        async def worker() -> None:
            nonlocal taken, start, end, stalled
            while taken < turns:
                await lock.acquire()
                if lock.inconsistent:
                    raise RuntimeError("the other side died holding the lock")
                if taken < turns and counts[0] % 2 == mine:
                    counts[0] += 1
                    taken += 1
                    if taken == WARMUP:
                        start = time.perf_counter()
                    elif taken == turns:
                        end = time.perf_counter()
                    stalled = None
                elif taken < turns:
                    # Out of turn: the other side was not waiting (it has not started,
                    # or it is gone). Let it run while I hold the lock, so that it
                    # queues, then release it.
                    if taken >= WARMUP:
                        counts[1 + mine] += 1
                    now = time.monotonic()
                    if stalled is None:
                        stalled = now
                    elif now - stalled > self.PATIENCE:
                        raise RuntimeError(f"the other side took no turn in {self.PATIENCE} s")
                    os.sched_yield()
                lock.release()

        try:
            async with asyncio.TaskGroup() as tasks:  # one waits while the other holds
                tasks.create_task(worker())
                tasks.create_task(worker())
        except BaseExceptionGroup as failed:
            raise failed.exceptions[0] from None
        return end - start

    def close(self) -> int:
        """Release everything; the turns out of order after the warm-up."""
        out_of_order = self.counts[1] + self.counts[2]
        self.counts.release()
        self.memory.close()
        self.lock.close()
        return out_of_order


def turns(kind: str, rounds: int) -> tuple[float, int]:
    """µs per round trip of `LockTurns`, and its turns out of order after the warm-up."""
    contender = LockTurns()
    try:
        elapsed = forked_pair(kind, lambda parent: contender.side(parent, WARMUP + rounds))
    finally:
        out_of_order = contender.close()
    return elapsed / rounds * 1e6, out_of_order


def _bind_floor(kind: str, rounds: int) -> Callable[[], float]:
    return lambda: round_trip(RawFloor, kind, rounds)


def _bind_turns(kind: str, rounds: int, tally: dict[str, int]) -> Callable[[], float]:
    """`turns` on loops of `kind`; adds its turns out of order to ``tally[kind]``."""

    def run() -> float:
        micros, out_of_order = turns(kind, rounds)
        tally[kind] += out_of_order
        return micros

    return run


# -- 3. the wait under contention ------------------------------------------------------------


class Contended(Protocol):
    """A lock that `PROCESSES` forked processes contend for."""

    def in_child(self, index: int) -> tuple[Callable[[], Awaitable[object]], Callable[[], None]]:
        """In child `index`, on its running loop: its (acquire, release)."""

    def finish(self) -> None:
        """In the child, after its last release (still on its loop)."""

    def close(self) -> None:
        """In the parent, after every child exited."""


class AiosyncContended:
    def __init__(self) -> None:
        self.lock = Lock()

    def in_child(self, index: int) -> tuple[Callable[[], Awaitable[object]], Callable[[], None]]:
        lock = self.lock

        async def acquire() -> None:
            await lock.acquire()
            if lock.inconsistent:
                raise RuntimeError("a contender died holding the lock")

        return acquire, lock.release

    def finish(self) -> None:
        pass

    def close(self) -> None:
        self.lock.close()


class MpContended:
    def __init__(self) -> None:
        self.lock = multiprocessing.get_context("fork").Lock()
        self.executor: ThreadPoolExecutor | None = None

    def in_child(self, index: int) -> tuple[Callable[[], Awaitable[object]], Callable[[], None]]:
        loop = asyncio.get_running_loop()
        executor = self.executor = ThreadPoolExecutor(max_workers=1)
        acquire = self.lock.acquire

        def acquire_in_executor() -> Awaitable[object]:
            return loop.run_in_executor(executor, acquire)

        return acquire_in_executor, self.lock.release

    def finish(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)

    def close(self) -> None:
        pass


CONTENDED_LOCKS: dict[str, Callable[[], Contended]] = {
    "aiosync": AiosyncContended,
    "mp.Lock": MpContended,
}


@dataclass
class Waits:
    """Every acquire of every process: grants to others meanwhile, and µs waited."""

    handoffs: list[int]
    micros: list[float]


async def _contend(
    contender: Contended, index: int, grants: memoryview, out: memoryview, acquires: int
) -> None:
    """Child `index`'s loop; per acquire, out[2i] = hand-offs, out[2i + 1] = ns waited."""
    acquire, release = contender.in_child(index)
    try:
        for i in range(acquires):
            before = grants[0]
            start = time.perf_counter_ns()
            await acquire()
            waited = time.perf_counter_ns() - start
            out[2 * i] = grants[0] - before
            out[2 * i + 1] = waited
            grants[0] += 1
            # The critical section lets the other processes run (and queue), on one CPU
            # too, and yields to the loop once.
            os.sched_yield()
            await asyncio.sleep(0)
            release()
    finally:
        contender.finish()


def contend(make: Callable[[], Contended], kind: str, processes: int, acquires: int) -> Waits:
    """Fork `processes` children that contend for one lock, started together.

    A child that fails ends the run with an error: the others are killed (a
    ``multiprocessing.Lock`` whose holder died is held for ever).
    """
    contender = make()
    memory = mmap.mmap(-1, 8 * (1 + 2 * processes * acquires))
    grants = memoryview(memory)[:8].cast("q")
    slots = memoryview(memory)[8:].cast("q")
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids: list[int] = []
    try:
        for n in range(processes):
            life = (contender, n, kind, grants, slots, acquires, (ready_r, ready_w, go_r, go_w))
            pid = fork_child(functools.partial(_contender_life, *life))
            pids.append(pid)
        os.close(ready_w)
        ready_w = -1
        started = 0
        while started < processes and (got := os.read(ready_r, processes)):
            started += len(got)
        os.write(go_w, b"g" * started)
        failed = _reap(pids)
        pids.clear()
        if failed or started < processes:
            raise RuntimeError(f"benchmark contenders failed: {failed}")
        values = slots.tolist()
        return Waits(values[0::2], [ns / 1000 for ns in values[1::2]])
    finally:
        for pid in pids:  # only if this process failed before reaping them
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        grants.release()
        slots.release()
        memory.close()
        contender.close()


def _contender_life(
    contender: Contended,
    index: int,
    kind: str,
    grants: memoryview,
    slots: memoryview,
    acquires: int,
    pipes: tuple[int, int, int, int],
) -> None:
    """Contender `index`, from the fork to its exit: ready, wait for the go, contend."""
    ready_r, ready_w, go_r, go_w = pipes
    os.close(ready_r)
    os.close(go_w)
    os.write(ready_w, b"r")
    os.close(ready_w)
    if os.read(go_r, 1) != b"g":
        raise RuntimeError("the benchmark's parent is gone")
    out = slots[2 * index * acquires : 2 * (index + 1) * acquires]
    run_on(kind, _contend(contender, index, grants, out, acquires))


def _reap(pids: list[int]) -> list[int]:
    """Wait for every child; at the first that failed, kill the others. The failed pids."""
    left, failed = set(pids), []
    while left:
        pid, status = os.wait()
        if pid not in left:  # pragma: no cover - not ours
            continue
        left.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(pid)
            for other in left:
                os.kill(other, signal.SIGKILL)
    return failed


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank `q`-th percentile (a value of `values`)."""
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q / 100 * len(ranked)) - 1)]


# -- measuring and reporting ---------------------------------------------------------------


@dataclass
class Result:
    uncontended: dict[str, float]  # contender -> µs per acquire + release
    floor: float  # µs per round trip
    turns: float
    out_of_order: int  # turns out of order after the warm-up, all repetitions
    waits: dict[str, Waits]  # contender -> every acquire's wait


def measure(
    pinned: bool, ops: int, rounds: int, repetitions: int, acquires: int
) -> dict[str, Result]:
    """Medians per loop kind, all (loop, contender) pairs of each part alternated."""
    pin(pinned)
    uncontended = [
        (f"{kind}/{name}", _bind_uncontended(kind, name, ops))
        for kind in LOOP_KINDS
        for name in UNCONTENDED
    ]
    out_of_order = dict.fromkeys(LOOP_KINDS, 0)
    handoff: list[tuple[str, Callable[[], float]]] = []
    for kind in LOOP_KINDS:
        handoff.append((f"{kind}/floor", _bind_floor(kind, rounds)))
        handoff.append((f"{kind}/turns", _bind_turns(kind, rounds, out_of_order)))
    samples = {s.name: s.median for s in alternate(uncontended, repetitions)}
    samples.update({s.name: s.median for s in alternate(handoff, repetitions)})
    return {
        kind: Result(
            {name: samples[f"{kind}/{name}"] for name in UNCONTENDED},
            samples[f"{kind}/floor"],
            samples[f"{kind}/turns"],
            out_of_order[kind],
            {
                name: contend(make, kind, PROCESSES, acquires)
                for name, make in CONTENDED_LOCKS.items()
            },
        )
        for kind in LOOP_KINDS
    }


def report(
    results: dict[bool, dict[str, Result]], ops: int, rounds: int, repetitions: int, acquires: int
) -> str:
    lock_rows: list[list[object]] = []
    sem_rows: list[list[object]] = []
    handoff_rows: list[list[object]] = []
    wait_rows: list[list[object]] = []
    bound = PROCESSES - 1
    for pinned, per_kind in results.items():
        for kind, r in per_kind.items():
            config = f"{cpu_label(pinned)}, {kind}"
            u = r.uncontended
            with_ratio = u[WITH] / u[ASYNCIO_WITH]
            calls_ratio = u[CALLS] / u[ASYNCIO_CALLS]
            mp_ratio = u[MP] / u[CALLS]
            lock_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    *(u[name] for name in LOCK_CONTENDERS),
                    with_ratio,
                    calls_ratio,
                    verdict(max(with_ratio, calls_ratio), TARGET_OVER_ASYNCIO),
                    mp_ratio,
                    verdict(mp_ratio, TARGET_MP, at_most=False),
                ]
            )
            record(
                "Lock",
                "acquire + release, uncontended, one process",
                config,
                "µs per acquire + release",
                {name: u[name] for name in LOCK_CONTENDERS},
                [
                    Check("async with / asyncio.Lock's", with_ratio, TARGET_OVER_ASYNCIO),
                    Check(
                        "acquire() + release() / asyncio.Lock's", calls_ratio, TARGET_OVER_ASYNCIO
                    ),
                    Check("mp.Lock / acquire() + release()", mp_ratio, TARGET_MP, at_most=False),
                ],
            )
            over_floor = r.turns / r.floor
            handoff_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    r.floor,
                    r.turns,
                    over_floor,
                    verdict(over_floor, TARGET_FLOOR),
                    r.out_of_order,
                ]
            )
            record(
                "Lock",
                "hand-off between two processes taking turns",
                config,
                "µs per round trip (two hand-offs)",
                {"floor": r.floor, "aiosync": r.turns},
                [Check("aiosync / floor", over_floor, TARGET_FLOOR)],
            )
            handoffs: dict[str, float] = {}
            micros: dict[str, float] = {}
            for name, w in r.waits.items():
                worst, p99 = max(w.handoffs), percentile([float(h) for h in w.handoffs], 99)
                median_us, p99_us = statistics.median(w.micros), percentile(w.micros, 99)
                handoffs |= {f"{name} p99": p99, f"{name} max": float(worst)}
                micros |= {f"{name} median": median_us, f"{name} p99": p99_us}
                wait_rows.append(
                    [cpu_label(pinned), kind, name, int(p99), worst, median_us, p99_us]
                )
            record(
                "Lock",
                f"worst wait under contention of {PROCESSES} processes, in hand-offs",
                config,
                "grants to others while one acquire waited",
                handoffs,
                [Check("aiosync p99", handoffs["aiosync p99"], bound)],
            )
            record(
                "Lock",
                f"wait under contention of {PROCESSES} processes, wall clock",
                config,
                "µs per acquire",
                micros,
            )
            sem_ratio = u[SEM] / u[ASYNCIO_SEM]
            sem_rows.append(
                [
                    cpu_label(pinned),
                    kind,
                    u[ASYNCIO_SEM],
                    u[SEM],
                    sem_ratio,
                    verdict(sem_ratio, TARGET_OVER_ASYNCIO),
                ]
            )
            record(
                "Semaphore",
                "acquire + release, uncontended, one process",
                config,
                "µs per acquire + release",
                {
                    "asyncio.Semaphore(3)": u[ASYNCIO_SEM],
                    "Semaphore(3)": u[SEM],
                },
                [Check("Semaphore / asyncio.Semaphore", sem_ratio, TARGET_OVER_ASYNCIO)],
            )
    lock_table = table(
        f"Lock acquire + release, uncontended, one process, us (median of {repetitions}; "
        f"{ops} rounds, mp.Lock {ops // MP_SHARE})",
        [
            "cpus",
            "loop",
            "asyncio with",
            "asyncio calls",
            "with",
            "calls",
            "mp.Lock",
            "with/asyncio",
            "calls/asyncio",
            "target",
            "mp/calls",
            "target",
        ],
        lock_rows,
    )
    sem_table = table(
        f"Semaphore(3) acquire + release, uncontended, one process, us (median of {repetitions})",
        ["cpus", "loop", "asyncio.Semaphore", "aiosync", "aiosync/asyncio", "target"],
        sem_rows,
    )
    handoff_table = table(
        f"Lock hand-off, two processes taking turns, us per round trip (median of "
        f"{repetitions}; {rounds} round trips)",
        ["cpus", "loop", "floor", "aiosync", "aiosync/floor", "target", "out of order"],
        handoff_rows,
    )
    wait_table = table(
        f"Wait under contention, {PROCESSES} processes x {acquires} acquires: hand-offs "
        f"waited (FIFO bound {bound}) and us",
        ["cpus", "loop", "lock", "p99", "max", "median us", "p99 us"],
        wait_rows,
    )
    return "\n\n".join((lock_table, sem_table, handoff_table, wait_table))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_lock")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--rounds", type=int, help=f"two-process round trips ({ROUNDS})")
    parser.add_argument("--ops", type=int, help=f"uncontended acquires ({OPS})")
    parser.add_argument("--repetitions", type=int, help=f"repetitions ({REPETITIONS})")
    parser.add_argument("--contended", type=int, help=f"acquires per process ({CONTENDED})")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    ops = args.ops or (QUICK_OPS if args.quick else OPS)
    repetitions = args.repetitions or (QUICK_REPETITIONS if args.quick else REPETITIONS)
    acquires = args.contended or (QUICK_CONTENDED if args.quick else CONTENDED)
    saved = os.sched_getaffinity(0)
    try:
        results = {
            pinned: measure(pinned, ops, rounds, repetitions, acquires) for pinned in (True, False)
        }
    finally:
        os.sched_setaffinity(0, saved)
    print(report(results, ops, rounds, repetitions, acquires), flush=True)


if __name__ == "__main__":
    main()
