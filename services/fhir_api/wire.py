"""What the FHIR routes read from and write to the wire: request bodies, ETags, resources
validated against the R4B models, and resource responses with their headers."""

from __future__ import annotations

import json
from datetime import datetime
from email.utils import format_datetime
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from services.fhir_api.errors import INVALID, STRUCTURE, TOO_LONG, FhirError, FhirJSONResponse
from services.fhir_api.resources import Stored, without_server_meta

JSON_MEDIA_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
#: Most JSON objects and arrays one body may hold. The R4B models validate about 20 000 of
#: them a second here, so a 1 MB body of 150 000 empty objects took 8 s of a worker's CPU; a
#: worker's ImagingStudy of 2 000 instances holds about 4 000.
MAX_JSON_CONTAINERS = 20_000
_ETAG_PREFIXES = ('W/"', '"')


def http_date(instant: str) -> str:
    return format_datetime(datetime.fromisoformat(instant), usegmt=True)


def parse_etag(value: str) -> int:
    """The version id of an ``If-Match`` ETag (``W/"3"``, ``"3"`` or ``3``); 400 otherwise."""
    text = value.strip()
    for prefix in _ETAG_PREFIXES:
        if text.startswith(prefix) and text.endswith('"'):
            text = text[len(prefix) : -1]
            break
    if not text.isdigit():
        raise FhirError(400, f'If-Match must be an ETag like W/"3", not {value[:40]!r}', INVALID)
    return int(text)


def resource_response(stored: Stored, request: Request, base: str, status: int = 200) -> Response:
    """The stored version with its ETag and Last-Modified (and Location for 201 and PUT)."""
    headers = {"ETag": stored.etag, "Last-Modified": http_date(stored.last_updated)}
    if status == 201 or request.method == "PUT":
        headers["Location"] = (
            f"{base}/{stored.resource_type}/{stored.resource_id}/_history/{stored.version_id}"
        )
    return FhirJSONResponse(stored.content, status_code=status, headers=headers)


async def read_body(request: Request) -> bytes:
    """The body of a FHIR JSON request (415 for another media type; one larger than
    ``web_limits.FHIR_MAX_BODY_BYTES`` is refused with 413 by the app's ``BodyLimit`` as it
    arrives, before it is read whole)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type not in JSON_MEDIA_TYPES:
        raise FhirError(
            415, f"Content-Type must be application/fhir+json, not {media_type[:60]!r}", INVALID
        )
    return await request.body()


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object (400 otherwise)."""
    try:
        resource = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError: not UTF-8, not JSON, or an integer longer than Python converts (4300
        # digits); RecursionError: nested deeper than the parser goes.
        raise FhirError(400, f"body is not JSON: {type(exc).__name__}", STRUCTURE) from exc
    if not isinstance(resource, dict):
        raise FhirError(400, "body must be a JSON object (a FHIR resource)", STRUCTURE)
    if _containers(resource) > MAX_JSON_CONTAINERS:
        raise FhirError(
            413, f"the body holds more than {MAX_JSON_CONTAINERS} JSON objects and arrays", TOO_LONG
        )
    return resource


def _containers(value: Any) -> int:
    """How many objects and arrays ``value`` holds (itself included), counted without
    recursion; stops counting past :data:`MAX_JSON_CONTAINERS`."""
    count, pending = 0, [value]
    while pending and count <= MAX_JSON_CONTAINERS:
        item = pending.pop()
        if isinstance(item, dict):
            count += 1
            pending.extend(item.values())
        elif isinstance(item, list):
            count += 1
            pending.extend(item)
    return count


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


def interaction_name(method: str, path: str) -> str:
    """A name for what the client asked for, for the 501 message."""
    parts = [p for p in path.split("/") if p]
    if method == "POST" and not parts:
        return "batch/transaction"
    if method == "POST" and len(parts) == 2 and parts[1] == "_search":
        return "search via POST"
    if method in ("PATCH",):
        return method.lower()
    return f"{method} /fhir/{path[:80]}"
