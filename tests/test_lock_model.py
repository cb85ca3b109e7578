"""Hypothesis state machines drive a Lock and a Semaphore through worker processes and
compare them with pure models.

Each worker is a forked process running a loop (of the kind under test) that obeys
one-line commands over a socketpair: start an acquire, wait for it, cancel it,
acquire_nowait, release, mark_consistent. The machine also SIGKILLs workers (and forks
new ones). After every step the owner, the value and `inconsistent` seen from this
process must match the model; every grant the model predicts is awaited (bounded) in
the worker it predicts it for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from support import SOON, Forked, run_on

from aiosync import BrokenResourceError, Lock, Semaphore, WouldBlock

Primitive = Lock | Semaphore

# ---------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------


def outcome(obj: Primitive, task: asyncio.Task[bool]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    if isinstance(exc, BrokenResourceError):
        return "broken"
    if exc is not None:
        return f"error {exc!r}"
    return got(obj)


def got(obj: Primitive) -> str:
    if isinstance(obj, Lock):
        return f"got inconsistent={obj.inconsistent}"
    return "got"


async def serve(obj: Primitive, sock: socket.socket, cancel_r: int) -> None:
    """Obey commands from `sock`; a byte on `cancel_r` cancels the pending acquire
    right in the loop's callback (so that, written while this process is frozen
    after a release handed the lock to it, the cancel lands after the wake-up and
    before the woken task runs)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    task: asyncio.Task[bool] | None = None

    def cancel_now() -> None:
        os.read(cancel_r, 1)
        if task is not None:
            task.cancel()

    loop.add_reader(cancel_r, cancel_now)
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = await loop.sock_recv(sock, 256)
            if not chunk:
                return
            buf += chunk
        line, _, buf = buf.partition(b"\n")
        command = line.decode()
        if command == "exit":
            return
        try:
            if command == "acquire":
                assert task is None
                task = asyncio.ensure_future(obj.acquire())
                await asyncio.sleep(0)  # its first step: it takes it or queues
                if task.done():
                    reply = outcome(obj, task)
                    task = None
                else:
                    reply = "waiting"
            elif command in ("wait", "cancel"):
                assert task is not None
                if command == "cancel":
                    task.cancel()
                done, _ = await asyncio.wait({task}, timeout=SOON)
                reply = outcome(obj, task) if done else "still waiting"
                if done:
                    task = None
            elif command == "poll":
                assert task is not None
                reply = outcome(obj, task) if task.done() else "waiting"
                if task.done():
                    task = None
            elif command == "nowait":
                obj.acquire_nowait()
                reply = got(obj)
            elif command == "release":
                obj.release()
                reply = "ok"
            elif command == "mark":
                assert isinstance(obj, Lock)
                obj.mark_consistent()
                reply = "ok"
            else:
                reply = f"unknown {command}"
        except WouldBlock:
            reply = "wouldblock"
        except BrokenResourceError:
            reply = "broken"
        except (RuntimeError, ValueError) as exc:
            reply = type(exc).__name__
        await loop.sock_sendall(sock, reply.encode() + b"\n")


