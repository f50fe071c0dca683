"""Writes FHIR resources with ``PUT [base]/[type]/[id]`` (update as create).

Ids are deterministic (:mod:`scanwatch.ids`), so a repeated write replaces instead of
duplicating: that is what makes redelivery harmless.
"""

from __future__ import annotations

import httpx

FHIR_JSON = "application/fhir+json"


class FhirWriter:
    """Async writer for one FHIR base URL."""

    def __init__(self, base_url: str, timeout_s: float = 10.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:  # bound to the running loop, so made on first use
            self._client = httpx.AsyncClient(timeout=self.timeout_s, headers={"Accept": FHIR_JSON})
        return self._client

    async def put(self, resource: dict) -> None:
        """Create or update one resource; raises ``httpx.HTTPStatusError`` on a non-2xx answer."""
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        response = await self._http().put(url, json=resource, headers={"Content-Type": FHIR_JSON})
        response.raise_for_status()

    async def put_all(self, resources: list[dict]) -> None:
        """Write resources in order (referenced resources first)."""
        for resource in resources:
            await self.put(resource)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
