"""The cache of successful password checks: a reconnect skips scrypt, a changed or removed
password is never served from it. Pure unit tests, then the real broker (amqtt, paho, scrypt)."""

from __future__ import annotations

import time

import pytest

from edge.auth_cache import VerificationCache
from edge.passwords import hash_password
from tests.test_edge_broker import FakeSink
from tests.test_security_broker import BAD_CREDENTIALS, PASSWORD, Env, env, port

__all__ = ["env"]  # the fixture, imported for the tests below

pytestmark = pytest.mark.timeout(60)

# Stand-in "encoded hashes": the cache only compares them, it never parses them.
HASH_A, HASH_B = "scrypt$a", "scrypt$b"


def test_hit_only_for_the_same_device_password_and_hash() -> None:
    cache = VerificationCache()
    assert not cache.verified("d1", "pw", HASH_A)  # nothing remembered yet
    cache.remember("d1", "pw", HASH_A)
    assert cache.verified("d1", "pw", HASH_A)
    assert not cache.verified("d1", "other", HASH_A)  # another password
    assert not cache.verified("d1", "pw", HASH_B)  # the device's entry changed in the file
    assert not cache.verified("d2", "pw", HASH_A)  # one device cannot vouch for another
    assert (cache.hits, cache.misses) == (1, 4)


def test_bounded_least_recently_used_first() -> None:
    cache = VerificationCache(max_entries=3)
    for device in ("a", "b", "c"):
        cache.remember(device, "pw", HASH_A)
    assert cache.verified("a", "pw", HASH_A)  # "a" is now the most recently used
    cache.remember("d", "pw", HASH_A)
    assert len(cache) == 3
    assert not cache.verified("b", "pw", HASH_A)  # evicted
    assert all(cache.verified(d, "pw", HASH_A) for d in ("a", "c", "d"))


def test_forget_and_clear_and_no_password_kept() -> None:
    cache = VerificationCache()
    cache.remember("a", "secret-password", HASH_A)
    cache.remember("b", "pw", HASH_A)
    assert b"secret-password" not in repr(cache._entries).encode()
    cache.forget("a")
    assert not cache.verified("a", "secret-password", HASH_A)
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError, match="max_entries"):
        VerificationCache(max_entries=0)


async def test_reconnect_skips_scrypt_and_a_changed_password_is_not_served(env: Env) -> None:
    env.set_passwords(**{"pw-a": PASSWORD})
    broker = await env.broker(FakeSink(), allow_anonymous=False, password_file=env.password_file)
    cache = broker._authenticator.cache
    tcp = port(broker, "tcp")
    timings = []
    for attempt in range(3):
        device = env.device("pw-a")
        started = time.perf_counter()
        assert await device.connect(tcp, username="pw-a", password=PASSWORD) == 0, attempt
        timings.append(time.perf_counter() - started)
        await device.close()
    assert (cache.hits, cache.misses) == (2, 1)  # scrypt ran once, for the first connect

    wrong = env.device("pw-a")
    assert await wrong.connect(tcp, username="pw-a", password="wrong") == BAD_CREDENTIALS
    await wrong.close()

    # The password is changed in the file (tidegate devices add): the old one, verified and
    # cached a moment ago, must be refused; the new one is accepted.
    env.password_file.write_text(f"pw-a:{hash_password('a new password')}\n")
    stale = env.device("pw-a")
    assert await stale.connect(tcp, username="pw-a", password=PASSWORD) == BAD_CREDENTIALS
    await stale.close()
    fresh = env.device("pw-a")
    assert await fresh.connect(tcp, username="pw-a", password="a new password") == 0
    print(f"connect times: first {timings[0] * 1000:.0f} ms, cached {timings[1] * 1000:.0f} ms")
