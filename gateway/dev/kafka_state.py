"""The local Kafka's state file: what is running where, readable by tests, CI and the CLI.

Format (JSON, ``<data_dir>/state.json``)::

    {
      "format": 1,
      "version": "4.4.0",
      "cluster_id": "...",
      "bootstrap": "127.0.0.1:40001,127.0.0.1:40004",
      "data_dir": "/abs/var/kafka",
      "started_at": "2026-11-27T07:00:00+00:00",
      "pki": {"directory": "...", "ca": ".../ca.pem",
              "cert": ".../gateway.pem", "key": ".../gateway-key.pem"},
      "brokers": [{"node_id": 1, "pid": 1234, "ssl_port": 40001, "internal_port": 40002,
                   "controller_port": 40003, "log": ".../node-1/kafka.log",
                   "properties": ".../node-1/server.properties",
                   "proxied_port": 40010, "proxy_port": 40011, "sasl_port": 40012}],
      "sasl": {"bootstrap": "127.0.0.1:40012", "username": "tidegate",
               "password_file": "/abs/var/kafka/sasl-password",
               "mechanisms": ["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"]}
    }

``proxied_port``/``proxy_port`` are present only for clusters started with proxy ports
(the chaos harness's TCP proxy); ``pid`` is updated when a single broker is restarted.
``sasl_port`` and ``sasl`` are present for clusters with the SASL_SSL listener (state files
written before it existed have neither and still load). The password itself is only in the
0600 ``password_file``, never in this file.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.errors import LocalKafkaError

__all__ = [
    "STATE_FORMAT",
    "BrokerState",
    "KafkaState",
    "SaslState",
    "read_state",
    "state_from_json",
    "state_path",
    "state_to_json",
    "write_private_text",
    "write_state",
]

STATE_FORMAT = 1


@dataclass(frozen=True)
class BrokerState:
    """One running node of the local cluster."""

    node_id: int
    pid: int
    ssl_port: int
    internal_port: int
    controller_port: int
    log: Path
    properties: Path
    proxied_port: int | None = None
    """The ``PROXIED`` client listener's own port (None: the cluster has no proxy listener)."""
    proxy_port: int | None = None
    """The proxy port advertised for ``PROXIED``: what clients using the proxy connect to."""
    sasl_port: int | None = None
    """The SASL_SSL client listener's port (None: the cluster has no SASL listener)."""


@dataclass(frozen=True)
class SaslState:
    """The SASL_SSL listener's dev user (its password is in ``password_file``, mode 0600)."""

    username: str
    password_file: Path
    mechanisms: tuple[str, ...]


@dataclass(frozen=True)
class KafkaState:
    """A running local cluster and the client TLS material to reach it."""

    version: str
    cluster_id: str
    bootstrap: str
    """``127.0.0.1:PORT,...`` over the mutual-TLS listeners."""
    data_dir: Path
    started_at: str
    pki_dir: Path
    ca_file: Path
    cert_file: Path
    """The gateway's client certificate (CN=tidegate-gateway)."""
    key_file: Path
    brokers: tuple[BrokerState, ...]
    sasl: SaslState | None = None
    """The SASL_SSL listener's user; None for clusters started without it."""

    @property
    def sasl_bootstrap(self) -> str | None:
        """``127.0.0.1:SASL_PORT,...`` if every broker has a SASL_SSL listener, else None."""
        ports = [b.sasl_port for b in self.brokers]
        if self.sasl is None or not ports or any(port is None for port in ports):
            return None
        return ",".join(f"127.0.0.1:{port}" for port in ports)

    @property
    def bootstrap_servers(self) -> list[str]:
        """The bootstrap string split into ``host:port`` items."""
        return self.bootstrap.split(",")

    @property
    def proxy_bootstrap(self) -> str | None:
        """``127.0.0.1:PROXY_PORT,...`` if every broker has a proxied listener, else None."""
        ports = [b.proxy_port for b in self.brokers]
        if not ports or any(port is None for port in ports):
            return None
        return ",".join(f"127.0.0.1:{port}" for port in ports)

    def broker(self, node_id: int) -> BrokerState:
        """The broker with ``node_id``; raises :class:`LocalKafkaError` if there is none."""
        for broker in self.brokers:
            if broker.node_id == node_id:
                return broker
        raise LocalKafkaError(f"no broker with node id {node_id} in {self.data_dir}")

    @property
    def state_file(self) -> Path:
        """Where this state is (or will be) stored."""
        return state_path(self.data_dir)


def state_path(data_dir: Path) -> Path:
    """The state file of the cluster in ``data_dir``."""
    return data_dir / "state.json"


