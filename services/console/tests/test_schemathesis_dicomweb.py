"""schemathesis against the console's OpenAPI document (``/openapi.json``: DICOMweb, QIDO-RS
and WADO-RS): generated and mutated requests with a staff token never get a 5xx and every
answer has a documented status, content type and body shape; without a token, or with a
patient's, every operation is refused (401, 403). The store holds one small MR study."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file
from schemathesis.python.asgi import shutdown_lifespans
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from devtools.api_cases import generated_answers
from dicom_listener.adapters.filestore import FileStore
from services.auth.scopes import Scope
from services.auth.tokens import TokenService, load_key_set
from services.console.app import create_app
from services.console.config import Settings
from services.console.openapi import OPENAPI_PATH
from services.console.tests.helpers import put, relabelled

pytestmark = pytest.mark.integration

#: Generated requests, spread over the 15 documented operations.
EXAMPLES = 200
STUDY = "1.2.826.0.1.3680043.8.498.4242"


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, signing_keys: Path
) -> Iterator[tuple[FastAPI, TokenService]]:
    tmp = tmp_path_factory.mktemp("schemathesis-dicomweb")
    store = FileStore(tmp / "store")
    mr = Path(get_testdata_file("MR_small.dcm"))
    for i in range(2):
        put(
            store,
            relabelled(
                mr,
                tmp / f"{i}.dcm",
                StudyInstanceUID=STUDY,
                SeriesInstanceUID=f"{STUDY}.1",
                SOPInstanceUID=f"{STUDY}.1.{i + 1}",
            ),
        )
    settings = Settings(
        storage_dir=store.root,
        index_url=f"sqlite:///{tmp / 'index.db'}",
        jwks_file=signing_keys,
        scan_interval_s=3600,
    )
    yield create_app(settings), TokenService(load_key_set(signing_keys))
    shutdown_lifespans()


def test_the_document_lists_every_dicomweb_route(
    served: tuple[FastAPI, TokenService],
) -> None:
    app, _ = served
    with TestClient(app) as client:
        document = client.get(OPENAPI_PATH).json()
    assert len(document["paths"]) == 15
    search = document["paths"]["/dicomweb/studies"]["get"]["parameters"]
    assert {"PatientName", "StudyDate", "ModalitiesInStudy", "limit", "includefield"} <= {
        p["name"] for p in search
    }
    assert not [p for p in document["paths"] if not p.startswith("/dicomweb/")]


def test_no_server_errors_and_answers_as_documented(
    served: tuple[FastAPI, TokenService],
) -> None:
    app, tokens = served
    token = tokens.issue("viewer", [Scope.parse("system/ImagingStudy.read")])[0]
    schema = schemathesis.openapi.from_asgi(OPENAPI_PATH, app)
    answered = generated_answers(
        schema,
        EXAMPLES,
        lambda case: case.call(headers={"Authorization": f"Bearer {token}"}),
        checks=[status_code_conformance, content_type_conformance, response_schema_conformance],
    )
    assert any(code < 300 for code in answered) and any(400 <= code < 500 for code in answered)


def test_every_operation_needs_a_staff_token(served: tuple[FastAPI, TokenService]) -> None:
    app, tokens = served
    patient = tokens.issue("portal", [Scope.parse("patient/*.read")], "some-patient")[0]
    sop = f"{STUDY}.1.1"
    values = {"study": STUDY, "series": f"{STUDY}.1", "sop": sop, "frames": "1", "frame": "1"}
    with TestClient(app) as client:
        document = client.get(OPENAPI_PATH).json()
        for path in document["paths"]:
            url = path.format(**values)
            assert client.get(url).status_code == 401, url
            refused = client.get(url, headers={"Authorization": f"Bearer {patient}"})
            assert refused.status_code == 403, url
