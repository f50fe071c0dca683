"""The authorization server's HTTP surface. An app factory includes :data:`router` and sets
the state :mod:`services.auth.deps` reads.

- ``POST /auth/token``: the client credentials grant (RFC 6749 §4.4) for backend services,
  answered here as before; the authorization code and refresh token grants, answered by
  Authlib (:mod:`services.auth.server`);
- ``GET|POST /auth/authorize``: SMART standalone patient launch: the sign-in page, then the
  code sent back to the app's redirect URI;
- ``POST /auth/revoke`` (RFC 7009): a refresh token (the portal's sign-out);
- ``GET|POST /auth/activate``: a patient's one-time activation link: username, password, TOTP;
- ``/.well-known/smart-configuration``, ``/.well-known/openid-configuration``: discovery;
- ``GET /auth/jwks`` (also ``/.well-known/jwks.json``): the public signing keys that
  verifiers without a signing key use (:class:`services.auth.jwks.RemoteKeySet`).
"""

from __future__ import annotations

import logging
import re
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qsl

from authlib.oauth2.rfc6749 import InsecureTransportError, OAuth2Error
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from services.auth import accounts, clients, openapi, pages, passwords, smart
from services.auth.config import AuthSettings
from services.auth.deps import AuthSettingsDep, ClientEngine, SmartServerDep, Tokens
from services.auth.server import AppClient, SmartRequest, SmartServer

log = logging.getLogger(__name__)

#: Where the token endpoint is served.
TOKEN_PATH = smart.TOKEN_PATH
#: Where the public signing keys (JWK Set) are served: the authorization server's own path,
#: and the well-known one (RFC 8615) that generic clients look for.
JWKS_PATH = "/auth/jwks"
WELL_KNOWN_JWKS_PATH = "/.well-known/jwks.json"
#: How long a verifier may cache the JWKS (seconds). Short, so that a removed key stops being
#: trusted soon; a key added is fetched at once anyway (a token with an unknown kid).
JWKS_MAX_AGE_S = 300
#: What the OpenAPI document at ``/auth/openapi.json`` calls this server.
AUTH_TITLE = "scanwatch authorization server"
#: Most bytes of a token request's form read.
MAX_FORM_BYTES = 10_000

router = APIRouter()


@router.post(TOKEN_PATH)
async def token(request: Request, tokens: Tokens, engine: ClientEngine) -> Response:
    """OAuth 2.0 client credentials grant (RFC 6749 §4.4) for registered clients."""
    if tokens is None:
        return oauth_error(400, "invalid_request", "authorization is off on this server")
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    form = dict(parse_qsl(body, keep_blank_values=True))
    server: SmartServer | None = request.app.state.smart_server
    if form.get("grant_type") in ("authorization_code", "refresh_token") and server is not None:
        items = parse_qsl(body, keep_blank_values=True)
        try:
            oauth = smart_request(request, server, [], items)
        except InsecureTransportError:
            return oauth_error(400, "invalid_request", "the token endpoint needs https")
        answer: Response = await run_in_threadpool(server.create_token_response, oauth)
        return answer
    if form.get("grant_type") != "client_credentials":
        return oauth_error(
            400,
            "unsupported_grant_type",
            "use grant_type=client_credentials, authorization_code or refresh_token",
        )
    try:
        client_id, secret = clients.client_credentials(request.headers.get("authorization"), form)
    except ValueError as exc:
        return oauth_error(401, "invalid_client", str(exc))
    client = await run_in_threadpool(clients.authenticate_client, engine, client_id, secret)
    if client is None:
        return oauth_error(401, "invalid_client", "unknown client or wrong secret")
    if clients.CLIENT_CREDENTIALS not in client.grant_type_list:
        return oauth_error(400, "unauthorized_client", "this client may not use client_credentials")
    try:
        scopes = clients.granted_scopes(client, form.get("scope"))
    except ValueError as exc:
        return oauth_error(400, "invalid_scope", str(exc))
    access_token, expires_in = tokens.issue(client.client_id, scopes, client.patient)
    granted: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": " ".join(str(s) for s in scopes),
    }
    if client.patient:
        granted["patient"] = client.patient
    return JSONResponse(granted, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


@router.get(openapi.OPENAPI_PATH, include_in_schema=False)
async def openapi_document(request: Request) -> Response:
    """The OpenAPI document of these routes (no token needed)."""
    return JSONResponse(openapi.openapi_document(AUTH_TITLE, request.app.version))


@router.get(JWKS_PATH)
@router.get(WELL_KNOWN_JWKS_PATH)
async def jwks(tokens: Tokens) -> Response:
    """The public keys that verify this server's access tokens (RFC 7517 §5): no private
    member ever (:meth:`~services.auth.tokens.KeySet.public_jwks`)."""
    if tokens is None:
        return oauth_error(404, "not_found", "authorization is off on this server: no keys")
    return JSONResponse(
        tokens.keys.public_jwks(),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE_S}"},
    )


