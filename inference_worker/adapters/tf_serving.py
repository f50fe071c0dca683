"""The model server over the TensorFlow Serving gRPC API (``PredictionService``).

The worker only speaks this API, so it cannot tell TensorFlow Serving from
``services/model_server``. On start-up it reads ``GetModelMetadata`` and refuses to run when the
served signature differs from the contract in :mod:`schemas.model_signature` (its optional
``study_rule`` output accepted); each Predict reads the model's study rule from that output
when the model has it.

:class:`ModelClient` speaks gRPC and raises gRPC's errors; :class:`TfServingModel` is the
worker's :class:`~inference_worker.ports.Model` over it, and turns those errors into the
domain's (:mod:`inference_worker.errors`), so that the core never sees a gRPC status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, cast

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.wrappers_pb2 import Int64Value
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from inference_worker.circuit import CircuitBreaker
from inference_worker.errors import ModelUnavailable, SaliencyUnavailable, SignatureMismatch
from inference_worker.ports import Prediction, Saliency
from scanwatch import tensors
from scanwatch.imaging import NO_CONTEXT
from scanwatch.study_score import LEGACY_RULE, StudyRule
from schemas import model_signature
from schemas.model_signature import HEATMAPS, SALIENCY_SIGNATURE_NAME, SIGNATURE_NAME, STUDY_RULE

log = logging.getLogger(__name__)


#: gRPC codes worth retrying: the server is down, restarting, overloaded or slow.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
    }
)

__all__ = ["TRANSIENT_CODES", "ModelClient", "Prediction", "SignatureMismatch", "TfServingModel"]


class ModelClient:
    """Async Predict client for one model (by name, optionally pinned to a version)."""

    def __init__(
        self,
        target: str,
        model_name: str,
        model_version: int | None = None,
        timeout_s: float = 60.0,
        batch_size: int = 16,
        max_message_bytes: int = 256 * 1024 * 1024,
        model_label: str | None = None,
        breaker: CircuitBreaker | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if model_version is not None and model_label is not None:
            raise ValueError("pin a model version or a version label, not both")
        self.target = target
        self.model_name = model_name
        self.model_version = model_version
        self.model_label = model_label
        self.breaker = breaker or CircuitBreaker()
        self._on_batch = on_batch or (lambda size: None)
        self.timeout_s = timeout_s
        self.batch_size = batch_size
        self._options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._channel: grpc.aio.Channel | None = None
        self.image_size: int | None = None
        #: The input context of the last answer's study rule (``scanwatch.imaging``).
        self.input_context: str = NO_CONTEXT
        #: Whether the checked model's saliency signature keeps its contract (None: unchecked).
        self.saliency_ok: bool | None = None

    def _stub(self) -> prediction_service_pb2_grpc.PredictionServiceStub:
        # The channel binds to the running event loop, so it is made on first use, not in __init__.
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.target, options=self._options)
        return prediction_service_pb2_grpc.PredictionServiceStub(self._channel)

    def _spec(
        self, signature_name: str = SIGNATURE_NAME, version: int | None = None
    ) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature_name)
        if version is not None:
            spec.version.CopyFrom(Int64Value(value=version))
        elif self.model_version is not None:
            spec.version.CopyFrom(Int64Value(value=self.model_version))
        elif self.model_label is not None:
            spec.version_label = self.model_label
        return spec

    async def _call(self, method: str, request: Any) -> Any:
        """One RPC through the circuit breaker, with the client's deadline (the response is a
        protobuf message of the method's response type)."""
        self.breaker.before_call()
        try:
            response = await getattr(self._stub(), method)(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            if exc.code() in TRANSIENT_CODES:
                self.breaker.failure()
            raise
        self.breaker.success()
        return response

    async def check_signature(self) -> int:
        """Read ``GetModelMetadata``, compare with the contract, return the image size.

        Raises :class:`SignatureMismatch` when the served signature breaks the contract.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._spec(), metadata_field=["signature_def"]
        )
        response = cast(
            get_model_metadata_pb2.GetModelMetadataResponse,
            await self._call("GetModelMetadata", request),
        )
        signatures = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signatures)
        if SIGNATURE_NAME not in signatures.signature_def:
            raise SignatureMismatch(f"model {self.model_name} has no {SIGNATURE_NAME} signature")
        signature = signatures.signature_def[SIGNATURE_NAME]
        inputs, outputs = tensors.signature_specs(signature)
        problems = model_signature.check_serving(inputs, outputs)
        if problems:
            raise SignatureMismatch(f"model {self.model_name}: " + "; ".join(problems))
        size = int(inputs[model_signature.INPUT.name].shape[1])
        if size <= 0:
            raise SignatureMismatch(f"model {self.model_name} does not fix its image size")
        self.image_size = size
        # Heatmaps are evidence beside the score, not the score: a model without the saliency
        # signature (exported before it existed) or with a broken one is still served.
        saliency_problems = ["no saliency signature"]
        if SALIENCY_SIGNATURE_NAME in signatures.signature_def:
            saliency_problems = model_signature.check_saliency(
                *tensors.signature_specs(signatures.signature_def[SALIENCY_SIGNATURE_NAME])
            )
        self.saliency_ok = not saliency_problems
        if saliency_problems:
            log.warning(
                "studies will be scored without heatmaps",
                extra={"model": self.model_name, "problems": saliency_problems},
            )
        log.info(
            "model signature checked",
            extra={
                "model": self.model_name,
                "version": response.model_spec.version.value,
                "image_size": size,
            },
        )
        return size

    async def predict(self, images: npt.NDArray[np.float32]) -> Prediction:
        """Score ``images`` (n, size, size, 3) in batches of ``batch_size``.

        All batches must come from the same model version; if the server switched versions in
        the middle, the whole set is scored again so that one result never mixes versions.
        """
        for _ in range(3):
            parts = [
                await self._predict_batch(images[i : i + self.batch_size])
                for i in range(0, len(images), self.batch_size)
            ]
            if len({p.model_version for p in parts}) == 1:
                first = parts[0]
                self.input_context = first.study_rule.context
                maps = [p.heatmaps for p in parts if p.heatmaps is not None]
                return Prediction(
                    probabilities=np.concatenate([p.probabilities for p in parts]),
                    class_names=first.class_names,
                    threshold=first.threshold,
                    model_name=first.model_name,
                    model_version=first.model_version,
                    study_rule=first.study_rule,
                    heatmaps=np.concatenate(maps) if len(maps) == len(parts) else None,
                )
            log.info("model version changed during a study; scoring it again")
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.ABORTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            details="model version kept changing during scoring",
        )

    async def _predict_batch(self, batch: npt.NDArray[np.float32]) -> Prediction:
        # Every output, heatmaps included where the model returns them: an output_filter
        # written from the signature checked at start would leave out the study_rule of a
        # version published later with one.
        request = predict_pb2.PredictRequest(model_spec=self._spec())
        request.inputs[model_signature.INPUT.name].CopyFrom(
            tensors.to_tensor_proto(np.asarray(batch, dtype=np.float32))
        )
        self._on_batch(len(batch))
        response = cast(predict_pb2.PredictResponse, await self._call("Predict", request))
        probabilities = tensors.to_ndarray(response.outputs["probabilities"])
        class_names = tensors.to_ndarray(response.outputs["class_names"])
        threshold = tensors.to_ndarray(response.outputs["threshold"])
        model_version = int(response.model_spec.version.value)
        heatmaps = None
        if HEATMAPS in response.outputs:
            heatmaps = np.asarray(tensors.to_ndarray(response.outputs[HEATMAPS]), np.float32)
        return Prediction(
            probabilities=np.array(probabilities, dtype=np.float32),
            class_names=[c.decode() if isinstance(c, bytes) else str(c) for c in class_names[0]],
            threshold=float(threshold[0]),
            model_name=response.model_spec.name or self.model_name,
            model_version=model_version,
            study_rule=self._study_rule(response, model_version),
            heatmaps=heatmaps,
        )

    def _study_rule(self, response: predict_pb2.PredictResponse, version: int) -> StudyRule:
        """The model's ``study_rule`` output (the same row for every image), or the legacy
        rule when the model has none. A rule that does not parse is a broken contract."""
        if STUDY_RULE.name not in response.outputs:
            return LEGACY_RULE
        rows = tensors.to_ndarray(response.outputs[STUDY_RULE.name])
        if len(rows) == 0:
            return LEGACY_RULE  # an empty batch carries no row; the others do
        try:
            return StudyRule.from_json(rows[0])
        except ValueError as exc:
            raise SignatureMismatch(
                f"model {self.model_name} v{version}: {STUDY_RULE.name} output: {exc}"
            ) from exc

    async def explain(self, images: npt.NDArray[np.float32], model_version: int) -> Saliency:
        """Grad-CAM heatmaps of ``images`` from ``model_version``, in batches of ``batch_size``
        (the saliency signature, pinned to the version that scored the images)."""
        if self.saliency_ok is False:
            raise SaliencyUnavailable(f"model {self.model_name} serves no usable saliency")
        heatmaps, probabilities = [], []
        class_names: list[str] = []
        for i in range(0, len(images), self.batch_size):
            request = predict_pb2.PredictRequest(
                model_spec=self._spec(SALIENCY_SIGNATURE_NAME, model_version)
            )
            request.inputs[model_signature.INPUT.name].CopyFrom(
                tensors.to_tensor_proto(np.asarray(images[i : i + self.batch_size], np.float32))
            )
            try:
                response = cast(predict_pb2.PredictResponse, await self._call("Predict", request))
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if exc.code() == grpc.StatusCode.INVALID_ARGUMENT and "signature" in details:
                    raise SaliencyUnavailable(f"model {self.model_name}: {details}") from exc
                raise
            heatmaps.append(np.asarray(tensors.to_ndarray(response.outputs[HEATMAPS]), np.float32))
            probabilities.append(
                np.asarray(tensors.to_ndarray(response.outputs["probabilities"]), np.float32)
            )
            names = tensors.to_ndarray(response.outputs["class_names"])[0]
            class_names = [c.decode() if isinstance(c, bytes) else str(c) for c in names]
        return Saliency(
            heatmaps=np.concatenate(heatmaps),
            probabilities=np.concatenate(probabilities),
            class_names=class_names,
            model_name=self.model_name,
            model_version=model_version,
        )

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


class TfServingModel:
    """The worker's :class:`~inference_worker.ports.Model` over a :class:`ModelClient`.

    gRPC failures that may go away by themselves (:data:`TRANSIENT_CODES`) become
    :class:`~inference_worker.errors.ModelUnavailable`; so does an open circuit
    (:class:`~inference_worker.circuit.CircuitOpen` is one). Any other gRPC error (a request
    the server refuses) is not the domain's to handle and goes up unchanged: fatal.
    """

    def __init__(self, client: ModelClient) -> None:
        self.client = client

    @property
    def image_size(self) -> int | None:
        return self.client.image_size

    @property
    def input_context(self) -> str:
        return self.client.input_context

    async def check_signature(self) -> int:
        try:
            return await self.client.check_signature()
        except grpc.aio.AioRpcError as exc:
            _raise_if_transient(exc)
            raise

    async def predict(self, images: npt.NDArray[np.float32]) -> Prediction:
        try:
            return await self.client.predict(images)
        except grpc.aio.AioRpcError as exc:
            _raise_if_transient(exc)
            raise

    async def explain(self, images: npt.NDArray[np.float32], model_version: int) -> Saliency:
        try:
            return await self.client.explain(images, model_version)
        except grpc.aio.AioRpcError as exc:
            _raise_if_transient(exc)
            raise

    async def close(self) -> None:
        await self.client.close()


def _raise_if_transient(exc: grpc.aio.AioRpcError) -> None:
    if exc.code() in TRANSIENT_CODES:
        raise ModelUnavailable(f"model server {exc.code().name}: {exc.details()}") from exc
