"""A pre-fork asyncio TCP server: a parent, N workers, one listening socket.

The parent binds 127.0.0.1 and starts the workers with aiosync.create_subprocess_exec,
passing them the socket and three kinds of shared objects (docs/children.md):

1. Start-up: a BarrierGroup, one Barrier per worker. Each worker warms its cache, then
   places and syncs; the parent says "ready" only once every worker synced. If one
   fails (it aborts) or dies, the parent aborts the others and names who failed.
2. Live configuration: a SeqRecord (version, response delay). The parent changes it
   halfway through the run; every request reads a consistent snapshot and answers
   with the version it used.
3. Shutdown: the parent places one more barrier, meaning "drain". Each worker stops
   accepting, closes its idle connections, finishes the busy ones and completes its
   Completion ("drained"); the parent waits with a timeout and kills stragglers.
   A worker whose parent dies sees its barrier wait return False and exits at once.

A built-in client drives the server (several connections, a few thousand requests),
then the parent shuts down and prints a summary.

    python examples/prefork_server.py                    # 4 workers, 3000 requests
    python examples/prefork_server.py --loop uvloop
    python examples/prefork_server.py --fail-worker 1    # worker 1's setup fails
    python examples/prefork_server.py --kill-worker 2    # worker 2 is killed in setup
    python examples/prefork_server.py --slow-drain 0     # worker 0 never drains

Exit status: 0 when every request was answered and the start-up succeeded (stragglers
killed at shutdown are reported, not an error); 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiosync

CONFIG = "qq"  # version, response delay in microseconds
FIRST_CONFIG = (1, 8000)
SECOND_CONFIG = (2, 4000)
SQUARES = 1000  # the "cache" each worker warms up: answers for n % SQUARES
ACCEPT_PAUSE = 0.005  # seconds a worker leaves the next pending connection to the others


# ---------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------


async def parent(args: argparse.Namespace) -> int:
    listener = socket.create_server(("127.0.0.1", 0), backlog=256)
    port = listener.getsockname()[1]
    n = args.workers
    with (
        listener,
        aiosync.BarrierGroup(n) as group,
        aiosync.SeqRecord(CONFIG) as cfg,
        contextlib.ExitStack() as stack,
    ):
        drained = [stack.enter_context(aiosync.Completion()) for _ in range(n)]
        cfg.write(*FIRST_CONFIG)
        procs = []
        for i in range(n):
            faults = []
            faults += ["--fail-setup"] if i == args.fail_worker else []
            faults += ["--kill-setup"] if i == args.kill_worker else []
            faults += ["--stuck-in-drain"] if i == args.slow_drain else []
            proc = await aiosync.create_subprocess_exec(
                sys.executable,
                __file__,
                "--worker",
                str(i),
                "--fd",
                str(listener.fileno()),
                "--loop",
                args.loop,
                *faults,
                pass_fds=[listener.fileno()],
                share={"gate": group[i], "cfg": cfg, "drained": drained[i]},
            )
            procs.append(proc)
        names = {proc.pid: f"worker {i} (pid {proc.pid})" for i, proc in enumerate(procs)}
        print(f"parent: 127.0.0.1:{port}, {n} workers starting", flush=True)

        try:
            async with asyncio.timeout(args.startup_timeout):
                result = await group.place_and_sync(abort_on_failure=True)
        except TimeoutError:
            group.abort()  # the stuck ones see it at their next wait
            result = await group.sync()
        if not result:
            for what, pids in [("aborted", result.aborted), ("died", result.died)]:
                for pid in pids:
                    print(f"parent: start-up failed: {names[pid]} {what}", flush=True)
            # The others synced before the failure was seen, or were stopped by the abort.
            for what, pids in [("had synced", result.synced), ("was stopped", result.stopped)]:
                for pid in pids:
                    print(f"parent: start-up aborted: {names[pid]} {what}", flush=True)
            await reap(procs, args.drain_timeout)
            return 1
        print(f"parent: ready: {n} workers synced (pids {list(result.synced)})", flush=True)

        stats = Stats()
        connections = await client_connect(port, args.connections)
        try:
            half = args.requests // 2
            await client_run(connections, 0, half, stats, args.requests)
            cfg.write(*SECOND_CONFIG)  # every request from here on sees version 2
            stats.say(f"parent: configuration changed to version {SECOND_CONFIG[0]}")
            await client_run(connections, half, args.requests, stats, args.requests)

            print("parent: asking the workers to drain", flush=True)
            group.place()  # the workers' wait_next() returns True: drain
            late = await wait_drained(drained, args.drain_timeout)
            for i in late:
                if procs[i].returncode is None:  # (one that died meanwhile is gone)
                    print(f"parent: {names[procs[i].pid]} did not drain: killed", flush=True)
                    with contextlib.suppress(ProcessLookupError):
                        procs[i].kill()
            await client_close(connections, stats, args.drain_timeout)
        finally:
            for conn in connections:
                conn.writer.close()
        statuses = await reap(procs, args.drain_timeout)

    stats.report(n, late)
    bad = [i for i, s in enumerate(statuses) if s != 0 and i not in late]
    for i in bad:
        print(f"parent: worker {i} exited with status {statuses[i]}")
    return 0 if stats.errors == 0 and not bad else 1


async def wait_drained(drained: Sequence[aiosync.Completion], grace: float) -> list[int]:
    """The workers that did not complete their "drained" Completion within `grace` s."""
    waits = [asyncio.ensure_future(done.wait()) for done in drained]
    await asyncio.wait(waits, timeout=grace)
    for wait in waits:
        wait.cancel()  # a cancelled Completion wait takes nothing
    return [i for i, wait in enumerate(waits) if not wait.done() or wait.cancelled()]


async def reap(procs: Sequence[asyncio.subprocess.Process], grace: float) -> list[int]:
    """Wait for every worker to exit, killing those still running after `grace` s."""
    statuses = []
    for proc in procs:
        try:
            async with asyncio.timeout(grace):
                statuses.append(await proc.wait())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):  # it may just have exited
                proc.kill()
            statuses.append(await proc.wait())
    return statuses


# ---------------------------------------------------------------------------------------
# The built-in client
# ---------------------------------------------------------------------------------------


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


@dataclass
class Stats:
    latencies: list[float] = field(default_factory=list)
    versions: Counter[int] = field(default_factory=Counter)
    workers: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    closed_by_server: int = 0
    started: float = field(default_factory=time.perf_counter)
    elapsed: float = 0.0
    shown: int = 0
    in_place: bool = False  # a progress line is on the terminal, not ended yet

    def say(self, text: str) -> None:
        """Print a line of its own, below the progress line if one is showing."""
        if self.in_place:
            print()
            self.in_place = False
        print(text, flush=True)

    def progress(self, total: int) -> None:
        done = len(self.latencies) + self.errors
        if sys.stdout.isatty():
            if done % 100 == 0 or done == total:
                print(f"\rclient: {done}/{total} requests", end="", flush=True)
                self.in_place = done != total
                if done == total:
                    print()
        elif done * 4 // total != self.shown:  # every quarter
            self.shown = done * 4 // total
            print(f"client: {done}/{total} requests", flush=True)

    def report(self, workers: int, killed: Sequence[int]) -> None:
        ms = sorted(x * 1000 for x in self.latencies)
        p50 = statistics.median(ms) if ms else float("nan")
        p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))] if ms else float("nan")
        total = len(ms) + self.errors
        rate = total / self.elapsed if self.elapsed else 0.0
        print(
            f"summary: {total} requests in {self.elapsed:.2f} s ({rate:.0f}/s), "
            f"{self.errors} errors"
        )
        print(f"latency: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
        seen = ", ".join(f"v{v}: {c}" for v, c in sorted(self.versions.items()))
        print(f"config versions seen: {seen}")
        per = ", ".join(f"{w}: {self.workers[w]}" for w in range(workers))
        print(f"requests per worker: {per}")
        names = ", ".join(f"worker {i}" for i in killed) or "none"
        print(f"shutdown: {workers - len(killed)} of {workers} workers drained; killed: {names}")
        print(f"connections closed by the workers: {self.closed_by_server}")


async def client_connect(port: int, count: int) -> list[Connection]:
    connections = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        connections.append(Connection(reader, writer))
    return connections


async def client_run(
    connections: Sequence[Connection], first: int, end: int, stats: Stats, total: int
) -> None:
    """Requests first..end-1, spread over the connections, each one sequential."""

    async def one_connection(conn: Connection, numbers: range) -> None:
        for number in numbers:
            start = time.perf_counter()
            try:
                conn.writer.write(b"%d\n" % number)
                answer = (await conn.reader.readline()).split()
                worker, version, echoed, square = (int(x) for x in answer)
            except (OSError, ValueError):
                stats.errors += 1
            else:
                if echoed != number or square != (number % SQUARES) ** 2:
                    stats.errors += 1
                else:
                    stats.latencies.append(time.perf_counter() - start)
                    stats.versions[version] += 1
                    stats.workers[worker] += 1
            stats.progress(total)

    step = len(connections)
    async with asyncio.TaskGroup() as tasks:
        for k, conn in enumerate(connections):
            tasks.create_task(one_connection(conn, range(first + k, end, step)))
    stats.elapsed = time.perf_counter() - stats.started


async def client_close(connections: Sequence[Connection], stats: Stats, grace: float) -> None:
    """After the drain: every connection a worker closed reads EOF."""
    for conn in connections:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(grace):
                if await conn.reader.read() == b"":
                    stats.closed_by_server += 1


# ---------------------------------------------------------------------------------------
# A worker
# ---------------------------------------------------------------------------------------


class Connections:
    """The worker's open connections, so that it can drain them."""

    def __init__(self) -> None:
        self.idle: set[asyncio.StreamWriter] = set()
        self.open = 0
        self.none_open = asyncio.Event()
        self.none_open.set()
        self.draining = False

    def drain(self) -> None:
        """Stop reading new requests; close connections waiting for one."""
        self.draining = True
        for writer in self.idle:
            writer.close()


