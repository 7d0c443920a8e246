"""GET .../output?follow=1: every line once, as it is printed, then the final status; a cap on streams
whose slots every way a response can end gives back; no text of Barman's output can make an event."""

import json
import socket
import struct
import threading
import time
from itertools import accumulate

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_backup_api import create_app
from pg_backup_api.client import sse_events
from pg_backup_api.core.model import OperationType, now_utc
from pg_backup_api.http import streaming
from pg_backup_api.rules.requests import job_document
from pg_backup_api.rules.settings import Settings
from pg_backup_api.worker import runner
from tests.conftest import wait_for

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


def events(body: bytes):
    """[(event name, data)] of an event stream, parsed by the SSE specification's rules."""
    return list(sse_events([body]))


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


# -- stream slots: every way a response ends gives its slot back ----------------------------------


def one_slot_app(barman_files, spawned, setup=lambda app: None):
    app = create_app(Settings(barman_conf=str(barman_files.conf), max_streams=1), spawn=spawned)
    setup(app)
    client = app.test_client()
    return app, client, f"/servers/pg/operations/{start(client, barman_files)}/output?follow=1"


def slot_is_free(client, url) -> bool:
    response = client.get(url, buffered=False)
    try:
        return response.status_code == 200
    finally:
        response.close()


def test_head_of_a_follow_stream_gives_its_slot_back(barman_files, spawned):
    app, client, url = one_slot_app(barman_files, spawned)
    head = client.head(url, buffered=True)  # buffered: the test client closes the body, as a server does
    assert head.status_code == 200 and head.mimetype == "text/event-stream"
    assert slot_is_free(client, url)


def test_a_follow_response_closed_before_its_first_byte_gives_its_slot_back(barman_files, spawned):
    app, client, url = one_slot_app(barman_files, spawned)
    unread = client.get(url, buffered=False)
    assert unread.status_code == 200
    unread.close()  # the client left before the server sent anything
    assert slot_is_free(client, url)


@pytest.mark.parametrize("where", ["making the events", "after the view"])
def test_an_error_after_the_slot_is_taken_gives_it_back(barman_files, spawned, monkeypatch, where):
    broken = {"on": True}

    def fail(response):
        if broken["on"] and response.mimetype == "text/event-stream":
            raise RuntimeError("broken on purpose")
        return response

    app, client, url = one_slot_app(barman_files, spawned,
                                    (lambda app: app.after_request(fail)) if where == "after the view" else
                                    (lambda app: None))
    if where == "making the events":
        real = streaming.follow

        def follow(*args, **kwargs):
            if broken["on"]:
                raise RuntimeError("broken on purpose")
            return real(*args, **kwargs)

        monkeypatch.setattr(streaming, "follow", follow)
    failed = client.get(url)
    assert failed.status_code == 500 and isinstance(failed.json["error"], str)
    broken["on"] = False
    assert slot_is_free(client, url)


def test_a_thousand_head_requests_in_a_row_leave_every_slot_free(client, barman_files, app):
    url = f"/servers/pg/operations/{start(client, barman_files)}/output?follow=1"
    for _ in range(1000):
        assert client.head(url, buffered=True).status_code == 200
    limit = app.extensions["pg_backup_api.streams"].limit
    opened = [client.get(url, buffered=False) for _ in range(limit)]
    try:
        assert [r.status_code for r in opened] == [200] * limit  # every slot, none lost to the HEADs
        assert client.get(url).status_code == 429
    finally:
        for response in opened:
            response.close()


def test_a_client_gone_before_the_first_byte_gives_its_slot_back_on_a_real_server(barman_files, spawned):
    from tests.test_client import serving

    app = create_app(Settings(barman_conf=str(barman_files.conf), max_streams=1), spawn=spawned)
    client = app.test_client()
    op_id = start(client, barman_files)
    store = app.extensions["pg_backup_api"]._store("pg")
    runner.finish(store, op_id, store.get(op_id).job, 0, "done\n", runner.State.SUCCEEDED, None)
    path = f"/servers/pg/operations/{op_id}/output?follow=1"
    with serving(app) as base:
        port = int(base.rsplit(":", 1)[1])
        import requests

        for method, reset in [("HEAD", False), ("GET", False), ("HEAD", True), ("GET", True)] * 5:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
                if reset:  # closed with a TCP reset
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                # Closed without reading a byte.
        for _ in range(10):
            # Closed unread, with the answer in its buffer: the kernel resets the connection, and werkzeug's
            # server, reading what is left of the request, fails before it closes the response.
            with requests.get(base + path, stream=True, timeout=30):
                pass

        def follows() -> bool:
            # Each request's thread may still be ending when the next connection comes: wait for it.
            with requests.get(base + path, stream=True, timeout=30) as response:
                return response.status_code == 200 and list(sse_events(response.iter_content(None)))[-1][0] == "status"

        wait_for(follows, what="a follower gets the one slot")


