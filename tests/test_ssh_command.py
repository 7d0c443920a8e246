"""remote_ssh_command reaches /bin/sh on the Barman host: only plain ssh invocations pass."""

import pytest

from pg_backup_api.errors import InvalidRequest
from pg_backup_api.ssh_command import SshTarget, parse

# Each of these would run a command on the Barman host, reach another host than the one
# named, restore onto the Barman host itself, or smuggle a remote command.
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
    "ssh -l 'a b' host",
    "ssh -i ../key host",
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
]


@pytest.mark.parametrize("command", HOSTILE)
def test_hostile_values_are_refused_with_a_reason(command):
    with pytest.raises(InvalidRequest) as exc:
        parse(command)
    assert exc.value.message.startswith("field 'remote_ssh_command' is not allowed: ")


def test_the_corpus_is_large_enough():
    assert len(HOSTILE) >= 40


@pytest.mark.parametrize("command, target", [
    ("ssh postgres@db2.example.org", SshTarget("postgres", "db2.example.org", None)),
    ("ssh -p 2222 postgres@127.0.0.1", SshTarget("postgres", "127.0.0.1", 2222)),
    ("ssh -q -C -4 -T -l pg db2", SshTarget("pg", "db2", None)),
    ("ssh -qC -p2222 pg@db2", SshTarget("pg", "db2", 2222)),
    ("/usr/bin/ssh -o BatchMode=yes -o ConnectTimeout=10 pg@db2", SshTarget("pg", "db2", None)),
    ("ssh -o Port=2200 -i /var/lib/barman/.ssh/id_ed25519 pg@db2", SshTarget("pg", "db2", 2200)),
    ("ssh -o StrictHostKeyChecking=accept-new -o UserKnownHostsFile=/var/lib/barman/.ssh/kh pg@db2",
     SshTarget("pg", "db2", None)),
    ("ssh pg@2001:db8::1", SshTarget("pg", "2001:db8::1", None)),
])
def test_plain_ssh_invocations_are_accepted(command, target):
    assert parse(command) == target


def test_the_offending_token_is_named():
    with pytest.raises(InvalidRequest, match="'ProxyCommand'"):
        parse("ssh -o ProxyCommand=x host")
    with pytest.raises(InvalidRequest, match="';'"):
        parse("ssh host; id")
