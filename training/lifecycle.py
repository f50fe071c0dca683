"""A training job from data to served model: train, evaluate, export, register, promote.

Used by the CLI (``python -m training train``) and by the training worker, so both follow the
same rules:

1. a version number is reserved in the registry before anything is written (two jobs never
   write the same version);
2. the model is trained in its run folder (resumable; on a study benchmark it keeps the epoch
   that tells the validation studies' lesion slices from their normal studies best,
   :func:`training.study_evaluation.epoch_selection`),
   evaluated on the held-out test split
   (report: JSON, Markdown, PNG plots), exported with the contract signature into the staging
   area, and registered as a candidate with its dataset fingerprint and metrics;
3. it is promoted (moved into the served folder) only if it is at least as good as the served
   version *on the same held-out set*: when the served version was measured on other data, it is
   re-evaluated on the candidate's test split first. On a study benchmark the comparison is
   study-level (``scanwatch.model_registry.STUDY_PROMOTION_METRICS``, the served version scored
   with its own study rule); otherwise held-out macro-F1. On a study benchmark the temperature,
   study rule and threshold are chosen on the validation studies first
   (:func:`training.study_evaluation.evaluate_study_benchmark`) and exported with the model;
4. every change of the served version announces ``model.published.v1``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from scanwatch.imaging import INPUT_CONTEXTS, NEIGHBOURS, NO_CONTEXT
from scanwatch.model_registry import (
    EVALUATION_DIR,
    STUDY_PROMOTION_METRICS,
    ModelVersion,
    PromotionRefused,
    Registry,
    study_metrics,
)
from scanwatch.study_score import LEGACY_RULE, StudyRule
from schemas.training_events import DatasetSpec, ModelPublishedV1
from training.calibration import apply_temperature
from training.config import TrainSettings
from training.dataset import LabelledImages
from training.evaluate import evaluate_probabilities, write_report
from training.events import EventPublisher, NoEvents
from training.input_pipeline import inference_stream
from training.study_evaluation import (
    StudyBenchmarkLike,
    StudySetLike,
    epoch_selection,
    evaluate_study_benchmark,
    flat_study_metrics,
    promotion_metrics,
)
from training.train import DATASET_FILE, Progress, train

if TYPE_CHECKING:
    from training.study_dataset import StudyBenchmark

logger = logging.getLogger(__name__)

DATASET_COPY = "dataset.npz"
#: Default input size per dataset kind (the benchmark's is its config's).
DEFAULT_IMAGE_SIZE = 128


@dataclass(frozen=True)
class JobOutcome:
    """What a job produced."""

    model_name: str
    version: int
    report: dict[str, Any]
    promoted: bool
    previous_version: int | None
    reason: str | None
    run_dir: Path


@dataclass(frozen=True)
class StudiesSpec:
    """The study benchmark (``--dataset studies``). Not a ``DatasetSpec`` kind: the published
    ``training.job.requested.v1`` never changes, so jobs over Kafka cannot ask for it until a
    v2 of that event exists; the CLI can."""

    preset: str = "default"
    image_size: int | None = None
    kind: str = "studies"
    #: Render the training slices' neighbours even for a model without context (the same
    #: training slices as a ``neighbours`` run: a like-for-like comparison of the two).
    train_neighbours: bool = False
    #: Leave out of training the lesion slices where the lesion is narrower than this (mm;
    #: 0: none). Validation and test keep every slice.
    min_lesion_mm: float = 0.0
    #: More training studies beside the preset's (``StudyConfig.extra_train_studies``): the
    #: same validation and test studies, more data to learn from.
    extra_train_studies: int = 0


class ContextUnavailable(ValueError):
    """An input context was asked of a dataset that does not know its slices' order."""


class MasksUnavailable(ValueError):
    """A mask head was asked of a dataset that does not know where its lesions are."""


