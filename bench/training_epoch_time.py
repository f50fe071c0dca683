"""Epoch time of scanwatch's training against a bare ``model.fit`` on the same in-memory data.

    nice -n 10 .venv/bin/python bench/training_epoch_time.py [--images 640] [--rounds 3]

Same model (EfficientNetB0 from scratch, 128², the default head), same images (the first
``--images`` of the default benchmark's training split), same batch size (32). Per round, in
alternating order so that load changes on a shared machine hit both alike:

- **bare**: ``model.fit(x, y, batch_size=32, validation_data=(xv, yv))`` on NumPy arrays already
  in RGB, no callbacks;
- **pipeline**: the training path of :func:`training.train.train`: ``training_stream`` (cache,
  shuffle, batch, RGB + random flip map, prefetch) and the epoch-end callback (validation
  macro-F1, plateau/early-stopping bookkeeping, ``last``/``best`` checkpoints, state file).

The first epoch of each (graph tracing) is not counted. Prints a JSON line with the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from training import train as train_module  # noqa: E402
from training.config import TrainSettings  # noqa: E402
from training.dataset import LabelledImages, Split  # noqa: E402
from training.input_pipeline import to_rgb, training_stream  # noqa: E402
from training.model import build_classifier  # noqa: E402
from training.synthetic_dataset import DEFAULT, load_or_build  # noqa: E402


class EpochTimer(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seconds: list[float] = []
        self._start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    settings = TrainSettings(batch_size=args.batch_size)
    full = load_or_build(DEFAULT, settings.cache_dir)
    n, n_val = args.images, max(args.images // 6, args.batch_size)
    data = LabelledImages(
        full.class_names,
        train=Split(full.train.images[:n], full.train.labels[:n], full.train.groups[:n]),
        val=Split(full.val.images[:n_val], full.val.labels[:n_val], full.val.groups[:n_val]),
        test=full.test,
    )
    classes = len(data.class_names)
    x, y = to_rgb(data.train.images), np.eye(classes, dtype=np.float32)[data.train.labels]
    xv, yv = to_rgb(data.val.images), np.eye(classes, dtype=np.float32)[data.val.labels]

    def model() -> keras.Model:
        m = build_classifier(data.class_names, image_size=data.image_size)
        train_module.compile_for(m, settings.learning_rate)
        return m

    bare_model, pipe_model = model(), model()
    stream = training_stream(
        data.train,
        classes,
        args.batch_size,
        0,
        settings.random_flip,
        settings.augments(data.from_studies),
    )
    run_dir = Path(tempfile.mkdtemp(prefix="epoch-bench-"))
    state = train_module.RunState(learning_rate=settings.learning_rate)
    epoch_end = train_module._EpochEnd(data, settings, state, run_dir, train_module.NoProgress())
    bare_timer, pipe_timer = EpochTimer(), EpochTimer()
    bare_epoch = pipe_epoch = 0
    for round_ in range(args.rounds + 1):
        order = ("bare", "pipeline") if round_ % 2 == 0 else ("pipeline", "bare")
        for which in order:
            if which == "bare":
                bare_model.fit(
                    x,
                    y,
                    batch_size=args.batch_size,
                    validation_data=(xv, yv),
                    epochs=bare_epoch + 1,
                    initial_epoch=bare_epoch,
                    verbose=0,
                    callbacks=[bare_timer],
                )
                bare_epoch += 1
            else:
                pipe_model.fit(
                    stream,
                    epochs=pipe_epoch + 1,
                    initial_epoch=pipe_epoch,
                    verbose=0,
                    shuffle=False,
                    callbacks=[pipe_timer, epoch_end],
                )
                pipe_epoch += 1
    bare = statistics.median(bare_timer.seconds[1:])
    pipe = statistics.median(pipe_timer.seconds[1:])
    sys.stdout.write(
        json.dumps(
            {
                "images": n,
                "val_images": n_val,
                "batch_size": args.batch_size,
                "image_size": data.image_size,
                "rounds": args.rounds,
                "bare_epoch_s": round(bare, 2),
                "pipeline_epoch_s": round(pipe, 2),
                "ratio": round(pipe / bare, 3),
                "bare_all_s": [round(s, 2) for s in bare_timer.seconds],
                "pipeline_all_s": [round(s, 2) for s in pipe_timer.seconds],
                "cpus": os.cpu_count(),
            }
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
