"""The patient channel: the only way a patient's message reaches the bot.

``POST /webhooks/patient/webhook`` with ``Authorization: Bearer <access token>`` and a JSON body
``{"message": "..."}``; the answer is the bot's messages, as Rasa's REST channel gives them
(``[{"recipient_id": ..., "text": ..., "buttons": [...]}]``).

On every message, before Rasa sees it:

- the token is verified against the authorization server's published keys
  (:class:`services.auth.jwks.RemoteKeySet`): signature, expiry, issuer, audience; then its scope:
  it must be bound to one Patient (``patient`` claim) and reach the records the bot reads only
  through ``patient/`` scopes, so the FHIR API confines every read to that patient. A system or
  clinician token is refused here: the bot answers patients only;
- the conversation's sender is derived from the token's patient
  (:func:`scanwatch.ids.chat_sender_id`); a
  ``sender`` or ``metadata`` in the body is ignored;
- each patient gets at most ``burst`` messages at once and ``rate_per_minute`` after that (429),
  counted by each Rasa server process (with ``SANIC_WORKERS`` = n, up to n times that);
- the body is at most :data:`MAX_BODY_BYTES` (413, read no further: the route streams its body,
  so Sanic does not read a large one whole first) and JSON ``{"message": "..."}`` (400, also for
  JSON nested deeper than the parser goes); the message is at most ``max_message_chars`` long
  (413).

The verified token and patient travel to the action server in the message's metadata (the
tracker store removes the token before a conversation is stored: ``connectors.tracker_store``).
Nothing here logs a message's text, a token or a patient id.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from rasa.core.channels.channel import CollectingOutputChannel, InputChannel, UserMessage
from sanic import Blueprint, response
from sanic.request import Request
from sanic.response import HTTPResponse

import connectors.rasa_patches  # noqa: F401 (applies the patch when Rasa loads this channel)
from scanwatch.ids import chat_sender_id
from services.auth.jwks import KeySetUnavailable, RemoteKeySet
from services.auth.scopes import READ, AuthError, Grant
from services.auth.tokens import TOKEN_AUDIENCE, bearer_token

log = logging.getLogger(__name__)

#: What the bot reads for a patient; a token must reach each, and only inside its patient's
#: compartment.
READ_TYPES = ("Observation", "DiagnosticReport", "MedicationRequest", "Appointment")
DEFAULT_MAX_MESSAGE_CHARS = 1000
DEFAULT_RATE_PER_MINUTE = 30.0
DEFAULT_BURST = 10
#: Most bytes of a message's body read (the portal's forms have the same limit); a message of
#: ``max_message_chars`` fits many times over, even with every character escaped.
MAX_BODY_BYTES = 64 * 1024
#: Patients whose rate-limit state is kept (least recently seen dropped first).
MAX_TRACKED_PATIENTS = 100_000


def check_patient_grant(grant: Grant) -> str:
    """The Patient id a verified grant is bound to; :class:`AuthError` 403 unless it reads
    every one of :data:`READ_TYPES` and only through ``patient/`` scopes."""
    if not grant.patient:
        raise AuthError(403, "the access token is not bound to a patient (no patient claim)")
    for resource_type in READ_TYPES:
        grant.require(resource_type, READ)
        if not grant.patient_bound(resource_type, READ):
            raise AuthError(403, "the chatbot accepts only patient tokens (patient/ scopes)")
    return grant.patient


@dataclass
class RateLimiter:
    """A token bucket per key: ``burst`` at once, refilled at ``rate_per_minute``."""

    rate_per_minute: float = DEFAULT_RATE_PER_MINUTE
    burst: int = DEFAULT_BURST
    clock: Callable[[], float] = time.monotonic
    _buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def __post_init__(self) -> None:
        if self.rate_per_minute <= 0 or self.burst < 1:
            raise ValueError(
                f"rate_per_minute must be > 0 and burst >= 1, not {self.rate_per_minute}, "
                f"{self.burst}"
            )

    def take(self, key: str) -> float:
        """0 when ``key`` may send now (one token taken), else the seconds until it may."""
        now = self.clock()
        tokens, then = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - then) * self.rate_per_minute / 60)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) * 60 / self.rate_per_minute
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED_PATIENTS:
            self._buckets.popitem(last=False)
        return wait


async def _body(request: Request) -> bytes | None:
    """The streamed body of ``request``, read until it ends; ``None`` as soon as it passes
    :data:`MAX_BODY_BYTES` (or declares more), without reading the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        return None
    chunks: list[bytes] = []
    size = 0
    while (chunk := await request.stream.read()) is not None:
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> HTTPResponse:
    return response.json({"error": message}, status=status, headers=headers)


