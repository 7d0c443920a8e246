"""Every path an operation makes Barman write, wipe or remove is declared and passes the same rules."""

from __future__ import annotations

import json
import posixpath
import re
import textwrap
from pathlib import Path

import barman.config  # noqa: F401  (barman.infofile cannot be imported first: a circular import)
import pytest
from barman.infofile import Tablespace, output_tablespace_list
from hypothesis import given, settings
from hypothesis import strategies as st

from pg_backup_api import create_app
from pg_backup_api.barman_io import commands as barman_cli
from pg_backup_api.core.errors import ApiError, Conflict, InvalidRequest, Unprocessable
from pg_backup_api.core.model import RECOVERY_OPTIONS, OperationType
from pg_backup_api.rules import effects, schema
from pg_backup_api.rules.effects import STAGE, STAGE_SUBDIRS, WIPE, PathRules, RecoveryTarget
from pg_backup_api.rules.requests import REQUEST_SCHEMAS
from pg_backup_api.rules.settings import ServerPolicy, Settings

HOME = "/srv/barman"
BINARIES = "/opt/pg15/bin"
RULES = PathRules("pg", HOME, (BINARIES,))
BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh postgres@db2"}


def recovery(fields, backup_tablespaces=None, remote_staging_path=None):
    request = {k: v for k, v in {**BODY, **fields}.items() if k != "type"}
    return effects.recovery_effects(request, RecoveryTarget("db2", backup_tablespaces or {}, remote_staging_path))


def refusal(fields, rules=RULES, **target) -> ApiError:
    with pytest.raises((InvalidRequest, Unprocessable)) as exc:
        effects.check_effects(recovery(fields, **target), rules)
    return exc.value


# -- the declarations: no field reaches Barman without one ---------------------------------------


@pytest.mark.parametrize("op_type", list(OperationType))
def test_every_request_property_of_every_operation_type_has_a_declared_effect(op_type):
    document = json.loads((Path(schema.__file__).parent / "openapi.json").read_text())
    properties = set(document["components"]["schemas"][REQUEST_SCHEMAS[op_type]]["properties"])
    declared = set(effects.FIELD_EFFECTS[op_type])
    assert properties - declared == set(), "declare the effect of these fields in effects.FIELD_EFFECTS"
    assert declared - properties == set(), "these declarations name no field of the request"


def test_every_recovery_option_and_every_restore_flag_has_a_declared_effect():
    declared = effects.FIELD_EFFECTS[OperationType.RECOVERY]
    options = {*RECOVERY_OPTIONS, *barman_cli.VALUE_OPTIONS, *barman_cli.SWITCH_OPTIONS, "tablespaces"}
    assert options - set(declared) == set()
    # A field without an effect says why it has none.
    assert all(d.action is not None or d.why for table in effects.FIELD_EFFECTS.values() for d in table.values())


def test_the_fields_that_name_paths_are_declared_with_what_barman_does_to_them():
    declared = effects.FIELD_EFFECTS[OperationType.RECOVERY]
    assert {name: d.action for name, d in declared.items() if d.action} == {
        "destination_directory": WIPE, "tablespaces": WIPE, "staging_wal_directory": STAGE}
    for op_type in (OperationType.BACKUP, OperationType.CONFIG_SWITCH, OperationType.CONFIG_UPDATE):
        assert all(d.action is None for d in effects.FIELD_EFFECTS[op_type].values())


def test_an_undeclared_field_is_refused_rather_than_run():
    with pytest.raises(ApiError) as exc:
        recovery({"recovery_conf_filename": "/etc/passwd"})
    assert "field 'recovery_conf_filename' of recovery has no declared effect" in exc.value.message


def test_backup_and_configuration_operations_touch_no_path_of_a_host():
    assert effects.effects_of(OperationType.BACKUP, {"name": "nightly", "jobs": 2}) == []
    assert effects.effects_of(OperationType.CONFIG_SWITCH, {"model_name": "m"}) == []
    assert effects.effects_of(OperationType.CONFIG_UPDATE, {"changes": []}) == []


# -- what a recovery does ------------------------------------------------------------------------


