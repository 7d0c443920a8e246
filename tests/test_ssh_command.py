"""remote_ssh_command reaches /bin/sh on the Barman host: only plain ssh invocations pass,
and where one goes is what `ssh -G` says, not what a second parser guesses."""

import ipaddress
import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pg_backup_api import create_app
from pg_backup_api.core.errors import InvalidRequest, Unprocessable
from pg_backup_api.rules import ssh_command
from pg_backup_api.rules.settings import ServerPolicy, Settings
from pg_backup_api.rules.ssh_command import ENABLEABLE, NEVER, SshCommand, check_format, option_names, parse, resolve

# Each of these would run a command on the Barman host, reach another host than the one
# named, restore onto the Barman host itself, smuggle a remote command, write into a file
# of Barman's, or skip host key verification, under the default policy.
HOSTILE = [
    "ssh host; touch /tmp/pwned",
    "ssh host && touch /tmp/pwned",
    "ssh host || touch /tmp/pwned",
    "ssh host | touch /tmp/pwned",
    "ssh host & touch /tmp/pwned",
    "ssh host\ntouch /tmp/pwned",
    "ssh host\rtouch /tmp/pwned",
    "ssh $(touch /tmp/pwned) host",
    "ssh `touch /tmp/pwned` host",
    "ssh host > /tmp/pwned",
    "ssh host < /etc/passwd",
    "ssh ${IFS}host",
    "ssh 'host'",
    'ssh "host"',
    "ssh host\\",
    "ssh -o ProxyCommand=touch%20/tmp/pwned host",
    "ssh -oProxyCommand=touch host",
    "ssh -o proxycommand=touch host",
    "ssh -o LocalCommand=touch host",
    "ssh -o PermitLocalCommand=yes host",
    "ssh -o ProxyJump=evil host",
    "ssh -o KnownHostsCommand=touch host",
    "ssh -o Match=exec host",
    "ssh -o RemoteCommand=id host",
    "ssh -o Include=/tmp/pwned host",
    "ssh -o ControlMaster=yes host",
    "ssh -o ControlPath=/tmp/pwned host",
    "ssh -o ControlPersist=yes host",
    "ssh -o PKCS11Provider=/tmp/pwned.so host",
    "ssh -o SecurityKeyProvider=/tmp/pwned.so host",
    "ssh -o LocalForward=1:a:2 host",
    "ssh -o ForwardAgent=yes host",
    "ssh -F /tmp/evil_config host",
    "ssh -J evil host",
    "ssh -W evil:22 host",
    "ssh -L 1:a:2 host",
    "ssh -R 1:a:2 host",
    "ssh -D 1080 host",
    "ssh -E /tmp/pwned host",
    "ssh -S /tmp/sock host",
    "ssh -M host",
    "ssh -N host",
    "ssh -- -oProxyCommand=touch",
    "ssh -p host",
    "ssh -p 99999 host",
    "ssh -p 22x host",
    "ssh -o Port=0 host",
    "ssh -l 'a b' host",
    "ssh -i ../key host",
    "ssh -i /tmp/pwned host",
    "ssh -i /etc/barman.conf host",
    "ssh -i ~/.ssh/id_ed25519 host",
    "ssh -o IdentityFile=/var/lib/barman/.barman.auto.conf host",
    # ssh would append the host key to Barman's own configuration: every barman command then fails.
    "ssh -p 22 -o UserKnownHostsFile=/var/lib/barman/.barman.auto.conf -o StrictHostKeyChecking=accept-new "
    "postgres@db2",
    "ssh -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null postgres@db2",
    "ssh -o StrictHostKeyChecking=no postgres@db2",
    "ssh -o UserKnownHostsFile=/dev/null postgres@db2",
    "ssh -o GlobalKnownHostsFile=/etc/barman.conf postgres@db2",
    "ssh -o IdentitiesOnly=yes postgres@db2",
    "ssh -o LogLevel=DEBUG3 postgres@db2",
    "ssh -o Hostname=evil postgres@db2",
    "ssh -o BatchMode=no postgres@db2",
    "ssh -o Compression=maybe postgres@db2",
    "ssh -o ConnectTimeout=0 postgres@db2",
    "ssh -o ServerAliveInterval=often postgres@db2",
    "ssh -o ServerAliveCountMax=-1 postgres@db2",
    "ssh -o Port postgres@db2",
    "ssh -o Port= postgres@db2",
    "ssh postgres@db2 -p 22",
    "ssh host touch /tmp/pwned",
    "ssh host1 host2",
    "ssh -oProxyCommand=touch",
    "ssh",
    "",
    "   ",
    "sh -c id",
    "bash",
    "rsync host",
    "/tmp/ssh host",
    "ssh-keygen host",
    "/usr/bin/ssh; id",
    "ssh -host",
    "ssh @host",
    "ssh user@",
    "ssh ho*st",
    "ssh ho?st",
    "ssh ~root@host",
    "ssh host#comment",
    "ssh\thost",
    "ssh host\x00",
    "ssh pg@[2001:db8::1]",
    "ssh -o User=%u host",
]


