"""An OpenAPI 3.0 description of the console's machine-facing routes, DICOMweb (QIDO-RS and
WADO-RS under ``/dicomweb``, a staff bearer token), served at ``/openapi.json``.

FastAPI's own document cannot say much here: the searches read their match keys from the raw
query. This one is built from the DICOMweb router's routes (paths, path parameters, summaries)
and the QIDO-RS tables (every match key and control parameter ``qido.py`` accepts), so tools
(schemathesis in the tests, client generators) see what the server takes. The staff pages and
their scripts' calls (``/worklist``, ``/studies/…``, ``/api/…``, ``/operator/…``) are a signed-in
browser's, behind a session cookie and a CSRF token: not an API for other programs, left out.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi.routing import APIRoute

from services.console import dicomweb, qido

OPENAPI_VERSION = "3.0.3"
#: Where the document is served (no token needed).
OPENAPI_PATH = "/openapi.json"
#: A UID as PS3.5 §9.1 writes it.
UID_SCHEMA = {
    "type": "string",
    "pattern": r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$",
    "maxLength": 64,
}
_PATH_PARAM = re.compile(r"{(\w+)}")
_DATASETS = {"type": "array", "items": {"type": "object"}}
_ERROR = {
    "description": "The error, in a sentence",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["status", "error"],
                "properties": {"status": {"type": "integer"}, "error": {"type": "string"}},
            }
        }
    },
}
_ERRORS = {
    "400": _ERROR,  # a UID, frame list, window or search parameter the standard does not allow
    "401": _ERROR,
    "403": _ERROR,
    "404": _ERROR,
    "406": _ERROR,  # a media type this server cannot produce, or pixels it cannot decode
    "503": _ERROR,  # the authorization server's keys cannot be fetched
}


def _param(name: str, where: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": where,
        "required": where == "path",
        "description": description,
        "schema": schema,
    }


def _search_params() -> list[dict[str, Any]]:
    keys = sorted({*qido.COLUMNS, "ModalitiesInStudy"})
    params = [
        _param(key, "query", {"type": "string"}, f"Match on {key} (PS3.18 §8.3.4)") for key in keys
    ]
    params += [
        _param("limit", "query", {"type": "integer", "minimum": 0}, "Most results"),
        _param("offset", "query", {"type": "integer", "minimum": 0}, "Results skipped"),
        _param("includefield", "query", {"type": "string"}, "An attribute to return, or all"),
        _param("fuzzymatching", "query", {"type": "boolean"}, "Fuzzy person-name matching"),
    ]
    return params


def _responses(name: str) -> dict[str, Any]:
    ok: dict[str, Any]
    if name.startswith("search_") or name.endswith("_metadata"):
        ok = {"content": {dicomweb.DICOM_JSON: {"schema": _DATASETS}}}
    elif name.endswith("_rendered"):
        binary = {"schema": {"type": "string", "format": "binary"}}
        ok = {"content": {"image/jpeg": binary, "image/png": binary}}
    else:  # instances or frames, as multipart/related parts
        ok = {"content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}}}
    return {"200": {"description": "Found", **ok}, **_ERRORS}


def openapi_document(title: str, version: str) -> dict[str, Any]:
    """The OpenAPI document of the console's DICOMweb service."""
    paths: dict[str, Any] = {}
    for route in dicomweb.router.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        params = [
            _param(name, "path", UID_SCHEMA if name in ("study", "series", "sop") else
                   {"type": "string", "pattern": r"^[1-9][0-9]*(,[1-9][0-9]*)*$"},
                   "A UID" if name in ("study", "series", "sop") else "Frame numbers")
            for name in _PATH_PARAM.findall(route.path)
        ]  # fmt: skip
        if route.name.startswith("search_"):
            params += _search_params()
        if route.name.endswith("_rendered"):
            params.append(_param("window", "query", {"type": "string"}, "center,width[,function]"))
        summary = (route.endpoint.__doc__ or route.name).strip().split("\n")[0]
        paths.setdefault(route.path, {})["get"] = {
            "operationId": route.name,
            "summary": summary,
            "parameters": params,
            "responses": _responses(route.name),
        }
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": title,
            "version": version,
            "description": "DICOMweb (PS3.18): QIDO-RS and WADO-RS over the file store, read "
            "only (every other method: 405). A staff bearer token reading ImagingStudy.",
        },
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
        },
        "security": [{"bearer": []}],
    }
