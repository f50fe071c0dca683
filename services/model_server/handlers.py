"""gRPC handlers of TF Serving's PredictionService and ModelService.

Each handler resolves the ModelSpec, checks the request against the SignatureDef the way TF
Serving does and answers with the resolved model spec. Every failure becomes a gRPC status
(NOT_FOUND, INVALID_ARGUMENT, UNAVAILABLE, or INTERNAL for a bug), never an escaping exception.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import NoReturn, Protocol, TypeVar

import grpc
import numpy as np
from google.protobuf import any_pb2, wrappers_pb2
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    status_pb2,
)

from scanwatch import tensors
from scanwatch.tensors import tensor_spec
from schemas.model_signature import SIGNATURE_NAME
from services.model_server.errors import InvalidArgument, NotFound, ServingError
from services.model_server.manager import ModelManager, describe_request
from services.model_server.metrics import UNKNOWN_MODEL, Metrics

logger = logging.getLogger(__name__)

#: The only metadata field TF Serving supports.
SIGNATURE_DEF_FIELD = "signature_def"
T = TypeVar("T")


def answer(
    context: grpc.ServicerContext,
    method: str,
    call: Callable[[], T],
    metrics: Metrics | None = None,
    model_name: str = UNKNOWN_MODEL,
) -> T:
    """Run a handler body; turn every failure into the gRPC status TF Serving would send."""
    started = time.perf_counter()
    code = grpc.StatusCode.OK
    try:
        try:
            return call()
        except ServingError as error:
            code, details = error.code, str(error)
            logger.info(
                "request refused", extra={"method": method, "code": code.name, "why": details}
            )
        except Exception as error:  # a bug: answer INTERNAL rather than grpc's opaque UNKNOWN
            logger.exception("request failed", extra={"method": method})
            code, details = grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
        abort(context, code, details)
    finally:
        if metrics is not None:
            metrics.requests.labels(method, model_name, code.name).inc()
            metrics.latency.labels(method, model_name).observe(time.perf_counter() - started)


def abort(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
    context.abort(code, details)
    raise AssertionError("grpc's abort returned")  # pragma: no cover - abort always raises


def resolved_spec(name: str, version: int, signature_name: str = "") -> model_pb2.ModelSpec:
    return model_pb2.ModelSpec(
        name=name, version=wrappers_pb2.Int64Value(value=version), signature_name=signature_name
    )


class _Request(Protocol):
    """Every TF Serving request message: it names its model in ``model_spec``."""

    @property
    def model_spec(self) -> model_pb2.ModelSpec: ...

    def HasField(self, field_name: str) -> bool: ...  # noqa: N802 - protobuf's name


class Models:
    """The served models by name."""

    def __init__(
        self, managers: Mapping[str, ModelManager], metrics: Metrics | None = None
    ) -> None:
        self._managers = dict(managers)
        self.metrics = metrics

    def replace(self, managers: Mapping[str, ModelManager]) -> None:
        """Serve these models from now on (a reloaded model config); one atomic swap."""
        self._managers = dict(managers)

    def label(self, request: _Request) -> str:
        """The model name for metrics: only served names, so label values stay bounded."""
        name = request.model_spec.name
        return name if name in self._managers else UNKNOWN_MODEL

    def answer(
        self, context: grpc.ServicerContext, method: str, request: _Request, call: Callable[[], T]
    ) -> T:
        return answer(context, method, call, self.metrics, self.label(request))

    def for_request(self, request: _Request) -> tuple[model_pb2.ModelSpec, ModelManager]:
        """The request's ModelSpec and the manager of its model (NOT_FOUND for unknown names)."""
        if not request.HasField("model_spec"):
            raise InvalidArgument("Missing ModelSpec")
        spec = request.model_spec
        manager = self._managers.get(spec.name)
        if manager is None:
            version = spec.version.value if spec.HasField("version") else None
            raise NotFound(
                f"Servable not found for request: {describe_request(spec.name, version)}"
            )
        return spec, manager


def _check_input(
    alias: str, proto: tensor_pb2.TensorProto, info: meta_graph_pb2.TensorInfo
) -> np.ndarray:
    expected = tensor_spec(alias, info)
    given_dtype = tensors.dtype_name(proto)
    if proto.dtype != info.dtype:
        raise InvalidArgument(
            f"input {alias}: expects dtype {expected.dtype} but {given_dtype} is provided"
        )
    shape = tensors.shape_of(proto)
    fits = info.tensor_shape.unknown_rank or (
        len(shape) == len(expected.shape)
        and all(e in (-1, g) for g, e in zip(shape, expected.shape, strict=True))
    )
    if not fits:
        raise InvalidArgument(
            f"input {alias}: shape {list(shape)} does not match the signature's "
            f"{list(expected.shape)} (-1 is any size)"
        )
    try:
        array = tensors.to_ndarray(proto)
    except Exception as error:
        raise InvalidArgument(f"input {alias}: malformed tensor: {error}") from error
    if array.shape != shape:
        raise InvalidArgument(f"input {alias}: content does not fill shape {list(shape)}")
    return array


