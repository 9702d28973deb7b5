"""Each co-partition's highest event time per input, beside its watermark.

A collector moves the watermark from these maxima (the least over the inputs still read); storing
them lets a restarted collector take exactly the decisions an uninterrupted one would.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("partition_watermarks") as batch:
        batch.add_column(sa.Column("observed", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("partition_watermarks") as batch:
        batch.drop_column("observed")
