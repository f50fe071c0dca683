"""The SMART authorization server: Authlib's grants, configured, over scanwatch's tables.

- authorization code (:class:`CodeGrant`) with PKCE, S256 only and always
  (:class:`S256Challenge`), the SMART ``aud`` check (:class:`FhirAudience`) and OpenID Connect
  (:class:`SmartOpenIDCode`: an ES256 ``id_token`` with ``fhirUser``);
- refresh tokens (:class:`RefreshGrant`), rotated on every use;
- revocation (:class:`Revocation`, RFC 7009) of refresh tokens.

The same grants sign staff in to a staff app (the console, registered with ``user/`` scopes:
:func:`services.auth.clients.register_staff_app`): its access token names the staff account
in ``sub`` (a patient's names the app), carries ``roles`` and, for a clinician, ``fhirUser``
``Practitioner/<id>``, and only the ``user/`` scopes of the account's role
(:data:`services.auth.scopes.ROLE_SCOPES`), whatever the app asked for.

Access tokens are the project's ES256 JWTs (:meth:`services.auth.tokens.TokenService.issue`),
so every verifier (the FHIR API, the chatbot's channel through the JWKS) accepts them unchanged;
a patient account's token carries its Patient id in the ``patient`` claim.

Authlib has no FastAPI integration: :class:`SmartRequest` is the request Authlib reads (built by
the routes from a Starlette request whose body they have read), and
:meth:`SmartServer.handle_response` turns Authlib's (status, body, headers) into a Starlette
response. Authlib's calls are synchronous (they hit the database): the routes run them in a
worker thread.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from authlib.oauth2.rfc6749 import (
    AuthorizationCodeGrant,
    AuthorizationServer,
    ClientMixin,
    InvalidRequestError,
    OAuth2Payload,
    OAuth2Request,
    RefreshTokenGrant,
)
from authlib.oauth2.rfc7009 import RevocationEndpoint
from authlib.oauth2.rfc7636 import CodeChallenge
from authlib.oidc.core import UserInfo
from authlib.oidc.core.grants import OpenIDCode
from joserfc.jwk import ECKey
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.responses import JSONResponse, Response

from services.auth import accounts, store
from services.auth.accounts import User
from services.auth.clients import OAuthClient, get_client
from services.auth.config import AuthSettings
from services.auth.scopes import NON_RESOURCE_SCOPES, Scope, parse_scopes, role_scopes
from services.auth.tokens import JWT_ALGORITHM, TokenService

log = logging.getLogger(__name__)

#: Token endpoint authentication: confidential apps by secret, public apps by none (PKCE).
CLIENT_AUTH_METHODS = ["client_secret_basic", "client_secret_post", "none"]
#: Scopes a patient's sign-in may grant (the client's registration narrows them).
SUPPORTED_SCOPES = (
    "launch/patient",
    "openid",
    "fhirUser",
    "offline_access",
    "patient/*.read",
    "patient/CommunicationRequest.write",
)


def _now() -> datetime:
    return datetime.now(UTC)


class SmartPayload(OAuth2Payload):  # type: ignore[misc]
    """The parameters of a request (query and form together), every value kept."""

    def __init__(self, items: Iterable[tuple[str, str]]) -> None:
        self._datalist: defaultdict[str, list[str]] = defaultdict(list)
        for key, value in items:
            self._datalist[key].append(value)
        self._data = {key: values[0] for key, values in self._datalist.items()}

    @property
    def data(self) -> dict[str, str]:
        return self._data

    @property
    def datalist(self) -> defaultdict[str, list[str]]:
        return self._datalist


class SmartRequest(OAuth2Request):  # type: ignore[misc]
    """A request as Authlib reads it, made from a Starlette request whose body was read.

    ``uri`` is the public URL (the configured issuer's, else the request's): Authlib refuses
    plain http except on loopback. ``issuer`` and ``fhir_base`` travel with it for the
    id_token's ``iss`` and the SMART ``aud`` check."""

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Mapping[str, str],
        query: list[tuple[str, str]],
        form: list[tuple[str, str]],
        issuer: str,
        fhir_base: str,
    ) -> None:
        super().__init__(method, uri, headers=headers)
        self._args = dict(query)
        self._form = dict(form)
        self.payload = SmartPayload([*query, *form])
        self.issuer = issuer
        self.fhir_base = fhir_base

    @property
    def args(self) -> dict[str, str]:
        return self._args

    @property
    def form(self) -> dict[str, str]:
        return self._form


def _covered(scope: Scope, allowed: Iterable[Scope]) -> bool:
    return any(
        a.context == scope.context
        and a.resource_type in ("*", scope.resource_type)
        and a.access in ("*", scope.access)
        for a in allowed
    )


