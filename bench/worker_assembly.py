"""The worker's and the broker's CPU per instance event assembled (issue 20, whole-system ingest).

    .venv/bin/python bench/worker_assembly.py [--rounds 5] [--studies 20] [--slices 38]

In the whole-system ingest bench, what scanwatch spends per instance received beyond the
listener is mostly the worker's assembly (reading the event, recording the instance in the
study table, the table's changelog) and the broker's share of it. This bench isolates those:
the stack runs only Kafka, the model server and one worker (as ``make run`` starts it), with a
quiet period and maximum wait longer than the run, so that no study is released and nothing is
scored. Each round publishes ``--studies`` × ``--slices`` instance events as the listener does
(keyed by study, with the count headers) and waits until the worker's consumer group has
committed every one of them.

Per round, the CPU (``/proc``, user + system) of the worker's and the broker's process groups
from the first event published to the last one committed, less what each spends idle over as
long (measured before the first round: the worker's timer, the broker's own housekeeping), per
instance. Printed per round and as medians, with the study table's changelog records written
per instance (its end offsets).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "bench"))

from confluent_kafka import Consumer, TopicPartition  # noqa: E402
from ingest_whole_system import group_cpu_ms, stack_groups  # noqa: E402

from devtools.benchmarks import commit, say, stack_config  # noqa: E402
from devtools.stack import Stack  # noqa: E402
from inference_worker.app import STUDY_TABLE  # noqa: E402
from inference_worker.assembly import ACQUISITION_NUMBER, IMAGES_IN_ACQUISITION  # noqa: E402
from inference_worker.config import Settings  # noqa: E402
from scanwatch import kafka  # noqa: E402
from schemas import InstanceReceivedV1  # noqa: E402
from schemas.topics import STUDY_PARTITIONS  # noqa: E402

WORKER, BROKER = "inference-worker", "kafka"
#: Longer than any run: no study is released, so nothing is scored.
HOLD_S = 24 * 3600.0


def events(round_: int, studies: int, slices: int) -> list[tuple[InstanceReceivedV1, list]]:
    """One round's instance events with the listener's count headers."""
    out = []
    for s in range(studies):
        study = f"1.2.826.0.1.3680043.10.1.{round_}.{s}"
        series = f"{study}.1"
        for n in range(slices):
            uid = f"{series}.{n + 1}"
            event = InstanceReceivedV1(
                StudyInstanceUID=study,
                SeriesInstanceUID=series,
                SOPInstanceUID=uid,
                SOPClassUID="1.2.840.10008.5.1.4.1.1.4",
                TransferSyntaxUID="1.2.840.10008.1.2.1",
                Modality="MR",
                calling_ae_title="BENCH",
                called_ae_title="SCANWATCH",
                storage_uri=f"file:///nowhere/{uid}.dcm",
                sha256=hashlib.sha256(uid.encode()).hexdigest(),
                size_bytes=140_000,
            )
            headers = [(IMAGES_IN_ACQUISITION, str(slices).encode()), (ACQUISITION_NUMBER, b"1")]
            out.append((event, headers))
    return out


def lag(consumer: Consumer, topic: str) -> int:
    """Events of ``topic`` the worker's group has not committed yet."""
    partitions = [TopicPartition(topic, p) for p in range(STUDY_PARTITIONS)]
    behind = 0
    for tp in consumer.committed(partitions, timeout=10):
        end = consumer.get_watermark_offsets(tp, timeout=10)[1]
        behind += end - max(tp.offset, 0)
    return behind


def records(consumer: Consumer, topic: str) -> int:
    """Records ever written to ``topic`` (the sum of its partitions' end offsets)."""
    return sum(
        consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in range(STUDY_PARTITIONS)
    )


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--rounds", type=int, default=5)
    args.add_argument("--studies", type=int, default=20)
    args.add_argument("--slices", type=int, default=38)
    args.add_argument("--idle-s", type=float, default=10.0, help="idle window measured first")
    opts = args.parse_args()
    load_before = os.getloadavg()
    app_id = Settings.model_fields["app_id"].default
    changelog = f"{app_id}-{STUDY_TABLE}-changelog"
    with tempfile.TemporaryDirectory() as tmp:
        config = stack_config(
            Path(tmp),
            only=("model-server", WORKER),
            quiet_period_s=HOLD_S,
            extra_env={
                "SCANWATCH_WORKER_MAX_WAIT_S": str(HOLD_S),
                "SCANWATCH_WORKER_EXAM_MAX_WAIT_S": str(HOLD_S),
            },
        )
        stack = Stack(config)
        stack.start()
        try:
            servers = stack.bootstrap_servers
            producer = kafka.new_producer(servers, "bench", timeout_s=30)
            watcher = Consumer({"bootstrap.servers": servers, "group.id": app_id})
            groups = {
                name: pgid for name, pgid in stack_groups(stack).items() if name in (WORKER, BROKER)
            }
            topic = InstanceReceivedV1.SCHEMA
            idle_start, idle_cpu = time.monotonic(), group_cpu_ms(groups)
            time.sleep(opts.idle_s)  # the idle window: nothing to wait for but time
            idle_rate = {
                name: (ms - idle_cpu[name]) / (time.monotonic() - idle_start)
                for name, ms in group_cpu_ms(groups).items()
            }
            say(f"idle CPU ms/s: {json.dumps({k: round(v, 1) for k, v in idle_rate.items()})}")
            rounds: list[dict[str, float]] = []
            for round_ in range(opts.rounds):
                batch = events(round_, opts.studies, opts.slices)
                written = records(watcher, changelog)  # the worker creates it before starting
                start, cpu = time.monotonic(), group_cpu_ms(groups)
                for event, headers in batch:
                    producer.produce(
                        topic,
                        key=event.StudyInstanceUID.encode(),
                        value=event.to_bytes(),
                        headers=headers,
                    )
                    producer.poll(0)
                if producer.flush(60):
                    raise SystemExit("Kafka did not acknowledge every event")
                while lag(watcher, topic):
                    if time.monotonic() - start > 300:
                        raise SystemExit("the worker did not commit the round in 300 s")
                    time.sleep(0.1)
                wall = time.monotonic() - start
                spent = group_cpu_ms(groups)
                row = {
                    f"{name}_ms": (spent[name] - cpu[name] - idle_rate[name] * wall) / len(batch)
                    for name in groups
                }
                row["wall_s"] = wall
                row["changelog_per_instance"] = (records(watcher, changelog) - written) / len(batch)
                rounds.append(row)
                say(f"round {round_ + 1}: {json.dumps({k: round(v, 3) for k, v in row.items()})}")
            watcher.close()
        finally:
            stack.stop()
    later = rounds[1:] or rounds
    report = {
        "commit": commit(),
        "instances_per_round": opts.studies * opts.slices,
        "load_before": [round(x, 1) for x in load_before],
        "load_after": [round(x, 1) for x in os.getloadavg()],
        **{f"median_{key}": round(statistics.median(r[key] for r in later), 3) for key in later[0]},
    }
    sys.stdout.write(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