def test_a_recovery_lists_the_destination_each_tablespace_and_the_staging_directory():
    found = recovery({"tablespaces": {"tbs1": "/srv/pg/tbs1"}, "staging_wal_directory": "/srv/pg/wal",
                      "target_name": "n"}, {"tbs1": "/data/tbs1", "tbs2": "/data/tbs2"})
    assert [(e.field, e.path, e.action) for e in found] == [
        ("destination_directory", "/srv/pg/restore", WIPE),
        ("tablespaces.tbs2", "/data/tbs2", WIPE),  # not relocated: Barman restores it where it was
        ("tablespaces.tbs1", "/srv/pg/tbs1", WIPE),
        ("staging_wal_directory", "/srv/pg/wal", STAGE),
    ]
    assert {e.host for e in found} == {"db2"}


def test_a_point_in_time_recovery_without_a_staging_directory_declares_barmans_default():
    assert recovery({})[1:] == []
    assert [(e.field, e.path) for e in recovery({"target_tli": "latest"})[1:]] == [
        ("staging_wal_directory", "/srv/pg/restore/barman_wal")]


def test_a_remote_staging_path_of_barmans_configuration_is_declared():
    found = recovery({}, remote_staging_path="/var/tmp/barman-staging")
    assert (found[-1].field, found[-1].path, found[-1].action) == ("staging_path", "/var/tmp/barman-staging",
                                                                   STAGE_SUBDIRS)


# -- the built-in rules: 400, naming the field and the rule --------------------------------------

FIELDS = {
    "destination_directory": lambda p: {"destination_directory": p},
    "tablespaces.tbs1": lambda p: {"tablespaces": {"tbs1": p}},
    "staging_wal_directory": lambda p: {"staging_wal_directory": p},
}
REFUSED = [
    ("/etc/ssh", "inside the system directory /etc"),
    ("/root/.ssh", "inside the system directory /root"),
    ("/home/postgres/.ssh", "in a .ssh directory"),
    ("/srv/data/.ssh/keys", "in a .ssh directory"),
    ("/var/lib/pgsql", "a directory that holds others' data"),
    ("/var/lib/postgresql/15", "a directory that holds others' data"),
    ("/home/postgres", "a directory that holds others' data"),
    ("/opt", "a directory that holds others' data"),
    (HOME, f"inside Barman's home {HOME}"),
    (f"{HOME}/pg/base", f"inside Barman's home {HOME}"),
    ("/usr/lib/postgresql/15/bin", "inside the system directory /usr"),
    ("/usr/pgsql-15/data", "inside the system directory /usr"),
    (f"{BINARIES}/x", f"inside PostgreSQL's binaries (path_prefix of server 'pg') {BINARIES}"),
    ("/opt/pg15", f"a parent of PostgreSQL's binaries (path_prefix of server 'pg') {BINARIES}"),
    ("/var/log/postgresql", "inside the system directory /var/log"),
]


@pytest.mark.parametrize("field", list(FIELDS))
@pytest.mark.parametrize("path, rule", REFUSED)
def test_dangerous_paths_are_refused_in_every_field_with_the_field_and_the_rule(field, path, rule):
    error = refusal({**FIELDS[field](path), "target_name": "n"})
    assert isinstance(error, InvalidRequest)
    assert error.message.startswith(f"field '{field}': {path} is {rule}")


@pytest.mark.parametrize("path", ["/etcetera/x", "/var/lib/postgresql/15/restore", "/usr2/pg", "/srv/barmanx",
                                  "/home/postgres/restore", "/var/lib/pgsql/15/data", "/rootless/pg"])
def test_neighbours_of_refused_paths_are_accepted(path):
    effects.check_effects(recovery({"destination_directory": path}), RULES)


def test_a_tablespace_left_where_the_backup_had_it_is_checked_too():
    error = refusal({}, backup_tablespaces={"tbs1": "/etc/tbs1"})
    assert error.message.startswith("field 'tablespaces.tbs1' (the backup's own location of the tablespace; "
                                    "relocate it with 'tablespaces'): /etc/tbs1 is inside the system directory")
    effects.check_effects(recovery({"tablespaces": {"tbs1": "/srv/pg/tbs1"}}, {"tbs1": "/etc/tbs1"}), RULES)


