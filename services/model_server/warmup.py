"""Warm-up before a version becomes AVAILABLE, as TF Serving does it.

If the SavedModel holds ``assets.extra/tf_serving_warmup_requests`` (a TFRecord file of
``PredictionLog`` protos, TF Serving's format), its Predict requests are replayed; otherwise each
signature whose per-image shape is fixed runs once on zeros at each warm-up batch size. Either
way the first real request does not pay for graph tracing, kernel selection or memory growth.
A warm-up request that fails makes the load fail, as in TF Serving.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import prediction_log_pb2

from scanwatch import tensors
from schemas.model_signature import SIGNATURE_NAME
from services.model_server.engine import Servable

logger = logging.getLogger(__name__)

WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
#: TF Serving reads at most this many warm-up records.
MAX_WARMUP_RECORDS = 1000


def _replay(servable: Servable, file: Path) -> int:
    count = 0
    for record in tf.data.TFRecordDataset(str(file)).take(MAX_WARMUP_RECORDS):
        log = prediction_log_pb2.PredictionLog.FromString(record.numpy())
        if log.WhichOneof("log_type") != "predict_log":
            raise ValueError(f"{file}: only predict_log warm-up records are supported")
        request = log.predict_log.request
        signature_name = request.model_spec.signature_name or SIGNATURE_NAME
        signature = servable.signature_defs[signature_name]
        inputs = {alias: tensors.to_ndarray(proto) for alias, proto in request.inputs.items()}
        outputs = list(request.output_filter) or sorted(signature.outputs)
        servable.run(signature_name, inputs, outputs)
        count += 1
    return count


def _dummies(servable: Servable, batch_sizes: Iterable[int]) -> int:
    count = 0
    for name in sorted(servable.signature_names):
        signature = servable.signature_defs[name]
        shapes = {}
        for alias, info in signature.inputs.items():
            dims = [d.size for d in info.tensor_shape.dim]
            if info.tensor_shape.unknown_rank or not dims or any(d < 0 for d in dims[1:]):
                break
            shapes[alias] = (dims[1:], tf.dtypes.as_dtype(info.dtype).as_numpy_dtype)
        else:
            for size in batch_sizes:
                inputs = {a: np.zeros((size, *dims), dtype) for a, (dims, dtype) in shapes.items()}
                servable.run(name, inputs, sorted(signature.outputs))
                count += 1
            continue
        logger.debug("signature not warmed up: free input sizes", extra={"signature_name": name})
    return count


def warm_up(servable: Servable, path: Path, batch_sizes: Iterable[int] = (1,)) -> int:
    """Warm ``servable`` (loaded from ``path``) up; return the number of warm-up runs."""
    file = Path(path) / WARMUP_FILE
    if file.is_file():
        return _replay(servable, file)
    return _dummies(servable, sorted(set(batch_sizes)))
