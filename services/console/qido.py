"""QIDO-RS (PS3.18 §10.6): search parameters to SQL over the index, rows to DICOM JSON.

Matching (PS3.4 §C.2.2.2): single value, UID list (comma or backslash separated), wildcard
(``*``, ``?``; case-insensitive on person names), date and time ranges (``A-B``, ``-B``,
``A-``), universal (empty). Keys are DICOM keywords or tags (``PatientID`` or ``00100020``).
A key the index does not hold is not matched, and the answer's ``Warning`` header says so
(PS3.18 §8.3.4.1 lets an origin server ignore what it does not support). No match is 200 with
``[]``: PS3.18 §8.3.4.4.1 says 204, which RFC 9110 forbids to carry a body; CP-2473 (WG-27,
2025) returns to 200, and dicomweb-client, OHIF and Weasis read both.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from sqlalchemy import Column, ColumnElement, Engine, and_, exists, func, or_, select

from services.console.index import (
    INSTANCE_ATTRS,
    SERIES_ATTRS,
    STUDY_ATTRS,
    instances,
    is_uid,
    series_table,
    studies,
)

STUDY, SERIES, INSTANCE = "study", "series", "instance"
LEVELS = (STUDY, SERIES, INSTANCE)

#: Returned by default (PS3.18 Tables 10.6.3-3 to -5, plus the UIDs that place a result).
DEFAULTS = {
    STUDY: (
        "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
        "ReferringPhysicianName", "PatientName", "PatientID", "StudyInstanceUID", "StudyID",
        "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
    ),
    SERIES: (
        "StudyInstanceUID", "Modality", "SeriesDescription", "SeriesNumber",
        "SeriesInstanceUID", "NumberOfSeriesRelatedInstances",
    ),
    INSTANCE: (
        "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID",
        "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames",
    ),
}  # fmt: skip
#: Everything a level can return (``includefield=all``).
ALL = {
    STUDY: (*DEFAULTS[STUDY], "PatientBirthDate", "PatientSex", "StudyDescription"),
    SERIES: (*DEFAULTS[SERIES], "SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName"),
    INSTANCE: (*DEFAULTS[INSTANCE], "AvailableTransferSyntaxUID"),
}
COLUMNS: dict[str, Column[Any]] = {
    **{k: studies.c[k] for k in (*STUDY_ATTRS, "StudyInstanceUID")},
    **{k: series_table.c[k] for k in (*SERIES_ATTRS, "SeriesInstanceUID")},
    **{k: instances.c[k] for k in (*INSTANCE_ATTRS, "SOPInstanceUID")},
}
LEVEL_OF = {
    **dict.fromkeys((*STUDY_ATTRS, "StudyInstanceUID", "ModalitiesInStudy"), STUDY),
    **dict.fromkeys((*SERIES_ATTRS, "SeriesInstanceUID"), SERIES),
    **dict.fromkeys((*INSTANCE_ATTRS, "SOPInstanceUID"), INSTANCE),
}
UID_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})
RANGE_KEYS = frozenset({"StudyDate", "SeriesDate", "PatientBirthDate", "StudyTime", "SeriesTime"})
_DATE = re.compile(r"^[0-9]{8}$")
_TIME = re.compile(r"^[0-9]{2,6}(\.[0-9]{1,6})?$")
#: Parameters that are not match keys.
CONTROL = frozenset({"limit", "offset", "includefield", "fuzzymatching"})


class QueryError(ValueError):
    """A search parameter the standard does not allow (400)."""


@dataclass
class Query:
    """A parsed QIDO-RS request at ``level``."""

    level: str
    where: list[ColumnElement[bool]] = field(default_factory=list)
    limit: int = 0
    offset: int = 0
    include: tuple[str, ...] = ()
    warnings: list[str] = field(default_factory=list)


def keyword_of(key: str) -> str | None:
    """The DICOM keyword a parameter names (a keyword or 8 hex digits), or None."""
    if re.fullmatch(r"[0-9A-Fa-f]{8}", key):
        return keyword_for_tag(int(key, 16)) or None
    return key if tag_for_keyword(key) is not None else None


def _list(value: str) -> list[str]:
    return [v for v in re.split(r"[,\\]", value) if v]


def _wildcard(column: Column[Any], value: str, fold: bool) -> ColumnElement[bool]:
    if "*" not in value and "?" not in value:
        return func.lower(column) == value.lower() if fold else column == value
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    pattern = escaped.replace("*", "%").replace("?", "_")
    target = func.lower(column) if fold else column
    return target.like(pattern.lower() if fold else pattern, escape="!")


def _range(column: Column[Any], keyword: str, value: str) -> ColumnElement[bool]:
    pattern = _DATE if keyword.endswith("Date") else _TIME
    low, dash, high = value.partition("-")
    for part in (low, high):
        if part and not pattern.match(part):
            raise QueryError(f"{keyword}={value!r} is not a DICOM date/time or range")
    if not dash:
        return column == low
    if not low and not high:
        raise QueryError(f"{keyword}={value!r} is an empty range")
    clauses = []
    if low:
        clauses.append(column >= low)
    if high:
        # A time range's upper bound includes its fractions: 1200 covers 120059.9.
        clauses.append(column <= (high if keyword.endswith("Date") else high + "~"))
    return and_(*clauses)


def match(keyword: str, value: str) -> ColumnElement[bool]:
    """The SQL condition of one match key (QueryError when the value is malformed)."""
    if keyword == "ModalitiesInStudy":
        # Its own alias: at the series and instance levels the outer query selects from the
        # series table too, and the subquery would correlate away all its FROM clauses.
        any_series = series_table.alias("any_series")
        return exists().where(
            any_series.c.StudyInstanceUID == studies.c.StudyInstanceUID,
            any_series.c.Modality.in_(_list(value)),
        )
    column = COLUMNS[keyword]
    if keyword in UID_KEYS:
        uids = _list(value)
        if not all(is_uid(u) for u in uids):
            raise QueryError(f"{keyword} must be UIDs (digits and dots, at most 64 characters)")
        return column.in_(uids)
    if keyword in RANGE_KEYS:
        return _range(column, keyword, value)
    if keyword in ("SeriesNumber", "InstanceNumber", "Rows", "Columns", "NumberOfFrames"):
        try:
            return column == int(value)
        except ValueError as exc:
            raise QueryError(f"{keyword} must be an integer") from exc
    fold = dictionary_VR(keyword) == "PN"
    return or_(*(_wildcard(column, v, fold) for v in value.split("\\")))


def parse(
    level: str,
    params: Sequence[tuple[str, str]],
    max_results: int,
    searchable: Iterable[str],
) -> Query:
    """The query of ``params`` at ``level``; ``searchable``: the levels whose keys match."""
    query = Query(level, limit=max_results)
    allowed = set(searchable)
    include: list[str] = []
    unsupported: list[str] = []
    for key, value in params:
        if key == "limit" or key == "offset":
            try:
                number = int(value)
            except ValueError as exc:
                raise QueryError(f"{key} must be a non-negative integer") from exc
            if number < 0:
                raise QueryError(f"{key} must be a non-negative integer")
            if key == "limit":
                query.limit = min(number, max_results) if number else max_results
            else:
                query.offset = number
            continue
        if key == "fuzzymatching":
            if value.lower() == "true":
                query.warnings.append("fuzzymatching is not supported")
            continue
        if key == "includefield":
            include.extend(v.strip() for v in value.split(","))
            continue
        keyword = keyword_of(key)
        if keyword is None:
            raise QueryError(f"{key!r} is neither a DICOM keyword nor a tag")
        if value == "":
            continue  # universal matching
        if LEVEL_OF.get(keyword) not in allowed:
            unsupported.append(keyword)
            continue
        query.where.append(match(keyword, value))
    if unsupported:
        query.warnings.append(f"not matched (not a key here): {', '.join(unsupported)}")
    returned = [a for lvl in LEVELS if lvl in allowed for a in DEFAULTS[lvl]]
    available = [a for lvl in LEVELS if lvl in allowed for a in ALL[lvl]]
    for item in include:
        if item == "all":
            returned.extend(available)
            continue
        keyword = keyword_of(item)
        if keyword is None:
            raise QueryError(f"includefield {item!r} is neither a DICOM keyword nor a tag")
        if keyword in available:
            returned.append(keyword)
        else:
            query.warnings.append(f"includefield {keyword} is not held by the index")
    query.include = tuple(dict.fromkeys(returned))
    return query


def run(engine: Engine, query: Query) -> tuple[list[dict[str, Any]], bool]:
    """The matching rows (dicts by keyword, computed attributes included) and whether more
    matched than ``limit``."""
    if query.level == STUDY:
        statement = select(studies).order_by(
            studies.c.StudyDate.desc(), studies.c.StudyTime.desc(), studies.c.StudyInstanceUID
        )
    elif query.level == SERIES:
        statement = (
            select(series_table, *[studies.c[k] for k in STUDY_ATTRS])
            .join(studies, studies.c.StudyInstanceUID == series_table.c.StudyInstanceUID)
            .order_by(
                series_table.c.StudyInstanceUID,
                series_table.c.SeriesNumber,
                series_table.c.SeriesInstanceUID,
            )
        )
    else:
        statement = (
            select(
                instances,
                *[series_table.c[k] for k in SERIES_ATTRS],
                *[studies.c[k] for k in STUDY_ATTRS],
            )
            .join(
                series_table,
                and_(
                    series_table.c.StudyInstanceUID == instances.c.StudyInstanceUID,
                    series_table.c.SeriesInstanceUID == instances.c.SeriesInstanceUID,
                ),
            )
            .join(studies, studies.c.StudyInstanceUID == instances.c.StudyInstanceUID)
            .order_by(
                instances.c.StudyInstanceUID,
                instances.c.SeriesInstanceUID,
                instances.c.InstanceNumber,
                instances.c.SOPInstanceUID,
            )
        )
    statement = statement.where(*query.where).limit(query.limit + 1).offset(query.offset)
    with engine.connect() as conn:
        rows = [dict(r._mapping) for r in conn.execute(statement)]
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        _add_counts(conn, query, rows)
    return rows, more


def _add_counts(conn: Any, query: Query, rows: list[dict[str, Any]]) -> None:
    study_uids = sorted({r["StudyInstanceUID"] for r in rows})
    if not rows:
        return
    if "ModalitiesInStudy" in query.include or "NumberOfStudyRelatedSeries" in query.include:
        modalities: dict[str, set[str]] = {}
        series_count: dict[str, int] = {}
        for study, modality in conn.execute(
            select(series_table.c.StudyInstanceUID, series_table.c.Modality).where(
                series_table.c.StudyInstanceUID.in_(study_uids)
            )
        ):
            series_count[study] = series_count.get(study, 0) + 1
            if modality:
                modalities.setdefault(study, set()).add(modality)
        for row in rows:
            row["ModalitiesInStudy"] = sorted(modalities.get(row["StudyInstanceUID"], ()))
            row["NumberOfStudyRelatedSeries"] = series_count.get(row["StudyInstanceUID"], 0)
    if "NumberOfStudyRelatedInstances" in query.include:
        counts = dict(
            conn.execute(
                select(instances.c.StudyInstanceUID, func.count())
                .where(instances.c.StudyInstanceUID.in_(study_uids))
                .group_by(instances.c.StudyInstanceUID)
            ).all()
        )
        for row in rows:
            row["NumberOfStudyRelatedInstances"] = counts.get(row["StudyInstanceUID"], 0)
    if "NumberOfSeriesRelatedInstances" in query.include:
        per_series = {
            (s, se): n
            for s, se, n in conn.execute(
                select(instances.c.StudyInstanceUID, instances.c.SeriesInstanceUID, func.count())
                .where(instances.c.StudyInstanceUID.in_(study_uids))
                .group_by(instances.c.StudyInstanceUID, instances.c.SeriesInstanceUID)
            )
        }
        for row in rows:
            row["NumberOfSeriesRelatedInstances"] = per_series.get(
                (row["StudyInstanceUID"], row.get("SeriesInstanceUID")), 0
            )
    if "AvailableTransferSyntaxUID" in query.include:
        for row in rows:
            row["AvailableTransferSyntaxUID"] = row.get("TransferSyntaxUID")


def element(keyword: str, value: Any) -> dict[str, Any]:
    """One attribute in DICOM JSON (PS3.18 §F.2)."""
    vr = dictionary_VR(keyword)
    if value is None or value == "" or value == []:
        return {"vr": vr}
    values = value if isinstance(value, list) else [value]
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": str(v)} for v in values]}
    if vr in ("IS", "US", "UL", "SS", "SL"):
        return {"vr": vr, "Value": [int(v) for v in values]}
    if vr == "CS" and isinstance(value, str):
        values = value.split("\\")
    return {"vr": vr, "Value": [str(v) for v in values]}


def to_json(row: dict[str, Any], include: Iterable[str], retrieve_url: str) -> dict[str, Any]:
    """A result as a DICOM JSON object, keyed by tag, in tag order."""
    out: dict[str, Any] = {}
    for keyword in include:
        tag = tag_for_keyword(keyword)
        if tag is not None:
            out[f"{tag:08X}"] = element(keyword, row.get(keyword))
    out["00081190"] = {"vr": "UR", "Value": [retrieve_url]}
    return dict(sorted(out.items()))
