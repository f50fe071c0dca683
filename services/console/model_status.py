"""The served model's status, asked the way an operator asks TensorFlow Serving:
``ModelService/GetModelStatus`` over gRPC, answered by a real TF Serving or by
``services/model_server`` alike.

The console carries no TensorFlow (tensorflow-serving-api's message classes import it), so the
three messages this call needs are declared here, field for field as in TF Serving's
``get_model_status.proto`` and ``model.proto``, in a descriptor pool of their own (never the
default pool, where TensorFlow's own definitions may live in the same process).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

METHOD = "/tensorflow.serving.ModelService/GetModelStatus"
#: ModelVersionStatus.State (get_model_status.proto).
STATES = {0: "UNKNOWN", 10: "START", 20: "LOADING", 30: "AVAILABLE", 40: "UNLOADING", 50: "END"}
#: tensorflow.error.Code, the ones a status carries in practice.
ERROR_CODES = {0: "OK", 3: "INVALID_ARGUMENT", 5: "NOT_FOUND", 13: "INTERNAL", 14: "UNAVAILABLE"}

_T = descriptor_pb2.FieldDescriptorProto


def _messages() -> tuple[Any, Any]:
    """The request and response classes, built from descriptors declared here."""
    pool = descriptor_pool.DescriptorPool()
    wrappers = descriptor_pb2.FileDescriptorProto(
        name="google/protobuf/wrappers.proto", package="google.protobuf", syntax="proto3"
    )
    wrappers.message_type.add(name="Int64Value").field.add(
        name="value", number=1, type=_T.TYPE_INT64, label=_T.LABEL_OPTIONAL
    )
    pool.Add(wrappers)
    apis = descriptor_pb2.FileDescriptorProto(
        name="tensorflow_serving/apis/get_model_status.proto",
        package="tensorflow.serving",
        syntax="proto3",
        dependency=["google/protobuf/wrappers.proto"],
    )

    def field(message: Any, name: str, number: int, kind: int, type_name: str = "") -> None:
        added = message.field.add(name=name, number=number, type=kind, label=_T.LABEL_OPTIONAL)
        if type_name:
            added.type_name = type_name

    spec = apis.message_type.add(name="ModelSpec")
    field(spec, "name", 1, _T.TYPE_STRING)
    field(spec, "version", 2, _T.TYPE_MESSAGE, ".google.protobuf.Int64Value")
    field(spec, "signature_name", 3, _T.TYPE_STRING)
    field(spec, "version_label", 4, _T.TYPE_STRING)
    request = apis.message_type.add(name="GetModelStatusRequest")
    field(request, "model_spec", 1, _T.TYPE_MESSAGE, ".tensorflow.serving.ModelSpec")
    status = apis.message_type.add(name="StatusProto")
    field(status, "error_code", 1, _T.TYPE_INT32)  # an enum on the wire: a varint either way
    field(status, "error_message", 2, _T.TYPE_STRING)
    version = apis.message_type.add(name="ModelVersionStatus")
    field(version, "version", 1, _T.TYPE_INT64)
    field(version, "state", 2, _T.TYPE_INT32)
    field(version, "status", 3, _T.TYPE_MESSAGE, ".tensorflow.serving.StatusProto")
    response = apis.message_type.add(name="GetModelStatusResponse")
    response.field.add(
        name="model_version_status",
        number=1,
        type=_T.TYPE_MESSAGE,
        type_name=".tensorflow.serving.ModelVersionStatus",
        label=_T.LABEL_REPEATED,
    )
    pool.Add(apis)
    return (
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.GetModelStatusRequest")
        ),
        message_factory.GetMessageClass(
            pool.FindMessageTypeByName("tensorflow.serving.GetModelStatusResponse")
        ),
    )


_Request, _Response = _messages()


@dataclass(frozen=True)
class VersionStatus:
    version: int
    state: str  # AVAILABLE, LOADING, END, ...
    error: str | None  # "NOT_FOUND: ..." when the server reports one


@dataclass(frozen=True)
class ModelStatus:
    """What the model server said of a model: its versions, or why it could not say."""

    target: str
    name: str
    versions: tuple[VersionStatus, ...]
    problem: str | None = None  # the gRPC error (the server down, the model unknown)

    @property
    def serving(self) -> int | None:
        """The newest AVAILABLE version, which answers Predict without a version."""
        available = [v.version for v in self.versions if v.state == "AVAILABLE"]
        return max(available) if available else None


def model_status(target: str, name: str, timeout: float = 3.0) -> ModelStatus:
    """Ask ``target`` (host:port of the gRPC API) for ``name``'s versions."""
    request = _Request()
    request.model_spec.name = name
    try:
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(
                METHOD,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=_Response.FromString,
            )
            answer = call(request, timeout=timeout)
    except grpc.RpcError as error:
        code = error.code().name if hasattr(error, "code") else "UNKNOWN"
        details = error.details() if hasattr(error, "details") else str(error)
        return ModelStatus(target, name, (), f"{code}: {details}")
    versions = tuple(
        VersionStatus(
            int(v.version),
            STATES.get(int(v.state), str(v.state)),
            (
                f"{ERROR_CODES.get(int(v.status.error_code), v.status.error_code)}: "
                f"{v.status.error_message}"
                if v.status.error_code
                else None
            ),
        )
        for v in answer.model_version_status
    )
    return ModelStatus(target, name, tuple(sorted(versions, key=lambda v: v.version)))
