"""The operation index: reads only what changed, never misses a change made within the mtime's tick."""

import json
import os
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from pg_backup_api.store import index as index_module
from pg_backup_api.store.jobs import OperationStore, read_state_file

T0 = datetime(2026, 11, 27, 9, 32, 1, tzinfo=timezone.utc)


class CountingStore(OperationStore):
    """A store whose index counts the files it reads."""

    def __init__(self, root, use_watch):
        super().__init__(root, "pg")
        self.reads = []

        def read(path):
            self.reads.append(path.name)
            return read_state_file(path)

        # A long settle time, so that "within the tick of the last scan" holds on a slow machine too.
        self.index = index_module.OperationIndex(self.jobs_dir, self.output_dir, read, settle=5_000_000_000,
                                                 use_watch=use_watch)


# Every behaviour holds both ways jobs/ is followed: listed when its mtime moves (network file
# systems), and through the kernel's reports of the names that changed (local ones, inotify).
@pytest.fixture(params=["listed", "watched"])
def store(request, tmp_path):
    return CountingStore(tmp_path / "pg", use_watch=request.param == "watched")


def create(store, seconds, op_type="recovery"):
    start = T0 + timedelta(seconds=seconds)
    return store.create({"operation_type": op_type, "start_time": start.isoformat()}, start)


def ids_of(store):
    return [o["id"] for o in store.list()]


