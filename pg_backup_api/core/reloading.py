"""A value loaded from files and loaded again only when they change: the tokens and Barman's configuration."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Generic, Hashable, Optional, TypeVar

from pg_backup_api.core.errors import ApiError

T = TypeVar("T")
_STALE = object()  # the stamp of a value whose files changed while it was loaded: it never matches


@dataclass(frozen=True)
class _Loaded(Generic[T]):
    stamp: Hashable
    value: Optional[T]
    error: Optional[ApiError]


class Reloading(Generic[T]):
    """*load()*'s value, kept while *stamp(value)* stays what it was when the value was loaded.

    *stamp(None)* describes the files a load reads (or fails on); *stamp(value)* may describe more,
    those the value names. A failed load (an ApiError) is kept too, until its files change.
    Stamps should hold the mtime, ctime, size and inode: one change within the mtime's tick then
    still changes the size, the ctime or (for a file replaced atomically) the inode.
    """

    def __init__(self, load: Callable[[], T], stamp: Callable[[Optional[T]], Hashable]) -> None:
        self._load = load
        self._stamp = stamp
        self._loaded: Optional[_Loaded[T]] = None
        self._lock = threading.Lock()

    def get(self) -> T:
        loaded = self._loaded
        if loaded is None or self._stamp(loaded.value) != loaded.stamp:
            with self._lock:
                loaded = self._loaded
                if loaded is None or self._stamp(loaded.value) != loaded.stamp:
                    loaded = self._loaded = self._reload()
        if loaded.error is not None:
            raise loaded.error
        assert loaded.value is not None
        return loaded.value

    def _reload(self) -> _Loaded[T]:
        before = self._stamp(None)
        try:
            value = self._load()
        except ApiError as exc:
            return _Loaded(before, None, exc)
        changed = self._stamp(None) != before
        return _Loaded(_STALE if changed else self._stamp(value), value, None)
