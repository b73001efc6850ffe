"""Health for probes and operators: ``/readyz`` (decided here from the live state) and the
admin token an operator keeps in ``admin.token_file``.

``/healthz`` answers as long as the event loop runs. ``/readyz`` is ready when the broker
listens and the buffer takes commits; whether Kafka is reachable is reported beside it and
does not make the gateway unready: during a Kafka outage the gateway does its job (buffer)
and must not be restarted or taken out of service for it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.breaker import BreakerState
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

__all__ = ["read_admin_token", "readiness"]


def readiness(gw: Gateway) -> dict[str, Any]:
    """The ``/readyz`` document. ``ready`` ignores ``kafka`` on purpose (module docstring)."""
    listening = gw.broker.running and bool(gw.broker.bound_addresses)
    writable = gw.buffer.writable
    fwd, breaker = gw.forwarder.status, gw.forwarder.breaker
    return {
        "ready": listening and writable,
        "broker": {"listening": listening, "listeners": len(gw.broker.bound_addresses)},
        "buffer": {
            "writable": writable,
            "full": gw.buffer.is_full,
            "low_disk": gw.buffer.stats.low_disk,
            "commit_failing": gw.buffer.stats.commit_failing,
        },
        "kafka": {
            # What the gateway last saw: it only learns Kafka is gone when it talks to it.
            "reachable": fwd.kafka_connected and breaker.state is BreakerState.CLOSED,
            "breaker": breaker.state.value,
            "last_error": fwd.last_error,
            "last_error_age_s": None
            if fwd.last_error_at is None
            else round(time.time() - fwd.last_error_at, 1),
        },
    }


def read_admin_token(path: Path | None) -> str | None:
    """The operator's token from ``admin.token_file`` (None when not configured)."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(str(path), [("admin.token_file", exc.strerror or str(exc))]) from exc
    if len(token) < 16:
        raise ConfigError(
            str(path), [("admin.token_file", "the token must be at least 16 characters")]
        )
    return token
