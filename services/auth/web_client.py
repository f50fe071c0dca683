"""The client side of this authorization server for a web app that signs people in (the
patient portal, the staff console): discover the endpoints, send the person to sign in
(authorization code with PKCE S256), take the code back, refresh and revoke tokens. Authlib's
OAuth 2.0 client does the protocol; this module wires it to the discovery document and
verifies every access token against the published keys (JWKS) before the app trusts it: a
token response is not taken on faith. Each app checks what the verified grant must say (a
patient, a staff role) on top."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx
from authlib.common.security import generate_token
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuthError

from services.auth.jwks import KeySetUnavailable, RemoteKeySet
from services.auth.scopes import AuthError, Grant
from services.auth.web_sessions import NeedSignIn, SessionStore, WebSession

log = logging.getLogger(__name__)

#: Refresh the access token when it has less than this left.
REFRESH_MARGIN_S = 30.0

#: Verifies an access token; the grant it carries, or AuthError.
Verifier = Callable[[str], Grant]


class SignInError(Exception):
    """A sign-in could not be completed; ``message`` is what the person is told."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(f"{message} {detail}".strip())
        self.message = message
        self.detail = detail


class SessionExpired(Exception):
    """The tokens can no longer be refreshed: sign in again."""


class AuthServerUnavailable(Exception):
    """The authorization server could not be reached (transient)."""


@dataclass(frozen=True)
class SmartConfiguration:
    """The endpoints of ``/.well-known/smart-configuration`` (or OpenID's) a web app uses."""

    authorization_endpoint: str
    token_endpoint: str
    revocation_endpoint: str | None
    jwks_uri: str

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> SmartConfiguration:
        try:
            config = cls(
                authorization_endpoint=str(document["authorization_endpoint"]),
                token_endpoint=str(document["token_endpoint"]),
                revocation_endpoint=document.get("revocation_endpoint"),
                jwks_uri=str(document["jwks_uri"]),
            )
        except KeyError as exc:
            raise AuthServerUnavailable(f"smart-configuration lacks {exc}") from exc
        methods = document.get("code_challenge_methods_supported")
        if methods is not None and "S256" not in methods:
            raise AuthServerUnavailable("the authorization server does not support PKCE S256")
        return config


@dataclass(frozen=True)
class Tokens:
    """What a token response gave the app, its access token verified."""

    access_token: str
    refresh_token: str | None
    expires_at: float  # the clock's time when it expires
    grant: Grant
    id_token: str | None = None


@dataclass(frozen=True)
class AuthorizationRequest:
    url: str
    state: str
    code_verifier: str


@dataclass(frozen=True)
class ClientSettings:
    """Who the app is at the authorization server and where that server is."""

    client_id: str
    client_secret: str
    redirect_uri: str
    scope: str
    #: The discovery document's URL (``.../.well-known/smart-configuration``).
    configuration_url: str
    #: The ``aud`` of the authorization request: the FHIR base URL the token is for.
    audience: str
    timeout_s: float = 10.0
    jwks_ttl_s: float = 300.0


