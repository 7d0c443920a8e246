"""Optional tokens, the audit trail and the per-server allowlists."""

import grp
import json
import os
import re
import stat
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_backup_api import create_app
from pg_backup_api.cli import main
from pg_backup_api.rules.settings import ServerPolicy, Settings
from pg_backup_api.service.auth import ProxySecret, TokenFile, vouched_subject, write_proxy_secret

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


@pytest.fixture
def proxy(tmp_path):
    """The secret of the proxy, as `pg-backup-api proxy-secret` writes it: (settings, the header it sends)."""
    secret_file, include = tmp_path / "proxy-secret", tmp_path / "apache" / "proxy-secret.conf"
    write_proxy_secret(secret_file, include, os.getgid())
    sent = re.fullmatch(r'RequestHeader set X-Pg-Backup-Api-Proxy-Secret "([A-Za-z0-9_-]+)"',
                        include.read_text().splitlines()[-1]).group(1)
    return {"proxy_secret_file": str(secret_file)}, {"X-Pg-Backup-Api-Proxy-Secret": sent}


SUBJECT = {"X-Client-Cert-Subject": "CN=patroni-node-1,O=example"}


def requested_by(client, headers, **kw):
    response = client.post("/servers/pg/operations", json={**BODY, "destination_directory": f"/srv/r{uuid4().hex}"},
                           headers=headers, **kw)
    assert response.status_code == 202, response.json
    return client.get(f"/servers/pg/operations/{response.json['operation_id']}").json.get("requested_by")


def test_a_forged_certificate_subject_from_a_local_untrusted_connection_is_not_recorded(barman_files, spawned,
                                                                                       proxy):
    """Any local user can connect to the service on loopback, where the proxy connects from too."""
    client = make_client(barman_files, spawned, **proxy[0])
    assert requested_by(client, SUBJECT) is None
    assert requested_by(client, {**SUBJECT, "X-Pg-Backup-Api-Proxy-Secret": "pgba_guessed"}) is None
    assert requested_by(client, {**SUBJECT, "X-Pg-Backup-Api-Proxy-Secret": ""}) is None
    assert all("client_cert_subject" not in line for line in audit_lines(barman_files))
    # Without a secret file (the default one does not exist here), nobody vouches.
    client = make_client(barman_files, spawned, proxy_secret_file=str(barman_files.root / "nothing"))
    assert requested_by(client, {**SUBJECT, **proxy[1]}) is None
    assert make_client(barman_files, spawned, proxy_secret_file=None).post(
        "/servers/pg/operations", json=BODY, headers={**SUBJECT, **proxy[1]}).status_code == 202
    assert all("client_cert_subject" not in line for line in audit_lines(barman_files))


def test_the_subject_counts_only_with_the_proxy_secret_from_a_trusted_address(barman_files, spawned, proxy,
                                                                            tmp_path):
    client = make_client(barman_files, spawned, **proxy[0])
    assert requested_by(client, {**SUBJECT, **proxy[1]}) == "cert:CN=patroni-node-1,O=example"
    assert audit_lines(barman_files)[-1]["client_cert_subject"] == "CN=patroni-node-1,O=example"
    assert requested_by(client, {**SUBJECT, **proxy[1]}, environ_base={"REMOTE_ADDR": "192.0.2.7"}) is None
    assert audit_lines(barman_files)[-1]["remote_addr"] == "192.0.2.7"
    assert "client_cert_subject" not in audit_lines(barman_files)[-1]
    # A new secret takes effect at once, without a restart; the old one vouches no more.
    write_proxy_secret(tmp_path / "proxy-secret", tmp_path / "apache" / "proxy-secret.conf", os.getgid())
    assert requested_by(client, {**SUBJECT, **proxy[1]}) is None


