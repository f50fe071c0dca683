"""Inference engines: what loads a SavedModel version and runs its signatures.

The server core only sees :class:`Engine` and :class:`Servable`, so another runtime (OpenVINO)
can serve the same repository (:mod:`services.model_server.openvino_engine`). Inputs arrive
already checked against the SignatureDef.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2

from scanwatch.saved_model import SERVE_TAG, read_signature_defs
from services.model_server.errors import InvalidArgument

logger = logging.getLogger(__name__)


class Servable(Protocol):
    """One loaded model version."""

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        """Every SignatureDef of the SavedModel, as GetModelMetadata reports them."""
        ...

    @property
    def signature_names(self) -> frozenset[str]:
        """The signatures Predict can run (excludes internal ones such as the init op)."""
        ...

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        """Run a signature on checked inputs; raise :class:`InvalidArgument` for bad values."""
        ...


class Engine(Protocol):
    """Loads SavedModel folders into servables."""

    name: str

    def load(self, path: Path) -> Servable:
        """Load the SavedModel in ``path``; raise on any failure (the manager warms it up)."""
        ...


class TensorFlowServable:
    """A SavedModel loaded with ``tf.saved_model.load``."""

    def __init__(self, path: Path) -> None:
        self._loaded = tf.saved_model.load(str(path), tags=[SERVE_TAG])
        self._signature_defs = read_signature_defs(path)
        self._functions = dict(self._loaded.signatures)

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    @property
    def signature_names(self) -> frozenset[str]:
        return frozenset(self._functions)

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        function = self._functions[signature_name]
        try:
            results = function(**{alias: tf.constant(value) for alias, value in inputs.items()})
        except (tf.errors.InvalidArgumentError, ValueError, TypeError) as error:
            # Values the signature's static shape could not rule out (e.g. an image too small).
            raise InvalidArgument(f"{type(error).__name__}: {error}") from error
        return {name: results[name].numpy() for name in output_names}


class TensorFlowEngine:
    """Runs SavedModels on TensorFlow, like TensorFlow Serving itself."""

    name = "tensorflow"

    def load(self, path: Path) -> TensorFlowServable:
        return TensorFlowServable(path)
