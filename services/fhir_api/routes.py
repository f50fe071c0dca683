"""The FHIR REST interactions under ``/fhir``: metadata, read, vread, history, search, create
(conditional with ``If-None-Exist``), update (as create, ``If-Match``) and delete, each behind
the token check; plus the token endpoint (``/auth/token``) and SMART discovery."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError
from sqlalchemy.engine import Connection, Engine

from services.fhir_api import auth
from services.fhir_api.auth import READ, WRITE, AuthError, Grant, TokenService
from services.fhir_api.capability import capability_statement, smart_configuration
from services.fhir_api.config import Settings
from services.fhir_api.errors import (
    CONFLICT,
    DELETED,
    INVALID,
    NOT_FOUND,
    NOT_SUPPORTED,
    STRUCTURE,
    FhirError,
    FhirJSONResponse,
    not_implemented,
)
from services.fhir_api.fhirdates import fhir_range
from services.fhir_api.search import (
    INCLUDES,
    REVINCLUDES,
    TOTAL_LIMIT,
    SearchQuery,
    parse_search,
)
from services.fhir_api.store import (
    ID_RE,
    SUBJECT_TYPES,
    ResourceStore,
    ResourceVersion,
    Stored,
    VersionConflict,
    reference_key,
    without_server_meta,
)

JSON_MEDIA_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
ACCEPTABLE = (*JSON_MEDIA_TYPES, "*/*", "application/*")
FORMATS = ("json", *JSON_MEDIA_TYPES)
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
#: Largest request body accepted (bytes).
MAX_BODY_BYTES = 1_000_000
_ETAG_PREFIXES = ('W/"', '"')

OnWrite = Callable[[Stored], None]


def _is_fhir_resource(name: str) -> bool:
    try:
        model = get_fhir_model_class(name)
    except (ValueError, KeyError, AttributeError):
        return False
    return isinstance(model, type) and issubclass(model, Resource)


def check_type(resource_type: str, supported: tuple[str, ...]) -> None:
    """404 for a resource type this server does not store (saying whether FHIR knows it)."""
    if resource_type in supported:
        return
    names = ", ".join(supported)
    if len(resource_type) <= 64 and resource_type.isalpha() and _is_fhir_resource(resource_type):
        raise FhirError(
            404,
            f"resource type {resource_type} is not supported by this server (supported: {names})",
            NOT_SUPPORTED,
        )
    raise FhirError(
        404, f"unknown resource type {resource_type[:64]!r} (supported: {names})", NOT_FOUND
    )


def check_id(resource_id: str) -> None:
    if not ID_RE.match(resource_id):
        raise FhirError(400, f"{resource_id[:80]!r} is not a valid FHIR id", INVALID)


def _http_date(instant: str) -> str:
    return format_datetime(datetime.fromisoformat(instant), usegmt=True)


def _parse_etag(value: str) -> int:
    text = value.strip()
    for prefix in _ETAG_PREFIXES:
        if text.startswith(prefix) and text.endswith('"'):
            text = text[len(prefix) : -1]
            break
    if not text.isdigit():
        raise FhirError(400, f'If-Match must be an ETag like W/"3", not {value[:40]!r}', INVALID)
    return int(text)


def negotiate(request: Request) -> None:
    """406 unless the client accepts FHIR JSON (``Accept`` or ``_format``)."""
    fmt = request.query_params.get("_format")
    if fmt is not None and fmt not in FORMATS:
        raise FhirError(406, f"_format {fmt[:40]!r} is not supported; use json", NOT_SUPPORTED)
    accept = request.headers.get("accept")
    if fmt is None and accept:
        types = [part.split(";", 1)[0].strip().lower() for part in accept.split(",")]
        if not any(t in ACCEPTABLE for t in types):
            raise FhirError(
                406, "this server answers application/fhir+json only (Accept)", NOT_SUPPORTED
            )


def build_router(
    store: ResourceStore,
    settings: Settings,
    started: str,
    tokens: TokenService | None,
    on_write: OnWrite,
    prepare: Callable[[dict[str, Any]], dict[str, Any]],
) -> APIRouter:
    """The routes over ``store``; ``tokens`` None means authorization is off; ``on_write`` is
    told of every new version (subscriptions); ``prepare`` may check or adjust a resource
    before it is stored (Subscription rules)."""
    router = APIRouter()
    supported = settings.resource_types
    engine: Engine = store.engine

    def base_of(request: Request) -> str:
        return settings.base_url or f"{str(request.base_url).rstrip('/')}/fhir"

    def grant_of(request: Request) -> Grant:
        negotiate(request)
        if tokens is None:
            return auth.OPEN_GRANT
        return tokens.verify(auth.bearer_token(request.headers.get("authorization")))

    def audit(
        grant: Grant,
        request: Request,
        interaction: str,
        resource_type: str | None,
        resource_id: str | None,
        status: int,
        returned: int,
        connection: Connection | None = None,
    ) -> None:
        if not settings.audit_reads:
            return
        names = (name for name, _ in request.query_params.multi_items())
        if connection is not None:
            auth.record_audit(
                connection, grant, interaction, resource_type, resource_id, names, status, returned
            )
            return
        with store.reading() as own:
            auth.record_audit(
                own, grant, interaction, resource_type, resource_id, names, status, returned
            )

    def in_compartment(grant: Grant, stored: Stored) -> bool:
        if stored.resource_type == "Patient":
            return stored.resource_id == grant.patient
        if stored.resource_type in SUBJECT_TYPES and not stored.deleted:
            reference = (stored.resource().get("subject") or {}).get("reference") or ""
            return reference_key(reference) == f"Patient/{grant.patient}"
        return False

    def check_read(grant: Grant, stored: Stored) -> None:
        if grant.patient_bound(stored.resource_type, READ) and not in_compartment(grant, stored):
            raise AuthError(403, "the token is bound to another patient")

    def resource_response(stored: Stored, request: Request, status: int = 200) -> Response:
        headers = {"ETag": stored.etag, "Last-Modified": _http_date(stored.last_updated)}
        if status == 201 or request.method == "PUT":
            headers["Location"] = (
                f"{base_of(request)}/{stored.resource_type}/{stored.resource_id}"
                f"/_history/{stored.version_id}"
            )
        return FhirJSONResponse(stored.content, status_code=status, headers=headers)

    def gone(stored: Stored) -> FhirError:
        return FhirError(410, f"{stored.key} was deleted (version {stored.version_id})", DELETED)

    # --- public: capabilities and discovery ----------------------------------------------

    @router.get("/fhir/metadata")
    def metadata(request: Request) -> Response:
        negotiate(request)
        return FhirJSONResponse(
            capability_statement(
                base_of(request), started, settings, auth_required=tokens is not None
            )
        )

    @router.get("/fhir/.well-known/smart-configuration")
    def smart(request: Request) -> Response:
        return JSONResponse(smart_configuration(base_of(request)))

    @router.post("/auth/token")
    async def token(request: Request) -> Response:
        """OAuth 2.0 client credentials grant (RFC 6749 §4.4) for registered clients."""
        if tokens is None:
            return _oauth_error(400, "invalid_request", "authorization is off on this server")
        body = (await request.body())[:10_000].decode("utf-8", "replace")
        form = dict(parse_qsl(body, keep_blank_values=True))
        if form.get("grant_type") != "client_credentials":
            return _oauth_error(400, "unsupported_grant_type", "use grant_type=client_credentials")
        try:
            client_id, secret = auth.client_credentials(request.headers.get("authorization"), form)
        except ValueError as exc:
            return _oauth_error(401, "invalid_client", str(exc))
        client = await run_in_threadpool(auth.authenticate_client, engine, client_id, secret)
        if client is None:
            return _oauth_error(401, "invalid_client", "unknown client or wrong secret")
        try:
            scopes = auth.granted_scopes(client, form.get("scope"))
        except ValueError as exc:
            return _oauth_error(400, "invalid_scope", str(exc))
        access_token, expires_in = tokens.issue(client.client_id, scopes, client.patient)
        answer: dict[str, Any] = {
            "access_token": access_token,
            "token_type": "bearer",
            "expires_in": expires_in,
            "scope": " ".join(str(s) for s in scopes),
        }
        if client.patient:
            answer["patient"] = client.patient
        return JSONResponse(answer, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    # --- type level ------------------------------------------------------------------------

    @router.get("/fhir/{resource_type}/_history")
    def type_history(resource_type: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        grant.require(resource_type, READ)
        if grant.patient_bound(resource_type, READ):
            raise AuthError(403, "type history is not available to patient-bound tokens")
        return history_bundle(request, grant, resource_type, None)

    @router.get("/fhir/{resource_type}")
    def search(resource_type: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        grant.require(resource_type, READ)
        items = request.query_params.multi_items()
        query = parse_search(resource_type, items, settings.default_count, settings.max_count)
        bound = grant.patient_bound(resource_type, READ)
        if bound:
            if resource_type == "Patient":
                query.where.append(ResourceVersion.resource_id == grant.patient)  # type: ignore[arg-type]
            elif resource_type in SUBJECT_TYPES:
                query.where.append(ResourceVersion.subject_ref == f"Patient/{grant.patient}")  # type: ignore[arg-type]
            else:
                raise AuthError(403, f"{resource_type} is outside the patient's compartment")
        for include in query.includes:
            target = INCLUDES[include][1]
            for allowed in _include_types(target):
                if not grant.allows(allowed, READ) or grant.patient_bound(allowed, READ):
                    raise AuthError(403, f"_include={include} needs read access to {allowed}")
        for revinclude in query.revincludes:
            source = REVINCLUDES[revinclude][0]
            if not grant.allows(source, READ) or grant.patient_bound(source, READ):
                raise AuthError(403, f"_revinclude={revinclude} needs read access to {source}")
        with store.reading() as connection:  # one pool checkout for the search and its audit
            body, returned = search_bundle(connection, request, query)
            audit(grant, request, "search-type", resource_type, None, 200, returned, connection)
        return FhirJSONResponse(body)

    def search_bundle(
        connection: Connection, request: Request, query: SearchQuery
    ) -> tuple[bytes, int]:
        """The searchset Bundle as JSON bytes, and how many entries it has.

        Each resource's stored JSON text goes into the Bundle as it is (it was written as
        compact JSON by the store): no parse and re-serialisation per entry, which was most of
        a search's CPU time (bench/fhir.md)."""
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
        base = base_of(request)
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
            return {
                "relation": relation,
                "url": f"{base}/{query.resource_type}?{urlencode(params)}",
            }

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

    @router.post("/fhir/{resource_type}")
    async def create(resource_type: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        grant.require(resource_type, WRITE)
        _refuse_patient_write(grant, resource_type)
        body = await _body(request)
        if condition := request.headers.get("if-none-exist"):
            grant.require(resource_type, READ)
            items = parse_qsl(condition.lstrip("?"), keep_blank_values=True)
            if not items:
                raise FhirError(400, "If-None-Exist has no search parameters", INVALID)
            query = parse_search(resource_type, items, 2, 2)
            if query.includes or query.revincludes or query.offset:
                raise FhirError(400, "If-None-Exist takes search parameters only", INVALID)
            _total, existing = await run_in_threadpool(
                store.search, resource_type, query.where, query.order_by, 2, 0, 2
            )
            if len(existing) > 1:
                raise FhirError(412, "If-None-Exist matches more than one resource", CONFLICT)
            if existing:
                return resource_response(existing[0], request, 200)
        raw = _json_object(body)
        if raw.get("resourceType") != resource_type:
            raise FhirError(
                400, f"resourceType {raw.get('resourceType')!r} does not match the URL", INVALID
            )
        raw["id"] = str(uuid.uuid4())  # create: the server assigns the id
        resource = prepare(validated(resource_type, raw))
        result = await run_in_threadpool(store.put, resource)
        on_write(result.stored)
        return resource_response(result.stored, request, 201)

    # --- instance level ------------------------------------------------------------------

    @router.get("/fhir/{resource_type}/{resource_id}")
    def read(resource_type: str, resource_id: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        check_id(resource_id)
        grant.require(resource_type, READ)
        stored = store.read(resource_type, resource_id)
        if stored is None:
            audit(grant, request, "read", resource_type, resource_id, 404, 0)
            raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
        if stored.deleted:
            raise gone(stored)
        check_read(grant, stored)
        audit(grant, request, "read", resource_type, resource_id, 200, 1)
        if_none_match = request.headers.get("if-none-match")
        if if_none_match and stored.etag in (t.strip() for t in if_none_match.split(",")):
            return Response(status_code=304, headers={"ETag": stored.etag})
        return resource_response(stored, request)

    @router.get("/fhir/{resource_type}/{resource_id}/_history")
    def instance_history(resource_type: str, resource_id: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        check_id(resource_id)
        grant.require(resource_type, READ)
        current = store.read(resource_type, resource_id)
        if current is None:
            raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
        if grant.patient_bound(resource_type, READ):
            # The compartment is judged on the last version that had content.
            _total, versions = store.history(resource_type, resource_id, None, 2, 0)
            latest = next((v for v in versions if not v.deleted), None)
            if latest is None or not in_compartment(grant, latest):
                raise AuthError(403, "the token is bound to another patient")
        return history_bundle(request, grant, resource_type, resource_id)

    @router.get("/fhir/{resource_type}/{resource_id}/_history/{version_id}")
    def vread(resource_type: str, resource_id: str, version_id: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        check_id(resource_id)
        grant.require(resource_type, READ)
        if not version_id.isdigit() or len(version_id) > 9:
            raise FhirError(400, f"version id {version_id[:20]!r} is not a number", INVALID)
        stored = store.vread(resource_type, resource_id, int(version_id))
        if stored is None:
            raise FhirError(
                404, f"{resource_type}/{resource_id} has no version {version_id}", NOT_FOUND
            )
        if stored.deleted:
            raise gone(stored)
        check_read(grant, stored)
        audit(grant, request, "vread", resource_type, resource_id, 200, 1)
        return resource_response(stored, request)

    def history_bundle(
        request: Request, grant: Grant, resource_type: str, resource_id: str | None
    ) -> Response:
        count, offset, since = settings.default_count, 0, None
        for name, value in request.query_params.multi_items():
            if name == "_count":
                count = min(_non_negative(name, value), settings.max_count)
            elif name == "_offset":
                offset = _non_negative(name, value)
            elif name == "_since":
                try:
                    since = fhir_range(value, default_zone=None)[0]
                except ValueError as exc:
                    raise FhirError(400, f"_since: {exc}", INVALID) from exc
            elif name != "_format":
                raise FhirError(400, f"unknown history parameter {name[:40]!r}", INVALID)
        total, versions = store.history(resource_type, resource_id, since, count, offset)
        base = base_of(request)
        path = (
            f"{resource_type}/{resource_id}/_history"
            if resource_id
            else f"{resource_type}/_history"
        )
        entries = []
        for stored in versions:
            entry: dict[str, Any] = {"fullUrl": f"{base}/{stored.key}"}
            if not stored.deleted:
                entry["resource"] = stored.resource()
            entry["request"] = {
                "method": "DELETE"
                if stored.deleted
                else ("POST" if stored.version_id == 1 else "PUT"),
                "url": stored.key
                if stored.version_id > 1 or stored.deleted
                else stored.resource_type,
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
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "history",
            "total": total,
            "link": links,
        }
        if entries:
            bundle["entry"] = entries
        interaction = "history-instance" if resource_id else "history-type"
        audit(grant, request, interaction, resource_type, resource_id, 200, len(entries))
        return FhirJSONResponse(bundle)

    @router.put("/fhir/{resource_type}/{resource_id}")
    async def update(resource_type: str, resource_id: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        check_id(resource_id)
        grant.require(resource_type, WRITE)
        _refuse_patient_write(grant, resource_type)
        if_match = request.headers.get("if-match")
        version = _parse_etag(if_match) if if_match else None
        raw = _json_object(await _body(request))
        if raw.get("resourceType") != resource_type:
            raise FhirError(
                400,
                f"resourceType {raw.get('resourceType')!r} does not match the URL "
                f"({resource_type})",
                INVALID,
            )
        if raw.get("id") != resource_id:
            raise FhirError(
                400,
                f"resource id {str(raw.get('id'))[:80]!r} does not match the URL ({resource_id})",
                INVALID,
            )
        resource = prepare(validated(resource_type, raw))
        try:
            result = await run_in_threadpool(store.put, resource, version)
        except VersionConflict as exc:
            raise FhirError(
                412,
                f"If-Match {if_match} does not match the current version "
                f"({'none' if exc.current is None else exc.current})",
                CONFLICT,
            ) from exc
        if result.changed:
            on_write(result.stored)
        return resource_response(result.stored, request, 201 if result.created else 200)

    @router.delete("/fhir/{resource_type}/{resource_id}")
    async def delete(resource_type: str, resource_id: str, request: Request) -> Response:
        grant = grant_of(request)
        check_type(resource_type, supported)
        check_id(resource_id)
        grant.require(resource_type, WRITE)
        _refuse_patient_write(grant, resource_type)
        stored = await run_in_threadpool(store.delete, resource_type, resource_id)
        if stored is None:
            raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
        on_write(stored)
        return Response(status_code=204, headers={"ETag": stored.etag})

    @router.api_route("/fhir", methods=ALL_METHODS, operation_id="unsupported_root")
    @router.api_route("/fhir/{path:path}", methods=ALL_METHODS, operation_id="unsupported_path")
    def unsupported(request: Request, path: str = "") -> Response:
        grant_of(request)
        raise not_implemented(_interaction(request.method, path))

    return router


def _include_types(element: str) -> tuple[str, ...]:
    return {
        "device": ("Device",),
        "subject": ("Patient",),
        "result": ("Observation",),
    }[element]


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


def _refuse_patient_write(grant: Grant, resource_type: str) -> None:
    if grant.patient_bound(resource_type, WRITE):
        raise AuthError(403, "patient-bound tokens cannot write")


def _non_negative(name: str, value: str) -> int:
    if not value.isdigit() or len(value) > 9:
        raise FhirError(400, f"{name} must be a non-negative integer, not {value[:40]!r}", INVALID)
    return int(value)


def _oauth_error(status: int, error: str, description: str) -> Response:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="scanwatch"'
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )


async def _body(request: Request) -> bytes:
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise FhirError(
            415, f"Content-Type must be application/fhir+json, not {media_type[:60]!r}", INVALID
        )
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise FhirError(413, f"the body is larger than {MAX_BODY_BYTES} bytes", INVALID)
    return body


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        resource = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FhirError(400, f"body is not JSON: {type(exc).__name__}", STRUCTURE) from exc
    if not isinstance(resource, dict):
        raise FhirError(400, "body must be a JSON object (a FHIR resource)", STRUCTURE)
    return resource


def validated(resource_type: str, resource: dict[str, Any]) -> dict[str, Any]:
    """The resource as a canonical R4B resource without server meta, or a 422 FhirError."""
    try:
        model = get_fhir_model_class(resource_type).model_validate(resource)
    except (ValidationError, ValueError, TypeError) as exc:
        if isinstance(exc, ValidationError):
            # loc and msg only: the offending input may be PHI and is not echoed back.
            problems = [
                f"{resource_type}.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
                for error in exc.errors(include_input=False, include_url=False)
            ]
        else:
            problems = [f"{resource_type}: {type(exc).__name__}"]
        raise FhirError(422, problems, STRUCTURE) from exc
    return without_server_meta(json.loads(model.model_dump_json()))


def _interaction(method: str, path: str) -> str:
    """A name for what the client asked for, for the 501 message."""
    parts = [p for p in path.split("/") if p]
    if method == "POST" and not parts:
        return "batch/transaction"
    if method == "POST" and len(parts) == 2 and parts[1] == "_search":
        return "search via POST"
    if method in ("PATCH",):
        return method.lower()
    return f"{method} /fhir/{path[:80]}"
