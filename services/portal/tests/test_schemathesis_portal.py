"""schemathesis against the patient portal's routes, signed in as a patient of the fake
hospital (``fakes.py``) with the session's CSRF token: generated and mutated requests (path
values, query strings, form bodies, headers) to every route never get a 5xx.

The portal publishes no OpenAPI document (its routes are a signed-in patient's pages and their
script's calls, not an API for other programs); the test reads the one FastAPI derives from
the routes, which names every route, path parameter and form field."""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient

from devtools.api_cases import generated_answers
from services.portal.app import create_app
from services.portal.tests.fakes import FakeHospital
from services.portal.tests.fakes import settings as portal_settings
from services.portal.tests.test_app import BASE, csrf, sign_in

pytestmark = pytest.mark.integration

#: Generated requests, spread over the portal's routes.
EXAMPLES = 60


def test_no_server_errors_signed_in(signing_keys: Path) -> None:
    hospital = FakeHospital(signing_keys)
    app = create_app(portal_settings(), transport=hospital.transport(), verifier=hospital.verify)
    client = TestClient(app, base_url=BASE, follow_redirects=False)
    sign_in(client, hospital)
    token = csrf(client, "/chat")
    cookie = "; ".join(f"{name}={value}" for name, value in client.cookies.items())
    document = app.openapi()
    assert {"/", "/chat", "/results/{observation_id}", "/care", "/events"} <= set(document["paths"])
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    # The event stream never ends by itself: left to the portal's own tests.
    schema = schema.exclude(path="/events")

    def signed_in(case: schemathesis.Case) -> schemathesis.Response | None:
        if case.path == "/signout":
            return None  # would end the session the other cases use
        headers = {"Cookie": cookie, "X-CSRF-Token": token}
        return case.call(headers=headers, allow_redirects=False)

    answered = generated_answers(schema, EXAMPLES, signed_in)
    assert any(code == 200 for code in answered) and any(code >= 400 for code in answered)
