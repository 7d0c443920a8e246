"""The `remote_ssh_command` policy.

Barman hands this string to `/bin/sh` on the Barman host, as the barman user, and ssh
itself can run local commands (ProxyCommand, LocalCommand, ...). So the value is accepted
only when it parses into `ssh`, a few harmless options and exactly one `[user@]host`, every
token made of characters no shell treats specially.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from pg_backup_api.errors import InvalidRequest

FIELD = "remote_ssh_command"
SAFE_CHARS = re.compile(r"[A-Za-z0-9._/=:@,+ -]")
SSH_BINARIES = ("ssh", "/usr/bin/ssh", "/bin/ssh", "/usr/local/bin/ssh")
FLAGS = frozenset("qC46T")
OPTIONS_WITH_VALUE = {"p": "port", "l": "user", "i": "keyfile", "o": "option"}
ALLOWED_O_KEYS = {
    key.lower(): key for key in (
        "Port", "User", "IdentityFile", "ConnectTimeout", "BatchMode", "StrictHostKeyChecking",
        "UserKnownHostsFile", "ServerAliveInterval", "ServerAliveCountMax", "Compression",
        "IdentitiesOnly", "LogLevel",
    )
}
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*")
PATH = re.compile(r"/[A-Za-z0-9._/-]+")


@dataclass(frozen=True)
class SshTarget:
    """Where a recovery goes: what identifies the host for the one-recovery-per-destination rule."""

    user: Optional[str]
    host: str
    port: Optional[int]

    @property
    def key(self) -> str:
        return f"{self.host.lower()}:{self.port or 22}"


def _refuse(detail: str) -> InvalidRequest:
    return InvalidRequest(f"field '{FIELD}' is not allowed: {detail}")


def _port(value: str) -> int:
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise _refuse(f"port {value!r} is not a TCP port number")
    return int(value)


def parse(command: str) -> SshTarget:
    """Check *command* against the policy; return the host it reaches."""
    # With nothing but these characters and single spaces, /bin/sh splits the string
    # exactly as this function does: no quoting, expansion or second command is possible.
    for char in command:
        if not SAFE_CHARS.fullmatch(char):
            raise _refuse(f"character {char!r} is not allowed (only letters, digits, spaces and ._/=:@,+-)")
    tokens: List[str] = command.split()
    if not tokens:
        raise _refuse("it is empty (Barman would restore onto the Barman host itself)")
    if tokens[0] not in SSH_BINARIES:
        raise _refuse(f"it must start with one of {', '.join(SSH_BINARIES)}, not {tokens[0]!r}")

    user: Optional[str] = None
    port: Optional[int] = None
    destination: Optional[str] = None
    rest = tokens[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-") and destination is None:
            letters = token[1:]
            if letters and all(c in FLAGS for c in letters):
                i += 1
                continue
            name = letters[:1]
            if name not in OPTIONS_WITH_VALUE:
                raise _refuse(f"option {token!r} is not one of -p -l -i -o -q -C -4 -6 -T")
            value = letters[1:] or (rest[i + 1] if i + 1 < len(rest) else None)
            if value is None:
                raise _refuse(f"option {token!r} needs a value")
            i += 1 if letters[1:] else 2
            if name == "p":
                port = _port(value)
            elif name == "l":
                if not USER.fullmatch(value):
                    raise _refuse(f"user {value!r} is not a valid user name")
                user = value
            elif name == "i":
                if not PATH.fullmatch(value) or "/../" in value + "/":
                    raise _refuse(f"key file {value!r} must be an absolute path")
            else:
                port = _option(value, port)
            continue
        if destination is not None:
            raise _refuse(f"token {token!r} after the host: a remote command or a second host is not allowed")
        destination = token
        i += 1
    if destination is None:
        raise _refuse("it names no host ([user@]host)")
    login, at, host = destination.rpartition("@")
    if at:
        if not USER.fullmatch(login):
            raise _refuse(f"user {login!r} is not a valid user name")
        user = login
    if not HOST.fullmatch(host) or host.startswith("-"):
        raise _refuse(f"host {host!r} is not a host name or address")
    return SshTarget(user, host, port)


def _option(value: str, port: Optional[int]) -> Optional[int]:
    key, sep, setting = value.partition("=")
    if not sep or not setting:
        raise _refuse(f"option -o {value!r} must be written Key=Value")
    canonical = ALLOWED_O_KEYS.get(key.lower())
    if canonical is None:
        raise _refuse(f"ssh option {key!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_O_KEYS.values()))})")
    if canonical == "Port":
        return _port(setting)
    return port
