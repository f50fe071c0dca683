"""Authorization: SMART-style scopes carried by bearer JWTs, registered clients, the token
endpoint (OAuth 2.0 client credentials) and the audit trail of reads.

Scopes follow SMART App Launch v1: ``<context>/<resourceType|*>.<read|write|*>`` with context
``system`` (a backend: the EHR, the pipeline) or ``patient`` (bound to one Patient by the
token's ``patient`` claim: the chatbot, the patient page). A ``patient`` scope never reaches
outside that patient's compartment.

Tokens are HS256 JWTs signed with the server's key (``jwt_secret``, or the key file created on
first start). Client secrets are random 256-bit values; only their SHA-256 is stored (a
high-entropy secret needs no slow hash).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from sqlalchemy import DateTime, Index, Text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Field, Session, SQLModel, select

from services.fhir_api.store import for_writes

log = logging.getLogger(__name__)
audit_log = logging.getLogger("scanwatch.fhir.audit")

#: ``iss`` and ``aud`` of the tokens this server issues and accepts.
TOKEN_ISSUER = "scanwatch-fhir-api"
TOKEN_AUDIENCE = "scanwatch-fhir-api"
JWT_ALGORITHM = "HS256"
#: Smallest signing key accepted (bytes): HS256 needs at least the hash's size.
MIN_KEY_BYTES = 32
READ = "read"
WRITE = "write"
CONTEXTS = ("system", "patient", "user")
_SCOPE_RE = re.compile(r"^(system|patient|user)/(\*|[A-Z][A-Za-z]+)\.(read|write|\*)$")
#: Scopes that are not resource access (accepted in requests, never required).
NON_RESOURCE_SCOPES = frozenset({"launch/patient", "openid", "fhirUser", "offline_access"})


class AuthError(Exception):
    """401 (``invalid_token``) or 403 (``insufficient_scope``)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    @property
    def www_authenticate(self) -> str:
        error = "insufficient_scope" if self.status == 403 else "invalid_token"
        return f'Bearer realm="scanwatch", error="{error}"'


@dataclass(frozen=True)
class Scope:
    """One resource scope: ``context/resource_type.access``."""

    context: str
    resource_type: str  # a type or "*"
    access: str  # read, write or *

    @classmethod
    def parse(cls, text: str) -> Scope:
        match = _SCOPE_RE.match(text)
        if match is None:
            raise ValueError(
                f"{text!r} is not a scope of the form <system|patient|user>/<Type|*>.<read|write|*>"
            )
        return cls(*match.groups())

    def allows(self, resource_type: str, access: str) -> bool:
        return self.resource_type in ("*", resource_type) and self.access in ("*", access)

    def __str__(self) -> str:
        return f"{self.context}/{self.resource_type}.{self.access}"


def parse_scopes(text: str) -> tuple[Scope, ...]:
    """The resource scopes of a space-separated scope string (non-resource scopes skipped)."""
    return tuple(
        Scope.parse(item) for item in text.split() if item and item not in NON_RESOURCE_SCOPES
    )


@dataclass(frozen=True)
class Grant:
    """What the bearer of a verified token may do."""

    client_id: str
    scopes: tuple[Scope, ...]
    patient: str | None = None  # the Patient id patient/ scopes are bound to
    token_id: str | None = None

    def allows(self, resource_type: str, access: str) -> bool:
        return any(s.allows(resource_type, access) for s in self.usable_scopes)

    @property
    def usable_scopes(self) -> tuple[Scope, ...]:
        # A patient/ scope without a patient to bind it to grants nothing.
        return tuple(s for s in self.scopes if s.context != "patient" or self.patient)

    def patient_bound(self, resource_type: str, access: str) -> bool:
        """Whether access to ``resource_type`` is limited to :attr:`patient`'s compartment
        (only patient/ scopes allow it)."""
        return not any(
            s.allows(resource_type, access) for s in self.usable_scopes if s.context != "patient"
        )

    def require(self, resource_type: str, access: str) -> None:
        if not self.allows(resource_type, access):
            raise AuthError(
                403, f"the token's scopes do not allow {access} access to {resource_type}"
            )


#: The grant used when authorization is off (development on loopback only).
OPEN_GRANT = Grant("anonymous", (Scope("system", "*", "*"),))


# --- Keys and tokens -------------------------------------------------------------------------


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
    clock: Any = field(default=lambda: datetime.now(UTC))

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
    if not authorization:
        raise AuthError(401, "a bearer access token is required (Authorization: Bearer ...)")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError(401, "the Authorization header must be 'Bearer <access token>'")
    return token.strip()


# --- Registered clients ----------------------------------------------------------------------


class OAuthClient(SQLModel, table=True):
    """A registered client (backend service) that may ask the token endpoint for tokens."""

    __tablename__ = "oauth_client"

    client_id: str = Field(primary_key=True, max_length=100)
    secret_sha256: str = Field(max_length=64)
    scopes: str = Field(sa_type=Text, description="space-separated scopes it may be granted")
    patient: str | None = Field(default=None, max_length=64)
    description: str | None = Field(default=None, max_length=500)
    created: datetime = Field(sa_type=DateTime(timezone=True))
    active: bool = True


