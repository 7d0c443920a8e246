"""Optional tokens, the audit trail and the per-server allowlists."""

import json
import stat

import pytest

from pg_backup_api import create_app
from pg_backup_api.auth import TokenFile
from pg_backup_api.settings import ServerPolicy, Settings

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


@pytest.fixture(autouse=True)
def a_backup(barman_files):
    barman_files.add_backup("20261127T010000")


def make_client(barman_files, spawned, **settings):
    app = create_app(Settings(barman_conf=str(barman_files.conf), **settings), spawn=spawned)
    return app.test_client()


def audit_lines(barman_files):
    path = barman_files.home / "pg-backup-api-audit.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture
def tokens(tmp_path):
    path = tmp_path / "tokens.json"
    file = TokenFile(str(path))
    secrets = {scope: file.create(f"{scope}-bot", scope) for scope in ("read", "operate", "admin")}
    return str(path), secrets


def bearer(secret):
    return {"Authorization": f"Bearer {secret}"}


def test_without_auth_every_endpoint_is_open(barman_files, spawned):
    client = make_client(barman_files, spawned)
    assert client.get("/servers/pg/operations").status_code == 200
    assert client.post("/servers/pg/operations", json=BODY).status_code == 202


def test_status_stays_open_with_auth_on(barman_files, spawned, tokens):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    assert client.get("/status").json == "OK"


@pytest.mark.parametrize("headers, words", [
    ({}, "authentication required"),
    ({"Authorization": "Basic abc"}, "authentication required"),
    ({"Authorization": "Bearer pgba_wrong"}, "not valid"),
])
def test_missing_or_wrong_tokens_are_401_json(barman_files, spawned, tokens, headers, words):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    response = client.get("/servers/pg/operations", headers=headers)
    assert response.status_code == 401
    assert words in response.json["error"]


def test_scopes_read_operate_admin(barman_files, spawned, tokens):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    secrets = tokens[1]
    assert client.get("/servers/pg/operations", headers=bearer(secrets["read"])).status_code == 200
    response = client.post("/servers/pg/operations", json=BODY, headers=bearer(secrets["read"]))
    assert response.status_code == 403
    assert "needs 'operate'" in response.json["error"]
    assert client.post("/servers/pg/operations", json=BODY, headers=bearer(secrets["operate"])).status_code == 202
    switch = {"type": "config_switch", "model_name": "m"}
    response = client.post("/servers/pg/operations", json=switch, headers=bearer(secrets["operate"]))
    assert response.status_code == 403
    assert "needs 'admin'" in response.json["error"]
    legacy = {"operation_type": "config_switch", "model_name": "m"}
    response = client.post("/servers/pg/operations", json=legacy, headers=bearer(secrets["operate"]))
    assert response.status_code == 403
    update = {"type": "config_update", "changes": [{"scope": "server", "server_name": "pg", "archiver": "on"}]}
    assert client.post("/operations", json=update, headers=bearer(secrets["operate"])).status_code == 403
    assert client.post("/operations", json=update, headers=bearer(secrets["admin"])).status_code == 202
    response = client.post("/servers/pg/operations", json=switch, headers=bearer(secrets["admin"]))
    assert response.status_code == 404  # past the scope check: the model does not exist


def test_tokens_are_stored_hashed_and_private(tokens):
    path, secrets = tokens
    text = open(path).read()
    assert all(secret not in text for secret in secrets.values())
    assert stat.S_IMODE(__import__("os").stat(path).st_mode) == 0o600
    assert [t.name for t in TokenFile(path).list()] == ["admin-bot", "operate-bot", "read-bot"]


def test_a_revoked_token_stops_working_without_a_restart(barman_files, spawned, tokens):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    headers = bearer(tokens[1]["read"])
    assert client.get("/servers/pg/operations", headers=headers).status_code == 200
    assert TokenFile(tokens[0]).revoke("read-bot")
    assert client.get("/servers/pg/operations", headers=headers).status_code == 401


def test_token_names_and_scopes_are_checked(tmp_path):
    file = TokenFile(str(tmp_path / "t.json"))
    for name, scope in [("bad name", "read"), ("ok", "root"), ("../x", "read")]:
        with pytest.raises(ValueError):
            file.create(name, scope)
    file.create("ok", "read")
    with pytest.raises(ValueError, match="exists already"):
        file.create("ok", "admin")


def test_every_mutating_request_is_audited_with_who_what_and_outcome(barman_files, spawned, tokens):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    op_id = client.post("/servers/pg/operations", json=BODY, headers=bearer(tokens[1]["operate"])).json[
        "operation_id"]
    client.post("/servers/pg/operations", json={"backup_id": "x"}, headers=bearer(tokens[1]["operate"]))
    client.post("/servers/pg/operations", json=BODY)
    client.get("/servers/pg/operations", headers=bearer(tokens[1]["read"]))
    accepted, rejected, anonymous = audit_lines(barman_files)
    assert accepted["token"] == "operate-bot"
    assert (accepted["method"], accepted["path"], accepted["status"]) == ("POST", "/servers/pg/operations", 202)
    assert accepted["operation_id"] == op_id
    assert rejected["status"] == 400 and "is required" in rejected["error"]
    assert anonymous["status"] == 401 and "token" not in anonymous


