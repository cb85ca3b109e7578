"""Lock and Semaphore across real processes: mutual exclusion under stress (fork and
multiprocessing spawn, tasks and a thread in each), ownership across fork, hand-offs,
fairness, sharing. Dead holders are in test_lock_faults.py."""

from __future__ import annotations

import asyncio
import mmap
import multiprocessing
import os
import random
import threading
from collections.abc import Callable, Coroutine
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support import PYTHON, SOON, Children, assert_blocks, loop_kind, reap, run_on, soon

import aiosync
from aiosync import Completion, Lock, Semaphore, WouldBlock

Primitive = Lock | Semaphore


def child_loop(kind: str, make: Callable[[], Coroutine[Any, Any, str]]) -> Callable[[], str]:
    """A child's body: run `make()` on a fresh loop of `kind`, report what it returns."""
    return lambda: run_on(kind, make())


# ---------------------------------------------------------------------------------------
# Shared memory the tests count in (not guarded by anything but the primitive under test)
# ---------------------------------------------------------------------------------------


class Shared:
    """A few 64-bit words in memory shared by every process that maps it: anonymous
    (inherited over fork) or a file's (mapped again by a spawned process).

    A word is read and written whole (one aligned 8-byte copy, through a memoryview
    cast to "q"), so a process may read a word while another one writes it and see
    the old or the new value. (``struct.pack_into`` clears the bytes before it writes
    them: a reader outside the lock could see 0.)"""

    WORDS = 8

    def __init__(self, path: Path | None = None) -> None:
        size = 8 * self.WORDS
        if path is None:
            self.mm = mmap.mmap(-1, size)
        else:
            if not path.exists():
                path.write_bytes(bytes(size))
            with path.open("r+b") as f:
                self.mm = mmap.mmap(f.fileno(), size)
        self.words = memoryview(self.mm).cast("q")

    def __getitem__(self, i: int) -> int:
        value: int = self.words[i]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        self.words[i] = value


COUNT, INSIDE = 0, 1


class Tokens:
    """At most `k` inside, checked atomically: a non-blocking pipe holding `k` bytes.
    Whoever is inside takes one byte and puts it back before leaving; a (k+1)-th
    process or thread inside finds the pipe empty."""

    def __init__(self, k: int, fifo: Path | None = None) -> None:
        if fifo is None:
            self.r, self.w = os.pipe2(os.O_NONBLOCK)
        else:  # a named pipe, for processes that do not inherit fds (spawn)
            if not fifo.exists():
                os.mkfifo(fifo)
            self.r = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
            self.w = os.dup(self.r)
        if k:
            os.write(self.w, b"t" * k)

    def enter(self) -> None:
        try:
            os.read(self.r, 1)
        except BlockingIOError:
            raise AssertionError("more holders inside than the semaphore has units") from None

    def leave(self) -> None:
        os.write(self.w, b"t")

    def left(self) -> int:
        data = b""
        try:
            while chunk := os.read(self.r, 4096):
                data += chunk
        except BlockingIOError:
            pass
        os.write(self.w, data)
        return len(data)

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def enter(mem: Shared, tokens: Tokens | None) -> int:
    """Inside the section: check that it is exclusive (at most k inside, with
    `tokens`), and read the count."""
    if tokens is not None:
        tokens.enter()
    else:
        assert mem[INSIDE] == 0
        mem[INSIDE] = 1
    return mem[COUNT]


def leave(mem: Shared, tokens: Tokens | None, count: int) -> None:
    """Write the count back, one more (a Lock's section); leave the section."""
    if tokens is not None:
        tokens.leave()
    else:
        mem[COUNT] = count + 1
        mem[INSIDE] = 0


def increment_blocking(obj: Primitive, mem: Shared, tokens: Tokens | None, rounds: int) -> None:
    """Read, yield the CPU, write: loses counts unless the section is exclusive."""
    for _ in range(rounds):
        assert obj.acquire_blocking(timeout=60)
        try:
            count = enter(mem, tokens)
            os.sched_yield()
            leave(mem, tokens, count)
        finally:
            obj.release()


