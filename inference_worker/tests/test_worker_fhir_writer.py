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