@dataclass
class AppClient(ClientMixin):  # type: ignore[misc]
    """A registered client as Authlib's grants ask about it."""

    row: OAuthClient

    @property
    def client_id(self) -> str:
        return self.row.client_id

    def get_client_id(self) -> str:
        return self.row.client_id

    @property
    def for_staff(self) -> bool:
        """Whether this app signs staff in (registered with ``user/`` scopes), not patients."""
        return any(s.context == "user" for s in parse_scopes(self.row.scopes))

    def get_default_redirect_uri(self) -> None:
        return None  # a SMART app names its redirect_uri in every request

    def get_allowed_scope(self, scope: str | None) -> str | None:
        """The requested scopes this client may have (requested ones outside its registration
        are left out, RFC 6749 §3.3); None (invalid_scope) when no resource scope remains."""
        registered = self.row.scopes.split()
        allowed = parse_scopes(self.row.scopes)
        kept: list[str] = []
        for item in (scope or "").split():
            if item in NON_RESOURCE_SCOPES:
                if item in registered:
                    kept.append(item)
                continue
            try:
                parsed = Scope.parse(item)
            except ValueError:
                continue
            context = "user" if self.for_staff else "patient"
            if parsed.context == context and _covered(parsed, allowed):
                kept.append(item)
        if not parse_scopes(" ".join(kept)):
            return None
        return " ".join(dict.fromkeys(kept))

    def check_redirect_uri(self, redirect_uri: str) -> bool:
        return redirect_uri in self.row.redirect_uri_list

    def check_client_secret(self, client_secret: str) -> bool:
        if self.row.public or not self.row.secret_sha256:
            return False
        return secrets.compare_digest(self.row.secret_sha256, store.digest(client_secret))

    def check_endpoint_auth_method(self, method: str, endpoint: str) -> bool:
        if self.row.public:
            return method == "none"
        return method in ("client_secret_basic", "client_secret_post")

    def check_response_type(self, response_type: str) -> bool:
        return response_type == "code" and "authorization_code" in self.row.grant_type_list

    def check_grant_type(self, grant_type: str) -> bool:
        return grant_type in self.row.grant_type_list


class S256Challenge(CodeChallenge):  # type: ignore[misc]
    """PKCE for every client, S256 only: a request without ``code_challenge``, or with
    ``plain`` or no method, is refused (Authlib's default accepts both, and neither)."""

    DEFAULT_CODE_CHALLENGE_METHOD = "S256"
    SUPPORTED_CODE_CHALLENGE_METHOD = ["S256"]

    def validate_code_challenge(self, grant: Any, redirect_uri: str) -> None:
        data = grant.request.payload.data
        if not data.get("code_challenge"):
            raise InvalidRequestError("PKCE is required: code_challenge is missing")
        if data.get("code_challenge_method") != "S256":
            raise InvalidRequestError("code_challenge_method must be S256 (plain is refused)")
        super().validate_code_challenge(grant, redirect_uri)


class FhirAudience:
    """SMART App Launch: the authorization request names the FHIR server the token is for
    (``aud``); it must be this server's FHIR base URL."""

    def __call__(self, grant: Any) -> None:
        grant.register_hook("after_validate_authorization_request_payload", self.validate)

    def validate(self, grant: Any, redirect_uri: str) -> None:
        request: SmartRequest = grant.request
        aud = request.payload.data.get("aud")
        if not aud:
            raise InvalidRequestError("aud is required: the FHIR base URL the app will use")
        if aud.rstrip("/") != request.fhir_base.rstrip("/"):
            raise InvalidRequestError(
                f"aud must be this server's FHIR base URL, {request.fhir_base}"
            )


class SmartOpenIDCode(OpenIDCode):  # type: ignore[misc]
    """``openid``: an id_token signed like the access tokens (ES256, the key set's ``kid``),
    ``iss`` the issuer URL, ``sub`` the account, ``fhirUser`` its Patient (scope fhirUser)."""

    def __init__(self, server: SmartServer) -> None:
        super().__init__(require_nonce=False)
        self.server = server

    def exists_nonce(self, nonce: str, request: SmartRequest) -> bool:
        with Session(self.server.engine) as session:
            found = session.exec(
                select(store.AuthorizationCode.code_sha256).where(
                    col(store.AuthorizationCode.client_id) == request.payload.client_id,
                    col(store.AuthorizationCode.nonce) == nonce,
                )
            ).first()
        return found is not None

    def resolve_client_private_key(self, client: AppClient) -> ECKey:
        return ECKey.import_key(self.server.tokens.keys.signing.private_key)

    def get_client_algorithm(self, client: AppClient) -> str:
        return JWT_ALGORITHM

    def get_encode_header(self, client: AppClient) -> dict[str, str]:
        return {"alg": JWT_ALGORITHM, "kid": self.server.tokens.keys.signing.kid}

    def get_client_claims(self, client: AppClient) -> dict[str, Any]:
        now = int(self.server.clock().timestamp())
        lifetime = int(self.server.tokens.lifetime.total_seconds())
        return {"aud": client.client_id, "iat": now, "exp": now + lifetime}

    def get_compatible_claims(self, request: SmartRequest) -> dict[str, Any]:
        claims: dict[str, Any] = super().get_compatible_claims(request)
        claims["iss"] = request.issuer
        return claims

    def generate_user_info(self, user: User, scope: str) -> UserInfo:
        info = UserInfo(sub=user.account_id)
        if user.staff:
            info["roles"] = list(user.roles)
        fhir_user = fhir_user_of(user)
        if "fhirUser" in scope.split() and fhir_user:
            info["fhirUser"] = fhir_user
        return info


