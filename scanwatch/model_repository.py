"""The model repository's layout, TensorFlow Serving's: ``<repository>/<name>/<version>/``.

Versions are integer folder names; a version is servable once it holds ``saved_model.pb``.
Anything else (hidden temporary folders of a publish in progress, stray files) is ignored by
every reader, as TF Serving ignores it. No TensorFlow import here: listing versions is cheap.

A contract between training (which publishes), the model server (which serves) and the worker
(which names the model it asks for).
"""

from __future__ import annotations

import re
from pathlib import Path

#: The model every service uses unless configured otherwise: its folder in the repository, the
#: name the worker asks the model server for, and the name training publishes under.
DEFAULT_MODEL_NAME = "brain-mri-anomaly"
SAVED_MODEL_FILE = "saved_model.pb"
#: Prefix of the temporary folders a publish writes into (not an integer: servers ignore it).
TEMP_PREFIX = ".tmp-"
_VERSION = re.compile(r"[0-9]+")


def version_folders(model_dir: Path) -> dict[int, Path]:
    """Integer-named sub-folders of ``model_dir`` (complete or not), by version."""
    if not model_dir.is_dir():
        return {}
    return {
        int(p.name): p for p in model_dir.iterdir() if p.is_dir() and _VERSION.fullmatch(p.name)
    }


def published_versions(model_dir: Path) -> list[int]:
    """Servable versions under ``model_dir``, ascending: integer folders holding a SavedModel."""
    folders = version_folders(model_dir)
    return sorted(v for v, p in folders.items() if (p / SAVED_MODEL_FILE).is_file())
