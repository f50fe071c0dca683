"""The triage worklist: every study the console knows, in the AI's priority order.

Where a row comes from:
- the study, its patient and its date: the instance index (:mod:`services.console.index`,
  the store the listener acknowledged against), so a study is listed as soon as it is stored;
- its AI result: the FHIR API's Observations (score, interpretation, model, reviewed or not),
  read with the signed-in staff member's own token and kept in ``worklist_result``, a cache
  topped up incrementally by ``_lastUpdated`` (each page view asks only for what changed);
  a result names its study by ``partOf`` ImagingStudy, whose id is the deterministic
  :func:`scanwatch.ids.imaging_study_id` of the StudyInstanceUID (``worklist_study`` maps
  the two).

Status: ``scored`` (a result), ``failed`` (a dead letter named the study, with its reason:
:mod:`services.console.dead_letters`; a later result supersedes it), ``awaiting`` (stored, not
scored yet: still being assembled or in the queue).

Order (:data:`ORDER`): abnormal first, by score, highest first; then the longest waiting
(oldest study date and time) first. One SQL query with the filters and a page limit: the page
costs the same with 10,000 studies as with 10.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import httpx
from sqlalchemy import (
    Column,
    Engine,
    Float,
    Index,
    MetaData,
    String,
    Table,
    and_,
    case,
    func,
    insert,
    or_,
    select,
    update,
)

from scanwatch import ids
from scanwatch.database import for_writes
from services.console.index import instances, studies

log = logging.getLogger(__name__)

metadata = MetaData()
#: StudyInstanceUID → its ImagingStudy's logical id.
study_keys = Table(
    "worklist_study",
    metadata,
    Column("StudyInstanceUID", String(64), primary_key=True),
    Column("imaging_id", String(64), nullable=False),
)
Index("ix_worklist_study_imaging_id", study_keys.c.imaging_id)
#: The newest AI result of each ImagingStudy.
results = Table(
    "worklist_result",
    metadata,
    Column("imaging_id", String(64), primary_key=True),
    Column("observation_id", String(64), nullable=False),
    Column("score", Float, nullable=True),
    Column("interpretation", String(8), nullable=True),
    Column("model", String(200), nullable=True),
    Column("status", String(20), nullable=False),
    Column("issued", String(40), nullable=True),
)
Index("ix_worklist_result_score", results.c.score)
#: The newest dead letter of each study (the failure and its reason; no PHI by contract).
failures = Table(
    "worklist_failure",
    metadata,
    Column("StudyInstanceUID", String(64), primary_key=True),
    Column("source_topic", String(200), nullable=False),
    Column("reason", String(1000), nullable=False),
    Column("error_class", String(40), nullable=False),
)
state = Table(
    "worklist_state",
    metadata,
    Column("name", String(40), primary_key=True),
    Column("value", String(64), nullable=False),
)

PAGE_SIZE = 50
STATUSES = ("scored", "failed", "awaiting")
INTERPRETATIONS = {"A": "Abnormal", "N": "Normal"}
#: Observation statuses that mean a clinician has reviewed the AI's result.
REVIEWED = ("final", "amended", "corrected")
#: Most Observations read per FHIR page while topping up.
FHIR_PAGE = 500


@dataclass(frozen=True)
class Filters:
    """What the worklist is narrowed to (every field optional)."""

    status: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    interpretation: str | None = None
    model: str | None = None
    reviewed: bool | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> tuple[Filters, list[str]]:
        """The filters of a query string, and what was wrong with it (each bad value is left
        out and said, never guessed)."""
        errors: list[str] = []

        def day(name: str) -> date | None:
            text = params.get(name, "").strip()
            if not text:
                return None
            try:
                return date.fromisoformat(text)
            except ValueError:
                errors.append(f"The date {text!r} is not a date (YYYY-MM-DD).")
                return None

        status = params.get("status") or None
        if status is not None and status not in STATUSES:
            errors.append("Unknown status.")
            status = None
        interpretation = params.get("interpretation") or None
        if interpretation is not None and interpretation not in INTERPRETATIONS:
            errors.append("Unknown interpretation.")
            interpretation = None
        reviewed_text = params.get("reviewed") or None
        reviewed = {"yes": True, "no": False}.get(reviewed_text or "")
        if reviewed_text is not None and reviewed is None:
            errors.append("Reviewed must be yes or no.")
        model = (params.get("model") or "").strip()[:200] or None
        return (
            cls(status, day("from"), day("to"), interpretation, model, reviewed),
            errors,
        )


@dataclass(frozen=True)
class Row:
    StudyInstanceUID: str
    PatientName: str
    PatientID: str
    StudyDate: str
    StudyTime: str
    StudyDescription: str
    instances: int
    status: str
    score: float | None
    interpretation: str | None
    model: str | None
    reviewed: bool
    reason: str | None = None  # why it failed

    def waiting(self, now: datetime) -> str:
        """How long since the study was acquired (StudyDate/StudyTime, the hospital's local
        time), as a person reads it: "3 d 4 h", "2 h 5 min"; "" when the date is unknown."""
        try:
            started = datetime.strptime(
                self.StudyDate + (self.StudyTime or "000000")[:6].ljust(6, "0"), "%Y%m%d%H%M%S"
            )
        except ValueError:
            return ""
        minutes = max(0, int((now - started).total_seconds() // 60))
        days, rest = divmod(minutes, 24 * 60)
        hours, minutes = divmod(rest, 60)
        if days:
            return f"{days} d {hours} h"
        return f"{hours} h {minutes} min" if hours else f"{minutes} min"


class Worklist:
    """The worklist's tables (in the index's database: a cache of the store and of FHIR)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._ready = False

    def open(self) -> None:
        if not self._ready:
            metadata.create_all(self.engine)
            self._ready = True

    # --- keeping up ---------------------------------------------------------------------------

    def map_new_studies(self) -> int:
        """Give every indexed study its ImagingStudy id (new ones only); how many."""
        self.open()
        with for_writes(self.engine).begin() as conn:
            new = conn.execute(
                select(studies.c.StudyInstanceUID).where(
                    ~select(study_keys.c.StudyInstanceUID)
                    .where(study_keys.c.StudyInstanceUID == studies.c.StudyInstanceUID)
                    .exists()
                )
            ).scalars()
            rows = [
                {"StudyInstanceUID": uid, "imaging_id": ids.imaging_study_id(uid)} for uid in new
            ]
            if rows:
                conn.execute(insert(study_keys), rows)
        return len(rows)

    def watermark(self) -> str | None:
        self.open()
        with self.engine.connect() as conn:
            value: str | None = conn.execute(
                select(state.c.value).where(state.c.name == "lastUpdated")
            ).scalar()
        return value

    def store_results(self, bundle_entries: list[dict[str, Any]], last_updated: str | None) -> int:
        """Keep the AI results of these Observations (the newest per ImagingStudy) and move
        the watermark to ``last_updated``; how many were kept."""
        self.open()
        kept = 0
        with for_writes(self.engine).begin() as conn:
            for resource in bundle_entries:
                row = result_row(resource)
                if row is None:
                    continue
                current = conn.execute(
                    select(results.c.issued).where(results.c.imaging_id == row["imaging_id"])
                ).first()
                if current is None:
                    conn.execute(insert(results).values(**row))
                elif (current.issued or "") <= (row["issued"] or ""):
                    conn.execute(
                        update(results)
                        .where(results.c.imaging_id == row["imaging_id"])
                        .values(**row)
                    )
                kept += 1
            if last_updated:
                done = conn.execute(
                    update(state).where(state.c.name == "lastUpdated").values(value=last_updated)
                )
                if not done.rowcount:
                    conn.execute(insert(state).values(name="lastUpdated", value=last_updated))
        return kept

    # --- reading ------------------------------------------------------------------------------

    def page(self, filters: Filters, offset: int = 0, limit: int = PAGE_SIZE) -> list[Row]:
        """One page of the worklist, in triage order."""
        self.open()
        counts = (
            select(
                instances.c.StudyInstanceUID.label("uid"),
                func.count().label("n"),
            )
            .group_by(instances.c.StudyInstanceUID)
            .subquery()
        )
        abnormal = case((results.c.interpretation == "A", 0), else_=1)
        query = (
            select(
                studies.c.StudyInstanceUID,
                studies.c.PatientName,
                studies.c.PatientID,
                studies.c.StudyDate,
                studies.c.StudyTime,
                studies.c.StudyDescription,
                counts.c.n,
                results.c.score,
                results.c.interpretation,
                results.c.model,
                results.c.status,
                failures.c.reason,
            )
            .select_from(studies)
            .join(study_keys, study_keys.c.StudyInstanceUID == studies.c.StudyInstanceUID)
            .outerjoin(results, results.c.imaging_id == study_keys.c.imaging_id)
            .outerjoin(counts, counts.c.uid == studies.c.StudyInstanceUID)
            .outerjoin(failures, failures.c.StudyInstanceUID == studies.c.StudyInstanceUID)
            .where(*self._conditions(filters))
            .order_by(
                abnormal,
                case((results.c.interpretation == "A", -results.c.score), else_=None),
                func.coalesce(studies.c.StudyDate, ""),
                func.coalesce(studies.c.StudyTime, ""),
                studies.c.StudyInstanceUID,
            )
            .offset(offset)
            .limit(limit)
        )
        with self.engine.connect() as conn:
            return [
                Row(
                    StudyInstanceUID=r.StudyInstanceUID,
                    PatientName=str(r.PatientName or "").replace("^", " ").strip(),
                    PatientID=r.PatientID or "",
                    StudyDate=r.StudyDate or "",
                    StudyTime=r.StudyTime or "",
                    StudyDescription=r.StudyDescription or "",
                    instances=int(r.n or 0),
                    status="scored" if r.status else ("failed" if r.reason else "awaiting"),
                    score=r.score,
                    interpretation=r.interpretation,
                    model=r.model,
                    reviewed=r.status in REVIEWED,
                    reason=None if r.status else r.reason,
                )
                for r in conn.execute(query)
            ]

    def models(self) -> list[str]:
        """The model versions results name (for the filter)."""
        self.open()
        with self.engine.connect() as conn:
            return [
                m
                for m in conn.execute(
                    select(results.c.model).distinct().order_by(results.c.model)
                ).scalars()
                if m
            ]

    def store_failure(self, study: str, topic: str, reason: str, error_class: str) -> None:
        """Keep the newest dead letter of ``study`` (an upsert: a redelivered one is
        harmless)."""
        self.open()
        values = {
            "source_topic": topic[:200],
            "reason": reason[:1000],
            "error_class": error_class[:40],
        }
        with for_writes(self.engine).begin() as conn:
            done = conn.execute(
                update(failures).where(failures.c.StudyInstanceUID == study).values(**values)
            )
            if not done.rowcount:
                conn.execute(insert(failures).values(StudyInstanceUID=study, **values))

    def fingerprint(self) -> tuple[int, int, str]:
        """Changes when a study or a result arrives (what the live stream watches)."""
        self.open()
        with self.engine.connect() as conn:
            n_studies = conn.execute(select(func.count()).select_from(study_keys)).scalar() or 0
            n_results = conn.execute(select(func.count()).select_from(results)).scalar() or 0
            newest = conn.execute(select(func.max(results.c.issued))).scalar() or ""
            n_failed = conn.execute(select(func.count()).select_from(failures)).scalar() or 0
        return int(n_studies), int(n_results) * 1_000_000 + int(n_failed), str(newest)

    @staticmethod
    def _conditions(filters: Filters) -> list[Any]:
        conditions: list[Any] = []
        if filters.status == "scored":
            conditions.append(results.c.imaging_id.is_not(None))
        elif filters.status == "failed":
            conditions.append(and_(results.c.imaging_id.is_(None), failures.c.reason.is_not(None)))
        elif filters.status == "awaiting":
            conditions.append(and_(results.c.imaging_id.is_(None), failures.c.reason.is_(None)))
        if filters.date_from is not None:
            conditions.append(studies.c.StudyDate >= filters.date_from.strftime("%Y%m%d"))
        if filters.date_to is not None:
            conditions.append(studies.c.StudyDate <= filters.date_to.strftime("%Y%m%d"))
        if filters.interpretation is not None:
            conditions.append(results.c.interpretation == filters.interpretation)
        if filters.model is not None:
            conditions.append(results.c.model == filters.model)
        if filters.reviewed is True:
            conditions.append(results.c.status.in_(REVIEWED))
        elif filters.reviewed is False:
            conditions.append(
                or_(results.c.status.is_(None), and_(~results.c.status.in_(REVIEWED)))
            )
        return conditions


