"""``python -m training`` (``scanwatch-train``): train, evaluate, manage versions, run the worker.

Settings come from ``SCANWATCH_TRAIN_*`` (see :mod:`training.config`); flags override them.
Exit status: 0 done, 1 the job or transition was refused or failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from scanwatch.imaging import INPUT_CONTEXTS
from scanwatch.logs import configure_logging
from scanwatch.model_repository import DEFAULT_MODEL_NAME

if TYPE_CHECKING:
    from scanwatch.model_registry import Registry

logger = logging.getLogger(__name__)

DATASET_KINDS = ("benchmark", "studies", "folder", "ham10000", "dicom")


class BarProgress:
    """Rich progress bars: one for epochs, one for the steps of the current epoch."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bars = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=console,
            transient=False,
        )
        self.epoch_task: Any = None
        self.step_task: Any = None
        self.steps = 0

    def __enter__(self) -> BarProgress:
        self.bars.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bars.__exit__(*exc)

    def dataset(self, done: int, total: int) -> None:
        if getattr(self, "_data_task", None) is None:
            self._data_task = self.bars.add_task("dataset", total=total, info="")
        self.bars.update(self._data_task, completed=done)

    def on_start(self, start_epoch: int, epochs: int, steps_per_epoch: int) -> None:
        self.steps = steps_per_epoch
        self.epoch_task = self.bars.add_task("epochs", total=epochs, completed=start_epoch, info="")
        self.step_task = self.bars.add_task("  steps", total=steps_per_epoch, info="")

    def on_batch(self, step: int) -> None:
        self.bars.update(self.step_task, completed=step)

    def on_epoch(self, epoch: int, phase: str, metrics: dict[str, float]) -> None:
        info = (
            f"{phase} loss {metrics['loss']:.3f} val_loss {metrics['val_loss']:.3f} "
            f"val_macro_f1 {metrics['val_macro_f1']:.3f} lr {metrics['learning_rate']:.2g}"
        )
        if "val_lesion_slice_auroc" in metrics:  # a run on whole studies is selected by it
            info += (
                f" val_lesion_slice_auroc {metrics['val_lesion_slice_auroc']:.3f}"
                f" val_study_auroc {metrics['val_study_auroc']:.3f}"
            )
        self.bars.update(self.epoch_task, completed=epoch, info=info)
        self.bars.reset(self.step_task, total=self.steps)


def _settings(args: argparse.Namespace) -> Any:
    from training.config import TrainSettings

    overrides = {
        key: value
        for key, value in {
            "repository": getattr(args, "repository", None),
            "model_name": getattr(args, "name", None),
            "epochs": getattr(args, "epochs", None),
            "variant": getattr(args, "variant", None),
            "batch_size": getattr(args, "batch_size", None),
            "seed": getattr(args, "seed", None),
            "weights": getattr(args, "weights", None),
            "init_from": getattr(args, "init_from", None),
            "runs_dir": getattr(args, "runs_dir", None),
            "fine_tune_after": getattr(args, "fine_tune_after", None),
            "target_sensitivity": getattr(args, "target_sensitivity", None),
            "target_min_diameter_mm": getattr(args, "min_diameter_mm", None),
            "context": getattr(args, "context", None),
            "mask_weight": getattr(args, "mask_weight", None),
            "mask_stride": getattr(args, "mask_stride", None),
        }.items()
        if value is not None
    }
    return TrainSettings(**overrides)


def _non_negative(unit: str = "") -> Callable[[str], float]:
    """An argparse type: a number, 0 or more (of ``unit``, named in its messages)."""
    of = f" of {unit}" if unit else ""
    more = f"0 or more {unit}" if unit else "0 or more"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number{of}: {text!r}") from None
        if not value >= 0:
            raise argparse.ArgumentTypeError(f"must be {more}, not {text}")
        return value

    return parse


