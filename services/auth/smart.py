"""Discovery documents: SMART App Launch 2.x ``.well-known/smart-configuration`` and OpenID
Connect's ``.well-known/openid-configuration``, from the issuer's URL (plain code: the FHIR
API's CapabilityStatement uses the same endpoint paths)."""

from __future__ import annotations

from typing import Any

from services.auth.server import SUPPORTED_SCOPES

TOKEN_PATH = "/auth/token"
AUTHORIZE_PATH = "/auth/authorize"
REVOKE_PATH = "/auth/revoke"
ACTIVATE_PATH = "/auth/activate"
JWKS_PATH = "/auth/jwks"
SMART_CONFIGURATION_PATH = "/.well-known/smart-configuration"
OPENID_CONFIGURATION_PATH = "/.well-known/openid-configuration"

#: What this server supports (SMART App Launch 2.x §"Capability Sets").
CAPABILITIES = (
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "context-standalone-patient",
    "permission-patient",
    "permission-offline",
    "permission-v1",
    "sso-openid-connect",
    "authorize-post",
)
#: Scopes a backend service (client credentials) may be registered with.
BACKEND_SCOPES = ("system/*.read", "system/*.write", "system/Observation.read")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")
TOKEN_AUTH_METHODS = ("client_secret_basic", "client_secret_post", "none")


def endpoints(issuer: str) -> dict[str, str]:
    """The endpoint URLs of the server at ``issuer`` (its root URL)."""
    root = issuer.rstrip("/")
    return {
        "authorize": f"{root}{AUTHORIZE_PATH}",
        "token": f"{root}{TOKEN_PATH}",
        "revoke": f"{root}{REVOKE_PATH}",
        "jwks": f"{root}{JWKS_PATH}",
    }


def smart_configuration(issuer: str) -> dict[str, Any]:
    """``/.well-known/smart-configuration`` (also served under the FHIR base URL)."""
    urls = endpoints(issuer)
    return {
        "issuer": issuer.rstrip("/"),
        "jwks_uri": urls["jwks"],
        "authorization_endpoint": urls["authorize"],
        "token_endpoint": urls["token"],
        "revocation_endpoint": urls["revoke"],
        "grant_types_supported": list(GRANT_TYPES),
        "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "response_types_supported": ["code"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": [*SUPPORTED_SCOPES, "patient/Observation.read", *BACKEND_SCOPES],
        "capabilities": list(CAPABILITIES),
    }


def openid_configuration(issuer: str) -> dict[str, Any]:
    """OpenID Connect discovery (``sso-openid-connect``): how to check an ``id_token``."""
    urls = endpoints(issuer)
    return {
        "issuer": issuer.rstrip("/"),
        "authorization_endpoint": urls["authorize"],
        "token_endpoint": urls["token"],
        "revocation_endpoint": urls["revoke"],
        "jwks_uri": urls["jwks"],
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
        "scopes_supported": ["openid", "fhirUser", "offline_access", "launch/patient"],
        "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "fhirUser"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": list(TOKEN_AUTH_METHODS),
        "grant_types_supported": ["authorization_code", "refresh_token"],
    }
