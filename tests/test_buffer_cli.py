"""``tidegate buffer stats | peek | purge`` and ``tidegate status`` as an operator uses them:
through the running gateway, and on the file of a stopped one."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edge.buffer_ops import PurgeFilter
from gateway.buffer_admin import BadBufferRequest, parse_purge_body
from gateway.buffer_cli import parse_duration
from gateway.dev.kafka import KafkaState
from gateway.status_view import drain_estimate, health_summary
from tests.harness import GatewayProcess, run_cli, write_gateway_config
from tests.harness import kafka_tls as _tls
from tests.harness import publish_qos1 as _publish

_runner = CliRunner()


def _cli(*args: str) -> Any:
    """``tidegate ARGS`` in this process (a subprocess per call costs seconds on a busy
    machine); exit codes and output as a user sees them."""
    from gateway.cli import app

    return _runner.invoke(app, list(args), env={"COLUMNS": "200"})


def _dead_port() -> int:
    """A loopback port nobody listens on: Kafka unreachable, rows stay in the buffer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _json(result: Any) -> Any:
    return json.loads(_ok(result))


def test_purge_arguments_and_durations() -> None:
    assert parse_duration("90") == 90
    assert parse_duration("15m") == 900
    assert parse_duration("1.5h") == 5400
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration("soon")
    assert parse_purge_body({"device": "d1", "older_than_s": 5}) == PurgeFilter(None, "d1", 5.0)
    for bad in ({}, {"class": 3}, {"older_than_s": -1}, {"older_than_s": True}, {"x": 1}, []):
        with pytest.raises(BadBufferRequest):
            parse_purge_body(bad)


def test_drain_estimate_and_health_summary() -> None:
    def doc(rows: int, forwarded: int, connected: bool = True) -> dict[str, Any]:
        return {
            "buffer": {"rows": rows, "full": False},
            "kafka": {"forwarded": forwarded, "connected": connected, "breaker": None},
        }

    assert drain_estimate(doc(1000, 0), doc(900, 150), 1.0).startswith("~9 s (forwarding 150")
    assert drain_estimate(doc(1000, 0), doc(1000, 0), 1.0) == "not draining (nothing forwarded)"
    assert drain_estimate(doc(1000, 0), doc(1100, 50), 1.0).startswith(
        "not draining (forwarding 50 msg/s, ingest"
    )
    assert drain_estimate(doc(10, 0), doc(0, 10), 1.0) == "empty"
    assert health_summary(doc(0, 0)) == ("OK", [])
    assert health_summary(doc(0, 0, connected=False)) == ("DEGRADED", ["Kafka not connected"])


@pytest.mark.kafka
def test_buffer_stats_peek_purge_through_the_gateway_and_on_the_file(
    tmp_path: Path, kafka: KafkaState
) -> None:
    config = write_gateway_config(
        tmp_path,
        bootstrap=f"127.0.0.1:{_dead_port()}",
        tls=_tls(kafka),
        topics={"event": "iot.events", "metric": "iot.metrics"},
        shutdown_deadline_s=4.0,
        extra="[buffer]\nlease_batch = 5\n",
    )
    cfg = str(config)
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        _publish(
            gateway.mqtt_port,
            "dev-a",
            [("d/dev-a/up/event", f"reading {i}".encode()) for i in range(30)],
            in_order=False,
        )
        _publish(
            gateway.mqtt_port,
            "dev-b",
            [("d/dev-b/up/metric", b"\x00\x01binary") for _ in range(20)],
            in_order=False,
        )
        stats = _json(run_cli("buffer", "stats", "-c", cfg, "--json"))
        assert stats["source"] == "running gateway"
        assert (stats["rows"], stats["classes"]["event"]["rows"]) == (50, 30)
        assert stats["top_devices"][0] == {
            "device_id": "dev-a",
            "rows": 30,
            "payload_bytes": sum(len(f"reading {i}") for i in range(30)),
        }
        text = _cli("buffer", "stats", "-c", cfg)
        assert text.exit_code == 0, text.output
        assert "dev-a" in text.stdout
        assert "metric" in text.stdout

        peeked = _cli("buffer", "peek", "-c", cfg, "--class", "event", "--limit", "3", "--json")
        items = [json.loads(line) for line in _ok(peeked).splitlines()]
        assert [i["preview"] for i in items] == ["reading 0", "reading 1", "reading 2"]

        for bad in (
            ("purge", "--device", "dev-b"),  # no --yes
            ("purge", "--yes"),  # no filter
            ("purge", "--class", "nosuch", "--yes"),
            ("purge", "--older-than", "soon", "--yes"),
            ("peek", "--limit", "0"),
        ):
            result = _cli("buffer", *bad, "-c", cfg)
            assert result.exit_code == 2, (bad, result.output)
            assert "Traceback" not in result.output
            assert result.exception is None or isinstance(result.exception, SystemExit)
        assert gateway.status()["buffer"]["rows"] == 50  # refused purges removed nothing

        purged = _cli("buffer", "purge", "-c", cfg, "--device", "dev-b", "--yes")
        # Kafka is unreachable: the forwarder holds a leased batch (and one leased ahead) of
        # at most lease_batch rows each; those are skipped, the rest purged.
        found = re.search(r"purged (\d+) messages .* (\d+) in flight", _ok(purged))
        assert found, purged.output
        gone, skipped = int(found.group(1)), int(found.group(2))
        assert (gone + skipped, min(gone, 10)) == (20, 10)
        status = gateway.status()["buffer"]
        assert status["rows"] == 50 - gone
        assert status["dropped"]["purged by operator"] == gone
        exported = _ok(_cli("drops", "export", "-c", cfg, "--out", "-"))
        drops = [json.loads(line) for line in exported.splitlines()]
        assert [d["reason"] for d in drops] == ["purged by operator"] * gone
        assert {d["device_id"] for d in drops} == {"dev-b"}

        shown = _cli("status", "-c", cfg, "--sample", "0.2")
        assert "DEGRADED" in _ok(shown)
        assert "Kafka not connected" in shown.stdout
        assert f"{gone} purged by operator" in shown.stdout
        assert "0 connected, 2 known" in shown.stdout  # dev-a and dev-b published and left
        assert "not draining (nothing forwarded" in shown.stdout
        gateway.terminate(timeout=15)
    finally:
        gateway.stop()

    # Stopped gateway: stats and peek read the file, purge refuses.
    offline = _json(_cli("buffer", "stats", "-c", cfg, "--json"))
    assert offline["source"].startswith("file ")
    assert (offline["rows"], offline["drops"]) == (50 - gone, {"purged by operator": gone})
    peeked = _cli("buffer", "peek", "-c", cfg, "--after", str(items[-1]["row_id"]), "--limit", "1")
    assert "reading 3" in _ok(peeked)
    refused = run_cli("buffer", "purge", "-c", cfg, "--class", "event", "--yes")
    assert refused.returncode == 1
    assert "no gateway running" in refused.stderr


def _ok(result: Any) -> str:
    code = getattr(result, "returncode", None)
    if code is None:  # CliRunner
        assert result.exit_code == 0, (result.output, result.exception)
        return str(result.stdout)
    assert code == 0, result.stderr
    return str(result.stdout)
