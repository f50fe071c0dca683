"""Registered clients: the backend services (an EHR, the pipeline, the portal) that may ask
the token endpoint for tokens, and the scopes each may be granted.

Client secrets are random 256-bit values; only their SHA-256 is stored (a high-entropy secret
needs no slow hash). The ``oauth_client`` table lives in the database it is given (today the
FHIR store's, whose migrations create it).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from datetime import UTC, datetime

from sqlalchemy import DateTime, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from scanwatch.database import for_writes
from services.auth.scopes import Scope, parse_scopes

log = logging.getLogger(__name__)

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,100}$")


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
    """Register (or re-register, replacing the secret) a client; returns its secret.

    It reads the client, then writes it, so its transaction takes the write lock when it begins
    (:func:`scanwatch.database.for_writes`): on SQLite a deferred one fails with "database is
    locked" when another writer (the FHIR API's notifier) committed in between."""
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
    """The active client with this id and secret, or None."""
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
        return list(session.exec(select(OAuthClient).order_by(col(OAuthClient.client_id))).all())


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
