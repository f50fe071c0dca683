"""FHIR search: the parameters each type supports, parsed into SQL clauses over the store.

Pure parsing plus SQLAlchemy expressions; the store runs them. Every parameter, modifier,
prefix and value this server does not understand is a 400 (``Prefer: handling=strict``
semantics), so a client never receives a silently broader result than it asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, or_
from sqlalchemy.sql import ColumnElement
from sqlmodel import col, select

from services.fhir_api.errors import INVALID, FhirError
from services.fhir_api.fhirdates import fhir_range
from services.fhir_api.models import ResourceVersion, SearchReference, SearchToken
from services.fhir_api.resources import DATE_ELEMENTS, ID_RE, RESOURCE_TYPES, reference_key

#: Longest value accepted for one search parameter (characters), and most values per request.
MAX_VALUE_LENGTH = 512
MAX_PARAMETERS = 30
MAX_OR_VALUES = 50
DATE_PREFIXES = ("eq", "gt", "lt", "ge", "le")
#: Totals are counted exactly up to this many matches; above it ``total`` is left out unless
#: ``_total=accurate`` asks for the exact count.
TOTAL_LIMIT = 1000
TOTAL_MODES = ("none", "estimate", "accurate")


@dataclass(frozen=True)
class Param:
    """A search parameter: name, FHIR type and documentation (for the CapabilityStatement)."""

    name: str
    kind: str  # reference, token, date
    doc: str


_PATIENT = Param("patient", "reference", "Patient id or Patient/<id>; comma-separated = OR.")
_SUBJECT = Param("subject", "reference", "<Type>/<id> (a bare id means Patient/<id>).")
_IDENTIFIER = Param("identifier", "token", "[system]|value or value; comma-separated = OR.")
_ID = Param("_id", "token", "Logical id; comma-separated = OR.")
_UPDATED = Param("_lastUpdated", "date", "meta.lastUpdated with prefix eq, gt, lt, ge or le.")
_STATUS = Param("status", "token", "Resource status code.")
_CODE = Param("code", "token", "[system]|code or code.")
_CATEGORY = Param("category", "token", "[system]|code or code.")
_DATE = Param("date", "date", "effective[x] with prefix eq, gt, lt, ge or le.")
_AUTHORED_ON = "authoredOn with prefix eq, gt, lt, ge or le"
#: ``date`` of MedicationRequest and CommunicationRequest is scanwatch's name for their
#: ``authoredOn`` (FHIR's own parameters for it, ``authoredon`` and ``authored``, are served too;
#: FHIR's MedicationRequest ``date``, the dosage timing, is not).
_AUTHORED_DATE = Param("date", "date", f"{_AUTHORED_ON} (FHIR's authoredon/authored).")

#: Search parameters of each of :data:`RESOURCE_TYPES` (a test checks that every type has its
#: entry and no other type has one).
SEARCH_PARAMS: dict[str, tuple[Param, ...]] = {
    "Observation": (
        _PATIENT,
        _SUBJECT,
        _CODE,
        _CATEGORY,
        _DATE,
        _STATUS,
        _IDENTIFIER,
        _ID,
        _UPDATED,
    ),
    "ImagingStudy": (_PATIENT, _SUBJECT, _IDENTIFIER, _STATUS, _ID, _UPDATED),
    "DiagnosticReport": (
        _PATIENT,
        _SUBJECT,
        _IDENTIFIER,
        _CODE,
        _CATEGORY,
        _DATE,
        _STATUS,
        _ID,
        _UPDATED,
    ),
    "Patient": (_IDENTIFIER, _ID, _UPDATED),
    "Practitioner": (_IDENTIFIER, _ID, _UPDATED),
    "Device": (_IDENTIFIER, _STATUS, _ID, _UPDATED),
    "Provenance": (
        Param("target", "reference", "<Type>/<id> of a target; comma-separated = OR."),
        _ID,
        _UPDATED,
    ),
    "MedicationRequest": (
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _AUTHORED_DATE,
        Param("authoredon", "date", f"{_AUTHORED_ON} (same as date)."),
        _IDENTIFIER,
        _ID,
        _UPDATED,
    ),
    "Appointment": (
        Param("patient", "reference", "Patient id or Patient/<id> of a participant.actor."),
        _STATUS,
        Param("date", "date", "start with prefix eq, gt, lt, ge or le."),
        _IDENTIFIER,
        _ID,
        _UPDATED,
    ),
    "CommunicationRequest": (
        _PATIENT,
        _SUBJECT,
        _STATUS,
        _CATEGORY,
        _AUTHORED_DATE,
        Param("authored", "date", f"{_AUTHORED_ON} (same as date)."),
        _IDENTIFIER,
        _ID,
        _UPDATED,
    ),
    "Subscription": (_STATUS, _ID, _UPDATED),
}

#: ``_sort`` keys per type and the column each sorts on.
SORT_KEYS: dict[str, dict[str, Any]] = {
    resource_type: {
        "_lastUpdated": ResourceVersion.last_updated,
        "_id": ResourceVersion.resource_id,
        **({"date": ResourceVersion.effective_start} if resource_type in DATE_ELEMENTS else {}),
    }
    for resource_type in RESOURCE_TYPES
}

#: ``_include`` values: (source type, search parameter) → reference element of the resource.
INCLUDES: dict[str, tuple[str, str]] = {
    "Observation:device": ("Observation", "device"),
    "Observation:subject": ("Observation", "subject"),
    "Observation:patient": ("Observation", "subject"),
    "DiagnosticReport:result": ("DiagnosticReport", "result"),
    "DiagnosticReport:subject": ("DiagnosticReport", "subject"),
}
#: ``_revinclude`` values: (type of the referring resource, its reference parameter).
REVINCLUDES: dict[str, tuple[str, str]] = {"Provenance:target": ("Provenance", "target")}

#: Result parameters understood (besides the search parameters).
RESULT_PARAMS = ("_count", "_offset", "_sort", "_include", "_revinclude", "_total", "_format")


@dataclass
class SearchQuery:
    """A parsed search."""

    resource_type: str
    where: list[ColumnElement[bool]] = field(default_factory=list)
    order_by: list[Any] = field(default_factory=list)
    count: int = 20
    offset: int = 0
    total: str = "estimate"
    includes: list[str] = field(default_factory=list)
    revincludes: list[str] = field(default_factory=list)
    #: the parameters as applied (for the Bundle's self link), in request order
    applied: list[tuple[str, str]] = field(default_factory=list)


def _bad(message: str) -> FhirError:
    return FhirError(400, message, INVALID)


def parse_search(
    resource_type: str,
    items: list[tuple[str, str]],
    default_count: int,
    max_count: int,
) -> SearchQuery:
    """Parse ``items`` (query parameters in order) into a :class:`SearchQuery`.

    Several occurrences of a parameter are ANDed; comma-separated values within one are ORed.
    """
    if len(items) > MAX_PARAMETERS:
        raise _bad(f"too many search parameters ({len(items)} > {MAX_PARAMETERS})")
    params = {p.name: p for p in SEARCH_PARAMS[resource_type]}
    query = SearchQuery(resource_type, count=default_count)
    for name, value in items:
        if len(value) > MAX_VALUE_LENGTH:
            raise _bad(f"the value of {name!r} is longer than {MAX_VALUE_LENGTH} characters")
        if "\x00" in value:
            raise _bad(f"the value of {name!r} contains a NUL character")
        base, _, modifier = name.partition(":")
        if base in params:
            if modifier:
                raise _bad(f"modifier {modifier!r} on {base!r} is not supported")
            if not value.strip():
                continue  # an empty parameter is ignored (FHIR search rules)
            query.where.append(_clause(resource_type, params[base], value))
            query.applied.append((name, value))
        elif name in RESULT_PARAMS:
            _result_param(query, name, value, max_count)
        else:
            known = ", ".join(sorted(params) + list(RESULT_PARAMS))
            raise _bad(
                f"unknown or unsupported search parameter {name!r} for {resource_type} "
                f"(supported: {known})"
            )
    if not query.order_by:
        query.order_by = [col(ResourceVersion.last_updated).desc()]
    return query


def _result_param(query: SearchQuery, name: str, value: str, max_count: int) -> None:
    if name == "_count":
        query.count = min(_non_negative(name, value), max_count)
    elif name == "_offset":
        query.offset = _non_negative(name, value)
    elif name == "_total":
        if value not in TOTAL_MODES:
            raise _bad(f"_total must be one of {', '.join(TOTAL_MODES)}, not {value!r}")
        query.total = value
        query.applied.append((name, value))
    elif name == "_format":
        return  # checked by content negotiation
    elif name == "_sort":
        keys = SORT_KEYS[query.resource_type]
        order: list[Any] = []
        for item in (v.strip() for v in value.split(",")):
            descending = item.startswith("-")
            key = item[1:] if descending else item
            if key not in keys:
                raise _bad(
                    f"cannot sort {query.resource_type} by {key!r} "
                    f"(supported: {', '.join(sorted(keys))})"
                )
            column = col(keys[key])
            order.append(column.desc() if descending else column.asc())
        query.order_by = order
        query.applied.append((name, value))
    elif name == "_include":
        if value not in INCLUDES or INCLUDES[value][0] != query.resource_type:
            supported = [k for k, v in INCLUDES.items() if v[0] == query.resource_type]
            raise _bad(f"_include={value!r} is not supported (supported: {supported})")
        query.includes.append(value)
        query.applied.append((name, value))
    elif name == "_revinclude":
        if value not in REVINCLUDES:
            raise _bad(f"_revinclude={value!r} is not supported (supported: {list(REVINCLUDES)})")
        query.revincludes.append(value)
        query.applied.append((name, value))


def _non_negative(name: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0 or number > 10**9:
        raise _bad(f"{name} must be a non-negative integer, not {value[:40]!r}")
    return number


def _values(name: str, value: str) -> list[str]:
    values = [v.strip() for v in value.split(",")]
    if len(values) > MAX_OR_VALUES:
        raise _bad(f"too many values for {name!r} ({len(values)} > {MAX_OR_VALUES})")
    if any(not v for v in values):
        raise _bad(f"{name!r} has an empty value in {value[:80]!r}")
    return values


def _clause(resource_type: str, param: Param, value: str) -> ColumnElement[bool]:
    values = _values(param.name, value)
    builder: Callable[[str, str, str], ColumnElement[bool]]
    if param.name in ("patient", "subject"):
        builder = _subject_clause
    elif param.name == "_id":
        builder = _id_clause
    elif param.kind == "token":
        builder = _token_clause
    elif param.kind == "date":
        builder = _date_clause
    else:
        builder = _reference_clause
    return or_(*(builder(resource_type, param.name, v) for v in values))


def subject_key(name: str, value: str) -> str:
    """``Type/id`` of one patient/subject value (a bare id is a Patient id)."""
    key = f"Patient/{value}" if ID_RE.match(value) else reference_key(value)
    if key is None or not ID_RE.match(key.split("/", 1)[1]):
        raise _bad(f"{name}={value[:80]!r} is not a reference")
    if name == "patient" and not key.startswith("Patient/"):
        raise _bad(f"patient= takes a Patient reference, not {value[:80]!r}")
    return key


def _subject_clause(_type: str, name: str, value: str) -> ColumnElement[bool]:
    return col(ResourceVersion.subject_ref) == subject_key(name, value)


def _id_clause(_type: str, name: str, value: str) -> ColumnElement[bool]:
    if not ID_RE.match(value):
        raise _bad(f"{name}={value[:80]!r} is not a FHIR id")
    return col(ResourceVersion.resource_id) == value


def _token_clause(resource_type: str, name: str, value: str) -> ColumnElement[bool]:
    conditions = [
        col(SearchToken.resource_type) == resource_type,
        col(SearchToken.param) == name,
    ]
    if "|" in value:
        system, code = value.split("|", 1)
        if system:
            conditions.append(col(SearchToken.system) == system)
        else:
            conditions.append(col(SearchToken.system).is_(None))
        if code:
            conditions.append(col(SearchToken.code) == code)
        elif not system:
            raise _bad(f"{name}={value!r} names neither a system nor a code")
    else:
        conditions.append(col(SearchToken.code) == value)
    return col(ResourceVersion.pk).in_(select(SearchToken.resource_pk).where(*conditions))


def _reference_clause(resource_type: str, name: str, value: str) -> ColumnElement[bool]:
    key = reference_key(value)
    if key is None:
        raise _bad(f"{name}={value[:80]!r} is not a reference (<Type>/<id>)")
    return col(ResourceVersion.pk).in_(
        select(SearchReference.resource_pk).where(
            col(SearchReference.resource_type) == resource_type,
            col(SearchReference.param) == name,
            col(SearchReference.target) == key,
        )
    )


def date_range(name: str, value: str) -> tuple[str, datetime, datetime]:
    """(prefix, start, end) of a date search value."""
    prefix = value[:2] if value[:2].isalpha() else "eq"
    if value[:2].isalpha() and prefix not in DATE_PREFIXES:
        raise _bad(f"prefix {prefix!r} of {name} is not supported ({', '.join(DATE_PREFIXES)})")
    raw = value[2:] if value[:2].isalpha() else value
    try:
        start, end = fhir_range(raw)
    except (ValueError, OverflowError) as exc:
        raise _bad(f"{name}={value[:80]!r}: {exc}") from exc
    return prefix, start, end


def _date_clause(_type: str, name: str, value: str) -> ColumnElement[bool]:
    prefix, start, end = date_range(name, value)
    if name == "_lastUpdated":
        updated = col(ResourceVersion.last_updated)
        return {
            "eq": and_(updated >= start, updated < end),
            "gt": updated >= end,
            "lt": updated < start,
            "ge": updated >= start,
            "le": updated < end,
        }[prefix]
    # The resource's [effective_start, effective_end) against the search range [start, end).
    low, high = col(ResourceVersion.effective_start), col(ResourceVersion.effective_end)
    clause = {
        "eq": and_(low >= start, high <= end),
        "gt": high > end,
        "lt": low < start,
        "ge": high > start,
        "le": low < end,
    }[prefix]
    return and_(low.is_not(None), clause) if prefix != "eq" else clause