def oauth_error(status: int, error: str, description: str) -> Response:
    """An OAuth 2.0 error response (RFC 6749 §5.2)."""
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="scanwatch"'
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


# --- SMART sign-in ---------------------------------------------------------------------------

#: Form fields of the sign-in page itself (never passed to Authlib, never echoed back).
SIGN_IN_FIELDS = frozenset({"username", "password", "totp", pages.CSRF_FIELD, "action"})
#: Most parameters, and longest value, an authorization request may carry.
MAX_PARAMS = 30
MAX_PARAM_CHARS = 2048
#: What a failed sign-in says, whatever failed: an unknown username, a wrong password or
#: code, a locked account (the answer must not tell them apart).
SIGN_IN_REFUSED = (
    "That did not work. Check your username, password and code, then try again. After "
    "{failures} failed tries in a row an account is locked for {minutes} minutes."
)
#: Plain words for what each scope lets the app do (shown on the sign-in page).
SCOPE_WORDS = {
    "patient/*.read": "your scan results and other health records (read only)",
    "patient/Observation.read": "your scan results (read only)",
    "patient/CommunicationRequest.write": "asking your care team to call you back",
    "offline_access": "staying signed in until you sign out",
}
#: The same for a staff app (the console): what the account's role will be given.
STAFF_WORDS = "the staff console, with the access of your role"
#: What an account of the wrong kind is told (a patient at the console, staff at the portal):
#: its password was right, so this says nothing a guesser could use.
WRONG_KIND = "This account cannot sign in to {app}. Use the app made for your account."


def issuer_of(request: Request) -> str:
    """The authorization server's public root URL: configured, else this request's."""
    settings: AuthSettings = request.app.state.auth_settings
    return settings.issuer or str(request.base_url).rstrip("/")


def smart_request(
    request: Request,
    server: SmartServer,
    query: list[tuple[str, str]],
    form: list[tuple[str, str]],
) -> SmartRequest:
    """The request as Authlib reads it; :class:`InsecureTransportError` over plain http off
    loopback."""
    issuer = issuer_of(request)
    uri = f"{issuer}{request.url.path}"
    return SmartRequest(
        request.method,
        uri,
        request.headers,
        query,
        form,
        issuer,
        server.fhir_base or f"{issuer}/fhir",
    )


async def _form(request: Request) -> list[tuple[str, str]]:
    if request.method != "POST":
        return []
    body = (await request.body())[:MAX_FORM_BYTES].decode("utf-8", "replace")
    return parse_qsl(body, keep_blank_values=True)


def _with_headers(response: Response, headers: dict[str, str]) -> Response:
    for name, value in headers.items():
        response.headers[name] = value
    return response


def _refused_request(
    request: Request, oauth: SmartRequest, server: SmartServer, error: Any
) -> Response:
    """An authorization request that cannot go on: back to the app with the error when its
    redirect URI is known good (RFC 6749 §4.1.2.1), else a page (never to an unverified URI)."""
    if getattr(error, "redirect_uri", None):
        response: Response = server.handle_error_response(oauth, error)
        target = pages.origin(error.redirect_uri)
        return _with_headers(response, pages.security_headers((target,) if target else ()))
    return pages.message(
        request,
        "This sign-in link does not work",
        f"Go back to the app and try again. ({error.description or error.error})",
        400,
    )


def _access_words(scope: str) -> str:
    granted = set(scope.split())
    words = [text for name, text in SCOPE_WORDS.items() if name in granted]
    return "; ".join(words) or "your health records"


@router.get(smart.AUTHORIZE_PATH)
async def authorize(request: Request, server: SmartServerDep) -> Response:
    """SMART standalone patient launch (authorization code, PKCE S256): the sign-in page."""
    return await _authorize(request, server)


