"""A clinician's review and patient pages (issue 17, point 5): review and sign an AI result from
the study page, and a patient's page (the whole timeline, prescribe, book a follow-up, answer a
callback request the chatbot recorded).

Every resource is built by :mod:`scanwatch.clinical_review` and :mod:`scanwatch.care_plan` and
written to the FHIR API with the signed-in clinician's own token (the API records them as the
author). Every route needs the ``clinician`` role; every write is an AuditEvent; every form
carries the session's CSRF token. What the clinician typed is never lost: a refused or failed
write shows the form again with their text and the reason at the field.

The study page includes ``review_panel.html``, which depends only on ``study`` (the
StudyInstanceUID): the panel loads its content from ``/studies/<study>/review?fragment=1``
(``/static/review.js``, no inline script), and links to the same page without script.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from scanwatch import care_plan, clinical_review, ids
from scanwatch.clinical_review import ReviewError, Signer
from services.auth.web_sessions import check_csrf
from services.console import audit
from services.console.index import is_uid
from services.console.web import Clinician, Staff, Web, WebDep

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
router = APIRouter()

#: DICOM's audit event type for a change to a patient's record (PS3.15 A.5.3).
PATIENT_RECORD = ("110110", "Patient Record")
#: FHIR AuditEvent.action: create, update.
CREATE, UPDATE = "C", "U"
#: A FHIR logical id (R4 ``id``).
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")
#: What the pages say when the FHIR API cannot be reached or answers with a server error.
FHIR_DOWN = (
    "The clinical record (FHIR) did not answer, so nothing was saved. What you typed is kept "
    "below: try again in a moment."
)
CHANGED = (
    "This result changed while you were reviewing it (another signature or a new AI score), so "
    "nothing was signed. Here it is as it is now: check it, then sign again."
)
#: A model's class name as the form carries it.
CLASS_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
#: Longest free text a patient-page form accepts (characters).
MAX_TEXT = 2000


class FhirDown(Exception):
    """The FHIR API could not be reached or answered 5xx."""


@dataclass
class Result:
    """A study's AI result as read from FHIR (with ``meta.versionId``)."""

    observation: dict[str, Any]
    report: dict[str, Any] | None
    patient_id: str | None

    @property
    def signed(self) -> bool:
        return self.observation.get("status") in clinical_review.SIGNED_STATUSES

    @property
    def classes(self) -> list[str]:
        return clinical_review.model_classes(self.observation)

    def view(self, fhir_user: str | None = None) -> dict[str, Any]:
        """What the panel shows of it (plain values: the template escapes them); ``fhir_user``
        (the signed-in clinician) is named "you" when they signed it."""
        obs = self.observation
        quantity = obs.get("valueQuantity") or {}
        ranges = obs.get("referenceRange") or [{}]
        threshold = (ranges[0].get("high") or {}).get("value") if ranges else None
        performer = (obs.get("performer") or [{}])[0]
        report = self.report or {}
        return {
            "status": obs.get("status"),
            "ai_class": clinical_review.ai_class(obs),
            "finding": clinical_review.finding_class(obs),
            "score": quantity.get("value"),
            "threshold": threshold,
            "model": (obs.get("device") or {}).get("display") or "unknown model",
            "signed_by": performer.get("display")
            or (
                f"you ({fhir_user})"
                if fhir_user and performer.get("reference") == fhir_user
                else performer.get("reference")
            ),
            "signed_on": _when(obs.get("issued")),
            "conclusion": report.get("conclusion") if self.signed else None,
            "observation_version": (obs.get("meta") or {}).get("versionId", ""),
            "report_version": (report.get("meta") or {}).get("versionId", ""),
        }


def _when(instant: Any) -> str | None:
    """A FHIR instant as staff read it (UTC, to the minute); as given when it is not one."""
    try:
        moment = datetime.fromisoformat(str(instant).replace("Z", "+00:00"))
    except ValueError:
        return str(instant) if instant else None
    return moment.astimezone(UTC).strftime("%d %b %Y %H:%M UTC")


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/fhir+json"}


