"""Logging (issue 9): JSON lines, rate-limited repeated errors, the [logging] section."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.config import GatewayConfig, LoggingConfig, parse_config
from gateway.errors import ConfigError
from gateway.logging_setup import RateLimitFilter, configure_logging, set_level


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def _records(out: io.StringIO, logger: str) -> list[dict[str, Any]]:
    """Every line parses; those of ``logger`` (threads left by other tests may log too)."""
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == logger]


def test_json_lines_parse_with_structured_extras(restore_root: None) -> None:
    out = io.StringIO()
    configure_logging(LoggingConfig(format="json", level="DEBUG"), stream=out)
    log = logging.getLogger("edge.test")
    log.info("stored %d rows", 3, extra={"device_id": "dev-1", "msg_id": "m-7"})
    try:
        int("boom")
    except ValueError:
        log.exception("commit failed", extra={"correlation_id": "gw:42"})
    lines = _records(out, "edge.test")
    assert [line["message"] for line in lines] == ["stored 3 rows", "commit failed"]
    first, second = lines
    assert first["level"] == "INFO"
    assert first["logger"] == "edge.test"
    assert first["ts"].endswith("+00:00")
    assert (first["device_id"], first["msg_id"]) == ("dev-1", "m-7")
    assert second["correlation_id"] == "gw:42"
    assert "ValueError: invalid literal" in second["exc"]


def test_a_flood_of_one_error_is_rate_limited_and_the_suppressed_count_reported(
    restore_root: None,
) -> None:
    now = [1000.0]
    limiter = RateLimitFilter(burst=5, interval_s=10.0, clock=lambda: now[0])
    out = io.StringIO()
    handler = configure_logging(LoggingConfig(format="json"), stream=out)
    handler.filters = [limiter]
    log = logging.getLogger("bridge.test")
    for i in range(1000):
        log.error("send to %s failed", f"topic-{i % 3}")
    log.error("another problem")  # a different message template is not limited by the flood
    log.info("info is never limited")
    lines = _records(out, "bridge.test")
    assert [line["message"] for line in lines[:5]] == [
        f"send to topic-{i % 3} failed" for i in range(5)
    ]
    assert [line["message"] for line in lines[5:]] == ["another problem", "info is never limited"]
    assert limiter.suppressed_total == 995
    now[0] += 10.0
    log.error("send to %s failed", "topic-x")
    last = _records(out, "bridge.test")[-1]
    assert (last["message"], last["suppressed"]) == ("send to topic-x failed", 995)


def test_text_format_shows_extras_and_the_suppressed_count(restore_root: None) -> None:
    out = io.StringIO()
    handler = configure_logging(LoggingConfig(rate_limit_burst=1), stream=out)
    limiter = handler.filters[0]
    assert isinstance(limiter, RateLimitFilter)
    log = logging.getLogger("edge.text")
    log.warning("dropped", extra={"device_id": "d1"})
    log.warning("dropped")
    limiter.interval_s = 0.0
    log.warning("dropped")
    lines = [line for line in out.getvalue().splitlines() if " edge.text: " in line]
    assert len(lines) == 2
    assert "WARNING edge.text: dropped [device_id=d1]" in lines[0]
    assert lines[1].endswith("dropped (1 similar suppressed)")


def test_level_override_and_set_level(restore_root: None) -> None:
    configure_logging(LoggingConfig(level="WARNING"), level_override="DEBUG", stream=io.StringIO())
    assert logging.getLogger().level == logging.DEBUG
    assert set_level("ERROR") == "DEBUG"
    assert set_level("ERROR") is None


def test_logging_section_errors_name_the_field() -> None:
    def config(section: dict[str, object]) -> GatewayConfig:
        tls = {"cafile": "ca.pem", "certfile": "gw.pem", "keyfile": "gw.key"}
        kafka = {"bootstrap_servers": ["127.0.0.1:9093"], "tls": tls}
        return parse_config({"kafka": kafka, "logging": section}, check_files=False)

    cfg = config({"format": "json", "level": "DEBUG"})
    assert (cfg.logging.format, cfg.logging.level) == ("json", "DEBUG")
    assert config({}).logging == LoggingConfig()
    with pytest.raises(ConfigError, match=r"logging\.format"):
        config({"format": "xml"})
    with pytest.raises(ConfigError, match=r"logging\.colour"):
        config({"colour": True})