def test_the_certificate_subject_is_trusted_only_from_a_trusted_proxy(barman_files, spawned):
    client = make_client(barman_files, spawned)
    subject = {"X-Client-Cert-Subject": "CN=patroni-node-1,O=example"}
    op_id = client.post("/servers/pg/operations", json=BODY, headers=subject).json["operation_id"]
    client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/other"},
                headers=subject, environ_base={"REMOTE_ADDR": "192.0.2.7"})
    from_proxy, from_elsewhere = audit_lines(barman_files)
    assert from_proxy["client_cert_subject"] == "CN=patroni-node-1,O=example"
    assert "client_cert_subject" not in from_elsewhere
    assert from_elsewhere["remote_addr"] == "192.0.2.7"
    status = client.get(f"/servers/pg/operations/{op_id}").json
    assert status["requested_by"] == "cert:CN=patroni-node-1,O=example"


def test_allowlists_narrow_hosts_and_destinations(barman_files, spawned):
    policy = {"pg": ServerPolicy(allowed_hosts=("db2",), allowed_destinations=("/srv/pg/",))}
    client = make_client(barman_files, spawned, servers=policy)
    assert client.post("/servers/pg/operations", json=BODY).status_code == 202
    other_host = client.post("/servers/pg/operations", json={**BODY, "remote_ssh_command": "ssh pg@db9"})
    assert other_host.status_code == 422
    assert "host 'db9' is not an allowed" in other_host.json["error"]
    outside = client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/pgx"})
    assert outside.status_code == 422
    assert "destination_directory" in outside.json["error"]
    # Every path the recovery writes, not only the destination (see test_effects.py for all of them).
    staging = client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/pg/r2",
                                                           "target_name": "n", "staging_wal_directory": "/srv/x"})
    assert staging.status_code == 422
    assert staging.json["error"].startswith("field 'staging_wal_directory': /srv/x is not under an allowed")


def test_the_body_limit_is_configurable(barman_files, spawned):
    client = make_client(barman_files, spawned, max_body_bytes=2048)
    response = client.post("/servers/pg/operations", data="x" * 4096, content_type="application/json")
    assert response.status_code == 413
    assert "2048" in response.json["error"]


def test_settings_file_and_environment(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nauth = token\nmax_body_bytes = 4096\n\n[server pg]\nallowed_hosts = db2, db3\n")
    settings = Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf), "PG_BACKUP_API_MAX_BODY_BYTES": "8192"})
    assert settings.auth == "token"
    assert settings.max_body_bytes == 8192
    assert settings.policy("pg").allowed_hosts == ("db2", "db3")
    assert settings.policy("other") == ServerPolicy()
    for bad in ["[api]\nauth = maybe\n", "[nonsense]\n", "[api]\nmax_body_bytes = lots\n",
                "[api]\nmax_body_bytes = ²\n"]:
        conf.write_text(bad)
        with pytest.raises(ValueError, match="auth|nonsense|max_body_bytes"):
            Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)})
    with pytest.raises(ValueError):
        Settings.from_env({"PG_BACKUP_API_CONFIG": str(tmp_path / "missing.conf")})


def test_canceling_takes_the_scope_that_creating_took(barman_files, spawned, tokens):
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    secrets = tokens[1]
    update = {"type": "config_update", "changes": [{"scope": "server", "server_name": "pg", "archiver": "on"}]}
    config_op = client.post("/operations", json=update, headers=bearer(secrets["admin"])).json["operation_id"]
    refused = client.post(f"/operations/{config_op}/cancel", headers=bearer(secrets["operate"]))
    assert refused.status_code == 403
    assert "canceling config_update needs 'admin'" in refused.json["error"]
    assert client.get(f"/operations/{config_op}", headers=bearer(secrets["read"])).json["status"] == "IN_PROGRESS"
    canceled = client.post(f"/operations/{config_op}/cancel", headers=bearer(secrets["admin"]))
    assert (canceled.status_code, canceled.json["state"]) == (200, "canceled")
    recovery = client.post("/servers/pg/operations", json=BODY, headers=bearer(secrets["operate"])).json
    canceled = client.post(f"/servers/pg/operations/{recovery['operation_id']}/cancel",
                           headers=bearer(secrets["operate"]))
    assert (canceled.status_code, canceled.json["state"]) == (200, "canceled")


def test_diagnose_needs_the_admin_scope(barman_files, spawned, tokens, monkeypatch):
    monkeypatch.setattr("pg_backup_api.barman_adapter.diagnose", lambda path, timeout: {"barman": {"servers": {}}})
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    for scope in ("read", "operate"):
        response = client.get("/diagnose", headers=bearer(tokens[1][scope]))
        assert response.status_code == 403, scope
        assert "needs 'admin'" in response.json["error"]
    assert client.get("/diagnose", headers=bearer(tokens[1]["admin"])).json == {"barman": {"servers": {}}}
