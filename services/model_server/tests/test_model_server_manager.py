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
from services.model_server.manager import AVAILABLE, END, LOADING, ModelManager

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

    def load(self, path: Path) -> FakeServable:
        self.during_load(path)
        if (path / "saved_model.pb").read_bytes() == BROKEN:
            raise ValueError("not a SavedModel")
        self.loaded.append(path.name)
        return FakeServable(path)


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
