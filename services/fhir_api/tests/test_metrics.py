"""``/metrics`` (services/fhir_api/metrics.py): requests counted and timed by route template
and status, never by the ids in a path."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from services.fhir_api.tests.test_search import scored, write


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def test_requests_are_counted_and_timed_by_route_template_and_status(client: TestClient) -> None:
    observation = write(client, scored("12.1", "METRICS"))
    oid = observation["id"]
    for _ in range(3):
        assert client.get(f"/fhir/Observation/{oid}").status_code == 200
    assert client.get("/fhir/Observation/not-there").status_code == 404
    assert client.get("/nowhere").status_code == 404
    samples = _samples(client)
    route = "/fhir/{resource_type}/{resource_id}"
    read = (("method", "GET"), ("route", route))
    assert samples[("fhir_api_requests_total", (*read, ("status", "200")))] == 3
    assert samples[("fhir_api_requests_total", (*read, ("status", "404")))] == 1
    assert samples[("fhir_api_request_seconds_count", read)] == 4
    assert samples[("fhir_api_request_seconds_sum", read)] > 0
    unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
    assert samples[("fhir_api_requests_total", unmatched)] == 1
    assert not [key for key in samples if oid in str(key)], "an id leaked into a label"
    put = (("method", "PUT"), ("route", route), ("status", "201"))
    assert samples[("fhir_api_requests_total", put)] == 4  # Patient, Device, ImagingStudy, Obs.
