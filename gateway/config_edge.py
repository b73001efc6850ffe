"""Config sections of the device side: listeners and security, buffer, classes, routing, tenants."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    field_validator,
    model_validator,
)

from edge.acl import validate_rule
from gateway.config_base import IDENT_PATTERN, TOPIC_PATTERN, ConfigModel, ExistingFile

__all__ = [
    "AclConfig",
    "AuditConfig",
    "BrokerConfig",
    "BufferConfig",
    "BufferEncryptionConfig",
    "ClassConfig",
    "EncryptionKeyConfig",
    "ListenerConfig",
    "RevocationConfig",
    "RoutingConfig",
    "TenantsConfig",
    "default_classes",
]


class ListenerConfig(ConfigModel):
    """One MQTT listener for devices."""

    name: Annotated[str, Field(pattern=IDENT_PATTERN)] = "default"
    host: str = "127.0.0.1"
    """Address to bind. ``0.0.0.0`` to accept devices from the network."""
    port: Annotated[int, Field(ge=0, le=65535)] = 1883
    """TCP port; 0 picks a free port (tests)."""
    tls: bool = False
    """TLS with a required client certificate from ``cafile``; the certificate's CN is the
    device id and must equal the MQTT client id (docs/security.md). Usual port: 8883."""
    cafile: ExistingFile | None = None
    """TLS: CA bundle that signed the device certificates."""
    certfile: ExistingFile | None = None
    """TLS: this listener's server certificate (PEM)."""
    keyfile: ExistingFile | None = None
    """TLS: the server certificate's private key (unencrypted PEM)."""

    @model_validator(mode="after")
    def _tls_files(self) -> ListenerConfig:
        files = {"cafile": self.cafile, "certfile": self.certfile, "keyfile": self.keyfile}
        missing = [name for name, value in files.items() if value is None]
        if self.tls and missing:
            raise ValueError(f"tls = true needs {', '.join(missing)}")
        if not self.tls and len(missing) < len(files):
            raise ValueError("cafile/certfile/keyfile are only used with tls = true")
        return self


class AclConfig(ConfigModel):
    """Per-device topic ACL (docs/security.md). Rules are MQTT topic filters where
    ``{device_id}`` stands for the connected device's id and ``{tenant}`` for its tenant
    (needs ``[tenants]``)."""

    enabled: bool = False
    """Enforce the ACL. Default rules: publish ``d/{device_id}/#``; subscribe
    ``d/{device_id}/cmd`` and ``d/{device_id}/fw/#``."""
    publish: list[str] = []
    """Extra topic filters a device may publish to (added to the defaults)."""
    subscribe: list[str] = []
    """Extra topic filters a device may subscribe within (added to the defaults)."""

    @field_validator("publish", "subscribe")
    @classmethod
    def _rules(cls, value: list[str]) -> list[str]:
        return [validate_rule(rule) for rule in value]


class AuditConfig(ConfigModel):
    """The append-only security audit log (JSON lines)."""

    path: Path = Path("audit.jsonl")
    """Audit file; relative paths are taken from ``gateway.data_dir``."""
    max_bytes: Annotated[int, Field(ge=4096)] = 10 << 20
    """Rotate (``audit.jsonl.1`` ...) when the file would grow past this."""
    keep: Annotated[int, Field(ge=1, le=100)] = 5
    """Rotated files kept; disk use is at most ``(keep + 1) x max_bytes``."""


class RevocationConfig(ConfigModel):
    """Revoked devices (docs/security.md). Re-read on SIGHUP; revoked devices that are still
    connected are disconnected."""

    deny_file: ExistingFile | None = None
    """One entry per line: a device id, or ``sha256:<hex>`` (a certificate's SHA-256
    fingerprint). ``#`` comments."""
    crl_file: ExistingFile | None = None
    """PEM CRL(s) of the device CA, checked at every TLS handshake (OpenSSL) and against the
    connected devices on reload. Needs a TLS listener; an expired CRL fails every handshake."""


class BrokerConfig(ConfigModel):
    """The embedded MQTT broker (amqtt) devices connect to."""

    listeners: Annotated[list[ListenerConfig], Field(min_length=1)] = [ListenerConfig()]
    max_inflight_per_session: Annotated[int, Field(ge=1, le=65535)] = 64
    """Un-acked inbound QoS1/2 publishes per device; at the cap the socket is not read."""
    allow_anonymous: bool = False
    """Accept devices without credentials. Off by default: devices authenticate with a client
    certificate (TLS listener) or a password (``password_file``). Development only."""
    password_file: ExistingFile | None = None
    """Device passwords as salted scrypt hashes, managed with ``tidegate devices``; the
    user name must equal the client id. Re-read when it changes (no restart needed)."""
    on_deny: Literal["puback_discard", "disconnect"] = "puback_discard"
    """A PUBLISH the ACL denies: acknowledge and discard it, or close the connection. Either
    way it is counted, audited, and nothing of it is stored or forwarded."""
    acl: AclConfig = AclConfig()
    audit: AuditConfig = AuditConfig()
    revocation: RevocationConfig = RevocationConfig()

    @field_validator("listeners")
    @classmethod
    def _unique_listener_names(cls, value: list[ListenerConfig]) -> list[ListenerConfig]:
        names = [listener.name for listener in value]
        if len(names) != len(set(names)):
            raise ValueError("listener names must be unique")
        return value

    @model_validator(mode="after")
    def _crl_needs_tls(self) -> BrokerConfig:
        if self.revocation.crl_file is not None and not any(x.tls for x in self.listeners):
            raise ValueError("revocation.crl_file needs a listener with tls = true")
        return self


