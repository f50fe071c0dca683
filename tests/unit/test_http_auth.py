"""Every HTTP route of every service refuses a caller without credentials (401), except the
few that must be open: liveness (/healthz), the sign-in pages and the documents a client
reads before it has a token (discovery, the public keys, the CapabilityStatement), and static
assets. Each app's routes are read from the app itself, so a route added later is walked too
and fails here until it is either protected or listed as open with its reason.

Also: /metrics needs the metrics token wherever one is set (every service, whatever its HTTP
stack) and fails closed off loopback without one, and a service bound off loopback refuses to
start without the secrets that protect it, naming each."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import ValidationError
from starlette.routing import Mount, Route

from scanwatch.http_access import (
    METRICS_CHALLENGE,
    bearer_matches,
    guard_wsgi,
    metrics_allowed,
    metrics_closed_warning,
)

METRICS_TOKEN = "metrics-token-for-tests-0123456789"
#: A value for each path parameter (a FHIR type the API stores; anything else plain).
PATH_VALUES = {"resource_type": "Observation", "path": "a/b/c/d/e"}
#: Sent as a script would (web pages answer a browser with a redirect to /signin instead).
JSON = {"Accept": "application/json"}

#: Routes open by design, per app: (path template, why).
FHIR_OPEN = {
    "/healthz": "liveness",
    "/fhir/metadata": "the CapabilityStatement says how to authenticate (FHIR: no token)",
    "/fhir/.well-known/smart-configuration": "SMART discovery, read before any token",
    "/.well-known/smart-configuration": "SMART discovery",
    "/.well-known/openid-configuration": "OpenID discovery",
    "/auth/jwks": "the public keys every verifier fetches",
    "/.well-known/jwks.json": "the public keys",
    "/auth/authorize": "the sign-in page itself",
    "/auth/activate": "an invite's activation page (the one-time link is the credential)",
    "/auth/static/auth.css": "the sign-in pages' stylesheet",
    "/auth/token": "where a client proves itself (secret, code + PKCE): checked below",
    "/openapi.json": "the API's description, no data",
    "/auth/openapi.json": "the authorization server's API description, no data",
}
WEB_OPEN = {
    "/healthz": "liveness",
    "/signin": "the page that says 'sign in'",
    "/login": "starts a sign-in at the authorization server",
    "/callback": "where the authorization server sends the person back",
    "/signout": "ends this browser's session if it has one: nothing to protect",
    "/openapi.json": "the API's description (DICOMweb's), no data",
}


def _path(template: str) -> str:
    return re.sub(r"{(\w+)(:\w+)?}", lambda m: PATH_VALUES.get(m.group(1), "1.2.3"), template)


def _routes(routes: Iterable[Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route, included routers' too (mounted static files
    excluded: they are assets)."""
    for route in routes:
        if isinstance(route, Mount):
            continue
        if hasattr(route, "original_router"):  # an included router (this FastAPI's own)
            yield from _routes(route.original_router.routes, prefix + route.include_context.prefix)
            continue
        assert isinstance(route, Route), route
        for method in sorted(route.methods or ()):
            if method not in ("HEAD", "OPTIONS"):
                yield method, prefix + route.path


def _is_asset(template: str) -> bool:
    return template.startswith("/static/")


def walk(
    client: TestClient, open_routes: dict[str, str], expect: Callable[[Any], bool]
) -> set[str]:
    """Call every route without credentials; return the templates walked. A route not in
    ``open_routes`` (and not a static asset) must answer as ``expect`` says."""
    walked = set()
    for method, template in _routes(client.app.routes):  # type: ignore[attr-defined]
        walked.add(template)
        if template in open_routes or _is_asset(template) or template == "/metrics":
            continue
        body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
        answer = client.request(method, _path(template), headers=JSON, **body)
        assert expect(answer), (method, template, answer.status_code, answer.text[:200])
    metrics = client.get("/metrics")
    assert metrics.status_code == 401, metrics.text
    assert metrics.headers["www-authenticate"] == METRICS_CHALLENGE
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and "# TYPE" in scraped.text
    assert client.get("/healthz").status_code in (200, 503)  # open, whatever it says
    return walked


def _unauthorized(answer: Any) -> bool:
    """401, or a page's redirect to the sign-in page (the console's landing page)."""
    redirected = answer.status_code == 303 and answer.headers["location"] == "/signin"
    return bool(answer.status_code == 401 or redirected)


def _unauthorized_or_read_only(answer: Any) -> bool:
    """The console's DICOMweb catch-all (``/dicomweb/{rest:path}``) refuses every write
    method (405: it stores nothing, for anyone) and a path DICOMweb does not define (404)
    before it looks at the caller: neither answer holds data."""
    read_only = answer.status_code == 405 and "read only" in answer.text
    undefined = answer.status_code == 404 and "no such DICOMweb resource" in answer.text
    return _unauthorized(answer) or read_only or undefined


