"""The FHIR REST interactions under ``/fhir``: metadata, read, update (as create) and
Observation search by patient. Everything else answers 501 with an OperationOutcome."""

from __future__ import annotations

import json
import re
from datetime import datetime
from email.utils import format_datetime
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from services.fhir_api.capability import capability_statement
from services.fhir_api.config import Settings
from services.fhir_api.errors import (
    INVALID,
    NOT_FOUND,
    NOT_SUPPORTED,
    STRUCTURE,
    FhirError,
    FhirJSONResponse,
    not_implemented,
)
from services.fhir_api.store import (
    SUPPORTED_TYPES,
    ResourceStore,
    Stored,
    reference_key,
    without_server_meta,
)

#: FHIR ``id`` datatype.
ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
JSON_MEDIA_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

#: Observation search parameters of FHIR R4 and the common result parameters: known, so they
#: answer 501 (not implemented yet) rather than 400 (unknown parameter).
KNOWN_OBSERVATION_PARAMS = frozenset(
    "based-on category code code-value-concept code-value-date code-value-quantity "
    "code-value-string combo-code combo-code-value-concept combo-code-value-quantity "
    "combo-data-absent-reason combo-value-concept combo-value-quantity component-code "
    "component-code-value-concept component-code-value-quantity component-data-absent-reason "
    "component-value-concept component-value-quantity data-absent-reason date derived-from "
    "device encounter focus has-member identifier method part-of performer specimen status "
    "value-concept value-date value-quantity value-string _id _lastUpdated _tag _profile "
    "_security _source _text _content _list _has _type _filter _query _sort _include "
    "_revinclude _summary _total _elements _contained _containedType _format _pretty".split()
)


def check_type(resource_type: str) -> None:
    """404 for a resource type this server does not store (saying whether FHIR knows it)."""
    if resource_type in SUPPORTED_TYPES:
        return
    supported = ", ".join(SUPPORTED_TYPES)
    if _is_fhir_resource(resource_type):
        raise FhirError(
            404,
            f"resource type {resource_type} is not supported by this server "
            f"(supported: {supported})",
            NOT_SUPPORTED,
        )
    raise FhirError(
        404, f"unknown resource type {resource_type!r} (supported: {supported})", NOT_FOUND
    )


def _is_fhir_resource(name: str) -> bool:
    try:
        model = get_fhir_model_class(name)
    except ValueError:
        return False
    return issubclass(model, Resource)


def check_id(resource_id: str) -> None:
    if not ID_RE.match(resource_id):
        raise FhirError(400, f"{resource_id!r} is not a valid FHIR id", INVALID)


def _http_date(instant: str) -> str:
    return format_datetime(datetime.fromisoformat(instant), usegmt=True)


