"""The client commands against the real app from the factory, served on a loopback port."""

import io
import json
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from werkzeug.serving import make_server

from pg_backup_api import client, create_app
from pg_backup_api.cli import main
from pg_backup_api.core.model import State
from pg_backup_api.rules.settings import Settings
from pg_backup_api.service.auth import TokenFile
from pg_backup_api.store.jobs import OperationStore
from pg_backup_api.worker.runner import finish

ROOT = Path(__file__).resolve().parents[1]
SSH = "ssh postgres@db2"
RECOVER = ["recover", "--server", "pg", "--backup", "latest", "--ssh-command", SSH]


@pytest.fixture(autouse=True)
def setup(barman_files, monkeypatch):
    barman_files.add_backup("20261127T010000")
    (barman_files.home / "pg" / "meta" / "20261127T030000-backup.info").write_text(
        "backup_id=20261127T030000\nstatus=DONE\nbegin_time=2026-11-27 03:00:00.000000+00:00\n"
        "end_time=2026-11-27 03:00:05.000000+00:00\ntablespaces=[('tbs1', 16385, '/srv/tbs1')]\n")
    for name in ("PG_BACKUP_API_URL", "PG_BACKUP_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(client, "POLL_SECONDS", 0.05)


@contextmanager
def serving(app, ssl_context=None):
    server = make_server("127.0.0.1", 0, app, threaded=True, ssl_context=ssl_context)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"{'https' if ssl_context else 'http'}://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture
def serve(barman_files, spawned):
    """serve(spawn=..., **settings) -> the base URL of a fresh app; stopped after the test."""
    servers = []

    def start(spawn=spawned, wrap=None, **settings):
        app = create_app(Settings(barman_conf=str(barman_files.conf), **settings), spawn=spawn)
        servers.append(serving(wrap(app) if wrap else app))
        return servers[-1].__enter__()

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def url(serve):
    return serve()


def job(barman_files, op_id):
    return json.loads((barman_files.home / "pg" / "jobs" / f"{op_id}.json").read_text())


def store(barman_files):
    return OperationStore(barman_files.home / "pg")


class FinishingSpawn:
    """A worker stand-in that prints barman's phases into the progress file, then records an end."""

    def __init__(self, state=State.SUCCEEDED, output="Restore operation completed\n", exit_code=0,
                 reason=None, extra=None, phases=(), step=0.0):
        self.state, self.output, self.exit_code, self.reason = state, output, exit_code, reason
        self.extra, self.phases, self.step = extra, phases, step

    def __call__(self, op_type, server, op_id, store, barman_conf):
        thread = threading.Thread(target=self.work, args=(store, op_id))
        thread.start()
        if not self.step:
            thread.join()

    def work(self, store, op_id):
        for line in self.phases:
            time.sleep(self.step)
            with open(store.progress_path(op_id), "a") as progress:
                progress.write(line + "\n")
        time.sleep(self.step)
        finish(store, op_id, store.get(op_id).job, self.exit_code, self.output, self.state, self.reason,
               self.extra)


# -- recover -------------------------------------------------------------------------------


def test_recover_posts_every_option_with_its_json_name_and_prints_the_id(url, barman_files, capsys):
    code = main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore",
                 "--target-time", "2026-11-27T04:00:00+00:00", "--target-action", "promote", "--exclusive",
                 "--target-tli", "latest", "--standby-mode", "--no-get-wal", "--bwlimit", "100", "--jobs", "4",
                 "--network-compression", "--staging-wal-directory", "/srv/pg/wal_staging",
                 "--tablespace", "tbs1:/srv/pg/tbs1"])
    out = capsys.readouterr().out
    assert code == 0
    op_id = out.strip()
    stored = job(barman_files, op_id)
    recorded = ("operation_type", "start_time", "resolved_backup_id", "resolved_destination_directory",
                "target_address")
    assert {k: v for k, v in stored.items() if k not in recorded} \
        == {"backup_id": "latest", "destination_directory": "/srv/pg/restore", "remote_ssh_command": SSH,
            "target_time": "2026-11-27T04:00:00+00:00", "target_action": "promote", "exclusive": True,
            "target_tli": "latest", "standby_mode": True, "get_wal": False, "bwlimit": 100, "jobs": 4,
            "network_compression": True, "staging_wal_directory": "/srv/pg/wal_staging",
            "tablespaces": {"tbs1": "/srv/pg/tbs1"}}
    assert stored["operation_type"] == "recovery"
    assert stored["resolved_backup_id"] == "20261127T030000"


