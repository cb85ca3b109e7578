"""Handing aiosync objects to other processes.

Theory of operation
-------------------
An aiosync object is its fds plus a little state. To share it with a child started by
`create_subprocess_exec`, the parent passes the fds (``pass_fds`` keeps their numbers)
and describes them in one environment variable, ``AIOSYNC_SHARED``: JSON of the form
``{"aiosync": 1, "objects": {name: {"type": ..., "state": {...}, "fds": {key: fd}}}}``.
`inherited()` in the child reads it once, checks every field and every fd (an fd must
be open and of the kind its type says), rebuilds the objects, and removes the variable
so that the child's own children do not mistake it for theirs.

Each shareable type (registered with `shareable`) provides:

* ``_share(for_exec) -> (state, fds)``: what the other process needs. ``for_exec`` is
  True for `create_subprocess_exec` (the child's side of the object) and False for
  pickling into a multiprocessing child (the whole object).
* ``_after_share(pid)``: run in the parent after the child `pid` started (Barrier takes
  the PARENT role there, closing the child's pipe end, and remembers the pid).
* ``_unshare(state, fds, name)`` (classmethod): rebuild from an untrusted description,
  raising `SharingError` for anything wrong.

Pickling (``__reduce__`` = `reduce`) works only while multiprocessing starts a child
(spawn, forkserver), where its ``DupFd`` passes the fds; under fork, Process arguments
are inherited, not pickled.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing.context
import multiprocessing.reduction
import os
from collections.abc import Collection, Mapping
from typing import Any, Protocol, Self, TypeVar

from . import _fd
from ._errors import SharingError

__all__ = ["ENV_VAR", "create_subprocess_exec", "inherited"]

ENV_VAR = "AIOSYNC_SHARED"
FORMAT = 1


class Shareable(Protocol):
    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]: ...

    def _after_share(self, pid: int) -> None: ...

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Self: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=type)

_types: dict[str, type[Shareable]] = {}


def shareable(cls: S) -> S:
    """Class decorator: make `cls` known to `inherited()` and pickling."""
    _types[cls.__name__] = cls
    return cls


def invalid(name: str, why: str) -> SharingError:
    return SharingError(f"shared object {name!r}: {why}")


def expect_keys(
    name: str, got: Mapping[str, object], required: Collection[str], optional: Collection[str] = ()
) -> None:
    missing = set(required) - set(got)
    extra = set(got) - set(required) - set(optional)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {sorted(missing)}")
        if extra:
            parts.append(f"unexpected {sorted(extra)}")
        raise invalid(name, "fields: " + ", ".join(parts))


async def create_subprocess_exec(
    program: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    *args: str | bytes | os.PathLike[str] | os.PathLike[bytes],
    share: Mapping[str, object] | None = None,
    **kwds: Any,
) -> asyncio.subprocess.Process:
    """`asyncio.create_subprocess_exec` that hands aiosync objects to the child.

    Use it to start a child that shares a `Barrier`, `Completion`, `SeqRecord` (or a
    record's `SeqCount`) with this process. ``share`` maps names to aiosync objects;
    in the child, `aiosync.inherited()` returns the same names mapped to rebuilt
    objects. The objects' fds are added to ``pass_fds`` and described in the
    ``AIOSYNC_SHARED`` environment variable (added to ``env``, or to a copy of
    ``os.environ``). Every other argument is passed on.

    After the child started, a shared `Barrier` takes the PARENT role here (the child's
    is CHILD) and knows the child's pid, so its waits notice the child's death. If
    starting the child fails, nothing is changed and the error propagates.
    Cancellation behaves as asyncio's own.

    Args:
        program: the program to run, as for `asyncio.create_subprocess_exec`.
        *args: its arguments.
        share: the aiosync objects to hand over, by name (None or empty: none).
        **kwds: passed on to `asyncio.create_subprocess_exec`.

    Returns:
        The started `asyncio.subprocess.Process`.

    Raises:
        TypeError: a ``share`` key is not a non-empty string, or a value is not an
            aiosync object.
        SharingError: an object cannot be shared: a Barrier whose role is already
            set, one object under two names, a SeqCount over memory of your own
            (raised before anything starts).
        ClosedResourceError: a shared object was closed.
        OSError: the child could not be started (as from asyncio).
    """
    if not share:
        return await asyncio.create_subprocess_exec(program, *args, **kwds)
    objects: dict[str, Any] = {}
    passed: list[int] = []
    names: dict[int, str] = {}
    for name, obj in share.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"share keys must be non-empty strings, not {name!r}")
        cls = _types.get(type(obj).__name__)
        if cls is None or type(obj) is not cls:
            raise TypeError(f"share[{name!r}] is not an aiosync object: {obj!r}")
        # One object under two names would pass its fds twice (the child refuses that)
        # and take its parent-side role twice here, after the child started.
        if id(obj) in names:
            raise SharingError(
                f"share[{name!r}] is the same object as share[{names[id(obj)]!r}]; "
                "share each object once"
            )
        names[id(obj)] = name
        state, fds = obj._share(True)
        objects[name] = {"type": cls.__name__, "state": state, "fds": fds}
        passed.extend(fds.values())
    env = dict(os.environ if kwds.get("env") is None else kwds["env"])
    env[ENV_VAR] = json.dumps({"aiosync": FORMAT, "objects": objects}, separators=(",", ":"))
    kwds["env"] = env
    kwds["pass_fds"] = (*kwds.get("pass_fds", ()), *passed)
    proc = await asyncio.create_subprocess_exec(program, *args, **kwds)
    for fd in passed:
        # uvloop leaves passed fds inheritable; a later child must not get them.
        _fd.own(fd)
    for obj in share.values():
        obj._after_share(proc.pid)  # type: ignore[attr-defined]
    return proc


_inherited: dict[str, object] | None = None


def inherited() -> dict[str, object]:
    """The aiosync objects the parent shared with this process, by name.

    Call it in a child started by `aiosync.create_subprocess_exec(..., share=...)`.
    The first call rebuilds the objects (a Barrier comes with role CHILD) and removes
    ``AIOSYNC_SHARED`` from the environment; later calls return the same objects.

    Returns:
        A new dict of name to object on every call; the objects are the same.

    Raises:
        SharingError: the variable is missing, corrupted or forged, or an fd it
            names is not open or not what it claims to be. Nothing is left open then.
    """
    global _inherited
    if _inherited is None:
        text = os.environ.get(ENV_VAR)
        if text is None:
            raise SharingError(
                f"no aiosync objects were shared with this process ({ENV_VAR} is not set); "
                "start it with aiosync.create_subprocess_exec(..., share={...})"
            )
        _inherited = _rebuild_all(text)
        os.environ.pop(ENV_VAR, None)
    return dict(_inherited)


def _rebuild_all(text: str) -> dict[str, object]:
    try:
        doc = json.loads(text)
    except ValueError:
        raise SharingError(f"{ENV_VAR} is corrupted: not valid JSON") from None
    if not isinstance(doc, dict) or doc.get("aiosync") != FORMAT:
        raise SharingError(f"{ENV_VAR} is not an aiosync description (format {FORMAT})")
    objects = doc.get("objects")
    if not isinstance(objects, dict) or set(doc) != {"aiosync", "objects"}:
        raise SharingError(f"{ENV_VAR} is corrupted: bad 'objects'")
    seen: set[int] = set()
    for name, entry in objects.items():
        if not isinstance(entry, dict) or set(entry) != {"type", "state", "fds"}:
            raise invalid(name, "malformed entry")
        if entry["type"] not in _types:
            raise invalid(name, f"unknown type {entry['type']!r}")
        if not isinstance(entry["state"], dict) or not isinstance(entry["fds"], dict):
            raise invalid(name, "malformed state or fds")
        for fd in entry["fds"].values():
            if isinstance(fd, int) and fd in seen:
                raise invalid(name, f"fd {fd} is claimed twice")
            if isinstance(fd, int):
                seen.add(fd)
    built: dict[str, object] = {}
    try:
        for name, entry in objects.items():
            built[name] = _types[entry["type"]]._unshare(entry["state"], entry["fds"], name)
    except BaseException:
        for obj in built.values():
            obj.close()  # type: ignore[attr-defined]
        raise
    return built


def reduce(obj: Shareable) -> tuple[Any, ...]:
    """``__reduce__`` for aiosync objects: only into a multiprocessing child."""
    if multiprocessing.context.get_spawning_popen() is None:
        raise TypeError(
            f"{type(obj).__name__} objects pickle only as arguments of a multiprocessing "
            "child being started (spawn or forkserver); to share with another program "
            "use aiosync.create_subprocess_exec(..., share={...})"
        )
    state, fds = obj._share(False)
    dupfds = {key: multiprocessing.reduction.DupFd(fd) for key, fd in fds.items()}
    return _rebuild, (type(obj).__name__, state, dupfds)


def _rebuild(type_name: str, state: dict[str, Any], dupfds: dict[str, Any]) -> object:
    fds = {key: dupfd.detach() for key, dupfd in dupfds.items()}
    return _types[type_name]._unshare(state, fds, type_name)
