"""A fake hospital for the portal's unit tests: the SMART configuration and token endpoints of
an authorization server, a FHIR API that enforces the patient compartment of the bearer token,
and the chatbot's patient channel, all behind one ``httpx.MockTransport``.

Tokens are real ES256 tokens (``services.auth.tokens``), so the portal's verification runs as
in production; records are the two patients of ``devtools.chatbot_records``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, parse_qsl, urlsplit

import httpx

from devtools import chatbot_records
from services.auth.scopes import AuthError, parse_scopes
from services.auth.tokens import TokenService, load_key_set
from services.portal.config import Settings

FHIR = "http://fhir.test/fhir"
AUTH = "http://fhir.test/auth"
CHAT = "http://chat.test/webhooks/patient/webhook"
ALICE = chatbot_records.patient_id(chatbot_records.ALICE)
BOB = chatbot_records.patient_id(chatbot_records.BOB)
SECRET = "portal-secret"


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_base_url": FHIR,
        "chat_url": CHAT,
        "client_secret": SECRET,
        "poll_interval_s": 0.1,
    }
    return Settings(**(values | overrides))


def _challenge(verifier: str) -> str:
    return (
        base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    )


@dataclass
class FakeHospital:
    keys_file: Path
    lifetime_s: int = 300
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: code -> (patient, code_challenge)
    codes: dict[str, tuple[str, str]] = field(default_factory=dict)
    refresh_tokens: dict[str, str] = field(default_factory=dict)  # token -> patient
    revoked: list[str] = field(default_factory=list)
    chat_seen: list[tuple[str | None, str]] = field(default_factory=list)
    token_requests: list[dict[str, str]] = field(default_factory=list)
    fhir_calls: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.tokens = TokenService(load_key_set(self.keys_file))
        if not self.records:
            self.records = {
                chatbot_records.patient_id(p): resources
                for p, resources in chatbot_records.records().items()
            }

    @property
    def verify(self) -> Callable[[str], Any]:
        return self.tokens.verify

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    # -- authorization server -------------------------------------------------------------------
    def authorize(self, authorization_url: str, patient: str) -> tuple[str, str]:
        """What the sign-in page would do for ``patient``: (code, state) for the callback."""
        query = {k: v[0] for k, v in parse_qs(urlsplit(authorization_url).query).items()}
        assert query["response_type"] == "code"
        assert query["code_challenge_method"] == "S256"
        assert query["aud"] == FHIR
        assert "launch/patient" in query["scope"].split()
        code = secrets.token_urlsafe(16)
        self.codes[code] = (patient, query["code_challenge"])
        return code, query["state"]

    def _issue(self, patient: str) -> dict[str, Any]:
        scopes = parse_scopes("patient/*.read patient/CommunicationRequest.write")
        access, ttl = self.tokens.issue("scanwatch-portal", scopes, patient)
        refresh = secrets.token_urlsafe(16)
        self.refresh_tokens[refresh] = patient
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": min(ttl, self.lifetime_s),
            "refresh_token": refresh,
            "patient": patient,
            "scope": "launch/patient openid fhirUser offline_access patient/*.read",
        }

    def _token(self, request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        self.token_requests.append(form)
        basic = request.headers.get("authorization", "")
        expected = base64.b64encode(f"scanwatch-portal:{SECRET}".encode()).decode()
        if basic != f"Basic {expected}":
            return httpx.Response(401, json={"error": "invalid_client"})
        if form.get("grant_type") == "authorization_code":
            found = self.codes.pop(form.get("code", ""), None)
            if found is None or _challenge(form.get("code_verifier", "")) != found[1]:
                return httpx.Response(400, json={"error": "invalid_grant"})
            return httpx.Response(200, json=self._issue(found[0]))
        if form.get("grant_type") == "refresh_token":
            patient = self.refresh_tokens.pop(form.get("refresh_token", ""), None)
            if patient is None:
                return httpx.Response(400, json={"error": "invalid_grant"})
            return httpx.Response(200, json=self._issue(patient))
        return httpx.Response(400, json={"error": "unsupported_grant_type"})

    # -- FHIR -------------------------------------------------------------------------------------
    def _patient_of(self, request: httpx.Request) -> str | None:
        header = request.headers.get("authorization", "")
        try:
            return self.tokens.verify(header.removeprefix("Bearer ")).patient
        except AuthError:
            return None

    def _fhir(self, request: httpx.Request, path: str) -> httpx.Response:
        patient = self._patient_of(request)
        if patient is None:
            return httpx.Response(401, json={"resourceType": "OperationOutcome"})
        self.fhir_calls.append(str(request.url))
        mine = self.records.get(patient, [])
        parts = path.strip("/").split("/")
        if len(parts) == 2:
            everyone = [r for rs in self.records.values() for r in rs]
            found = next(
                (r for r in everyone if r["resourceType"] == parts[0] and r["id"] == parts[1]), None
            )
            if found is None:
                return httpx.Response(404, json={"resourceType": "OperationOutcome"})
            if found not in mine:
                return httpx.Response(403, json={"resourceType": "OperationOutcome"})
            return httpx.Response(200, json=found)
        params = dict(request.url.params)
        if params.get("patient") not in (patient, f"Patient/{patient}"):
            return httpx.Response(403, json={"resourceType": "OperationOutcome"})
        matches = [r for r in mine if r["resourceType"] == parts[0]]
        if "status" in params:
            matches = [r for r in matches if r.get("status") == params["status"]]
        if "_lastUpdated" in params:
            since = params["_lastUpdated"].removeprefix("gt")
            matches = [r for r in matches if (r.get("meta") or {}).get("lastUpdated", "") > since]
        entries = [{"resource": r} for r in matches]
        return httpx.Response(200, json={"resourceType": "Bundle", "entry": entries})

    def _chat(self, request: httpx.Request) -> httpx.Response:
        patient = self._patient_of(request)
        if patient is None:
            return httpx.Response(401, json={"error": "invalid token"})
        text = json.loads(request.content)["message"]
        self.chat_seen.append((patient, text))
        if text == "call me":
            return httpx.Response(
                200,
                json=[
                    {
                        "text": "Would you like me to ask them to call you back?",
                        "buttons": [{"title": "Yes, please call me", "payload": "/affirm"}],
                    }
                ],
            )
        return httpx.Response(200, json=[{"text": f"You said <{text}> as {patient}"}])

    def handle(self, request: httpx.Request) -> httpx.Response:
        url = str(request.url)
        if url == f"{FHIR}/.well-known/smart-configuration":
            return httpx.Response(
                200,
                json={
                    "authorization_endpoint": f"{AUTH}/authorize",
                    "token_endpoint": f"{AUTH}/token",
                    "revocation_endpoint": f"{AUTH}/revoke",
                    "jwks_uri": f"{AUTH}/jwks",
                    "code_challenge_methods_supported": ["S256"],
                },
            )
        if url == f"{AUTH}/token":
            return self._token(request)
        if url == f"{AUTH}/revoke":
            form = dict(parse_qsl(request.content.decode()))
            self.revoked.append(form.get("token", ""))
            self.refresh_tokens.pop(form.get("token", ""), None)
            return httpx.Response(200)
        if url == CHAT:
            return self._chat(request)
        if url.startswith(FHIR):
            return self._fhir(request, request.url.path.removeprefix("/fhir"))
        return httpx.Response(404)
