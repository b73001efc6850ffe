"""The buffer file's schema and its migrations.

The version lives in ``PRAGMA user_version``; ``PRAGMA application_id`` marks the file as a
tidegate buffer. A newer gateway opening an older file migrates it in one transaction, so
an interrupted migration leaves the old version intact. Each migration is a list of SQL
statements that must keep every row: uplink rows are the promise.
"""

from __future__ import annotations

from typing import Final

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_V1", "SCHEMA_VERSION", "create_statements"]

APPLICATION_ID: Final = 0x54494447  # "TIDG"

SCHEMA_V1: Final = (
    """CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE uplink (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- message counter, never reused
        device_id  TEXT    NOT NULL,
        class      TEXT    NOT NULL,
        topic      TEXT    NOT NULL,
        qos        INTEGER NOT NULL,
        payload    BLOB    NOT NULL,
        ingest_ms  INTEGER NOT NULL,
        priority   INTEGER NOT NULL DEFAULT 0,
        expires_ms INTEGER                                  -- NULL: never expires
    )""",
    "CREATE INDEX uplink_forward_order ON uplink (priority DESC, id)",
    """CREATE TABLE devices (
        device_id        TEXT PRIMARY KEY,
        first_seen_ms    INTEGER NOT NULL,
        last_seen_ms     INTEGER NOT NULL,
        connected        INTEGER NOT NULL DEFAULT 0,
        peer             TEXT,
        device_type      TEXT,
        firmware_version TEXT,
        info_updated_ms  INTEGER
    ) WITHOUT ROWID""",
)
"""Version 1 exactly as it shipped (kept to test the migration from it)."""

_V1_TO_V2: Final = (
    # The envelope's msg_id (when the payload is a tidegate CBOR envelope): dedup and drops.
    "ALTER TABLE uplink ADD COLUMN msg_id TEXT",
    # Leasing goes class by class (priorities with a guaranteed share), FIFO inside a class.
    "DROP INDEX uplink_forward_order",
    "CREATE INDEX uplink_class_order ON uplink (class, id)",
    "CREATE INDEX uplink_expiry ON uplink (expires_ms) WHERE expires_ms IS NOT NULL",
    """CREATE TABLE dead_letters (
        id           INTEGER PRIMARY KEY,  -- the uplink row id: the message id survives
        device_id    TEXT    NOT NULL,
        class        TEXT    NOT NULL,
        topic        TEXT    NOT NULL,
        qos          INTEGER NOT NULL,
        payload      BLOB    NOT NULL,
        ingest_ms    INTEGER NOT NULL,
        msg_id       TEXT,
        reason       TEXT    NOT NULL,
        dead_ms      INTEGER NOT NULL,
        forwarded_ms INTEGER               -- when the Kafka dead-letter topic acked it
    )""",
    "CREATE INDEX dead_letters_unforwarded ON dead_letters (id) WHERE forwarded_ms IS NULL",
    """CREATE TABLE drops (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        message_id INTEGER,               -- uplink row id; NULL when never stored
        device_id  TEXT    NOT NULL,
        class      TEXT    NOT NULL,
        topic      TEXT    NOT NULL,
        msg_id     TEXT,
        seq        INTEGER,
        reason     TEXT    NOT NULL,
        dropped_ms INTEGER NOT NULL
    )""",
    # Bounded memory of recent messages per device, to recognise retransmissions: a ring of
    # slots per device (packet id modulo 64; envelope class + seq modulo 64, since session 11,
    # when the SQL comment below says 32; edge/intake.py), so its size is devices x a
    # constant however long the gateway runs. A collision overwrites a slot and can only let
    # a duplicate through, never drop a message.
    """CREATE TABLE inbound_dedup (
        device_id   TEXT    NOT NULL,
        slot        TEXT    NOT NULL,     -- 'p<packet id % 64>' or 'm<class>:<seq % 32>'
        fingerprint TEXT    NOT NULL,     -- '<packet id>:<digest>' or the envelope msg_id
        seen_ms     INTEGER NOT NULL,
        PRIMARY KEY (device_id, slot)
    ) WITHOUT ROWID""",
)

