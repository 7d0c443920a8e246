"""Property-based fuzzing from the OpenAPI document: whatever arrives, a documented JSON answer.

Schemathesis generates requests from /openapi.json (valid and invalid ones) and checks each
response: no 5xx, a status code the document lists, its content type, its schema, and that
schema-invalid input is rejected. Requests beyond the schema's reach (Barman's cross-checks,
such as one recovery target) may be refused, so the "valid data must be accepted" check is off.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from pg_backup_api import create_app
from pg_backup_api.settings import Settings

from .conftest import BarmanFiles, SpawnRecorder

MIN_REQUESTS = 2000
EXAMPLES_PER_OPERATION = 150
sent = []



def _app():
    """The app from the factory on a real configuration and catalogue; workers are only recorded."""
    root = Path(tempfile.mkdtemp(prefix="pgba-fuzz-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    files = BarmanFiles(root)
    files.add_backup("20261127T010000", name="nightly")
    return create_app(Settings(barman_conf=str(files.conf)), spawn=SpawnRecorder())


schema = schemathesis.openapi.from_wsgi("/openapi.json", _app())


@schema.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_json_answer(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    sent.append(response.status_code)
    assert response.status_code < 500, response.text
    if response.headers.get("Content-Type", "").startswith("application/json"):
        response.json()


def test_the_fuzzing_run_was_large_enough():
    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} requests were generated"