class EncryptionKeyConfig(ConfigModel):
    """One AES-256 key of the buffer's keyring: 32 bytes, raw, hex or base64."""

    key_id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,8}$")]
    """Short name stored with every row it encrypted (1-8 characters); never reuse one for
    another key."""
    key_file: ExistingFile | None = None
    """File holding the key (32 raw bytes, or 64 hex digits, or base64); mode 0600."""
    key_env: Annotated[str | None, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] = None
    """Environment variable holding the key (hex or base64)."""

    @model_validator(mode="after")
    def _one_source(self) -> EncryptionKeyConfig:
        if (self.key_file is None) == (self.key_env is None):
            raise ValueError("give exactly one of key_file and key_env")
        return self


class BufferEncryptionConfig(EncryptionKeyConfig):
    """At-rest encryption of buffered payloads (AES-256-GCM, docs/security.md). The fields
    inherited from a key name the current key: new rows are encrypted with it."""

    old_keys: list[EncryptionKeyConfig] = []
    """Earlier keys, kept so rows they encrypted still decrypt after a rotation."""
    reencrypt_on_start: bool = False
    """At start, re-encrypt every buffered row not under the current key (then the old keys
    can be removed once the gateway has started)."""

    @model_validator(mode="after")
    def _unique_ids(self) -> BufferEncryptionConfig:
        ids = [self.key_id, *(k.key_id for k in self.old_keys)]
        if len(ids) != len(set(ids)):
            raise ValueError("key ids must be unique")
        return self


class BufferConfig(ConfigModel):
    """The SQLite store-and-forward buffer."""

    path: Path = Path("buffer.sqlite3")
    """Buffer file; relative paths are taken from ``gateway.data_dir``."""
    max_bytes: Annotated[int, Field(ge=1 << 20)] = 1 << 30
    """Bound on payload bytes kept on disk."""
    max_rows: Annotated[int, Field(ge=100)] = 5_000_000
    """Bound on buffered messages."""
    min_free_disk_bytes: Annotated[int, Field(ge=0)] = 256 << 20
    """Stop acknowledging when the filesystem has less free space than this."""
    commit_max_batch: Annotated[int, Field(ge=1, le=100_000)] = 2048
    """Most publishes sharing one durable (synchronous=FULL) transaction."""
    commit_linger_ms: Annotated[float, Field(ge=0, le=50)] = 0.0
    """No group commit starts before its oldest publish waited this long, so publishes
    arriving one by one share commits. 0 (default): commit at once; under load commits
    group anyway (each takes what arrived during the previous one). At a steady trickle
    (1,000 msg/s from 100 devices) 1 ms makes commits ~2x larger and cuts gateway CPU per
    message ~20 %, and adds up to 1 ms to PUBACKs (docs/benchmarks.md, "The floor")."""
    checkpoint_interval_ms: Annotated[float, Field(ge=0, le=10_000)] = 100.0
    """WAL checkpoints run on their own connection and thread, at most this often while
    anything is written, instead of inside the commit that fills the log (which made that
    commit's PUBACKs wait for two more fsyncs; edge/wal_checkpoint.py). 0: SQLite's own
    automatic checkpoint in the commit path."""
    registry_seen_interval_ms: Annotated[float, Field(ge=0, le=60_000)] = 1000.0
    """The device registry's last-seen times are written together at most this often
    (connects, disconnects and self-descriptions go with the next commit). Per commit, at
    1,000 devices each publish rewrote a random page of the registry. A crash loses at most
    this much of last-seen; 0: with every commit."""
    lease_batch: Annotated[int, Field(ge=1, le=100_000)] = 2000
    """Most rows handed to the bridge at once."""
    lease_min_share: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    """Share of every batch guaranteed to each lower-priority class with a backlog, so
    higher classes go first but nothing starves."""
    block_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 60.0
    """A device whose publish waited this long for room (``block`` policy) is disconnected
    without a PUBACK; it resends after reconnecting. Nothing is lost."""
    max_file_bytes: Annotated[int | None, Field(ge=1 << 20)] = None
    """Hard cap on the SQLite file (``PRAGMA max_page_count``), for small disks and tests:
    past it SQLite reports "disk full" and acknowledgements stop until rows are released."""
    dedup_window_s: Annotated[float, Field(ge=0, le=86_400)] = 600.0
    """How long a device's message ids and in-flight packet ids are remembered to recognise
    a retransmission (QoS1 DUP after a gateway crash, or a repeated envelope ``msg_id``)."""
    drop_ledger_max_rows: Annotated[int, Field(ge=100)] = 100_000
    """The drop ledger keeps at most this many entries (and at most one per KiB of
    ``max_bytes``), trimming the oldest; drop counters are never trimmed."""
    keep_forwarded_dead_letters: bool = False
    """Keep dead letters in the buffer after the Kafka dead-letter topic acked them (for
    ``tidegate dlq replay``); they count toward the buffer bounds."""
    encryption: BufferEncryptionConfig | None = None
    """Encrypt buffered payloads (uplink rows and dead letters) at rest; None: plaintext."""


