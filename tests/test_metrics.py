"""GET /metrics: the exporter's names and semantics, exact values from a lab catalogue, the
service's own metrics, and `barman check` refreshed in the background without making a scrape wait."""

import json
import os
import time
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pg_backup_api import create_app
from pg_backup_api.core.model import OperationType
from pg_backup_api.http import metrics
from pg_backup_api.rules.requests import job_document
from pg_backup_api.rules.settings import Settings
from pg_backup_api.store import jobs as store_module
from pg_backup_api.store.jobs import OperationStore

EXPORTER_NAMES = {"barman_backups_total", "barman_backups_failed", "barman_backups_size", "barman_backups_wal_size",
                  "barman_last_backup", "barman_first_backup", "barman_last_backup_copy_time", "barman_up",
                  "barman_metrics_update"}


def epoch(text):
    return datetime.fromisoformat(text).timestamp()


def lab_backup(files, backup_id, status, begin, end, size, wal, copy_time, server="pg"):
    """A backup.info with its own times, size, WAL and copy time."""
    files.add_backup(backup_id, status=status, server=server)
    path = files.home / server / "meta" / f"{backup_id}-backup.info"
    fields = dict(line.split("=", 1) for line in path.read_text().splitlines())
    fields.update(begin_time=begin, end_time=end, size=str(size), begin_wal=wal, end_wal=wal,
                  copy_stats=f"{{'copy_time': {copy_time}, 'total_time': {copy_time}}}")
    path.write_text("".join(f"{k}={v}\n" for k, v in fields.items()))


LAST_WAL_TIME = epoch("2026-11-22T06:00:00+00:00")


@pytest.fixture
def lab(barman_files):
    """Two DONE backups around a FAILED one, and four archived WAL segments."""
    lab_backup(barman_files, "20261120T010000", "DONE", "2026-11-20 01:00:00+00:00", "2026-11-20 01:10:00+00:00",
               1000, "00000001000000000000000A", 12.5)
    lab_backup(barman_files, "20261121T010000", "FAILED", "2026-11-21 01:00:00+00:00", "2026-11-21 01:01:00+00:00",
               5, "000000010000000000000010", 1)
    lab_backup(barman_files, "20261122T010000", "DONE", "2026-11-22 01:00:00+00:00", "2026-11-22 01:20:00+00:00",
               3000, "000000010000000000000014", 42.25)
    wals = barman_files.home / "pg" / "wals"
    wals.mkdir(parents=True, exist_ok=True)
    (wals / "pg-xlog.db").write_text(
        f"00000001000000000000000A 100 {epoch('2026-11-20T01:05:00+00:00')} None\n"
        f"00000001000000000000000B 200 {epoch('2026-11-20T02:00:00+00:00')} None\n"
        f"000000010000000000000014 400 {epoch('2026-11-22T01:10:00+00:00')} None\n"
        f"000000010000000000000015 800 {LAST_WAL_TIME} None\n")
    return barman_files


@pytest.fixture(autouse=True)
def no_refresh(monkeypatch):
    """The detached `barman check` is recorded, not started (test_refresh_checks runs the real one)."""
    started = []
    monkeypatch.setattr(metrics, "spawn_refresh", started.append)
    return started


def scrape(client, **kw):
    response = client.get("/metrics", **kw)
    assert response.status_code == 200, response.data
    assert response.content_type.startswith("text/plain; version=0.0.4")
    return {family.name: family for family in text_string_to_metric_families(response.data.decode())}


def samples(families, name, **labels):
    """{labels without those given: value} of one metric's samples that carry *labels*."""
    found = {}
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                rest = tuple(sorted((k, v) for k, v in sample.labels.items() if k not in labels))
                found[rest] = sample.value
    return found


def value(families, name, **labels):
    found = samples(families, name, **labels)
    assert len(found) == 1, (name, labels, found)
    return next(iter(found.values()))


