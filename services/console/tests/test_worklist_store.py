"""The worklist's cache of AI results under concurrent page views: on SQLite, two requests
keeping results at once both succeed (their write transactions begin IMMEDIATE and wait for
each other instead of failing "database is locked", which the full path's browser test met
when a page reload and the page's own panel refreshed the cache together)."""

from __future__ import annotations

import threading
from pathlib import Path

from scanwatch.database import make_engine
from services.console.worklist import Worklist


def observation(n: int, issued: str) -> dict:
    return {
        "resourceType": "Observation",
        "id": f"obs-{n}",
        "status": "preliminary",
        "derivedFrom": [{"reference": f"ImagingStudy/img-{n % 5}"}],
        "valueQuantity": {"value": 0.5},
        "interpretation": [{"coding": [{"code": "A"}]}],
        "device": {"display": "m v1"},
        "issued": issued,
    }


def test_concurrent_result_updates_do_not_fail(tmp_path: Path) -> None:
    worklist = Worklist(make_engine(f"sqlite:///{tmp_path / 'index.db'}"))
    worklist.store_results([observation(n, "2026-01-01T00:00:00Z") for n in range(5)], None)
    failures: list[BaseException] = []

    def keep(thread: int) -> None:
        try:
            for round_ in range(40):
                issued = f"2026-01-01T00:{thread:02d}:{round_:02d}Z"
                entries = [observation(n, issued) for n in range(5)]
                worklist.store_results(entries, issued)
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=keep, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert worklist.watermark() is not None