def load_dataset(
    spec: DatasetSpec | StudiesSpec,
    settings: TrainSettings,
    run_dir: Path,
    normal_class: str | None = None,
    labels_csv: Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[LabelledImages, Path]:
    """Build or load the dataset a job names; return it and an ``.npz`` holding it."""
    from training import loaders, study_dataset, synthetic_dataset

    size = spec.image_size or DEFAULT_IMAGE_SIZE
    if settings.context != NO_CONTEXT and not isinstance(spec, StudiesSpec):
        raise ContextUnavailable(
            f"context {settings.context!r} needs each slice's neighbours in slice order, which "
            f"only the studies dataset knows; the {spec.kind} dataset does not"
        )
    if settings.mask_weight and not isinstance(spec, StudiesSpec):
        raise MasksUnavailable(
            f"a mask head learns where each lesion is, which only the studies dataset knows; "
            f"the {spec.kind} dataset does not"
        )
    if isinstance(spec, StudiesSpec):
        if spec.preset not in study_dataset.PRESETS:
            raise ValueError(
                f"the studies dataset has presets {', '.join(study_dataset.PRESETS)}, "
                f"not {spec.preset!r}"
            )
        studies = study_dataset.PRESETS[spec.preset]
        if spec.image_size is not None:
            studies = replace(studies, image_size=size)
        if settings.context == NEIGHBOURS or spec.train_neighbours:
            studies = replace(studies, train_neighbours=True)
        if spec.extra_train_studies:
            studies = replace(studies, extra_train_studies=spec.extra_train_studies)
        if settings.mask_weight:
            studies = replace(studies, lesion_masks=True)
        bench = study_dataset.load_or_build(studies, settings.cache_dir, progress)
        return (
            bench.slice_dataset(settings.context, spec.min_lesion_mm),
            study_dataset.cache_path(studies, settings.cache_dir),
        )
    if spec.kind == "benchmark":
        config = synthetic_dataset.PRESETS[spec.preset]
        if spec.image_size is not None:
            config = synthetic_dataset.BenchmarkConfig(**{**config.__dict__, "image_size": size})
        data = synthetic_dataset.load_or_build(config, settings.cache_dir, progress)
        return data, synthetic_dataset.cache_path(config, settings.cache_dir)
    root = Path(spec.path or "")
    if spec.kind == "folder":
        data = loaders.load_class_folders(root, size, settings.seed, normal_class)
    elif spec.kind == "ham10000":
        data = loaders.load_ham10000(
            root, size, settings.seed, normal_class=normal_class or loaders.HAM_NORMAL
        )
    else:
        data = loaders.load_dicom(
            root, labels_csv or root / "labels.csv", size, settings.seed, normal_class
        )
    copy = Path(run_dir) / DATASET_COPY
    data.save(copy)
    return data, copy


def predict_keras(model: Any, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    return np.asarray(model.predict(inference_stream(images, batch_size), verbose=0))


def predict_saved_model(path: Path, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Probabilities of a published SavedModel through its serving signature.

    Images are resized to the model's input size when it differs (a served model of another
    size is compared on the same images, resampled).
    """
    return predict_saved_model_with_rule(path, images, batch_size)[0]


def predict_saved_model_with_rule(
    path: Path, images: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, StudyRule]:
    """:func:`predict_saved_model` and the study rule the model ships with (its ``study_rule``
    output; :data:`scanwatch.study_score.LEGACY_RULE`, the study mean, for a model without one)."""
    import tensorflow as tf

    from schemas.model_signature import SIGNATURE_NAME, STUDY_RULE

    serve = tf.saved_model.load(str(path)).signatures[SIGNATURE_NAME]
    size = serve.structured_input_signature[1]["images"].shape[1]
    out = []
    rule = LEGACY_RULE
    for batch in inference_stream(images, batch_size):
        if size is not None and batch.shape[1] != size:
            batch = tf.image.resize(batch, (size, size))
        result = serve(images=tf.cast(batch, tf.float32))
        out.append(result["probabilities"].numpy())
        if STUDY_RULE.name in result and len(out) == 1:
            rule = StudyRule.from_json(result[STUDY_RULE.name].numpy()[0])
    return np.concatenate(out), rule


def serving_baseline(
    registry: Registry, name: str, data: LabelledImages, fingerprint: str, threshold: float
) -> float | None:
    """The served version's macro-F1 on this candidate's held-out set (None: nothing served)."""
    served = registry.served_versions(name)
    if not served:
        return None
    try:
        record = registry.get(name, served[-1])
    except LookupError:
        record = None
    if (
        record is not None
        and record.dataset_fingerprint == fingerprint
        and record.macro_f1 is not None
    ):
        return record.macro_f1
    if (
        record is not None
        and record.class_names
        and list(record.class_names) != list(data.class_names)
    ):
        logger.info(
            "served model has other classes; it scores 0 on this data",
            extra={"model_version": served[-1]},
        )
        return 0.0
    probabilities = predict_saved_model(
        registry.model_dir(name) / str(served[-1]), data.test.images
    )
    if probabilities.shape[1] != len(data.class_names):
        return 0.0
    report = evaluate_probabilities(probabilities, data.test.labels, data.class_names, threshold)
    logger.info(
        "served version re-evaluated on the candidate's held-out set",
        extra={"model_version": served[-1], "macro_f1": report["macro_f1"]},
    )
    return float(report["macro_f1"])


def serving_study_baseline(
    registry: Registry,
    name: str,
    class_names: tuple[str, ...] | list[str],
    test: StudySetLike,
    fingerprint: str,
) -> tuple[float, float] | None:
    """The served version's study-level promotion metrics on this candidate's test studies, each
    study scored with the served version's own study rule (None: nothing served).

    Recorded metrics are used when the served version was measured on the same data; a served
    model with other classes scores 0.
    """
    served = registry.served_versions(name)
    if not served:
        return None
    try:
        record = registry.get(name, served[-1])
    except LookupError:
        record = None
    if record is not None and record.dataset_fingerprint == fingerprint:
        recorded = study_metrics(record.metrics)
        if recorded is not None:
            return recorded
    if record is not None and record.class_names and list(record.class_names) != list(class_names):
        return (0.0, 0.0)
    from training.study_dataset import study_inputs

    location = registry.model_dir(name) / str(served[-1])
    # The served version's own input context first (its study rule), then its inputs.
    rule = predict_saved_model_with_rule(location, test.images[:1])[1]
    probabilities = predict_saved_model(location, study_inputs(test, rule.context))
    if probabilities.shape[1] != len(class_names):
        return (0.0, 0.0)
    from schemas.model_signature import NORMAL_CLASS

    baseline = promotion_metrics(probabilities, test, list(class_names).index(NORMAL_CLASS), rule)
    logger.info(
        "served version re-evaluated on the candidate's test studies",
        extra={
            "model_version": served[-1],
            "study_rule": rule.name,
            **dict(zip(STUDY_PROMOTION_METRICS, baseline, strict=True)),
        },
    )
    return baseline


def announce(
    events: EventPublisher,
    registry: Registry,
    name: str,
    version: int,
    action: str,
    previous: int | None,
    job_id: Any = None,
) -> None:
    record = registry.get(name, version)
    events.send(
        ModelPublishedV1(
            model_name=name,
            model_version=version,
            action=action,
            previous_version=previous,
            storage_uri=(registry.model_dir(name) / str(version)).resolve().as_uri(),
            dataset_fingerprint=record.dataset_fingerprint,
            macro_f1=record.macro_f1,
            class_names=record.class_names or ["normal", "abnormal"],
            threshold=record.threshold if record.threshold is not None else 0.5,
            job_id=job_id,
        ),
        key=name,
    )


def promote(
    registry: Registry,
    name: str,
    version: int,
    events: EventPublisher,
    force: bool = False,
    job_id: Any = None,
    study_test: StudySetLike | None = None,
) -> int | None:
    """Promote a registered version (with the held-out comparison); announce it when done.

    ``study_test``: the candidate's test studies, when it was trained on a study benchmark (the
    comparison is then study-level, see :func:`serving_study_baseline`)."""
    record = registry.get(name, version)
    baseline = None
    study_baseline = None
    studied = study_metrics(record.metrics) is not None
    if not force and study_test is None and record.dataset_path:
        path = Path(record.dataset_path)
        bench = study_benchmark_at(path) if path.is_file() else None
        data = None
        if bench is not None:  # the slice data the candidate was trained on, in its context
            contexts = INPUT_CONTEXTS if bench.train.context_only is not None else (NO_CONTEXT,)
            min_lesion_mm = _trained_min_lesion_mm(record)
            for context in contexts:
                data = bench.slice_dataset(context, min_lesion_mm)
                if data.fingerprint() == record.dataset_fingerprint:
                    break
        if data is None and path.is_file():
            data = LabelledImages.load(path)
        if data is not None and data.fingerprint() == record.dataset_fingerprint:
            if bench is not None and studied:
                study_test = bench.test
            else:
                baseline = serving_baseline(
                    registry, name, data, record.dataset_fingerprint or "", record.threshold or 0.5
                )
    if not force and study_test is not None and studied:
        study_baseline = serving_study_baseline(
            registry, name, record.class_names, study_test, record.dataset_fingerprint or ""
        )
    previous = registry.promote(
        name, version, serving_macro_f1=baseline, serving_study=study_baseline, force=force
    )
    announce(events, registry, name, version, "promoted", previous, job_id)
    logger.info(
        "version promoted",
        extra={"model_name": name, "model_version": version, "previous_version": previous},
    )
    return previous


def _trained_min_lesion_mm(record: ModelVersion) -> float:
    """The lesion-width filter of the version's training slices, as its run recorded it."""
    path = Path(record.run_dir) / DATASET_FILE if record.run_dir else None
    if path is None or not path.is_file():
        return 0.0
    description = json.loads(path.read_text()).get("description", {})
    return float(description.get("train_min_lesion_mm", 0.0))


def rollback(
    registry: Registry, name: str, events: EventPublisher, to_version: int | None = None
) -> tuple[int, int]:
    withdrawn, served = registry.rollback(name, to_version)
    announce(events, registry, name, served, "rolled-back", withdrawn)
    logger.info(
        "rolled back",
        extra={"model_name": name, "withdrawn_version": withdrawn, "model_version": served},
    )
    return withdrawn, served


def run_job(
    data: LabelledImages,
    dataset_path: Path,
    settings: TrainSettings,
    run_dir: Path,
    *,
    registry: Registry | None = None,
    events: EventPublisher | None = None,
    progress: Progress | None = None,
    promote_if_better: bool = True,
    job_id: Any = None,
    on_reserved: Callable[[int], None] | None = None,
    studies: StudyBenchmarkLike | None = None,
) -> JobOutcome:
    """Train → evaluate → export to staging → register → (promote). See the module docstring.

    ``studies``: the study benchmark ``data`` was made from (its slice dataset): the temperature,
    study rule and threshold are then chosen on its validation studies, reported on its test
    studies, exported with the model, and promotion compares study-level metrics."""
    from training.export import export_saved_model

    registry = registry or Registry(settings.repository)
    events = events or NoEvents()
    name = settings.model_name
    run_dir = Path(run_dir)
    version = registry.reserve(name, job_id=str(job_id) if job_id else None, run_dir=str(run_dir))
    if on_reserved is not None:
        on_reserved(version)
    if studies is None:
        studies = study_benchmark_at(Path(dataset_path))
    try:
        # On whole studies the run keeps the epoch that tells lesion slices from normal studies
        # best on validation (not the best lesion-class macro-F1).
        select = (
            epoch_selection(studies, settings, settings.context) if studies is not None else None
        )
        result = train(data, settings, run_dir, progress, select)
        probabilities = predict_keras(result.model, data.test.images, settings.batch_size)
        threshold, temperature, rule, study_report = settings.threshold, 1.0, None, None
        if studies is not None:
            threshold, temperature, rule, study_report = _study_decisions(
                result.model, studies, settings
            )
            # The slice table describes what the exported model returns: tempered probabilities.
            probabilities = apply_temperature(probabilities, temperature)
        # The slice table's anomaly line stays on the slice scale (settings.threshold): the
        # study threshold is on the calibrated study score, reported in the study section.
        report = evaluate_probabilities(
            probabilities, data.test.labels, data.class_names, settings.threshold
        )
        if study_report is not None:
            report["study"] = study_report
        write_report(
            report,
            run_dir / EVALUATION_DIR,
            probabilities=probabilities,
            labels=data.test.labels,
            history=result.state.history,
            title=f"{name} version {version} — held-out test split",
            extra={
                "model_name": name,
                "model_version": version,
                "dataset_fingerprint": result.dataset_fingerprint,
                "dataset": data.summary(),
                "best_epoch": result.state.best_epoch,
                "epochs_run": result.state.epoch,
            },
        )
        export_saved_model(
            result.model,
            data.class_names,
            threshold,
            registry.repository / ".staging",
            name,
            version=version,
            temperature=temperature,
            study_rule=rule,
        )
        registry.record_candidate(
            name,
            version,
            dataset_fingerprint=result.dataset_fingerprint,
            metrics=flat_metrics(report)
            | (flat_study_metrics(study_report) if study_report is not None else {}),
            class_names=list(data.class_names),
            threshold=threshold,
            dataset_path=str(Path(dataset_path).resolve()),
        )
    except BaseException as error:
        registry.mark_failed(name, version, f"{type(error).__name__}: {error}")
        raise
    promoted, previous, reason = False, None, None
    if promote_if_better:
        try:
            previous = promote(
                registry,
                name,
                version,
                events,
                job_id=job_id,
                study_test=studies.test if studies is not None else None,
            )
            promoted = True
        except PromotionRefused as refusal:
            reason = str(refusal)
            logger.warning("candidate not promoted", extra={"reason": reason})
    return JobOutcome(name, version, report, promoted, previous, reason, run_dir)


def study_benchmark_at(path: Path) -> StudyBenchmark | None:
    """The study benchmark stored at ``path`` (``training.study_dataset``'s ``.npz``), or None
    when the file holds another kind of dataset: a job or a promotion that finds one evaluates
    and compares on its studies."""
    from training.study_dataset import StudyBenchmark

    try:
        with np.load(path, allow_pickle=False) as stored:
            is_studies = "test_study_index" in stored.files
    except (OSError, ValueError):
        return None
    return StudyBenchmark.load(path) if is_studies else None


def _study_decisions(
    model: Any, studies: StudyBenchmarkLike, settings: TrainSettings
) -> tuple[float, float, StudyRule, dict[str, Any]]:
    """Threshold, temperature, study rule and the study report, chosen on validation studies."""
    rule, threshold, temperature, study_report = evaluate_study_benchmark(
        model, studies, settings, settings.context
    )
    logger.info(
        "study rule chosen on validation studies",
        extra={"study_rule": rule.name, "threshold": threshold, "temperature": temperature},
    )
    return threshold, temperature, rule, study_report


def flat_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The numbers an event or a registry row carries (macro/weighted F1, accuracy, AUC...)."""
    flat = {
        "macro_f1": report["macro_f1"],
        "weighted_f1": report["weighted_avg"]["f1-score"],
        "accuracy": report["accuracy"],
    }
    if report["roc_auc"]["macro"] is not None:
        flat["roc_auc_macro"] = report["roc_auc"]["macro"]
    for name, row in report["per_class"].items():
        flat[f"f1_{name}"] = row["f1-score"]
    return {k: float(v) for k, v in flat.items()}
