"""The public surface is pinned: a change here is a deliberate API change."""

from __future__ import annotations

import asyncio

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
            "Role",
            "SeqCount",
            "SeqRecord",
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


async def test_runs_on_both_loops() -> None:
    # The harness parametrizes every async test over the two loops.
    assert asyncio.get_running_loop().is_running()
