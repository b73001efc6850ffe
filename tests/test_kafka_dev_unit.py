"""Pure parts of the local Kafka runner: properties, state file, lock file, cache logic.

No Java and no network: the one fake is the mvn fetch, replaced to test the cache decisions.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest

from gateway.dev import kafka_dist
from gateway.dev.kafka_props import (
    BrokerTls,
    NodeLayout,
    bootstrap_string,
    cluster_settings,
    new_cluster_id,
    render_pom,
    render_properties,
    server_properties,
)
from gateway.dev.kafka_sasl import SaslUser, new_sasl_user, scram_format_args
from gateway.dev.kafka_state import (
    BrokerState,
    KafkaState,
    SaslState,
    state_from_json,
    state_to_json,
)
from gateway.errors import LocalKafkaError

_TLS = BrokerTls(
    ca_pem="-----BEGIN CERTIFICATE-----\nCA\n-----END CERTIFICATE-----\n",
    cert_pem="-----BEGIN CERTIFICATE-----\nLEAF\n-----END CERTIFICATE-----\n",
    key_pem="-----BEGIN PRIVATE KEY-----\nKEY\n-----END PRIVATE KEY-----\n",
)


def _nodes(count: int) -> list[NodeLayout]:
    return [
        NodeLayout(
            node_id=i,
            ssl_port=10000 + 10 * i,
            internal_port=10001 + 10 * i,
            controller_port=10002 + 10 * i,
            node_dir=Path(f"/d/node-{i}"),
        )
        for i in range(1, count + 1)
    ]


def _parse(text: str) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in text.splitlines() if not line.startswith("#"))
    return dict(pairs)


def test_single_node_properties() -> None:
    (node,) = _nodes(1)
    props = server_properties(node, [node], tls=_TLS, partitions=3)
    assert props["listeners"] == (
        "SSL://127.0.0.1:10010,INTERNAL://127.0.0.1:10011,CONTROLLER://127.0.0.1:10012"
    )
    assert props["advertised.listeners"] == "SSL://127.0.0.1:10010,INTERNAL://127.0.0.1:10011"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:10012"
    assert props["ssl.client.auth"] == "required"
    assert props["ssl.keystore.type"] == props["ssl.truststore.type"] == "PEM"
    assert props["auto.create.topics.enable"] == "false"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    assert props["log.dirs"] == "/d/node-1/data"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "min.insync.replicas",
    ):
        assert props[key] == "1", key


def test_every_listener_is_loopback() -> None:
    nodes = _nodes(3)
    for node in nodes:
        props = server_properties(node, nodes, tls=_TLS, partitions=3)
        for key in ("listeners", "advertised.listeners", "controller.quorum.voters"):
            for item in props[key].split(","):
                assert "127.0.0.1:" in item, (key, item)


def test_three_nodes_share_voters_and_replicate() -> None:
    nodes = _nodes(3)
    props = [server_properties(n, nodes, tls=_TLS, partitions=3) for n in nodes]
    assert {p["controller.quorum.voters"] for p in props} == {
        "1@127.0.0.1:10012,2@127.0.0.1:10022,3@127.0.0.1:10032"
    }
    assert [p["node.id"] for p in props] == ["1", "2", "3"]
    assert props[0]["offsets.topic.replication.factor"] == "3"
    assert props[0]["min.insync.replicas"] == "2"
    assert bootstrap_string(nodes) == "127.0.0.1:10010,127.0.0.1:10020,127.0.0.1:10030"


def test_cluster_settings_refuses_zero() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        cluster_settings(0)


def test_render_properties_keeps_pem_on_one_line() -> None:
    (node,) = _nodes(1)
    text = render_properties(server_properties(node, [node], tls=_TLS, partitions=1))
    parsed = _parse(text)
    assert parsed["ssl.keystore.key"] == (
        "-----BEGIN PRIVATE KEY-----\\nKEY\\n-----END PRIVATE KEY-----"
    )
    assert render_properties({"a": "x#y\\z"}).splitlines()[1] == "a=x\\#y\\\\z"


def test_cluster_id_is_a_kafka_uuid() -> None:
    ids = {new_cluster_id() for _ in range(50)}
    assert len(ids) == 50
    assert all(len(i) == 22 and not i.startswith("-") for i in ids)


def test_pom_names_the_version() -> None:
    pom = render_pom("9.9.9")
    assert "<artifactId>kafka_2.13</artifactId><version>9.9.9</version>" in pom
    assert "log4j-slf4j-impl" in pom


def test_state_round_trip() -> None:
    state = KafkaState(
        version="4.4.0",
        cluster_id="abc",
        bootstrap="127.0.0.1:1,127.0.0.1:2",
        data_dir=Path("/d"),
        started_at="2026-01-01T00:00:00+00:00",
        pki_dir=Path("/p"),
        ca_file=Path("/p/ca.pem"),
        cert_file=Path("/p/gateway.pem"),
        key_file=Path("/p/gateway-key.pem"),
        brokers=(BrokerState(1, 42, 1, 3, 4, Path("/d/node-1/kafka.log"), Path("/d/p")),),
    )
    assert state_from_json(state_to_json(state)) == state
    assert state.bootstrap_servers == ["127.0.0.1:1", "127.0.0.1:2"]
    assert state.state_file == Path("/d/state.json")


def test_sasl_listener_beside_mutual_tls() -> None:
    user = SaslUser("tidegate", "pw-123_x")
    nodes = [dataclasses.replace(n, sasl_port=10005 + 10 * n.node_id) for n in _nodes(3)]
    props = server_properties(nodes[0], nodes, tls=_TLS, partitions=3, sasl_users=[user])
    assert props["listeners"].endswith(",SASL://127.0.0.1:10015")
    assert props["advertised.listeners"].endswith(",SASL://127.0.0.1:10015")
    assert "SASL:SASL_SSL" in props["listener.security.protocol.map"].split(",")
    # The mutual-TLS listener keeps requiring a certificate; the SASL one does not.
    assert props["ssl.client.auth"] == "required"
    assert props["listener.name.sasl.ssl.client.auth"] == "none"
    assert (
        props["listener.name.sasl.sasl.enabled.mechanisms"] == "SCRAM-SHA-512,SCRAM-SHA-256,PLAIN"
    )
    assert props["listener.name.sasl.plain.sasl.jaas.config"] == (
        'org.apache.kafka.common.security.plain.PlainLoginModule required user_tidegate="pw-123_x";'
    )
    assert "required;" in props["listener.name.sasl.scram-sha-512.sasl.jaas.config"]
    # Replication and the quorum stay plaintext loopback, without SASL.
    assert props["inter.broker.listener.name"] == "INTERNAL"
    assert "user_" not in props["listener.name.sasl.scram-sha-512.sasl.jaas.config"]
    with pytest.raises(ValueError, match="needs at least one user"):
        server_properties(nodes[0], nodes, tls=_TLS, partitions=3)


def test_scram_credentials_are_formatted_per_mechanism() -> None:
    user = SaslUser("tidegate", "pw")
    assert scram_format_args([user]) == [
        "--add-scram",
        "SCRAM-SHA-512=[name=tidegate,password=pw]",
        "--add-scram",
        "SCRAM-SHA-256=[name=tidegate,password=pw]",
    ]
    assert "pw" not in repr(user)
    fresh = new_sasl_user()
    assert len(fresh.password) >= 32
    assert fresh.password != new_sasl_user().password
    # Anything needing quotes in JAAS or --add-scram is refused rather than escaped.
    for bad in ('a"b', "a,b", "a]b", "", "é"):
        with pytest.raises(ValueError, match="letters, digits"):
            scram_format_args([SaslUser("u", bad)])


def test_state_with_sasl_round_trips_and_old_state_still_loads() -> None:
    broker = BrokerState(1, 42, 1, 3, 4, Path("/l"), Path("/p"), sasl_port=7)
    state = KafkaState(
        version="4.4.0",
        cluster_id="abc",
        bootstrap="127.0.0.1:1",
        data_dir=Path("/d"),
        started_at="2026-01-01T00:00:00+00:00",
        pki_dir=Path("/p"),
        ca_file=Path("/p/ca.pem"),
        cert_file=Path("/p/gateway.pem"),
        key_file=Path("/p/gateway-key.pem"),
        brokers=(broker,),
        sasl=SaslState("tidegate", Path("/d/sasl-password"), ("SCRAM-SHA-512", "PLAIN")),
    )
    text = state_to_json(state)
    assert state_from_json(text) == state
    assert state.sasl_bootstrap == "127.0.0.1:7"
    assert '"bootstrap": "127.0.0.1:7"' in text
    # A state file from before the SASL listener: no sasl keys at all.
    old = state_to_json(
        dataclasses.replace(
            state, sasl=None, brokers=(dataclasses.replace(broker, sasl_port=None),)
        )
    )
    assert "sasl" not in old
    loaded = state_from_json(old)
    assert loaded.sasl is None
    assert loaded.sasl_bootstrap is None


@pytest.mark.parametrize(
    ("text", "message"),
    [("{", "not JSON"), ('{"format": 1}', "missing field"), ('{"format": 9}', "format 9")],
)
def test_bad_state_is_reported(text: str, message: str) -> None:
    with pytest.raises(LocalKafkaError, match=message):
        state_from_json(text, source="s.json")


def test_lock_round_trip_and_bad_line() -> None:
    digests = {"b.jar": "1" * 64, "a.jar": "2" * 64}
    assert kafka_dist.parse_lock(kafka_dist.render_lock("1.0", digests)) == digests
    with pytest.raises(LocalKafkaError, match="line 1"):
        kafka_dist.parse_lock("nonsense  x.jar\n")


class _FakeFetch:
    """Stands in for mvn: writes the given jars into a fresh directory, counts calls."""

    def __init__(self, jars: dict[str, bytes]) -> None:
        self.jars = jars
        self.calls = 0

    def __call__(self, version: str, version_dir: Path) -> Path:
        self.calls += 1
        out = version_dir / f"libs.fetch{self.calls}"
        out.mkdir()
        for name, data in self.jars.items():
            (out / name).write_bytes(data)
        return out


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> _FakeFetch:
    monkeypatch.setenv("TIDEGATE_CACHE", str(tmp_path / "cache"))
    lock = tmp_path / "kafka-1.0.sha256"
    monkeypatch.setattr(kafka_dist, "lock_file", lambda version: lock)
    fake = _FakeFetch({"kafka_2.13-1.0.jar": b"broker", "dep.jar": b"dep"})
    monkeypatch.setattr(kafka_dist, "_mvn_fetch", fake)
    return fake


def test_cache_is_fetched_once_then_verified(
    fake_dist: _FakeFetch, caplog: pytest.LogCaptureFixture
) -> None:
    libs = kafka_dist.ensure_kafka_libs("1.0")  # no lock yet: written from this fetch
    assert kafka_dist.lock_file("1.0").is_file()
    assert kafka_dist.ensure_kafka_libs("1.0") == libs
    assert fake_dist.calls == 1  # the marker made the second call skip the fetch

    (libs / "dep.jar").write_bytes(b"tampered")
    with caplog.at_level(logging.WARNING):
        kafka_dist.ensure_kafka_libs("1.0")
    assert fake_dist.calls == 2
    assert "checksum mismatch dep.jar" in caplog.text
    assert (libs / "dep.jar").read_bytes() == b"dep"


def test_fetch_that_does_not_match_the_lock_is_refused(fake_dist: _FakeFetch) -> None:
    kafka_dist.ensure_kafka_libs("1.0")
    (kafka_dist.cache_root() / "kafka" / "1.0" / "complete").unlink()
    fake_dist.jars["dep.jar"] = b"something else"
    with pytest.raises(LocalKafkaError, match="do not match"):
        kafka_dist.ensure_kafka_libs("1.0")
    assert not (kafka_dist.cache_root() / "kafka" / "1.0" / "libs").exists()
