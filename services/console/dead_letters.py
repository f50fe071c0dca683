"""Failed studies for the worklist: the dead letters of the study-keyed topics
(``dicom.instance.received.v1``, ``dicom.study.ready.v1``, ``inference.result.v1``, each
``<topic>.dlq``: :func:`schemas.topics.dlq`), read with the console's own consumer group and
kept with their reason in the worklist's ``worklist_failure`` table (a later AI result
supersedes a failure).

A thread of its own (librdkafka's consumer blocks), started by the app when
``kafka_bootstrap_servers`` is set; offsets are committed after the failure is stored, so a
restart neither loses nor doubles one (storing is an upsert). A letter whose key is not a
StudyInstanceUID, or whose body is not a ``deadletter.v1``, is skipped and logged by offset.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from scanwatch.kafka import new_consumer
from schemas import DeadLetterV1, InferenceResultV1, InstanceReceivedV1, StudyReadyV1, dlq
from services.console.index import is_uid
from services.console.worklist import Worklist

log = logging.getLogger(__name__)

#: The dead-letter topics whose messages name a study by their key.
TOPICS = tuple(
    dlq(t) for t in (InstanceReceivedV1.SCHEMA, StudyReadyV1.SCHEMA, InferenceResultV1.SCHEMA)
)
#: The console's consumer group (every console replica shares it: each letter stored once).
GROUP = "scanwatch-console-worklist"


class DeadLetterReader:
    """Reads the dead letters into the worklist until :meth:`stop`."""

    def __init__(self, bootstrap_servers: str, worklist: Worklist) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.worklist = worklist
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="dead-letters", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = new_consumer(self.bootstrap_servers, GROUP, TOPICS)
        try:
            while not self._stop.is_set():
                message = consumer.poll(1.0)
                if message is None:
                    continue
                if message.error():
                    error = str(message.error())
                    log.warning("dead letters: consumer error", extra={"error": error})
                    continue
                try:
                    self.handle(
                        message.key(), message.value(), message.topic() or "", message.offset()
                    )
                except Exception:  # the database is down: read this letter again later
                    log.exception("dead letters: not stored; retrying")
                    self._stop.wait(5.0)
                    consumer.seek(message)  # type: ignore[arg-type]
                    continue
                consumer.commit(message=message, asynchronous=False)
        finally:
            consumer.close()

    def handle(self, key: bytes | None, value: bytes | None, topic: str, offset: Any) -> bool:
        """Store one letter's failure; whether it named a study."""
        study = (key or b"").decode(errors="replace")
        try:
            letter = DeadLetterV1.from_bytes(value or b"")
        except ValueError:
            where = {"topic": topic, "offset": offset}
            log.warning("dead letters: not a deadletter.v1", extra=where)
            return False
        if not is_uid(study):
            log.info("dead letters: no study key", extra={"topic": topic, "offset": offset})
            return False
        self.worklist.store_failure(study, letter.source_topic, letter.reason, letter.error_class)
        return True
