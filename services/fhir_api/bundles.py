"""The Bundles the FHIR routes answer with: a search's ``searchset`` and a ``history``."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from sqlalchemy.engine import Connection

from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.fhirdates import fhir_range
from services.fhir_api.resources import Stored, reference_key
from services.fhir_api.search import INCLUDES, REVINCLUDES, TOTAL_LIMIT, SearchQuery
from services.fhir_api.store import ResourceStore

#: The types an ``_include``'s reference element may point to.
INCLUDE_TYPES: dict[str, tuple[str, ...]] = {
    "device": ("Device",),
    "subject": ("Patient",),
    "result": ("Observation",),
}


def searchset(
    store: ResourceStore, connection: Connection, base: str, query: SearchQuery
) -> tuple[bytes, int]:
    """The searchset Bundle as JSON bytes, and how many entries it has.

    Each resource's stored JSON text goes into the Bundle as it is (it was written as compact
    JSON by the store): no parse and re-serialisation per entry, which was most of a search's
    CPU time (bench/fhir.md)."""
    limit = {"none": 0, "estimate": TOTAL_LIMIT, "accurate": None}[query.total]
    total, found = store.search(
        query.resource_type,
        query.where,
        query.order_by,
        query.count,
        query.offset,
        limit if limit != 0 else 0,
        connection,
    )
    if query.total == "none":
        total = None
    # fullUrl = base/Type/id; ids and types need no JSON escaping (ID_RE), the base may.
    full_url = json.dumps(f"{base}/", ensure_ascii=False)[:-1]
    entries = [_entry_json(full_url, s, "match") for s in found]
    included: list[Stored] = []
    if query.includes and found:
        keys: list[str] = []
        for include in query.includes:
            element = INCLUDES[include][1]
            for stored in found:
                keys += _references(stored.resource(), element)
        included += store.read_many(dict.fromkeys(keys), connection)
    for revinclude in query.revincludes:
        source, param = REVINCLUDES[revinclude]
        included += store.referencing(source, param, (s.key for s in found), connection)
    seen = {s.key for s in found}
    for stored in included:
        if stored.key not in seen:
            seen.add(stored.key)
            entries.append(_entry_json(full_url, stored, "include"))

    def link(relation: str, offset: int) -> dict[str, str]:
        params = [*query.applied, ("_count", str(query.count))]
        if offset:
            params.append(("_offset", str(offset)))
        return {"relation": relation, "url": f"{base}/{query.resource_type}?{urlencode(params)}"}

    links = [link("self", query.offset)]
    if (
        query.count
        and len(found) == query.count
        and (total is None or query.offset + query.count < total)
    ):
        links.append(link("next", query.offset + query.count))
    if query.offset > 0:
        links.append(link("previous", max(query.offset - query.count, 0)))
        links.append(link("first", 0))
    parts = ['{"resourceType":"Bundle","type":"searchset"']
    if total is not None:
        parts.append(f',"total":{total}')
    parts.append(',"link":')
    parts.append(json.dumps(links, separators=(",", ":"), ensure_ascii=False))
    if entries:
        parts.append(',"entry":[')
        parts.append(",".join(entries))
        parts.append("]")
    parts.append("}")
    return "".join(parts).encode(), len(entries)


@dataclass(frozen=True)
class HistoryQuery:
    """The parameters of a ``_history`` request."""

    count: int
    offset: int = 0
    since: datetime | None = None


def parse_history(
    items: Iterable[tuple[str, str]], default_count: int, max_count: int
) -> HistoryQuery:
    """``_count``, ``_offset`` and ``_since`` (400 for anything else but ``_format``)."""
    count, offset, since = default_count, 0, None
    for name, value in items:
        if name == "_count":
            count = min(_non_negative(name, value), max_count)
        elif name == "_offset":
            offset = _non_negative(name, value)
        elif name == "_since":
            try:
                since = fhir_range(value, default_zone=None)[0]
            except ValueError as exc:
                raise FhirError(400, f"_since: {exc}", INVALID) from exc
        elif name != "_format":
            raise FhirError(400, f"unknown history parameter {name[:40]!r}", INVALID)
    return HistoryQuery(count, offset, since)


def history(
    store: ResourceStore,
    base: str,
    resource_type: str,
    resource_id: str | None,
    query: HistoryQuery,
) -> dict[str, Any]:
    """The history Bundle of one resource (or of every resource of a type), newest first."""
    count, offset = query.count, query.offset
    total, versions = store.history(resource_type, resource_id, query.since, count, offset)
    path = f"{resource_type}/{resource_id}/_history" if resource_id else f"{resource_type}/_history"
    entries = []
    for stored in versions:
        entry: dict[str, Any] = {"fullUrl": f"{base}/{stored.key}"}
        if not stored.deleted:
            entry["resource"] = stored.resource()
        entry["request"] = {
            "method": "DELETE" if stored.deleted else ("POST" if stored.version_id == 1 else "PUT"),
            "url": stored.key if stored.version_id > 1 or stored.deleted else stored.resource_type,
        }
        entry["response"] = {
            "status": "204" if stored.deleted else ("201" if stored.version_id == 1 else "200"),
            "etag": stored.etag,
            "lastModified": stored.last_updated,
        }
        entries.append(entry)

    def link(relation: str, at: int) -> dict[str, str]:
        params = [("_count", str(count))] + ([("_offset", str(at))] if at else [])
        return {"relation": relation, "url": f"{base}/{path}?{urlencode(params)}"}

    links = [link("self", offset)]
    if offset + count < total:
        links.append(link("next", offset + count))
    if offset > 0:
        links.append(link("previous", max(offset - count, 0)))
    bundle: dict[str, Any] = {"resourceType": "Bundle", "type": "history", "total": total}
    bundle["link"] = links
    if entries:
        bundle["entry"] = entries
    return bundle


def _references(resource: dict[str, Any], element: str) -> list[str]:
    value = resource.get(element)
    values = value if isinstance(value, list) else [value] if value else []
    keys = []
    for item in values:
        if isinstance(item, dict) and item.get("reference"):
            if key := reference_key(item["reference"]):
                keys.append(key)
    return keys


def _entry_json(full_url: str, stored: Stored, mode: str) -> str:
    """A Bundle entry as JSON text; ``full_url`` is the JSON-escaped ``"base/`` prefix."""
    return (
        f'{{"fullUrl":{full_url}{stored.resource_type}/{stored.resource_id}",'
        f'"resource":{stored.content},"search":{{"mode":"{mode}"}}}}'
    )


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise FhirError(400, f"{name} must be a non-negative integer, not {value[:40]!r}", INVALID)
    return int(value)
