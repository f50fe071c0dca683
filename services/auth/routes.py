"""The OAuth 2.0 token endpoint (``POST /auth/token``): the client credentials grant
(RFC 6749 §4.4) for registered clients; and the public signing keys (``GET /auth/jwks``, also
``/.well-known/jwks.json``) that verifiers without a signing key use
(:class:`services.auth.jwks.RemoteKeySet`). An app factory includes :data:`router` and sets
the state :mod:`services.auth.deps` reads."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from services.auth import clients
from services.auth.deps import ClientEngine, Tokens

#: Where the token endpoint is served.
TOKEN_PATH = "/auth/token"
#: Where the public signing keys (JWK Set) are served: the authorization server's own path,
#: and the well-known one (RFC 8615) that generic clients look for.
JWKS_PATH = "/auth/jwks"
WELL_KNOWN_JWKS_PATH = "/.well-known/jwks.json"
#: How long a verifier may cache the JWKS (seconds). Short, so that a removed key stops being
#: trusted soon; a key added is fetched at once anyway (a token with an unknown kid).
JWKS_MAX_AGE_S = 300
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
    if form.get("grant_type") != "client_credentials":
        return oauth_error(400, "unsupported_grant_type", "use grant_type=client_credentials")
    try:
        client_id, secret = clients.client_credentials(request.headers.get("authorization"), form)
    except ValueError as exc:
        return oauth_error(401, "invalid_client", str(exc))
    client = await run_in_threadpool(clients.authenticate_client, engine, client_id, secret)
    if client is None:
        return oauth_error(401, "invalid_client", "unknown client or wrong secret")
    try:
        scopes = clients.granted_scopes(client, form.get("scope"))
    except ValueError as exc:
        return oauth_error(400, "invalid_scope", str(exc))
    access_token, expires_in = tokens.issue(client.client_id, scopes, client.patient)
    answer: dict[str, Any] = {
        "access_token": access_token,
        "token_type": "bearer",
        "expires_in": expires_in,
        "scope": " ".join(str(s) for s in scopes),
    }
    if client.patient:
        answer["patient"] = client.patient
    return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


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
