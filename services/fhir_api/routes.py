"""The FHIR REST interactions under ``/fhir``: metadata, SMART discovery, read, vread,
history, search, create (conditional with ``If-None-Exist``), update (as create,
``If-Match``), delete, and transaction Bundles (``transactions``).

:data:`router` is included by the app factory. Each route declares what it needs as
dependencies (``deps``): the grant (406/401), the resource type (404), the id (400) and the
scope (403, with the patient compartment a read or a patient's create is limited to:
``compartment``), in that order.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from services.auth.config import AuthSettings
from services.auth.scopes import READ, AuthError, Grant
from services.fhir_api.audit import Audit
from services.fhir_api.bundles import INCLUDE_TYPES, history, parse_history, searchset
from services.fhir_api.capability import capability_statement, issuer_root, smart_configuration
from services.fhir_api.clinical import check_author, check_signed_result, require_if_match
from services.fhir_api.compartment import Compartment, check_patient_members, compartment_of
from services.fhir_api.config import Settings
from services.fhir_api.deps import (
    AuditDep,
    BaseUrl,
    CreateRule,
    GrantDep,
    ReadRule,
    ResourceId,
    ResourceType,
    SettingsDep,
    StoreDep,
    SubscriptionsDep,
    WriteAccess,
    negotiated,
)
from services.fhir_api.errors import (
    DELETED,
    INVALID,
    NOT_FOUND,
    FhirError,
    FhirJSONResponse,
    not_implemented,
)
from services.fhir_api.resources import Stored
from services.fhir_api.search import INCLUDES, REVINCLUDES, parse_search
from services.fhir_api.store import ResourceStore, WriteResult
from services.fhir_api.subscriptions import check_subscription
from services.fhir_api.transactions import (
    condition_key,
    practitioner_writes,
    run_transaction,
    single_match,
    store_all,
)
from services.fhir_api.wire import (
    interaction_name,
    json_object,
    parse_etag,
    read_body,
    resource_response,
    validated,
)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

router = APIRouter()


def prepare(resource: dict[str, Any], grant: Grant) -> dict[str, Any]:
    """Check or adjust a resource before it is stored (the Subscription rules; one patient per
    resource in the compartment; a signed result's rules; a clinician's write names them as its
    author: ``clinical``)."""
    check_patient_members(resource)
    check_signed_result(resource)
    resource = check_author(grant, resource)
    if resource["resourceType"] == "Subscription":
        return check_subscription(resource)
    return resource


def gone(stored: Stored) -> FhirError:
    return FhirError(410, f"{stored.key} was deleted (version {stored.version_id})", DELETED)


# --- public: capabilities and discovery ------------------------------------------------------


@router.get("/fhir/metadata", dependencies=[Depends(negotiated)])
def metadata(request: Request, settings: SettingsDep, base: BaseUrl) -> Response:
    started: str = request.app.state.started
    auth_required = request.app.state.tokens is not None
    issuer = _issuer(request, base)
    return FhirJSONResponse(capability_statement(base, started, settings, auth_required, issuer))


@router.get("/fhir/.well-known/smart-configuration")
def smart(request: Request, base: BaseUrl) -> Response:
    return JSONResponse(smart_configuration(_issuer(request, base)))


def _issuer(request: Request, base: str) -> str:
    """The authorization server's root URL: configured (``SCANWATCH_AUTH_ISSUER``), else the
    FHIR base URL's root."""
    settings: AuthSettings = request.app.state.auth_settings
    return settings.issuer or issuer_root(base)


# --- type level ------------------------------------------------------------------------------


def history_response(
    request: Request,
    settings: Settings,
    store: ResourceStore,
    base: str,
    audit: Audit,
    resource_type: str,
    resource_id: str | None,
) -> Response:
    """The history Bundle of a type (``resource_id`` None) or of one resource, audited."""
    query = parse_history(
        request.query_params.multi_items(), settings.default_count, settings.max_count
    )
    bundle = history(store, base, resource_type, resource_id, query)
    action = "history-type" if resource_id is None else "history-instance"
    audit(action, resource_type, resource_id, 200, len(bundle.get("entry", ())))
    return FhirJSONResponse(bundle)


