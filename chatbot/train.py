"""Train the chatbot's Rasa model when, and only when, its training inputs changed.

The model is named by the SHA-256 of ``config.yml``, ``domain.yml``, ``data/`` and the
virtualenv's ``requirements.lock`` (file names and contents), so the same inputs never train
twice. With ``--cache``, a model trained once on this machine is copied from there instead of
trained again (a fresh clone, CI): training takes minutes, and the name says exactly what it was
trained from. The chosen model is made the newest file in ``--out``: ``rasa run --model <out>``
loads the newest one. Run with the chatbot's virtualenv::

    .venv-rasa/bin/python chatbot/train.py --out var/chatbot/models [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

PROJECT = Path(__file__).resolve().parent
INPUTS = ("config.yml", "domain.yml", "data", "requirements.lock")


def content_hash(project: Path = PROJECT) -> str:
    """The hash of every training input: a change to any of them gives a new model name."""
    digest = hashlib.sha256()
    for name in INPUTS:
        path = project / name
        files = sorted(path.rglob("*.yml")) if path.is_dir() else [path]
        for file in files:
            digest.update(str(file.relative_to(project)).encode() + b"\0")
            digest.update(file.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def rasa_train(out: Path, name: str) -> None:
    """``rasa train`` into ``out/<name>.tar.gz`` (minutes)."""
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rasa = Path(sys.executable).with_name("rasa")
    subprocess.run(
        [str(rasa), "train", "--quiet", "--out", str(out), "--fixed-model-name", name],
        cwd=PROJECT,
        env=env,
        check=True,
    )


def _copy_into(source: Path, folder: Path) -> Path:
    """Copy ``source`` into ``folder`` under its own name; a reader never sees half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    partial = folder / f".{source.name}.{uuid.uuid4().hex}.partial"
    try:
        shutil.copyfile(source, partial)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def ensure_model(
    out: Path,
    cache: Path | None = None,
    *,
    project: Path = PROJECT,
    train: Callable[[Path, str], None] = rasa_train,
) -> Path:
    """The model of the current inputs in ``out``, the newest file there: found, copied from
    ``cache``, or trained (and then kept in ``cache``)."""
    name = f"patient-{content_hash(project)}"
    model = out / f"{name}.tar.gz"
    cached = cache / model.name if cache is not None else None
    if model.exists():
        os.utime(model)  # the newest again, in case an older input set was trained since
        sys.stderr.write(f"chatbot model {model.name} is up to date\n")
    elif cached is not None and cached.is_file():
        _copy_into(cached, out)
        sys.stderr.write(f"chatbot model {model.name} copied from {cache}\n")
    else:
        out.mkdir(parents=True, exist_ok=True)
        sys.stderr.write(f"training the chatbot model {model.name}\n")
        train(out, name)
        if cache is not None:
            _copy_into(model, cache)
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of trained models")
    parser.add_argument(
        "--cache", type=Path, help="folder of models trained earlier on this machine (optional)"
    )
    args = parser.parse_args(argv)
    ensure_model(args.out.resolve(), args.cache.resolve() if args.cache else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