def fhir_user_of(user: User) -> str | None:
    """The FHIR resource a signed-in account is: its Patient, or a clinician's Practitioner."""
    if user.patient:
        return f"Patient/{user.patient}"
    if user.practitioner:
        return f"Practitioner/{user.practitioner}"
    return None


def staff_scopes(granted: Iterable[Scope], roles: Iterable[str]) -> tuple[Scope, ...]:
    """The ``user/`` scopes of a staff sign-in: those both ``granted`` (asked for, within the
    app's registration) and given to ``roles`` (:data:`~services.auth.scopes.ROLE_SCOPES`)."""
    granted = [s for s in granted if s.context == "user"]
    allowed = [Scope.parse(s) for s in role_scopes(roles)]
    kept = [s for s in allowed if _covered(s, granted)]
    # A narrower scope asked for within a role's broader one (and not already held).
    kept += [s for s in granted if _covered(s, allowed) and not _covered(s, kept)]
    return tuple(dict.fromkeys(kept))


class CodeGrant(AuthorizationCodeGrant):  # type: ignore[misc]
    """The authorization code grant over ``oauth_authorization_code`` (codes hashed, used once,
    :attr:`AuthSettings.code_lifetime_s`)."""

    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    server: SmartServer

    def save_authorization_code(self, code: str, request: SmartRequest) -> None:
        now = self.server.clock()
        data = request.payload.data
        user: User = request.user
        store.save_code(
            self.server.engine,
            code,
            store.AuthorizationCode(
                code_sha256="",
                client_id=request.client.client_id,
                account_id=user.account_id,
                redirect_uri=request.payload.redirect_uri,
                scope=request.scope,
                code_challenge=data["code_challenge"],
                code_challenge_method=data["code_challenge_method"],
                nonce=data.get("nonce"),
                auth_time=int(now.timestamp()),
                family=uuid.uuid4().hex,
                expires=now + timedelta(seconds=self.server.settings.code_lifetime_s),
            ),
        )

    def query_authorization_code(
        self, code: str, client: AppClient
    ) -> store.AuthorizationCode | None:
        # Redeemed here, in one statement with the check: a second request with the same code
        # finds it used, even while this one is still being answered.
        return store.redeem_code(self.server.engine, code, client.client_id, self.server.clock())

    def delete_authorization_code(self, authorization_code: store.AuthorizationCode) -> None:
        pass  # marked used when redeemed; kept a day so that a replay is recognised

    def authenticate_user(self, authorization_code: store.AuthorizationCode) -> User | None:
        return accounts.load_user(self.server.engine, authorization_code.account_id)


class RefreshGrant(RefreshTokenGrant):  # type: ignore[misc]
    """Refresh tokens rotate: every use answers a new one and retires the old one, whose reuse
    revokes the family (:func:`services.auth.store.use_refresh_token`)."""

    TOKEN_ENDPOINT_AUTH_METHODS = CLIENT_AUTH_METHODS
    INCLUDE_NEW_REFRESH_TOKEN = True
    server: SmartServer

    def authenticate_refresh_token(self, refresh_token: str) -> store.RefreshToken | None:
        return store.use_refresh_token(self.server.engine, refresh_token, self.server.clock())

    def authenticate_user(self, refresh_token: store.RefreshToken) -> User | None:
        return accounts.load_user(self.server.engine, refresh_token.account_id)

    def revoke_old_credential(self, refresh_token: store.RefreshToken) -> None:
        pass  # marked replaced when it was used (authenticate_refresh_token)


class Revocation(RevocationEndpoint):  # type: ignore[misc]
    """RFC 7009 for refresh tokens: revoking one ends its whole family (the portal's sign-out).
    Access tokens are self-contained JWTs that live minutes; they are not looked up."""

    CLIENT_AUTH_METHODS = CLIENT_AUTH_METHODS
    server: SmartServer

    def query_token(self, token_string: str, token_type_hint: str | None) -> Any:
        return store.find_refresh_token(self.server.engine, token_string)

    def revoke_token(self, token: store.RefreshToken, request: SmartRequest) -> None:
        store.revoke_family(self.server.engine, token.family, self.server.clock())


