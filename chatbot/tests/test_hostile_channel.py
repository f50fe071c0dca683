"""Hostile bodies to the patient channel over real HTTP (the channel's blueprint in a Sanic
server, as Rasa mounts it; the bot replaced by an echo): a body over the limit, declared or
chunked, is answered 413 without being read whole; JSON nested 10 000 deep, an integer of
60 000 digits, bytes that are not UTF-8, the wrong content type, a JSON array and a huge
message each get a clear JSON error; none of it reaches the bot; a good message still does."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from connectors.patient import MAX_BODY_BYTES, PatientInput
from rasa.core.channels.channel import UserMessage
from sanic import Sanic

from services.auth.tokens import KeySet
from tests.test_channel import jwks_url, keys, token

__all__ = ["jwks_url", "keys"]  # the fixtures, shared with the channel's other tests


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def webhook(jwks_url: str) -> Iterator[tuple[str, list[str]]]:
    """The channel's webhook served by Sanic on a free port; the texts the bot was given."""
    seen: list[str] = []

    async def on_new_message(message: UserMessage) -> None:
        seen.append(message.text or "")
        await message.output_channel.send_text_message(message.sender_id, f"echo {message.text}")

    app = Sanic(f"hostile_channel_{id(seen)}")
    app.blueprint(
        PatientInput.from_credentials({"jwks_url": jwks_url}).blueprint(on_new_message),
        url_prefix="/webhooks/patient",
    )
    port = _free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def start() -> Any:
            server = await app.create_server(
                host="127.0.0.1", port=port, return_asyncio_server=True
            )
            await server.startup()
            await server.start_serving()
            return server

        server = loop.run_until_complete(start())
        started.set()
        loop.run_forever()
        loop.run_until_complete(server.close())

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(30), "Sanic did not start"
    yield f"http://127.0.0.1:{port}/webhooks/patient/webhook", seen
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_hostile_bodies_get_clear_errors_and_reach_nothing(
    webhook: tuple[str, list[str]], keys: KeySet
) -> None:
    url, seen = webhook
    headers = {"Authorization": f"Bearer {token(keys, patient='p-hostile')}"}
    as_json = headers | {"Content-Type": "application/json"}
    too_big = post(url, b'{"message": "' + b"a" * MAX_BODY_BYTES + b'"}', as_json)
    assert too_big == (413, {"error": f"a message's body is at most {MAX_BODY_BYTES} bytes"})
    bodies = {
        "nested 10 000 deep": b'{"message": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
        "an integer of 60 000 digits": b'{"message": ' + b"9" * 60_000 + b"}",
        "not UTF-8": b'{"message": "\xff\xfe"}',
        "not JSON": b"message=hello",
        "a JSON array": b'["hello"]',
        "an empty body": b"",
    }
    for what, body in bodies.items():
        status, answer = post(url, body, as_json)
        assert status in (400, 413), (what, status, answer)
        assert "error" in answer, what
    status, answer = post(url, json.dumps({"message": "x" * 5000}).encode(), as_json)
    assert status == 413 and "at most 1000 characters" in answer["error"]
    assert seen == []
    status, answer = post(url, json.dumps({"message": "hello"}).encode(), as_json)
    assert status == 200 and answer[0]["text"] == "echo hello"
    assert seen == ["hello"]


def test_a_large_body_is_refused_before_it_is_read(
    webhook: tuple[str, list[str]], keys: KeySet
) -> None:
    """A declared gigabyte is answered at once; a chunked stream soon after the limit: the
    client has sent far less than it meant to when the 413 arrives."""
    url, _seen = webhook
    host_port = url.split("/")[2]
    host, port = host_port.split(":")
    head = (
        "POST /webhooks/patient/webhook HTTP/1.1\r\n"
        f"Host: {host_port}\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {token(keys, patient='p-big')}\r\n"
    )
    chunk = b" " * 65536
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    gigabyte = 1 << 30
    for extra, piece in (
        (f"Content-Length: {gigabyte}\r\n\r\n", chunk),
        ("Transfer-Encoding: chunked\r\n\r\n", framed),
    ):
        with socket.create_connection((host, int(port)), timeout=30) as conn:
            conn.sendall((head + extra).encode())
            sent = 0
            while sent < gigabyte:
                readable, writable, _ = select.select([conn], [conn], [], 30)
                if readable:
                    break
                assert writable, "the server neither answered nor read for 30 s"
                try:
                    sent += conn.send(piece)
                except (BrokenPipeError, ConnectionResetError):
                    break
            answer = conn.recv(4096)
        assert answer.startswith(b"HTTP/1.1 413"), (extra, answer[:200])
        assert sent < 64 * MAX_BODY_BYTES, (extra, sent)
