"""The one 'reload when these files change' helper, and the tokens file that uses it."""

import os

import pytest

from pg_backup_api.core.errors import ApiError
from pg_backup_api.core.reloading import Reloading
from pg_backup_api.service.auth import TokenFile, Unauthorized


class Files:
    def __init__(self):
        self.stamp = 1
        self.content = "a"
        self.loads = 0
        self.during_load = None

    def load(self):
        self.loads += 1
        if self.during_load:
            self.during_load()
        if self.content is None:
            raise ApiError("cannot be read")
        return self.content


def test_a_value_is_loaded_once_while_its_files_are_unchanged_and_again_when_they_change():
    files = Files()
    value = Reloading(files.load, lambda _: files.stamp)
    assert [value.get(), value.get()] == ["a", "a"] and files.loads == 1
    files.content, files.stamp = "b", 2
    assert value.get() == "b" and files.loads == 2


def test_a_failed_load_is_kept_until_its_files_change():
    files = Files()
    files.content = None
    value = Reloading(files.load, lambda _: files.stamp)
    for _ in range(3):
        with pytest.raises(ApiError):
            value.get()
    assert files.loads == 1
    files.content, files.stamp = "fixed", 2
    assert value.get() == "fixed"


def test_a_change_while_loading_is_not_taken_for_the_loaded_value():
    files = Files()

    def change():
        files.stamp += 1
        files.during_load = None

    files.during_load = change
    value = Reloading(files.load, lambda _: files.stamp)
    assert value.get() == "a"
    files.content = "b"  # written after the stamp moved: the first load may have read the old content
    assert value.get() == "b" and files.loads == 2


def test_the_value_can_name_more_files_to_watch():
    files = Files()
    extra = {"stamp": 0}
    value = Reloading(files.load, lambda v: (files.stamp, extra["stamp"] if v is not None else None))
    assert value.get() == "a"
    extra["stamp"] = 1
    files.content = "b"
    assert value.get() == "b"


def test_a_token_created_within_the_same_mtime_tick_and_size_is_seen(tmp_path):
    tokens = TokenFile(str(tmp_path / "tokens.json"))
    first = tokens.create("aaaa", "read")
    assert tokens.check(f"Bearer {first}", "read").name == "aaaa"
    before = os.stat(tokens.path)
    tokens.revoke("aaaa")
    second = tokens.create("bbbb", "read")  # same size as before: only the inode and ctime tell
    os.utime(tokens.path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(tokens.path).st_size == before.st_size
    with pytest.raises(Unauthorized):
        tokens.check(f"Bearer {first}", "read")
    assert tokens.check(f"Bearer {second}", "read").name == "bbbb"
