"""The life cycle every aiosync object shares: ``with``, close-once, ``ResourceWarning``."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Self

from ._errors import ClosedResourceError


class Resource:
    """Mixin: a subclass sets ``_closed`` and implements an idempotent ``close()``.

    Using the object after ``close()`` raises `ClosedResourceError` (through
    ``_check_open``); leaving a ``with`` block closes it; an object dropped unclosed
    warns with `ResourceWarning` and is closed.
    """

    __slots__ = ()
    _closed: bool

    def close(self) -> None:
        raise NotImplementedError

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"this {type(self).__name__} was closed")

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _warns_unclosed(self) -> bool:
        """Whether dropping this object unclosed is the user's mistake (and warns)."""
        return True

    def _unclosed_description(self) -> str:
        """How the warning names the object; must not need /proc (interpreter exit)."""
        return repr(self)

    def __del__(self, _finalizing: Callable[[], bool] = sys.is_finalizing) -> None:
        # At interpreter exit the process closes every fd anyway, and module globals
        # (threading, os) may already be gone: nothing to warn about or do.
        if getattr(self, "_closed", True) or _finalizing():
            return
        if self._warns_unclosed():
            what = self._unclosed_description()
            warnings.warn(f"unclosed {what}", ResourceWarning, source=self, stacklevel=1)
        self.close()
