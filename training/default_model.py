"""Publish a first, untrained model so a fresh installation serves real forward passes.

``python -m training.default_model --repository var/models`` builds an EfficientNetB0 classifier
from scratch (fixed seed, no training) and publishes it as version 1 when the model has no
version yet; otherwise it does nothing. Training jobs publish the versions that follow.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from scanwatch.logs import configure_logging
from training.repository import published_versions

logger = logging.getLogger(__name__)

DEFAULT_NAME = "brain-mri-anomaly"
CLASS_NAMES = ("normal", "mass", "bleed", "infarct")
THRESHOLD = 0.5
SEED = 0
VARIANT = "B0"


def ensure_default_model(repository: Path, name: str = DEFAULT_NAME, image_size: int = 224) -> Path:
    """Return the model's newest version folder, publishing version 1 first if there is none."""
    model_dir = Path(repository) / name
    versions = published_versions(model_dir)
    if versions:
        logger.info(
            "model already has a version; nothing to do",
            extra={"model_name": name, "model_version": versions[-1]},
        )
        return model_dir / str(versions[-1])
    # Imported here so that ``--help`` and the "already published" path skip TensorFlow.
    from training.export import export_saved_model
    from training.model import build_classifier

    model = build_classifier(CLASS_NAMES, image_size=image_size, variant=VARIANT, seed=SEED)
    path = export_saved_model(model, CLASS_NAMES, THRESHOLD, Path(repository), name, version=1)
    logger.info(
        "published untrained default model",
        extra={"model_name": name, "model_version": 1, "path": str(path)},
    )
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.default_model",
        description="Publish an untrained EfficientNetB0 as version 1 if the model has none.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=Path("var/models"),
        help="model repository (TF Serving layout); default var/models",
    )
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"model name; default {DEFAULT_NAME}")
    parser.add_argument(
        "--image-size", type=int, default=224, help="square input size in pixels; default 224"
    )
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    args = parser.parse_args(argv)
    configure_logging("training", args.log_level)
    ensure_default_model(args.repository, args.name, args.image_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