def _count(text: str) -> int:
    """An argparse type: a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


def _dataset_spec(args: argparse.Namespace) -> Any:
    from schemas.training_events import DatasetSpec
    from training.lifecycle import StudiesSpec

    if args.dataset == "studies":
        return StudiesSpec(
            preset=args.preset,
            image_size=args.image_size,
            train_neighbours=bool(getattr(args, "with_neighbours", False)),
            min_lesion_mm=getattr(args, "min_lesion_mm", None) or 0.0,
            extra_train_studies=getattr(args, "extra_train_studies", None) or 0,
        )
    for flag, why in (
        ("min_lesion_mm", "only it knows each slice's lesion width"),
        ("extra_train_studies", "only it renders studies"),
        ("mask_weight", "only it knows where each lesion is"),
    ):
        if getattr(args, flag, None):
            sys.stderr.write(
                f"--{flag.replace('_', '-')} needs --dataset studies ({why}), "
                f"not --dataset {args.dataset}\n"
            )
            raise SystemExit(2)
    return DatasetSpec(
        kind=args.dataset,
        path=str(args.path) if args.path else None,
        preset=args.preset,
        image_size=args.image_size,
    )


def _context_fits(context: str, dataset: str) -> bool:
    """Whether ``dataset`` can give ``context``'s inputs (only studies know slice order); says
    on stderr why not."""
    from scanwatch.imaging import NO_CONTEXT

    if context == NO_CONTEXT or dataset == "studies":
        return True
    sys.stderr.write(
        f"--context {context} (or SCANWATCH_TRAIN_CONTEXT={context}) needs each slice's "
        f"neighbours in slice order, which only --dataset studies has; --dataset {dataset} "
        "does not. Use --context none with it.\n"
    )
    return False


def _same_context(context: str, version: int, settings: Any) -> bool:
    """Whether the version's input context (its study rule's) is the one the data was built
    for; says on stderr what to pass when not."""
    if context == settings.context:
        return True
    sys.stderr.write(
        f"version {version} was trained with --context {context}, the data was built for "
        f"--context {settings.context}: pass --dataset studies --context {context}\n"
    )
    return False


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def cmd_train(args: argparse.Namespace) -> int:
    from training.events import publisher_for
    from training.lifecycle import load_dataset, run_job

    settings = _settings(args)
    if not _context_fits(settings.context, args.dataset):
        return 2
    spec = _dataset_spec(args)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(args.run_dir or settings.runs_dir / f"{settings.model_name}-{stamp}")
    run_dir.mkdir(parents=True, exist_ok=True)
    events = publisher_for(settings.kafka_bootstrap_servers)
    console = _console()
    try:
        with BarProgress(console) as bars:
            data, path = load_dataset(
                spec, settings, run_dir, args.normal_class, args.labels_csv, progress=bars.dataset
            )
            outcome = run_job(
                data,
                path,
                settings,
                run_dir,
                events=events,
                progress=bars,
                promote_if_better=not args.no_promote,
            )
    finally:
        events.close()
    _print_outcome(outcome)
    return 0


def _print_outcome(outcome: Any) -> None:
    from training.evaluate import markdown

    sys.stdout.write(markdown(outcome.report, f"{outcome.model_name} version {outcome.version}"))
    sys.stdout.write(f"\nrun folder: {outcome.run_dir}\n")
    if outcome.promoted:
        sys.stdout.write(
            f"promoted: version {outcome.version} is now served (was {outcome.previous_version})\n"
        )
    elif outcome.reason:
        sys.stdout.write(f"not promoted: {outcome.reason}\n")
    else:
        sys.stdout.write(f"candidate: `python -m training models promote {outcome.version}`\n")


def _saved_model(registry: Registry, name: str, version: int | None) -> tuple[int, Path] | None:
    """The version asked for (else the served one) and its SavedModel; ``None`` after saying on
    stderr why there is none."""
    served = registry.served_versions(name)
    version = version or (served[-1] if served else None)
    if version is None:
        sys.stderr.write(f"{name} has no served version; pass --version\n")
        return None
    location = registry.location(name, version)
    if location is None:
        sys.stderr.write(f"{name} version {version} has no SavedModel\n")
        return None
    return version, location


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Evaluate a published version (or a run's best weights) on a dataset's test split."""
    from scanwatch.model_registry import Registry
    from training.evaluate import evaluate_probabilities, markdown, write_report
    from training.lifecycle import (
        load_dataset,
        predict_saved_model,
        predict_saved_model_with_rule,
        study_benchmark_at,
    )
    from training.study_evaluation import evaluate_served_rule

    settings = _settings(args)
    registry = Registry(settings.repository)
    name = settings.model_name
    found = _saved_model(registry, name, args.version)
    if found is None:
        return 1
    version, location = found
    if not _context_fits(settings.context, args.dataset):
        return 2
    out = Path(args.out or settings.runs_dir / f"evaluate-{name}-{version}")
    out.mkdir(parents=True, exist_ok=True)
    data, path = load_dataset(
        _dataset_spec(args), settings, out, args.normal_class, args.labels_csv
    )
    rule = predict_saved_model_with_rule(location, data.test.images[:1])[1]
    if not _same_context(rule.context, version, settings):
        return 2
    probabilities = predict_saved_model(location, data.test.images)
    record_threshold = None
    try:
        record_threshold = registry.get(name, version).threshold
    except LookupError:
        pass
    threshold = record_threshold if record_threshold is not None else settings.threshold
    report = evaluate_probabilities(probabilities, data.test.labels, data.class_names, threshold)
    bench = study_benchmark_at(path)
    if bench is not None:  # studies: each scored with the version's own rule and threshold
        report["study"] = evaluate_served_rule(
            lambda images: predict_saved_model(location, images),
            bench,
            rule,
            settings,
            threshold=threshold,
        ).report
    write_report(
        report,
        out,
        probabilities=probabilities,
        labels=data.test.labels,
        title=f"{name} version {version}",
        extra={
            "model_name": name,
            "model_version": version,
            "dataset_fingerprint": data.fingerprint(),
        },
    )
    sys.stdout.write(markdown(report, f"{name} version {version}"))
    sys.stdout.write(f"\nreport: {out}\n")
    return 0


