"""Failed studies on the worklist: a dead letter on a study-keyed ``.dlq`` topic (the real
broker), read by the console's reader into the worklist with its reason; a letter that names
no study, or is not a ``deadletter.v1``, is skipped; a later AI result supersedes the failure."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import insert

from devtools.kafka_local import LocalKafka
from devtools.testing import wait_for
from dicom_listener.adapters.filestore import FileStore
from scanwatch import ids
from scanwatch.database import make_engine
from scanwatch.kafka import EventProducer
from schemas import DeadLetterV1, StudyReadyV1, dlq
from services.console.dead_letters import DeadLetterReader
from services.console.index import StoreIndex
from services.console.tests.helpers import put, relabelled
from services.console.worklist import Filters, Worklist, results

pytestmark = pytest.mark.integration

STUDY = "1.2.826.0.1.3680043.8.498.55.1"


def test_dead_letters_become_failed_rows(kafka: LocalKafka, tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    mr = Path(get_testdata_file("MR_small.dcm"))
    put(store, relabelled(mr, tmp_path / "a.dcm", StudyInstanceUID=STUDY))
    engine = make_engine(f"sqlite:///{tmp_path / 'index.db'}")
    StoreIndex(tmp_path / "store", engine).top_up()
    worklist = Worklist(engine)
    worklist.map_new_studies()
    producer = EventProducer(kafka.bootstrap_servers, "test", 10.0)
    topic = dlq(StudyReadyV1.SCHEMA)
    letter = DeadLetterV1(
        source_topic=StudyReadyV1.SCHEMA,
        key=STUDY,
        reason="no series with a usable orientation <b>",
        error_class="unusable",
        payload="{}",
    )
    producer.send(topic, b"not-a-uid", letter.to_bytes())  # skipped: names no study
    producer.send(topic, STUDY.encode(), b"not json")  # skipped: not a dead letter
    producer.send(topic, STUDY.encode(), letter.to_bytes())
    producer.close()
    reader = DeadLetterReader(kafka.bootstrap_servers, worklist)
    reader.start()
    try:
        rows = wait_for(
            lambda: [r for r in worklist.page(Filters(status="failed")) if r.reason],
            timeout=60,
            what="the failed study on the worklist",
        )
    finally:
        reader.stop()
    assert [r.StudyInstanceUID for r in rows] == [STUDY]
    assert rows[0].status == "failed" and rows[0].reason == letter.reason
    assert worklist.page(Filters(status="awaiting")) == []
    # A later AI result supersedes the failure.
    with engine.begin() as conn:
        conn.execute(
            insert(results).values(
                imaging_id=ids.imaging_study_id(STUDY),
                observation_id="o",
                score=0.9,
                interpretation="A",
                model="m v1",
                status="preliminary",
                issued="2025-01-01",
            )
        )
    (row,) = worklist.page(Filters())
    assert row.status == "scored" and row.reason is None
