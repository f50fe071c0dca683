"""A fake FHIR API for the action tests: the search and create calls the actions make, over
real HTTP (aiohttp), on the two patients of ``fhir_records.json`` (written by
``devtools/chatbot_records.py`` from the worker's own builders).

Like the real API it answers 401 to an unknown or expired token and confines a patient token to
its patient (a search for another patient finds nothing; a create for another patient is 403).
It pages its answers (``PAGE`` entries) so that the actions must follow ``next`` links, and it
records every request it saw.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

RECORDS = json.loads((Path(__file__).with_name("fhir_records.json")).read_text())
PAGE = 2


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    patient: str | None  # whose token it carried


@dataclass
class FakeFhir:
    tokens: dict[str, str]  # token -> Patient id
    records: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: dict(RECORDS))
    seen: list[Seen] = field(default_factory=list)
    created: list[dict[str, Any]] = field(default_factory=list)
    base_url: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/fhir/{type}", self.search)
        app.router.add_post("/fhir/{type}", self.create)
        return app

    def _patient(self, request: web.Request) -> str:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        patient = self.tokens.get(token)
        self.seen.append(Seen(request.method, request.path, dict(request.query), patient))
        if patient is None:
            raise web.HTTPUnauthorized(text='{"resourceType": "OperationOutcome"}')
        return patient

    async def search(self, request: web.Request) -> web.Response:
        patient = self._patient(request)
        query = request.query
        resource_type = request.match_info["type"]
        asked = query.get("patient", patient).removeprefix("Patient/")
        found = [
            r
            for r in self.records.get(asked, [])
            if asked == patient
            if r["resourceType"] == resource_type and _matches(r, query)
        ]
        found = list({r["id"]: r for r in found}.values())
        if sort := query.get("_sort"):
            found.sort(key=_date_of, reverse=sort.startswith("-"))
        offset = int(query.get("_offset", 0))
        count = min(int(query.get("_count", PAGE)), PAGE)
        page = found[offset : offset + count]
        links = []
        if offset + count < len(found):
            rest = {k: v for k, v in query.items() if k != "_offset"} | {
                "_offset": str(offset + count)
            }
            url = f"{self.base_url}/{resource_type}?{urlencode(rest)}"
            links.append({"relation": "next", "url": url})
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "link": links,
            "entry": [{"resource": r} for r in page],
        }
        return web.json_response(bundle, content_type="application/fhir+json")

    async def create(self, request: web.Request) -> web.Response:
        patient = self._patient(request)
        resource = await request.json()
        if resource.get("subject", {}).get("reference") != f"Patient/{patient}":
            raise web.HTTPForbidden(text='{"resourceType": "OperationOutcome"}')
        resource = resource | {"id": f"created-{len(self.created) + 1}"}
        self.created.append(resource)
        return web.json_response(resource, status=201, content_type="application/fhir+json")


def _date_of(resource: dict[str, Any]) -> str:
    return str(
        resource.get("effectiveDateTime") or resource.get("start") or resource.get("authoredOn")
    )


def _matches(resource: dict[str, Any], query: Any) -> bool:
    if (status := query.get("status")) and resource.get("status") != status:
        return False
    if code := query.get("code"):
        system, _, value = code.rpartition("|")
        codings = (resource.get("code") or {}).get("coding", [])
        if not any(c.get("code") == value and c.get("system") == system for c in codings):
            return False
    if (date := query.get("date")) and date.startswith("ge"):
        moment = datetime.fromisoformat(date[2:].replace("Z", "+00:00"))
        if datetime.fromisoformat(_date_of(resource).replace("Z", "+00:00")) < moment:
            return False
    return True


@contextmanager
def serve(fake: FakeFhir) -> Iterator[FakeFhir]:
    """Run ``fake`` on a free loopback port in a thread; sets ``fake.base_url``."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(fake.app())
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", port).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    fake.base_url = f"http://127.0.0.1:{port}/fhir"
    try:
        yield fake
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
