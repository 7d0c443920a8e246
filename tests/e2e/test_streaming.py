"""Barman's output followed as an event stream (`output?follow=1`) while a real recovery runs: directly,
by many clients at once, and through the shipped Apache vhost (which must not hold the events back)."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from pg_backup_api.client import sse_events

from .conftest import Front, Sandbox, Service, wait_for

pytestmark = pytest.mark.e2e

DEFAULT_MAX_STREAMS = 12  # [api] max_streams when the configuration does not set it


def start_recovery(base_url: str, sandbox: Sandbox, name: str, **kw: Any) -> str:
    body = {"type": "recovery", "backup_id": sandbox["BACKUP_ID"],
            "destination_directory": sandbox.restore_dir(name), "remote_ssh_command": sandbox["SSH_COMMAND"]}
    response = requests.post(f"{base_url}/servers/{sandbox['BARMAN_SERVER']}/operations", json=body, timeout=60,
                             **kw)
    assert response.status_code == 202, response.text
    return response.json()["operation_id"]


def operation_path(sandbox: Sandbox, op_id: str) -> str:
    return f"/servers/{sandbox['BARMAN_SERVER']}/operations/{op_id}"


def events(response: requests.Response) -> Iterator[Tuple[str, str]]:
    """(event name, data) as each event arrives, read by the SSE specification's rules; comments (the
    opening line, keepalives) are left out."""
    return sse_events(response.iter_content(chunk_size=None))  # each chunk as it comes, not 512 bytes at a time


def follow(url: str, **kw: Any) -> List[Tuple[str, str]]:
    with requests.get(url, stream=True, timeout=(10, 120), **kw) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        return list(events(response))


def assert_every_line_once_then_the_status(received: List[Tuple[str, str]], service: Service, sandbox: Sandbox,
                                           op_id: str) -> Dict[str, Any]:
    path = operation_path(sandbox, op_id)
    names = [name for name, _ in received]
    assert names.count("status") == 1 and names[-1] == "status", names  # the status once, and last
    final = json.loads(received[-1][1])
    assert final == service.get(path).json()  # the same document as GET of the ended operation
    lines = [data for name, data in received if name == "message"]
    recorded = service.get(f"{path}/output", params={"follow": "0"}).text.splitlines()
    assert recorded, "barman printed nothing"
    assert lines == recorded  # every line, in order, none twice, none missing
    return final


def test_a_client_following_a_real_recovery_gets_every_line_once_then_the_final_status(sandbox, service):
    op_id = start_recovery(service.url, sandbox, "stream-direct")
    received = follow(f"{service.url}{operation_path(sandbox, op_id)}/output?follow=1")
    final = assert_every_line_once_then_the_status(received, service, sandbox, op_id)
    assert final["status"] == "DONE", final
    assert any("successfully prepared for recovery" in data for _, data in received)  # barman's last words


def test_twenty_followers_at_once_status_still_answers_and_each_open_stream_is_complete(sandbox, service):
    op_id = start_recovery(service.url, sandbox, "stream-twenty")
    url = f"{service.url}{operation_path(sandbox, op_id)}/output?follow=1"
    answered = threading.Barrier(21)
    results: List[Dict[str, Any]] = [{} for _ in range(20)]

    def follower(slot: Dict[str, Any]) -> None:
        try:
            with requests.get(url, stream=True, timeout=(10, 120)) as response:
                slot["code"] = response.status_code
                slot["retry_after"] = response.headers.get("Retry-After")
                answered.wait(timeout=60)  # every follower has its answer (a stream or a refusal)
                slot["events"] = list(events(response)) if response.status_code == 200 else []
        except Exception as exc:  # reported below, with the slot
            slot["error"] = repr(exc)
            answered.abort()

    threads = [threading.Thread(target=follower, args=(slot,)) for slot in results]
    for thread in threads:
        thread.start()
    answered.wait(timeout=60)
    # While the streams are open: /status answers at once (a generous bound; timing belongs in bench/).
    for _ in range(10):
        started = time.monotonic()
        assert requests.get(f"{service.url}/status", timeout=5).json() == "OK"
        assert time.monotonic() - started < 5
    assert service.get(operation_path(sandbox, op_id)).status_code == 200
    for thread in threads:
        thread.join(timeout=300)
    assert [slot for slot in results if "error" in slot] == []
    opened = [slot for slot in results if slot["code"] == 200]
    refused = [slot for slot in results if slot["code"] == 429]
    assert len(opened) == DEFAULT_MAX_STREAMS and len(refused) == 20 - DEFAULT_MAX_STREAMS, \
        [slot["code"] for slot in results]
    assert all(slot["retry_after"] for slot in refused)
    for slot in opened:
        assert_every_line_once_then_the_status(slot["events"], service, sandbox, op_id)
    # The slots are given back when the streams end: a new follower of the ended operation gets its stream.
    assert follow(url)[-1][0] == "status"


def test_events_pass_through_the_apache_vhost_as_they_are_printed(sandbox, service, apache_front: Front):
    op_id = start_recovery(apache_front.url, sandbox, "stream-apache", **apache_front.auth)
    url = f"{apache_front.url}{operation_path(sandbox, op_id)}/output?follow=1"
    received: List[Tuple[str, str]] = []
    state_at_first_line: Optional[str] = None
    with requests.get(url, stream=True, timeout=(10, 120), **apache_front.auth) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for name, data in events(response):
            if name == "message" and state_at_first_line is None:
                # Asked of the service directly, the moment the first line came out of Apache.
                state_at_first_line = service.get(operation_path(sandbox, op_id)).json()["status"]
            received.append((name, data))
    assert state_at_first_line == "IN_PROGRESS", "Apache held the events back until the operation ended"
    final = assert_every_line_once_then_the_status(received, service, sandbox, op_id)
    assert final["status"] == "DONE", final


def test_head_and_early_disconnecting_followers_give_their_slots_back(sandbox, service):
    """HEADs and clients that leave before reading, more of each than the service has slots: a follower
    still gets the whole stream afterwards (a HEAD used to keep its slot until a restart)."""
    failed = requests.post(f"{service.url}/servers/{sandbox['BARMAN_SERVER']}/operations", timeout=60, json={
        "type": "recovery", "backup_id": "latest", "destination_directory": str(sandbox.holding_files("stream-slots")),
        "remote_ssh_command": sandbox["SSH_COMMAND"]})  # a destination that holds a file: it ends at once
    assert failed.status_code == 202, failed.text
    op_id = failed.json()["operation_id"]
    service.wait_until_ended(sandbox["BARMAN_SERVER"], op_id)
    path = f"{operation_path(sandbox, op_id)}/output?follow=1"
    url = f"{service.url}{path}"
    rounds = 2 * DEFAULT_MAX_STREAMS
    for _ in range(rounds):
        head = requests.head(url, timeout=30)
        assert head.status_code == 200 and head.headers["Content-Type"].startswith("text/event-stream")
    for _ in range(rounds):  # a raw client that sends its request and goes before the first byte
        with socket.create_connection(("127.0.0.1", service.port), timeout=30) as sock:
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    for _ in range(rounds):  # requests, closing the stream unread
        with requests.get(url, stream=True, timeout=30) as response:
            assert response.status_code in (200, 429)  # a departed client's request may still be ending

    def follows() -> Optional[List[Tuple[str, str]]]:
        with requests.get(url, stream=True, timeout=(10, 120)) as response:
            return list(events(response)) if response.status_code == 200 else None

    received = wait_for(follows, what="a follower gets a slot")
    assert_every_line_once_then_the_status(received, service, sandbox, op_id)
