"""Search values: what each resource contributes to the search indexes, extracted on write
from the version that becomes current, and the rows the store writes for it.

- ``resource_version`` columns: ``subject_ref`` (the patient compartment's reference,
  :func:`services.fhir_api.compartment.compartment_reference`: ``subject``, or an Appointment's
  Patient participant) and the ``effective_start``/``effective_end`` range of the type's date
  element (:data:`services.fhir_api.resources.DATE_ELEMENTS`: ``effective[x]``, ``authoredOn``,
  ``start``), so the hot searches (by patient, by date) need no join;
- ``search_token`` rows (``identifier``, ``code``, ``category``, ``status``);
- ``search_reference`` rows (``Provenance.target``).

Pure functions of the resource; the bench and migration 0002's backfill build rows with them
too, so what they index is exactly what the write path stores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from services.fhir_api.compartment import compartment_reference
from services.fhir_api.fhirdates import fhir_range
from services.fhir_api.models import ResourceVersion, SearchReference, SearchToken
from services.fhir_api.resources import DATE_ELEMENTS, instant, reference_key

#: Types whose ``category`` codings are indexed for ``category=``.
CATEGORY_TYPES = ("Observation", "DiagnosticReport", "CommunicationRequest")


@dataclass(frozen=True)
class SearchValues:
    """What one resource contributes to the search indexes."""

    subject_ref: str | None
    effective: tuple[datetime, datetime] | None
    tokens: tuple[tuple[str, str | None, str], ...]  # (param, system, code)
    references: tuple[tuple[str, str], ...]  # (param, Type/id)


def _codings(concepts: Iterable[dict[str, Any]]) -> Iterable[tuple[str | None, str]]:
    for concept in concepts:
        for coding in concept.get("coding") or []:
            if coding.get("code"):
                yield coding.get("system"), coding["code"]


def search_values(resource: dict[str, Any]) -> SearchValues:
    """The search values of a (valid) resource."""
    resource_type = resource["resourceType"]
    tokens: list[tuple[str, str | None, str]] = [
        ("identifier", identifier.get("system"), identifier["value"])
        for identifier in resource.get("identifier") or []
        if identifier.get("value")
    ]
    if isinstance(resource.get("status"), str):
        tokens.append(("status", None, resource["status"]))
    if resource_type in ("Observation", "DiagnosticReport"):
        tokens += [("code", s, c) for s, c in _codings([resource.get("code") or {}])]
    if resource_type in CATEGORY_TYPES:
        tokens += [("category", s, c) for s, c in _codings(resource.get("category") or [])]
    subject_ref = compartment_reference(resource)
    effective = _date_range(resource, DATE_ELEMENTS.get(resource_type))
    references: list[tuple[str, str]] = []
    if resource_type == "Provenance":
        for target in resource.get("target") or []:
            if target.get("reference") and (key := reference_key(target["reference"])):
                references.append(("target", key))
    return SearchValues(subject_ref, effective, tuple(dict.fromkeys(tokens)), tuple(references))


def _date_range(resource: dict[str, Any], element: str | None) -> tuple[datetime, datetime] | None:
    """``[start, end)`` of the resource's date element (``effective[x]`` or a plain one)."""
    if element is None:
        return None
    if element != "effective[x]":
        value = resource.get(element)
        return fhir_range(value) if isinstance(value, str) else None
    if value := resource.get("effectiveDateTime") or resource.get("effectiveInstant"):
        return fhir_range(value)
    if period := resource.get("effectivePeriod"):
        start = fhir_range(period["start"])[0] if period.get("start") else datetime.min
        end = fhir_range(period["end"])[1] if period.get("end") else datetime.max
        return start.replace(tzinfo=UTC), end.replace(tzinfo=UTC)
    return None


def version_row(
    resource: dict[str, Any], version_id: int, moment: datetime, values: SearchValues
) -> ResourceVersion:
    """The current-version row of ``resource`` (without server meta) as the store writes it."""
    return ResourceVersion(
        resource_type=resource["resourceType"],
        resource_id=resource["id"],
        version_id=version_id,
        last_updated=moment,
        is_current=True,
        subject_ref=values.subject_ref,
        effective_start=values.effective[0] if values.effective else None,
        effective_end=values.effective[1] if values.effective else None,
        content=json.dumps(_with_meta(resource, version_id, moment), separators=(",", ":")),
    )


def index_rows(
    resource_type: str, resource_pk: int, values: SearchValues
) -> tuple[list[SearchToken], list[SearchReference]]:
    """The search index rows of the version row ``resource_pk``."""
    tokens = [
        SearchToken(resource_pk=resource_pk, resource_type=resource_type, param=p, system=s, code=c)
        for p, s, c in values.tokens
    ]
    references = [
        SearchReference(resource_pk=resource_pk, resource_type=resource_type, param=p, target=t)
        for p, t in values.references
    ]
    return tokens, references


def _with_meta(resource: dict[str, Any], version_id: int, moment: datetime) -> dict[str, Any]:
    meta = {"versionId": str(version_id), "lastUpdated": instant(moment)}
    meta.update(resource.get("meta") or {})
    head = {"resourceType": resource["resourceType"], "id": resource["id"], "meta": meta}
    return head | {k: v for k, v in resource.items() if k not in head}
