"""SMART App Launch discovery: ``/.well-known/smart-configuration`` at the root and under the
FHIR base, OpenID Connect's configuration, and the CapabilityStatement's oauth-uris; from the
request's URL, or the configured issuer."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from services.auth.config import AuthSettings
from services.fhir_api.app import create_app
from services.fhir_api.capability import SMART_EXTENSION
from services.fhir_api.config import Settings

CAPABILITIES = {
    "launch-standalone",
    "client-public",
    "client-confidential-symmetric",
    "context-standalone-patient",
    "permission-patient",
    "permission-offline",
    "sso-openid-connect",
    "authorize-post",
}


def _client(tmp_path: Path, signing_keys: Path, issuer: str | None = None) -> TestClient:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        auth_mode="required",
        signing_keys_file=signing_keys,
    )
    app = create_app(settings, auth_settings=AuthSettings(issuer=issuer))
    return TestClient(app, base_url="http://127.0.0.1:8080")


def test_the_smart_configuration_describes_this_server(tmp_path: Path, signing_keys: Path) -> None:
    with _client(tmp_path, signing_keys) as client:
        root = client.get("/.well-known/smart-configuration")
        under_fhir = client.get("/fhir/.well-known/smart-configuration")
        openid = client.get("/.well-known/openid-configuration").json()
        security = client.get("/fhir/metadata").json()["rest"][0]["security"]
    assert root.status_code == under_fhir.status_code == 200
    smart = root.json()
    assert smart == under_fhir.json()
    base = "http://127.0.0.1:8080"
    assert smart["issuer"] == openid["issuer"] == base
    assert smart["authorization_endpoint"] == f"{base}/auth/authorize"
    assert smart["token_endpoint"] == f"{base}/auth/token"
    assert smart["revocation_endpoint"] == f"{base}/auth/revoke"
    assert smart["jwks_uri"] == openid["jwks_uri"] == f"{base}/auth/jwks"
    assert smart["code_challenge_methods_supported"] == ["S256"]
    assert {"authorization_code", "refresh_token", "client_credentials"} <= set(
        smart["grant_types_supported"]
    )
    assert CAPABILITIES <= set(smart["capabilities"])
    assert {
        "launch/patient",
        "patient/*.read",
        "patient/CommunicationRequest.write",
        "openid",
        "fhirUser",
        "offline_access",
    } <= set(smart["scopes_supported"])
    assert openid["id_token_signing_alg_values_supported"] == ["ES256"]
    (oauth_uris,) = [e for e in security["extension"] if e["url"] == SMART_EXTENSION]
    assert {e["url"]: e["valueUri"] for e in oauth_uris["extension"]} == {
        "token": f"{base}/auth/token",
        "authorize": f"{base}/auth/authorize",
        "revoke": f"{base}/auth/revoke",
    }


def test_a_configured_issuer_names_every_endpoint(tmp_path: Path, signing_keys: Path) -> None:
    with _client(tmp_path, signing_keys, "https://auth.hospital.example/") as client:
        smart = client.get("/fhir/.well-known/smart-configuration").json()
        metadata = client.get("/fhir/metadata").json()
    assert smart["issuer"] == "https://auth.hospital.example"
    assert smart["token_endpoint"] == "https://auth.hospital.example/auth/token"
    uris = metadata["rest"][0]["security"]["extension"][0]["extension"]
    assert all(u["valueUri"].startswith("https://auth.hospital.example/auth/") for u in uris)
