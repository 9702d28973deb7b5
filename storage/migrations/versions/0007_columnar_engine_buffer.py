"""The columnar engine's join buffer: Arrow IPC blobs and the engine's scalars per co-partition.

Used by a collector run with ``KDWATCH_COLLECTOR_ENGINE=columnar`` (collector.live_columns); the
record joiner keeps its one row per buffered record in ``join_entries``.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engine_blobs",
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("kind", sa.String(16), primary_key=True),
        sa.Column("model", sa.String(256), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("last_start", sa.BigInteger(), nullable=False),
        sa.Column("blob", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "engine_meta",
        sa.Column("partition", sa.Integer(), primary_key=True),
        sa.Column("meta", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("engine_meta")
    op.drop_table("engine_blobs")
