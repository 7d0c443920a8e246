import json
import os
import threading
from datetime import datetime, timezone

import pytest

from pg_backup_api.core.errors import NoSuchOperation
from pg_backup_api.store.jobs import OperationStore, write_json_atomic

NOW = datetime(2026, 11, 27, 9, 32, 1, tzinfo=timezone.utc)


@pytest.fixture
def store(tmp_path):
    return OperationStore(tmp_path / "pg")


def test_create_writes_the_job_file_in_the_reference_layout(store, tmp_path):
    op_id = store.create({"operation_type": "recovery", "start_time": "t"}, NOW)
    assert op_id == "20261127T093201"
    path = tmp_path / "pg" / "jobs" / "20261127T093201.json"
    assert json.loads(path.read_text()) == {"operation_type": "recovery", "start_time": "t"}
    assert (tmp_path / "pg" / "output").is_dir()


def test_a_hundred_creations_in_the_same_second_get_distinct_ids(store):
    created = []

    def create():
        created.append(store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW))

    threads = [threading.Thread(target=create) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(created)) == 100
    assert len([n for n in os.listdir(store.jobs_dir) if n.endswith(".json")]) == 100


def test_no_temporary_file_is_left_behind(store):
    store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW)
    assert [n for n in os.listdir(store.jobs_dir) if not n.endswith(".json")] == [".workers"]
    assert os.listdir(store.workers_dir) == []


def test_exclusive_write_never_replaces_an_existing_file(tmp_path):
    path = tmp_path / "x.json"
    write_json_atomic(path, {"a": 1}, exclusive=True)
    with pytest.raises(FileExistsError):
        write_json_atomic(path, {"a": 2}, exclusive=True)
    assert json.loads(path.read_text()) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_get_reads_job_and_output(store):
    op_id = store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW)
    assert store.get(op_id).output is None
    assert store.finish(op_id, {"success": True})
    assert store.get(op_id).output == {"success": True}


def test_the_first_recorded_end_wins(store):
    op_id = store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW)
    assert store.finish(op_id, {"success": False, "output": "first"})
    assert not store.finish(op_id, {"success": True, "output": "second"})
    assert store.get(op_id).output["output"] == "first"


def test_unknown_and_malformed_ids_are_not_found(store):
    store.ensure_dirs()
    for op_id in ["20261127T093201", "../jobs/x", "..", "a b"]:
        with pytest.raises(NoSuchOperation):
            store.get(op_id)


def test_list_is_oldest_first_and_follows_files_added_and_removed(store):
    a = store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW)
    b = store.create({"operation_type": "config_switch", "start_time": NOW.isoformat()}, NOW)
    assert store.list() == [{"id": a, "type": "recovery"}, {"id": b, "type": "config_switch"}]
    os.unlink(store.job_path(a))
    later = datetime(2026, 11, 28, tzinfo=timezone.utc)
    c = store.create({"operation_type": "recovery", "start_time": later.isoformat()}, later)
    assert [o["id"] for o in store.list()] == [b, c]


def test_list_reads_files_written_by_the_reference(store):
    store.ensure_dirs()
    (store.jobs_dir / "20230223T093201.json").write_text(json.dumps(
        {"operation_type": "recovery", "start_time": "2023-02-23T09:32:01.123456", "backup_id": "x"}))
    (store.jobs_dir / "notes.txt").write_text("ignored")
    assert store.list() == [{"id": "20230223T093201", "type": "recovery"}]


def test_list_of_a_server_without_operations_is_empty(store):
    assert store.list() == []


def test_unfinished_follows_new_output_files(store):
    a = store.create({"operation_type": "recovery", "start_time": NOW.isoformat()}, NOW)
    assert store.unfinished() == [a]
    store.finish(a, {"success": True})
    assert store.unfinished() == []
