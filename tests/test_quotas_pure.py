"""Quota decisions (edge/quotas.py) and the ``[quotas]`` config, with a fake clock."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge.audit import AuditLog
from edge.quotas import (
    OVERSIZE,
    ConnectionRateLimiter,
    DeviceQuota,
    QuotaLimits,
    Quotas,
    QuotaSettings,
    TokenBucket,
    quota_status,
)
from gateway.config import ConfigError, GatewayConfig
from gateway.config import parse_config as parse_mapping

KAFKA = """
[kafka]
bootstrap_servers = ["127.0.0.1:9093"]
tls = { cafile = "ca.pem", certfile = "gw.pem", keyfile = "gw-key.pem" }
"""


def parse_config(text: str) -> GatewayConfig:
    return parse_mapping(tomllib.loads(text), check_files=False)


def test_token_bucket_burst_then_rate_then_debt() -> None:
    bucket = TokenBucket(rate=10.0, burst=5.0, now=0.0)
    assert [bucket.take(1, 0.0) for _ in range(5)] == [0.0] * 5
    assert bucket.take(1, 0.0) == pytest.approx(0.1)  # one token short at 10/s
    assert bucket.take(1, 0.0) == pytest.approx(0.2)  # debt accumulates: wait grows
    assert bucket.take(1, 0.3) == pytest.approx(0.0)  # 0.3 s repaid the debt exactly
    assert not bucket.full(0.3)
    assert bucket.full(10.0)
    assert bucket.tokens == 5.0  # refilled only up to the burst


def test_token_bucket_rejects_non_positive_rates() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0.0, 1.0, 0.0)


def test_throttled_device_settles_at_its_quota() -> None:
    # A device that always sends as soon as it is allowed: 100 msg/s after a burst of 10.
    quota = DeviceQuota(QuotaLimits(messages_per_s=100.0, messages_burst=10.0), now=0.0)
    now, sent = 0.0, 0
    while now < 2.0:
        now += quota.check(64, now)
        sent += 1
    assert 205 <= sent <= 212  # 10 burst + 2 s x 100/s (+1 for the last one started)


def test_bytes_bucket_and_oversize() -> None:
    limits = QuotaLimits(bytes_per_s=1000.0, bytes_burst=2000.0, max_payload_bytes=1500)
    quota = DeviceQuota(limits, now=0.0)
    assert quota.check(1500, 0.0) == 0.0
    assert quota.check(1000, 0.0) == pytest.approx(0.5)
    assert quota.check(1501, 0.0) == OVERSIZE
    assert quota.bytes is not None
    assert quota.bytes.tokens == pytest.approx(-500.0)  # an oversize payload takes nothing


def test_quotas_keep_state_per_device_and_apply_overrides() -> None:
    settings = QuotaSettings(
        default=QuotaLimits(messages_per_s=1.0, messages_burst=1.0),
        devices={"vip": QuotaLimits(messages_per_s=100.0, messages_burst=100.0)},
    )
    quotas = Quotas(settings)
    a = quotas.device("a", 0.0)
    assert a is not None
    assert a.check(1, 0.0) == 0.0
    assert a.check(1, 0.0) > 0
    assert quotas.device("a", 0.0) is a  # a reconnect does not get a fresh burst
    vip = quotas.device("vip", 0.0)
    assert vip is not None
    assert all(vip.check(1, 0.0) == 0.0 for _ in range(100))
    assert Quotas(QuotaSettings()).device("x", 0.0) is None  # nothing to check per publish


def test_subscription_limit_counts_distinct_filters() -> None:
    quotas = Quotas(QuotaSettings(default=QuotaLimits(max_subscriptions=2)))
    for topic_filter in ("a", "b"):
        assert quotas.may_subscribe("d", topic_filter)
        quotas.subscribed("d", topic_filter)
    assert quotas.may_subscribe("d", "a")  # re-subscribing an existing filter is fine
    assert not quotas.may_subscribe("d", "c")
    assert quotas.may_subscribe("other", "c")
    quotas.unsubscribed("d", "a")
    assert quotas.may_subscribe("d", "c")
    quotas.unsubscribed("d", "b")
    assert quotas.subscription_count("d") == 0


def test_connection_rate_limiter_per_address() -> None:
    limiter = ConnectionRateLimiter(rate=2.0, burst=3.0)
    assert [limiter.allow("10.0.0.1", 0.0) for _ in range(4)] == [True, True, True, False]
    assert limiter.allow("10.0.0.2", 0.0)  # another address has its own bucket
    assert not limiter.allow("10.0.0.1", 0.4)  # refused attempts do not dig into debt
    assert limiter.allow("10.0.0.1", 0.5)


def test_connection_limiter_state_stays_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("edge.quotas._PRUNE_AT", 100)
    limiter = ConnectionRateLimiter(rate=1.0, burst=1.0)
    for index in range(1000):
        limiter.allow(f"10.0.{index // 256}.{index % 256}", index * 0.001)
    assert len(limiter) <= 100


def test_events_are_counted_and_audited(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.jsonl")
    quotas = Quotas(QuotaSettings(on_oversize="puback_discard"), audit)
    for _ in range(3):
        quotas.throttled("d", "127.0.0.1:1", 0.25)
    quotas.oversize("d", "127.0.0.1:1", "d/d/up/x", 10)
    quotas.connection_refused("127.0.0.1")
    status = quota_status(quotas)
    assert status["throttled"] == 3
    assert status["throttled_s"] == 0.75
    assert status["oversize_discarded"] == 1
    assert status["connections_refused"] == 1
    events = [record["event"] for record in audit.read()]
    # throttling is audited at most once a second; every oversize drop is audited
    assert events == ["quota_throttled", "quota_oversize", "quota_connection_refused"]
    assert quota_status(None) == {"enabled": False}


def test_config_defaults_overrides_and_errors() -> None:
    config = parse_config(
        KAFKA
        + "[quotas]\npolicy = 'disconnect'\nmessages_per_s = 50\n"
        + "[quotas.devices.big]\nmessages_per_s = 500\nmax_payload_bytes = 2048\n"
    )
    settings = config.quotas.settings()
    assert settings is not None
    assert settings.policy == "disconnect"
    assert settings.default.messages_per_s == 50
    big = settings.devices["big"]
    assert (big.messages_per_s, big.max_payload_bytes) == (500, 2048)
    assert big.messages_burst == settings.default.messages_burst  # not overridden
    assert parse_config(KAFKA + "[quotas]\nenabled = false\n").quotas.settings() is None
    with pytest.raises(ConfigError, match=r"quotas\.policy"):
        parse_config(KAFKA + "[quotas]\npolicy = 'drop'\n")
    with pytest.raises(ConfigError, match=r"devices\.big\.bytes_burst"):
        parse_config(
            KAFKA + "[quotas.devices.big]\nbytes_per_s = 10\nbytes_burst = 10\n"
            "max_payload_bytes = 100\n"
        )
    with pytest.raises(ConfigError, match=r"quotas\.devices\.x\.rate"):
        parse_config(KAFKA + "[quotas.devices.x]\nrate = 1\n")
