"""Tables (SQLAlchemy Core). Migrations in storage/migrations must match them (a test checks)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Integer, MetaData, String, Table, Text

metadata = MetaData()

# Mergeable per-window state, one row per (model, version, window, partition): each collector
# replica owns its partitions' rows and readers merge them.
window_state = Table(
    "window_state",
    metadata,
    Column("model", String(256), primary_key=True),
    Column("student_version", String(256), primary_key=True),
    Column("window_start", BigInteger, primary_key=True),  # epoch milliseconds
    Column("partition", Integer, primary_key=True),
    Column("window_ms", Integer, nullable=False),
    Column("closed", Boolean, nullable=False),
    Column("state", Text, nullable=False),  # analyzer.window.WindowState.to_dict() as JSON
    Column("updated_at", BigInteger, nullable=False),
)

# The join buffer of open windows, so a restarted collector resumes joins where it stopped.
join_entries = Table(
    "join_entries",
    metadata,
    Column("partition", Integer, primary_key=True),
    Column("kind", String(1), primary_key=True),
    Column("model", String(256), primary_key=True),
    Column("request_id", String(256), primary_key=True),
    Column("window_start", BigInteger, nullable=False),
    Column("payload", Text, nullable=False),
)

# Offsets kept by kdwatch (not Kafka auto-commit), written in the same transaction as the state
# they produced; compare-and-set on next_offset fences a consumer that lost its partition.
consumer_offsets = Table(
    "consumer_offsets",
    metadata,
    Column("group_id", String(256), primary_key=True),
    Column("topic", String(256), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("next_offset", BigInteger, nullable=False),
)

partition_watermarks = Table(
    "partition_watermarks",
    metadata,
    Column("group_id", String(256), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("watermark", BigInteger, nullable=True),
)

# Rejections, duplicates, late and unmatched records per kind, partition and reason.
event_counters = Table(
    "event_counters",
    metadata,
    Column("kind", String(16), primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("reason", String(64), primary_key=True),
    Column("count", BigInteger, nullable=False),
)

# PSI baselines per model (analyzer.drift.Reference.to_dict() as JSON).
references = Table(
    "references",
    metadata,
    Column("model", String(256), primary_key=True),
    Column("fingerprint", String(32), nullable=False),
    Column("data", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)
