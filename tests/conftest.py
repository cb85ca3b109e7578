"""Test harness shared by every test module; the helpers themselves live in `support`.

* Every async test runs on the standard asyncio loop and on uvloop, through
  pytest-asyncio's loop-factory parametrization (uvloop is required, not optional).
* Cross-process tests use real processes, ordered with explicit hand-shakes, never
  with sleeps; "this blocks" is a bounded wait (`support.assert_blocks`).

Forking and timeouts
--------------------
Many tests fork, and a fork from a process with more than one thread can deadlock in
the child (a lock some other thread held at the fork stays held for ever). CPython 3.12+
warns about it, and 3.15 raises the warning under ``filterwarnings = error`` *after*
forking, leaving the child behind. So the test process keeps to one thread whenever a
test forks:

* No timer thread. pytest-timeout's thread method starts one per test; instead the
  timeout is a SIGALRM (`support.timeouts`), armed through pytest-timeout's hooks
  (``timeout_method = "signal"`` in pyproject.toml, our hook implements it). Its
  exception is a ``SystemExit``, which both loops let out of a callback, so a test
  hung in its loop and a callback stuck in the loop both end as that test's failure.
  pytest-timeout's own signal method would not do: both loops catch and log its
  exception when it lands in a callback, and on uvloop even a test idly waiting in
  its loop never ends. Nor would ``faulthandler.dump_traceback_later``: it is a
  thread too.
* A second line of defence that is not a thread either: a watchdog *process*, started
  by ``subprocess`` when the session starts, ends the test process and its children if
  a test outlives its timeout by `support.timeouts.GRACE` seconds (a loop stuck in C,
  SIGALRM blocked or swallowed).
* The one fork-and-report harness (`support.Forked`) refuses to fork while another
  thread is alive, and reaps the child if the fork fails in the parent.

(Forking from a fork server started before any thread would not do: a forking test
hands its child closures over objects, fds and mappings that the test process created
after any server started.)
* `no_stray_threads` fails a test that leaves a thread running (one it started), so
  that the next forking test does not inherit it. Libraries that keep threads for the life of the
  process are told not to: numpy's OpenBLAS (imported by the chart tests through
  matplotlib) starts a thread pool at import unless ``OPENBLAS_NUM_THREADS=1``.

The one test that forks with a thread alive on purpose (a lock held at the fork, in
test_waitqueue.py) carries the one warning filter for it.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Iterator

import pytest
import uvloop
from support import (
    LOOP_KINDS,
    other_threads,
    pair,
    timeouts,
)
from support import fd_count as count_fds

from aiosync import Barrier

# Before any test module imports numpy (see "Forking and timeouts" above).
for _pool in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_pool] = "1"


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def pytest_configure(config: pytest.Config) -> None:
    timeouts.start_watchdog()


def pytest_unconfigure(config: pytest.Config) -> None:
    timeouts.stop_watchdog()


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_set_timer(item: pytest.Item, settings: object) -> bool | None:
    if getattr(settings, "method", None) != "signal":
        return None  # pytest-timeout's thread method, asked for explicitly
    timeouts.arm(item, float(getattr(settings, "timeout")))  # noqa: B009
    return True


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_timeout_cancel_timer(item: pytest.Item) -> bool | None:
    if getattr(item, "cancel_timeout", None) is not None:
        return None  # armed by pytest-timeout itself
    timeouts.disarm()
    return True


@pytest.fixture(autouse=True)
def no_stray_threads() -> Iterator[None]:
    """A test must not leave a thread running: the next test may fork. (A fixture of a
    wider scope may keep one for its tests, which then cannot fork, and must join it
    when it ends.)"""
    before = threading.enumerate()
    yield
    others = other_threads(known=before)
    assert not others, f"the test left threads running: {others}"


@pytest.fixture(params=LOOP_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """For synchronous tests that run loops themselves (e.g. around a fork)."""
    return str(request.param)


@pytest.fixture
def sides() -> Iterator[tuple[Barrier, Barrier]]:
    """`support.pair()`, closed after the test."""
    p, c = pair()
    yield p, c
    c.close()
    p.close()


@pytest.fixture
def fd_count() -> Callable[[], int]:
    return count_fds
