"""docker-compose.yml runs production's Kafka shape (there is no Docker engine here, so this reads
the file): three KRaft nodes, each a broker and a controller of one three-voter quorum, every
topic with ``schemas.topics.PRODUCTION``'s copies, and every client given all three brokers."""

from __future__ import annotations

import yaml

from conftest import ROOT
from schemas.topics import PRODUCTION

SERVICES: dict[str, dict] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
BROKERS = sorted(name for name, spec in SERVICES.items() if "apache/kafka" in spec.get("image", ""))


def env(service: str) -> dict[str, str]:
    return {k: str(v) for k, v in (SERVICES[service].get("environment") or {}).items()}


def test_three_nodes_form_one_quorum_of_brokers_and_controllers() -> None:
    assert BROKERS == ["kafka-1", "kafka-2", "kafka-3"]
    voters = {env(b)["KAFKA_CONTROLLER_QUORUM_VOTERS"] for b in BROKERS}
    assert voters == {"1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093"}
    assert {env(b)["CLUSTER_ID"] for b in BROKERS} and len(
        {env(b)["CLUSTER_ID"] for b in BROKERS}
    ) == 1
    for n, broker in enumerate(BROKERS, 1):
        e = env(broker)
        assert e["KAFKA_NODE_ID"] == str(n)
        assert e["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert e["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://{broker}:9092"
        assert SERVICES[broker]["volumes"] == [f"{broker}-data:/var/lib/kafka/data"]


def test_every_topic_gets_production_replication() -> None:
    factor, min_insync = str(PRODUCTION.factor), str(PRODUCTION.min_insync)
    for broker in BROKERS:
        e = env(broker)
        assert e["KAFKA_DEFAULT_REPLICATION_FACTOR"] == factor
        assert e["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == factor
        assert e["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == factor
        assert e["KAFKA_MIN_INSYNC_REPLICAS"] == min_insync
        assert e["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == min_insync
        assert e["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    # The worker's Faust topics (its table's changelog) too.
    assert env("inference-worker")["SCANWATCH_WORKER_TOPIC_REPLICATION_FACTOR"] == factor


def test_the_listener_outwaits_the_brokers_noticing_a_dead_one() -> None:
    """A batch whose acks=all wait outlasts the listener's timeout is sent again although it
    was written; the brokers fence a dead broker after 9 s (Kafka's default
    broker.session.timeout.ms), so the listener's timeout must be longer (measured:
    tests/faults/test_broker_leader.py, 3 of 60 events twice at 10 s)."""
    assert float(env("dicom-listener")["SCANWATCH_LISTENER_KAFKA_TIMEOUT_S"]) >= 20


def test_every_client_is_given_all_three_brokers() -> None:
    every = ",".join(f"{b}:9092" for b in BROKERS)
    clients = {
        service: value
        for service in SERVICES
        for name, value in env(service).items()
        if name.endswith("KAFKA_BOOTSTRAP_SERVERS")
    }
    assert set(clients) >= {"inference-worker", "dicom-listener", "training-worker", "console"}
    assert {s: v for s, v in clients.items() if v != every} == {}
    topics = SERVICES["topics"]
    assert topics["command"][-1] == every
    assert set(topics["depends_on"]) == set(BROKERS)
    assert topics["restart"] == "on-failure"  # refused while a broker has not joined yet
