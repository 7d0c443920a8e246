"""The HTTP contract existing clients (curl users, Patroni's barman script) depend on, against real
files; only the worker start is recorded."""

import io
import json
import threading

import pytest

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


@pytest.fixture(autouse=True)
def a_backup(barman_files):
    barman_files.add_backup("20261127T010000", name="nightly")
    barman_files.add_backup("20261127T020000", status="FAILED")


def post(client, body, server="pg", **kw):
    return client.post(f"/servers/{server}/operations", json=body, **kw)


def test_status_is_the_json_string_ok(client):
    response = client.get("/status")
    assert response.status_code == 200
    assert response.mimetype == "application/json"
    assert json.loads(response.data) == "OK"


def test_post_answers_202_with_the_id_and_a_location(client, spawned):
    response = post(client, BODY)
    assert response.status_code == 202
    op_id = response.json["operation_id"]
    assert response.headers["Location"] == f"/servers/pg/operations/{op_id}"
    assert spawned.calls == [("recovery", "pg", op_id)]


def test_the_job_file_records_the_request_and_the_resolved_backup(client, barman_files):
    op_id = post(client, BODY).json["operation_id"]
    job = json.loads((barman_files.home / "pg" / "jobs" / f"{op_id}.json").read_text())
    assert job["operation_type"] == "recovery"
    assert job["backup_id"] == "latest"
    assert job["resolved_backup_id"] == "20261127T010000"
    assert job["destination_directory"] == "/srv/pg/restore"
    assert job["start_time"].endswith("+00:00")


def test_a_new_operation_is_in_progress_and_listed(client):
    op_id = post(client, BODY).json["operation_id"]
    status = client.get(f"/servers/pg/operations/{op_id}").json
    assert status["status"] == "IN_PROGRESS"
    assert status["recovery_id"] == op_id
    assert client.get("/servers/pg/operations").json == {"operations": [{"id": op_id, "type": "recovery"}]}


def test_the_legacy_dialect_is_accepted(client):
    body = {k: v for k, v in BODY.items() if k != "type"}
    assert post(client, {"operation_type": "recover", **body}).status_code == 202


