"""Which names appeared in or left a folder, as the kernel tells it (inotify), without listing the folder.

Listing a folder of 100,000 job files costs about 30 ms whatever the code does with the names; the
kernel's inotify queue says exactly which names changed. One inotify instance per process serves
every watched folder (the kernel allows a user only 128 instances by default), and it is made again
after a fork: a queue shared by two processes would hand each event to only one of them.

A watch never guesses: whenever it cannot vouch for what it reports (the kernel's queue overflowed,
the folder was removed or replaced, the process forked, too many events waited unread),
`changes()` answers None and the caller lists the folder once more. A caller must list the folder
only after `open_watch` returned: an event of a change made meanwhile is then both in the listing
and in the queue, and applying each name's last event over the listing gives the folder as it is.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import weakref
from pathlib import Path
from typing import Dict, Optional, Set, Tuple

try:
    import inotify_simple
except ImportError:  # not Linux, or not installed: every caller lists its folder instead
    inotify_simple = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

Changes = Tuple[Set[str], Set[str]]  # (names that appeared, names that left) since the last call

if inotify_simple is not None:
    _f = inotify_simple.flags
    _APPEAR = _f.CREATE | _f.MOVED_TO
    _LEAVE = _f.DELETE | _f.MOVED_FROM
    # The folder itself gone, moved, or its file system unmounted: its name no longer means this watch.
    _LOST = _f.DELETE_SELF | _f.MOVE_SELF | _f.IGNORED | _f.UNMOUNT
    _OVERFLOW = _f.Q_OVERFLOW
    _MASK = _APPEAR | _LEAVE | _f.DELETE_SELF | _f.MOVE_SELF | _f.ONLYDIR
# Past this many changed names unread, a folder forgets them and is listed again: memory stays bounded
# for a folder that changes often and is seldom asked about.
MAX_UNREAD = 10_000
READ_BYTES = 1 << 16


class FolderWatch:
    """The changes of one folder since the last `changes()`; made by `open_watch`."""

    def __init__(self, hub: "_Hub", wd: int) -> None:
        self._hub = hub
        self._wd = wd
        self._names: Dict[str, bool] = {}  # name -> present, the last event of each name wins
        self._lost = False

    def changes(self) -> Optional[Changes]:
        """(appeared, left) since the last call; None when the folder must be listed again."""
        with _lock:
            if self._hub is _hub_of_this_process():
                self._hub.drain()
            else:
                self._lost = True
            if self._lost:
                return None
            names, self._names = self._names, {}
        appeared = {n for n, present in names.items() if present}
        return appeared, set(names) - appeared

    def wait(self, timeout: float, wake_fd: Optional[int] = None) -> Optional[Changes]:
        """The changes since the last call, at once if there are some, else once the kernel reports one,
        *wake_fd* is readable or *timeout* seconds have passed (then possibly none); None as changes() says."""
        changed = self.changes()
        if changed is None or changed[0] or changed[1]:
            return changed
        select.select([self._hub.inotify.fileno(), *(() if wake_fd is None else (wake_fd,))], [], [], timeout)
        return self.changes()

    @property
    def usable(self) -> bool:
        """False once the watch can no longer vouch for the folder: open a new one."""
        with _lock:
            return not self._lost and self._hub is _hub_of_this_process()

    def close(self) -> None:
        with _lock:
            self._lost = True
            if self._hub.pid == os.getpid():  # a forked child shares its parent's instance: not its to change
                self._hub.forget(self._wd, self)

    def _event(self, mask: int, name: str) -> None:
        if mask & _LOST:
            self._lost = True
        elif mask & (_APPEAR | _LEAVE) and name:
            self._names[name] = bool(mask & _APPEAR)
            if len(self._names) > MAX_UNREAD:
                self._lost = True
        if self._lost:
            self._names = {}


class _Hub:
    """This process's inotify instance and the folders it watches."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.inotify = inotify_simple.INotify(nonblocking=True)
        # Two indexes of one folder share its wd: the kernel gives a folder one watch per instance.
        self.watches: Dict[int, "weakref.WeakSet[FolderWatch]"] = {}

    def drain(self) -> None:
        """Hand every queued event to its folder; after an overflow of the kernel's queue, every folder
        watched is lost (it must be listed again)."""
        fd = self.inotify.fileno()
        while True:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            for event in inotify_simple.parse_events(data):
                if event.mask & _OVERFLOW:
                    log.warning("inotify queue overflowed: every watched folder is listed again")
                    for wd, watches in list(self.watches.items()):
                        for watch in list(watches):
                            watch._event(_f.IGNORED, "")
                            self.forget(wd, watch)
                    continue
                watches = self.watches.get(event.wd)
                if watches is not None and not watches:  # every index of that folder was dropped
                    self._remove(event.wd)
                for watch in list(watches or ()):
                    watch._event(event.mask, event.name)
                    if watch._lost:
                        self.forget(event.wd, watch)

    def forget(self, wd: int, watch: FolderWatch) -> None:
        watches = self.watches.get(wd)
        if watches is None or watch not in watches:
            return
        watches.discard(watch)
        if not watches:
            self._remove(wd)

    def _remove(self, wd: int) -> None:
        del self.watches[wd]
        try:
            self.inotify.rm_watch(wd)
        except OSError:  # the kernel dropped it already (the folder was removed)
            pass


_lock = threading.Lock()
_hub: Optional[_Hub] = None
_unavailable_logged = False


def _hub_of_this_process() -> Optional[_Hub]:
    """The process's hub, made on first use and again in a forked child; None when inotify cannot be had."""
    global _hub, _unavailable_logged
    if _hub is not None and _hub.pid == os.getpid():
        return _hub
    _hub = None  # a parent's hub: its queue is the parent's too
    if inotify_simple is None:
        return None
    try:
        _hub = _Hub()
    except OSError as exc:  # EMFILE: the user's inotify instances (max_user_instances) are used up
        if not _unavailable_logged:
            log.warning("inotify unavailable (%s): folders of operations are listed on each change", exc)
            _unavailable_logged = True
    return _hub


def open_watch(path: Path) -> Optional[FolderWatch]:
    """A watch of *path*'s names, or None (no inotify, no such folder, out of watches)."""
    with _lock:
        hub = _hub_of_this_process()
        if hub is None:
            return None
        try:
            wd = hub.inotify.add_watch(path, _MASK)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                log.warning("cannot watch %s (%s): it is listed on each change", path, exc)
            return None
        watch = FolderWatch(hub, wd)
        hub.watches.setdefault(wd, weakref.WeakSet()).add(watch)
        return watch
