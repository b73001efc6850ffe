"""The benchmark suite (``python -m bench``): a tiny-load run of every phase and system
against the real local Kafka, and the checker of its results.json.

Not a timed test: it checks that the suite produces a figure (or an explained null) for every
target of issue 6 and results for all four systems, not what the figures are.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.suite_schema import SYSTEMS, TARGETS, validate
from bench.suite_tidegate import scale_figures
from gateway.dev.kafka import KafkaState

REPO = Path(__file__).resolve().parents[1]

needs_mosquitto = pytest.mark.skipif(
    shutil.which("mosquitto_pub") is None
    or (shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists()),
    reason="mosquitto and mosquitto-clients are installed by scripts/bootstrap",
)


@pytest.fixture(scope="module")
def smoke_results(
    kafka: KafkaState, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("bench-smoke")
    argv = [sys.executable, "-m", "bench", "--smoke", "--code", "worktree", "--out", str(out)]
    argv += ["--kafka-state", str(kafka.state_file), "--scale-json", str(out / "absent.json")]
    proc = subprocess.run(
        argv,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text()), out


@pytest.mark.kafka
@needs_mosquitto
def test_smoke_run_has_every_system_and_every_target(
    smoke_results: tuple[dict[str, Any], Path],
) -> None:
    results, out = smoke_results
    assert validate(results) == []
    for name in SYSTEMS:
        assert results["systems"][name]["errors"] == [], name
        third = results["systems"][name]["phases"]["thirdparty"]["median"]
        # A number (Mosquitto may use no 10 ms clock tick at all for a smoke-sized load).
        assert third["cpu_us_per_msg"] >= 0, name
    assert set(results["targets"]) == set(TARGETS)
    # Figures the smoke run measures itself (the 10k figure comes from another benchmark).
    for key in TARGETS:
        target = results["targets"][key]
        if key == "rss_mb_10k_devices":
            assert target["figure"] is None
            assert target["reason"] == "not measured in this run"
        else:
            assert isinstance(target["figure"], int | float), (key, target)
    # Kafka systems: everything offered by mosquitto_pub to tidegate reached Kafka.
    tidegate = results["systems"]["tidegate"]["phases"]["thirdparty"]["median"]
    assert tidegate["in_kafka"] == tidegate["published"]
    assert results["ratios"]["cpu_us_per_msg_fixed_rate_mosquitto_pub"]["tidegate/amqtt"] > 0
    latency = results["targets"]["e2e_kafka_latency_p99_ms"]["conditions"]
    assert latency["ingest_to_kafka_p99_ms"] >= latency["ingest_to_kafka_p50_ms"] >= 0
    assert latency["publish_to_ingest_p99_ms"] >= 0
    assert (out / "results.md").read_text().count("| tidegate |") == 1
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # How fast this machine was: figures of two runs compare only next to it.
    probe = results["machine"]["speed_probe"]
    assert 0 < probe["fastest"] <= probe["us_per_row"] <= probe["slowest"]


def _minimal() -> dict[str, Any]:
    phase = {"median": {"cpu_us_per_msg": 1.0}}
    systems = {
        name: {
            "phases": {p: phase for p in ("thirdparty", "fixed", "saturate", "latency")},
            "rss": {"median": {"rss_mb": 10.0}},
        }
        for name in SYSTEMS
    }
    targets = {key: {"figure": 1.0, "met": True} for key in TARGETS}
    return {
        "schema": "tidegate-bench/1",
        "systems": systems,
        "targets": targets,
        "ratios": {"x": {}},
    }


def test_validate_accepts_a_complete_result() -> None:
    assert validate(_minimal()) == []


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda r: r["systems"].pop("naive-bridge"), "systems.naive-bridge: missing"),
        (lambda r: r["targets"].pop("drain_msgs_per_s"), "targets.drain_msgs_per_s: missing"),
        (
            lambda r: r["targets"]["outage_rss_growth_mb"].update(figure=None, met=None),
            "targets.outage_rss_growth_mb: figure is null without a reason",
        ),
        (
            lambda r: r["targets"]["ingest_cpu_us_per_msg"].update(met=None),
            "targets.ingest_cpu_us_per_msg.met: not a boolean: None",
        ),
        (
            lambda r: r["systems"]["tidegate"]["phases"].pop("latency"),
            "systems.tidegate.phases.latency.median.cpu_us_per_msg: no number",
        ),
    ],
)
def test_validate_names_what_is_missing(damage: Any, problem: str) -> None:
    results = copy.deepcopy(_minimal())
    damage(results)
    assert problem in validate(results)


def test_scale_figure_counts_only_with_10000_connected(tmp_path: Path) -> None:
    path = tmp_path / "fleet-scale-10k.json"
    path.write_text(json.dumps({"max_connections_seen": 10_000, "gateway_peak_rss_mb": 180.5}))
    assert scale_figures(path) == {
        "source": str(path.resolve()),
        "connected": 10_000,
        "rss_mb": 180.5,
    }
    path.write_text(json.dumps({"max_connections_seen": 9_000, "gateway_peak_rss_mb": 120.0}))
    assert "only 9,000 devices" in scale_figures(path)["reason"]
    assert scale_figures(tmp_path / "absent.json")["reason"] == "not measured in this run"


def test_the_floor_benchmark_measures_both_ackers(tmp_path: Path) -> None:
    """bench/floor.py (the minimal Python acknowledger, with and without a durable commit)
    runs end to end with the simulator and reports CPU per message and PUBACK latency."""
    out = tmp_path / "floor.json"
    argv = [sys.executable, "-m", "bench.floor", "--devices", "3", "--rate", "20"]
    argv += ["--duration", "1.5", "--runs", "1", "--linger-ms", "0,1", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["store"], r["linger_ms"]) for r in runs] == [
        ("none", 0.0), ("sqlite", 0.0), ("sqlite", 1.0)
    ]  # fmt: skip
    for run in runs:
        assert run["messages"] >= 60
        assert run["cpu_us_per_msg"] > 0
        assert run["puback_ms"]["p99"] > 0
    assert all(r["rows_per_commit"] >= 1 for r in runs[1:])


def test_the_commit_benchmark_reports_latency_and_cpu_per_commit(tmp_path: Path) -> None:
    """bench/commit_load.py commits batches of publishes (idle and busy event loop) and
    reports commit latency, CPU and bytes written per round."""
    for busy, keys, spread in (([], "1", ["--spread"]), (["--busy", "0.8"], "2", [])):
        out = tmp_path / "commit.json"
        argv = [sys.executable, "-m", "bench.commit_load", "--batch", "5", "--rounds", "25"]
        argv += [*busy, *spread, "--keys", keys, "--out", str(out)]
        proc = subprocess.run(
            argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        result = json.loads(out.read_text())
        assert result["busy_loop_share"] == (0.8 if busy else 0)
        assert result["keys_per_publish"] == int(keys)
        assert 1 <= result["commits"] <= 25 * 5
        assert 0 < result["commit_p50_ms"] <= result["commit_p99_ms"] <= result["commit_max_ms"]
        assert result["process_cpu_ms_per_round"] > 0
        assert result["devices"] == ("spread" if spread else "neighbours")
        assert result["written_kib_per_round"] > 4  # at least a WAL page per commit


def test_the_compression_benchmark_reports_every_codec(tmp_path: Path) -> None:
    """bench/compression.py encodes the gateway's records with every kafka.compression
    choice; each one shrinks a batch of telemetry records (their headers repeat)."""
    out = tmp_path / "compression.json"
    argv = [sys.executable, "-m", "bench.compression", "--rows", "60", "--devices", "5"]
    argv += ["--reps", "1", "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    codecs = json.loads(out.read_text())["codecs"]
    assert list(codecs) == ["none", "gzip", "lz4", "zstd"]
    assert codecs["none"]["bytes_per_record"] > 200  # the headers alone
    for name in ("gzip", "lz4", "zstd"):
        assert codecs[name]["ratio"] > 2, name
        assert codecs[name]["cpu_us_per_record"] > 0


@pytest.mark.kafka
def test_latency_curve_measures_every_share_with_its_machine_load(
    kafka: KafkaState, tmp_path: Path
) -> None:
    """bench/latency_curve.py at a tiny load: a point per share of the maximum, each with
    its latency, the CPU per message of gateway and simulator, and the machine's busy share."""
    out = tmp_path / "curve.json"
    argv = [
        sys.executable, "-m", "bench.latency_curve", "--kafka-state", str(kafka.state_file),
        "--devices", "5", "--latency-s", "1.5", "--max-rate", "200", "--fractions", "0.25,0.5",
        "--reps", "1", "--code", "worktree", "--out", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert [row["fraction"] for row in result["median"]] == [0.25, 0.5]
    for row in result["median"]:
        assert row["kafka_p99_ms"] >= row["kafka_p50_ms"] >= 0
        # Split where the gateway read the PUBLISH (tg-ingest-ts): the way in, then inside.
        assert row["publish_to_ingest_p99_ms"] >= row["publish_to_ingest_p50_ms"] >= 0
        assert row["ingest_to_kafka_p99_ms"] >= row["ingest_to_kafka_p50_ms"] >= 0
        assert row["ingest_to_kafka_p50_ms"] <= row["kafka_p99_ms"]
        assert row["cpu_us_per_msg"] > 0
        assert row["generator_cpu_us_per_msg"] > 0
        assert 0 < row["machine_busy_pct"] <= 100 * (os.cpu_count() or 1) + 5
    assert result["reps"][0]["rss"]["rss_mb"] > 0
    assert "| 50% |" in proc.stdout  # the table
