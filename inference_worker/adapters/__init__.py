"""Transports of the worker: the model server over gRPC, the FHIR API over HTTP."""