def cmd_operating_point(args: argparse.Namespace) -> int:
    """Choose a version's threshold again for another target or other validation studies, and
    publish the same weights with it as a new candidate version (no retraining)."""
    from scanwatch.model_registry import EVALUATION_DIR, Registry
    from training.evaluate import evaluate_probabilities, markdown, write_report
    from training.export import export_operating_point
    from training.lifecycle import (
        flat_metrics,
        load_dataset,
        predict_saved_model,
        predict_saved_model_with_rule,
        study_benchmark_at,
    )
    from training.study_evaluation import evaluate_served_rule, flat_study_metrics

    settings = _settings(args)
    registry = Registry(settings.repository)
    name = settings.model_name
    found = _saved_model(registry, name, args.version)
    if found is None:
        return 1
    source_version, location = found
    if args.studies is not None:
        path = args.studies
    elif args.dataset == "studies":
        path = load_dataset(_dataset_spec(args), settings, Path(settings.runs_dir))[1]
    else:
        sys.stderr.write("operating-point needs studies: --dataset studies or --studies FILE\n")
        return 2
    bench = study_benchmark_at(Path(path))
    if bench is None:
        sys.stderr.write(f"{path} is not a study benchmark file\n")
        return 2
    rule = predict_saved_model_with_rule(location, bench.test.images[:1])[1]
    if not _same_context(rule.context, source_version, settings):
        return 2
    evaluation = evaluate_served_rule(
        lambda images: predict_saved_model(location, images), bench, rule, settings
    )
    slices = bench.slice_dataset(rule.context)
    out = Path(args.out or settings.runs_dir / f"operating-point-{name}-from-{source_version}")
    version = registry.reserve(name, run_dir=str(out))
    try:
        report = evaluate_probabilities(
            predict_saved_model(location, slices.test.images),
            slices.test.labels,
            slices.class_names,
            settings.threshold,
        )
        report["study"] = evaluation.report
        write_report(
            report,
            out / EVALUATION_DIR,
            title=f"{name} version {version} (version {source_version}, new operating point)",
            extra={"model_name": name, "model_version": version, "source_version": source_version},
        )
        export_operating_point(
            location,
            evaluation.threshold,
            evaluation.rule,
            registry.repository / ".staging",
            name,
            version,
        )
        registry.record_candidate(
            name,
            version,
            dataset_fingerprint=slices.fingerprint(),
            metrics=flat_metrics(report) | flat_study_metrics(evaluation.report),
            class_names=list(slices.class_names),
            threshold=evaluation.threshold,
            dataset_path=str(Path(path).resolve()),
        )
    except BaseException as error:
        registry.mark_failed(name, version, f"{type(error).__name__}: {error}")
        raise
    sys.stdout.write(markdown(report, f"{name} version {version}"))
    sys.stdout.write(
        f"\nversion {version}: version {source_version}'s weights, threshold "
        f"{evaluation.threshold:.4f} for: {evaluation.rule.operating_point}\n"
        f"candidate: `python -m training models promote {version}`\n"
    )
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from scanwatch.model_registry import LifecycleError, PromotionRefused, Registry
    from training.events import publisher_for
    from training.lifecycle import promote, rollback

    settings = _settings(args)
    registry = Registry(settings.repository)
    name = settings.model_name
    if args.models_command == "list":
        served = registry.served_versions(name)
        rows = registry.versions(name)
        if args.json:
            sys.stdout.write(json.dumps([r.__dict__ for r in rows], indent=2) + "\n")
            return 0
        from rich.table import Table

        table = Table(title=f"{name} ({settings.repository})")
        for column in ("version", "status", "served", "macro-F1", "dataset", "created", "note"):
            table.add_column(column)
        for r in rows:
            table.add_row(
                str(r.version),
                r.status,
                "◀" if served and r.version == served[-1] else "",
                "" if r.macro_f1 is None else f"{r.macro_f1:.4f}",
                (r.dataset_fingerprint or "")[:12],
                r.created,
                r.note or "",
            )
        from rich.console import Console

        Console().print(table)
        return 0
    events = publisher_for(settings.kafka_bootstrap_servers)
    try:
        if args.models_command == "promote":
            previous = promote(registry, name, args.version, events, force=args.force)
            sys.stdout.write(f"{name} version {args.version} is served (was {previous})\n")
        else:
            withdrawn, now_served = rollback(registry, name, events, args.to)
            sys.stdout.write(
                f"{name}: version {withdrawn} withdrawn, version {now_served} served\n"
            )
    except (PromotionRefused, LifecycleError, LookupError) as error:
        sys.stderr.write(f"{error}\n")
        return 1
    finally:
        events.close()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from training.events import KafkaEvents
    from training.worker import TrainingWorker

    settings = _settings(args)
    if not settings.kafka_bootstrap_servers:
        sys.stderr.write("set SCANWATCH_TRAIN_KAFKA_BOOTSTRAP_SERVERS for the worker\n")
        return 2
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    events = KafkaEvents(settings.kafka_bootstrap_servers)
    try:
        TrainingWorker(settings, events).run(stop)
    finally:
        events.close()
    return 0


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repository", type=Path, help="model repository (default var/models)")
    parser.add_argument("--name", help=f"model name (default {DEFAULT_MODEL_NAME})")


