"""``chatbot/train.py``: a model is trained once per set of inputs, and a model trained earlier
on this machine is copied from the cache instead of trained again."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import train

PROJECT = Path(train.__file__).resolve().parent


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A copy of the training inputs, free to change."""
    copy = tmp_path / "project"
    copy.mkdir()
    for name in train.INPUTS:
        source = PROJECT / name
        if source.is_dir():
            shutil.copytree(source, copy / name)
        else:
            shutil.copyfile(source, copy / name)
    return copy


class Trainer:
    """Stands in for ``rasa train``: writes a model file and counts its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, out: Path, name: str) -> None:
        self.calls.append(name)
        (out / f"{name}.tar.gz").write_bytes(f"model {len(self.calls)}".encode())


def test_a_model_is_trained_once_then_copied_from_the_cache(project: Path, tmp_path: Path) -> None:
    cache, trainer = tmp_path / "cache", Trainer()
    first = train.ensure_model(tmp_path / "clone-1", cache, project=project, train=trainer)
    assert len(trainer.calls) == 1 and first.read_bytes() == b"model 1"
    assert (cache / first.name).read_bytes() == b"model 1"

    # The same clone again: nothing to do. A fresh clone: copied, not trained.
    assert train.ensure_model(tmp_path / "clone-1", cache, project=project, train=trainer) == first
    second = train.ensure_model(tmp_path / "clone-2", cache, project=project, train=trainer)
    assert len(trainer.calls) == 1
    assert second.name == first.name and second.read_bytes() == b"model 1"
    assert [p.name for p in (tmp_path / "clone-2").iterdir()] == [first.name]  # no partial file


@pytest.mark.parametrize("changed", train.INPUTS)
def test_any_changed_input_trains_a_new_model(project: Path, tmp_path: Path, changed: str) -> None:
    cache, trainer = tmp_path / "cache", Trainer()
    before = train.ensure_model(tmp_path / "out", cache, project=project, train=trainer)
    path = project / changed
    file = sorted(path.rglob("*.yml"))[0] if path.is_dir() else path
    file.write_text(file.read_text() + "\n# changed\n")
    after = train.ensure_model(tmp_path / "out", cache, project=project, train=trainer)
    assert after.name != before.name and len(trainer.calls) == 2
    assert sorted(p.name for p in cache.iterdir()) == sorted([before.name, after.name])


def test_without_a_cache_the_model_is_trained_in_place(project: Path, tmp_path: Path) -> None:
    trainer = Trainer()
    model = train.ensure_model(tmp_path / "out", project=project, train=trainer)
    assert trainer.calls == [model.name.removesuffix(".tar.gz")] and model.is_file()
