"""An OpenAPI 3.0 description of the authorization server's routes, served at
``/auth/openapi.json`` (no token needed): the machine-facing endpoints (token, revocation, the
JWK Set, SMART and OpenID discovery) with their answers, and the browser pages (authorize,
activate) as far as a tool can call them. Tools (schemathesis in the tests, client generators)
read it; the discovery documents remain what SMART clients follow."""

from __future__ import annotations

from typing import Any

from services.auth import smart

OPENAPI_VERSION = "3.0.3"
#: Where the document is served.
OPENAPI_PATH = "/auth/openapi.json"
FORM = "application/x-www-form-urlencoded"
HTML = "text/html"

_OAUTH_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}, "error_description": {"type": "string"}},
}
_TOKEN = {
    "type": "object",
    "required": ["access_token", "token_type", "expires_in"],
    "properties": {
        "access_token": {"type": "string"},
        "token_type": {"type": "string"},
        "expires_in": {"type": "integer"},
        "scope": {"type": "string"},
        "refresh_token": {"type": "string"},
        "id_token": {"type": "string"},
        "patient": {"type": "string"},
    },
}
_JWKS = {
    "type": "object",
    "required": ["keys"],
    "properties": {"keys": {"type": "array", "items": {"type": "object"}}},
}
_DISCOVERY = {
    "type": "object",
    "required": ["issuer", "token_endpoint", "jwks_uri"],
    "properties": {
        "issuer": {"type": "string"},
        "token_endpoint": {"type": "string"},
        "jwks_uri": {"type": "string"},
    },
}


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _page(description: str) -> dict[str, Any]:
    return {"description": description, "content": {HTML: {"schema": {"type": "string"}}}}


def _form(properties: dict[str, dict[str, Any]], required: list[str]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return {"required": True, "content": {FORM: {"schema": schema}}}


def _query(name: str, description: str, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "string"},
    }


_STRING = {"type": "string"}
_AUTHORIZE_PARAMS = [
    _query("response_type", "code"),
    _query("client_id", "The registered app"),
    _query("redirect_uri", "One of the app's registered redirect URIs, exactly"),
    _query("scope", "SMART scopes, space-separated"),
    _query("state", "The app's opaque value, returned with the code"),
    _query("aud", "The FHIR base URL the token is for"),
    _query("code_challenge", "PKCE: BASE64URL(SHA-256(verifier))"),
    _query("code_challenge_method", "S256 (the only method)"),
]
_AUTHORIZE_ANSWERS = {
    "200": _page("The sign-in page"),
    "302": {"description": "Back to the app's redirect URI with a code or an error"},
    "303": {"description": "Back to the app's redirect URI with a code or an error"},
    "400": _page("The request cannot go on and its redirect URI is not known good"),
    "403": _page("The sign-in form's CSRF token is missing or wrong"),
    "404": _page("Authorization is off on this server"),
}
_ACTIVATE_ANSWERS = {
    "200": _page("The activation form, or the account is ready"),
    "400": _page("The form again, naming what to change"),
    "403": _page("The form's CSRF token is missing or wrong"),
    "404": _page("Authorization is off on this server"),
    "410": _page("The link is used, expired or unknown"),
}


