"""The exceptions aiosync raises itself. All derive from `AiosyncError`."""

from __future__ import annotations

__all__ = [
    "AiosyncError",
    "BrokenResourceError",
    "BusyResourceError",
    "ClosedResourceError",
    "SharingError",
    "WouldBlock",
]


class AiosyncError(Exception):
    """Base class of every exception aiosync raises itself."""


class WouldBlock(AiosyncError):
    """A ``*_nowait`` call could not finish without waiting."""


class ClosedResourceError(AiosyncError):
    """The object was closed in this process (by ``close()`` or ``with``) and then used."""


class BusyResourceError(AiosyncError):
    """The object is in use in a way that excludes this call, e.g. a second writer."""


class BrokenResourceError(AiosyncError):
    """The object was broken from outside, e.g. its writer died in the middle of a write."""


class SharingError(AiosyncError):
    """Objects handed to this process could not be rebuilt.

    Raised by `aiosync.inherited()` when the description of the shared objects is
    missing, corrupted or forged, or when a file descriptor it names is not what it
    claims to be; and by the sharing side when an object cannot be shared.
    """
