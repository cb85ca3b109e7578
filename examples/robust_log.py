"""Worker processes append to one log file under a Lock; one is killed mid-record.

Each worker appends numbered records to a shared log, one record per hold of an
`aiosync.Lock`, written in two parts (a head, then a body: a process can die in
between). One worker is killed with SIGKILL after writing only the head of a record,
while it holds the lock. The lock does not stay held by the dead process: the next
worker to acquire it gets it with ``lock.inconsistent`` True, cuts the torn record
off the end of the log, calls ``lock.mark_consistent()`` and goes on. At the end the
parent checks the log: every record whole, each worker's records all there, in order.

The kill is made deterministic with two Completions. Half-way through its records,
each of the other workers completes "halfway" and waits for "torn"; the victim, once
every other worker is half-way, writes half a record (holding the lock) and completes
"torn" for good (`complete_all()`); the parent kills it only then. So the kill lands
in the middle of the run, and the others queue for the lock it holds.

    python examples/robust_log.py                     # 4 workers, worker 0 killed
    python examples/robust_log.py --forget-repair     # released while inconsistent
    python examples/robust_log.py --loop uvloop

With ``--forget-repair`` the worker that takes the lock over releases it without
repairing: the lock becomes unrecoverable, and every acquire since, in every process,
raises `aiosync.BrokenResourceError` naming the dead worker's pid.

Exit status: 0 if the log checks out and every surviving worker finished, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import re
import sys
import tempfile
from pathlib import Path

import aiosync

RECORD = re.compile(rb"w(\d+) (\d{4}) [0-9a-f]{32}\n")


async def parent(args: argparse.Namespace) -> int:
    with (
        tempfile.TemporaryDirectory() as tmp,
        contextlib.closing(aiosync.Lock()) as lock,  # `with lock:` is for acquiring: TypeError
        aiosync.Completion() as halfway,
        aiosync.Completion() as torn,
    ):
        log = Path(args.log) if args.log else Path(tmp) / "log"
        log.write_bytes(b"")
        half = args.records // 2
        print(
            f"parent: {args.workers} workers append {args.records} records each; "
            f"worker {args.kill} will be killed in the middle of its record {half + 1}"
        )
        workers = []
        for n in range(args.workers):
            flags = ["--tear"] if n == args.kill else []
            flags += ["--forget-repair"] if args.forget_repair else []
            proc = await aiosync.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                str(n),
                "--log",
                str(log),
                "--records",
                str(args.records),
                "--workers",
                str(args.workers),
                "--loop",
                args.loop,
                *flags,
                share={"lock": lock, "halfway": halfway, "torn": torn},
                stdout=asyncio.subprocess.PIPE,
            )
            workers.append(proc)
        victim = workers[args.kill]

        try:
            async with asyncio.timeout(args.timeout):
                await torn.wait()  # the victim holds the lock, half a record written
            print(f"parent: worker {args.kill} (pid {victim.pid}) is mid-record: SIGKILL")
            victim.kill()
            async with asyncio.timeout(args.timeout):
                outputs = [(await proc.communicate())[0] for proc in workers]
        except TimeoutError:
            print(f"parent: the workers did not finish within {args.timeout} s")
            for proc in workers:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            return 1

        for output in outputs:
            sys.stdout.write(output.decode())
        failed = [n for n, proc in enumerate(workers) if n != args.kill and proc.returncode != 0]
        if failed:
            print(f"parent: workers {', '.join(map(str, failed))} failed")

        expected = dict.fromkeys(range(args.workers), args.records)
        expected[args.kill] = half
        problems = check_log(log, expected)
        for problem in problems:
            print(f"parent: bad log: {problem}")
        if failed or problems:
            return 1
        total = sum(expected.values())
        print(
            f"parent: every record is whole: {total} records, {args.records} from each "
            f"worker and {half} from worker {args.kill}, which was killed"
        )
        return 0


async def worker(args: argparse.Namespace) -> int:
    shared = aiosync.inherited()
    lock, halfway, torn = shared["lock"], shared["halfway"], shared["torn"]
    assert isinstance(lock, aiosync.Lock)
    assert isinstance(halfway, aiosync.Completion)
    assert isinstance(torn, aiosync.Completion)
    n, half = args.worker, args.records // 2
    fd = open_log(Path(args.log))
    try:
        with contextlib.closing(lock), halfway, torn:
            for seq in range(1, args.records + 1):
                if seq == half + 1 and args.tear:
                    for _ in range(args.workers - 1):
                        await halfway.wait()  # one per other worker, half-way through
                elif seq == half + 1:
                    halfway.complete()
                    await torn.wait()  # the victim tore its record (all done: takes nothing)
                head, body = record(n, seq)
                async with lock:
                    if lock.inconsistent:
                        # The last holder died holding the lock: whatever it was writing
                        # may be half there. Repair, then say so.
                        if args.forget_repair:
                            print(f"worker {n}: took the lock over; releasing it unrepaired")
                        else:
                            cut = cut_torn_record(fd)
                            lock.mark_consistent()
                            print(f"worker {n}: took the lock over; cut {cut!r}; repaired")
                    os.write(fd, head)
                    if args.tear and seq == half + 1:
                        torn.complete_all()  # tell the parent: kill me now
                        await asyncio.Event().wait()  # SIGKILLed here, holding the lock
                    await asyncio.sleep(0)  # anything may happen between the two writes
                    os.write(fd, body)
    except aiosync.BrokenResourceError as exc:
        print(f"worker {n}: {type(exc).__name__}: {exc}", flush=True)
        return 1
    finally:
        os.close(fd)
    print(f"worker {n}: wrote {args.records} records")
    return 0


# The log: records of fixed form, "w<worker> <seq> <digest>\n", appended with O_APPEND.
# Tiny local file I/O, kept out of the coroutines: it never waits on anything.
def record(n: int, seq: int) -> tuple[bytes, bytes]:
    """The record `seq` of worker `n`, split in its two halves (head, body)."""
    digest = hashlib.sha256(f"{n} {seq}".encode()).hexdigest()[:32]
    line = f"w{n} {seq:04d} {digest}\n".encode()
    return line[: len(line) // 2], line[len(line) // 2 :]


def open_log(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)


def cut_torn_record(fd: int) -> bytes:
    """Truncate the log after its last whole record; return what was cut off."""
    data = os.pread(fd, os.fstat(fd).st_size, 0)  # pread ignores O_APPEND's offset
    keep = data.rfind(b"\n") + 1
    os.ftruncate(fd, keep)
    return data[keep:]


def check_log(path: Path, expected: dict[int, int]) -> list[str]:
    """What is wrong with the log: a line that is not a whole record, or a worker's
    records missing, doubled or out of order. An empty list when it checks out."""
    data = path.read_bytes()
    problems = []
    tail = data[data.rfind(b"\n") + 1 :]
    if tail:
        problems.append(f"ends inside a record: {tail!r}")
    seen = dict.fromkeys(expected, 0)
    for line in data[: len(data) - len(tail)].splitlines(keepends=True):
        match = RECORD.fullmatch(line)
        if match is None or int(match.group(1)) not in seen:
            problems.append(f"not a record: {line!r}")
            continue
        n, seq = int(match.group(1)), int(match.group(2))
        if seq != seen[n] + 1 or b"".join(record(n, seq)) != line:
            problems.append(f"worker {n}: {line!r} after its record {seen[n]}")
        seen[n] = seq
    problems += [
        f"worker {n}: {seen[n]} records, expected {count}"
        for n, count in expected.items()
        if seen[n] != count
    ]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--records", type=int, default=40, help="records per worker")
    parser.add_argument("--kill", type=int, default=0, metavar="N", help="the worker to kill")
    parser.add_argument(
        "--forget-repair",
        action="store_true",
        help="release the lock taken over without mark_consistent()",
    )
    parser.add_argument("--log", help="the log file (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait")
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--tear", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.workers < 2:
        parser.error("--workers must be >= 2 (one is killed)")
    if args.records < 2:
        parser.error("--records must be >= 2")
    if not 0 <= args.kill < args.workers:
        parser.error("--kill must name a worker: 0 <= N < --workers")
    side = worker if args.worker is not None else parent
    if args.loop == "uvloop":
        import uvloop

        return uvloop.run(side(args))
    return asyncio.run(side(args))


if __name__ == "__main__":
    sys.exit(main())