async def fhir(web: Web, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    """One FHIR request with the clinician's token; :class:`FhirDown` when it cannot be
    answered (no connection, a timeout, a 5xx)."""
    headers = _headers(token) | kwargs.pop("headers", {})
    if "json" in kwargs:
        headers["Content-Type"] = "application/fhir+json"
    url = f"{web.settings.fhir_base_url}/{path}" if path else web.settings.fhir_base_url
    try:
        answer = await web.http.request(method, url, headers=headers, **kwargs)
    except httpx.HTTPError as exc:
        log.warning("console: FHIR unreachable", extra={"error": type(exc).__name__})
        raise FhirDown() from exc
    if answer.status_code >= 500:
        log.warning("console: FHIR error", extra={"status": answer.status_code})
        raise FhirDown()
    if answer.content and "json" not in answer.headers.get("content-type", ""):
        # Not the FHIR API answering (a proxy's page, a misdirected URL): as if it were down.
        log.warning("console: FHIR answer is not JSON", extra={"status": answer.status_code})
        raise FhirDown()
    return answer


async def _entries(web: Web, token: str, resource_type: str, query: str) -> list[dict[str, Any]]:
    answer = await fhir(web, token, "GET", f"{resource_type}?{query}")
    if answer.status_code != 200:
        return []
    return [e.get("resource", {}) for e in answer.json().get("entry", ())]


def _refers_to(resource: dict[str, Any], keys: tuple[str, ...], reference: str) -> bool:
    return any(r.get("reference") == reference for k in keys for r in resource.get(k) or ())


async def find_result(web: Web, token: str, study: str) -> Result | None:
    """The newest AI result of ``study`` (its ImagingStudy's patient's Observations that
    derive from it) and its DiagnosticReport; None when the study has no result yet."""
    imaging = await fhir(web, token, "GET", f"ImagingStudy/{ids.imaging_study_id(study)}")
    if imaging.status_code != 200:
        return None
    reference = f"ImagingStudy/{imaging.json()['id']}"
    subject = str((imaging.json().get("subject") or {}).get("reference", ""))
    patient_id = subject.partition("/")[2] if subject.startswith("Patient/") else None
    if patient_id is None:
        return None
    query = f"patient={patient_id}&_sort=-_lastUpdated&_count=100"
    observations, reports = await asyncio.gather(
        _entries(web, token, "Observation", query), _entries(web, token, "DiagnosticReport", query)
    )
    found = [
        o
        for o in observations
        if clinical_review.is_ai_result(o) and _refers_to(o, ("derivedFrom", "partOf"), reference)
    ]
    if not found:
        return None
    observation = found[0]
    report = next(
        (r for r in reports if _refers_to(r, ("result",), f"Observation/{observation['id']}")),
        None,
    )
    return Result(observation, report, patient_id)


# --- review and sign ------------------------------------------------------------------------


@dataclass
class ReviewForm:
    """What the clinician typed (kept across a refused or failed signature) and what is said
    about it."""

    finding: str = ""
    conclusion: str = ""
    #: What the form was made from (kept when the result cannot be read again).
    observation_version: str = ""
    report_version: str = ""
    classes: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    message: str | None = None


def _review(
    request: Request,
    web: Web,
    staff: Staff,
    study: str,
    result: Result | None,
    form: ReviewForm,
    *,
    fragment: bool,
    status_code: int = 200,
    unavailable: bool = False,
) -> Response:
    return web.page(
        request,
        "review_fragment.html" if fragment else "review_page.html",
        staff.session,
        status_code,
        title="Review and sign",
        nav="",
        study=study,
        result=result.view(staff.session.fhir_user) if result else None,
        classes=result.classes if result else form.classes,
        patient_id=result.patient_id if result else None,
        form=form,
        fragment=fragment,
        unavailable=unavailable,
    )


@router.get("/studies/{study}/review", response_class=HTMLResponse)
async def review_page(
    request: Request, web: WebDep, staff: Clinician, study: str, fragment: bool = False
) -> Response:
    """The study's AI result and the form to confirm or correct and sign it (``fragment``:
    the panel's content only, for the study page)."""
    if not is_uid(study):
        return web.page(
            request, "message.html", staff.session, 404, title="No such study",
            text="This address does not name a study.",
        )  # fmt: skip
    try:
        result = await find_result(web, staff.token, study)
    except FhirDown:
        form = ReviewForm(message="The clinical record (FHIR) did not answer: try again soon.")
        return _review(
            request, web, staff, study, None, form, fragment=fragment, status_code=503,
            unavailable=True,
        )  # fmt: skip
    form = ReviewForm(finding=(result.view()["ai_class"] or "") if result else "")
    return _review(request, web, staff, study, result, form, fragment=fragment)


@router.post("/studies/{study}/review", response_class=HTMLResponse)
async def sign_review(
    request: Request,
    web: WebDep,
    staff: Clinician,
    study: str,
    csrf_token: Annotated[str | None, Form()] = None,
    finding: Annotated[str, Form()] = "",
    conclusion: Annotated[str, Form()] = "",
    observation_version: Annotated[str, Form()] = "",
    report_version: Annotated[str, Form()] = "",
    back: Annotated[str, Form()] = "",
    classes: Annotated[str, Form()] = "",
) -> Response:
    """Sign the result: ``review_transaction`` with ``ifMatch`` on the versions the clinician
    saw, sent with their own token. Signed: back to the page, which says by whom and when;
    changed meanwhile (412): the result as it is now; refused (422): the reason at the field;
    FHIR down: a message, with what was typed kept."""
    check_csrf(staff.session, csrf_token)
    if not is_uid(study):
        return web.page(
            request, "message.html", staff.session, 404, title="No such study",
            text="This address does not name a study.",
        )  # fmt: skip
    form = ReviewForm(
        finding=finding[:200],
        conclusion=conclusion,
        observation_version=observation_version[:20],
        report_version=report_version[:20],
        classes=[c for c in classes.split(",") if CLASS_NAME.fullmatch(c)][:50],
    )
    try:
        result = await find_result(web, staff.token, study)
    except FhirDown:
        form.message = FHIR_DOWN
        return _review(
            request, web, staff, study, None, form, fragment=False, status_code=503,
            unavailable=True,
        )  # fmt: skip
    if result is None or result.report is None:
        form.message = "This study has no AI result to sign yet."
        return _review(request, web, staff, study, result, form, fragment=False, status_code=404)
    seen = (observation_version, report_version)
    now = (result.view()["observation_version"], result.view()["report_version"])
    if result.signed or seen != now:
        form.message = CHANGED
        return _review(request, web, staff, study, result, form, fragment=False, status_code=409)
    try:
        signer = Signer(staff.session.fhir_user or "")
        bundle = clinical_review.review_transaction(
            result.observation,
            result.report,
            chosen_class=finding,
            conclusion=conclusion,
            signer=signer,
            signed_at=datetime.now(UTC),
            base=web.settings.fhir_base_url,
        )
    except ReviewError as exc:
        form.errors[_review_field(exc.field)] = exc.message
        return _review(request, web, staff, study, result, form, fragment=False, status_code=422)
    try:
        answer = await fhir(web, staff.token, "POST", "", json=bundle)
    except FhirDown:
        form.message = FHIR_DOWN
        return _review(request, web, staff, study, result, form, fragment=False, status_code=503)
    if answer.status_code == 412:
        form.message = CHANGED
        fresh = await find_result(web, staff.token, study)
        return _review(request, web, staff, study, fresh, form, fragment=False, status_code=409)
    if answer.status_code != 200:
        text = _diagnostics(answer)
        form.errors[_review_field(text)] = text
        await _audit(web, staff, UPDATE, f"review refused ({answer.status_code})", audit.REFUSED)
        return _review(
            request, web, staff, study, result, form, fragment=False,
            status_code=422 if answer.status_code == 422 else 400,
        )  # fmt: skip
    status = bundle["entry"][0]["resource"]["status"]
    await _audit(
        web, staff, UPDATE,
        f"review signed: Observation/{result.observation['id']} {status}, "
        f"DiagnosticReport/{result.report['id']} final",
        study=study,
    )  # fmt: skip
    target = f"/studies/{quote(study)}" if back == "study" else f"/studies/{quote(study)}/review"
    return RedirectResponse(f"{target}#review", status_code=303)


def _review_field(text: str) -> str:
    """The form field a FHIR element (or a message naming one) belongs to."""
    return "conclusion" if "conclusion" in text else "finding"


def _diagnostics(answer: httpx.Response) -> str:
    try:
        issues = answer.json().get("issue") or [{}]
        text = str(issues[0].get("diagnostics") or "")
    except ValueError:
        text = ""
    return text[:500] or f"The clinical record refused it (HTTP {answer.status_code})."


async def _audit(
    web: Web,
    staff: Staff,
    action: str,
    detail: str,
    outcome: str = audit.SUCCESS,
    study: str | None = None,
) -> None:
    await web.record(
        audit.audit_event(
            staff.actor, PATIENT_RECORD, action, outcome, study=study, detail=detail[:200]
        )
    )


@router.get("/static/review.js")
async def review_script() -> Response:
    return Response(
        (HERE / "static" / "review.js").read_bytes(),
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=3600"},
    )


# --- the patient's page -----------------------------------------------------------------------


@dataclass
class PatientForms:
    """What was typed into the patient page's forms, and what is said about it, by form."""

    values: dict[str, str] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    message: str | None = None


async def _timeline(web: Web, token: str, patient_id: str) -> dict[str, list[dict[str, Any]]]:
    queries = clinical_review.timeline_queries(patient_id)
    found = await asyncio.gather(*(_entries(web, token, t, q) for t, q in queries))
    return {t: entries for (t, _), entries in zip(queries, found, strict=True)}


async def _patient_page(
    request: Request,
    web: Web,
    staff: Staff,
    patient_id: str,
    forms: PatientForms,
    status_code: int = 200,
) -> Response:
    try:
        patient_answer = await fhir(web, staff.token, "GET", f"Patient/{patient_id}")
        timeline = await _timeline(web, staff.token, patient_id)
    except FhirDown:
        forms.message = forms.message or FHIR_DOWN
        return web.page(
            request, "patient.html", staff.session, 503, title="Patient", nav="",
            patient_id=patient_id, patient=None, timeline=None, forms=forms,
            reports={}, callback_code=care_plan.CALLBACK_CODE, now=_today(),
        )  # fmt: skip
    if patient_answer.status_code != 200:
        return web.page(
            request, "message.html", staff.session, 404, title="No such patient",
            text="The clinical record has no patient with this id.",
        )  # fmt: skip
    reports = {
        str(o.get("reference", "")).partition("/")[2]: r
        for r in timeline["DiagnosticReport"]
        for o in r.get("result") or ()
    }
    return web.page(
        request, "patient.html", staff.session, status_code, title="Patient", nav="",
        patient_id=patient_id, patient=_patient_view(patient_answer.json()), timeline=timeline,
        reports=reports, forms=forms, callback_code=care_plan.CALLBACK_CODE, now=_today(),
    )  # fmt: skip


def _today() -> str:
    return datetime.now().astimezone().date().isoformat()


def _patient_view(patient: dict[str, Any]) -> dict[str, Any]:
    name = (patient.get("name") or [{}])[0]
    text = name.get("text") or " ".join([*name.get("given", ()), name.get("family", "")]).strip()
    identifiers = [i.get("value") for i in patient.get("identifier") or () if i.get("value")]
    return {
        "name": text or "(no name)",
        "birthDate": patient.get("birthDate"),
        "identifiers": identifiers,
    }


def _check_patient(patient_id: str) -> bool:
    return FHIR_ID.fullmatch(patient_id) is not None


def _not_found(request: Request, web: Web, staff: Staff) -> Response:
    return web.page(
        request, "message.html", staff.session, 404, title="No such patient",
        text="This address does not name a patient.",
    )  # fmt: skip


@router.get("/patients/{patient_id}", response_class=HTMLResponse)
async def patient_page(
    request: Request, web: WebDep, staff: Clinician, patient_id: str
) -> Response:
    """The patient's whole timeline, and the forms to prescribe, book and answer."""
    if not _check_patient(patient_id):
        return _not_found(request, web, staff)
    await web.record(
        audit.audit_event(
            staff.actor, audit.QUERY, audit.EXECUTE, query=["patient", "timeline"],
            detail=f"Patient/{patient_id}",
        )
    )  # fmt: skip
    done = request.query_params.get("done")
    forms = PatientForms(message=DONE.get(done or ""))
    return await _patient_page(request, web, staff, patient_id, forms)


#: What the page says after a write, by ``?done=``.
DONE = {
    "medication": "The prescription was saved.",
    "appointment": "The follow-up was booked.",
    "callback": "The callback request was updated.",
}


async def _written(
    request: Request,
    web: Web,
    staff: Staff,
    patient_id: str,
    forms: PatientForms,
    kind: str,
    answer: httpx.Response,
    what: str,
    key: str | None = None,
) -> Response:
    """After a write: back to the page (303) when it was saved, else the page again with the
    API's reason (and the typed values)."""
    if answer.status_code in (200, 201):
        await _audit(web, staff, CREATE if answer.status_code == 201 else UPDATE, what)
        return RedirectResponse(f"/patients/{quote(patient_id)}?done={kind}#{kind}s", 303)
    await _audit(web, staff, UPDATE, f"{what} refused ({answer.status_code})", audit.REFUSED)
    forms.errors[key or kind] = (
        "It changed meanwhile: here it is as it is now; try again."
        if answer.status_code == 412
        else _diagnostics(answer)
    )
    return await _patient_page(request, web, staff, patient_id, forms, 409)


def _text(value: str) -> str:
    return value.strip()[:MAX_TEXT]


@router.post("/patients/{patient_id}/medications", response_class=HTMLResponse)
async def prescribe(
    request: Request,
    web: WebDep,
    staff: Clinician,
    patient_id: str,
    csrf_token: Annotated[str | None, Form()] = None,
    medication: Annotated[str, Form()] = "",
    dosage: Annotated[str, Form()] = "",
) -> Response:
    """Prescribe: a MedicationRequest (active order) in the clinician's name."""
    check_csrf(staff.session, csrf_token)
    if not _check_patient(patient_id):
        return _not_found(request, web, staff)
    forms = PatientForms(values={"medication": medication, "dosage": dosage})
    if not _text(medication):
        forms.errors["medication"] = "Medication: say what to prescribe."
    if not _text(dosage):
        forms.errors["dosage"] = "Dosage: say how much and how often."
    if forms.errors:
        return await _patient_page(request, web, staff, patient_id, forms, 422)
    resource = care_plan.medication_request(
        patient_id, medication=_text(medication), dosage=_text(dosage),
        authored_on=datetime.now(UTC), requester={"reference": staff.session.fhir_user or ""},
    )  # fmt: skip
    try:
        answer = await fhir(web, staff.token, "POST", "MedicationRequest", json=resource)
    except FhirDown:
        forms.message = FHIR_DOWN
        return await _patient_page(request, web, staff, patient_id, forms, 503)
    return await _written(
        request, web, staff, patient_id, forms, "medication", answer,
        f"MedicationRequest for Patient/{patient_id}",
    )  # fmt: skip


@router.post("/patients/{patient_id}/appointments", response_class=HTMLResponse)
async def book(
    request: Request,
    web: WebDep,
    staff: Clinician,
    patient_id: str,
    csrf_token: Annotated[str | None, Form()] = None,
    day: Annotated[str, Form()] = "",
    start: Annotated[str, Form()] = "",
    minutes: Annotated[str, Form()] = "30",
    description: Annotated[str, Form()] = "",
) -> Response:
    """Book a follow-up: an Appointment with the patient and the clinician (the hospital's
    local time)."""
    check_csrf(staff.session, csrf_token)
    if not _check_patient(patient_id):
        return _not_found(request, web, staff)
    forms = PatientForms(
        values={"day": day, "start": start, "minutes": minutes, "description": description}
    )
    when: datetime | None = None
    try:
        local = datetime.fromisoformat(f"{day.strip()}T{start.strip() or '00:00'}")
        when = local.astimezone()  # naive = this server's (the hospital's) zone
    except ValueError:
        forms.errors["day"] = "Date: give a date (and time) like 2027-01-31 and 09:30."
    if when is not None and when <= datetime.now(UTC):
        forms.errors["day"] = "Date: the follow-up must be in the future."
    length = int(minutes) if minutes.strip().isdigit() else 0
    if not 5 <= length <= 480:
        forms.errors["minutes"] = "Length: between 5 and 480 minutes."
    if not _text(description):
        forms.errors["description"] = "Reason: say what the visit is for."
    if forms.errors or when is None:
        return await _patient_page(request, web, staff, patient_id, forms, 422)
    resource = care_plan.appointment(
        patient_id, start=when, minutes=length, description=_text(description),
        with_whom={"reference": staff.session.fhir_user or ""},
    )  # fmt: skip
    try:
        answer = await fhir(web, staff.token, "POST", "Appointment", json=resource)
    except FhirDown:
        forms.message = FHIR_DOWN
        return await _patient_page(request, web, staff, patient_id, forms, 503)
    return await _written(
        request, web, staff, patient_id, forms, "appointment", answer,
        f"Appointment for Patient/{patient_id}",
    )  # fmt: skip


@router.post("/patients/{patient_id}/callbacks/{request_id}", response_class=HTMLResponse)
async def answer_callback(
    request: Request,
    web: WebDep,
    staff: Clinician,
    patient_id: str,
    request_id: str,
    csrf_token: Annotated[str | None, Form()] = None,
    note: Annotated[str, Form()] = "",
    status: Annotated[str, Form()] = "completed",
    version: Annotated[str, Form()] = "",
) -> Response:
    """Work on a callback request: the clinician's note, and done (``completed``) or kept
    open (``active``); updated only if it is still the version the clinician saw."""
    check_csrf(staff.session, csrf_token)
    if not _check_patient(patient_id) or not FHIR_ID.fullmatch(request_id):
        return _not_found(request, web, staff)
    kind = f"callback-{request_id}"
    forms = PatientForms(values={f"{kind}-note": note})
    try:
        read = await fhir(web, staff.token, "GET", f"CommunicationRequest/{request_id}")
        if read.status_code != 200:
            forms.errors[kind] = "This callback request is no longer there."
            return await _patient_page(request, web, staff, patient_id, forms, 404)
        current = read.json()
        subject = (current.get("subject") or {}).get("reference")
        if subject != f"Patient/{patient_id}":
            return _not_found(request, web, staff)
        if version and (current.get("meta") or {}).get("versionId") != version:
            forms.errors[kind] = "It changed meanwhile: here it is as it is now; try again."
            return await _patient_page(request, web, staff, patient_id, forms, 409)
        try:
            answered = clinical_review.answer_callback(
                current, status=status, note=_text(note),
                signer=Signer(staff.session.fhir_user or ""), answered_at=datetime.now(UTC),
            )  # fmt: skip
        except ReviewError as exc:
            label = "Note" if exc.field.endswith("note") else "Status"
            forms.errors[kind] = f"{label}: {exc.message}."
            return await _patient_page(request, web, staff, patient_id, forms, 422)
        answer = await fhir(
            web, staff.token, "PUT", f"CommunicationRequest/{request_id}", json=answered,
            headers={"If-Match": read.headers.get("ETag", "")},
        )  # fmt: skip
    except FhirDown:
        forms.message = FHIR_DOWN
        return await _patient_page(request, web, staff, patient_id, forms, 503)
    return await _written(
        request, web, staff, patient_id, forms, "callback", answer,
        f"CommunicationRequest/{request_id} {status}", kind,
    )  # fmt: skip