def test_recover_sends_only_what_was_given(url, barman_files, capsys):
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/a"]) == 0
    stored = job(barman_files, capsys.readouterr().out.strip())
    assert set(stored) == {"backup_id", "destination_directory", "remote_ssh_command", "operation_type",
                           "start_time", "resolved_backup_id", "resolved_destination_directory", "target_address"}
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/b", "--target-immediate",
                 "--target-tli", "2", "--get-wal"]) == 0
    stored = job(barman_files, capsys.readouterr().out.strip())
    assert (stored["target_immediate"], stored["target_tli"], stored["get_wal"]) == (True, 2, True)


@pytest.mark.parametrize("argv, error", [
    (["--server", "nope"], "pg-backup-api: 404 server 'nope' is not in the Barman configuration\n"),
    (["--target-action", "promote"], "pg-backup-api: 400 field 'target_action' needs a recovery target"),
    (["--target-time", "yesterday"], "pg-backup-api: 400 field 'target_time'"),
    (["--backup", "20990101T000000"], "pg-backup-api: 404 "),
])
def test_the_services_json_error_is_printed_and_exits_1(url, capsys, argv, error):
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", *argv]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(error)
    assert len(captured.err.splitlines()) == 1


@pytest.mark.parametrize("argv, words", [
    (["--tablespace", "tbs1"], "NAME:LOCATION"),
    (["--tablespace", "tbs1:/a", "--tablespace", "tbs1:/b"], "given twice"),
    (["--target-tli", "0"], "not a timeline"),
    (["--target-tli", "²"], "not a timeline"),
    (["--target-action", "later"], "invalid choice"),
    (["--jobs", "many"], "invalid int value"),
    (["--key", "client.key"], "--key needs --cert"),
])
def test_usage_errors_exit_2_as_argparse_does(url, capsys, argv, words):
    with pytest.raises(SystemExit) as exit_:
        main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", *argv])
    assert exit_.value.code == 2
    assert words in capsys.readouterr().err


def test_a_missing_required_option_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recover", "--server", "pg", "--backup", "latest", "--ssh-command", SSH])
    assert exit_.value.code == 2
    assert "--destination" in capsys.readouterr().err


# -- --wait --------------------------------------------------------------------------------


def test_wait_exits_0_when_done(serve, capsys):
    url = serve(spawn=FinishingSpawn())
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("[00:00] DONE operation " + lines[0] + " (recovery) in ")


def test_wait_exits_1_when_failed_with_barmans_output_and_the_reason(serve, capsys):
    output = "Starting remote restore for server pg\nERROR: ssh: connect to host db2 port 22: Connection refused\n"
    url = serve(spawn=FinishingSpawn(State.FAILED, output, 1, "barman exited with code 1"))
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 1
    captured = capsys.readouterr()
    op_id = captured.out.strip()
    assert captured.err.startswith(output)
    assert f"FAILED operation {op_id} (failed): barman exited with code 1" in captured.err


def test_wait_without_a_tty_prints_a_line_per_phase(serve, capsys):
    spawn = FinishingSpawn(phases=["Starting remote restore for server pg", "Copying the base backup."], step=0.4)
    url = serve(spawn=spawn)
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[8:] for line in lines[1:3]] == ["IN_PROGRESS preparing", "IN_PROGRESS copying base backup"]
    assert " DONE operation " in lines[3]
    assert len(lines) == 4
    assert "\r" not in "".join(lines)


def test_wait_rides_out_a_service_that_is_briefly_unavailable(serve, capsys):
    unavailable = {"left": 3}

    def flaky(app):
        def wsgi(environ, start_response):
            if environ["REQUEST_METHOD"] == "GET" and unavailable["left"]:
                unavailable["left"] -= 1
                start_response("503 Service Unavailable", [("Content-Type", "text/html")])
                return [b"<html>restarting</html>"]
            return app(environ, start_response)
        return wsgi

    url = serve(spawn=FinishingSpawn(), wrap=flaky)
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 0
    assert unavailable["left"] == 0
    assert " DONE " in capsys.readouterr().out