def build_router(store: ResourceStore, settings: Settings, started: str) -> APIRouter:
    """The ``/fhir`` routes over ``store``; ``started`` dates the CapabilityStatement."""
    router = APIRouter(prefix="/fhir")

    def base_of(request: Request) -> str:
        return settings.base_url or f"{str(request.base_url).rstrip('/')}/fhir"

    def resource_response(stored: Stored, request: Request, status: int = 200) -> Response:
        headers = {"ETag": stored.etag, "Last-Modified": _http_date(stored.last_updated)}
        if status in (200, 201) and request.method == "PUT":
            headers["Location"] = (
                f"{base_of(request)}/{stored.resource_type}/{stored.resource_id}"
                f"/_history/{stored.version_id}"
            )
        return FhirJSONResponse(stored.content, status_code=status, headers=headers)

    @router.get("/metadata")
    def metadata(request: Request) -> Response:
        return FhirJSONResponse(capability_statement(base_of(request), started, settings.max_count))

    @router.get("/{resource_type}")
    def search(resource_type: str, request: Request) -> Response:
        check_type(resource_type)
        if resource_type != "Observation":
            raise not_implemented(f"search on {resource_type}")
        subject_sets: list[set[str]] = []
        applied: list[tuple[str, str]] = []
        count = settings.default_count
        for name, value in request.query_params.multi_items():
            if name in ("patient", "subject"):
                if value.strip():
                    subject_sets.append(_subject_refs(name, value))
                    applied.append((name, value))
            elif name == "_count":
                count = _count(value, settings.max_count)
            elif name.split(":", 1)[0] in ("patient", "subject"):
                raise not_implemented(f"modifier on search parameter {name!r}")
            elif name.split(":", 1)[0] in KNOWN_OBSERVATION_PARAMS:
                raise not_implemented(f"search parameter {name!r}")
            else:
                raise FhirError(400, f"unknown search parameter {name!r} for Observation", INVALID)
        # Several patient/subject parameters are ANDed; values inside one are ORed.
        refs = set.intersection(*subject_sets) if subject_sets else None
        total, found = store.search_observations(sorted(refs) if refs is not None else None, count)
        base = base_of(request)
        bundle: dict[str, Any] = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": total,
            "link": [
                {
                    "relation": "self",
                    "url": f"{base}/Observation?{urlencode([*applied, ('_count', str(count))])}",
                }
            ],
            "entry": [
                {
                    "fullUrl": f"{base}/{s.resource_type}/{s.resource_id}",
                    "resource": s.resource(),
                    "search": {"mode": "match"},
                }
                for s in found
            ],
        }
        if not bundle["entry"]:
            del bundle["entry"]
        return FhirJSONResponse(bundle)

    @router.get("/{resource_type}/{resource_id}")
    def read(resource_type: str, resource_id: str, request: Request) -> Response:
        check_type(resource_type)
        check_id(resource_id)
        stored = store.read(resource_type, resource_id)
        if stored is None:
            raise FhirError(404, f"{resource_type}/{resource_id} is not known", NOT_FOUND)
        if_none_match = request.headers.get("if-none-match")
        if if_none_match and stored.etag in (t.strip() for t in if_none_match.split(",")):
            return Response(status_code=304, headers={"ETag": stored.etag})
        return resource_response(stored, request)

    @router.put("/{resource_type}/{resource_id}")
    async def update(resource_type: str, resource_id: str, request: Request) -> Response:
        check_type(resource_type)
        check_id(resource_id)
        if request.headers.get("if-match"):
            raise not_implemented("If-Match (version-aware update)")
        media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media_type not in JSON_MEDIA_TYPES:
            raise FhirError(
                415, f"Content-Type must be application/fhir+json, not {media_type!r}", INVALID
            )
        resource = _validated(resource_type, resource_id, await request.body())
        result = await run_in_threadpool(store.put, resource)
        return resource_response(result.stored, request, 201 if result.created else 200)

    @router.api_route("/{path:path}", methods=ALL_METHODS)
    def unsupported(path: str, request: Request) -> Response:
        raise not_implemented(_interaction(request.method, path))

    return router


def _validated(resource_type: str, resource_id: str, body: bytes) -> dict[str, Any]:
    """The body as a canonical R4B resource without server meta, or a 400/422 FhirError."""
    try:
        resource = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FhirError(400, f"body is not JSON: {exc}", STRUCTURE) from exc
    if not isinstance(resource, dict):
        raise FhirError(400, "body must be a JSON object (a FHIR resource)", STRUCTURE)
    if resource.get("resourceType") != resource_type:
        raise FhirError(
            400,
            f"resourceType {resource.get('resourceType')!r} does not match the URL "
            f"({resource_type})",
            INVALID,
        )
    if resource.get("id") != resource_id:
        raise FhirError(
            400,
            f"resource id {resource.get('id')!r} does not match the URL ({resource_id})",
            INVALID,
        )
    try:
        model = get_fhir_model_class(resource_type).model_validate(resource)
    except ValidationError as exc:
        # loc and msg only: the offending input may be PHI and is not echoed back.
        problems = [
            f"{resource_type}.{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors(include_input=False, include_url=False)
        ]
        raise FhirError(422, problems, STRUCTURE) from exc
    return without_server_meta(json.loads(model.model_dump_json()))


def _subject_refs(name: str, value: str) -> set[str]:
    """Reference keys (``Type/id``) of one patient/subject parameter (comma = OR)."""
    refs: set[str] = set()
    for item in (v.strip() for v in value.split(",")):
        key = f"Patient/{item}" if ID_RE.match(item) else reference_key(item)
        if key is None:
            raise FhirError(400, f"{name}={item!r} is not a reference", INVALID)
        if name == "patient" and not key.startswith("Patient/"):
            raise FhirError(400, f"patient= takes a Patient reference, not {item!r}", INVALID)
        refs.add(key)
    return refs


def _count(value: str, max_count: int) -> int:
    try:
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise FhirError(400, f"_count must be a non-negative integer, not {value!r}", INVALID)
    return min(count, max_count)


def _interaction(method: str, path: str) -> str:
    """A name for what the client asked for, for the 501 message."""
    parts = [p for p in path.split("/") if p]
    if "_history" in parts or path.endswith("_history"):
        return "history (vread, _history)"
    if method == "POST" and not parts:
        return "batch/transaction"
    if method == "POST" and len(parts) == 2 and parts[1] == "_search":
        return "search via POST"
    if method == "POST" and len(parts) == 1:
        return "create (POST)"
    if method in ("DELETE", "PATCH"):
        return method.lower()
    return f"{method} /fhir/{path}"