def result_row(resource: Mapping[str, Any]) -> dict[str, Any] | None:
    """The worklist's view of an AI result Observation, or None when it is not one (no
    ImagingStudy in ``partOf``/``derivedFrom``)."""
    if resource.get("resourceType") != "Observation":
        return None
    refs = [*resource.get("partOf", ()), *resource.get("derivedFrom", ())]
    imaging = next(
        (
            str(r.get("reference", ""))[len("ImagingStudy/") :]
            for r in refs
            if str(r.get("reference", "")).startswith("ImagingStudy/")
        ),
        None,
    )
    if not imaging:
        return None
    quantity = resource.get("valueQuantity") or {}
    score = quantity.get("value")
    codes = [
        c.get("code")
        for i in resource.get("interpretation", ())
        for c in i.get("coding", ())
        if c.get("code") in INTERPRETATIONS
    ]
    device = resource.get("device") or {}
    return {
        "imaging_id": imaging[:64],
        "observation_id": str(resource.get("id", ""))[:64],
        "score": float(score) if isinstance(score, int | float) else None,
        "interpretation": codes[0] if codes else None,
        "model": (str(device["display"])[:200] if device.get("display") else None),
        "status": str(resource.get("status", "unknown"))[:20],
        "issued": str(resource.get("issued", ""))[:40] or None,
    }


