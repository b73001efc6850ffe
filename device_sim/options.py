"""Fleet options: one frozen, validated object instead of thirty keyword arguments.

Validation is pure and raises :class:`SimOptionsError` naming the option, so the CLI turns
bad arguments into one clear line and exit code 2.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from gateway.errors import TidegateError

if TYPE_CHECKING:
    from device_sim.profile import Profile

__all__ = [
    "FleetOptions",
    "SimOptionsError",
    "device_id",
    "parse_classes",
    "source_address",
]

_CLASS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
MAX_DEVICES = 1_000_000
"""Source-address spreading covers 127.0.0.2 … 127.63.x.y with this many devices."""


class SimOptionsError(TidegateError, ValueError):
    """A simulator option is invalid; the message starts with the option name."""


def parse_classes(spec: str) -> tuple[tuple[str, float], ...]:
    """``"telemetry:8,event:1"`` → ``(("telemetry", 8.0), ("event", 1.0))``; weight default 1."""
    out: list[tuple[str, float]] = []
    for raw in spec.split(","):
        part = raw.strip()
        if not part:
            continue
        name, _, weight_text = part.partition(":")
        if not _CLASS_NAME.match(name):
            raise SimOptionsError(
                f"--classes: {name!r} is not a class name (lowercase letters, digits, _ and -)"
            )
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise SimOptionsError(f"--classes: weight of {name!r} is not a number") from None
        if not weight > 0:
            raise SimOptionsError(f"--classes: weight of {name!r} must be > 0")
        if any(name == seen for seen, _ in out):
            raise SimOptionsError(f"--classes: {name!r} is listed twice")
        out.append((name, weight))
    if not out:
        raise SimOptionsError("--classes: at least one class is needed")
    return tuple(out)


def device_id(prefix: str, index: int) -> str:
    """The contract's device id (= MQTT client id): ``{prefix}{index:05d}``."""
    return f"{prefix}{index:05d}"


def source_address(index: int) -> str:
    """Loopback source address for device ``index`` when spreading: 127.0.0.2, .3, …

    Skips x.x.x.0 and x.x.x.255 so no address looks like a network or broadcast address.
    """
    n = index + 1
    return f"127.{n // (254 * 256)}.{(n // 254) % 256}.{n % 254 + 1}"


