"""The local broker's helpers that need no broker."""

from __future__ import annotations

import base64

from devtools.kafka_local import new_cluster_id


def test_cluster_ids_never_look_like_options_and_decode_to_16_bytes():
    ids = {new_cluster_id() for _ in range(2000)}  # ~1 in 64 raw ids starts with '-'
    assert len(ids) == 2000
    for cluster_id in ids:
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16
