"""The clinician's viewer: ``/studies/<StudyInstanceUID>`` shows the study's header (patient,
date, description, the AI result) and its scored series slice by slice with the AI's evidence
(each slice's class probabilities, its Grad-CAM heatmap laid over it).

Like an outside viewer (OHIF), the page's script (static/viewer.js) reads the images only through
DICOMweb: QIDO-RS for the instances and their series, WADO-RS metadata for the heatmaps' per-slice
probabilities and the slices' windows, WADO-RS ``rendered`` (PNG, ``window=``) for the pixels.
It does so at ``/viewer/dicomweb/…``: the same DICOMweb handlers
(:mod:`services.console.dicomweb`) behind the staff member's session instead of a bearer token,
so no token ever reaches the page, and behind the clinician role like the page itself. Opening a
study is audited (DICOM Instances Accessed); the image requests the page then makes are not
audited one by one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sqlalchemy import select

from services.console import audit, dicomweb, qido
from services.console.dicomweb import Authorised, Console
from services.console.index import is_uid, series_table
from services.console.web import Clinician, Web, WebDep
from services.console.worklist import results, study_keys, top_up_results

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
router = APIRouter()

#: Where the page's script finds DICOMweb (session-authenticated, clinicians only).
VIEWER_DICOMWEB = "/viewer/dicomweb"
#: The worker's heatmap series (``inference_worker.heatmaps.SERIES_NUMBER``, README
#: "Heatmaps"; the console does not import the worker, a test keeps the two equal).
HEATMAP_SERIES_NUMBER = 9901
#: The QIDO-RS search viewer.js starts with (the same URL, so a preload serves it).
INSTANCES_SEARCH = "/instances?includefield=SeriesNumber&includefield=SeriesDescription&offset=0"


def _console(request: Request) -> Console:
    state: Console = request.app.state.console
    return state


def _authorised(request: Request) -> Authorised:
    return Authorised(_console(request), time.monotonic())


def study_header(request: Request, study: str) -> dict[str, Any] | None:
    """The study's attributes from the index, with its AI result from the worklist's cache of
    FHIR (both brought up to date first: :func:`_top_up`); None when no instance of it is
    stored."""
    state = _console(request)
    query = qido.parse(qido.STUDY, [("StudyInstanceUID", study)], 1, (qido.STUDY,))
    rows, _ = qido.run(state.engine, query)
    if not rows:
        return None
    row = rows[0]
    # What the page's script will ask first, for the browser to fetch while it parses the page:
    # the study's instances and, the heaviest answer, the heatmap series' metadata.
    base = f"{VIEWER_DICOMWEB}/studies/{study}"
    with state.engine.connect() as conn:
        maps = conn.execute(
            select(series_table.c.SeriesInstanceUID).where(
                series_table.c.StudyInstanceUID == study,
                series_table.c.SeriesNumber == HEATMAP_SERIES_NUMBER,
            )
        ).scalars()
        preload = [base + INSTANCES_SEARCH, *(f"{base}/series/{uid}/metadata" for uid in maps)]
    header = {
        "StudyInstanceUID": study,
        "PatientName": str(row.get("PatientName") or "").replace("^", " ").strip(),
        "PatientID": row.get("PatientID") or "",
        "StudyDate": row.get("StudyDate") or "",
        "StudyDescription": row.get("StudyDescription") or "",
        "result": None,
        "preload": preload,
    }
    web: Web = request.app.state.web
    web.worklist.open()
    with web.worklist.engine.connect() as conn:  # the worklist's cache of FHIR results
        found = conn.execute(
            select(results.c.score, results.c.interpretation, results.c.model, results.c.status)
            .join(study_keys, study_keys.c.imaging_id == results.c.imaging_id)
            .where(study_keys.c.StudyInstanceUID == study)
        ).first()
    if found is not None:
        header["result"] = {
            "score": found.score,
            "interpretation": found.interpretation,
            "model": found.model,
            "status": found.status,
        }
    return header


async def _top_up(request: Request, web: Web, token: str) -> None:
    """The index, then the worklist's study ids, then the AI results changed since the
    worklist last looked, in that order: a study stored since the last look must be indexed
    and given its ImagingStudy id before its result can be matched to it."""
    await asyncio.to_thread(_authorised(request).top_up)
    await asyncio.to_thread(web.worklist.map_new_studies)
    try:
        await top_up_results(web.worklist, web.http, web.settings.fhir_base_url, token)
    except httpx.HTTPError as exc:  # the page still shows the images; the result later
        log.warning("viewer: FHIR results not read", extra={"error": type(exc).__name__})


def _display_date(value: str) -> str:
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if len(value) == 8 else value


@router.get("/studies/{study}", response_class=HTMLResponse)
async def study_page(request: Request, web: WebDep, staff: Clinician, study: str) -> Response:
    """The viewer (a clinician only): the header from the index, the images by the script."""
    if not is_uid(study):
        return web.page(
            request, "message.html", staff.session, 404, title="No such study",
            text="This address does not name a study.",
        )  # fmt: skip
    await web.record(
        audit.audit_event(staff.actor, audit.INSTANCES_ACCESSED, audit.READ, study=study)
    )
    await _top_up(request, web, staff.token)
    header = await asyncio.to_thread(study_header, request, study)
    return web.page(
        request,
        "study.html",
        staff.session,
        study=study,
        header=header,
        study_date=_display_date(header["StudyDate"]) if header else "",
        dicomweb=VIEWER_DICOMWEB,
        title="Study",
        nav="",
    )


@router.get("/api/studies/{study}")
async def study_api(request: Request, web: WebDep, staff: Clinician, study: str) -> Response:
    """The study's header as JSON (clinicians only): what the page's heading shows."""
    if not is_uid(study):
        return JSONResponse({"error": "not a StudyInstanceUID"}, status_code=404)
    await web.record(
        audit.audit_event(staff.actor, audit.INSTANCES_ACCESSED, audit.READ, study=study)
    )
    await _top_up(request, web, staff.token)
    header = await asyncio.to_thread(study_header, request, study)
    if header is None:
        return JSONResponse({"StudyInstanceUID": study, "stored": False})
    header.pop("preload")
    return JSONResponse(header)


# --- DICOMweb for the page, behind the session -------------------------------------------------
# The handlers are the bearer-token routes' own (no copy); only the gate differs. They are
# plain functions run in the thread pool like the originals (they read files and the index).


@router.get(f"{VIEWER_DICOMWEB}/studies/{{study}}/instances")
def viewer_instances(request: Request, _staff: Clinician, study: str) -> Response:
    """QIDO-RS: the study's instances (with their series' attributes on request)."""
    auth = _authorised(request)
    auth.top_up()
    return dicomweb.search_study_instances(request, auth.console, study)


@router.get(f"{VIEWER_DICOMWEB}/studies/{{study}}/series/{{series}}/metadata")
def viewer_series_metadata(
    request: Request, _staff: Clinician, study: str, series: str
) -> Response:
    """WADO-RS: the headers of a series' instances (a heatmap's carry its probabilities)."""
    return dicomweb.series_metadata(request, _authorised(request), study, series)


@router.get(f"{VIEWER_DICOMWEB}/studies/{{study}}/series/{{series}}/instances/{{sop}}/rendered")
def viewer_rendered(
    request: Request, _staff: Clinician, study: str, series: str, sop: str
) -> Response:
    """WADO-RS: an instance as PNG or JPEG through a window."""
    return dicomweb.instance_rendered(request, _authorised(request), study, series, sop)


@router.get(
    f"{VIEWER_DICOMWEB}/studies/{{study}}/series/{{series}}/instances/{{sop}}"
    "/frames/{frame}/rendered"
)
def viewer_frame_rendered(
    request: Request, _staff: Clinician, study: str, series: str, sop: str, frame: str
) -> Response:
    """WADO-RS: one frame of a multi-frame instance as PNG or JPEG."""
    return dicomweb.frame_rendered(request, _authorised(request), study, series, sop, frame)


@router.get("/static/viewer.js")
async def viewer_script() -> Response:
    return _static("viewer.js", "text/javascript")


@router.get("/static/viewer.css")
async def viewer_stylesheet() -> Response:
    return _static("viewer.css", "text/css")


def _static(name: str, media_type: str) -> Response:
    return Response(
        (HERE / "static" / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": "public, max-age=3600"},
    )
