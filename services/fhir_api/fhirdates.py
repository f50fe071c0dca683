"""FHIR date, dateTime and instant values as time ranges.

A FHIR time value stands for the whole span of its precision: ``2025`` is the year 2025,
``2025-03-04T08:30:00Z`` is one second. Search (``date=ge2025-03``) compares such ranges, so
both stored values and search values become ``[start, end)`` in UTC.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

_DATE_RE = re.compile(
    r"^(?P<year>\d{4})(?:-(?P<month>\d{2})(?:-(?P<day>\d{2})"
    r"(?:T(?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?P<fraction>\.\d{1,9})?)?"
    r"(?P<zone>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)


def fhir_range(
    value: str, default_zone: timedelta | None = timedelta(0)
) -> tuple[datetime, datetime]:
    """``[start, end)`` in UTC of a FHIR date/dateTime/instant (or search value).

    A time without a zone is read in ``default_zone`` (UTC); ``None`` makes it an error, as it
    is in a resource. Raises ``ValueError`` for anything that is not such a value.
    """
    match = _DATE_RE.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a FHIR date, dateTime or instant")
    parts = match.groupdict()
    year = int(parts["year"])
    if parts["month"] is None:
        return _utc(datetime(year, 1, 1)), _utc(datetime(year + 1, 1, 1))
    month = int(parts["month"])
    if parts["day"] is None:
        start = datetime(year, month, 1)
        end = datetime(year + (month == 12), month % 12 + 1, 1)
        return _utc(start), _utc(end)
    day = int(parts["day"])
    if parts["hour"] is None:
        start = datetime(year, month, day)
        return _utc(start), _utc(start + timedelta(days=1))
    zone = parts["zone"]
    if zone is None:
        if default_zone is None:
            raise ValueError(f"{value!r} has a time but no time zone")
        offset = default_zone
    elif zone == "Z":
        offset = timedelta(0)
    else:
        sign = 1 if zone[0] == "+" else -1
        offset = sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
    fraction = parts["fraction"]
    second = int(parts["second"] or 0)
    micro = int((fraction[1:] + "000000")[:6]) if fraction else 0
    start = datetime(year, month, day, int(parts["hour"]), int(parts["minute"]), second, micro)
    if fraction:
        step = timedelta(microseconds=max(1, 10 ** (6 - min(len(fraction) - 1, 6))))
    elif parts["second"] is not None:
        step = timedelta(seconds=1)
    else:
        step = timedelta(minutes=1)
    start = start.replace(tzinfo=UTC) - offset
    return start, start + step


def _utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC)