def test_every_fhir_and_auth_route_needs_a_token(tmp_path: Path, signing_keys: Path) -> None:
    from services.fhir_api.app import create_app
    from services.fhir_api.config import Settings

    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
        signing_keys_file=signing_keys,
        metrics_token=METRICS_TOKEN,
    )
    assert settings.auth_mode == "required"  # the default: no setting turns tokens on
    # On loopback, as the dev stack serves it (the revocation endpoint wants https elsewhere).
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8080") as client:
        walked = walk(client, FHIR_OPEN, _unauthorized)
        # The token endpoint is the credential check itself: no client credentials, no token.
        grant = {"grant_type": "client_credentials", "scope": "system/*.read"}
        assert client.post("/auth/token", data=grant).status_code == 401
    assert "/fhir/{resource_type}/{resource_id}" in walked
    assert set(FHIR_OPEN) <= walked, set(FHIR_OPEN) - walked  # no stale entries


def test_every_console_route_needs_a_staff_session_or_token(
    tmp_path: Path, signing_keys: Path
) -> None:
    from services.console.app import create_app
    from services.console.config import Settings

    (tmp_path / "store").mkdir()
    settings = Settings(
        storage_dir=tmp_path / "store",
        index_url=f"sqlite:///{tmp_path / 'index.db'}",
        audit_url=f"sqlite:///{tmp_path / 'audit.db'}",
        jwks_file=signing_keys,
        client_secret="console-secret-for-tests",
        metrics_token=METRICS_TOKEN,
        scan_interval_s=3600,
    )
    with TestClient(create_app(settings), follow_redirects=False) as client:
        walked = walk(client, WEB_OPEN, _unauthorized_or_read_only)
    assert {"/dicomweb/studies", "/worklist", "/studies/{study}", "/operator/pipeline"} <= walked


def test_every_portal_route_needs_a_signed_in_patient(tmp_path: Path) -> None:
    from services.portal.app import create_app
    from services.portal.tests.fakes import settings

    app = create_app(settings(metrics_token=METRICS_TOKEN))
    with TestClient(app, follow_redirects=False) as client:
        walked = walk(client, WEB_OPEN, _unauthorized)
    assert {"/", "/results/{observation_id}", "/chat", "/events", "/care"} <= walked


def _wsgi_get(app: Callable[..., Iterable[bytes]], path: str, token: str | None) -> str:
    environ: dict[str, Any] = {"PATH_INFO": path}
    setup_testing_defaults(environ)
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = f"Bearer {token}"
    status: list[str] = []
    b"".join(app(environ, lambda s, _headers: status.append(s)))
    return status[0]


def test_the_listener_and_model_server_metrics_ports_need_the_token(tmp_path: Path) -> None:
    from dicom_listener.health import http_app

    class Healthy:
        def run(self) -> tuple[bool, dict[str, str]]:
            return True, {"status": "ok"}

    app = http_app(CollectorRegistry(), Healthy(), METRICS_TOKEN, "0.0.0.0")  # type: ignore[arg-type]
    assert _wsgi_get(app, "/metrics", None).startswith("401")
    assert _wsgi_get(app, "/metrics", "wrong").startswith("401")
    assert _wsgi_get(app, "/anything", None).startswith("401")
    assert _wsgi_get(app, "/metrics", METRICS_TOKEN).startswith("200")
    assert _wsgi_get(app, "/healthz", None).startswith("200")
    # The model server's port is the same guard around prometheus_client's app.
    from prometheus_client import make_wsgi_app

    guarded = guard_wsgi(make_wsgi_app(CollectorRegistry()), METRICS_TOKEN, "0.0.0.0")
    assert _wsgi_get(guarded, "/metrics", None).startswith("401")
    assert _wsgi_get(guarded, "/metrics", METRICS_TOKEN).startswith("200")
    # Without a token: open on loopback (development), closed elsewhere.
    open_port = guard_wsgi(make_wsgi_app(CollectorRegistry()), None, "127.0.0.1")
    assert _wsgi_get(open_port, "/metrics", None).startswith("200")
    closed = guard_wsgi(make_wsgi_app(CollectorRegistry()), None, "0.0.0.0")
    assert _wsgi_get(closed, "/metrics", METRICS_TOKEN).startswith("401")


def test_bearer_matching() -> None:
    assert bearer_matches(f"Bearer {METRICS_TOKEN}", METRICS_TOKEN)
    assert bearer_matches(f"bearer  {METRICS_TOKEN} ", METRICS_TOKEN)
    assert not bearer_matches(f"Basic {METRICS_TOKEN}", METRICS_TOKEN)
    assert not bearer_matches("Bearer ", METRICS_TOKEN)
    assert not bearer_matches(None, METRICS_TOKEN)
    assert not bearer_matches(f"Bearer {METRICS_TOKEN}x", METRICS_TOKEN)


