"""DICOMweb over the file store (PS3.18): QIDO-RS searches (§10.6) answered from the index,
WADO-RS retrievals (§10.4) of instances, metadata, frames and rendered images read from the
stored files. Read only: every other method answers 405.

Every route declares :func:`fresh` (searches) or :func:`authorised` (retrievals), both of which
require :func:`staff` (a verified staff token): a route cannot forget the caller. Searches top
the index up before answering; retrievals do when the index does not know what they name.
UIDs in paths are checked against the UID grammar before anything touches the file system
(400), and a stored file is opened only through :meth:`StoreIndex.path_of`, which keeps it
inside the store.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from sqlalchemy import Engine, select

from services.auth.scopes import Grant
from services.console import pixels, qido
from services.console.auth import Verifier
from services.console.config import Settings
from services.console.index import StoreIndex, instances, is_uid
from services.console.metrics import ConsoleMetrics

#: Explicit VR Little Endian: the uncompressed transfer syntax frames and transcoded instances use.
EXPLICIT_LE = "1.2.840.10008.1.2.1"

log = logging.getLogger(__name__)
router = APIRouter(prefix="/dicomweb")

DICOM_JSON = "application/dicom+json"
#: Binary values longer than this are left out of metadata (the pixels come from /frames).
BULK_DATA_THRESHOLD = 1024
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
#: Most frames one request may name.
MAX_FRAMES = 1000


class DicomWebError(Exception):
    """An answer other than success: HTTP ``status`` and a sentence for the caller."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Console:
    """What the routes share (``app.state.console``)."""

    settings: Settings
    engine: Engine
    index: StoreIndex
    verifier: Verifier
    metrics: ConsoleMetrics

    def top_up(self, not_before: float | None = None) -> None:
        started = time.perf_counter()
        result = self.index.top_up(not_before)
        if result is not None:
            self.metrics.scan_seconds.observe(time.perf_counter() - started)
            self.metrics.headers_read.inc(result.read)
        self.metrics.instances.set(self.index.instances_indexed)


def console(request: Request) -> Console:
    state: Console = request.app.state.console
    return state


ConsoleDep = Annotated[Console, Depends(console)]


def staff(request: Request, state: ConsoleDep) -> Grant:
    """The caller's grant: a staff token that reads ImagingStudy (401/403 otherwise)."""
    return state.verifier.check(request.headers.get("authorization"))


@dataclass(frozen=True)
class Authorised:
    """The console for an authorised request, and when the request arrived."""

    console: Console
    arrival: float

    def top_up(self) -> None:
        """Top the index up with everything stored before this request arrived (or within
        ``index_max_age_s`` before it)."""
        self.console.top_up(self.arrival - self.console.settings.index_max_age_s)


def authorised(state: ConsoleDep, _grant: Annotated[Grant, Depends(staff)]) -> Authorised:
    return Authorised(state, time.monotonic())


def fresh(request: Annotated[Authorised, Depends(authorised)]) -> Console:
    """The console, its index topped up for this request (searches: every instance stored
    before the request is in the answer); only for an authorised caller."""
    request.top_up()
    return request.console


Fresh = Annotated[Console, Depends(fresh)]
Auth = Annotated[Authorised, Depends(authorised)]


def uid(value: str, name: str) -> str:
    """``value`` when it is a UID; 400 otherwise (nothing else reaches the file system)."""
    if not is_uid(value):
        raise DicomWebError(400, f"{name} is not a valid UID (digits and dots, at most 64)")
    return value


def base_url(request: Request, state: Console) -> str:
    root = state.settings.public_url or str(request.base_url).rstrip("/")
    return f"{root}/dicomweb"


# -- QIDO-RS ---------------------------------------------------------------------------------


def _search(
    request: Request, state: Console, level: str, searchable: tuple[str, ...],
    fixed: dict[str, str],
) -> Response:  # fmt: skip
    params = request.query_params.multi_items()
    try:
        query = qido.parse(level, params, state.settings.max_results, searchable)
    except qido.QueryError as exc:
        raise DicomWebError(400, str(exc)) from exc
    # The path's UIDs (checked already) bound the search whatever level they belong to.
    query.where += [qido.match(keyword, value) for keyword, value in fixed.items()]
    rows, more = qido.run(state.engine, query)
    base = base_url(request, state)
    body = []
    for row in rows:
        url = f"{base}/studies/{row['StudyInstanceUID']}"
        if level != qido.STUDY:
            url += f"/series/{row['SeriesInstanceUID']}"
        if level == qido.INSTANCE:
            url += f"/instances/{row['SOPInstanceUID']}"
        body.append(qido.to_json(row, query.include, url))
    warnings = list(query.warnings)
    if more:
        warnings.append("There are additional results that can be requested")
    headers = {"Warning": ", ".join(f'299 scanwatch "{w}"' for w in warnings)} if warnings else {}
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