def openapi_document(title: str, version: str) -> dict[str, Any]:
    """The OpenAPI document of the authorization server's routes."""
    basic: list[dict[str, list[str]]] = [{"basic": []}, {}]
    paths: dict[str, Any] = {
        smart.TOKEN_PATH: {
            "post": {
                "operationId": "token",
                "summary": "OAuth 2.0 token endpoint: client_credentials (backend services), "
                "authorization_code with PKCE and refresh_token (SMART apps)",
                "security": basic,
                "requestBody": _form(
                    {
                        "grant_type": {
                            "type": "string",
                            "enum": ["client_credentials", "authorization_code", "refresh_token"],
                        },
                        "client_id": _STRING,
                        "client_secret": _STRING,
                        "scope": _STRING,
                        "code": _STRING,
                        "code_verifier": _STRING,
                        "redirect_uri": _STRING,
                        "refresh_token": _STRING,
                    },
                    ["grant_type"],
                ),
                "responses": {
                    "200": _json("A token response", _TOKEN),
                    "400": _json("An OAuth error (RFC 6749 §5.2)", _OAUTH_ERROR),
                    "401": _json("The client is unknown or its secret wrong", _OAUTH_ERROR),
                    "413": {"description": "The form is larger than the server reads"},
                },
            }
        },
        smart.REVOKE_PATH: {
            "post": {
                "operationId": "revoke",
                "summary": "RFC 7009: revoke a refresh token",
                "security": basic,
                "requestBody": _form(
                    {"token": _STRING, "token_type_hint": _STRING, "client_id": _STRING},
                    ["token"],
                ),
                "responses": {
                    "200": {"description": "Revoked (or unknown: RFC 7009 §2.2)"},
                    "400": _json("An OAuth error", _OAUTH_ERROR),
                    "401": _json("The client is unknown or its secret wrong", _OAUTH_ERROR),
                    "413": {"description": "The form is larger than the server reads"},
                },
            }
        },
        smart.AUTHORIZE_PATH: {
            "get": {
                "operationId": "authorize",
                "summary": "SMART standalone launch: the sign-in page (a browser's page)",
                "security": [],
                "parameters": _AUTHORIZE_PARAMS,
                "responses": _AUTHORIZE_ANSWERS,
            },
            "post": {
                "operationId": "authorize_post",
                "summary": "The sign-in page's form (a browser's page)",
                "security": [],
                "requestBody": _form(
                    {
                        "action": {"type": "string", "enum": ["sign-in", "cancel"]},
                        "username": _STRING,
                        "password": _STRING,
                        "totp": _STRING,
                        "csrf_token": _STRING,
                        **{p["name"]: _STRING for p in _AUTHORIZE_PARAMS},
                    },
                    [],
                ),
                "responses": _AUTHORIZE_ANSWERS | {"413": _page("The form is too large")},
            },
        },
        smart.ACTIVATE_PATH: {
            "get": {
                "operationId": "activation_page",
                "summary": "An account's one-time activation link (a browser's page)",
                "security": [],
                "parameters": [_query("token", "The invitation's one-time token", True)],
                "responses": _ACTIVATE_ANSWERS,
            },
            "post": {
                "operationId": "activate",
                "summary": "The activation form (a browser's page)",
                "security": [],
                "requestBody": _form(
                    {
                        name: _STRING
                        for name in (
                            "token",
                            "username",
                            "password",
                            "password2",
                            "totp_secret",
                            "totp",
                            "csrf_token",
                        )
                    },
                    [],
                ),
                "responses": _ACTIVATE_ANSWERS | {"413": _page("The form is too large")},
            },
        },
    }
    for path, operation in (
        (smart.JWKS_PATH, "jwks"),
        ("/.well-known/jwks.json", "jwks_well_known"),
    ):
        paths[path] = {
            "get": {
                "operationId": operation,
                "summary": "The public signing keys (JWK Set)",
                "security": [],
                "responses": {
                    "200": {
                        "description": "The JWK Set",
                        "content": {"application/jwk-set+json": {"schema": _JWKS}},
                    },
                    "404": _json("Authorization is off on this server", _OAUTH_ERROR),
                },
            }
        }
    for path, operation in (
        (smart.SMART_CONFIGURATION_PATH, "smart_configuration"),
        (smart.OPENID_CONFIGURATION_PATH, "openid_configuration"),
    ):
        paths[path] = {
            "get": {
                "operationId": operation,
                "security": [],
                "responses": {"200": _json("The discovery document", _DISCOVERY)},
            }
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "The SMART / OpenID Connect authorization server. Discovery: "
            f"{smart.SMART_CONFIGURATION_PATH}.",
        },
        "paths": paths,
        "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"}}},
    }
