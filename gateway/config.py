"""Typed gateway configuration: one TOML file → frozen models.

Loading goes defaults → file → ``${VAR}`` / ``${VAR:-default}`` expansion → validation.
Relative paths are resolved against the directory of the config file, so a deployment can
ship ``/etc/tidegate/gateway.toml`` next to its certificates. Every error names the field
path (``kafka.tls.cafile: file not found: ...``). Runtime code never sees raw dicts.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge.acl import validate_rule
from gateway.errors import ConfigError

__all__ = [
    "AclConfig",
    "AdminConfig",
    "AuditConfig",
    "BrokerConfig",
    "BufferConfig",
    "BufferEncryptionConfig",
    "ClassConfig",
    "CommandsConfig",
    "FirmwareConfig",
    "EncryptionKeyConfig",
    "GatewayConfig",
    "GatewayIdentity",
    "KafkaConfig",
    "KafkaSaslConfig",
    "KafkaTlsConfig",
    "LifecycleConfig",
    "ListenerConfig",
    "RevocationConfig",
    "RoutingConfig",
    "TenantsConfig",
    "default_config",
    "is_loopback_host",
    "load_config",
    "parse_config",
]

_IDENT = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_TOPIC = r"^([A-Za-z0-9._-]|\{tenant\}){1,249}$"
"""A Kafka topic name, optionally with ``{tenant}`` placeholders (see ``[tenants]``)."""
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return value


def _existing_file(value: Path, info: ValidationInfo) -> Path:
    value = _resolve_path(value, info)
    if (info.context or {}).get("check_files", True) and not value.is_file():
        raise ValueError(f"file not found: {value}")
    return value


ConfigPath = Annotated[Path, AfterValidator(_resolve_path)]
"""A path; relative ones are taken from the config file's directory."""

ExistingFile = Annotated[Path, AfterValidator(_existing_file)]
"""A path that must name an existing file when the config is loaded."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class GatewayIdentity(_Model):
    """Who this gateway is and where it keeps its state."""

    id: Annotated[str, Field(pattern=_IDENT)] = "tidegate-dev"
    """Gateway id: part of every message id, sent as a Kafka header. Never reuse one."""
    data_dir: ConfigPath = Path("var/gateway")
    """Directory for the buffer file and runtime state."""
    shutdown_deadline_s: Annotated[float, Field(gt=0, le=600)] = 10.0
    """SIGTERM: the gateway exits within this many seconds, even when Kafka is down."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """``auto``: uvloop when installed (a dependency on Linux and macOS) and no broker
    listener has ``tls = true``, else asyncio's own loop. uvloop lowers the CPU each socket
    wake-up costs; TLS listeners upgrade accepted sockets with ``start_tls``, which under
    uvloop 0.23 lost the device's first TLS bytes and hung the handshake."""


class ListenerConfig(_Model):
    """One MQTT listener for devices."""

    name: Annotated[str, Field(pattern=_IDENT)] = "default"
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


class AclConfig(_Model):
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


class AuditConfig(_Model):
    """The append-only security audit log (JSON lines)."""

    path: Path = Path("audit.jsonl")
    """Audit file; relative paths are taken from ``gateway.data_dir``."""
    max_bytes: Annotated[int, Field(ge=4096)] = 10 << 20
    """Rotate (``audit.jsonl.1`` ...) when the file would grow past this."""
    keep: Annotated[int, Field(ge=1, le=100)] = 5
    """Rotated files kept; disk use is at most ``(keep + 1) x max_bytes``."""


class RevocationConfig(_Model):
    """Revoked devices (docs/security.md). Re-read on SIGHUP; revoked devices that are still
    connected are disconnected."""

    deny_file: ExistingFile | None = None
    """One entry per line: a device id, or ``sha256:<hex>`` (a certificate's SHA-256
    fingerprint). ``#`` comments."""
    crl_file: ExistingFile | None = None
    """PEM CRL(s) of the device CA, checked at every TLS handshake (OpenSSL) and against the
    connected devices on reload. Needs a TLS listener; an expired CRL fails every handshake."""


class BrokerConfig(_Model):
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


class EncryptionKeyConfig(_Model):
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


class BufferConfig(_Model):
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


class ClassConfig(_Model):
    """A message class from the device contract (``d/{device_id}/up/{class}``)."""

    kafka_topic: Annotated[str, Field(pattern=_TOPIC)]
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


