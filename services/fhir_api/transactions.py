"""FHIR ``transaction`` Bundles (``POST [base]``): several writes that all happen or none does.

What a transaction may carry (FHIR R4 http.html#transaction, for the writes a client of many
related resources needs):

- ``PUT Type/id`` (update as create), with an optional ``request.ifMatch`` (the version it
  replaces) or ``request.ifNoneMatch: *`` (only if no current version exists: RFC 9110's
  precondition, which FHIR R4 leaves to HTTP; 412 when one does);
- ``PUT Type?search`` (conditional update): no match creates (with the resource's own id when it
  has one and that id is free, else a new one; 409 when that id exists but did not match), one
  match updates it (400 when the resource names another id), several are a 412;
- ``POST Type`` (create, the id assigned here), with an optional ``request.ifNoneExist``
  (conditional create: one match is answered ``200 OK`` with it and nothing is written; several
  are a 412);
- references between entries: a reference equal to another entry's ``fullUrl``
  (``urn:uuid:…``, ``urn:oid:…``) is rewritten to the ``Type/id`` that entry was given;
  a conditional reference (``Patient?identifier=…``) is replaced by the one stored resource it
  matches (412 for none or several; matched as the resources were before the transaction).

Processing order is the spec's: POST entries (their ids and conditional matches) before PUT
entries, then references; two entries that resolve to one resource are a 400. ``DELETE``,
``GET``, ``PATCH`` and ``batch`` Bundles are not implemented (501).

Every entry is checked as the single interaction would be (type, scope, the patient
compartment: a patient-bound token creates only what ``compartment.create_rule`` allows and
never updates; its conditional matches see only its own compartment; validation, the clinical
rules of ``clinical``) before anything is written, and all writes are then stored in one
database transaction (``ResourceStore.put_all``). Any refusal writes nothing and is an
OperationOutcome naming the entry (``Bundle.entry[i]``). The answer is a
``transaction-response`` Bundle, one entry per request entry in the same order, each with
``response.status``, ``location``, ``etag`` and ``lastModified``.

A clinician's review writes the signed Observation, the final report and the Provenance of the
signature this way (``scanwatch.clinical_review.review_transaction``); the worker writes a
scored study's resources this way (``inference_worker.adapters.fhir_writer``).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from services.auth.scopes import READ, AuthError, Grant
from services.fhir_api.clinical import practitioner_of, require_if_match, writes_as_user
from services.fhir_api.compartment import (
    Compartment,
    compartment_of,
    create_rule,
    refuse_patient_write,
)
from services.fhir_api.deps import check_type
from services.fhir_api.errors import CONFLICT, INVALID, FhirError, FhirJSONResponse, not_implemented
from services.fhir_api.resources import ID_RE, Stored, reference_key
from services.fhir_api.search import SearchQuery, parse_search
from services.fhir_api.store import ABSENT, ResourceStore, VersionConflict, WriteResult
from services.fhir_api.wire import http_date, parse_etag, validated

#: Most entries one transaction may carry.
MAX_ENTRIES = 100
#: A conditional reference or URL: ``Type?search``.
CONDITIONAL_RE = re.compile(r"^([A-Z][A-Za-z]+)\?(.*)$", re.DOTALL)
#: A resource type's name.
TYPE_RE = re.compile(r"^[A-Z][A-Za-z]{0,63}$")
#: ``fullUrl`` values that name an entry only inside its Bundle.
LOCAL_URL_PREFIXES = ("urn:uuid:", "urn:oid:")

Write = tuple[dict[str, Any], int | None]
#: The routes' check of a resource before it is stored: ``prepare(resource, grant)``.
Prepare = Callable[[dict[str, Any], Grant], dict[str, Any]]


def practitioner_writes(grant: Grant, types: list[str]) -> list[dict[str, Any]]:
    """The clinician's minimal Practitioner, when a ``user/`` write among ``types`` needs it
    (created in the same transaction if absent: ``ResourceStore.put_all``'s ``ensure``)."""
    if not any(writes_as_user(grant, t) for t in types):
        return []
    return [practitioner_of(grant)]


def store_all(
    store: ResourceStore,
    writes: list[Write],
    ensure: list[dict[str, Any]],
    where: dict[str, str] | None = None,
    create_only: frozenset[str] = frozenset(),
) -> list[WriteResult]:
    """``store.put_all``, a failed precondition as an OperationOutcome naming the resource (and
    its entry, ``where[Type/id]``): 412 for a stale ``ifMatch`` or an ``ifNoneMatch: *`` on
    one that exists (``create_only``), 428 for a clinician's update without ``ifMatch``."""
    try:
        return store.put_all(writes, ensure)
    except VersionConflict as exc:
        key = exc.key or "the resource"
        named = f"{where[key]} ({key})" if where and key in where else key
        if exc.expected == ABSENT and key in create_only:
            raise FhirError(
                412,
                f"{named} exists (version {exc.current}) and ifNoneMatch is *; nothing was written",
                CONFLICT,
            ) from exc
        if exc.expected == ABSENT:
            raise FhirError(
                428,
                f"a clinician's update of {named} needs If-Match (the ETag of the version "
                "they read); nothing was written",
                CONFLICT,
            ) from exc
        raise FhirError(
            412,
            f"If-Match of {named} does not match its current version "
            f"({'none' if exc.current is None else exc.current}); nothing was written",
            CONFLICT,
        ) from exc


def conditional_match(
    store: ResourceStore,
    resource_type: str,
    condition: str,
    rule: Compartment | None,
    what: str = "If-None-Exist",
) -> list[Stored]:
    """The resources (at most two) a condition (``a=b&c=d``, a leading ``?`` allowed) matches,
    within ``rule``'s compartment when the reader is patient-bound."""
    items = parse_qsl(condition.lstrip("?"), keep_blank_values=True)
    if not items:
        raise FhirError(400, f"{what} has no search parameters", INVALID)
    query: SearchQuery = parse_search(resource_type, items, 2, 2)
    if query.includes or query.revincludes or query.offset:
        raise FhirError(400, f"{what} takes search parameters only", INVALID)
    where = [*query.where, *([rule.clause()] if rule is not None else [])]
    _total, found = store.search(resource_type, where, query.order_by, 2, 0, 2)
    return found


def condition_key(resource_type: str, condition: str) -> str:
    """One name for a condition however its parameters are ordered: what
    :meth:`ResourceStore.conditions_locked` holds."""
    items = sorted(parse_qsl(condition.lstrip("?"), keep_blank_values=True))
    return f"{resource_type}?{urlencode(items)}"


def single_match(
    store: ResourceStore, resource_type: str, condition: str, rule: Compartment | None
) -> Stored | None:
    """The one resource ``If-None-Exist`` matches, or None; 412 when more than one does."""
    found = conditional_match(store, resource_type, condition, rule)
    if len(found) > 1:
        raise FhirError(412, "If-None-Exist matches more than one resource", CONFLICT)
    return found[0] if found else None


@contextmanager
def _naming(where: str) -> Iterator[None]:
    """Refusals raised inside as the same refusal, its message prefixed by the entry."""
    try:
        yield
    except FhirError as exc:
        messages = [exc.diagnostics] if isinstance(exc.diagnostics, str) else exc.diagnostics
        raise FhirError(exc.status, [f"{where}: {m}" for m in messages], exc.code) from exc
    except AuthError as exc:
        raise AuthError(exc.status, f"{where}: {exc.message}") from exc


@dataclass
class Entry:
    """One request entry of a transaction, as it is resolved."""

    index: int
    method: str  # POST or PUT
    resource_type: str
    resource: dict[str, Any]
    full_url: str | None
    condition: str | None = None  # ifNoneExist (POST) or the search of PUT Type?search
    version: int | None = None  # ifMatch, ABSENT for ifNoneMatch *
    create_only: bool = False
    rule: Compartment | None = None  # a patient-bound creator's compartment
    key: str = ""  # Type/id, once resolved
    existing: Stored | None = None  # a conditional create's match: nothing written
    checked: dict[str, Any] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"Bundle.entry[{self.index}]"


def _entries(raw: dict[str, Any]) -> list[Any]:
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
    return entries


def _parse_entry(index: int, entry: Any, grant: Grant) -> Entry:
    """An entry's request read and its access checked (the scope and compartment rules of the
    single interaction); nothing is looked up yet."""
    where = f"Bundle.entry[{index}]"
    request = entry.get("request") if isinstance(entry, dict) else None
    resource = entry.get("resource") if isinstance(entry, dict) else None
    if not isinstance(request, dict) or not isinstance(resource, dict):
        raise FhirError(400, f"{where} needs a request and a resource", INVALID)
    method, url = request.get("method"), str(request.get("url") or "")
    full_url = entry.get("fullUrl")
    if full_url is not None and not isinstance(full_url, str):
        raise FhirError(400, f"{where}.fullUrl must be a string", INVALID)
    if method not in ("POST", "PUT"):
        raise not_implemented(f"{where}: {str(method)[:10]} in a transaction (POST and PUT only)")
    with _naming(where):
        conditional = CONDITIONAL_RE.match(url.strip("/"))
        if method == "POST":
            resource_type = url.strip("/")
            if not TYPE_RE.match(resource_type):
                raise FhirError(
                    400, f"request.url of a POST must be Type, not {url[:80]!r}", INVALID
                )
        elif conditional:
            resource_type = conditional.group(1)
        else:
            key = reference_key(url)
            if key is None or url.strip("/") != key or not ID_RE.match(key.partition("/")[2]):
                raise FhirError(
                    400, f"request.url must be Type/id or Type?search, not {url[:80]!r}", INVALID
                )
            resource_type = key.partition("/")[0]
        check_type(resource_type)
        if resource.get("resourceType") != resource_type:
            raise FhirError(400, f"resource is not a {resource_type} (request.url)", INVALID)
        parsed = Entry(index, method, resource_type, dict(resource), full_url)
        if method == "POST":
            parsed.rule = create_rule(grant, resource_type)
            if (condition := request.get("ifNoneExist")) is not None:
                parsed.condition = str(condition)
                compartment_of(grant, resource_type, READ)  # a match is a search: read access
        else:
            refuse_patient_write(grant, resource_type)
            if conditional:
                parsed.condition = conditional.group(2)
            else:
                parsed.key = url.strip("/")
                if resource.get("id") != parsed.key.partition("/")[2]:
                    raise FhirError(400, f"resource.id does not match request.url ({parsed.key})")
            if_match, if_none_match = request.get("ifMatch"), request.get("ifNoneMatch")
            if if_match and if_none_match:
                raise FhirError(400, "ifMatch and ifNoneMatch together", INVALID)
            if if_match:
                parsed.version = parse_etag(str(if_match))
            elif if_none_match is not None:
                if str(if_none_match).strip() != "*":
                    raise FhirError(400, "ifNoneMatch of a PUT takes only *", INVALID)
                if conditional:
                    raise FhirError(400, "ifNoneMatch * is for PUT Type/id", INVALID)
                parsed.version, parsed.create_only = ABSENT, True
    return parsed


def _resolve_post(store: ResourceStore, entry: Entry, grant: Grant) -> None:
    """A POST's id: its conditional create's one match (nothing written), else a new id."""
    if entry.condition is not None:
        reading = compartment_of(grant, entry.resource_type, READ)
        entry.existing = single_match(store, entry.resource_type, entry.condition, reading)
    if entry.existing is not None:
        entry.key = entry.existing.key
    else:
        entry.key = f"{entry.resource_type}/{uuid.uuid4()}"


def _resolve_put(store: ResourceStore, entry: Entry) -> None:
    """A conditional update's target (R4 ``PUT Type?search``), pinned to the version matched."""
    if entry.condition is None:
        return
    found = conditional_match(store, entry.resource_type, entry.condition, None, "request.url")
    own_id = entry.resource.get("id")
    if len(found) > 1:
        raise FhirError(412, "the conditional update matches more than one resource", CONFLICT)
    if found:
        match = found[0]
        if own_id is not None and own_id != match.resource_id:
            raise FhirError(
                400, f"resource.id {str(own_id)[:64]!r} is not the match ({match.key})", INVALID
            )
        entry.key = match.key
        if entry.version is None:
            entry.version = match.version_id  # changed since the match: 412, nothing written
        return
    if own_id is None:
        entry.key = f"{entry.resource_type}/{uuid.uuid4()}"
        entry.version = ABSENT
        return
    if not isinstance(own_id, str) or not ID_RE.match(own_id):
        raise FhirError(400, "resource.id is not a valid id", INVALID)
    entry.key = f"{entry.resource_type}/{own_id}"
    current = store.read(entry.resource_type, own_id)
    if current is not None and not current.deleted:
        raise FhirError(
            409, f"{entry.key} exists but does not match the conditional update", CONFLICT
        )
    if entry.version is None:
        entry.version = ABSENT


def _rewrite(
    value: Any,
    local: dict[str, str],
    resolve: Callable[[str], str],
) -> Any:
    """``value`` with every ``reference`` that names an entry's ``fullUrl`` or is a conditional
    reference replaced by the ``Type/id`` it stands for."""
    if isinstance(value, list):
        return [_rewrite(item, local, resolve) for item in value]
    if not isinstance(value, dict):
        return value
    rewritten: dict[str, Any] = {}
    for name, item in value.items():
        if name == "reference" and isinstance(item, str):
            if item in local:
                item = local[item]
            elif item.startswith(LOCAL_URL_PREFIXES):
                raise FhirError(400, f"reference {item[:80]!r} names no entry of the Bundle")
            elif CONDITIONAL_RE.match(item):
                item = resolve(item)
            rewritten[name] = item
        else:
            rewritten[name] = _rewrite(item, local, resolve)
    return rewritten


def parse_transaction(raw: dict[str, Any], grant: Grant) -> list[Entry]:
    """Every entry of a transaction Bundle read and its access checked; nothing looked up."""
    return [_parse_entry(i, entry, grant) for i, entry in enumerate(_entries(raw))]


def plan_transaction(
    entries: list[Entry], grant: Grant, store: ResourceStore, prepare: Prepare
) -> list[Entry]:
    """Every entry of a transaction Bundle (:func:`parse_transaction`) resolved and checked, in
    request order; raises the first refusal (nothing is written). Looks conditions up in
    ``store`` (runs in a thread)."""
    # The spec's order: POST, then PUT (DELETE and GET are not served).
    for entry in sorted(entries, key=lambda e: e.method != "POST"):
        with _naming(entry.where):
            if entry.method == "POST":
                _resolve_post(store, entry, grant)
            else:
                _resolve_put(store, entry)
    seen: dict[str, Entry] = {}
    for entry in entries:
        if entry.key in seen:
            raise FhirError(
                400,
                f"{entry.where}: {entry.key} is also {seen[entry.key].where}'s resource",
                INVALID,
            )
        seen[entry.key] = entry
    local: dict[str, str] = {}
    for entry in entries:
        if entry.full_url and entry.full_url.startswith(LOCAL_URL_PREFIXES):
            if entry.full_url in local:
                raise FhirError(400, f"{entry.where}: fullUrl {entry.full_url[:80]!r} twice")
            local[entry.full_url] = entry.key
    resolved: dict[str, str] = {}

    def resolve(reference: str) -> str:
        if reference not in resolved:
            resource_type, _, condition = reference.partition("?")
            check_type(resource_type)
            reading = compartment_of(grant, resource_type, READ)
            found = conditional_match(store, resource_type, condition, reading, reference[:80])
            if len(found) != 1:
                many = "more than one resource" if found else "no resource"
                raise FhirError(412, f"conditional reference {reference[:80]!r} matches {many}")
            resolved[reference] = found[0].key
        return resolved[reference]

    for entry in entries:
        with _naming(entry.where):
            resource = _rewrite(entry.resource, local, resolve)
            if entry.existing is not None:
                continue  # a conditional create that matched: nothing to write
            resource["id"] = entry.key.partition("/")[2]
            entry.checked = prepare(validated(entry.resource_type, resource), grant)
            if entry.rule is not None:
                entry.rule.check_created(entry.checked)
    return entries


def _response_entry(stored: Stored, status: str) -> dict[str, Any]:
    return {
        "response": {
            "status": status,
            "location": f"{stored.key}/_history/{stored.version_id}",
            "etag": stored.etag,
            "lastModified": stored.last_updated,
        }
    }


def _write(
    raw: dict[str, Any], grant: Grant, store: ResourceStore, prepare: Prepare
) -> tuple[list[Entry], list[WriteResult], list[WriteResult]]:
    """Plan, then store: (entries, the Practitioner ensured, each writing entry's result). The
    conditions of conditional creates and updates are held from their search to the write."""
    entries = parse_transaction(raw, grant)
    conditions = [condition_key(e.resource_type, e.condition) for e in entries if e.condition]
    with store.conditions_locked(conditions):
        entries = plan_transaction(entries, grant, store, prepare)
        writing = [e for e in entries if e.existing is None]
        writes = require_if_match(grant, [(e.checked, e.version) for e in writing])
        extra = practitioner_writes(grant, [e.resource_type for e in writing])
        where = {e.key: e.where for e in writing}
        create_only = frozenset(e.key for e in writing if e.create_only)
        results = store_all(store, writes, extra, where, create_only) if writes else []
    return entries, results[: len(extra)], results[len(extra) :]


async def run_transaction(
    raw: dict[str, Any],
    grant: Grant,
    store: ResourceStore,
    prepare: Prepare,
) -> tuple[Response, list[WriteResult]]:
    """Check, then store every entry of a transaction; the ``transaction-response`` Bundle and
    what was written (for notifications)."""
    entries, ensured, written = await run_in_threadpool(_write, raw, grant, store, prepare)
    by_entry = iter(written)
    answer = []
    for entry in entries:
        if entry.existing is not None:
            answer.append(_response_entry(entry.existing, "200 OK"))
            continue
        result = next(by_entry)
        answer.append(_response_entry(result.stored, "201 Created" if result.created else "200 OK"))
    bundle = {"resourceType": "Bundle", "type": "transaction-response", "entry": answer}
    response = FhirJSONResponse(bundle, status_code=200)
    if written:
        response.headers["Last-Modified"] = http_date(written[-1].stored.last_updated)
    return response, [*ensured, *written]
