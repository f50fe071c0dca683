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
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from scanwatch.durable import fsync_dir, publish_dir
from scanwatch.logs import configure_logging
from scanwatch.model_registry import SERVING, Registry
from scanwatch.model_repository import (
    DEFAULT_MODEL_NAME,
    SAVED_MODEL_FILE,
    TEMP_PREFIX,
    published_versions,
)
from scanwatch.saved_model import read_signature
from schemas import model_signature

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
#: A re-export may change the shipped model's probabilities by at most this (float round-off).
REEXPORT_TOLERANCE = 1e-5
REEXPORT_PROBE_SEED = 17


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


def load_shipped_classifier(source: Path = SHIPPED, image_size: int | None = None) -> Any:
    """The shipped model as a Keras classifier: :func:`training.model.build_classifier`'s
    architecture with the weights read from the shipped SavedModel's variables (every one of
    them is consumed, or this raises). How the shipped model is re-exported with new serving
    signatures without retraining it.

    ``image_size``: build it for this input size instead of the shipped one (EfficientNet's
    weights do not depend on it): what a model of that size costs to serve
    (``bench/study_scoring.py --image-size``); its scores were not trained at that size."""
    import tensorflow as tf

    from training.model import build_classifier

    report = json.loads((source / SHIPPED_REPORT).read_text())
    inputs, _ = read_signature(source / SHIPPED_MODEL)
    size = image_size or int(inputs[model_signature.INPUT.name].shape[1])
    model = build_classifier(report["class_names"], image_size=size, variant=VARIANT, seed=SEED)
    # The SavedModel's root is export.ServingModule, whose child ``model`` is the classifier.
    status = tf.train.Checkpoint(model=model).read(
        str(source / SHIPPED_MODEL / "variables" / "variables")
    )
    status.assert_consumed()
    return model


def reexport_shipped(source: Path = SHIPPED) -> Path:
    """Export the shipped model again with the current signatures, in place.

    Its ``serving_default`` probabilities must not change: both SavedModels score the same
    fixed images (:data:`REEXPORT_PROBE_SEED`) and the new one replaces the old only when they
    agree within :data:`REEXPORT_TOLERANCE`.
    """
    import numpy as np
    import tensorflow as tf

    from training.export import export_saved_model

    report = json.loads((source / SHIPPED_REPORT).read_text())
    threshold = float(report.get("anomaly", {}).get("threshold", THRESHOLD))
    model = load_shipped_classifier(source)
    staging = source / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
    try:
        exported = export_saved_model(
            model, report["class_names"], threshold, staging, "shipped", version=1
        )
        images = reexport_probe(model.input_shape[1])
        before, after = (
            tf.saved_model.load(str(path))
            .signatures[model_signature.SIGNATURE_NAME](images=tf.constant(images))["probabilities"]
            .numpy()
            for path in (source / SHIPPED_MODEL, exported)
        )
        difference = float(np.abs(before - after).max())
        if difference > REEXPORT_TOLERANCE:
            raise RuntimeError(f"re-exported probabilities differ by {difference}; kept the old")
        old = source / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        os.replace(source / SHIPPED_MODEL, old)
        os.replace(exported, source / SHIPPED_MODEL)
        shutil.rmtree(old)
        fsync_dir(source)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("re-exported the shipped model", extra={"max_difference": difference})
    return source / SHIPPED_MODEL


def reexport_probe(size: int) -> Any:
    """Fixed images (seeded uniform noise over the input's 0–255 range) on which a re-export
    compares the old and new SavedModels; ``serving_default_probe.json`` beside the shipped
    model keeps the probabilities of the model as trained on them, for the tests."""
    import numpy as np

    rng = np.random.default_rng(REEXPORT_PROBE_SEED)
    return rng.uniform(0, 255, (8, size, size, 3)).astype(np.float32)


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
    parser.add_argument(
        "--reexport-shipped",
        action="store_true",
        help="export the shipped model again in place with the current signatures (its "
        "serving_default probabilities are checked unchanged) and exit",
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging("training", args.log_level)
    if args.reexport_shipped:
        reexport_shipped(args.source)
        return 0
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