def _default_classes() -> dict[str, ClassConfig]:
    return {
        "event": ClassConfig(kafka_topic="iot.events", priority=8),
        "telemetry": ClassConfig(kafka_topic="iot.telemetry", priority=5),
        "bulk": ClassConfig(kafka_topic="iot.bulk", priority=2),
    }


class RoutingConfig(_Model):
    """How MQTT topics map to classes."""

    uplink_pattern: str = "d/{device_id}/up/{class}"
    """Topic pattern; deeper levels after it are allowed. ``{device_id}`` and ``{class}`` are
    required placeholders, each a whole topic level."""
    dead_letter_topic: Annotated[str, Field(pattern=_TOPIC)] = "iot.dlq"
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


class KafkaTlsConfig(_Model):
    """TLS towards Kafka (PEM files). Mutual TLS needs all three files; SASL_SSL needs none
    of them when the brokers have publicly trusted certificates (managed services)."""

    cafile: ExistingFile | None = None
    """CA bundle that signed the Kafka brokers' certificates. None: the system's trusted
    CAs."""
    certfile: ExistingFile | None = None
    """This gateway's client certificate (required with ``security_protocol = "SSL"``)."""
    keyfile: ExistingFile | None = None
    """This gateway's private key (unencrypted PEM, not world-readable); goes with
    ``certfile``."""
    check_hostname: bool = True

    @model_validator(mode="after")
    def _cert_and_key(self) -> KafkaTlsConfig:
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("certfile and keyfile go together")
        return self


class KafkaSaslConfig(_Model):
    """SASL authentication over TLS (``security_protocol = "SASL_SSL"``), as managed Kafka
    services use. The password is never logged; give it through an environment variable
    (``password = "${KAFKA_PASSWORD}"``) or a file, not in the config file itself."""

    mechanism: Literal["SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"] = "SCRAM-SHA-512"
    """SASL mechanism. PLAIN sends the password (inside TLS); SCRAM proves it without
    sending it."""
    username: Annotated[str, Field(min_length=1)]
    """User name (Confluent Cloud: the API key)."""
    password: SecretStr | None = None
    """The password (Confluent Cloud: the API secret), usually ``"${ENV_VAR}"``."""
    password_file: ExistingFile | None = None
    """A file holding the password (trailing newline ignored); read each time a Kafka client
    is built, so a changed password is picked up when the producer reconnects."""

    @model_validator(mode="after")
    def _one_password(self) -> KafkaSaslConfig:
        if self.password is None and self.password_file is None:
            raise ValueError('password is required: set password = "${ENV_VAR}" or password_file')
        if self.password is not None and self.password_file is not None:
            raise ValueError("set password or password_file, not both")
        if self.password is not None and not self.password.get_secret_value():
            raise ValueError("password is empty (is its environment variable set?)")
        return self


