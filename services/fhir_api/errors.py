"""Errors as FHIR OperationOutcome: every failure the API reports has this shape."""

from __future__ import annotations

import json
from typing import Any

from fastapi.responses import Response

FHIR_JSON = "application/fhir+json"

# OperationOutcome.issue.code values (http://hl7.org/fhir/issue-type) used here.
INVALID = "invalid"
STRUCTURE = "structure"
VALUE = "value"
NOT_FOUND = "not-found"
NOT_SUPPORTED = "not-supported"
EXCEPTION = "exception"
TRANSIENT = "transient"
PROCESSING = "processing"
CONFLICT = "conflict"
DELETED = "deleted"
LOGIN = "login"
FORBIDDEN = "forbidden"
TOO_LONG = "too-long"


class FhirJSONResponse(Response):
    """A JSON response with the FHIR media type."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        if isinstance(content, str):
            return content.encode()
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


def operation_outcome(
    diagnostics: str | list[str], code: str = PROCESSING, severity: str = "error"
) -> dict[str, Any]:
    """An OperationOutcome with one issue per diagnostic message."""
    messages = [diagnostics] if isinstance(diagnostics, str) else diagnostics
    return {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": severity, "code": code, "diagnostics": message} for message in messages
        ],
    }


class FhirError(Exception):
    """Raised by handlers; rendered as an OperationOutcome with ``status``."""

    def __init__(self, status: int, diagnostics: str | list[str], code: str = PROCESSING) -> None:
        super().__init__(diagnostics if isinstance(diagnostics, str) else "; ".join(diagnostics))
        self.status = status
        self.diagnostics = diagnostics
        self.code = code

    def response(self, headers: dict[str, str] | None = None) -> FhirJSONResponse:
        return FhirJSONResponse(
            operation_outcome(self.diagnostics, self.code), status_code=self.status, headers=headers
        )


def not_implemented(what: str) -> FhirError:
    """501 for an interaction or parameter this server does not implement (yet)."""
    return FhirError(501, f"{what} is not implemented yet", NOT_SUPPORTED)
