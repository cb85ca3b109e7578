"""SeqRecord: read cost against an unsynchronized read and a locked one; writer throughput.

Same run, same record ("qqd"), alternating repetitions, medians (docs/design.md §6):

* reads, in one process with no write in progress: `read_nowait()` and `await read()`
  (asyncio and uvloop) against the floor, an unsynchronized ``struct.unpack_from`` of
  the same bytes of the same shared memory, and against the same unpack under a
  ``multiprocessing.Lock`` (what you would write without aiosync);
* the writer's throughput alone, and while two reader processes call `read_nowait()`
  flat out. "pinned" puts the writer alone on CPU 0 and both readers on CPU 1;
  "unpinned" lets the scheduler place the three processes on the machine's CPUs. The
  target is on the writer's rate per second of its own CPU time (contention, which
  readers must not cause, shows there; sharing a CPU with them does not); the rate per
  wall-clock second is shown beside it;
* the same writer's cost against its floor, an unsynchronized ``struct.pack_into`` of
  the same values into the same shared memory, alone (target: write() <= 1.5 x) and
  beside two unsynchronized readers (what any shared-memory writer pays).

Usage: python -m benchmarks seqc [--quick]
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import os
import struct
import time
from collections.abc import Callable

from aiosync import SeqRecord, WouldBlock

from . import _results
from ._common import LOOP_KINDS, alternate, cpu_label, pin, run_on, table, verdict
from ._results import Check

FORMAT = "qqd"
VALUES = (1, 2, 3.0)

# ---------------------------------------------------------------------------------------
# Read cost
# ---------------------------------------------------------------------------------------


def per_op(n: int, seconds: float) -> float:
    return seconds / n * 1e6


def read_contenders(record: SeqRecord, n: int) -> list[tuple[str, Callable[[], float]]]:
    memory = record._memory.map  # the record's own bytes: the floor reads the same memory
    unpack_from = struct.Struct(FORMAT).unpack_from
    offset = 16  # the payload follows the counter and the holder
    assert unpack_from(memory, offset) == record.read_nowait()
    lock = multiprocessing.Lock()

    def floor() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            unpack_from(memory, offset)
        return per_op(n, time.perf_counter() - t0)

    def nowait() -> float:
        read_nowait = record.read_nowait
        t0 = time.perf_counter()
        for _ in range(n):
            read_nowait()
        return per_op(n, time.perf_counter() - t0)

    def locked() -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            with lock:
                unpack_from(memory, offset)
        return per_op(n, time.perf_counter() - t0)

    def awaited(kind: str) -> Callable[[], float]:
        async def loop() -> float:
            read = record.read
            t0 = time.perf_counter()
            for _ in range(n):
                await read()
            return per_op(n, time.perf_counter() - t0)

        return lambda: run_on(kind, loop())

    return [
        ("unpack_from (floor)", floor),
        ("read_nowait()", nowait),
        *[(f"await read() {kind}", awaited(kind)) for kind in LOOP_KINDS],
        ("Lock + unpack_from", locked),
    ]


def bench_reads(pinned: bool, n: int, repetitions: int) -> list[list[object]]:
    pin(pinned)
    with SeqRecord(FORMAT) as record:
        record.write(*VALUES)
        samples = alternate(read_contenders(record, n), repetitions)
    floor = samples[0].median
    nowait = samples[1].median
    locked = samples[-1].median
    rows: list[list[object]] = []
    for s in samples:
        ratio = s.median / floor
        if s.name == "read_nowait()":
            target = verdict(ratio, 1.5)
        elif s.name.startswith("await read()"):
            target = verdict(ratio, 2.5)
        elif s.name.startswith("Lock"):
            target = f"read_nowait {locked / nowait:.2f} x faster: " + verdict(
                locked / nowait, 2.5, at_most=False
            )
        else:
            target = ""
        rows.append([cpu_label(pinned), s.name, s.median * 1000, ratio, target])
    medians = {s.name: s.median * 1000 for s in samples}
    checks = [Check("read_nowait / floor", nowait / floor, 1.5)]
    checks += [
        Check(f"{s.name.removeprefix('await read() ')} await read / floor", s.median / floor, 2.5)
        for s in samples
        if s.name.startswith("await read()")
    ]
    checks.append(Check("Lock read / read_nowait", locked / nowait, 2.5, at_most=False))
    _results.record(
        "SeqRecord",
        f'reading a "{FORMAT}" record, no writer active',
        cpu_label(pinned),
        "ns per read",
        medians,
        checks,
    )
    return rows


# ---------------------------------------------------------------------------------------
# Writer throughput, alone and with two readers going flat out
# ---------------------------------------------------------------------------------------

# Who runs beside the writer: nobody, two processes spinning without touching the
# record (the machine's own cost of running three processes), or two readers.
HELPERS = ("alone", "2 busy processes", "2 readers")


def helper_process(
    helper: str, record: SeqRecord, stop: mmap.mmap, ready_w: int, cpu: int | None
) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    os.write(ready_w, b"r")
    if helper == "2 busy processes":
        x = 0
        while not stop[0]:
            for _ in range(256):
                x += 1
    elif helper == "2 readers":
        read_nowait = record.read_nowait
        while not stop[0]:
            for _ in range(256):
                try:
                    read_nowait()
                except WouldBlock:
                    pass
    else:  # "2 unsynchronized readers"
        memory = record._memory.map
        unpack_from = struct.Struct(FORMAT).unpack_from
        while not stop[0]:
            for _ in range(256):
                unpack_from(memory, 16)


def write_for(write: Callable[[], None], seconds: float) -> tuple[float, float]:
    """Call `write` flat out for `seconds`; microseconds per call, wall and CPU time."""
    writes = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    deadline = wall0 + seconds
    while time.perf_counter() < deadline:
        for _ in range(1000):
            write()
        writes += 1000
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    return per_op(writes, wall), per_op(writes, cpu)


def beside(
    helper: str,
    record: SeqRecord,
    write: Callable[[], None],
    seconds: float,
    helper_cpu: int | None,
) -> tuple[float, float]:
    if helper == "alone":
        return write_for(write, seconds)
    stop = mmap.mmap(-1, mmap.PAGESIZE)
    ready_r, ready_w = os.pipe()
    pids = []
    try:
        for _ in range(2):
            pid = os.fork()
            if pid == 0:  # pragma: no cover - helper child
                try:
                    helper_process(helper, record, stop, ready_w, helper_cpu)
                finally:
                    os._exit(0)
            pids.append(pid)
        for _ in pids:
            os.read(ready_r, 1)
        return write_for(write, seconds)
    finally:
        stop[0] = 1
        for pid in pids:
            os.waitpid(pid, 0)
        os.close(ready_r)
        os.close(ready_w)
        stop.close()


def bench_writer(
    pinned: bool, seconds: float, repetitions: int, notes: list[str]
) -> list[list[object]]:
    if pinned and (os.cpu_count() or 1) < 2:
        return [["pinned", "(needs 2 CPUs)", "", "", "", "", "", ""]]
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {0} if pinned else set(range(os.cpu_count() or 1)))
    helper_cpu = 1 if pinned else None
    label = "pinned (w: CPU 0, r: CPU 1)" if pinned else "unpinned"
    runs = [
        ("write()", "alone"),
        ("write()", "2 busy processes"),
        ("write()", "2 readers"),
        ("pack_into (unsync.)", "alone"),
        ("pack_into (unsync.)", "2 unsynchronized readers"),
    ]
    walls: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    cpu_times: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
    try:
        with SeqRecord(FORMAT) as record:
            record_write = record.write
            pack_into = struct.Struct(FORMAT).pack_into
            memory = record._memory.map
            a, b, c = VALUES

            def seqrecord_write() -> None:
                record_write(a, b, c)

            def unsync_write() -> None:
                pack_into(memory, 16, a, b, c)

            for _ in range(repetitions):
                for run in runs:
                    write = seqrecord_write if run[0] == "write()" else unsync_write
                    wall, cpu = beside(run[1], record, write, seconds, helper_cpu)
                    walls[run].append(wall)
                    cpu_times[run].append(cpu)
    finally:
        os.sched_setaffinity(0, cpus)

    def median(xs: list[float]) -> float:
        return sorted(xs)[len(xs) // 2]

    rows: list[list[object]] = []
    for run in runs:
        alone = (run[0], "alone")
        ratio = median(cpu_times[alone]) / median(cpu_times[run])  # of throughputs
        wall_ratio = median(walls[alone]) / median(walls[run])
        target = verdict(ratio, 0.9, at_most=False) if run == ("write()", "2 readers") else ""
        rows.append(
            [
                label,
                run[0],
                run[1],
                median(cpu_times[run]) * 1000,
                median(walls[run]) * 1000,
                "" if run == alone else ratio,
                "" if run == alone else wall_ratio,
                target,
            ]
        )
    busy = median(cpu_times[("write()", "2 busy processes")])
    readers = median(cpu_times[("write()", "2 readers")])
    alone_time = median(cpu_times[("write()", "alone")])
    per_write = {
        "alone" if helper == "alone" else f"beside {helper}": median(cpu_times[("write()", helper)])
        * 1000
        for helper in HELPERS
    }
    unsync_alone = median(cpu_times[("pack_into (unsync.)", "alone")])
    per_write["pack_into alone"] = unsync_alone * 1000
    per_write["pack_into beside 2 unsync. readers"] = (
        median(cpu_times[("pack_into (unsync.)", "2 unsynchronized readers")]) * 1000
    )
    _results.record(
        "SeqRecord",
        "write() with readers going flat out",
        label,
        "ns per write (CPU time)",
        per_write,
        [
            Check("throughput beside 2 readers / alone", alone_time / readers, 0.9, at_most=False),
            Check("write() / pack_into, alone", alone_time / unsync_alone, 1.5),
        ],
    )
    notes.append(
        f"{label}: write() beside 2 readers runs at {busy / readers:.2f} x its rate "
        "beside 2 busy processes that do not read"
    )
    over_floor = alone_time / unsync_alone
    notes.append(
        f"{label}: write() alone costs {over_floor:.2f} x an unsynchronized pack_into "
        f"alone, {verdict(over_floor, 1.5)}"
    )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks seqc")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else 200_000
    repetitions = 3 if args.quick else 7
    seconds = 0.1 if args.quick else 0.3
    cpus = os.sched_getaffinity(0)
    try:
        read_rows = [row for pinned in (True, False) for row in bench_reads(pinned, n, repetitions)]
    finally:
        os.sched_setaffinity(0, cpus)
    print(
        table(
            f'SeqRecord("{FORMAT}") reads, no write in progress '
            f"({n} reads x {repetitions} repetitions, medians)",
            ["cpus", "read", "ns/read", "x floor", "target"],
            read_rows,
        )
    )
    print()
    notes: list[str] = []
    write_rows = [
        row
        for pinned in (True, False)
        for row in bench_writer(pinned, seconds, 3 if args.quick else 5, notes)
    ]
    print(
        table(
            "Writer throughput, alone vs beside 2 processes reading flat out "
            f"({seconds:g} s runs, medians)",
            ["cpus", "writer", "beside", "ns (cpu)", "ns (wall)", "x alone", "(wall)", "target"],
            write_rows,
        )
    )
    print("\n".join(["", *notes]))


if __name__ == "__main__":
    main()