def _add_dataset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dataset",
        choices=DATASET_KINDS,
        default="benchmark",
        help="dataset layout (default: the bundled benchmark)",
    )
    parser.add_argument("--path", type=Path, help="dataset root (not for benchmark)")
    parser.add_argument(
        "--preset",
        choices=("default", "large", "tiny"),
        default="default",
        help="benchmark size (default: default)",
    )
    parser.add_argument("--image-size", type=int, help="input size (benchmark: 128, tiny: 64)")
    parser.add_argument(
        "--context",
        choices=INPUT_CONTEXTS,
        help="input channels: none (the slice three times, default) or neighbours (the slice "
        "below, the slice, the slice above; --dataset studies only)",
    )
    parser.add_argument(
        "--with-neighbours",
        action="store_true",
        help="studies: render the training slices' neighbours even with --context none (the "
        "same training slices as a neighbours run, for a like-for-like comparison)",
    )
    parser.add_argument(
        "--min-lesion-mm",
        type=_non_negative("millimetres"),
        help="studies: leave out of training the lesion slices where the lesion is narrower "
        "than this on the slice (mm); validation and test keep every slice",
    )
    parser.add_argument(
        "--extra-train-studies",
        type=_count,
        help="studies: render this many more training studies (validation and test stay the "
        "same studies)",
    )
    parser.add_argument(
        "--mask-weight",
        type=_non_negative(),
        help="studies: also train a mask head on where each lesion is, its loss weighted so "
        "beside the classifier's (0: none, the default; the exported model is the classifier)",
    )
    parser.add_argument(
        "--mask-stride",
        type=int,
        choices=(8, 16),
        help="with --mask-weight: the mask head's cell in pixels (default 16; 8: finer, from an "
        "earlier block)",
    )
    parser.add_argument("--normal-class", help="the label meaning normal (notumor, nv...)")
    parser.add_argument(
        "--labels-csv", type=Path, help="dicom: labels CSV (default <path>/labels.csv)"
    )


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target-sensitivity",
        type=float,
        help="study sensitivity the threshold must reach on validation studies (default 0.95)",
    )
    parser.add_argument(
        "--min-diameter-mm",
        type=float,
        help="the target covers lesions at least this large (default 5 mm)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scanwatch-train", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SCANWATCH_TRAIN_LOG_LEVEL", "WARNING"),
        help="DEBUG, INFO, WARNING or ERROR (default WARNING: bars only)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train, evaluate, export and (if better) promote")
    _add_common(train)
    _add_dataset(train)
    train.add_argument("--run-dir", type=Path, help="run folder (an unfinished one resumes)")
    train.add_argument("--runs-dir", type=Path, help="where new run folders go")
    train.add_argument("--epochs", type=int)
    train.add_argument(
        "--fine-tune-after",
        type=int,
        help="epochs before fine-tuning (5 with pretrained weights, none from scratch)",
    )
    train.add_argument("--variant", help="EfficientNet B0..B7 (default B0)")
    train.add_argument("--weights", help="'imagenet' or a weights file (default: from scratch)")
    train.add_argument(
        "--init-from",
        help="warm start from a SavedModel scanwatch exported (same variant, size and classes)",
    )
    train.add_argument("--batch-size", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--no-promote", action="store_true", help="leave it a candidate")
    _add_target(train)
    train.set_defaults(handler=cmd_train)

    evaluate = commands.add_parser("evaluate", help="evaluate a version on a dataset's test split")
    _add_common(evaluate)
    _add_dataset(evaluate)
    evaluate.add_argument("--version", type=int, help="default: the served version")
    evaluate.add_argument("--out", type=Path, help="report folder")
    _add_target(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    operating = commands.add_parser(
        "operating-point",
        help="choose a version's study threshold again (another target or your own validation "
        "studies) and publish the same weights with it as a new candidate version",
    )
    _add_common(operating)
    _add_dataset(operating)
    operating.add_argument("--version", type=int, help="default: the served version")
    operating.add_argument(
        "--studies", type=Path, help="a study benchmark .npz (val: chooses, test: reports)"
    )
    operating.add_argument("--out", type=Path, help="report folder")
    _add_target(operating)
    operating.set_defaults(handler=cmd_operating_point)

    models = commands.add_parser("models", help="list, promote or roll back versions")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="the registry")
    _add_common(listing)
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    promote = models_commands.add_parser("promote", help="serve a candidate if not worse")
    _add_common(promote)
    promote.add_argument("version", type=int)
    promote.add_argument("--force", action="store_true", help="skip the macro-F1 comparison")
    rollback = models_commands.add_parser("rollback", help="serve an older version again")
    _add_common(rollback)
    rollback.add_argument("--to", type=int, help="version to serve (default: the previous)")
    models.set_defaults(handler=cmd_models)

    worker = commands.add_parser("worker", help="run training jobs requested over Kafka")
    _add_common(worker)
    worker.set_defaults(handler=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    configure_logging("training", args.log_level)
    try:
        return int(args.handler(args))
    except ValidationError as error:
        sys.stderr.write(f"invalid settings: {error}\n")
        return 2
    except ValueError as error:  # DatasetError, RunMismatch, bad values
        sys.stderr.write(f"{type(error).__name__}: {error}\n")
        return 1
