"""FHIR R4 REST API over the results store (DESIGN §6): read, update-as-create and
Observation search by patient, as ``application/fhir+json``."""
