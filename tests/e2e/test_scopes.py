"""Scopes on the real service: diagnose is admin-only, canceling takes the creating scope, and
concurrent `barman check` requests share one Barman process."""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .conftest import VENV, Service

pytestmark = pytest.mark.e2e


def create_token(sandbox, tokens_file: Path, name: str, scope: str) -> str:
    return subprocess.run(
        ["runuser", "-u", sandbox["BARMAN_USER"], "--", "env", f"PG_BACKUP_API_TOKENS_FILE={tokens_file}",
         str(VENV / "bin" / "pg-backup-api"), "token", "create", name, "--scope", scope],
        capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def guarded(sandbox):
    tokens_file = Path(sandbox["BARMAN_HOME"]) / "scopes-tokens.json"
    secrets = {scope: create_token(sandbox, tokens_file, f"scopes-{scope}", scope)
               for scope in ("read", "operate", "admin")}
    service = Service(sandbox, {"PG_BACKUP_API_AUTH": "token", "PG_BACKUP_API_TOKENS_FILE": str(tokens_file)})
    service.start()
    yield service, {scope: {"Authorization": f"Bearer {secret}"} for scope, secret in secrets.items()}
    service.stop()
    tokens_file.unlink()


def test_diagnose_shows_the_configuration_to_admin_tokens_only(sandbox, guarded):
    service, auth = guarded
    for scope in ("read", "operate"):
        refused = service.get("/diagnose", headers=auth[scope])
        assert refused.status_code == 403, scope
        assert "needs 'admin'" in refused.json()["error"]
    assert sandbox["BARMAN_SERVER"] in service.get("/diagnose", headers=auth["admin"]).json()["servers"]


def test_an_operate_token_cannot_cancel_a_configuration_operation(sandbox, guarded):
    service, auth = guarded
    server = sandbox["BARMAN_SERVER"]
    created = service.post(f"/servers/{server}/operations", headers=auth["admin"],
                           json={"type": "config_switch", "reset": True})
    assert created.status_code == 202, created.text
    op_id = created.json()["operation_id"]
    refused = service.post(f"/servers/{server}/operations/{op_id}/cancel", headers=auth["operate"])
    assert refused.status_code == 403
    assert "canceling config_switch needs 'admin'" in refused.json()["error"]
    ended = service.wait_until_ended(server, op_id, headers=auth["read"])
    assert ended["state"] == "succeeded", ended.get("output")


def test_concurrent_checks_share_one_barman_run(sandbox, guarded):
    service, auth = guarded
    path = f"/servers/{sandbox['BARMAN_SERVER']}/check"
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: service.get(path, headers=auth["read"]), range(6)))
    assert [a.status_code for a in answers] == [200] * 6
    assert len({a.text for a in answers}) == 1
    assert {c["name"] for c in answers[0].json()["checks"]} >= {"postgresql", "wal_level"}
