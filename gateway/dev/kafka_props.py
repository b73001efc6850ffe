"""Pure rendering for the local Kafka: server.properties, log4j2 config, the fetch pom.

Nothing here touches a file or a socket, so every line the broker will read is unit-tested
without Java.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.dev.kafka_sasl import SASL_LISTENER, SaslUser, sasl_listener_settings

__all__ = [
    "KAFKA_VERSION",
    "BrokerTls",
    "NodeLayout",
    "bootstrap_string",
    "cluster_settings",
    "new_cluster_id",
    "proxy_bootstrap_string",
    "render_log4j2",
    "render_pom",
    "render_properties",
    "server_properties",
]

KAFKA_VERSION = "4.4.0"
"""The pinned broker version; see gateway/dev/kafka_dist.py for why this one."""

# Versions fetched alongside kafka_2.13: kafka-clients 4.x logs through slf4j 1.7, and the
# broker pulls log4j-core but no slf4j binding, so without this jar the broker is silent.
_LOG4J_VERSION = "2.25.5"
# Pinned so the fetch does not depend on Maven's (old) default plugin version.
_DEPENDENCY_PLUGIN_VERSION = "3.8.1"


@dataclass(frozen=True)
class BrokerTls:
    """The broker's PEM material, inlined into server.properties (so that file is 0600).

    Inline PEM (``ssl.keystore.key``) is used rather than a keystore file because it takes
    the key and the chain from separate files as the PKI writes them, unencrypted.
    """

    ca_pem: str
    cert_pem: str
    key_pem: str


@dataclass(frozen=True)
class NodeLayout:
    """One combined broker+controller node: its id, loopback ports and directories."""

    node_id: int
    ssl_port: int
    """The client listener (mutual TLS); this is what goes into the bootstrap string."""
    internal_port: int
    """Plaintext loopback listener for replication between brokers."""
    controller_port: int
    """Plaintext loopback listener for the KRaft quorum."""
    node_dir: Path
    """Per-node directory: properties, log file, and ``data/`` (the log dir)."""
    proxied_port: int | None = None
    """Optional second mutual-TLS client listener (``PROXIED``) bound here, for a TCP proxy
    the chaos harness controls: clients that bootstrap through the proxy get metadata naming
    ``proxy_advertised_port``, so all their traffic keeps going through the proxy."""
    proxy_advertised_port: int | None = None
    """The proxy's own port, advertised for the ``PROXIED`` listener (set with the above)."""
    sasl_port: int | None = None
    """Optional SASL_SSL client listener (``SASL``: server TLS, user name and password,
    no client certificate); see gateway/dev/kafka_sasl.py."""

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs`` (the partition data, not the text log)."""
        return self.node_dir / "data"

    @property
    def properties_path(self) -> Path:
        """Where this node's server.properties is written."""
        return self.node_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        """The broker's stdout/stderr (log4j writes to the console)."""
        return self.node_dir / "kafka.log"


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (Kafka's Uuid)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        # Kafka's own generator skips ids starting with '-': they read as a CLI option.
        if not text.startswith("-"):
            return text


def bootstrap_string(nodes: Sequence[NodeLayout]) -> str:
    """``127.0.0.1:PORT,...`` over the mutual-TLS listeners."""
    return ",".join(f"127.0.0.1:{node.ssl_port}" for node in nodes)


def proxy_bootstrap_string(nodes: Sequence[NodeLayout]) -> str | None:
    """``127.0.0.1:PROXY_PORT,...`` when every node has a proxied listener, else None."""
    ports = [node.proxy_advertised_port for node in nodes]
    if not ports or any(port is None for port in ports):
        return None
    return ",".join(f"127.0.0.1:{port}" for port in ports)


def cluster_settings(brokers: int) -> dict[str, str]:
    """Replication settings that depend only on the cluster size.

    One broker needs factor 1 everywhere or consumer groups and transactions hang waiting
    for replicas that do not exist. Three brokers use factor 3 with min ISR 2, so
    ``acks=all`` means something and one node may be down.
    """
    if brokers < 1:
        raise ValueError(f"brokers must be at least 1, got {brokers}")
    factor = min(brokers, 3)
    min_isr = 1 if factor == 1 else 2
    return {
        "offsets.topic.replication.factor": str(factor),
        "transaction.state.log.replication.factor": str(factor),
        "transaction.state.log.min.isr": str(min_isr),
        "default.replication.factor": str(factor),
        "min.insync.replicas": str(min_isr),
        "share.coordinator.state.topic.replication.factor": str(factor),
        "share.coordinator.state.topic.min.isr": str(min_isr),
    }


def server_properties(
    node: NodeLayout,
    nodes: Sequence[NodeLayout],
    *,
    tls: BrokerTls,
    partitions: int,
    sasl_users: Sequence[SaslUser] = (),
) -> dict[str, str]:
    """All settings of one node, as an ordered mapping (rendered by :func:`render_properties`).

    Everything listens on 127.0.0.1 only. Clients reach the SSL listener and must present a
    certificate from our CA (``ssl.client.auth=required``); replication and the quorum use
    plaintext loopback listeners, which no client is given. A node with ``sasl_port`` also
    has a SASL_SSL client listener for ``sasl_users``.
    """
    voters = ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in nodes)
    listeners = (
        f"SSL://127.0.0.1:{node.ssl_port},"
        f"INTERNAL://127.0.0.1:{node.internal_port},"
        f"CONTROLLER://127.0.0.1:{node.controller_port}"
    )
    advertised = f"SSL://127.0.0.1:{node.ssl_port},INTERNAL://127.0.0.1:{node.internal_port}"
    protocols = "SSL:SSL,INTERNAL:PLAINTEXT,CONTROLLER:PLAINTEXT"
    if node.proxied_port is not None:
        if node.proxy_advertised_port is None:
            raise ValueError(f"node {node.node_id}: proxied_port needs proxy_advertised_port")
        # Same TLS settings as SSL (listener configs fall back to the top-level ssl.*).
        listeners += f",PROXIED://127.0.0.1:{node.proxied_port}"
        advertised += f",PROXIED://127.0.0.1:{node.proxy_advertised_port}"
        protocols += ",PROXIED:SSL"
    if node.sasl_port is not None:
        if not sasl_users:
            raise ValueError(f"node {node.node_id}: a SASL listener needs at least one user")
        listeners += f",{SASL_LISTENER}://127.0.0.1:{node.sasl_port}"
        advertised += f",{SASL_LISTENER}://127.0.0.1:{node.sasl_port}"
        protocols += f",{SASL_LISTENER}:SASL_SSL"
    settings: dict[str, str] = {
        "process.roles": "broker,controller",
        "node.id": str(node.node_id),
        # A static voter set: it is not written into the formatted storage, so a node whose
        # port was taken can be rendered again with new ports and started without reformat.
        "controller.quorum.voters": voters,
        "listeners": listeners,
        "advertised.listeners": advertised,
        "listener.security.protocol.map": protocols,
        "inter.broker.listener.name": "INTERNAL",
        "controller.listener.names": "CONTROLLER",
        "log.dirs": str(node.log_dir),
        "num.partitions": str(partitions),
        "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0",
        # Small segments and indexes: dev clusters hold little data and start many times.
        "log.segment.bytes": str(64 << 20),
        "num.network.threads": "2",
        "num.io.threads": "4",
        "ssl.client.auth": "required",
        "ssl.keystore.type": "PEM",
        "ssl.keystore.certificate.chain": tls.cert_pem.strip(),
        "ssl.keystore.key": tls.key_pem.strip(),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.certificates": tls.ca_pem.strip(),
    }
    if node.sasl_port is not None:
        settings.update(sasl_listener_settings(sasl_users))
    settings.update(cluster_settings(len(nodes)))
    return settings


