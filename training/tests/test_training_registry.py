"""Registry and lifecycle: unique versions, the promotion rule, rollback, events."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import keras
import pytest

from scanwatch.model_registry import (
    CANDIDATE,
    REJECTED,
    ROLLED_BACK,
    SERVING,
    SUPERSEDED,
    LifecycleError,
    PromotionRefused,
    Registry,
)
from schemas.training_events import ModelPublishedV1
from training.events import MemoryEvents
from training.export import export_saved_model
from training.lifecycle import promote, rollback

NAME = "brain"
CLASSES = ("normal", "mass")
FINGERPRINT = "a" * 64
ROOT = Path(__file__).resolve().parents[2]


def tiny_model() -> keras.Model:
    inputs = keras.Input((32, 32, 3), name="images")
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(pooled))


def candidate(registry: Registry, macro_f1: float, job_id: str | None = None) -> int:
    """Reserve, export into staging and register a candidate (what a training job does)."""
    version = registry.reserve(NAME, job_id=job_id)
    export_saved_model(
        tiny_model(), CLASSES, 0.5, registry.repository / ".staging", NAME, version=version
    )
    registry.record_candidate(
        NAME,
        version,
        dataset_fingerprint=FINGERPRINT,
        metrics={"macro_f1": macro_f1},
        class_names=list(CLASSES),
        threshold=0.5,
    )
    return version


RESERVE_FIVE = (
    "import sys; from pathlib import Path; from scanwatch.model_registry import Registry; "
    "print(*[Registry(Path(sys.argv[1])).reserve('brain') for _ in range(5)])"
)


def test_concurrent_reservations_never_share_a_version(tmp_path: Path) -> None:
    """Three processes (as three training workers would) reserve at the same time."""
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", RESERVE_FIVE, str(tmp_path)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        for _ in range(3)
    ]
    taken = [int(v) for worker in workers for v in worker.communicate(timeout=60)[0].split()]
    assert all(worker.returncode == 0 for worker in workers)
    assert sorted(taken) == list(range(1, 16))


def test_reserve_skips_numbers_used_by_folders(tmp_path: Path) -> None:
    (tmp_path / NAME / "4").mkdir(parents=True)
    (tmp_path / ".retired" / NAME / "9").mkdir(parents=True)
    assert Registry(tmp_path).reserve(NAME) == 10


def test_a_resumed_job_keeps_its_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    first = registry.reserve(NAME, job_id="job-1")
    assert registry.reserve(NAME, job_id="job-2") == first + 1
    assert registry.reserve(NAME, job_id="job-1") == first
    assert registry.job_version(NAME, "job-1").version == first


def test_candidate_is_not_served_until_promoted(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    events = MemoryEvents()
    version = candidate(registry, 0.9)
    assert registry.served_versions(NAME) == []
    assert registry.get(NAME, version).status == CANDIDATE
    assert promote(registry, NAME, version, events) is None
    assert registry.served_versions(NAME) == [version]
    assert registry.get(NAME, version).status == SERVING
    [(topic, key, event)] = events.sent
    assert topic == "model.published.v1" and key == NAME
    assert isinstance(event, ModelPublishedV1)
    assert event.model_version == version and event.action == "promoted"
    assert event.macro_f1 == 0.9 and event.dataset_fingerprint == FINGERPRINT


def test_promotion_needs_at_least_the_served_macro_f1(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    events = MemoryEvents()
    first = candidate(registry, 0.9)
    promote(registry, NAME, first, events)

    worse = candidate(registry, 0.85)
    with pytest.raises(PromotionRefused, match="below"):
        promote(registry, NAME, worse, events)
    assert registry.get(NAME, worse).status == REJECTED
    assert registry.served_versions(NAME) == [first]
    assert len(events.sent) == 1

    equal = candidate(registry, 0.9)
    assert promote(registry, NAME, equal, events) == first
    assert registry.served_versions(NAME) == [first, equal]
    assert registry.get(NAME, first).status == SUPERSEDED

    # An operator may override the rule explicitly.
    forced = candidate(registry, 0.5)
    assert promote(registry, NAME, forced, events, force=True) == equal
    assert registry.served_versions(NAME)[-1] == forced
    # A version older than the served one is brought back by a rollback, not a promotion.
    with pytest.raises(LifecycleError, match="roll back"):
        promote(registry, NAME, worse, events, force=True)


def test_promotion_uses_a_baseline_measured_on_the_candidates_data(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    promote(registry, NAME, candidate(registry, 0.99), MemoryEvents())
    better_on_its_data = candidate(registry, 0.8)
    # The served model scored 0.7 on the candidate's held-out set: the candidate wins.
    registry.promote(NAME, better_on_its_data, serving_macro_f1=0.7)
    assert registry.served_versions(NAME)[-1] == better_on_its_data


def test_rollback_in_one_call_and_back_again(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    events = MemoryEvents()
    versions = [candidate(registry, 0.9) for _ in range(3)]
    for version in versions:
        promote(registry, NAME, version, events)
    assert registry.served_versions(NAME) == versions

    assert rollback(registry, NAME, events) == (versions[2], versions[1])
    assert registry.served_versions(NAME) == versions[:2]
    assert registry.get(NAME, versions[2]).status == ROLLED_BACK
    assert registry.get(NAME, versions[1]).status == SERVING
    assert (tmp_path / ".retired" / NAME / str(versions[2]) / "saved_model.pb").is_file()
    last = events.sent[-1][2]
    assert (last.action, last.model_version, last.previous_version) == (
        "rolled-back",
        versions[1],
        versions[2],
    )

    assert rollback(registry, NAME, events, to_version=versions[0]) == (versions[1], versions[0])
    assert registry.served_versions(NAME) == versions[:1]

    # A rolled-back version can be served again (it is not worse than the served one).
    promote(registry, NAME, versions[2], events)
    assert registry.served_versions(NAME) == [versions[0], versions[2]]


def test_rollback_needs_an_older_version(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    with pytest.raises(LifecycleError, match="no served version"):
        rollback(registry, NAME, MemoryEvents())
    promote(registry, NAME, candidate(registry, 0.9), MemoryEvents())
    with pytest.raises(LifecycleError, match="no older"):
        rollback(registry, NAME, MemoryEvents())


def test_failed_and_unknown_versions(tmp_path: Path) -> None:
    registry = Registry(tmp_path)
    version = registry.reserve(NAME)
    registry.mark_failed(NAME, version, "boom")
    with pytest.raises(LifecycleError, match="failed"):
        registry.promote(NAME, version)
    with pytest.raises(LookupError):
        registry.get(NAME, 99)
