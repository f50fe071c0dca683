"""Verifying tokens from the published JWKS (``services.auth.jwks``), the way the chatbot
does: against a real FHIR API served by uvicorn (its ``/auth/jwks``), and against a small JWKS
server of the test's own for the cache's timing and failures. Time is a fake clock the test
moves; nothing sleeps."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from devtools.kafka_local import free_port
from devtools.testing import served
from services.auth.jwks import KeySetUnavailable, RemoteKeySet, fetch_jwks, parse_jwks
from services.auth.routes import JWKS_PATH, WELL_KNOWN_JWKS_PATH
from services.auth.scopes import AuthError, Scope
from services.auth.tokens import KeySet, SigningKey, TokenService, load_key_set, rotate
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

CLIENT, SECRET = "ehr-jwks", "ehr-secret-for-the-jwks-tests"
READ = [Scope.parse("patient/Observation.read")]


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Api:
    base: str
    app: FastAPI
    keys_file: Path

    @property
    def tokens(self) -> TokenService:
        tokens: TokenService = self.app.state.tokens
        return tokens


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The FHIR API with tokens required, served by uvicorn on a free port (its own key set:
    the tests here add keys to it)."""
    root = tmp_path_factory.mktemp("jwks-api")
    port = free_port()
    settings = Settings(
        database_url=f"sqlite:///{root / 'fhir.db'}",
        port=port,
        auth_mode="required",
        signing_keys_file=root / "auth" / "signing-keys.json",
        bootstrap_clients=f"{CLIENT}:{SECRET}:system/*.read",
    )
    app = create_app(settings)
    with served(app, port):
        yield Api(f"http://127.0.0.1:{port}", app, settings.signing_keys_file)


@pytest.fixture
def restore_tokens(api: Api) -> Iterator[None]:
    """Put back the API's token service a test replaced (a restart with new keys)."""
    tokens = api.app.state.tokens
    yield
    api.app.state.tokens = tokens


@pytest.mark.integration
def test_a_patient_token_verifies_from_the_apis_jwks(api: Api) -> None:
    token = api.tokens.issue("chatbot", READ, patient="p-7")[0]
    for path in (JWKS_PATH, WELL_KNOWN_JWKS_PATH):
        keys = RemoteKeySet(api.base + path, ttl=60)
        grant = keys.verify(token)
        assert grant.patient == "p-7" and grant.allows("Observation", "read")
        assert not grant.allows("Observation", "write") and grant.client_id == "chatbot"
        assert keys.fetches == 1
    # A token from the token endpoint (client credentials), as the EHR gets it.
    answer = httpx.post(
        api.base + "/auth/token",
        data={"grant_type": "client_credentials", "scope": "system/Observation.read"},
        auth=(CLIENT, SECRET),
    )
    assert answer.status_code == 200, answer.text
    grant = keys.verify(answer.json()["access_token"])
    assert grant.client_id == CLIENT and grant.patient is None
    assert grant.allows("Observation", "read") and keys.fetches == 1  # from the cache
    # The audience is the verifier's choice; a token for another one is refused.
    elsewhere = api.tokens.issue("chatbot", READ, "p-7", audience="scanwatch-chatbot")[0]
    assert keys.verify(elsewhere, audience="scanwatch-chatbot").patient == "p-7"
    with pytest.raises(AuthError, match="not meant for scanwatch-fhir-api") as caught:
        keys.verify(elsewhere)
    assert caught.value.status == 401
    with pytest.raises(AuthError, match="InvalidSignature"):
        keys.verify(token[:-6] + ("AAAAAA" if not token.endswith("AAAAAA") else "BBBBBB"))


@pytest.mark.integration
def test_a_key_added_since_is_fetched_once_and_made_up_kids_do_not_flood(
    api: Api, restore_tokens: None
) -> None:
    clock = Clock()
    keys = RemoteKeySet(api.base + JWKS_PATH, ttl=300, min_refresh_s=5, clock=clock)
    old_token = api.tokens.issue("chatbot", READ, "p-1")[0]
    assert keys.verify(old_token).patient == "p-1" and keys.fetches == 1
    # The API starts again with a key added to its set (what rotation will do).
    new_key = rotate(api.keys_file)
    api.app.state.tokens = TokenService(load_key_set(api.keys_file))
    new_token = api.tokens.issue("chatbot", READ, "p-2")[0]
    clock.now += 6  # the cache is fresh, but the kid is unknown: fetched again at once
    assert keys.verify(new_token).patient == "p-2" and keys.fetches == 2
    assert keys.key(new_key.kid) is not None
    assert keys.verify(old_token).patient == "p-1" and keys.fetches == 2  # both keys known
    # Tokens naming keys nobody has: refused, and the server is asked at most once per 5 s.
    strangers = [TokenService(KeySet.generate()).issue("x", READ, "p-1")[0] for _ in range(5)]
    for stranger in strangers:
        with pytest.raises(AuthError, match="unknown key"):
            keys.verify(stranger)
    assert keys.fetches == 2  # the last fetch was 0 s ago
    clock.now += 5
    with pytest.raises(AuthError, match="unknown key"):
        keys.verify(strangers[0])
    assert keys.fetches == 3


