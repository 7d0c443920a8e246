"""The `remote_ssh_command` policy, and where ssh itself says the command goes.

Barman hands this string to `/bin/sh` on the Barman host, as the barman user, and ssh
itself can run local commands (ProxyCommand, LocalCommand, ...) and write files (a known
hosts file). So the value is accepted only when it parses into `ssh`, options from a strict
allowlist and exactly one `[user@]host`, every token made of characters no shell treats
specially. The operator may enable more `-o` options by name (`ssh_options`); those that run
commands, load code, forward ports or take arbitrary files never pass.

Which host, port and user the command reaches is not re-derived here: `ssh -G` (ssh's own
parser, no connection) resolves the same arguments, as Barman's ssh will; the address ssh then
connects to is looked up as ssh looks it up (getaddrinfo, in ssh's AddressFamily), so that every
spelling of one address is one target.
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import re
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, Iterable, List, Optional, Tuple

from pg_backup_api.core.errors import ApiError, InvalidRequest, Unprocessable

FIELD = "remote_ssh_command"
SAFE_CHARS = re.compile(r"[A-Za-z0-9._/=:@,+ -]")
SSH_BINARIES = ("ssh", "/usr/bin/ssh", "/bin/ssh", "/usr/local/bin/ssh")
FLAGS = frozenset("qC46T")
OPTIONS_WITH_VALUE = {"p": "Port", "l": "User", "i": "IdentityFile", "o": None}
USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
HOST = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}|[0-9A-Fa-f:]+:[0-9A-Fa-f:.]*")
RESOLVE_TIMEOUT = 5.0

# Every ssh_config(5) keyword: an operator's `ssh_options` must name one of these.
KEYWORDS = {k.lower(): k for k in """
    AddKeysToAgent AddressFamily BatchMode BindAddress BindInterface CASignatureAlgorithms CanonicalDomains
    CanonicalizeFallbackLocal CanonicalizeHostname CanonicalizeMaxDots CanonicalizePermittedCNAMEs
    CertificateFile ChannelTimeout CheckHostIP Ciphers ClearAllForwardings Compression ConnectTimeout
    ConnectionAttempts ControlMaster ControlPath ControlPersist DynamicForward EnableEscapeCommandline
    EnableSSHKeysign EscapeChar ExitOnForwardFailure FingerprintHash ForkAfterAuthentication ForwardAgent
    ForwardX11 ForwardX11Timeout ForwardX11Trusted GSSAPIAuthentication GSSAPIClientIdentity
    GSSAPIDelegateCredentials GSSAPIKexAlgorithms GSSAPIKeyExchange GSSAPIRenewalForcesRekey
    GSSAPIServerIdentity GSSAPITrustDns GatewayPorts GlobalKnownHostsFile HashKnownHosts Host
    HostKeyAlgorithms HostKeyAlias HostbasedAcceptedAlgorithms HostbasedAuthentication Hostname IPQoS
    IdentitiesOnly IdentityAgent IdentityFile IgnoreUnknown Include KbdInteractiveAuthentication
    KbdInteractiveDevices KexAlgorithms KnownHostsCommand LocalCommand LocalForward LogLevel LogVerbose MACs
    Match NoHostAuthenticationForLocalhost NumberOfPasswordPrompts ObscureKeystrokeTiming PKCS11Provider
    PasswordAuthentication PermitLocalCommand PermitRemoteOpen Port PreferredAuthentications ProxyCommand
    ProxyJump ProxyUseFdpass PubkeyAcceptedAlgorithms PubkeyAuthentication RekeyLimit RemoteCommand
    RemoteForward RequestTTY RequiredRSASize RevokedHostKeys SecurityKeyProvider SendEnv ServerAliveCountMax
    ServerAliveInterval SessionType SetEnv StdinNull StreamLocalBindMask StreamLocalBindUnlink
    StrictHostKeyChecking SyslogFacility TCPKeepAlive Tag Tunnel TunnelDevice UpdateHostKeys User
    UserKnownHostsFile VerifyHostKeyDNS VisualHostKey XAuthLocation
