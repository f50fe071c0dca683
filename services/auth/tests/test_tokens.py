"""Access tokens signed with ES256 keys from a key-set file: what verifies, what is refused
(wrong or unknown key, expiry, audience, issuer, tampering, algorithm confusion), the file's
creation and safety, and adding a key without breaking the tokens already issued."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from services.auth.scopes import AuthError, Scope
from services.auth.tokens import (
    JWT_ALGORITHM,
    LEEWAY,
    PUBLIC_MEMBERS,
    TOKEN_AUDIENCE,
    TOKEN_ISSUER,
    KeySet,
    SigningKey,
    TokenService,
    load_key_set,
    rotate,
)

ROOT = Path(__file__).resolve().parents[3]
READ = [Scope.parse("patient/Observation.read")]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    """Valid claims of a patient token, with ``changes`` (None: the claim left out)."""
    now = int(datetime.now(UTC).timestamp())
    base: dict[str, Any] = {
        "iss": TOKEN_ISSUER,
        "aud": TOKEN_AUDIENCE,
        "sub": "chatbot",
        "iat": now,
        "exp": now + 300,
        "scope": "patient/Observation.read",
        "patient": "p-1",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def sign(payload: dict[str, Any], key: SigningKey, kid: str | None = None) -> str:
    """A token signed by ``key``'s private half, naming ``kid`` (default: ``key``'s own)."""
    return jwt.encode(
        payload, key.private_key, algorithm=JWT_ALGORITHM, headers={"kid": kid or key.kid}
    )


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A JWS built by hand (PyJWT refuses to make the forgeries): HS256 with ``secret``, or
    unsigned when None."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def refused(service: TokenService, token: str, reason: str) -> None:
    with pytest.raises(AuthError, match=reason) as caught:
        service.verify(token)
    assert caught.value.status == 401


@pytest.fixture
def service(signing_keys: Path) -> TokenService:
    return TokenService(load_key_set(signing_keys))


def test_a_patient_token_round_trips(service: TokenService) -> None:
    token, expires_in = service.issue("chatbot", READ, patient="p-1")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "ES256" and header["kid"] == service.keys.signing.kid
    assert expires_in == 900
    grant = service.verify(token)
    assert (grant.client_id, grant.patient, grant.scopes) == ("chatbot", "p-1", tuple(READ))
    assert grant.allows("Observation", "read") and not grant.allows("Observation", "write")
    assert grant.token_id and len(grant.token_id) == 32


def test_a_token_signed_by_another_key_is_refused(service: TokenService) -> None:
    stranger = SigningKey.generate()
    # Naming our key but signed by another: the signature does not verify.
    refused(service, sign(claims(), stranger, kid=service.keys.signing.kid), "InvalidSignature")
    # Naming its own key, which the set does not hold.
    refused(service, sign(claims(), stranger), "unknown key")
    refused(service, TokenService(KeySet((stranger,))).issue("x", READ, "p-1")[0], "unknown key")
    no_kid = jwt.encode(claims(), service.keys.signing.private_key, algorithm="ES256")
    refused(service, no_kid, "kid")


def test_a_key_added_to_the_set_keeps_the_older_tokens_valid(service: TokenService) -> None:
    old_token = service.issue("chatbot", READ, "p-1")[0]
    grown = TokenService(service.keys.with_new_key())
    assert grown.keys.keys[0] == service.keys.signing and len(grown.keys.keys) == 2
    new_token = grown.issue("chatbot", READ, "p-1")[0]
    assert jwt.get_unverified_header(new_token)["kid"] == grown.keys.signing.kid
    assert grown.keys.signing.kid != service.keys.signing.kid
    assert grown.verify(old_token).patient == "p-1"  # signed by the older key
    assert grown.verify(new_token).patient == "p-1"
    refused(service, new_token, "unknown key")  # the old set does not know the new key


def test_expiry_allows_a_small_clock_skew_only(service: TokenService) -> None:
    def issued(ago: timedelta) -> str:
        lifetime = timedelta(minutes=5)
        at = datetime.now(UTC) - lifetime - ago  # so it expired ``ago``
        return TokenService(service.keys, clock=lambda: at).issue("c", READ, "p-1", lifetime)[0]

    assert service.verify(issued(LEEWAY / 3)).patient == "p-1"
    refused(service, issued(LEEWAY * 4), "expired")


def test_a_token_for_another_audience_or_from_another_issuer_is_refused(
    service: TokenService,
) -> None:
    elsewhere = service.issue("chatbot", READ, "p-1", audience="some-other-api")[0]
    assert jwt.decode(elsewhere, options={"verify_signature": False})["aud"] == "some-other-api"
    refused(service, elsewhere, "not meant for scanwatch-fhir-api")
    other_api = TokenService(service.keys, audience="some-other-api")
    assert other_api.verify(elsewhere).patient == "p-1"
    refused(other_api, service.issue("chatbot", READ, "p-1")[0], "not meant for some-other-api")
    signing = service.keys.signing
    refused(service, sign(claims(iss="https://evil.example"), signing), "InvalidIssuer")
    assert service.verify(sign(claims(), signing)).patient == "p-1"  # the control


@pytest.mark.parametrize("missing", ["iss", "aud", "exp", "iat", "sub", "scope"])
def test_a_token_without_a_required_claim_is_refused(service: TokenService, missing: str) -> None:
    refused(service, sign(claims(**{missing: None}), service.keys.signing), "not valid|meant")


def test_malformed_claims_are_refused(service: TokenService) -> None:
    signing = service.keys.signing
    refused(service, sign(claims(scope="everything"), signing), "not a scope")
    refused(service, sign(claims(patient=["p-1", "p-2"]), signing), "patient claim")
    refused(service, sign(claims(sub=7), signing), "not valid|strings")
    refused(service, "not-a-jwt", "DecodeError")


def test_a_tampered_payload_is_refused(service: TokenService) -> None:
    token = service.issue("chatbot", READ, "p-1")[0]
    header, _payload, signature = token.split(".")
    widened = claims(scope="system/*.read system/*.write", patient=None)
    forged = f"{header}.{b64(json.dumps(widened).encode())}.{signature}"
    refused(service, forged, "InvalidSignature")
    assert service.verify(token).patient == "p-1"


def test_algorithm_confusion_is_refused(service: TokenService) -> None:
    """alg=none, and HS256 tokens keyed with what a verifier holds (the public key as PEM, as
    its JWK, its x coordinate): none may pass for an ES256 token."""
    signing = service.keys.signing
    kid = signing.kid
    payload = claims(scope="system/*.write", patient=None)
    pem = signing.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = json.dumps(signing.public_jwk()).encode()
    for alg, secret in (
        ("none", None),
        ("None", None),
        ("HS256", pem),
        ("HS256", jwk),
        ("HS256", signing.public_jwk()["x"].encode()),
    ):
        token = hand_made({"alg": alg, "typ": "JWT", "kid": kid}, payload, secret)
        refused(service, token, "must be signed with ES256")
    # Even a header claiming ES256 over an HMAC signature fails the signature check.
    lying = hand_made({"alg": "ES256", "typ": "JWT", "kid": kid}, payload, pem)
    refused(service, lying, "not valid")


def test_the_key_set_file_is_private_made_once_and_shared(tmp_path: Path) -> None:
    path = tmp_path / "auth" / "signing-keys.json"
    results: list[str] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_key_set(path).signing.kid)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len(set(results)) == 1  # every start agrees on one key
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert [p.name for p in path.parent.iterdir()] == ["signing-keys.json"]  # no temp left
    document = json.loads(path.read_text())
    assert [k["kid"] for k in document["keys"]] == results[:1]
    assert {"d", "x", "y", "kid"} <= set(document["keys"][0])
    assert load_key_set(path).signing.kid == results[0]  # read again, not made again


def test_an_unsafe_or_broken_key_set_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "signing-keys.json"
    load_key_set(path)
    path.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_key_set(path)
    path.chmod(0o600)
    assert load_key_set(path)
    for content, reason in (
        ("not json", "not JSON"),
        ('{"keys": []}', "at least one key"),
        ('{"keys": [{"kty": "RSA", "kid": "r", "n": "x", "e": "AQAB"}]}', "P-256"),
        (json.dumps({"keys": [KeySet.generate().public_jwks()["keys"][0]]}), "'d'"),
    ):
        path.write_text(content)
        with pytest.raises(ValueError, match=reason):
            load_key_set(path)
    a, b = SigningKey.generate(), SigningKey.generate()
    mismatched = {**a.private_jwk(), "d": b.private_jwk()["d"]}
    path.write_text(json.dumps({"keys": [mismatched]}))
    with pytest.raises(ValueError, match="does not belong"):
        load_key_set(path)


def test_rotate_adds_a_signing_key_and_keeps_the_previous_one(tmp_path: Path) -> None:
    path = tmp_path / "signing-keys.json"
    first = TokenService(load_key_set(path))
    token = first.issue("chatbot", READ, "p-1")[0]
    second_key = rotate(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    after = TokenService(load_key_set(path))
    assert after.keys.signing == second_key
    assert after.verify(token).patient == "p-1"
    third_key = rotate(path)  # keeps two: the first key goes
    assert [k.kid for k in load_key_set(path).keys] == [second_key.kid, third_key.kid]
    refused(TokenService(load_key_set(path)), token, "unknown key")
    with pytest.raises(ValueError, match="at least 2"):
        rotate(path, keep=1)


def test_the_published_keys_have_no_private_member() -> None:
    keys = KeySet.generate().with_new_key()
    published = keys.public_jwks()["keys"]
    assert [k["kid"] for k in published] == [k.kid for k in keys.keys]
    for jwk in published:
        assert tuple(jwk) == PUBLIC_MEMBERS
        assert (jwk["kty"], jwk["crv"], jwk["use"], jwk["alg"]) == ("EC", "P-256", "sig", "ES256")
    assert all("d" not in jwk for jwk in published)
    assert all("d" in k for k in keys.to_jwks()["keys"])  # the file's form does hold them


def test_verifiers_import_nothing_but_pyjwt_cryptography_and_the_standard_library() -> None:
    """What the chatbot's virtualenv imports (``services.auth.jwks``, ``scopes``) must load with
    PyJWT and cryptography only: no web framework, database, pydantic or HTTP client."""
    # cryptography's own extension modules: _openssl (Rust), _cffi_backend.
    allowed = {"jwt", "cryptography", "_openssl", "cffi", "_cffi_backend", "services", "scanwatch"}
    script = (
        "import sys, json; before = set(sys.modules); "
        "import services.auth.jwks, services.auth.scopes; "
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before} "
        "- set(sys.stdlib_module_names))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
    )
    outside = set(json.loads(done.stdout)) - allowed
    assert not outside, f"services.auth.jwks pulls in {sorted(outside)}"
    assert "jwt" in json.loads(done.stdout)  # the control: the probe sees third-party modules