_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,100}$")


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def register_client(
    engine: Engine,
    client_id: str,
    scopes: str,
    patient: str | None = None,
    description: str | None = None,
    secret: str | None = None,
) -> str:
    """Register (or re-register, replacing the secret) a client; returns its secret."""
    if not _CLIENT_ID_RE.match(client_id):
        raise ValueError("client_id must be 3-100 characters of letters, digits, '.', '_', '-'")
    parsed = parse_scopes(scopes)
    if not parsed:
        raise ValueError("a client needs at least one resource scope")
    if any(s.context == "patient" for s in parsed) and not patient:
        raise ValueError("patient/ scopes need the Patient id the client is bound to")
    secret = secret or secrets.token_urlsafe(32)
    with Session(for_writes(engine)) as session:
        client = session.get(OAuthClient, client_id) or OAuthClient(
            client_id=client_id, secret_sha256="", scopes="", created=datetime.now(UTC)
        )
        client.secret_sha256 = _digest(secret)
        client.scopes = " ".join(str(s) for s in parsed)
        client.patient = patient
        client.description = description
        client.active = True
        session.add(client)
        session.commit()
    log.info("client registered", extra={"client_id": client_id, "scopes": scopes})
    return secret


def authenticate_client(engine: Engine, client_id: str, secret: str) -> OAuthClient | None:
    with Session(engine) as session:
        client = session.get(OAuthClient, client_id)
    if client is None or not client.active:
        _digest(secret)  # same work either way
        return None
    if not hmac.compare_digest(client.secret_sha256, _digest(secret)):
        return None
    return client


def list_clients(engine: Engine) -> list[OAuthClient]:
    with Session(engine) as session:
        return list(session.exec(select(OAuthClient).order_by(OAuthClient.client_id)).all())


def granted_scopes(client: OAuthClient, requested: str | None) -> tuple[Scope, ...]:
    """The scopes to put in a token: those requested that the client was registered with
    (each requested one must be covered), or all of them when none are requested."""
    allowed = parse_scopes(client.scopes)
    if not requested:
        return allowed
    wanted = parse_scopes(requested)
    for scope in wanted:
        if not any(
            a.context == scope.context
            and a.resource_type in ("*", scope.resource_type)
            and a.access in ("*", scope.access)
            for a in allowed
        ):
            raise ValueError(f"scope {scope} is not granted to this client")
    return wanted


def client_credentials(authorization: str | None, form: dict[str, str]) -> tuple[str, str]:
    """(client_id, client_secret) from HTTP Basic (client_secret_basic) or the form
    (client_secret_post)."""
    if authorization and authorization.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(authorization[6:].strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError("malformed Basic credentials") from exc
        client_id, sep, secret = decoded.partition(":")
        if not sep:
            raise ValueError("malformed Basic credentials")
        return client_id, secret
    if form.get("client_id") and form.get("client_secret"):
        return form["client_id"], form["client_secret"]
    raise ValueError("client authentication is required")


# --- Audit -----------------------------------------------------------------------------------


class AuditEvent(SQLModel, table=True):
    """Who read what, when. No PHI: the client, the interaction, the resource type, logical ids
    (opaque UUIDs), the names (never the values) of the search parameters and the outcome."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_recorded", "recorded"),)

    pk: int | None = Field(default=None, primary_key=True)
    recorded: datetime = Field(sa_type=DateTime(timezone=True))
    client_id: str = Field(max_length=100)
    token_id: str | None = Field(default=None, max_length=64)
    interaction: str = Field(max_length=32)
    resource_type: str | None = Field(default=None, max_length=64)
    resource_id: str | None = Field(default=None, max_length=64)
    parameters: str | None = Field(default=None, max_length=500)
    status: int
    returned: int = 0


def record_audit(
    connection: Connection,
    grant: Grant,
    interaction: str,
    resource_type: str | None,
    resource_id: str | None,
    parameters: Iterable[str],
    status: int,
    returned: int,
) -> None:
    """Record one read in ``audit_event`` (committed before it returns) and the audit log.

    ``connection`` may be the one the read itself used (one pool checkout per request); a
    transaction it has open for the read is ended first, so the insert starts a short write
    transaction of its own (SQLite: never an upgrade of a read snapshot)."""
    names = ",".join(sorted(set(parameters)))[:500] or None
    audit_log.info(
        "fhir read",
        extra={
            "client_id": grant.client_id,
            "interaction": interaction,
            "resourceType": resource_type,
            "id": resource_id,
            "parameters": names,
            "status": status,
            "returned": returned,
        },
    )
    if connection.in_transaction():
        connection.rollback()
    connection.execute(
        _AUDIT_INSERT,
        {
            "recorded": datetime.now(UTC),
            "client_id": grant.client_id,
            "token_id": grant.token_id,
            "interaction": interaction,
            "resource_type": resource_type,
            "resource_id": resource_id,
            "parameters": names,
            "status": status,
            "returned": returned,
        },
    )
    connection.commit()


# A plain Core insert: no ORM object per read.
_AUDIT_INSERT = AuditEvent.__table__.insert()  # type: ignore[attr-defined]
