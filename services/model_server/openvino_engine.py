"""OpenVINO engine: the same SavedModel, compiled for the CPU by OpenVINO.

How a version is served:

* **Numeric outputs run in OpenVINO.** Each signature is loaded with TensorFlow once, pruned to
  its numeric outputs (``probabilities``, ``threshold``) and converted with
  ``openvino.convert_model``. OpenVINO has no string tensors (its TensorFlow frontend even aborts
  the process on this SavedModel's string constants when it reads the folder directly), so the
  string outputs never reach it.
* **String outputs are constants served by the engine.** At load, the TensorFlow signature runs
  once on a batch of two different dummy images; every string output must be the same row for
  both (``class_names`` is the model's class list tiled per image). That row is kept and tiled to
  each request's batch size. A model whose string output depends on its input is refused: it
  cannot be served by OpenVINO without changing what clients see.
* **The converted model owns its weights** (``share_weights=False``): the SavedModel loaded to
  convert it is dropped once ``load`` returns, and the variables' memory with it.
* **The converted model is cached** as OpenVINO IR (``.xml`` + ``.bin``, weights kept in FP32) in
  ``<cache_dir>/<key>/``, where the key hashes the SavedModel's files, the signature and
  OpenVINO's version: a restart or a second server reads the IR instead of converting again
  (~10 s for EfficientNetB0). The repository itself is never written to (it may be read-only).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# No OpenVINO telemetry. With its package importable, ``import openvino`` and every
# ``convert_model`` send usage events to Google Analytics, each from a forked process (forked
# beside gRPC's threads) that the interpreter waits for at exit: the server outlived SIGTERM by
# 6 s with two tiny models, longer with more conversions; and a hospital's model server sends
# nothing out. Unimportable, OpenVINO uses its own stub (openvino.tools.ovc.telemetry_stub).
# Before the first ``import openvino``; a package already imported is left alone.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]

import numpy as np  # noqa: E402
import openvino as ov  # noqa: E402
import tensorflow as tf  # noqa: E402
from tensorflow.core.protobuf import meta_graph_pb2  # noqa: E402

from scanwatch.durable import publish_dir  # noqa: E402
from scanwatch.saved_model import SERVE_TAG, read_signature_defs  # noqa: E402
from services.model_server.errors import InvalidArgument  # noqa: E402

logger = logging.getLogger(__name__)

DEVICE = "CPU"
#: Images of the two dummy batches that prove string outputs do not depend on the input.
_PROBE_VALUES = (0.0, 127.0)
_HASH_CHUNK = 1024 * 1024


def _is_numeric(info: meta_graph_pb2.TensorInfo) -> bool:
    dtype = tf.dtypes.as_dtype(info.dtype)
    return dtype.is_floating or dtype.is_integer or dtype.is_bool


def saved_model_key(path: Path, signature_name: str) -> str:
    """A digest of the SavedModel's files, the signature and OpenVINO's version."""
    digest = hashlib.sha256(f"{ov.__version__}|{signature_name}".encode())
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:32]


class _Signature:
    """One signature: the compiled numeric part and the constant string outputs."""

    def __init__(
        self,
        compiled: ov.CompiledModel,
        definition: meta_graph_pb2.SignatureDef,
        constants: dict[str, np.ndarray],
    ) -> None:
        self.compiled = compiled
        self.definition = definition
        self.constants = constants
        self.outputs = {output.get_any_name(): output for output in compiled.outputs}
        self._local = threading.local()  # an InferRequest is not thread-safe: one per thread

    def request(self) -> ov.InferRequest:
        infer = getattr(self._local, "request", None)
        if infer is None:
            infer = self._local.request = self.compiled.create_infer_request()
        return infer


def _names_of(model: Any) -> list[str]:
    return [output.get_any_name() for output in model.outputs]


class OpenVINOServable:
    """A SavedModel version whose signatures run on OpenVINO (see the module docstring)."""

    def __init__(self, signature_defs: Mapping[str, meta_graph_pb2.SignatureDef]) -> None:
        self._signature_defs = dict(signature_defs)
        self._signatures: dict[str, _Signature] = {}

    @property
    def signature_defs(self) -> Mapping[str, meta_graph_pb2.SignatureDef]:
        return self._signature_defs

    @property
    def signature_names(self) -> frozenset[str]:
        return frozenset(self._signatures)

    def add(self, name: str, signature: _Signature) -> None:
        self._signatures[name] = signature

    def run(
        self, signature_name: str, inputs: Mapping[str, np.ndarray], output_names: list[str]
    ) -> dict[str, np.ndarray]:
        signature = self._signatures[signature_name]
        batch = len(next(iter(inputs.values())))
        numeric = [name for name in output_names if name not in signature.constants]
        results: dict[str, np.ndarray] = {}
        if numeric:
            infer = signature.request()
            try:
                infer.infer({alias: np.ascontiguousarray(v) for alias, v in inputs.items()})
            except RuntimeError as error:  # shapes the signature allows but the graph does not
                raise InvalidArgument(f"OpenVINO: {error}") from error
            for name in numeric:
                # Copied: the request's output buffer is reused by the next call on this thread.
                results[name] = infer.get_tensor(signature.outputs[name]).data.copy()
        for name in output_names:
            if name in signature.constants:
                row = signature.constants[name]
                results[name] = np.tile(row[np.newaxis], (batch, *([1] * row.ndim)))
        return results


class OpenVINOEngine:
    """Converts SavedModel signatures to OpenVINO (cached as IR) and compiles them for the CPU."""

    name = "openvino"

    def __init__(
        self,
        cache_dir: Path,
        performance_hint: str = "LATENCY",
        inference_precision: str = "f32",
        num_threads: int = 0,
    ) -> None:
        self.cache_dir = Path(cache_dir)
        self.core = ov.Core()
        # OpenVINO computes in bf16 by default on CPUs that support it (AVX512_BF16, AMX):
        # faster, but probabilities then differ from TensorFlow's by up to ~1e-2. f32 keeps them
        # within the tolerance stated in the README; bf16 is the explicit opt-in.
        self.config: dict[str, Any] = {
            "PERFORMANCE_HINT": performance_hint,
            "INFERENCE_PRECISION_HINT": inference_precision,
        }
        if num_threads:
            self.config["INFERENCE_NUM_THREADS"] = num_threads

    def load(self, path: Path) -> OpenVINOServable:
        signature_defs = read_signature_defs(path)
        loaded = tf.saved_model.load(str(path), tags=[SERVE_TAG])
        servable = OpenVINOServable(signature_defs)
        for name, function in loaded.signatures.items():
            definition = signature_defs[name]
            constants = self._constant_outputs(name, function, definition)
            model = self._converted(path, name, function, definition, constants)
            compiled = self.core.compile_model(model, DEVICE, self.config)
            servable.add(name, _Signature(compiled, definition, constants))
            logger.info(
                "compiled signature for OpenVINO",
                extra={
                    "signature_name": name,
                    "openvino_outputs": _names_of(compiled),
                    "constant_outputs": sorted(constants),
                },
            )
        return servable

    def _constant_outputs(
        self, name: str, function: Any, definition: meta_graph_pb2.SignatureDef
    ) -> dict[str, np.ndarray]:
        strings = [alias for alias, info in definition.outputs.items() if not _is_numeric(info)]
        if not strings:
            return {}
        specs = function.structured_input_signature[1]
        if not all(spec.shape[1:].is_fully_defined() for spec in specs.values()):
            raise ValueError(
                f"signature {name}: string outputs {strings} need fixed input shapes to be "
                "probed; OpenVINO cannot serve this signature"
            )
        probe = {
            alias: tf.stack(
                [tf.fill(spec.shape[1:], tf.cast(v, spec.dtype)) for v in _PROBE_VALUES]
            )
            for alias, spec in specs.items()
        }
        outputs = function(**probe)
        constants: dict[str, np.ndarray] = {}
        for alias in strings:
            rows = outputs[alias].numpy()
            if not all(np.array_equal(rows[0], row) for row in rows[1:]):
                raise ValueError(
                    f"signature {name}: string output {alias} depends on the input; "
                    "OpenVINO cannot serve it"
                )
            # An array even for a rank-1 output (a bytes scalar per image, as study_rule), so
            # that it tiles to the batch like a row does.
            constants[alias] = np.asarray(rows[0], dtype=rows.dtype)
        return constants

    def _converted(
        self,
        path: Path,
        name: str,
        function: Any,
        definition: meta_graph_pb2.SignatureDef,
        constants: Mapping[str, np.ndarray],
    ) -> ov.Model:
        folder = self.cache_dir / saved_model_key(path, name)
        xml = folder / "model.xml"
        if xml.is_file():
            logger.info("reading cached OpenVINO model", extra={"cache": str(folder)})
            return self.core.read_model(xml)
        numeric = sorted(alias for alias in definition.outputs if alias not in constants)
        specs = function.structured_input_signature[1]
        aliases = sorted(specs)

        def numeric_part(*tensors: tf.Tensor) -> dict[str, tf.Tensor]:
            outputs = function(**dict(zip(aliases, tensors, strict=True)))
            return {alias: outputs[alias] for alias in numeric}

        pruned = tf.function(
            numeric_part,
            input_signature=[
                tf.TensorSpec(specs[a].shape, specs[a].dtype, name=a) for a in aliases
            ],
        ).get_concrete_function()
        # share_weights=False: by default the converted model points into the TensorFlow
        # variables' buffers, and ``loaded`` (their owner) is dropped when ``load`` returns; the
        # compiled model then read freed memory once TensorFlow reused it (wrong heatmaps, NaN).
        model = ov.convert_model(pruned, share_weights=False)
        # Outputs come in the order of the function's flattened dict (sorted keys); the frontend
        # may suffix their names ("threshold_1"): name each exactly as the signature's alias.
        found = [sorted(o.get_names()) for o in model.outputs]
        if len(found) != len(numeric) or not all(
            any(n.startswith(alias) for n in names)
            for alias, names in zip(numeric, found, strict=False)
        ):
            raise ValueError(f"OpenVINO conversion of {name}: outputs {found} != {numeric}")
        for alias, port in zip(numeric, model.outputs, strict=True):
            port.get_tensor().set_names({alias})
        inputs = sorted(i.get_any_name() for i in model.inputs)
        if inputs != aliases:
            raise ValueError(f"OpenVINO conversion of {name}: inputs {inputs} != {aliases}")
        # Written to a temporary folder and published by rename: a concurrent reader never sees
        # half an IR, and a power cut never leaves a truncated one under the cache's name.
        folder.parent.mkdir(parents=True, exist_ok=True)
        temp = folder.parent / f".tmp-{uuid.uuid4().hex}"
        try:
            temp.mkdir()
            ov.save_model(model, temp / "model.xml", compress_to_fp16=False)
            try:
                publish_dir(temp, folder)
            except OSError:  # another process cached it first: theirs is as good
                pass
        finally:
            shutil.rmtree(temp, ignore_errors=True)
        logger.info("cached OpenVINO model", extra={"cache": str(folder)})
        return model
