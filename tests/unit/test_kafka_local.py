"""The local broker's and cluster's helpers and configuration, with no broker running."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from devtools.cli import parser
from devtools.kafka_local import (
    LocalKafka,
    LocalKafkaCluster,
    _ephemeral_low,
    _share,
    free_port,
    new_cluster_id,
)
from schemas.topics import DEVELOPMENT, PRODUCTION, replication_for


def test_cluster_ids_never_look_like_options_and_decode_to_16_bytes():
    ids = {new_cluster_id() for _ in range(2000)}  # ~1 in 64 raw ids starts with '-'
    assert len(ids) == 2000
    for cluster_id in ids:
        assert not cluster_id.startswith("-")
        assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16


def _properties(path: Path) -> dict[str, str]:
    lines = path.read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def test_the_single_broker_is_a_development_broker(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, tmp_path / "libs", port=19092)
    props = _properties(broker._write_config())
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:19093"
    assert props["default.replication.factor"] == str(DEVELOPMENT.factor) == "1"
    assert props["min.insync.replicas"] == str(DEVELOPMENT.min_insync) == "1"


def test_a_cluster_is_three_voters_with_production_replication(tmp_path: Path) -> None:
    cluster = LocalKafkaCluster(tmp_path, tmp_path / "libs", ports=[19100, 19102, 19104])
    assert cluster.bootstrap_servers == "127.0.0.1:19100,127.0.0.1:19102,127.0.0.1:19104"
    written = {n: _properties(node._write_config()) for n, node in cluster.nodes.items()}
    assert {p["controller.quorum.voters"] for p in written.values()} == {
        "1@127.0.0.1:19101,2@127.0.0.1:19103,3@127.0.0.1:19105"
    }
    assert [p["node.id"] for p in written.values()] == ["1", "2", "3"]
    for props in written.values():
        assert props["process.roles"] == "broker,controller"
        assert props["default.replication.factor"] == str(PRODUCTION.factor) == "3"
        assert props["offsets.topic.replication.factor"] == "3"
        assert props["min.insync.replicas"] == str(PRODUCTION.min_insync) == "2"
        assert props["unclean.leader.election.enable"] == "false"
    # Every node is formatted with one cluster id.
    assert len({node.cluster_id for node in cluster.nodes.values()}) == 1


def test_a_cluster_keeps_the_id_its_nodes_were_formatted_with(tmp_path: Path) -> None:
    (tmp_path / "node-2" / "data").mkdir(parents=True)
    (tmp_path / "node-2" / "data" / "meta.properties").write_text("cluster.id=abcDEF\n")
    cluster = LocalKafkaCluster(tmp_path, tmp_path / "libs", ports=[19100, 19102, 19104])
    assert {node.cluster_id for node in cluster.nodes.values()} == {"abcDEF"}


def test_fewer_than_three_nodes_are_not_a_production_cluster(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3 nodes"):
        LocalKafkaCluster(tmp_path, tmp_path / "libs", nodes=2)


def test_topics_get_production_replication_except_on_a_single_development_broker() -> None:
    assert replication_for(1, configured_factor=1) == DEVELOPMENT
    assert replication_for(1, configured_factor=3) == PRODUCTION  # the others fenced a moment
    assert replication_for(3, 1) == replication_for(5, 3) == PRODUCTION
    assert PRODUCTION.min_insync < PRODUCTION.factor  # one broker may be lost while writing


def test_the_cli_starts_a_cluster_with_nodes_3() -> None:
    args = parser().parse_args(["kafka", "start", "--nodes", "3"])
    assert (args.action, args.nodes, args.port) == ("start", 3, 9092)
    assert parser().parse_args(["kafka", "status"]).nodes == 1  # the development default


def test_the_broker_jvm_compiles_with_the_client_jit_only(tmp_path: Path) -> None:
    """C2 compiling a fresh broker's hot paths cost as much CPU per ingested instance as the
    listener itself during a development stack's first minutes (issue 20): C1 only."""
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-3.9.1.jar").touch()
    argv = LocalKafka(tmp_path, libs)._java("kafka.Kafka", "server.properties")
    assert "-XX:TieredStopAtLevel=1" in argv[: argv.index("kafka.Kafka")]


def test_each_xdist_worker_draws_ports_from_its_own_share(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    drawn = {}
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        drawn[worker] = [free_port() for _ in range(20)]
    ephemeral = _ephemeral_low()
    middle = min(20000, ephemeral // 2) + (ephemeral - min(20000, ephemeral // 2)) // 2
    assert all(port + 1 < middle for port in drawn["gw0"])
    assert all(middle <= port and port + 1 < ephemeral for port in drawn["gw1"])


def test_outside_xdist_ports_come_from_the_whole_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PYTEST_XDIST_WORKER", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_WORKER_COUNT", raising=False)
    assert _share(20000, 32768) == (20000, 32768)
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw3")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")  # not a worker of this count
    assert _share(20000, 32768) == (20000, 32768)
