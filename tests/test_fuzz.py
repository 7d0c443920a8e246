"""Fuzzing: whatever arrives, a documented JSON answer and never a 5xx.

Two fuzzers share one count of requests:

* Schemathesis generates requests from /openapi.json (valid and invalid ones) and checks each
  response: no 5xx, a status code the document lists, its content type, its schema, and that
  schema-invalid input is rejected. Requests beyond the schema's reach (Barman's cross-checks,
  such as one recovery target) may be refused, so the "valid data must be accepted" check is off.
* A mutation fuzzer takes a valid body of every operation type and changes one field at a time
  (to a value of another JSON type, a huge or non-finite number, non-ASCII digits, deep nesting,
  odd text), adds odd field names, and mutates query parameters and path parameters. A body
  field of a type it does not take must get a 400 that names the field.

The mutation fuzzer records what it finds instead of stopping at the first finding, so a run
reports every broken request; a test breaks a check on purpose to show it finds the break.
"""

from __future__ import annotations

import atexit
import json
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Tuple
from urllib.parse import quote

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema import FormatChecker
from schemathesis.specs.openapi.checks import positive_data_acceptance

from pg_backup_api import create_app
from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.core.model import INSTANCE_TYPES, SERVER_TYPES
from pg_backup_api.rules import schema
from pg_backup_api.rules.requests import parse_request
from pg_backup_api.rules.settings import Settings
from pg_backup_api.service import paging

from .conftest import BarmanFiles, SpawnRecorder
from .hostile import (
    BACKUP_ID,
    INSTANCE_BODIES,
    ODD_STRINGS,
    SERVER_BODIES,
    accepted_kinds,
    json_values,
    kinds_of,
    odd_text,
    schema_of,
    subschema,
)

MIN_REQUESTS = 5000
MIN_SCHEMATHESIS_REQUESTS = 2000
EXAMPLES_PER_OPERATION = 150
EXAMPLES_PER_FIELD = 40
EXAMPLES_PER_NAME = 30
EXAMPLES_PER_PARAMETER = 60
sent: List[int] = []


