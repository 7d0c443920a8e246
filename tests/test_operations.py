import pytest

from pg_backup_api.core.errors import InvalidRequest
from pg_backup_api.core.model import INSTANCE_TYPES, SERVER_TYPES, OperationType, Status, describe, status_of
from pg_backup_api.rules.requests import parse_request
from pg_backup_api.store.jobs import Record

VALID = {"backup_id": "latest", "destination_directory": "/var/lib/pgsql/restore",
         "remote_ssh_command": "ssh postgres@db2"}


def parse(body):
    return parse_request(body, SERVER_TYPES)


def error_of(body) -> str:
    with pytest.raises(InvalidRequest) as exc:
        parse(body)
    return exc.value.message


def test_type_defaults_to_recovery():
    assert parse(dict(VALID)) == (OperationType.RECOVERY, VALID)


def test_the_older_operation_type_recover_dialect_is_accepted():
    assert parse({"operation_type": "recover", **VALID}) == (OperationType.RECOVERY, VALID)


def test_body_must_be_an_object():
    for body in [[], "x", 1, None]:
        assert "JSON object" in error_of(body)


def test_unknown_type_is_a_400_naming_the_field():
    assert "field 'type'" in error_of({**VALID, "type": "drop_database"})
    assert "field 'type'" in error_of({**VALID, "type": 5})


def test_instance_types_are_not_server_types():
    assert "field 'type'" in error_of({"type": "config_update", "changes": []})
    change = {"scope": "server", "server_name": "pg", "archiver": "on"}
    parsed = parse_request({"type": "config_update", "changes": [change]}, INSTANCE_TYPES)
    assert parsed[0] is OperationType.CONFIG_UPDATE


@pytest.mark.parametrize("missing", ["backup_id", "destination_directory", "remote_ssh_command"])
def test_each_required_field_is_named_when_missing(missing):
    body = {k: v for k, v in VALID.items() if k != missing}
    assert error_of(body) == f"field '{missing}' is required"


def test_wrong_types_are_named():
    assert error_of({**VALID, "backup_id": 5}) == "field 'backup_id' must be of type string"


def test_a_trailing_newline_does_not_slip_through_a_pattern():
    assert "backup_id" in error_of({**VALID, "backup_id": "latest\n"})


def test_unknown_fields_are_rejected_by_name():
    assert "unknown field(s): colour" in error_of({**VALID, "colour": "red"})


# The syntax only: where a path may point is checked with all the operation's effects (test_effects.py).
@pytest.mark.parametrize("destination", [
    "relative/path", "/", "/var/lib/../../etc", "/data//pg", "/data/pg/", "/data/./pg",
    "/data/pg; rm -rf /", "/data/pg\nx", "/data/pg\n", "/data/$(id)", "/data/p g", "-rf", "",
])
def test_dangerous_destinations_are_refused(destination):
    assert "destination_directory" in error_of({**VALID, "destination_directory": destination})


def test_status_follows_the_reference_rule():
    assert status_of(Record("1", {}, None)) is Status.IN_PROGRESS
    assert status_of(Record("1", {}, {"success": True})) is Status.DONE
    assert status_of(Record("1", {}, {"success": False})) is Status.FAILED


def test_describe_keeps_the_reference_fields_and_adds_the_why():
    job = {"operation_type": "recovery", "start_time": "s", "backup_id": "latest",
           "resolved_backup_id": "20261127T010000", "destination_directory": "/d",
           "remote_ssh_command": "ssh h"}
    doc = describe(Record("20261127T093201", job, {**job, "success": False, "end_time": "e",
                                                   "output": "ERROR: boom", "exit_code": 1}))
    assert list(doc)[:2] == ["operation_id", "status"]
    assert doc["status"] == "FAILED"
    assert doc["output"] == "ERROR: boom"
    assert doc["exit_code"] == 1
    assert doc["recovery_id"] == "20261127T093201"
    assert doc["resolved_backup_id"] == "20261127T010000"
