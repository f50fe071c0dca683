"""schemathesis against the console's staff pages and their scripts' calls, signed in as a
staff member holding every role, with the session's CSRF token, while the FHIR API does not
answer (a port nothing listens on) and there is no Kafka: generated and mutated requests (path
values, query strings, form bodies) to every route never get a 5xx other than the 503 that
says a service is unavailable.

These routes publish no OpenAPI document (a signed-in browser's, behind a session cookie and
CSRF: ``services/console/openapi.py``); the test reads the one FastAPI derives from them."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import schemathesis
from fastapi.openapi.utils import get_openapi

from devtools.api_cases import generated_answers
from devtools.kafka_local import free_port
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.console.app import create_app
from services.console.config import Settings

pytestmark = pytest.mark.integration

#: Generated requests, spread over the pages' routes.
EXAMPLES = 60
#: Routes left out: event streams never end by themselves; sign-out ends the session.
SKIPPED = ("/worklist/events", "/operator/events", "/signout")


@pytest.fixture(params=["refused", "html"])
def fhir_base_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A FHIR API that does not answer (a port nothing listens on), or a server that answers
    every request with an HTML page (a misdirected proxy)."""
    if request.param == "refused":
        yield f"http://127.0.0.1:{free_port()}/fhir"
        return

    class Html(BaseHTTPRequestHandler):
        def _page(self) -> None:
            body = b"<html><body>Not FHIR</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = _page  # noqa: N815 (http.server's names)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Html)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/fhir"
    server.shutdown()


def test_no_server_errors_signed_in(tmp_path: Path, signing_keys: Path, fhir_base_url: str) -> None:
    (tmp_path / "store").mkdir()
    console = Settings(
        storage_dir=tmp_path / "store",
        index_url=f"sqlite:///{tmp_path / 'index.db'}",
        audit_url=f"sqlite:///{tmp_path / 'audit.db'}",
        jwks_file=signing_keys,
        client_secret="console-secret",
        fhir_base_url=fhir_base_url,
        scan_interval_s=3600,
    )
    app = create_app(console)
    web = app.state.web
    token, _ = TokenService(load_key_set(signing_keys)).issue(
        "staff-1", [Scope.parse("user/*.read"), Scope.parse("user/Observation.write")]
    )
    session = web.sessions.new()
    session.account = "staff-1"
    session.roles = ("clinician", "operator", "admin")
    session.fhir_user = "Practitioner/staff-1"
    session.access_token = token
    session.expires_at = time.monotonic() + 3600
    document = get_openapi(title=app.title, version=app.version, routes=app.routes)
    assert {"/worklist", "/studies/{study}/review", "/patients/{patient_id}/medications"} <= set(
        document["paths"]
    )
    schema = schemathesis.openapi.from_dict(document)
    schema.app = app
    for path in SKIPPED:
        schema = schema.exclude(path=path)
    schema = schema.exclude(path_regex="^/dicomweb")  # its own test, with a bearer token
    cookie = f"{console.session_cookie}={session.id}"
    headers = {"Cookie": cookie, "X-CSRF-Token": session.csrf}
    answered = generated_answers(
        schema,
        EXAMPLES,
        lambda case: case.call(headers=headers, allow_redirects=False),
        allowed_5xx=frozenset({503}),  # FHIR not answering: the console says so
    )
    assert any(code == 200 for code in answered) and any(code >= 400 for code in answered)
