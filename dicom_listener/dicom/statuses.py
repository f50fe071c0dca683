"""Every DIMSE status the listener answers with, by name (Status (0000,0900), PS3.7 9.1.1.1.9).

General statuses are PS3.7 Annex C's; the C-STORE ones are the Storage Service Class's
(PS3.4 B.2.3, Table B.2-1), which reserves a range per meaning. The codes inside a range are
this listener's own, so that a sender's log says which check failed; ``dicom_listener/README.md``
lists them with what a sender should do.
"""

from __future__ import annotations

from typing import Final

#: Success (PS3.7 C.1): the instance is durable and its event recorded.
SUCCESS: Final = 0x0000
#: Failure: Processing failure (PS3.7 Annex C), for a handler that failed unexpectedly; also
#: an MPPS that may no longer be updated (PS3.4 F.7.2.2.2).
PROCESSING_FAILURE: Final = 0x0110

# General failures of the DIMSE-N services (PS3.7 C.4), answered to N-CREATE and N-SET.
#: An attribute's value is not allowed (e.g. an N-CREATE not IN PROGRESS).
INVALID_ATTRIBUTE_VALUE: Final = 0x0106
#: An N-CREATE of a SOP Instance that exists already.
DUPLICATE_SOP_INSTANCE: Final = 0x0111
#: An N-SET of a SOP Instance never created.
NO_SUCH_SOP_INSTANCE: Final = 0x0112
#: A required attribute is missing (e.g. the step names no study).
MISSING_ATTRIBUTE: Final = 0x0120
#: The request names a SOP Class this listener does not serve with it.
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
#: An N-ACTION's Action Type ID is not one the SOP Class defines.
NO_SUCH_ACTION: Final = 0x0123

# Refused: Out of Resources (A7xx): the sender should retry later.
#: The instance could not be written to the store.
OUT_OF_RESOURCES_STORAGE: Final = 0xA700
#: The event could not be recorded in the outbox.
OUT_OF_RESOURCES_OUTBOX_WRITE: Final = 0xA701
#: The store's disk is below its free-space watermark.
OUT_OF_RESOURCES_DISK_LOW: Final = 0xA702
#: The outbox holds too many undelivered events (Kafka is behind).
OUT_OF_RESOURCES_OUTBOX_FULL: Final = 0xA703

# Error: Data Set does not match SOP Class (A9xx).
#: SOPClassUID differs from the negotiated SOP Class.
DATASET_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900

# Error: Cannot understand (Cxxx).
#: The dataset could not be decoded.
CANNOT_UNDERSTAND_UNDECODABLE: Final = 0xC210
#: The dataset ends inside an element (truncated).
CANNOT_UNDERSTAND_TRUNCATED: Final = 0xC212
#: A required UID is missing or empty.
CANNOT_UNDERSTAND_MISSING_UID: Final = 0xC220
#: A required UID is not a valid UID (PS3.5 9.1).
CANNOT_UNDERSTAND_INVALID_UID: Final = 0xC221
#: SOPInstanceUID differs from the request's AffectedSOPInstanceUID.
CANNOT_UNDERSTAND_INSTANCE_MISMATCH: Final = 0xC222
