"""Handing aiosync objects to other processes.

Theory of operation
-------------------
An aiosync object is its fds plus a little state. To share it with a child started by
`create_subprocess_exec`, the parent passes the fds (``pass_fds`` keeps their numbers)
and describes them in one environment variable, ``AIOSYNC_SHARED``: JSON of the form
``{"aiosync": 1, "objects": {name: {"type": ..., "state": {...}, "fds": {key: fd}}}}``.
`inherited()` in the child reads it once, rebuilds the objects, and removes the variable
so that the child's own children do not mistake it for theirs.

The description is untrusted, and the fds it names may be the application's own, so
sharing is all or nothing (docs/design.md §7) and `inherited()` works in two phases.
First it checks every entry (fields, types, and each fd: open, of the kind its type
says, not claimed twice) without changing anything. Only if every entry passes does it
adopt them: each fd is made ours (close-on-exec, non-blocking) and the objects are
built. Anything wrong is a `SharingError` naming the entry, and an fd that was not
adopted is left exactly as it was.

Each shareable type (registered with `shareable`) provides:

* ``_share(for_exec) -> (state, fds)``: what the other process needs, or `SharingError`
  saying why this object cannot go. ``for_exec`` is True for `create_subprocess_exec`
  (the child's side of the object) and False for pickling into a multiprocessing child
  (the whole object).
* ``_after_share(pid)``: run in the parent after the child `pid` started (Barrier takes
  the PARENT role there, closing the child's pipe end, and remembers the pid).
* ``_unshare(state, fds, name) -> Adoption`` (classmethod): check an untrusted
  description, changing nothing, and return how to adopt it (phase two).

Two objects may name the same fd only when they share memory: a `SeqRecord` and its own
``seqcount``. The fd is passed once, and the process that receives both builds the
counter as the record's ``seqcount`` (see ``_seqcount.py``).

Pickling (``__reduce__`` = `reduce`) works only while multiprocessing starts a child
(spawn, forkserver), where its ``DupFd`` passes the fds, each fd once per child; under
fork, Process arguments are inherited, not pickled.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing.context
import multiprocessing.reduction
import os
import reprlib
import weakref
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from . import _fd
from ._errors import SharingError
from ._resource import Resource

__all__ = ["ENV_VAR", "create_subprocess_exec", "inherited"]

ENV_VAR = "AIOSYNC_SHARED"
FORMAT = 1


class Adoption:
    """An entry of a description that passed every check: how to adopt it.

    ``adopt()`` makes `fds` ours and builds the object. It may fail only with `OSError`,
    `MemoryError` or `SharingError`, and then before it changed any fd. `memory` is set
    by types over shared memory: two entries may name the same fd if they are of
    different types over the same memory (a SeqRecord and its seqcount).
    """

    __slots__ = ("adopt", "fds", "memory", "type")

    def __init__(
        self,
        type: type,
        fds: Iterable[int],
        adopt: Callable[[], Resource],
        memory: tuple[int, ...] | None = None,
    ) -> None:
        self.type = type
        self.fds = tuple(fds)
        self.adopt = adopt
        self.memory = memory

    def may_share_fds_with(self, other: Adoption) -> bool:
        return (
            other is not self
            and self.memory is not None
            and self.memory == other.memory
            and self.type is not other.type
        )


class Shareable(Protocol):
    _closed: bool

    def _share(self, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]: ...

    def _after_share(self, pid: int) -> None: ...

    @classmethod
    def _unshare(cls, state: dict[str, Any], fds: dict[str, int], name: str) -> Adoption: ...

    def close(self) -> None: ...


S = TypeVar("S", bound=type)

_types: dict[str, type[Shareable]] = {}
_refusals: dict[type, str] = {}


def shareable(cls: S) -> S:
    """Class decorator: make `cls` known to `inherited()` and pickling."""
    _types[cls.__name__] = cls
    return cls


def unshareable(why: str) -> Callable[[S], S]:
    """Class decorator: an aiosync object that is never shared, and `why`."""

    def register(cls: S) -> S:
        _refusals[cls] = why
        return cls

    return register


_show = reprlib.Repr()
_show.maxlevel = 3
_show.maxstring = _show.maxother = 60


def show(value: object) -> str:
    """A short repr of a value from an untrusted description (deep or huge ones too)."""
    return _show.repr(value)


def invalid(name: str, why: str) -> SharingError:
    return SharingError(f"shared object {show(name)}: {why}")


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
            parts.append(f"unexpected {show(sorted(extra))}")
        raise invalid(name, "fields: " + ", ".join(parts))


def _describe(obj: object, *, for_exec: bool) -> tuple[dict[str, Any], dict[str, int]]:
    """The state and fds another process needs to rebuild `obj`.

    `TypeError` if `obj` is not an aiosync object; `SharingError` saying why if it is one
    that cannot be shared (never, or not as it is now).
    """
    cls = type(obj)
    why = _refusals.get(cls)
    if why is not None:
        raise SharingError(why)
    if _types.get(cls.__name__) is not cls:
        raise TypeError(
            f"{show(obj)} is not an aiosync object; a Barrier, Completion, SeqCount or "
            "SeqRecord is expected"
        )
    shared: Shareable = obj  # type: ignore[assignment]
    if shared._closed:
        raise SharingError(f"this {cls.__name__} was closed")
    return shared._share(for_exec)


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
    objects. The objects' fds are added to ``pass_fds`` (each once: a `SeqRecord` and
    its ``seqcount`` share one) and described in the ``AIOSYNC_SHARED`` environment
    variable (added to ``env``, or to a copy of ``os.environ``). Every other argument
    is passed on.

    After the child started, a shared `Barrier` takes the PARENT role here (the child's
    is CHILD) and knows the child's pid, so its waits notice the child's death; its
    CHILD side has gone to this one child. Everything is checked before the child
    starts, and a refusal changes nothing. If starting the child fails, nothing is
    changed and the error propagates. Cancellation behaves as asyncio's own.

    Args:
        program: the program to run, as for `asyncio.create_subprocess_exec`.
        *args: its arguments.
        share: the aiosync objects to hand over, by name (None or empty: none).
        **kwds: passed on to `asyncio.create_subprocess_exec`.

    Returns:
        The started `asyncio.subprocess.Process`.

    Raises:
        TypeError: ``share`` is not a mapping of non-empty str names to aiosync
            objects (`Barrier`, `Completion`, `SeqCount`, `SeqRecord`).
        SharingError: an aiosync object that cannot be shared, with the reason: a
            `BarrierGroup` (share its members, ``group[i]``, one per child), a Barrier
            whose role is set or whose CHILD side went to another child, a SeqCount
            over memory of your own, a closed object, one object under two names.
        OSError: the child could not be started (as from asyncio).
    """
    if share is None:
        return await asyncio.create_subprocess_exec(program, *args, **kwds)
    if not isinstance(share, Mapping):
        raise TypeError(
            "share must be a mapping of names to aiosync objects, like {'gate': barrier}, "
            f"not {type(share).__name__}"
        )
    if not share:
        return await asyncio.create_subprocess_exec(program, *args, **kwds)
    objects: dict[str, Any] = {}
    passed: dict[int, None] = {}  # ordered, each fd once
    names: dict[int, str] = {}
    for name, obj in share.items():
        if not isinstance(name, str) or not name:
            raise TypeError(f"share keys must be non-empty strings, not {show(name)}")
        try:
            state, fds = _describe(obj, for_exec=True)
        except SharingError as exc:
            raise SharingError(f"share[{name!r}]: {exc}") from None
        except TypeError as exc:
            raise TypeError(f"share[{name!r}]: {exc}") from None
        # One object under two names would pass its fds twice (the child refuses that)
        # and take its parent-side role twice here, after the child started.
        if id(obj) in names:
            raise SharingError(
                f"share[{name!r}] is the same object as share[{names[id(obj)]!r}]; "
                "share each object once"
            )
        names[id(obj)] = name
        objects[name] = {"type": type(obj).__name__, "state": state, "fds": fds}
        passed.update(dict.fromkeys(fds.values()))
    env = dict(os.environ if kwds.get("env") is None else kwds["env"])
    env[ENV_VAR] = json.dumps({"aiosync": FORMAT, "objects": objects}, separators=(",", ":"))
    kwds["env"] = env
    theirs = tuple(kwds.get("pass_fds", ()))
    kwds["pass_fds"] = (*theirs, *(fd for fd in passed if fd not in theirs))
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

    Sharing is all or nothing: every entry is checked before any fd is adopted or
    changed, so after a failure every fd the description names is exactly as it was
    (open, with its flags), and nothing of aiosync's is left open.

    Returns:
        A new dict of name to object on every call; the objects are the same.

    Raises:
        SharingError: and only that, naming the entry: the variable is missing,
            corrupted or forged, or an fd it names is not open, is claimed twice, or
            is not what it claims to be.
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
    objects = _parse(text)
    # Phase one: check everything, change nothing.
    adoptions: dict[str, Adoption] = {}
    claims: dict[int, list[Adoption]] = {}
    for name, entry in objects.items():
        if not isinstance(entry, dict) or set(entry) != {"type", "state", "fds"}:
            raise invalid(name, "malformed entry")
        type_name = entry["type"]
        if not isinstance(type_name, str) or type_name not in _types:
            raise invalid(name, f"unknown type {show(type_name)}")
        if not isinstance(entry["state"], dict) or not isinstance(entry["fds"], dict):
            raise invalid(name, "malformed state or fds")
        adoption = _types[type_name]._unshare(entry["state"], entry["fds"], name)
        for fd in adoption.fds:
            others = claims.setdefault(fd, [])
            if not all(other.may_share_fds_with(adoption) for other in others):
                raise invalid(name, f"fd {fd} is claimed twice")
            others.append(adoption)
        adoptions[name] = adoption
    # Phase two: adopt.
    built: dict[str, Resource] = {}
    try:
        for name, adoption in adoptions.items():
            built[name] = adopt(adoption, name)
    except BaseException:
        for obj in reversed(built.values()):
            obj.close()
        raise
    return dict(built)


