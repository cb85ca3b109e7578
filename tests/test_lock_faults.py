"""Lock and Semaphore when a process dies: SIGKILL of the holder (with and without
waiters), of a waiter, of the process the lock was just handed to, at random points of
a tight acquire/release loop; exit and exec of the holder; close() while holding; the
unrecoverable lock after a release without `mark_consistent()`; a grant to a process
whose waiters were all cancelled. Processes are real (fork before any loop runs here),
ordered by Completions and SIGSTOP, never by sleeps."""

from __future__ import annotations

import asyncio
import errno
import mmap
import os
import random
import resource
import signal
import struct
import time
from collections.abc import Callable, Coroutine
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from support import PYTHON, SOON, Children, assert_blocks, run_on, soon

from aiosync import BrokenResourceError, Completion, Lock, Semaphore, WouldBlock

Primitive = Lock | Semaphore


def owner(lock: Lock) -> int | None:
    """`lock.owner_pid`, read afresh (mypy would narrow the property between reads)."""
    return lock.owner_pid


def inconsistent(lock: Lock) -> bool:
    """`lock.inconsistent`, read afresh."""
    return lock.inconsistent


def child_loop(kind: str, make: Callable[[], Coroutine[Any, Any, str]]) -> Callable[[], str]:
    return lambda: run_on(kind, make())


def park_for_ever() -> None:  # pragma: no cover - runs in a child, which is killed
    while True:
        signal.pause()


def holder(obj: Primitive, held: Completion, units: int = 1) -> Callable[[], str]:
    """A child's body: take `units`, say so on `held`, and stay (until killed)."""

    def hold() -> str:  # pragma: no cover - killed
        for _ in range(units):
            assert obj.acquire_blocking(timeout=SOON)
        held.complete()
        park_for_ever()
        return "unreachable"

    return hold


def waiter(
    kind: str, obj: Primitive, parked: Completion, then: str = "release"
) -> Callable[[], str]:
    """A child's body: park one acquire, say so on `parked`, report what the acquire saw
    once it holds the lock: "inconsistent=<bool> mine=<bool>" (then release it, mark it
    consistent first if `then` is "repair", or keep it: "keep")."""

    async def wait() -> str:
        task = asyncio.ensure_future(obj.acquire())
        await asyncio.sleep(0)  # its first step runs: it queues
        assert not task.done()
        parked.complete()
        try:
            assert await soon(task) is True
        except BrokenResourceError as exc:
            return f"broken: {exc}"
        flag = isinstance(obj, Lock) and inconsistent(obj)
        mine = owner(obj) == os.getpid() if isinstance(obj, Lock) else True
        report = f"inconsistent={flag} mine={mine}"
        if then == "repair" and isinstance(obj, Lock):
            obj.mark_consistent()
        if then in ("release", "repair"):
            obj.release()
        return report

    return child_loop(kind, wait)


def take_over_from_a_killed_holder(lock: Lock, children: Children) -> int:
    """A child takes the lock and is SIGKILLed; this process takes it over
    (inconsistent). Returns the dead pid."""
    with Completion() as held:
        dead = children.fork(holder(lock, held))
        assert held.wait_blocking(timeout=SOON)
    children.kill(dead)
    assert lock.acquire_blocking(timeout=SOON)
    assert inconsistent(lock)
    return dead


def blocking_waiter(obj: Primitive, parked: Completion) -> Callable[[], str]:
    """`waiter` without a loop: acquire_blocking(), reported the same way (then released,
    repaired first)."""

    def wait() -> str:
        parked.complete()
        try:
            assert obj.acquire_blocking(timeout=SOON)
        except BrokenResourceError as exc:
            return f"broken: {exc}"
        flag = isinstance(obj, Lock) and inconsistent(obj)
        mine = owner(obj) == os.getpid() if isinstance(obj, Lock) else True
        if isinstance(obj, Lock):
            obj.mark_consistent()
        obj.release()
        return f"inconsistent={flag} mine={mine}"

    return wait


