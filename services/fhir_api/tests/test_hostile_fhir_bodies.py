"""Hostile request bodies to the FHIR API and the authorization server's routes it serves: a
body over the limit (declared or chunked), JSON nested 10 000 deep, an integer of half a
million digits, huge strings and arrays, wrong content types. Each gets a clear
OperationOutcome (413, 415 or 400/422), never a 500; the over-limit body is refused before it
is read whole (``services/auth/web_limits.py``), also over a real socket."""

from __future__ import annotations

import json
import select
import socket
from collections.abc import Callable, Iterator

import pytest
from fastapi.testclient import TestClient

from devtools.kafka_local import free_port
from devtools.testing import served
from services.auth.web_limits import FHIR_MAX_BODY_BYTES
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings
from services.fhir_api.wire import MAX_JSON_CONTAINERS

FHIR_JSON = {"Content-Type": "application/fhir+json"}
#: Where a FHIR JSON body goes: create, update, transaction.
WRITES = (("POST", "/fhir/Observation"), ("PUT", "/fhir/Observation/hostile-1"), ("POST", "/fhir"))
OBSERVATION = {"resourceType": "Observation", "status": "final", "code": {"text": "hostile"}}


def _issue(answer_json: dict[str, object]) -> dict[str, object]:
    assert answer_json["resourceType"] == "OperationOutcome", answer_json
    issues = answer_json["issue"]
    assert isinstance(issues, list) and issues
    first = issues[0]
    assert isinstance(first, dict)
    return first


def nested(depth: int) -> bytes:
    """An Observation whose extension nests ``depth`` arrays deep."""
    head = json.dumps(OBSERVATION)[:-1]
    return f'{head}, "extension": {"[" * depth}{"]" * depth}}}'.encode()


def chunks(total: int, size: int = 64 * 1024) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * size
        sent += size


def test_a_body_over_the_limit_is_refused_with_413(client: TestClient) -> None:
    body = b"{" + b" " * FHIR_MAX_BODY_BYTES + b"}"
    for method, path in WRITES:
        answer = client.request(method, path, content=body, headers=FHIR_JSON)
        assert answer.status_code == 413, (method, path, answer.text[:200])
        assert "larger than 1000000 bytes" in str(_issue(answer.json())["diagnostics"])
    # Without a Content-Length (chunked), counted as it arrives.
    streamed = client.post(
        "/fhir/Observation", content=chunks(5 * FHIR_MAX_BODY_BYTES), headers=FHIR_JSON
    )
    assert streamed.status_code == 413
    # The authorization server's form routes, served by the same app.
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    token = client.post("/auth/token", content=b"grant_type=" + b"a" * 2_000_000, headers=form)
    assert token.status_code == 413
    # Nothing was stored.
    assert client.get("/fhir/Observation").json().get("total", 0) == 0


def test_deep_nesting_huge_numbers_and_bad_json_are_400(client: TestClient) -> None:
    bodies = {
        "nested 10 000 deep": nested(10_000),
        "nested 1 000 objects deep": (
            b'{"resourceType": "Observation", "extension": '
            + b'[{"url": "http://x", "extension": ' * 1_000
            + b"[]"
            + b"}]" * 1_000
            + b"}"
        ),
        "an integer of 500 000 digits": (
            json.dumps(OBSERVATION)[:-1].encode() + b', "valueInteger": ' + b"9" * 500_000 + b"}"
        ),
        "not UTF-8": b'{"resourceType": "Observation", "status": "\xff\xfe"}',
        "not JSON": b"<Observation/>",
        "a JSON array": b"[" + b"1," * 1000 + b"1]",
    }
    for what, body in bodies.items():
        for method, path in WRITES:
            answer = client.request(method, path, content=body, headers=FHIR_JSON)
            assert answer.status_code == 400, (what, method, path, answer.text[:200])
            assert _issue(answer.json())["code"] == "structure", what


def test_huge_arrays_are_refused_before_validation(client: TestClient) -> None:
    many = OBSERVATION | {"identifier": [{}] * (MAX_JSON_CONTAINERS + 1)}
    for method, path in WRITES:
        answer = client.request(method, path, content=json.dumps(many), headers=FHIR_JSON)
        assert answer.status_code == 413, (method, path, answer.text[:200])
        assert _issue(answer.json())["code"] == "too-long"
    # Just under the limit is a resource like any other.
    fits = OBSERVATION | {"category": [{"text": "c"}] * 100}
    assert client.post("/fhir/Observation", json=fits, headers=FHIR_JSON).status_code == 201


def test_huge_strings_and_odd_numbers_answer_without_a_500(client: TestClient) -> None:
    long_text = OBSERVATION | {"code": {"text": "x" * (FHIR_MAX_BODY_BYTES - 200)}}
    created = client.post("/fhir/Observation", json=long_text, headers=FHIR_JSON)
    assert created.status_code == 201
    stored = client.get(f"/fhir/Observation/{created.json()['id']}").json()
    assert len(stored["code"]["text"]) == FHIR_MAX_BODY_BYTES - 200
    head = json.dumps(OBSERVATION)[:-1].encode()
    for number in (b"1e999999", b"NaN", b"-Infinity"):
        body = head + b', "valueQuantity": {"value": ' + number + b"}}"
        answer = client.post("/fhir/Observation", content=body, headers=FHIR_JSON)
        assert answer.status_code == 422, (number, answer.text[:200])


def test_wrong_content_types_are_415(client: TestClient) -> None:
    body = json.dumps(OBSERVATION).encode()
    for content_type in (
        "text/plain",
        "application/xml",
        "application/fhir+xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "",
    ):
        for method, path in WRITES:
            answer = client.request(
                method, path, content=body, headers={"Content-Type": content_type}
            )
            assert answer.status_code == 415, (content_type, method, path)
            assert "Content-Type must be" in str(_issue(answer.json())["diagnostics"])


@pytest.fixture
def served_api(settings: Settings) -> Iterator[int]:
    with served(create_app(settings), free_port()) as port:
        yield port


def _send_until_answered(port: int, head: bytes, chunk: bytes, most: int) -> tuple[bytes, int]:
    """Send ``head`` then ``chunk`` after ``chunk`` (up to ``most`` bytes) until the server
    answers; (the answer's first bytes, the body bytes sent by then)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head)
        sent = 0
        while sent < most:
            readable, writable, _ = select.select([conn], [conn], [], 30)
            if readable:
                break
            assert writable, "the server neither answered nor read for 30 s"
            try:
                sent += conn.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = conn.recv(4096)
    return answer, sent


@pytest.mark.integration
def test_a_real_server_refuses_before_reading_the_body(
    served_api: int, issue: Callable[..., str]
) -> None:
    """Over uvicorn: a declared 1 GB body is answered 413 at once (the client has sent only its
    first chunk), and a chunked one is answered soon after the limit, not after its end."""
    token = issue("system/*.write")
    headers = (
        "POST /fhir/Observation HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {token}\r\nContent-Type: application/fhir+json\r\n"
    )
    gigabyte = 1 << 30
    declared = (headers + f"Content-Length: {gigabyte}\r\n\r\n").encode()
    answer, sent = _send_until_answered(served_api, declared, b" " * 65536, gigabyte)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"OperationOutcome" in answer
    assert sent < 64 * FHIR_MAX_BODY_BYTES  # far from the gigabyte it declared
    chunk = b" " * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    chunked = (headers + "Transfer-Encoding: chunked\r\n\r\n").encode()
    answer, sent = _send_until_answered(served_api, chunked, framed, gigabyte)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 * FHIR_MAX_BODY_BYTES
