"""Initial schema: window state, join buffer, offsets, watermarks, counters, references.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "window_state",
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("student_version", sa.String(256), primary_key=True),
        sa.Column("window_start", sa.BigInteger, primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("window_ms", sa.Integer, nullable=False),
        sa.Column("closed", sa.Boolean, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "join_entries",
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("kind", sa.String(1), primary_key=True),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("request_id", sa.String(256), primary_key=True),
        sa.Column("window_start", sa.BigInteger, nullable=False),
        sa.Column("payload", sa.Text, nullable=False),
    )
    op.create_table(
        "consumer_offsets",
        sa.Column("group_id", sa.String(256), primary_key=True),
        sa.Column("topic", sa.String(256), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("next_offset", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "partition_watermarks",
        sa.Column("group_id", sa.String(256), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("watermark", sa.BigInteger, nullable=True),
    )
    op.create_table(
        "event_counters",
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("partition", sa.Integer, primary_key=True),
        sa.Column("reason", sa.String(64), primary_key=True),
        sa.Column("count", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "references",
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("data", sa.Text, nullable=False),
        sa.Column("updated_at", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    for table in ("references", "event_counters", "partition_watermarks", "consumer_offsets", "join_entries", "window_state"):
        op.drop_table(table)