async def increment(obj: Primitive, mem: Shared, tokens: Tokens | None, rounds: int) -> None:
    for _ in range(rounds):
        async with obj:
            count = enter(mem, tokens)
            await asyncio.sleep(0)
            leave(mem, tokens, count)


def tasks_and_a_thread(
    kind: str, obj: Primitive, mem: Shared, tokens: Tokens | None, rounds: int, tasks: int
) -> None:
    """One process's share of a stress test: `tasks` tasks on a loop and a thread."""
    errors: list[BaseException] = []

    def thread_main() -> None:
        try:
            increment_blocking(obj, mem, tokens, rounds)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=thread_main)
    thread.start()
    try:

        async def main() -> None:
            await asyncio.gather(*(increment(obj, mem, tokens, rounds) for _ in range(tasks)))

        run_on(kind, main())
    finally:
        thread.join(120)
    assert not thread.is_alive()
    if errors:
        raise errors[0]


# ---------------------------------------------------------------------------------------
# Mutual exclusion under stress
# ---------------------------------------------------------------------------------------


def test_lock_mutual_exclusion_forked_processes_tasks_and_threads(kind: str) -> None:
    processes, tasks, rounds = 3, 3, 150
    mem = Shared()
    with closing(Lock()) as lock, Children() as children:
        pids = [
            children.fork(lambda: tasks_and_a_thread(kind, lock, mem, None, rounds, tasks))
            for _ in range(processes)
        ]
        for pid in pids:
            children.collect(pid)
        assert mem[COUNT] == processes * (tasks + 1) * rounds
        assert not lock.locked()


def test_semaphore_at_most_k_inside_forked_processes_tasks_and_threads(kind: str) -> None:
    processes, tasks, rounds, k = 3, 3, 150, 3
    mem = Shared()
    tokens = Tokens(k)
    try:
        with closing(Semaphore(k)) as sem, Children() as children:
            pids = [
                children.fork(lambda: tasks_and_a_thread(kind, sem, mem, tokens, rounds, tasks))
                for _ in range(processes)
            ]
            for pid in pids:
                children.collect(pid)
            assert sem.value == k
            assert tokens.left() == k
    finally:
        tokens.close()


def spawned_worker(obj: Primitive, path: str, fifo: str | None, kind: str) -> None:
    mem = Shared(Path(path))
    tokens = None if fifo is None else Tokens(0, Path(fifo))
    try:
        tasks_and_a_thread(kind, obj, mem, tokens, 100, 2)
    finally:
        if tokens is not None:
            tokens.close()
        obj.close()


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_mutual_exclusion_multiprocessing_spawn(
    cls: type[Primitive], kind: str, tmp_path: Path
) -> None:
    k = 2
    path = tmp_path / "counter"
    mem = Shared(path)
    tokens = None if cls is Lock else Tokens(k, tmp_path / "tokens")
    fifo = None if tokens is None else str(tmp_path / "tokens")
    obj: Primitive = Lock() if cls is Lock else Semaphore(k)
    context: Any = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=spawned_worker, args=(obj, str(path), fifo, kind)) for _ in range(3)
    ]
    try:
        for p in processes:
            p.start()
        for p in processes:
            p.join(150)
            assert p.exitcode == 0
        if tokens is None:
            assert mem[COUNT] == 3 * 3 * 100
        else:
            assert tokens.left() == k
            assert isinstance(obj, Semaphore)
            assert obj.value == k
        assert not obj.locked()
    finally:
        for p in processes:
            reap(p)
            p.close()
        obj.close()
        if tokens is not None:
            tokens.close()


# ---------------------------------------------------------------------------------------
# Ownership across processes
# ---------------------------------------------------------------------------------------


