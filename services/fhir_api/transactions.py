"""FHIR ``transaction`` Bundles (``POST [base]``): several writes that all happen or none does.

Entries are ``PUT Type/id`` (update as create), each with an optional ``request.ifMatch``;
every one is checked as a single ``PUT`` would be (type, scope, validation, the clinical
rules of ``clinical``) before anything is written, and all are then stored in one database
transaction (``ResourceStore.put_all``). A stale ``ifMatch`` on any entry is a 412 and nothing
is written; so is any other refusal. This is how a clinician's review writes the signed
Observation, the final report and the Provenance of the signature together
(``scanwatch.clinical_review.review_transaction``). ``POST`` entries (server-assigned ids,
``urn:uuid`` references) and ``batch`` Bundles are not implemented (501).
"""

from __future__ import annotations

from typing import Any

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from services.auth.scopes import Grant
from services.fhir_api.clinical import practitioner_of, require_if_match, writes_as_user
from services.fhir_api.compartment import refuse_patient_write
from services.fhir_api.deps import check_type
from services.fhir_api.errors import CONFLICT, INVALID, FhirError, FhirJSONResponse, not_implemented
from services.fhir_api.resources import ID_RE, reference_key
from services.fhir_api.store import ABSENT, ResourceStore, VersionConflict, WriteResult
from services.fhir_api.wire import http_date, parse_etag, validated

#: Most entries one transaction may carry.
MAX_ENTRIES = 100

Write = tuple[dict[str, Any], int | None]


def practitioner_writes(grant: Grant, types: list[str]) -> list[dict[str, Any]]:
    """The clinician's minimal Practitioner, when a ``user/`` write among ``types`` needs it
    (created in the same transaction if absent: ``ResourceStore.put_all``'s ``ensure``)."""
    if not any(writes_as_user(grant, t) for t in types):
        return []
    return [practitioner_of(grant)]


def store_all(
    store: ResourceStore, writes: list[Write], ensure: list[dict[str, Any]]
) -> list[WriteResult]:
    """``store.put_all``, a stale ``ifMatch`` as a 412 OperationOutcome naming the resource."""
    try:
        return store.put_all(writes, ensure)
    except VersionConflict as exc:
        if exc.expected == ABSENT:
            raise FhirError(
                428,
                f"a clinician's update of {exc.key} needs If-Match (the ETag of the version "
                "they read); nothing was written",
                CONFLICT,
            ) from exc
        raise FhirError(
            412,
            f"If-Match of {exc.key} does not match its current version "
            f"({'none' if exc.current is None else exc.current}); nothing was written",
            CONFLICT,
        ) from exc


def parse_transaction(raw: dict[str, Any], grant: Grant, prepare: Any) -> list[tuple[Write, str]]:
    """The checked writes of a transaction Bundle and each entry's ``Type/id``; raises the
    first refusal (nothing is written). ``prepare(resource, grant)`` is the routes' check."""
    if raw.get("resourceType") != "Bundle":
        raise FhirError(400, "POST [base] takes a Bundle", INVALID)
    kind = raw.get("type")
    if kind == "batch":
        raise not_implemented("batch")
    if kind != "transaction":
        raise FhirError(400, f"Bundle.type must be transaction, not {str(kind)[:40]!r}", INVALID)
    entries = raw.get("entry") or []
    if not isinstance(entries, list) or not entries:
        raise FhirError(400, "the transaction has no entries", INVALID)
    if len(entries) > MAX_ENTRIES:
        raise FhirError(400, f"a transaction takes at most {MAX_ENTRIES} entries", INVALID)
    writes: list[tuple[Write, str]] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        where = f"Bundle.entry[{index}]"
        request = (entry or {}).get("request") if isinstance(entry, dict) else None
        resource = (entry or {}).get("resource") if isinstance(entry, dict) else None
        if not isinstance(request, dict) or not isinstance(resource, dict):
            raise FhirError(400, f"{where} needs a request and a resource", INVALID)
        method, url = request.get("method"), str(request.get("url") or "")
        if method != "PUT":
            raise not_implemented(f"{where}: {str(method)[:10]} in a transaction (PUT only)")
        key = reference_key(url)
        resource_type, _, resource_id = (key or "").partition("/")
        if key is None or url.strip("/") != key or not ID_RE.match(resource_id):
            raise FhirError(400, f"{where}.request.url must be Type/id, not {url[:80]!r}", INVALID)
        check_type(resource_type)
        if resource.get("resourceType") != resource_type or resource.get("id") != resource_id:
            raise FhirError(400, f"{where}.resource does not match request.url ({key})", INVALID)
        if key in seen:
            raise FhirError(400, f"{where}: {key} appears twice in the transaction", INVALID)
        seen.add(key)
        refuse_patient_write(grant, resource_type)
        if_match = request.get("ifMatch")
        version = parse_etag(str(if_match)) if if_match else None
        checked = prepare(validated(resource_type, resource), grant)
        writes.append(((checked, version), key))
    return writes


async def run_transaction(
    raw: dict[str, Any],
    grant: Grant,
    store: ResourceStore,
    prepare: Any,
) -> tuple[Response, list[WriteResult]]:
    """Check, then store every entry of a transaction; the ``transaction-response`` Bundle and
    what was written (for notifications)."""
    parsed = parse_transaction(raw, grant, prepare)
    writes = [write for write, _key in parsed]
    types = [resource["resourceType"] for resource, _ in writes]
    writes = require_if_match(grant, writes)
    extra = practitioner_writes(grant, types)
    results = await run_in_threadpool(store_all, store, writes, extra)
    answered = results[len(extra) :]
    entries = []
    for result in answered:
        stored = result.stored
        entries.append(
            {
                "response": {
                    "status": "201 Created" if result.created else "200 OK",
                    "location": f"{stored.key}/_history/{stored.version_id}",
                    "etag": stored.etag,
                    "lastModified": stored.last_updated,
                }
            }
        )
    bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}
    response = FhirJSONResponse(bundle, status_code=200)
    if answered:
        response.headers["Last-Modified"] = http_date(answered[-1].stored.last_updated)
    return response, results
