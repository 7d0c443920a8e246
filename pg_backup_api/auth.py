"""Optional bearer tokens, stored hashed, each with a scope; and who a request comes from.

Tokens are 32 random bytes, so a plain SHA-256 of them cannot be brute-forced: no slow
password hash is needed, and a lookup costs one hash.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from pg_backup_api.errors import ApiError
from pg_backup_api.operations import now_utc, timestamp
from pg_backup_api.records import write_json_atomic
from pg_backup_api.reloading import Reloading

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


class TokenFile:
    """The tokens file, re-read when it changes on disk (a `token create` needs no restart)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._tokens: Reloading[Dict[str, Token]] = Reloading(self._read, lambda _: self._stamp())

    def _stamp(self) -> Optional[Tuple[int, int, int, int]]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size

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
