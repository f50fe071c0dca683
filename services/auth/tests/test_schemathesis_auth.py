"""schemathesis against the authorization server's OpenAPI document (``/auth/openapi.json``,
served by the FHIR API's app as in production): generated and mutated requests to the token,
revocation, JWKS, discovery, authorize and activation routes never get a 5xx, and every answer
has a documented status, content type and body shape. A registered backend client and a SMART
app make some generated requests reach the grants instead of stopping at "unknown client"."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devtools.api_cases import generated_answers
from services.auth import clients
from services.auth.openapi import OPENAPI_PATH
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

pytestmark = pytest.mark.integration

#: Generated requests, spread over the ten documented operations.
EXAMPLES = 150


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory, signing_keys: Path) -> Iterator[FastAPI]:
    root = tmp_path_factory.mktemp("schemathesis-auth")
    fhir = create_app(
        Settings(
            database_url=f"sqlite:///{root / 'fhir.db'}",
            auth_mode="required",
            signing_keys_file=signing_keys,
        )
    )
    yield fhir
    shutdown_lifespans()


def test_the_document_lists_every_route(app: FastAPI) -> None:
    from fastapi.testclient import TestClient

    with TestClient(app) as client:
        document = client.get(OPENAPI_PATH).json()
    assert {
        "/auth/token",
        "/auth/revoke",
        "/auth/authorize",
        "/auth/activate",
        "/auth/jwks",
        "/.well-known/jwks.json",
        "/.well-known/smart-configuration",
        "/.well-known/openid-configuration",
    } == set(document["paths"])


def test_no_server_errors_and_answers_as_documented(app: FastAPI) -> None:
    schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, app)
    engine = app.state.client_engine
    clients.register_client(engine, "st-backend", "system/*.read", secret="st-secret-123")
    clients.register_app(engine, "st-app", ["http://127.0.0.1:9/callback"])
    answered = generated_answers(
        schema,
        EXAMPLES,
        lambda case: case.call(),
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    assert any(code < 300 for code in answered) and any(400 <= code < 500 for code in answered)