@pytest.mark.parametrize("path", ["relative", "/srv/a/../b", "/srv/a/", "//srv", "/srv/a b", "/srv/$(id)"])
def test_format_problems_are_400s_naming_the_field(path):
    error = refusal({"staging_wal_directory": path})
    assert isinstance(error, InvalidRequest)
    assert error.message.startswith("field 'staging_wal_directory' must be")


# -- paths of one recovery must not wipe each other -----------------------------------------------


@pytest.mark.parametrize("fields, message", [
    ({"destination_directory": "/srv/pg/tbs1/data", "tablespaces": {"tbs1": "/srv/pg/tbs1"}},
     "field 'destination_directory': /srv/pg/tbs1/data is inside /srv/pg/tbs1 (field 'tablespaces.tbs1')"),
    ({"tablespaces": {"a": "/srv/t", "b": "/srv/t/b"}},
     "field 'tablespaces.b': /srv/t/b is inside /srv/t (field 'tablespaces.a')"),
    ({"tablespaces": {"tbs1": "/srv/pg/restore"}},
     "fields 'destination_directory' and 'tablespaces.tbs1' name the same directory /srv/pg/restore"),
    ({"staging_wal_directory": "/srv/pg"},
     "field 'destination_directory': /srv/pg/restore is inside /srv/pg (field 'staging_wal_directory')"),
    ({"staging_wal_directory": "/srv/t", "tablespaces": {"tbs1": "/srv/t"}},
     "fields 'tablespaces.tbs1' and 'staging_wal_directory' name the same directory /srv/t"),
])
def test_overlapping_paths_that_one_wipe_would_destroy_are_refused(fields, message):
    error = refusal(fields)
    assert isinstance(error, InvalidRequest)
    assert error.message.startswith(message)


def test_nestings_barman_makes_itself_are_accepted():
    # WAL staged inside the destination (Barman's default) or a tablespace; a tablespace inside the
    # destination (Barman keeps it out of the destination's rsync --delete).
    effects.check_effects(recovery({"staging_wal_directory": "/srv/pg/restore/wal",
                                    "tablespaces": {"tbs1": "/srv/pg/restore/tbs1"}}), RULES)
    effects.check_effects(recovery({"staging_wal_directory": "/srv/tbs/wal", "tablespaces": {"tbs1": "/srv/tbs"}}),
                          RULES)


# -- the operator's allowlist: 422 ---------------------------------------------------------------

ALLOWED = PathRules("pg", HOME, (BINARIES,), ("/srv/pg/",))


@pytest.mark.parametrize("field", list(FIELDS))
def test_every_path_must_be_under_an_allowed_destination(field):
    error = refusal({**FIELDS[field]("/srv/other"), "target_name": "n"}, ALLOWED)
    assert isinstance(error, Unprocessable)
    assert error.message.startswith(f"field '{field}': /srv/other is not under an allowed destination of "
                                    "server 'pg' (allowed: /srv/pg/)")
    effects.check_effects(recovery({**FIELDS[field]("/srv/pg/x"), "target_name": "n"}), ALLOWED)


def test_allowed_destinations_match_whole_components():
    assert isinstance(refusal({"destination_directory": "/srv/pgx"}, ALLOWED), Unprocessable)


def test_the_built_in_rules_hold_inside_an_allowed_destination():
    rules = PathRules("pg", HOME, (), ("/",))
    assert "system directory /etc" in refusal({"destination_directory": "/etc/x"}, rules).message


# -- the schema's format stays syntax-only and type-safe ------------------------------------------


def test_the_target_path_format_checks_syntax_only_and_never_raises_on_a_non_string():
    schema.validate("RecoveryRequest", {**BODY, "destination_directory": "/etc/ssh"})  # effects refuse it
    for bad in ({"a": 5}, {"a": None}, {"a": ["/x"]}):
        with pytest.raises(InvalidRequest) as exc:
            schema.validate("RecoveryRequest", {**BODY, "tablespaces": bad})
        assert "tablespaces.a" in exc.value.message
    with pytest.raises(InvalidRequest):
        schema.validate("RecoveryRequest", {**BODY, "staging_wal_directory": 7})


