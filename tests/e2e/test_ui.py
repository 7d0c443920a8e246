"""The read-only page `/ui/` in headless Chromium (Debian's, driven by Playwright) on the real stack:
the servers, one server's backups and recovery window, a recovery started with the client command line
followed on the page until DONE; directly and through the shipped Apache vhost with a client certificate.

A screenshot of each view goes to artifacts/screenshots/ (CI keeps that folder).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

from .conftest import ROOT, VENV, Front, Sandbox, Service, unavailable

pytestmark = pytest.mark.e2e

CHROMIUM = Path("/usr/bin/chromium")
# Debian's build, run as it is: no sandbox (root in a container), nothing fetched from Google's services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
VIEWPORT = {"width": 1200, "height": 800}
CLI = str(VENV / "bin" / "pg-backup-api")

# Installed before the page's own script: every change of the output or of the state is written down
# with both values, so a test can tell lines that arrived while the operation ran from a page that
# was only drawn once it had ended.
RECORD_OUTPUT = """
window.__outputLog = [];
new MutationObserver(function () {
  var pre = document.getElementById("output"), state = document.getElementById("state");
  if (!pre || !state) { return; }
  var entry = {lines: pre.textContent.split("\\n").filter(Boolean).length, state: state.textContent};
  var last = window.__outputLog[window.__outputLog.length - 1];
  if (!last || last.lines !== entry.lines || last.state !== entry.state) { window.__outputLog.push(entry); }
}).observe(document, {subtree: true, childList: true, characterData: true});
// What the page's Content-Security-Policy refused, if anything.
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", function (e) {
  window.__cspViolations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        unavailable("playwright is not installed in the venv (requirements-dev.txt)")
    if not CHROMIUM.exists():
        unavailable(f"{CHROMIUM} is missing (Debian's chromium package, scripts/bootstrap)")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def client(base_url: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG_BACKUP_API_")}
    return subprocess.run([CLI, *args, "--url", base_url], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=env, timeout=300)


def shoot(page: Any, name: str) -> None:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def see_servers(page: Any, base_url: str, sandbox: Sandbox, shot: str) -> None:
    response = page.goto(f"{base_url}/ui/")
    headers = response.headers
    assert "script-src 'self'" in headers["content-security-policy"], headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "no-referrer"
    row = page.locator("#servers tr.server", has_text=sandbox["BARMAN_SERVER"])
    row.wait_for()
    assert "active" in row.inner_text()
    assert row.locator("td").nth(3).inner_text() != "none"  # a last backup, made minutes ago ...
    assert "good" in row.locator("td.age").get_attribute("class").split()  # ... so not drawn as stale
    shoot(page, shot)


def see_server(page: Any, sandbox: Sandbox, shot: str) -> None:
    page.locator("#servers a", has_text=sandbox["BARMAN_SERVER"]).click()
    page.locator("#backups tr.backup-row", has_text=sandbox["BACKUP_ID"]).wait_for()
    assert "DONE" in page.locator("#backups tr.backup-row", has_text=sandbox["BACKUP_ID"]).inner_text()
    window = page.locator("#window").inner_text()
    assert window.startswith("A recovery can reach any time from"), window
    assert page.locator("#timeline .window").count() == 1  # the window drawn on the time line ...
    timeline, window = page.locator("#timeline").bounding_box(), page.locator("#timeline .window").bounding_box()
    assert window["width"] > 0 and window["x"] + window["width"] <= timeline["x"] + timeline["width"] + 1  # ... placed
    shoot(page, shot)


def follow_operation(page: Any, base_url: str, sandbox: Sandbox, service: Service, op_id: str, shot: str
                     ) -> List[Dict[str, Any]]:
    """Open the operation from the server's list of operations and watch it to its end; the output log."""
    from playwright.sync_api import expect

    page.goto(f"{base_url}/ui/?server={sandbox['BARMAN_SERVER']}")
    page.locator("#operations a", has_text=op_id).click()
    page.locator("#state").wait_for()
    assert page.locator("h1").inner_text() == f"Operation {op_id}"
    # A function, not a string: the page's CSP refuses the eval a string predicate would need.
    page.wait_for_function("() => document.getElementById('state').textContent.indexOf('IN_PROGRESS') < 0",
                           timeout=300_000)
    assert page.locator("#state").inner_text() == "DONE (succeeded)"
    output = page.locator("#output").inner_text()
    assert "successfully prepared for recovery" in output, output
    final = service.get(f"/servers/{sandbox['BARMAN_SERVER']}/operations/{op_id}").json()
    # Every field is the ended operation's, not what was drawn while it ran.
    expect(page.locator("#fields tr", has_text="duration_s").locator("td")).to_have_text(str(final["duration_s"]))
    assert page.locator("#output").inner_text().splitlines() == final["output"].splitlines()
    shoot(page, shot)
    return page.evaluate("window.__outputLog")


def assert_lines_came_while_it_ran(log: List[Dict[str, Any]]) -> None:
    running = [entry for entry in log if entry["state"].startswith("IN_PROGRESS")]
    assert running and running[0]["lines"] < log[-1]["lines"], log  # seen running, with fewer lines than at the end
    assert any(entry["lines"] > 0 for entry in running), log  # lines appeared before the end
    assert log[-1]["state"] == "DONE (succeeded)", log


def walk_through(page: Any, base_url: str, sandbox: Sandbox, service: Service, destination: str, prefix: str,
                 *tls: str) -> None:
    """Servers, one server, then a recovery started with the client (*tls*: its certificate options)
    followed on the page to its end; a screenshot of each view named with *prefix*. Nothing of it is
    refused by the page's Content-Security-Policy."""
    console: List[str] = []
    page.on("console", lambda message: console.append(message.text))
    see_servers(page, base_url, sandbox, f"{prefix}servers")
    see_server(page, sandbox, f"{prefix}server")
    # Slowed down (KB/s): over one multiplexed ssh connection the restore would end before the page opens it.
    started = client(base_url, "recover", "--server", sandbox["BARMAN_SERVER"], "--backup", sandbox["BACKUP_ID"],
                     "--destination", sandbox.restore_dir(destination), "--ssh-command", sandbox["SSH_COMMAND"],
                     "--bwlimit", "3000", *tls)
    assert started.returncode == 0, started.stdout + started.stderr
    op_id = started.stdout.split()[0]
    log = follow_operation(page, base_url, sandbox, service, op_id, f"{prefix}operation")
    assert_lines_came_while_it_ran(log)
    assert page.evaluate("window.__cspViolations") == []
    assert [text for text in console if "Content Security Policy" in text] == []


def test_the_page_cannot_be_framed(service, browser):
    context = browser.new_context(viewport=VIEWPORT)
    page = context.new_page()
    try:
        # Another origin (a file) frames the page, as a site tricking an operator's clicks would.
        page.set_content(f'<iframe id="framed" src="{service.url}/ui/"></iframe>')
        page.wait_for_function("() => document.getElementById('framed').contentWindow !== null")
        frame = page.frames[1]
        frame.wait_for_load_state()
        assert frame.locator("#view").count() == 0  # refused: nothing of the page drawn in the frame
    finally:
        context.close()


def test_the_page_shows_the_servers_a_server_and_a_recovery_started_with_the_client(sandbox, service, browser):
    context = browser.new_context(viewport=VIEWPORT)
    context.add_init_script(RECORD_OUTPUT)
    try:
        walk_through(context.new_page(), service.url, sandbox, service, "ui-direct", "")
    finally:
        context.close()


def test_the_page_through_the_apache_vhost_with_a_client_certificate(sandbox, service, apache_front: Front, browser):
    cert, key = apache_front.tls["patroni"]
    # The server's certificate comes from the tests' own CA, which Chromium does not know.
    context = browser.new_context(viewport=VIEWPORT, ignore_https_errors=True, client_certificates=[
        {"origin": apache_front.url, "certPath": cert, "keyPath": key}])
    context.add_init_script(RECORD_OUTPUT)
    try:
        walk_through(context.new_page(), apache_front.url, sandbox, service, "ui-apache", "apache-",
                     "--cert", cert, "--key", key, "--cacert", apache_front.tls["verify"])
    finally:
        context.close()


def test_without_a_client_certificate_apache_never_shows_the_page(apache_front: Front, browser):
    context = browser.new_context(viewport=VIEWPORT, ignore_https_errors=True)
    page = context.new_page()
    try:
        try:
            response = page.goto(f"{apache_front.url}/ui/")
        except Exception as exc:  # the TLS handshake refused: Chromium reports a network error
            assert "ERR_" in str(exc), exc
        else:
            assert response is None or response.status == 403
            assert page.locator("#view").count() == 0
    finally:
        context.close()

