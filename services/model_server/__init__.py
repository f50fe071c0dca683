"""A local model server that speaks TensorFlow Serving's gRPC API.

It serves a TF-Serving-layout repository (``<base>/<name>/<version>/saved_model.pb``) through
``PredictionService`` (Predict, GetModelMetadata) and ``ModelService`` (GetModelStatus), with TF
Serving's model specs, error codes and "latest" version policy, so that a client cannot tell it
from ``tensorflow_model_server``. Production runs the real TF Serving on the same repository.
"""
