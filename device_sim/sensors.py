"""Noisy sensor readings for simulated devices, encoded as JSON or CBOR.

A reading becomes the ``body`` of the CBOR envelope (the envelope keeps ``msg_id``/``seq``
so the verifier works whatever the body holds). Each device keeps a few floats of state (a
random walk), so readings look like a real sensor's series rather than independent noise,
and 10,000 devices cost a few hundred kilobytes.
"""

from __future__ import annotations

import json
import math
import random
from typing import Any, Literal

import cbor2

__all__ = ["Sensor", "garbage"]

SensorKind = Literal["temperature", "vibration", "gps", "filler"]


class Sensor:
    """One device's sensor: :meth:`reading` returns the next encoded body."""

    __slots__ = ("_a", "_b", "_c", "_encoding", "_filler", "_kind", "_rng", "_size")

    def __init__(
        self,
        kind: SensorKind,
        encoding: Literal["json", "cbor"],
        rng: random.Random,
        *,
        size: int,
        filler: bytes,
    ) -> None:
        self._kind = kind
        self._encoding = encoding
        self._rng = rng
        self._size = size
        self._filler = filler
        # Starting point per device: a room temperature, a machine's vibration level, a place.
        self._a = rng.uniform(15.0, 30.0) if kind == "temperature" else rng.uniform(0.5, 3.0)
        self._b = rng.uniform(-60.0, 60.0)  # gps: latitude
        self._c = rng.uniform(-180.0, 180.0)  # gps: longitude
        if kind == "gps":
            self._a = rng.uniform(0.0, 30.0)  # speed m/s

    def reading(self, ts_ms: int) -> bytes:
        """The next body: encoded reading, or a slice of random filler."""
        if self._kind == "filler":
            start = self._rng.randrange(0, max(1, len(self._filler) - self._size))
            return self._filler[start : start + self._size]
        item = self._next(ts_ms)
        if self._encoding == "json":
            return json.dumps(item, separators=(",", ":")).encode()
        return cbor2.dumps(item)

    def _next(self, ts_ms: int) -> dict[str, Any]:
        rng = self._rng
        if self._kind == "temperature":
            # Mean-reverting walk around 22 °C plus measurement noise.
            self._a += 0.05 * (22.0 - self._a) + rng.gauss(0, 0.2)
            return {
                "sensor": "temperature",
                "t": ts_ms,
                "celsius": round(self._a + rng.gauss(0, 0.05), 2),
                "humidity": round(min(100.0, max(0.0, 45 + rng.gauss(0, 3))), 1),
            }
        if self._kind == "vibration":
            self._a = max(0.05, self._a + rng.gauss(0, 0.05))
            n = max(1, self._size // 4)
            samples = [
                round(self._a * math.sin(i * 0.7) + rng.gauss(0, 0.1 * self._a), 3)
                for i in range(n)
            ]
            return {
                "sensor": "vibration",
                "t": ts_ms,
                "rms_g": round(self._a / math.sqrt(2), 3),
                "peak_g": round(max(abs(s) for s in samples), 3),
                "samples": samples,
            }
        # gps: heading drifts, position follows speed; fix noise of a few metres.
        self._a = min(40.0, max(0.0, self._a + rng.gauss(0, 0.5)))
        self._b = max(-89.0, min(89.0, self._b + rng.gauss(0, 1e-4)))
        self._c = (self._c + rng.gauss(0, 1e-4) + 180.0) % 360.0 - 180.0
        return {
            "sensor": "gps",
            "t": ts_ms,
            "lat": round(self._b + rng.gauss(0, 2e-5), 6),
            "lon": round(self._c + rng.gauss(0, 2e-5), 6),
            "speed_mps": round(self._a, 2),
            "hdop": round(rng.uniform(0.7, 2.5), 1),
            "sats": rng.randint(4, 14),
        }


def garbage(rng: random.Random, size: int) -> bytes:
    """Random bytes that are not an envelope (a CBOR decoder rejects or misreads them)."""
    # 0xFF first: a CBOR "break" with nothing open, invalid as the first byte of an item.
    return b"\xff" + rng.randbytes(max(0, size - 1))
