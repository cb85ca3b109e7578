"""`GroupResult` names children by pid and, for code that thinks in member order, by
member index. (The group's own waits, across real children, are in test_group.py.)"""

from __future__ import annotations

import pytest

from aiosync import GroupResult


def test_members_by_index() -> None:
    result = GroupResult(synced=(10, 30), died=(20,), stopped=(40,), pids=(10, 20, 30, 40))
    assert result.synced_members == (0, 2)
    assert result.died_members == (1,)
    assert result.aborted_members == ()
    assert result.stopped_members == (3,)
    assert result.member(30) == 2


def test_an_unknown_pid_is_no_member() -> None:
    result = GroupResult(synced=(10,), pids=(10,))
    with pytest.raises(ValueError, match="pid 99 is not a child of this group"):
        result.member(99)


def test_equality_is_about_the_outcomes() -> None:
    assert GroupResult(synced=(10,), pids=(10,)) == GroupResult(synced=(10,))
    assert GroupResult(synced=(10,)) != GroupResult(died=(10,))
