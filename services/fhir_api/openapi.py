"""An OpenAPI 3.0 description of the FHIR routes, served at ``/openapi.json``.

FastAPI's own document cannot say much here: the routes are generic over ``{resource_type}``
and search parameters are parsed from the raw query. This one is built from the same tables as
the CapabilityStatement (types, search and result parameters), one path per resource type, so
tools (schemathesis in the tests, client generators) see every parameter the server accepts.
Resource bodies are described loosely (a JSON object with ``resourceType`` and ``id``); the
FHIR structure itself is what ``/fhir/metadata`` and the R4 specification describe.
"""

from __future__ import annotations

from typing import Any

from services.fhir_api.resources import RESOURCE_TYPES
from services.fhir_api.search import RESULT_PARAMS, SEARCH_PARAMS

FHIR_JSON = "application/fhir+json"
OPENAPI_VERSION = "3.0.3"


def _query(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": {"type": "string"},
    }


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _fhir_response(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {FHIR_JSON: {"schema": {"type": "object"}}},
    }


_ERRORS = {
    "default": _fhir_response("An OperationOutcome (400, 401, 403, 404, 406, 410, 412, 415, 422)")
}
_ID = _path("id", "Logical id of the resource")


def _body(resource_type: str) -> dict[str, Any]:
    return {
        "required": True,
        "content": {
            FHIR_JSON: {
                "schema": {
                    "type": "object",
                    "required": ["resourceType"],
                    "properties": {
                        "resourceType": {"type": "string", "enum": [resource_type]},
                        "id": {"type": "string"},
                    },
                    "additionalProperties": True,
                }
            }
        },
    }


def _type_paths(resource_type: str) -> dict[str, dict[str, Any]]:
    search = [_query(p.name, p.doc) for p in SEARCH_PARAMS[resource_type]] + [
        _query(name, f"FHIR result parameter {name}") for name in RESULT_PARAMS
    ]
    history = [
        _query("_since", "Versions changed at or after this instant"),
        _query("_count", "Page size"),
        _query("_offset", "Page offset"),
    ]
    op = resource_type.lower()
    base = f"/fhir/{resource_type}"
    return {
        base: {
            "get": {
                "operationId": f"search_{op}",
                "summary": f"Search {resource_type}",
                "parameters": search,
                "responses": {"200": _fhir_response("A searchset Bundle"), **_ERRORS},
            },
            "post": {
                "operationId": f"create_{op}",
                "summary": f"Create a {resource_type} (conditional with If-None-Exist)",
                "parameters": [
                    {
                        "name": "If-None-Exist",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    }
                ],
                "requestBody": _body(resource_type),
                "responses": {
                    "201": _fhir_response("Created"),
                    "200": _fhir_response("An existing match (conditional create)"),
                    **_ERRORS,
                },
            },
        },
        f"{base}/_history": {
            "get": {
                "operationId": f"history_type_{op}",
                "parameters": history,
                "responses": {"200": _fhir_response("A history Bundle"), **_ERRORS},
            }
        },
        f"{base}/{{id}}": {
            "get": {
                "operationId": f"read_{op}",
                "parameters": [_ID],
                "responses": {"200": _fhir_response(resource_type), **_ERRORS},
            },
            "put": {
                "operationId": f"update_{op}",
                "parameters": [
                    _ID,
                    {
                        "name": "If-Match",
                        "in": "header",
                        "required": False,
                        "schema": {"type": "string"},
                    },
                ],
                "requestBody": _body(resource_type),
                "responses": {
                    "200": _fhir_response("Updated"),
                    "201": _fhir_response("Created"),
                    **_ERRORS,
                },
            },
            "delete": {
                "operationId": f"delete_{op}",
                "parameters": [_ID],
                "responses": {"200": _fhir_response("Deleted"), **_ERRORS},
            },
        },
        f"{base}/{{id}}/_history": {
            "get": {
                "operationId": f"history_instance_{op}",
                "parameters": [_ID, *history],
                "responses": {"200": _fhir_response("A history Bundle"), **_ERRORS},
            }
        },
        f"{base}/{{id}}/_history/{{vid}}": {
            "get": {
                "operationId": f"vread_{op}",
                "parameters": [_ID, _path("vid", "Version id")],
                "responses": {"200": _fhir_response(resource_type), **_ERRORS},
            }
        },
    }


def openapi_document(title: str, version: str) -> dict[str, Any]:
    """The OpenAPI document of the FHIR API."""
    paths: dict[str, Any] = {
        "/fhir/metadata": {
            "get": {
                "operationId": "capabilities",
                "security": [],
                "responses": {"200": _fhir_response("The CapabilityStatement"), **_ERRORS},
            }
        }
    }
    for resource_type in RESOURCE_TYPES:
        paths |= _type_paths(resource_type)
    paths["/fhir"] = {
        "post": {
            "operationId": "transaction",
            "summary": "A transaction Bundle (PUT Type/id, PUT Type?search, POST Type with "
            "ifNoneExist; urn:uuid and conditional references): all written or none, a "
            "refusal naming its entry",
            "requestBody": _body("Bundle"),
            "responses": {"200": _fhir_response("The transaction-response Bundle"), **_ERRORS},
        }
    }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "FHIR R4 (4.0.1). Every error is an OperationOutcome; "
            "the CapabilityStatement at /fhir/metadata is authoritative.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        },
        "security": [{"bearer": []}],
    }