def state_to_json(state: KafkaState) -> str:
    """Serialise (pure)."""
    doc: dict[str, Any] = {
        "format": STATE_FORMAT,
        "version": state.version,
        "cluster_id": state.cluster_id,
        "bootstrap": state.bootstrap,
        "data_dir": str(state.data_dir),
        "started_at": state.started_at,
        "pki": {
            "directory": str(state.pki_dir),
            "ca": str(state.ca_file),
            "cert": str(state.cert_file),
            "key": str(state.key_file),
        },
        "brokers": [_broker_to_json(b) for b in state.brokers],
    }
    if state.sasl is not None:
        doc["sasl"] = {
            # Derived from the brokers' ports; written for shell users (jq), not read back.
            "bootstrap": state.sasl_bootstrap,
            "username": state.sasl.username,
            "password_file": str(state.sasl.password_file),
            "mechanisms": list(state.sasl.mechanisms),
        }
    return json.dumps(doc, indent=2) + "\n"


def _broker_to_json(b: BrokerState) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node_id": b.node_id,
        "pid": b.pid,
        "ssl_port": b.ssl_port,
        "internal_port": b.internal_port,
        "controller_port": b.controller_port,
        "log": str(b.log),
        "properties": str(b.properties),
    }
    # Optional keys, written only when set: state files of clusters without a proxy
    # listener stay exactly as before.
    if b.proxied_port is not None:
        doc["proxied_port"] = b.proxied_port
    if b.proxy_port is not None:
        doc["proxy_port"] = b.proxy_port
    if b.sasl_port is not None:
        doc["sasl_port"] = b.sasl_port
    return doc


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _sasl_from_json(doc: Any) -> SaslState | None:
    if doc is None:
        return None
    return SaslState(
        username=str(doc["username"]),
        password_file=Path(doc["password_file"]),
        mechanisms=tuple(str(m) for m in doc["mechanisms"]),
    )


def state_from_json(text: str, *, source: str = "state") -> KafkaState:
    """Parse (pure); raises :class:`LocalKafkaError` naming the missing or bad field."""
    try:
        doc = json.loads(text)
        if doc.get("format") != STATE_FORMAT:
            raise LocalKafkaError(
                f"{source}: state format {doc.get('format')!r}, expected {STATE_FORMAT}"
            )
        pki = doc["pki"]
        return KafkaState(
            version=str(doc["version"]),
            cluster_id=str(doc["cluster_id"]),
            bootstrap=str(doc["bootstrap"]),
            data_dir=Path(doc["data_dir"]),
            started_at=str(doc["started_at"]),
            pki_dir=Path(pki["directory"]),
            ca_file=Path(pki["ca"]),
            cert_file=Path(pki["cert"]),
            key_file=Path(pki["key"]),
            brokers=tuple(
                BrokerState(
                    node_id=int(b["node_id"]),
                    pid=int(b["pid"]),
                    ssl_port=int(b["ssl_port"]),
                    internal_port=int(b["internal_port"]),
                    controller_port=int(b["controller_port"]),
                    log=Path(b["log"]),
                    properties=Path(b["properties"]),
                    proxied_port=_optional_int(b.get("proxied_port")),
                    proxy_port=_optional_int(b.get("proxy_port")),
                    sasl_port=_optional_int(b.get("sasl_port")),
                )
                for b in doc["brokers"]
            ),
            sasl=_sasl_from_json(doc.get("sasl")),
        )
    except json.JSONDecodeError as exc:
        raise LocalKafkaError(f"{source}: not JSON: {exc}") from exc
    except KeyError as exc:
        raise LocalKafkaError(f"{source}: missing field {exc.args[0]!r}") from exc
    except (TypeError, ValueError, AttributeError) as exc:
        raise LocalKafkaError(f"{source}: malformed state: {exc}") from exc


def read_state(path: Path) -> KafkaState:
    """Read a state file; a missing file is a :class:`LocalKafkaError` saying so."""
    try:
        text = path.read_text()
    except FileNotFoundError as exc:
        raise LocalKafkaError(f"{path}: no state file (is the local Kafka running?)") from exc
    except OSError as exc:
        raise LocalKafkaError(f"{path}: cannot read: {exc.strerror}") from exc
    return state_from_json(text, source=str(path))


def write_private_text(path: Path, text: str) -> None:
    """Write ``text`` atomically to a file only its owner can read (mode 0600)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def write_state(state: KafkaState) -> Path:
    """Write the state file atomically (readers never see half a file); return its path."""
    path = state.state_file
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    tmp.write_text(state_to_json(state))
    os.replace(tmp, path)
    return path
