"""Config sections of the Kafka side: cluster, TLS, SASL."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from gateway.config_base import ConfigModel, ExistingFile

__all__ = ["KafkaConfig", "KafkaSaslConfig", "KafkaTlsConfig"]


class KafkaTlsConfig(ConfigModel):
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


class KafkaSaslConfig(ConfigModel):
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


class KafkaConfig(ConfigModel):
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
    compression: Literal["none", "gzip", "lz4", "zstd"] = "zstd"
    """Record batches compressed before they leave (consumers decompress them: every Kafka
    client since 2.1 reads zstd). A telemetry record is ~370 bytes uncompressed, most of it
    headers that repeat from record to record; zstd sends ~25, and a backlog drains faster
    with it (less to encrypt, copy and store): docs/benchmarks.md, session 9."""
    linger_ms: Annotated[int, Field(ge=0, le=10_000)] = 5
    """aiokafka's producer linger (the forwarder hands it whole batches, so it rarely waits)."""
    forward_linger_ms: Annotated[int, Field(ge=0, le=10_000)] = 20
    """When rows arrive after the buffer was empty, the forwarder waits this long before
    leasing them, so a trickle shares one Kafka batch instead of one per group commit
    (1,000 msg/s: 23 rows per batch instead of 7, gateway CPU per message -15 %, PUBACK
    p99 lower). Adds up to this much to publish → Kafka latency; never waits under load."""
    send_workers: Annotated[int, Field(ge=0, le=8)] = 1
    """At-least-once: while a backlog drains (the buffer holds more than a lease), this
    many child processes build and send the records, so the drain gets an interpreter and
    a core of its own while this one ingests live traffic and deletes what Kafka acked. They
    start on the first backlog and exit after 30 s idle (~75 MB each while they run).
    0: everything in one process. More than 1 did not drain faster on 2 cores
    (docs/benchmarks.md). docs/buffer.md."""
    send_worker_batch: Annotated[int, Field(ge=1, le=100_000)] = 4000
    """Rows per batch while the send workers drain (``buffer.lease_batch`` in-process):
    their per-batch costs (a Kafka round trip, two hand-offs) are shared by more rows, while
    the gateway's own work per batch is only the lease and the delete. 4,000 drained 89k/s
    with live traffic against 76k at 2,000; 6,000 no faster, with live PUBACKs slower
    (docs/benchmarks.md)."""
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
