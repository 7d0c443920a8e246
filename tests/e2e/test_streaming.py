"""Barman's output followed as an event stream (`output?follow=1`) while a real recovery runs: directly,
by many clients at once, and through the shipped Apache vhost (which must not hold the events back)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest
import requests

from .conftest import Front, Sandbox, Service

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
    """(event name, data) as each event arrives; comments (the opening line, keepalives) are left out."""
    buffer = b""
    for chunk in response.iter_content(chunk_size=None):  # each chunk as it comes, not 512 bytes at a time
        buffer += chunk
        while b"\n\n" in buffer:
            raw, buffer = buffer.split(b"\n\n", 1)
            name, data = "message", []
            for line in raw.decode().split("\n"):
                if line.startswith("event: "):
                    name = line[len("event: "):]
                elif line.startswith("data: "):
                    data.append(line[len("data: "):])
            if data:
                yield name, "\n".join(data)


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