class SmartServer(AuthorizationServer):  # type: ignore[misc]
    """Authlib's authorization server wired to scanwatch: clients from ``oauth_client``, the
    project's access tokens, refresh tokens stored hashed."""

    def __init__(
        self,
        engine: Engine,
        tokens: TokenService,
        settings: AuthSettings,
        fhir_base: str | None = None,
        clock: Callable[[], datetime] = _now,
    ) -> None:
        super().__init__(scopes_supported=list(SUPPORTED_SCOPES))
        # Authlib logs issued tokens and codes at DEBUG ("Issue token %r"): never, here, even
        # when the service runs at DEBUG (no tokens in logs, scanwatch/logs.py).
        logging.getLogger("authlib").setLevel(logging.INFO)
        self.engine = engine
        #: The FHIR base URL apps must name as ``aud`` (None: the issuer's ``/fhir``).
        self.fhir_base = fhir_base
        self.tokens = tokens
        self.settings = settings
        self.clock = clock
        self.register_token_generator("default", self.generate_bearer_token)
        self.register_grant(
            CodeGrant, [S256Challenge(required=True), FhirAudience(), SmartOpenIDCode(self)]
        )
        self.register_grant(RefreshGrant)
        self.register_endpoint(Revocation)

    def validate_requested_scope(self, scope: str | None) -> None:
        pass  # each client's registration decides (AppClient.get_allowed_scope)

    def query_client(self, client_id: str) -> AppClient | None:
        row = get_client(self.engine, client_id)
        return AppClient(row) if row is not None else None

    def generate_bearer_token(
        self,
        grant_type: str,
        client: AppClient,
        user: User | None = None,
        scope: str | None = None,
        expires_in: int | None = None,
        include_refresh_token: bool = True,
    ) -> dict[str, Any]:
        """The token response: the project's access token, bound to the account's Patient;
        a refresh token only when ``offline_access`` was granted."""
        granted = (scope or "").split()
        resources = parse_scopes(scope or "")
        patient = user.patient if user is not None else None
        if not any(s.context == "patient" for s in resources):
            patient = None
        subject, claims = client.client_id, dict[str, Any]()
        if client.for_staff:
            # A staff token is the person's: sub is the account, its scopes its role's only.
            roles = user.roles if user is not None and user.staff else ()
            resources = staff_scopes(resources, roles)
            granted = [*(g for g in granted if g in NON_RESOURCE_SCOPES), *map(str, resources)]
            subject = user.account_id if user is not None else client.client_id
            claims = {"roles": list(roles)}
            fhir_user = fhir_user_of(user) if user is not None else None
            if fhir_user and "fhirUser" in granted:
                claims["fhirUser"] = fhir_user
            patient = None
        access_token, expires = self.tokens.issue(subject, resources, patient, claims=claims)
        token: dict[str, Any] = {
            "token_type": "Bearer",
            "access_token": access_token,
            "expires_in": expires,
            "scope": " ".join(granted),
        }
        if patient:
            token["patient"] = patient
        if include_refresh_token and "offline_access" in granted:
            token["refresh_token"] = secrets.token_urlsafe(32)
        return token

    def save_token(self, token: dict[str, Any], request: SmartRequest) -> None:
        refresh_token = token.get("refresh_token")
        if not refresh_token:
            return
        now = self.clock()
        origin = (
            request.authorization_code
            if request.authorization_code is not None
            else request.refresh_token
        )
        # A staff token's scopes are its role's, narrowed at each issue; its refresh token
        # keeps what the app was granted, so that a refresh asks within it and a changed role
        # takes effect at the next refresh.
        scope = origin.scope if request.client.for_staff else token["scope"]
        store.save_refresh_token(
            self.engine,
            refresh_token,
            store.RefreshToken(
                token_sha256="",
                family=origin.family,
                client_id=request.client.client_id,
                account_id=request.user.account_id,
                scope=scope,
                issued=now,
                expires=now + timedelta(seconds=self.settings.refresh_lifetime_s),
            ),
        )

    def create_oauth2_request(self, request: SmartRequest) -> SmartRequest:
        return request  # the routes build it (they read the body asynchronously first)

    def handle_response(self, status: int, body: Any, headers: list[tuple[str, str]]) -> Response:
        merged = dict(headers)
        if isinstance(body, dict):
            merged.setdefault("Cache-Control", "no-store")
            merged.setdefault("Pragma", "no-cache")
            merged.pop("Content-Type", None)
            return JSONResponse(body, status_code=status, headers=merged)
        return Response(body or b"", status_code=status, headers=merged)

    def send_signal(self, name: str, *args: Any, **kwargs: Any) -> None:
        pass  # no signal system here