class WebClient:
    """The OAuth client of one web app (one registered, confidential client id)."""

    def __init__(
        self,
        settings: ClientSettings,
        transport: httpx.AsyncBaseTransport | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client_settings = settings
        self._transport = transport
        self._verifier = verifier
        self._clock = clock
        self._config: SmartConfiguration | None = None
        self._config_lock = asyncio.Lock()

    def _client(self) -> AsyncOAuth2Client:
        s = self.client_settings
        return AsyncOAuth2Client(
            client_id=s.client_id,
            client_secret=s.client_secret,
            scope=s.scope,
            redirect_uri=s.redirect_uri,
            code_challenge_method="S256",
            token_endpoint_auth_method="client_secret_basic",
            timeout=s.timeout_s,
            transport=self._transport,
        )

    async def configuration(self) -> SmartConfiguration:
        """The discovery document, fetched once (then cached for the process)."""
        async with self._config_lock:
            if self._config is None:
                url = self.client_settings.configuration_url
                try:
                    async with httpx.AsyncClient(
                        transport=self._transport, timeout=self.client_settings.timeout_s
                    ) as http:
                        answer = await http.get(url, headers={"Accept": "application/json"})
                        answer.raise_for_status()
                        document = answer.json()
                except (httpx.HTTPError, ValueError) as exc:
                    raise AuthServerUnavailable(f"cannot read {url}: {exc}") from exc
                self._config = SmartConfiguration.from_document(document)
                if self._verifier is None:
                    keys = RemoteKeySet(self._config.jwks_uri, ttl=self.client_settings.jwks_ttl_s)
                    self._verifier = keys.verify
            return self._config

    async def authorization_request(self) -> AuthorizationRequest:
        """Where to send the person to sign in, with a fresh ``state`` and PKCE verifier."""
        config = await self.configuration()
        verifier = generate_token(64)
        state = generate_token(32)
        async with self._client() as client:
            url, state = client.create_authorization_url(
                config.authorization_endpoint,
                state=state,
                code_verifier=verifier,
                aud=self.client_settings.audience,  # SMART: the FHIR server the token is for
            )
        return AuthorizationRequest(url, state, verifier)

    async def fetch_tokens(self, code: str, code_verifier: str) -> dict[str, Any]:
        """The token response for an authorization ``code`` (with the PKCE verifier of its
        request), not yet checked: :meth:`verified` does that."""
        config = await self.configuration()
        async with self._client() as client:
            try:
                token = await client.fetch_token(
                    config.token_endpoint,
                    grant_type="authorization_code",
                    code=code,
                    code_verifier=code_verifier,
                )
            except OAuthError as exc:
                raise SignInError(
                    "The sign-in could not be completed.", f"{exc.error}: {exc.description}"
                ) from exc
            except httpx.HTTPError as exc:
                raise AuthServerUnavailable(str(exc)) from exc
        return dict(token)

    async def refresh_tokens(self, refresh_token: str) -> dict[str, Any]:
        """The token response for a refresh token (the old one kept when none comes back);
        :class:`SessionExpired` when it is refused."""
        config = await self.configuration()
        async with self._client() as client:
            try:
                token = await client.refresh_token(
                    config.token_endpoint, refresh_token=refresh_token
                )
            except OAuthError as exc:
                raise SessionExpired(f"{exc.error}: {exc.description}") from exc
            except httpx.HTTPError as exc:
                raise AuthServerUnavailable(str(exc)) from exc
        data = dict(token)
        data.setdefault("refresh_token", refresh_token)
        return data

    async def revoke(self, refresh_token: str) -> bool:
        """Revoke the refresh token at the authorization server (sign-out); whether it said
        yes. Failing to reach it is logged, not raised: the session ends either way."""
        try:
            config = await self.configuration()
        except AuthServerUnavailable:
            log.warning("sign-out: authorization server unavailable; token not revoked")
            return False
        if not config.revocation_endpoint:
            log.warning("sign-out: the authorization server has no revocation endpoint")
            return False
        async with self._client() as client:
            try:
                answer = await client.revoke_token(
                    config.revocation_endpoint,
                    token=refresh_token,
                    token_type_hint="refresh_token",
                )
            except httpx.HTTPError as exc:
                log.warning("sign-out: revocation failed", extra={"error": str(exc)})
                return False
        if answer.status_code != 200:
            log.warning("sign-out: revocation refused", extra={"status": answer.status_code})
        return bool(answer.status_code == 200)

    async def verified(self, token: dict[str, Any]) -> Tokens:
        """The tokens of a token response once its access token verifies against the JWKS;
        :class:`SignInError` otherwise."""
        access = token.get("access_token")
        if not isinstance(access, str):
            raise SignInError(
                "The sign-in could not be completed.", "the token response has no access token"
            )
        if self._verifier is None:
            await self.configuration()
        assert self._verifier is not None  # set with the configuration
        try:
            grant = await asyncio.to_thread(self._verifier, access)
        except AuthError as exc:
            raise SignInError("The sign-in could not be completed.", exc.message) from exc
        except KeySetUnavailable as exc:
            raise AuthServerUnavailable(str(exc)) from exc
        lifetime = float(token.get("expires_in") or 300)
        refresh = token.get("refresh_token")
        id_token = token.get("id_token")
        return Tokens(
            access_token=access,
            refresh_token=refresh if isinstance(refresh, str) else None,
            expires_at=self._clock() + lifetime,
            grant=grant,
            id_token=id_token if isinstance(id_token, str) else None,
        )

    def needs_refresh(self, expires_at: float) -> bool:
        return self._clock() >= expires_at - REFRESH_MARGIN_S


class IssuedTokens(Protocol):
    """What a session keeps of an app's accepted token response."""

    @property
    def access_token(self) -> str: ...

    @property
    def refresh_token(self) -> str | None: ...

    @property
    def expires_at(self) -> float: ...


class CallbackRefused(SignInError):
    """A sign-in callback that signed no one in. ``outcome``: ``bad-state`` (not the pending
    sign-in of this browser, or too late), ``refused`` (no code came back: cancelled or
    refused at the authorization server) or ``failed`` (the code did not give a token the app
    accepts; ``detail`` says why, for the log)."""

    def __init__(self, outcome: str, message: str, detail: str = "") -> None:
        super().__init__(message, detail)
        self.outcome = outcome


S = TypeVar("S", bound=WebSession)
T = TypeVar("T", bound=IssuedTokens)


async def start_sign_in(
    client: WebClient, sessions: SessionStore[S], session: S | None
) -> tuple[S, str]:
    """A sign-in begins: a fresh state and PKCE verifier kept in the browser's session (a new
    session when it has none); (the session, the authorization server's URL to send the
    person to)."""
    session = session or sessions.new()
    authorization = await client.authorization_request()
    session.login_state = authorization.state
    session.code_verifier = authorization.code_verifier
    session.login_started = sessions.clock()
    return session, authorization.url


async def sign_out(client: WebClient, sessions: SessionStore[S], session: S) -> None:
    """The session ends (its tokens forgotten, no "your session has ended" for it) and its
    refresh token is revoked at the authorization server."""
    refresh = session.refresh_token
    sessions.end(session, remember=False)
    if refresh:
        await client.revoke(refresh)


async def complete_sign_in(
    sessions: SessionStore[S],
    session: S | None,
    exchange: Callable[[str, str], Awaitable[T]],
    *,
    code: str | None,
    state: str | None,
    error: str | None,
    timeout_s: float,
) -> tuple[S, T]:
    """The steps of a sign-in callback, the same for every app: ``state`` must be the one
    this browser's pending sign-in sent, back within ``timeout_s``; the state and the PKCE
    verifier are then spent, whatever follows; ``exchange`` (the app's: it checks whose token
    it is) turns the code into tokens; the session goes on under a new id holding them. The
    app then records who signed in. :class:`CallbackRefused` otherwise, its ``message`` what
    the person is told."""
    started = session.login_started if session else None
    timely = started is not None and sessions.clock() - started <= timeout_s
    if session is None or not state or not timely or not session.check_login_state(state):
        raise CallbackRefused(
            "bad-state",
            "This sign-in link is not valid: it did not come from a sign-in you started here, "
            "or it took too long. Please start again.",
        )
    verifier = session.code_verifier
    session.login_state = session.code_verifier = session.login_started = None  # used once
    if error or not code or not verifier:
        text = "You cancelled the sign-in." if error == "access_denied" else "The sign-in failed."
        raise CallbackRefused("refused", f"{text} Please try again.")
    try:
        tokens = await exchange(code, verifier)
    except SignInError as exc:
        raise CallbackRefused("failed", f"{exc.message} Please try again.", exc.detail) from exc
    session = sessions.rotate(session)
    session.access_token = tokens.access_token
    session.refresh_token = tokens.refresh_token
    session.expires_at = tokens.expires_at
    return session, tokens


async def refreshed_tokens(
    client: WebClient,
    sessions: SessionStore[S],
    session: S,
    refresh: Callable[[str], Awaitable[T]],
) -> T | None:
    """The session's tokens renewed by ``refresh`` (the app's: it checks whose token it is)
    when its access token is (about to be) expired: the new tokens, now the session's, or
    None when none was due. Call it holding ``session.lock`` (a refresh token is spent once).
    Tokens that can no longer be renewed (no refresh token, refused, or not a token the app
    accepts) end the session: :class:`NeedSignIn`."""
    if not client.needs_refresh(session.expires_at):
        return None
    if not session.refresh_token:
        log.warning("session ended: its access token is due and it has no refresh token")
        sessions.end(session)
        raise NeedSignIn(expired=True)
    try:
        tokens = await refresh(session.refresh_token)
    except (SessionExpired, SignInError) as exc:
        # Said once, with the authorization server's reason (an OAuth error code and its
        # description, never a token): a session ended early is otherwise untraceable.
        log.warning("session ended: its tokens could not be refreshed", extra={"reason": str(exc)})
        sessions.end(session)
        raise NeedSignIn(expired=True) from None
    session.access_token = tokens.access_token
    session.refresh_token = tokens.refresh_token or session.refresh_token
    session.expires_at = tokens.expires_at
    return tokens
