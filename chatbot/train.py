"""Train the chatbot's Rasa model when, and only when, its training inputs changed.

The model is named by the SHA-256 of ``config.yml``, ``domain.yml`` and ``data/`` (file names and
contents), so the same inputs never train twice. The chosen model is made the newest file in
``--out``: ``rasa run --model <out>`` loads the newest one. Run with the chatbot's virtualenv::

    .venv-rasa/bin/python chatbot/train.py --out var/chatbot/models
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent
INPUTS = ("config.yml", "domain.yml", "data")


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder of trained models")
    args = parser.parse_args(argv)
    out: Path = args.out.resolve()
    name = f"patient-{content_hash()}"
    model = out / f"{name}.tar.gz"
    if model.exists():
        os.utime(model)  # the newest again, in case an older input set was trained since
        sys.stderr.write(f"chatbot model {model.name} is up to date\n")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(f"training the chatbot model {model.name}\n")
    env = {**os.environ, "RASA_TELEMETRY_ENABLED": "false", "TF_CPP_MIN_LOG_LEVEL": "2"}
    rasa = Path(sys.executable).with_name("rasa")
    subprocess.run(
        [str(rasa), "train", "--quiet", "--out", str(out), "--fixed-model-name", name],
        cwd=PROJECT,
        env=env,
        check=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