def _refused(build: Callable[[], object], *settings: str) -> None:
    with pytest.raises(ValidationError) as refused:
        build()
    for name in settings:
        assert name in str(refused.value), (name, str(refused.value))


def test_each_service_off_loopback_refuses_to_start_without_its_secrets(
    tmp_path: Path, signing_keys: Path
) -> None:
    """A service other hosts can reach names each setting that protects it; with them set it
    starts (so the refusal is about them, not about the address)."""
    from dicom_listener.config import Settings as ListenerSettings
    from services.fhir_api.config import Settings as FhirSettings
    from services.portal.config import Settings as PortalSettings

    net = "0.0.0.0"
    _refused(lambda: FhirSettings(host=net, auth_mode="off"), "SCANWATCH_FHIR_AUTH_MODE")
    _refused(lambda: FhirSettings(host=net), "SCANWATCH_FHIR_SIGNING_KEYS_FILE")
    assert FhirSettings(host=net, signing_keys_file=signing_keys).auth_mode == "required"

    public = {"public_url": "https://portal.example"}
    _refused(lambda: PortalSettings(host=net, **public), "SCANWATCH_PORTAL_CLIENT_SECRET")
    assert PortalSettings(host=net, client_secret="s" * 32, **public).host == net

    _refused(lambda: ListenerSettings(host=net), "SCANWATCH_LISTENER_ALLOWED_CALLING_AES")
    assert ListenerSettings(host=net, allowed_calling_aes="MR1@10.1.2.3").host == net


def test_metrics_fail_closed_off_loopback_without_a_token(
    tmp_path: Path, signing_keys: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No metrics token: /metrics is open on loopback (make run) and refuses everyone on an
    address other machines reach, and the service says which setting opens it."""
    from services.fhir_api.app import create_app
    from services.fhir_api.config import Settings

    assert metrics_allowed(None, None, "127.0.0.1")
    assert not metrics_allowed(None, None, "0.0.0.0")
    assert not metrics_allowed(f"Bearer {METRICS_TOKEN}", None, "10.1.2.3")
    assert metrics_allowed(f"Bearer {METRICS_TOKEN}", METRICS_TOKEN, "0.0.0.0")
    assert not metrics_allowed(None, METRICS_TOKEN, "127.0.0.1")  # a token binds loopback too
    for host, status in (("127.0.0.1", 200), ("0.0.0.0", 401)):
        settings = Settings(
            host=host,
            database_url=f"sqlite:///{tmp_path / 'fhir.db'}",
            signing_keys_file=signing_keys,
        )
        with TestClient(create_app(settings)) as client:
            assert client.get("/metrics").status_code == status, host
            assert client.get("/healthz").status_code == 200
    caplog.clear()
    metrics_closed_warning("0.0.0.0", None, "SCANWATCH_FHIR_METRICS_TOKEN")
    metrics_closed_warning("127.0.0.1", None, "SCANWATCH_FHIR_METRICS_TOKEN")
    metrics_closed_warning("0.0.0.0", METRICS_TOKEN, "SCANWATCH_FHIR_METRICS_TOKEN")
    assert [getattr(r, "setting", None) for r in caplog.records] == ["SCANWATCH_FHIR_METRICS_TOKEN"]


def test_the_workers_web_page_serves_only_liveness_and_guarded_metrics(tmp_path: Path) -> None:
    """Faust's own pages (the study table's keys, who owns them) are off; /metrics needs
    the token; /healthz and Faust's index (a constant status) stay open."""
    import asyncio

    from aiohttp.test_utils import TestClient as AioClient
    from aiohttp.test_utils import TestServer

    from inference_worker.app import STUDY_TABLE, create_app
    from inference_worker.config import Settings
    from inference_worker.tests.test_worker_app import FakeScorer

    settings = Settings(store="memory://", data_dir=tmp_path, metrics_token=METRICS_TOKEN)
    web = create_app(settings, scorer=FakeScorer()).web
    web.init_server()  # what the worker does when it starts its web server
    routes = {r.resource.canonical for r in web.web_app.router.routes() if r.resource}
    assert routes == {"/", "/healthz", "/metrics"}

    async def calls() -> dict[str, int]:
        async with AioClient(TestServer(web.web_app)) as client:
            answers = {}
            for path in ("/metrics", "/healthz", "/", f"/table/{STUDY_TABLE}/", "/router/"):
                answers[path] = (await client.get(path)).status
            scrape = await client.get(
                "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
            )
            answers["scrape"] = scrape.status
            return answers

    assert asyncio.run(calls()) == {
        "/metrics": 401,
        "/healthz": 200,
        "/": 200,
        f"/table/{STUDY_TABLE}/": 404,
        "/router/": 404,
        "scrape": 200,
    }
