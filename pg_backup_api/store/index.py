"""The operation index of one store: what jobs/ and output/ hold, the only cache of operations.

Job and output files are write-once, so what was parsed of a file stays true for as long as its
name is there: when a folder changes, only the names that appeared or disappeared are read.

A directory's mtime moves on every create and unlink, but only at the file system's clock tick:
two changes within one tick share one mtime. So a scan is trusted to be complete only when it
started long enough after that mtime (settle_ns); until then every call lists jobs/ again (one
listdir, compared with the last one) and reads only the new names.

Listing 100,000 names costs about 30 ms, so on a local file system the index asks the kernel
instead (watch.py, inotify): it lists jobs/ once, then applies the names the kernel reports, and
lists again only when the watch cannot vouch for them. Network file systems are always listed:
inotify does not see another machine's changes.
"""

from __future__ import annotations

import bisect
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Dict, FrozenSet, List, NamedTuple, Optional, Set, Tuple

from pg_backup_api.core import ids
from pg_backup_api.core.errors import CorruptState
from pg_backup_api.core.model import parse_time
from pg_backup_api.core.records import write_json_atomic
from pg_backup_api.store import watch

log = logging.getLogger(__name__)

# How long after a folder's mtime a scan must start to have seen every change that mtime stands for.
# Local file systems stamp with this kernel's clock, coarse by one tick (10 ms at most): 100 ms is
# ample. Anything else (NFS, CIFS, FUSE: another machine's clock and tick), and a file system that
# keeps whole seconds, gets 1 s; on a network file system keep the clocks in sync.
SETTLE_NS = 1_000_000_000
LOCAL_SETTLE_NS = 100_000_000
LOCAL_FILE_SYSTEMS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "zfs", "f2fs", "bcachefs",
                                "jfs", "reiserfs", "nilfs2", "overlay"})
# More new ids than this: list output/ once rather than look up each id's output file.
PROBE_ONE_BY_ONE = 256
UNKNOWN_TYPE = "unknown"
CORRUPT_SUMMARY = {"success": False, "state": "corrupt"}
# How ended operations ended, kept for the next process: jobs/.index/ends.json (see OperationIndex.ends).
ENDS_FOLDER = ".index"
ENDS_FILE = "ends.json"
_CORRUPT = "\0corrupt"  # what _read_type says of a job file that cannot be read; no JSON type is it

ReadState = Callable[[Path], Optional[Dict[str, Any]]]
Stamp = Optional[Tuple[int, int]]  # (inode, mtime_ns) of a folder; None when it is missing


def _stamp(directory: Path) -> Stamp:
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _identity(directory: Path) -> Optional[Tuple[int, int]]:
    """(device, inode) of *directory*: which folder its path names now; None when it is missing."""
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def _trusted(stamp: Stamp, scan_started_ns: int, settle_ns: int) -> bool:
    """A scan that started after *stamp* had settled saw every change that *stamp* stands for."""
    if stamp is None:
        return True
    mtime = stamp[1]
    return scan_started_ns - mtime > (settle_ns if mtime % 1_000_000_000 else SETTLE_NS)


def settle_ns(directory: Path, mountinfo: str = "/proc/self/mountinfo") -> int:
    """How long after a change a scan of *directory* is trusted, by the type of its file system."""
    try:
        mounts = Path(mountinfo).read_text().splitlines()
    except OSError:
        return SETTLE_NS
    path = os.path.realpath(directory)
    best, fs_type = "", ""
    for line in mounts:
        fields = line.split()
        if "-" not in fields[6:]:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):  # the last of equal ones is mounted on top
            best, fs_type = mount_point, fields[fields.index("-", 6) + 1]
    return LOCAL_SETTLE_NS if fs_type in LOCAL_FILE_SYSTEMS else SETTLE_NS


