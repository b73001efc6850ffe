"""Metrics, health and alert rules (docs/metrics.md, docs/operations.md): a real gateway
process, real devices, real Kafka (frozen with SIGSTOP to play an outage)."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.admin import AdminServer
from gateway.config import parse_config
from gateway.dev.kafka import KafkaState
from gateway.errors import ConfigError
from gateway.health import read_admin_token
from gateway.metrics import DrainRate
from tests.harness import (
    REPO,
    Publisher,
    frozen_kafka,
    run_cli,
    running_gateway,
    sim_args,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls

RULES = REPO / "configs" / "alerts" / "tidegate.rules.yml"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def scrape(gateway: Any) -> dict[str, float]:
    """``/metrics`` as ``{'name{labels}': value}`` (labels as exposed)."""
    admin = gateway.runtime["admin"]
    url = f"http://{admin['host']}:{admin['port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            out[match[1] + (match[2] or "")] = float(match[3])
    return out


def get_json(gateway: Any, path: str) -> tuple[int, dict[str, Any]]:
    admin = gateway.runtime["admin"]
    try:
        with urllib.request.urlopen(
            f"http://{admin['host']}:{admin['port']}{path}", timeout=5
        ) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def metric_names(samples: dict[str, float]) -> set[str]:
    names = {key.split("{", 1)[0] for key in samples}
    # A histogram or summary is named by its family: foo_bucket/_sum/_count → foo.
    return names | {re.sub(r"_(bucket|sum|count)$", "", n) for n in names}


# ---------------------------------------------------------------------------- pure


def test_drain_estimate_from_net_rate() -> None:
    rate = DrainRate(window_s=60)
    assert rate.estimate(0) == 0.0
    rate.add(0.0, 0, 0)
    assert math.isnan(rate.estimate(100))
    rate.add(10.0, 100, 300)  # in 10/s, out 30/s: net 20/s
    assert rate.estimate(400) == pytest.approx(20.0)
    rate.add(20.0, 400, 400)  # in 20/s, out 20/s over the window: not shrinking
    assert rate.estimate(1) == math.inf
    for t in range(30, 200, 10):  # old samples leave the window
        rate.add(float(t), 400, 400 + 10 * (t - 20))
    assert rate.estimate(1000) == pytest.approx(100.0)  # out 10/s, in 0


def test_admin_beyond_loopback_requires_a_token_file(tmp_path: Path) -> None:
    def parse(admin: dict[str, Any]) -> Any:
        for name in ("ca.pem", "cert.pem", "key.pem"):
            (tmp_path / name).write_text("-")
        tls = {
            "cafile": str(tmp_path / "ca.pem"),
            "certfile": str(tmp_path / "cert.pem"),
            "keyfile": str(tmp_path / "key.pem"),
        }
        kafka = {"bootstrap_servers": ["127.0.0.1:9093"], "tls": tls}
        return parse_config({"kafka": kafka, "admin": admin}, check_files=True)

    with pytest.raises(ConfigError, match=r"admin.*token_file"):
        parse({"host": "0.0.0.0"})
    token = tmp_path / "token"
    token.write_text("x" * 32)
    assert parse({"host": "0.0.0.0", "token_file": str(token)}).admin.token_file == token
    assert parse({"host": "::1"}).admin.token_file is None
    assert parse({}).admin.host == "127.0.0.1"


class _FakeApi:
    """Just enough gateway for the admin server's guard and probe logic."""

    def __init__(self) -> None:
        self.ready = True

    def status(self) -> dict[str, Any]:
        return {}

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready}

    async def metrics(self) -> bytes:
        return b"tidegate_buffer_rows 0\n"


async def test_beyond_loopback_every_endpoint_but_the_probes_needs_the_token() -> None:
    api = _FakeApi()
    token = "t" * 32
    async with AdminServer("0.0.0.0", 0, api, token=token) as server:  # type: ignore[arg-type]
        assert server.bound is not None
        base = f"http://127.0.0.1:{server.bound[1]}"
        async with aiohttp.ClientSession() as http:
            for path in ("/metrics", "/status", "/devices"):
                async with http.get(base + path) as response:
                    assert response.status == 401, path
            headers = {"Authorization": f"Bearer {token}"}
            async with http.get(base + "/metrics", headers=headers) as response:
                assert response.status == 200
                assert "tidegate_buffer_rows" in await response.text()
            async with http.get(base + "/healthz") as response:
                assert response.status == 200
            async with http.get(base + "/readyz") as response:
                assert response.status == 200
            api.ready = False
            async with http.get(base + "/readyz") as response:
                assert response.status == 503
    async with AdminServer("127.0.0.1", 0, api, token=token) as server:  # type: ignore[arg-type]
        assert server.bound is not None
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{server.bound[1]}/metrics") as response,
        ):
            assert response.status == 200  # loopback: read-only endpoints stay open


def test_operator_token_file_is_read_and_checked(tmp_path: Path) -> None:
    assert read_admin_token(None) is None
    path = tmp_path / "token"
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16"):
        read_admin_token(path)
    path.write_text("  long-enough-token-value \n")
    assert read_admin_token(path) == "long-enough-token-value"
    with pytest.raises(ConfigError, match=r"admin\.token_file"):
        read_admin_token(tmp_path / "missing")


# ------------------------------------------------------------------ real gateway


