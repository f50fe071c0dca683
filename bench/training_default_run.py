"""Train the default configuration on the default benchmark into a run folder (resumable).

    nice -n 10 .venv/bin/python bench/training_default_run.py var/training/runs/default [preset]

The same thing as ``python -m training train --benchmark default --run-dir …`` without
publishing; used to produce the default model while the CLI was written.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from scanwatch.logs import configure_logging  # noqa: E402
from training.config import TrainSettings  # noqa: E402
from training.synthetic_dataset import PRESETS, load_or_build  # noqa: E402
from training.train import train  # noqa: E402


def main() -> None:
    configure_logging("training", "INFO")
    settings = TrainSettings()
    started = time.perf_counter()
    preset = sys.argv[2] if len(sys.argv) > 2 else "default"
    data = load_or_build(PRESETS[preset], settings.cache_dir)
    built = time.perf_counter()
    result = train(data, settings, sys.argv[1])
    done = time.perf_counter()
    sys.stderr.write(
        f"dataset {built - started:.0f} s, training {done - built:.0f} s, "
        f"best epoch {result.state.best_epoch}, val macro-F1 {result.state.best_macro_f1:.4f}\n"
    )


if __name__ == "__main__":
    main()
