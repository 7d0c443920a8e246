"""The watch of jobs/: the kernel's reports replace listing the folder, and whenever they cannot be
trusted the index lists it again, so the listing is always the folder's."""

import os
import shutil
import struct
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_backup_api.store import index as index_module
from pg_backup_api.store import watch
from pg_backup_api.store.jobs import OperationStore, read_state_file

T0 = datetime(2026, 11, 30, 9, 0, 0, tzinfo=timezone.utc)


class Store(OperationStore):
    """A store whose index is watched, and which counts how often jobs/ is listed."""

    def __init__(self, root, use_watch=True):
        super().__init__(root, "pg")
        self.listings = 0
        self.index = index_module.OperationIndex(self.jobs_dir, self.output_dir, read_state_file,
                                                 use_watch=use_watch)


@pytest.fixture
def store(tmp_path, monkeypatch):
    s = Store(tmp_path / "pg")
    s.ensure_dirs()
    real = os.listdir

    def counting(path):
        if str(path) == str(s.jobs_dir):
            s.listings += 1
        return real(path)

    monkeypatch.setattr(index_module.os, "listdir", counting)
    return s


def create(store, seconds):
    return store.create({"operation_type": "recovery"}, T0 + timedelta(seconds=seconds))


def ids_of(store):
    return [o["id"] for o in store.list()]


def truth(store):
    # scandir, not listdir: the store fixture counts listdir calls
    return sorted((e.name[:-5] for e in os.scandir(store.jobs_dir) if e.name.endswith(".json")),
                  key=index_module.ids.sort_key)


def test_after_the_first_listing_creations_and_removals_come_from_the_watch(store):
    a = create(store, 0)
    assert ids_of(store) == [a] and store.listings == 1
    b, c = create(store, 1), create(store, 2)
    assert ids_of(store) == [a, b, c]
    store.remove(a)
    assert ids_of(store) == [b, c]
    assert store.listings == 1  # never listed again


def test_a_watch_with_too_many_unread_names_is_dropped_and_the_folder_listed(store, monkeypatch):
    monkeypatch.setattr(watch, "MAX_UNREAD", 3)
    made = [create(store, 0)]
    assert ids_of(store) == made and store.listings == 1
    made += [create(store, s) for s in range(1, 6)]
    assert ids_of(store) == made
    assert store.listings == 2
    made.append(create(store, 10))
    assert ids_of(store) == made and store.listings == 2  # a new watch serves again


def test_a_jobs_folder_moved_away_and_made_again_is_listed_anew(store):
    a = create(store, 0)
    assert ids_of(store) == [a]
    store.jobs_dir.rename(store.root / "jobs.old")
    store.ensure_dirs()
    b = create(store, 5)
    assert ids_of(store) == [b]
    c = create(store, 6)
    assert ids_of(store) == [b, c]


def test_a_removed_jobs_folder_lists_nothing_and_its_return_is_seen(store):
    a = create(store, 0)
    assert ids_of(store) == [a]
    shutil.rmtree(store.jobs_dir)
    assert ids_of(store) == []
    store.ensure_dirs()
    b = create(store, 1)
    assert ids_of(store) == [b]


def test_a_path_that_names_another_folder_now_is_listed_and_watched_anew(store, monkeypatch):
    """As when a file system is mounted over jobs/: no event reaches the watch of the folder beneath."""
    a = create(store, 0)
    assert ids_of(store) == [a] and store.listings == 1
    real = index_module._identity
    monkeypatch.setattr(index_module, "_identity", lambda d: (-1, -1) if d == store.jobs_dir else real(d))
    assert ids_of(store) == [a] and store.listings == 2
    monkeypatch.setattr(index_module, "_identity", real)
    assert ids_of(store) == [a] and store.listings == 3
    b = create(store, 1)
    assert ids_of(store) == [a, b] and store.listings == 3