def test_a_vouched_subject_is_stored_without_control_characters(barman_files, spawned, proxy):
    client = make_client(barman_files, spawned, **proxy[0])
    # As a header carries them: UTF-8 bytes (here a C1 CSI, U+009B, is two of them), decoded as latin-1.
    sent = "CN=a\x1b]0;title\x07\x1b[2J\u009b\x7fb".encode().decode("latin-1")
    assert requested_by(client, {"X-Client-Cert-Subject": sent, **proxy[1]}) == "cert:CN=a]0;title[2Jb"
    assert audit_lines(barman_files)[-1]["client_cert_subject"] == "CN=a]0;title[2Jb"
    # A byte that is no UTF-8 is kept as U+FFFD, which is no control character.
    assert requested_by(client, {"X-Client-Cert-Subject": "CN=\x9b\x85b", **proxy[1]}) == "cert:CN=\ufffd\ufffdb"
    # Apache sends the subject in UTF-8 (WSGI hands it over as latin-1): read as UTF-8, nothing lost.
    utf8 = {"X-Client-Cert-Subject": "CN=J\u00f6rg \u0105".encode().decode("latin-1"), **proxy[1]}
    assert requested_by(client, utf8) == "cert:CN=J\u00f6rg \u0105"
    only_controls = {"X-Client-Cert-Subject": "\x1b\x07", **proxy[1]}
    assert requested_by(client, only_controls) is None


@settings(max_examples=300, deadline=None)
@given(subject=st.text().map(lambda t: t.encode("utf-8", "surrogatepass").decode("latin-1")) | st.text(
    alphabet=st.characters(max_codepoint=255)))
def test_a_vouched_subject_never_holds_a_control_character(tmp_path_factory, subject):
    path = tmp_path_factory.getbasetemp() / "subject-property-secret"
    path.write_text("x" * 32)
    found = vouched_subject("127.0.0.1", {"X-Client-Cert-Subject": subject, "X-Pg-Backup-Api-Proxy-Secret": "x" * 32},
                            ("127.0.0.1",), ProxySecret(str(path)))
    assert found is None or (found and not re.search("[\x00-\x1f\x7f-\x9f]", found))


def test_a_short_or_unreadable_secret_file_vouches_for_no_one(tmp_path, caplog):
    short = tmp_path / "short"
    short.write_text("tooshort\n")
    assert not ProxySecret(str(short)).vouches("tooshort")
    assert "at least 32" in caplog.text
    folder = tmp_path / "a-directory"
    folder.mkdir()
    assert not ProxySecret(str(folder)).vouches("")
    assert not ProxySecret(str(tmp_path / "missing")).vouches("x" * 40)
    assert "does not exist" in caplog.text


def test_proxy_secret_writes_the_services_file_and_the_vhosts_include(tmp_path, monkeypatch, capsys):
    secret_file, include = tmp_path / "etc" / "proxy-secret", tmp_path / "apache2" / "proxy-secret.conf"
    monkeypatch.setenv("PG_BACKUP_API_PROXY_SECRET_FILE", str(secret_file))
    monkeypatch.setenv("PG_BACKUP_API_CONFIG", str(tmp_path / "none.conf"))
    (tmp_path / "none.conf").write_text("[api]\n")
    group = grp.getgrgid(os.getgid()).gr_name
    assert main(["proxy-secret", "--apache-include", str(include), "--group", group]) == 0
    assert "reload Apache" in capsys.readouterr().out
    secret = secret_file.read_text().strip()
    assert len(secret) >= 32
    assert include.read_text().splitlines()[-1] == f'RequestHeader set X-Pg-Backup-Api-Proxy-Secret "{secret}"'
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o640 and secret_file.stat().st_gid == os.getgid()
    assert stat.S_IMODE(include.stat().st_mode) == 0o600
    assert main(["proxy-secret", "--apache-include", str(include), "--group", group]) == 0
    assert secret_file.read_text().strip() != secret  # run again: a new secret
    assert main(["proxy-secret", "--apache-include", str(include), "--group", "no-such-group-here"]) == 1
    assert "no-such-group-here" in capsys.readouterr().err


def test_an_empty_proxy_secret_file_setting_means_no_proxy(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nproxy_secret_file =\n")
    assert Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)}).proxy_secret_file is None
    assert Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf), "PG_BACKUP_API_PROXY_SECRET_FILE": "/x"}
                             ).proxy_secret_file == "/x"
    assert Settings().proxy_secret_file == "/etc/pg-backup-api/proxy-secret"


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
    monkeypatch.setattr("pg_backup_api.barman_io.adapter.diagnose", lambda path, timeout: {"barman": {"servers": {}}})
    client = make_client(barman_files, spawned, auth="token", tokens_file=tokens[0])
    for scope in ("read", "operate"):
        response = client.get("/diagnose", headers=bearer(tokens[1][scope]))
        assert response.status_code == 403, scope
        assert "needs 'admin'" in response.json["error"]
    assert client.get("/diagnose", headers=bearer(tokens[1]["admin"])).json == {"barman": {"servers": {}}}
