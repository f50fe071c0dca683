"""The patient's own records, read from the FHIR API with the patient's own access token.

The action server holds no token of its own: every call carries the bearer token the patient's
message came with (verified by the input channel), so the FHIR API's patient compartment is what
limits each answer to that patient's records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import aiohttp

from scanwatch.fhir_codes import ANOMALY_SCORE_CODE, CODE_SYSTEM

FHIR_JSON = "application/fhir+json"
#: Most search pages followed for one question (a patient has tens of results, not thousands).
MAX_PAGES = 5


class RecordsError(Exception):
    """The records could not be read; ``reason`` says why in a word the actions act on."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"{reason} (HTTP {status})")
        self.reason = reason  # "expired" (sign in again), "refused" or "unavailable"
        self.status = status


class PatientRecords:
    """The FHIR reads and the one write (a call-back request) a patient's question needs."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        patient: str,
        timeout_s: float,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}", "Accept": FHIR_JSON}
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.patient = patient

    async def _request(
        self, method: str, url: str, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> dict[str, Any]:
        try:
            async with self._session.request(
                method,
                url,
                headers={**self._headers, **(headers or {})},
                timeout=self._timeout,
                **kwargs,
            ) as response:
                if response.status == 401:
                    raise RecordsError("expired", 401)
                if response.status == 403:
                    raise RecordsError("refused", 403)
                if response.status >= 400:
                    raise RecordsError("unavailable", response.status)
                body: dict[str, Any] = await response.json(content_type=None)
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RecordsError("unavailable") from exc

    async def search(self, resource_type: str, **params: str) -> list[dict[str, Any]]:
        """Every match of a search in the patient's compartment (following ``next`` links)."""
        params = {"patient": self.patient, **params}
        url: str | None = f"{self._base}/{resource_type}"
        found: list[dict[str, Any]] = []
        for _ in range(MAX_PAGES):
            if url is None:
                break
            bundle = await self._request("GET", url, params=params)
            found.extend(
                e["resource"]
                for e in bundle.get("entry", [])
                if e.get("resource", {}).get("resourceType") == resource_type
            )
            url = next(
                (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
            )
            params = {}  # the next link carries them
        return found

    async def results(self) -> list[dict[str, Any]]:
        """The anomaly-score Observations, newest first."""
        return await self.search(
            "Observation", code=f"{CODE_SYSTEM}|{ANOMALY_SCORE_CODE}", _sort="-date", _count="100"
        )

    async def received(self) -> list[dict[str, Any]]:
        """The ImagingStudies received but not scored yet."""
        return await self.search("ImagingStudy", status="registered", _count="20")

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
        )
        return found[0] if found else None

    async def create(
        self, resource: dict[str, Any], if_none_exist: str | None = None
    ) -> dict[str, Any]:
        """POST ``resource`` (the FHIR API lets a patient token create only its call-back
        requests, inside its own compartment); ``if_none_exist`` makes a retry record it once."""
        headers = {"Content-Type": FHIR_JSON}
        if if_none_exist:
            headers["If-None-Exist"] = if_none_exist
        return await self._request(
            "POST", f"{self._base}/{resource['resourceType']}", json=resource, headers=headers
        )
