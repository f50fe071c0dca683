"""Version policy and request resolution of ModelManager, with a fake engine (no TensorFlow)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import model_pb2

from services.model_server.errors import InvalidArgument, NotFound, Unavailable
from services.model_server.manager import AVAILABLE, END, LOADING, START, ModelManager
from services.model_server.tf_serving_files import VersionPolicy

BROKEN = b"broken"


class FakeServable:
    def __init__(self, path: Path) -> None:
        self.path = path

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return {}

    @property
    def signature_names(self) -> frozenset[str]:
        return frozenset()

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        return {}


class FakeEngine:
    """Loads any folder whose saved_model.pb is not ``broken``; calls ``during_load`` first."""

    name = "fake"

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.during_load: Callable[[Path], None] = lambda path: None
        self.make: Callable[[Path], FakeServable] = FakeServable
        self.made: list[FakeServable] = []

    def load(self, path: Path) -> FakeServable:
        self.during_load(path)
        if (path / "saved_model.pb").read_bytes() == BROKEN:
            raise ValueError("not a SavedModel")
        self.loaded.append(path.name)
        self.made.append(self.make(path))
        return self.made[-1]


def publish(model_dir: Path, version: int | str, content: bytes = b"model") -> Path:
    folder = model_dir / str(version)
    folder.mkdir(parents=True)
    (folder / "saved_model.pb").write_bytes(content)
    return folder


def spec(version: int | None = None, label: str | None = None) -> model_pb2.ModelSpec:
    model_spec = model_pb2.ModelSpec(name="m")
    if version is not None:
        model_spec.version.value = version
    if label is not None:
        model_spec.version_label = label
    return model_spec


def states(manager: ModelManager) -> dict[int, int]:
    return {version: status.state for version, status in manager.statuses(spec())}


@pytest.fixture()
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture()
def manager(tmp_path: Path, engine: FakeEngine) -> ModelManager:
    return ModelManager("m", tmp_path / "m", engine, {"stable": 2})


def test_nothing_published_is_unavailable(manager: ModelManager) -> None:
    manager.poll()  # the model folder does not even exist
    with pytest.raises(Unavailable):
        manager.resolve(spec())
    with pytest.raises(Unavailable):
        manager.statuses(spec())


def test_highest_complete_integer_version_is_loaded(
    manager: ModelManager, engine: FakeEngine
) -> None:
    publish(manager.model_dir, 1)
    publish(manager.model_dir, 3)
    publish(manager.model_dir, "10-candidate")  # not an integer
    publish(manager.model_dir, ".tmp-abc")  # a publish in progress
    (manager.model_dir / "12").mkdir()  # incomplete: no saved_model.pb

    manager.poll()
    manager.poll()  # nothing changed: nothing reloaded

    assert engine.loaded == ["3"]
    assert manager.resolve(spec()).version == 3
    assert states(manager) == {3: AVAILABLE}


def test_new_version_is_switched_to_before_the_old_is_unloaded(
    manager: ModelManager, engine: FakeEngine
) -> None:
    publish(manager.model_dir, 1)
    manager.poll()
    served_while_loading: list[int] = []

    def check(path: Path) -> None:
        served_while_loading.append(manager.resolve(spec()).version)
        assert states(manager)[int(path.name)] == LOADING

    engine.during_load = check
    publish(manager.model_dir, 2)
    manager.poll()

    assert served_while_loading == [1]
    assert manager.resolve(spec()).version == 2
    assert states(manager) == {2: AVAILABLE, 1: END}
    assert [v for v, _ in manager.statuses(spec())] == [2, 1]  # newest first, like TF Serving
    with pytest.raises(NotFound, match=r"Specific\(m, 1\)"):
        manager.resolve(spec(version=1))


def test_failed_version_is_skipped_until_it_changes(
    manager: ModelManager, engine: FakeEngine
) -> None:
    publish(manager.model_dir, 1)
    broken = publish(manager.model_dir, 2, BROKEN)

    manager.poll()
    manager.poll()  # the failure is remembered: no second attempt

    assert manager.resolve(spec()).version == 1
    status = dict(manager.statuses(spec()))[2]
    assert (status.state, status.error_code) == (END, 2)
    assert "not a SavedModel" in status.error_message
    assert engine.loaded == ["1"]

    (broken / "saved_model.pb").write_bytes(b"fixed")
    stat = (broken / "saved_model.pb").stat()
    os.utime(broken / "saved_model.pb", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    manager.poll()
    assert manager.resolve(spec()).version == 2


def test_removed_versions_roll_back_then_unload(manager: ModelManager) -> None:
    publish(manager.model_dir, 1)
    newest = publish(manager.model_dir, 2)
    manager.poll()

    (newest / "saved_model.pb").unlink()
    newest.rmdir()
    manager.poll()
    assert manager.resolve(spec()).version == 1

    (manager.model_dir / "1" / "saved_model.pb").unlink()
    manager.poll()
    with pytest.raises(Unavailable):
        manager.resolve(spec())
    assert states(manager) == {1: END, 2: END}


def test_version_labels(manager: ModelManager) -> None:
    publish(manager.model_dir, 2)
    manager.poll()
    assert manager.resolve(spec(label="stable")).version == 2
    with pytest.raises(InvalidArgument, match="Unrecognized servable version label: beta"):
        manager.resolve(spec(label="beta"))
    assert [v for v, _ in manager.statuses(spec(label="stable"))] == [2]
    with pytest.raises(NotFound):
        manager.statuses(spec(version=7))


def test_policy_all_serves_every_version_and_labels_pick_among_them(
    tmp_path: Path, engine: FakeEngine
) -> None:
    manager = ModelManager(
        "m", tmp_path / "m", engine, {"stable": 1, "canary": 2}, VersionPolicy("all")
    )
    publish(manager.model_dir, 1)
    publish(manager.model_dir, 2)
    manager.poll()
    assert manager.loaded_versions == [1, 2]
    assert states(manager) == {1: AVAILABLE, 2: AVAILABLE}
    assert manager.resolve(spec()).version == 2  # no version asked: the highest
    assert manager.resolve(spec(label="stable")).version == 1
    assert manager.resolve(spec(label="canary")).version == 2
    assert manager.resolve(spec(version=1)).version == 1


def test_policy_latest_n_keeps_n_and_unloads_older(tmp_path: Path, engine: FakeEngine) -> None:
    manager = ModelManager("m", tmp_path / "m", engine, policy=VersionPolicy("latest", 2))
    for version in (1, 2, 3):
        publish(manager.model_dir, version)
    manager.poll()
    assert manager.loaded_versions == [2, 3]
    publish(manager.model_dir, 4)
    manager.poll()
    assert manager.loaded_versions == [3, 4]
    assert states(manager) == {4: AVAILABLE, 3: AVAILABLE, 2: END}
    assert engine.loaded == ["3", "2", "4"]  # newest first, never version 1


def test_policy_specific_ignores_newer_versions(tmp_path: Path, engine: FakeEngine) -> None:
    manager = ModelManager(
        "m", tmp_path / "m", engine, policy=VersionPolicy("specific", versions=frozenset({1}))
    )
    publish(manager.model_dir, 1)
    publish(manager.model_dir, 2)
    manager.poll()
    assert manager.loaded_versions == [1]
    with pytest.raises(NotFound):
        manager.resolve(spec(version=2))


def test_versions_waiting_for_their_turn_are_in_start(tmp_path: Path, engine: FakeEngine) -> None:
    manager = ModelManager("m", tmp_path / "m", engine, policy=VersionPolicy("all"))
    publish(manager.model_dir, 1)
    publish(manager.model_dir, 2)
    seen: list[dict[int, int]] = []
    engine.during_load = lambda path: seen.append(states(manager))
    manager.poll()
    assert seen == [{2: LOADING, 1: START}, {2: AVAILABLE, 1: LOADING}]


class SignatureServable(FakeServable):
    """A servable with one signature (images: -1×2×2×3 float32); records what it ran."""

    def __init__(self, path: Path, manager: Callable[[], ModelManager]) -> None:
        super().__init__(path)
        self.runs: list[tuple[tuple[int, ...], int | None]] = []
        self._manager = manager
        signature = meta_graph_pb2.SignatureDef(method_name="tensorflow/serving/predict")
        info = signature.inputs["images"]
        info.dtype = 1  # DT_FLOAT
        for size in (-1, 2, 2, 3):
            info.tensor_shape.dim.add(size=size)
        signature.outputs["scores"].dtype = 1
        self._signatures = {"serving_default": signature}

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return self._signatures

    @property
    def signature_names(self) -> frozenset[str]:
        return frozenset(self._signatures)

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        version = int(self.path.name)
        self.runs.append((inputs["images"].shape, states(self._manager())[version]))
        return {"scores": inputs["images"].sum(axis=(1, 2, 3))}


def test_warm_up_runs_before_the_version_is_available(tmp_path: Path) -> None:
    engine = FakeEngine()
    engine.make = lambda path: SignatureServable(path, lambda: manager)
    manager = ModelManager("m", tmp_path / "m", engine)
    publish(manager.model_dir, 1)
    manager.poll()
    assert engine.made[0].runs == [((1, 2, 2, 3), LOADING)]  # zeros, batch of one, not yet served

    # A SavedModel with TF Serving's warm-up file: its requests are replayed instead.
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_log_pb2

    from scanwatch import tensors
    from services.model_server.warmup import WARMUP_FILE

    version = publish(manager.model_dir, 2)
    (version / WARMUP_FILE).parent.mkdir()
    with tf.io.TFRecordWriter(str(version / WARMUP_FILE)) as writer:
        for count in (3, 5):
            log = prediction_log_pb2.PredictionLog()
            log.predict_log.request.inputs["images"].CopyFrom(
                tensors.to_tensor_proto(np.ones((count, 2, 2, 3), np.float32))
            )
            writer.write(log.SerializeToString())
    manager.poll()
    assert engine.made[1].runs == [((3, 2, 2, 3), LOADING), ((5, 2, 2, 3), LOADING)]
    assert states(manager) == {2: AVAILABLE, 1: END}


def test_failing_warm_up_fails_the_load(tmp_path: Path) -> None:
    class Broken(SignatureServable):
        def run(self, *args: object, **kwargs: object) -> dict[str, np.ndarray]:
            raise ValueError("kernel missing")

    engine = FakeEngine()
    engine.make = lambda path: Broken(path, lambda: manager)
    manager = ModelManager("m", tmp_path / "m", engine)
    publish(manager.model_dir, 1)
    manager.poll()
    status = dict(manager.statuses(spec()))[1]
    assert (status.state, status.error_code) == (END, 2)
    assert "kernel missing" in status.error_message
    with pytest.raises(Unavailable):
        manager.resolve(spec())