def render_properties(settings: Mapping[str, str]) -> str:
    """Java ``.properties`` text: ``key=value`` lines with ``\\``, newlines and ``#`` escaped."""
    lines = ["# Written by tidegate (gateway/dev/kafka.py); regenerated on every start."]
    for key, value in settings.items():
        escaped = (
            value.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "").replace("#", "\\#")
        )
        lines.append(f"{key}={escaped}")
    return "\n".join(lines) + "\n"


def render_log4j2(level: str = "INFO") -> str:
    """log4j2 config sending everything to stdout, which the runner redirects to a file."""
    return "\n".join(
        [
            "status = warn",
            "appender.out.type = Console",
            "appender.out.name = OUT",
            "appender.out.layout.type = PatternLayout",
            "appender.out.layout.pattern = [%d] %p %m (%c)%n",
            f"rootLogger.level = {level}",
            "rootLogger.appenderRef.out.ref = OUT",
            # The request logger and state-change logger are noisy at INFO and help nobody here.
            "logger.request.name = kafka.request.logger",
            "logger.request.level = WARN",
            "logger.state.name = state.change.logger",
            "logger.state.level = WARN",
            "",
        ]
    )


def render_pom(version: str) -> str:
    """A throwaway pom whose runtime dependencies are exactly the broker's classpath."""
    deps = [
        ("org.apache.kafka", "kafka_2.13", version),
        ("org.apache.logging.log4j", "log4j-slf4j-impl", _LOG4J_VERSION),
    ]
    dep_xml = "\n".join(
        "    <dependency>"
        f"<groupId>{g}</groupId><artifactId>{a}</artifactId><version>{v}</version>"
        "</dependency>"
        for g, a, v in deps
    )
    return f"""<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dev.tidegate</groupId>
  <artifactId>kafka-fetch</artifactId>
  <version>0</version>
  <packaging>pom</packaging>
  <dependencies>
{dep_xml}
  </dependencies>
  <build>
    <pluginManagement>
      <plugins>
        <plugin>
          <groupId>org.apache.maven.plugins</groupId>
          <artifactId>maven-dependency-plugin</artifactId>
          <version>{_DEPENDENCY_PLUGIN_VERSION}</version>
        </plugin>
      </plugins>
    </pluginManagement>
  </build>
</project>
"""
