"""Faust worker: assembles studies from instance events, scores them through the TensorFlow
Serving gRPC API and writes the results as FHIR resources."""
