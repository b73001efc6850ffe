"""One error root for tidegate, with categories an operator can act on.

Third-party exceptions (aiokafka, sqlite3, ssl, amqtt) are translated once, at the I/O
edge that called them, with ``raise ... from exc``; code above that edge only sees these.
"""

from __future__ import annotations

__all__ = [
    "BufferCorruptError",
    "BufferStoreError",
    "BufferFullError",
    "ConfigError",
    "KafkaError",
    "KafkaTlsError",
    "KafkaUnavailableError",
    "TidegateError",
]


class TidegateError(Exception):
    """Root of every error tidegate raises on purpose.

    ``retriable`` says whether trying the same operation again later can succeed without
    an operator changing anything.
    """

    retriable: bool = False


class ConfigError(TidegateError):
    """A configuration file or setting is wrong. ``errors`` lists ``(field_path, message)``."""

    def __init__(self, source: str, errors: list[tuple[str, str]]) -> None:
        self.source = source
        self.errors = errors
        lines = "\n".join(f"  {path}: {message}" for path, message in errors)
        super().__init__(f"{source}: invalid configuration\n{lines}")


class BufferStoreError(TidegateError):
    """The store-and-forward buffer failed."""


class BufferFullError(BufferStoreError):
    """The buffer reached a configured bound or the disk is full; acknowledgements stop."""

    retriable = True


class BufferCorruptError(BufferStoreError):
    """The buffer file is not a tidegate buffer or is damaged; the gateway refuses to start."""


class KafkaError(TidegateError):
    """Talking to Kafka failed."""

    retriable = True


class KafkaUnavailableError(KafkaError):
    """Kafka is unreachable or did not answer within a deadline."""


class KafkaTlsError(KafkaError):
    """The TLS material for Kafka is missing or unusable (file, key, or CA problem)."""

    retriable = False


class KafkaAuthError(KafkaError):
    """Kafka refused our credentials (SASL) or they could not be read (password file)."""

    retriable = False


class PkiError(TidegateError):
    """The development PKI could not be created or used (bad device id, missing CA, I/O)."""


class LocalKafkaError(TidegateError):
    """The project's local development Kafka could not be fetched, started or stopped."""


__all__ += ["KafkaAuthError", "LocalKafkaError", "PkiError"]