@router.get("/fhir/{resource_type}/_history")
def type_history(
    request: Request,
    _grant: GrantDep,
    resource_type: ResourceType,
    rule: ReadRule,
    settings: SettingsDep,
    store: StoreDep,
    base: BaseUrl,
    audit: AuditDep,
) -> Response:
    if rule is not None:
        raise AuthError(403, "type history is not available to patient-bound tokens")
    return history_response(request, settings, store, base, audit, resource_type, None)


@router.get("/fhir/{resource_type}")
def search(
    request: Request,
    grant: GrantDep,
    resource_type: ResourceType,
    rule: ReadRule,
    settings: SettingsDep,
    store: StoreDep,
    base: BaseUrl,
    audit: AuditDep,
) -> Response:
    items = request.query_params.multi_items()
    query = parse_search(resource_type, items, settings.default_count, settings.max_count)
    if rule is not None:
        query.where.append(rule.clause())
    for include in query.includes:
        for target in INCLUDE_TYPES[INCLUDES[include][1]]:
            if not grant.allows(target, READ) or compartment_of(grant, target) is not None:
                raise AuthError(403, f"_include={include} needs read access to {target}")
    for revinclude in query.revincludes:
        source = REVINCLUDES[revinclude][0]
        if not grant.allows(source, READ) or compartment_of(grant, source) is not None:
            raise AuthError(403, f"_revinclude={revinclude} needs read access to {source}")
    with store.reading() as connection:  # one pool checkout for the search and its audit
        body, returned = searchset(store, connection, base, query)
        audit("search-type", resource_type, None, 200, returned, connection)
    return FhirJSONResponse(body)


@router.post("/fhir/{resource_type}")
async def create(
    request: Request,
    grant: GrantDep,
    resource_type: ResourceType,
    rule: CreateRule,
    store: StoreDep,
    subscriptions: SubscriptionsDep,
    base: BaseUrl,
) -> Response:
    body = await read_body(request)
    condition = request.headers.get("if-none-exist")
    existing, results = await run_in_threadpool(
        _create, store, grant, resource_type, rule, body, condition
    )
    if existing is not None:
        return resource_response(existing, request, base, 200)
    for result in results:
        if result.changed:  # the created resource always is; its Practitioner when created
            subscriptions.resource_written(result.stored)
    return resource_response(results[-1].stored, request, base, 201)


def _create(
    store: ResourceStore,
    grant: Grant,
    resource_type: str,
    rule: Compartment | None,
    body: bytes,
    condition: str | None,
) -> tuple[Stored | None, list[WriteResult]]:
    """A create: (the one match of ``condition``, If-None-Exist, and nothing written) or (None,
    what was written). The condition is held from its search to the write."""
    held = [condition_key(resource_type, condition)] if condition else []
    with store.conditions_locked(held):
        if condition:
            # The match is a search: a patient-bound token finds only its own compartment's.
            reading = compartment_of(grant, resource_type, READ)
            if (existing := single_match(store, resource_type, condition, reading)) is not None:
                return existing, []
        raw = json_object(body)
        if raw.get("resourceType") != resource_type:
            raise FhirError(
                400, f"resourceType {raw.get('resourceType')!r} does not match the URL", INVALID
            )
        raw["id"] = str(uuid.uuid4())  # create: the server assigns the id
        resource = prepare(validated(resource_type, raw), grant)
        if rule is not None:
            rule.check_created(resource)
        extra = practitioner_writes(grant, [resource_type])
        return None, store_all(store, [(resource, None)], extra)


# --- instance level --------------------------------------------------------------------------


@router.get("/fhir/{resource_type}/{resource_id}")
def read(
    request: Request,
    _grant: GrantDep,
    resource_type: ResourceType,
    resource_id: ResourceId,
    rule: ReadRule,
    store: StoreDep,
    base: BaseUrl,
    audit: AuditDep,
) -> Response:
    stored = store.read(resource_type, resource_id)
    if stored is None:
        audit("read", resource_type, resource_id, 404, 0)
        raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
    if stored.deleted:
        raise gone(stored)
    if rule is not None:
        rule.check(stored)
    audit("read", resource_type, resource_id, 200, 1)
    if_none_match = request.headers.get("if-none-match")
    if if_none_match and stored.etag in (t.strip() for t in if_none_match.split(",")):
        return Response(status_code=304, headers={"ETag": stored.etag})
    return resource_response(stored, request, base)