async def worker(args: argparse.Namespace) -> int:
    # Ctrl-C reaches the whole process group; the parent decides what happens (if it
    # exits, our gate's wait returns False and we stop).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    shared = aiosync.inherited()
    gate, cfg, drained = shared["gate"], shared["cfg"], shared["drained"]
    assert isinstance(gate, aiosync.Barrier)
    assert isinstance(cfg, aiosync.SeqRecord)
    assert isinstance(drained, aiosync.Completion)
    index = args.worker
    with gate, cfg, drained, socket.socket(fileno=args.fd) as listener:
        # Set up: warm the cache (and the faults the tests ask for).
        if args.fail_setup:
            print(f"worker {index}: setup failed", file=sys.stderr, flush=True)
            gate.abort()  # the parent's start-up sync learns it at once
            return 2
        if args.kill_setup:
            os.kill(os.getpid(), signal.SIGKILL)
        squares = [i * i for i in range(SQUARES)]

        if not await gate.place_and_sync():
            return 3  # another worker failed: the parent aborted the start-up

        connections = Connections()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections.open += 1
            connections.none_open.clear()
            try:
                while not connections.draining:
                    connections.idle.add(writer)
                    line = await reader.readline()
                    connections.idle.discard(writer)
                    if not line:
                        break
                    number = int(line)
                    version, delay_us = await cfg.read()  # one consistent snapshot
                    await asyncio.sleep(delay_us / 1e6)
                    answer = (index, version, number, squares[number % SQUARES])
                    writer.write(b"%d %d %d %d\n" % answer)
                    await writer.drain()
            except (OSError, ValueError):
                pass  # a client that went away, or sent garbage: drop the connection
            finally:
                connections.idle.discard(writer)
                writer.close()
                connections.open -= 1
                if connections.open == 0:
                    connections.none_open.set()

        async def accept() -> None:
            # Every worker waits on the same listening socket and the kernel wakes them
            # all; the first to call accept() wins. asyncio.start_server would take every
            # pending connection at once, so accept one, then pause a moment: the other
            # workers get their turn at the connections still pending.
            loop = asyncio.get_running_loop()
            listener.setblocking(False)
            while True:
                conn, _ = await loop.sock_accept(listener)
                reader, writer = await asyncio.open_connection(sock=conn)
                handlers.add(asyncio.create_task(serve(reader, writer)))
                await asyncio.sleep(ACCEPT_PAUSE)

        handlers: set[asyncio.Task[None]] = set()
        accepting = asyncio.create_task(accept())
        # Serve until the parent places its "drain" barrier (True), or aborts or dies
        # (False): the same wait tells both.
        drain = await gate.wait_next()
        accepting.cancel()  # stop accepting
        if not drain:
            return 4  # the parent is gone: nobody to drain for
        if args.stuck_in_drain:
            await asyncio.Event().wait()  # stuck: the parent will kill us
        connections.drain()
        await connections.none_open.wait()
        drained.complete()
        return 0


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"], default="asyncio")
    parser.add_argument("--startup-timeout", type=float, default=10.0, metavar="SECONDS")
    parser.add_argument("--drain-timeout", type=float, default=2.0, metavar="SECONDS")
    parser.add_argument("--fail-worker", type=int, metavar="I", help="worker I's setup fails")
    parser.add_argument("--kill-worker", type=int, metavar="I", help="worker I dies in setup")
    parser.add_argument("--slow-drain", type=int, metavar="I", help="worker I never drains")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--fail-setup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kill-setup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stuck-in-drain", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None and not (args.workers >= 1 and args.requests >= 1):
        parser.error("--workers and --requests must be at least 1")
    side = worker if args.worker is not None else parent
    try:
        if args.loop == "uvloop":
            import uvloop

            return uvloop.run(side(args))
        return asyncio.run(side(args))
    except KeyboardInterrupt:  # the parent's Ctrl-C (workers ignore it)
        # Leaving parent() closed the group: every worker's gate wait returned False.
        print("\nparent: interrupted; the workers exit on their own", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