# -- line separators and corrupt operations -------------------------------------------------------


def ended_operation(store, output_bytes=None, recorded=""):
    """An operation of server pg that has ended FAILED; *output_bytes* is its progress file, if any."""
    op_id = store.create(job_document(OperationType.BACKUP, {}, now_utc()), now_utc())
    if output_bytes is not None:
        store.progress_path(op_id).write_bytes(output_bytes)
    runner.finish(store, op_id, store.get(op_id).job, 1, recorded, runner.State.FAILED, "barman exited")
    return op_id


def test_a_carriage_return_in_an_output_line_cannot_inject_an_event(client, app):
    store = app.extensions["pg_backup_api"]._store("pg")
    injected = b'ok\revent: status\rdata: {"status": "DONE", "state": "succeeded"}\r\rnext\n'
    op_id = ended_operation(store, injected)
    received = events(client.get(f"/servers/pg/operations/{op_id}/output?follow=1").get_data())
    assert received[:-1] == [("message", line) for line in injected.decode().splitlines()]
    assert [name for name, _ in received].count("status") == 1
    assert json.loads(received[-1][1])["state"] == "failed"


SEPARATORS = ["\r", "\n", "\r\n", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
OUTPUT = st.lists(st.one_of(st.text(max_size=30), st.sampled_from(SEPARATORS + ["event: status", "data: {}", ":"])),
                  max_size=30).map("".join)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=OUTPUT, recorded_only=st.booleans(), cuts=st.lists(st.integers(1, 40), max_size=10))
def test_any_output_streams_as_exactly_its_lines_and_the_status_alone(app, text, recorded_only, cuts):
    """For any output, a parser that follows the SSE specification (fed in any chunks) yields exactly the
    output's lines (str.splitlines) as data, then the one status event the server sent."""
    store = app.extensions["pg_backup_api"]._store("pg")
    if recorded_only:  # an operation of the reference service: no progress file, the output in its end
        op_id = ended_operation(store, None, text)
    else:
        op_id = ended_operation(store, text.encode())
    body = app.test_client().get(f"/servers/pg/operations/{op_id}/output?follow=1", buffered=True).get_data()
    chunks = [body[a:b] for a, b in zip([0, *accumulate(cuts)], [*accumulate(cuts), len(body) + 1])]
    received = list(sse_events(chunks))
    assert [data for name, data in received[:-1]] == text.splitlines()
    assert [name for name, _ in received] == ["message"] * len(text.splitlines()) + ["status"]
    assert json.loads(received[-1][1])["operation_id"] == op_id


@given(data=st.text())
def test_an_event_holds_its_data_whatever_the_data(data):
    (received,) = sse_events([streaming.event(data, "status")])
    assert received == ("status", "\n".join(data.splitlines()))


def never_ending(monkeypatch):
    """time.sleep of the stream, failing once the stream has polled 50 times without ending."""
    polls = {"n": 0}

    def sleep(seconds):
        polls["n"] += 1
        if polls["n"] > 50:
            raise AssertionError("the stream polls on and never ends")

    monkeypatch.setattr(streaming.time, "sleep", sleep)


@pytest.mark.parametrize("bad_file", ["job", "output", "worker"])
def test_a_corrupt_operations_stream_ends_with_a_failed_status(client, app, monkeypatch, bad_file):
    store = app.extensions["pg_backup_api"]._store("pg")
    op_id = store.create(job_document(OperationType.BACKUP, {}, now_utc()), now_utc())
    store.ensure_dirs()
    store.progress_path(op_id).write_text("Starting backup\n")
    path = {"job": store.job_path(op_id), "output": store.output_path(op_id), "worker": store.worker_path(op_id)}
    path[bad_file].write_text("{ not json")
    never_ending(monkeypatch)
    received = events(client.get(f"/servers/pg/operations/{op_id}/output?follow=1").get_data())
    assert received[0] == ("message", "Starting backup")
    assert [name for name, _ in received] == ["message", "status"]
    status = json.loads(received[-1][1])
    assert (status["status"], status["state"], status["corrupt_file"]) == ("FAILED", "corrupt", str(path[bad_file]))
    assert status["reason"]