@dataclass(frozen=True)
class FleetOptions:
    """Everything a fleet run needs. Build with keywords, then call :meth:`validated`."""

    host: str = "127.0.0.1"
    """Broker address; loopback only (the simulator is a test tool, not a traffic cannon)."""
    port: int = 1883
    devices: int = 10
    count: int | None = 10
    """Messages per device (all classes together). Exactly one of count/duration_s."""
    duration_s: float | None = None
    """Publish for this long instead of a count."""
    rate: float = 0.0
    """Messages per second per device; 0 = as fast as the in-flight window allows."""
    qos: int = 1
    classes: tuple[tuple[str, float], ...] = (("telemetry", 1.0),)
    """Classes with weights: each message picks one at random by weight."""
    payload_size: int = 64
    """Bytes of filler in the envelope's ``body``."""
    ttl_s: int | None = None
    """Optional ``ttl_s`` in every envelope."""
    ledger: Path | None = None
    prefix: str = "dev-"
    start_index: int = 0
    inflight: int = 20
    """Most un-acked publishes per device (QoS0: not yet written to the socket)."""
    processes: int = 1
    spread_source_addresses: bool = False
    keepalive: int = 60
    connect_concurrency: int = 64
    """Connects in progress at once (each runs the blocking TCP connect in a thread)."""
    connect_rate: float = 500.0
    """Ramp-up: new connects started per second (0 = no ramp)."""
    connect_timeout_s: float = 10.0
    """Per attempt: TCP connect plus CONNACK."""
    connect_attempts: int = 8
    """Attempts per device before it gives up (also used for reconnects after a loss)."""
    backoff_base_s: float = 0.2
    backoff_max_s: float = 5.0
    max_time_s: float = 3600.0
    """Hard bound on the publishing phase, whatever count/rate say."""
    drain_timeout_s: float = 30.0
    """After publishing: how long to wait for outstanding PUBACKs."""
    seed: int | None = None
    """Seed for class choice and jitter (None: random)."""
    run_id: str | None = None
    """Fixed run id (shards of one run share it); None: a fresh random one."""
    commands: bool = False
    """Subscribe to ``d/{id}/cmd``, apply commands, report, PUBACK after applying."""
    command_delay_s: float = 0.0
    """Time a command takes to apply."""
    command_failure_rate: float = 0.0
    """Share of commands reported ``failed``."""
    linger_s: float = 0.0
    """Stay connected this long after the last PUBACK (to receive commands)."""
    password: str | None = field(default=None, repr=False)
    """Authenticate every device with user name = its id and this password (dev fleets:
    register the ids with ``tidegate devices add``). Never logged or written anywhere."""
    tls_ca: Path | None = None
    """Connect over TLS, trusting this CA for the gateway's certificate."""
    tls_cert_dir: Path | None = None
    """TLS client certificates: ``{dir}/{id}.pem`` and ``{dir}/{id}-key.pem`` per device
    (the layout of ``tidegate certs device``)."""
    profile: Profile | None = None
    """A fleet profile (``--profile``): per-device type, rate, sensor, events. Device
    indices then run over the profile's types; ``prefix``/``rate``/``classes`` are unused."""

    def validated(self) -> FleetOptions:
        """Self, checked; raises :class:`SimOptionsError` naming the first bad option."""
        try:
            address = ipaddress.ip_address(self.host)
        except ValueError:
            if self.host != "localhost":
                raise SimOptionsError(f"--host: {self.host!r} is not an IP address") from None
            address = ipaddress.ip_address("127.0.0.1")
        if not address.is_loopback:
            raise SimOptionsError(f"--host: {self.host} is not a loopback address")
        checks: list[tuple[bool, str]] = [
            (0 < self.port < 65536, "--port: must be 1..65535"),
            (0 < self.devices <= MAX_DEVICES, f"--devices: must be 1..{MAX_DEVICES}"),
            (
                (self.count is None) != (self.duration_s is None),
                "--count/--duration: give exactly one",
            ),
            (self.count is None or self.count >= 1, "--count: must be >= 1"),
            (self.duration_s is None or self.duration_s > 0, "--duration: must be > 0"),
            (self.rate >= 0, "--rate: must be >= 0"),
            (self.qos in (0, 1), "--qos: 0 or 1 (QoS 2 is not simulated)"),
            (0 <= self.payload_size <= 1 << 20, "--payload-size: must be 0..1048576"),
            (self.ttl_s is None or self.ttl_s > 0, "--ttl: must be > 0"),
            (1 <= self.inflight <= 65535, "--inflight: must be 1..65535"),
            (1 <= self.processes <= 64, "--processes: must be 1..64"),
            (self.processes <= self.devices, "--processes: more processes than devices"),
            (5 <= self.keepalive <= 65535, "--keepalive: must be 5..65535"),
            (1 <= self.connect_concurrency <= 1024, "--connect-concurrency: must be 1..1024"),
            (self.connect_rate >= 0, "--connect-rate: must be >= 0"),
            (self.connect_timeout_s > 0, "--connect-timeout: must be > 0"),
            (1 <= self.connect_attempts <= 100, "--connect-attempts: must be 1..100"),
            (0 < self.backoff_base_s <= self.backoff_max_s, "backoff: 0 < base <= max"),
            (0 < self.max_time_s <= 7 * 86400, "--max-time: must be > 0 (and <= 7 days)"),
            (0 <= self.drain_timeout_s <= 3600, "--drain-timeout: must be 0..3600"),
            (
                bool(self.prefix)
                and "/" not in self.prefix
                and "+" not in self.prefix
                and "#" not in self.prefix,
                "--prefix: must be non-empty, without / + #",
            ),
            (self.start_index >= 0, "--start-index: must be >= 0"),
            (0 <= self.command_delay_s <= 3600, "--command-delay: must be 0..3600"),
            (0 <= self.command_failure_rate <= 1, "--command-failure-rate: must be 0..1"),
            (0 <= self.linger_s <= 86_400, "--linger: must be 0..86400"),
            (
                self.start_index + self.devices <= MAX_DEVICES,
                f"--start-index + --devices must be <= {MAX_DEVICES}",
            ),
        ]
        checks += [
            ((self.tls_ca is None) == (self.tls_cert_dir is None), "--tls-ca/--tls-cert-dir: both"),
            (self.tls_ca is None or self.tls_ca.is_file(), "--tls-ca: file not found"),
            (
                self.tls_cert_dir is None or self.tls_cert_dir.is_dir(),
                "--tls-cert-dir: directory not found",
            ),
            (self.password is None or bool(self.password), "--password: must not be empty"),
        ]
        if self.profile is not None:
            checks.append(
                (
                    self.start_index + self.devices <= self.profile.devices,
                    "--devices: more devices than the profile's types hold",
                )
            )
        for ok, message in checks:
            if not ok:
                raise SimOptionsError(message)
        parse_classes(",".join(f"{name}:{weight}" for name, weight in self.classes))
        if self.duration_s is not None and self.duration_s > self.max_time_s:
            # A duration is itself a time bound; --max-time only caps count-driven runs.
            return replace(self, max_time_s=self.duration_s)
        return self

    def shard(self, index: int, of: int) -> FleetOptions:
        """The options for shard ``index`` of ``of`` processes: a contiguous device range."""
        first = self.devices * index // of
        last = self.devices * (index + 1) // of
        ledger = (
            None
            if self.ledger is None
            else self.ledger.with_name(f"{self.ledger.name}.part{index}")
        )
        return replace(
            self,
            devices=last - first,
            start_index=self.start_index + first,
            processes=1,
            ledger=ledger,
            seed=None if self.seed is None else self.seed + index * 7919,
        )
