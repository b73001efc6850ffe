"""`tidegate sizing` and its model (gateway/sizing.py): the arithmetic, the CLI, the constants
against the committed measurements (docs/bench-results/sizing.json), and the model against a
real buffer file filled with messages."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge.buffer import Buffer
from gateway import sizing
from gateway.cli import app
from gateway.config import BufferConfig, ClassConfig
from tests.harness import REPO

MEASURED = REPO / "docs" / "bench-results" / "sizing.json"
FLEET_SCALE = REPO / "docs" / "bench-results" / "fleet-scale-10k.json"
DRAIN_RUNS = REPO / "docs" / "bench-results" / "drain-send-workers.json"


def test_parse_duration() -> None:
    assert sizing.parse_duration("90") == 90
    assert sizing.parse_duration("90s") == 90
    assert sizing.parse_duration("30m") == 1800
    assert sizing.parse_duration("2h") == 7200
    assert sizing.parse_duration("1d") == 86_400
    assert sizing.parse_duration("1h30m") == 5400
    for bad in ("", "2x", "h", "1h 30m", "-5m", "2hours"):
        with pytest.raises(sizing.SizingError):
            sizing.parse_duration(bad)


def test_estimate_arithmetic() -> None:
    result = sizing.estimate(
        rate_per_s=1000, outage_s=3600, payload_bytes=256, devices=100, min_free_disk_bytes=0
    )
    assert result.rows == 3_600_000
    assert result.payload_bytes == 3_600_000 * 256
    # 256 + 110 bytes: 11 rows per 4 KiB page.
    per_row = 4096 / 11 * (1 + sizing.INTERIOR_PAGES) + sizing.INDEX_BYTES_PER_ROW
    assert sizing.row_bytes(256) == pytest.approx(per_row)
    expected = sizing.EMPTY_FILE_BYTES + 3_600_000 * per_row + 100 * sizing.DEVICE_STATE_BYTES
    assert result.buffer_bytes == pytest.approx(expected, abs=1)
    assert result.disk_bytes == result.buffer_bytes + result.wal_bytes
    assert result.memory_bytes == sizing.RSS_BASE_BYTES + 100 * sizing.RSS_PER_DEVICE_BYTES
    # Twice the outage, twice the rows; memory does not grow with the outage.
    longer = sizing.estimate(rate_per_s=1000, outage_s=7200, payload_bytes=256, devices=100)
    assert longer.rows == 2 * result.rows
    assert longer.memory_bytes == result.memory_bytes
    # Rows never share less than a page each; big rows spill into overflow pages.
    assert sizing.row_bytes(3900) >= 4096
    assert sizing.row_bytes(10_000) >= 10_000 + sizing.ROW_META_BYTES
    # While the backlog drains, the send worker comes on top (default 1).
    assert result.drain_memory_bytes == result.memory_bytes + sizing.SEND_WORKER_RSS_BYTES
    alone = sizing.estimate(
        rate_per_s=1000, outage_s=3600, payload_bytes=256, devices=100, send_workers=0
    )
    assert alone.drain_memory_bytes == alone.memory_bytes
    with pytest.raises(sizing.SizingError):
        sizing.estimate(rate_per_s=-1, outage_s=1, payload_bytes=1, devices=1)
    with pytest.raises(sizing.SizingError):
        sizing.estimate(rate_per_s=1, outage_s=1, payload_bytes=1, devices=1, send_workers=-1)


def test_constants_cover_the_measurements() -> None:
    """The model covers every committed measurement (docs/bench-results/sizing.json) without
    overstating it much, so a re-run of bench/sizing.py that finds more bytes per message (or
    far fewer) fails here until gateway/sizing.py follows."""
    measured = json.loads(MEASURED.read_text())
    for run in measured["disk"]:
        model = sizing.estimate(
            rate_per_s=run["rows"],
            outage_s=1,
            payload_bytes=math.ceil(run["payload_bytes_avg"]),
            devices=run["devices"],
        )
        assert run["used_bytes"] <= model.buffer_bytes, run
        assert model.buffer_bytes <= 1.15 * run["used_bytes"], run
        assert run["files"].get("-wal", 0) <= model.wal_bytes, run
        dedup = run["tables"].get("inbound_dedup", 0) + run["tables"].get("devices", 0)
        assert dedup / run["devices"] <= sizing.DEVICE_STATE_BYTES, run
    assert measured["drop_ledger"]["bytes_per_row"] <= sizing.LEDGER_ROW_BYTES
    # Memory: bench/sizing.py's points, and bench/fleet_scale.py's up to 10,000 devices.
    points = {m["devices"]: m["rss_mb"] for m in measured["memory"]}
    scale = json.loads(FLEET_SCALE.read_text())
    scale_points = {
        int(n): p["gateway_rss_mb"] for n, p in scale["gateway_rss_by_connected"].items()
    }
    scale_points[scale["max_connections_seen"]] = scale["gateway_peak_rss_mb"]
    for devices, rss_mb in [*points.items(), *scale_points.items()]:
        rss = rss_mb * (1 << 20)
        model_rss = sizing.estimate(
            rate_per_s=0, outage_s=0, payload_bytes=0, devices=devices
        ).memory_bytes
        assert rss <= model_rss, (devices, rss_mb)
        assert model_rss <= 1.25 * rss, (devices, rss_mb)


def test_send_worker_memory_covers_the_drain_measurements() -> None:
    """Every committed drain run with send workers (bench/drain.py: the children's RSS summed,
    sampled every 0.25 s) is within ``SEND_WORKER_RSS_BYTES`` per child, not far below."""
    runs = json.loads(DRAIN_RUNS.read_text())["runs"]
    with_workers = [r for r in runs if r["send_workers"]]
    assert with_workers
    for run in with_workers:
        model = run["send_workers"] * sizing.SEND_WORKER_RSS_BYTES
        rss = run["send_worker_peak_rss_mb"] * (1 << 20)
        assert rss <= model, run["send_worker_peak_rss_mb"]
        assert model <= 1.5 * rss, run["send_worker_peak_rss_mb"]


async def test_model_matches_a_real_buffer(tmp_path: Path) -> None:
    """20,000 messages of 256 B from 20 devices, committed the way the gateway commits them:
    the pages in use are within the model (and not far below it)."""
    classes = {"telemetry": ClassConfig(kafka_topic="t", priority=5)}
    rows, payload, devices = 20_000, 256, 20
    async with Buffer(tmp_path / "b.sqlite3", BufferConfig(), classes) as buffer:
        futures = []
        for i in range(rows):
            device = f"dev-{i % devices:05d}"
            futures.append(
                buffer.enqueue(
                    device_id=device,
                    class_name="telemetry",
                    topic=f"d/{device}/up/telemetry",
                    qos=1,
                    payload=bytes([i % 251]) * payload,
                    ingest_ms=1_700_000_000_000 + i,
                    priority=5,
                    msg_id=f"{device}-{i:012d}",
                )
            )
            if len(futures) == 2000:
                await asyncio.gather(*futures)
                futures.clear()
        await asyncio.gather(*futures)
        used = buffer.stats.used_bytes
        assert buffer.stats.rows == rows
    model = sizing.estimate(
        rate_per_s=rows, outage_s=1, payload_bytes=payload, devices=devices
    ).buffer_bytes
    assert used <= model, (used, model)
    assert used >= 0.85 * model, (used, model)


def test_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["sizing", "--rate", "1000", "--outage", "1h", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["rows"] == 3_600_000
    assert data["fits_config"] is None
    text = runner.invoke(app, ["sizing", "--rate", "1000", "--outage", "1h", "--payload", "256"])
    assert "messages buffered     3,600,000" in text.output
    bad = runner.invoke(app, ["sizing", "--rate", "1", "--outage", "soon"])
    assert bad.exit_code == 2
    assert "not a duration" in bad.output

    # Against a config: the example's 8 GiB buffer holds an hour at 1,000 msg/s, not a day.
    example = str(REPO / "configs" / "edge-example.toml")
    fits = runner.invoke(app, ["sizing", "--rate", "1000", "--outage", "1h", "-c", example])
    assert fits.exit_code == 0, fits.output
    assert ": fits" in fits.output
    day = runner.invoke(app, ["sizing", "--rate", "1000", "--outage", "1d", "-c", example])
    assert day.exit_code == 1
    assert "DOES NOT FIT" in day.output
    broken = tmp_path / "broken.toml"
    broken.write_text("[buffer]\nmax_rows = 1\n")
    assert (
        runner.invoke(app, ["sizing", "--rate", "1", "--outage", "1m", "-c", str(broken)]).exit_code
        == 2
    )
