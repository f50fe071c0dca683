"""``scanwatch.kafka.ensure_topics`` against a fake admin client: a controller that refuses the
replication factor (it counts fewer live brokers than the metadata answer did) is the same
:class:`~scanwatch.kafka.KafkaTopicError` as a short broker count, so that docker-compose's
topics step runs again; a topic created meanwhile by another process is what was wanted."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace
from typing import Any

import confluent_kafka.admin
import pytest
from confluent_kafka import KafkaError, KafkaException

from scanwatch import kafka
from schemas.topics import TopicSpec


class FakeAdmin:
    """Three brokers in the metadata; ``create_topics`` fails each topic with ``code``."""

    code: int | None = None

    def __init__(self, config: dict[str, Any], logger: Any = None) -> None:
        pass

    def list_topics(self, timeout: float) -> SimpleNamespace:
        return SimpleNamespace(brokers={1: None, 2: None, 3: None}, topics={})

    def create_topics(self, new: list[Any], request_timeout: float) -> dict[str, Future]:
        futures: dict[str, Future] = {}
        for topic in new:
            future: Future = Future()
            if self.code is None:
                future.set_result(None)
            else:
                future.set_exception(KafkaException(KafkaError(self.code, "refused")))
            futures[topic.topic] = future
        return futures


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> type[FakeAdmin]:
    monkeypatch.setattr(confluent_kafka.admin, "AdminClient", FakeAdmin)
    FakeAdmin.code = None
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
