"""The dashboard's pieces without a browser: the per-device counter, the URL the CLI prints,
the page's files (offline: no URL to another host), and the admin routes on a real socket."""

from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import resources
from typing import Any

import pytest

from edge.ingest import InboundPublish
from gateway.admin import AdminServer
from gateway.dashboard import ASSETS
from gateway.dashboard_cli import dashboard_url
from gateway.device_rates import CountingSink


class _Sink:
    def __init__(self) -> None:
        self.seen: list[str] = []

    def submit(self, publish: InboundPublish) -> asyncio.Future[None]:
        self.seen.append(publish.device_id)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _publish(device: str) -> InboundPublish:
    return InboundPublish(
        device_id=device, topic=f"d/{device}/up/event", qos=1, retain=False, payload=b"x",
        received_at=0.0,
    )  # fmt: skip


async def test_counting_sink_counts_per_device_and_stays_bounded() -> None:
    inner = _Sink()
    sink = CountingSink(inner, max_devices=2)
    for device in ["a", "a", "b", "c", "a", "c"]:
        await sink.submit(_publish(device))
    assert inner.seen == ["a", "a", "b", "c", "a", "c"]  # everything passed on, in order
    assert (sink.count("a"), sink.count("b")) == (3, 1)
    assert sink.count("c") is None  # beyond the bound: not tracked
    assert sink.untracked == 2
    assert CountingSink(inner).count("never-seen") == 0


def test_dashboard_url() -> None:
    assert dashboard_url("127.0.0.1", 8081, "abc") == "http://127.0.0.1:8081/dashboard/#token=abc"
    assert dashboard_url("0.0.0.0", 1, None) == "http://127.0.0.1:1/dashboard/"
    assert dashboard_url("::1", 2, None) == "http://[::1]:2/dashboard/"


def test_page_files_load_nothing_from_another_host() -> None:
    for name in ASSETS:
        text = resources.files("gateway.dashboard").joinpath(name).read_text()
        urls = [u for u in re.findall(r"(?:https?:)?//[\w.-]+", text) if "w3.org" not in u]
        assert not urls, (name, urls)
    index = resources.files("gateway.dashboard").joinpath("index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"]+)"', index):
        assert ref in ASSETS, ref


class _Api:
    def status(self) -> dict[str, Any]:
        return {"gateway_id": "gw-unit"}

    async def devices(self) -> list[dict[str, Any]]:
        return [
            {"device_id": f"d{i}", "last_seen_ms": i, "connected": i % 2 == 0} for i in range(5)
        ]

    async def dead_letters(self, limit: int, after_id: int) -> list[dict[str, Any]]:
        return []

    async def replay_dead_letters(self, ids: Sequence[int] | None) -> int:
        return 0

    async def purge_dead_letters(self, ids: Sequence[int] | None) -> int:
        return 0

    async def drops(self, after_id: int, limit: int) -> list[dict[str, Any]]:
        return []


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


async def test_admin_serves_the_page_and_bounded_devices() -> None:
    async with AdminServer("127.0.0.1", 0, _Api()) as server:
        assert server.bound is not None
        base = f"http://127.0.0.1:{server.bound[1]}"
        status, headers, body = await asyncio.to_thread(_get, base + "/")
        assert status == 200
        assert b"<title>tidegate dashboard</title>" in body
        assert "connect-src 'self'" in headers["Content-Security-Policy"]
        for name, content_type in ASSETS.items():
            status, headers, _ = await asyncio.to_thread(_get, f"{base}/dashboard/{name}")
            assert status == 200
            assert headers["Content-Type"].startswith(content_type)
        status, _, _ = await asyncio.to_thread(_get, base + "/dashboard/../admin.py")
        assert status == 404
        status, _, body = await asyncio.to_thread(_get, base + "/dashboard/secret.txt")
        assert status == 404
        status, _, body = await asyncio.to_thread(_get, base + "/devices?limit=2")
        data = json.loads(body)
        assert [d["device_id"] for d in data["devices"]] == ["d4", "d3"]
        assert (data["total"], data["connected"]) == (5, 3)
        status, _, body = await asyncio.to_thread(_get, base + "/devices")
        assert len(json.loads(body)["devices"]) == 5  # unchanged without ?limit
        status, _, _ = await asyncio.to_thread(_get, base + "/devices?limit=0")
        assert status == 400


@pytest.mark.parametrize("path", ["/drops", "/dead-letters"])
async def test_guarded_lists_stay_guarded(path: str) -> None:
    async with AdminServer("127.0.0.1", 0, _Api()) as server:
        assert server.bound is not None
        status, _, _ = await asyncio.to_thread(_get, f"http://127.0.0.1:{server.bound[1]}{path}")
        assert status == 401