def test_ctrl_c_while_waiting_leaves_the_operation_running(url, barman_files):
    proc = subprocess.Popen([sys.executable, "-m", "pg_backup_api", *RECOVER, "--url", url,
                             "--destination", "/srv/pg/restore", "--wait"],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    op_id = proc.stdout.readline().strip()
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"operation {op_id} keeps running" in err
    assert f"pg-backup-api cancel --url {url} --server pg {op_id}" in err
    assert "Traceback" not in err
    assert store(barman_files).read_output(op_id) is None


def test_progress_on_a_terminal_is_one_updating_line():
    stream = io.StringIO()
    progress = client.Progress(stream, tty=True)
    progress.update(12, "IN_PROGRESS", "copying base backup")
    progress.update(3725, "IN_PROGRESS", "copying WAL")
    progress.close()
    assert stream.getvalue() == ("\r[00:12] IN_PROGRESS copying base backup\x1b[K"
                                 "\r[1:02:05] IN_PROGRESS copying WAL\x1b[K\n")


# -- backup --------------------------------------------------------------------------------


def test_backup_posts_its_options_and_waits_for_the_new_backup_id(serve, barman_files, capsys):
    url = serve(spawn=FinishingSpawn(output="Backup completed\n", extra={"new_backup_id": "20261127T100000"}))
    assert main(["backup", "--url", url, "--server", "pg", "--name", "before upgrade",
                 "--immediate-checkpoint", "--wait"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stored = job(barman_files, lines[0])
    assert (stored["operation_type"], stored["name"], stored["immediate_checkpoint"]) == (
        "backup", "before upgrade", True)
    assert "(backup)" in lines[1]
    assert lines[2] == "new backup: 20261127T100000"


def test_backup_without_options_sends_only_the_type(url, barman_files, capsys):
    assert main(["backup", "--url", url, "--server", "pg"]) == 0
    stored = job(barman_files, capsys.readouterr().out.strip())
    assert set(stored) == {"operation_type", "start_time"}


# -- operations, show, cancel --------------------------------------------------------------


def start_recoveries(url, capsys, count):
    ids = []
    for i in range(count):
        assert main([*RECOVER, "--url", url, "--destination", f"/srv/pg/r{i}"]) == 0
        ids.append(capsys.readouterr().out.strip())
    return ids


def test_operations_prints_a_table_filters_and_pages(url, barman_files, capsys):
    ids = start_recoveries(url, capsys, 3)
    st = store(barman_files)
    finish(st, ids[1], st.get(ids[1]).job, 0, "ok\n", State.SUCCEEDED, None)

    assert main(["operations", "--url", url, "--server", "pg"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "TYPE"]
    assert [line.split() for line in lines[1:]] == [[i, "recovery"] for i in ids]

    assert main(["operations", "--url", url, "--server", "pg", "--status", "DONE", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"operations": [{"id": ids[1], "type": "recovery"}]}

    assert main(["operations", "--url", url, "--server", "pg", "--limit", "2"]) == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 3
    assert captured.err == f"more: add --after {ids[1]}\n"
    assert main(["operations", "--url", url, "--server", "pg", "--after", ids[1]]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == [ids[2], "recovery"]

    assert main(["operations", "--url", url, "--server", "pg", "--type", "backup"]) == 0
    assert capsys.readouterr().err == "no operations\n"


def test_show_running_and_ended_operations(url, barman_files, capsys):
    (op_id,) = start_recoveries(url, capsys, 1)
    assert main(["show", "--url", url, "--server", "pg", op_id]) == 0
    shown = capsys.readouterr().out
    assert f"operation        {op_id}\n" in shown
    assert "status           IN_PROGRESS (running)\n" in shown
    assert "resolved backup  20261127T030000\n" in shown
    assert "phase            preparing\n" in shown

    st = store(barman_files)
    finish(st, op_id, st.get(op_id).job, 1, "ERROR: cannot reach db2\n", State.FAILED, "barman exited with code 1")
    assert main(["show", "--url", url, "--server", "pg", op_id]) == 0
    shown = capsys.readouterr().out
    assert "status           FAILED (failed)\n" in shown
    assert "reason           barman exited with code 1\n" in shown
    assert "exit code        1\n" in shown
    assert shown.endswith("output:\n  ERROR: cannot reach db2\n")
    assert "phase" not in shown

    assert main(["show", "--url", url, "--server", "pg", op_id, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["operation_id"], doc["status"], doc["exit_code"]) == (op_id, "FAILED", 1)

    assert main(["show", "--url", url, "--server", "pg", "20990101T000000"]) == 1
    assert capsys.readouterr().err.startswith("pg-backup-api: 404 ")


def test_cancel_then_cancel_again_is_a_409(url, barman_files, capsys):
    (op_id,) = start_recoveries(url, capsys, 1)
    assert main(["cancel", "--url", url, "--server", "pg", op_id]) == 0
    assert capsys.readouterr().out == f"operation {op_id}: FAILED (canceled): canceled on request\n"
    assert store(barman_files).read_output(op_id)["state"] == "canceled"
    assert main(["cancel", "--url", url, "--server", "pg", op_id]) == 1
    assert capsys.readouterr().err == (f"pg-backup-api: 409 operation '{op_id}' has already ended "
                                       "(state canceled)\n")


# -- connection, authentication, TLS -------------------------------------------------------


def test_a_token_is_sent_as_a_bearer_header(serve, barman_files, tmp_path, monkeypatch, capsys):
    tokens = tmp_path / "tokens.json"
    secret = TokenFile(str(tokens)).create("ops", "operate")
    url = serve(auth="token", tokens_file=str(tokens))
    assert main(["operations", "--url", url, "--server", "pg"]) == 1
    assert capsys.readouterr().err.startswith("pg-backup-api: 401 authentication required")
    assert main(["operations", "--url", url, "--server", "pg", "--token", "pgba_wrong"]) == 1
    assert capsys.readouterr().err == "pg-backup-api: 401 the bearer token is not valid\n"

    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--token", secret]) == 0
    op_id = capsys.readouterr().out.strip()
    assert job(barman_files, op_id)["requested_by"] == "token:ops"
    monkeypatch.setenv("PG_BACKUP_API_TOKEN", secret)
    monkeypatch.setenv("PG_BACKUP_API_URL", url)
    assert main(["show", "--server", "pg", op_id]) == 0
    assert op_id in capsys.readouterr().out


def test_the_url_comes_from_the_environment_and_a_refused_connection_is_one_line(monkeypatch, capsys):
    monkeypatch.setenv("PG_BACKUP_API_URL", "http://127.0.0.1:1/")
    assert main(["operations", "--server", "pg"]) == 1
    assert capsys.readouterr().err == "pg-backup-api: cannot connect to http://127.0.0.1:1: Connection refused\n"
    assert main(["operations", "--server", "pg", "--url", "nonsense"]) == 1
    assert "is not a valid URL" in capsys.readouterr().err


def test_an_answer_that_is_not_the_services_json_is_reported(serve, capsys):
    def proxy_page(status):
        def wsgi(environ, start_response):
            start_response(status, [("Content-Type", "text/html")])
            return [b"<html><body>\n<h1>Proxy   page</h1></body></html>"]
        return lambda app: wsgi

    url = serve(wrap=proxy_page("502 Bad Gateway"))
    assert main(["operations", "--url", url, "--server", "pg"]) == 1
    assert capsys.readouterr().err == "pg-backup-api: 502 <html><body> <h1>Proxy page</h1></body></html>\n"
    url = serve(wrap=proxy_page("200 OK"))
    assert main(["operations", "--url", url, "--server", "pg"]) == 1
    assert "200 not a JSON answer" in capsys.readouterr().err


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture
def pki(tmp_path):
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with openssl."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *key, "-keyout", "ca.key", "-out", "ca.crt", "-subj", "/CN=test-ca", "-days", "2",
            cwd=tmp_path)
    (tmp_path / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, ext in [("server", ["-extfile", "server.ext"]), ("client", [])]:
        openssl("req", *key, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=tmp_path)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.crt", "-days", "2", *ext, cwd=tmp_path)
    return tmp_path


def test_client_certificate_and_ca_for_an_mtls_api(pki, barman_files, spawned, capsys):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.load_verify_locations(pki / "ca.crt")
    context.verify_mode = ssl.CERT_REQUIRED
    app = create_app(Settings(barman_conf=str(barman_files.conf)), spawn=spawned)
    with serving(app, context) as url:
        tls = ["--cert", str(pki / "client.crt"), "--key", str(pki / "client.key"), "--cacert", str(pki / "ca.crt")]
        assert main(["operations", "--url", url, "--server", "pg", *tls]) == 0
        assert capsys.readouterr().err == "no operations\n"

        assert main(["operations", "--url", url, "--server", "pg", *tls[:4]]) == 1
        err = capsys.readouterr().err
        assert "certificate verify failed" in err and "--cacert" in err
        assert main(["operations", "--url", url, "--server", "pg", *tls[4:]]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pg-backup-api: ") and len(err.splitlines()) == 1
        assert main(["operations", "--url", url, "--server", "pg", *tls[:2], "--cacert", "/nonexistent/ca.crt"]) == 1
        assert "/nonexistent/ca.crt" in capsys.readouterr().err


def test_the_command_line_does_not_import_requests_for_the_worker_commands():
    code = "import sys, pg_backup_api.cli as c; c.build_parser(); print('requests' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout == "False\n"


def recorded_gets(app, seen):
    def wsgi(environ, start_response):
        if environ["REQUEST_METHOD"] == "GET":
            seen.append(environ["PATH_INFO"] + ("?" + environ["QUERY_STRING"] if environ["QUERY_STRING"] else ""))
        return app(environ, start_response)
    return wsgi


def test_wait_follows_the_event_stream_instead_of_polling(serve, capsys):
    seen = []
    spawn = FinishingSpawn(phases=["Starting remote restore for server pg", "Copying the base backup."], step=0.4)
    url = serve(spawn=spawn, wrap=lambda app: recorded_gets(app, seen))
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 0
    assert len(seen) == 1 and seen[0].endswith("/output?follow=1")
    lines = capsys.readouterr().out.splitlines()
    assert [line[8:] for line in lines[1:3]] == ["IN_PROGRESS preparing", "IN_PROGRESS copying base backup"]


def test_wait_polls_when_the_stream_is_refused(serve, capsys):
    seen = []

    def no_stream(app):
        def wsgi(environ, start_response):
            if "follow=" in environ.get("QUERY_STRING", ""):
                start_response("404 Not Found", [("Content-Type", "application/json")])
                return [b'{"error": "no such endpoint"}']
            return recorded_gets(app, seen)(environ, start_response)
        return wsgi

    url = serve(spawn=FinishingSpawn(), wrap=no_stream)
    assert main([*RECOVER, "--url", url, "--destination", "/srv/pg/restore", "--wait"]) == 0
    assert seen and all("/output" not in path for path in seen)
    assert " DONE operation " in capsys.readouterr().out


# -- what reaches a terminal ---------------------------------------------------------------

# Every character a terminal acts on rather than shows, but the line feed the client prints itself.
NOT_PRINTABLE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")
HOSTILE = "\x1b[2J\x1b]0;owned\x07\x9b1;31m\rrewritten\x08\x7f"


@settings(max_examples=300, deadline=None)
@given(values=st.dictionaries(st.sampled_from(["operation_id", "status", "state", "type", "backup_id", "reason",
                                               "requested_by", "name", "phase", "destination_directory",
                                               "some_option", "exit_code"]),
                              st.one_of(st.text(), st.integers(), st.lists(st.text(), max_size=3))),
       output=st.one_of(st.none(), st.text()), tail=st.lists(st.text(), max_size=4))
def test_show_of_an_operation_whose_fields_hold_escape_sequences_prints_none(values, output, tail):
    doc = {**values, "output": output, "output_tail": tail}
    shown = client.render_operation(doc)
    assert NOT_PRINTABLE.findall(shown) == []
    # Each field is one line: only the client's own line breaks, none of a value.
    assert shown.count("\n") == len(shown.splitlines()) - 1


def test_show_of_a_hostile_operation_through_the_service_prints_no_escape(url, barman_files, capsys):
    (op_id,) = start_recoveries(url, capsys, 1)
    path = barman_files.home / "pg" / "jobs" / f"{op_id}.json"
    job_fields = json.loads(path.read_text())
    path.write_text(json.dumps({**job_fields, "requested_by": f"cert:CN=x{HOSTILE}", "name": HOSTILE}))
    st_ = store(barman_files)
    finish(st_, op_id, st_.get(op_id).job, 1, f"line one{HOSTILE}\nline two\x1b[1A\n", State.FAILED,
           f"barman exited with code 1: {HOSTILE}")
    assert main(["show", "--url", url, "--server", "pg", op_id]) == 0
    shown = capsys.readouterr().out
    assert NOT_PRINTABLE.findall(shown) == []
    assert "requested by     cert:CN=x[2J]0;owned1;31m rewritten\n" in shown
    assert shown.endswith("output:\n  line one[2J]0;owned1;31m\n  rewritten\n  line two[1A\n")  # CR: a line break
    assert main(["wait", "--url", url, "--server", "pg", op_id]) == 1
    captured = capsys.readouterr()
    assert NOT_PRINTABLE.findall(captured.out + captured.err) == []
    assert "(failed): barman exited with code 1: [2J]0;owned1;31m rewritten\n" in captured.err


def test_an_error_or_a_table_from_the_service_prints_no_escape(serve, capsys):
    def hostile(app):
        def wsgi(environ, start_response):
            if environ["PATH_INFO"].endswith("/cancel"):
                start_response("409 Conflict", [("Content-Type", "application/json")])
                return [json.dumps({"error": f"busy{HOSTILE}"}).encode()]
            if environ["PATH_INFO"].endswith("/operations"):
                start_response("200 OK", [("Content-Type", "application/json")])
                return [json.dumps({"operations": [{"id": f"1{HOSTILE}", "type": HOSTILE}],
                                    "next": HOSTILE}).encode()]
            return app(environ, start_response)
        return wsgi

    url = serve(wrap=hostile)
    assert main(["cancel", "--url", url, "--server", "pg", "20261127T010000"]) == 1
    assert main(["operations", "--url", url, "--server", "pg"]) == 0
    captured = capsys.readouterr()
    assert NOT_PRINTABLE.findall(captured.out + captured.err) == []
    assert captured.err.startswith("pg-backup-api: 409 busy[2J]0;owned1;31m rewritten\n")


def test_wait_on_a_corrupt_operation_exits_1_with_the_reason(url, barman_files, capsys):
    (op_id,) = start_recoveries(url, capsys, 1)
    bad = store(barman_files).worker_path(op_id)
    bad.parent.mkdir(parents=True, exist_ok=True)
    bad.write_text("garbage")
    assert main(["wait", "--url", url, "--server", "pg", op_id]) == 1
    err = capsys.readouterr().err
    assert f"FAILED operation {op_id} (corrupt): " in err
    assert str(bad) in err


# -- the event stream as the SSE specification reads it ------------------------------------


@pytest.mark.parametrize("end", ["\n", "\r", "\r\n"])
def test_the_clients_event_parser_ends_lines_at_cr_lf_and_crlf(end):
    stream = (f"\ufeff: a comment{end}event: status{end}data: {{}}{end}{end}"
              f"data:no space{end}data{end}data:  two spaces{end}id: 7{end}retry: 10{end}{end}"
              f"event: ignored{end}{end}"
              f"data: cut off at the end{end}").encode()
    expected = [("status", "{}"), ("message", "no space\n\n two spaces")]
    assert list(client.sse_events([stream])) == expected
    # However the bytes arrive: one at a time, a CR and its LF in two chunks, a character cut in two.
    assert list(client.sse_events(stream[i:i + 1] for i in range(len(stream)))) == expected


def test_a_carriage_return_alone_ends_a_line_and_starts_a_field():
    injected = b'data: ok\revent: status\rdata: {"status": "DONE"}\n\n'
    assert list(client.sse_events([injected])) == [("status", 'ok\n{"status": "DONE"}')]
    utf8 = "data: caf\u00e9 \u2028 \U0001f600\n\n".encode()
    by_byte = (utf8[i:i + 1] for i in range(len(utf8)))
    assert list(client.sse_events(by_byte)) == [("message", "caf\u00e9 \u2028 \U0001f600")]


def test_line_separators_and_bidirectional_overrides_are_not_printed_as_they_are():
    # U+2028 breaks the one-line-per-field layout (hypothesis found it); U+202E reverses what follows.
    assert client.printable("a\u2028b\u2029c\u202ed\u2066e") == "a b cde"