@router.get("/studies")
def search_studies(request: Request, state: Fresh) -> Response:
    """Search for studies (QIDO-RS)."""
    return _search(request, state, qido.STUDY, (qido.STUDY,), {})


@router.get("/series")
def search_series(request: Request, state: Fresh) -> Response:
    """Search for series of every study."""
    return _search(request, state, qido.SERIES, (qido.STUDY, qido.SERIES), {})


@router.get("/instances")
def search_instances(request: Request, state: Fresh) -> Response:
    """Search for instances of every study."""
    return _search(request, state, qido.INSTANCE, qido.LEVELS, {})


@router.get("/studies/{study}/series")
def search_study_series(request: Request, state: Fresh, study: str) -> Response:
    """Search for the series of one study."""
    fixed = {"StudyInstanceUID": uid(study, "StudyInstanceUID")}
    return _search(request, state, qido.SERIES, (qido.SERIES,), fixed)


@router.get("/studies/{study}/instances")
def search_study_instances(request: Request, state: Fresh, study: str) -> Response:
    """Search for the instances of one study."""
    fixed = {"StudyInstanceUID": uid(study, "StudyInstanceUID")}
    return _search(request, state, qido.INSTANCE, (qido.SERIES, qido.INSTANCE), fixed)


@router.get("/studies/{study}/series/{series}/instances")
def search_series_instances(request: Request, state: Fresh, study: str, series: str) -> Response:
    """Search for the instances of one series."""
    fixed = {
        "StudyInstanceUID": uid(study, "StudyInstanceUID"),
        "SeriesInstanceUID": uid(series, "SeriesInstanceUID"),
    }
    return _search(request, state, qido.INSTANCE, (qido.INSTANCE,), fixed)


# -- WADO-RS ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """One stored instance to serve."""

    sop: str
    path: Path
    transfer_syntax: str
    frames: int


def _stored(
    auth: Authorised,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    *,
    whole: bool = True,
) -> list[Stored]:
    """The stored instances under the path's UIDs (checked), in order; 404 when none.

    ``whole`` (a study or series): the index is topped up first, so the answer holds every
    instance stored before the request. One instance (``whole`` False): the index answers
    and is topped up only when it does not know the instance: a viewer fetching a series
    frame by frame costs no folder scan per frame.
    """
    state = auth.console
    where = [instances.c.StudyInstanceUID == uid(study, "StudyInstanceUID")]
    if series is not None:
        where.append(instances.c.SeriesInstanceUID == uid(series, "SeriesInstanceUID"))
    if sop is not None:
        where.append(instances.c.SOPInstanceUID == uid(sop, "SOPInstanceUID"))
    statement = (
        select(
            instances.c.SeriesInstanceUID,
            instances.c.SOPInstanceUID,
            instances.c.file_name,
            instances.c.TransferSyntaxUID,
            instances.c.NumberOfFrames,
        )
        .where(*where)
        .order_by(
            instances.c.SeriesInstanceUID, instances.c.InstanceNumber, instances.c.SOPInstanceUID
        )
    )
    rows: Sequence[Any] = []
    if not whole:
        with state.engine.connect() as conn:
            rows = conn.execute(statement).all()
    if not rows:
        auth.top_up()
        with state.engine.connect() as conn:
            rows = conn.execute(statement).all()
    if not rows:
        what = "instance" if sop else "series" if series else "study"
        raise DicomWebError(404, f"no such {what} in the store")
    return [
        Stored(
            row.SOPInstanceUID,
            state.index.path_of(study, row.SeriesInstanceUID, row.file_name),
            row.TransferSyntaxUID or "1.2.840.10008.1.2.1",
            int(row.NumberOfFrames or 1),
        )
        for row in rows
    ]