class Listing:
    """The operations in chronological order: a list of dicts and its JSON, each made once, on first use."""

    def __init__(self, order: List[str], types: Dict[str, str], corrupt: FrozenSet[str],
                 type_json: Dict[str, str], appended_to: Optional["Listing"] = None) -> None:
        self.ids = order
        # Shared with the index, which only adds ids this listing does not hold; it copies the dict
        # before it drops or changes an entry.
        self._types = types
        self._type_json = type_json
        self._corrupt = corrupt
        # When this listing only adds ids at the end of another, its JSON extends the other's.
        self._appended_to = appended_to
        self._operations: Optional[List[Dict[str, str]]] = None
        self._body: Optional[bytes] = None
        self._lock = threading.Lock()

    @property
    def corrupt(self) -> FrozenSet[str]:
        """The ids whose job file cannot be read."""
        return self._corrupt

    def operations(self) -> List[Dict[str, str]]:
        """[{"id", "type"}] oldest first; `"state": "corrupt"` when the job file cannot be read. Not to be changed."""
        if self._operations is None:
            self._operations = [{"id": i, "type": UNKNOWN_TYPE, "state": "corrupt"} if i in self._corrupt
                                else {"id": i, "type": self._types[i]} for i in self.ids]
        return self._operations

    def body(self) -> bytes:
        """`{"operations": [...]}` as compact JSON and a newline."""
        if self._body is None:
            with self._lock:
                if self._body is None:
                    self._body = self._encode()
                    self._appended_to = None
        return self._body

    def _encode(self) -> bytes:
        base = self._appended_to
        if base is not None and base._body is not None and base.ids:
            added = self.ids[len(base.ids):]
            return base._body[:-len(b"]}\n")] + b"," + self._entries(added) + b"]}\n"
        return b'{"operations":[' + self._entries(self.ids) + b"]}\n"

    def _entries(self, order: List[str]) -> bytes:
        # Ids match ids.ID_PATTERN, so only the types need escaping; _type_json is only ever added to.
        corrupt = f'"type":{json.dumps(UNKNOWN_TYPE)},"state":"corrupt"'
        type_json, types = self._type_json, self._types
        return ",".join([f'{{"id":"{i}",{corrupt}}}' if i in self._corrupt else
                         f'{{"id":"{i}","type":{type_json[types[i]]}}}' for i in order]).encode()


class End(NamedTuple):
    """How an ended operation ended, as its (write-once) output file says."""

    summary: Dict[str, Any]  # its `success` and `state`; one dict shared by every equal end
    duration: Optional[float]  # seconds from its start_time to its end_time; None if either is missing


CORRUPT_END = End(CORRUPT_SUMMARY, None)


@dataclass(frozen=True)
class Snapshot:
    """The index at one moment; never changed, replaced when the folders change."""

    listing: Listing
    pending: List[str]  # ids with a job file and no output file yet, oldest first


@dataclass(frozen=True)
class _State:
    jobs: Stamp
    jobs_trusted: bool
    output: Stamp
    output_trusted: bool
    snapshot: Snapshot
    retry: bool = False  # corrupt job files are read again on each call: they may be repaired in place

    def current(self, jobs: Stamp, output: Stamp) -> bool:
        return (not self.retry and self.jobs_trusted and self.output_trusted and jobs == self.jobs
                and output == self.output)


@dataclass
class _Files:
    """What the index knows of the folders' contents; changed only under the index's lock."""

    # The last listing of jobs/, in directory order; None once names came from the watch instead.
    names: Optional[List[str]] = None
    name_set: Set[str] = field(default_factory=set)
    types: Dict[str, str] = field(default_factory=dict)  # id -> operation type, of readable job files
    corrupt: Set[str] = field(default_factory=set)  # ids whose job file cannot be read
    pending: Set[str] = field(default_factory=set)


