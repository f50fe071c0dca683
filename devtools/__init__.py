"""Development and test tooling: the local stack (``scanwatch run``), a local Kafka broker,
throwaway PostgreSQL clusters, the real DICOM peers (dcmtk, Orthanc) and condition waits for
tests. Nothing here runs inside a service image; services import only ``scanwatch`` (the shared
runtime kernel) and ``schemas``."""