_V2_TO_V3: Final = (
    # Downlink commands (docs/commands.md). The row is also the memory of seen command ids:
    # terminal rows are trimmed to ``commands.remember_ids``, so a duplicate from Kafka is
    # accepted once for as long as its row is remembered.
    """CREATE TABLE commands (
        command_id    TEXT    PRIMARY KEY,
        seq           INTEGER NOT NULL,       -- arrival order (gateway counter)
        device_id     TEXT    NOT NULL,
        name          TEXT    NOT NULL,
        params        TEXT    NOT NULL,       -- JSON object
        priority      INTEGER NOT NULL,
        ttl_s         REAL    NOT NULL,
        expires_ms    INTEGER NOT NULL,
        not_before_ms INTEGER,
        state         TEXT    NOT NULL,       -- pending delivered executed failed expired rejected
        received_ms   INTEGER NOT NULL,
        updated_ms    INTEGER NOT NULL,
        attempts      INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    "CREATE INDEX commands_pending ON commands (device_id, priority DESC, seq)"
    " WHERE state = 'pending'",
    "CREATE INDEX commands_terminal ON commands (updated_ms)"
    " WHERE state IN ('executed', 'failed', 'expired', 'rejected')",
    # Results outbox: a row per state change, deleted once the results topic acked it.
    """CREATE TABLE command_results (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        command_id TEXT    NOT NULL,
        device_id  TEXT    NOT NULL,
        status     TEXT    NOT NULL,
        reason     TEXT,
        output     TEXT,                      -- JSON, as the device reported it
        at_ms      INTEGER NOT NULL
    )""",
)

_V3_TO_V4: Final = (
    # Firmware (docs/firmware.md): cached releases (the image bytes are files in the cache
    # directory, named by their sha256), campaigns, their per-device targets, and the
    # progress outbox to Kafka.
    """CREATE TABLE fw_releases (
        release_id   TEXT    PRIMARY KEY,
        device_type  TEXT    NOT NULL,
        version      TEXT    NOT NULL,
        size         INTEGER NOT NULL,
        sha256       TEXT    NOT NULL,
        manifest     TEXT    NOT NULL,       -- the signed bytes, as published
        signature    TEXT    NOT NULL,       -- base64 Ed25519
        received_ms  INTEGER NOT NULL,
        last_used_ms INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE fw_campaigns (
        campaign_id       TEXT    PRIMARY KEY,
        release_id        TEXT    NOT NULL,
        state             TEXT    NOT NULL,  -- running paused completed aborted rolled_back
        rings             TEXT    NOT NULL,  -- JSON list of cumulative percents
        ring              INTEGER NOT NULL,  -- the ring being rolled out
        failure_threshold REAL    NOT NULL,
        accepted_failures INTEGER NOT NULL DEFAULT 0,
        rollback_of       TEXT,
        reason            TEXT,
        created_ms        INTEGER NOT NULL,
        updated_ms        INTEGER NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE fw_targets (
        campaign_id  TEXT    NOT NULL,
        device_id    TEXT    NOT NULL,
        ring         INTEGER NOT NULL,
        state        TEXT    NOT NULL,       -- waiting offered downloading installed failed aborted
        from_version TEXT,
        bytes        INTEGER NOT NULL DEFAULT 0,
        offered_ms   INTEGER,
        reason       TEXT,
        updated_ms   INTEGER NOT NULL,
        PRIMARY KEY (campaign_id, device_id)
    ) WITHOUT ROWID""",
    "CREATE INDEX fw_targets_device ON fw_targets (device_id, state)",
    """CREATE TABLE fw_outbox (
        id    INTEGER PRIMARY KEY AUTOINCREMENT,
        key   TEXT    NOT NULL,
        value TEXT    NOT NULL,              -- JSON record for the status topic
        at_ms INTEGER NOT NULL
    )""",
)

MIGRATIONS: Final[dict[int, tuple[str, ...]]] = {1: _V1_TO_V2, 2: _V2_TO_V3, 3: _V3_TO_V4}
"""``from_version -> statements`` that bring a file to ``from_version + 1``."""

SCHEMA_VERSION: Final = 1 + len(MIGRATIONS)


def create_statements() -> list[str]:
    """Statements that create the current schema in an empty file."""
    statements = list(SCHEMA_V1)
    for version in range(1, SCHEMA_VERSION):
        statements.extend(MIGRATIONS[version])
    return statements