# -- the property: whatever the path, a clean refusal or a path that is safe -----------------------

# Written from the rules as documented, not from effects.py.
INSIDE_REFUSED = ["/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot", "/dev", "/proc", "/sys", "/run",
                  "/root", "/var/log", "/var/spool", "/var/cache", "/var/backups", "/var/mail", "/snap",
                  HOME, BINARIES]
EQUAL_REFUSED = ["/", "/home", "/var", "/var/lib", "/srv", "/opt", "/tmp", "/var/tmp", "/mnt", "/media",
                 "/var/lib/postgresql", "/var/lib/pgsql"]
PIECES = ["etc", "usr", "var", "lib", "log", "home", "postgres", "srv", "barman", "opt", "pg15", "bin", ".ssh",
          "..", ".", "", "tmp", "x", "pgsql", "postgresql", "15", "root", "etcetera", "a b", "$"]


def safe_when_accepted(path: str, rules: PathRules) -> None:
    assert path.startswith("/") and not path.startswith("//")
    assert re.fullmatch(r"[A-Za-z0-9._/-]+", path)
    assert posixpath.normpath(path) == path
    parts = path.split("/")[1:]
    assert ".ssh" not in parts and "." not in parts and ".." not in parts
    for refused in INSIDE_REFUSED:
        assert path != refused and not path.startswith(refused + "/")
    for protected in (HOME, BINARIES):
        assert not protected.startswith(path + "/")
    assert path not in EQUAL_REFUSED
    assert not (len(parts) == 2 and parts[0] == "home")
    if rules.allowed_destinations:
        assert any(path == a.rstrip("/") or path.startswith(a.rstrip("/") + "/") for a in rules.allowed_destinations)


paths_strategy = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(PIECES), min_size=0, max_size=6).map(lambda parts: "/" + "/".join(parts)),
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=6).map(lambda parts: "/".join(parts)),
)


@settings(max_examples=400, deadline=None)
@given(path=paths_strategy, field=st.sampled_from(list(FIELDS)),
       rules=st.sampled_from([RULES, PathRules("pg", HOME, (BINARIES,), ("/srv/pg", "/var/lib/postgresql/15/"))]))
def test_any_path_is_refused_cleanly_or_is_safe(path, field, rules):
    try:
        effects.check_effects(recovery({**FIELDS[field](path)}), rules)
    except (InvalidRequest, Unprocessable) as exc:
        assert field.split(".")[0] in exc.message or "destination_directory" in exc.message
        return
    safe_when_accepted(path, rules)


# -- through the app: refusals are answered before anything is stored -----------------------------


def add_backup_with_tablespaces(barman_files, backup_id, tablespaces, **extra):
    barman_files.add_backup(backup_id)
    info = barman_files.home / "pg" / "meta" / f"{backup_id}-backup.info"
    listed = output_tablespace_list([Tablespace(name, 16385 + i, location)
                                     for i, (name, location) in enumerate(tablespaces.items())])
    text = info.read_text().replace("tablespaces=None", f"tablespaces={listed}")
    for key, value in extra.items():
        text = re.sub(rf"^{key}=.*$", f"{key}={value}", text, flags=re.MULTILINE)
    info.write_text(text)


def policy_client(barman_files, spawned, allowed=("/srv/pg/",)):
    settings_ = Settings(barman_conf=str(barman_files.conf), servers={"pg": ServerPolicy(allowed_destinations=allowed)})
    return create_app(settings_, spawn=spawned).test_client()


def jobs(barman_files):
    return sorted((barman_files.home / "pg" / "jobs").glob("*.json"))