""".split()}

# Refused whatever the configuration says: each runs a local command, loads code, reads
# another configuration, opens a socket or port on the Barman host, or lends it to the target.
NEVER = {k.lower(): why for why, keys in {
    "runs a local command": "ProxyCommand LocalCommand PermitLocalCommand KnownHostsCommand ProxyJump "
                            "RemoteCommand XAuthLocation ForwardX11 ForwardX11Trusted ProxyUseFdpass",
    "loads a library into ssh": "PKCS11Provider SecurityKeyProvider",
    "reads another ssh configuration": "Include Match Host",
    "creates or uses a local socket": "ControlMaster ControlPath ControlPersist IdentityAgent StreamLocalBindUnlink",
    "forwards ports or the agent": "LocalForward RemoteForward DynamicForward Tunnel TunnelDevice ForwardAgent",
}.items() for k in keys.split()}

# Allowed by default, each with its value rule.
DEFAULT_OPTIONS = frozenset(k.lower() for k in (
    "Port", "User", "IdentityFile", "ConnectTimeout", "ServerAliveInterval", "ServerAliveCountMax",
    "BatchMode", "Compression"))
# Options naming a local file: only under the service user's ~/.ssh, known hosts files by name.
KEY_FILES = frozenset(k.lower() for k in ("IdentityFile", "CertificateFile", "RevokedHostKeys"))
KNOWN_HOSTS_FILES = frozenset(k.lower() for k in ("UserKnownHostsFile", "GlobalKnownHostsFile"))
KNOWN_HOSTS_NAME = re.compile(r"known_hosts[A-Za-z0-9._-]*")
ENABLEABLE = frozenset(KEYWORDS) - frozenset(NEVER)


@dataclass(frozen=True)
class SshCommand:
    """A command that passed the policy: its tokens and the host as the client typed it."""

    argv: Tuple[str, ...]
    host: str


@dataclass(frozen=True)
class SshTarget:
    """Where ssh says the command goes (`ssh -G`): the host policy and the claims start from it."""

    user: str
    host: str  # the resolved HostName
    port: int
    alias: str  # the host as typed
    address_family: str = "any"  # ssh's AddressFamily: any, inet or inet6


def _refuse(detail: str) -> InvalidRequest:
    return InvalidRequest(f"field '{FIELD}' is not allowed: {detail}")


def option_names(raw: str, where: str) -> Tuple[str, ...]:
    """The `ssh_options` setting: names an operator may enable, canonically spelt; ValueError otherwise."""
    names = []
    for name in raw.replace(",", " ").split():
        canonical = KEYWORDS.get(name.lower())
        if canonical is None:
            raise ValueError(f"{where}: ssh_options: {name!r} is not an ssh_config option")
        if name.lower() in NEVER:
            raise ValueError(f"{where}: ssh_options: {canonical} can never be enabled ({NEVER[name.lower()]})")
        names.append(canonical)
    return tuple(names)


def ssh_dir() -> str:
    """The service user's ~/.ssh: the only place file options may point to."""
    return os.path.normpath(os.path.expanduser("~/.ssh"))


def _under_ssh_dir(value: str) -> bool:
    base = ssh_dir()
    inside = value == os.path.normpath(value) and value.startswith(base + "/")
    # A symbolic link in ~/.ssh must not lead out of it either.
    real = os.path.realpath(value)
    return inside and real.startswith(os.path.realpath(base) + "/")


def _number(low: int, high: int) -> Callable[[str, str], None]:
    def check(name: str, value: str) -> None:
        if not value.isdigit() or not low <= int(value) <= high:
            raise _refuse(f"{name} {value!r} must be a number from {low} to {high}")
    return check


def _one_of(*choices: str) -> Callable[[str, str], None]:
    def check(name: str, value: str) -> None:
        if value.lower() not in choices:
            raise _refuse(f"{name} {value!r} must be {' or '.join(choices)}")
    return check


def _user(name: str, value: str) -> None:
    if not USER.fullmatch(value):
        raise _refuse(f"{name} {value!r} is not a valid user name")


def _key_file(name: str, value: str) -> None:
    if not _under_ssh_dir(value):
        raise _refuse(f"{name} {value!r} must be a normalised absolute path under {ssh_dir()}/")


def _known_hosts_file(name: str, value: str) -> None:
    if not _under_ssh_dir(value) or not KNOWN_HOSTS_NAME.fullmatch(os.path.basename(value)):
        raise _refuse(f"{name} {value!r} must be a file named known_hosts* under {ssh_dir()}/ "
                      "(ssh writes host keys to it)")


