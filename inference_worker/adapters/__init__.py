"""Transports of the worker: the FHIR API over HTTP."""