class OperationIndex:
    """The operations of one jobs/ and output/ pair, kept up to date by reading only what changed."""

    def __init__(self, jobs_dir: Path, output_dir: Path, read: ReadState, settle: Optional[int] = None,
                 use_watch: Optional[bool] = None, read_job: Optional[ReadState] = None) -> None:
        self.jobs_dir = jobs_dir
        self.output_dir = output_dir
        self._read = read
        self._read_job = read_job or read  # a job file's reader may also refuse one that makes no sense
        self._settle = settle  # found on first use: a worker that never lists never reads the mount table
        self._use_watch = use_watch  # None: watch jobs/ when it is on a local file system
        self._watch: Optional[watch.FolderWatch] = None
        self._watched: Optional[Tuple[int, int]] = None  # (device, inode) of the folder watched
        self._files = _Files()
        self._type_json: Dict[str, str] = {}  # each type as JSON; only ever added to
        empty = Snapshot(Listing([], {}, frozenset(), self._type_json), [])
        self._state = _State(None, False, None, False, empty)
        self._lock = threading.Lock()
        self._type_names: Dict[str, str] = {}  # one str object per type, shared by every entry
        # How ended operations ended: output files are write-once.
        self._ends: Dict[str, End] = {}
        self._kept_read = False  # whether the ends an earlier process kept were taken in
        self._summaries: Dict[Tuple[Any, ...], Dict[str, Any]] = {}

    @property
    def settle_ns(self) -> int:
        if self._settle is None:
            self._settle = settle_ns(self.jobs_dir)
        return self._settle

    def snapshot(self) -> Snapshot:
        """The operations as the folders hold them now."""
        state = self._state
        if self._watch is None and state.current(_stamp(self.jobs_dir), _stamp(self.output_dir)):
            return state.snapshot
        with self._lock:
            state = self._state
            started = time.time_ns()  # before the folders are read: see _trusted
            listing, new, jobs, jobs_trusted = self._read_jobs(state)
            output = _stamp(self.output_dir)
            if listing is state.snapshot.listing and not new and state.current(jobs, output):
                return state.snapshot
            files = self._files
            pending = files.pending
            if new or not (state.output_trusted and output == state.output):
                # Output files appear for running operations only: look up theirs, never list output/.
                ended = self._with_output(pending | new)
                pending = (pending | new) - ended
            order = state.snapshot.pending
            if pending != set(order):
                order = sorted(pending, key=ids.sort_key)
                files.pending = pending
            snapshot = state.snapshot
            if listing is not snapshot.listing or order is not snapshot.pending:
                snapshot = Snapshot(listing, order)
            self._state = _State(jobs, jobs_trusted, output, _trusted(output, started, self.settle_ns),
                                 snapshot, bool(files.corrupt))
            return snapshot

    def _read_jobs(self, state: _State) -> Tuple[Listing, Set[str], Stamp, bool]:
        """The listing after what changed in jobs/, the ids that appeared, jobs/'s stamp and whether it is
        trusted (see _trusted); from the watch when there is one that vouches, else by listing jobs/."""
        listing = state.snapshot.listing
        started = time.time_ns()
        folder_watch, must_list = self._watch, False
        if folder_watch is not None:
            # Events come from the folder the watch was opened on: if the path names another one now
            # (replaced, or a file system mounted over it), that folder must be listed and watched.
            changes = folder_watch.changes() if _identity(self.jobs_dir) == self._watched else None
            if changes is not None:
                appeared, left = changes
                if appeared or left or state.retry:
                    listing, new = self._apply(listing, None, appeared, left)
                    return listing, new, state.jobs, True
                return listing, set(), state.jobs, True
            folder_watch.close()
            self._watch, must_list = None, True
        if self._use_watch or (self._use_watch is None and self.settle_ns == LOCAL_SETTLE_NS):
            # Opened before jobs/ is listed: a change made meanwhile is then in both (see watch.py). The
            # identity is taken first: a folder replaced in between only costs one more listing.
            self._watched = _identity(self.jobs_dir)
            self._watch = watch.open_watch(self.jobs_dir)
            must_list = must_list or self._watch is not None
        jobs = _stamp(self.jobs_dir)
        new: Set[str] = set()
        if must_list or state.retry or not (state.jobs_trusted and jobs == state.jobs):
            listing, new = self._scan_jobs(listing)
        return listing, new, jobs, self._watch is not None or _trusted(jobs, started, self.settle_ns)

    def _scan_jobs(self, listing: Listing) -> Tuple[Listing, Set[str]]:
        """The listing after listing jobs/ and reading what changed, and the ids that appeared."""
        files = self._files
        try:
            names = os.listdir(self.jobs_dir)
        except FileNotFoundError:
            names = []
        if names == files.names and not files.corrupt:
            return listing, set()
        known = files.name_set
        fresh = {n for n in names if n not in known}
        # Every known name still there (the usual case: nothing was removed) needs no second set.
        left = set() if len(names) - len(fresh) == len(known) else known - set(names)
        return self._apply(listing, names, fresh, left)

    def _apply(self, listing: Listing, names: Optional[List[str]], appeared_names: Set[str],
               left_names: Set[str]) -> Tuple[Listing, Set[str]]:
        """The listing after *appeared_names* came to jobs/ and *left_names* left it (only new job files are
        read; corrupt ones are read again), and the ids that appeared. *names*: jobs/ as listed, if it was."""
        files = self._files
        current = files.name_set
        fresh = appeared_names - current
        current -= left_names  # in place: no snapshot holds this set
        current |= fresh
        gone = {i for i in (n[:-5] for n in left_names if n.endswith(".json"))
                if i in files.types or i in files.corrupt}
        appeared = {n[:-5] for n in fresh if n.endswith(".json") and ids.is_valid_id(n[:-5])}
        # Copied before an entry is dropped or changed: an older listing may still be encoding it.
        types, corrupt = files.types, set(files.corrupt)
        if gone:
            types = {i: t for i, t in types.items() if i not in gone}
            corrupt -= gone
        repaired = False
        for op_id in sorted(corrupt):  # read again: a corrupt file may be repaired in place
            op_type = self._read_type(op_id)
            if op_type == _CORRUPT:
                continue
            corrupt.discard(op_id)
            repaired = True
            if op_type is None:
                gone.add(op_id)
                continue
            if types is files.types:
                types = dict(types)
            types[op_id] = op_type
        added: Set[str] = set()
        for op_id in appeared:
            op_type = self._read_type(op_id)
            if op_type is None:  # removed (pruned) since the folder was listed: new again if it returns
                current.discard(f"{op_id}.json")
                names = None
                continue
            if op_type == _CORRUPT:
                corrupt.add(op_id)
            else:
                types[op_id] = op_type  # a new key: no older listing holds it
            added.add(op_id)
        files.names = names
        if not (gone or repaired or added):
            return listing, set()
        files.types, files.corrupt = types, corrupt
        files.pending -= gone
        for op_id in gone:
            self._ends.pop(op_id, None)
        return self._reordered(listing, types, frozenset(corrupt), gone, added), added

    def _reordered(self, listing: Listing, types: Dict[str, str], corrupt: FrozenSet[str], gone: Set[str],
                   appeared: Set[str]) -> Listing:
        """A new listing: the old order without *gone*, with *appeared* in place (usually at the end)."""
        order = [i for i in listing.ids if i not in gone] if gone else list(listing.ids)
        added = sorted(appeared, key=ids.sort_key)
        if len(added) > len(order):
            return Listing(sorted(order + added, key=ids.sort_key), types, corrupt, self._type_json)
        if not gone and added and (not order or ids.sort_key(added[0]) > ids.sort_key(order[-1])):
            return Listing(order + added, types, corrupt, self._type_json, appended_to=listing)
        for op_id in added:
            bisect.insort(order, op_id, key=ids.sort_key)
        return Listing(order, types, corrupt, self._type_json)

    def _read_type(self, op_id: str) -> Optional[str]:
        """The job's type; _CORRUPT when its file cannot be read; None when it is gone."""
        try:
            job = self._read_job(self.jobs_dir / f"{op_id}.json")
        except CorruptState as exc:
            log.error("operation %s is corrupt: %s", op_id, exc.message)
            return _CORRUPT
        if job is None:
            return None
        op_type = str(job.get("operation_type"))
        if op_type not in self._type_json:
            self._type_json[op_type] = json.dumps(op_type)
        return self._type_names.setdefault(op_type, op_type)

    def _with_output(self, candidates: Set[str]) -> Set[str]:
        """Those of *candidates* whose output file exists."""
        if len(candidates) <= PROBE_ONE_BY_ONE:
            return {i for i in candidates if os.path.lexists(self.output_dir / f"{i}.json")}
        try:
            names = set(os.listdir(self.output_dir))
        except FileNotFoundError:
            return set()
        return {i for i in candidates if f"{i}.json" in names}

    def end_summary(self, op_id: str) -> Optional[Dict[str, Any]]:
        """`success` and `state` of an ended operation, None while it runs; `corrupt` if unreadable."""
        end = self.end(op_id)
        return None if end is None else end.summary

    def end(self, op_id: str) -> Optional[End]:
        """How the operation ended, None while it runs; CORRUPT_END while its output file is unreadable."""
        end = self._ends.get(op_id)
        if end is None:
            try:
                output = self._read(self.output_dir / f"{op_id}.json")
            except CorruptState:
                return CORRUPT_END  # not kept: the operator may repair it
            if output is None:
                return None
            start, stop = parse_time(output.get("start_time")), parse_time(output.get("end_time"))
            end = self._ends[op_id] = End(self._summary(output),
                                          (stop - start).total_seconds() if start and stop else None)
        return end

    def _summary(self, source: Dict[str, Any]) -> Dict[str, Any]:
        """*source*'s `success` and `state`, as one dict shared by every equal summary."""
        key = tuple((k, source[k]) for k in ("success", "state") if k in source)
        try:
            return self._summaries.setdefault(key, dict(key))
        except TypeError:  # an odd value that cannot be a key: kept as it is
            return dict(key)

    @property
    def ends_path(self) -> Path:
        return self.jobs_dir / ENDS_FOLDER / ENDS_FILE

    def ends(self, op_ids: Collection[str]) -> Dict[str, End]:
        """How those of *op_ids* that ended ended (CORRUPT_END when the output file is unreadable), for /metrics.

        Reading every output file again in each new process would make its first scrape slow (0.5 s
        at 10,000 operations): the first call in a process takes in what earlier ones kept in
        jobs/.index/ends.json, and a call that had to read output files keeps its answer there. Only
        an aid: an unreadable or odd file is ignored, and two processes writing it at once lose nothing
        but a few reads."""
        if not self._kept_read:
            self._kept_read = True
            self._take_kept(op_ids)
        found: Dict[str, End] = {}
        read = 0
        for op_id in op_ids:
            known = op_id in self._ends
            end = self.end(op_id)
            if end is not None:
                found[op_id] = end
                read += not known and end is not CORRUPT_END
        if read:  # a corrupt end is not kept: the operator may repair the file
            self._keep({op_id: end for op_id, end in found.items() if end is not CORRUPT_END})
        return found

    def _take_kept(self, op_ids: Collection[str]) -> None:
        try:
            kept = json.loads(self.ends_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("ignoring %s: %s", self.ends_path, exc)
            return
        entries = kept.get("ends") if isinstance(kept, dict) else None
        if not isinstance(entries, dict):
            return
        wanted = op_ids if isinstance(op_ids, (set, frozenset, dict)) else set(op_ids)
        for op_id, entry in entries.items():
            if op_id in wanted and op_id not in self._ends and _kept_entry_ok(entry):
                summary, duration = entry
                self._ends[op_id] = End(self._summary(summary), duration)

    def _keep(self, ends: Dict[str, End]) -> None:
        document = {"ends": {op_id: [end.summary, end.duration] for op_id, end in ends.items()}}
        try:
            self.ends_path.parent.mkdir(exist_ok=True)
            write_json_atomic(self.ends_path, document, exclusive=False)
        except OSError as exc:
            log.warning("cannot keep %s: %s", self.ends_path, exc.strerror or exc)


def _kept_entry_ok(entry: Any) -> bool:
    """`[{"success": bool, "state": str}, seconds or null]`, either key of the summary possibly missing."""
    if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], dict)):
        return False
    summary, duration = entry
    return (set(summary) <= {"success", "state"} and isinstance(summary.get("success", False), bool)
            and isinstance(summary.get("state", ""), str)
            and (duration is None or (isinstance(duration, (int, float)) and not isinstance(duration, bool)
                                      and math.isfinite(duration))))