@dataclass
class JwksServer:
    """Serves ``document`` at ``url`` (``status`` other than 200: fails) and counts GETs."""

    url: str = ""
    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    status: int = 200
    gets: int = 0


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    state = JwksServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            state.gets += 1
            body = json.dumps(state.document).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/jwk-set+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/jwks"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_the_cache_lives_for_its_ttl_and_a_removed_key_stops_verifying(
    jwks_server: JwksServer,
) -> None:
    a, b = KeySet.generate(), KeySet.generate()
    jwks_server.document = {"keys": a.public_jwks()["keys"] + b.public_jwks()["keys"]}
    clock = Clock()
    keys = RemoteKeySet(jwks_server.url, ttl=60, clock=clock)
    token_a = TokenService(a).issue("chatbot", READ, "p-1")[0]
    token_b = TokenService(b).issue("chatbot", READ, "p-2")[0]
    assert keys.verify(token_a).patient == "p-1" and keys.verify(token_b).patient == "p-2"
    clock.now += 59
    assert keys.verify(token_a).patient == "p-1" and jwks_server.gets == 1
    jwks_server.document = b.public_jwks()  # key a retired by the server
    assert keys.verify(token_a).patient == "p-1"  # still cached
    clock.now += 1
    with pytest.raises(AuthError, match="unknown key"):
        keys.verify(token_a)  # the TTL is over: fetched again, a is gone
    assert jwks_server.gets == 2 and keys.verify(token_b).patient == "p-2"


def test_a_failing_server_keeps_the_known_keys_and_none_known_is_unavailable(
    jwks_server: JwksServer,
) -> None:
    signer = KeySet.generate()
    token = TokenService(signer).issue("chatbot", READ, "p-1")[0]
    jwks_server.status = 503
    clock = Clock()
    keys = RemoteKeySet(jwks_server.url, ttl=60, min_refresh_s=5, clock=clock)
    with pytest.raises(KeySetUnavailable, match="503"):
        keys.verify(token)
    with pytest.raises(KeySetUnavailable, match="503"):
        keys.verify(token)  # not asked again within 5 s
    assert jwks_server.gets == 1
    jwks_server.status = 200
    jwks_server.document = signer.public_jwks()
    clock.now += 5
    assert keys.verify(token).patient == "p-1" and jwks_server.gets == 2
    jwks_server.status = 503
    clock.now += 61  # the TTL is over and the server fails: the keys it gave keep verifying
    assert keys.verify(token).patient == "p-1" and jwks_server.gets == 3
    nowhere = RemoteKeySet(f"http://127.0.0.1:{free_port()}/auth/jwks", timeout=2)
    with pytest.raises(KeySetUnavailable, match="cannot fetch"):
        nowhere.verify(token)


def test_a_jwks_with_keys_of_other_kinds_yields_only_its_es256_keys() -> None:
    mine = SigningKey.generate()
    p384 = {**mine.public_jwk(), "crv": "P-384", "kid": "p384"}
    rsa = {"kty": "RSA", "kid": "rsa", "n": "sXch", "e": "AQAB"}
    off_curve = {**mine.public_jwk(), "y": mine.public_jwk()["x"], "kid": "off-curve"}
    encryption = {**mine.public_jwk(), "use": "enc", "kid": "enc"}
    document = {"keys": [rsa, p384, off_curve, encryption, "junk", mine.public_jwk()]}
    keys = parse_jwks(json.dumps(document).encode())
    assert list(keys) == [mine.kid]
    assert keys[mine.kid].public_numbers() == mine.public_key.public_numbers()
    for bad in (b"[]", b'{"keys": {}}', b"not json"):
        with pytest.raises(ValueError):
            parse_jwks(bad)
    with pytest.raises(ValueError, match="http"):
        RemoteKeySet("file:///etc/passwd")
    with pytest.raises(ValueError, match="http"):
        fetch_jwks("ftp://host/jwks")
