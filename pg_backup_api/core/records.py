"""What every layer may use to keep state in files: the operation record, and JSON files written
atomically (a reader sees no file or the whole file) or exclusively (the first writer wins)."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from pg_backup_api.core.errors import ApiError, CorruptState, InsufficientStorage, StorageUnavailable

# errno values that mean "the disk is full" (507) and "this file system cannot be written" (503).
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
UNWRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(exc: OSError, what: str) -> ApiError:
    """The domain error of a failed write under Barman's home: 507 when full, 503 when unwritable."""
    detail = f"{what}: {exc.strerror or exc}"
    if exc.errno in FULL_ERRNOS:
        return InsufficientStorage(f"{detail}; nothing was stored, free space under Barman's home")
    if exc.errno in UNWRITABLE_ERRNOS:
        return StorageUnavailable(f"{detail}; nothing was stored, Barman's home must be writable")
    return ApiError(detail)


def _json(data: Dict[str, Any]) -> str:
    return json.dumps(data, indent=2) + "\n"


@contextmanager
def _written(directory: Path, name: str, text: str, mode: int) -> Iterator[str]:
    """A temporary file in *directory* holding *text*, flushed to disk; removed on leaving."""
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        yield tmp
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_json_atomic(path: Path, data: Dict[str, Any], exclusive: bool, mode: int = 0o640) -> None:
    """Write *data* to *path* so that a reader sees either no file or the whole file.

    With *exclusive*, fail with FileExistsError rather than replace an existing file.
    """
    if exclusive:
        write_json_new([path], data, mode)
        return
    write_text_atomic(path, _json(data), mode)


def write_text_atomic(path: Path, text: str, mode: int = 0o640, group: Optional[int] = None) -> None:
    """Replace *path* with *text* so that a reader sees the old or the new file whole; with *group*,
    the file has that group from its first moment under *path*."""
    with _written(path.parent, path.name, text, mode) as tmp:
        if group is not None:
            os.chown(tmp, -1, group)
        os.replace(tmp, path)
        _fsync_dir(path.parent)


def write_json_new(candidates: Iterable[Path], data: Dict[str, Any], mode: int = 0o640) -> Path:
    """Create the first of *candidates* (in one directory) that does not exist yet, holding *data*.

    The file is written once; `os.link` of it is atomic and exclusive, so a taken name costs
    one failed link. Raises FileExistsError when every candidate is taken.
    """
    names = iter(candidates)
    first = next(names)
    with _written(first.parent, first.name, _json(data), mode) as tmp:
        for path in chain([first], names):
            try:
                os.link(tmp, path)
            except FileExistsError:
                continue
            _fsync_dir(path.parent)
            return path
    raise FileExistsError(f"every candidate name is taken, the last being {first.parent}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_json(path: Path) -> Dict[str, Any]:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def read_state_file(path: Path) -> Optional[Dict[str, Any]]:
    """A state file's JSON object; None when it does not exist; CorruptState when it cannot be read."""
    try:
        return _read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CorruptState(str(path), str(exc) or exc.__class__.__name__) from None


@dataclass(frozen=True)
class Record:
    """One operation as stored: its job file, and its output file once it has ended."""

    op_id: str
    job: Dict[str, Any]
    output: Optional[Dict[str, Any]]
    # Set when what the files say cannot be trusted: {"state": "corrupt"|"cancel_failed", "reason", "file"?}.
    problem: Optional[Dict[str, str]] = None