@pytest.mark.kafka
def test_counters_equal_the_verifier_after_a_drained_run(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    topics = {"telemetry": kafka_topic_factory("telemetry"), "event": kafka_topic_factory("event")}
    config = write_gateway_config(
        tmp_path, bootstrap=kafka.bootstrap, tls=_tls(kafka), topics=topics
    )
    ledger, report = tmp_path / "acks.jsonl", tmp_path / "verify.json"
    with running_gateway(config) as gateway:
        sim = run_cli(
            "sim", *sim_args(gateway.mqtt_port, 20), "--count", "60",
            "--classes", "telemetry:3,event:1", "--ledger", str(ledger), "--quiet",
        )  # fmt: skip
        assert sim.returncode == 0, sim.stdout + sim.stderr
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the buffer to drain")
        samples = scrape(gateway)
    verify = run_cli("verify", "-c", str(config), "--ledger", str(ledger), "--json", str(report))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    by_class = json.loads(report.read_text())["by_class"]
    assert set(by_class) == {"telemetry", "event"}
    for name, counts in by_class.items():
        assert counts["acknowledged"] > 0
        assert samples[f'tidegate_messages_in_total{{class="{name}"}}'] == counts["acknowledged"]
        assert samples[f'tidegate_messages_forwarded_total{{class="{name}"}}'] == counts["found"]
    assert sum(c["found"] for c in by_class.values()) == json.loads(report.read_text())["records"]
    assert samples["tidegate_buffer_rows"] == 0
    assert samples["tidegate_puback_latency_seconds_count"] > 0
    assert samples["tidegate_kafka_send_duration_seconds_count"] > 0


@pytest.mark.kafka
def test_kafka_outage_flips_breaker_and_readyz_kafka_not_healthz_then_recovers(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic_factory("event")},
        send_deadline_s=2.0,
        request_timeout_s=1.0,
    )
    # One failed call opens the breaker: the outage shows within seconds.
    text = config.read_text().replace(
        "retry_backoff_max_s", "breaker_failures = 1\nretry_backoff_max_s"
    )
    config.write_text(text)
    with running_gateway(config) as gateway:
        Publisher(gateway.mqtt_port, ["warm"], "event").start(per_device=1).wait_done(30)
        gateway.wait_status(lambda s: s["kafka"]["forwarded"] >= 1, 60, "a live producer")
        before = scrape(gateway)
        assert before["tidegate_kafka_breaker_state"] == 0
        status, ready = get_json(gateway, "/readyz")
        assert status == 200, ready
        assert ready["kafka"]["reachable"], ready
        with frozen_kafka(kafka.brokers):
            publisher = Publisher(gateway.mqtt_port, ["dev-a"], "event").start(per_device=20)
            publisher.wait_done(30)  # the buffer acknowledges with Kafka away
            wait_for(
                lambda: scrape(gateway)["tidegate_kafka_breaker_state"] > 0,
                30,
                "the breaker to leave closed",
            )
            status, ready = get_json(gateway, "/readyz")
            assert status == 200, ready  # an outage does not make a healthy gateway unready
            assert ready["ready"]
            assert not ready["kafka"]["reachable"]
            assert ready["broker"]["listening"]
            assert ready["buffer"]["writable"]
            assert get_json(gateway, "/healthz") == (200, {"alive": True})
            assert scrape(gateway)["tidegate_kafka_connected"] == 0
            age = scrape(gateway)["tidegate_buffer_oldest_age_seconds"]
            assert age > 0
            wait_for(
                lambda: scrape(gateway)["tidegate_buffer_oldest_age_seconds"] > age + 0.5,
                10,
                "the buffer age to grow",
            )
        wait_for(
            lambda: scrape(gateway)["tidegate_kafka_breaker_state"] == 0,
            60,
            "the breaker to close",
        )
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the backlog to drain")
        after = scrape(gateway)
        assert after["tidegate_buffer_oldest_age_seconds"] == 0
        assert after["tidegate_kafka_connected"] == 1
        assert after["tidegate_kafka_breaker_trips_total"] >= 1
        status, ready = get_json(gateway, "/readyz")
        assert status == 200, ready
        assert ready["kafka"]["reachable"], ready
        assert get_json(gateway, "/healthz") == (200, {"alive": True})


# ------------------------------------------------------------------------ alerts


def test_promtool_checks_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus; scripts/bootstrap)")
    result = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@pytest.mark.kafka
def test_every_metric_the_alert_rules_name_is_exported(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Any
) -> None:
    """(The rules also use ``up``: Prometheus's own series per scrape target.) The same
    gateway runs with an operator's ``admin.token_file``, which the CLI's token file mirrors."""
    named = set(re.findall(r"\btidegate_[a-z0-9_]+", _rule_exprs()))
    assert len(named) >= 8, named
    token = tmp_path / "operator.token"
    token.write_text("operator-token-0123456789\n")
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic_factory("event")},
    )
    text = config.read_text().replace("[admin]\n", f'[admin]\ntoken_file = "{token}"\n')
    config.write_text(text)
    with running_gateway(config) as gateway:
        exported = metric_names(scrape(gateway))
        assert (gateway.data_dir / "admin.token").read_text() == "operator-token-0123456789"
    assert named - exported == set(), f"named by the rules but not exported: {named - exported}"
    documented = set(
        re.findall(r"`(tidegate_[a-z0-9_]+)", (REPO / "docs" / "metrics.md").read_text())
    )
    tidegate = {
        re.sub(r"_(bucket|sum|count)$", "", n) for n in exported if n.startswith("tidegate_")
    }
    assert tidegate - documented == set(), "exported but not in docs/metrics.md"


def _rule_exprs() -> str:
    """The ``expr:`` texts of the rules file (folded ``>`` blocks included)."""
    exprs, folding = [], False
    for line in RULES.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("expr:"):
            rest = stripped.removeprefix("expr:").strip()
            folding = rest == ">"
            if not folding:
                exprs.append(rest)
        elif folding and stripped and ":" not in stripped.split(" ", 1)[0]:
            exprs.append(stripped)
        else:
            folding = False
    return "\n".join(exprs)