@pytest.mark.parametrize("fields, field", [
    ({"tablespaces": {"tbs1": "/srv/elsewhere"}}, "tablespaces.tbs1"),
    ({"target_name": "n", "staging_wal_directory": "/srv/elsewhere", "tablespaces": {"tbs1": "/srv/pg/tbs1"}},
     "staging_wal_directory"),
    ({}, "tablespaces.tbs1"),  # not relocated: the backup's /data/tbs1 is outside the policy
])
def test_paths_outside_allowed_destinations_are_422_and_store_nothing(barman_files, spawned, fields, field):
    add_backup_with_tablespaces(barman_files, "20261127T010000", {"tbs1": "/data/tbs1"})
    client = policy_client(barman_files, spawned)
    response = client.post("/servers/pg/operations", json={**BODY, **fields})
    assert response.status_code == 422, response.json
    assert response.json["error"].startswith(f"field '{field}'")
    assert "is not under an allowed destination of server 'pg'" in response.json["error"]
    assert jobs(barman_files) == [] and spawned.calls == []
    inside = client.post("/servers/pg/operations", json={**BODY, "tablespaces": {"tbs1": "/srv/pg/tbs1"},
                                                          "staging_wal_directory": "/srv/pg/wal",
                                                          "target_name": "n"})
    assert inside.status_code == 202, inside.json


def test_built_in_refusals_through_the_app_are_400_and_store_nothing(client, barman_files, spawned):
    add_backup_with_tablespaces(barman_files, "20261127T010000", {"tbs1": "/srv/tbs1"})
    for fields, field in [({"destination_directory": "/home/postgres/.ssh"}, "destination_directory"),
                          ({"tablespaces": {"tbs1": "/root/.ssh"}}, "tablespaces.tbs1"),
                          ({"staging_wal_directory": str(barman_files.home / "pg")}, "staging_wal_directory"),
                          ({"destination_directory": "/var/lib/pgsql"}, "destination_directory")]:
        response = client.post("/servers/pg/operations", json={**BODY, "target_name": "n", **fields})
        assert response.status_code == 400, fields
        assert response.json["error"].startswith(f"field '{field}'")
    assert jobs(barman_files) == [] and spawned.calls == []


def test_the_path_rules_come_before_the_tablespace_names_of_the_backup(barman_files, spawned):
    barman_files.add_backup("20261127T010000")
    client = policy_client(barman_files, spawned)
    outside = client.post("/servers/pg/operations", json={**BODY, "tablespaces": {"nope": "/srv/elsewhere"}})
    assert outside.status_code == 422 and "field 'tablespaces.nope'" in outside.json["error"]
    inside = client.post("/servers/pg/operations", json={**BODY, "tablespaces": {"nope": "/srv/pg/nope"}})
    assert inside.status_code == 400 and "nope not in backup" in inside.json["error"]


def test_the_servers_path_prefix_and_a_remote_staging_path_come_from_barmans_configuration(barman_files, spawned):
    server_conf = barman_files.conf_dir / "pg.conf"
    server_conf.write_text(server_conf.read_text() + textwrap.dedent("""\
        path_prefix = /opt/pgsql/15/bin
        staging_location = remote
        staging_path = /srv/stage
        """))
    add_backup_with_tablespaces(barman_files, "20261127T010000", {}, compression="gzip")
    client = policy_client(barman_files, spawned)
    binaries = client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/opt/pgsql"})
    assert binaries.status_code == 400
    assert "a parent of PostgreSQL's binaries (path_prefix of server 'pg') /opt/pgsql/15/bin" in binaries.json["error"]
    staging = client.post("/servers/pg/operations", json=BODY)
    assert staging.status_code == 422
    assert staging.json["error"].startswith("field 'staging_path' (Barman's configuration of the server): "
                                            "/srv/stage is not under an allowed destination")


# -- on the target host: the rules again where each path really leads, and the staging rule ---------

def on_target(found=None, **by_path):
    """What the target says: every path absent and leading to itself, but those of *by_path*."""
    def answer(effect):
        return by_path.get(effect.path, effects.OnTarget(effects.ABSENT, effect.path))
    return {e.path: answer(e) for e in found}