def _parse(text: str) -> dict[str, Any]:
    """The ``objects`` of a description, checked as far as the envelope goes."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise SharingError(f"{ENV_VAR} is corrupted: not valid JSON") from None
    version = doc.get("aiosync") if isinstance(doc, dict) else None
    if type(version) is not int or version != FORMAT:
        raise SharingError(f"{ENV_VAR} is not an aiosync description (format {FORMAT})")
    objects = doc.get("objects")
    if not isinstance(objects, dict) or set(doc) != {"aiosync", "objects"}:
        raise SharingError(f"{ENV_VAR} is corrupted: bad 'objects'")
    return objects


def adopt(adoption: Adoption, name: str) -> Resource:
    """Phase two for one entry: adopt its fds and build it (`SharingError` if the kernel
    refuses, e.g. to map the memory, or the object is too large for this process; the
    entry's fds are then unchanged)."""
    try:
        return adoption.adopt()
    except OSError as exc:
        raise invalid(name, f"cannot adopt its fds: {exc.strerror or exc}") from exc
    except MemoryError:
        raise invalid(name, "cannot adopt its fds: too large for this process") from None


# ---------------------------------------------------------------------------------------
# Pickling into a multiprocessing child
# ---------------------------------------------------------------------------------------

# The fds passed to each child being started (its Popen), so that two objects over one
# fd (a SeqRecord and its seqcount) pass it once: multiprocessing refuses an fd twice.
_passed: weakref.WeakKeyDictionary[object, dict[int, Any]] = weakref.WeakKeyDictionary()


def spawning() -> object | None:
    """The multiprocessing child being started in this thread (its Popen), if any."""
    return multiprocessing.context.get_spawning_popen()


def reduce(obj: object) -> tuple[Any, ...]:
    """``__reduce__`` for aiosync objects: only into a multiprocessing child.

    `TypeError` when no child is being started (an fd number means nothing elsewhere);
    `SharingError`, with the reason, for an object that cannot be shared.
    """
    popen = spawning()
    why = _refusals.get(type(obj))
    if popen is None and why is not None:
        raise TypeError(f"cannot pickle a {type(obj).__name__}: {why}")
    if popen is None:
        raise TypeError(
            f"{type(obj).__name__} objects pickle only as arguments of a multiprocessing "
            "child being started (spawn or forkserver); to share with another program "
            "use aiosync.create_subprocess_exec(..., share={...})"
        )
    state, fds = _describe(obj, for_exec=False)
    passed = _passed.setdefault(popen, {})
    dupfds = {}
    for key, fd in fds.items():
        if fd not in passed:
            passed[fd] = multiprocessing.reduction.DupFd(fd)
        dupfds[key] = passed[fd]
    return _rebuild, (type(obj).__name__, state, dupfds)


def _rebuild(type_name: str, state: dict[str, Any], dupfds: dict[str, Any]) -> object:
    fds = {key: dupfd.detach() for key, dupfd in dupfds.items()}
    return adopt(_types[type_name]._unshare(state, fds, type_name), type_name)