def test_every_metric_of_the_exporter_is_there(client, lab):
    families = scrape(client)
    names = {s.name for f in families.values() for s in f.samples} | set(families)
    # barman_up has samples only once checks have run; its family is declared either way.
    assert EXPORTER_NAMES <= names


def test_the_exporters_metrics_have_its_values(client, lab):
    families = scrape(client)
    assert value(families, "barman_backups_total", server="pg") == 3  # failed ones included
    assert value(families, "barman_backups_failed", server="pg") == 1
    # number 1 is the newest successful backup; failed ones are not numbered.
    assert samples(families, "barman_backups_size", server="pg") == {
        (("number", "1"),): 3000, (("number", "2"),): 1000}
    # WAL from a backup's first segment to the next successful backup's last, as list-backups counts.
    assert samples(families, "barman_backups_wal_size", server="pg") == {
        (("number", "1"),): 400 + 800, (("number", "2"),): 100 + 200 + 400}
    assert value(families, "barman_last_backup", server="pg") == epoch("2026-11-22T01:00:00+00:00")
    assert value(families, "barman_first_backup", server="pg") == epoch("2026-11-20T01:00:00+00:00")
    assert value(families, "barman_last_backup_copy_time", server="pg") == 42.25
    assert abs(value(families, "barman_metrics_update", server="pg") - time.time()) < 60


def test_the_recovery_window_and_the_age_of_the_last_backup(client, lab):
    families = scrape(client)
    assert value(families, "pgba_recovery_window_start_timestamp_seconds", server="pg") == \
        epoch("2026-11-20T01:00:00+00:00")
    assert value(families, "pgba_recovery_window_end_timestamp_seconds", server="pg") == LAST_WAL_TIME
    age = value(families, "pgba_last_successful_backup_age_seconds", server="pg")
    assert abs(age - (time.time() - epoch("2026-11-22T01:20:00+00:00"))) < 60


def test_a_server_without_backups_counts_zero_and_has_no_window(client, barman_files):
    families = scrape(client)
    assert value(families, "barman_backups_total", server="pg") == 0
    assert value(families, "barman_last_backup_copy_time", server="pg") == 0
    assert samples(families, "barman_last_backup", server="pg") == {}
    assert samples(families, "pgba_recovery_window_start_timestamp_seconds", server="pg") == {}


def test_a_new_backup_shows_at_the_next_scrape(client, lab):
    assert value(scrape(client), "barman_backups_total", server="pg") == 3
    lab_backup(lab, "20261123T010000", "DONE", "2026-11-23 01:00:00+00:00", "2026-11-23 01:05:00+00:00",
               7, "000000010000000000000020", 1)
    families = scrape(client)
    assert value(families, "barman_backups_total", server="pg") == 4
    assert value(families, "barman_backups_size", server="pg", number="1") == 7


def ended(store, op_type, state, start, seconds, success=False):
    start_dt = datetime.fromisoformat(start)
    op_id = store.create(job_document(OperationType(op_type), {}, start_dt), start_dt)
    end = datetime.fromtimestamp(start_dt.timestamp() + seconds, timezone.utc)
    store.finish(op_id, {"operation_type": op_type, "start_time": start, "end_time": end.isoformat(),
                         "success": success, "state": state, "output": "", "exit_code": 0 if success else 1})
    return op_id