def test_a_forked_child_does_not_hold_what_its_parent_holds() -> None:
    parent = os.getpid()
    with closing(Lock()) as lock, Children() as children:
        lock.acquire_nowait()

        def child() -> str:
            assert lock.locked()
            assert lock.owner_pid == parent
            with pytest.raises(RuntimeError):
                lock.release()
            with pytest.raises(RuntimeError):
                lock.mark_consistent()
            with pytest.raises(WouldBlock):
                lock.acquire_nowait()
            with pytest.raises(TimeoutError):
                lock.acquire_blocking(timeout=0.05)
            return "ok"

        assert children.collect(children.fork(child)) == "ok"
        # The child's exit did not take the parent's lock with it.
        assert lock.owner_pid == parent
        assert not lock.inconsistent
        lock.release()
        assert not lock.locked()


def test_a_forked_child_holds_no_unit_of_its_parent() -> None:
    with closing(Semaphore(2)) as sem, Children() as children:
        sem.acquire_nowait()

        def child() -> str:
            assert sem.value == 1
            with pytest.raises(ValueError, match="holds none of its units"):
                sem.release()
            sem.acquire_nowait()
            sem.release()
            return "ok"

        assert children.collect(children.fork(child)) == "ok"
        assert sem.value == 1
        sem.release()
        assert sem.value == 2


def test_a_forked_childs_waits_take_its_own_wait_queue_lock() -> None:
    """The fork happens while this process is inside the lock's wait-queue lock (as a
    thread in acquire() or release() may be): the child waits under its own lock, not
    under the parent's copy, which nobody in the child holds any more."""
    with closing(Lock()) as lock, Children() as children:
        lock.acquire_nowait()  # so that the child's acquire waits (its slow path)

        def child() -> str:
            outcome: list[str] = []

            def acquire() -> None:
                # Another thread than the one that forked: the parent's copy of the
                # queue's lock names the forking thread as its holder.
                try:
                    lock.acquire_blocking(timeout=0.05)
                except TimeoutError:
                    outcome.append("timed out")

            thread = threading.Thread(target=acquire)
            thread.start()
            thread.join(SOON)
            assert not thread.is_alive(), "the child waited for the parent's queue lock"
            return outcome[0]

        with lock._waitq.lock:
            pid = children.fork(child)
        assert children.collect(pid) == "timed out"
        lock.release()


def test_owner_pid_and_non_holder_release_across_processes(kind: str) -> None:
    with (
        closing(Lock()) as lock,
        Completion() as held,
        Completion() as go,
        Children() as children,
    ):

        def child() -> str:
            lock.acquire_blocking(timeout=SOON)
            held.complete()
            assert go.wait_blocking(timeout=SOON)
            lock.release()
            return "ok"

        pid = children.fork(child)
        assert held.wait_blocking(timeout=SOON)
        assert lock.locked()
        assert lock.owner_pid == pid
        with pytest.raises(RuntimeError):
            lock.release()
        with pytest.raises(WouldBlock):
            lock.acquire_nowait()

        async def wait_for_it() -> None:
            waiter = await assert_blocks(lock.acquire())
            go.complete()
            assert await soon(waiter) is True

        run_on(kind, wait_for_it())
        assert lock.owner_pid == os.getpid()
        assert not lock.inconsistent  # the child released before it exited
        children.collect(pid)
        lock.release()


