"""Registered clients: the backend services (an EHR, the pipeline) that ask the token
endpoint for tokens with their own credentials (client credentials grant), and the SMART apps
(the patient portal) that sign patients in (authorization code grant with PKCE, refresh
tokens): the scopes each may be granted, its redirect URIs, its grant types, and whether it
is public (no secret: PKCE alone binds its code) or confidential.

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
from collections.abc import Sequence
from datetime import UTC, datetime
from urllib.parse import urlsplit

from sqlalchemy import DateTime, Text
from sqlalchemy.engine import Engine
from sqlmodel import Field, Session, SQLModel, col, select

from scanwatch.database import for_writes
from scanwatch.network import is_loopback
from services.auth.scopes import NON_RESOURCE_SCOPES, ROLE_SCOPES, Scope, parse_scopes

log = logging.getLogger(__name__)

_CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9._-]{3,100}$")
CLIENT_CREDENTIALS = "client_credentials"
AUTHORIZATION_CODE = "authorization_code"
REFRESH_TOKEN = "refresh_token"
#: What a SMART patient app (the portal) may be granted: the patient's own records, its
#: callback request (the chatbot asks for one with the patient's token), the patient context,
#: OpenID Connect with fhirUser, and refresh tokens.
SMART_APP_SCOPES = (
    "launch/patient openid fhirUser offline_access patient/*.read "
    "patient/CommunicationRequest.write"
)
#: What a staff app (the console) may be granted: OpenID Connect, refresh tokens, and every
#: ``user/`` scope of a staff role; each sign-in gets only those of the account's role.
STAFF_APP_SCOPES = " ".join(
    dict.fromkeys(
        ["openid", "fhirUser", "offline_access", *(s for v in ROLE_SCOPES.values() for s in v)]
    )
)


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
    redirect_uris: str = Field(
        default="", sa_type=Text, description="space-separated; matched exactly"
    )
    grant_types: str = Field(
        default=CLIENT_CREDENTIALS, sa_type=Text, description="space-separated"
    )
    public: bool = Field(default=False, description="no secret (token endpoint auth: none)")

    @property
    def redirect_uri_list(self) -> list[str]:
        return self.redirect_uris.split()

    @property
    def grant_type_list(self) -> list[str]:
        return self.grant_types.split()


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
        client.redirect_uris = ""
        client.grant_types = CLIENT_CREDENTIALS
        client.public = False
        session.add(client)
        session.commit()
    log.info("client registered", extra={"client_id": client_id, "scopes": scopes})
    return secret


def _check_redirect_uri(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.fragment:
        raise ValueError(f"a redirect URI is an absolute http(s) URL without a fragment: {uri!r}")
    if parts.scheme == "http" and not is_loopback(parts.hostname):
        raise ValueError(f"a redirect URI off loopback must be https: {uri!r}")
    return uri


def register_app(
    engine: Engine,
    client_id: str,
    redirect_uris: Sequence[str],
    scopes: str = SMART_APP_SCOPES,
    *,
    confidential: bool = False,
    description: str | None = None,
    secret: str | None = None,
) -> str | None:
    """Register (or re-register) a SMART app that signs patients in: the authorization code
    grant (PKCE S256 always) and refresh tokens, sent back only to ``redirect_uris`` (exact
    match; https, or http on loopback). A public app (the default) has no secret; a
    ``confidential`` one gets one, returned (given or made), and must authenticate at the
    token endpoint (client_secret_basic or client_secret_post). Returns the secret or None."""
    if not _CLIENT_ID_RE.match(client_id):
        raise ValueError("client_id must be 3-100 characters of letters, digits, '.', '_', '-'")
    uris = [_check_redirect_uri(u) for u in redirect_uris]
    if not uris:
        raise ValueError("a SMART app needs at least one redirect URI")
    items = scopes.split()
    resource = parse_scopes(scopes)  # ValueError on a malformed one
    if not resource or any(s.context != "patient" for s in resource):
        raise ValueError("a SMART patient app is granted patient/ scopes (and only those)")
    unknown = [i for i in items if "/" not in i and i not in NON_RESOURCE_SCOPES]
    if unknown or "launch/patient" not in items:
        raise ValueError(f"unknown scopes {unknown}; a patient app needs launch/patient")
    return _save_app(engine, client_id, uris, items, confidential, description, secret)


def register_staff_app(
    engine: Engine,
    client_id: str,
    redirect_uris: Sequence[str],
    *,
    description: str | None = None,
    secret: str | None = None,
) -> str:
    """Register (or re-register) a confidential app that signs staff in (the console): the
    authorization code grant with PKCE and OpenID Connect, refresh tokens, the
    :data:`STAFF_APP_SCOPES`; its secret (given or made) is returned."""
    if not _CLIENT_ID_RE.match(client_id):
        raise ValueError("client_id must be 3-100 characters of letters, digits, '.', '_', '-'")
    uris = [_check_redirect_uri(u) for u in redirect_uris]
    if not uris:
        raise ValueError("a staff app needs at least one redirect URI")
    saved = _save_app(engine, client_id, uris, STAFF_APP_SCOPES.split(), True, description, secret)
    assert saved is not None
    return saved


def _save_app(
    engine: Engine,
    client_id: str,
    uris: list[str],
    items: list[str],
    confidential: bool,
    description: str | None,
    secret: str | None,
) -> str | None:
    if confidential:
        secret = secret or secrets.token_urlsafe(32)
    elif secret:
        raise ValueError("a public app has no secret")
    with Session(for_writes(engine)) as session:
        client = session.get(OAuthClient, client_id) or OAuthClient(
            client_id=client_id, secret_sha256="", scopes="", created=datetime.now(UTC)
        )
        client.secret_sha256 = _digest(secret) if secret else ""
        client.scopes = " ".join(dict.fromkeys(items))
        client.patient = None
        client.description = description
        client.active = True
        client.redirect_uris = " ".join(uris)
        client.grant_types = f"{AUTHORIZATION_CODE} {REFRESH_TOKEN}"
        client.public = not confidential
        session.add(client)
        session.commit()
    log.info(
        "app registered",
        extra={"client_id": client_id, "public": not confidential, "redirect_uris": uris},
    )
    return secret


def get_client(engine: Engine, client_id: str) -> OAuthClient | None:
    """The active client ``client_id``, or None."""
    with Session(engine) as session:
        client = session.get(OAuthClient, client_id)
    return client if client is not None and client.active else None


def authenticate_client(engine: Engine, client_id: str, secret: str) -> OAuthClient | None:
    """The active client with this id and secret, or None."""
    with Session(engine) as session:
        client = session.get(OAuthClient, client_id)
    if client is None or not client.active or not client.secret_sha256:
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