def test_a_symlink_inside_an_allowed_destination_pointing_outside_is_refused():
    rules = PathRules("pg", HOME, (BINARIES,), ("/srv/pg",))
    found = recovery({"destination_directory": "/srv/pg/link/restore"})
    effects.check_effects(found, rules)  # the text is inside the allowed tree
    with pytest.raises(Unprocessable) as refused:
        effects.check_on_target(found, on_target(found, **{"/srv/pg/link/restore": effects.OnTarget(
            effects.ABSENT, "/srv/other-cluster/restore")}), rules)
    assert refused.value.message == (
        f"field 'destination_directory': /srv/pg/link/restore resolves on the target host to "
        f"/srv/other-cluster/restore, which is not under an allowed destination of server 'pg' (allowed: /srv/pg); "
        f"it would be {WIPE}")


@pytest.mark.parametrize("real, rule", [
    ("/etc/restore", "inside the system directory /etc"),
    ("/var/lib/postgresql", "a directory that holds others' data"),
    ("/home/postgres/.ssh", "in a .ssh directory"),
    (f"{HOME}/pg", "inside Barman's home"),
    ("/srv/pg/a b", "not a normalised absolute path of letters, digits and ._-/ only"),
])
def test_the_built_in_rules_hold_where_a_path_really_leads(real, rule):
    found = recovery({"tablespaces": {"tbs1": "/srv/pg/tbs1"}})
    with pytest.raises(InvalidRequest) as refused:
        effects.check_on_target(found, on_target(found, **{"/srv/pg/tbs1": effects.OnTarget(effects.ABSENT, real)}),
                                RULES)
    assert refused.value.message.startswith("field 'tablespaces.tbs1': /srv/pg/tbs1 resolves on the target host to ")
    assert rule in refused.value.message


def test_two_paths_leading_to_one_directory_are_refused():
    found = recovery({"tablespaces": {"tbs1": "/srv/pg/tbs1"}})
    with pytest.raises(InvalidRequest, match="name the same directory /srv/data on the target host"):
        effects.check_on_target(found, on_target(found, **{
            "/srv/pg/restore": effects.OnTarget(effects.ABSENT, "/srv/data"),
            "/srv/pg/tbs1": effects.OnTarget(effects.ABSENT, "/srv/data")}), RULES)


def test_a_path_in_a_loop_of_links_is_refused():
    found = recovery({})
    with pytest.raises(Unprocessable, match="cannot be resolved on the target host"):
        effects.check_on_target(found, on_target(found, **{"/srv/pg/restore": effects.OnTarget(effects.OTHER, None)}),
                                RULES)


@pytest.mark.parametrize("kind, what", [(effects.FILLED, "is a directory that holds files"),
                                        (effects.UNREADABLE, "is a directory whose entries cannot be listed"),
                                        (effects.OTHER, "exists and is not a directory")])
def test_a_staging_directory_that_is_not_empty_is_a_conflict_naming_rm_fr(kind, what):
    found = recovery({"target_name": "n", "staging_wal_directory": "/srv/pgdata"})
    with pytest.raises(Conflict) as refused:
        effects.check_on_target(found, on_target(found, **{"/srv/pgdata": effects.OnTarget(kind, "/srv/pgdata")}),
                                RULES)
    assert refused.value.status == 409
    assert refused.value.message == (
        f"field 'staging_wal_directory': /srv/pgdata {what} on the target host; PostgreSQL would delete it and "
        "everything in it at the end of recovery (recovery_end_command 'rm -fr /srv/pgdata'): name a directory "
        "that does not exist or is empty")


@pytest.mark.parametrize("kind", [effects.ABSENT, effects.EMPTY])
def test_an_absent_or_empty_staging_directory_is_accepted(kind):
    found = recovery({"target_name": "n", "staging_wal_directory": "/srv/wal"})
    resolved = effects.check_on_target(found, on_target(found, **{"/srv/wal": effects.OnTarget(kind, "/srv/wal")}),
                                       RULES)
    assert [e.path for e in resolved] == ["/srv/pg/restore", "/srv/wal"]


def test_barmans_default_staging_directory_is_left_to_the_destinations_rules():
    # barman_wal inside the destination exists only if the destination holds files, which Barman refuses.
    found = recovery({"target_name": "n"})
    assert [e.path for e in found] == ["/srv/pg/restore", "/srv/pg/restore/barman_wal"]
    effects.check_on_target(found, on_target(found, **{"/srv/pg/restore/barman_wal": effects.OnTarget(
        effects.FILLED, "/srv/pg/restore/barman_wal")}), RULES)