def test_semaphore_units_across_processes(kind: str) -> None:
    k = 3
    with closing(Semaphore(k)) as sem, Completion() as held, Completion() as go:
        with Children() as children:

            def child() -> str:
                assert sem.acquire_blocking(timeout=SOON)
                held.complete()
                assert go.wait_blocking(timeout=SOON)
                sem.release()
                return "ok"

            pids = [children.fork(child) for _ in range(k)]
            for _ in range(k):
                assert held.wait_blocking(timeout=SOON)
            assert sem.value == 0
            assert sem.locked()
            with pytest.raises(WouldBlock):
                sem.acquire_nowait()
            with pytest.raises(ValueError, match="holds none of its units"):
                sem.release()  # the units are theirs, not ours

            async def wait_for_one() -> None:
                waiter = await assert_blocks(sem.acquire())
                go.complete()  # one child releases one unit
                assert await soon(waiter) is True

            run_on(kind, wait_for_one())
            go.complete()
            go.complete()
            for pid in pids:
                children.collect(pid)
        assert sem.value == k - 1
        sem.release()
        assert sem.value == k


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_hand_offs_between_processes_in_turn(cls: type[Primitive], kind: str) -> None:
    """Two processes take turns, strictly alternating through the lock alone: the one
    that releases queues again behind the other one (the line is FIFO across them)."""
    rounds = 200
    mem = Shared()
    with closing(cls()) as obj, Completion() as ready, Children() as children:

        def player(me: int) -> Callable[[], str]:
            async def play() -> str:
                ready.complete()
                for _ in range(rounds):
                    await obj.acquire()
                    mem[2 + me] += 1
                    mem[COUNT] += 1
                    obj.release()
                return "ok"

            return child_loop(kind, play)

        pids = [children.fork(player(i)) for i in range(2)]
        for pid in pids:
            children.collect(pid)
        assert mem[COUNT] == 2 * rounds
        assert (mem[2], mem[3]) == (rounds, rounds)
        assert not obj.locked()


# ---------------------------------------------------------------------------------------
# Fairness: no waiter starves while others keep taking the lock
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_a_third_process_gets_it_within_a_few_hand_offs(cls: type[Primitive], kind: str) -> None:
    """Two processes acquire and release flat out, counting their acquisitions (the
    hand-offs). A third one (this process) asks 50 times. Between the moment its acquire
    has queued (its first step ran) and the moment it holds the lock, at most the
    holder and one waiter of each other process can go first: 3 hand-offs at worst
    (the holder may not have counted its turn yet), however long the others hammer.
    A lock without the line (one that lets the releaser or a newcomer barge in) fails
    this at once: the two hammers never leave a gap. (The count is read here outside
    the lock while a hammer may be writing it: `Shared` reads and writes whole words.)"""
    mem = Shared()
    stop = 2
    obj = cls()
    worst: list[int] = []
    try:
        with Completion() as started, Children() as children:

            def hammer() -> str:
                async def main() -> str:
                    n = 0
                    while mem[stop] == 0:
                        await obj.acquire()
                        mem[COUNT] += 1
                        n += 1
                        if n == 20:
                            started.complete()
                        obj.release()
                    return str(n)

                return run_on(kind, main())

            pids = [children.fork(hammer) for _ in range(2)]
            assert started.wait_blocking(timeout=SOON)
            assert started.wait_blocking(timeout=SOON)

            async def ask() -> None:
                loop = asyncio.get_running_loop()
                await soon(obj.acquire())  # the first use, which sets up this process
                obj.release()
                for _ in range(50):
                    queued: list[int] = []
                    task = asyncio.ensure_future(obj.acquire())
                    # Runs right after the task's first step, in which it queued (or
                    # took the lock; then the count stands still).
                    loop.call_soon(lambda: queued.append(mem[COUNT]))  # noqa: B023
                    await soon(task)
                    worst.append(mem[COUNT] - queued[0])
                    obj.release()
                    await asyncio.sleep(0)

            try:
                run_on(kind, ask())
            finally:
                mem[stop] = 1
            for pid in pids:
                children.collect(pid)
    finally:
        obj.close()
    assert max(worst) <= 3, f"waited {sorted(worst)[-6:]} hand-offs"


# ---------------------------------------------------------------------------------------
# Sharing: create_subprocess_exec(share=...), multiprocessing
# ---------------------------------------------------------------------------------------

EXEC_CHILD = """
import asyncio, os, sys
import uvloop
import aiosync
shared = aiosync.inherited()
lock, sem, ready = shared["lock"], shared["sem"], shared["ready"]
assert type(lock) is aiosync.Lock and type(sem) is aiosync.Semaphore
assert lock.locked() and lock.owner_pid == os.getppid(), lock.owner_pid
assert sem.value == 1, sem.value
try:
    lock.acquire_nowait()
except aiosync.WouldBlock:
    pass
else:
    raise AssertionError("took a lock its parent holds")
try:
    lock.release()
except RuntimeError:
    pass
else:
    raise AssertionError("released a lock its parent holds")

async def main():
    sem.acquire_nowait()
    ready.complete()
    await asyncio.wait_for(lock.acquire(), 10)
    assert lock.owner_pid == os.getpid()
    assert not lock.inconsistent
    lock.release()
    sem.release()

factory = uvloop.new_event_loop if sys.argv[1] == "uvloop" else asyncio.new_event_loop
with asyncio.Runner(loop_factory=factory) as runner:
    runner.run(main())
lock.close(); sem.close(); ready.close()
print("done")
"""


