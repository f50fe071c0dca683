"""The worker's FHIR writer against the real FHIR API with tokens required."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime

import httpx
import pytest

from devtools.kafka_local import free_port
from devtools.testing import served
from inference_worker.adapters.fhir_writer import FhirWriter, token_url_for
from inference_worker.fhir_resources import (
    ScoredSeries,
    ScoredStudy,
    all_resources_for,
    registered_resources_for,
    resources_for,
)
from services.fhir_api.app import create_app
from services.fhir_api.config import Settings

pytestmark = pytest.mark.integration

CLIENT, SECRET = "scanwatch-worker", "worker-secret-for-tests"


@pytest.fixture(scope="module")
def api(tmp_path_factory, signing_keys) -> Iterator[str]:
    port = free_port()
    settings = Settings(
        database_url=f"sqlite:///{tmp_path_factory.mktemp('fhir') / 'fhir.db'}",
        port=port,
        auth_mode="required",
        signing_keys_file=signing_keys,
        bootstrap_clients=f"{CLIENT}:{SECRET}:system/*.write system/*.read",
    )
    with served(create_app(settings), port):
        yield f"http://127.0.0.1:{port}/fhir"


def study() -> ScoredStudy:
    return ScoredStudy(
        PatientID="P-AUTH",
        StudyInstanceUID="1.2.826.0.1.3680043.8.498.55",
        series=ScoredSeries("1.2.826.0.1.3680043.8.498.55.1", "MR", 8),
        NumberOfStudyRelatedSeries=1,
        NumberOfStudyRelatedInstances=8,
        model_name="m",
        model_version=1,
        class_names=("normal", "mass"),
        probabilities=(0.3, 0.7),
        threshold=0.5,
        issued=datetime(2026, 1, 1, tzinfo=UTC),
    )


def test_token_url_is_beside_the_fhir_base():
    assert token_url_for("https://h/fhir/") == "https://h/auth/token"


def test_writer_gets_a_token_and_writes(api):
    resources = resources_for(study())
    writer = FhirWriter(api, client_id=CLIENT, client_secret=SECRET)

    async def run():
        try:
            await writer.put_all(resources)
            await writer.put_all(resources)  # idempotent, and the cached token is reused
        finally:
            await writer.close()

    asyncio.run(run())
    observation = resources[-1]
    # Without a token the API refuses; with the writer's token the Observation is there.
    url = f"{api}/Observation/{observation['id']}"
    assert httpx.get(url).status_code == 401
    token = httpx.post(
        token_url_for(api), data={"grant_type": "client_credentials"}, auth=(CLIENT, SECRET)
    ).json()["access_token"]
    stored = httpx.get(url, headers={"Authorization": f"Bearer {token}"})
    assert stored.status_code == 200
    assert stored.json()["meta"]["versionId"] == "1"  # the second write changed nothing


def test_the_same_result_scored_again_is_not_a_new_version(api):
    """A study announced again (a worker killed, a rebalance) is scored again with a new ready
    event, so a new ``issued``: the Observation keeps its version and its first ``issued``; a
    result that differs is written (issue 19's fault suite)."""
    first = study()
    again = ScoredStudy(**(vars(first) | {"issued": datetime(2026, 1, 1, 1, tzinfo=UTC)}))
    changed = ScoredStudy(**(vars(again) | {"probabilities": (0.6, 0.4)}))
    writer = FhirWriter(api, client_id=CLIENT, client_secret=SECRET)
    token = httpx.post(
        token_url_for(api), data={"grant_type": "client_credentials"}, auth=(CLIENT, SECRET)
    ).json()["access_token"]

    def stored() -> dict:
        [resource] = [r for r in resources_for(first) if r["resourceType"] == "Observation"]
        url = f"{api}/Observation/{resource['id']}"
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()

    async def write(scored: ScoredStudy) -> None:
        try:
            await writer.put_all(resources_for(scored))
        finally:
            await writer.close()

    asyncio.run(write(first))
    before = stored()
    asyncio.run(write(again))
    after = stored()
    assert after["meta"]["versionId"] == before["meta"]["versionId"]
    assert after["issued"] == before["issued"]
    asyncio.run(write(changed))
    amended = stored()
    assert int(amended["meta"]["versionId"]) == int(before["meta"]["versionId"]) + 1
    assert amended["issued"] != before["issued"]


def test_put_missing_writes_a_registered_study_once_and_never_over_a_scored_one(api):
    writer = FhirWriter(api, client_id=CLIENT, client_secret=SECRET)
    scored = study()
    received = ScoredStudy(**(vars(scored) | {"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.56"}))
    token = httpx.post(
        token_url_for(api), data={"grant_type": "client_credentials"}, auth=(CLIENT, SECRET)
    ).json()["access_token"]

    def stored(resource):
        url = f"{api}/ImagingStudy/{resource['id']}"
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).json()

    async def run():
        try:
            await writer.put_all(resources_for(scored))  # this one is scored already
            await writer.put_missing(registered_resources_for(scored))
            await writer.put_missing(registered_resources_for(received))  # this one is new
            await writer.put_missing(registered_resources_for(received))
        finally:
            await writer.close()

    asyncio.run(run())
    done = stored(registered_resources_for(scored)[1])
    assert (done["status"], done["meta"]["versionId"]) == ("available", "1")
    waiting = stored(registered_resources_for(received)[1])
    assert (waiting["status"], waiting["meta"]["versionId"]) == ("registered", "1")