class ClassConfig(ConfigModel):
    """A message class from the device contract (``d/{device_id}/up/{class}``)."""

    kafka_topic: Annotated[str, Field(pattern=TOPIC_PATTERN)]
    """Kafka topic this class is forwarded to; ``{tenant}`` is the device's tenant."""
    priority: Annotated[int, Field(ge=0, le=9)] = 5
    """Higher is forwarded first."""
    content_type: str = "application/octet-stream"
    """Sent as the ``tg-content-type`` header."""
    lossy: bool = False
    """Whether the operator accepts drops for this class (a policy, never silent)."""
    on_full: Literal["block", "drop_oldest", "drop_newest"] = "block"
    """What happens when the buffer is full: withhold PUBACKs, or drop (lossy classes only)."""
    ttl_s: Annotated[float | None, Field(gt=0)] = None
    """Expire messages older than this (lossy classes only). A CBOR envelope's ``ttl_s``
    sets a per-message expiry in lossy classes too."""
    expired_to_dead_letters: bool = False
    """Send expired messages to the dead letters instead of only recording the drop."""

    @model_validator(mode="after")
    def _drops_need_lossy(self) -> ClassConfig:
        if not self.lossy and (
            self.on_full != "block" or self.ttl_s is not None or self.expired_to_dead_letters
        ):
            raise ValueError("on_full drop policies and expiry (ttl_s) need lossy = true")
        return self


def default_classes() -> dict[str, ClassConfig]:
    return {
        "event": ClassConfig(kafka_topic="iot.events", priority=8),
        "telemetry": ClassConfig(kafka_topic="iot.telemetry", priority=5),
        "bulk": ClassConfig(kafka_topic="iot.bulk", priority=2),
    }


class RoutingConfig(ConfigModel):
    """How MQTT topics map to classes."""

    uplink_pattern: str = "d/{device_id}/up/{class}"
    """Topic pattern; deeper levels after it are allowed. ``{device_id}`` and ``{class}`` are
    required placeholders, each a whole topic level."""
    dead_letter_topic: Annotated[str, Field(pattern=TOPIC_PATTERN)] = "iot.dlq"
    """Kafka topic for messages that match no class (kept, never dropped); may contain
    ``{tenant}``."""

    @field_validator("uplink_pattern")
    @classmethod
    def _pattern_levels(cls, value: str) -> str:
        levels = value.split("/")
        for needed in ("{device_id}", "{class}"):
            if levels.count(needed) != 1:
                raise ValueError(f"must contain {needed} exactly once, as a whole level")
        if any(c in value for c in "+#"):
            raise ValueError("must not contain MQTT wildcards")
        return value


class TenantsConfig(ConfigModel):
    """Tenants (docs/security.md): devices belong to a tenant by device-id patterns; a
    tenant's uplink goes to its own topics or carries a ``tg-tenant`` header, its commands
    reach only its devices, and its share of the buffer can be capped. Absent section: off."""

    mode: Literal["topic", "header"] = "topic"
    """``topic``: every class topic (and the commands and results topics) contains
    ``{tenant}``, so each tenant has its own Kafka topics. ``header``: shared topics, every
    record carries a ``tg-tenant`` header, and a command record must carry the device's
    tenant in its ``tg-tenant`` header."""
    devices: dict[str, list[str]] = {}
    """Tenant name -> device-id glob patterns (``acme-*``, ``plant?-*``). A device matching
    two tenants' patterns has no tenant (refused at CONNECT)."""
    default_tenant: Annotated[str | None, Field(pattern=IDENT_PATTERN)] = None
    """Tenant of devices that match no pattern. None: such devices are refused at CONNECT."""
    max_buffer_share: Annotated[float | None, Field(gt=0, le=1)] = None
    """Most of ``buffer.max_rows`` and of ``buffer.max_bytes`` one tenant's buffered messages
    may take; past it that tenant's publishes wait (or drop, by class policy) as if the
    buffer were full, while other tenants go on. None: no per-tenant cap."""

    @field_validator("devices")
    @classmethod
    def _tenant_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in value.items():
            if not re.fullmatch(IDENT_PATTERN, name):
                raise ValueError(f"tenant name {name!r}: letters, digits, '.', '_' and '-'")
            if not patterns or any(not p for p in patterns):
                raise ValueError(f"tenant {name!r}: give at least one non-empty pattern")
        return value

    @model_validator(mode="after")
    def _some_tenant(self) -> TenantsConfig:
        if not self.devices and self.default_tenant is None:
            raise ValueError("configure [tenants.devices] or default_tenant")
        return self
