"""The portal's side of SMART App Launch (standalone patient launch): the authorization
server's web client (:class:`services.auth.web_client.WebClient`: discovery, PKCE S256, code
exchange, refresh, revocation, every access token verified against the JWKS), configured with
the portal's registration, plus the patient check: a token the portal keeps names a patient,
the same one as its token response (and, after a refresh, the same one as before).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from services.auth.web_client import AuthServerUnavailable as AuthServerUnavailable
from services.auth.web_client import ClientSettings, WebClient
from services.auth.web_client import SessionExpired as SessionExpired
from services.auth.web_client import SignInError as SignInError
from services.auth.web_client import Verifier as Verifier
from services.portal.config import Settings

#: What the portal asks for: the patient in context, identity, a refresh token, read access to
#: the patient's own records and the one write a patient makes (a call-back request).
SCOPES = (
    "launch/patient openid fhirUser offline_access patient/*.read "
    "patient/CommunicationRequest.write"
)


@dataclass(frozen=True)
class Tokens:
    """What a token response gave the portal, checked."""

    access_token: str
    refresh_token: str | None
    expires_at: float  # time.monotonic() when it expires
    patient: str


class SmartClient(WebClient):
    """The SMART client of one portal (one registered client id)."""

    def __init__(
        self,
        settings: Settings,
        transport: httpx.AsyncBaseTransport | None = None,
        verifier: Verifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(
            ClientSettings(
                client_id=settings.client_id,
                client_secret=settings.client_secret.get_secret_value(),
                redirect_uri=settings.redirect_uri,
                scope=SCOPES,
                configuration_url=settings.smart_configuration_url,
                audience=settings.fhir_base_url,
                timeout_s=settings.http_timeout_s,
                jwks_ttl_s=settings.jwks_ttl_s,
            ),
            transport,
            verifier,
            clock,
        )
        self.settings = settings

    async def exchange(self, code: str, code_verifier: str) -> Tokens:
        """The tokens for an authorization ``code`` (with the PKCE verifier of its request)."""
        return await self._checked(await self.fetch_tokens(code, code_verifier))

    async def refresh(self, refresh_token: str, patient: str) -> Tokens:
        """New tokens for a refresh token; :class:`SessionExpired` when it is refused."""
        data = await self.refresh_tokens(refresh_token)
        data.setdefault("patient", patient)
        tokens = await self._checked(data)
        if tokens.patient != patient:
            raise SessionExpired("the refreshed token is for another patient")
        return tokens

    async def _checked(self, token: dict[str, Any]) -> Tokens:
        """The tokens of a token response once the access token verifies against the JWKS and
        names the same patient as the response."""
        patient = token.get("patient")
        if not isinstance(token.get("access_token"), str) or not isinstance(patient, str):
            patient = None
        if not patient:
            raise SignInError(
                "The sign-in could not be completed.", "the token response has no patient"
            )
        verified = await self.verified(token)
        if verified.grant.patient != patient:
            raise SignInError(
                "The sign-in could not be completed.", "the token is bound to another patient"
            )
        return Tokens(
            access_token=verified.access_token,
            refresh_token=verified.refresh_token,
            expires_at=verified.expires_at,
            patient=patient,
        )