def test_an_overflow_of_the_kernels_queue_lists_every_watched_folder_again(store, monkeypatch):
    a = create(store, 0)
    assert ids_of(store) == [a] and store.listings == 1
    b = create(store, 1)
    hub = watch._hub_of_this_process()
    real_read = os.read
    overflow = struct.pack("iIII", -1, int(watch.inotify_simple.flags.Q_OVERFLOW), 0, 0)
    sent = []

    def overflowing(fd, n):
        if fd == hub.inotify.fileno() and not sent:
            sent.append(True)
            real_read(fd, n)  # what the kernel dropped
            return overflow
        return real_read(fd, n)

    monkeypatch.setattr(watch.os, "read", overflowing)
    assert ids_of(store) == [a, b]
    assert sent and store.listings == 2


def test_without_inotify_the_folder_is_listed_on_each_change(tmp_path, monkeypatch):
    monkeypatch.setattr(watch, "_hub", None)

    def no_instances():
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(watch, "_Hub", no_instances)
    s = Store(tmp_path / "pg")
    a = create(s, 0)
    assert ids_of(s) == [a] and s.index._watch is None
    b = create(s, 1)
    assert ids_of(s) == [a, b]


def test_a_folder_on_a_network_file_system_is_never_watched(tmp_path):
    index = index_module.OperationIndex(tmp_path / "jobs", tmp_path / "output", read_state_file,
                                        settle=index_module.SETTLE_NS)
    (tmp_path / "jobs").mkdir()
    index.snapshot()
    assert index._watch is None
    local = index_module.OperationIndex(tmp_path / "jobs", tmp_path / "output", read_state_file,
                                        settle=index_module.LOCAL_SETTLE_NS)
    local.snapshot()
    assert local._watch is not None


def test_two_indexes_of_one_folder_each_see_every_change(tmp_path):
    first, second = Store(tmp_path / "pg"), Store(tmp_path / "pg")
    a = create(first, 0)
    assert ids_of(first) == ids_of(second) == [a]
    b = create(second, 1)
    assert ids_of(first) == ids_of(second) == [a, b]
    first.index._watch.close()
    first.index._watch._lost = True
    c = create(first, 2)
    assert ids_of(second) == [a, b, c] and ids_of(first) == [a, b, c]


def test_a_forked_child_never_takes_its_parents_events(store):
    a = create(store, 0)
    assert ids_of(store) == [a]
    pid = os.fork()
    if pid == 0:  # the child: its own listing is right, and it reads no event from the parent's queue
        code = 1
        try:
            b = create(store, 1)
            code = 0 if ids_of(store) == [a, b] and store.index._watch.usable else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert ids_of(store) == truth(store) and len(truth(store)) == 2
    assert store.listings == 1  # the child's creation came to the parent as an event


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.one_of(st.tuples(st.just("create"), st.integers(0, 30)),
                                st.tuples(st.just("remove"), st.integers(0, 40)),
                                st.tuples(st.just("finish"), st.integers(0, 40)),
                                st.tuples(st.just("list"), st.booleans()),
                                st.tuples(st.just("lose"), st.booleans())),
                      max_size=40))
def test_any_sequence_of_changes_lists_what_the_folder_holds(tmp_path_factory, steps):
    root = tmp_path_factory.mktemp("prop") / "pg"
    watched, listed = Store(root), Store(root, use_watch=False)
    watched.ensure_dirs()
    for action, arg in steps:
        present = truth(watched)
        if action == "create":
            create(watched, arg)
        elif action == "remove" and present:
            watched.remove(present[arg % len(present)])
        elif action == "finish" and present:
            watched.finish(present[arg % len(present)], {"success": True, "state": "succeeded"})
        elif action == "lose" and watched.index._watch is not None:
            watched.index._watch._lost = True  # as after an overflow: the folder must be listed again
        elif action == "list":
            assert ids_of(watched) == truth(watched)
            assert watched.unfinished() == [i for i in truth(watched) if not watched.output_path(i).exists()]
    assert ids_of(watched) == truth(watched) == ids_of(listed)