class KafkaConfig(_Model):
    """The cloud Kafka cluster."""

    bootstrap_servers: Annotated[list[str], Field(min_length=1)]
    """``host:port`` list."""
    security_protocol: Literal["SSL", "SASL_SSL"] = "SSL"
    """``SSL``: mutual TLS (client certificate in ``tls``). ``SASL_SSL``: TLS plus SASL
    user name and password (``sasl``), docs/kafka-auth.md."""
    tls: KafkaTlsConfig = KafkaTlsConfig()
    sasl: KafkaSaslConfig | None = None
    """SASL credentials; required with ``SASL_SSL``, refused with ``SSL``."""
    client_id: str = "tidegate"
    compression: Literal["none", "gzip", "lz4", "zstd"] = "none"
    linger_ms: Annotated[int, Field(ge=0, le=10_000)] = 5
    max_batch_bytes: Annotated[int, Field(ge=16_384, le=16 << 20)] = 1 << 20
    request_timeout_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    send_deadline_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    """A batch not acknowledged within this is treated as stuck: the producer is rebuilt."""
    retry_backoff_max_s: Annotated[float, Field(gt=0, le=300)] = 10.0
    """Cap on retry delays and on the circuit breaker's cool-down."""
    delivery: Literal["at_least_once", "exactly_once"] = "at_least_once"
    """``at_least_once``: idempotent producer, duplicates possible after a restart or a
    rebuilt producer (de-duplicate on ``tg-message-id``). ``exactly_once``: Kafka transactions
    with a progress record per batch; ``read_committed`` consumers see each message once.
    See docs/delivery-modes.md."""
    progress_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = (
        "iot.tidegate-progress"
    )
    """Exactly-once only: compacted topic holding each gateway's last committed batch."""
    transaction_timeout_s: Annotated[float, Field(ge=1, le=900)] = 60.0
    """Exactly-once only: the broker aborts a transaction left open longer than this."""
    max_request_bytes: Annotated[int, Field(ge=16_384, le=64 << 20)] = 1 << 20
    """Largest produce request, so largest record; a bigger record is dead-lettered before it
    is sent. Keep it at or below the brokers' ``message.max.bytes``."""
    breaker_failures: Annotated[int, Field(ge=1, le=1000)] = 5
    """Consecutive failed Kafka calls that open the circuit breaker."""
    breaker_failure_rate: Annotated[float, Field(gt=0, le=1)] = 0.5
    """Also open the breaker when this share of the last 20 calls failed (1 disables)."""
    breaker_open_s: Annotated[float, Field(gt=0, le=300)] = 1.0
    """Cool-down after the first trip; doubles per consecutive trip up to
    ``retry_backoff_max_s``, jittered."""
    missing_topic_dead_letter_s: Annotated[float | None, Field(gt=0)] = 300.0
    """A message whose Kafka topic does not exist for this long is dead-lettered (the rows
    behind it keep flowing; ``tidegate dlq replay`` once the topic exists). None: wait
    forever."""

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_port(cls, value: list[str]) -> list[str]:
        for server in value:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"not host:port: {server!r}")
        return value

    @field_validator("tls")
    @classmethod
    def _client_cert_for_mtls(cls, value: KafkaTlsConfig, info: ValidationInfo) -> KafkaTlsConfig:
        if info.data.get("security_protocol") == "SSL" and value.certfile is None:
            raise ValueError(
                'certfile and keyfile are required with security_protocol = "SSL" (mutual TLS)'
            )
        return value

    @field_validator("sasl")
    @classmethod
    def _sasl_for_protocol(
        cls, value: KafkaSaslConfig | None, info: ValidationInfo
    ) -> KafkaSaslConfig | None:
        protocol = info.data.get("security_protocol")
        if protocol == "SASL_SSL" and value is None:
            raise ValueError(
                'a [kafka.sasl] section is required with security_protocol = "SASL_SSL"'
            )
        if protocol == "SSL" and value is not None:
            raise ValueError('only used with security_protocol = "SASL_SSL"')
        return value


class CommandsConfig(_Model):
    """Downlink commands from Kafka to devices (docs/commands.md). Absent section: off."""

    topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._{}-]{1,249}$")] = "iot.commands.{gateway_id}"
    """Kafka topic this gateway consumes commands from; ``{gateway_id}`` is replaced. One
    topic per gateway: a gateway only ever sees its own devices' commands. With
    ``tenants.mode = "topic"`` it must contain ``{tenant}``: one topic per tenant, and a
    command for a device of another tenant is rejected."""
    results_topic: Annotated[str, Field(pattern=_TOPIC)] = "iot.command-results"
    """Kafka topic for result records (accepted, delivered, executed, failed, expired,
    rejected), key = device id; ``{tenant}`` is the command's tenant."""
    group_id: Annotated[str, Field(min_length=1)] = "tidegate-{gateway_id}"
    """Kafka consumer group; ``{gateway_id}`` is replaced."""
    device_topic: str = "d/{device_id}/cmd"
    """MQTT topic a command is published on (QoS 1); results come back on it plus
    ``/result``."""
    remember_ids: Annotated[int, Field(ge=100, le=10_000_000)] = 100_000
    """Finished commands remembered to recognise a command id seen again (duplicates are
    accepted once); the oldest finished ones are forgotten past this count."""
    max_params_bytes: Annotated[int, Field(ge=64, le=1 << 20)] = 16_384
    """Commands whose JSON ``params`` is larger are rejected."""
    max_ttl_s: Annotated[float, Field(gt=0)] = 30 * 86_400.0
    """Largest accepted ``ttl_s``."""
    reject_unknown_devices: bool = True
    """Reject commands for devices this gateway has never seen (not in its registry)."""
    poll_interval_s: Annotated[float, Field(gt=0, le=5)] = 0.25
    """How often scheduled (``not_before``) and expired commands are looked at."""
    retry_interval_s: Annotated[float, Field(gt=0, le=3600)] = 5.0
    """A connected device that did not PUBACK a command gets it again after this."""
    max_commands_per_poll: Annotated[int, Field(ge=1, le=100_000)] = 500
    """Most Kafka records taken (and stored in one transaction) at a time."""

    @field_validator("device_topic")
    @classmethod
    def _device_level(cls, value: str) -> str:
        if value.split("/").count("{device_id}") != 1 or any(c in value for c in "+#"):
            raise ValueError("must contain {device_id} once as a whole level, no wildcards")
        return value

    def kafka_topic(self, gateway_id: str) -> str:
        """The command topic of a gateway."""
        return self.topic.replace("{gateway_id}", gateway_id)

    def kafka_group(self, gateway_id: str) -> str:
        """The consumer group of a gateway."""
        return self.group_id.replace("{gateway_id}", gateway_id)


