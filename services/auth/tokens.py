"""Access tokens: HS256 JWTs signed with the server's key, issued by the token endpoint and
verified by every service that accepts them (import this module, not the FHIR API).

The key is ``jwt_secret`` when configured, or a key file created on first start.
"""

from __future__ import annotations

import logging
import os
import secrets
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt

from services.auth.scopes import AuthError, Grant, Scope, parse_scopes

log = logging.getLogger(__name__)

#: ``iss`` and ``aud`` of the tokens issued and accepted (the value predates this package).
TOKEN_ISSUER = "scanwatch-fhir-api"
TOKEN_AUDIENCE = "scanwatch-fhir-api"
JWT_ALGORITHM = "HS256"
#: Smallest signing key accepted (bytes): HS256 needs at least the hash's size.
MIN_KEY_BYTES = 32


def _now() -> datetime:
    return datetime.now(UTC)


def load_signing_key(secret: str | None, key_file: Path) -> bytes:
    """The HS256 key: ``secret`` when given, else the key file (created, mode 0600, if absent)."""
    if secret:
        key = secret.encode()
    else:
        if not key_file.exists():
            key_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(48))
            log.info("created a new token signing key", extra={"path": str(key_file)})
        key = key_file.read_text().strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"the token signing key must have at least {MIN_KEY_BYTES} bytes")
    return key


@dataclass
class TokenService:
    """Issues and verifies access tokens."""

    key: bytes
    lifetime: timedelta = timedelta(minutes=15)
    clock: Callable[[], datetime] = field(default=_now)

    def issue(
        self,
        client_id: str,
        scopes: Iterable[Scope],
        patient: str | None = None,
        lifetime: timedelta | None = None,
    ) -> tuple[str, int]:
        """(token, seconds until it expires)."""
        now = self.clock()
        ttl = lifetime or self.lifetime
        claims: dict[str, Any] = {
            "iss": TOKEN_ISSUER,
            "aud": TOKEN_AUDIENCE,
            "sub": client_id,
            "iat": int(now.timestamp()),
            "exp": int((now + ttl).timestamp()),
            "jti": uuid.uuid4().hex,
            "scope": " ".join(str(s) for s in scopes),
        }
        if patient:
            claims["patient"] = patient
        return jwt.encode(claims, self.key, algorithm=JWT_ALGORITHM), int(ttl.total_seconds())

    def verify(self, token: str) -> Grant:
        """The grant of a valid token; :class:`AuthError` 401 otherwise."""
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[JWT_ALGORITHM],
                audience=TOKEN_AUDIENCE,
                issuer=TOKEN_ISSUER,
                options={"require": ["exp", "iat", "sub", "scope"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthError(401, "the access token has expired") from exc
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"the access token is not valid ({type(exc).__name__})") from exc
        try:
            scopes = parse_scopes(str(claims["scope"]))
        except ValueError as exc:
            raise AuthError(401, str(exc)) from exc
        return Grant(str(claims["sub"]), scopes, claims.get("patient"), claims.get("jti"))


def bearer_token(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; :class:`AuthError` 401."""
    if not authorization:
        raise AuthError(401, "a bearer access token is required (Authorization: Bearer ...)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <access token>'")
    return token.strip()
