"""Issue 18 point 3: does context from neighbouring slices (2.5D) help? ``none`` against
``neighbours`` on the same study benchmark, same seed, same epochs, same training slices.

    nice -n 5 .venv/bin/python bench/training_context.py OUT_DIR [--epochs 6] [--size 64]
        [--train 160] [--val 40] [--test 40] [--slices 16]

Both arms train on one benchmark built with ``train_neighbours`` (each training slice's
neighbours rendered), so their training slices are the same pixels; ``none`` repeats each slice,
``neighbours`` stacks the slice below, the slice and the slice above. Each arm's study rule,
calibration and threshold are chosen on validation studies by
:func:`training.study_evaluation.evaluate_study_benchmark`, as a training job does; the figures
are those of the test studies. Prints one JSON line per arm and writes ``OUT_DIR/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from scanwatch.imaging import INPUT_CONTEXTS  # noqa: E402
from scanwatch.logs import configure_logging  # noqa: E402
from training.config import TrainSettings  # noqa: E402
from training.study_dataset import StudyConfig, load_or_build  # noqa: E402
from training.study_evaluation import epoch_selection, evaluate_study_benchmark  # noqa: E402
from training.train import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--train", type=int, default=160)
    parser.add_argument("--val", type=int, default=40)
    parser.add_argument("--test", type=int, default=40)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--contexts", default=",".join(INPUT_CONTEXTS))
    args = parser.parse_args()
    configure_logging("training", "WARNING")
    config = StudyConfig(
        image_size=args.size,
        train_studies=args.train,
        val_studies=args.val,
        test_studies=args.test,
        slices_per_study=args.slices,
        train_neighbours=True,
    )
    started = time.perf_counter()
    bench = load_or_build(config, TrainSettings().cache_dir)
    built = time.perf_counter() - started
    results = []
    for context in args.contexts.split(","):
        settings = TrainSettings(epochs=args.epochs, seed=args.seed, context=context)
        data = bench.slice_dataset(context)
        started = time.perf_counter()
        # the epoch kept as `python -m training train` keeps it on studies
        result = train(
            data, settings, args.out / context, select=epoch_selection(bench, settings, context)
        )
        trained = time.perf_counter() - started
        evaluation = evaluate_study_benchmark(result.model, bench, settings, context)
        test = evaluation.report["test"]
        row = {
            "context": context,
            "epochs": args.epochs,
            "seed": args.seed,
            "train_slices": len(data.train),
            "dataset_s": round(built),
            "train_s": round(trained),
            "best_epoch": result.state.best_epoch,
            "val_macro_f1": round(result.state.best_macro_f1, 4),
            "val_lesion_slice_auroc": result.state.best_selection,
            "rule": evaluation.rule.name,
            # study AUROC and sensitivity at specificity >= 0.90 (ROC points, no threshold)
            "test_promotion": test["promotion"],
            "test_at_threshold": {k: test.get(k) for k in ("sensitivity", "specificity")},
        }
        results.append(row)
        print(json.dumps(row), flush=True)  # noqa: T201 - a benchmark's output
    (args.out / "results.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