@router.get("/fhir/{resource_type}/{resource_id}/_history")
def instance_history(
    request: Request,
    _grant: GrantDep,
    resource_type: ResourceType,
    resource_id: ResourceId,
    rule: ReadRule,
    settings: SettingsDep,
    store: StoreDep,
    base: BaseUrl,
    audit: AuditDep,
) -> Response:
    current = store.read(resource_type, resource_id)
    if current is None:
        raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
    if rule is not None:
        # The compartment is judged on the last version that had content.
        _total, versions = store.history(resource_type, resource_id, None, 2, 0)
        latest = next((v for v in versions if not v.deleted), None)
        if latest is None:
            raise AuthError(403, "the token is bound to another patient")
        rule.check(latest)
    return history_response(request, settings, store, base, audit, resource_type, resource_id)


@router.get("/fhir/{resource_type}/{resource_id}/_history/{version_id}")
def vread(
    request: Request,
    _grant: GrantDep,
    resource_type: ResourceType,
    resource_id: ResourceId,
    rule: ReadRule,
    version_id: str,
    store: StoreDep,
    base: BaseUrl,
    audit: AuditDep,
) -> Response:
    if not version_id.isdigit() or len(version_id) > 9:
        raise FhirError(400, f"version id {version_id[:20]!r} is not a number", INVALID)
    stored = store.vread(resource_type, resource_id, int(version_id))
    if stored is None:
        raise FhirError(
            404, f"{resource_type}/{resource_id} has no version {version_id}", NOT_FOUND
        )
    if stored.deleted:
        raise gone(stored)
    if rule is not None:
        rule.check(stored)
    audit("vread", resource_type, resource_id, 200, 1)
    return resource_response(stored, request, base)


@router.put("/fhir/{resource_type}/{resource_id}")
async def update(
    request: Request,
    grant: GrantDep,
    resource_type: ResourceType,
    resource_id: ResourceId,
    _writer: WriteAccess,
    store: StoreDep,
    subscriptions: SubscriptionsDep,
    base: BaseUrl,
) -> Response:
    if_match = request.headers.get("if-match")
    version = parse_etag(if_match) if if_match else None
    raw = json_object(await read_body(request))
    if raw.get("resourceType") != resource_type:
        raise FhirError(
            400,
            f"resourceType {raw.get('resourceType')!r} does not match the URL ({resource_type})",
            INVALID,
        )
    if raw.get("id") != resource_id:
        raise FhirError(
            400,
            f"resource id {str(raw.get('id'))[:80]!r} does not match the URL ({resource_id})",
            INVALID,
        )
    resource = prepare(validated(resource_type, raw), grant)
    writes = require_if_match(grant, [(resource, version)])
    extra = practitioner_writes(grant, [resource_type])
    results = await run_in_threadpool(store_all, store, writes, extra)
    for written in results:
        if written.changed:
            subscriptions.resource_written(written.stored)
    result = results[-1]
    return resource_response(result.stored, request, base, 201 if result.created else 200)


@router.delete("/fhir/{resource_type}/{resource_id}")
async def delete(
    _grant: GrantDep,
    resource_type: ResourceType,
    resource_id: ResourceId,
    _writer: WriteAccess,
    store: StoreDep,
    subscriptions: SubscriptionsDep,
) -> Response:
    stored = await run_in_threadpool(store.delete, resource_type, resource_id)
    if stored is None:
        raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
    subscriptions.resource_written(stored)
    return Response(status_code=204, headers={"ETag": stored.etag})


@router.post("/fhir")
async def transaction(
    request: Request,
    grant: GrantDep,
    store: StoreDep,
    subscriptions: SubscriptionsDep,
) -> Response:
    """A transaction Bundle: every entry written, or none (``transactions``)."""
    raw = json_object(await read_body(request))
    response, results = await run_transaction(raw, grant, store, prepare)
    for result in results:
        if result.changed:
            subscriptions.resource_written(result.stored)
    return response


@router.api_route("/fhir", methods=ALL_METHODS, operation_id="unsupported_root")
@router.api_route("/fhir/{path:path}", methods=ALL_METHODS, operation_id="unsupported_path")
async def unsupported(request: Request, _grant: GrantDep, path: str = "") -> Response:
    raise not_implemented(interaction_name(request.method, path))


def started_now() -> str:
    """The instant the CapabilityStatement's ``date`` names (when the app was built)."""
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
