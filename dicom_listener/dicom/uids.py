"""UIDs the network layer speaks: DICOM's own and this implementation's identity."""

from __future__ import annotations

import uuid

from scanwatch.ids import NAMESPACE

#: The only application context of DICOM (PS3.7 A.2.1).
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
#: Verification SOP Class (C-ECHO, PS3.4 A.4).
VERIFICATION = "1.2.840.10008.1.1"
#: This implementation's identity in A-ASSOCIATE-AC (PS3.7 D.3.3.2) and file meta (PS3.10 7.1):
#: a UUID-derived UID (PS3.5 B.2), so that no organisational root is needed.
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(NAMESPACE, 'dicom-listener').int}"
IMPLEMENTATION_VERSION_NAME = "SCANWATCH_1"
