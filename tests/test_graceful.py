"""Graceful operations (issue 9): SIGTERM under load loses nothing acknowledged; SIGHUP
reloads what can change at runtime."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.dev.kafka import KafkaState
from gateway.shutdown import drain
from tests.harness import (
    GatewayProcess,
    Publisher,
    assert_all_acked_arrived,
    read_topics,
    running_gateway,
    wait_for,
    write_gateway_config,
)
from tests.harness import kafka_tls as _tls


async def test_drain_stops_when_empty_when_stalled_and_at_the_budget() -> None:
    rows = [3]

    def forward() -> int:
        rows[0] = max(0, rows[0] - 1)
        return 3 - rows[0]

    assert (await drain(lambda: rows[0], forward, 5.0)).reason == "empty"
    stalled = await drain(lambda: 7, lambda: 0, 5.0, stall_s=0.2)
    assert (stalled.reason, stalled.rows_after) == ("stalled", 7)
    assert stalled.seconds < 1.0
    counter = iter(range(10**9))
    budget = await drain(lambda: 7, lambda: next(counter), 0.3)
    assert budget.reason == "budget"


@pytest.mark.kafka
async def test_sigterm_under_load_every_acknowledged_message_reaches_kafka(
    tmp_path: Path, kafka: KafkaState, kafka_topic: str
) -> None:
    deadline = 8.0
    config = write_gateway_config(
        tmp_path,
        bootstrap=kafka.bootstrap,
        tls=_tls(kafka),
        topics={"event": kafka_topic},
        shutdown_deadline_s=deadline,
    )
    devices = [f"term-load-{i:02d}" for i in range(8)]
    gateway = GatewayProcess(config)
    publisher = Publisher(0, devices)
    try:
        gateway.start()
        publisher = Publisher(gateway.mqtt_port, devices).start(per_device=4000, inflight=20)
        # Mid-run: devices are publishing as fast as the gateway acknowledges.
        wait_for(lambda: publisher.total_acked() >= 3000, 60, "3000 PUBACKs")
        elapsed = gateway.terminate(timeout=deadline + 5)
        assert gateway.proc is not None
        assert gateway.proc.returncode == 0, gateway.log()[-3000:]
        assert elapsed <= deadline + 1.0, f"exit took {elapsed:.1f} s"
    finally:
        publisher.stop()
        gateway.stop()
    acked = publisher.total_acked()
    assert acked < 8 * 4000, "the fleet finished before SIGTERM: no load at the stop"
    log = gateway.log()
    assert "stopping: closing listeners" in log
    drained = re.search(r"stopping: drained \d+ of \d+ buffered rows.*", log)
    assert drained, log[-3000:]
    print(drained.group(0), "acked", acked)
    with running_gateway(config) as restarted:
        restarted.wait_status(lambda s: s["buffer"]["rows"] == 0, 120, "the buffer to drain")
    records = await read_topics(kafka.bootstrap, _tls(kafka), [kafka_topic], deadline_s=60)
    assert_all_acked_arrived(publisher.acked, records)
    assert len(records) >= acked