@pytest.fixture
def ssh_home(tmp_path, monkeypatch):
    """The service user's home, with its ~/.ssh: the one place file options may point to."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    return tmp_path


@pytest.mark.parametrize("command", HOSTILE)
def test_hostile_values_are_refused_with_a_reason(command):
    with pytest.raises(InvalidRequest) as exc:
        parse(command)
    assert exc.value.message.startswith("field 'remote_ssh_command' is not allowed: ")


def test_the_corpus_is_large_enough():
    assert len(HOSTILE) >= 80


@pytest.mark.parametrize("command", [
    "ssh postgres@db2.example.org",
    "ssh -p 2222 postgres@127.0.0.1",
    "ssh -q -C -4 -T -l pg db2",
    "ssh -qC -p2222 pg@db2",
    "/usr/bin/ssh -o BatchMode=yes -o ConnectTimeout=10 pg@db2",
    "ssh -o Port=2200 -o User=pg -o Compression=no db2",
    "ssh -o ServerAliveInterval=15 -o ServerAliveCountMax=3 -6 pg@db2",
    "ssh -oport=2200 -obatchmode=YES pg@db2",
    "ssh pg@2001:db8::1",
])
def test_plain_ssh_invocations_are_accepted(command):
    assert parse(command) == SshCommand(tuple(command.split()), command.split()[-1].rpartition("@")[2])


def test_the_offending_token_is_named():
    with pytest.raises(InvalidRequest, match="'ProxyCommand' is never allowed"):
        parse("ssh -o ProxyCommand=x host")
    with pytest.raises(InvalidRequest, match="';'"):
        parse("ssh host; id")
    with pytest.raises(InvalidRequest, match="'Bogus' in -o 'Bogus=1' is not an ssh option"):
        check_format("ssh -o Bogus=1 host")
    with pytest.raises(InvalidRequest, match="'StrictHostKeyChecking' is not allowed.*ssh_options"):
        parse("ssh -o StrictHostKeyChecking=no host")


# -- key and known hosts files ---------------------------------------------------------------

def test_a_key_file_must_be_under_the_service_users_ssh_directory(ssh_home):
    key = f"{ssh_home}/.ssh/id_ed25519"
    assert parse(f"ssh -i {key} pg@db2").argv[2] == key
    assert parse(f"ssh -o IdentityFile={key} pg@db2")
    for outside in [f"{ssh_home}/id_ed25519", f"{ssh_home}/.ssh/../.barman.auto.conf", f"{ssh_home}/.ssh",
                    f"{ssh_home}/.ssh//id", f"{ssh_home}/.sshx/id", "/etc/ssh/ssh_host_ed25519_key"]:
        with pytest.raises(InvalidRequest, match=f"-i '{outside}' must be a normalised absolute path under"):
            parse(f"ssh -i {outside} pg@db2")


def test_a_symbolic_link_in_the_ssh_directory_does_not_lead_out_of_it(ssh_home):
    (ssh_home / ".barman.auto.conf").write_text("")
    (ssh_home / ".ssh" / "known_hosts").symlink_to(ssh_home / ".barman.auto.conf")
    with pytest.raises(InvalidRequest, match="known_hosts"):
        parse(f"ssh -o UserKnownHostsFile={ssh_home}/.ssh/known_hosts pg@db2", {"UserKnownHostsFile"})


def test_host_key_checking_is_refused_by_default_and_accepted_when_the_operator_enables_it(ssh_home):
    command = "ssh -o StrictHostKeyChecking=no postgres@db2"
    with pytest.raises(InvalidRequest, match="StrictHostKeyChecking"):
        parse(command)
    assert parse(command, {"StrictHostKeyChecking"}).host == "db2"
    assert parse(command, {"stricthostkeychecking"}).host == "db2"


def test_a_known_hosts_file_is_a_known_hosts_file_under_ssh_even_when_enabled(ssh_home):
    enabled = {"StrictHostKeyChecking", "UserKnownHostsFile", "GlobalKnownHostsFile"}
    ok = f"ssh -o UserKnownHostsFile={ssh_home}/.ssh/known_hosts_recovery -o StrictHostKeyChecking=accept-new pg@db2"
    assert parse(ok, enabled)
    assert parse(f"ssh -o GlobalKnownHostsFile={ssh_home}/.ssh/known_hosts2 pg@db2", enabled)
    for target in [f"{ssh_home}/.barman.auto.conf", f"{ssh_home}/.ssh/config", f"{ssh_home}/.ssh/authorized_keys",
                   "/dev/null", "/etc/barman.conf", f"{ssh_home}/.ssh/../known_hosts"]:
        with pytest.raises(InvalidRequest, match=f"UserKnownHostsFile '{target}' must be a file named known_hosts"):
            parse(f"ssh -p 22 -o UserKnownHostsFile={target} -o StrictHostKeyChecking=accept-new pg@db2", enabled)


@pytest.mark.parametrize("name", sorted(NEVER))
def test_never_allowed_options_stay_refused_whatever_is_enabled(name):
    with pytest.raises(InvalidRequest, match="is never allowed"):
        parse(f"ssh -o {name}=x host", {name})
    with pytest.raises(InvalidRequest, match="is never allowed"):
        check_format(f"ssh -o {name}=x host")


def test_the_schema_check_is_syntax_only_and_the_server_policy_comes_later():
    assert check_format("ssh -o StrictHostKeyChecking=no -o LogLevel=ERROR pg@db2")
    with pytest.raises(InvalidRequest, match="StrictHostKeyChecking"):
        parse("ssh -o StrictHostKeyChecking=no -o LogLevel=ERROR pg@db2")


# -- the operator's ssh_options ----------------------------------------------------------------

def test_option_names_are_canonicalised_and_checked():
    assert option_names("stricthostkeychecking, UserKnownHostsFile  LogLevel", "x") == (
        "StrictHostKeyChecking", "UserKnownHostsFile", "LogLevel")
    with pytest.raises(ValueError, match="'Bogus' is not an ssh_config option"):
        option_names("LogLevel Bogus", "x")
    with pytest.raises(ValueError, match="ProxyCommand can never be enabled"):
        option_names("proxycommand", "x")


def test_ssh_options_come_from_api_and_extend_per_server(tmp_path):
    conf = tmp_path / "api.conf"
    conf.write_text("[api]\nssh_options = StrictHostKeyChecking\n\n[server pg]\nssh_options = loglevel\n")
    settings = Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)})
    assert settings.ssh_options_for("pg") == {"StrictHostKeyChecking", "LogLevel"}
    assert settings.ssh_options_for("other") == {"StrictHostKeyChecking"}
    from_env = Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf), "PG_BACKUP_API_SSH_OPTIONS": "IdentitiesOnly"})
    assert from_env.ssh_options_for("other") == {"IdentitiesOnly"}


@pytest.mark.parametrize("text", ["[api]\nssh_options = ProxyCommand\n", "[api]\nssh_options = NoSuchOption\n",
                                  "[server pg]\nssh_options = Include\n"])
def test_an_unknown_or_never_allowed_option_name_stops_the_service_at_start_up(tmp_path, text):
    conf = tmp_path / "api.conf"
    conf.write_text(text)
    with pytest.raises(ValueError, match="ssh_options"):
        Settings.from_env({"PG_BACKUP_API_CONFIG": str(conf)})


# -- where ssh says it goes --------------------------------------------------------------------

def test_two_spellings_of_one_port_resolve_to_one_target():
    # ssh keeps the first value it obtains: -o Port=2222 wins over the later -p 22.
    def where(command):
        target = resolve(parse(command))
        return target.host, target.port

    assert where("ssh -p 2222 postgres@db2") == ("db2", 2222)
    assert where("ssh -o Port=2222 -p 22 postgres@db2") == ("db2", 2222)
    assert where("ssh -p 22 -o Port=2222 postgres@db2") == ("db2", 22)
    assert where("ssh postgres@DB2") == ("db2", 22)
    assert where("ssh pg@2001:db8:0:0::1") == where("ssh pg@2001:db8::1")


# -- the address ssh connects to ---------------------------------------------------------------

REAL_ADDRESSES_OF = ssh_command.addresses_of  # before the unit tests' fake resolver replaces it


def address(command, enabled=()):
    return ssh_command.connect_address(resolve(parse(command, enabled)))


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_spelling_of_an_ipv4_address_is_one_key(number):
    ipv4 = ipaddress.IPv4Address(number)
    mapped = ipaddress.IPv6Address(0xFFFF00000000 | number)
    spellings = {str(ipv4), f"::ffff:{ipv4}", str(mapped), mapped.exploded, mapped.exploded.upper(),
                 f"0:0:0:0:0:ffff:{ipv4}", str(number)}
    keys = {ssh_command.canonical_address(REAL_ADDRESSES_OF(s, 22, "any")[0]) for s in spellings}
    expected = "127.0.0.1" if ipv4.is_loopback else str(ipv4)
    assert keys == {expected}


@given(st.integers(min_value=0, max_value=2**128 - 1))
def test_every_spelling_of_an_ipv6_address_is_its_compressed_form(number):
    ipv6 = ipaddress.IPv6Address(number)
    key = ssh_command.canonical_address(ipv6.exploded.upper())
    assert key == ssh_command.canonical_address(str(ipv6))
    if ipv6.ipv4_mapped is None and not ipv6.is_loopback:
        assert key == ipv6.compressed


def test_an_ipv4_mapped_spelling_reaches_the_same_key_as_the_ipv4_address():
    assert address("ssh postgres@::ffff:10.0.0.5") == address("ssh postgres@10.0.0.5") == "10.0.0.5"
    assert address("ssh postgres@0:0:0:0:0:ffff:a00:5") == "10.0.0.5"
    # Every loopback address is the Barman host itself.
    assert {address(f"ssh postgres@{h}") for h in ("127.0.0.1", "127.1", "127.0.0.2", "::1", "::ffff:127.0.0.1",
                                                   "2130706433", "0x7f000001")} == {"127.0.0.1"}


@pytest.mark.parametrize("host", ["0", "0.0.0.0", "::", "0:0:0:0:0:0:0:0", "::ffff:0.0.0.0", "0x0"])
def test_an_unspecified_address_is_refused_as_a_target(host):
    with pytest.raises(InvalidRequest, match="remote_ssh_command.*unspecified address"):
        address(f"ssh postgres@{host}")


def test_a_name_that_does_not_resolve_is_a_422_naming_it():
    with pytest.raises(Unprocessable, match="remote_ssh_command.*'no-such-host.invalid' does not resolve"):
        address("ssh postgres@no-such-host.invalid")


def test_a_name_with_several_addresses_is_keyed_on_the_lowest_whatever_the_order(monkeypatch):
    answers = [["10.0.0.9", "2001:db8::1", "10.0.0.5"], ["2001:db8::1", "10.0.0.5", "10.0.0.9"]]
    for answer in answers:
        monkeypatch.setattr(ssh_command, "addresses_of", lambda host, port, family, answer=answer: answer)
        assert address("ssh postgres@db2") == "10.0.0.5"
    monkeypatch.setattr(ssh_command, "addresses_of", lambda host, port, family: ["10.0.0.5", "0.0.0.0"])
    with pytest.raises(InvalidRequest, match="unspecified"):
        address("ssh postgres@db2")


def test_the_address_is_looked_up_in_the_address_family_ssh_uses(monkeypatch):
    asked = []
    monkeypatch.setattr(ssh_command, "addresses_of", lambda host, port, family: asked.append(family) or ["::2"])
    address("ssh -6 postgres@db2")
    address("ssh -4 postgres@db2")
    address("ssh postgres@db2")
    assert asked == ["inet6", "inet", "any"]
    # The real lookup asks getaddrinfo in that family: an IPv6 address has no IPv4 answer.
    with pytest.raises(socket.gaierror):
        REAL_ADDRESSES_OF("::1", 22, "inet")
    assert REAL_ADDRESSES_OF("::1", 22, "inet6") == ["::1"]


def test_the_user_is_the_one_ssh_uses():
    assert resolve(parse("ssh -o User=a -l b db2")).user == "a"
    # Options are read before the destination, so -l wins over user@: a second parser would guess wrong.
    assert resolve(parse("ssh -l b a@db2")).user == "b"
    target = resolve(parse("ssh -l b db2"))
    assert (target.user, target.host, target.port, target.alias) == ("b", "db2", 22, "db2")


def test_an_operator_enabled_hostname_is_resolved():
    target = resolve(parse("ssh -o Hostname=db9.example.org pg@db2", {"Hostname"}))
    assert (target.host, target.alias) == ("db9.example.org", "db2")


def test_an_answer_of_ssh_is_reused_until_its_configuration_changes_or_it_is_a_minute_old(
        tmp_path, monkeypatch):
    runs = []
    real_run = ssh_command._run_ssh_g
    monkeypatch.setattr(ssh_command, "_run_ssh_g", lambda command: runs.append(command) or real_run(command))
    stamp = ["first"]
    monkeypatch.setattr(ssh_command, "_ssh_config_stamp", lambda: tuple(stamp))
    clock = [1000.0]
    monkeypatch.setattr(ssh_command.time, "monotonic", lambda: clock[0])
    command = parse("ssh -p 2201 postgres@cache-test")
    first = resolve(command)
    assert resolve(command) == first and len(runs) == 1
    stamp[0] = "~/.ssh/config changed"
    assert resolve(command) == first and len(runs) == 2
    clock[0] += ssh_command.RESOLVE_REUSE
    assert resolve(command) == first and len(runs) == 3
    resolve(parse("ssh -p 2202 postgres@cache-test"))
    assert len(runs) == 4


def test_the_ssh_configuration_stamp_changes_with_the_users_ssh_config(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    monkeypatch.setattr(ssh_command.pwd, "getpwuid", lambda uid: type("pw", (), {"pw_dir": str(home)}))
    before = ssh_command._ssh_config_stamp()
    (home / ".ssh" / "config").write_text("Host db2\n  HostName db9\n")
    assert ssh_command._ssh_config_stamp() != before


def test_what_ssh_itself_refuses_is_a_400_with_its_message():
    with pytest.raises(InvalidRequest, match="ssh refuses it: .*unsupported option"):
        resolve(parse("ssh -o StrictHostKeyChecking=sometimes pg@db2", {"StrictHostKeyChecking"}))


# -- properties --------------------------------------------------------------------------------

TOKENS = ["ssh", "/usr/bin/ssh", "-p", "22", "2222", "-o", "-l", "-i", "-q", "-C", "-qC", "-T", "--", "-",
          "Port=2222", "port=22", "User=pg", "BatchMode=yes", "BatchMode=no", "StrictHostKeyChecking=no",
          "UserKnownHostsFile=/dev/null", "ProxyCommand=id", "-oProxyCommand=id", "IdentityFile=/tmp/k",
          "/root/.ssh/id", "host", "pg@db2", "@", "db2", "2001:db8::1", ";", "id", "$(id)", "=", "-p2222",
          "ConnectTimeout=99999", "Hostname=evil", "Include=/etc/passwd", "LogLevel=QUIET"]


@settings(max_examples=500, suppress_health_check=list(HealthCheck))
@given(st.text())
def test_any_string_is_either_a_command_or_a_400(text):
    for check in (parse, check_format):
        try:
            assert isinstance(check(text), SshCommand)
        except InvalidRequest:
            pass


@settings(max_examples=1000, suppress_health_check=list(HealthCheck))
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_any_token_list_is_either_a_command_or_a_400_and_only_allowed_options_pass(tokens):
    try:
        command = parse(" ".join(tokens))
    except InvalidRequest:
        return
    values = [v.lstrip("-o").partition("=")[0].lower() for v in command.argv if "=" in v]
    assert all(v in {"port", "user", "batchmode", "connecttimeout", "identityfile"} for v in values)
    assert "batchmode=no" not in " ".join(command.argv).lower()


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                    max_leaves=6)


@given(JSON)
def test_a_value_that_is_not_a_string_is_a_400_not_a_type_error(value):
    with pytest.raises(InvalidRequest, match="must be a string"):
        parse(value)
    with pytest.raises(InvalidRequest, match="must be a string"):
        check_format(value)


def test_every_ssh_config_keyword_is_either_enableable_or_never_allowed():
    assert not ENABLEABLE & set(NEVER)
    assert {"stricthostkeychecking", "userknownhostsfile", "identitiesonly", "loglevel"} <= ENABLEABLE


# -- through the API ---------------------------------------------------------------------------

BODY = {"type": "recovery", "backup_id": "latest", "destination_directory": "/srv/pg/restore",
        "remote_ssh_command": "ssh -p 2222 postgres@db2"}


@pytest.fixture
def a_backup(barman_files):
    barman_files.add_backup("20261127T010000")


def make_client(barman_files, spawned, **kw):
    return create_app(Settings(barman_conf=str(barman_files.conf), **kw), spawn=spawned).test_client()


@pytest.mark.parametrize("spelling", ["::ffff:127.0.0.1", "0:0:0:0:0:ffff:7f00:1", "127.1", "::1"])
def test_spellings_of_one_address_share_one_claim(a_backup, client, spelling):
    body = {**BODY, "remote_ssh_command": "ssh -p 2222 postgres@127.0.0.1"}
    assert client.post("/servers/pg/operations", json=body).status_code == 202
    other = client.post("/servers/pg/operations",
                        json={**body, "remote_ssh_command": f"ssh -p 2222 postgres@{spelling}"})
    assert other.status_code == 409, other.json
    assert "on 127.0.0.1:2222 is already running" in other.json["error"]


@pytest.mark.parametrize("host", ["0", "0.0.0.0", "::"])
def test_an_unspecified_address_is_a_400_naming_the_field(a_backup, client, host):
    response = client.post("/servers/pg/operations", json={**BODY, "remote_ssh_command": f"ssh postgres@{host}"})
    assert response.status_code == 400
    assert response.json["error"].startswith("field 'remote_ssh_command' is not allowed: host ")


def test_a_host_that_does_not_resolve_is_a_422_naming_it(a_backup, client, barman_files):
    response = client.post("/servers/pg/operations",
                           json={**BODY, "remote_ssh_command": "ssh postgres@no-such-host.invalid"})
    assert response.status_code == 422
    assert "field 'remote_ssh_command': host 'no-such-host.invalid' does not resolve" in response.json["error"]
    assert list((barman_files.home / "pg" / "jobs").glob("*.json")) == []


def test_the_job_records_the_address_ssh_connects_to(a_backup, client, barman_files):
    body = {**BODY, "remote_ssh_command": "ssh -p 2222 postgres@::ffff:10.1.2.3"}
    op_id = client.post("/servers/pg/operations", json=body).json["operation_id"]
    job = json.loads((barman_files.home / "pg" / "jobs" / f"{op_id}.json").read_text())
    assert (job["target_address"], job["remote_ssh_command"]) == ("10.1.2.3", body["remote_ssh_command"])


def test_two_spellings_of_one_destination_are_one_claim(a_backup, client, barman_files):
    first = client.post("/servers/pg/operations", json=BODY)
    assert first.status_code == 202
    other = {**BODY, "remote_ssh_command": "ssh -o Port=2222 -p 22 postgres@db2"}
    second = client.post("/servers/pg/operations", json=other)
    assert second.status_code == 409
    assert first.json["operation_id"] in second.json["error"]
    # Each job keeps the command exactly as its client sent it.
    job = json.loads((barman_files.home / "pg" / "jobs" / f"{first.json['operation_id']}.json").read_text())
    assert job["remote_ssh_command"] == "ssh -p 2222 postgres@db2"
    status = client.get(f"/servers/pg/operations/{first.json['operation_id']}").json
    assert status["remote_ssh_command"] == "ssh -p 2222 postgres@db2"


def test_the_known_hosts_request_is_refused_and_stores_nothing(a_backup, client, barman_files, spawned):
    command = (f"ssh -p 22 -o UserKnownHostsFile={barman_files.home}/.barman.auto.conf "
               "-o StrictHostKeyChecking=accept-new postgres@db2")
    response = client.post("/servers/pg/operations", json={**BODY, "remote_ssh_command": command})
    assert response.status_code == 400
    assert "UserKnownHostsFile" in response.json["error"]
    assert spawned.calls == []
    assert not (barman_files.home / ".barman.auto.conf").exists()


def test_an_option_is_accepted_only_where_the_operator_enabled_it(a_backup, barman_files, spawned):
    body = {**BODY, "remote_ssh_command": "ssh -o StrictHostKeyChecking=no postgres@db2"}
    refused = make_client(barman_files, spawned).post("/servers/pg/operations", json=body)
    assert refused.status_code == 400
    assert "'StrictHostKeyChecking' is not allowed" in refused.json["error"]
    everywhere = make_client(barman_files, spawned, ssh_options=("StrictHostKeyChecking",))
    assert everywhere.post("/servers/pg/operations", json=body).status_code == 202
    barman_files.add_server("other")
    barman_files.add_backup("20261127T010000", server="other")
    per_server = make_client(barman_files, spawned,
                             servers={"other": ServerPolicy(ssh_options=("StrictHostKeyChecking",))})
    assert per_server.post("/servers/pg/operations",
                           json={**body, "destination_directory": "/srv/pg/b"}).status_code == 400
    assert per_server.post("/servers/other/operations",
                           json={**body, "destination_directory": "/srv/pg/c"}).status_code == 202


def test_allowed_hosts_is_checked_against_the_host_ssh_resolves(a_backup, barman_files, spawned):
    client = make_client(barman_files, spawned, ssh_options=("Hostname",),
                         servers={"pg": ServerPolicy(allowed_hosts=("db2",))})
    body = {**BODY, "remote_ssh_command": "ssh -o Hostname=db9 postgres@db2"}
    response = client.post("/servers/pg/operations", json=body)
    assert response.status_code == 422
    assert "host 'db2' (ssh resolves it to 'db9') is not an allowed" in response.json["error"]
    assert client.post("/servers/pg/operations", json=BODY).status_code == 202


@pytest.mark.parametrize("value", [None, 5, ["ssh", "db2"], {"ssh": "db2"}, True])
def test_a_non_string_command_is_a_json_400(a_backup, client, value):
    response = client.post("/servers/pg/operations", json={**BODY, "remote_ssh_command": value})
    assert response.status_code == 400
    assert "remote_ssh_command" in response.json["error"]


def test_the_service_user_ssh_directory_is_the_home_of_the_process(ssh_home):
    assert parse(f"ssh -i {os.environ['HOME']}/.ssh/id_rsa pg@db2")