def in_poll(pid: int) -> None:
    """Wait (bounded) until process `pid` sleeps in poll(): a blocking acquire that
    found nothing to take. The kernel says where it sleeps, in /proc/PID/wchan."""
    deadline = time.monotonic() + SOON
    while "poll" not in Path(f"/proc/{pid}/wchan").read_text():
        assert time.monotonic() < deadline, f"process {pid} never blocked in poll"
        time.sleep(0.001)


def stop(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    _, status = os.waitpid(pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status)


# ---------------------------------------------------------------------------------------
# The holder dies
# ---------------------------------------------------------------------------------------


def test_holder_killed_a_waiter_in_another_process_takes_over(kind: str) -> None:
    with (
        closing(Lock()) as lock,
        Completion() as held,
        Completion() as parked,
        Children() as children,
    ):
        dead = children.fork(holder(lock, held))
        assert held.wait_blocking(timeout=SOON)
        taker = children.fork(waiter(kind, lock, parked, then="repair"))
        assert parked.wait_blocking(timeout=SOON)
        assert owner(lock) == dead
        children.kill(dead)
        assert children.collect(taker) == "inconsistent=True mine=True"
        # It repaired before releasing: the next one gets a consistent lock.
        lock.acquire_nowait()
        assert not inconsistent(lock)
        lock.release()


def test_holder_killed_the_waiter_here_takes_over(kind: str) -> None:
    with closing(Lock()) as lock, Completion() as held, Children() as children:
        dead = children.fork(holder(lock, held))
        assert held.wait_blocking(timeout=SOON)

        async def take_over() -> None:
            task = await assert_blocks(lock.acquire())
            assert not inconsistent(lock)  # held by a live process
            children.kill(dead)
            assert await soon(task) is True
            assert inconsistent(lock)
            assert owner(lock) == os.getpid()
            assert lock.locked()
            assert repr(lock) == f"<aiosync.Lock locked by pid {os.getpid()} inconsistent>"
            lock.mark_consistent()
            assert not inconsistent(lock)
            lock.release()

        run_on(kind, take_over())
        lock.acquire_nowait()
        assert not inconsistent(lock)
        lock.release()


def die_holding(lock: Lock, held: Completion, death: str) -> Callable[[], str]:
    def child() -> str:  # pragma: no cover - runs in the child
        assert lock.acquire_blocking(timeout=SOON)
        if death == "exit":
            held.complete()
            os._exit(0)
        if death == "close":
            lock.close()  # while holding: the lock is given up as by a death
        held.complete()
        park_for_ever()
        return "unreachable"

    return child


@pytest.mark.parametrize("death", ["sigkill", "exit", "close"])
@pytest.mark.parametrize("how", ["acquire", "acquire_nowait", "acquire_blocking"])
def test_holder_gone_with_no_waiter_a_later_acquire_takes_over(
    death: str, how: str, kind: str
) -> None:
    with closing(Lock()) as lock, Completion() as held, Children() as children:
        dead = children.fork(die_holding(lock, held, death))
        assert held.wait_blocking(timeout=SOON)
        if death == "sigkill":
            children.kill(dead)
        elif death == "exit":
            children.collect(dead)
        if how == "acquire":
            assert run_on(kind, soon(lock.acquire())) is True
        elif how == "acquire_nowait":
            # No waiting at all: the death is seen by the call itself (a closed lock's
            # holder may not be seen until its inotify event; then wait for it).
            if death == "close":
                assert lock.acquire_blocking(timeout=SOON)
            else:
                lock.acquire_nowait()
        else:
            assert lock.acquire_blocking(timeout=SOON) is True
        assert inconsistent(lock)
        assert owner(lock) == os.getpid()
        lock.mark_consistent()
        assert not inconsistent(lock)
        lock.release()
        lock.acquire_nowait()
        assert not inconsistent(lock)
        lock.release()


def test_inconsistent_is_seen_by_every_process(kind: str) -> None:
    with (
        closing(Lock()) as lock,
        Completion() as look,
        Completion() as seen,
        Children() as children,
    ):
        take_over_from_a_killed_holder(lock, children)

        def observer() -> str:
            # A process that never used the lock sees the state too.
            assert lock.locked()
            assert inconsistent(lock)
            assert owner(lock) == os.getppid()
            seen.complete()
            assert look.wait_blocking(timeout=SOON)
            assert lock.locked()
            assert not inconsistent(lock)
            return "ok"

        pid = children.fork(observer)
        assert seen.wait_blocking(timeout=SOON)
        lock.mark_consistent()
        look.complete()
        assert children.collect(pid) == "ok"
        lock.release()


# ---------------------------------------------------------------------------------------
# Unrecoverable: released while inconsistent
# ---------------------------------------------------------------------------------------


def test_release_without_mark_consistent_breaks_it_everywhere(kind: str) -> None:
    with closing(Lock()) as lock, Completion() as parked, Children() as children:
        dead = take_over_from_a_killed_holder(lock, children)
        other = children.fork(waiter(kind, lock, parked))  # pending when it breaks
        assert parked.wait_blocking(timeout=SOON)

        async def break_it() -> None:
            mine = await assert_blocks(lock.acquire())  # pending here too
            lock.release()  # without mark_consistent(): unrecoverable
            with pytest.raises(BrokenResourceError, match=str(dead)):
                await soon(mine)
            with pytest.raises(BrokenResourceError, match=str(dead)):
                await lock.acquire()

        run_on(kind, break_it())
        assert repr(lock) == f"<aiosync.Lock unrecoverable (pid {dead} died)>"
        report = children.collect(other)
        assert report.startswith("broken: "), report
        assert str(dead) in report, report
        with pytest.raises(BrokenResourceError, match=str(dead)):
            lock.acquire_nowait()
        with pytest.raises(BrokenResourceError, match=str(dead)):
            lock.acquire_blocking(timeout=SOON)

        def later() -> str:
            # A process that comes later, and every acquire variant, sees it broken.
            for call in (lock.acquire_nowait, lambda: lock.acquire_blocking(timeout=SOON)):
                with pytest.raises(BrokenResourceError, match=str(dead)):
                    call()

            async def main() -> None:
                with pytest.raises(BrokenResourceError, match=str(dead)):
                    await lock.acquire()

            run_on(kind, main())
            return "ok"

        assert children.collect(children.fork(later)) == "ok"


def test_every_waiter_pending_when_it_breaks_raises(kind: str) -> None:
    with closing(Lock()) as lock, Completion() as parked, Children() as children:
        dead = take_over_from_a_killed_holder(lock, children)
        others = []
        for _ in range(3):
            others.append(children.fork(waiter(kind, lock, parked)))
            assert parked.wait_blocking(timeout=SOON)
        lock.release()
        for pid in others:
            report = children.collect(pid)
            assert report.startswith("broken: "), report
            assert str(dead) in report, report


@pytest.mark.parametrize("then", ["holder killed", "broken", "released"])
def test_a_blocking_waiter_in_another_process(then: str) -> None:
    """A process blocked in acquire_blocking() (asleep in poll) is woken by each way
    the lock can change: taken over from a killed holder, broken, released."""
    with closing(Lock()) as lock, Completion() as parked, Children() as children:
        dead = None
        if then == "holder killed":
            with Completion() as held:
                dead = children.fork(holder(lock, held))
                assert held.wait_blocking(timeout=SOON)
        elif then == "broken":
            dead = take_over_from_a_killed_holder(lock, children)
        else:
            lock.acquire_nowait()
        pid = children.fork(blocking_waiter(lock, parked))
        assert parked.wait_blocking(timeout=SOON)
        in_poll(pid)
        if then == "holder killed":
            assert dead is not None
            children.kill(dead)
            assert children.collect(pid) == "inconsistent=True mine=True"
        elif then == "broken":
            lock.release()
            report = children.collect(pid)
            assert report.startswith("broken: "), report
            assert str(dead) in report, report
        else:
            lock.release()
            assert children.collect(pid) == "inconsistent=False mine=True"


# ---------------------------------------------------------------------------------------
# A waiter dies; the process the lock was handed to dies
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_a_killed_waiter_does_not_stop_the_others(cls: type[Primitive], kind: str) -> None:
    with closing(cls()) as obj, Completion() as parked, Children() as children:
        obj.acquire_nowait()
        first = children.fork(waiter(kind, obj, parked))
        assert parked.wait_blocking(timeout=SOON)
        second = children.fork(waiter(kind, obj, parked))
        assert parked.wait_blocking(timeout=SOON)
        children.kill(first)
        obj.release()
        assert children.collect(second) == "inconsistent=False mine=True"
        obj.acquire_nowait()
        obj.release()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
@pytest.mark.parametrize("next_waiter", ["in another process", "none"])
def test_the_process_it_was_handed_to_killed_passes_it_on(
    cls: type[Primitive], next_waiter: str, kind: str
) -> None:
    """The first in line is frozen (SIGSTOP) when the lock is released to it, and then
    SIGKILLed before it could run: it never held it, so the next one gets it consistent."""
    with closing(cls()) as obj, Completion() as parked, Children() as children:
        obj.acquire_nowait()
        handed = children.fork(waiter(kind, obj, parked))
        assert parked.wait_blocking(timeout=SOON)
        stop(handed)
        second = None
        if next_waiter != "none":
            second = children.fork(waiter(kind, obj, parked))
            assert parked.wait_blocking(timeout=SOON)
        obj.release()  # handed to the frozen process
        children.kill(handed)
        if second is not None:
            assert children.collect(second) == "inconsistent=False mine=True"
        assert obj.acquire_blocking(timeout=SOON)
        if isinstance(obj, Lock):
            assert not inconsistent(obj)
            assert owner(obj) == os.getpid()
        obj.release()


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_a_grant_to_a_process_whose_waiter_was_cancelled_is_passed_on(
    cls: type[Primitive], kind: str
) -> None:
    """The child's parked acquire is handed the lock and cancelled before its task
    resumes (as in test_completion_processes: the child is frozen while the lock is
    released and a "cancel" byte written; thawed, its loop sees both in one poll). The
    lock must go on to the next waiter, consistent."""
    cancel_r, cancel_w = os.pipe()
    try:
        with (
            closing(cls()) as obj,
            Completion() as parked,
            Children() as children,
        ):

            async def handed_then_cancelled() -> str:
                loop = asyncio.get_running_loop()
                take = asyncio.ensure_future(obj.acquire())
                await asyncio.sleep(0)
                assert not take.done()
                loop.add_reader(cancel_r, lambda: (loop.remove_reader(cancel_r), take.cancel()))
                parked.complete()
                try:
                    await soon(take)
                except asyncio.CancelledError:
                    return "cancelled"
                obj.release()  # it ran first after all: it held it, and gives it back
                return "took"

            obj.acquire_nowait()
            first = children.fork(child_loop(kind, handed_then_cancelled))
            assert parked.wait_blocking(timeout=SOON)
            second = children.fork(waiter(kind, obj, parked))
            assert parked.wait_blocking(timeout=SOON)
            stop(first)
            obj.release()
            os.write(cancel_w, b"x")
            os.kill(first, signal.SIGCONT)
            assert children.collect(first) == "cancelled"
            assert children.collect(second) == "inconsistent=False mine=True"
            obj.acquire_nowait()
            if isinstance(obj, Lock):
                assert not inconsistent(obj)
            obj.release()
    finally:
        os.close(cancel_r)
        os.close(cancel_w)


# ---------------------------------------------------------------------------------------
# Exec of the holder
# ---------------------------------------------------------------------------------------


PROGRAMS = {
    "sleep": ["/bin/sleep", "60"],
    "python": [PYTHON, "-c", "import time; time.sleep(60)"],
}


@pytest.mark.parametrize("fds", ["closed on exec", "inherited"])
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_exec_of_the_holder_is_a_death(program: str, fds: str, kind: str) -> None:
    with closing(Lock()) as lock, Completion() as held, Children() as children:

        def exec_holding() -> str:  # pragma: no cover - becomes another program
            assert lock.acquire_blocking(timeout=SOON)
            if fds == "inherited":
                # What share= would pass on: the new program inherits the lock's fds
                # (and never adopts them).
                _state, shared = lock._share(True)
                for fd in shared.values():
                    os.set_inheritable(fd, True)
            held.complete()
            argv = PROGRAMS[program]
            os.execv(argv[0], argv)

        pid = children.fork(exec_holding)
        assert held.wait_blocking(timeout=SOON)

        async def take_over() -> None:
            assert await soon(lock.acquire()) is True
            assert inconsistent(lock)
            assert owner(lock) == os.getpid()
            lock.mark_consistent()
            lock.release()

        run_on(kind, take_over())
        # The new program is alive all along (the pid did not die).
        os.kill(pid, 0)
        children.kill(pid)


# ---------------------------------------------------------------------------------------
# Semaphore: a dead process's units come back
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("death", ["sigkill", "exit", "exec"])
def test_units_of_a_dead_process_come_back(death: str, kind: str) -> None:
    with (
        closing(Semaphore(3)) as sem,
        Completion() as held,
        Completion() as go,
        Children() as children,
    ):

        def hold_two() -> str:  # pragma: no cover - dies
            assert sem.acquire_blocking(timeout=SOON)
            assert sem.acquire_blocking(timeout=SOON)
            held.complete()
            assert go.wait_blocking(timeout=SOON)
            if death == "exit":
                os._exit(0)
            if death == "exec":
                os.execv("/bin/sleep", ["/bin/sleep", "60"])
            park_for_ever()
            return "unreachable"

        pid = children.fork(hold_two)
        assert held.wait_blocking(timeout=SOON)
        sem.acquire_nowait()  # the last free unit
        assert sem.value == 0

        async def get_them_back() -> None:
            tasks = [asyncio.ensure_future(sem.acquire()) for _ in range(2)]
            await asyncio.sleep(0)
            if death == "sigkill":
                children.kill(pid)
            else:  # it exits, or the pid lives on as /bin/sleep
                go.complete()
            assert await soon(asyncio.gather(*tasks)) == [True, True]

        run_on(kind, get_them_back())
        assert sem.value == 0
        for _ in range(3):
            sem.release()
        assert sem.value == 3
        if death == "exec":
            children.kill(pid)


def test_units_of_a_killed_process_go_to_a_waiter_in_another_process(kind: str) -> None:
    with (
        closing(Semaphore(1)) as sem,
        Completion() as held,
        Completion() as parked,
        Children() as children,
    ):
        dead = children.fork(holder(sem, held))
        assert held.wait_blocking(timeout=SOON)
        taker = children.fork(waiter(kind, sem, parked))
        assert parked.wait_blocking(timeout=SOON)
        children.kill(dead)
        assert children.collect(taker) == "inconsistent=False mine=True"
        assert sem.value == 1


# ---------------------------------------------------------------------------------------
# SIGKILL at random points of a tight loop
# ---------------------------------------------------------------------------------------

TOTAL, DIRTY, STOP, SLOTS = 0, 1, 2, 3  # words of the shared record; SLOTS.. per process


class Record:
    """A record the lock guards: a total and per-process counts that must add up, and a
    dirty flag set for the length of every update. A consistent lock never shows it
    dirty or not adding up; an inconsistent one may, and its taker repairs it."""

    def __init__(self) -> None:
        self.mm = mmap.mmap(-1, 8 * 16)

    def __getitem__(self, i: int) -> int:
        value: int = struct.unpack_from("q", self.mm, 8 * i)[0]
        return value

    def __setitem__(self, i: int, value: int) -> None:
        struct.pack_into("q", self.mm, 8 * i, value)

    def update(self, slot: int) -> None:
        self[DIRTY] = 1
        self[TOTAL] += 1
        self[SLOTS + slot] += 1
        self[DIRTY] = 0

    def adds_up(self) -> bool:
        return self[DIRTY] == 0 and self[TOTAL] == sum(self[SLOTS + i] for i in range(4))

    def check_or_repair(self, lock: Lock) -> bool:
        """After an acquire: True if it had to repair."""
        if inconsistent(lock):
            self[TOTAL] = sum(self[SLOTS + i] for i in range(4))
            self[DIRTY] = 0
            lock.mark_consistent()
            return True
        assert self.adds_up(), "a consistent lock guards a torn record"
        return False


def survivor(
    kind: str, lock: Lock, rec: Record, slot: int, started: Completion
) -> Callable[[], str]:
    async def main() -> str:
        repairs = 0
        first = True
        while rec[STOP] == 0:
            await lock.acquire()
            repairs += rec.check_or_repair(lock)
            rec.update(slot)
            await asyncio.sleep(0)
            lock.release()
            if first:
                started.complete()
                first = False
        return str(repairs)

    return child_loop(kind, main)


def victim(
    kind: str, lock: Lock, rec: Record, started: Completion, blocking: bool
) -> Callable[[], str]:
    def blocking_loop() -> str:  # pragma: no cover - killed
        first = True
        while True:
            assert lock.acquire_blocking(timeout=SOON)
            rec.check_or_repair(lock)
            rec.update(0)
            lock.release()
            if first:
                started.complete()
                first = False

    async def task(tell: bool) -> None:
        while True:
            await lock.acquire()
            rec.check_or_repair(lock)
            rec.update(0)
            await asyncio.sleep(0)
            lock.release()
            if tell:
                started.complete()
                tell = False

    async def tasks() -> str:
        await asyncio.gather(task(True), task(False))
        return "unreachable"

    return blocking_loop if blocking else child_loop(kind, tasks)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_sigkill_at_random_points_of_a_tight_loop(kind: str) -> None:
    """Round after round, a process hammering the lock (blocking or with two tasks) is
    SIGKILLed at a random moment while two others hammer it too: whatever the point,
    the survivors go on (taking over and repairing when it died holding), and the
    record always adds up under a consistent lock."""
    rng = random.Random(4242)
    rounds = 100
    rec = Record()
    with closing(Lock()) as lock, Completion() as started, Children() as children:
        survivors = [children.fork(survivor(kind, lock, rec, 1 + i, started)) for i in range(2)]
        for _ in survivors:
            assert started.wait_blocking(timeout=SOON)
        for _ in range(rounds):
            pid = children.fork(victim(kind, lock, rec, started, blocking=rng.random() < 0.4))
            assert started.wait_blocking(timeout=SOON)
            for _ in range(rng.randrange(200)):
                os.sched_yield()
            children.kill(pid)
        rec[STOP] = 1
        repairs = sum(int(children.collect(pid)) for pid in survivors)
        assert lock.acquire_blocking(timeout=SOON)
        repairs += rec.check_or_repair(lock)
        assert rec.adds_up()
        lock.release()
        assert repairs <= rounds


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_semaphore_sigkill_at_random_points_units_come_back(kind: str) -> None:
    rng = random.Random(2424)
    rounds = 60
    k = 2
    rec = Record()
    with closing(Semaphore(k)) as sem, Completion() as started, Children() as children:

        def hammer(tell: bool) -> Callable[[], str]:
            async def one(tell: bool) -> None:
                while rec[STOP] == 0:
                    async with sem:
                        await asyncio.sleep(0)
                    if tell:
                        started.complete()
                        tell = False

            async def main() -> str:
                await asyncio.gather(one(tell), one(False))
                return "ok"

            return child_loop(kind, main)

        survivors = [children.fork(hammer(True)) for _ in range(2)]
        for _ in survivors:
            assert started.wait_blocking(timeout=SOON)
        for _ in range(rounds):
            pid = children.fork(hammer(True))
            assert started.wait_blocking(timeout=SOON)
            for _ in range(rng.randrange(200)):
                os.sched_yield()
            children.kill(pid)
        rec[STOP] = 1
        for pid in survivors:
            assert children.collect(pid) == "ok"
        assert sem.value == k
        for _ in range(k):
            sem.acquire_nowait()
        with pytest.raises(WouldBlock):
            sem.acquire_nowait()
        for _ in range(k):
            sem.release()


# ---------------------------------------------------------------------------------------
# What a dead process held, seen by a process that is not waiting
# ---------------------------------------------------------------------------------------


def test_a_lock_handed_to_a_dead_waiter_reads_free() -> None:
    """The only waiter is killed, then the holder releases: the release hands the lock
    to the dead process (nobody was waiting to see it die). Nobody holds the lock, so
    `locked()` is False and `owner_pid` None; the next acquire gets it consistent."""
    with closing(Lock()) as lock, Completion() as parked, Children() as children:
        lock.acquire_nowait()
        dead = children.fork(waiter("asyncio", lock, parked))
        assert parked.wait_blocking(timeout=SOON)
        children.kill(dead)
        lock.release()
        state = (lock.locked(), owner(lock))
        lock.acquire_nowait()  # recovers it (this part holds either way)
        assert not inconsistent(lock)
        lock.release()
        assert state == (False, None), f"read as held by the dead waiter {dead}: {state}"


@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_units_of_a_dead_process_are_counted_free_at_once(death: str) -> None:
    """Nobody waits when a holder of units dies: `value` counts them free again (the
    units return when the process dies, not when somebody next needs one)."""
    with (
        closing(Semaphore(2)) as sem,
        Completion() as held,
        Completion() as go,
        Children() as children,
    ):

        def hold_then_die() -> str:  # pragma: no cover - dies
            assert sem.acquire_blocking(timeout=SOON)
            held.complete()
            assert go.wait_blocking(timeout=SOON)
            os._exit(0)

        pid = children.fork(hold_then_die)
        assert held.wait_blocking(timeout=SOON)
        assert sem.value == 1
        if death == "sigkill":
            children.kill(pid)
        else:
            go.complete()
            children.collect(pid)
        assert sem.value == 2
        assert repr(sem) == "<aiosync.Semaphore value=2/2 held here=0>"
        sem.acquire_nowait()
        sem.acquire_nowait()
        sem.release()
        sem.release()


# ---------------------------------------------------------------------------------------
# An acquire that fails before it waits
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [Lock, Semaphore])
def test_an_acquire_that_fails_to_queue_leaves_nothing_behind(
    cls: type[Primitive], kind: str
) -> None:
    """A process's first wait sets up its watch on the shared memory (an inotify fd). If
    that fails (here: no fd number left, RLIMIT_NOFILE), acquire() raises the OSError and
    leaves nothing behind: the process's next acquire queues and is served as usual, and
    once it has released, nothing is handed to it again. (A trace left in the shared
    line would have the lock handed to a process that no longer waits for it: every
    other process would then wait for ever.)"""
    with (
        closing(cls()) as obj,
        Completion() as failed,
        Completion() as done,
        Completion() as bye,
        Children() as children,
    ):

        async def fail_then_queue() -> str:
            try:
                obj.acquire_nowait()  # held by the parent; sets this process up
            except WouldBlock:
                pass
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            lowest = os.dup(0)
            os.close(lowest)
            resource.setrlimit(resource.RLIMIT_NOFILE, (lowest, hard))
            try:
                await obj.acquire()
            except OSError as exc:
                outcome = f"errno={exc.errno}"
            else:
                outcome = "acquired with no fd to watch with"
            finally:
                resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            failed.complete()
            assert await soon(obj.acquire()) is True
            obj.release()
            done.complete()
            await soon(bye.wait())
            return outcome

        obj.acquire_nowait()
        child = children.fork(child_loop(kind, fail_then_queue))
        assert failed.wait_blocking(timeout=SOON)
        obj.release()  # to the child's second acquire (queued, or about to take it free)
        assert done.wait_blocking(timeout=SOON)
        # The child, alive, waits for nothing: the lock goes to nobody on a release.
        obj.acquire_nowait()
        obj.release()
        held_after = obj.locked()
        try:
            obj.acquire_nowait()
        except WouldBlock:
            state = "handed to the child, which does not wait for it"
        else:
            state = "free"
            obj.release()
        bye.complete()
        assert children.collect(child) == f"errno={errno.EMFILE}"
        assert (held_after, state) == (False, "free")
