"""Network services of scanwatch: the FHIR API and the local model server."""