def post_concurrently(app, bodies):
    results = []

    def worker(body):
        results.append(post(app.test_client(), body))

    threads = [threading.Thread(target=worker, args=(body,)) for body in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_posts_in_the_same_second_all_succeed_with_distinct_ids(app):
    results = post_concurrently(app, [{**BODY, "destination_directory": f"/srv/pg/r{i}"} for i in range(20)])
    assert [r.status_code for r in results] == [202] * 20
    assert len({r.json["operation_id"] for r in results}) == 20


def test_one_recovery_per_destination_even_under_a_hundred_concurrent_posts(app):
    results = post_concurrently(app, [BODY] * 100)
    codes = sorted(r.status_code for r in results)
    assert codes == [202] + [409] * 99
    winner = next(r.json["operation_id"] for r in results if r.status_code == 202)
    conflict = next(r.json["error"] for r in results if r.status_code == 409)
    assert winner in conflict


def test_the_same_directory_on_another_host_is_another_destination(client):
    assert post(client, BODY).status_code == 202
    assert post(client, {**BODY, "remote_ssh_command": "ssh postgres@db3"}).status_code == 202
    assert post(client, {**BODY, "remote_ssh_command": "ssh -p 2222 postgres@db2"}).status_code == 202
    assert post(client, {**BODY, "remote_ssh_command": "ssh -l other db2"}).status_code == 409


@pytest.mark.parametrize("backup_id, resolved", [
    ("latest", "20261127T010000"), ("last", "20261127T010000"), ("oldest", "20261127T010000"),
    ("first", "20261127T010000"), ("latest-full", "20261127T010000"), ("nightly", "20261127T010000"),
    ("20261127T010000", "20261127T010000"),
])
def test_backup_aliases_and_names_resolve_exactly(client, barman_files, backup_id, resolved):
    op_id = post(client, {**BODY, "backup_id": backup_id}).json["operation_id"]
    assert client.get(f"/servers/pg/operations/{op_id}").json["resolved_backup_id"] == resolved


@pytest.mark.parametrize("backup_id", ["a", "lat", "t", "20261127T999999", "latest "])
def test_substrings_of_aliases_are_not_aliases(client, backup_id):
    response = post(client, {**BODY, "backup_id": backup_id})
    assert response.status_code == 404
    assert backup_id in response.json["error"]


def test_a_failed_backup_is_refused_with_its_status(client):
    for backup_id in ["20261127T020000", "last-failed"]:
        response = post(client, {**BODY, "backup_id": backup_id})
        assert response.status_code == 422
        assert "fail" in response.json["error"].lower()


@pytest.mark.parametrize("request_kwargs, status, words", [
    ({"data": "not json", "content_type": "application/json"}, 400, "not valid JSON"),
    ({"data": "", "content_type": "application/json"}, 400, "empty"),
    ({"data": json.dumps(BODY), "content_type": "text/plain"}, 400, "Content-Type: application/json"),
    ({"json": [1, 2]}, 400, "JSON object"),
    ({"json": {**BODY, "type": "rm"}}, 400, "field 'type'"),
    ({"json": {**BODY, "backup_id": None}}, 400, "field 'backup_id'"),
    ({"json": {"backup_id": "latest"}}, 400, "is required"),
    ({"json": {**BODY, "extra": 1}}, 400, "unknown field(s): extra"),
    ({"json": {"type": "config_switch", "model_name": "m"}}, 404, "model 'm' is not in the Barman configuration"),
    ({"json": {"type": "config_switch"}}, 400, "exactly one of 'model_name' and 'reset'"),
    ({"json": {"type": "config_switch", "model_name": "m", "reset": True}}, 400, "exactly one of"),
    ({"json": {"type": "backup", "name": "x;rm"}}, 400, "field 'name'"),
    ({"json": {"type": "backup", "jobs": 0}}, 400, "field 'jobs'"),
    ({"data": "x" * 70000, "content_type": "application/json"}, 413, "larger than"),
    # Format checks run on strings only; any other type is refused by `type`, naming the field.
    ({"json": {**BODY, "remote_ssh_command": None}}, 400, "field 'remote_ssh_command' must be of type string"),
    ({"json": {**BODY, "destination_directory": 5}}, 400, "field 'destination_directory' must be of type string"),
    ({"json": {**BODY, "tablespaces": {"t": {}}}}, 400, "field 'tablespaces.t' must be of type string"),
    ({"json": {**BODY, "staging_wal_directory": []}}, 400, "field 'staging_wal_directory' must be of type string"),
    ({"json": {**BODY, "jobs": 2.0}}, 400, "field 'jobs' must be of type integer"),
    ({"data": json.dumps(BODY)[:-1] + ', "bwlimit": 1e400}', "content_type": "application/json"}, 400,
     "field 'bwlimit' must be of type integer"),
    ({"data": "[" * 5000 + "]" * 5000, "content_type": "application/json"}, 400, "nested too deeply"),
])
def test_bad_posts_get_a_json_error_and_store_nothing(client, barman_files, request_kwargs, status, words):
    response = client.post("/servers/pg/operations", **request_kwargs)
    assert response.status_code == status
    assert words in response.json["error"]
    jobs = barman_files.home / "pg" / "jobs"
    assert not jobs.exists() or list(jobs.iterdir()) == []


class RefusingBody(io.RawIOBase):
    """A request body the WSGI server cannot read: gunicorn raises its own ParseException (not an OSError)
    for a malformed chunk, e.g. InvalidChunkSize."""

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return 0

    def tell(self):
        return 0

    def readinto(self, buffer):
        raise type("InvalidChunkSize", (Exception,), {})("Invalid chunk size: b'zz'")


def test_a_body_the_wsgi_server_cannot_read_is_a_json_400_not_a_500(client, barman_files):
    response = client.post("/servers/pg/operations", input_stream=RefusingBody(), content_type="application/json",
                           headers={"Transfer-Encoding": "chunked"},
                           environ_overrides={"wsgi.input_terminated": True, "CONTENT_LENGTH": ""})
    assert response.status_code == 400, response.json
    assert "the request body cannot be read: Invalid chunk size" in response.json["error"]
    assert not list((barman_files.home / "pg" / "jobs").glob("*.json"))


def test_unknown_server_is_404_everywhere(client):
    for response in [client.get("/servers/nope/operations"), post(client, BODY, server="nope"),
                     client.get("/servers/nope/operations/20261127T093201")]:
        assert response.status_code == 404
        assert "server 'nope'" in response.json["error"]


def test_unknown_or_malformed_operation_is_404(client):
    for op_id in ["20261127T093201", "..%2F..%2Fetc", "x"]:
        response = client.get(f"/servers/pg/operations/{op_id}")
        assert response.status_code == 404
        assert "error" in response.json


def test_unknown_paths_and_methods_are_json_errors(client):
    assert client.get("/nope").status_code == 404
    assert client.get("/nope").json["error"].startswith("no such endpoint")
    for method in ("delete", "put", "patch", "options"):
        response = getattr(client, method)("/servers/pg/operations")
        assert response.status_code == 405
        assert response.mimetype == "application/json"
        assert "error" in response.json


def test_instance_operations_list_and_404(client):
    assert client.get("/operations").json == {"operations": []}
    assert client.get("/operations/20261127T093201").status_code == 404
    response = client.post("/operations", json={"type": "config_update", "changes": []})
    assert response.status_code == 400
    assert "field 'changes'" in response.json["error"]


def test_a_worker_that_cannot_start_leaves_a_failed_operation_not_a_lost_one(client, spawned):
    spawned.fail = True
    response = post(client, BODY)
    assert response.status_code == 500
    assert "error" in response.json
    [op] = client.get("/servers/pg/operations").json["operations"]
    status = client.get(f"/servers/pg/operations/{op['id']}").json
    assert status["status"] == "FAILED"
    assert status["state"] == "failed"
    assert "cannot start the worker" in status["reason"]


def test_a_broken_configuration_is_a_json_503_not_a_crash(client, barman_files):
    barman_files.conf.write_text("[barman]\nthis is not ini\n")
    response = client.get("/servers/pg/operations")
    assert response.status_code == 503
    assert "barman.conf" in response.json["error"]


def test_openapi_document_is_served(client):
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.")
    assert "/servers/{server_name}/operations" in doc["paths"]


def test_the_status_shortcut_answers_exactly_as_flask_does(app):
    from werkzeug.test import Client

    from pg_backup_api import with_status_shortcut

    direct, shortcut = app.test_client().get("/status"), Client(with_status_shortcut(app)).get("/status")
    assert shortcut.status_code == direct.status_code == 200
    assert shortcut.get_data() == direct.get_data()
    assert shortcut.headers["Content-Type"] == direct.headers["Content-Type"]
    assert shortcut.headers["Content-Length"] == direct.headers["Content-Length"]
    # Everything else still goes through Flask.
    assert Client(with_status_shortcut(app)).get("/servers/pg/operations").json == {"operations": []}
    assert Client(with_status_shortcut(app)).post("/status").status_code == 405


@pytest.mark.parametrize("query, parameter", [
    ("limit=%C2%B2", "limit"),  # "²".isdigit() is true; int("²") fails
    ("limit=" + "9" * 5000, "limit"),
    ("after=20261127T093201-%C2%B2", "after"),
    ("after=%D9%A1", "after"),
    ("type=%00", "type"),
    ("status=done", "status"),
])
def test_bad_list_query_parameters_get_a_400_naming_them(client, query, parameter):
    response = client.get(f"/servers/pg/operations?{query}")
    assert response.status_code == 400
    assert f"query parameter '{parameter}'" in response.json["error"]


@pytest.mark.parametrize("path", ["/servers//operations", "/servers/pg/backups/%2Flatest", "/operations//x"])
def test_a_path_with_an_empty_segment_is_a_json_404_not_a_redirect(client, path):
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json
