"""Optional bearer tokens, stored hashed, each with a scope; and who a request comes from.

Tokens are 32 random bytes, so a plain SHA-256 of them cannot be brute-forced: no slow
password hash is needed, and a lookup costs one hash.

A client certificate is verified by the reverse proxy, which passes its subject in
CLIENT_CERT_HEADER. The service listens on loopback, where any local user can connect too, so
the subject counts only on a request that also carries the proxy's secret (PROXY_SECRET_HEADER,
compared in constant time with the `proxy_secret_file` the proxy's configuration was made with).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Dict, List, Mapping, Optional, Tuple

from pg_backup_api.core.errors import ApiError
from pg_backup_api.core.model import now_utc, timestamp
from pg_backup_api.core.records import write_json_atomic, write_text_atomic
from pg_backup_api.core.reloading import Reloading

log = logging.getLogger(__name__)

SCOPES = ("read", "operate", "admin")  # each includes the ones before it
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TOKEN_PREFIX = "pgba_"


class Unauthorized(ApiError):
    status = 401


class Forbidden(ApiError):
    status = 403


@dataclass(frozen=True)
class Token:
    name: str
    scope: str
    sha256: str
    created: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def allows(scope: str, needed: str) -> bool:
    return SCOPES.index(scope) >= SCOPES.index(needed)


def _file_stamp(path: Path) -> Optional[Tuple[int, int, int, int]]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size


class TokenFile:
    """The tokens file, re-read when it changes on disk (a `token create` needs no restart)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._tokens: Reloading[Dict[str, Token]] = Reloading(self._read, lambda _: self._stamp())

    def _stamp(self) -> Optional[Tuple[int, int, int, int]]:
        return _file_stamp(self.path)

    def tokens(self) -> Dict[str, Token]:
        return self._tokens.get()

    def _read(self) -> Dict[str, Token]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise ApiError(f"the tokens file {self.path} cannot be read: {exc}") from None
        return {t["sha256"]: Token(t["name"], t["scope"], t["sha256"], t.get("created", ""))
                for t in data.get("tokens", [])}

    def check(self, header: Optional[str], needed: str) -> Token:
        """The token an `Authorization: Bearer ...` header carries, if its scope allows *needed*."""
        if not header or not header.startswith("Bearer "):
            raise Unauthorized("authentication required: send Authorization: Bearer <token>")
        digest = _digest(header[len("Bearer "):].strip())
        token = next((t for d, t in self.tokens().items() if hmac.compare_digest(d, digest)), None)
        if token is None:
            raise Unauthorized("the bearer token is not valid")
        if not allows(token.scope, needed):
            raise Forbidden(f"token '{token.name}' has scope '{token.scope}'; this request needs '{needed}'")
        return token

    def create(self, name: str, scope: str) -> str:
        """Add a token and return its secret, which is stored nowhere (only its hash is)."""
        if not NAME.fullmatch(name):
            raise ValueError(f"token name {name!r}: use letters, digits and ._- (at most 64)")
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        tokens = list(self._read().values())
        if any(t.name == name for t in tokens):
            raise ValueError(f"a token named {name!r} exists already; revoke it first")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        tokens.append(Token(name, scope, _digest(secret), timestamp(now_utc())))
        self._write(tokens)
        return secret

    def revoke(self, name: str) -> bool:
        tokens = list(self._read().values())
        kept = [t for t in tokens if t.name != name]
        self._write(kept)
        return len(kept) != len(tokens)

    def list(self) -> List[Token]:
        return sorted(self._read().values(), key=lambda t: t.name)

    def _write(self, tokens: List[Token]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"tokens": [t.__dict__ for t in tokens]}
        write_json_atomic(self.path, doc, exclusive=False, mode=0o600)


# -- who a request comes from ---------------------------------------------------------------

CLIENT_CERT_HEADER = "X-Client-Cert-Subject"
PROXY_SECRET_HEADER = "X-Pg-Backup-Api-Proxy-Secret"
MIN_PROXY_SECRET_CHARS = 32
# Control characters (C0, DEL, C1): a subject is stored and shown without them.
CONTROL_CHARACTERS = re.compile("[\x00-\x1f\x7f-\x9f]")


class ProxySecret:
    """The secret a reverse proxy sends to vouch for a client certificate; read from *path* and read
    again when the file changes. No file, an unreadable or a short one: no request is vouched for."""

    def __init__(self, path: Optional[str]) -> None:
        self.path = Path(path) if path else None
        self._secret: Reloading[bytes] = Reloading(self._read, lambda _: self._stamp())

    def _stamp(self) -> Optional[Tuple[int, int, int, int]]:
        if self.path is None:
            return None
        try:
            return _file_stamp(self.path)
        except OSError as exc:  # a directory on the way not searchable: _read says why, once
            return (-1, exc.errno or 0, 0, 0)

    def _read(self) -> bytes:
        if self.path is None:
            return b""
        ignored = f"{CLIENT_CERT_HEADER} is ignored until it is fixed (pg-backup-api proxy-secret makes it)"
        try:
            secret = self.path.read_text().strip()
        except FileNotFoundError:
            log.warning("proxy_secret_file %s does not exist: %s", self.path, ignored)
            return b""
        except (OSError, UnicodeDecodeError) as exc:
            log.error("proxy_secret_file %s cannot be read (%s): %s", self.path, exc, ignored)
            return b""
        if len(secret) < MIN_PROXY_SECRET_CHARS or not secret.isascii() or not secret.isprintable():
            log.error("proxy_secret_file %s must hold one line of at least %d printable ASCII characters: %s",
                      self.path, MIN_PROXY_SECRET_CHARS, ignored)
            return b""
        return secret.encode()

    def vouches(self, sent: Optional[str]) -> bool:
        """Whether *sent* (the request's PROXY_SECRET_HEADER) is the secret; constant time."""
        if sent is None:
            return False
        secret = self._secret.get()
        # A WSGI header is text decoded as latin-1: encoded back, it is the bytes the proxy sent.
        return bool(secret) and hmac.compare_digest(secret, sent.encode("latin-1", errors="replace"))


def vouched_subject(remote_addr: Optional[str], headers: Mapping[str, str], trusted_proxies: Collection[str],
                    secret: ProxySecret) -> Optional[str]:
    """The client-certificate subject a trusted proxy verified, without control characters; None when
    the request does not come from a trusted address with the proxy's secret."""
    subject = headers.get(CLIENT_CERT_HEADER)
    if not subject or remote_addr not in trusted_proxies or not secret.vouches(headers.get(PROXY_SECRET_HEADER)):
        return None
    # Apache sends the subject in UTF-8; WSGI hands it over decoded as latin-1.
    text = subject.encode("latin-1", errors="replace").decode("utf-8", errors="replace")
    return CONTROL_CHARACTERS.sub("", text).strip() or None


def write_proxy_secret(secret_file: Path, apache_include: Path, group: int) -> None:
    """A new secret: in *secret_file* (mode 0640, readable by *group*, the service's) and in
    *apache_include* (mode 0600, for Apache, which reads its configuration as root)."""
    secret = secrets.token_urlsafe(48)
    for path in (secret_file, apache_include):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(apache_include, (
        "# Made by `pg-backup-api proxy-secret`: the secret with which this proxy vouches for the client\n"
        f"# certificate it verified ({CLIENT_CERT_HEADER}). Run the command again to change it.\n"
        f'RequestHeader set {PROXY_SECRET_HEADER} "{secret}"\n'), mode=0o600)
    write_text_atomic(secret_file, secret + "\n", mode=0o640, group=group)
