"""The gateway forwards to Kafka over SASL_SSL (issue 8, item 9), against the real broker.

The local Kafka has a SASL_SSL listener next to the mutual-TLS one (gateway/dev/kafka_sasl.py).
The gateway is configured with only that listener's address and no client certificate, so a
record can only arrive if the SASL login worked. Records are read back over mutual TLS (an
independent path) and with the verifier over SASL.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from bridge.kafka_security import SaslLogin
from device_sim.kafka_reader import KafkaSource
from device_sim.kafka_reader import read_topics as verifier_read
from device_sim.verify import RecordView
from gateway.dev.kafka import KafkaState, client_ssl_context
from tests.harness import (
    GatewayProcess,
    read_topics,
    run_cli,
    running_gateway,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls
from tests.harness import publish_qos1 as _publish

pytestmark = pytest.mark.kafka

_WRONG_PASSWORD = "not-the-password-4711"


def _sasl_bootstrap(kafka: KafkaState) -> str:
    if kafka.sasl is None or kafka.sasl_bootstrap is None:
        pytest.fail(
            f"the local Kafka in {kafka.data_dir} has no SASL_SSL listener (started by an "
            "older tidegate): restart it with `tidegate dev kafka down/up`"
        )
    return kafka.sasl_bootstrap


def _sasl_config(
    tmp_path: Path,
    kafka: KafkaState,
    topics: dict[str, str],
    *,
    mechanism: str,
    password_line: str,
    extra: str = "",
) -> Path:
    """A harness gateway config switched from mutual TLS to SASL_SSL: CA only, no client
    certificate, the SASL listener's address."""
    bootstrap = _sasl_bootstrap(kafka)
    assert kafka.sasl is not None
    path = write_gateway_config(
        tmp_path, bootstrap=bootstrap, tls=_tls(kafka), topics=topics, extra=extra
    )
    text = path.read_text()
    client_cert = f'certfile = "{kafka.cert_file}"\nkeyfile = "{kafka.key_file}"\n'
    assert client_cert in text
    text = text.replace(client_cert, "")
    server_line = f'bootstrap_servers = ["{bootstrap}"]\n'
    text = text.replace(server_line, server_line + 'security_protocol = "SASL_SSL"\n')
    text += (
        f'\n[kafka.sasl]\nmechanism = "{mechanism}"\n'
        f'username = "{kafka.sasl.username}"\n{password_line}\n'
    )
    path.write_text(text)
    return path


def _password_file_line(kafka: KafkaState) -> str:
    assert kafka.sasl is not None
    return f'password_file = "{kafka.sasl.password_file}"'


@pytest.mark.parametrize(
    ("mechanism", "delivery"), [("SCRAM-SHA-512", "at_least_once"), ("PLAIN", "exactly_once")]
)
async def test_gateway_forwards_over_sasl_ssl(
    tmp_path: Path,
    kafka: KafkaState,
    kafka_topic_factory: Callable[..., str],
    mechanism: str,
    delivery: str,
) -> None:
    """Exactly-once adds the transactional producer and the progress-recovery consumers."""
    events = kafka_topic_factory("events")
    config = _sasl_config(
        tmp_path,
        kafka,
        {"event": events},
        mechanism=mechanism,
        password_line=_password_file_line(kafka),
    )
    if delivery == "exactly_once":
        progress = kafka_topic_factory("progress", partitions=1)
        anchor = "retry_backoff_max_s = 1.0\n"
        config.write_text(
            config.read_text().replace(
                anchor,
                anchor + f'delivery = "exactly_once"\nprogress_topic = "{progress}"\n',
            )
        )
    payloads = [f"sasl-{mechanism}-{i}".encode() for i in range(20)]
    with running_gateway(config) as gateway:
        _publish(gateway.mqtt_port, "dev-sasl", [("d/dev-sasl/up/event", p) for p in payloads])
        status = gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the buffer to drain")
        assert status["kafka"]["breaker"]["state"] == "closed"
        assert status["kafka"]["delivery"] == delivery
        log = gateway.log()
    # Read back over mutual TLS, the other listener.
    isolation = "read_committed" if delivery == "exactly_once" else "read_uncommitted"
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events], isolation=isolation)
    assert sorted(r.value for r in records) == sorted(payloads)
    assert {r.key for r in records} == {b"dev-sasl"}
    assert kafka.sasl is not None
    password = kafka.sasl.password_file.read_text()
    assert password not in log
    # The verifier's reader over SASL_SSL too (the tidegate verify path).
    seen: list[RecordView] = []
    source = KafkaSource(
        bootstrap_servers=[_sasl_bootstrap(kafka)],
        ssl_context=client_ssl_context(kafka),
        topics=[events],
        sasl=SaslLogin(mechanism, kafka.sasl.username, password),
    )
    summary = await verifier_read(source, seen.append, timeout_s=30, connect_timeout_s=20)
    assert summary.complete
    assert len(seen) == len(payloads)


