"""Writes FHIR resources with ``PUT [base]/[type]/[id]`` (update as create).

Ids are deterministic (:mod:`scanwatch.ids`), so a repeated write replaces instead of
duplicating: that is what makes redelivery harmless.

A result a clinician signed is never overwritten: an Observation or DiagnosticReport whose
current status is signed (:data:`scanwatch.clinical_review.SIGNED_STATUSES`) is left alone by a
redelivered or re-scored result of the same (study, model, version). The check and the write
are one conditional update (``If-Match`` on the version read), so a signature that lands in
between makes the write fail with 412 and the writer reads again. A result that is the stored
one but for ``issued`` (the same study scored again after it was announced again) is not
written: it would be a new version that changes nothing.

When the FHIR API requires tokens, the writer is a registered backend client: it gets a bearer
token with the OAuth 2.0 client-credentials grant (HTTP Basic client authentication), keeps it
until shortly before it expires, and fetches a new one once if the API answers 401.

:meth:`FhirWriter.put` speaks HTTP and raises httpx's errors; :meth:`FhirWriter.put_all` and
:meth:`FhirWriter.put_missing` are the worker's :class:`~inference_worker.ports.ResourceWriter`
and turn the failures that may go away
by themselves (no connection, a timeout, 5xx, 429) into
:class:`~inference_worker.errors.FhirUnavailable`. Other answers (4xx: a refused token or
resource) go up unchanged: fatal.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from inference_worker.errors import FhirUnavailable
from scanwatch.clinical_review import SIGNED_STATUSES

log = logging.getLogger(__name__)
FHIR_JSON = "application/fhir+json"
#: Renew a token this many seconds before the server says it expires.
TOKEN_MARGIN_S = 30.0
#: Types a clinician signs: written only while their current version is not signed.
SIGNED_TYPES = ("Observation", "DiagnosticReport")
#: Reads and conditional writes of one such resource before giving up (each 412 is a change
#: that landed in between).
CONDITIONAL_ATTEMPTS = 3
#: Elements a rescoring changes without changing the result: ``issued`` is the ready event's
#: time, and a study announced again (after a worker crash, a rebalance, a park) has a new one.
REISSUE_ONLY = frozenset({"issued"})


def same_result(current: dict[str, Any], resource: dict[str, Any]) -> bool:
    """Whether ``resource`` says what the stored ``current`` says, but for when it was issued
    (the server's ``meta`` aside): writing it would only make a version that changes nothing
    (the fault suite counted such versions after a worker was killed: issue 19)."""
    ignored = REISSUE_ONLY | {"meta"}
    return {k: v for k, v in current.items() if k not in ignored} == {
        k: v for k, v in resource.items() if k not in ignored
    }


def token_url_for(base_url: str) -> str:
    """The API's token endpoint: ``https://host/fhir`` → ``https://host/auth/token``."""
    base = base_url.rstrip("/")
    return (base[: -len("/fhir")] if base.endswith("/fhir") else base) + "/auth/token"


class FhirWriter:
    """Async writer for one FHIR base URL."""

    def __init__(
        self,
        base_url: str,
        timeout_s: float = 10.0,
        client_id: str | None = None,
        client_secret: str | None = None,
        token_url: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        if (client_id is None) != (client_secret is None):
            raise ValueError("give both client_id and client_secret, or neither")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._credentials = (
            (client_id, client_secret) if client_id and client_secret is not None else None
        )
        self.token_url = token_url or token_url_for(self.base_url)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_expires = 0.0

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # bound to the running loop, so made on first use
            self._client = httpx.AsyncClient(
                timeout=self.timeout_s, headers={"Accept": FHIR_JSON}, transport=self._transport
            )
        return self._client

    async def _authorization(self, renew: bool = False) -> dict[str, str]:
        if self._credentials is None:
            return {}
        if renew or self._token is None or time.monotonic() >= self._token_expires:
            response = await self._http().post(
                self.token_url,
                data={"grant_type": "client_credentials"},
                auth=self._credentials,
            )
            response.raise_for_status()
            answer = response.json()
            self._token = str(answer["access_token"])
            lifetime = float(answer.get("expires_in", 300))
            self._token_expires = time.monotonic() + max(lifetime - TOKEN_MARGIN_S, 1.0)
        return {"Authorization": f"Bearer {self._token}"}

    async def _send(
        self, method: str, resource: dict[str, Any], if_match: str | None = None
    ) -> httpx.Response:
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        headers = {"Content-Type": FHIR_JSON, **await self._authorization()}
        if if_match is not None:
            headers["If-Match"] = if_match
        body = resource if method == "PUT" else None
        response = await self._http().request(method, url, json=body, headers=headers)
        if response.status_code == 401 and self._credentials is not None:
            # The token was revoked or the server's key rotated: one fresh token, one retry.
            headers.update(await self._authorization(renew=True))
            response = await self._http().request(method, url, json=body, headers=headers)
        return response

    async def put(self, resource: dict[str, Any]) -> None:
        """Create or update one resource; raises ``httpx.HTTPStatusError`` on a non-2xx answer."""
        (await self._send("PUT", resource)).raise_for_status()

    async def put_all(self, resources: list[dict[str, Any]]) -> None:
        """Write resources in order (referenced resources first); a signed Observation or
        DiagnosticReport is left as the clinician signed it."""
        async with _domain_errors():
            for resource in resources:
                if resource["resourceType"] in SIGNED_TYPES:
                    await self.put_unless_signed(resource)
                else:
                    await self.put(resource)

    async def put_unless_signed(self, resource: dict[str, Any]) -> bool:
        """Write ``resource`` unless its current version is signed or already says the same
        (:func:`same_result`); whether it was written. The write is conditional on the version
        read (``If-Match``)."""
        for _attempt in range(CONDITIONAL_ATTEMPTS):
            found = await self._send("GET", resource)
            if found.status_code in (404, 410):
                await self.put(resource)  # nothing to sign yet: a plain update as create
                return True
            found.raise_for_status()
            current = found.json()
            if current.get("status") in SIGNED_STATUSES:
                log.info(
                    "signed result left alone",
                    extra={"resourceType": resource["resourceType"], "id": resource["id"]},
                )
                return False
            if same_result(current, resource):
                return False  # the same result scored again: it stays as first issued
            written = await self._send("PUT", resource, if_match=found.headers.get("ETag"))
            if written.status_code != 412:
                written.raise_for_status()
                return True
        raise FhirUnavailable(
            f"{resource['resourceType']}/{resource['id']} kept changing while being written"
        )

    async def put_missing(self, resources: list[dict[str, Any]]) -> None:
        """Write, in order, those of ``resources`` the API answers 404 (or 410, deleted) for."""
        async with _domain_errors():
            for resource in resources:
                found = await self._send("GET", resource)
                if found.status_code in (404, 410):
                    await self.put(resource)
                else:
                    found.raise_for_status()

    async def close(self) -> None:
        """Close the HTTP connections (a later write opens new ones)."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


@contextlib.asynccontextmanager
async def _domain_errors() -> AsyncIterator[None]:
    """httpx's errors as the worker's: unreachable, 5xx and 429 are :class:`FhirUnavailable`
    (transient); any other refusal stays an ``HTTPStatusError`` (fatal)."""
    try:
        yield
    except httpx.TransportError as exc:
        raise FhirUnavailable(f"FHIR API unreachable: {exc!r}") from exc
    except httpx.HTTPStatusError as exc:
        status = exc.response.status_code
        if status >= 500 or status == 429:
            raise FhirUnavailable(f"FHIR API answered {status}") from exc
        raise
