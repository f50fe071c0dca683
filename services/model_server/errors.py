"""Failures a request can meet, each carrying the gRPC status TF Serving would answer with."""

from __future__ import annotations

import grpc


class ServingError(Exception):
    """A request failure with the gRPC status code it is reported with."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFound(ServingError):
    """Unknown model, or a version that is not loaded."""

    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(ServingError):
    """The request is malformed: model spec, input aliases, dtypes, shapes, metadata fields."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class Unavailable(ServingError):
    """The model is known but no version is loaded (yet); the client should retry later."""

    code = grpc.StatusCode.UNAVAILABLE
