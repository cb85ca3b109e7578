"""Type stub of the C extension aiosync/_waitc.c (the wait core's per-event half)."""

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, Generic, TypeVar

C = TypeVar("C")
R = TypeVar("R")

PENDING: Final[int]
RELEASED: Final[int]
ABANDONED: Final[int]

class Waiter(Generic[C, R]):
    future: asyncio.Future[R]
    state: int
    def __init__(self, future: asyncio.Future[R], cond: C, slot: LoopSlot[C, R]) -> None: ...
    @property
    def cond(self) -> C: ...
    @property
    def slot(self) -> LoopSlot[C, R]: ...
    def release(self, result: R) -> None: ...
    def fail(self, exc: BaseException) -> None: ...
    def _abandon(self) -> None: ...

class LoopSlot(Generic[C, R]):
    waiters: deque[Waiter[C, R]]
    woken: Waiter[C, R] | None
    live: int
    registered: bool
    stale: bool
    def __init__(
        self, queue: Core[C, R], loop: asyncio.AbstractEventLoop, stale_events: bool
    ) -> None: ...
    @property
    def queue(self) -> Core[C, R]: ...
    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...
    @property
    def stale_events(self) -> bool: ...
    @property
    def thread(self) -> int: ...

class Core(Generic[C, R]):
    lock: threading.RLock
    waiting: int
    turns: int
    blockers: dict[int, int]
    _owner: weakref.ref[Any]
    _slots: dict[asyncio.AbstractEventLoop, LoopSlot[C, R]]
    _fds: tuple[int, ...]
    _closed_error: Callable[[], BaseException]
    _closed: bool
    def park(self, cond: C) -> Waiter[C, R]: ...
    def first(self, slot: LoopSlot[C, R]) -> Waiter[C, R] | None: ...
    def pending(self, slot: LoopSlot[C, R]) -> list[Waiter[C, R]]: ...
    def ring(self, slot: LoopSlot[C, R], result: R) -> None: ...

class BarrierCore:
    _waitq: Core[Any, bool]
    _barriers: int
    _me: int
    _them: int
    _pipe_r: int
    _pipe_w: int
    _i_aborted: bool
    _they_aborted: bool
    _peer_exited: bool
    @property
    def _pipe_end(self) -> int: ...
    def _on_readable(self, slot: LoopSlot[Any, bool], fd: int) -> None: ...
    def _pump(self, cond: object, /) -> None: ...
    def _wake(self) -> None: ...
    def _verdict(self, cond: object, /) -> bool | None: ...
    def _apply(self, value: int, /) -> None: ...

def dispatch(queue_ref: weakref.ref[Any], slot: LoopSlot[Any, Any], fd: int) -> None: ...
def _set_result(future: asyncio.Future[Any], result: Any, /) -> None: ...
def _set_exception(future: asyncio.Future[Any], exc: BaseException, /) -> None: ...
