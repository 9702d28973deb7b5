"""Tables (SQLAlchemy Core). Migrations in storage/migrations must match them (a test checks)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text

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
    # Covers the windows endpoint's change checks (storage.sql.SqlStore.change_signature, bucket_versions).
    Index("ix_window_state_versions", "model", "student_version", "window_start", "updated_at"),
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
    # JSON: input kind -> highest event time processed, so a restarted collector moves the watermark
    # exactly as an uninterrupted one would (migration 0006).
    Column("observed", Text, nullable=True),
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

# The SLO engine's alert state and event-time progress; the leader lease keeps replicas from both notifying.
slo_engine = Table(
    "slo_engine",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("state", Text, nullable=False),
    Column("evaluated_through", BigInteger, nullable=False),
    Column("leader", String(128), nullable=True),
    Column("lease_until", BigInteger, nullable=False),
)

# Transactional outbox: a notification commits with the engine state that produced it.
outbox = Table(
    "outbox",
    metadata,
    Column("id", String(64), primary_key=True),  # the webhook-id: stable across retries
    Column("receiver", String(64), nullable=False),  # alert-webhook | alertmanager | retrain
    Column("group_key", String(256), nullable=False),
    Column("payload", Text, nullable=False),
    Column("status", String(16), nullable=False),  # pending | delivered | failed | disabled
    Column("attempts", Integer, nullable=False),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("last_status_code", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
)

delivery_log = Table(
    "delivery_log",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("outbox_id", String(64), nullable=False, index=True),
    Column("attempt", Integer, nullable=False),
    Column("at", BigInteger, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("duration_ms", Integer, nullable=False),
)

# Receivers that answered 410 Gone: disabled until an operator re-enables them.
disabled_receivers = Table(
    "disabled_receivers",
    metadata,
    Column("receiver", String(64), primary_key=True),
    Column("at", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
)

silences = Table(
    "silences",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("matchers", Text, nullable=False),  # JSON object: label -> value (equality matchers)
    Column("starts_at", BigInteger, nullable=False),
    Column("ends_at", BigInteger, nullable=False),
    Column("created_by", String(256), nullable=False),
    Column("comment", Text, nullable=False),
)

# The SLO document (slo.config.SloFile as JSON) the live engine and the API share.
slo_config = Table(
    "slo_config",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("document", Text, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
)

# The transfer set: joined predictions sampled per closed window (collector.records.TransferRecord), the
# data the training runner distils from. Bounded per model: the oldest rows go first.
transfer_set = Table(
    "transfer_set",
    metadata,
    Column("model", String(256), primary_key=True),
    Column("request_id", String(256), primary_key=True),
    Column("ts", BigInteger, nullable=False),  # event time, epoch milliseconds
    Column("student_version", String(256), nullable=False),
    Column("payload", Text, nullable=False),  # JSON: features, teacher, student, label
    Index("ix_transfer_set_model_ts", "model", "ts"),
)

# Retrain jobs of the training runner; the id is the webhook-id (the idempotency key).
retrain_jobs = Table(
    "retrain_jobs",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("model", String(256), nullable=False),
    Column("status", String(16), nullable=False),  # queued | running | promoted | rejected | failed
    Column("request", Text, nullable=False),  # the webhook's JSON body
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    Column("parent_version", String(256), nullable=True),
    Column("student_version", String(256), nullable=True),  # the new version, once registered
    Column("metrics", Text, nullable=True),  # JSON: held-out agreement, KL, accuracy of both students
    Column("log", Text, nullable=False),
    Column("error", Text, nullable=True),
    Index("ix_retrain_jobs_model_status", "model", "status"),
)

# The columnar engine's join buffer (collector.live_columns), per co-partition: chunks of open
# predictions, join patches and waiting replays / labels as Arrow IPC blobs (collector.column_state),
# and the engine's scalars as JSON (migration 0007).
engine_blobs = Table(
    "engine_blobs",
    metadata,
    Column("partition", Integer, primary_key=True),
    Column("kind", String(16), primary_key=True),
    Column("model", String(256), primary_key=True),
    Column("seq", BigInteger, primary_key=True),
    Column("last_start", BigInteger, nullable=False),  # the latest window start of its rows
    Column("blob", LargeBinary, nullable=False),
)

engine_meta = Table(
    "engine_meta",
    metadata,
    Column("partition", Integer, primary_key=True),
    Column("meta", Text, nullable=False),
)
