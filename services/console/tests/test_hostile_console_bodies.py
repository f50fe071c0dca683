"""Hostile request bodies to the console: its forms (review, prescription, appointment,
training job, re-drive, sign-out) and its APIs, sent a body over the limit (declared or
chunked), JSON nested 10 000 deep, huge strings and the wrong content type. Each gets a clear
JSON error (413 for the size, before the body is read whole: ``services/auth/web_limits.py``),
never a 500; nobody needs to be signed in for the size to be refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from services.auth.web_limits import CONSOLE_MAX_BODY_BYTES
from services.console.app import create_app
from services.console.config import Settings

STUDY = "1.2.826.0.1.3680043.8.498.5"
#: Every route of the console that takes a body.
POSTS = (
    f"/studies/{STUDY}/review",
    "/patients/hostile-1/medications",
    "/patients/hostile-1/appointments",
    "/patients/hostile-1/callbacks/cb-1",
    "/operator/jobs",
    "/operator/models/m/1/promote",
    "/operator/dead-letters/redrive",
    "/signout",
)


@pytest.fixture
def client(tmp_path: Path, signing_keys: Path) -> Iterator[TestClient]:
    (tmp_path / "store").mkdir()
    settings = Settings(
        storage_dir=tmp_path / "store",
        index_url=f"sqlite:///{tmp_path / 'index.db'}",
        audit_url=f"sqlite:///{tmp_path / 'audit.db'}",
        jwks_file=signing_keys,
        client_secret="console-secret",
        scan_interval_s=3600,
    )
    with TestClient(
        create_app(settings), raise_server_exceptions=False, follow_redirects=False
    ) as test_client:
        yield test_client


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(0, total, 65536):
        yield b"a" * 65536


def test_every_route_refuses_an_oversized_body_with_413(client: TestClient) -> None:
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    big = b"conclusion=" + b"a" * CONSOLE_MAX_BODY_BYTES
    for path in POSTS:
        for body in (big, _chunks(4 * CONSOLE_MAX_BODY_BYTES)):
            answer = client.post(path, content=body, headers=form)
            assert answer.status_code == 413, (path, answer.status_code, answer.text[:200])
            assert answer.json() == {
                "status": 413,
                "error": "This console accepts at most 256 KiB in one form. Go back, shorten "
                "what you typed and send it again.",
            }
    # Under the limit the same forms reach the sign-in check, as before.
    assert client.post(POSTS[0], data={"conclusion": "a" * 1000}).status_code == 401


def test_nested_json_huge_strings_and_wrong_types_get_no_500(client: TestClient) -> None:
    bodies = {
        "application/json": b"[" * 10_000 + b"]" * 10_000,
        "application/json; charset=utf-8": b'{"conclusion": "' + b"x" * 200_000 + b'"}',
        "multipart/form-data; boundary=x": b"--x\r\n" * 10_000,
        "text/plain": b"\xff\xfe" * 1000,
        "application/x-www-form-urlencoded": b"&" * 100_000 + b"=" * 100_000,
    }
    for content_type, body in bodies.items():
        for path in POSTS:
            answer = client.post(path, content=body, headers={"Content-Type": content_type})
            assert answer.status_code in (303, 400, 401, 403, 413, 422), (
                content_type,
                path,
                answer.status_code,
                answer.text[:200],
            )
            if answer.status_code != 303:  # sign-out without a session: to the sign-in page
                assert answer.headers["content-type"].startswith("application/json")


def test_dicomweb_and_apis_ignore_or_refuse_bodies(client: TestClient) -> None:
    """The read-only APIs: a GET with a huge body is refused unread, a STOW-RS attempt 405."""
    big = b"x" * (2 * CONSOLE_MAX_BODY_BYTES)
    stow = client.post(
        "/dicomweb/studies", content=big, headers={"Content-Type": "application/dicom"}
    )
    assert stow.status_code in (405, 413)
    for path in ("/dicomweb/studies", f"/api/studies/{STUDY}", "/healthz"):
        answer = client.request("GET", path, content=big)
        assert answer.status_code < 500, (path, answer.status_code, answer.text[:200])
