"""Generated and mutated requests from an OpenAPI document, through one HTTP app: the
schemathesis run each service's API tests share (the FHIR API, the authorization server,
DICOMweb, the portal's and the console's pages)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode


def generated_answers(
    schema: schemathesis.BaseSchema,
    examples: int,
    call: Callable[[schemathesis.Case], schemathesis.Response | None],
    *,
    checks: Iterable[schemathesis.CheckFunction] = (),
    allowed_5xx: frozenset[int] = frozenset(),
) -> list[int]:
    """Send ``examples`` cases of ``schema``, valid and mutated alike (derandomized, no example
    database: the same cases every run), each through ``call`` (``None``: a case it skips).
    Every answer must be below 500 (or in ``allowed_5xx``) and pass ``checks``
    (schemathesis' response checks); returns the status codes answered."""
    cases = st.one_of(
        schema.as_strategy(),
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
    )
    answered: list[int] = []
    response_checks = list(checks)

    @given(case=cases)
    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def each(case: schemathesis.Case) -> None:
        response = call(case)
        if response is None:
            return
        answered.append(response.status_code)
        assert response.status_code < 500 or response.status_code in allowed_5xx, (
            f"{case.method} {case.formatted_path} {case.query} {case.body!r:.200}: "
            f"{response.status_code} {response.text[:300]}"
        )
        if response_checks:
            case.validate_response(response, checks=response_checks)

    each()
    return answered