class PatientInput(InputChannel):
    """Rasa input channel ``patient`` (credentials.yml ``connectors.patient.PatientInput``)."""

    @classmethod
    def name(cls) -> str:
        return "patient"

    @classmethod
    def from_credentials(cls, credentials: dict[str, Any] | None) -> PatientInput:
        credentials = credentials or {}
        if not credentials.get("jwks_url"):
            raise ValueError("the patient channel needs jwks_url in credentials.yml")
        return cls(
            RemoteKeySet(str(credentials["jwks_url"])),
            audience=str(credentials.get("audience") or TOKEN_AUDIENCE),
            limiter=RateLimiter(
                float(credentials.get("rate_per_minute") or DEFAULT_RATE_PER_MINUTE),
                int(credentials.get("burst") or DEFAULT_BURST),
            ),
            max_message_chars=int(
                credentials.get("max_message_chars") or DEFAULT_MAX_MESSAGE_CHARS
            ),
        )

    def __init__(
        self,
        keys: RemoteKeySet,
        audience: str = TOKEN_AUDIENCE,
        limiter: RateLimiter | None = None,
        max_message_chars: int = DEFAULT_MAX_MESSAGE_CHARS,
    ) -> None:
        self.keys = keys
        self.audience = audience
        self.limiter = limiter or RateLimiter()
        self.max_message_chars = max_message_chars

    async def authenticate(self, authorization: str | None) -> tuple[str, str]:
        """(access token, Patient id) of a request's Authorization header; :class:`AuthError`."""
        token = bearer_token(authorization)
        grant = await asyncio.to_thread(self.keys.verify, token, self.audience)
        return token, check_patient_grant(grant)

    def blueprint(self, on_new_message: Callable[[UserMessage], Awaitable[Any]]) -> Blueprint:
        webhook = Blueprint(
            f"custom_webhook_{type(self).__name__}", inspect.getmodule(self).__name__
        )

        @webhook.route("/", methods=["GET"])
        async def health(_: Request) -> HTTPResponse:
            return response.json({"status": "ok"})

        @webhook.route("/webhook", methods=["POST"], stream=True)
        async def receive(request: Request) -> HTTPResponse:
            try:
                token, patient = await self.authenticate(request.headers.get("Authorization"))
            except AuthError as exc:
                headers = {"WWW-Authenticate": exc.www_authenticate} if exc.status == 401 else {}
                log.info("patient message refused", extra={"status": exc.status})
                return _error(exc.status, exc.message, headers)
            except KeySetUnavailable:
                log.warning("patient message refused: the signing keys cannot be fetched")
                return _error(503, "sign-in cannot be checked right now; try again shortly")
            sender = chat_sender_id(patient)
            wait = self.limiter.take(sender)
            if wait:
                return _error(
                    429,
                    "too many messages; wait a moment and try again",
                    {"Retry-After": str(math.ceil(wait))},
                )
            raw = await _body(request)
            if raw is None:
                return _error(413, f"a message's body is at most {MAX_BODY_BYTES} bytes")
            try:
                body = json.loads(raw)
            except (ValueError, RecursionError):  # not UTF-8 JSON, or nested too deep
                body = None
            text = body.get("message") if isinstance(body, dict) else None
            if not isinstance(text, str) or not text.strip():
                return _error(400, 'the body must be JSON {"message": "<text>"}')
            if len(text) > self.max_message_chars:
                return _error(413, f"a message is at most {self.max_message_chars} characters")
            collector = CollectingOutputChannel()
            await on_new_message(
                UserMessage(
                    text,
                    collector,
                    sender,
                    input_channel=self.name(),
                    metadata={"access_token": token, "patient": patient},
                )
            )
            return response.json(collector.messages)

        return webhook