def test_wrong_secret_is_refused(api):
    writer = FhirWriter(api, client_id=CLIENT, client_secret="wrong")

    async def run():
        try:
            await writer.put(resources_for(study())[0])
        finally:
            await writer.close()

    with pytest.raises(httpx.HTTPStatusError) as caught:
        asyncio.run(run())
    assert caught.value.response.status_code == 401


def test_without_credentials_writes_are_refused(api):
    writer = FhirWriter(api)

    async def run():
        try:
            await writer.put(resources_for(study())[0])
        finally:
            await writer.close()

    with pytest.raises(httpx.HTTPStatusError) as caught:
        asyncio.run(run())
    assert caught.value.response.status_code == 401


class Counting(httpx.AsyncBaseTransport):
    """The writer's HTTP transport, counting its requests (``METHOD path``) and answers."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.requests: list[str] = []
        self.statuses: list[int] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        response = await self.inner.handle_async_request(request)
        self.statuses.append(response.status_code)
        return response

    def take(self) -> list[str]:
        """The requests since the last call, the token request left out."""
        taken = [r for r in self.requests if not r.endswith("/auth/token")]
        self.requests.clear()
        self.statuses.clear()
        return taken

    async def aclose(self) -> None:
        await self.inner.aclose()


def test_a_scored_study_is_one_request(api):
    """Issue 20, point 4: a new study's registered record, its scored resources, their rewrite
    (the heatmaps' write, a changed result) and the same result issued again are one
    transaction request each; the old writer made 4, 8, 8 and 6 (a GET before each signed type
    and before each registered resource, one PUT per resource written)."""
    base = "1.2.826.0.1.3680043.8.498.57"
    first = ScoredStudy(**(vars(study()) | {"StudyInstanceUID": base, "PatientID": "P-COUNT"}))
    changed = ScoredStudy(**(vars(first) | {"probabilities": (0.6, 0.4)}))
    again = ScoredStudy(**(vars(changed) | {"issued": datetime(2026, 1, 2, tzinfo=UTC)}))
    counting = Counting()
    writer = FhirWriter(api, client_id=CLIENT, client_secret=SECRET, transport=counting)
    steps: list[list[str]] = []

    async def run():
        try:
            await writer.put_missing(registered_resources_for(first))
            steps.append(counting.take())
            for scored in (first, changed, again):
                await writer.put_all(all_resources_for(scored))
                steps.append(counting.take())
        finally:
            await writer.close()

    asyncio.run(run())
    assert steps == [["POST /fhir"]] * 4
    observation = all_resources_for(first)[3]
    assert observation["resourceType"] == "Observation"
    token = httpx.post(
        token_url_for(api), data={"grant_type": "client_credentials"}, auth=(CLIENT, SECRET)
    ).json()["access_token"]
    stored = httpx.get(
        f"{api}/Observation/{observation['id']}", headers={"Authorization": f"Bearer {token}"}
    ).json()
    # The changed result made version 2; the same result issued again made none.
    assert stored["meta"]["versionId"] == "2"
    assert stored["issued"] == all_resources_for(changed)[3]["issued"]


def test_a_redelivered_study_is_read_only_when_the_writer_does_not_know_it(api):
    """A writer that never wrote the study (a redelivery after a restart) learns from a 412
    that it exists, reads the signed types at once and writes on the versions read."""
    base = "1.2.826.0.1.3680043.8.498.58"
    first = ScoredStudy(**(vars(study()) | {"StudyInstanceUID": base, "PatientID": "P-REDO"}))
    again = ScoredStudy(**(vars(first) | {"issued": datetime(2026, 1, 3, tzinfo=UTC)}))
    counting = Counting()

    async def deliver(scored: ScoredStudy, transport: httpx.AsyncBaseTransport | None) -> None:
        writer = FhirWriter(api, client_id=CLIENT, client_secret=SECRET, transport=transport)
        try:
            await writer.put_all(all_resources_for(scored))
        finally:
            await writer.close()

    asyncio.run(deliver(first, None))
    asyncio.run(deliver(again, counting))
    requests, statuses = counting.requests, counting.statuses
    paired = [(r, s) for r, s in zip(requests, statuses, strict=True) if "/auth/" not in r]
    assert paired[0] == ("POST /fhir", 412)
    assert sorted(r for r, _s in paired[1:3]) == sorted(
        f"GET /fhir/{r['resourceType']}/{r['id']}"
        for r in all_resources_for(again)
        if r["resourceType"] in ("Observation", "DiagnosticReport")
    )
    assert paired[3:] == [("POST /fhir", 200)]
