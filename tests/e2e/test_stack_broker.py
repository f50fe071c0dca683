"""The development stack supervises its Kafka broker like every other service: a broker killed
with SIGKILL is started again, and what the listener acknowledged while it was down (kept in
its outbox) reaches Kafka once it is back, nothing lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from devtools.kafka_local import free_port, read_topic
from devtools.peers import storescu
from devtools.stack import Ports, Stack, StackConfig
from devtools.testing import wait_for
from scanwatch.sample import build_mr_study
from schemas.events import InstanceReceivedV1

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    config = StackConfig(
        var=tmp_path / "var",
        ports=Ports(**{name: free_port() for name in Ports.__dataclass_fields__}),
        kafka_libs=ROOT / "var" / "kafka" / "libs",
        only=("dicom-listener",),
    )
    running = Stack(config)
    running.start(timeout=180)
    try:
        yield running
    finally:
        running.stop()


def test_a_killed_broker_is_restarted_and_nothing_acknowledged_is_lost(
    stack: Stack, tmp_path: Path
) -> None:
    first = stack.kafka.pid()
    stack.kill("kafka")
    # While the broker is down the listener still acknowledges: the events wait in its outbox.
    files = build_mr_study(tmp_path / "study", patient_id="SW-BROKER-1", n_slices=6)
    storescu(files, "127.0.0.1", stack.config.ports.dicom, called_ae=stack.config.ae_title)
    restarted = wait_for(lambda: stack.kafka.pid(), 120, "the broker started again")
    assert restarted != first

    sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}

    def ours(records: list) -> set[str]:
        events = (InstanceReceivedV1.from_bytes(r.value) for r in records)
        return {e.SOPInstanceUID for e in events} & sops

    records = read_topic(
        stack.kafka.bootstrap_servers,
        InstanceReceivedV1.SCHEMA,
        lambda rs: ours(rs) == sops,
        timeout=120,
        settle_s=2,
    )
    assert ours(records) == sops
    uids = [InstanceReceivedV1.from_bytes(r.value).SOPInstanceUID for r in records]
    assert sorted(u for u in uids if u in sops) == sorted(sops)  # each once
