"""Disk and memory for an edge box: the buffer an outage of a given length fills, from the
constants measured by ``bench/sizing.py`` (docs/bench-results/sizing.json, docs/sizing.md).

Pure arithmetic; :func:`sizing_command` is the ``tidegate sizing`` CLI around it.

The model (docs/sizing.md explains each term):

* rows = rate x outage (every message of the outage stays in the buffer);
* a row is its payload plus ``ROW_META_BYTES`` (ids, device, topic, class, times, cell
  header); SQLite packs whole rows into 4 KiB pages (appends fill pages completely), so a row
  costs a page divided by the rows that fit in one, plus ``INDEX_BYTES_PER_ROW`` for the
  (class, id) index;
* buffer bytes = the empty schema + rows x that + devices x ``DEVICE_STATE_BYTES``
  (retransmission memory and registry) + the drop ledger when lossy classes drop
  (``LEDGER_ROW_BYTES`` per entry, at most ``drop_ledger_max_rows``); this is what
  ``buffer.max_bytes`` bounds (pages in use);
* disk = buffer bytes + the WAL (``WAL_BYTES`` or two group commits, whichever is larger)
  + ``buffer.min_free_disk_bytes`` (the gateway stops acknowledging below it);
* memory = ``RSS_BASE_BYTES`` + devices x ``RSS_PER_DEVICE_BYTES``: the buffer is on disk,
  so memory does not grow with the outage;
* while the backlog drains after it, ``kafka.send_workers`` child processes of
  ``SEND_WORKER_RSS_BYTES`` each come on top (they exit 30 s after the drain).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import typer

from gateway.config import load_config
from gateway.errors import ConfigError

__all__ = [
    "DEVICE_STATE_BYTES",
    "EMPTY_FILE_BYTES",
    "INTERIOR_PAGES",
    "INDEX_BYTES_PER_ROW",
    "LEDGER_ROW_BYTES",
    "PAGE_BYTES",
    "ROW_META_BYTES",
    "RSS_BASE_BYTES",
    "RSS_PER_DEVICE_BYTES",
    "SEND_WORKER_RSS_BYTES",
    "WAL_BYTES",
    "Sizing",
    "estimate",
    "parse_duration",
    "row_bytes",
    "sizing_command",
]

# Measured by bench/sizing.py (docs/bench-results/sizing.json); docs/sizing.md has the runs.
# tests/test_sizing.py fails when a committed measurement no longer fits these.
PAGE_BYTES = 4096
"""SQLite's default page size (the buffer does not change it)."""
ROW_META_BYTES = 110
"""Bytes of a row besides its payload, measured between 96 and 109 with the simulator's ids
(device id 9 characters, topic ``d/<id>/up/telemetry``, envelope ``msg_id``); longer device
ids and topics add their extra length (the id is stored twice: column and topic)."""
EMPTY_FILE_BYTES = 96 << 10
"""A new buffer file: every table and index of the schema, one page each (94,208 measured)."""
INTERIOR_PAGES = 0.01
"""Interior b-tree pages on top of the leaves (0.4 % measured; 1 % assumed)."""
INDEX_BYTES_PER_ROW = 40
"""The ``uplink_class_order (class, id)`` index: 36.8 bytes per row measured."""
DEVICE_STATE_BYTES = 8000
"""Per device that published: its retransmission fingerprints (a fixed ring: 64 slots per
class for envelopes with ``seq``, else 64 packet-id slots and 32 envelope slots per class)
and registry row; 5.7-6.1 KB measured, one class, with both rings."""
LEDGER_ROW_BYTES = 128
"""Per drop-ledger entry (the ledger is trimmed to ``buffer.drop_ledger_max_rows``); 124
measured."""
WAL_BYTES = 8 << 20
"""The write-ahead log file: checkpointed in the background every 100 ms while written, and by
the writer itself at 2,000 pages if that falls behind (edge/wal_checkpoint.py); never shrunk.
4.6-5.4 MB measured while filling with SQLite's own checkpoint at 1,000 pages."""
RSS_BASE_BYTES = 90 << 20
"""Gateway RSS with no device connected (Python, amqtt, aiokafka, SQLite cache); 81-83 MiB
measured (a password check adds scrypt's memory while devices connect, docs/sizing.md)."""
RSS_PER_DEVICE_BYTES = 16_500
SEND_WORKER_RSS_BYTES = 80 << 20
"""One send worker child (bridge/send_worker.py) while a backlog drains: Python, aiokafka,
its producer and two batches (the one in flight and the one staged); measured by
bench/drain.py (docs/bench-results/drain-send-workers.json)."""
"""Added RSS per connected device (session, handler, two tasks, socket buffers): 13.6-15.4
KB measured between 1,000 and 10,000 devices (bench/sizing.py, bench/fleet_scale.py: 97.7 MB
at 1,000, 225.1 MB at 10,000), with a margin for the peak while waves connect: 243.0 MB with
full collections 10x rarer (gateway/gc_tuning.py), 231.7 before (docs/sizing.md "Memory").
Before the per-connection work it was 34-48 KB."""
_LEAF_USABLE = PAGE_BYTES - 8
"""A table leaf page minus its header; each cell's 2-byte pointer is in ``ROW_META_BYTES``."""
_MAX_LOCAL = PAGE_BYTES - 35
"""Largest row SQLite keeps whole on a leaf page; longer ones spill into overflow pages."""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
_GIB = 1 << 30


class SizingError(ValueError):
    """A sizing input that makes no sense (negative rate, unreadable duration)."""


