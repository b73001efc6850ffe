"""The fleet simulator authenticates: `tidegate sim --password` and `--tls-ca/--tls-cert-dir`
against the embedded broker with anonymous access off (real amqtt, real sockets, real TLS)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from edge.broker import EdgeBroker
from edge.device_auth import server_tls_context
from edge.passwords import hash_password, write_entries
from gateway.pki import init_pki, issue_device_cert
from tests.harness import REPO
from tests.test_edge_broker import HOST, FakeSink

pytestmark = pytest.mark.timeout(120)

PASSWORD = "fleet-password-1"
DEVICES = [f"dev-{i:05d}" for i in range(3)]


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[EdgeBroker, FakeSink, Path]]:
    pki = init_pki(tmp_path / "pki")
    for device in DEVICES:
        issue_device_cert(pki.directory, device)
    password_file = tmp_path / "passwords"
    write_entries(password_file, {device: hash_password(PASSWORD) for device in DEVICES})
    sink = FakeSink()
    broker = EdgeBroker(
        listeners=[("tcp", HOST, 0), ("tls", HOST, 0)],
        sink=sink,
        observer=None,
        max_inflight_per_session=16,
        allow_anonymous=False,
        password_file=password_file,
        tls={"tls": server_tls_context(pki.ca_cert, pki.broker_cert, pki.broker_key)},
    )
    async with broker:
        yield broker, sink, pki.directory


async def _sim(port: int, summary: Path, *extra: str) -> tuple[int, dict[str, int]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "device_sim",
        "sim",
        "--port",
        str(port),
        "--devices",
        str(len(DEVICES)),
        "--count",
        "5",
        "--connect-attempts",
        "1",
        "--json",
        str(summary),
        "--quiet",
        *extra,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(90):
        await proc.communicate()
    assert proc.returncode is not None
    data = json.loads(summary.read_text()) if summary.exists() else {}
    return proc.returncode, data.get("counters", data)


async def test_sim_with_password_and_with_client_certificates(
    secured: tuple[EdgeBroker, FakeSink, Path], tmp_path: Path
) -> None:
    broker, sink, pki_dir = secured
    rc, counters = await _sim(
        broker.bound_addresses["tcp"][1], tmp_path / "pw.json", "--password", PASSWORD
    )
    assert rc == 0, counters
    assert counters["acked"] == 15
    rc, counters = await _sim(
        broker.bound_addresses["tls"][1],
        tmp_path / "tls.json",
        "--tls-ca",
        str(pki_dir / "ca.pem"),
        "--tls-cert-dir",
        str(pki_dir / "devices"),
    )
    assert rc == 0, counters
    assert counters["acked"] == 15
    assert len(sink.received) == 30
    assert {p.device_id for p in sink.received} == set(DEVICES)


async def test_sim_without_credentials_is_refused(
    secured: tuple[EdgeBroker, FakeSink, Path], tmp_path: Path
) -> None:
    broker, sink, _pki = secured
    rc, counters = await _sim(broker.bound_addresses["tcp"][1], tmp_path / "anon.json")
    assert rc != 0
    assert counters.get("acked", 0) == 0
    assert broker.stats.auth_failures == len(DEVICES)
    assert sink.received == []
