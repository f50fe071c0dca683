"""``scanwatch.kafka.ensure_topics`` against a fake admin client: a controller that refuses the
replication factor (it counts fewer live brokers than the metadata answer did) is the same
:class:`~scanwatch.kafka.KafkaTopicError` as a short broker count, so that docker-compose's
topics step runs again; a topic created meanwhile by another process is what was wanted; a
production cluster whose metadata lists one broker for a moment is short of brokers, not a
development broker."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import confluent_kafka.admin
import pytest
from confluent_kafka import KafkaError, KafkaException

from scanwatch import kafka
from schemas import StudyReadyV1, dlq
from schemas.topics import LARGE_RECORD_BYTES, TOPICS, TopicSpec


class FakeAdmin:
    """``brokers`` in the metadata, each configured with ``default.replication.factor``
    ``configured``; ``create_topics`` fails each topic with ``code``."""

    code: int | None = None
    brokers: tuple[int, ...] = (1, 2, 3)
    configured = 3
    created: list[Any] = []
    #: Topic name -> partitions, as the cluster has them.
    existing: dict[str, int] = {}
    #: How many more metadata answers list the existing topics with no partitions (a topic
    #: the controller has just created, its partitions not yet given leaders).
    leaderless: int = 0
    listings: int = 0

    def __init__(self, config: dict[str, Any], logger: Any = None) -> None:
        pass

    def list_topics(self, timeout: float) -> SimpleNamespace:
        FakeAdmin.listings += 1
        with_leaders = FakeAdmin.leaderless <= 0
        FakeAdmin.leaderless -= 1
        topics = {
            name: SimpleNamespace(
                partitions={i: SimpleNamespace(leader=1) for i in range(count)}
                if with_leaders
                else {}
            )
            for name, count in self.existing.items()
        }
        return SimpleNamespace(brokers=dict.fromkeys(self.brokers), topics=topics)

    #: Topic name -> its max.message.bytes (topics not named: Kafka's default).
    sizes: dict[str, int] = {}
    altered: list[Any] = []

    #: How many more topic descriptions fail as unknown (asked of a broker that has not learnt
    #: of a topic just created).
    unknown: int = 0

    def describe_configs(self, resources: list[Any]) -> dict[Any, Future]:
        answers = {}
        for resource in resources:
            future: Future = Future()
            if resource.restype == confluent_kafka.admin.ResourceType.TOPIC and self.unknown > 0:
                FakeAdmin.unknown -= 1
                error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, "unknown")
                future.set_exception(KafkaException(error))
                answers[resource] = future
                continue
            future.set_result(
                {
                    "default.replication.factor": SimpleNamespace(value=str(self.configured)),
                    "max.message.bytes": SimpleNamespace(
                        value=str(self.sizes.get(resource.name, 1048588))
                    ),
                }
            )
            answers[resource] = future
        return answers

    def incremental_alter_configs(self, resources: list[Any]) -> dict[Any, Future]:
        FakeAdmin.altered.extend(resources)
        futures = {}
        for resource in resources:
            future: Future = Future()
            future.set_result(None)
            futures[resource] = future
        return futures

    def create_topics(self, new: list[Any], request_timeout: float) -> dict[str, Future]:
        futures: dict[str, Future] = {}
        FakeAdmin.created.extend(new)
        for topic in new:
            future: Future = Future()
            if self.code is None:
                future.set_result(None)
            else:
                future.set_exception(KafkaException(KafkaError(self.code, "refused")))
            if self.code in (None, KafkaError.TOPIC_ALREADY_EXISTS):
                FakeAdmin.existing[topic.topic] = topic.num_partitions
            futures[topic.topic] = future
        return futures


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> type[FakeAdmin]:
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", FakeAdmin)
    monkeypatch.setattr(FakeAdmin, "code", None)
    monkeypatch.setattr(FakeAdmin, "brokers", (1, 2, 3))
    monkeypatch.setattr(FakeAdmin, "configured", 3)
    monkeypatch.setattr(FakeAdmin, "created", [])
    monkeypatch.setattr(FakeAdmin, "existing", {})
    monkeypatch.setattr(FakeAdmin, "leaderless", 0)
    monkeypatch.setattr(FakeAdmin, "listings", 0)
    monkeypatch.setattr(FakeAdmin, "sizes", {})
    monkeypatch.setattr(FakeAdmin, "altered", [])
    monkeypatch.setattr(FakeAdmin, "unknown", 0)
    return FakeAdmin


def test_a_refused_replication_factor_is_a_topic_error(admin: type[FakeAdmin]) -> None:
    admin.code = KafkaError.INVALID_REPLICATION_FACTOR
    with pytest.raises(kafka.KafkaTopicError, match="need 3 brokers"):
        kafka.ensure_topics("127.0.0.1:1", [TopicSpec("short")])


def test_a_topic_created_meanwhile_counts_as_done_and_others_raise(
    admin: type[FakeAdmin],
) -> None:
    admin.code = KafkaError.TOPIC_ALREADY_EXISTS
    assert kafka.ensure_topics("127.0.0.1:1", [TopicSpec("taken")]) == []
    admin.code = KafkaError.TOPIC_AUTHORIZATION_FAILED
    with pytest.raises(KafkaException):
        kafka.ensure_topics("127.0.0.1:1", [TopicSpec("refused")])
    admin.code = None
    assert kafka.ensure_topics("127.0.0.1:1", [TopicSpec("new")]) == ["new"]


def test_one_broker_listed_by_a_production_cluster_is_refused(admin: type[FakeAdmin]) -> None:
    """CI saw a three-node cluster's metadata list a single broker (the others fenced for a
    moment under load): it was taken for a development broker and got a one-copy topic."""
    admin.brokers = (2,)
    with pytest.raises(kafka.KafkaTopicError, match="need 3 brokers"):
        kafka.ensure_topics("127.0.0.1:1", [TopicSpec("short")])
    assert admin.created == []


def test_a_single_broker_configured_for_one_copy_is_a_development_broker(
    admin: type[FakeAdmin],
) -> None:
    admin.brokers, admin.configured = (1,), 1
    assert kafka.ensure_topics("127.0.0.1:1", [TopicSpec("dev")]) == ["dev"]
    [topic] = admin.created
    assert (topic.replication_factor, topic.config["min.insync.replicas"]) == (1, "1")


def test_a_compacted_topic_keeps_keys_not_days(admin: type[FakeAdmin]) -> None:
    kafka.ensure_topics("127.0.0.1:1", [TopicSpec("table-changelog", compact=True)])
    [topic] = admin.created
    assert topic.config["cleanup.policy"] == "compact"
    assert "retention.ms" not in topic.config


def test_a_topic_listed_without_partitions_is_waited_for(admin: type[FakeAdmin]) -> None:
    """Two workers started together: one created the study table's changelog, the other read
    metadata listing it with 0 partitions and crashed in Faust (PartitionsMismatch). The
    creation returns only once every partition has a leader, whoever created the topic."""
    admin.existing = {"taken": 4}
    admin.leaderless = 3  # the first answer decides what to create; two more wait
    assert kafka.ensure_topics("127.0.0.1:1", [TopicSpec("taken", partitions=4)]) == []
    assert admin.listings == 4


def test_a_topic_that_never_gets_leaders_is_a_topic_error(admin: type[FakeAdmin]) -> None:
    admin.leaderless = 10**6
    with pytest.raises(kafka.KafkaTopicError, match="without a leader.*: slow"):
        kafka.ensure_topics("127.0.0.1:1", [TopicSpec("slow")], timeout_s=0.3)


def test_the_ready_topic_takes_a_large_studys_event(admin: type[FakeAdmin]) -> None:
    """A ready event lists every instance of its study: at Kafka's default 1 MB a study of
    ~1 850 instances could not be announced. New topics get the larger limit; an existing one
    created with less is raised to it, and one already there is left alone."""
    ready = {t.name: t for t in TOPICS}[StudyReadyV1.SCHEMA]
    assert ready.max_message_bytes == LARGE_RECORD_BYTES
    assert {t.name: t for t in TOPICS}[dlq(StudyReadyV1.SCHEMA)].max_message_bytes
    kafka.ensure_topics("127.0.0.1:1", [ready, TopicSpec("small")])
    configs = {topic.topic: topic.config for topic in admin.created}
    assert configs[ready.name]["max.message.bytes"] == str(LARGE_RECORD_BYTES)
    assert "max.message.bytes" not in configs["small"]

    admin.created, admin.existing = [], {"old": 4, "done": 4}
    admin.sizes = {"done": LARGE_RECORD_BYTES}
    admin.unknown = 2  # a broker that has not learnt of them yet: asked again
    specs = [TopicSpec(name, max_message_bytes=LARGE_RECORD_BYTES) for name in ("old", "done")]
    assert kafka.ensure_topics("127.0.0.1:1", specs) == []
    [altered] = admin.altered
    assert altered.name == "old"
    [entry] = altered.incremental_configs
    assert (entry.name, entry.value) == ("max.message.bytes", str(LARGE_RECORD_BYTES))
