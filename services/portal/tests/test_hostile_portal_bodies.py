"""Hostile request bodies to the patient portal (against the fake hospital of ``fakes.py``):
a chat message or sign-out over the limit (declared or chunked) gets the portal's own 413 page,
before the body is read whole (``services/auth/web_limits.py``) and before the chatbot sees
anything; JSON nested 10 000 deep, huge strings, wrong content types and a chatbot answering
nonsense get a clear answer, never a 500."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from services.auth.web_limits import PORTAL_MAX_BODY_BYTES
from services.portal.app import create_app
from services.portal.tests.fakes import CHAT, FHIR, FakeHospital, settings
from services.portal.tests.test_app import BASE, csrf, sign_in


@pytest.fixture
def hospital(signing_keys: Path) -> FakeHospital:
    return FakeHospital(signing_keys)


@pytest.fixture
def client(hospital: FakeHospital) -> Iterator[TestClient]:
    app = create_app(settings(), transport=hospital.transport(), verifier=hospital.verify)
    with TestClient(
        app, base_url=BASE, follow_redirects=False, raise_server_exceptions=False
    ) as test_client:
        yield test_client


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(0, total, 65536):
        yield b"a" * 65536


def test_an_oversized_form_gets_the_413_page(client: TestClient, hospital: FakeHospital) -> None:
    sign_in(client, hospital)
    token = csrf(client, "/chat")
    form = {"Content-Type": "application/x-www-form-urlencoded", "X-CSRF-Token": token}
    big = b"message=" + b"a" * PORTAL_MAX_BODY_BYTES
    for path in ("/chat", "/signout"):
        for body in (big, _chunks(8 * PORTAL_MAX_BODY_BYTES)):
            answer = client.post(path, content=body, headers=form)
            assert answer.status_code == 413, (path, answer.status_code, answer.text[:300])
            assert "What you sent is too large" in answer.text
            assert "at most 64 KiB" in answer.text
            assert answer.headers["content-security-policy"]
    assert hospital.chat_seen == []
    # Still signed in, and a message of a normal size goes through.
    said = client.post(
        "/chat",
        data={"message": "hello"},
        headers={"X-CSRF-Token": token, "Accept": "application/json"},
    )
    assert said.status_code == 200 and hospital.chat_seen


def test_nested_json_huge_strings_and_wrong_types_get_no_500(
    client: TestClient, hospital: FakeHospital
) -> None:
    sign_in(client, hospital)
    token = csrf(client, "/chat")
    bodies = {
        "application/json": b"[" * 10_000 + b"]" * 10_000,
        "application/json; charset=utf-8": b'{"message": "' + b"x" * 60_000 + b'"}',
        "multipart/form-data; boundary=x": b"--x\r\n" * 10_000,
        "text/plain": b"\xff\xfe" * 1000,
        "application/x-www-form-urlencoded": b"message=" + b"x" * 60_000,
    }
    for content_type, body in bodies.items():
        answer = client.post(
            "/chat", content=body, headers={"Content-Type": content_type, "X-CSRF-Token": token}
        )
        assert answer.status_code in (303, 400, 422), (content_type, answer.status_code)
    assert hospital.chat_seen == []  # none of it reached the chatbot


@pytest.mark.parametrize(
    "reply",
    [
        b"[" * 10_000 + b"]" * 10_000,
        b'{"text": "not a list"}',
        b'[{"text": "' + b"x" * 2_000_000 + b'"}]',
        b"not json",
        b'[{"buttons": "nope"}, 7, null]',
    ],
)
def test_a_chatbot_answering_nonsense_gets_no_500(signing_keys: Path, reply: bytes) -> None:
    hospital = FakeHospital(signing_keys)

    def handle(request: httpx.Request) -> httpx.Response:
        if str(request.url) == CHAT:
            return httpx.Response(200, content=reply, headers={"Content-Type": "application/json"})
        return hospital.handle(request)

    app = create_app(settings(), transport=httpx.MockTransport(handle), verifier=hospital.verify)
    with TestClient(
        app, base_url=BASE, follow_redirects=False, raise_server_exceptions=False
    ) as client:
        sign_in(client, hospital)
        answer = client.post(
            "/chat",
            data={"message": "hello"},
            headers={"X-CSRF-Token": csrf(client, "/chat"), "Accept": "application/json"},
        )
        assert answer.status_code == 200, answer.text[:300]
        lines = answer.json()
        assert lines[0] == {"speaker": "you", "text": "hello", "buttons": []}


def test_a_fhir_api_answering_html_is_a_503_page(signing_keys: Path) -> None:
    """A proxy's page (or any HTML) where the FHIR API should answer: the portal says the
    records cannot be shown right now, as when the API is down."""
    hospital = FakeHospital(signing_keys)

    def handle(request: httpx.Request) -> httpx.Response:
        if str(request.url).startswith(FHIR) and "/.well-known/" not in str(request.url):
            return httpx.Response(
                200, text="<html>Gateway</html>", headers={"Content-Type": "text/html"}
            )
        return hospital.handle(request)

    app = create_app(settings(), transport=httpx.MockTransport(handle), verifier=hospital.verify)
    with TestClient(
        app, base_url=BASE, follow_redirects=False, raise_server_exceptions=False
    ) as client:
        sign_in(client, hospital)
        for path in ("/", "/care", "/results/fragment"):
            answer = client.get(path)
            assert answer.status_code == 503, (path, answer.status_code)
            assert "cannot be shown right now" in answer.text
