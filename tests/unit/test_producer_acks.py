"""Every producer in scanwatch waits for ``acks=all``: with production's topics
(``min.insync.replicas`` 2) an event is acknowledged only once two brokers hold it, so a broker
killed right after cannot take an acknowledged event with it.

The producers: the listener's outbox relay, the training service's events and the console's
(both :class:`scanwatch.kafka.EventProducer`), and the inference worker's Faust producer. Each
is built here with librdkafka's ``Producer`` replaced by a recorder, so the configuration it
would really use is what is checked.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest

from dicom_listener.adapters.publisher import KafkaSink
from scanwatch import kafka

ROOT = Path(__file__).resolve().parents[2]
#: Where a Kafka producer may be built: scanwatch's one configuration, and Faust's in the worker.
PRODUCER_HOMES = {"scanwatch/kafka.py"}
#: A Kafka producer class named in code: librdkafka's, aiokafka's, kafka-python's.
_PRODUCER = re.compile(r"\b(Producer|AIOKafkaProducer|KafkaProducer)\s*\(")


class _Message:
    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return 0


class RecordingProducer:
    """Stands in for librdkafka's Producer: records its configuration, acknowledges at once."""

    configs: list[dict[str, Any]] = []

    def __init__(self, config: dict[str, Any], logger: Any = None) -> None:
        RecordingProducer.configs.append(dict(config))

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any, **_: Any) -> None:
        on_delivery(None, _Message())

    def flush(self, timeout: float | None = None) -> int:
        return 0

    def list_topics(self, topic: str | None = None, timeout: float | None = None) -> None:
        return None


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    RecordingProducer.configs = []
    monkeypatch.setattr(confluent_kafka, "Producer", RecordingProducer)
    return RecordingProducer.configs


def test_the_shared_configuration_waits_for_every_in_sync_replica() -> None:
    config = kafka.producer_config("127.0.0.1:1", "test", 5.0)
    assert config["acks"] == "all"
    assert config["max.in.flight.requests.per.connection"] == 1


def test_the_listener_relay_produces_with_acks_all(recorded: list[dict[str, Any]]) -> None:
    KafkaSink("127.0.0.1:1", timeout_s=1.0).connect()
    assert [c["acks"] for c in recorded] == ["all"]
    assert recorded[0]["client.id"] == "scanwatch-dicom-listener"


def test_event_producers_training_and_console_produce_with_acks_all(
    recorded: list[dict[str, Any]],
) -> None:
    from services.console import app as console_app
    from training.events import KafkaEvents

    events = KafkaEvents("127.0.0.1:1")
    assert isinstance(events._producer, kafka.EventProducer)
    events._producer.send("t", b"k", b"v")
    kafka.EventProducer("127.0.0.1:1", "scanwatch-console", 1.0).send("t", b"k", b"v")
    assert [c["acks"] for c in recorded] == ["all", "all"]
    # The console builds its producer as that one: scanwatch.kafka.EventProducer.
    assert console_app.EventProducer is kafka.EventProducer


def test_the_worker_faust_producer_waits_for_all_and_replicates_its_topics(
    tmp_path: Path,
) -> None:
    from inference_worker.app import create_app
    from inference_worker.config import Settings

    nowhere = "127.0.0.1:1"
    development = create_app(
        Settings(store="memory://", data_dir=tmp_path, kafka_bootstrap_servers=nowhere)
    )
    assert development.conf.producer_acks == -1  # aiokafka's "all"
    assert development.conf.topic_replication_factor == 1
    production = create_app(
        Settings(
            store="memory://",
            data_dir=tmp_path / "p",
            kafka_bootstrap_servers=nowhere,
            topic_replication_factor=3,
        )
    )
    assert production.conf.producer_acks == -1
    assert production.conf.topic_replication_factor == 3


def test_no_producer_is_built_outside_scanwatch_kafka() -> None:
    """A new producer elsewhere would not inherit acks=all: it must use scanwatch.kafka (the
    worker's Faust app builds its own, checked above)."""
    packages = ["dicom_listener", "inference_worker", "services", "training", "scanwatch", "bench"]
    offenders = []
    for package in packages:
        for path in (ROOT / package).rglob("*.py"):
            relative = path.relative_to(ROOT).as_posix()
            if "/tests/" in relative or "node_modules" in relative or relative in PRODUCER_HOMES:
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if _PRODUCER.search(line) and not line.lstrip().startswith("#"):
                    offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []
