"""The public surface is pinned: a change here is a deliberate API change."""

from __future__ import annotations

import inspect
from collections import defaultdict

import pytest
from support import loop_kind

import aiosync


def test_public_names() -> None:
    assert sorted(aiosync.__all__) == sorted(
        [
            "AiosyncError",
            "Barrier",
            "BarrierGroup",
            "BrokenResourceError",
            "BusyResourceError",
            "ClosedResourceError",
            "Completion",
            "GroupResult",
            "Lock",
            "Role",
            "SeqCount",
            "SeqRecord",
            "Semaphore",
            "SharingError",
            "WouldBlock",
            "create_subprocess_exec",
            "inherited",
        ]
    )
    for name in aiosync.__all__:
        assert getattr(aiosync, name).__module__.startswith("aiosync")


def test_errors_share_one_base() -> None:
    for name in ["WouldBlock", "ClosedResourceError", "BusyResourceError"]:
        assert issubclass(getattr(aiosync, name), aiosync.AiosyncError)
    assert issubclass(aiosync.BrokenResourceError, aiosync.AiosyncError)
    assert issubclass(aiosync.SharingError, aiosync.AiosyncError)


async def test_runs_on_the_loop_its_id_names(request: pytest.FixtureRequest) -> None:
    # The harness parametrizes every async test over the two loops; each runs on the
    # loop it is named after.
    assert request.node.callspec.id.split("-")[0] == loop_kind()


def test_every_async_test_runs_on_both_loops(request: pytest.FixtureRequest) -> None:
    loops: dict[str, set[str]] = defaultdict(set)
    for item in request.session.items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            params = getattr(item, "callspec", None)
            kind = params.id.split("-")[0] if params is not None else "none"
            loops[item.nodeid.split("[")[0]].add(kind)
    assert loops, "no async test collected"
    wrong = {test: kinds for test, kinds in loops.items() if kinds != {"asyncio", "uvloop"}}
    assert not wrong, f"async tests not run on both loops: {wrong}"
