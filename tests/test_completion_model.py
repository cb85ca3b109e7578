"""A Hypothesis state machine drives a Completion and compares it with a pure model."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from support import new_loop

from aiosync import Completion


class Model:
    """The kernel's completion: a count, a sticky all-done flag, waiters oldest first."""

    def __init__(self) -> None:
        self.count = 0
        self.all_done = False
        self.waiting: list[int] = []  # waiter ids, oldest first
        self.released: set[int] = set()

    def settle(self) -> None:
        if self.all_done:
            self.released.update(self.waiting)
            self.waiting = []
        while self.count and self.waiting:
            self.released.add(self.waiting.pop(0))
            self.count -= 1


def machine(kind: str) -> type[RuleBasedStateMachine]:
    class CompletionMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.loop = new_loop(kind)
            self.c = Completion()
            self.model = Model()
            self.tasks: dict[int, asyncio.Task[None]] = {}
            self.next_id = 0

        def settle(self) -> None:
            for _ in range(3):  # fd event, release, the released tasks resume
                self.loop.run_until_complete(asyncio.sleep(0))
            self.model.settle()

        @rule()
        def complete(self) -> None:
            self.c.complete()
            self.model.count += 1
            self.settle()

        @rule()
        def complete_all(self) -> None:
            self.c.complete_all()
            self.model.all_done = True
            self.settle()

        @rule()
        def try_wait(self) -> None:
            expected = self.model.all_done or self.model.count > 0
            assert self.c.try_wait() == expected
            if expected and not self.model.all_done:
                self.model.count -= 1

        @rule()
        def done(self) -> None:
            assert self.c.done() == (self.model.all_done or self.model.count > 0)

        @precondition(lambda self: not self.model.waiting)
        @rule()
        def reinit(self) -> None:
            self.c.reinit()
            self.model.count = 0
            self.model.all_done = False

        @rule()
        def wait(self) -> None:
            waiter = self.next_id
            self.next_id += 1
            self.tasks[waiter] = self.loop.create_task(self.c.wait())
            self.model.waiting.append(waiter)
            self.settle()

        @precondition(lambda self: self.model.waiting)
        @rule(data=st.data())
        def cancel(self, data: st.DataObject) -> None:
            waiter = data.draw(st.sampled_from(self.model.waiting))
            self.tasks[waiter].cancel()
            self.model.waiting.remove(waiter)
            self.settle()

        @invariant()
        def tasks_match_the_model(self) -> None:
            for waiter, task in self.tasks.items():
                if waiter in self.model.released:
                    assert task.done(), waiter
                    assert not task.cancelled(), waiter
                elif waiter in self.model.waiting:
                    assert not task.done(), waiter

        def teardown(self) -> None:
            for task in self.tasks.values():
                task.cancel()
            self.settle()
            self.c.close()
            self.loop.close()

    return CompletionMachine


@pytest.mark.parametrize("loop_kind", ["asyncio", "uvloop"])
def test_completion_model(loop_kind: str) -> None:
    test = machine(loop_kind).TestCase
    test.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
    test().runTest()