def _inputs(
    request: predict_pb2.PredictRequest, signature: meta_graph_pb2.SignatureDef
) -> dict[str, np.ndarray]:
    expected = sorted(signature.inputs)
    for alias in request.inputs:
        if alias not in signature.inputs:
            raise InvalidArgument(
                f"input tensor alias not found in signature: {alias}. "
                f"Inputs expected to be in the set {{{','.join(expected)}}}."
            )
    missing = sorted(set(expected) - set(request.inputs))
    if missing:
        raise InvalidArgument(
            f"input size does not match signature: {len(request.inputs)}!={len(expected)}. "
            f"Missing but required: {{{','.join(missing)}}}."
        )
    return {
        alias: _check_input(alias, proto, signature.inputs[alias])
        for alias, proto in request.inputs.items()
    }


def _output_names(
    request: predict_pb2.PredictRequest, signature: meta_graph_pb2.SignatureDef
) -> list[str]:
    if not request.output_filter:
        return sorted(signature.outputs)
    names = list(request.output_filter)
    for name in names:
        if name not in signature.outputs:
            raise InvalidArgument(
                f"output tensor alias not found in signature: {name} Outputs expected to be in "
                f"the set {{{','.join(sorted(signature.outputs))}}}."
            )
    if len(set(names)) != len(names):
        raise InvalidArgument(f"duplicate output tensor alias in output_filter: {names}")
    return names


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    """``tensorflow.serving.PredictionService``: Predict and GetModelMetadata."""

    def __init__(self, models: Models) -> None:
        self.models = models

    def Predict(  # noqa: N802 - gRPC method name
        self, request: predict_pb2.PredictRequest, context: grpc.ServicerContext
    ) -> predict_pb2.PredictResponse:
        return self.models.answer(context, "Predict", request, lambda: self._predict(request))

    def GetModelMetadata(  # noqa: N802 - gRPC method name
        self, request: get_model_metadata_pb2.GetModelMetadataRequest, context: grpc.ServicerContext
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return self.models.answer(
            context, "GetModelMetadata", request, lambda: self._metadata(request)
        )

    def _predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        spec, manager = self.models.for_request(request)
        loaded = manager.resolve(spec)
        signature_name = spec.signature_name or SIGNATURE_NAME
        if signature_name not in loaded.servable.signature_names:
            raise InvalidArgument(f'Serving signature key "{signature_name}" not found.')
        signature = loaded.servable.signature_defs[signature_name]
        inputs = _inputs(request, signature)
        output_names = _output_names(request, signature)
        outputs = loaded.servable.run(signature_name, inputs, output_names)
        response = predict_pb2.PredictResponse(
            model_spec=resolved_spec(manager.name, loaded.version, signature_name)
        )
        for name in output_names:
            response.outputs[name].CopyFrom(tensors.to_tensor_proto(outputs[name], as_field=True))
        if self.models.metrics is not None:
            images = len(next(iter(inputs.values())))
            self.models.metrics.images.labels(manager.name, str(loaded.version)).inc(images)
        logger.debug(
            "predicted",
            extra={
                "model_name": manager.name,
                "model_version": loaded.version,
                "batch": [len(v) if v.ndim else 1 for v in inputs.values()],
            },
        )
        return response

    def _metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        if not request.metadata_field:
            raise InvalidArgument(
                "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != SIGNATURE_DEF_FIELD:
                raise InvalidArgument(f"Metadata field {field} is not supported")
        spec, manager = self.models.for_request(request)
        loaded = manager.resolve(spec)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, signature in loaded.servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(signature)
        packed = any_pb2.Any()
        packed.Pack(signature_map)
        response = get_model_metadata_pb2.GetModelMetadataResponse(
            model_spec=resolved_spec(manager.name, loaded.version)
        )
        response.metadata[SIGNATURE_DEF_FIELD].CopyFrom(packed)
        return response


class ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    """``tensorflow.serving.ModelService``: GetModelStatus (the server's health)."""

    def __init__(self, models: Models) -> None:
        self.models = models

    def GetModelStatus(  # noqa: N802 - gRPC method name
        self, request: get_model_status_pb2.GetModelStatusRequest, context: grpc.ServicerContext
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return self.models.answer(context, "GetModelStatus", request, lambda: self._status(request))

    def _status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        spec, manager = self.models.for_request(request)
        return get_model_status_pb2.GetModelStatusResponse(
            model_version_status=[
                get_model_status_pb2.ModelVersionStatus(
                    version=version,
                    state=status.state,
                    status=status_pb2.StatusProto(
                        error_code=status.error_code, error_message=status.error_message
                    ),
                )
                for version, status in manager.statuses(spec)
            ]
        )
