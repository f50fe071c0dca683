"""schemathesis against the OpenAPI document at ``/openapi.json``, on both backends: generated
requests (random ids, search values, bodies, headers) to every documented operation never get a
5xx. Bounded examples per operation to stay fast; authorized with a read+write token so the
requests reach the handlers instead of stopping at the 401."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from schemathesis.python.asgi import shutdown_lifespans

from devtools.api_cases import generated_answers
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.fhir_api.app import OPENAPI_PATH, create_app
from services.fhir_api.config import Settings
from services.fhir_api.tests.conftest import BACKENDS

pytestmark = pytest.mark.integration

#: Generated requests per backend, spread over every documented operation.
EXAMPLES = 300


@pytest.fixture(scope="module", params=BACKENDS)
def app_token(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, signing_keys: Path
) -> Iterator[tuple[FastAPI, str]]:
    """One app per backend for the whole module (schemathesis keeps its lifespan running)."""
    root = tmp_path_factory.mktemp("schemathesis")
    if request.param == "sqlite":
        database_url = f"sqlite:///{root / 'fhir.db'}"
    else:
        database_url = request.getfixturevalue("postgres").database_url()
    settings = Settings(
        database_url=database_url,
        auth_mode="required",
        signing_keys_file=signing_keys,
        subscription_max_attempts=1,
        subscription_timeout_s=0.5,
    )
    token = TokenService(load_key_set(signing_keys)).issue(
        "schemathesis", [Scope.parse("system/*.read"), Scope.parse("system/*.write")], None, None
    )[0]
    yield create_app(settings), token
    shutdown_lifespans()


def test_openapi_document_lists_every_search_parameter(client: TestClient) -> None:
    document = client.get(OPENAPI_PATH).json()
    names = {p["name"] for p in document["paths"]["/fhir/Observation"]["get"]["parameters"]}
    assert {"patient", "code", "date", "_sort", "_count", "_include"} <= names
    assert {"/fhir/Patient/{id}/_history/{vid}", "/fhir/Subscription"} <= set(document["paths"])


def test_no_server_errors(app_token: tuple[FastAPI, str]) -> None:
    app, token = app_token
    schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, app)
    answered = generated_answers(
        schema, EXAMPLES, lambda case: case.call(headers={"Authorization": f"Bearer {token}"})
    )
    # The run reached the handlers: successes and clean rejections both occurred.
    assert any(code < 300 for code in answered) and any(400 <= code < 500 for code in answered)