def media_ranges(accept: str | None) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header with their parameters (lower-case names)."""
    if not accept:
        return [("*/*", {})]
    out = []
    for item in re.split(r',(?=(?:[^"]*"[^"]*")*[^"]*$)', accept):
        media, *parameters = (p.strip() for p in item.split(";"))
        params = {}
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        out.append((media.lower(), params))
    return out


def _multipart_choice(request: Request, part_type: str) -> dict[str, str] | None:
    """The parameters of the first acceptable multipart/related range for ``part_type``
    parts (None: nothing acceptable)."""
    for media, params in media_ranges(request.headers.get("accept")):
        if media in ("*/*", "multipart/*"):
            return {}
        if media == "multipart/related" and params.get("type", part_type) in (
            part_type, "*/*", "application/*",
        ):  # fmt: skip
            return params
    return None


def _not_acceptable(what: str) -> DicomWebError:
    return DicomWebError(406, f"this resource is served as {what}")


def _retrieve(request: Request, stored: list[Stored]) -> Response:
    params = _multipart_choice(request, "application/dicom")
    if params is None:
        raise _not_acceptable('multipart/related; type="application/dicom"')
    wanted = params.get("transfer-syntax") or "*"
    if wanted not in ("*", EXPLICIT_LE) and any(s.transfer_syntax != wanted for s in stored):
        raise DicomWebError(
            406,
            f"transfer syntax {wanted} is not offered: instances are served as stored "
            "(transfer-syntax=*) or as Explicit VR Little Endian (1.2.840.10008.1.2.1)",
        )
    for item in stored:
        if not item.path.is_file():
            raise DicomWebError(404, "an instance of this resource is no longer in the store")
    boundary = pixels.new_boundary()

    def body() -> Iterator[bytes]:
        for item in stored:
            if wanted == "*" or item.transfer_syntax == wanted:
                yield pixels.part_header(
                    boundary, f"application/dicom; transfer-syntax={item.transfer_syntax}"
                )
                with item.path.open("rb") as handle:
                    while chunk := handle.read(pixels.CHUNK):
                        yield chunk
            else:
                data = pixels.transcode_explicit_le(item.path)
                yield pixels.part_header(boundary, f"application/dicom; transfer-syntax={wanted}")
                yield data
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    if wanted not in ("*",):
        # Fail with 406 before the first byte rather than in the middle of the body.
        for item in stored:
            if (
                item.transfer_syntax != wanted
                and pydicom.uid.UID(item.transfer_syntax).is_compressed
            ):
                try:
                    pixels.transcode_explicit_le(item.path)
                except pixels.NotDecodable as exc:
                    raise DicomWebError(406, str(exc)) from exc
                break
    media = f'multipart/related; type="application/dicom"; boundary={boundary}'
    return StreamingResponse(body(), media_type=media)


@router.get("/studies/{study}")
def retrieve_study(request: Request, auth: Auth, study: str) -> Response:
    """Every instance of a study, as stored (multipart/related, application/dicom)."""
    return _retrieve(request, _stored(auth, study))


@router.get("/studies/{study}/series/{series}")
def retrieve_series(request: Request, auth: Auth, study: str, series: str) -> Response:
    """Every instance of a series."""
    return _retrieve(request, _stored(auth, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}")
def retrieve_instance(request: Request, auth: Auth, study: str, series: str, sop: str) -> Response:
    """One instance."""
    return _retrieve(request, _stored(auth, study, series, sop, whole=False))


def _strip_bulk(ds: Dataset) -> None:
    """Leave out binary values over :data:`BULK_DATA_THRESHOLD` bytes, at every depth."""
    for elem in list(ds):
        if elem.VR == "SQ":
            for item in elem.value:
                _strip_bulk(item)
        elif (
            elem.VR in BINARY_VRS
            and elem.value is not None
            and len(elem.value) > BULK_DATA_THRESHOLD
        ):
            del ds[elem.tag]


def _metadata(request: Request, stored: list[Stored]) -> Response:
    accept = media_ranges(request.headers.get("accept"))
    if not any(m in ("*/*", "application/*", DICOM_JSON, "application/json") for m, _ in accept):
        raise _not_acceptable(DICOM_JSON)
    body = []
    for item in stored:
        try:
            ds = pydicom.dcmread(item.path, stop_before_pixels=True)
        except FileNotFoundError as exc:
            raise DicomWebError(404, "an instance is no longer in the store") from exc
        _strip_bulk(ds)
        data: dict[str, Any] = ds.to_json_dict()
        data["00083002"] = {"vr": "UI", "Value": [item.transfer_syntax]}
        body.append(dict(sorted(data.items())))
    return JSONResponse(body, media_type=DICOM_JSON)


@router.get("/studies/{study}/metadata")
def study_metadata(request: Request, auth: Auth, study: str) -> Response:
    """The headers of every instance of a study (DICOM JSON, bulk data left out)."""
    return _metadata(request, _stored(auth, study))


@router.get("/studies/{study}/series/{series}/metadata")
def series_metadata(request: Request, auth: Auth, study: str, series: str) -> Response:
    """The headers of every instance of a series."""
    return _metadata(request, _stored(auth, study, series))


@router.get("/studies/{study}/series/{series}/instances/{sop}/metadata")
def instance_metadata(request: Request, auth: Auth, study: str, series: str, sop: str) -> Response:
    """The header of one instance."""
    return _metadata(request, _stored(auth, study, series, sop, whole=False))


def _frame_numbers(text: str, count: int) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",")]
    except ValueError as exc:
        raise DicomWebError(400, "frames are 1-based numbers separated by commas") from exc
    if not numbers or len(numbers) > MAX_FRAMES or min(numbers) < 1:
        raise DicomWebError(400, f"frames are 1 to {MAX_FRAMES} numbers, each at least 1")
    if max(numbers) > count:
        raise DicomWebError(404, f"the instance has {count} frame(s)")
    return numbers


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frames}")
def retrieve_frames(
    request: Request, auth: Auth, study: str, series: str, sop: str, frames: str
) -> Response:
    """Frames, uncompressed (multipart/related, application/octet-stream; compressed pixel
    data are decoded when pydicom can, else 406)."""
    (item,) = _stored(auth, study, series, sop, whole=False)
    numbers = _frame_numbers(frames, item.frames)
    params = _multipart_choice(request, "application/octet-stream")
    if params is None or params.get("transfer-syntax", "*") not in (
        "*", EXPLICIT_LE,
    ):  # fmt: skip
        raise _not_acceptable(
            'multipart/related; type="application/octet-stream" (uncompressed, '
            "transfer-syntax=1.2.840.10008.1.2.1)"
        )
    try:
        data = pixels.frame_bytes(item.path, numbers)
    except pixels.NotDecodable as exc:
        raise DicomWebError(406, str(exc)) from exc
    boundary = pixels.new_boundary()
    part = f"application/octet-stream; transfer-syntax={EXPLICIT_LE}"
    media = f'multipart/related; type="application/octet-stream"; boundary={boundary}'
    return StreamingResponse(
        pixels.multipart(boundary, ((part, d) for d in data)), media_type=media
    )


def _rendered(request: Request, item: Stored, number: int) -> Response:
    media_type = None
    for media, _params in media_ranges(request.headers.get("accept")):
        if media in ("image/png", "image/jpeg"):
            media_type = media
            break
        if media in ("*/*", "image/*"):
            media_type = "image/jpeg"  # the standard's default for rendered images
            break
    if media_type is None:
        raise _not_acceptable("image/jpeg or image/png")
    window = None
    if text := request.query_params.get("window"):
        try:
            window = pixels.Window.parse(text)
        except ValueError as exc:
            raise DicomWebError(400, str(exc)) from exc
    try:
        data = pixels.render(item.path, number, window, media_type)
    except pixels.NotDecodable as exc:
        raise DicomWebError(406, str(exc)) from exc
    return Response(data, media_type=media_type)


@router.get("/studies/{study}/series/{series}/instances/{sop}/rendered")
def instance_rendered(request: Request, auth: Auth, study: str, series: str, sop: str) -> Response:
    """The instance's first frame as an 8-bit image (``window=center,width[,function]``)."""
    (item,) = _stored(auth, study, series, sop, whole=False)
    return _rendered(request, item, 1)


@router.get("/studies/{study}/series/{series}/instances/{sop}/frames/{frame}/rendered")
def frame_rendered(
    request: Request, auth: Auth, study: str, series: str, sop: str, frame: str
) -> Response:
    """One frame as an 8-bit image."""
    (item,) = _stored(auth, study, series, sop, whole=False)
    (number,) = _frame_numbers(frame, item.frames)
    return _rendered(request, item, number)


@router.api_route(
    "/{rest:path}", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
    include_in_schema=False,
)  # fmt: skip
def elsewhere(request: Request, rest: str) -> Response:
    """Writes (STOW-RS, deletions) anywhere: 405, this service is read only; any other path:
    400 when a segment is not a UID where one belongs, else 404."""
    if request.method != "GET":
        raise DicomWebError(405, "the DICOMweb service is read only (QIDO-RS and WADO-RS)")
    if any(part in ("..", ".") or "/" in part or "\\" in part for part in rest.split("/")):
        raise DicomWebError(400, "a path segment is not a valid UID")
    raise DicomWebError(404, "no such DICOMweb resource")
