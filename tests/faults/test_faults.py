"""The fault suite's CI-sized rows: studies stream with storescu into the whole stack (two
workers, the store on a small tmpfs of its own) while one fault fires mid-association; every
acknowledged instance must be stored, on Kafka, scored and in an Observation, none twice.

The whole table (every fault, 40 studies of 38 instances) is ``bench/faults.py``; the counting
is ``devtools.faults``. Each row here gets its own patients, so rows on one stack do not mix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import KAFKA_LIBS
from devtools.faults import FAULTS, Row, build_studies, can_mount, run_row, tmpfs
from devtools.kafka_local import free_port
from devtools.stack import Ports, Stack, StackConfig

pytestmark = [pytest.mark.e2e, pytest.mark.faults, pytest.mark.timeout(600)]

STUDIES = 4
INSTANCES = 8
#: The store's own disk: room for every row's studies and their heatmaps.
STORE_MB = 96
#: The listener refuses below this much free space; the disk-full fault leaves 1 MiB.
MIN_FREE_BYTES = 8 * 2**20
SETTLE_S = 300.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not can_mount():
        pytest.skip("the fault suite mounts a tmpfs as the store: run it as root")
    from training.default_model import ensure_default_model

    models = tmp_path_factory.mktemp("models")
    ensure_default_model(models)
    var = tmp_path_factory.mktemp("faults")
    config = StackConfig(
        var=var,
        ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
        workers=2,
        quiet_period_s=2.0,
        extra_env={
            "SCANWATCH_WORKER_RETRIES": "2",
            "SCANWATCH_WORKER_PARK_S": "3",
            "SCANWATCH_WORKER_BREAKER_RESET_S": "2",
            "SCANWATCH_LISTENER_MIN_FREE_DISK_BYTES": str(MIN_FREE_BYTES),
        },
        models=models,
        kafka_libs=KAFKA_LIBS,
    )
    with tmpfs(var / "store", STORE_MB):
        running = Stack(config)
        try:
            running.start(timeout=300)
            yield running
        finally:
            running.stop()


def run(stack: Stack, tmp_path: Path, fault: str) -> Row:
    studies = build_studies(tmp_path / "studies", f"SW-FAULT-{fault}", STUDIES, INSTANCES)
    row = run_row(stack, FAULTS[fault], studies, settle_timeout_s=SETTLE_S)
    print(row)  # noqa: T201 - the row's counts in the test report
    return row


def assert_whole(row: Row) -> None:
    total = STUDIES * INSTANCES
    assert row.problems == [], row
    assert row.acked == total and row.unacknowledged == 0, row
    assert row.stored == total and row.distinct == total, row
    assert row.scored == STUDIES, row
    assert row.observations == STUDIES, row
    assert row.lost == 0 and row.duplicated == 0, row
    assert row.dead_letters == 0, row
    assert row.recover_s is not None


def test_broker_killed_mid_stream(stack: Stack, tmp_path: Path) -> None:
    row = run(stack, tmp_path, "broker-kill")
    assert_whole(row)
    assert stack.kafka.pid() is not None
    # Instances accepted during the outage waited in the listener's outbox; its watermark held
    # their studies, so none was scored on its first part and amended after (issue 20).
    assert row.partial == 0, row


def test_a_worker_killed_mid_stream(stack: Stack, tmp_path: Path) -> None:
    before = stack.service("inference-worker-1").restarts
    row = run(stack, tmp_path, "worker-1-kill")
    assert_whole(row)
    assert stack.service("inference-worker-1").restarts == before + 1


def test_listener_killed_mid_association(stack: Stack, tmp_path: Path) -> None:
    row = run(stack, tmp_path, "listener-kill")
    assert_whole(row)
    # The association the kill broke was resent: what it had not acknowledged went again.
    assert row.resent > 0, row


def test_store_disk_full(stack: Stack, tmp_path: Path) -> None:
    row = run(stack, tmp_path, "disk-full")
    assert_whole(row)
    # The listener answered failures (Out of Resources) while full; the sender resent them.
    assert row.refused > 0 and row.resent > 0, row
