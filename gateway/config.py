"""Typed gateway configuration: one TOML file → frozen models.

Loading goes defaults → file → ``${VAR}`` / ``${VAR:-default}`` expansion → validation.
Relative paths are resolved against the directory of the config file, so a deployment can
ship ``/etc/tidegate/gateway.toml`` next to its certificates. Every error names the field
path (``kafka.tls.cafile: file not found: ...``). Runtime code never sees raw dicts.

The section models live by side: :mod:`gateway.config_edge` (listeners, security, buffer,
classes, routing, tenants), :mod:`gateway.config_kafka`, :mod:`gateway.config_downlink`
(commands, firmware, lifecycle), :mod:`gateway.quotas_config`; this module holds the whole
file's model and loading, and re-exports every section model.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.config_base import IDENT_PATTERN, ConfigModel, ConfigPath, ExistingFile
from gateway.config_downlink import (
    CommandsConfig,
    FirmwareConfig,
    LifecycleConfig,
)
from gateway.config_edge import (
    AclConfig,
    AuditConfig,
    BrokerConfig,
    BufferConfig,
    BufferEncryptionConfig,
    ClassConfig,
    EncryptionKeyConfig,
    ListenerConfig,
    RevocationConfig,
    RoutingConfig,
    TenantsConfig,
    default_classes,
)
from gateway.config_kafka import (
    KafkaConfig,
    KafkaSaslConfig,
    KafkaTlsConfig,
)
from gateway.errors import ConfigError
from gateway.quotas_config import QuotasConfig

__all__ = [
    "AclConfig",
    "AdminConfig",
    "LoggingConfig",
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
    "QuotasConfig",
    "RevocationConfig",
    "RoutingConfig",
    "TenantsConfig",
    "default_config",
    "is_loopback_host",
    "load_config",
    "parse_config",
]

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class GatewayIdentity(ConfigModel):
    """Who this gateway is and where it keeps its state."""

    id: Annotated[str, Field(pattern=IDENT_PATTERN)] = "tidegate-dev"
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


class AdminConfig(ConfigModel):
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


class LoggingConfig(ConfigModel):
    """Logs on stderr (docs/operations-cli.md). ``tidegate run --log-level`` overrides
    ``level``; SIGHUP re-reads ``level``."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """Least severe level written."""
    format: Literal["text", "json"] = "text"
    """``text``: one readable line per record; ``json``: one JSON object per line (ts, level,
    logger, message and structured extras such as device_id, msg_id, correlation_id)."""
    rate_limit_burst: Annotated[int, Field(ge=0)] = 10
    """Records of the same logger, level and message template let through per interval; the
    rest are counted and reported once the interval ends. 0 turns rate limiting off."""
    rate_limit_interval_s: Annotated[float, Field(gt=0)] = 60.0
    """Length of a rate-limiting interval."""


class GatewayConfig(ConfigModel):
    """A whole gateway."""

    gateway: GatewayIdentity = GatewayIdentity()
    broker: BrokerConfig = BrokerConfig()
    buffer: BufferConfig = BufferConfig()
    classes: dict[str, ClassConfig] = Field(default_factory=default_classes)
    routing: RoutingConfig = RoutingConfig()
    kafka: KafkaConfig
    admin: AdminConfig = AdminConfig()
    quotas: QuotasConfig = QuotasConfig()
    """Per-device quotas and the connection rate limit (gateway/quotas_config.py)."""
    commands: CommandsConfig | None = None
    """Downlink commands; None (no ``[commands]`` section) turns them off."""
    firmware: FirmwareConfig | None = None
    """Firmware releases and rollouts; None (no ``[firmware]`` section) turns them off."""
    lifecycle: LifecycleConfig | None = None
    """Device lifecycle events and heartbeats; None (no ``[lifecycle]`` section): off."""
    tenants: TenantsConfig | None = None
    """Tenants; None (no ``[tenants]`` section): one implicit tenant, no ``{tenant}``."""
    logging: LoggingConfig = LoggingConfig()

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
