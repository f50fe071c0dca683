"""DICOM listener: a Storage SCP that makes each received MR instance durable and announces it.

C-STORE success is returned only after the instance is on disk (temp name, fsync, rename) and
its ``dicom.instance.received.v1`` event is acknowledged by Kafka (DESIGN §2).
"""
