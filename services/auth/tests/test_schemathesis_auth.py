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
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

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
    cases = st.one_of(
        schema.as_strategy(),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    answered: list[int] = []

    @given(case=cases)
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def as_documented(case: schemathesis.Case) -> None:
        response = case.call()
        answered.append(response.status_code)
        assert response.status_code < 500, (
            f"{case.method} {case.formatted_path} {case.query} {case.body!r:.300}: "
            f"{response.status_code} {response.text[:300]}"
        )
        case.validate_response(
            response,
            checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
        )

    as_documented()
    assert any(code < 300 for code in answered) and any(400 <= code < 500 for code in answered)