def test_operations_by_state_durations_running_and_lost(client, lab):
    store = OperationStore(lab.home / "pg", "pg")
    ended(store, "recovery", "succeeded", "2026-11-25T10:00:00+00:00", 90, success=True)
    ended(store, "recovery", "succeeded", "2026-11-25T11:00:00+00:00", 4000, success=True)
    ended(store, "recovery", "failed", "2026-11-25T12:00:00+00:00", 3)
    ended(store, "backup", "lost", "2026-11-25T13:00:00+00:00", 20)
    now = datetime.now(timezone.utc)
    store.create(job_document(OperationType.BACKUP, {}, now), now)  # running: its worker starts within 60 s
    families = scrape(client)
    assert samples(families, "pgba_operations", server="pg") == {
        (("state", "succeeded"), ("type", "recovery")): 2, (("state", "failed"), ("type", "recovery")): 1,
        (("state", "lost"), ("type", "backup")): 1, (("state", "running"), ("type", "backup")): 1}
    assert value(families, "pgba_operations_in_progress", server="pg") == 1
    assert value(families, "pgba_operations_lost", server="pg") == 1
    assert value(families, "pgba_operation_duration_seconds_count", type="recovery", outcome="succeeded") == 2
    assert value(families, "pgba_operation_duration_seconds_sum", type="recovery", outcome="succeeded") == 4090
    assert value(families, "pgba_operation_duration_seconds_bucket", type="recovery", outcome="succeeded",
                 le="120.0") == 1
    assert value(families, "pgba_operation_duration_seconds_bucket", type="recovery", outcome="succeeded",
                 le="7200.0") == 2
    assert value(families, "pgba_operation_duration_seconds_count", type="recovery", outcome="failed") == 1


@pytest.mark.parametrize("which", ["job", "worker", "output"])
def test_a_corrupt_operation_counts_as_corrupt_in_the_metrics_not_as_running(client, lab, which):
    store = OperationStore(lab.home / "pg", "pg")
    now = datetime.now(timezone.utc)
    broken = store.create(job_document(OperationType.RECOVERY, {}, now), now)
    store.create(job_document(OperationType.BACKUP, {}, now), now)  # healthy, running
    path = {"job": store.job_path(broken), "worker": store.worker_path(broken), "output": store.output_path(broken)}
    path[which].parent.mkdir(parents=True, exist_ok=True)
    path[which].write_text("{not json")
    doc = client.get(f"/servers/pg/operations/{broken}").json
    assert (doc["status"], doc["state"]) == ("FAILED", "corrupt")
    families = scrape(client)
    # A job file that cannot be read says no type: the listing has it as "unknown".
    shown_type = "unknown" if which == "job" else "recovery"
    assert samples(families, "pgba_operations", server="pg") == {
        (("state", "corrupt"), ("type", shown_type)): 1, (("state", "running"), ("type", "backup")): 1}
    assert value(families, "pgba_operations_in_progress", server="pg") == 1
    assert samples(families, "pgba_operation_duration_seconds_count", type=shown_type) == {}


@pytest.mark.parametrize("state", [["succeeded"], {"state": "failed"}, 7, None, "finished"])
def test_an_output_file_with_an_odd_state_is_counted_by_its_success_as_the_status_says(client, lab, state):
    # The same rule as an operation's status: `state` when it is one, else `success` (the reference's).
    store = OperationStore(lab.home / "pg", "pg")
    good = ended(store, "recovery", state, "2026-11-25T10:00:00+00:00", 60, success=True)
    bad = ended(store, "backup", state, "2026-11-25T11:00:00+00:00", 5, success=False)
    assert samples(scrape(client), "pgba_operations", server="pg") == {
        (("state", "succeeded"), ("type", "recovery")): 1, (("state", "failed"), ("type", "backup")): 1}
    assert [client.get(f"/servers/pg/operations/{op_id}").json["status"] for op_id in (good, bad)] == ["DONE",
                                                                                                       "FAILED"]


def test_two_processes_answer_the_same_numbers(lab):
    """Everything comes from files: two gunicorn workers (two apps here) agree."""
    store = OperationStore(lab.home / "pg", "pg")
    ended(store, "recovery", "failed", "2026-11-25T12:00:00+00:00", 3)
    first, second = (create_app(Settings(barman_conf=str(lab.conf))).test_client() for _ in range(2))
    scrape(first)  # warm one of them only
    ended(store, "backup", "succeeded", "2026-11-25T13:00:00+00:00", 30, success=True)

    def comparable(client):
        text = client.get("/metrics").data.decode()
        return [line for line in text.splitlines()
                if not line.startswith(("barman_metrics_update", "pgba_last_successful_backup_age"))]
    assert comparable(first) == comparable(second)


