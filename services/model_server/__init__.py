"""A local model server that speaks TensorFlow Serving's gRPC API.

It serves TF-Serving-layout repositories (``<base_path>/<version>/saved_model.pb``) through
``PredictionService`` (Predict, GetModelMetadata) and ``ModelService`` (GetModelStatus), with TF
Serving's model specs, error codes, model config file (several models, version policies,
labels), server-side batching and warm-up, on TensorFlow or OpenVINO, so that a client cannot
tell it from ``tensorflow_model_server``. Production runs the real TF Serving on the same
repository and config files (see README.md).
"""
