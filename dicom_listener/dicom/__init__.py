"""The listener's own DICOM network layer: the Upper Layer (PS3.8) and the two DIMSE services
a Storage SCP needs (C-STORE and C-ECHO, PS3.7), one blocking thread per association.

Why not pynetdicom's AE: its DUL and association reactors poll with 1 ms sleeps and two
threads per association, which capped even its bare ``storescp`` at 0.46x Orthanc's rate on
this project's machines (``bench/ingest.md``). Here a thread blocks in ``recv`` on its socket,
each P-DATA fragment of a dataset goes straight to a temporary file while being hashed, and the
response leaves as soon as the store handler returns; nothing polls.

Split as pynetdicom splits its own:

- :mod:`.contract`: what a handler sees and returns (``ReceivedInstance``, ``Peer``,
  ``Status``, the handler signatures); imports nothing of the network side.
- :mod:`.statuses`: every DIMSE status the listener answers with, by name.
- :mod:`.uids`, :mod:`.values`: DICOM's and this implementation's UIDs; value padding rules.
- :mod:`.pdu`: the PDU codec (PS3.8 9.3); :mod:`.dimse`: Command Sets (PS3.7 9.3, E);
  :mod:`.file_meta`: the Part 10 header of a received dataset (PS3.10 7.1).
- :mod:`.association`: negotiation and one association's P-DATA loop.
- :mod:`.server`: the TCP (or TLS) server, a thread per association.
"""