def test_checks_come_from_the_last_background_refresh(client, lab, no_refresh):
    directory = metrics.metrics_dir(lab.home)
    directory.mkdir(parents=True)
    taken = time.time() - 5
    (directory / metrics.CHECKS_FILE).write_text(json.dumps(
        {"time": taken, "servers": {"pg": {"postgresql": 0, "directories": 1}}}))
    families = scrape(client)
    assert samples(families, "barman_up", server="pg") == {(("check", "directories"),): 1,
                                                           (("check", "postgresql"),): 0}
    assert value(families, "pgba_check_timestamp_seconds") == taken
    assert no_refresh == []  # fresh results: no refresh


def test_a_scrape_never_waits_for_barman_check_and_asks_for_one_refresh(lab, no_refresh):
    client = create_app(Settings(barman_conf=str(lab.conf), check_interval=60)).test_client()
    started = time.monotonic()
    scrape(client)
    scrape(client)
    assert time.monotonic() - started < 5
    # One request across scrapes (and processes): the pending file is created exclusively.
    assert no_refresh == [str(lab.conf)]
    assert (metrics.metrics_dir(lab.home) / metrics.PENDING_FILE).exists()


def test_old_results_ask_for_a_refresh_and_a_dead_refresh_is_retried(lab, no_refresh):
    directory = metrics.metrics_dir(lab.home)
    directory.mkdir(parents=True)
    results = directory / metrics.CHECKS_FILE
    results.write_text("{}")
    assert not metrics.request_check_refresh(lab.home, str(lab.conf), 300, 60)  # fresh
    old = time.time() - 301
    os.utime(results, (old, old))
    assert metrics.request_check_refresh(lab.home, str(lab.conf), 300, 60)
    assert not metrics.request_check_refresh(lab.home, str(lab.conf), 300, 60)  # one is pending
    # A refresh that has not finished after check_timeout (+30 s) died: another is started.
    pending = directory / metrics.PENDING_FILE
    os.utime(pending, (old, old))
    assert metrics.request_check_refresh(lab.home, str(lab.conf), 300, 60)
    assert len(no_refresh) == 2


def test_refresh_checks_runs_barman_check_and_writes_ones_and_zeros(lab):
    """The real `barman check`: the lab's PostgreSQL does not exist, so that check is 0."""
    assert metrics.refresh_checks(str(lab.conf), 60) == 0
    document = json.loads((metrics.metrics_dir(lab.home) / metrics.CHECKS_FILE).read_text())
    checks = document["servers"]["pg"]
    # The exporter's check names: barman's JSON keys, e.g. failed_backups (the lab has one).
    assert checks["postgresql"] == 0
    assert checks["failed_backups"] == 0
    assert checks["directories"] == 1
    assert set(checks.values()) <= {0, 1}
    assert not (metrics.metrics_dir(lab.home) / metrics.PENDING_FILE).exists()


def test_metrics_need_the_read_scope_when_tokens_are_on(lab, tmp_path):
    from pg_backup_api.service.auth import TokenFile

    tokens = TokenFile(str(tmp_path / "tokens.json"))
    secret = tokens.create("prometheus", "read")
    client = create_app(Settings(barman_conf=str(lab.conf), auth="token",
                                 tokens_file=str(tmp_path / "tokens.json"))).test_client()
    assert client.get("/metrics").status_code == 401
    assert "barman_backups_total" in scrape(client, headers={"Authorization": f"Bearer {secret}"})


# A change set Barman cannot apply (its file cannot be written): `barman cron` fails on it forever.
STUCK_CHANGE_SET = [{"section": "pg", "changes_set": [
    {"key": "description", "value": "x", "config_file": "/nonexistent/dir/pg.conf"}]}]


