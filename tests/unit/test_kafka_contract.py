"""The partitioner contract (scanwatch.kafka): every client puts a key on the same partition."""

from __future__ import annotations

import random

import pytest
from aiokafka.partitioner import DefaultPartitioner
from aiokafka.partitioner import murmur2 as aiokafka_murmur2

from scanwatch import kafka
from schemas.topics import STUDY_PARTITIONS

# org.apache.kafka.common.utils.UtilsTest#testMurmur2: the Java clients' own vectors.
JAVA_VECTORS = {
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize(("key", "expected"), JAVA_VECTORS.items())
def test_murmur2_matches_the_java_clients(key: bytes, expected: int) -> None:
    assert kafka.murmur2(key) == expected


def test_partition_for_matches_faust_s_partitioner_for_every_key_length() -> None:
    rng = random.Random(20261202)
    keys = [rng.randbytes(n) for n in range(0, 70) for _ in range(20)]
    keys += [f"1.2.826.0.1.3680043.8.498.{rng.getrandbits(96)}".encode() for _ in range(500)]
    partitions = list(range(STUDY_PARTITIONS))
    faust_side = DefaultPartitioner()
    for key in keys:
        assert (kafka.murmur2(key) & 0xFFFFFFFF) == (aiokafka_murmur2(key) & 0xFFFFFFFF)
        assert kafka.partition_for(key, STUDY_PARTITIONS) == faust_side(key, partitions, partitions)


def test_every_producer_shares_the_contract_s_settings() -> None:
    config = kafka.producer_config("h:1", "c", 2.5, **{"linger.ms": 2})
    assert config["partitioner"] == "murmur2_random"
    assert (config["acks"], config["max.in.flight.requests.per.connection"]) == ("all", 1)
    assert config["message.timeout.ms"] == 2500 and config["linger.ms"] == 2