VALUE_RULES: Dict[str, Callable[[str, str], None]] = {
    "port": _number(1, 65535),
    "user": _user,
    "connecttimeout": _number(1, 3600),
    "serveraliveinterval": _number(0, 3600),
    "serveralivecountmax": _number(0, 100),
    "batchmode": _one_of("yes"),  # `no` would let ssh wait for a password nobody types
    "compression": _one_of("yes", "no"),
    **{key: _key_file for key in KEY_FILES},
    **{key: _known_hosts_file for key in KNOWN_HOSTS_FILES},
}


def check_format(value: Any) -> SshCommand:
    """The request schema's check: syntax and the never-allowed options; the server's policy comes later."""
    return parse(value, ENABLEABLE)


def parse(command: Any, enabled: Iterable[str] = ()) -> SshCommand:
    """Check *command* against the default allowlist plus the *enabled* `-o` option names."""
    if not isinstance(command, str):
        raise _refuse(f"it must be a string, not {type(command).__name__}")
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
    allowed = DEFAULT_OPTIONS | {name.lower() for name in enabled}

    destination: Optional[str] = None
    rest = tokens[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        if destination is not None:
            raise _refuse(f"token {token!r} after the host: a remote command, option or second host is not allowed")
        if not token.startswith("-"):
            destination = token
            i += 1
            continue
        letters = token[1:]
        if letters and all(c in FLAGS for c in letters):
            i += 1
            continue
        flag = letters[:1]
        if flag not in OPTIONS_WITH_VALUE:
            raise _refuse(f"option {token!r} is not one of -p -l -i -o -q -C -4 -6 -T")
        value = letters[1:] or (rest[i + 1] if i + 1 < len(rest) else None)
        if value is None:
            raise _refuse(f"option {token!r} needs a value")
        i += 1 if letters[1:] else 2
        option = OPTIONS_WITH_VALUE[flag]
        if option is None:
            _check_option(value, allowed)
        else:
            VALUE_RULES[option.lower()](f"-{flag}", value)
    if destination is None:
        raise _refuse("it names no host ([user@]host)")
    login, at, host = destination.rpartition("@")
    if at:
        _user("user", login)
    if not HOST.fullmatch(host):
        raise _refuse(f"host {host!r} is not a host name or address")
    return SshCommand(tuple(tokens), host)


def _check_option(value: str, allowed: FrozenSet[str]) -> None:
    key, sep, setting = value.partition("=")
    if not sep or not setting:
        raise _refuse(f"option -o {value!r} must be written Key=Value")
    name = key.lower()
    canonical = KEYWORDS.get(name)
    if canonical is None:
        raise _refuse(f"{key!r} in -o {value!r} is not an ssh option")
    if name in NEVER:
        raise _refuse(f"ssh option {canonical!r} is never allowed ({NEVER[name]})")
    if name not in allowed:
        raise _refuse(f"ssh option {canonical!r} is not allowed: the default ones are "
                      f"{', '.join(sorted(KEYWORDS[k] for k in DEFAULT_OPTIONS))}; "
                      "others only when the service's ssh_options setting names them")
    rule = VALUE_RULES.get(name)
    if rule is not None:
        rule(canonical, setting)


# `ssh -G` answers, reused while the files ssh reads its configuration from are unchanged and for
# at most RESOLVE_REUSE seconds (a file pulled in with `Include` from elsewhere is not watched:
# the time bound limits how long such an edit goes unseen). Each answer costs a process, about a
# third of an accepted POST.
RESOLVE_REUSE = 60.0
RESOLVE_CACHE_SIZE = 256
_resolved: Dict[Tuple[str, ...], Tuple[float, Tuple[Any, ...], "SshTarget"]] = {}
_resolved_lock = threading.Lock()


def _ssh_config_stamp() -> Tuple[Any, ...]:
    """What identifies the ssh configuration files as they are now: names, mtimes, ctimes and sizes."""
    try:
        home = pwd.getpwuid(os.geteuid()).pw_dir  # ssh reads ~/.ssh/config of the passwd home, not $HOME
    except KeyError:
        home = os.path.expanduser("~")
    paths = [os.path.join(home, ".ssh", "config"), "/etc/ssh/ssh_config", "/etc/ssh/ssh_config.d"]
    try:
        paths += sorted(e.path for e in os.scandir("/etc/ssh/ssh_config.d"))
    except OSError:
        pass
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp.append((path, st.st_mtime_ns, st.st_ctime_ns, st.st_size))
        except OSError:
            stamp.append((path, None))
    return tuple(stamp)


def resolve(command: SshCommand) -> SshTarget:
    """The user, host and port ssh would use, from `ssh -G` with the same arguments (no connection)."""
    key, now, stamp = tuple(command.argv), time.monotonic(), _ssh_config_stamp()
    reused = _resolved.get(key)
    if reused is not None and reused[1] == stamp and now - reused[0] < RESOLVE_REUSE:
        return reused[2]
    target = _run_ssh_g(command)
    with _resolved_lock:
        if len(_resolved) >= RESOLVE_CACHE_SIZE:
            _resolved.clear()
        _resolved[key] = (now, stamp, target)
    return target


def _run_ssh_g(command: SshCommand) -> SshTarget:
    argv = [command.argv[0], "-G", *command.argv[1:]]
    try:
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=RESOLVE_TIMEOUT, shell=False)
    except FileNotFoundError:
        raise _refuse(f"{command.argv[0]!r} is not installed on the Barman host") from None
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ApiError(f"cannot resolve field '{FIELD}' with `ssh -G`: {exc}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split())[:500] or f"exit status {done.returncode}"
        raise _refuse(f"ssh refuses it: {message}")
    resolved: Dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition(" ")
        if key in ("user", "hostname", "port", "addressfamily") and key not in resolved:
            resolved[key] = value.strip()
    if not resolved.get("hostname") or not resolved.get("port", "").isdigit():
        raise ApiError(f"cannot resolve field '{FIELD}': `ssh -G` printed no hostname and port")
    return SshTarget(resolved.get("user", ""), canonical_host(resolved["hostname"]), int(resolved["port"]),
                     command.host, resolved.get("addressfamily", "any"))


def canonical_host(host: str) -> str:
    """One spelling per host name or address, so that two spellings share one claim."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")



# getaddrinfo's family for each of ssh's AddressFamily values (ssh asks getaddrinfo the same way).
FAMILIES = {"any": socket.AF_UNSPEC, "inet": socket.AF_INET, "inet6": socket.AF_INET6}
# Every loopback address reaches the Barman host itself, however it is spelt: one target.
LOOPBACK = "127.0.0.1"


def canonical_address(text: str) -> str:
    """One spelling per address (ValueError if *text* is none): an IPv4-mapped IPv6 address is its IPv4
    address (the kernel connects it over IPv4), IPv6 compressed and lower-case, any loopback address 127.0.0.1."""
    address = ipaddress.ip_address(text)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return LOOPBACK if address.is_loopback else str(address)


def addresses_of(host: str, port: int, family: str) -> List[str]:
    """The addresses getaddrinfo gives for *host*, asked as ssh asks; socket.gaierror if there are none."""
    found = socket.getaddrinfo(host, port, FAMILIES.get(family, socket.AF_UNSPEC), socket.SOCK_STREAM)
    return [str(sockaddr[0]).split("%", 1)[0] for _, _, _, _, sockaddr in found]


def connect_address(target: SshTarget) -> str:
    """The address ssh connects to for *target*, canonical: what claims and host slots are keyed on.

    A name with several addresses is keyed on the lowest of them (IPv4 first), whatever order the
    resolver answers in. A name that does not resolve is a 422 (ssh could not connect either); an
    unspecified address (`0`, `0.0.0.0`, `::`), which connects to the Barman host itself, is refused (400).
    """
    try:
        found = addresses_of(target.host, target.port, target.address_family)
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, socket.gaierror) else str(exc)
        raise Unprocessable(f"field '{FIELD}': host '{target.host}' does not resolve ({why}): "
                            "ssh could not connect to it") from None
    addresses = set()
    for text in found:
        try:
            address = canonical_address(text)
        except ValueError:
            continue  # not an IPv4 or IPv6 address: ssh does not connect over it
        if ipaddress.ip_address(address).is_unspecified:
            raise _refuse(f"host '{target.alias}' is the unspecified address {address}, which connects to the "
                          "Barman host itself: name the target host")
        addresses.add(address)
    if not addresses:
        raise Unprocessable(f"field '{FIELD}': host '{target.host}' has no IPv4 or IPv6 address: "
                            "ssh could not connect to it")
    return min(addresses, key=lambda a: (ipaddress.ip_address(a).version, ipaddress.ip_address(a)))


def endpoint(address: str, port: int) -> str:
    """`address:port`, an IPv6 address in brackets: the target one recovery per destination is keyed on."""
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