def freeze_mtime(directory, stat):
    """Put *directory*'s mtime back to what *stat* saw: as if a change had come within the same tick."""
    os.utime(directory, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def age(directory, seconds=10):
    past = time.time_ns() - seconds * 1_000_000_000
    os.utime(directory, ns=(past, past))


def test_a_file_created_within_the_tick_of_the_last_scan_is_seen(store):
    a = create(store, 0)
    assert ids_of(store) == [a]
    scanned = os.stat(store.jobs_dir)
    b = create(store, 1)
    freeze_mtime(store.jobs_dir, scanned)
    assert os.stat(store.jobs_dir).st_mtime_ns == scanned.st_mtime_ns
    store.reads.clear()
    assert ids_of(store) == [a, b]
    assert store.reads == [f"{b}.json"]  # only the new name is read, not every job file


def test_a_settled_folder_is_not_read_again_and_its_snapshot_is_reused(store):
    create(store, 0)
    age(store.jobs_dir)
    age(store.output_dir)
    first = store.index.snapshot()
    store.reads.clear()
    listed = []
    real_listdir = os.listdir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(index_module.os, "listdir", lambda d: listed.append(d) or real_listdir(d))
        assert store.index.snapshot() is first
    assert listed == [] and store.reads == []


def test_a_change_to_a_settled_folder_is_seen_and_only_the_new_name_read(store):
    made = [create(store, s) for s in range(50)]
    age(store.jobs_dir)
    assert ids_of(store) == made
    store.reads.clear()
    newer = create(store, 100)
    assert ids_of(store) == [*made, newer]
    assert store.reads == [f"{newer}.json"]


def test_an_operation_created_out_of_order_takes_its_place(store):
    later = create(store, 10)
    assert ids_of(store) == [later]
    earlier = create(store, 5)
    same_second = create(store, 10)
    assert same_second == f"{later}-2"
    assert ids_of(store) == [earlier, later, same_second]


def test_removal_is_seen_even_within_the_same_tick(store):
    a, b, c = create(store, 0), create(store, 1), create(store, 2)
    store.finish(a, {"success": True})
    assert ids_of(store) == [a, b, c] and store.unfinished() == [b, c]
    scanned = os.stat(store.jobs_dir)
    store.remove(a)
    store.remove(b)
    freeze_mtime(store.jobs_dir, scanned)
    assert ids_of(store) == [c]
    assert store.unfinished() == [c]
    assert store.end_summary(a) is None


def test_an_output_file_appearing_ends_the_operation_even_within_the_same_tick(store):
    a = create(store, 0)
    assert store.unfinished() == [a]
    assert store.end_summary(a) is None
    scanned = os.stat(store.output_dir)
    store.finish(a, {"success": False, "state": "lost"})
    freeze_mtime(store.output_dir, scanned)
    assert store.unfinished() == []
    assert store.end_summary(a) == {"success": False, "state": "lost"}


def test_a_corrupt_job_file_is_listed_as_corrupt_and_seen_once_repaired_in_place(store):
    a, b = create(store, 0), create(store, 1)
    store.job_path(a).write_text("")  # in place: the folder's mtime does not move
    broken = OperationStore(store.root, "pg")  # a fresh index, e.g. a new worker
    assert broken.list() == [{"id": a, "type": "unknown", "state": "corrupt"}, {"id": b, "type": "recovery"}]
    assert json.loads(broken.index.snapshot().listing.body()) == {"operations": broken.list()}
    age(store.jobs_dir)
    store.job_path(a).write_text(json.dumps({"operation_type": "backup", "start_time": T0.isoformat()}))
    assert broken.list() == [{"id": a, "type": "backup"}, {"id": b, "type": "recovery"}]


def test_a_corrupt_output_file_is_a_corrupt_end_not_a_crash(store):
    a = create(store, 0)
    store.output_path(a).write_text('{"success": tru')
    assert store.unfinished() == []
    assert store.end_summary(a) == {"success": False, "state": "corrupt"}
    store.output_path(a).write_text(json.dumps({"success": True, "state": "succeeded"}))
    assert store.end_summary(a) == {"success": True, "state": "succeeded"}  # not kept while corrupt


def test_the_json_body_is_the_listing_also_when_extended_at_the_end(store):
    for s in range(3):
        create(store, s)
    first = store.index.snapshot().listing
    assert json.loads(first.body()) == {"operations": first.operations()}
    create(store, 10, "backup")
    create(store, 11, 'we"ird')
    second = store.index.snapshot().listing
    assert second is not first
    assert second.body().endswith(b"]}\n")
    assert json.loads(second.body()) == {"operations": second.operations()}
    assert second.operations()[-1] == {"id": (T0 + timedelta(seconds=11)).strftime("%Y%m%dT%H%M%S"),
                                       "type": 'we"ird'}


def test_a_job_removed_between_listing_and_reading_is_left_out_and_seen_if_it_returns(store, monkeypatch):
    a = create(store, 0)
    saved = store.job_path(a).read_text()
    real = store.index._read_job

    def vanishing(path):
        if path.name == f"{a}.json" and path.exists():
            path.unlink()
        return real(path)

    monkeypatch.setattr(store.index, "_read_job", vanishing)
    assert ids_of(store) == []
    monkeypatch.setattr(store.index, "_read_job", real)
    store.job_path(a).write_text(saved)
    scanned = os.stat(store.jobs_dir)
    freeze_mtime(store.jobs_dir, scanned)
    assert ids_of(store) == [a]


def test_a_missing_folder_lists_nothing_and_a_file_in_its_place_is_an_error(tmp_path):
    store = OperationStore(tmp_path / "pg", "pg")
    assert store.list() == [] and store.unfinished() == []
    (tmp_path / "pg").mkdir()
    (tmp_path / "pg" / "jobs").write_text("not a directory")
    with pytest.raises(NotADirectoryError):
        store.list()


def test_threads_listing_while_others_create_always_see_a_sorted_consistent_listing(store):
    created, seen, errors = [], [], []
    lock = threading.Lock()

    def writer(base):
        for n in range(40):
            op_id = create(store, base + n)
            with lock:
                created.append(op_id)

    def reader():
        try:
            for _ in range(150):
                listing = store.index.snapshot().listing
                ops = listing.operations()
                order = [o["id"] for o in ops]
                assert order == sorted(order)
                assert json.loads(listing.body()) == {"operations": ops}
                seen.append(len(order))
        except Exception as exc:  # reported below: an assert in a thread would pass silently
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(b,)) for b in (0, 1000, 2000)]
    threads += [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert ids_of(store) == sorted(created) and len(created) == 120
    assert store.unfinished() == sorted(created)
    assert max(seen) <= 120


MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
30 22 0:26 / /srv/barman rw,relatime shared:2 - nfs4 server:/export rw
31 30 0:27 / /srv/barman/local\\040disk rw,relatime shared:3 - xfs /dev/vdb rw
32 22 0:28 / /mnt rw - tmpfs tmpfs rw
33 22 0:29 / /mnt rw - fuse.sshfs host: rw
"""


def test_the_settle_time_follows_the_file_system_of_the_folder(tmp_path):
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(MOUNTINFO)
    settle = lambda p: index_module.settle_ns(p, str(mountinfo))  # noqa: E731
    assert settle("/var/lib/barman/pg/jobs") == index_module.LOCAL_SETTLE_NS  # ext4
    assert settle("/srv/barman/pg/jobs") == index_module.SETTLE_NS  # NFS: another machine's clock
    assert settle("/srv/barman/local disk/pg/jobs") == index_module.LOCAL_SETTLE_NS  # xfs mounted inside it
    assert settle("/mnt/pg") == index_module.SETTLE_NS  # the FUSE mount is on top of the tmpfs
    assert index_module.settle_ns("/x", str(tmp_path / "missing")) == index_module.SETTLE_NS


def test_a_file_system_keeping_whole_seconds_gets_the_long_settle_time():
    now = time.time_ns()
    whole = (now // 1_000_000_000 - 1) * 1_000_000_000  # 1-2 s ago, no fraction
    fine = whole + 1
    assert index_module._trusted((1, fine), whole + 500_000_000, index_module.LOCAL_SETTLE_NS)
    assert not index_module._trusted((1, whole), whole + 500_000_000, index_module.LOCAL_SETTLE_NS)
    assert index_module._trusted((1, whole), whole + 1_500_000_000, index_module.LOCAL_SETTLE_NS)


def finish(store, op_id, seconds, state="succeeded"):
    start = T0.isoformat()
    store.finish(op_id, {"success": state == "succeeded", "state": state, "start_time": start,
                         "end_time": (T0 + timedelta(seconds=seconds)).isoformat()})


def test_ends_gives_how_each_ended_operation_ended_and_how_long_it_took(store):
    a, b, running = create(store, 0), create(store, 1), create(store, 2)
    finish(store, a, 90)
    finish(store, b, 3, "failed")
    ends = store.index.ends([a, b, running])
    assert ends == {a: index_module.End({"success": True, "state": "succeeded"}, 90.0),
                    b: index_module.End({"success": False, "state": "failed"}, 3.0)}


def test_a_new_process_takes_the_ends_kept_by_an_earlier_one_and_reads_no_output_file(store, tmp_path):
    made = [create(store, s) for s in range(5)]
    for n, op_id in enumerate(made):
        finish(store, op_id, n)
    first = store.index.ends(made)
    later = CountingStore(store.root, use_watch=False)
    assert later.index.ends(made) == first
    assert [r for r in later.reads if r in {f"{i}.json" for i in made}] == []


@pytest.mark.parametrize("entry", [
    [{"success": "yes", "state": "succeeded"}, 1], [{"success": True, "state": 7}, 1],
    [{"success": True, "extra": 1}, 1], [{"success": True}, float("inf")], [{"success": True}, True],
    [{"success": True}], {"success": True}, "x", None,
])
def test_an_odd_kept_end_is_ignored_and_the_output_file_read(store, entry):
    a = create(store, 0)
    finish(store, a, 12)
    store.index.ends_path.parent.mkdir(exist_ok=True)
    store.index.ends_path.write_text(json.dumps({"ends": {a: entry}}))
    fresh = CountingStore(store.root, use_watch=False)
    assert fresh.index.ends([a]) == {a: index_module.End({"success": True, "state": "succeeded"}, 12.0)}
    assert f"{a}.json" in fresh.reads


@pytest.mark.parametrize("garbage", ["", "not json", "[1, 2]", '{"ends": 5}', '{"ends": {"x": [1, 2]}}'])
def test_an_unreadable_kept_file_is_ignored_and_written_anew(store, garbage):
    a = create(store, 0)
    finish(store, a, 5)
    store.index.ends_path.parent.mkdir(exist_ok=True)
    store.index.ends_path.write_text(garbage)
    assert CountingStore(store.root, use_watch=False).index.ends([a])[a].duration == 5.0
    assert json.loads(store.index.ends_path.read_text()) == {"ends": {a: [{"success": True, "state": "succeeded"},
                                                                         5.0]}}


def test_the_kept_file_holds_only_the_operations_asked_about_and_not_a_corrupt_end(store):
    a, gone, broken = create(store, 0), create(store, 1), create(store, 2)
    for op_id in (a, gone):
        finish(store, op_id, 1)
    store.output_path(broken).write_text("{")
    store.index.ends([a, gone, broken])
    store.remove(gone)
    store.list()
    c = create(store, 3)
    finish(store, c, 2)
    ends = store.index.ends([a, c, broken])
    assert set(ends) == {a, c, broken} and ends[broken] is index_module.CORRUPT_END  # counted, as /metrics does
    assert set(json.loads(store.index.ends_path.read_text())["ends"]) == {a, c}