def _app():
    """The app from the factory on a real configuration and catalogue; workers are only recorded."""
    root = Path(tempfile.mkdtemp(prefix="pgba-fuzz-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    files = BarmanFiles(root)
    files.add_backup(BACKUP_ID, name="nightly")
    return create_app(Settings(barman_conf=str(files.conf)), spawn=SpawnRecorder())


# -- schemathesis ---------------------------------------------------------------------------------------

openapi = schemathesis.openapi.from_wsgi("/openapi.json", _app())


@openapi.parametrize()
@settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_json_answer(case):
    response = case.call_and_validate(excluded_checks=[positive_data_acceptance])
    sent.append(response.status_code)
    assert response.status_code < 500, response.text
    if response.headers.get("Content-Type", "").startswith("application/json"):
        response.json()


def test_schemathesis_sent_enough_requests():
    assert len(sent) >= MIN_SCHEMATHESIS_REQUESTS, f"only {len(sent)} requests were generated"


# -- the mutation fuzzer ---------------------------------------------------------------------------------

SERVER_OPERATIONS = "/servers/pg/operations"
INSTANCE_OPERATIONS = "/operations"
SLOT = "@@mutated@@"


@dataclass(frozen=True)
class Raw:
    """JSON text sent as is: what json.dumps never writes, or what Python's parser reads oddly."""

    text: str

    @property
    def parsed(self) -> Any:
        return json.loads(self.text)


# Parsed, these are -0, floats where integers go, huge or non-finite numbers, deep nesting.
RAW_VALUES = ["-0", "-0.0", "0.0", "1.0", "1e308", "-1e308", "1E400", "-1e400", "1" + "0" * 400, "NaN", "Infinity",
              "-Infinity", "[" * 200 + "]" * 200, '{"a":' * 200 + "0" + "}" * 200, '"\\ud800"', '"\\u0000"']
# The parser cannot read these at all (a 5,000-digit integer, nesting deeper than it recurses):
# the body is refused as a whole.
UNREADABLE = ["1" + "0" * 5000, "[" * 5000 + "]" * 5000]
mutations = st.one_of(json_values, st.sampled_from([Raw(t) for t in RAW_VALUES + UNREADABLE]))


@dataclass
class FuzzReport:
    """What the mutation fuzzer sent and every answer that broke a rule."""

    requests: int = 0
    failures: List[str] = field(default_factory=list)
    counted: bool = True  # towards the module's total; not the runs that break a check on purpose

    def check(self, what: str, response: Any, names: Optional[str] = None, text_ok: bool = False) -> None:
        """No 5xx; errors are JSON with an `error` string; with *names*, a 400 whose error holds it."""
        self.requests += 1
        if self.counted:
            sent.append(response.status_code)
        status, body = response.status_code, response.get_data()
        problem = None
        if status >= 500:
            problem = "a 5xx"
        elif response.mimetype != "application/json":
            problem = None if text_ok and status < 300 else f"a {response.mimetype} body"
        else:
            try:
                doc = json.loads(body)
            except ValueError:
                doc, problem = None, "a body that is not JSON"
            if status >= 400 and not (isinstance(doc, dict) and isinstance(doc.get("error"), str)):
                problem = "an error without an `error` string"
            elif names is not None and (status != 400 or names not in doc["error"]):
                problem = f"not a 400 naming {names!r}"
        if problem:
            self.failures.append(f"{what}: {problem}: {status} {body[:300]!r}")

    def assert_clean(self) -> None:
        assert not self.failures, f"{len(self.failures)} bad answers, e.g.:\n" + "\n".join(self.failures[:10])


def run_examples(strategy: st.SearchStrategy, test: Callable[[Any], None], examples: int,
                 derandomize: bool = False) -> None:
    """Run *test* on *examples* values of *strategy* (each finding is recorded, none stops the run)."""
    settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
             suppress_health_check=list(HealthCheck))(given(strategy)(lambda value: test(value)))()


def _shown(value: Any) -> str:
    text = f"raw {value.text}" if isinstance(value, Raw) else repr(value)
    return text if len(text) <= 120 else text[:120] + "..."


def body_paths(value: Any, prefix: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    """Every key and index path in a body: the containers and the leaves."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    found = []
    for key, inner in items:
        found.append((*prefix, key))
        found.extend(body_paths(inner, (*prefix, key)))
    return found


def _with_slot(body: Any, path: Tuple[Any, ...]) -> Any:
    body = json.loads(json.dumps(body))
    target = body
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = SLOT
    return body


def _json_text(body: Any, path: Tuple[Any, ...], value: Any) -> str:
    """The body with the value at *path* replaced, as JSON text (raw values spliced in as they are)."""
    text = value.text if isinstance(value, Raw) else json.dumps(value)
    return json.dumps(_with_slot(body, path)).replace(json.dumps(SLOT), text, 1) if path else text


def expected_name(body: Any, path: Tuple[Any, ...], value: Any) -> Optional[str]:
    """What the 400 must name when the value is of a JSON type the field does not take, else None."""
    if isinstance(value, Raw):
        if value.text in UNREADABLE:
            return None  # refused before any field is known
        value = value.parsed
    if not path:
        return None  # not an object: "the request body must be a JSON object"
    if path == ("operation_type",):
        return "'operation_type'" if not isinstance(value, str) else None
    if kinds_of(value) & accepted_kinds(subschema(schema_of(body), path)):
        return None
    return "'" + ".".join(map(str, path)) + "'"


def fuzz_body_fields(client: Any, report: FuzzReport, examples: int, derandomize: bool = False) -> None:
    """Each valid body of each endpoint, one field (or the whole body) at a time set to a mutation."""
    for url, bodies in ((SERVER_OPERATIONS, SERVER_BODIES), (INSTANCE_OPERATIONS, INSTANCE_BODIES)):
        for body in bodies:
            for path in [(), *body_paths(body)]:
                def send(value: Any, url: str = url, body: Any = body, path: Tuple[Any, ...] = path) -> None:
                    response = client.post(url, data=_json_text(body, path, value), content_type="application/json")
                    where = ".".join(map(str, path)) or "the body"
                    report.check(f"POST {url} {schema_of(body)} {where}={_shown(value)}", response,
                                 names=expected_name(body, path, value))

                run_examples(mutations, send, examples, derandomize)


def fuzz_field_names(client: Any, report: FuzzReport, examples: int, derandomize: bool = False) -> None:
    """Odd keys added to each object of each body: unknown fields, tablespace names, config keys."""
    for url, bodies in ((SERVER_OPERATIONS, SERVER_BODIES), (INSTANCE_OPERATIONS, INSTANCE_BODIES)):
        for body in bodies:
            objects = [()] + [p for p in body_paths(body) if isinstance(_at(body, p), dict)]
            for container in objects:
                def send(key: str, url: str = url, body: Any = body, container: Tuple[Any, ...] = container) -> None:
                    sub = subschema(schema_of(body), container)
                    assume(key not in sub.get("properties", {}) and key not in ("type", "operation_type"))
                    mutated = json.loads(json.dumps(body))
                    _at(mutated, container)[key] = "/srv/x"
                    named = ".".join(map(str, container))
                    valid_name = "propertyNames" in sub and schema._ecma_regex(
                        sub["propertyNames"]["pattern"]).search(key)
                    response = client.post(url, data=json.dumps(mutated), content_type="application/json")
                    report.check(f"POST {url} {schema_of(body)} new key {_shown(key)} in {named or 'the body'}",
                                 response, names=None if valid_name else (f"'{named}'" if named else key))

                run_examples(odd_text, send, examples, derandomize)


def _at(body: Any, path: Tuple[Any, ...]) -> Any:
    for step in path:
        body = body[step]
    return body


QUERY_PARAMETERS = ("limit", "after", "status", "type")
VALID_QUERY = {"limit": "2", "after": "20261127T093201", "status": "DONE", "type": "recovery"}
# Percent-encodings that decode to nothing valid: a lone continuation byte, an encoded surrogate, a bad escape.
RAW_ENCODINGS = ["%ff", "%ED%A0%80", "%zz", "%", "%00", "%C2%B2", "%D9%A1", "%2e%2e", "%2F", "%25", "a" * 5000]


def _encoded(text: str) -> str:
    return quote(text.encode("utf-8", "surrogatepass"), safe="")


encoded_values = st.one_of(odd_text.map(_encoded), st.sampled_from(RAW_ENCODINGS),
                           st.tuples(odd_text, st.sampled_from(RAW_ENCODINGS)).map(lambda t: _encoded(t[0]) + t[1]))


def fuzz_query(client: Any, report: FuzzReport, examples: int, derandomize: bool = False) -> None:
    """Each query parameter of the lists, and unknown ones, set to odd values beside valid ones."""
    for url in (SERVER_OPERATIONS, INSTANCE_OPERATIONS):
        for name in (*QUERY_PARAMETERS, None):
            def send(value: str, url: str = url, name: Optional[str] = name) -> None:
                query = {k: v for k, v in VALID_QUERY.items() if k != name}
                pairs = [f"{k}={v}" for k, v in query.items()] + [f"{name or value}={value if name else 1}"]
                response = client.get(f"{url}?{'&'.join(pairs)}")
                report.check(f"GET {url} {name or 'unknown parameter'}={value[:120]}", response)
                if response.status_code == 400 and name:
                    # A refusal names the parameter it refuses.
                    if f"'{name}'" not in response.get_json()["error"]:
                        report.failures.append(f"GET {url} {name}={value[:120]}: 400 not naming '{name}'")

            run_examples(encoded_values, send, examples, derandomize)


PATHS = [
    ("GET", "/servers/{server}"), ("GET", "/servers/{server}/backups"), ("GET", "/servers/{server}/backups/{backup}"),
    ("GET", "/servers/{server}/check"), ("GET", "/servers/{server}/operations"),
    ("POST", "/servers/{server}/operations"), ("GET", "/servers/{server}/operations/{operation}"),
    ("GET", "/servers/{server}/operations/{operation}/output"),
    ("POST", "/servers/{server}/operations/{operation}/cancel"), ("GET", "/operations/{operation}"),
    ("GET", "/operations/{operation}/output"), ("POST", "/operations/{operation}/cancel"),
]
# Only an odd value is tried: a real server or backup would run barman (status, check, show-backup).
VALID_PATH_VALUES = {"server": "pg", "backup": "missing-backup", "operation": "20261127T093201"}
REAL_NAMES = {"pg", BACKUP_ID, "nightly", "latest", "last", "oldest", "first", "latest-full", "last-full",
              "last-failed"}


def fuzz_paths(client: Any, report: FuzzReport, examples: int, derandomize: bool = False) -> None:
    """Each path parameter of each endpoint set to odd text, traversal or broken percent-encodings."""
    for method, template in PATHS:
        for name in re.findall(r"\{(\w+)\}", template):
            def send(value: str, method: str = method, template: str = template, name: str = name) -> None:
                assume(value not in REAL_NAMES)
                url = template.format(**{**VALID_PATH_VALUES, name: value})
                if method == "POST" and template.endswith("/operations"):
                    response = client.post(url, json=SERVER_BODIES[1])
                else:
                    response = client.open(url, method=method)
                report.check(f"{method} {template} {name}={value[:120]}", response, text_ok=url.endswith("/output"))

            run_examples(encoded_values | st.sampled_from(["..", ".", "~", "%2e%2e%2f", "a;b"]), send, examples,
                         derandomize)


@pytest.fixture(scope="module")
def fuzz_client():
    return _app().test_client()


def test_body_fields_of_every_operation_type_mutated_one_at_a_time(fuzz_client):
    report = FuzzReport()
    fuzz_body_fields(fuzz_client, report, EXAMPLES_PER_FIELD)
    report.assert_clean()
    assert report.requests >= 2000


def test_odd_field_names_are_refused_by_name(fuzz_client):
    report = FuzzReport()
    fuzz_field_names(fuzz_client, report, EXAMPLES_PER_NAME)
    report.assert_clean()


def test_query_parameters_mutated_one_at_a_time(fuzz_client):
    report = FuzzReport()
    fuzz_query(fuzz_client, report, EXAMPLES_PER_PARAMETER)
    report.assert_clean()


def test_path_parameters_mutated_one_at_a_time(fuzz_client):
    report = FuzzReport()
    fuzz_paths(fuzz_client, report, EXAMPLES_PER_PARAMETER)
    report.assert_clean()


def test_the_valid_bodies_cover_every_field_of_every_operation_type():
    """So that a new field is fuzzed too: every property of every request schema is in a valid body."""
    components = schema.document()["components"]["schemas"]
    for name in ("RecoveryRequest", "BackupRequest", "ConfigSwitchRequest", "ConfigUpdateRequest", "ConfigChange"):
        covered = {path[-1] for body in SERVER_BODIES + INSTANCE_BODIES for path in body_paths(body)}
        missing = set(components[name]["properties"]) - covered
        assert not missing, f"{name}: no valid body holds {sorted(missing)}"


def test_the_valid_bodies_are_valid():
    """Mutations of an invalid body would prove nothing: each base body passes every check of the request."""
    for body in SERVER_BODIES:
        parse_request(json.loads(json.dumps(body)), SERVER_TYPES)
    for body in INSTANCE_BODIES:
        parse_request(json.loads(json.dumps(body)), INSTANCE_TYPES)


# -- the fuzzer finds what it is for --------------------------------------------------------------------


def test_the_fuzzer_finds_a_format_check_that_assumes_a_string(monkeypatch):
    """A format check that assumes a string, run on every type (as jsonschema does by default): the
    fuzzer reports the 500s."""
    unguarded = FormatChecker(formats=())
    unguarded.checkers = dict(schema.FORMATS.checkers)
    unguarded.checks("ssh-command", raises=InvalidRequest)(lambda v: v.split()[0] == "ssh")
    monkeypatch.setattr(schema, "FORMATS", unguarded)
    schema._validator.cache_clear()
    try:
        report = FuzzReport(counted=False)
        fuzz_body_fields(_app().test_client(), report, examples=4, derandomize=True)
    finally:
        monkeypatch.undo()
        schema._validator.cache_clear()
    assert any(": a 5xx: 500 " in failure for failure in report.failures), report.failures[:5]
    assert any("remote_ssh_command=" in failure for failure in report.failures)


def test_the_fuzzer_finds_a_limit_read_with_isdigit(monkeypatch):
    """With `limit` checked by str.isdigit() (true for "²", which int() refuses), the fuzzer reports the 500."""

    class IsDigit:
        @staticmethod
        def fullmatch(text: str) -> bool:
            return text.isdigit()

    monkeypatch.setattr(paging, "LIMIT_RE", IsDigit)
    report = FuzzReport(counted=False)
    fuzz_query(_app().test_client(), report, examples=15, derandomize=True)
    assert any("limit=" in failure and ": a 5xx: 500 " in failure for failure in report.failures), report.failures[:5]


def test_the_corpus_holds_digits_that_int_refuses():
    assert "²" in ODD_STRINGS and "%C2%B2" in RAW_ENCODINGS


def test_the_fuzzing_run_was_large_enough():
    assert len(sent) >= MIN_REQUESTS, f"only {len(sent)} requests were sent"
