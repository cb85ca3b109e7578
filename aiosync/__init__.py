"""aiosync: asyncio-native inter-process synchronization primitives for Linux.

Every wait is a file descriptor registered with the running event loop, on the
standard loop and on uvloop alike. See the documentation in ``docs/``.
"""

import sys

if not sys.platform.startswith("linux"):  # pragma: no cover - tested only on Linux
    raise ImportError(
        f"aiosync works on Linux only (eventfd, memfd, /proc); this is {sys.platform!r}"
    )

from ._barrier import Barrier, Role
from ._completion import Completion
from ._errors import (
    AiosyncError,
    BrokenResourceError,
    BusyResourceError,
    ClosedResourceError,
    SharingError,
    WouldBlock,
)
from ._group import BarrierGroup, GroupResult
from ._lock import Lock, Semaphore
from ._seqcount import SeqCount, SeqRecord
from ._share import create_subprocess_exec, inherited

__all__ = [
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
    "Semaphore",
    "SeqCount",
    "SeqRecord",
    "SharingError",
    "WouldBlock",
    "create_subprocess_exec",
    "inherited",
]

__version__ = "0.1.0.dev0"
