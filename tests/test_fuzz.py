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
from collections.abc import Callable, Iterator

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
from tests.harness import rss_bytes

pytestmark = pytest.mark.timeout(1800)

RSS_GROWTH_LIMIT = 64 << 20
"""Most the process may grow over a live campaign (the interpreter, hypothesis and amqtt
warm up; a per-input leak of even 1 KiB over 30k inputs would exceed it)."""


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
def live() -> Iterator[LiveBroker]:
    with LiveBroker() as broker:
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
    assert live.sink.count > 0  # some fuzzed publishes did get through to the sink


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
def test_fuzz_campaign(live: LiveBroker) -> None:
    total = int(os.environ.get("TIDEGATE_FUZZ_INPUTS", "100000"))
    shares = {"wire": 0.4, "payload": 0.3, "live": 0.3}
    pid = os.getpid()
    results: dict[str, tuple[int, float]] = {}
    live.check_health()
    rss_start = rss_bytes(pid)
    for name, target, strategy in (
        ("wire", decode_target, wire_inputs),
        ("payload", payload_target, payloads),
        ("live", live.target, live_inputs),
    ):
        started = time.monotonic()
        count = _run(target, strategy, int(total * shares[name]), MUTATE[name])
        results[name] = (count, time.monotonic() - started)
        print(f"fuzz {name}: {count} inputs in {results[name][1]:.0f} s, RSS {rss_bytes(pid)}")
    live.check_health()
    rss_end = rss_bytes(pid)
    inputs = sum(count for count, _ in results.values())
    print(
        f"fuzz campaign: {inputs} inputs, 0 crashes, RSS {rss_start >> 20} -> {rss_end >> 20} MiB, "
        f"{sum(s for _, s in results.values()):.0f} s; live sink got {live.sink.count} publishes; "
        f"broker stats {live.broker.stats}"
    )
    assert inputs >= total * 0.99
    assert rss_end - rss_start < RSS_GROWTH_LIMIT
