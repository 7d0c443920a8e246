"""GET .../output?follow=1: every line once, as it is printed, then the final status; a cap on streams."""

import json
import threading
import time

from pg_backup_api import create_app, runner
from pg_backup_api.settings import Settings

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


def events(body: bytes):
    """[(event name, data)] of an event stream."""
    found = []
    for block in body.decode().split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        name = next((line[7:] for line in lines if line.startswith("event: ")), "message")
        found.append((name, "\n".join(line[6:] for line in lines if line.startswith("data: "))))
    return found


def start(client, barman_files):
    barman_files.add_backup("20261127T010000")
    response = client.post("/servers/pg/operations", json=BODY)
    assert response.status_code == 202
    return response.json["operation_id"]


def test_a_follower_gets_every_line_once_as_it_is_printed_then_the_status(client, barman_files, app):
    op_id = start(client, barman_files)
    store = app.extensions["pg_backup_api"]._store("pg")
    store.ensure_dirs()
    lines = [f"line {i} of barman's output" for i in range(50)]

    def worker():
        with open(store.progress_path(op_id), "ab") as progress:
            for i, line in enumerate(lines):
                # Half lines too: a line is sent only once it is whole.
                progress.write(line[:5].encode())
                progress.flush()
                time.sleep(0.005)
                progress.write(line[5:].encode() + b"\n")
                progress.flush()
                if i % 10 == 0:
                    time.sleep(0.3)
        runner.finish(store, op_id, store.get(op_id).job, 0, "\n".join(lines) + "\n",
                      runner.State.SUCCEEDED, None)

    thread = threading.Thread(target=worker)
    thread.start()
    response = client.get(f"/servers/pg/operations/{op_id}/output?follow=1")
    assert response.status_code == 200
    assert response.mimetype == "text/event-stream"
    received = events(response.get_data())
    thread.join()
    assert [data for name, data in received if name == "message"] == lines
    assert received[-1][0] == "status"
    status = json.loads(received[-1][1])
    assert (status["operation_id"], status["status"], status["state"]) == (op_id, "DONE", "succeeded")


def test_following_an_ended_operation_gives_its_output_and_status_at_once(client, barman_files, app):
    op_id = start(client, barman_files)
    store = app.extensions["pg_backup_api"]._store("pg")
    runner.finish(store, op_id, store.get(op_id).job, 1, "only\nthis\n", runner.State.FAILED, "barman exited")
    received = events(client.get(f"/servers/pg/operations/{op_id}/output?follow=1").get_data())
    assert received[:2] == [("message", "only"), ("message", "this")]
    assert json.loads(received[2][1])["state"] == "failed"
    assert len(received) == 3


def test_follow_0_is_the_text_and_other_values_or_parameters_are_refused(client, barman_files):
    op_id = start(client, barman_files)
    assert client.get(f"/servers/pg/operations/{op_id}/output?follow=0").mimetype == "text/plain"
    bad = client.get(f"/servers/pg/operations/{op_id}/output?follow=2")
    assert bad.status_code == 400 and "'follow'" in bad.json["error"]
    other = client.get(f"/servers/pg/operations/{op_id}/output?tail=1")
    assert other.status_code == 400 and "'tail'" in other.json["error"]
    assert client.get("/servers/pg/operations/20990101T000000/output?follow=1").status_code == 404


def test_beyond_max_streams_a_follower_gets_429_with_retry_after(barman_files, spawned):
    app = create_app(Settings(barman_conf=str(barman_files.conf), max_streams=1), spawn=spawned)
    client = app.test_client()
    op_id = start(client, barman_files)
    first = client.get(f"/servers/pg/operations/{op_id}/output?follow=1", buffered=False)
    try:
        assert first.status_code == 200
        second = client.get(f"/servers/pg/operations/{op_id}/output?follow=1")
        assert second.status_code == 429
        assert second.headers["Retry-After"]
        assert "1 output streams" in second.json["error"]
    finally:
        first.close()  # the client goes: the slot is given back
    store = app.extensions["pg_backup_api"]._store("pg")
    runner.finish(store, op_id, store.get(op_id).job, 0, "", runner.State.SUCCEEDED, None)
    assert client.get(f"/servers/pg/operations/{op_id}/output?follow=1").status_code == 200
