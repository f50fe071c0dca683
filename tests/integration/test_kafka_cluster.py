"""The three-node KRaft cluster of ``devtools.kafka_local``: production's topic settings as read
back from the brokers, and a killed partition leader replaced with nothing acknowledged lost."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, ClusterMetadata, ConfigResource, ResourceType

from conftest import KAFKA_LIBS
from devtools.kafka_local import LocalKafkaCluster, read_topic
from devtools.testing import wait_for
from scanwatch import kafka
from schemas.topics import PRODUCTION, TOPICS, TopicSpec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafkaCluster]:
    running = LocalKafkaCluster(tmp_path_factory.mktemp("cluster"), KAFKA_LIBS)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def _admin(cluster: LocalKafkaCluster) -> AdminClient:
    return AdminClient({"bootstrap.servers": cluster.bootstrap_servers})


def test_scanwatch_topics_have_three_replicas_and_need_two_in_sync(
    cluster: LocalKafkaCluster,
) -> None:
    admin = _admin(cluster)
    # Topics just created reach every broker's metadata a moment later.
    names = {spec.name for spec in TOPICS}

    def with_topics() -> ClusterMetadata | None:
        metadata = admin.list_topics(timeout=10)
        return metadata if names <= set(metadata.topics) else None

    metadata = wait_for(with_topics, 60, "the topics in the cluster's metadata")
    assert set(metadata.brokers) == {1, 2, 3}
    for spec in TOPICS:
        partitions = metadata.topics[spec.name].partitions
        assert len(partitions) == spec.partitions
        assert {len(p.replicas) for p in partitions.values()} == {PRODUCTION.factor}, spec.name
    resources = [ConfigResource(ResourceType.TOPIC, spec.name) for spec in TOPICS]

    def described() -> dict[ConfigResource, dict] | None:
        try:
            return {r: f.result(10) for r, f in admin.describe_configs(resources).items()}
        except KafkaException:  # asked of a broker that has not learnt of every topic yet
            return None

    for resource, configs in wait_for(described, 60, "every topic's configuration").items():
        assert configs["min.insync.replicas"].value == str(PRODUCTION.min_insync), resource
        assert configs["min.insync.replicas"].source != 5  # DEFAULT_CONFIG: set, not Kafka's 1


def test_consumer_offsets_are_replicated_three_times(cluster: LocalKafkaCluster) -> None:
    """A consumer group's committed offsets (the workers', the training worker's) survive a
    broker too: the brokers create ``__consumer_offsets`` with factor 3."""
    topic = TOPICS[0].name
    # Not subscribed: a member joining its group meanwhile had its commit refused as an
    # unknown member (a non-retriable error, in a rerun here); this commits as a lone client.
    consumer = Consumer(
        {"bootstrap.servers": cluster.bootstrap_servers, "group.id": f"g-{uuid.uuid4().hex}"}
    )

    def committed() -> bool:
        # The first commit on a new cluster creates __consumer_offsets (three copies of each
        # of its partitions): until its coordinator has loaded, a commit is refused with a
        # retriable error, as any client sees it.
        try:
            consumer.commit(offsets=[TopicPartition(topic, 0, 0)], asynchronous=False)
        except KafkaException as exc:
            if not exc.args[0].retriable():
                raise
            return False
        return True

    try:
        wait_for(committed, 120, "an offset committed")
    finally:
        consumer.close()
    metadata = _admin(cluster).list_topics("__consumer_offsets", timeout=10)
    partitions = metadata.topics["__consumer_offsets"].partitions
    assert partitions and {len(p.replicas) for p in partitions.values()} == {3}


def test_a_killed_leader_is_replaced_and_every_acknowledged_write_is_kept(
    cluster: LocalKafkaCluster,
) -> None:
    topic = f"leader-{uuid.uuid4().hex[:8]}"
    kafka.ensure_topics(cluster.bootstrap_servers, [TopicSpec(topic, partitions=1)])
    cluster.wait_in_sync([topic])
    producer = kafka.new_producer(cluster.bootstrap_servers, "leader-test", timeout_s=60)
    acked: list[bytes] = []

    def send(values: list[bytes]) -> None:
        for value in values:
            producer.produce(
                topic,
                value=value,
                key=b"k",
                on_delivery=lambda err, msg: acked.append(msg.value()) if err is None else None,
            )
        producer.flush(90)

    send([f"before-{n}".encode() for n in range(200)])
    leader = cluster.leader_of(topic, 0)
    assert leader in cluster.nodes
    cluster.kill(leader)
    assert cluster.pid(leader) is None
    # Written while the leader is dead: the producer finds the new one and is acknowledged.
    send([f"during-{n}".encode() for n in range(200)])
    new_leader = wait_for(
        lambda: n if (n := cluster.leader_of(topic, 0)) not in (-1, leader) else None,
        60,
        "another leader",
    )
    cluster.start(leader)
    cluster.wait_in_sync([topic])
    assert len(acked) == 400
    records = read_topic(cluster.bootstrap_servers, topic, lambda rs: len(rs) >= 400, timeout=60)
    assert sorted(r.value for r in records) == sorted(acked)
    assert new_leader != leader

    # The restarted node is a full replica again: the topic survives losing another node.
    cluster.kill(new_leader)
    send([b"after"])
    cluster.start(new_leader)
    assert acked[-1] == b"after"


def test_two_brokers_are_not_a_production_cluster(cluster: LocalKafkaCluster) -> None:
    """Topics are not silently created with fewer copies than production's: a cluster short
    of brokers (one still joining) is refused, so the creation step runs again."""
    cluster.kill(3)
    try:
        # Each surviving broker's own view: one that has not yet applied broker 3's fencing
        # still lists three (CI once asked that one).
        cluster.wait_joined(60)
        with pytest.raises(kafka.KafkaTopicError, match="need 3 brokers"):
            kafka.ensure_topics(cluster.bootstrap_servers, [TopicSpec("short")])
    finally:
        cluster.start(3)
    cluster.wait_in_sync([t.name for t in TOPICS])
    assert "short" not in _admin(cluster).list_topics(timeout=10).topics