async def test_wrong_password_opens_the_breaker_loses_nothing_and_recovers(
    tmp_path: Path,
    kafka: KafkaState,
    kafka_topic_factory: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = kafka_topic_factory("events")
    monkeypatch.setenv("TG_TEST_SASL_PASSWORD", _WRONG_PASSWORD)  # the gateway inherits it
    config = _sasl_config(
        tmp_path,
        kafka,
        {"event": events},
        mechanism="SCRAM-SHA-512",
        password_line='password = "${TG_TEST_SASL_PASSWORD}"',
    )
    text = config.read_text().replace(
        "retry_backoff_max_s = 1.0\n", "retry_backoff_max_s = 30.0\nbreaker_failures = 2\n"
    )
    config.write_text(text)
    payloads = [f"held-{i}".encode() for i in range(10)]
    gateway = GatewayProcess(config)
    try:
        gateway.start()
        # PUBACKed from disk: Kafka refusing us does not stop devices.
        _publish(gateway.mqtt_port, "dev-pw", [("d/dev-pw/up/event", p) for p in payloads])
        status = gateway.wait_status(
            lambda s: s["kafka"]["breaker"]["state"] == "open", 60, "the breaker to open"
        )
        error = status["kafka"]["last_error"]
        assert "refused the SASL login of user 'tidegate' (SCRAM-SHA-512)" in error
        assert "invalid credentials" in error
        assert status["buffer"]["rows"] == len(payloads)
        gateway.terminate(timeout=30)
    finally:
        gateway.stop()
    assert _WRONG_PASSWORD not in gateway.log()
    assert "refused the SASL login" in gateway.log()
    assert await read_topics(kafka.bootstrap, _tls(kafka), [events]) == []
    # The operator fixes the password and restarts: everything buffered is delivered.
    config.write_text(
        config.read_text().replace(
            'password = "${TG_TEST_SASL_PASSWORD}"', _password_file_line(kafka)
        )
    )
    with running_gateway(config) as fixed:
        fixed.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the buffer to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    assert sorted(r.value for r in records) == sorted(payloads)


async def test_replaced_password_file_is_used_without_restart(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    """The password file is read whenever a producer is built: fixing it is enough."""
    assert kafka.sasl is not None
    events = kafka_topic_factory("events")
    secret = tmp_path / "kafka-password"
    secret.write_text(_WRONG_PASSWORD + "\n")
    secret.chmod(0o600)
    config = _sasl_config(
        tmp_path,
        kafka,
        {"event": events},
        mechanism="SCRAM-SHA-512",
        password_line=f'password_file = "{secret}"',
    )
    with running_gateway(config) as gateway:
        _publish(gateway.mqtt_port, "dev-rot", [("d/dev-rot/up/event", b"waits")])
        gateway.wait_status(
            lambda s: "refused the SASL login" in (s["kafka"]["last_error"] or ""),
            60,
            "the refused login to show",
        )
        secret.write_text(kafka.sasl.password_file.read_text() + "\n")
        gateway.wait_status(lambda s: s["buffer"]["rows"] == 0, 60, "the buffer to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [events])
    assert [r.value for r in records] == [b"waits"]


async def test_cmd_send_uses_sasl_when_configured(
    tmp_path: Path, kafka: KafkaState, kafka_topic_factory: Callable[..., str]
) -> None:
    commands = kafka_topic_factory("commands")
    config = _sasl_config(
        tmp_path,
        kafka,
        {"event": "iot.events"},
        mechanism="SCRAM-SHA-256",
        password_line=_password_file_line(kafka),
        extra=f'\n[commands]\ntopic = "{commands}"\n',
    )
    sent = run_cli("cmd", "send", "dev-c", "reboot", "--id", "c-sasl-1", "-c", str(config))
    assert sent.returncode == 0, sent.stderr
    assert sent.stdout.strip() == "c-sasl-1"
    records = await read_topics(kafka.bootstrap, _tls(kafka), [commands])
    assert [r.key for r in records] == [b"dev-c"]
    assert b'"command_id": "c-sasl-1"' in records[0].value
    # A wrong password is a clear error naming the user, and nothing is produced.
    bad = tmp_path / "bad-password"
    bad.write_text(_WRONG_PASSWORD)
    assert kafka.sasl is not None
    config.write_text(config.read_text().replace(str(kafka.sasl.password_file), str(bad)))
    refused = run_cli("cmd", "send", "dev-c", "reboot", "--id", "c-sasl-2", "-c", str(config))
    assert refused.returncode == 1
    assert "refused the SASL login of user 'tidegate' (SCRAM-SHA-256)" in refused.stderr
    assert _WRONG_PASSWORD not in refused.stderr + refused.stdout
    assert len(await read_topics(kafka.bootstrap, _tls(kafka), [commands])) == 1
