"""Put the default model into a fresh model repository as version 1.

``python -m training.default_model --repository var/models`` (the bootstrap runs it) does
nothing when the model already has a served version. Otherwise it publishes the model shipped
in ``training/default_model/``: an EfficientNetB0 trained from scratch by this pipeline on the
MNI152 benchmark (``python -m training train``; its held-out report is
``training/default_model/evaluation.md``). The copy is atomic (temporary folder, fsync, rename)
and the version is recorded in the registry as serving, with the shipped report's macro-F1 and
dataset fingerprint, so that a retrained candidate is promoted only if it is at least as good.

``--untrained`` publishes an untrained classifier instead (fixed seed, no training): the fast
path for tests that need any servable model, and the fallback when the shipped model is absent.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import uuid
from pathlib import Path

from scanwatch.durable import publish_dir
from scanwatch.logs import configure_logging
from scanwatch.model_repository import (
    DEFAULT_MODEL_NAME,
    SAVED_MODEL_FILE,
    TEMP_PREFIX,
    published_versions,
)
from training.registry import SERVING, Registry

logger = logging.getLogger(__name__)

CLASS_NAMES = ("normal", "mass", "bleed", "infarct")
THRESHOLD = 0.5
SEED = 0
VARIANT = "B0"
#: The trained default model shipped with the code: a SavedModel and its evaluation report.
SHIPPED = Path(__file__).resolve().parent / "default_model"
SHIPPED_MODEL = "saved_model"
SHIPPED_REPORT = "evaluation.json"
#: Input size of the untrained fallback.
UNTRAINED_IMAGE_SIZE = 128


def shipped_available(source: Path = SHIPPED) -> bool:
    return (source / SHIPPED_MODEL / SAVED_MODEL_FILE).is_file()


def publish_shipped(repository: Path, name: str, source: Path = SHIPPED) -> Path:
    """Copy the shipped SavedModel to ``<repository>/<name>/1`` and register it as serving."""
    model_dir = Path(repository) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    temp = model_dir / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    target = model_dir / "1"
    try:
        shutil.copytree(source / SHIPPED_MODEL, temp)
        publish_dir(temp, target)  # versions are never overwritten: FileExistsError
    finally:
        if temp.exists():
            shutil.rmtree(temp, ignore_errors=True)
    report = json.loads((source / SHIPPED_REPORT).read_text())
    metrics = {
        "macro_f1": report["macro_f1"],
        "accuracy": report["accuracy"],
        "weighted_f1": report["weighted_avg"]["f1-score"],
    }
    Registry(repository).register_existing(
        name,
        1,
        status=SERVING,
        dataset_fingerprint=report.get("dataset_fingerprint"),
        metrics=metrics,
        class_names=list(report["class_names"]),
        threshold=float(report.get("anomaly", {}).get("threshold", THRESHOLD)),
        note="default model shipped with scanwatch (MNI152 benchmark)",
    )
    return target


def publish_untrained(repository: Path, name: str, image_size: int) -> Path:
    """Build an untrained classifier (seeded) and publish it as version 1."""
    from training.export import export_saved_model
    from training.model import build_classifier

    model = build_classifier(CLASS_NAMES, image_size=image_size, variant=VARIANT, seed=SEED)
    path = export_saved_model(model, CLASS_NAMES, THRESHOLD, Path(repository), name, version=1)
    Registry(repository).register_existing(
        name,
        1,
        status=SERVING,
        dataset_fingerprint=None,
        metrics={},
        class_names=list(CLASS_NAMES),
        threshold=THRESHOLD,
        note="untrained (fixed seed)",
    )
    return path


def ensure_default_model(
    repository: Path,
    name: str = DEFAULT_MODEL_NAME,
    *,
    untrained: bool = False,
    image_size: int = UNTRAINED_IMAGE_SIZE,
    source: Path = SHIPPED,
) -> Path:
    """Return the model's newest version folder, publishing version 1 first if there is none."""
    model_dir = Path(repository) / name
    versions = published_versions(model_dir)
    if versions:
        logger.info(
            "model already has a version; nothing to do",
            extra={"model_name": name, "model_version": versions[-1]},
        )
        return model_dir / str(versions[-1])
    if not untrained and shipped_available(source):
        path = publish_shipped(repository, name, source)
        logger.info(
            "published the shipped default model",
            extra={"model_name": name, "model_version": 1, "path": str(path)},
        )
        return path
    if not untrained:
        logger.warning(
            "no shipped default model; publishing an untrained one", extra={"source": str(source)}
        )
    path = publish_untrained(repository, name, image_size)
    logger.info(
        "published untrained default model",
        extra={"model_name": name, "model_version": 1, "path": str(path)},
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.default_model",
        description="Publish the default model as version 1 if the model has no version.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("var/models"),
        help="model repository (TF Serving layout); default var/models",
    )
    parser.add_argument(
        "--name", default=DEFAULT_MODEL_NAME, help=f"model name; default {DEFAULT_MODEL_NAME}"
    )
    parser.add_argument(
        "--untrained",
        action="store_true",
        help="publish an untrained classifier instead of the shipped trained one (tests)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=UNTRAINED_IMAGE_SIZE,
        help=f"input size of the untrained model; default {UNTRAINED_IMAGE_SIZE}",
    )
    parser.add_argument("--source", type=Path, default=SHIPPED, help=argparse.SUPPRESS)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging("training", args.log_level)
    ensure_default_model(
        args.repository,
        args.name,
        untrained=args.untrained,
        image_size=args.image_size,
        source=args.source,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