@dataclass(frozen=True)
class Sizing:
    """What an outage costs, in bytes (see the module docstring for the model)."""

    rows: int
    payload_bytes: int
    buffer_bytes: int
    """Pages in use: set ``buffer.max_bytes`` at least this high."""
    wal_bytes: int
    disk_bytes: int
    """Buffer + WAL + ``min_free_disk_bytes``: free space the data directory needs."""
    memory_bytes: int
    drain_memory_bytes: int
    """``memory_bytes`` plus the send workers, while the backlog drains after the outage."""


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``30m``, ``2h``, ``1d``, ``1h30m`` -> seconds."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)([smhd])", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise SizingError(f"not a duration: {text!r} (examples: 90s, 30m, 2h, 1d, 1h30m)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def row_bytes(payload_bytes: int) -> float:
    """Bytes of the buffer file one stored message of ``payload_bytes`` occupies."""
    row = payload_bytes + ROW_META_BYTES
    if row <= _MAX_LOCAL:
        table = PAGE_BYTES / max(1, _LEAF_USABLE // row)
    else:  # not measured: a leaf share plus whole overflow pages (rounded up)
        table = PAGE_BYTES * math.ceil(row / (PAGE_BYTES - 4))
    return table * (1 + INTERIOR_PAGES) + INDEX_BYTES_PER_ROW


def estimate(
    *,
    rate_per_s: float,
    outage_s: float,
    payload_bytes: int,
    devices: int,
    commit_max_batch: int = 2048,
    min_free_disk_bytes: int = 256 << 20,
    ledger_rows: int = 0,
    send_workers: int = 1,
) -> Sizing:
    """Bytes for ``outage_s`` of ``rate_per_s`` messages of ``payload_bytes`` from
    ``devices`` devices; ``ledger_rows`` drop-ledger entries (0 for lossless classes)."""
    for name, value in (
        ("rate", rate_per_s),
        ("outage", outage_s),
        ("payload", payload_bytes),
        ("devices", devices),
        ("ledger rows", ledger_rows),
        ("send workers", send_workers),
    ):
        if value < 0 or math.isnan(value):
            raise SizingError(f"{name} must be >= 0, got {value}")
    rows = math.ceil(rate_per_s * outage_s)
    per_row = row_bytes(payload_bytes)
    buffer_bytes = math.ceil(
        EMPTY_FILE_BYTES
        + rows * per_row
        + devices * DEVICE_STATE_BYTES
        + ledger_rows * LEDGER_ROW_BYTES
    )
    wal_bytes = max(WAL_BYTES, math.ceil(2 * commit_max_batch * per_row))
    memory_bytes = RSS_BASE_BYTES + devices * RSS_PER_DEVICE_BYTES
    return Sizing(
        rows=rows,
        payload_bytes=rows * payload_bytes,
        buffer_bytes=buffer_bytes,
        wal_bytes=wal_bytes,
        disk_bytes=buffer_bytes + wal_bytes + min_free_disk_bytes,
        memory_bytes=memory_bytes,
        drain_memory_bytes=memory_bytes + send_workers * SEND_WORKER_RSS_BYTES,
    )


def _human(n: int) -> str:
    for unit, size in (("GiB", _GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def sizing_command(
    *,
    rate: Annotated[float, typer.Option(help="Messages per second, all devices together.")],
    outage: Annotated[str, typer.Option(help="Outage to ride out: 90s, 30m, 2h, 1d.")],
    payload: Annotated[int, typer.Option(help="Average MQTT payload bytes.")] = 256,
    devices: Annotated[int, typer.Option(help="Devices publishing.")] = 1000,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="Compare with this gateway config's [buffer]."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Disk and memory for riding out a Kafka outage (constants: docs/sizing.md)."""
    commit_max_batch, min_free, bounds, send_workers = 2048, 256 << 20, None, 1
    if config is not None:
        try:
            loaded = load_config(config, check_files=False)
        except ConfigError as exc:
            typer.echo(f"tidegate: {exc}", err=True)
            raise typer.Exit(2) from None
        buffer = loaded.buffer
        commit_max_batch, min_free = buffer.commit_max_batch, buffer.min_free_disk_bytes
        bounds = buffer
        exactly_once = loaded.kafka.delivery == "exactly_once"
        send_workers = 0 if exactly_once else loaded.kafka.send_workers
    try:
        result = estimate(
            rate_per_s=rate,
            outage_s=parse_duration(outage),
            payload_bytes=payload,
            devices=devices,
            commit_max_batch=commit_max_batch,
            min_free_disk_bytes=min_free,
            send_workers=send_workers,
        )
    except SizingError as exc:
        typer.echo(f"tidegate: {exc}", err=True)
        raise typer.Exit(2) from None
    fits = (
        None
        if bounds is None
        else bounds.max_bytes >= result.buffer_bytes and bounds.max_rows >= result.rows
    )
    if as_json:
        typer.echo(json.dumps({**asdict(result), "fits_config": fits}))
    else:
        typer.echo(f"messages buffered     {result.rows:,}")
        typer.echo(f"payload               {_human(result.payload_bytes)}")
        typer.echo(f"buffer (max_bytes)    {_human(result.buffer_bytes)}")
        typer.echo(f"WAL                   {_human(result.wal_bytes)}")
        typer.echo(f"disk free needed      {_human(result.disk_bytes)} (incl. min_free_disk)")
        typer.echo(f"memory (RSS)          {_human(result.memory_bytes)}")
        typer.echo(
            f"  while draining       {_human(result.drain_memory_bytes)}"
            f" (with {send_workers} send workers)"
        )
        if bounds is not None:
            verdict = "fits" if fits else "DOES NOT FIT"
            typer.echo(
                f"config [buffer]       max_bytes {_human(bounds.max_bytes)}, max_rows"
                f" {bounds.max_rows:,}: {verdict}"
            )
    if fits is False:
        raise typer.Exit(1)
