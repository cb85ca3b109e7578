"""Barrier against a model of systemd's rules: a Hypothesis state machine over two processes.

Both sides of one barrier are driven with random sequences of place / abort /
wait_next / sync_next / sync / place_and_sync / wait_abortion / cancel / exit, and
every result and every state flag (and the counter, through the repr) is compared with
`Model`, a small pure-Python model written from docs/barrier.md (the table and the read loop).

* The *local* side lives in this process (its role, PARENT or CHILD, is drawn) and
  runs its waits as tasks on a loop of the parametrized kind. A wait the model says
  must block is asserted with a bounded wait and stays pending across steps, until the
  model's later steps release it (the peer places, aborts or exits; this side aborts
  or closes) or a step cancels it. After a cancellation the state is compared again,
  and later waits go on from the same counter: nothing read is lost. One rule lets the
  peer act and cancels a wait before the local loop has seen the event, where both
  "the cancelled wait read it" and "a later wait will" are right (and nothing else).
* The *peer* is a forked process (forked before any loop runs here) that executes
  commands sent over a socket: place, abort, a wait (on a blocking twin, or async on a
  fresh loop of the same kind), exit (a real ``os._exit``). Its waits never stay
  pending: one the model says blocks must time out after a short bound.

Nothing is ordered by time: the local side's loop runs only inside a step, and the
peer acts only on a command and answers when done, so the only events are the ones the
model knows about. The bounded waits only prove "this did not finish"; they are never
needed for anything to happen.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    precondition,
    rule,
    run_state_machine_as_test,
)
from support import SOON, Forked, finish_now, new_loop, run_on, soon

from aiosync import Barrier, ClosedResourceError, Role

ABORTION = 2**63 - 1  # what abort() writes
WAITS = ("wait_next", "sync_next", "sync", "place_and_sync", "wait_abortion")
# How long a wait the model says blocks is watched. Everything that could release it
# has already happened when this starts, so a short bound cannot fail a correct wait;
# a wrong release in the local side is also caught by the next step's bounded wait.
BLOCK = 0.02
MAX_PENDING = 3  # local waits pending at once
ACTIONS = ("place", "abort", "exit")  # of the peer, racing a cancellation
ENDINGS = ("local_abort", "peer_abort", "peer_exit", "local_close")

# ---------------------------------------------------------------------------------------
# The model (docs/barrier.md)
# ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class Wait:
    """A wait that has to block: sync-style (until barriers <= threshold) or, with
    threshold None, wait_abortion (until they aborted)."""

    threshold: int | None


@dataclass
class Side:
    barriers: int = 0  # barriers I placed - barriers of theirs I read
    i_aborted: bool = False
    they_aborted: bool = False
    inbox: int = 0  # what the other side added to my eventfd and I have not read
    peer_gone: bool = False  # the other side's pipe end is closed (it exited)
    pending: list[Wait] = field(default_factory=list)  # my waits that block (local side)

    @property
    def is_aborted(self) -> bool:
        return self.i_aborted or self.they_aborted

    @property
    def abort_state(self) -> str:
        if self.i_aborted and self.they_aborted:
            return "both"
        return "i" if self.i_aborted else "they" if self.they_aborted else "no"

    def read_once(self) -> bool:
        """One turn of the read loop; False if it has to wait for the peer."""
        if self.inbox:  # what the peer placed comes before its exit
            value, self.inbox = self.inbox, 0
            if value >= ABORTION:  # an abort wipes the barriers placed before it
                self.they_aborted = True
            elif not self.is_aborted:  # an aborted counter no longer moves
                self.barriers -= value
            return True
        if self.peer_gone:
            self.they_aborted = True
            return True
        return False

    def done(self, wait: Wait) -> bool:
        if wait.threshold is None:
            return self.they_aborted
        return self.is_aborted or self.barriers <= wait.threshold

    def result(self, wait: Wait) -> bool:
        return not (self.i_aborted if wait.threshold is None else self.is_aborted)

    def settle(self) -> list[tuple[Wait, bool]]:
        """What happens after any event while waits are pending: release those whose
        condition holds, and read on while any still waits."""
        out = [(w, self.result(w)) for w in self.pending if self.done(w)]
        self.pending = [w for w in self.pending if not self.done(w)]
        if self.pending and not self.they_aborted and self.read_once():
            out += self.settle()
        return out


class Model:
    def __init__(self) -> None:
        self.local = Side()
        self.peer = Side()

    def other(self, side: Side) -> Side:
        return self.peer if side is self.local else self.local

    def place(self, side: Side) -> bool:
        if side.is_aborted:
            return False
        self.other(side).inbox += 1
        side.barriers += 1
        return True

    def abort(self, side: Side) -> bool:
        if not side.i_aborted:
            self.other(side).inbox += ABORTION
            side.i_aborted = True
        return not side.they_aborted

    def begin(self, side: Side, name: str) -> bool | Wait:
        """Start a wait: its result if it needs no wait (it then reads nothing), else
        the `Wait`."""
        if name == "wait_abortion":
            return not side.i_aborted if side.they_aborted else Wait(None)
        if name == "place_and_sync":
            self.place(side)
            name = "sync"
        if side.is_aborted:
            return False
        threshold = {
            "wait_next": side.barriers - 1,
            "sync_next": max(0, side.barriers - 1),
            "sync": 0,
        }[name]
        return True if side.barriers <= threshold else Wait(threshold)

    def wait_through(self, side: Side, name: str) -> bool | None:
        """A wait that is not left pending: its result, or None if it blocks."""
        wait = self.begin(side, name)
        if isinstance(wait, bool):
            return wait
        while not side.done(wait):
            if not side.read_once():
                return None
        return side.result(wait)


# ---------------------------------------------------------------------------------------
# The peer: a forked process that runs commands
# ---------------------------------------------------------------------------------------


def peer_state(b: Barrier) -> list[Any]:
    return [repr(b), b.i_aborted, b.they_aborted, b.both_aborted, b.is_aborted]


async def bounded(aw: Coroutine[Any, Any, bool], seconds: float) -> bool | str:
    try:
        async with asyncio.timeout(seconds):
            return await aw
    except TimeoutError:
        return "timeout"


def run_command(b: Barrier, cmd: dict[str, Any], kind: str) -> bool | str:
    op = cmd["op"]
    if op == "place":
        return b.place()
    if op == "abort":
        return b.abort()
    assert op == "wait", op
    name, timeout = cmd["name"], cmd["timeout"]
    if cmd["blocking"]:
        wait: Callable[..., bool] = getattr(b, f"{name}_blocking")
        try:
            return wait(timeout=timeout)
        except TimeoutError:
            return "timeout"
    return run_on(kind, bounded(getattr(b, name)(), timeout))


def serve(b: Barrier, sock: socket.socket, kind: str) -> None:  # pragma: no cover - child
    for line in sock.makefile("rb"):
        cmd = json.loads(line)
        if cmd["op"] == "exit":
            return
        try:
            reply: dict[str, Any] = {"result": run_command(b, cmd, kind)}
        except BaseException:
            reply = {"error": traceback.format_exc()}
        reply["state"] = peer_state(b)
        sock.sendall(json.dumps(reply).encode() + b"\n")


class Peer:
    """The other side of the barrier, in a forked process of its own (no loop runs here
    when it forks)."""

    def __init__(self, b: Barrier, role: Role, kind: str) -> None:
        self.sock, theirs = socket.socketpair()

        def run() -> None:  # pragma: no cover - runs in the child
            self.sock.close()
            b.set_role(role)
            serve(b, theirs, kind)

        self.proc = Forked(run)
        theirs.close()
        self.sock.settimeout(2 * SOON)
        self._lines = self.sock.makefile("rb")

    @property
    def alive(self) -> bool:
        return self.proc.status is None

    def call(self, op: str, **args: Any) -> tuple[Any, list[Any]]:
        self.sock.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = self._lines.readline()
        assert line, "the peer process died"
        reply = json.loads(line)
        assert "error" not in reply, f"the peer failed:\n{reply['error']}"
        return reply["result"], reply["state"]

    def exit(self) -> None:
        """A real exit; returns once the process is gone (its fds are closed)."""
        self.sock.sendall(b'{"op": "exit"}\n')
        self.proc.join()

    def close(self) -> None:
        self.proc.reap()
        self._lines.close()
        self.sock.close()


# ---------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------


def expected_repr(role: Role, side: Side) -> str:
    return f"<aiosync.Barrier role={role.name} barriers={side.barriers} aborted={side.abort_state}>"


def local_state(b: Barrier) -> tuple[str, bool, bool, bool, bool]:
    return (repr(b), b.i_aborted, b.they_aborted, b.both_aborted, b.is_aborted)


def model_state(role: Role, side: Side) -> tuple[str, bool, bool, bool, bool]:
    return (
        expected_repr(role, side),
        side.i_aborted,
        side.they_aborted,
        side.i_aborted and side.they_aborted,
        side.is_aborted,
    )


class BarrierMachine(RuleBasedStateMachine):
    kind = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.tasks: dict[Wait, asyncio.Task[bool]] = {}
        self.local_open = True
        self.started = False

    # -- setup and teardown -----------------------------------------------------------

    @initialize(local_role=st.sampled_from(Role))
    def start(self, local_role: Role) -> None:
        self.role = local_role
        self.peer_role = Role.CHILD if local_role is Role.PARENT else Role.PARENT
        self.b = Barrier()
        self.peer = Peer(self.b, self.peer_role, self.kind)  # fork before any loop runs
        self.b.set_role(local_role)
        kind = self.kind
        self.runner = asyncio.Runner(loop_factory=lambda: new_loop(kind))
        self.loop = self.runner.get_loop()
        self.started = True

    def teardown(self) -> None:
        if not self.started:
            return
        try:
            self.runner.close()  # cancels the waits still pending
        finally:
            self.b.close()
            self.peer.close()

    # -- checks -----------------------------------------------------------------------

    def check_local(self) -> None:
        if self.local_open:
            assert local_state(self.b) == model_state(self.role, self.model.local)
        else:
            assert repr(self.b) == f"<aiosync.Barrier role={self.role.name} closed>"

    def check_peer(self, state: list[Any]) -> None:
        assert tuple(state) == model_state(self.peer_role, self.model.peer)

    def settle(self) -> None:
        """Let the local loop handle what just happened, as the model says it must."""
        released = self.model.local.settle()
        if self.tasks:
            self.runner.run(self._settle(released))
        else:
            assert not released
        self.check_local()

    async def _settle(self, released: list[tuple[Wait, bool]]) -> None:
        for wait, result in released:
            assert await soon(self.tasks.pop(wait)) is result
        pending = [self.tasks[w] for w in self.model.local.pending]
        assert len(pending) == len(self.tasks)
        if pending:
            done, _ = await asyncio.wait(pending, timeout=BLOCK)
            assert not done, f"a wait the model says blocks returned {done.pop().result()!r}"
        # What the waits read was applied by the loop's reader callback, which has run by
        # now: the fds were readable before the bounded wait began, and both loops run a
        # ready fd's callback before they resume a task whose timeout expired meanwhile.
        # So the state is compared (by the caller) at once, without polling for it.

    # -- the local side (this process, async) -----------------------------------------

    @precondition(lambda self: self.local_open)
    @rule()
    def local_place(self) -> None:
        assert self.b.place() is self.model.place(self.model.local)
        self.check_local()

    def local_abort(self) -> None:
        assert self.b.abort() is self.model.abort(self.model.local)
        self.settle()

    @precondition(lambda self: self.local_open and len(self.tasks) < MAX_PENDING)
    @rule(name=st.sampled_from(WAITS))
    def local_wait(self, name: str) -> None:
        outcome = self.model.begin(self.model.local, name)
        coro: Coroutine[Any, Any, bool] = getattr(self.b, name)()
        if isinstance(outcome, bool):  # no wait needed: it must not even suspend

            async def now() -> bool:
                return finish_now(coro)

            assert self.runner.run(now()) is outcome
        else:
            self.model.local.pending.append(outcome)
            self.tasks[outcome] = self.loop.create_task(coro)
        self.settle()

    def cancel_one(self, data: st.DataObject) -> None:
        """Cancel a pending local wait (one the model says is still blocked)."""
        wait = data.draw(st.sampled_from(self.model.local.pending))
        self.model.local.pending.remove(wait)
        task = self.tasks.pop(wait)
        task.cancel()

        async def cancelled() -> None:
            try:
                await task
            except asyncio.CancelledError:
                return
            raise AssertionError("the cancelled wait did not raise CancelledError")

        self.runner.run(cancelled())

    @precondition(lambda self: self.tasks)
    @rule(data=st.data())
    def local_cancel(self, data: st.DataObject) -> None:
        self.cancel_one(data)
        self.settle()

    @precondition(lambda self: self.tasks and self.peer.alive)
    @rule(action=st.sampled_from(ACTIONS), dice=st.integers(0, 3), data=st.data())
    def peer_acts_racing_a_cancel(self, action: str, dice: int, data: st.DataObject) -> None:
        """The peer places (or, rarely, aborts or exits) and a local wait is cancelled
        before the local loop runs again. The loop may still hand the fd event to the
        cancelled waiter (uvloop runs fd callbacks before the cancelled task's clean-up)
        or not: the event came while the wait was pending, so both are right, as long as
        nothing is lost: what was read is counted, what was not is read by a later wait."""
        if action != "place" and dice:
            action = "place"
        if action == "exit":
            self.peer.exit()
            self.model.local.peer_gone = True
        else:
            result, state = self.peer.call(action)
            assert result is getattr(self.model, action)(self.model.peer)
            self.check_peer(state)
        self.cancel_one(data)
        side = self.model.local
        if not side.pending and not side.they_aborted:  # nobody else waits: read or not
            read = copy.deepcopy(side)
            if read.read_once() and local_state(self.b) == model_state(self.role, read):
                self.model.local = read
        self.settle()

    def local_close(self) -> None:
        """Close this side (its fds are gone, as at an exit); its pending waits raise."""
        self.b.close()
        self.local_open = False
        self.model.peer.peer_gone = True
        tasks = list(self.tasks.values())
        self.tasks.clear()
        self.model.local.pending.clear()

        async def closed() -> None:
            for task in tasks:
                try:
                    await soon(task)
                except ClosedResourceError:
                    continue
                raise AssertionError("a pending wait did not raise ClosedResourceError")

        self.runner.run(closed())
        self.check_local()

    # -- the peer (a forked process, blocking twins or async on a fresh loop) ---------

    @precondition(lambda self: self.peer.alive)
    @rule()
    def peer_place(self) -> None:
        result, state = self.peer.call("place")
        assert result is self.model.place(self.model.peer)
        self.check_peer(state)
        self.settle()

    def peer_abort(self) -> None:
        result, state = self.peer.call("abort")
        assert result is self.model.abort(self.model.peer)
        self.check_peer(state)
        self.settle()

    @precondition(lambda self: self.peer.alive)
    @rule(name=st.sampled_from(WAITS), blocking=st.booleans())
    def peer_wait(self, name: str, blocking: bool) -> None:
        expected = self.model.wait_through(self.model.peer, name)
        timeout = BLOCK if expected is None else SOON
        result, state = self.peer.call("wait", name=name, blocking=blocking, timeout=timeout)
        assert result == ("timeout" if expected is None else expected)
        self.check_peer(state)
        self.settle()  # place_and_sync placed one

    def peer_exit(self) -> None:
        self.peer.exit()
        self.model.local.peer_gone = True
        self.settle()

    # -- the rare events: aborts and exits --------------------------------------------

    @rule(ending=st.sampled_from(ENDINGS), dice=st.integers(0, 3))
    def end_something(self, ending: str, dice: int) -> None:
        """An abort or an exit, on one side (one draw in four acts): they end most of
        what is interesting, so the sequences should not meet them too early."""
        local, peer = self.local_open, self.peer.alive
        allowed = {
            "local_abort": local,
            "peer_abort": peer,
            "peer_exit": peer and local,  # one side stays, for the steps after
            "local_close": local and peer,
        }
        if dice == 0 and allowed[ending]:
            getattr(self, ending)()

    @precondition(lambda self: self.tasks and self.peer.alive)
    @rule(ending=st.sampled_from(ENDINGS))
    def end_something_while_waiting(self, ending: str) -> None:
        """The same, always, while local waits are pending: what they do then matters."""
        getattr(self, ending)()


# No shrinking: a wait that wrongly blocks costs a `soon` bound (10 s) per run, and
# shrinking would repeat it until pytest-timeout (60 s) ends the test without a report.
# The failing sequence (at most 25 steps) is printed as found. To shrink one locally,
# add Phase.shrink and run with --timeout=0.
SETTINGS = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
    suppress_health_check=[HealthCheck.too_slow],
)


def test_barrier_model(kind: str) -> None:
    machine = type(f"BarrierMachine_{kind}", (BarrierMachine,), {"kind": kind})
    run_state_machine_as_test(machine, settings=SETTINGS)