class FirmwareConfig(_Model):
    """Firmware releases and staged rollouts (docs/firmware.md). Absent section: off."""

    releases_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "iot.firmware"
    """Kafka topic releases are published to (fleet-wide; every gateway reads it)."""
    control_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._{}-]{1,249}$")] = (
        "iot.firmware-control.{gateway_id}"
    )
    """Kafka topic of this gateway's campaign operations; ``{gateway_id}`` is replaced."""
    status_topic: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = "iot.firmware-status"
    """Kafka topic for release, campaign and device progress records."""
    group_id: Annotated[str, Field(min_length=1)] = "tidegate-fw-{gateway_id}"
    """Kafka consumer group; ``{gateway_id}`` is replaced."""
    trusted_keys: Annotated[list[ExistingFile], Field(min_length=1)]
    """Ed25519 public keys (PEM) whose signatures are accepted on releases."""
    cache_dir: Path = Path("firmware")
    """Content-addressed image cache; relative paths are taken from ``gateway.data_dir``."""
    cache_max_bytes: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    """Cap on cached images; it is set aside from ``buffer.max_bytes`` (the disk bound)."""
    max_image_bytes: Annotated[int, Field(ge=1024)] = 64 << 20
    """Larger releases are refused."""
    device_topic: str = "d/{device_id}/fw"
    """Device firmware topics: ``/offer`` and ``/chunk`` (gateway to device), ``/req`` and
    ``/status`` (device to gateway)."""
    device_chunk_bytes: Annotated[int, Field(ge=512, le=256 << 10)] = 32 << 10
    """Chunk size served to devices over MQTT."""
    default_rings: Annotated[list[float], Field(min_length=1)] = [1.0, 10.0, 50.0, 100.0]
    """Cumulative percent of the campaign's devices reached by each ring."""
    default_failure_threshold: Annotated[float, Field(ge=0, le=1)] = 0.1
    """A campaign pauses itself when more than this share of a ring failed."""
    device_timeout_s: Annotated[float, Field(gt=0)] = 3600.0
    """A device offered an update that has not finished after this counts as failed."""
    tick_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often campaigns are evaluated (ring gates, timeouts, offers)."""
    max_parallel_chunks: Annotated[int, Field(ge=1, le=1024)] = 16
    """Chunk responses being sent at once."""
    max_queued_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 4096
    """Chunk requests waiting to be served; beyond it a request is dropped (counted; the
    device asks again after its timeout)."""

    @field_validator("device_topic")
    @classmethod
    def _fw_device_level(cls, value: str) -> str:
        if value.split("/").count("{device_id}") != 1 or any(c in value for c in "+#"):
            raise ValueError("must contain {device_id} once as a whole level, no wildcards")
        return value

    @field_validator("default_rings")
    @classmethod
    def _rings(cls, value: list[float]) -> list[float]:
        if any(not 0 < p <= 100 for p in value) or value != sorted(value) or value[-1] != 100:
            raise ValueError("ascending percents in (0, 100], the last one 100")
        return value


class LifecycleConfig(_Model):
    """Device connect/disconnect events and the gateway heartbeat to Kafka
    (docs/lifecycle.md). Absent section: off."""

    enabled: bool = True
    """Record lifecycle events and heartbeats (false keeps the section but turns them off)."""
    topic: Annotated[str, Field(pattern=_TOPIC)] = "iot.lifecycle"
    """Kafka topic for connected/disconnected events (key = device id); ``{tenant}`` is the
    device's tenant (required with ``tenants.mode = "topic"``)."""
    heartbeat_topic: Annotated[str | None, Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")] = None
    """Kafka topic for heartbeats (key = gateway id; a heartbeat belongs to the gateway, not
    to a tenant); None: the events' ``topic``, which then must not contain ``{tenant}``."""
    heartbeat_period_s: Annotated[float, Field(ge=0.1, le=86_400)] = 30.0
    """Seconds between heartbeats."""
    heartbeat_ttl_s: Annotated[float | None, Field(gt=0)] = 300.0
    """A heartbeat not yet in Kafka after this long is dropped (recorded in the drop
    ledger): a backlog of stale heartbeats tells the cloud nothing. None: keep them."""
    priority: Annotated[int, Field(ge=0, le=9)] = 9
    """Forwarding priority of events and heartbeats (tiny; highest by default)."""

    @model_validator(mode="after")
    def _gateway_heartbeat_topic(self) -> LifecycleConfig:
        if "{tenant}" in self.topic and self.heartbeat_topic is None:
            raise ValueError("topic has {tenant}: set heartbeat_topic (heartbeats have no tenant)")
        return self


class TenantsConfig(_Model):
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
    default_tenant: Annotated[str | None, Field(pattern=_IDENT)] = None
    """Tenant of devices that match no pattern. None: such devices are refused at CONNECT."""
    max_buffer_share: Annotated[float | None, Field(gt=0, le=1)] = None
    """Most of ``buffer.max_rows`` and of ``buffer.max_bytes`` one tenant's buffered messages
    may take; past it that tenant's publishes wait (or drop, by class policy) as if the
    buffer were full, while other tenants go on. None: no per-tenant cap."""

    @field_validator("devices")
    @classmethod
    def _tenant_names(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, patterns in value.items():
            if not re.fullmatch(_IDENT, name):
                raise ValueError(f"tenant name {name!r}: letters, digits, '.', '_' and '-'")
            if not patterns or any(not p for p in patterns):
                raise ValueError(f"tenant {name!r}: give at least one non-empty pattern")
        return value

    @model_validator(mode="after")
    def _some_tenant(self) -> TenantsConfig:
        if not self.devices and self.default_tenant is None:
            raise ValueError("configure [tenants.devices] or default_tenant")
        return self


class AdminConfig(_Model):
    """The local admin API (status, metrics, health, operations)."""

    host: str = "127.0.0.1"
    """Loopback by default. Bound anywhere else, every endpoint but ``/healthz`` and
    ``/readyz`` requires the token, and ``token_file`` must be set."""
    port: Annotated[int, Field(ge=0, le=65535)] = 8181
    token_file: ExistingFile | None = None
    """A file holding the admin token (kept by the operator, stable across restarts, e.g. for
    a remote Prometheus). None: a fresh random token at every start, in
    ``<data_dir>/admin.token`` (mode 0600)."""

    @model_validator(mode="after")
    def _remote_needs_token(self) -> AdminConfig:
        if not is_loopback_host(self.host) and self.token_file is None:
            raise ValueError(
                f"host {self.host!r} is not loopback: set admin.token_file (the token remote"
                " clients send), or bind 127.0.0.1"
            )
        return self


def is_loopback_host(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GatewayConfig(_Model):
    """A whole gateway."""

    gateway: GatewayIdentity = GatewayIdentity()
    broker: BrokerConfig = BrokerConfig()
    buffer: BufferConfig = BufferConfig()
    classes: dict[str, ClassConfig] = Field(default_factory=_default_classes)
    routing: RoutingConfig = RoutingConfig()
    kafka: KafkaConfig
    admin: AdminConfig = AdminConfig()
    commands: CommandsConfig | None = None
    """Downlink commands; None (no ``[commands]`` section) turns them off."""
    firmware: FirmwareConfig | None = None
    """Firmware releases and rollouts; None (no ``[firmware]`` section) turns them off."""
    lifecycle: LifecycleConfig | None = None
    """Device lifecycle events and heartbeats; None (no ``[lifecycle]`` section): off."""
    tenants: TenantsConfig | None = None
    """Tenants; None (no ``[tenants]`` section): one implicit tenant, no ``{tenant}``."""

    @field_validator("classes")
    @classmethod
    def _class_names(cls, value: dict[str, ClassConfig]) -> dict[str, ClassConfig]:
        if not value:
            raise ValueError("at least one class is needed")
        for name in value:
            if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", name):
                raise ValueError(f"class name {name!r}: lowercase letters, digits, _ and -")
        return value

    @model_validator(mode="after")
    def _tenant_placeholders(self) -> GatewayConfig:
        topics = {f"classes.{n}.kafka_topic": c.kafka_topic for n, c in self.classes.items()}
        optional = {"routing.dead_letter_topic": self.routing.dead_letter_topic}
        if self.commands is not None:
            topics["commands.topic"] = self.commands.topic
            topics["commands.results_topic"] = self.commands.results_topic
        if self.lifecycle is not None:
            topics["lifecycle.topic"] = self.lifecycle.topic
        acl = self.broker.acl
        rules = {
            f"broker.acl.{kind}": rule
            for kind in ("publish", "subscribe")
            for rule in getattr(acl, kind)
        }
        with_placeholder = [
            k for k, v in {**topics, **optional, **rules}.items() if "{tenant}" in v
        ]
        mode = None if self.tenants is None else self.tenants.mode
        if mode is None and with_placeholder:
            raise ValueError(f"{with_placeholder[0]}: {{tenant}} needs a [tenants] section")
        topics_with = [k for k in with_placeholder if not k.startswith("broker.acl")]
        if mode == "header" and topics_with:
            raise ValueError(
                f'{topics_with[0]}: {{tenant}} in a topic needs tenants.mode = "topic"'
            )
        if mode == "topic":
            for key, value in topics.items():
                if "{tenant}" not in value:
                    raise ValueError(
                        f'{key}: tenants.mode = "topic" needs {{tenant}} in this topic, so'
                        " tenants never share it"
                    )
        return self

    @property
    def buffer_path(self) -> Path:
        """The buffer file, resolved against the data directory."""
        return self.gateway.data_dir / self.buffer.path

    @property
    def audit_path(self) -> Path:
        """The security audit log, resolved against the data directory."""
        return self.gateway.data_dir / self.broker.audit.path


def _expand_env(value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            found = os.environ.get(name)
            if found is None or (found == "" and default is not None):
                if default is None:
                    errors.append((path, f"environment variable {name} is not set"))
                    return ""
                return default
            return found

        return _ENV_REF.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else k, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
    return value


def _field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def parse_config(
    data: dict[str, Any],
    *,
    source: str = "<config>",
    base_dir: Path | None = None,
    check_files: bool = True,
) -> GatewayConfig:
    """Validate a raw mapping (already parsed TOML) into a :class:`GatewayConfig`."""
    env_errors: list[tuple[str, str]] = []
    expanded = _expand_env(data, "", env_errors)
    if env_errors:
        raise ConfigError(source, env_errors)
    try:
        return GatewayConfig.model_validate(
            expanded, context={"base_dir": base_dir, "check_files": check_files}
        )
    except ValidationError as exc:
        errors = [
            (_field_path(err["loc"]), err["msg"].removeprefix("Value error, "))
            for err in exc.errors()
        ]
        raise ConfigError(source, errors) from exc


def load_config(path: Path, *, check_files: bool = True) -> GatewayConfig:
    """Read and validate a TOML config file; raise :class:`ConfigError` naming each field."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(str(path), [("(file)", exc.strerror or str(exc))]) from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), [("(syntax)", str(exc))]) from exc
    return parse_config(
        data, source=str(path), base_dir=path.resolve().parent, check_files=check_files
    )


def default_config(
    *, bootstrap_servers: list[str], cafile: Path, certfile: Path, keyfile: Path, **sections: Any
) -> GatewayConfig:
    """Embedded defaults plus the Kafka connection (the demo and tests build configs this way)."""
    data: dict[str, Any] = {
        "kafka": {
            "bootstrap_servers": bootstrap_servers,
            "tls": {"cafile": str(cafile), "certfile": str(certfile), "keyfile": str(keyfile)},
        }
    }
    data.update(sections)
    return parse_config(data, source="<defaults>")