async def test_shared_with_create_subprocess_exec() -> None:
    lock, sem = Lock(), Semaphore(2)
    try:
        with Completion() as ready:
            await lock.acquire()
            sem.acquire_nowait()
            proc = await aiosync.create_subprocess_exec(
                PYTHON,
                "-c",
                EXEC_CHILD,
                loop_kind(),
                share={"lock": lock, "sem": sem, "ready": ready},
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            try:
                await soon(ready.wait())
                assert sem.value == 0
                lock.release()
                out, err = await soon(proc.communicate())
                assert proc.returncode == 0, err.decode()
                assert out == b"done\n"
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        assert not lock.locked()
        assert not lock.inconsistent
        assert sem.value == 1
        sem.release()
        assert sem.value == 2
    finally:
        lock.close()
        sem.close()


def hold_until_told(lock: Lock, sem: Semaphore, held: Completion, go: Completion) -> None:
    assert lock.acquire_blocking(timeout=SOON)
    assert sem.acquire_blocking(timeout=SOON)
    assert lock.owner_pid == os.getpid()
    held.complete()
    assert go.wait_blocking(timeout=SOON)
    sem.release()
    lock.release()
    for obj in (lock, sem, held, go):
        obj.close()


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_multiprocessing_process_args(method: str) -> None:
    lock, sem = Lock(), Semaphore(1)
    try:
        with Completion() as held, Completion() as go:
            context: Any = multiprocessing.get_context(method)
            process = context.Process(target=hold_until_told, args=(lock, sem, held, go))
            process.start()
            try:
                assert held.wait_blocking(timeout=60)
                assert lock.owner_pid == process.pid
                assert sem.value == 0
                with pytest.raises(WouldBlock):
                    lock.acquire_nowait()
                go.complete()
                assert lock.acquire_blocking(timeout=SOON)
                assert sem.acquire_blocking(timeout=SOON)
                assert not lock.inconsistent
                process.join(30)
                assert process.exitcode == 0
            finally:
                reap(process)
                process.close()
            lock.release()
            sem.release()
    finally:
        lock.close()
        sem.close()


# ---------------------------------------------------------------------------------------
# Timeouts at random points, across processes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_timeouts_at_random_points_across_processes(cls: type[Primitive], kind: str) -> None:
    """Three processes, three tasks each, acquire under tiny random timeouts (so many a
    waiter is cancelled just as the lock is handed to it): every acquire that returned
    counted once inside an exclusive section, no cancelled one ever held it, and the
    lock ends free."""
    mem = Shared()
    with closing(cls()) as obj, Children() as children:

        def process(seed: int) -> Callable[[], str]:
            async def task(rng: random.Random) -> int:
                took = 0
                for _ in range(60):
                    try:
                        async with asyncio.timeout(rng.choice([0, 0.0002, 0.0005, 0.001, 0.003])):
                            await obj.acquire()
                    except TimeoutError:
                        continue
                    count = enter(mem, None)
                    await asyncio.sleep(0)
                    leave(mem, None, count)
                    took += 1
                    obj.release()
                return took

            async def main() -> str:
                rng = random.Random(seed)
                return str(sum(await asyncio.gather(*(task(rng) for _ in range(3)))))

            return child_loop(kind, main)

        pids = [children.fork(process(seed)) for seed in range(3)]
        took = sum(int(children.collect(pid)) for pid in pids)
        assert mem[COUNT] == took
        assert took > 0
        assert not obj.locked()
        obj.acquire_nowait()
        obj.release()
