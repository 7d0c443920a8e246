"""The read-only page: relative links only, views as fragments, the token never in a URL."""

import re

from pg_backup_api import create_app
from pg_backup_api.core.model import now_utc
from pg_backup_api.http import metrics
from pg_backup_api.rules.settings import Settings
from pg_backup_api.service.auth import TokenFile


def no_refresh(monkeypatch):
    monkeypatch.setattr(metrics, "spawn_refresh", lambda conf: None)


def test_every_link_and_script_of_the_page_is_relative(client, barman_files, monkeypatch):
    no_refresh(monkeypatch)
    barman_files.add_backup("20261127T010000")
    pages = [client.get(path).data.decode() for path in ("/ui/", "/ui/view", "/ui/view?server=pg",
                                                          "/ui/static/ui.js")]
    for page in pages[:3]:
        for link in re.findall(r'(?:href|src)="([^"]*)"', page):
            assert not link.startswith(("/", "http:", "https:", "//")), link
    assert re.findall(r"https?://", pages[3]) == []  # no host name: it works behind any proxy
    assert "sessionStorage" in pages[3] and "Authorization" in pages[3]


def test_the_servers_view_shows_the_state_and_a_stale_backup_in_red(client, barman_files, monkeypatch):
    no_refresh(monkeypatch)
    barman_files.add_backup("20261127T010000")  # long ago: older than 24 h
    view = client.get("/ui/view").data.decode()
    assert 'href="?server=pg"' in view
    assert "stale bad" in view


def test_the_server_view_draws_the_backups_and_the_window(client, barman_files, monkeypatch):
    no_refresh(monkeypatch)
    barman_files.add_backup("20261127T010000")
    barman_files.add_backup("20261126T010000", status="FAILED")
    view = client.get("/ui/view?server=pg").data.decode()
    assert 'class="window"' in view
    assert view.count('class="backup ') == 2
    assert "2026-11-27 01:00:00 UTC" in view


def test_an_unknown_server_or_operation_is_a_json_404(client, monkeypatch):
    no_refresh(monkeypatch)
    assert client.get("/ui/view?server=nope").status_code == 404
    assert client.get("/ui/view?server=pg&operation=20990101T000000").status_code == 404
    assert client.get("/ui/static/../api.py").status_code == 404
    assert client.get("/ui/view?token=x").status_code == 400


def test_with_tokens_the_frame_is_open_and_every_view_needs_read(barman_files, tmp_path, monkeypatch):
    no_refresh(monkeypatch)
    secret = TokenFile(str(tmp_path / "t.json")).create("viewer", "read")
    client = create_app(Settings(barman_conf=str(barman_files.conf), auth="token",
                                 tokens_file=str(tmp_path / "t.json"))).test_client()
    assert client.get("/ui/").status_code == 200
    assert client.get("/ui/static/ui.js").status_code == 200
    assert client.get("/ui/view").status_code == 401
    assert client.get("/ui/view", headers={"Authorization": f"Bearer {secret}"}).status_code == 200


def test_the_page_sends_a_content_security_policy_and_may_not_be_framed(client, barman_files, monkeypatch):
    no_refresh(monkeypatch)
    barman_files.add_backup("20261127T010000")
    for path in ("/ui/", "/ui/view", "/ui/view?server=pg", "/ui/static/ui.js", "/ui/static/ui.css"):
        response = client.get(path)
        assert response.status_code == 200, path
        policy = dict(part.strip().split(" ", 1) for part in response.headers["Content-Security-Policy"].split(";"))
        assert policy["default-src"] == "'none'"
        assert policy["script-src"] == policy["style-src"] == policy["connect-src"] == "'self'"
        assert policy["frame-ancestors"] == "'none'"
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "no-referrer"


def test_json_answers_are_not_sniffed_either(client, app):
    from werkzeug.test import Client

    from pg_backup_api import with_status_shortcut

    for response in (client.get("/servers"), client.get("/no/such/endpoint"), client.get("/status"),
                     Client(with_status_shortcut(app)).get("/status")):
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]


def test_the_page_has_no_inline_script_style_or_handler(client, barman_files, app, monkeypatch):
    """What the policy refuses: a <script> without src, <style>, a style attribute, an on... attribute."""
    no_refresh(monkeypatch)
    barman_files.add_backup("20261127T010000")
    barman_files.add_backup("20261126T010000", status="FAILED")
    store = app.extensions["pg_backup_api"]._store("pg")
    op_id = store.create({"operation_type": "backup", "start_time": "2026-11-27T01:00:00+00:00"}, now_utc())
    pages = [client.get(path).data.decode() for path in ("/ui/", "/ui/view", "/ui/view?server=pg",
                                                          f"/ui/view?server=pg&operation={op_id}")]
    for page in pages:
        assert re.findall(r"<script(?![^>]*\ssrc=)[^>]*>", page) == []
        assert re.findall(r"<style|\sstyle=|\son[a-z]+=", page, flags=re.I) == []
    # The time line's marks carry their place as data, for the page's script to set.
    assert re.search(r'class="window" data-left="[0-9.]+" data-width="[0-9.]+"', pages[2])
    assert len(re.findall(r'class="backup [a-z]+" data-left="[0-9.]+"', pages[2])) == 2