class Worker:
    """A forked process that obeys commands (see `serve`)."""

    def __init__(self, kind: str, obj: Primitive) -> None:
        mine, theirs = socket.socketpair()
        cancel_r, self.cancel_w = os.pipe()

        def main() -> None:  # pragma: no cover - runs in the child
            mine.close()
            run_on(kind, serve(obj, theirs, cancel_r))

        try:
            self.proc = Forked(main)
        finally:
            theirs.close()
            os.close(cancel_r)
        self.sock = mine
        self.sock.settimeout(SOON + 5)
        self.buf = b""
        self.pid = self.proc.pid

    def ask(self, command: str) -> str:
        self.send(command)
        return self.reply()

    def send(self, command: str) -> None:
        """Send a command without waiting for the reply (see `reply`)."""
        self.sock.sendall(command.encode() + b"\n")

    def reply(self) -> str:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(256)
            assert chunk, f"worker {self.pid} is gone"
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return line.decode()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        _, status = os.waitpid(self.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(killed=True)
        self.sock.close()
        os.close(self.cancel_w)

    def stop(self) -> None:
        # (Not EOF: workers forked later hold copies of this end of the socketpair.)
        self.sock.sendall(b"exit\n")
        self.sock.close()
        os.close(self.cancel_w)
        self.proc.join()


WORKERS = 3


def pick_from(candidates: list[int], pick: int) -> int | None:
    """One of `candidates` (None if there is none). The machine's state depends on
    which process saw a death first, so draws and rules never depend on the state:
    Hypothesis replays a sequence of draws and must get the same shapes each time."""
    return candidates[pick % len(candidates)] if candidates else None


class Machine(RuleBasedStateMachine):
    """What both machines share: the workers, their life and death."""

    kind = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.obj = self.make()
        self.workers: list[Worker] = []
        self.waiting: list[int] = []  # indexes into workers, oldest first
        # Waiters killed while no other process was waiting stay in the shared line
        # until some process looks: a release may hand the lock (a unit) to such a
        # dead process, and a waiting one then frees and takes it, whichever sees it
        # first. The model stops predicting which waiter a release serves once there
        # may be such ghosts.
        self.ghost_waiters = 0
        for _ in range(WORKERS):
            self.workers.append(Worker(self.kind, self.obj))

    def make(self) -> Primitive:
        raise NotImplementedError

    def idle(self) -> list[int]:
        return [i for i in range(WORKERS) if i not in self.waiting]

    def expect(self, worker: int, command: str, *replies: str) -> str:
        reply = self.workers[worker].ask(command)
        assert reply in replies, f"{command} in worker {worker}: {reply!r}, expected {replies}"
        return reply

    def grant(self, worker: int, want: str) -> None:
        """The model says `worker`'s pending acquire now succeeds (or breaks)."""
        self.expect(worker, "wait", want)

    def killed(self, worker: int) -> None:
        if worker in self.waiting:
            self.waiting.remove(worker)
            self.ghost_waiters += 1
        self.replace(worker)

    def serve_next(self, want: str, first: int | None) -> int:
        """A release hands it on to `first` (the oldest waiter) or, with ghosts about,
        maybe to another waiter; returns which one got it."""
        if self.ghost_waiters:
            [w] = self.find_grants(1, want)
            return w
        assert first is not None
        self.waiting.remove(first)
        self.grant(first, want)
        return first

    def release_to_a_frozen_waiter_then_cancel(self, releaser: int, first: int) -> bool:
        """The oldest waiter's process is frozen while `releaser` hands it the lock and
        a "cancel" command arrives; thawed, its loop sees both at once. Returns whether
        the cancel won (the grant must then go on); else the waiter holds it."""
        frozen = self.workers[first]
        frozen.freeze()
        try:
            self.expect(releaser, "release", "ok")
            os.write(frozen.cancel_w, b"x")
        finally:
            frozen.thaw()
        reply = frozen.ask("wait")
        assert reply in ("cancelled", "got", "got inconsistent=False"), reply
        self.waiting.remove(first)
        event(f"a waiter handed the lock and cancelled before it ran: {reply}")
        return reply == "cancelled"

    def find_grants(self, count: int, want: str) -> list[int]:
        """After a death, some of the waiting workers take what the dead one held, in no
        particular order (whoever sees the death first): find which, `count` of them,
        by asking each (bounded)."""
        found: list[int] = []
        deadline = time.monotonic() + SOON
        while len(found) < count:
            assert time.monotonic() < deadline, f"{len(found)} of {count} grants seen"
            for w in self.waiting:
                if w not in found and self.expect(w, "poll", want, "waiting") == want:
                    found.append(w)
            if len(found) < count:
                time.sleep(0.002)
        for w in found:
            self.waiting.remove(w)
        return found

    def replace(self, worker: int) -> None:
        self.workers[worker].kill()
        self.workers[worker] = Worker(self.kind, self.obj)

    def teardown(self) -> None:
        for w in self.workers:
            try:
                w.kill()
            except ProcessLookupError:  # pragma: no cover
                pass
        self.obj.close()


# ---------------------------------------------------------------------------------------
# Lock
# ---------------------------------------------------------------------------------------


class LockMachine(Machine):
    def __init__(self) -> None:
        super().__init__()
        self.owner: int | None = None
        self.inconsistent = False
        self.dead_owner: int | None = None  # died holding, nobody took it over yet
        self.broken = False
        # Pids of holders that died with nobody waiting: the lock names them (held,
        # not yet taken over) until the next acquire takes it over, as POSIX's robust
        # mutexes do.
        self.dead_holders: set[int] = set()

    def make(self) -> Primitive:
        return Lock()

    @property
    def lock(self) -> Lock:
        assert isinstance(self.obj, Lock)
        return self.obj

    def free_candidates(self) -> list[int]:
        return [i for i in self.idle() if i != self.owner]

    def took(self, worker: int) -> str:
        """The model's state after `worker` takes the lock; the reply it expects."""
        self.owner = worker
        self.inconsistent = self.inconsistent or self.dead_owner is not None
        self.dead_owner = None
        return f"got inconsistent={self.inconsistent}"

    @rule(pick=st.integers(0, WORKERS - 1))
    def acquire(self, pick: int) -> None:
        w = pick_from(self.free_candidates(), pick)
        if w is None:
            return
        if self.broken:
            self.expect(w, "acquire", "broken")
        elif self.owner is None and not self.waiting:
            want = self.took(w)
            if self.expect(w, "acquire", want, "waiting") == "waiting":
                self.grant(w, want)  # a dead owner's death may take the loop a step
        else:
            self.expect(w, "acquire", "waiting")
            self.waiting.append(w)

    @rule(pick=st.integers(0, WORKERS - 1))
    def acquire_nowait(self, pick: int) -> None:
        w = pick_from(self.free_candidates(), pick)
        if w is None:
            return
        if self.broken:
            self.expect(w, "nowait", "broken")
        elif self.owner is None and not self.waiting:
            self.expect(w, "nowait", self.took(w))
        else:
            self.expect(w, "nowait", "wouldblock")

    @rule(repair=st.booleans())
    def release(self, repair: bool) -> None:
        if self.owner is None:
            return
        if repair and self.inconsistent:
            self.expect(self.owner, "mark", "ok")
            self.inconsistent = False
        self.expect(self.owner, "release", "ok")
        self.owner = None
        if self.inconsistent:  # released unrepaired: unrecoverable
            self.broken = True
            self.inconsistent = False
            for w in self.waiting:
                self.grant(w, "broken")
            self.waiting = []
        elif self.waiting:
            w = self.serve_next("got inconsistent=False", self.waiting[0])
            self.took(w)

    @rule()
    def release_to_a_waiter_cancelled_before_it_ran(self) -> None:
        if self.owner is None or not self.waiting or self.inconsistent or self.ghost_waiters:
            return
        releaser, first = self.owner, self.waiting[0]
        self.owner = None
        if not self.release_to_a_frozen_waiter_then_cancel(releaser, first):
            self.took(first)
        elif self.waiting:  # passed on
            w = self.waiting.pop(0)
            self.grant(w, self.took(w))

    @rule(pick=st.integers(0, WORKERS - 1))
    def release_by_a_non_holder(self, pick: int) -> None:
        if self.broken:
            return
        w = pick_from(self.free_candidates(), pick)
        if w is None:
            return
        self.expect(w, "release", "RuntimeError")
        self.expect(w, "mark", "RuntimeError")

    @rule(pick=st.integers(0, WORKERS - 1))
    def cancel(self, pick: int) -> None:
        w = pick_from(self.waiting, pick)
        if w is None:
            return
        self.expect(w, "cancel", "cancelled")
        self.waiting.remove(w)

    @rule(w=st.integers(0, WORKERS - 1))
    def kill(self, w: int) -> None:
        if w == self.owner:
            self.dead_holders.add(self.workers[w].pid)
        self.killed(w)
        if w == self.owner:
            self.owner = None
            self.dead_owner = w
            if self.waiting:  # a pending waiter takes it over (the first to see it)
                [taker] = self.find_grants(1, "got inconsistent=True")
                self.took(taker)

    @invariant()
    def matches_the_model(self) -> None:
        if self.broken:
            return
        if self.owner is not None:
            assert self.lock.locked()
            assert self.lock.owner_pid == self.workers[self.owner].pid
            assert self.lock.inconsistent == self.inconsistent
        else:
            # Free, or held by a dead holder nobody took it over from yet (never by a
            # dead waiter it was handed to).
            assert self.lock.owner_pid in self.dead_holders | {None}
            assert self.lock.locked() == (self.lock.owner_pid is not None)


# ---------------------------------------------------------------------------------------
# Semaphore
# ---------------------------------------------------------------------------------------

UNITS = 2


class SemaphoreMachine(Machine):
    def __init__(self) -> None:
        super().__init__()
        self.value = UNITS
        self.holds = [0] * WORKERS

    def make(self) -> Primitive:
        return Semaphore(UNITS)

    @property
    def sem(self) -> Semaphore:
        assert isinstance(self.obj, Semaphore)
        return self.obj

    def hand_out(self, releaser: int) -> None:
        """A released unit goes to the oldest waiter of another process (a releaser
        does not serve itself first), else to the releaser's own waiter, else back."""
        others = [w for w in self.waiting if w != releaser]
        w = others[0] if others else releaser if releaser in self.waiting else None
        if w is None:
            self.value += 1  # (handed to a dead waiter maybe, which counts as free)
            return
        self.holds[self.serve_next("got", w)] += 1

    @rule(pick=st.integers(0, WORKERS - 1))
    def acquire(self, pick: int) -> None:
        w = pick_from(self.idle(), pick)
        if w is None:
            return
        if self.value and not self.waiting:
            if self.expect(w, "acquire", "got", "waiting") == "waiting":
                self.grant(w, "got")
            self.value -= 1
            self.holds[w] += 1
        else:
            self.expect(w, "acquire", "waiting")
            self.waiting.append(w)

    @rule(pick=st.integers(0, WORKERS - 1))
    def acquire_nowait(self, pick: int) -> None:
        w = pick_from(self.idle(), pick)
        if w is None:
            return
        if self.value and not self.waiting:
            self.expect(w, "nowait", "got")
            self.value -= 1
            self.holds[w] += 1
        else:
            self.expect(w, "nowait", "wouldblock")

    @rule(w=st.integers(0, WORKERS - 1))
    def release(self, w: int) -> None:
        if self.holds[w] == 0:
            self.expect(w, "release", "ValueError")
            return
        self.expect(w, "release", "ok")
        self.holds[w] -= 1
        self.hand_out(w)

    @rule(pick=st.integers(0, WORKERS - 1))
    def cancel(self, pick: int) -> None:
        w = pick_from(self.waiting, pick)
        if w is None:
            return
        self.expect(w, "cancel", "cancelled")
        self.waiting.remove(w)

    @rule()
    def release_to_a_waiter_cancelled_before_it_ran(self) -> None:
        if not self.waiting or self.ghost_waiters:
            return
        first = self.waiting[0]
        if not any(h and i != first for i, h in enumerate(self.holds)):
            return
        releaser = next(i for i, h in enumerate(self.holds) if h and i != first)
        self.holds[releaser] -= 1
        if self.release_to_a_frozen_waiter_then_cancel(releaser, first):
            # Passed on by the cancelled receiver: to the oldest waiter left, which
            # may be a waiter of the releaser's own process.
            if self.waiting:
                self.holds[self.serve_next("got", self.waiting[0])] += 1
            else:
                self.value += 1
        else:
            self.holds[first] += 1

    @rule(w=st.integers(0, WORKERS - 1))
    def kill(self, w: int) -> None:
        self.killed(w)
        back = self.holds[w]  # its units come back
        self.holds[w] = 0
        if not back:
            return
        if self.waiting:  # waiting processes see the death; they take in any order
            for taker in self.find_grants(min(back, len(self.waiting)), "got"):
                self.holds[taker] += 1
                back -= 1
        self.value += back

    @invariant()
    def matches_the_model(self) -> None:
        assert self.sem.value == self.value
        assert self.sem.locked() == (self.value == 0)


def run_machine(cls: type[Machine], kind: str) -> None:
    machine: Any = type(f"{cls.__name__}_{kind}", (cls,), {"kind": kind})
    test = machine.TestCase
    test.settings = settings(
        max_examples=40,
        stateful_step_count=30,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        # Each step is a round trip to a process: shrinking a failure would take many
        # minutes. The failing sequence is printed as it ran.
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
    )
    test().runTest()


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_lock_model(loop_kind: str) -> None:
    run_machine(LockMachine, loop_kind)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_semaphore_model(loop_kind: str) -> None:
    run_machine(SemaphoreMachine, loop_kind)


def test_a_worker_obeys(kind: str) -> None:
    """The machine's tool itself: a worker takes, queues, cancels, releases."""
    lock = Lock()
    a, b = Worker(kind, lock), Worker(kind, lock)
    try:
        assert a.ask("acquire") == "got inconsistent=False"
        assert lock.owner_pid == a.pid
        assert b.ask("nowait") == "wouldblock"
        assert b.ask("acquire") == "waiting"
        assert b.ask("cancel") == "cancelled"
        assert b.ask("acquire") == "waiting"
        assert a.ask("release") == "ok"
        assert b.ask("wait") == "got inconsistent=False"
        assert lock.owner_pid == b.pid
        assert a.ask("release") == "RuntimeError"
        assert b.ask("release") == "ok"
        assert not lock.locked()
    finally:
        a.stop()
        b.stop()
        lock.close()
