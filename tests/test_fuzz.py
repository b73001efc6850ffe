"""Fuzzing the hostile-input surface (targets in tests/fuzz_targets.py).

CI runs a short seeded version (a few thousand inputs). The full campaign is
``scripts/fuzz`` (= ``pytest -m long tests/test_fuzz.py -s``; input counts from
``TIDEGATE_FUZZ_INPUTS``, default 100,000 in total); its results are in docs/fuzzing.md.
Inputs that once found a bug stay below as explicit regression cases.
"""

from __future__ import annotations

import os
import random
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from tests.fuzz_targets import (
    LiveBroker,
    decode_target,
    live_inputs,
    mutants,
    payload_target,
    payloads,
    wire_inputs,
)

pytestmark = pytest.mark.timeout(1800)

RSS_GROWTH_LIMIT = 16 << 20
"""Most the broker process may grow over the live campaign (amqtt and the allocator warm
up; a leak of 1 KiB per input over 30,000 inputs would exceed it)."""


def _run(
    target: Callable[[bytes], None], strategy: st.SearchStrategy[bytes], n: int, mutate: int
) -> int:
    """Feed at least ``n`` inputs to ``target``: hypothesis-generated ones (seeded, no example
    database), each followed by ``mutate`` byte-level mutants of it. Returns the count."""
    calls = 0
    examples = -(-n // (1 + mutate))

    @seed(20261127)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy, st.randoms(use_true_random=False))
    def run(data: bytes, rng: random.Random) -> None:
        nonlocal calls
        for one in [data, *mutants(data, rng, mutate)]:
            calls += 1
            target(one)

    run()
    return calls


MUTATE = {"wire": 20, "payload": 20, "live": 4}
"""Mutants per generated input: generation costs ~15 ms, a decode well under 1 ms."""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveBroker]:
    with LiveBroker(tmp_path_factory.mktemp("fuzz")) as broker:
        yield broker


# -- CI: short and seeded ---------------------------------------------------------------------


def test_fuzz_wire_decoders() -> None:
    assert _run(decode_target, wire_inputs, 3000, MUTATE["wire"]) >= 2000


def test_fuzz_payload_decoders() -> None:
    assert _run(payload_target, payloads, 3000, MUTATE["payload"]) >= 2000


def test_fuzz_live_packet_path(live: LiveBroker) -> None:
    live.check_health()
    assert _run(live.target, live_inputs, 1000, MUTATE["live"]) >= 1000
    live.check_health()


# -- regression inputs (see docs/fuzzing.md) ---------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"\x30\xff\xff\xff\x7f",  # PUBLISH announcing 256 MiB: refused before reading it
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",  # empty client id, clean session
        b"\x10\x0c\x00\x04MQTT\x04\x00\x00\x3c\x00\x00",  # empty client id, persistent session
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02\xff\xfe",  # client id not UTF-8
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04fz-1"
        + b"\x30\x07\x00\x03a/+x",  # wildcard in a PUBLISH topic
        b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04fz-1"
        + b"\x30\x05\x00\x02\xc3\x28x",  # PUBLISH topic not UTF-8
    ],
    ids=["huge-length", "empty-id-clean", "empty-id-persistent", "bad-utf8-id", "wildcard", "utf8"],
)
def test_fuzz_regressions(live: LiveBroker, data: bytes) -> None:
    live.target(data)
    live.check_health()


@pytest.mark.parametrize(
    "payload",
    [
        # Found by the payload fuzzer: ttl_s = 1e300 / +inf raised OverflowError in the intake
        # (and a huge int overflowed SQLite): the publish could never be stored nor acked.
        b"\xa2fmsg_ida\x00ettl_s\xfb\x7fPbM\xd2\xf1\xa9\xfc",
        b"\xa2fmsg_ida\x00ettl_s\xf9\x7c\x00",  # +inf (half float)
        b"\xa2fmsg_ida\x00ettl_s\xc2\x51\x01" + bytes(16),  # 2**128 (bignum)
        b"\xa2fmsg_ida\x00ettl_s\xf9\x00\x01",  # 6e-08 s: an expiry of 0 ms
    ],
    ids=["1e300", "inf", "bignum", "tiny"],
)
def test_fuzz_payload_regressions(payload: bytes) -> None:
    payload_target(payload)


# -- the full campaign ------------------------------------------------------------------------


@pytest.mark.long
def test_fuzz_campaign(tmp_path: Path) -> None:
    """Decoders run under tracemalloc: what edge/ code still holds afterwards must not grow.
    The live broker runs in its own process: its RSS must stay bounded."""
    total = int(os.environ.get("TIDEGATE_FUZZ_INPUTS", "100000"))
    shares = {"wire": 0.4, "payload": 0.3, "live": 0.3}
    lines = []
    started = time.monotonic()
    for name, target, strategy in (
        ("wire", decode_target, wire_inputs),
        ("payload", payload_target, payloads),
    ):
        tracemalloc.start()
        phase = time.monotonic()
        count = _run(target, strategy, int(total * shares[name]), MUTATE[name])
        held = _edge_bytes(tracemalloc.take_snapshot())
        tracemalloc.stop()
        lines.append(
            f"{name}: {count} inputs, {time.monotonic() - phase:.0f} s, "
            f"memory still held by edge/ code afterwards: {held} B"
        )
        assert count >= total * shares[name]
        assert held < 64 << 10
    with LiveBroker(tmp_path) as live:
        live.check_health()
        rss_start = live.rss()
        phase = time.monotonic()
        count = _run(live.target, live_inputs, int(total * shares["live"]), MUTATE["live"])
        live.check_health()
        rss_end = live.rss()
        seconds = time.monotonic() - phase
    lines.append(
        f"live: {count} inputs, {seconds:.0f} s, broker RSS {rss_start / 2**20:.1f} -> "
        f"{rss_end / 2**20:.1f} MiB; broker counters {live.final}"
    )
    lines.append(f"total {time.monotonic() - started:.0f} s, 0 crashes")
    print("\nfuzz campaign:\n  " + "\n  ".join(lines))
    assert count >= total * shares["live"]
    assert rss_end - rss_start < RSS_GROWTH_LIMIT


def _edge_bytes(snapshot: tracemalloc.Snapshot) -> int:
    edge = str(Path(__file__).resolve().parent.parent / "edge" / "*")
    traces = snapshot.filter_traces([tracemalloc.Filter(True, edge)])
    return sum(stat.size for stat in traces.statistics("filename"))