async def top_up_results(
    worklist: Worklist, http: httpx.AsyncClient, fhir_base: str, token: str
) -> int:
    """Read the imaging Observations changed since the watermark (with the staff member's
    token; the FHIR API audits the read under their ``sub``) and keep their results."""
    since = await asyncio.to_thread(worklist.watermark)
    params: dict[str, str] = {
        "category": "imaging",
        "_sort": "_lastUpdated",
        "_count": str(FHIR_PAGE),
    }
    if since:
        params["_lastUpdated"] = f"ge{since}"
    url: str | None = f"{fhir_base}/Observation"
    kept = 0
    headers = {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}
    first = True
    while url:
        answer = await http.get(url, params=params if first else None, headers=headers)
        first = False
        if answer.status_code in (401, 403):
            return kept  # this role reads no Observation: the rows stay "awaiting"
        answer.raise_for_status()
        bundle = answer.json()  # ValueError when it is not JSON
        if not isinstance(bundle, dict):
            raise ValueError("the FHIR answer is not a Bundle")
        entries = [e.get("resource", {}) for e in bundle.get("entry", ())]
        newest = max((str(r.get("meta", {}).get("lastUpdated", "")) for r in entries), default="")
        kept += await asyncio.to_thread(worklist.store_results, entries, newest or None)
        url = next(
            (link.get("url") for link in bundle.get("link", ()) if link.get("relation") == "next"),
            None,
        )
    return kept