@router.post(smart.AUTHORIZE_PATH)
async def authorize_post(request: Request, server: SmartServerDep) -> Response:
    """The same parameters posted (``authorize-post``): the sign-in page; or the sign-in
    page's form, with the credentials and the CSRF token: a good sign-in redirects to the app
    with the code and the ``state`` it sent."""
    return await _authorize(request, server)


async def _authorize(request: Request, server: SmartServer | None) -> Response:
    if server is None:
        return pages.message(request, "Sign-in is not available", "Authorization is off.", 404)
    form = await _form(request)
    params = [
        (k, v) for k, v in [*request.query_params.multi_items(), *form] if k not in SIGN_IN_FIELDS
    ]
    if len(params) > MAX_PARAMS or any(len(v) > MAX_PARAM_CHARS for _, v in params):
        return pages.message(request, "This sign-in link does not work", "It is too long.", 400)
    fields = {k: v for k, v in form if k in SIGN_IN_FIELDS}
    try:
        oauth = smart_request(request, server, params, [])
    except InsecureTransportError:
        return pages.message(request, "Sign-in needs a secure connection", "Use https.", 400)
    try:
        grant = await run_in_threadpool(server.get_consent_grant, oauth)
    except OAuth2Error as exc:
        return _refused_request(request, oauth, server, exc)
    redirect_origin = pages.origin(oauth.payload.redirect_uri)
    targets = (redirect_origin,) if redirect_origin else ()
    action = fields.get("action")
    refusal: str | None = None
    if request.method == "POST" and action in ("sign-in", "cancel"):
        if not pages.csrf_ok(request, fields):
            log.info("sign-in form refused: CSRF token missing or wrong")
            return pages.message(
                request,
                "Please sign in again",
                "This sign-in form has expired or did not come from this site. Go back to the "
                "app and start again.",
                403,
            )
        user: accounts.User | None = None
        if action == "sign-in":
            policy = accounts.SignInPolicy(
                server.settings.max_failed_signins, timedelta(seconds=server.settings.lockout_s)
            )
            user = await run_in_threadpool(
                accounts.sign_in,
                server.engine,
                fields.get("username", ""),
                fields.get("password", ""),
                fields.get("totp", ""),
                server.clock(),
                policy,
            )
        client_row: AppClient = grant.client
        if user is not None and user.staff != client_row.for_staff:
            log.info("sign-in refused", extra={"reason": "kind", "account_id": user.account_id})
            user = None
            refusal = WRONG_KIND.format(app=client_row.row.description or client_row.client_id)
        elif user is not None or action == "cancel":
            response: Response = await run_in_threadpool(
                server.create_authorization_response, oauth, user, grant
            )
            return _with_headers(response, pages.security_headers(targets))
        refusal = refusal or SIGN_IN_REFUSED.format(
            failures=server.settings.max_failed_signins,
            minutes=max(1, server.settings.lockout_s // 60),
        )
    client: AppClient = grant.client
    csrf = pages.csrf_token(request)
    context = {
        "title": "Sign in",
        "client_name": client.row.description or client.client_id,
        "access": STAFF_WORDS if client.for_staff else _access_words(oauth.scope or ""),
        "staff": client.for_staff,
        "params": params,
        "csrf_token": csrf,
        "error": refusal,
        "username": fields.get("username", "") if refusal else "",
    }
    return pages.page(request, "signin.html", context, 400 if refusal else 200, targets, csrf)


@router.post(smart.REVOKE_PATH)
async def revoke(request: Request, server: SmartServerDep) -> Response:
    """RFC 7009: revoke a refresh token (and the tokens it was rotated from or into)."""
    if server is None:
        return oauth_error(400, "invalid_request", "authorization is off on this server")
    try:
        oauth = smart_request(request, server, [], await _form(request))
    except InsecureTransportError:
        return oauth_error(400, "invalid_request", "the revocation endpoint needs https")
    answer: Response = await run_in_threadpool(server.create_endpoint_response, "revocation", oauth)
    return answer


@router.get(smart.SMART_CONFIGURATION_PATH)
async def smart_configuration(request: Request) -> Response:
    """SMART App Launch discovery (also at ``/fhir/.well-known/smart-configuration``)."""
    return JSONResponse(smart.smart_configuration(issuer_of(request)))


@router.get(smart.OPENID_CONFIGURATION_PATH)
async def openid_configuration(request: Request) -> Response:
    return JSONResponse(smart.openid_configuration(issuer_of(request)))


@router.get("/auth/static/auth.css")
async def stylesheet() -> Response:
    return Response(
        pages.stylesheet(),
        media_type="text/css",
        headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
    )


# --- patient accounts ------------------------------------------------------------------------

_TOTP_SECRET_RE = re.compile(r"^[A-Z2-7]{16,64}$")
INVITE_GONE = (
    "This activation link has expired or has been used already. Ask your care team for a new one."
)


def _activation_page(
    request: Request,
    token: str,
    totp_secret: str,
    error: str | None = None,
    username: str = "",
    staff: bool = False,
) -> Response:
    csrf = pages.csrf_token(request)
    context = {
        "title": "Create your account",
        "token": token,
        "csrf_token": csrf,
        "totp_secret": totp_secret,
        # Read out or typed more easily in groups of four (authenticator apps ignore spaces).
        "totp_key": " ".join(totp_secret[i : i + 4] for i in range(0, len(totp_secret), 4)),
        "totp_uri": accounts.totp_uri(totp_secret, username or "patient"),
        "min_length": passwords.MIN_LENGTH,
        "error": error,
        "username": username,
        "staff": staff,
    }
    return pages.page(request, "activate.html", context, 400 if error else 200, csrf=csrf)


@router.get(smart.ACTIVATE_PATH)
async def activation(
    request: Request, server: SmartServerDep, settings: AuthSettingsDep
) -> Response:
    """The page a patient's activation link opens (while it is unused and unexpired)."""
    if server is None:
        return pages.message(request, "Accounts are not available", "Authorization is off.", 404)
    token = request.query_params.get("token", "")
    try:
        invite = await run_in_threadpool(
            accounts.pending_invite, server.engine, token, server.clock()
        )
    except accounts.InviteInvalid:
        return pages.message(request, "This link does not work", INVITE_GONE, 410)
    staff = await run_in_threadpool(accounts.invite_username, server.engine, invite)
    return _activation_page(
        request, token, accounts.new_totp_secret(), username=staff or "", staff=bool(staff)
    )


@router.post(smart.ACTIVATE_PATH)
async def activate(request: Request, server: SmartServerDep, settings: AuthSettingsDep) -> Response:
    """Create the account: username, password (the policy), TOTP when a code proves it."""
    if server is None:
        return pages.message(request, "Accounts are not available", "Authorization is off.", 404)
    form = dict(await _form(request))
    if not pages.csrf_ok(request, form):
        return pages.message(
            request,
            "Please try again",
            "This form has expired or did not come from this site. Open your activation link "
            "again.",
            403,
        )
    token = form.get("token", "")
    secret = form.get("totp_secret", "")
    if not _TOTP_SECRET_RE.match(secret):
        secret = accounts.new_totp_secret()
    username = form.get("username", "")
    try:
        invite = await run_in_threadpool(
            accounts.pending_invite, server.engine, token, server.clock()
        )
    except accounts.InviteInvalid:
        return pages.message(request, "This link does not work", INVITE_GONE, 410)
    staff_name = await run_in_threadpool(accounts.invite_username, server.engine, invite)
    username = staff_name or username
    staff = staff_name is not None
    if form.get("password", "") != form.get("password2", ""):
        return _activation_page(
            request, token, secret, "The two passwords are not the same.", username, staff
        )
    code = form.get("totp", "").strip()
    try:
        account = await run_in_threadpool(
            accounts.activate,
            server.engine,
            token,
            username,
            form.get("password", ""),
            server.clock(),
            secret if code else None,
            code or None,
        )
    except accounts.InviteInvalid:
        return pages.message(request, "This link does not work", INVITE_GONE, 410)
    except ValueError as exc:  # the username, the password policy, the TOTP code
        return _activation_page(request, token, secret, str(exc), username, staff)
    totp = " You will also need a code from your authenticator app." if account.totp_secret else ""
    return pages.message(
        request,
        "Your account is ready",
        f"Sign in with the username {account.username} and your new password.{totp}",
        link=settings.console_url if staff else settings.portal_url,
        link_text="Go to the staff console" if staff else "Go to your patient portal",
    )
