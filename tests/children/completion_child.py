"""A child program for tests/test_completion_processes.py.

    python completion_child.py MODE [LOOP-KIND]

MODE ``hand-off``: takes the completions shared as "ready" and "answer" with
``aiosync.inherited()``, completes "ready" twice, then waits (on a loop of LOOP-KIND) for
the one count the parent puts in "answer". MODE ``inherit``: calls ``aiosync.inherited()``
and prints ``SharingError <message>`` if it refuses the description, ``accepted``
otherwise. A failed check exits non-zero with a traceback on stderr.
"""

from __future__ import annotations

import asyncio
import sys

import uvloop

import aiosync
from aiosync import Completion

SOON = 10.0


def hand_off(kind: str) -> None:
    shared = aiosync.inherited()
    ready, answer = shared["ready"], shared["answer"]
    assert isinstance(ready, Completion), ready
    assert isinstance(answer, Completion), answer

    async def main() -> None:
        ready.complete()
        ready.complete()
        await asyncio.wait_for(answer.wait(), SOON)

    factory = uvloop.new_event_loop if kind == "uvloop" else asyncio.new_event_loop
    with ready, answer, asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


def inherit() -> None:
    try:
        shared = aiosync.inherited()
    except aiosync.SharingError as e:
        print("SharingError", e, flush=True)
        return
    for obj in shared.values():
        if isinstance(obj, Completion):
            obj.close()
    print("accepted", flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "hand-off":
        hand_off(sys.argv[2])
    elif sys.argv[1] == "inherit":
        inherit()
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}")