@settings(max_examples=300, deadline=None)
@given(real=paths_strategy, field=st.sampled_from(list(FIELDS)), kind=st.sampled_from(effects.KINDS),
       rules=st.sampled_from([RULES, PathRules("pg", HOME, (BINARIES,), ("/srv/pg", "/var/lib/postgresql/15/"))]))
def test_wherever_a_path_leads_it_is_refused_cleanly_or_leads_somewhere_safe(real, field, kind, rules):
    text = "/srv/pg/x" if field != "destination_directory" else "/srv/pg/restore"
    found = recovery({**FIELDS[field](text)})
    effects.check_effects(found, rules)
    seen = on_target(found, **{text: effects.OnTarget(kind, real)})
    try:
        resolved = effects.check_on_target(found, seen, rules)
    except (InvalidRequest, Unprocessable, Conflict) as exc:
        assert field.split(".")[0] in exc.message
        return
    for effect in resolved:
        safe_when_accepted(effect.path, rules)


def test_through_the_app_a_non_empty_staging_directory_is_409_and_stores_nothing(client, barman_files, spawned,
                                                                                fake_target):
    barman_files.add_backup("20261127T010000")
    fake_target.paths["/srv/pgdata"] = effects.OnTarget(effects.FILLED, "/srv/pgdata")
    response = client.post("/servers/pg/operations", json={**BODY, "target_name": "n",
                                                            "staging_wal_directory": "/srv/pgdata"})
    assert response.status_code == 409, response.json
    assert response.json["error"].startswith("field 'staging_wal_directory': /srv/pgdata is a directory that holds")
    assert "rm -fr /srv/pgdata" in response.json["error"]
    assert jobs(barman_files) == [] and spawned.calls == []


def test_through_the_app_a_symlink_out_of_the_allowed_tree_is_422_and_stores_nothing(barman_files, spawned,
                                                                                   fake_target):
    barman_files.add_backup("20261127T010000")
    fake_target.paths["/srv/pg/link"] = effects.OnTarget(effects.ABSENT, "/srv/elsewhere")
    response = policy_client(barman_files, spawned).post("/servers/pg/operations",
                                                         json={**BODY, "destination_directory": "/srv/pg/link"})
    assert response.status_code == 422, response.json
    assert response.json["error"].startswith("field 'destination_directory': /srv/pg/link resolves on the target "
                                             "host to /srv/elsewhere, which is not under an allowed destination")
    assert jobs(barman_files) == [] and spawned.calls == []


def test_a_target_the_service_cannot_reach_is_a_422_naming_ssh_s_failure(client, barman_files, spawned,
                                                                         fake_target):
    barman_files.add_backup("20261127T010000")
    fake_target.unreachable = "ssh exited with code 255: ssh: connect to host db2 port 22: Connection refused"
    response = client.post("/servers/pg/operations", json=BODY)
    assert response.status_code == 422, response.json
    assert response.json["error"] == ("field 'remote_ssh_command': cannot look at the recovery's paths on the "
                                      "target host postgres@db2: ssh exited with code 255: ssh: connect to host db2 "
                                      "port 22: Connection refused")
    assert jobs(barman_files) == [] and spawned.calls == []


def test_one_recovery_per_destination_is_keyed_on_where_it_really_leads(client, barman_files, fake_target):
    barman_files.add_backup("20261127T010000")
    fake_target.paths["/srv/pg/restore"] = effects.OnTarget(effects.ABSENT, "/srv/data/restore")
    fake_target.paths["/srv/pg/alias"] = effects.OnTarget(effects.ABSENT, "/srv/data/restore")
    first = client.post("/servers/pg/operations", json=BODY)
    assert first.status_code == 202, first.json
    second = client.post("/servers/pg/operations", json={**BODY, "destination_directory": "/srv/pg/alias"})
    assert second.status_code == 409, second.json
    assert first.json["operation_id"] in second.json["error"]
