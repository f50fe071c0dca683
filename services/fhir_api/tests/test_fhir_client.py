"""The API as an EHR uses it: SMART on FHIR's Python client (``fhirclient``) over real HTTP
against uvicorn, on both backends. The EHR gets a token with client credentials, reads the
CapabilityStatement, searches one patient's Observations newest first, follows the ``next``
links to the end and reads one result back."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest
from fhirclient import client as fhir_client
from fhirclient.models.device import Device
from fhirclient.models.fhirsearch import FHIRSearch
from fhirclient.models.observation import Observation
from sqlalchemy.engine import Engine

from devtools.testing import served
from inference_worker.fhir_resources import ScoredSeries, ScoredStudy, resources_for
from services.auth import clients as auth
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

pytestmark = pytest.mark.integration

STARTUP_DEADLINE_S = 20.0
STUDIES_OF_PATIENT = 7
PAGE = 3


@pytest.fixture
def live_api(settings: Settings) -> Iterator[tuple[str, Engine]]:
    """(base URL, store engine) of the app served by uvicorn on a free loopback port."""
    app = create_app(settings)
    with served(app, 0, STARTUP_DEADLINE_S) as port:
        yield f"http://127.0.0.1:{port}", app.state.store.engine


def _study(uid: str, patient: str, day: int) -> ScoredStudy:
    return ScoredStudy(
        PatientID=patient,
        IssuerOfPatientID="HOSP",
        StudyInstanceUID=uid,
        series=ScoredSeries(f"{uid}.1", "MR", 10),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=10,
        model_name="brain-mri-anomaly",
        model_version=2,
        class_names=("glioma", "normal"),
        probabilities=(0.7, 0.3),
        threshold=0.5,
        issued=datetime(2025, 3, day, 12, tzinfo=UTC),
        acquired=datetime(2025, 3, day, 8, 30),
    )


def _token(base: str, engine: Engine) -> str:
    """Client credentials, as the README tells an EHR integrator."""
    secret = auth.register_client(engine, "ehr-test", "system/*.read")
    answer = httpx.post(
        f"{base}/auth/token",
        auth=("ehr-test", secret),
        data={"grant_type": "client_credentials", "scope": "system/*.read"},
    )
    assert answer.status_code == 200, answer.text
    return answer.json()["access_token"]


def test_ehr_searches_pages_and_reads_with_fhirclient(live_api: tuple[str, Engine], issue) -> None:
    base, engine = live_api
    writer = {"Authorization": f"Bearer {issue('system/*.read system/*.write')}"}
    studies = [_study(f"1.2.3.{day}", "PID-7", day) for day in range(1, STUDIES_OF_PATIENT + 1)]
    studies.append(_study("1.2.9.1", "PID-other", 9))
    with httpx.Client(base_url=base, headers=writer) as pipeline:
        for study in studies:
            for resource in resources_for(study):
                answer = pipeline.put(
                    f"/fhir/{resource['resourceType']}/{resource['id']}", json=resource
                )
                assert answer.status_code in (200, 201), answer.text
    mine = [r for s in studies[:-1] for r in resources_for(s) if r["resourceType"] == "Observation"]
    patient_id = mine[0]["subject"]["reference"].split("/")[1]

    smart = fhir_client.FHIRClient(settings={"app_id": "ehr-test", "api_base": f"{base}/fhir/"})
    smart.server.session.headers["Authorization"] = f"Bearer {_token(base, engine)}"
    # fhirclient parses the CapabilityStatement with its own R4 models (strict).
    capability = smart.server.get_capability() or smart.server.capabilityStatement
    assert capability.fhirVersion == "4.0.1"
    assert "Observation" in [r.type for r in capability.rest[0].resource]

    search = Observation.where(
        struct={"patient": patient_id, "_sort": "-date", "_count": str(PAGE)}
    )
    pages = list(search.perform_iter(smart.server))
    assert len(pages) == -(-STUDIES_OF_PATIENT // PAGE)  # every next link followed
    found = [entry.resource for page in pages for entry in page.entry or []]
    assert all(isinstance(r, Observation) for r in found)
    assert [r.id for r in found] == [
        r["id"] for r in sorted(mine, key=lambda r: r["effectiveDateTime"], reverse=True)
    ]
    assert {r.subject.reference for r in found} == {f"Patient/{patient_id}"}
    assert [r.effectiveDateTime.datetime for r in found] == sorted(
        (r.effectiveDateTime.datetime for r in found), reverse=True
    )

    newest = Observation.read(found[0].id, smart.server)
    assert newest.valueQuantity.value == pytest.approx(0.7)
    assert newest.meta.versionId == "1"
    device = Device.read(newest.device.reference.split("/")[1], smart.server)
    assert device.version[0].value == "2"

    # _include through the library's own construct: the Device comes back in the Bundle.
    included = FHIRSearch(
        Observation, {"patient": patient_id, "_count": "1", "_include": "Observation:device"}
    ).perform_iter(smart.server)
    first = next(included)
    modes = sorted(entry.search.mode for entry in first.entry)
    assert modes == ["include", "match"]


def test_fhirclient_without_token_is_refused(live_api: tuple[str, Engine]) -> None:
    base, _ = live_api
    smart = fhir_client.FHIRClient(settings={"app_id": "ehr-test", "api_base": f"{base}/fhir/"})
    with pytest.raises(Exception) as raised:  # fhirclient raises its own or requests' errors
        Observation.where(struct={"patient": "x"}).perform_iter(smart.server)
    assert "401" in str(raised.value) or type(raised.value).__name__ == "FHIRUnauthorizedException"
