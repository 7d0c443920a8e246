"""Every validator, whatever it is given, answers with a result or the service's own refusal.

A refusal is an ApiError below 500 with a message; anything else raised (TypeError,
ValueError, OverflowError, RecursionError...) would reach a client as a 500.
"""

from __future__ import annotations

import copy
import re
from datetime import datetime
from typing import Any, Callable, Dict, Optional

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pg_backup_api.core import ids
from pg_backup_api.core.errors import ApiError, InvalidRequest
from pg_backup_api.core.model import INSTANCE_TYPES, SERVER_TYPES
from pg_backup_api.rules import paths, schema, ssh_command
from pg_backup_api.rules.requests import parse_request
from pg_backup_api.service.paging import ListFilters, parse_filters

from .hostile import (
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

PROPERTIES = settings(max_examples=300, deadline=None, database=None, suppress_health_check=list(HealthCheck))
COMPONENTS = schema.document()["components"]["schemas"]
REQUEST_SCHEMAS = sorted(name for name in COMPONENTS if name.endswith("Request")) + ["ConfigChange"]
BODIES = [(body, SERVER_TYPES) for body in SERVER_BODIES] + [(body, INSTANCE_TYPES) for body in INSTANCE_BODIES]


def outcome(check: Callable[..., Any], *args: Any) -> Optional[ApiError]:
    """None if *check* accepts, its refusal if it refuses; anything else fails the test."""
    try:
        check(*args)
    except ApiError as exc:
        assert exc.status < 500, exc.message
        assert isinstance(exc.message, str) and exc.message
        return exc
    return None


def fields_of(name: str) -> Dict[str, Any]:
    return schema.document()["components"]["schemas"][name]["properties"]


def field_values(name: str, field: str) -> st.SearchStrategy:
    """Any JSON value, or one the valid bodies use for this field, so that checks past the type are reached."""
    valid = [b[field] for b, _ in BODIES if field in b and schema_of(b) == name]
    return json_values | st.sampled_from(valid) if valid else json_values


# -- the request schemas and parse_request -----------------------------------------------------------


@PROPERTIES
@given(name=st.sampled_from(REQUEST_SCHEMAS), value=json_values)
def test_every_request_schema_accepts_or_refuses_any_json_value(name, value):
    outcome(schema.validate, name, value)


@PROPERTIES
@given(body=json_values, allowed=st.sampled_from([SERVER_TYPES, INSTANCE_TYPES]))
def test_parse_request_accepts_or_refuses_any_json_value(body, allowed):
    outcome(parse_request, body, allowed)


@pytest.mark.parametrize("name", ["RecoveryRequest", "BackupRequest", "ConfigSwitchRequest", "ConfigUpdateRequest"])
def test_bodies_of_any_values_under_the_real_field_names_are_accepted_or_refused(name):
    """Dicts keyed by the schema's own field names, so every field's checks (and the cross-checks) run."""
    allowed = INSTANCE_TYPES if name == "ConfigUpdateRequest" else SERVER_TYPES
    type_value = {"RecoveryRequest": "recovery", "BackupRequest": "backup", "ConfigSwitchRequest": "config_switch",
                  "ConfigUpdateRequest": "config_update"}[name]
    bodies = st.fixed_dictionaries(
        {"type": st.just(type_value)},
        optional={field: field_values(name, field) for field in fields_of(name) if field != "type"})

    @PROPERTIES
    @given(body=bodies)
    def run(body):
        outcome(parse_request, body, allowed)

    run()


CHANGE_VALUES = json_values | st.sampled_from(["server", "model", "pg", "x", 5, True])


@PROPERTIES
@given(change=st.fixed_dictionaries({}, optional={field: CHANGE_VALUES for field in fields_of("ConfigChange")}))
def test_config_changes_of_any_values_are_accepted_or_refused(change):
    outcome(parse_request, {"type": "config_update", "changes": [change]}, INSTANCE_TYPES)


@pytest.mark.parametrize("body,allowed", BODIES, ids=[f"{schema_of(b)}-{i}" for i, (b, _) in enumerate(BODIES)])
def test_a_field_of_a_type_it_does_not_take_is_refused_by_name(body, allowed):
    """One field of a valid body replaced by a value of another JSON type: a 400 naming that field."""
    assert outcome(parse_request, copy.deepcopy(body), allowed) is None, "the base body must be valid"
    paths_in_body = list(_paths(body))

    @PROPERTIES
    @given(path=st.sampled_from(paths_in_body), value=json_values)
    def run(path, value):
        sub = subschema(schema_of(body), path) if path != ("operation_type",) else {"type": "string"}
        assume(not kinds_of(value) & accepted_kinds(sub))
        mutated = copy.deepcopy(body)
        _set(mutated, path, value)
        refusal = outcome(parse_request, mutated, allowed)
        assert isinstance(refusal, InvalidRequest)
        assert f"'{'.'.join(map(str, path))}'" in refusal.message

    run()


def _paths(value: Any, prefix: tuple = ()):
    """Every key and index path in *value*: containers and leaves."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, inner in items:
        yield (*prefix, key)
        yield from _paths(inner, (*prefix, key))


def _set(target: Any, path: tuple, value: Any) -> None:
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value


def test_format_fields_given_null_a_number_or_an_object_are_refused_by_name():
    for field in ("remote_ssh_command", "destination_directory", "staging_wal_directory", "target_time"):
        for value in (None, 5, 1.5, True, {}, [], {"a": [1]}):
            refusal = outcome(parse_request, {**SERVER_BODIES[1], field: value}, SERVER_TYPES)
            assert refusal is not None and refusal.message.startswith(f"field '{field}' must be of type string")
    refusal = outcome(parse_request, {**SERVER_BODIES[1], "tablespaces": {"tbs": None}}, SERVER_TYPES)
    assert refusal is not None and refusal.message.startswith("field 'tablespaces.tbs' must be of type string")


@pytest.mark.parametrize("value", [1.0, 2.0, -0.0, 1e308, True, 10**400, float("nan"), float("inf")])
def test_integers_are_integers_in_range_not_floats_booleans_or_huge(value):
    refusal = outcome(parse_request, {**SERVER_BODIES[1], "jobs": value}, SERVER_TYPES)
    assert refusal is not None and "field 'jobs'" in refusal.message


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_numbers_are_finite(value):
    body = {"type": "config_update", "changes": [{"scope": "server", "server_name": "pg", "description": value}]}
    refusal = outcome(parse_request, body, INSTANCE_TYPES)
    assert refusal is not None
    assert refusal.message == "field 'changes.0.description' must be of type string, number or boolean"


def test_a_missing_nested_field_is_named_with_its_path():
    refusal = outcome(parse_request, {"type": "config_update", "changes": [{"server_name": "pg"}]}, INSTANCE_TYPES)
    assert refusal is not None and refusal.message == "field 'changes.0.scope' is required"


# -- the string checks --------------------------------------------------------------------------------


@PROPERTIES
@given(command=json_values | odd_text | st.from_regex(
    r"ssh( -[pliqoCT46] ?[A-Za-z0-9=²١.:/@-]{0,12}){0,3} [a-z0-9@.:²١-]{0,20}", fullmatch=True))
def test_ssh_commands_are_parsed_or_refused(command):
    outcome(ssh_command.parse, command)


@PROPERTIES
@given(path=json_values | odd_text | st.from_regex(r"(/[A-Za-z0-9._²١-]{0,8}){1,4}/?", fullmatch=True))
def test_target_paths_are_accepted_or_refused_by_name(path):
    refusal = outcome(paths.check_target_path, "destination_directory", path)
    assert refusal is None or "'destination_directory'" in refusal.message


@PROPERTIES
@given(value=json_values | st.from_regex(schema.OFFSET_TIME.pattern.replace("[0-9]", "[0-9²١]"), fullmatch=True))
def test_offset_times_are_parsed_or_refused_by_name(value):
    refusal = outcome(schema.parse_offset_time, "target_time", value)
    if refusal is None:
        parsed = schema.parse_offset_time("target_time", value)
        assert isinstance(parsed, datetime) and parsed.utcoffset() is not None
    else:
        assert "'target_time'" in refusal.message


def test_an_offset_time_before_year_one_in_utc_is_refused():
    refusal = outcome(schema.parse_offset_time, "target_time", "0001-01-01T00:00:00+01:00")
    assert refusal is not None and "'target_time'" in refusal.message


# -- the list's query parameters and operation ids ------------------------------------------------------

FILTER_NAMES = ["status", "type", "after", "limit"]
QUERY_VALUES = (odd_text | json_values | st.sampled_from(["DONE", "recovery", "5", "10000", "10001", "0",
                                                          "20261127T093201", "20261127T093201-2"]))


@PROPERTIES
@given(query=st.dictionaries(st.sampled_from(FILTER_NAMES) | odd_text, QUERY_VALUES, max_size=5))
def test_list_query_parameters_are_parsed_or_refused_by_name(query):
    refusal = outcome(parse_filters, query)
    if refusal is None:
        filters = parse_filters(query)
        assert isinstance(filters, ListFilters)
        assert filters.limit is None or 1 <= filters.limit <= 10000
        assert filters.after is None or ids.is_valid_id(filters.after)
    else:
        assert any(repr(name)[:80] in refusal.message for name in query)


@pytest.mark.parametrize("limit", ["²", "¹²", "١", "𝟙", "1" * 5000, "1.0", "-0", "+1", " 1", "0", "10001", ""])
def test_limit_takes_only_ascii_digits_from_1_to_10000(limit):
    refusal = outcome(parse_filters, {"limit": limit})
    assert refusal is not None and "'limit'" in refusal.message


@pytest.mark.parametrize("after", ["20261127T093201-²", "20261127T093201-١", "٢٠٢٦١١٢٧T093201", "x", ""])
def test_after_takes_only_an_operation_id(after):
    refusal = outcome(parse_filters, {"after": after})
    assert refusal is not None and "'after'" in refusal.message


@PROPERTIES
@given(value=json_values)
def test_any_value_is_or_is_not_an_operation_id(value):
    assert ids.is_valid_id(value) in (True, False)


@PROPERTIES
@given(op_id=odd_text | st.from_regex(r"[0-9²١]{8}T[0-9²١]{6}(-[0-9²١]{1,7})?", fullmatch=True))
def test_any_text_has_a_sort_key(op_id):
    base, suffix = ids.sort_key(op_id)
    assert isinstance(base, str) and isinstance(suffix, int)


def test_sort_keys_are_chronological_and_read_only_ascii_suffixes():
    assert ids.sort_key("20261127T093201-10") > ids.sort_key("20261127T093201-9") > ids.sort_key("20261127T093201")
    assert ids.sort_key("20261127T093201-²") == ("20261127T093201", 0)


def test_the_odd_strings_are_really_odd():
    """The corpus holds what str.isdigit() takes and int() refuses, and a lone surrogate."""
    assert any(s.isdigit() and not re.fullmatch(r"[0-9]+", s) for s in ODD_STRINGS)
    assert any(re.search(r"[\ud800-\udfff]", s) for s in ODD_STRINGS)