def test_the_config_change_queue_pending_and_stuck_as_get_servers_reports_it(client, lab):
    families = scrape(client)
    assert samples(families, "pgba_config_changes_pending") == {(): 0}
    assert samples(families, "pgba_config_changes_stuck") == {(): 0}

    (lab.home / "cfg_changes.queue").write_text(json.dumps(STUCK_CHANGE_SET * 2))
    families = scrape(client)
    assert samples(families, "pgba_config_changes_pending") == {(): 2}
    assert samples(families, "pgba_config_changes_stuck") == {(): 1}
    queue = client.get("/servers").json["config_changes_queue"]
    assert (queue["pending"], queue["stuck"]) == (2, True)


def test_an_unreadable_config_change_queue_has_no_gauges_rather_than_zeros(client, lab):
    (lab.home / "cfg_changes.queue").mkdir()  # open() fails with EISDIR: the count is unknown
    families = scrape(client)
    assert samples(families, "pgba_config_changes_pending") == {}
    assert samples(families, "pgba_config_changes_stuck") == {}
    assert samples(families, "barman_backups_total", server="pg") == {(): 3}  # the rest is still there


def test_a_new_worker_takes_the_facts_its_predecessors_kept_and_reads_no_output_or_catalogue(lab, monkeypatch):
    """A restart costs one file read per kind, not one per ended operation and per backup."""
    store = OperationStore(lab.home / "pg", "pg")
    for hour in range(10, 15):
        ended(store, "recovery", "failed" if hour == 12 else "succeeded", f"2026-11-25T{hour}:00:00+00:00", 7,
              success=hour != 12)
    before = comparable_exposition(create_app(Settings(barman_conf=str(lab.conf))).test_client())
    reads = []
    real = store_module.read_state_file

    def reading(path):
        if path.parent.name == "output":
            reads.append(path.name)
        return real(path)

    monkeypatch.setattr(store_module, "read_state_file", reading)
    monkeypatch.setattr(metrics.barman_adapter, "read_catalogue", lambda config: reads.append(config.name))
    after = comparable_exposition(create_app(Settings(barman_conf=str(lab.conf))).test_client())
    assert after == before
    assert reads == []


def test_kept_facts_do_not_hide_a_new_backup_or_a_new_operation(lab):
    store = OperationStore(lab.home / "pg", "pg")
    scrape(create_app(Settings(barman_conf=str(lab.conf))).test_client())  # leaves the files
    lab_backup(lab, "20261123T010000", "DONE", "2026-11-23 01:00:00+00:00", "2026-11-23 01:05:00+00:00",
               7000, "000000010000000000000015", 3)
    ended(store, "backup", "succeeded", "2026-11-25T13:00:00+00:00", 30, success=True)
    families = scrape(create_app(Settings(barman_conf=str(lab.conf))).test_client())
    assert value(families, "barman_backups_total", server="pg") == 4
    assert value(families, "barman_backups_size", server="pg", number="1") == 7000
    assert value(families, "pgba_operations", server="pg", type="backup", state="succeeded") == 1


@pytest.mark.parametrize("garbage", ["", "not json", "[1, 2]", '{"servers": {"pg": {"x": [1, 2, 3]}}, "pg": 5}'])
def test_unreadable_kept_facts_are_ignored(lab, garbage):
    store = OperationStore(lab.home / "pg", "pg")
    ended(store, "recovery", "failed", "2026-11-25T12:00:00+00:00", 3)
    expected = comparable_exposition(create_app(Settings(barman_conf=str(lab.conf))).test_client())
    for path in (store.index.ends_path, metrics.metrics_dir(lab.home) / metrics.CATALOGUES_FILE):
        path.write_text(garbage)
    assert comparable_exposition(create_app(Settings(barman_conf=str(lab.conf))).test_client()) == expected


def comparable_exposition(client):
    """The exposition without the lines that hold the time of the scrape."""
    text = client.get("/metrics").data.decode()
    return [line for line in text.splitlines()
            if not line.startswith(("barman_metrics_update", "pgba_last_successful_backup_age"))]
