"""The patient's records, read from the FHIR API with the patient's own access token.

The portal holds no token of its own: every call here carries the token of the signed-in
patient, so the FHIR API's patient compartment is what limits each page to that patient.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import httpx

from scanwatch.fhir_codes import ANOMALY_SCORE_CODE, CODE_SYSTEM

FHIR_JSON = "application/fhir+json"
#: Most search pages followed for one list (a patient has tens of results, not thousands).
MAX_PAGES = 5


class FhirUnavailable(Exception):
    """The FHIR API did not answer usefully (transient: the page says so)."""


class TokenRejected(Exception):
    """The FHIR API refused the patient's token (401): refresh it or sign in again."""


class PatientFhir:
    """The reads the portal's pages make, as one patient."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, token: str, patient: str) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
        self.patient = patient

    async def _get(self, url: str, params: dict[str, str] | None = None) -> httpx.Response:
        for attempt in (1, 2):
            try:
                answer = await self._http.get(url, params=params, headers=self._headers)
            except httpx.HTTPError as exc:
                raise FhirUnavailable(str(exc)) from exc
            if answer.status_code == 401:
                raise TokenRejected()
            if answer.content and "json" not in answer.headers.get("content-type", ""):
                # Not the FHIR API answering (a proxy's page, a misdirected URL).
                raise FhirUnavailable(f"the answer is not JSON ({answer.status_code})")
            wait = _retry_after(answer)
            if attempt == 2 or wait is None:
                return answer
            # The API said "busy, ask again in a moment" (a 503 with a short Retry-After, such
            # as its database busy): once, before the patient is told to come back later.
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def search(
        self, resource_type: str, max_pages: int = MAX_PAGES, **params: str
    ) -> list[dict[str, Any]]:
        """The matches in the patient's compartment (``patient=`` is always the session's),
        following ``next`` links for up to ``max_pages`` pages."""
        query: dict[str, str] | None = {**params, "patient": self.patient}
        url: str | None = f"{self._base}/{resource_type}"
        found: list[dict[str, Any]] = []
        for _ in range(max_pages):
            if url is None:
                break
            answer = await self._get(url, query)
            if answer.status_code != 200:
                raise FhirUnavailable(f"{resource_type} search answered {answer.status_code}")
            bundle = answer.json()
            found.extend(
                e["resource"]
                for e in bundle.get("entry", [])
                if e.get("resource", {}).get("resourceType") == resource_type
            )
            url = next(
                (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
            )
            query = None  # the next link carries them
        return found

    async def read(self, resource_type: str, resource_id: str) -> dict[str, Any] | None:
        """One resource, or None when it does not exist or is not this patient's (the FHIR
        API answers 403 or 404; the portal says "not found" for both)."""
        answer = await self._get(f"{self._base}/{resource_type}/{resource_id}")
        if answer.status_code in (403, 404, 410):
            return None
        if answer.status_code != 200:
            raise FhirUnavailable(f"{resource_type} read answered {answer.status_code}")
        resource: dict[str, Any] = answer.json()
        return resource

    async def results(self) -> list[dict[str, Any]]:
        """The anomaly-score Observations, newest first."""
        return await self.search(
            "Observation", code=f"{CODE_SYSTEM}|{ANOMALY_SCORE_CODE}", _sort="-date", _count="100"
        )

    async def imaging_studies(self) -> list[dict[str, Any]]:
        return await self.search("ImagingStudy", _count="100")

    async def reports(self) -> list[dict[str, Any]]:
        return await self.search("DiagnosticReport", _count="100")

    async def medications(self) -> list[dict[str, Any]]:
        return await self.search("MedicationRequest", status="active", _count="50")

    async def next_appointment(self, now: datetime) -> dict[str, Any] | None:
        found = await self.search(
            "Appointment",
            status="booked",
            date=f"ge{now.isoformat(timespec='seconds')}",
            _sort="date",
            _count="1",
            max_pages=1,
        )
        return found[0] if found else None

    async def updated_since(self, since: str | None) -> str | None:
        """The newest ``meta.lastUpdated`` of the patient's results and studies written after
        ``since`` (a FHIR instant; None: any), or None when nothing is newer. What the event
        stream polls: one small search per type."""
        newest: str | None = None
        for resource_type, extra in (
            ("Observation", {"code": f"{CODE_SYSTEM}|{ANOMALY_SCORE_CODE}"}),
            ("ImagingStudy", {}),
            ("DiagnosticReport", {}),
        ):
            params = {**extra, "_sort": "-_lastUpdated", "_count": "1"}
            if since:
                params["_lastUpdated"] = f"gt{since}"
            for resource in await self.search(resource_type, max_pages=1, **params):
                stamp = (resource.get("meta") or {}).get("lastUpdated")
                if isinstance(stamp, str) and (newest is None or _later(stamp, newest)):
                    newest = stamp
        return newest


#: The longest Retry-After the portal waits out itself (a page must not hang).
MAX_RETRY_AFTER_S = 2.0


def _retry_after(answer: httpx.Response) -> float | None:
    """Seconds to wait before asking again, for a 503 that says how long (≤ 2 s); else None."""
    if answer.status_code != 503:
        return None
    try:
        seconds = float(answer.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_RETRY_AFTER_S else None


def _later(a: str, b: str) -> bool:
    try:
        return datetime.fromisoformat(a.replace("Z", "+00:00")) > datetime.fromisoformat(
            b.replace("Z", "+00:00")
        )
    except ValueError:
        return a > b


def newest_update(*groups: list[dict[str, Any]]) -> str | None:
    """The newest ``meta.lastUpdated`` among resources (the page's cursor for the stream)."""
    newest: str | None = None
    for group in groups:
        for resource in group:
            stamp = (resource.get("meta") or {}).get("lastUpdated")
            if isinstance(stamp, str) and (newest is None or _later(stamp, newest)):
                newest = stamp
    return newest
